//! Load benchmarks of the emulator.
//!
//! Fan-out (default): a steady write rate (default 1,000 writes/s) against
//! ConfigMaps while 100 watches are open; prints per-request latency and
//! watch delivery lag percentiles.
//! `cargo run --release -p apiserver --example bench_apiserver -- [--seconds 10] [--rate 1000] [--watches 100] [--write-latency-ms 0]`
//!
//! Scale (`--scale`): the store pre-loaded with N large ConfigMaps (100 keys x
//! 32 bytes, each owned by a custom resource), then server-side applies and
//! `/status` merge patches from 64 clients, a full list and a watch from 0,
//! and 1,000 owners deleted (finalizer removed, dependents garbage-collected)
//! while the applies go on. Prints one table, one column per N.
//! `cargo run --release -p apiserver --example bench_apiserver -- --scale [--sizes 0,10000,20000] [--clients 64] [--applies 10000] [--write-latency-ms 3]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use apiserver::{ApiServer, Config};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, WatchEvent};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

/// The part of a ConfigMap the watchers read.
#[derive(Clone, Debug, serde::Deserialize)]
struct Tiny {
    #[serde(default)]
    data: std::collections::BTreeMap<String, String>,
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn summary(name: &str, mut v: Vec<u64>) {
    v.sort_unstable();
    println!(
        "{name:<26} n={:<8} p50={:>7.2} ms  p90={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms",
        v.len(),
        pct(&v, 0.50),
        pct(&v, 0.90),
        pct(&v, 0.99),
        pct(&v, 1.0)
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--scale") {
        scale::run().await;
        return;
    }
    if std::env::args().any(|a| a == "--probe") {
        probe::run().await;
        return;
    }
    let seconds = arg("--seconds", 10);
    let rate = arg("--rate", 1000);
    let watches = arg("--watches", 100);
    let latency_ms = arg("--write-latency-ms", 0);
    let objects = 100u64;
    let load_before = load();

    let api = ApiServer::start_with(Config {
        write_latency: Duration::from_millis(latency_ms),
        history_window: 100_000,
        ..Default::default()
    })
    .await
    .unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(api.client());
    let pp = PatchParams::apply("bench");
    for i in 0..objects {
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"t": "0", "seq": "0"}});
        cms.patch(&format!("bench-{i}"), &pp, &Patch::Apply(body))
            .await
            .unwrap();
    }
    let start_rv = api.resource_version().to_string();

    // Watches: each parses the writer's timestamp out of the object and records the lag.
    let lags = Arc::new(Mutex::new(Vec::<u64>::new()));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut watch_tasks = Vec::new();
    for _ in 0..watches {
        let client = api.client();
        let lags = lags.clone();
        let delivered = delivered.clone();
        let rv = start_rv.clone();
        watch_tasks.push(tokio::spawn(async move {
            // Events are decoded into a small struct (just `data`): the figure is the
            // emulator's fan-out, not the cost of deserializing full ConfigMaps 100k times/s.
            let req = http::Request::get(format!(
                "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}&timeoutSeconds={}",
                seconds + 30
            ))
            .body(Vec::new())
            .unwrap();
            let mut s = client.request_events::<Tiny>(req).await.unwrap().boxed();
            let mut local = Vec::new();
            while let Some(ev) = s.next().await {
                if let Ok(WatchEvent::Modified(cm)) = ev {
                    let sent: u64 = cm.data.get("t").and_then(|t| t.parse().ok()).unwrap_or(0);
                    local.push(now_micros().saturating_sub(sent));
                    delivered.fetch_add(1, Ordering::Relaxed);
                    if local.len() % 1000 == 0 {
                        lags.lock().await.append(&mut local);
                    }
                }
            }
            lags.lock().await.append(&mut local);
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Writers: one write every 1/rate seconds, each its own task (bounded).
    let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(Semaphore::new(256));
    let total = seconds * rate;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let began = Instant::now();
    let mut handles = Vec::with_capacity(total as usize);
    for seq in 0..total {
        ticker.tick().await;
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (cms, latencies, errors) = (cms.clone(), latencies.clone(), errors.clone());
        handles.push(tokio::spawn(async move {
            let name = format!("bench-{}", seq % objects);
            let body = json!({"data": {"t": now_micros().to_string(), "seq": seq.to_string()}});
            let t = Instant::now();
            let r = cms
                .patch(&name, &PatchParams::default(), &Patch::Merge(body))
                .await;
            let us = t.elapsed().as_micros() as u64;
            drop(permit);
            match r {
                Ok(_) => latencies.lock().await.push(us),
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = began.elapsed();
    let expected = total * watches;
    let wait_until = Instant::now() + Duration::from_secs(30);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.faults().close_watches();
    for t in watch_tasks {
        let _ = t.await;
    }

    println!(
        "apiserver emulator benchmark ({} cores, load average before {load_before}, after {}; write latency {latency_ms} ms)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        load()
    );
    println!(
        "writes: {total} merge patches over {:.2} s = {:.0} writes/s (target {rate}/s), errors {}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        errors.load(Ordering::Relaxed)
    );
    println!(
        "watches: {watches} open, events delivered {} of {expected}",
        delivered.load(Ordering::Relaxed)
    );
    summary("write request latency", latencies.lock().await.clone());
    summary("watch delivery lag", lags.lock().await.clone());
}

/// The scale scenario (`--scale`).
mod scale {
    use std::{
        future::Future,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };

    use apiserver::{ApiServer, Config};
    use futures::{AsyncBufReadExt, StreamExt};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::{
        Api,
        api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams},
    };
    use serde_json::{Map, Value, json};

    use super::{arg, load, pct};

    /// ConfigMaps written by the apply and GC phases (the rest just sit in the store).
    const HOT: usize = 1_000;
    /// Owners deleted in the GC phase.
    const GC: usize = 1_000;
    pub(super) const NS: &str = "default";

    pub(super) fn owner_crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "owners.bench.slipstream.io"},
            "spec": {
                "group": "bench.slipstream.io", "scope": "Namespaced",
                "names": {"plural": "owners", "singular": "owner", "kind": "Owner", "listKind": "OwnerList"},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "properties": {
                            "bucket": {"type": "string"},
                            "prefixes": {"type": "array", "items": {"type": "string"}}
                        }},
                        "status": {"type": "object", "properties": {
                            "cursor": {"type": "string"},
                            "keys": {"type": "integer"},
                            "bytes": {"type": "integer"},
                            "conditions": {
                                "type": "array",
                                "x-kubernetes-list-type": "map",
                                "x-kubernetes-list-map-keys": ["type"],
                                "items": {"type": "object", "required": ["type", "status"], "properties": {
                                    "type": {"type": "string"}, "status": {"type": "string"},
                                    "reason": {"type": "string"}, "lastTransitionTime": {"type": "string"}
                                }}
                            }
                        }}
                    }}}
                }]
            }
        })
    }

    /// 100 keys of 32-byte values; `first` replaces the value of `key-000`.
    pub(super) fn data(first: u64) -> Map<String, Value> {
        (0..100u64)
            .map(|k| {
                let v = if k == 0 {
                    format!("{first:032}")
                } else {
                    format!("{:016x}{k:016x}", k * 7919)
                };
                (format!("key-{k:03}"), json!(v))
            })
            .collect()
    }

    fn owner_ref(name: &str, uid: &str) -> Value {
        json!([{"apiVersion": "bench.slipstream.io/v1", "kind": "Owner", "name": name, "uid": uid,
                "controller": true, "blockOwnerDeletion": true}])
    }

    pub(super) fn config_map(name: &str, group: &str, owner: &str, uid: &str, seq: u64) -> Value {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": name, "namespace": NS,
                "labels": {"app.kubernetes.io/managed-by": "bench", "bench-group": group},
                "annotations": {"bench/cursor": seq.to_string(), "bench/owner": owner},
                "ownerReferences": owner_ref(owner, uid),
            },
            "data": data(seq),
        })
    }

    /// Creates `n` owners and one owned ConfigMap each, straight in the store.
    /// Returns the owners' uids.
    pub(super) fn preload(
        api: &ApiServer,
        prefix: &str,
        group: &str,
        n: usize,
        finalizer: bool,
    ) -> Vec<String> {
        let mut uids = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("{prefix}-{i}");
            let mut owner = json!({
                "apiVersion": "bench.slipstream.io/v1", "kind": "Owner",
                "metadata": {"name": name, "namespace": NS, "labels": {"bench-group": group}},
                "spec": {"bucket": "b", "prefixes": [format!("{name}.")]},
            });
            if finalizer {
                owner["metadata"]["finalizers"] = json!(["bench.slipstream.io/hold"]);
            }
            let o = api.create_object(owner).unwrap();
            let uid = o["metadata"]["uid"].as_str().unwrap().to_string();
            api.create_object(config_map(&name, group, &name, &uid, 0))
                .unwrap();
            uids.push(uid);
        }
        uids
    }

    /// Creates `n` owners (no ConfigMaps), straight in the store; returns their uids.
    fn preload_owners(api: &ApiServer, prefix: &str, group: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let o = api
                    .create_object(json!({
                        "apiVersion": "bench.slipstream.io/v1", "kind": "Owner",
                        "metadata": {"name": format!("{prefix}-{i}"), "namespace": NS, "labels": {"bench-group": group}},
                        "spec": {"bucket": "b", "prefixes": [format!("{prefix}-{i}.")]},
                    }))
                    .unwrap();
                o["metadata"]["uid"].as_str().unwrap().to_string()
            })
            .collect()
    }

    /// Latencies (microseconds) and errors of one load phase.
    #[derive(Default)]
    pub(super) struct Phase {
        pub(super) lat: Vec<u64>,
        pub(super) errors: u64,
        pub(super) elapsed: Duration,
    }

    impl Phase {
        pub(super) fn rate(&self) -> f64 {
            self.lat.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
        }
        pub(super) fn p(&self, q: f64) -> f64 {
            pct(&self.lat, q)
        }
    }

    /// Runs `f(i)` for i = 0.. from `clients` concurrent tasks until `total`
    /// calls were made or `stop` is set.
    pub(super) async fn drive<F, Fut>(
        clients: usize,
        total: Option<u64>,
        stop: Arc<AtomicBool>,
        f: F,
    ) -> Phase
    where
        F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send,
    {
        let next = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let began = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (next, errors, stop, f) = (next.clone(), errors.clone(), stop.clone(), f.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if total.is_some_and(|t| i >= t) || stop.load(Ordering::Relaxed) {
                        return lat;
                    }
                    let t = Instant::now();
                    if f(i).await {
                        lat.push(t.elapsed().as_micros() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        lat.sort_unstable();
        Phase {
            lat,
            errors: errors.load(Ordering::Relaxed),
            elapsed: began.elapsed(),
        }
    }

    fn applier(
        api: &ApiServer,
        uids: Arc<Vec<String>>,
    ) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>>
    + Clone
    + Send
    + Sync
    + 'static {
        let cms: Api<ConfigMap> = Api::namespaced(api.client(), NS);
        let seq = Arc::new(AtomicU64::new(1_000_000));
        move |i| {
            let cms = cms.clone();
            let uids = uids.clone();
            let seq = seq.clone();
            Box::pin(async move {
                let k = (i as usize) % HOT;
                let name = format!("hot-{k}");
                let s = seq.fetch_add(1, Ordering::Relaxed);
                let body = config_map(&name, "hot", &name, &uids[k], s);
                cms.patch(
                    &name,
                    &PatchParams::apply("bench").force(),
                    &Patch::Apply(body),
                )
                .await
                .is_ok()
            })
        }
    }

    pub(super) fn owners_api(api: &ApiServer) -> Api<DynamicObject> {
        let ar =
            ApiResource::from_gvk(&GroupVersionKind::gvk("bench.slipstream.io", "v1", "Owner"));
        Api::namespaced_with(api.client(), NS, &ar)
    }

    /// Requests `GET path` every 2 ms until `stop`; the slowest answer (ms).
    async fn probe(client: kube::Client, stop: Arc<AtomicBool>) -> f64 {
        let mut worst = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            let req = http::Request::get("/api/v1/namespaces/default/configmaps/hot-0")
                .body(Vec::new())
                .unwrap();
            let t = Instant::now();
            let _ = client.request_text(req).await;
            worst = worst.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        worst.as_secs_f64() * 1000.0
    }

    /// Reads a watch stream until `want` lines of `etype` arrived; returns when (from `t0`).
    async fn count_events(
        client: kube::Client,
        path: String,
        etype: &'static str,
        want: usize,
        t0: Instant,
    ) -> Option<Duration> {
        let req = http::Request::get(path).body(Vec::new()).unwrap();
        let mut lines = client.request_stream(req).await.ok()?.lines();
        let needle = format!("{{\"type\":\"{etype}\"");
        let mut n = 0;
        while let Some(Ok(l)) = lines.next().await {
            if l.starts_with(&needle) {
                n += 1;
                if n >= want {
                    return Some(t0.elapsed());
                }
            }
        }
        None
    }

    /// A table row: its label and how to render one run.
    type Column = (&'static str, Box<dyn Fn(&Row) -> String>);

    struct Row {
        n: usize,
        stored: usize,
        preload: Duration,
        apply: Phase,
        status: Phase,
        list_ms: f64,
        list_mb: f64,
        list_probe_ms: f64,
        watch0_ms: f64,
        watch0_probe_ms: f64,
        gc_owners: Duration,
        gc_done: Option<Duration>,
        gc_apply: Phase,
        rss_mb: f64,
    }

    fn rss_mb() -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<f64>().ok())
                })
            })
            .unwrap_or(0.0)
            / 1024.0
    }

    async fn one(n: usize, clients: usize, applies: u64, latency_ms: u64) -> Row {
        let api = ApiServer::start_with(Config {
            write_latency: Duration::from_millis(latency_ms),
            // As examples/bench_scale.rs configures it.
            history_window: 500_000,
            log_capacity: 5_000_000,
            ..Default::default()
        })
        .await
        .unwrap();
        let t = Instant::now();
        api.create_object(owner_crd()).unwrap();
        preload(&api, "bg", "bg", n, false);
        let hot_uids = Arc::new(preload_owners(&api, "hot", "hot", HOT));
        preload(&api, "gc", "gc", GC, true);
        // The written set is created by server-side apply, as an operator does
        // (one field manager), untimed.
        let never = Arc::new(AtomicBool::new(false));
        drive(
            clients,
            Some(HOT as u64),
            never.clone(),
            applier(&api, hot_uids.clone()),
        )
        .await;
        let preload_t = t.elapsed();
        let stored = api.list("v1", "ConfigMap", Some(NS)).len();
        eprintln!(
            "scale n={n}: preloaded {stored} ConfigMaps + owners in {:.1} s",
            preload_t.as_secs_f64()
        );

        // 1. server-side apply (whole ConfigMap, one value changed, force) on the hot set.
        let apply = drive(
            clients,
            Some(applies),
            never.clone(),
            applier(&api, hot_uids.clone()),
        )
        .await;
        eprintln!(
            "scale n={n}: apply {:.0}/s p99 {:.1} ms",
            apply.rate(),
            apply.p(0.99)
        );

        // 2. merge patch of /status on the hot owners.
        let owners = owners_api(&api);
        let status = {
            let owners = owners.clone();
            drive(clients, Some(applies / 2), never.clone(), move |i| {
                let owners = owners.clone();
                async move {
                    let name = format!("hot-{}", (i as usize) % HOT);
                    let body = json!({"status": {"cursor": i.to_string(), "keys": 100, "bytes": 3200,
                        "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                    owners.patch_status(&name, &PatchParams::default(), &Patch::Merge(body)).await.is_ok()
                }
            })
            .await
        };
        eprintln!(
            "scale n={n}: status {:.0}/s p99 {:.1} ms",
            status.rate(),
            status.p(0.99)
        );

        // 3. a full list and a watch from 0 (initial events), each with a GET probe alongside.
        let client = api.client();
        let stop = Arc::new(AtomicBool::new(false));
        let pr = tokio::spawn(probe(client.clone(), stop.clone()));
        let t = Instant::now();
        let req = http::Request::get("/api/v1/namespaces/default/configmaps")
            .body(Vec::new())
            .unwrap();
        let body = client.request_text(req).await.unwrap();
        let list_ms = t.elapsed().as_secs_f64() * 1000.0;
        let list_mb = body.len() as f64 / 1e6;
        drop(body);
        stop.store(true, Ordering::Relaxed);
        let list_probe_ms = pr.await.unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let pr = tokio::spawn(probe(client.clone(), stop.clone()));
        let t = Instant::now();
        let w0 = count_events(
            client.clone(),
            "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0&timeoutSeconds=120"
                .into(),
            "ADDED",
            stored,
            t,
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        let watch0_probe_ms = pr.await.unwrap();
        let watch0_ms = w0.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN);
        eprintln!(
            "scale n={n}: list {list_ms:.0} ms ({list_mb:.1} MB, slowest GET {list_probe_ms:.1} ms), watch from 0 {watch0_ms:.0} ms (slowest GET {watch0_probe_ms:.1} ms)"
        );

        // 4. delete 1,000 owners (each: DELETE, then drop its finalizer, as an
        //    operator does) while the applies go on; time until their
        //    ConfigMaps are garbage-collected.
        let stop = Arc::new(AtomicBool::new(false));
        let bg = tokio::spawn(drive(
            clients,
            None,
            stop.clone(),
            applier(&api, hot_uids.clone()),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rv = api.resource_version();
        let t0 = Instant::now();
        let watch = tokio::spawn(count_events(
            client.clone(),
            format!(
                "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}&labelSelector=bench-group%3Dgc&timeoutSeconds=300"
            ),
            "DELETED",
            GC,
            t0,
        ));
        let deleter = {
            let owners = owners.clone();
            drive(16, Some(GC as u64), never.clone(), move |i| {
                let owners = owners.clone();
                async move {
                    let name = format!("gc-{i}");
                    owners.delete(&name, &DeleteParams::default()).await.is_ok()
                        && owners
                            .patch(
                                &name,
                                &PatchParams::default(),
                                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                            )
                            .await
                            .is_ok()
                }
            })
        };
        let del = deleter.await;
        let gc_owners = t0.elapsed();
        eprintln!(
            "scale n={n}: {GC} owners deleted in {:.0} ms",
            gc_owners.as_secs_f64() * 1000.0
        );
        let gc_done = tokio::time::timeout(Duration::from_secs(300), watch)
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten();
        stop.store(true, Ordering::Relaxed);
        let gc_apply = bg.await.unwrap();
        eprintln!(
            "scale n={n}: dependents gone after {:?}; applies meanwhile {:.0}/s p99 {:.1} ms",
            gc_done,
            gc_apply.rate(),
            gc_apply.p(0.99)
        );
        if del.errors > 0 {
            eprintln!("scale n={n}: {} owner deletions failed", del.errors);
        }
        let rss = rss_mb();
        Row {
            n,
            stored,
            preload: preload_t,
            apply,
            status,
            list_ms,
            list_mb,
            list_probe_ms,
            watch0_ms,
            watch0_probe_ms,
            gc_owners,
            gc_done,
            gc_apply,
            rss_mb: rss,
        }
    }

    pub async fn run() {
        let args: Vec<String> = std::env::args().collect();
        let sizes: Vec<usize> = args
            .iter()
            .position(|a| a == "--sizes")
            .and_then(|i| args.get(i + 1))
            .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![0, 10_000, 20_000]);
        let clients = arg("--clients", 64) as usize;
        let applies = arg("--applies", 10_000);
        let latency_ms = arg("--write-latency-ms", 3);
        if let Some(n) = args
            .iter()
            .position(|a| a == "--one")
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
        {
            // Child: one size, its cells as one JSON line.
            let row = one(n, clients, applies, latency_ms).await;
            let cells: Vec<(String, String)> = columns()
                .iter()
                .map(|(name, f)| (name.to_string(), f(&row)))
                .collect();
            println!("ROW {}", serde_json::to_string(&cells).unwrap());
            return;
        }
        // Each size runs in its own process, so one run's memory (and its
        // release) does not weigh on the next.
        let load_before = load();
        let mut rows: Vec<Vec<(String, String)>> = Vec::new();
        for &n in &sizes {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--scale", "--one", &n.to_string()])
                .args(["--clients", &clients.to_string()])
                .args(["--applies", &applies.to_string()])
                .args(["--write-latency-ms", &latency_ms.to_string()])
                .stderr(std::process::Stdio::inherit())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let row = text
                .lines()
                .find_map(|l| l.strip_prefix("ROW "))
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_else(|| panic!("size {n} failed: {text}"));
            rows.push(row);
        }
        println!(
            "apiserver emulator scale benchmark ({} cores, load average before {load_before}, after {}; write latency {latency_ms} ms, {clients} clients)",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            load()
        );
        print!("| {:<30} |", "measure");
        for r in &rows {
            print!(" {:>12} |", r[0].1);
        }
        println!();
        print!("|{}|", "-".repeat(32));
        for _ in &rows {
            print!("{}|", "-".repeat(14));
        }
        println!();
        for (i, (name, _)) in rows[0].iter().enumerate() {
            print!("| {name:<30} |");
            for r in &rows {
                print!(" {:>12} |", r.get(i).map(|c| c.1.as_str()).unwrap_or(""));
            }
            println!();
        }
    }

    fn columns() -> Vec<Column> {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        vec![
            (
                "pre-loaded objects",
                Box::new(|r: &Row| format!("N={}", r.n)),
            ),
            (
                "ConfigMaps stored",
                Box::new(|r: &Row| r.stored.to_string()),
            ),
            (
                "set-up (pre-load, 1000 SSA)",
                Box::new(move |r: &Row| format!("{:.1} s", r.preload.as_secs_f64())),
            ),
            (
                "SSA applies/s",
                Box::new(|r: &Row| format!("{:.0}", r.apply.rate())),
            ),
            (
                "SSA p50",
                Box::new(|r: &Row| format!("{:.1} ms", r.apply.p(0.5))),
            ),
            (
                "SSA p99",
                Box::new(|r: &Row| format!("{:.1} ms", r.apply.p(0.99))),
            ),
            ("SSA errors", Box::new(|r: &Row| r.apply.errors.to_string())),
            (
                "status patches/s",
                Box::new(|r: &Row| format!("{:.0}", r.status.rate())),
            ),
            (
                "status p50",
                Box::new(|r: &Row| format!("{:.1} ms", r.status.p(0.5))),
            ),
            (
                "status p99",
                Box::new(|r: &Row| format!("{:.1} ms", r.status.p(0.99))),
            ),
            (
                "list all ConfigMaps",
                Box::new(|r: &Row| format!("{:.0} ms", r.list_ms)),
            ),
            (
                "list size",
                Box::new(|r: &Row| format!("{:.1} MB", r.list_mb)),
            ),
            (
                "slowest GET during list",
                Box::new(|r: &Row| format!("{:.1} ms", r.list_probe_ms)),
            ),
            (
                "watch rv=0, all ADDED",
                Box::new(|r: &Row| format!("{:.0} ms", r.watch0_ms)),
            ),
            (
                "slowest GET during watch",
                Box::new(|r: &Row| format!("{:.1} ms", r.watch0_probe_ms)),
            ),
            (
                "GC: 1000 owners deleted",
                Box::new(move |r: &Row| ms(r.gc_owners)),
            ),
            (
                "GC: their ConfigMaps gone",
                Box::new(move |r: &Row| r.gc_done.map(ms).unwrap_or_else(|| "timeout".into())),
            ),
            (
                "GC: last ConfigMap after owner",
                Box::new(move |r: &Row| {
                    r.gc_done
                        .map(|d| ms(d.saturating_sub(r.gc_owners)))
                        .unwrap_or_else(|| "timeout".into())
                }),
            ),
            (
                "applies/s during GC",
                Box::new(|r: &Row| format!("{:.0}", r.gc_apply.rate())),
            ),
            (
                "apply p50 during GC",
                Box::new(|r: &Row| format!("{:.1} ms", r.gc_apply.p(0.5))),
            ),
            (
                "apply p99 during GC",
                Box::new(|r: &Row| format!("{:.1} ms", r.gc_apply.p(0.99))),
            ),
            (
                "apply max during GC",
                Box::new(|r: &Row| format!("{:.1} ms", r.gc_apply.p(1.0))),
            ),
            (
                "process RSS after",
                Box::new(|r: &Row| format!("{:.0} MiB", r.rss_mb)),
            ),
        ]
    }
}

/// The emulator-capacity probe of `examples/bench_scale.rs` (`--probe`):
/// N stored 100-key ConfigMaps (each owned by a custom resource), then forced
/// server-side applies of whole 100-key ConfigMaps (one field manager, one
/// value changed per apply, each client its own ConfigMap) with 32 and 64
/// requests in flight, then the same applies together with `/status` merge
/// patches of custom resources. Prints throughput, p50/p99 and the CPU the
/// emulator's threads used.
/// `cargo run --release -p apiserver --example bench_apiserver -- --probe [--objects 10000] [--seconds 5] [--write-latency-ms 3]`
mod probe {
    use std::{
        path::Path,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };

    use apiserver::{ApiServer, Config};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use serde_json::json;

    use super::{
        arg, load,
        scale::{NS, Phase, config_map, drive, owner_crd, owners_api, preload},
    };

    /// utime + stime of a `/proc/.../stat` file, in clock ticks (100/s on Linux).
    fn stat_ticks(path: &Path) -> u64 {
        let Ok(text) = std::fs::read_to_string(path) else {
            return 0;
        };
        let Some(i) = text.rfind(')') else { return 0 };
        let f: Vec<&str> = text[i + 2..].split_whitespace().collect();
        let n = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        n(11) + n(12)
    }

    /// CPU seconds of this process, and of its threads named `apiserver*` (the emulator).
    fn cpu() -> (f64, f64) {
        let all = stat_ticks(Path::new("/proc/self/stat"));
        let mut emu = 0;
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for t in dir.flatten() {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                if comm.starts_with("apiserver") {
                    emu += stat_ticks(&t.path().join("stat"));
                }
            }
        }
        (all as f64 / 100.0, emu as f64 / 100.0)
    }

    fn applier(
        api: &ApiServer,
        uids: Arc<Vec<String>>,
        slots: usize,
    ) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>>
    + Clone
    + Send
    + Sync
    + 'static {
        let cms: Api<ConfigMap> = Api::namespaced(api.client(), NS);
        let seq = Arc::new(AtomicU64::new(1_000_000));
        move |i| {
            let (cms, uids, seq) = (cms.clone(), uids.clone(), seq.clone());
            Box::pin(async move {
                let k = (i as usize) % slots;
                let name = format!("probe-{k}");
                let s = seq.fetch_add(1, Ordering::Relaxed);
                let body = config_map(&name, "probe", &format!("bg-{k}"), &uids[k], s);
                cms.patch(
                    &name,
                    &PatchParams::apply("bench-probe").force(),
                    &Patch::Apply(body),
                )
                .await
                .is_ok()
            })
        }
    }

    fn status_patcher(
        owners: Api<DynamicObject>,
        slots: usize,
    ) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>>
    + Clone
    + Send
    + Sync
    + 'static {
        move |i| {
            let owners = owners.clone();
            Box::pin(async move {
                let name = format!("bg-{}", (i as usize) % slots);
                let body = json!({"status": {"cursor": i.to_string(), "keys": 100, "bytes": 3200,
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                owners
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(body))
                    .await
                    .is_ok()
            })
        }
    }

    struct Row {
        label: String,
        apply: Option<Phase>,
        status: Option<Phase>,
        wall: f64,
        emu_cpu: f64,
        all_cpu: f64,
        /// Seconds the store lock was held.
        lock: f64,
    }

    impl Row {
        fn lock_cell(&self) -> String {
            let writes: usize = [&self.apply, &self.status]
                .iter()
                .filter_map(|p| p.as_ref())
                .map(|p| p.lat.len())
                .sum();
            format!(
                "{:.0}% ({:.0} us/write)",
                self.lock / self.wall * 100.0,
                self.lock * 1e6 / writes.max(1) as f64
            )
        }
    }

    fn cell(p: &Option<Phase>) -> String {
        match p {
            Some(p) => format!(
                "{:>6.0}/s p50 {:>5.1} p99 {:>5.1} ms{}",
                p.rate(),
                p.p(0.5),
                p.p(0.99),
                if p.errors > 0 {
                    format!(" ({} errors)", p.errors)
                } else {
                    String::new()
                }
            ),
            None => "-".into(),
        }
    }

    pub async fn run() {
        let objects = arg("--objects", 10_000) as usize;
        let seconds = arg("--seconds", 5);
        let latency_ms = arg("--write-latency-ms", 3);
        let load_before = load();
        let api = ApiServer::start_with(Config {
            write_latency: Duration::from_millis(latency_ms),
            // As examples/bench_scale.rs configures it.
            history_window: 500_000,
            log_capacity: 5_000_000,
            ..Default::default()
        })
        .await
        .unwrap();
        api.create_object(owner_crd()).unwrap();
        let uids = Arc::new(preload(&api, "bg", "bg", objects.max(64), false));
        // The probe's own ConfigMaps, created by server-side apply (untimed).
        let never = Arc::new(AtomicBool::new(false));
        drive(64, Some(64), never.clone(), applier(&api, uids.clone(), 64)).await;
        let owners = owners_api(&api);
        let dur = Duration::from_secs(seconds);
        let mut rows = Vec::new();
        // Each load twice, alternating: writes computed under the store lock
        // (as before parallel writes), then outside it.
        let mut loads = Vec::new();
        for (label, apply_clients, status_clients) in [
            ("SSA, 32 in flight", 32, 0),
            ("SSA, 64 in flight", 64, 0),
            ("SSA 32 + status 32 in flight", 32, 32),
        ] {
            for serialized in [true, false] {
                loads.push((label, apply_clients, status_clients, serialized));
            }
        }
        for (label, apply_clients, status_clients, serialized) in loads {
            api.faults().serialize_writes(serialized);
            let label = format!(
                "{label}, {}",
                if serialized { "locked" } else { "parallel" }
            );
            let stop = Arc::new(AtomicBool::new(false));
            let (c0, l0, t0) = (cpu(), api.store_lock_held().0, Instant::now());
            let a = (apply_clients > 0).then(|| {
                tokio::spawn(drive(
                    apply_clients,
                    None,
                    stop.clone(),
                    applier(&api, uids.clone(), apply_clients),
                ))
            });
            let s = (status_clients > 0).then(|| {
                tokio::spawn(drive(
                    status_clients,
                    None,
                    stop.clone(),
                    status_patcher(owners.clone(), status_clients.max(64)),
                ))
            });
            tokio::time::sleep(dur).await;
            stop.store(true, Ordering::Relaxed);
            let apply = match a {
                Some(h) => Some(h.await.unwrap()),
                None => None,
            };
            let status = match s {
                Some(h) => Some(h.await.unwrap()),
                None => None,
            };
            let (c1, l1, wall) = (cpu(), api.store_lock_held().0, t0.elapsed().as_secs_f64());
            let row = Row {
                label,
                apply,
                status,
                wall,
                emu_cpu: c1.1 - c0.1,
                all_cpu: c1.0 - c0.0,
                lock: (l1 - l0).as_secs_f64(),
            };
            eprintln!(
                "probe: {}: apply {} | status {} | emulator CPU {:.0}% of a core, process {:.0}% | store lock held {}",
                row.label,
                cell(&row.apply),
                cell(&row.status),
                row.emu_cpu / row.wall * 100.0,
                row.all_cpu / row.wall * 100.0,
                row.lock_cell()
            );
            rows.push(row);
        }
        println!(
            "apiserver emulator probe ({} cores, load average before {load_before}, after {}; {} stored 100-key ConfigMaps, write latency {latency_ms} ms, {seconds} s per row)",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            load(),
            api.list("v1", "ConfigMap", Some(NS)).len(),
        );
        println!(
            "| {:<40} | {:<36} | {:<36} | {:>12} | {:>12} | {:>24} |",
            "load",
            "SSA applies",
            "status merge patches",
            "emulator CPU",
            "process CPU",
            "store lock held"
        );
        println!(
            "|{}|{}|{}|{}|{}|{}|",
            "-".repeat(42),
            "-".repeat(38),
            "-".repeat(38),
            "-".repeat(14),
            "-".repeat(14),
            "-".repeat(26)
        );
        for r in &rows {
            println!(
                "| {:<40} | {:<36} | {:<36} | {:>11.0}% | {:>11.0}% | {:>24} |",
                r.label,
                cell(&r.apply),
                cell(&r.status),
                r.emu_cpu / r.wall * 100.0,
                r.all_cpu / r.wall * 100.0,
                r.lock_cell()
            );
        }
    }
}
