//! Scale benchmark: N bindings over B buckets on one operator replica (the
//! real `slipstream run` binary as a child process, so its RSS and CPU are
//! its own), against one nats-server and the Kubernetes API emulator with a
//! few ms of write latency. Every figure is printed next to its reference
//! measured in the same run: raw async-nats state-sync, a naive
//! one-consumer-per-binding design, the raw put -> watch floor.
//!
//! `make bench-scale` (full: 10,000 bindings, 1M keys, 60 s steady state),
//! `cargo run --release --example bench_scale -- --quick` (about 2 minutes).
//! Prints a table and writes it as JSON to target/bench-scale.json. Asserts
//! nothing: goals are shown as ok / MISSED.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "bench_scale/observe.rs"]
mod observe;
#[path = "bench_scale/procs.rs"]
mod procs;
#[path = "bench_scale/report.rs"]
mod report;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use apiserver::{ApiServer, RequestRecord};
use async_nats::jetstream::{self, consumer::pull};
use clap::Parser;
use common::NatsServer;
use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, CustomResourceExt,
    api::{DeleteParams, PostParams},
};
use observe::{Bindings, Tracker, binding_name, churn_name, kv_key, value, value_seq};
use procs::{Operator, ProcStats, emulator_cpu, metric_sum, proc_stats};
use rand::{Rng, SeedableRng, rngs::StdRng};
use report::{Report, ms, percentile};
use serde_json::json;
use slipstream::{
    crd::{ConfigBinding, ConfigBindingSpec, Target},
    kv::nats::{BucketConfig, ConnectOptions, NatsKv},
};

#[derive(Parser, Debug, Clone)]
#[command(about = "Slipstream scale benchmark (prints a table, writes target/bench-scale.json)")]
struct Args {
    /// Small variant: 1,000 bindings, 100k keys, 10 s phases (about 2 minutes).
    #[arg(long)]
    quick: bool,
    /// ConfigBindings [default: 10000, quick 1000].
    #[arg(long)]
    bindings: Option<usize>,
    /// Buckets the bindings are spread over.
    #[arg(long, default_value_t = 10)]
    buckets: usize,
    /// KV keys per binding (one prefix each).
    #[arg(long, default_value_t = 100)]
    keys_per_binding: usize,
    /// Bytes per value (at least 13).
    #[arg(long, default_value_t = 32)]
    value_bytes: usize,
    /// Steady-state duration [default: 60, quick 10].
    #[arg(long)]
    steady_secs: Option<f64>,
    /// Steady-state updates per second, spread over all bindings.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Bindings created and deleted during the churn phase [default: 1000, quick 100].
    #[arg(long)]
    churn: Option<usize>,
    /// Churn phase duration [default: steady-secs].
    #[arg(long)]
    churn_secs: Option<f64>,
    /// Updates of the burst, all to the first bucket [default: 100000, quick 20000].
    #[arg(long)]
    burst: Option<usize>,
    /// Changes made while the operator is down.
    #[arg(long, default_value_t = 1000)]
    restart_changes: usize,
    /// Emulator write latency (models etcd).
    #[arg(long, default_value_t = 3)]
    write_latency_ms: u64,
    /// The operator's coalescing window.
    #[arg(long, default_value_t = 50)]
    coalesce_ms: u64,
    /// Operator binary [default: target/release/slipstream, built first].
    #[arg(long)]
    operator_bin: Option<PathBuf>,
    /// Do not run `cargo build --release --bin slipstream` first.
    #[arg(long)]
    no_build: bool,
    /// Where the JSON goes [default: target/bench-scale.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Give up waiting for a phase after this many seconds.
    #[arg(long, default_value_t = 900)]
    phase_timeout_secs: u64,
}

struct Params {
    bindings: usize,
    buckets: usize,
    per_bucket: usize,
    keys: usize,
    value_bytes: usize,
    steady_secs: f64,
    churn: usize,
    churn_secs: f64,
    burst: usize,
}

impl Args {
    fn params(&self) -> Params {
        let q = self.quick;
        let bindings = self.bindings.unwrap_or(if q { 1000 } else { 10_000 });
        let buckets = self.buckets.clamp(1, bindings.max(1));
        let steady_secs = self.steady_secs.unwrap_or(if q { 10.0 } else { 60.0 });
        Params {
            bindings,
            buckets,
            per_bucket: bindings.div_ceil(buckets),
            keys: self.keys_per_binding.max(1),
            value_bytes: self.value_bytes.max(observe::SEQ_DIGITS + 1),
            steady_secs,
            churn: self.churn.unwrap_or(if q { 100 } else { 1000 }),
            churn_secs: self.churn_secs.unwrap_or(steady_secs),
            burst: self.burst.unwrap_or(if q { 20_000 } else { 100_000 }),
        }
    }
}

fn bucket_name(j: usize) -> String {
    format!("scale{j}")
}

/// Publishes KV updates straight through async-nats (acks awaited by a
/// separate task) and registers each with the tracker and the floor watch.
#[derive(Clone)]
struct Publisher {
    js: jetstream::Context,
    per_bucket: usize,
    value_bytes: usize,
    seq: Arc<AtomicU64>,
    tracker: Tracker,
    floor: Arc<Mutex<HashMap<u64, Instant>>>,
    floor_on: Arc<std::sync::atomic::AtomicBool>,
    acks: tokio::sync::mpsc::UnboundedSender<jetstream::context::PublishAckFuture>,
    failed: Arc<AtomicUsize>,
}

impl Publisher {
    fn new(js: jetstream::Context, p: &Params, tracker: Tracker) -> Self {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<jetstream::context::PublishAckFuture>();
        let failed = Arc::new(AtomicUsize::new(0));
        let f = failed.clone();
        tokio::spawn(async move {
            while let Some(ack) = rx.recv().await {
                if ack.await.is_err() {
                    f.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            js,
            per_bucket: p.per_bucket,
            value_bytes: p.value_bytes,
            seq: Arc::new(AtomicU64::new(1)),
            tracker,
            floor: Arc::default(),
            floor_on: Arc::default(),
            acks: tx,
            failed,
        }
    }

    async fn update(&self, binding: usize, key: usize) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let subject = format!(
            "$KV.{}.{}",
            bucket_name(binding / self.per_bucket),
            kv_key(binding, key)
        );
        let t0 = Instant::now();
        self.tracker.expect(binding, key, seq, t0);
        if self.floor_on.load(Ordering::Relaxed) {
            self.floor.lock().unwrap().insert(seq, t0);
        }
        match self.js.publish(subject, value(seq, self.value_bytes)).await {
            Ok(ack) => {
                let _ = self.acks.send(ack);
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `rate` updates per second over `bindings` for `secs`; returns the count.
    async fn steady(&self, rate: f64, secs: f64, bindings: usize, keys: usize, seed: u64) -> usize {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = tokio::time::Instant::now();
        let total = (rate * secs) as usize;
        for i in 0..total {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(at).await;
            self.update(rng.random_range(0..bindings), rng.random_range(0..keys))
                .await;
        }
        total
    }
}

/// Raw async-nats watches of every bucket: the put -> watch floor.
fn start_floor(
    client: &async_nats::Client,
    buckets: usize,
    publisher: &Publisher,
    out: Arc<Mutex<Vec<Duration>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let js = jetstream::new(client.clone());
    (0..buckets)
        .map(|j| {
            let js = js.clone();
            let floor = publisher.floor.clone();
            let out = out.clone();
            tokio::spawn(async move {
                let store = js.get_key_value(bucket_name(j)).await.unwrap();
                let mut w = store.watch(">").await.unwrap();
                while let Some(Ok(e)) = w.next().await {
                    let now = Instant::now();
                    if let Some(seq) = value_seq(&e.value)
                        && let Some(t0) = floor.lock().unwrap().remove(&seq)
                    {
                        out.lock().unwrap().push(now - t0);
                    }
                }
            })
        })
        .collect()
}

#[derive(Default, Clone, Copy)]
struct Peak {
    total: usize,
    per_bucket: usize,
}

/// Samples the consumer count of every bucket stream every 100 ms.
fn start_consumer_sampler(js: jetstream::Context, buckets: usize) -> Arc<Mutex<Peak>> {
    let peak = Arc::new(Mutex::new(Peak::default()));
    let p = peak.clone();
    tokio::spawn(async move {
        let mut streams = Vec::new();
        for j in 0..buckets {
            streams.push(
                js.get_stream(format!("KV_{}", bucket_name(j)))
                    .await
                    .unwrap(),
            );
        }
        loop {
            let mut total = 0;
            let mut max = 0;
            for s in &streams {
                if let Ok(info) = s.get_info().await {
                    total += info.state.consumer_count;
                    max = max.max(info.state.consumer_count);
                }
            }
            {
                let mut pk = p.lock().unwrap();
                pk.total = pk.total.max(total);
                pk.per_bucket = pk.per_bucket.max(max);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    peak
}

fn take_peak(p: &Mutex<Peak>) -> Peak {
    std::mem::take(&mut *p.lock().unwrap())
}

/// What the emulator served during a phase.
#[derive(Default, Debug)]
struct ApiPhase {
    requests: usize,
    writes: usize,
    cm_writes: usize,
    cm_creates: usize,
    status_writes: usize,
    events: usize,
    finalizer_patches: usize,
    reads: usize,
    write_p50: Duration,
    write_p99: Duration,
    /// Sum of request durations (includes the injected write latency).
    busy: Duration,
    cm_writes_by_name: HashMap<String, usize>,
}

fn api_phase(api: &ApiServer) -> ApiPhase {
    let reqs: Vec<RequestRecord> = api.requests();
    api.clear_requests();
    let mut a = ApiPhase {
        requests: reqs.len(),
        ..ApiPhase::default()
    };
    let mut write_d = Vec::new();
    for r in &reqs {
        a.busy += r.duration;
        if r.is_write() {
            a.writes += 1;
            write_d.push(r.duration);
        } else if r.verb == "get" {
            a.reads += 1;
        }
        match (r.verb.as_str(), r.resource.as_str(), r.subresource.as_str()) {
            ("patch", "configmaps", _) => {
                a.cm_writes += 1;
                *a.cm_writes_by_name.entry(r.name.clone()).or_default() += 1;
            }
            ("create", "configmaps", _) => a.cm_creates += 1,
            ("patch", "configbindings", "status") => a.status_writes += 1,
            ("patch", "configbindings", "") => a.finalizer_patches += 1,
            ("create", "events", _) => a.events += 1,
            _ => {}
        }
    }
    write_d.sort();
    a.write_p50 = percentile(&write_d, 0.5);
    a.write_p99 = percentile(&write_d, 0.99);
    a
}

fn api_json(a: &ApiPhase, wall: Duration) -> serde_json::Value {
    json!({
        "requests": a.requests, "writes": a.writes, "configmap_patches": a.cm_writes,
        "configmap_creates": a.cm_creates, "status_patches": a.status_writes,
        "events": a.events, "binding_patches": a.finalizer_patches, "gets": a.reads,
        "write_p50_ms": ms(a.write_p50), "write_p99_ms": ms(a.write_p99),
        "emulator_busy_s": a.busy.as_secs_f64(), "wall_s": wall.as_secs_f64(),
    })
}

fn describe_api(a: &ApiPhase) -> String {
    format!(
        "{} requests: {} writes (cm create {}, cm patch {}, status {}, binding {}, events {}), {} gets; write p50 {:.1} ms p99 {:.1} ms",
        a.requests,
        a.writes,
        a.cm_creates,
        a.cm_writes,
        a.status_writes,
        a.finalizer_patches,
        a.events,
        a.reads,
        ms(a.write_p50),
        ms(a.write_p99)
    )
}

/// Polls `f` every 100 ms until it says done; prints progress every 5 s.
async fn wait_until<F>(what: &str, timeout: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> (bool, String),
{
    let t0 = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let (done, progress) = f();
        if done {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            eprintln!("bench: {what}: gave up after {timeout:?} ({progress})");
            return None;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "bench: {what}: {progress} after {:.0} s",
                t0.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn operator_binary(args: &Args) -> PathBuf {
    if let Some(b) = &args.operator_bin {
        return b.clone();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if !args.no_build {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // with this example in the same build, so the binary shares its
        // dependency features and nothing is compiled a second time
        eprintln!(
            "bench: building the operator (cargo build --release --bin slipstream --example bench_scale)"
        );
        let ok = std::process::Command::new(cargo)
            .args([
                "build",
                "--release",
                "--bin",
                "slipstream",
                "--example",
                "bench_scale",
            ])
            .current_dir(&root)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "building the slipstream binary failed");
    }
    root.join("target/release/slipstream")
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64()))
        .unwrap_or_else(|| "timeout".into())
}

fn cpu_share(cpu: Duration, wall: Duration) -> f64 {
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
}

async fn fill_buckets(js: &jetstream::Context, p: &Params) -> Duration {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..p.buckets)
        .map(|j| {
            let js = js.clone();
            let (per_bucket, keys, vb, total) = (p.per_bucket, p.keys, p.value_bytes, p.bindings);
            tokio::spawn(async move {
                let mut acks = Vec::with_capacity(512);
                let first = j * per_bucket;
                let last = ((j + 1) * per_bucket).min(total);
                let v = value(0, vb);
                for b in first..last {
                    for k in 0..keys {
                        let subject = format!("$KV.{}.{}", bucket_name(j), kv_key(b, k));
                        acks.push(js.publish(subject, v.clone()).await.unwrap());
                        if acks.len() == 500 {
                            for a in acks.drain(..) {
                                a.await.unwrap();
                            }
                        }
                    }
                }
                for a in acks {
                    a.await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    t0.elapsed()
}

/// Raw async-nats state-sync of every bucket at once: (time, entries).
async fn raw_state_sync(client: &async_nats::Client, buckets: usize) -> (Duration, usize) {
    let js = jetstream::new(client.clone());
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..buckets)
        .map(|j| {
            let js = js.clone();
            tokio::spawn(async move {
                let store = js.get_key_value(bucket_name(j)).await.unwrap();
                let mut w = store.watch_with_history(">").await.unwrap();
                let mut n = 0;
                while let Some(e) = w.next().await {
                    n += 1;
                    if e.unwrap().delta == 0 {
                        break;
                    }
                }
                n
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    (t0.elapsed(), n)
}

struct Naive {
    created: usize,
    refused: usize,
    first_error: String,
    /// Consumers one stream took before refusing (the server's per-stream limit).
    stream_limit: Option<usize>,
    time: Duration,
}

/// The naive design: one consumer per binding (filtered on its prefix).
/// Creates them all, then keeps adding to the first stream until the server
/// refuses, then deletes everything.
async fn naive_baseline(js: &jetstream::Context, p: &Params) -> Naive {
    let t0 = Instant::now();
    let streams: Vec<_> = futures::future::join_all(
        (0..p.buckets).map(|j| js.get_stream(format!("KV_{}", bucket_name(j)))),
    )
    .await
    .into_iter()
    .map(|s| s.unwrap())
    .collect();
    let make = |j: usize, subject: String| {
        let stream = streams[j].clone();
        async move {
            let cfg = pull::Config {
                filter_subject: subject,
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                inactive_threshold: Duration::from_secs(300),
                ..Default::default()
            };
            stream
                .create_consumer(cfg)
                .await
                .map(|c| (j, c.cached_info().name.clone()))
                .map_err(|e| e.to_string())
        }
    };
    let results: Vec<_> = futures::stream::iter(0..p.bindings)
        .map(|b| {
            let j = b / p.per_bucket;
            make(j, format!("$KV.{}.p{b:05}.>", bucket_name(j)))
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let time = t0.elapsed();
    let mut names = Vec::new();
    let mut refused = 0;
    let mut first_error = String::new();
    for r in results {
        match r {
            Ok(n) => names.push(n),
            Err(e) => {
                refused += 1;
                if first_error.is_empty() {
                    first_error = e;
                }
            }
        }
    }
    let created = names.len();
    // probe the per-stream limit on the first stream
    let mut on_first = names.iter().filter(|(j, _)| *j == 0).count();
    let mut stream_limit = None;
    for i in 0..2000 {
        match make(0, format!("$KV.{}.probe{i}.>", bucket_name(0))).await {
            Ok(n) => {
                names.push(n);
                on_first += 1;
            }
            Err(e) => {
                stream_limit = Some(on_first);
                if first_error.is_empty() {
                    first_error = e;
                }
                break;
            }
        }
    }
    futures::stream::iter(names)
        .map(|(j, name)| {
            let stream = streams[j].clone();
            async move {
                let _ = stream.delete_consumer(&name).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    Naive {
        created,
        refused,
        first_error,
        stream_limit,
        time,
    }
}

fn binding(bucket: &str, prefix: &str, target: Option<String>) -> ConfigBindingSpec {
    ConfigBindingSpec {
        bucket: bucket.into(),
        prefixes: vec![prefix.into()],
        strip_prefix: true,
        key_policy: Default::default(),
        target: Target {
            name: target,
            ..Target::default()
        },
        suspend: false,
    }
}

async fn create_bindings(api: &Api<ConfigBinding>, p: &Params) -> Duration {
    let t0 = Instant::now();
    futures::stream::iter(0..p.bindings)
        .map(|b| {
            let api = api.clone();
            let spec = binding(&bucket_name(b / p.per_bucket), &format!("p{b:05}."), None);
            async move {
                api.create(
                    &PostParams::default(),
                    &ConfigBinding::new(&binding_name(b), spec),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    t0.elapsed()
}

fn latency_summary(mut v: Vec<Duration>) -> (Duration, Duration, Duration, usize) {
    v.sort();
    let max = v.last().copied().unwrap_or_default();
    (percentile(&v, 0.5), percentile(&v, 0.99), max, v.len())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let p = args.params();
    let phase_timeout = Duration::from_secs(args.phase_timeout_secs);
    let bin = operator_binary(&args);
    assert!(
        bin.is_file(),
        "operator binary {} not found (build it or pass --operator-bin)",
        bin.display()
    );
    let mut rep = Report::default();
    let mut fig = serde_json::Map::new();
    let started = Instant::now();

    // --- NATS: buckets filled through raw async-nats ----------------------
    let nats = NatsServer::start_with("", "max_memory_store: 1GB");
    let kv = NatsKv::connect(&ConnectOptions {
        request_timeout: Duration::from_secs(30),
        ..ConnectOptions::new(nats.url())
    })
    .await
    .unwrap();
    for j in 0..p.buckets {
        kv.create_or_open(&BucketConfig::new(bucket_name(j)))
            .await
            .unwrap();
    }
    let pub_client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(pub_client.clone());
    let total_keys = p.bindings * p.keys;
    eprintln!(
        "bench: filling {} buckets with {total_keys} keys of {} B",
        p.buckets, p.value_bytes
    );
    let fill = fill_buckets(&js, &p).await;
    rep.note(format!(
        "setup: {total_keys} keys published (acks per 500) in {:.1} s",
        fill.as_secs_f64()
    ));

    // --- references that need no operator ---------------------------------
    let raw_client = async_nats::connect(nats.url()).await.unwrap();
    let (raw_sync, raw_n) = raw_state_sync(&raw_client, p.buckets).await;
    eprintln!(
        "bench: raw state-sync of {raw_n} entries: {:.2} s",
        raw_sync.as_secs_f64()
    );
    let naive = naive_baseline(&js, &p).await;
    eprintln!(
        "bench: naive consumers: {} created, {} refused, stream limit {:?}: {}",
        naive.created, naive.refused, naive.stream_limit, naive.first_error
    );

    // --- emulator, CRD, bindings -----------------------------------------
    let api = ApiServer::start_with(apiserver::Config {
        write_latency: Duration::from_millis(args.write_latency_ms),
        history_window: 500_000,
        log_capacity: 5_000_000,
        ..apiserver::Config::default()
    })
    .await
    .unwrap();
    let client = api.client();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ConfigBinding::crd())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let op_log = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-scale-operator.log");
    let _ = std::fs::remove_file(&op_log);
    let bindings_api: Api<ConfigBinding> = Api::namespaced(client.clone(), "default");
    let create_t = create_bindings(&bindings_api, &p).await;
    rep.note(format!(
        "setup: {} ConfigBindings created in {:.1} s (before the operator starts)",
        p.bindings,
        create_t.as_secs_f64()
    ));

    let tracker = Tracker::default();
    tracker.spawn_watch(client.clone());
    let bindings = Bindings::default();
    bindings.spawn_watch(client.clone());
    let peaks = start_consumer_sampler(js.clone(), p.buckets);
    let publisher = Publisher::new(js.clone(), &p, tracker.clone());

    // --- 1. cold start ----------------------------------------------------
    api.clear_requests();
    take_peak(&peaks);
    let emu0 = emulator_cpu();
    let t0 = Instant::now();
    let mut op = Operator::spawn(&bin, &nats.url(), &kubeconfig, args.coalesce_ms, &op_log);
    let n = p.bindings;
    let mut hwm_seen = 0.0f64;
    let pid = op.pid;
    let cold = wait_until("cold start", phase_timeout, || {
        let (_, ready) = bindings.counts('b');
        let complete = tracker.complete(p.keys);
        let st = proc_stats(pid).unwrap_or_default();
        hwm_seen = hwm_seen.max(st.hwm_mib);
        (
            ready >= n && complete >= n,
            format!(
                "{ready}/{n} Ready, {complete}/{n} ConfigMaps complete, RSS {:.0} MiB, CPU {:.1} s",
                st.rss_mib,
                st.cpu.as_secs_f64()
            ),
        )
    })
    .await;
    let cold_wall = t0.elapsed();
    let cold_stats = op.stats();
    let cold_api = api_phase(&api);
    let cold_emu = emulator_cpu() - emu0;
    let cold_peak = take_peak(&peaks);
    let cold_cpu = cold_stats.cpu;
    let ratio = cold.map(|c| c.as_secs_f64() / raw_sync.as_secs_f64());
    rep.row(
        "cold start",
        format!("{n} bindings / {total_keys} keys: time to all Ready"),
        secs(cold),
        format!("raw state-sync {:.2} s", raw_sync.as_secs_f64()),
    )
    .ratio(ratio.unwrap_or(f64::NAN))
    .goal("< 60 s", cold.is_some_and(|c| c.as_secs() < 60));
    rep.row(
        "cold start",
        "peak RSS of the operator (VmHWM)",
        format!("{:.0} MiB", cold_stats.hwm_mib),
        "",
    )
    .goal("< 512 MiB", cold_stats.hwm_mib < 512.0);
    rep.row(
        "cold start",
        "operator CPU (user+sys) / share of wall",
        format!(
            "{:.1} s / {:.0}%",
            cold_cpu.as_secs_f64(),
            cpu_share(cold_cpu, cold_wall)
        ),
        format!(
            "emulator {:.1} s / {:.0}%",
            cold_emu.as_secs_f64(),
            cpu_share(cold_emu, cold_wall)
        ),
    );
    rep.row(
        "cold start",
        "API writes (all kinds) / writes per s",
        format!(
            "{} / {:.0}",
            cold_api.writes,
            cold_api.writes as f64 / cold_wall.as_secs_f64()
        ),
        format!("write p99 {:.1} ms", ms(cold_api.write_p99)),
    );
    // 1 per bucket + up to 16 catch-up watches + those being torn down
    let consumer_goal = p.buckets + 32;
    rep.row(
        "cold start",
        "NATS consumers, peak (all buckets / one bucket)",
        format!("{} / {}", cold_peak.total, cold_peak.per_bucket),
        format!("naive {} (+{} refused)", naive.created, naive.refused),
    )
    .ratio(cold_peak.total as f64 / naive.created.max(1) as f64)
    .goal(
        format!("<= {consumer_goal} (1/bucket + const)"),
        cold_peak.total <= consumer_goal,
    );
    rep.row(
        "cold start",
        "naive: consumers one stream takes before refusing",
        "-",
        naive
            .stream_limit
            .map(|l| format!("{l} (server limit)"))
            .unwrap_or_else(|| "no limit hit".into()),
    );
    rep.note(format!("cold start API: {}", describe_api(&cold_api)));
    rep.note(format!(
        "naive: {} consumers created in {:.1} s; first refusal: {}",
        naive.created,
        naive.time.as_secs_f64(),
        naive.first_error
    ));
    fig.insert(
        "cold_start".into(),
        json!({
            "time_s": cold.map(|c| c.as_secs_f64()), "raw_state_sync_s": raw_sync.as_secs_f64(),
            "raw_entries": raw_n, "hwm_mib": cold_stats.hwm_mib, "hwm_sampled_mib": hwm_seen,
            "operator_cpu_s": cold_cpu.as_secs_f64(), "emulator_cpu_s": cold_emu.as_secs_f64(),
            "consumers_peak_total": cold_peak.total, "consumers_peak_per_bucket": cold_peak.per_bucket,
            "naive_consumers": naive.created, "naive_refused": naive.refused,
            "naive_stream_limit": naive.stream_limit, "naive_error": naive.first_error,
            "api": api_json(&cold_api, cold_wall),
        }),
    );

    // --- emulator capacity: the same kind of write, without the operator ---
    let cap = emulator_capacity(&client, &p, Duration::from_secs(5)).await;
    rep.row(
        "emulator",
        format!("capacity: SSA of {}-key ConfigMaps, 32 in flight", p.keys),
        "",
        format!("{:.0} writes/s", cap.0),
    );
    rep.note(format!(
        "emulator probe: {:.0} applies/s, p50 {:.1} ms, emulator CPU {:.0}% of wall during the probe",
        cap.0,
        ms(cap.1),
        cap.2
    ));
    fig.insert(
        "emulator_capacity".into(),
        json!({"writes_per_s": cap.0, "p50_ms": ms(cap.1), "emulator_cpu_pct": cap.2}),
    );

    // --- 2. steady state (with the raw floor in the same run) -------------
    let floor_lat = Arc::new(Mutex::new(Vec::new()));
    let floor_client = async_nats::connect(nats.url()).await.unwrap();
    let floor_tasks = start_floor(&floor_client, p.buckets, &publisher, floor_lat.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    publisher.floor_on.store(true, Ordering::Relaxed);
    // below the API ceiling first: what the operator adds when the API keeps up
    let low_rate = (args.rate / 10.0).max(1.0);
    let low = run_steady(
        &publisher,
        &tracker,
        &api,
        &op,
        &args,
        &p,
        floor_lat.clone(),
        low_rate,
        Some(Duration::from_secs_f64((p.steady_secs / 3.0).max(5.0))),
    )
    .await;
    let steady = run_steady(
        &publisher,
        &tracker,
        &api,
        &op,
        &args,
        &p,
        floor_lat.clone(),
        args.rate,
        None,
    )
    .await;
    let (l50, l99, lmax, ln) = low.lat;
    let window_ms = args.coalesce_ms as f64;
    rep.row(
        "steady",
        format!("{low_rate:.0} upd/s (API not saturated): p50 / p99 / max"),
        format!("{:.1} / {:.1} / {:.0} ms", ms(l50), ms(l99), ms(lmax)),
        format!(
            "floor p50 {:.2} p99 {:.2} ms",
            ms(low.floor.0),
            ms(low.floor.1)
        ),
    )
    .ratio(ms(l99) / ms(low.floor.1))
    .goal(
        format!("<= {:.0} / {:.0} ms", window_ms + 5.0, window_ms + 25.0),
        ms(l50) <= window_ms + 5.0 && ms(l99) <= window_ms + 25.0,
    );
    rep.note(format!(
        "steady at {low_rate:.0} upd/s: {ln} updates, operator CPU {:.0}%, API {}",
        cpu_share(low.cpu, low.wall),
        describe_api(&low.api)
    ));
    fig.insert("steady_low_rate".into(), low.json());
    let (s50, s99, smax, sn) = steady.lat;
    let (f50, f99, _, _) = steady.floor;
    let window = Duration::from_millis(args.coalesce_ms);
    rep.row(
        "steady",
        format!(
            "{:.0} upd/s over {n} bindings, {:.0} s: propagation p50",
            args.rate, p.steady_secs
        ),
        format!("{:.1} ms", ms(s50)),
        format!("raw floor {:.2} ms", ms(f50)),
    )
    .goal(
        format!("<= {} ms", args.coalesce_ms + 5),
        s50 <= window + Duration::from_millis(5),
    );
    rep.row(
        "steady",
        format!("propagation p99 / max ({sn} updates)"),
        format!("{:.1} / {:.0} ms", ms(s99), ms(smax)),
        format!("raw floor p99 {:.2} ms", ms(f99)),
    )
    .ratio(ms(s99) / ms(f99))
    .goal(
        format!("p99 <= {} ms", args.coalesce_ms + 25),
        s99 <= window + Duration::from_millis(25),
    );
    rep.row(
        "steady",
        "operator's own histogram (put stored -> apply answered): p50 / p99",
        format!(
            "<= {:.0} / <= {:.0} ms",
            steady.op_side.0 * 1e3,
            steady.op_side.1 * 1e3
        ),
        "bucket bounds",
    );
    rep.row(
        "steady",
        "ConfigMap writes per update (all API writes)",
        format!(
            "{:.2} ({:.2})",
            steady.api.cm_writes as f64 / steady.updates.max(1) as f64,
            steady.api.writes as f64 / steady.updates.max(1) as f64
        ),
        "",
    );
    rep.row(
        "steady",
        "operator CPU share / RSS",
        format!(
            "{:.0}% / {:.0} MiB",
            cpu_share(steady.cpu, steady.wall),
            steady.stats.rss_mib
        ),
        format!("emulator {:.0}%", cpu_share(steady.emu_cpu, steady.wall)),
    );
    rep.note(format!("steady API: {}", describe_api(&steady.api)));
    fig.insert("steady".into(), steady.json());

    // --- 5. churn during steady state -------------------------------------
    let churn_done = Arc::new(AtomicUsize::new(0));
    let churn = {
        let api_b = bindings_api.clone();
        let (count, secs, per_bucket, n) = (p.churn, p.churn_secs, p.per_bucket, p.bindings);
        let done = churn_done.clone();
        tokio::spawn(async move {
            let half = Duration::from_secs_f64(secs / 2.0);
            let step = half / count.max(1) as u32;
            let t0 = tokio::time::Instant::now();
            for i in 0..count {
                tokio::time::sleep_until(t0 + step * i as u32).await;
                let b = i % n;
                let spec = binding(
                    &bucket_name(b / per_bucket),
                    &format!("p{b:05}."),
                    Some(churn_name(i)),
                );
                let _ = api_b
                    .create(
                        &PostParams::default(),
                        &ConfigBinding::new(&churn_name(i), spec),
                    )
                    .await;
            }
            for i in 0..count {
                tokio::time::sleep_until(t0 + half + step * i as u32).await;
                let _ = api_b.delete(&churn_name(i), &DeleteParams::default()).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let churned = run_steady(
        &publisher,
        &tracker,
        &api,
        &op,
        &args,
        &p,
        floor_lat.clone(),
        args.rate,
        Some(Duration::from_secs_f64(p.churn_secs)),
    )
    .await;
    churn.await.unwrap();
    publisher.floor_on.store(false, Ordering::Relaxed);
    for t in floor_tasks {
        t.abort();
    }
    let gone = wait_until("churned bindings gone", phase_timeout, || {
        let (present, _) = bindings.counts('c');
        (present == 0, format!("{present} churn bindings left"))
    })
    .await;
    let churn_peak = take_peak(&peaks);
    let (c50, c99, cmax, cn) = churned.lat;
    rep.row(
        "churn",
        format!("{} creates + deletes during steady: p99 others", p.churn),
        format!("{:.1} ms", ms(c99)),
        format!("without churn {:.1} ms", ms(s99)),
    )
    .ratio(ms(c99) / ms(s99));
    rep.row(
        "churn",
        format!("p50 / max ({cn} updates)"),
        format!("{:.1} / {:.0} ms", ms(c50), ms(cmax)),
        format!("raw floor p99 {:.2} ms", ms(churned.floor.1)),
    );
    rep.row(
        "churn",
        "NATS consumers peak (total / one bucket)",
        format!("{} / {}", churn_peak.total, churn_peak.per_bucket),
        "",
    )
    .goal(
        format!("<= {consumer_goal}"),
        churn_peak.total <= consumer_goal,
    );
    rep.row(
        "churn",
        "churned bindings cleaned up after deletes",
        secs(gone),
        "",
    );
    rep.note(format!("churn API: {}", describe_api(&churned.api)));
    let mut cj = churned.json();
    cj["cleanup_s"] = json!(gone.map(|g| g.as_secs_f64()));
    cj["consumers_peak_total"] = json!(churn_peak.total);
    fig.insert("churn".into(), cj);

    // --- 3. burst to one bucket -------------------------------------------
    // what the churn phase left unwritten must not count as the burst's
    wait_until("churn backlog drained", phase_timeout, || {
        let pending = tracker.pending();
        (pending == 0, format!("{pending} updates not yet visible"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    tracker.take_latencies();
    tracker.take_done();
    api_phase(&api);
    let cpu0 = op.stats().cpu;
    let emu0 = emulator_cpu();
    let first_bucket = p.per_bucket.min(n);
    let t0 = Instant::now();
    for i in 0..p.burst {
        let b = i % first_bucket;
        let k = (i / first_bucket) % p.keys;
        publisher.update(b, k).await;
    }
    let published = t0.elapsed();
    let burst_done = wait_until("burst", phase_timeout, || {
        let pending = tracker.pending();
        (pending == 0, format!("{pending} updates not yet visible"))
    })
    .await
    .map(|_| t0.elapsed());
    let burst_wall = t0.elapsed();
    let burst_api = api_phase(&api);
    let burst_cpu = op.stats().cpu - cpu0;
    let burst_emu = emulator_cpu() - emu0;
    let done = tracker.take_done();
    let mut per_binding: Vec<Duration> = done
        .iter()
        .filter(|(b, _)| **b < first_bucket)
        .map(|(_, at)| at.saturating_duration_since(t0))
        .collect();
    per_binding.sort();
    let writes_per_binding: Vec<usize> = (0..first_bucket)
        .map(|b| {
            burst_api
                .cm_writes_by_name
                .get(&binding_name(b))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    let min_w = writes_per_binding.iter().min().copied().unwrap_or(0);
    let max_w = writes_per_binding.iter().max().copied().unwrap_or(0);
    tracker.take_latencies();
    rep.row(
        "burst",
        format!(
            "{} updates to 1 bucket ({first_bucket} bindings): all visible",
            p.burst
        ),
        secs(burst_done),
        format!("publish {:.2} s", published.as_secs_f64()),
    )
    .ratio(
        burst_done
            .map(|d| d.as_secs_f64() / published.as_secs_f64())
            .unwrap_or(f64::NAN),
    );
    rep.row(
        "burst",
        "ConfigMap writes (per binding min / max)",
        format!("{} ({min_w} / {max_w})", burst_api.cm_writes),
        format!("{} updates", p.burst),
    )
    .ratio(burst_api.cm_writes as f64 / p.burst as f64)
    .goal("far fewer than updates", burst_api.cm_writes * 4 < p.burst);
    rep.row(
        "burst",
        "binding done after burst start: p50 / max",
        format!(
            "{:.2} / {:.2} s",
            percentile(&per_binding, 0.5).as_secs_f64(),
            per_binding
                .last()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
        ),
        format!("{} of {first_bucket} bindings done", per_binding.len()),
    )
    .goal(
        "no binding starved",
        per_binding.len() == first_bucket && min_w >= 1,
    );
    rep.row(
        "burst",
        "operator CPU share",
        format!("{:.0}%", cpu_share(burst_cpu, burst_wall)),
        format!("emulator {:.0}%", cpu_share(burst_emu, burst_wall)),
    );
    rep.note(format!("burst API: {}", describe_api(&burst_api)));
    fig.insert(
        "burst".into(),
        json!({
            "updates": p.burst, "bindings": first_bucket, "publish_s": published.as_secs_f64(),
            "all_visible_s": burst_done.map(|d| d.as_secs_f64()),
            "binding_done_p50_s": percentile(&per_binding, 0.5).as_secs_f64(),
            "binding_done_max_s": per_binding.last().copied().unwrap_or_default().as_secs_f64(),
            "configmap_writes_min": min_w, "configmap_writes_max": max_w,
            "operator_cpu_s": burst_cpu.as_secs_f64(), "emulator_cpu_s": burst_emu.as_secs_f64(),
            "api": api_json(&burst_api, burst_wall),
        }),
    );

    // --- 4. kill -9, changes while down, restart --------------------------
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kill = op.stats();
    op.kill9();
    drop(op);
    tracker.take_latencies();
    tracker.take_done();
    let mut rng = StdRng::seed_from_u64(99);
    for _ in 0..args.restart_changes {
        publisher
            .update(rng.random_range(0..n), rng.random_range(0..p.keys))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    api_phase(&api);
    take_peak(&peaks);
    let emu0 = emulator_cpu();
    let t0 = Instant::now();
    let op2 = Operator::spawn(&bin, &nats.url(), &kubeconfig, args.coalesce_ms, &op_log);
    let mut last_metrics = String::new();
    let mut next_scrape = Instant::now();
    let restart = loop {
        let pending = tracker.pending();
        if next_scrape <= Instant::now() && pending == 0 {
            last_metrics = op2.scrape().await;
            next_scrape = Instant::now() + Duration::from_millis(500);
        }
        let confirmed = last_metrics
            .lines()
            .filter(|l| l.starts_with("slipstream_binding_applied_cursor{"))
            .count();
        let (_, ready) = bindings.counts('b');
        if pending == 0 && confirmed >= n && ready >= n {
            break Some(t0.elapsed());
        }
        if t0.elapsed() > phase_timeout {
            eprintln!("bench: restart: gave up ({pending} pending, {confirmed} confirmed)");
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let restart_wall = t0.elapsed();
    let changes_visible = tracker.take_latencies();
    let (_, _, vis_max, _) = latency_summary(changes_visible);
    let restart_api = api_phase(&api);
    let restart_stats = op2.stats();
    let restart_emu = emulator_cpu() - emu0;
    let restart_peak = take_peak(&peaks);
    let metrics = op2.scrape().await;
    let delivered_catchup = metric_sum(
        &metrics,
        "slipstream_kv_updates_delivered_total",
        "source=\"catchup\"",
    );
    let delivered_shared = metric_sum(
        &metrics,
        "slipstream_kv_updates_delivered_total",
        "source=\"shared\"",
    );
    let delivered = delivered_catchup + delivered_shared;
    let changes = args.restart_changes as f64;
    rep.row(
        "restart",
        format!(
            "kill -9, {} changes while down: KV messages delivered",
            args.restart_changes
        ),
        format!("{delivered:.0}"),
        format!("{} changes; full replay {total_keys}", args.restart_changes),
    )
    .ratio(delivered / changes)
    .goal("< 2x changes", delivered < 2.0 * changes);
    rep.row(
        "restart",
        "time to all changes visible and all bindings confirmed",
        secs(restart),
        format!("last change visible at {:.2} s", vis_max.as_secs_f64()),
    )
    .ratio(
        restart
            .map(|r| r.as_secs_f64() / raw_sync.as_secs_f64())
            .unwrap_or(f64::NAN),
    );
    rep.row(
        "restart",
        "operator peak RSS / CPU",
        format!(
            "{:.0} MiB / {:.1} s",
            restart_stats.hwm_mib,
            restart_stats.cpu.as_secs_f64()
        ),
        format!("emulator {:.1} s CPU", restart_emu.as_secs_f64()),
    );
    rep.row(
        "restart",
        "ConfigMap writes / NATS consumers peak",
        format!("{} / {}", restart_api.cm_writes, restart_peak.total),
        format!("{} changes", args.restart_changes),
    );
    rep.note(format!("restart API: {}", describe_api(&restart_api)));
    fig.insert(
        "restart".into(),
        json!({
            "changes": args.restart_changes, "delivered": delivered,
            "delivered_catchup": delivered_catchup, "delivered_shared": delivered_shared,
            "time_s": restart.map(|r| r.as_secs_f64()), "last_change_visible_s": vis_max.as_secs_f64(),
            "hwm_mib": restart_stats.hwm_mib, "operator_cpu_s": restart_stats.cpu.as_secs_f64(),
            "first_run_operator_cpu_s": before_kill.cpu.as_secs_f64(), "first_run_hwm_mib": before_kill.hwm_mib,
            "emulator_cpu_s": restart_emu.as_secs_f64(), "consumers_peak_total": restart_peak.total,
            "api": api_json(&restart_api, restart_wall),
        }),
    );
    drop(op2);

    let failed = publisher.failed.load(Ordering::Relaxed);
    if failed > 0 {
        rep.note(format!("{failed} KV publishes failed"));
    }
    rep.note(format!(
        "machine: {} cores, nats-server {}, emulator write latency {} ms, coalesce {} ms, values {} B; \
         operator = target/release/slipstream child process; emulator and driver share this process; \
         total run {:.0} s",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        nats_version(),
        args.write_latency_ms,
        args.coalesce_ms,
        p.value_bytes,
        started.elapsed().as_secs_f64()
    ));
    let title = format!(
        "Slipstream scale benchmark: {} bindings, {} buckets, {} keys ({}), one replica",
        p.bindings,
        p.buckets,
        total_keys,
        if args.quick { "quick" } else { "full" }
    );
    rep.print(&title);
    let params = json!({
        "quick": args.quick, "bindings": p.bindings, "buckets": p.buckets,
        "keys_per_binding": p.keys, "value_bytes": p.value_bytes, "steady_secs": p.steady_secs,
        "rate": args.rate, "churn": p.churn, "churn_secs": p.churn_secs, "burst": p.burst,
        "restart_changes": args.restart_changes, "write_latency_ms": args.write_latency_ms,
        "coalesce_ms": args.coalesce_ms,
    });
    let out = args.json.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-scale.json")
    });
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&rep.json(params, serde_json::Value::Object(fig))).unwrap(),
    )
    .unwrap();
    println!("JSON: {}", out.display());
    drop(kv);
    drop(nats);
}

/// Applies to ConfigMaps the operator does not own, as fast as the
/// emulator takes them: (writes/s, p50, emulator CPU % of wall).
async fn emulator_capacity(
    client: &kube::Client,
    p: &Params,
    secs: Duration,
) -> (f64, Duration, f64) {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams};
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let content = |round: usize| -> std::collections::BTreeMap<String, String> {
        (0..p.keys)
            .map(|k| {
                let v = value(round as u64, p.value_bytes);
                (observe::cm_key(k), String::from_utf8_lossy(&v).into_owned())
            })
            .collect()
    };
    let workers = 32;
    let emu0 = emulator_cpu();
    let t0 = Instant::now();
    let deadline = t0 + secs;
    let results: Vec<Vec<Duration>> = futures::stream::iter(0..workers)
        .map(|w| {
            let cms = cms.clone();
            let name = format!("probe-{w}");
            let content = &content;
            async move {
                let mut lat = Vec::new();
                let mut round = 0;
                while Instant::now() < deadline {
                    let cm = ConfigMap {
                        metadata: kube::api::ObjectMeta {
                            name: Some(name.clone()),
                            ..Default::default()
                        },
                        data: Some(content(round)),
                        ..Default::default()
                    };
                    let t = Instant::now();
                    let pp = PatchParams::apply("bench-probe").force();
                    if cms.patch(&name, &pp, &Patch::Apply(&cm)).await.is_ok() {
                        lat.push(t.elapsed());
                    }
                    round += 1;
                }
                let _ = cms.delete(&name, &DeleteParams::default()).await;
                lat
            }
        })
        .buffer_unordered(workers)
        .collect()
        .await;
    let wall = t0.elapsed();
    let mut all: Vec<Duration> = results.into_iter().flatten().collect();
    all.sort();
    (
        all.len() as f64 / wall.as_secs_f64(),
        percentile(&all, 0.5),
        cpu_share(emulator_cpu() - emu0, wall),
    )
}

struct SteadyResult {
    updates: usize,
    lat: (Duration, Duration, Duration, usize),
    floor: (Duration, Duration, Duration, usize),
    api: ApiPhase,
    cpu: Duration,
    emu_cpu: Duration,
    wall: Duration,
    stats: ProcStats,
    undelivered: usize,
    /// The operator's own propagation histogram over the phase (NATS store
    /// -> apply answered): upper bucket bounds of p50 and p99, seconds.
    op_side: (f64, f64),
}

/// `slipstream_propagation_seconds_bucket` as (upper bound, cumulative count).
fn propagation_buckets(metrics: &str) -> Vec<(f64, f64)> {
    let prefix = "slipstream_propagation_seconds_bucket{le=\"";
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound holding quantile `q` of the observations between two
/// scrapes (NaN when none were made).
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let old = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, n - old)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return f64::NAN;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::NAN, |(le, _)| *le)
}

impl SteadyResult {
    fn json(&self) -> serde_json::Value {
        json!({
            "updates": self.updates, "p50_ms": ms(self.lat.0), "p99_ms": ms(self.lat.1),
            "max_ms": ms(self.lat.2), "observed": self.lat.3, "undelivered": self.undelivered,
            "floor_p50_ms": ms(self.floor.0), "floor_p99_ms": ms(self.floor.1),
            "floor_max_ms": ms(self.floor.2), "floor_observed": self.floor.3,
            "operator_cpu_s": self.cpu.as_secs_f64(), "emulator_cpu_s": self.emu_cpu.as_secs_f64(),
            "rss_mib": self.stats.rss_mib, "hwm_mib": self.stats.hwm_mib,
            "api": api_json(&self.api, self.wall),
            "operator_side_p50_le_s": self.op_side.0, "operator_side_p99_le_s": self.op_side.1,
        })
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_steady(
    publisher: &Publisher,
    tracker: &Tracker,
    api: &ApiServer,
    op: &Operator,
    _args: &Args,
    p: &Params,
    floor_lat: Arc<Mutex<Vec<Duration>>>,
    rate: f64,
    secs: Option<Duration>,
) -> SteadyResult {
    tracker.take_latencies();
    floor_lat.lock().unwrap().clear();
    let hist0 = propagation_buckets(&op.scrape().await);
    api_phase(api);
    let cpu0 = op.stats().cpu;
    let emu0 = emulator_cpu();
    let t0 = Instant::now();
    let secs = secs.map(|s| s.as_secs_f64()).unwrap_or(p.steady_secs);
    let updates = publisher
        .steady(
            rate,
            secs,
            p.bindings,
            p.keys,
            t0.elapsed().as_nanos() as u64,
        )
        .await;
    let drained = wait_until("steady drain", Duration::from_secs(30), || {
        let pending = tracker.pending();
        (pending == 0, format!("{pending} updates not yet visible"))
    })
    .await;
    let undelivered = if drained.is_some() {
        0
    } else {
        tracker.pending()
    };
    let wall = t0.elapsed();
    let stats = op.stats();
    let floor = std::mem::take(&mut *floor_lat.lock().unwrap());
    let hist1 = propagation_buckets(&op.scrape().await);
    let op_side = (
        bucket_quantile(&hist0, &hist1, 0.5),
        bucket_quantile(&hist0, &hist1, 0.99),
    );
    SteadyResult {
        op_side,
        updates,
        lat: latency_summary(tracker.take_latencies()),
        floor: latency_summary(floor),
        api: api_phase(api),
        cpu: stats.cpu - cpu0,
        emu_cpu: emulator_cpu() - emu0,
        wall,
        stats,
        undelivered,
    }
}

fn nats_version() -> String {
    std::process::Command::new(common::nats::nats_server_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
