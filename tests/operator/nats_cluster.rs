//! The operator on a three-node JetStream cluster with replicated buckets:
//! it keeps syncing through NATS leader changes caused by node faults.
//!
//! Prints the failover figures (time without ConfigMap writes per fault);
//! asserts only properties (no lost update, no cursor backward, one
//! writing operator at a time), never times.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use slipstream::{
    controller::{self, Config, Context, KvConnector, NatsConnector},
    kv::{
        KvReader, KvWriter,
        nats::{ConnectOptions, NatsBucket, NatsKv},
    },
    leader::{ElectionConfig, LeaderElection, LeaderMetrics, lease_bucket, lease_config},
    metrics::Metrics,
    policy::AccessPolicy,
};
use tokio::{task::JoinHandle, time::Instant};

use crate::{common::nats_cluster::NatsCluster, *};

const DATA: &str = "app";
const LEASES: &str = "slipstream-leases";
const KEYS: u32 = 40;
/// Longer than nats-server's largest raft election timeout (9 s), so the
/// other two nodes elect new leaders while this one sleeps.
const PAUSE: Duration = Duration::from_secs(10);
/// How long a fault may keep the ConfigMap from moving on before the test
/// fails (the figures printed are far below).
const RECOVERY: Duration = Duration::from_secs(45);
/// Long enough to tell a client that fails over from one that waits.
const CLIENT_PAUSE: Duration = Duration::from_secs(6);

/// One in-process operator replica with its own leader election and its own
/// NATS connection to all three nodes.
struct Replica {
    name: &'static str,
    election: LeaderElection,
    connector: Arc<NatsConnector>,
    ctx: Arc<Context>,
    task: JoinHandle<()>,
}

impl Replica {
    fn start(env: &Env, name: &'static str, urls: &str) -> Replica {
        let election = LeaderElection::start(
            ElectionConfig {
                key: "slipstream.leader".to_owned(),
                identity: name.to_owned(),
                // the product's defaults (--lease-ttl 15s --lease-renew 5s)
                lease: lease_config(Duration::from_secs(15), Duration::from_secs(5)).unwrap(),
            },
            // the product's own lease bucket, created with 3 replicas
            lease_bucket(LEASES, 3),
            ConnectOptions::new(urls),
            LeaderMetrics::default(),
        );
        let connector = Arc::new(NatsConnector::new(ConnectOptions::new(urls)));
        let kv: Arc<dyn KvConnector> = connector.clone();
        let ctx = Context::new(
            env.client.clone(),
            kv,
            AccessPolicy::allow_all(),
            Metrics::new(),
            election.gate(),
            Config {
                namespace: Some(env.ns().to_owned()),
                coalesce: Duration::from_millis(20),
                ..Config::default()
            },
        );
        let task = tokio::spawn(controller::run(ctx.clone()));
        Replica {
            name,
            election,
            connector,
            ctx,
            task,
        }
    }

    /// The node this replica's data connection is on right now.
    async fn connected_to(&self) -> String {
        match self.connector.connection().await {
            Ok(kv) => kv.client().server_info().server_name,
            Err(e) => format!("none ({e})"),
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
        self.ctx.shutdown();
    }
}

/// A ConfigMap version as the watch saw it: when, its cursor, its data.
type Seen = Arc<Mutex<Vec<(Instant, u64, BTreeMap<String, String>)>>>;

fn record_versions(env: &Env, name: &str) -> Seen {
    let seen: Seen = Arc::default();
    let api = env.configmaps();
    let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let out = seen.clone();
    tokio::spawn(async move {
        let mut s = watcher(api, wc).default_backoff().boxed();
        while let Some(ev) = s.next().await {
            if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = ev
                && let Some(c) = cursor(&cm)
            {
                out.lock().unwrap().push((Instant::now(), c, data(&cm)));
            }
        }
    });
    seen
}

/// Puts `k.<i % KEYS> = v<i>` until stopped, retrying through errors, on
/// one connection per node, skipping the node under a fault (so its stalls
/// are not the writer's); records when each put was acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    avoid: Arc<Mutex<Option<String>>>,
    acked: Arc<Mutex<Vec<(Instant, u64)>>>,
    errors: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Writer {
    fn start(buckets: Vec<(String, NatsBucket)>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let avoid: Arc<Mutex<Option<String>>> = Arc::default();
        let acked: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
        let errors = Arc::new(AtomicU64::new(0));
        let (s, av, a, e) = (stop.clone(), avoid.clone(), acked.clone(), errors.clone());
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            let mut node = 0;
            while !s.load(Ordering::SeqCst) {
                let skip = av.lock().unwrap().clone();
                if skip.as_deref() == Some(buckets[node].0.as_str()) {
                    node = (node + 1) % buckets.len();
                    continue;
                }
                let key = format!("k.{}", i % u64::from(KEYS));
                match buckets[node]
                    .1
                    .put(&key, Bytes::from(format!("v{i}")))
                    .await
                {
                    Ok(rev) => {
                        let rev = rev.as_u64().unwrap();
                        a.lock().unwrap().push((Instant::now(), rev));
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    Err(_) => {
                        e.fetch_add(1, Ordering::Relaxed);
                        node = (node + 1) % buckets.len();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Writer {
            stop,
            avoid,
            acked,
            errors,
            task,
        }
    }

    /// Stop writing through `node` (a put in flight there may still stall).
    fn avoid(&self, node: Option<&str>) {
        *self.avoid.lock().unwrap() = node.map(str::to_owned);
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
    }

    /// The longest time without an acknowledged put in `from..to`.
    fn longest_gap(&self, from: Instant, to: Instant) -> (Duration, Duration) {
        let acked: Vec<Instant> = self.acked.lock().unwrap().iter().map(|(t, _)| *t).collect();
        longest_gap(acked.into_iter(), from, to)
    }

    /// The revision of the first put acknowledged at or after `since`.
    fn first_rev_since(&self, since: Instant) -> Option<u64> {
        let acked = self.acked.lock().unwrap();
        acked.iter().find(|(t, _)| *t >= since).map(|(_, r)| *r)
    }
}

/// Who held the write gate from when on (`None`: nobody).
type Holders = Arc<Mutex<Vec<(Instant, Option<&'static str>)>>>;

/// Samples both replicas' write gates; counts samples where both were open.
struct LeaderWatch {
    both: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    changes: Holders,
    task: JoinHandle<()>,
}

impl LeaderWatch {
    fn start(replicas: [(&'static str, tokio::sync::watch::Receiver<bool>); 2]) -> LeaderWatch {
        let both = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let changes: Holders = Arc::default();
        let (b, n, c) = (both.clone(), samples.clone(), changes.clone());
        let task = tokio::spawn(async move {
            let mut last: Option<Option<&'static str>> = None;
            loop {
                let open: Vec<&'static str> = replicas
                    .iter()
                    .filter(|(_, g)| *g.borrow())
                    .map(|(name, _)| *name)
                    .collect();
                n.fetch_add(1, Ordering::Relaxed);
                if open.len() > 1 {
                    b.fetch_add(1, Ordering::Relaxed);
                }
                let now = open.first().copied();
                if last != Some(now) {
                    c.lock().unwrap().push((Instant::now(), now));
                    last = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        LeaderWatch {
            both,
            samples,
            changes,
            task,
        }
    }
}

/// One connection per node (each to that node only), for looking at the
/// cluster from the nodes that are not under a fault.
struct Observers(Vec<(String, NatsKv)>);

impl Observers {
    async fn connect(cluster: &NatsCluster) -> Observers {
        let mut conns = Vec::new();
        for node in &cluster.nodes {
            let url = node.url();
            let kv = eventually(&format!("a connection to {}", node.name()), || async {
                NatsKv::connect(&ConnectOptions::new(url.clone()))
                    .await
                    .ok()
            })
            .await;
            conns.push((node.name().to_owned(), kv));
        }
        Observers(conns)
    }

    /// Connections to the nodes not in `skip`.
    fn except<'a>(&'a self, skip: &'a [&str]) -> impl Iterator<Item = &'a (String, NatsKv)> {
        self.0
            .iter()
            .filter(move |(n, _)| !skip.contains(&n.as_str()))
    }

    /// The RAFT leader of a stream, as a node not in `skip` reports it.
    async fn leader(&self, stream: &str, skip: &[&str]) -> Option<String> {
        for (_, kv) in self.except(skip) {
            let js = jetstream::new(kv.client().clone());
            let info = tokio::time::timeout(Duration::from_secs(2), async {
                js.get_stream(stream).await.ok()?.get_info().await.ok()
            })
            .await
            .ok()
            .flatten();
            if let Some(info) = info {
                return info.cluster?.leader.filter(|l| !l.is_empty());
            }
        }
        None
    }

    /// Waits for a leader of `stream` not in `not`, asked of nodes not in
    /// `not`; returns it and when it was first seen.
    async fn wait_leader(&self, stream: &str, not: &[&str]) -> (String, Instant) {
        eventually(
            &format!("a leader of {stream} other than {not:?}"),
            || async {
                self.leader(stream, not)
                    .await
                    .filter(|l| !not.contains(&l.as_str()))
                    .map(|l| (l, Instant::now()))
            },
        )
        .await
    }

    /// Moves the stream's leadership to `target` (a stepdown naming it as
    /// preferred, repeated until it took).
    async fn move_to(&self, stream: &str, target: &str) {
        eventually(&format!("{stream} led by {target}"), || async {
            let leader = self.leader(stream, &[]).await?;
            if leader == target {
                return Some(());
            }
            let (_, kv) = self.except(&[]).next()?;
            let body = format!("{{\"placement\":{{\"preferred\":\"{target}\"}}}}");
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                kv.client().request(
                    format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                    body.into(),
                ),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            None
        })
        .await
    }
}

fn max_cursor(seen: &Seen) -> u64 {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, c, _)| *c)
        .max()
        .unwrap_or(0)
}

/// The longest time in `from..to` between two of `events` (or a bound),
/// and when it ended, counted from `from`.
fn longest_gap(
    events: impl Iterator<Item = Instant>,
    from: Instant,
    to: Instant,
) -> (Duration, Duration) {
    let mut last = from;
    let mut gap = (Duration::ZERO, Duration::ZERO);
    for t in events
        .filter(|t| *t >= from && *t < to)
        .chain(std::iter::once(to))
    {
        if t - last > gap.0 {
            gap = (t - last, t - from);
        }
        last = t;
    }
    gap
}

/// Waits until the operator has synced an update written after `since`:
/// the writer's first put acknowledged from then on is in the ConfigMap.
/// Patient: a NATS election, watch consumer recreation and a lease handover
/// (up to the TTL) can add up on a loaded machine.
async fn synced_since(writer: &Writer, seen: &Seen, since: Instant) {
    let deadline = Instant::now() + RECOVERY;
    loop {
        if let Some(rev) = writer.first_rev_since(since)
            && max_cursor(seen) >= rev
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the ConfigMap did not reach an update written after the fault within {RECOVERY:?} \
             (cursor {}, writer at {:?})",
            max_cursor(seen),
            writer.first_rev_since(since)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`eventually`], for up to [`RECOVERY`]: a lease handover waits for
/// the old record's TTL.
async fn patiently<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + RECOVERY;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {RECOVERY:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Records the binding's Ready reasons in the order they appeared.
fn record_reasons(env: &Env, name: &str) -> Arc<Mutex<Vec<(Instant, String)>>> {
    let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let api = env.bindings();
    let out = seen.clone();
    tokio::spawn(async move {
        let mut s = watcher(api, wc).default_backoff().boxed();
        while let Some(ev) = s.next().await {
            if let Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) = ev {
                let reason = ready_reason(&b);
                let mut seen = out.lock().unwrap();
                if seen.last().map(|(_, r)| r) != Some(&reason) {
                    seen.push((Instant::now(), reason));
                }
            }
        }
    });
    seen
}

/// Runs blocking cluster control (signals, process start) without stalling
/// the runtime's other worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// The replica whose write gate is open now.
async fn writing_replica(replicas: &[Replica]) -> &Replica {
    patiently("a writing operator replica", || async {
        replicas.iter().find(|r| r.election.is_leader())
    })
    .await
}

/// One injected fault and what was seen right after it.
struct Fault {
    at: Instant,
    what: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_bucket_keeps_syncing_through_nats_node_kill_pause_and_restart() {
    let started = Instant::now();
    let env = Env::start().await;
    let mut cluster = blocking(|| NatsCluster::start(3));
    let urls = cluster.urls();
    let obs = Observers::connect(&cluster).await;
    let data_stream = format!("KV_{DATA}");
    let lease_stream = format!("KV_{LEASES}");
    // Both buckets with 3 replicas, created by the product: the data
    // bucket by `slipstream kv create-bucket --replicas 3`, the lease
    // bucket by the replicas' elections (`lease_bucket(_, 3)`).
    let kv = &obs.0[0].1;
    let replicas = [
        Replica::start(&env, "op-a", &urls),
        Replica::start(&env, "op-b", &urls),
    ];
    let created = std::process::Command::new(env!("CARGO_BIN_EXE_slipstream"))
        .args(["kv", "--nats", &urls, "--bucket", DATA, "create-bucket"])
        .args(["--history", "64", "--replicas", "3"])
        .output()
        .unwrap();
    assert!(created.status.success(), "kv create-bucket: {created:?}");
    for name in [DATA, LEASES] {
        eventually(&format!("bucket {name}"), || async {
            kv.open(name).await.ok()
        })
        .await;
        let stream = format!("KV_{name}");
        let (leader, _) = obs.wait_leader(&stream, &[]).await;
        let info = jetstream::new(kv.client().clone())
            .get_stream(&stream)
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap();
        assert_eq!(info.config.num_replicas, 3, "{name} is replicated");
        println!(
            "bucket {name}: R{} leader {leader}",
            info.config.num_replicas
        );
    }
    let mut buckets = Vec::new();
    for (name, kv) in &obs.0 {
        buckets.push((name.clone(), kv.open(DATA).await.unwrap()));
    }

    let leaders = LeaderWatch::start([
        (replicas[0].name, replicas[0].election.gate()),
        (replicas[1].name, replicas[1].election.gate()),
    ]);
    env.create_binding("b", &format!("bucket: {DATA}\nprefixes: [k.]"))
        .await;
    eventually("the binding's ConfigMap", || async { env.cm("b").await }).await;
    let seen = record_versions(&env, "b");
    let reasons = record_reasons(&env, "b");
    let writer = Writer::start(buckets.clone());
    eventually("the operator syncing the writer's puts", || async {
        (max_cursor(&seen) > 20).then_some(())
    })
    .await;
    let mut faults: Vec<Fault> = Vec::new();

    // Fault 1: kill -9 the node leading both the data and the lease stream.
    let op = writing_replica(&replicas).await;
    let op_node = op.connected_to().await;
    let (victim, _) = obs.wait_leader(&data_stream, &[]).await;
    obs.move_to(&lease_stream, &victim).await;
    let meta = cluster.meta_leader();
    writer.avoid(Some(&victim));
    let t = Instant::now();
    blocking(|| cluster.node(&victim).kill());
    let (new_leader, elected) = obs.wait_leader(&data_stream, &[&victim]).await;
    synced_since(&writer, &seen, elected).await;
    faults.push(Fault {
        at: t,
        what: format!(
            "kill -9 {victim} (led the data and lease streams; meta leader {meta:?}; \
             writing operator {} on {op_node}); next data stream leader {new_leader} \
             seen after {:.2?}",
            op.name,
            elected - t
        ),
    });

    // Fault 2: restart the killed node on the same store; it catches up.
    let t = Instant::now();
    blocking(|| cluster.node(&victim).restart());
    blocking(|| cluster.wait_healthy());
    let healthy = t.elapsed();
    writer.avoid(None);
    synced_since(&writer, &seen, Instant::now()).await;
    faults.push(Fault {
        at: t,
        what: format!("restart {victim} on its store; all nodes healthy after {healthy:.2?}"),
    });

    // Fault 3: SIGSTOP the node leading both streams (not the one the
    // writing operator is connected to) past the election timeout, then
    // SIGCONT: the other two elect new leaders, the paused one wakes stale.
    let op = writing_replica(&replicas).await;
    let op_node = op.connected_to().await;
    let paused = cluster
        .nodes
        .iter()
        .map(|n| n.name().to_owned())
        .find(|n| *n != op_node)
        .unwrap();
    obs.move_to(&data_stream, &paused).await;
    obs.move_to(&lease_stream, &paused).await;
    let meta = cluster.meta_leader();
    writer.avoid(Some(&paused));
    let t = Instant::now();
    blocking(|| cluster.node(&paused).pause());
    let (new_leader, elected) = obs.wait_leader(&data_stream, &[&paused]).await;
    tokio::time::sleep(PAUSE.saturating_sub(t.elapsed())).await;
    blocking(|| cluster.node(&paused).resume());
    blocking(|| cluster.wait_healthy());
    writer.avoid(None);
    synced_since(&writer, &seen, Instant::now()).await;
    faults.push(Fault {
        at: t,
        what: format!(
            "SIGSTOP {paused} for {PAUSE:?} (led the data and lease streams; meta leader \
             {meta:?}; writing operator {} on {op_node}); next data stream leader \
             {new_leader} seen after {:.2?}",
            op.name,
            elected - t
        ),
    });

    // Fault 4: SIGSTOP the node the writing operator's NATS connection is on.
    let op = writing_replica(&replicas).await;
    let conn = op.connector.connection().await.unwrap();
    let op_node = conn.client().server_info().server_name;
    let reconnects = conn.connection_status().borrow().reconnects;
    let data_leader = obs.leader(&data_stream, &[]).await;
    let lease_leader = obs.leader(&lease_stream, &[]).await;
    let meta = cluster.meta_leader();
    writer.avoid(Some(&op_node));
    let t = Instant::now();
    blocking(|| cluster.node(&op_node).pause());
    tokio::time::sleep(CLIENT_PAUSE).await;
    let reconnected = conn.connection_status().borrow().reconnects > reconnects;
    blocking(|| cluster.node(&op_node).resume());
    blocking(|| cluster.wait_healthy());
    writer.avoid(None);
    synced_since(&writer, &seen, Instant::now()).await;
    faults.push(Fault {
        at: t,
        what: format!(
            "SIGSTOP {op_node} for {CLIENT_PAUSE:?} (the writing operator {}'s connection; \
             data stream leader {data_leader:?}, lease stream leader {lease_leader:?}, \
             meta leader {meta:?}); the operator's client moved to another node during \
             the pause: {reconnected}",
            op.name
        ),
    });

    // The figures: per fault, the longest time without a ConfigMap write
    // carrying a newer cursor, from the fault to the next one.
    let writer_errors = writer.errors.load(Ordering::Relaxed);
    let puts = writer.acked.lock().unwrap().len();
    let end = Instant::now();
    let writes: Vec<Instant> = {
        let seen = seen.lock().unwrap();
        let mut prev = 0;
        seen.iter()
            .filter(|(_, c, _)| {
                let newer = *c > prev;
                prev = prev.max(*c);
                newer
            })
            .map(|(t, _, _)| *t)
            .collect()
    };
    let mut figures = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        let to = faults.get(i + 1).map_or(end, |n| n.at);
        let (silent, until) = longest_gap(writes.iter().copied(), f.at, to);
        let (stall, _) = writer.longest_gap(f.at, to);
        figures.push(format!(
            "{}. at +{:.1?}: {}\n   no ConfigMap write for {silent:.2?} (ending {until:.2?} \
             after the fault); longest writer stall {stall:.2?}; window {:.1?}",
            i + 1,
            f.at - started,
            f.what,
            to - f.at,
        ));
    }
    writer.stop().await;

    // No lost update: the ConfigMap ends at the KV truth and its last revision.
    let bucket = &buckets[0].1;
    let truth: BTreeMap<String, String> =
        eventually("the KV truth", || async { bucket.scan("k.").await.ok() })
            .await
            .into_iter()
            .map(|e| (e.key, String::from_utf8(e.value.to_vec()).unwrap()))
            .collect();
    let js = jetstream::new(kv.client().clone());
    let last = eventually("the data stream's last sequence", || async {
        let info = js
            .get_stream(&data_stream)
            .await
            .ok()?
            .get_info()
            .await
            .ok()?;
        Some(info.state.last_sequence)
    })
    .await;
    patiently(
        &format!("ConfigMap == KV truth at cursor {last}"),
        || async {
            let cm = env.cm("b").await?;
            (data(&cm) == truth && cursor(&cm) == Some(last)).then_some(())
        },
    )
    .await;
    patiently(&format!("a ConfigMap write at cursor {last}"), || async {
        (max_cursor(&seen) == last).then_some(())
    })
    .await;

    // Every recorded version: its cursor never went backward, and its
    // content is the KV state at that cursor (rebuilt from the stream).
    let stream = js.get_stream(&data_stream).await.unwrap();
    let mut states: Vec<BTreeMap<String, String>> = Vec::new();
    let mut state = BTreeMap::new();
    states.push(state.clone());
    for seq in 1..=last {
        let msg = stream
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|e| panic!("message {seq} of {last} (history 64 keeps them all): {e}"));
        let key = msg
            .subject
            .as_str()
            .trim_start_matches("$KV.app.")
            .to_owned();
        state.insert(key, String::from_utf8(msg.payload.to_vec()).unwrap());
        states.push(state.clone());
    }
    assert_eq!(
        states[last as usize], truth,
        "the stream replays to the truth"
    );
    let versions = seen.lock().unwrap().clone();
    let mut prev = 0;
    for (_, c, d) in &versions {
        assert!(*c >= prev, "cursor went backward: {prev} -> {c}");
        prev = *c;
        assert_eq!(
            d, &states[*c as usize],
            "ConfigMap at cursor {c} is not the KV state at {c}"
        );
    }
    assert!(
        versions.len() > 10,
        "only {} ConfigMap versions recorded",
        versions.len()
    );

    // Leadership stayed single.
    leaders.task.abort();
    let both = leaders.both.load(Ordering::Relaxed);
    let samples = leaders.samples.load(Ordering::Relaxed);
    let changes: Vec<(Duration, Option<&str>)> = leaders
        .changes
        .lock()
        .unwrap()
        .iter()
        .map(|(t, l)| (*t - started, *l))
        .collect();
    assert_eq!(
        both, 0,
        "both replicas' write gates open in {both} of {samples} samples"
    );
    assert!(samples > 100, "leadership sampled only {samples} times");

    println!(
        "--- NATS cluster failover: 3 nodes, R3 buckets, 2 operator replicas, lease 15 s / 5 s ---"
    );
    for f in &figures {
        println!("{f}");
    }
    let reasons: Vec<(Duration, String)> = reasons
        .lock()
        .unwrap()
        .iter()
        .map(|(t, r)| (*t - started, r.clone()))
        .collect();
    println!("binding Ready reasons: {reasons:?}");
    println!(
        "{puts} puts ({writer_errors} failed and retried), {} ConfigMap versions checked, \
         final cursor {last}, write gate holders {changes:?}, test took {:?}",
        versions.len(),
        started.elapsed()
    );
}
