//! Scale benchmark: N bindings over B buckets on one operator replica (the
//! real `slipstream run` binary as a child process, so its RSS and CPU are
//! its own), against one nats-server and a Kubernetes API server: the real
//! kube-apiserver with etcd (`--apiserver real`, the default once `make tools`
//! has built it) or the in-process emulator with a few ms of write latency
//! (`--apiserver emulator`). Every figure is printed next to its reference
//! measured in the same run: raw async-nats state-sync, a naive
//! one-consumer-per-binding design, the raw put -> watch floor, and the API
//! server's own capacity for the same kind of write.
//!
//! `make bench-scale` (full: 10,000 bindings, 1M keys, 60 s steady state, on
//! both servers), `cargo run --release --example bench_scale -- --quick`
//! (about 2 minutes). Prints a table and writes it as JSON to
//! target/bench-scale-<server>.json; `--compare A.json B.json` prints two runs
//! side by side. Asserts nothing: goals are shown as ok / MISSED.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "bench_scale/nats.rs"]
mod nats;
#[path = "bench_scale/observe.rs"]
mod observe;
#[path = "bench_scale/procs.rs"]
mod procs;
#[path = "bench_scale/report.rs"]
mod report;
#[path = "bench_scale/server.rs"]
mod server;
#[path = "bench_scale/steady.rs"]
mod steady;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream;
use clap::Parser;
use common::NatsServer;
use futures::StreamExt;
use kube::{
    Api, CustomResourceExt,
    api::{DeleteParams, PostParams},
};
use nats::{
    Publisher, bucket_name, fill_buckets, naive_baseline, raw_state_sync, start_consumer_sampler,
    start_floor, take_peak,
};
use observe::{Bindings, Tracker, binding_name, churn_name};
use procs::{Operator, metric_sum, proc_stats};
use rand::{Rng, SeedableRng, rngs::StdRng};
use report::{Report, ms, percentile};
use serde_json::json;
use server::{Phase, Server, Which};
use slipstream::{
    crd::{ConfigBinding, ConfigBindingSpec, Target},
    kv::nats::{BucketConfig, ConnectOptions, NatsKv},
};
use steady::{SteadyRig, latency_summary, run_steady};

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
    /// The API server: real (kube-apiserver + etcd + kube-controller-manager)
    /// or emulator [default: real when `make tools` has built it].
    #[arg(long, value_enum)]
    apiserver: Option<Which>,
    /// Print two runs' JSON side by side and exit.
    #[arg(long, num_args = 2, value_names = ["A_JSON", "B_JSON"])]
    compare: Option<Vec<PathBuf>>,
    /// Emulator write latency (models etcd; the emulator only).
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
    /// Where the JSON goes [default: target/bench-scale-<server>.json].
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

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(files) = &args.compare {
        report::compare(&files[0], &files[1]);
        return;
    }
    let which = args.apiserver.unwrap_or_else(Which::default_for_machine);
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

    // --- API server, CRD, bindings --------------------------------------
    let server = Server::start(which, Duration::from_millis(args.write_latency_ms)).await;
    let client = server.client().await;
    apiserver::backend::install_crd(client.clone(), &ConfigBinding::crd()).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_operator_kubeconfig(&kubeconfig);
    let op_log = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-scale-operator.log");
    let _ = std::fs::remove_file(&op_log);
    let bindings_api: Api<ConfigBinding> = Api::namespaced(client.clone(), "default");
    let create_t = create_bindings(&bindings_api, &p).await;
    rep.note(format!(
        "setup: {} ConfigBindings created in {:.1} s (before the operator starts)",
        p.bindings,
        create_t.as_secs_f64()
    ));

    // --- the server's own capacity: the same kind of write, no operator --
    let cap = server::capacity(&server, p.keys, p.value_bytes, Duration::from_secs(5)).await;
    let cap_ref = format!("server takes {:.0} applies/s", cap.writes_per_s);
    rep.row(
        "capacity",
        format!(
            "{}: SSA of {}-key ConfigMaps, 32 in flight",
            server.name(),
            p.keys
        ),
        format!("{:.0} writes/s", cap.writes_per_s),
        format!("p50 {:.1} ms p99 {:.1} ms", ms(cap.p50), ms(cap.p99)),
    );
    rep.note(format!(
        "{} probe: {:.0} applies/s, p50 {:.1} ms p99 {:.1} ms, server CPU {:.0}% of wall, etcd {:.0} puts {:.0} fsyncs, APF rejected {:.0}",
        server.name(),
        cap.writes_per_s,
        ms(cap.p50),
        ms(cap.p99),
        cap.server_cpu_pct,
        cap.server.etcd_puts,
        cap.server.etcd_fsyncs,
        cap.server.apf_rejected
    ));
    fig.insert(
        "server_capacity".into(),
        json!({"server": server.name(), "writes_per_s": cap.writes_per_s, "p50_ms": ms(cap.p50),
               "p99_ms": ms(cap.p99), "server_cpu_pct": cap.server_cpu_pct,
               "etcd_puts": cap.server.etcd_puts, "etcd_fsyncs": cap.server.etcd_fsyncs}),
    );

    let tracker = Tracker::default();
    tracker.spawn_watch(client.clone());
    let bindings = Bindings::default();
    bindings.spawn_watch(client.clone());
    let peaks = start_consumer_sampler(js.clone(), p.buckets);
    let publisher = Publisher::new(js.clone(), &p, tracker.clone());

    // --- 1. cold start ----------------------------------------------------
    let phase = Phase::start(&server).await;
    take_peak(&peaks);
    let srv0 = server.cpu();
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
    let cold_api = phase.end(&server).await;
    let cold_srv = server.cpu() - srv0;
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
            "{} {:.1} s / {:.0}%",
            server.name(),
            cold_srv.as_secs_f64(),
            cpu_share(cold_srv, cold_wall)
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
        cap_ref.clone(),
    );
    rep.row(
        "cold start",
        "API writes per binding (429 answers)",
        format!("{:.2} ({})", cold_api.per(n), cold_api.throttled),
        format!("write p99 {:.1} ms", ms(cold_api.write_p99)),
    )
    .goal("<= 3", cold_api.per(n) <= 3.0);
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
    rep.note(format!("cold start API: {}", cold_api.describe()));
    if let Which::Real = which {
        rep.note(format!("after cold start: {}", server.describe_processes()));
    }
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
            "operator_cpu_s": cold_cpu.as_secs_f64(), "server_cpu_s": cold_srv.as_secs_f64(),
            "consumers_peak_total": cold_peak.total, "consumers_peak_per_bucket": cold_peak.per_bucket,
            "naive_consumers": naive.created, "naive_refused": naive.refused,
            "naive_stream_limit": naive.stream_limit, "naive_error": naive.first_error,
            "api": cold_api.json(cold_wall),
        }),
    );

    // --- 2. steady state (with the raw floor in the same run) -------------
    let floor_lat = Arc::new(Mutex::new(Vec::new()));
    let floor_client = async_nats::connect(nats.url()).await.unwrap();
    let floor_tasks = start_floor(&floor_client, p.buckets, &publisher, floor_lat.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    publisher.floor_on.store(true, Ordering::Relaxed);
    let rig = SteadyRig {
        publisher: &publisher,
        tracker: &tracker,
        server: &server,
        op: &op,
        p: &p,
        floor_lat: floor_lat.clone(),
    };
    // below the API ceiling first: what the operator adds when the API keeps up
    let low_rate = (args.rate / 10.0).max(1.0);
    let low = run_steady(
        &rig,
        low_rate,
        Some(Duration::from_secs_f64((p.steady_secs / 3.0).max(5.0))),
    )
    .await;
    let steady = run_steady(&rig, args.rate, None).await;
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
        low.api.describe()
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
        format!(
            "{} {:.0}%",
            server.name(),
            cpu_share(steady.server_cpu, steady.wall)
        ),
    );
    rep.note(format!("steady API: {}", steady.api.describe()));
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
    let churned = run_steady(&rig, args.rate, Some(Duration::from_secs_f64(p.churn_secs))).await;
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
    rep.note(format!("churn API: {}", churned.api.describe()));
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
    let phase = Phase::start(&server).await;
    let cpu0 = op.stats().cpu;
    let srv0 = server.cpu();
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
    let burst_api = phase.end(&server).await;
    let burst_cpu = op.stats().cpu - cpu0;
    let burst_srv = server.cpu() - srv0;
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
        format!("{} {:.0}%", server.name(), cpu_share(burst_srv, burst_wall)),
    );
    rep.note(format!("burst API: {}", burst_api.describe()));
    fig.insert(
        "burst".into(),
        json!({
            "updates": p.burst, "bindings": first_bucket, "publish_s": published.as_secs_f64(),
            "all_visible_s": burst_done.map(|d| d.as_secs_f64()),
            "binding_done_p50_s": percentile(&per_binding, 0.5).as_secs_f64(),
            "binding_done_max_s": per_binding.last().copied().unwrap_or_default().as_secs_f64(),
            "configmap_writes_min": min_w, "configmap_writes_max": max_w,
            "operator_cpu_s": burst_cpu.as_secs_f64(), "server_cpu_s": burst_srv.as_secs_f64(),
            "api": burst_api.json(burst_wall),
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
    let phase = Phase::start(&server).await;
    take_peak(&peaks);
    let srv0 = server.cpu();
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
    let restart_api = phase.end(&server).await;
    let restart_stats = op2.stats();
    let restart_srv = server.cpu() - srv0;
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
        format!("{} {:.1} s CPU", server.name(), restart_srv.as_secs_f64()),
    );
    rep.row(
        "restart",
        "ConfigMap writes / NATS consumers peak",
        format!("{} / {}", restart_api.cm_writes, restart_peak.total),
        format!("{} changes", args.restart_changes),
    );
    rep.row(
        "restart",
        "API reads: GETs / LIST pages",
        format!("{} / {}", restart_api.reads, restart_api.lists),
        format!("{n} bindings"),
    )
    .goal("no GET per binding", restart_api.reads < n / 10);
    rep.note(format!("restart API: {}", restart_api.describe()));
    fig.insert(
        "restart".into(),
        json!({
            "changes": args.restart_changes, "delivered": delivered,
            "delivered_catchup": delivered_catchup, "delivered_shared": delivered_shared,
            "time_s": restart.map(|r| r.as_secs_f64()), "last_change_visible_s": vis_max.as_secs_f64(),
            "hwm_mib": restart_stats.hwm_mib, "operator_cpu_s": restart_stats.cpu.as_secs_f64(),
            "first_run_operator_cpu_s": before_kill.cpu.as_secs_f64(), "first_run_hwm_mib": before_kill.hwm_mib,
            "server_cpu_s": restart_srv.as_secs_f64(), "consumers_peak_total": restart_peak.total,
            "api": restart_api.json(restart_wall),
        }),
    );
    drop(op2);

    let failed = publisher.failed.load(Ordering::Relaxed);
    if failed > 0 {
        rep.note(format!("{failed} KV publishes failed"));
    }
    let server_desc = match which {
        Which::Emulator => format!(
            "the emulator (write latency {} ms, in this process with the driver)",
            args.write_latency_ms
        ),
        Which::Real => format!(
            "kube-apiserver {} with etcd (fsync on) and kube-controller-manager on this machine; \
             the operator talks through the recording proxy",
            apiserver::real::KUBERNETES_VERSION
        ),
    };
    if let Which::Real = which {
        rep.note(format!("at the end: {}", server.describe_processes()));
    }
    rep.note(format!(
        "machine: {} cores, nats-server {}, API server: {server_desc}, coalesce {} ms, values {} B; \
         operator = target/release/slipstream child process; total run {:.0} s",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        nats_version(),
        args.coalesce_ms,
        p.value_bytes,
        started.elapsed().as_secs_f64()
    ));
    let title = format!(
        "Slipstream scale benchmark on {}: {} bindings, {} buckets, {} keys ({}), one replica",
        server.name(),
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
        "coalesce_ms": args.coalesce_ms, "apiserver": server.name(),
    });
    let out = args.json.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("target/bench-scale-{}.json", server.name()))
    });
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&rep.json(params, serde_json::Value::Object(fig))).unwrap(),
    )
    .unwrap();
    println!("JSON: {}", out.display());
    drop(kv);
    drop(server);
    drop(nats);
}

fn nats_version() -> String {
    std::process::Command::new(common::nats::nats_server_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
