//! The multi-process HA fixture, shared by the `ha` tests and the chaos
//! runner (`examples/chaos.rs`): one real nats-server, a Kubernetes API
//! server ([`TestApi`]: the emulator in-process, or a namespace of the real
//! control plane reached through the fault proxy, as
//! `SLIPSTREAM_TEST_APISERVER` says), N replicas of the real `slipstream`
//! binary (each with `--namespace`) with
//! leader election on, a writer that streams updates into several bindings,
//! a watcher that records every ConfigMap version the API server serves, and
//! the checks run on what was recorded.
//!
//! Every replica logs JSON; its "leadership acquired" / "leadership lost"
//! lines give the time its write gate opened and closed, which the
//! single-writer check compares with the API request log (the emulator's,
//! or the proxy's).
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use apiserver::backend::TestApi;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, CustomResourceExt,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use slipstream::{
    crd::{ConfigBinding, ConfigBindingSpec},
    kv::{
        KvReader, KvWriter,
        lease::LeaseRecord,
        nats::{BucketConfig, ConnectOptions, NatsBucket, NatsKv},
    },
    sink::configmap::CURSOR_ANNOTATION,
};
use tokio::task::JoinHandle;

use crate::common::{NatsServer, free_port};

pub const BUCKET: &str = "app";
pub const LEASE_BUCKET: &str = "slipstream-leases";
pub const LEASE_KEY: &str = "slipstream.leader";

/// Shape and timing of one HA run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub replicas: usize,
    pub bindings: usize,
    pub keys_per_binding: usize,
    pub ttl: Duration,
    pub renew: Duration,
    /// Updates per second the writer aims for.
    pub rate: u32,
    /// Share of writer operations that delete a key.
    pub delete_ratio: f64,
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            replicas: 3,
            bindings: 3,
            keys_per_binding: 40,
            ttl: Duration::from_secs(2),
            renew: Duration::from_millis(500),
            rate: 40,
            delete_ratio: 0.1,
            seed: 5,
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// What the harness did to a replica, with the wall-clock time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Started,
    Killed,
    Terminated,
    Paused,
    Resumed,
}

/// One `slipstream run` process.
pub struct Replica {
    pub name: String,
    bin: PathBuf,
    args: Vec<String>,
    kubeconfig: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    paused: bool,
    pub metrics_port: u16,
    pub actions: Vec<(SystemTime, Action)>,
}

impl Replica {
    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("replica log");
        let err = log.try_clone().expect("replica log");
        let child = Command::new(&self.bin)
            .arg("run")
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("HA_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("POD_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn slipstream");
        self.child = Some(child);
        self.paused = false;
        self.actions.push((SystemTime::now(), Action::Started));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// When the current process was started.
    pub fn started_at(&self) -> Option<SystemTime> {
        self.actions
            .iter()
            .rev()
            .find(|(_, a)| *a == Action::Started)
            .map(|(t, _)| *t)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// SIGKILL: no release, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.actions.push((SystemTime::now(), Action::Killed));
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// SIGTERM and wait for the exit (SIGKILL after 10 s).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.paused {
                signal(c.id(), "CONT");
            }
            self.actions.push((SystemTime::now(), Action::Terminated));
            signal(c.id(), "TERM");
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    self.paused = false;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// SIGSTOP: the process keeps its sockets and answers nothing.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid()
            && !self.paused
        {
            signal(pid, "STOP");
            self.paused = true;
            self.actions.push((SystemTime::now(), Action::Paused));
        }
    }

    pub fn resume(&mut self) {
        if let Some(pid) = self.pid()
            && self.paused
        {
            signal(pid, "CONT");
            self.paused = false;
            self.actions.push((SystemTime::now(), Action::Resumed));
        }
    }

    /// Starts again after a kill or terminate (no-op while running).
    pub fn restart(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `/metrics` of this replica (empty when it does not answer).
    pub async fn metrics(&self) -> String {
        let url = format!("127.0.0.1:{}", self.metrics_port);
        http_get(&url, "/metrics").await.unwrap_or_default()
    }

    /// `/readyz` status code and body.
    pub async fn readyz(&self) -> Option<String> {
        let url = format!("127.0.0.1:{}", self.metrics_port);
        http_get_status(&url, "/readyz").await
    }

    /// Gate transitions from this replica's log: (time, opened).
    pub fn gate_transitions(&self) -> Vec<(SystemTime, bool)> {
        let Ok(f) = File::open(&self.log_path) else {
            return Vec::new();
        };
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| {
                let v: serde_json::Value = serde_json::from_str(&line).ok()?;
                // JSON lines are flat: `message` at the top level
                let msg = v["message"].as_str()?;
                let opened = if msg.starts_with("leadership acquired") {
                    true
                } else if msg.starts_with("leadership lost") || msg.starts_with("shutting down") {
                    false
                } else {
                    return None;
                };
                Some((parse_time(v["timestamp"].as_str()?)?, opened))
            })
            .collect()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.paused {
                signal(c.id(), "CONT");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(
        SystemTime::UNIX_EPOCH
            + Duration::from_nanos(u64::try_from(t.unix_timestamp_nanos()).ok()?),
    )
}

async fn http_get_status(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()?
}

async fn http_get(addr: &str, path: &str) -> Option<String> {
    let text = http_get_status(addr, path).await?;
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// One ConfigMap version as the API server served it to a watch.
#[derive(Clone, Debug)]
pub struct Observed {
    pub at: SystemTime,
    pub name: String,
    pub resource_version: u64,
    pub cursor: Option<u64>,
    pub data: BTreeMap<String, String>,
}

/// One successful write by a replica, from the emulator's request log.
#[derive(Clone, Debug)]
pub struct Write {
    pub replica: String,
    pub verb: String,
    pub subresource: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub resource: String,
    pub name: String,
}

/// One KV operation of the data bucket, as NATS recorded it.
#[derive(Clone, Debug)]
pub struct KvOp {
    pub revision: u64,
    pub key: String,
    /// `None` for deletes and purges.
    pub value: Option<String>,
}

/// Counters of a writer run.
#[derive(Default)]
pub struct WriterStats {
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
    pub errors: AtomicU64,
}

pub struct Writer {
    stop: Arc<AtomicBool>,
    pub stats: Arc<WriterStats>,
    task: JoinHandle<()>,
}

impl Writer {
    pub async fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        (
            self.stats.puts.load(Ordering::Relaxed),
            self.stats.deletes.load(Ordering::Relaxed),
            self.stats.errors.load(Ordering::Relaxed),
        )
    }
}

pub struct Cluster {
    pub settings: Settings,
    pub nats: NatsServer,
    pub api: TestApi,
    pub kv: NatsKv,
    pub data: NatsBucket,
    pub leases: NatsBucket,
    pub replicas: Vec<Replica>,
    pub observed: Arc<Mutex<Vec<Observed>>>,
    /// Errors the recorder's watch met (each may have hidden some versions).
    pub recorder_errors: Arc<Mutex<Vec<String>>>,
    recorder: JoinHandle<()>,
    dir: tempfile::TempDir,
    seq: AtomicU64,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.recorder.abort();
        if std::env::var_os("HA_KEEP_LOGS").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("replica logs kept in {}", kept.keep().display());
        }
    }
}

pub fn binding_name(i: usize) -> String {
    format!("b{i}")
}

pub fn prefix(i: usize) -> String {
    format!("b{i}.")
}

impl Cluster {
    /// NATS, the emulator with the CRD, the data bucket with its first
    /// values, the bindings, the ConfigMap recorder and the replicas; returns
    /// once every ConfigMap holds the initial values.
    pub async fn start(bin: &Path, settings: Settings) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("slipstream-ha-")
            .tempdir()
            .expect("temp dir");
        let nats = NatsServer::start();
        let api = TestApi::start().await;
        api.install_crd(&ConfigBinding::crd()).await;
        let client = api.client();
        let ns = api.namespace().to_owned();
        let kv = NatsKv::connect(&ConnectOptions {
            request_timeout: Duration::from_secs(2),
            ..ConnectOptions::new(nats.url())
        })
        .await
        .expect("connect NATS");
        // Enough history per key that the full operation log can be read
        // back at the end (the truth every ConfigMap version is checked against).
        let data = kv
            .create_or_open(&BucketConfig {
                history: 64,
                ..BucketConfig::new(BUCKET)
            })
            .await
            .expect("data bucket");
        let leases = kv
            .create_or_open(&BucketConfig::new(LEASE_BUCKET))
            .await
            .expect("lease bucket");
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");

        let observed = Arc::new(Mutex::new(Vec::new()));
        let recorder_errors = Arc::new(Mutex::new(Vec::new()));
        let recorder = tokio::spawn(record_configmaps(
            Api::namespaced(client.clone(), &ns),
            observed.clone(),
            recorder_errors.clone(),
        ));
        let mut cluster = Cluster {
            settings: settings.clone(),
            nats,
            api,
            kv,
            data,
            leases,
            replicas: Vec::new(),
            observed,
            recorder_errors,
            recorder,
            dir,
            seq: AtomicU64::new(0),
        };
        for b in 0..settings.bindings {
            for k in 0..settings.keys_per_binding {
                cluster
                    .data
                    .put(&format!("{}k{k}", prefix(b)), Bytes::from("v0"))
                    .await
                    .expect("initial put");
            }
            let spec: ConfigBindingSpec = serde_yaml::from_str(&format!(
                "bucket: {BUCKET}\nprefixes: [{}]\nstripPrefix: true",
                prefix(b)
            ))
            .expect("binding spec");
            Api::<ConfigBinding>::namespaced(client.clone(), &ns)
                .create(
                    &PostParams::default(),
                    &ConfigBinding::new(&binding_name(b), spec),
                )
                .await
                .expect("create binding");
        }
        for i in 0..settings.replicas {
            let name = format!("replica-{i}");
            let metrics_port = free_port();
            let args = vec![
                "--nats".into(),
                cluster.nats.url(),
                "--nats-timeout".into(),
                "1s".into(),
                "--leader-election".into(),
                "--lease-ttl".into(),
                ms(settings.ttl),
                "--lease-renew".into(),
                ms(settings.renew),
                "--identity".into(),
                name.clone(),
                "--metrics-addr".into(),
                format!("127.0.0.1:{metrics_port}"),
                "--coalesce".into(),
                "20ms".into(),
                "--log-format".into(),
                "json".into(),
                "--namespace".into(),
                ns.clone(),
            ];
            let mut r = Replica {
                log_path: cluster.dir.path().join(format!("{name}.log")),
                name,
                bin: bin.to_owned(),
                args,
                kubeconfig: kubeconfig.clone(),
                child: None,
                paused: false,
                metrics_port,
                actions: Vec::new(),
            };
            r.spawn();
            cluster.replicas.push(r);
        }
        cluster
            .converge(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("initial sync: {e}\n{}", cluster.logs_tail()));
        cluster
    }

    pub fn client(&self) -> kube::Client {
        self.api.client()
    }

    /// The namespace of the bindings and ConfigMaps (the replicas watch only it).
    pub fn ns(&self) -> &str {
        self.api.namespace()
    }

    /// Closes the API's watch streams; on the emulator, compacts first, so
    /// every re-watch gets 410 Gone and re-lists. The real server cannot be
    /// compacted on demand: there the watches are only closed. Returns
    /// whether it compacted.
    pub fn compact_and_close_watches(&self) -> bool {
        let faults = self.api.faults();
        let compacted = match &faults {
            apiserver::backend::TestFaults::Emulator(f) => {
                f.compact();
                true
            }
            apiserver::backend::TestFaults::Real(..) => false,
        };
        faults.close_watches();
        compacted
    }

    pub fn replica(&mut self, name: &str) -> &mut Replica {
        self.replicas
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no replica {name}"))
    }

    /// The last lines of every replica log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            let log = r.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(15);
            out.push_str(&format!(
                "--- {} ---\n{}\n",
                r.name,
                lines[from..].join("\n")
            ));
        }
        out
    }

    /// The holder of a live lease record right now.
    pub async fn holder(&self) -> Option<String> {
        let entry = self.leases.get(LEASE_KEY).await.ok()??;
        let record = LeaseRecord::parse(&entry.value).ok()?;
        (record.expires_at_ms > slipstream::kv::lease::unix_ms()).then_some(record.holder)
    }

    /// Waits for a lease holder whose process runs and is not paused.
    pub async fn wait_leader(&self, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Some(h) = self.holder().await
                && self
                    .replicas
                    .iter()
                    .any(|r| r.name == h && r.is_running() && !r.is_paused())
            {
                return Some(h);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Starts a writer: `rate` operations per second on random keys of the
    /// bindings, values unique; keeps going through NATS outages.
    pub fn start_writer(&self) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(WriterStats::default());
        let data = self.data.clone();
        let s = self.settings.clone();
        let seq0 = self.seq.fetch_add(1_000_000, Ordering::SeqCst);
        let task = tokio::spawn({
            let stop = stop.clone();
            let stats = stats.clone();
            async move {
                let mut rng = StdRng::seed_from_u64(s.seed ^ seq0);
                let period = Duration::from_secs_f64(1.0 / f64::from(s.rate.max(1)));
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = seq0;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    n += 1;
                    let b = rng.random_range(0..s.bindings);
                    let k = rng.random_range(0..s.keys_per_binding);
                    let key = format!("{}k{k}", prefix(b));
                    let result = if rng.random_bool(s.delete_ratio) {
                        data.delete(&key).await.map(|_| &stats.deletes)
                    } else {
                        data.put(&key, Bytes::from(format!("v{n}")))
                            .await
                            .map(|_| &stats.puts)
                    };
                    match result {
                        Ok(c) => {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Writer { stop, stats, task }
    }

    /// The current KV content of binding `b`, as its ConfigMap should hold it.
    pub async fn truth_now(&self, b: usize) -> Result<BTreeMap<String, String>, String> {
        let entries = self
            .data
            .scan(&prefix(b))
            .await
            .map_err(|e| format!("scan: {e}"))?;
        Ok(entries
            .into_iter()
            .map(|e| {
                (
                    e.key[prefix(b).len()..].to_owned(),
                    String::from_utf8_lossy(&e.value).to_string(),
                )
            })
            .collect())
    }

    pub async fn configmap(&self, b: usize) -> Option<ConfigMap> {
        Api::<ConfigMap>::namespaced(self.client(), self.ns())
            .get_opt(&binding_name(b))
            .await
            .ok()
            .flatten()
    }

    /// Waits until every ConfigMap equals the KV truth.
    pub async fn converge(&self, within: Duration) -> Result<Duration, String> {
        let start = tokio::time::Instant::now();
        let mut last = String::new();
        while start.elapsed() < within {
            let mut all = true;
            for b in 0..self.settings.bindings {
                let truth = match self.truth_now(b).await {
                    Ok(t) => t,
                    Err(e) => {
                        last = e;
                        all = false;
                        break;
                    }
                };
                let cm = self.configmap(b).await;
                let data = cm.as_ref().and_then(|c| c.data.clone()).unwrap_or_default();
                if data != truth {
                    let diff = truth
                        .iter()
                        .filter(|(k, v)| data.get(*k) != Some(*v))
                        .count()
                        + data.keys().filter(|k| !truth.contains_key(*k)).count();
                    last = format!("{} differs from KV in {diff} keys", binding_name(b));
                    all = false;
                    break;
                }
            }
            if all {
                return Ok(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("not converged after {within:?}: {last}"))
    }

    /// Successful writes of replicas to ConfigMaps and ConfigBindings, in
    /// completion order.
    pub fn writes(&self) -> Vec<Write> {
        let mut w: Vec<Write> = self
            .api
            .requests()
            .into_iter()
            .filter(|r| {
                r.is_write()
                    && (200..300).contains(&r.status)
                    && (r.resource == "configmaps" || r.resource == "configbindings")
            })
            .filter_map(|r| {
                let replica = r
                    .user_agent
                    .split_once('(')
                    .and_then(|(_, rest)| rest.split_once(')'))
                    .map(|(id, _)| id.to_owned())?;
                Some(Write {
                    replica,
                    verb: r.verb,
                    subresource: r.subresource,
                    start: r.timestamp.checked_sub(r.duration).unwrap_or(r.timestamp),
                    end: r.timestamp,
                    resource: r.resource,
                    name: r.name,
                })
            })
            .collect();
        w.sort_by_key(|w| w.end);
        w
    }

    /// First successful write by a replica other than `not` that completed after `after`.
    pub async fn wait_write_by_other(
        &self,
        not: &str,
        after: SystemTime,
        within: Duration,
    ) -> Option<Write> {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Some(w) = self
                .writes()
                .into_iter()
                .find(|w| w.replica != not && w.end > after && w.resource == "configmaps")
            {
                return Some(w);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// The full operation log of the data bucket, read back from NATS.
    pub async fn kv_history(&self) -> Result<Vec<KvOp>, String> {
        let js = async_nats::jetstream::new(self.kv.client().clone());
        let store = js
            .get_key_value(BUCKET)
            .await
            .map_err(|e| format!("open {BUCKET}: {e}"))?;
        let mut ops = Vec::new();
        for b in 0..self.settings.bindings {
            for k in 0..self.settings.keys_per_binding {
                let key = format!("{}k{k}", prefix(b));
                let hist: Vec<_> = store
                    .history(&key)
                    .await
                    .map_err(|e| format!("history {key}: {e}"))?
                    .try_collect()
                    .await
                    .map_err(|e| format!("history {key}: {e}"))?;
                if hist.len() >= 64 {
                    return Err(format!(
                        "{key} has {} revisions: its history was truncated; raise keys_per_binding",
                        hist.len()
                    ));
                }
                ops.extend(hist.into_iter().map(|e| KvOp {
                    revision: e.revision,
                    key: e.key,
                    value: match e.operation {
                        async_nats::jetstream::kv::Operation::Put => {
                            Some(String::from_utf8_lossy(&e.value).to_string())
                        }
                        _ => None,
                    },
                }));
            }
        }
        ops.sort_by_key(|o| o.revision);
        Ok(ops)
    }

    /// Gate-open intervals per replica: from its log, closed by a kill when
    /// the log could not say so, open-ended (until `end`) when still open.
    pub fn gate_intervals(&self, end: SystemTime) -> Vec<GateInterval> {
        let mut out = Vec::new();
        for r in &self.replicas {
            let mut events: Vec<(SystemTime, Option<bool>)> = r
                .gate_transitions()
                .into_iter()
                .map(|(t, open)| (t, Some(open)))
                .collect();
            events.extend(
                r.actions
                    .iter()
                    .filter(|(_, a)| matches!(a, Action::Killed | Action::Started))
                    .map(|(t, _)| (*t, None)),
            );
            events.sort_by_key(|e| e.0);
            let mut open: Option<SystemTime> = None;
            for (t, e) in events {
                match (e, open) {
                    (Some(true), None) => open = Some(t),
                    (Some(false) | None, Some(from)) => {
                        out.push(GateInterval {
                            replica: r.name.clone(),
                            from,
                            to: t,
                            killed: e.is_none(),
                        });
                        open = None;
                    }
                    _ => {}
                }
            }
            if let Some(from) = open {
                out.push(GateInterval {
                    replica: r.name.clone(),
                    from,
                    to: end,
                    killed: false,
                });
            }
        }
        out.sort_by_key(|g| g.from);
        out
    }

    /// Times each replica was SIGSTOPped: (from, to).
    pub fn pauses(&self, end: SystemTime) -> BTreeMap<String, Vec<(SystemTime, SystemTime)>> {
        let mut out = BTreeMap::new();
        for r in &self.replicas {
            let mut v = Vec::new();
            let mut from = None;
            for (t, a) in &r.actions {
                match a {
                    Action::Paused => from = Some(*t),
                    Action::Resumed | Action::Killed | Action::Terminated => {
                        if let Some(f) = from.take() {
                            v.push((f, *t));
                        }
                    }
                    Action::Started => {}
                }
            }
            if let Some(f) = from {
                v.push((f, end));
            }
            out.insert(r.name.clone(), v);
        }
        out
    }

    /// Runs every check on what was recorded; call after [`converge`](Self::converge).
    pub async fn check(&self) -> Report {
        let end = SystemTime::now();
        let mut report = Report::default();
        // The recorder may lag the API server: wait until it has seen the
        // version each ConfigMap holds now, so the checks below cover the
        // whole run.
        let mut finals = BTreeMap::new();
        for b in 0..self.settings.bindings {
            if let Some(rv) = self
                .configmap(b)
                .await
                .and_then(|c| c.metadata.resource_version)
                .and_then(|rv| rv.parse::<u64>().ok())
            {
                finals.insert(binding_name(b), rv);
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let missing = loop {
            let missing: Vec<String> = {
                let observed = self.observed.lock().map(|o| o.clone()).unwrap_or_default();
                finals
                    .iter()
                    .filter(|(name, rv)| {
                        !observed
                            .iter()
                            .any(|o| &&o.name == name && o.resource_version == **rv)
                    })
                    .map(|(name, rv)| format!("{name}@{rv}"))
                    .collect()
            };
            if missing.is_empty() || tokio::time::Instant::now() > deadline {
                break missing;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if finals.len() < self.settings.bindings {
            report.failures.push(format!(
                "only {} of {} ConfigMaps exist at the end",
                finals.len(),
                self.settings.bindings
            ));
        }
        if !missing.is_empty() {
            report.failures.push(format!(
                "the recorder never saw the final versions {}: the recording is incomplete",
                missing.join(", ")
            ));
        }
        report.recorder_errors = self.recorder_errors.lock().map(|e| e.len()).unwrap_or(0);
        let observed = self.observed.lock().map(|o| o.clone()).unwrap_or_default();
        report.versions = observed.len();
        if report.versions == 0 {
            report
                .failures
                .push("no ConfigMap version was recorded: nothing was checked".to_owned());
        }

        // 1. Never backward: per ConfigMap, the cursor never decreases.
        report.failures.extend(backward_moves(&observed));

        // 2. Every version holds every KV update its cursor covers.
        match self.kv_history().await {
            Err(e) => report.failures.push(e),
            Ok(ops) => {
                report.kv_ops = ops.len();
                for o in &observed {
                    let Some(cursor) = o.cursor else { continue };
                    let Some(b) = (0..self.settings.bindings).find(|b| binding_name(*b) == o.name)
                    else {
                        continue;
                    };
                    report.content_checks += 1;
                    let bad = stale_keys(&ops, &prefix(b), cursor, &o.data);
                    if !bad.is_empty() {
                        report.failures.push(format!(
                            "{} at resourceVersion {} (cursor {cursor}) lacks updates its cursor covers: {}",
                            o.name,
                            o.resource_version,
                            bad.join("; ")
                        ));
                    }
                }
            }
        }

        if report.content_checks == 0 {
            report
                .failures
                .push("no recorded version carried a cursor: no content was checked".to_owned());
        }

        // 3. Final state equals the KV truth.
        for b in 0..self.settings.bindings {
            let truth = self.truth_now(b).await.unwrap_or_default();
            let data = self
                .configmap(b)
                .await
                .and_then(|c| c.data)
                .unwrap_or_default();
            if truth != data {
                report.failures.push(format!(
                    "{} does not equal the KV truth at the end",
                    binding_name(b)
                ));
            }
        }

        // 4. One writer at a time.
        let gates = self.gate_intervals(end);
        let pauses = self.pauses(end);
        let paused_overlap = |replica: &str, from: SystemTime, to: SystemTime| -> Duration {
            pauses
                .get(replica)
                .into_iter()
                .flatten()
                .map(|(a, b)| {
                    let s = (*a).max(from);
                    let e = (*b).min(to);
                    e.duration_since(s).unwrap_or_default()
                })
                .sum()
        };
        // SIGCONT to the deadline guard closing the gate: scheduling only.
        let wake_slack = Duration::from_millis(250);
        for (i, a) in gates.iter().enumerate() {
            for b in gates.iter().skip(i + 1) {
                if a.replica == b.replica || b.from >= a.to {
                    continue;
                }
                let overlap_to = a.to.min(b.to);
                let overlap = overlap_to.duration_since(b.from).unwrap_or_default();
                let frozen = paused_overlap(&a.replica, b.from, overlap_to);
                if overlap > frozen + wake_slack {
                    report.failures.push(format!(
                        "{} and {} both had their write gate open for {:?} ({:?} of it with {} paused)",
                        a.replica, b.replica, overlap, frozen, a.replica
                    ));
                } else {
                    report.excused_overlaps += 1;
                }
            }
        }
        let writes = self.writes();
        report.writes = writes.len();
        let mut writers = BTreeSet::new();
        for w in &writes {
            writers.insert(w.replica.clone());
            // The "acquired" line is logged just after the gate opens, and
            // the emulator starts its clock when it handles a request, a
            // little after the replica sent it; a killed replica's requests
            // still in the socket are handled after its death.
            let log_lag = Duration::from_millis(100);
            let inside = gates.iter().any(|g| {
                let in_flight = if g.killed {
                    Duration::from_secs(1)
                } else {
                    Duration::from_millis(50)
                };
                g.replica == w.replica && w.start + log_lag >= g.from && w.start <= g.to + in_flight
            });
            if !inside {
                let rel = |t: SystemTime| match t.duration_since(w.start) {
                    Ok(d) => format!("+{d:?}"),
                    Err(e) => format!("-{:?}", e.duration()),
                };
                let mine: Vec<String> = gates
                    .iter()
                    .filter(|g| g.replica == w.replica)
                    .map(|g| format!("[{}, {}]", rel(g.from), rel(g.to)))
                    .collect();
                report.failures.push(format!(
                    "{} wrote ({} {} {}/{}) while its gate was closed; its gate-open intervals relative to the write: {}",
                    w.replica,
                    w.verb,
                    w.resource,
                    w.name,
                    w.subresource,
                    mine.join(" ")
                ));
            }
            // A write by a leader whose successor's gate had already opened
            // (it was paused and woke up before noticing): fencing decided it.
            let own = gates
                .iter()
                .filter(|g| g.replica == w.replica && g.from <= w.start + log_lag)
                .map(|g| g.from)
                .max();
            if let Some(own_from) = own
                && gates.iter().any(|g| {
                    g.replica != w.replica
                        && g.from > own_from
                        && w.start > g.from
                        && w.start < g.to
                })
            {
                report.late_writes += 1;
            }
        }
        report.writers = writers.len();
        report.terms = gates.len();
        report
    }
}

/// ConfigMap versions whose cursor is older than an earlier version's (in
/// resourceVersion order), or that lost their cursor.
pub fn backward_moves(observed: &[Observed]) -> Vec<String> {
    let mut by_name: BTreeMap<&str, Vec<&Observed>> = BTreeMap::new();
    for o in observed {
        by_name.entry(&o.name).or_default().push(o);
    }
    let mut out = Vec::new();
    for (name, mut versions) in by_name {
        versions.sort_by_key(|o| o.resource_version);
        let mut last: Option<u64> = None;
        for o in versions {
            if let Some(prev) = last
                && o.cursor.is_none_or(|c| c < prev)
            {
                out.push(format!(
                    "{name} moved backward: cursor {prev} then {:?} at resourceVersion {}",
                    o.cursor, o.resource_version
                ));
            }
            if let Some(c) = o.cursor {
                last = Some(last.map_or(c, |p| p.max(c)));
            }
        }
    }
    out
}

/// Keys of `data` (a ConfigMap version with cursor `cursor`) that miss an
/// update at or below the cursor: each key must hold its KV state at the
/// cursor or a later one (the cursor is a lower bound: "every update <= C is
/// in the target"), and a value must be one the key really had.
pub fn stale_keys(
    ops: &[KvOp],
    prefix: &str,
    cursor: u64,
    data: &BTreeMap<String, String>,
) -> Vec<String> {
    // Per key: its state at the cursor, then every later state.
    let mut states: BTreeMap<&str, (Option<&str>, Vec<Option<&str>>)> = BTreeMap::new();
    for op in ops {
        let Some(k) = op.key.strip_prefix(prefix) else {
            continue;
        };
        let entry = states.entry(k).or_insert((None, Vec::new()));
        if op.revision <= cursor {
            entry.0 = op.value.as_deref();
        } else {
            entry.1.push(op.value.as_deref());
        }
    }
    let mut bad = Vec::new();
    for (k, (at_cursor, later)) in &states {
        let have = data.get(*k).map(String::as_str);
        if have != *at_cursor && !later.contains(&have) {
            bad.push(format!(
                "{k}: has {have:?}, KV at the cursor {at_cursor:?}, later {later:?}"
            ));
        }
    }
    for k in data.keys() {
        if !states.contains_key(k.as_str()) {
            bad.push(format!("{k}: not a KV key"));
        }
    }
    bad
}

/// When a replica's write gate was open.
#[derive(Clone, Debug)]
pub struct GateInterval {
    pub replica: String,
    pub from: SystemTime,
    pub to: SystemTime,
    /// Closed by the process dying (kill -9), not by the replica itself.
    pub killed: bool,
}

/// What [`Cluster::check`] found.
#[derive(Debug, Default)]
pub struct Report {
    pub versions: usize,
    /// Errors the recorder's watch met (it re-watches after each).
    pub recorder_errors: usize,
    pub content_checks: usize,
    pub kv_ops: usize,
    pub writes: usize,
    pub writers: usize,
    pub terms: usize,
    pub excused_overlaps: usize,
    pub late_writes: usize,
    pub failures: Vec<String>,
}

impl Report {
    pub fn summary(&self) -> String {
        format!(
            "{} ConfigMap versions observed ({} recorder watch errors), all checked for a monotone cursor; {} checked to hold every KV update their cursor covers ({} KV operations); {} successful replica writes by {} replicas over {} leader terms, each inside its writer's gate-open interval; {} gate overlaps only while the old leader was SIGSTOPped, {} writes landing in such an overlap (fenced); failures: {}",
            self.versions,
            self.recorder_errors,
            self.content_checks,
            self.kv_ops,
            self.writes,
            self.writers,
            self.terms,
            self.excused_overlaps,
            self.late_writes,
            self.failures.len()
        )
    }

    pub fn assert_ok(&self) {
        assert!(
            self.failures.is_empty(),
            "{} check(s) failed:\n{}\n{}",
            self.failures.len(),
            self.failures.join("\n"),
            self.summary()
        );
    }
}

/// Records every ConfigMap version the API server serves to a watch, and
/// every error the watch met ([`Cluster::check`] shows them and requires
/// that the recording reached each ConfigMap's final version).
async fn record_configmaps(
    api: Api<ConfigMap>,
    out: Arc<Mutex<Vec<Observed>>>,
    errors: Arc<Mutex<Vec<String>>>,
) {
    let stream = watcher(api, watcher::Config::default()).touched_objects();
    futures::pin_mut!(stream);
    loop {
        match stream.next().await {
            Some(Ok(cm)) => {
                let ann = cm.metadata.annotations.clone().unwrap_or_default();
                let o = Observed {
                    at: SystemTime::now(),
                    name: cm.metadata.name.clone().unwrap_or_default(),
                    resource_version: cm
                        .metadata
                        .resource_version
                        .as_deref()
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0),
                    cursor: ann.get(CURSOR_ANNOTATION).and_then(|c| c.parse().ok()),
                    data: cm.data.clone().unwrap_or_default(),
                };
                if let Ok(mut v) = out.lock() {
                    v.push(o);
                }
            }
            Some(Err(e)) => {
                if let Ok(mut v) = errors.lock() {
                    v.push(e.to_string());
                }
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            None => {
                if let Ok(mut v) = errors.lock() {
                    v.push("the watch stream ended".to_owned());
                }
                return;
            }
        }
    }
}

/// min / median / max of a sample.
pub fn spread(sample: &[Duration]) -> String {
    if sample.is_empty() {
        return "no samples".to_owned();
    }
    let mut s = sample.to_vec();
    s.sort();
    format!(
        "min {:.0} ms / median {:.0} ms / max {:.0} ms (n={})",
        s[0].as_secs_f64() * 1e3,
        s[s.len() / 2].as_secs_f64() * 1e3,
        s[s.len() - 1].as_secs_f64() * 1e3,
        s.len()
    )
}

/// How a leader is taken down in [`fail_over`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takedown {
    Kill9,
    Sigterm,
}

/// Takes the current leader down while the writer runs, measures the time
/// until another replica's first ConfigMap write, then restarts the old one.
pub async fn fail_over(cluster: &mut Cluster, how: Takedown) -> Result<Failover, String> {
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .ok_or_else(|| format!("no leader\n{}", cluster.logs_tail()))?;
    // Make sure the leader is actually writing before taking it down.
    let since = SystemTime::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if cluster
            .writes()
            .iter()
            .any(|w| w.replica == leader && w.end > since)
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "leader {leader} does not write\n{}",
                cluster.logs_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Standbys must be warm (past their initial lists and syncs): a
    // replica restarted a moment ago would still be starting.
    let warm = Duration::from_secs(2);
    loop {
        let youngest = cluster
            .replicas
            .iter()
            .filter(|r| r.is_running())
            .filter_map(|r| r.started_at())
            .max();
        match youngest.and_then(|t| t.elapsed().ok()) {
            Some(up) if up < warm => tokio::time::sleep(warm - up).await,
            _ => break,
        }
    }
    // The old leader's lease record as it stands: a standby that waits for
    // the TTL cannot write before this expiry.
    let lease_expires = lease_record(cluster)
        .await
        .filter(|r| r.holder == leader)
        .map(|r| SystemTime::UNIX_EPOCH + Duration::from_millis(r.expires_at_ms));
    let t0 = SystemTime::now();
    match how {
        Takedown::Kill9 => cluster.replica(&leader).kill9(),
        Takedown::Sigterm => cluster.replica(&leader).terminate(),
    }
    let w = cluster
        .wait_write_by_other(&leader, t0, Duration::from_secs(30))
        .await
        .ok_or_else(|| format!("nobody took over from {leader}\n{}", cluster.logs_tail()))?;
    let took = w.end.duration_since(t0).unwrap_or_default();
    let relists = cluster
        .api
        .requests()
        .iter()
        .filter(|r| {
            r.verb == "list"
                && r.timestamp >= t0
                && r.timestamp <= w.end
                && r.user_agent.contains(&format!("({})", w.replica))
        })
        .count();
    if relists > 0 && std::env::var_os("HA_DEBUG_LISTS").is_some() {
        for r in cluster
            .api
            .requests()
            .iter()
            .filter(|r| r.verb == "list" && r.timestamp >= t0 && r.timestamp <= w.end)
        {
            eprintln!(
                "list {} +{:?} by {} (failover {} -> {})",
                r.resource,
                r.timestamp.duration_since(t0).unwrap_or_default(),
                r.user_agent,
                leader,
                w.replica
            );
        }
    }
    cluster.replica(&leader).restart();
    Ok(Failover {
        old: leader,
        new: w.replica,
        took,
        new_write_at: w.end,
        lease_expires,
        relists,
    })
}

async fn lease_record(cluster: &Cluster) -> Option<LeaseRecord> {
    let entry = cluster.leases.get(LEASE_KEY).await.ok()??;
    LeaseRecord::parse(&entry.value).ok()
}

/// One measured failover.
#[derive(Debug)]
pub struct Failover {
    pub old: String,
    pub new: String,
    /// From the signal to the new leader's first ConfigMap write.
    pub took: Duration,
    /// When that write completed.
    pub new_write_at: SystemTime,
    /// Expiry of the old leader's lease record read just before the signal
    /// (`None` when it could not be read).
    pub lease_expires: Option<SystemTime>,
    /// List requests the new leader made before that write (a warm standby makes none).
    pub relists: usize,
}

/// The `slipstream` binary for a runner outside `cargo test` (examples do
/// not get `CARGO_BIN_EXE_*`): built with the runner's own profile.
pub fn build_replica_bin() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bin", "slipstream"]);
    // Built together with this example, features resolve as they did for
    // the example, so the dependencies it already built are reused.
    if let Some(example) = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
    {
        cmd.args(["--example", &example]);
    }
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo to build slipstream: {e}"))?;
    if !status.success() {
        return Err(format!("building slipstream failed: {status}"));
    }
    // target/<profile>/examples/<name> -> target/<profile>/slipstream
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("slipstream"))
        .ok_or_else(|| format!("cannot find the target dir from {}", exe.display()))?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} is missing after the build", bin.display()))
    }
}
