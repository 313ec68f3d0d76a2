//! Load benchmark: a steady write rate (default 1,000 writes/s) against
//! ConfigMaps while 100 watches are open; prints per-request latency and
//! watch delivery lag percentiles.
//!
//! `cargo run --release -p apiserver --example bench_apiserver -- [--seconds 10] [--rate 1000] [--watches 100] [--write-latency-ms 0]`
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
