//! Operator benchmark: the operator in-process, a nats-server, and the API
//! server the operator tests use (the emulator, or the real control plane
//! with `SLIPSTREAM_TEST_APISERVER=real`), with a few ms of write latency
//! added. Prints a table; asserts nothing.
//!
//! `cargo run --release --example bench_operator` (`-- rollouts`: only the
//! rollout table)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
// The operator tests' scenario and operator builder: the benchmark starts
// exactly what the tests start (SLIPSTREAM_TEST_APISERVER=real runs it on
// the real control plane).
#[allow(dead_code)]
#[path = "../tests/operator/harness.rs"]
mod harness;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::percentile;
use futures::StreamExt;
use harness::{Env, Operator};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client, api::ListParams, runtime::watcher};
use slipstream::{
    kv::{
        KvWriter,
        nats::{BucketConfig, NatsBucket},
    },
    sink::configmap::CURSOR_ANNOTATION,
};

const WRITE_LATENCY: Duration = Duration::from_millis(3);
const COALESCE: Duration = Duration::from_millis(50);

fn start_operator(env: &Env) -> Operator {
    env.operator_builder().coalesce(COALESCE).start()
}

async fn create_binding(env: &Env, name: &str, prefix: &str) {
    env.create_binding(name, &format!("bucket: bench\nprefixes: [{prefix}]"))
        .await;
}

async fn wait_until<F: Fn() -> bool>(f: F, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn setup() -> (Env, NatsBucket) {
    let env = Env::start().await;
    env.api.faults().set_write_latency(WRITE_LATENCY);
    let mut cfg = BucketConfig::new("bench");
    cfg.history = 1;
    let bucket = env.kv.create_or_open(&cfg).await.unwrap();
    (env, bucket)
}

/// Watches every ConfigMap and stamps when each value first appears.
fn watch_values(client: &Client, namespace: &str) -> Arc<Mutex<HashMap<String, Instant>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let out = seen.clone();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    tokio::spawn(async move {
        let mut s = watcher(api, watcher::Config::default()).boxed();
        while let Some(ev) = s.next().await {
            if let Ok(watcher::Event::Apply(cm)) = ev {
                let now = Instant::now();
                let mut m = out.lock().unwrap();
                for v in cm.data.unwrap_or_default().into_values() {
                    m.entry(v).or_insert(now);
                }
            }
        }
    });
    seen
}

async fn latency_at_200_per_second() -> (Duration, Duration, usize) {
    let (env, kv) = setup().await;
    let op = start_operator(&env);
    for i in 0..100 {
        kv.put(&format!("b{i:03}.k"), Bytes::from("init"))
            .await
            .unwrap();
        create_binding(&env, &format!("b{i:03}"), &format!("b{i:03}.")).await;
    }
    let cms = env.configmaps();
    for _ in 0..400 {
        let n = cms.list(&ListParams::default()).await.unwrap().items.len();
        if n >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = watch_values(&env.client, env.ns());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sent = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for n in 0..1000usize {
        tick.tick().await;
        let value = format!("v{n}");
        let at = Instant::now();
        kv.put(&format!("b{:03}.k", n % 100), Bytes::from(value.clone()))
            .await
            .unwrap();
        sent.push((value, at));
    }
    let last = sent.last().map(|(v, _)| v.clone()).unwrap();
    wait_until(
        || seen.lock().unwrap().contains_key(&last),
        Duration::from_secs(20),
    )
    .await;
    let seen = seen.lock().unwrap().clone();
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(v, at)| seen.get(v).map(|t| t.saturating_duration_since(*at)))
        .collect();
    lat.sort();
    drop(op);
    (percentile(&lat, 0.5), percentile(&lat, 0.99), lat.len())
}

async fn writes_per_update_in_a_burst() -> (u64, f64) {
    let (env, kv) = setup().await;
    let op = start_operator(&env);
    create_binding(&env, "burst", "burst.").await;
    kv.put("burst.seed", Bytes::from("0")).await.unwrap();
    let metrics = op.metrics.clone();
    wait_until(
        || metrics.write_count(env.ns(), "burst") >= 1,
        Duration::from_secs(20),
    )
    .await;
    let before = metrics.write_count(env.ns(), "burst");
    let start = Instant::now();
    let mut acks = Vec::new();
    for i in 0..10_000u32 {
        let kv = &kv;
        acks.push(async move {
            kv.put(&format!("burst.k{}", i % 500), Bytes::from(i.to_string()))
                .await
        });
        if acks.len() == 500 {
            futures::future::join_all(acks.drain(..)).await;
        }
    }
    futures::future::join_all(acks).await;
    let cms = env.configmaps();
    loop {
        let cm = cms.get("burst").await.unwrap();
        let d = cm.data.unwrap_or_default();
        if d.get("burst.k499").map(String::as_str) == Some("9999") {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writes = metrics.write_count(env.ns(), "burst") - before;
    drop(op);
    (writes, writes as f64 / 10_000.0)
}

/// What one rollout burst measured.
struct RolloutBurst {
    min_interval: Duration,
    updates: u64,
    burst: Duration,
    configmap_writes: u64,
    rollouts: u64,
    coalesced: u64,
    /// The Deployment carries the digest of the ConfigMap's final content.
    last_rolled: bool,
}

/// A binding with `target.rollout` on one Deployment; 10,000 updates
/// spread over about 10 s (1,000/s, in batches of 100), then the count of
/// rollouts next to the ConfigMap writes (what a restart per ConfigMap
/// change would do) and the updates (a restart per update).
async fn rollouts_in_a_burst(min_interval: &str) -> RolloutBurst {
    let (env, kv) = setup().await;
    let op = start_operator(&env);
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(common::workload_json("Deployment", "web")).unwrap();
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(env.client.clone(), env.ns())
        .create(&Default::default(), &deployment)
        .await
        .unwrap();
    env.create_binding(
        "roll",
        &format!(
            "bucket: bench\nprefixes: [roll.]\ntarget:\n  rollout:\n    workloads: [{{kind: Deployment, name: web}}]\n    minInterval: {min_interval}"
        ),
    )
    .await;
    kv.put("roll.seed", Bytes::from("0")).await.unwrap();
    let metrics = op.metrics.clone();
    wait_until(
        || metrics.rollout_count(env.ns(), "roll") >= 1,
        Duration::from_secs(20),
    )
    .await;
    let (writes0, rollouts0, coalesced0) = (
        metrics.write_count(env.ns(), "roll"),
        metrics.rollout_count(env.ns(), "roll"),
        metrics.coalesced_count(env.ns(), "roll"),
    );
    let start = Instant::now();
    let updates = 10_000u32;
    for batch in 0..updates / 100 {
        let puts = (0..100).map(|j| {
            let i = batch * 100 + j;
            let kv = &kv;
            async move {
                kv.put(&format!("roll.k{}", i % 500), Bytes::from(i.to_string()))
                    .await
            }
        });
        futures::future::join_all(puts).await;
        let next = start + Duration::from_millis(100 * u64::from(batch + 1));
        tokio::time::sleep_until(next.into()).await;
    }
    let cms = env.configmaps();
    let last = (updates - 1).to_string();
    loop {
        let cm = cms.get("roll").await.unwrap();
        let d = cm.data.unwrap_or_default();
        if d.get(&format!("roll.k{}", (updates - 1) % 500)) == Some(&last) {
            break;
        }
        if start.elapsed() > Duration::from_secs(90) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let burst = start.elapsed();
    // the trailing rollout comes at most one interval later
    let interval = slipstream::util::duration::parse_duration(min_interval).unwrap();
    tokio::time::sleep(interval + Duration::from_secs(1)).await;
    let cm = cms.get("roll").await.unwrap();
    let final_digest = cm.metadata.annotations.unwrap_or_default()
        [slipstream::sink::configmap::DIGEST_ANNOTATION]
        .clone();
    let deployment =
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(env.client.clone(), env.ns())
            .get("web")
            .await
            .unwrap();
    let carried = deployment
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .and_then(|a| {
            a.get(&slipstream::controller::rollout::annotation_key("roll"))
                .cloned()
        });
    let result = RolloutBurst {
        min_interval: interval,
        updates: u64::from(updates),
        burst,
        configmap_writes: metrics.write_count(env.ns(), "roll") - writes0,
        rollouts: metrics.rollout_count(env.ns(), "roll") - rollouts0,
        coalesced: metrics.coalesced_count(env.ns(), "roll") - coalesced0,
        last_rolled: carried == Some(final_digest),
    };
    drop(op);
    result
}

fn print_rollout_table(runs: &[RolloutBurst]) {
    println!(
        "| minInterval | updates | burst (first put -> ConfigMap final) | restart per update | restart per ConfigMap change | Slipstream rollouts | bound ceil(D/minInterval)+1 | coalesced | last content rolled |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let bound = (r.burst.as_secs_f64() / r.min_interval.as_secs_f64()).ceil() as u64 + 1;
        println!(
            "| {:?} | {} | {:.1} s | {} | {} | {} | {} | {} | {} |",
            r.min_interval,
            r.updates,
            r.burst.as_secs_f64(),
            r.updates,
            r.configmap_writes,
            r.rollouts,
            bound,
            r.coalesced,
            if r.last_rolled { "yes" } else { "no" }
        );
    }
}

async fn restart_after_100_changes_on_100k_keys() -> (u64, Duration) {
    let (env, kv) = setup().await;
    let mut acks = Vec::new();
    for i in 0..100_000u32 {
        let kv = &kv;
        acks.push(async move {
            kv.put(&format!("r{:02}.k{i}", i % 100), Bytes::from("v"))
                .await
        });
        if acks.len() == 1000 {
            futures::future::join_all(acks.drain(..)).await;
        }
    }
    futures::future::join_all(acks).await;
    let op = start_operator(&env);
    for b in 0..100 {
        create_binding(&env, &format!("r{b:02}"), &format!("r{b:02}.")).await;
    }
    let cms = env.configmaps();
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        let list = cms.list(&ListParams::default()).await.unwrap();
        let full = list
            .items
            .iter()
            .filter(|cm| cm.data.as_ref().map_or(0, |d| d.len()) == 1000)
            .count();
        if full == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(op);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..100u32 {
        kv.put(&format!("r{:02}.k{}", i % 100, i), Bytes::from("changed"))
            .await
            .unwrap();
    }
    let start = Instant::now();
    let op = start_operator(&env);
    loop {
        let list = cms.list(&ListParams::default()).await.unwrap();
        let changed = list
            .items
            .iter()
            .filter(|cm| {
                cm.data
                    .as_ref()
                    .is_some_and(|d| d.values().any(|v| v == "changed"))
            })
            .filter(|cm| {
                cm.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(CURSOR_ANNOTATION))
            })
            .count();
        if changed == 100 || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = start.elapsed();
    let delivered = op.metrics.delivered_count("bench", "catchup")
        + op.metrics.delivered_count("bench", "shared");
    drop(op);
    (delivered, took)
}

#[tokio::main]
async fn main() {
    let rollouts = vec![
        rollouts_in_a_burst("2s").await,
        rollouts_in_a_burst("5s").await,
    ];
    if std::env::args().any(|a| a == "rollouts") {
        print_rollout_table(&rollouts);
        return;
    }
    let (p50, p99, n) = latency_at_200_per_second().await;
    let (writes, per_update) = writes_per_update_in_a_burst().await;
    let (delivered, took) = restart_after_100_changes_on_100k_keys().await;
    println!(
        "operator benchmark ({:?} API server, write latency {WRITE_LATENCY:?} added, coalesce {COALESCE:?})",
        apiserver::backend::Kind::from_env()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| put -> ConfigMap seen by a watcher, p50 (200 puts/s over 100 bindings, n={n}) | {:.1} ms |",
        ms(p50)
    );
    println!(
        "| put -> ConfigMap seen by a watcher, p99 | {:.1} ms |",
        ms(p99)
    );
    println!(
        "| ConfigMap writes during a 10k-update burst on one binding | {writes} ({per_update:.4} per update) |"
    );
    println!("| restart after 100 changes on 100k keys: updates delivered | {delivered} |");
    println!(
        "| restart after 100 changes on 100k keys: time to caught up | {:.0} ms |",
        ms(took)
    );
    println!();
    print_rollout_table(&rollouts);
}
