//! Operator benchmark against the Kubernetes API emulator (with a few ms of
//! write latency) and a nats-server it starts itself. Prints a table;
//! asserts nothing.
//!
//! `cargo run --release --example bench_operator`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use apiserver::ApiServer;
use bytes::Bytes;
use common::{NatsServer, percentile};
use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::ConfigMap,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, CustomResourceExt,
    api::{ListParams, PostParams},
    runtime::watcher,
};
use slipstream::{
    controller::{self, Config, Context, NatsConnector},
    crd::{ConfigBinding, ConfigBindingSpec},
    kv::{
        KvWriter,
        nats::{BucketConfig, ConnectOptions, NatsBucket, NatsKv},
    },
    metrics::Metrics,
    policy::AccessPolicy,
    sink::configmap::CURSOR_ANNOTATION,
};
use tokio::sync::watch;

const WRITE_LATENCY: Duration = Duration::from_millis(3);

struct Op {
    metrics: Metrics,
    ctx: Arc<Context>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Op {
    fn drop(&mut self) {
        self.task.abort();
        self.ctx.shutdown();
    }
}

fn start_operator(client: &Client, nats_url: &str) -> Op {
    let metrics = Metrics::new();
    let (_tx, gate) = watch::channel(true);
    std::mem::forget(_tx);
    let ctx = Context::new(
        client.clone(),
        Arc::new(NatsConnector::new(ConnectOptions::new(nats_url))),
        AccessPolicy::allow_all(),
        metrics.clone(),
        gate,
        Config::default(),
    );
    let task = tokio::spawn(controller::run(ctx.clone()));
    Op { metrics, ctx, task }
}

async fn create_binding(client: &Client, name: &str, prefix: &str) {
    let spec: ConfigBindingSpec =
        serde_yaml::from_str(&format!("bucket: bench\nprefixes: [{prefix}]")).unwrap();
    let api: Api<ConfigBinding> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &ConfigBinding::new(name, spec))
        .await
        .unwrap();
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

async fn setup() -> (NatsServer, ApiServer, Client, NatsBucket) {
    let nats = NatsServer::start();
    let api = ApiServer::start().await.unwrap();
    api.faults().set_write_latency(WRITE_LATENCY);
    let client = api.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &ConfigBinding::crd())
        .await
        .unwrap();
    let kv = NatsKv::connect(&ConnectOptions::new(nats.url()))
        .await
        .unwrap();
    let mut cfg = BucketConfig::new("bench");
    cfg.history = 1;
    let bucket = kv.create_or_open(&cfg).await.unwrap();
    (nats, api, client, bucket)
}

/// Watches every ConfigMap and stamps when each value first appears.
fn watch_values(client: &Client) -> Arc<Mutex<HashMap<String, Instant>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let out = seen.clone();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
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
    let (nats, _api, client, kv) = setup().await;
    let op = start_operator(&client, &nats.url());
    for i in 0..100 {
        kv.put(&format!("b{i:03}.k"), Bytes::from("init"))
            .await
            .unwrap();
        create_binding(&client, &format!("b{i:03}"), &format!("b{i:03}.")).await;
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for _ in 0..400 {
        let n = cms.list(&ListParams::default()).await.unwrap().items.len();
        if n >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = watch_values(&client);
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
    let (nats, _api, client, kv) = setup().await;
    let op = start_operator(&client, &nats.url());
    create_binding(&client, "burst", "burst.").await;
    kv.put("burst.seed", Bytes::from("0")).await.unwrap();
    let metrics = op.metrics.clone();
    wait_until(
        || metrics.write_count("default", "burst") >= 1,
        Duration::from_secs(20),
    )
    .await;
    let before = metrics.write_count("default", "burst");
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
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
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
    let writes = metrics.write_count("default", "burst") - before;
    drop(op);
    (writes, writes as f64 / 10_000.0)
}

async fn restart_after_100_changes_on_100k_keys() -> (u64, Duration) {
    let (nats, _api, client, kv) = setup().await;
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
    let op = start_operator(&client, &nats.url());
    for b in 0..100 {
        create_binding(&client, &format!("r{b:02}"), &format!("r{b:02}.")).await;
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
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
    let op = start_operator(&client, &nats.url());
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
    let (p50, p99, n) = latency_at_200_per_second().await;
    let (writes, per_update) = writes_per_update_in_a_burst().await;
    let (delivered, took) = restart_after_100_changes_on_100k_keys().await;
    println!("operator benchmark (emulator write latency {WRITE_LATENCY:?}, coalesce 50ms)");
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
}
