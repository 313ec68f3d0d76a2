//! KV layer benchmark: our NATS layer side by side with raw async-nats,
//! in one run against one nats-server it starts itself. Prints a table;
//! asserts nothing.
//!
//! `cargo run --release --example bench_kv` (or `make bench`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv::Store};
use bytes::Bytes;
use common::{NatsServer, percentile};
use futures::StreamExt;
use slipstream::kv::{
    KvUpdate, KvWatcher, VersionToken, WatchCursor, WatchEvent,
    nats::{BucketConfig, ConnectOptions, NatsBucket, NatsKv},
};

const LATENCY_ROUNDS: usize = 4;
const LATENCY_PER_ROUND: usize = 500;
/// Keys of the state-sync and resume buckets; `BENCH_KV_KEYS` overrides (smoke runs).
fn sync_keys() -> usize {
    std::env::var("BENCH_KV_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}
const SYNC_VALUE: usize = 100;
const SYNC_RUNS: usize = 3;
const RESUME_CHANGES: usize = 100;
const ACK_BATCH: usize = 2_000;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Publishes without waiting for the ack, so the measured time is the
/// server's store-and-push plus the watch path; the ack is awaited after.
async fn publish_timed(
    js: &jetstream::Context,
    subject: &str,
    value: Bytes,
) -> jetstream::context::PublishAckFuture {
    js.publish(subject.to_owned(), value).await.unwrap()
}

async fn latency_ours(kv: &NatsBucket, js: &jetstream::Context, n: usize) -> Vec<Duration> {
    let mut w = kv.watch_prefix("lat.").await.unwrap();
    loop {
        if let WatchEvent::Synced { .. } = w.next().await.unwrap().unwrap() {
            break;
        }
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let ack = publish_timed(js, "$KV.bench_lat.lat.k", Bytes::from(i.to_string())).await;
        match w.next().await.unwrap().unwrap() {
            WatchEvent::Update(KvUpdate::Put(_)) => out.push(t0.elapsed()),
            other => panic!("unexpected {other:?}"),
        }
        ack.await.unwrap();
    }
    out
}

async fn latency_raw(store: &Store, js: &jetstream::Context, n: usize) -> Vec<Duration> {
    let mut w = store.watch("lat.>").await.unwrap();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let ack = publish_timed(js, "$KV.bench_lat.lat.k", Bytes::from(i.to_string())).await;
        w.next().await.unwrap().unwrap();
        out.push(t0.elapsed());
        ack.await.unwrap();
    }
    out
}

async fn fill(js: &jetstream::Context, bucket: &str, n: usize, value: &Bytes) {
    let mut acks = Vec::with_capacity(ACK_BATCH);
    for i in 0..n {
        let subject = format!("$KV.{bucket}.cfg.k{i:06}");
        acks.push(js.publish(subject, value.clone()).await.unwrap());
        if acks.len() == ACK_BATCH {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// State-sync through our `watch_all` until `Synced`: (time, updates).
async fn sync_ours(kv: &NatsBucket) -> (Duration, usize) {
    let t0 = Instant::now();
    let mut w = kv.watch_all().await.unwrap();
    let mut n = 0;
    loop {
        match w.next().await.unwrap().unwrap() {
            WatchEvent::Update(_) => n += 1,
            WatchEvent::Synced { .. } => return (t0.elapsed(), n),
        }
    }
}

/// The raw equivalent: last value per key, until the server says nothing is pending.
async fn sync_raw(store: &Store) -> (Duration, usize) {
    let t0 = Instant::now();
    let mut w = store.watch_with_history(">").await.unwrap();
    let mut n = 0;
    while let Some(e) = w.next().await {
        let e = e.unwrap();
        n += 1;
        if e.delta == 0 {
            break;
        }
    }
    (t0.elapsed(), n)
}

async fn resume_ours(kv: &NatsBucket, cursor: VersionToken) -> (Duration, usize, u64) {
    let before = kv.watch_stats().messages;
    let t0 = Instant::now();
    let mut w = kv.watch_all_from(WatchCursor::after(cursor)).await.unwrap();
    let mut n = 0;
    loop {
        match w.next().await.unwrap().unwrap() {
            WatchEvent::Update(_) => n += 1,
            WatchEvent::Synced { .. } => {
                return (t0.elapsed(), n, kv.watch_stats().messages - before);
            }
        }
    }
}

async fn resume_raw(store: &Store, cursor: u64) -> (Duration, usize) {
    let t0 = Instant::now();
    let mut w = store.watch_all_from_revision(cursor + 1).await.unwrap();
    let mut n = 0;
    while let Some(e) = w.next().await {
        n += 1;
        if e.unwrap().delta == 0 {
            break;
        }
    }
    (t0.elapsed(), n)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let server = NatsServer::start_with("", "max_memory_store: 1GB");
    let opts = ConnectOptions {
        request_timeout: Duration::from_secs(10),
        ..ConnectOptions::new(server.url())
    };
    let nats = NatsKv::connect(&opts).await.unwrap();
    let raw_client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(raw_client.clone());
    let writer = jetstream::new(async_nats::connect(server.url()).await.unwrap());

    // 1. put -> watch delivery latency, one key, rounds alternating.
    let lat = nats
        .create_or_open(&BucketConfig::new("bench_lat"))
        .await
        .unwrap();
    let lat_raw = js.get_key_value("bench_lat").await.unwrap();
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..LATENCY_ROUNDS {
        ours.extend(latency_ours(&lat, &writer, LATENCY_PER_ROUND).await);
        raw.extend(latency_raw(&lat_raw, &writer, LATENCY_PER_ROUND).await);
    }
    ours.sort();
    raw.sort();
    let (o50, o99) = (percentile(&ours, 0.5), percentile(&ours, 0.99));
    let (r50, r99) = (percentile(&raw, 0.5), percentile(&raw, 0.99));

    // 2. state-sync of 100k keys of 100 B.
    let sync = nats
        .create_or_open(&BucketConfig::new("bench_sync"))
        .await
        .unwrap();
    let sync_raw_store = js.get_key_value("bench_sync").await.unwrap();
    let value = Bytes::from(vec![b'v'; SYNC_VALUE]);
    let t_fill = Instant::now();
    fill(&writer, "bench_sync", sync_keys(), &value).await;
    let fill_time = t_fill.elapsed();
    let (mut s_ours, mut s_raw) = (Vec::new(), Vec::new());
    let (mut n_ours, mut n_raw) = (0, 0);
    for _ in 0..SYNC_RUNS {
        let (t, n) = sync_ours(&sync).await;
        s_ours.push(t);
        n_ours = n;
        let (t, n) = sync_raw(&sync_raw_store).await;
        s_raw.push(t);
        n_raw = n;
    }
    let (so, sr) = (median(s_ours), median(s_raw));

    // 3. resume after 100 changes on the 100k-key bucket.
    let cursor = sync_raw_store
        .stream
        .clone()
        .get_info()
        .await
        .unwrap()
        .state
        .last_sequence;
    for i in 0..RESUME_CHANGES {
        writer
            .publish(
                format!("$KV.bench_sync.cfg.k{:06}", (i * 997) % sync_keys()),
                Bytes::from("changed"),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let (rt_ours, rn_ours, rmsg_ours) = resume_ours(&sync, VersionToken::from_u64(cursor)).await;
    let (rt_raw, rn_raw) = resume_raw(&sync_raw_store, cursor).await;
    let (full_t, full_n) = sync_ours(&sync).await;

    println!();
    println!(
        "KV layer benchmark ({}, one server, same run)",
        server_version()
    );
    println!("{:-<92}", "");
    println!(
        "{:<44} {:>12} {:>12} {:>8}   goal",
        "measure", "ours", "raw", "ours/raw"
    );
    println!("{:-<92}", "");
    println!(
        "{:<44} {:>12.3} {:>12.3} {:>8.2}   ratio <= 1.2",
        format!("put -> watch p50, ms ({} puts)", ours.len()),
        ms(o50),
        ms(r50),
        ms(o50) / ms(r50)
    );
    println!(
        "{:<44} {:>12.3} {:>12.3} {:>8.2}",
        "put -> watch p99, ms",
        ms(o99),
        ms(r99),
        ms(o99) / ms(r99)
    );
    println!(
        "{:<44} {:>12.3} {:>12.3} {:>8.2}   ratio <= 1.3",
        format!(
            "state-sync {} keys x {} B, s (median of {SYNC_RUNS})",
            sync_keys(),
            SYNC_VALUE
        ),
        so.as_secs_f64(),
        sr.as_secs_f64(),
        so.as_secs_f64() / sr.as_secs_f64()
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "state-sync entries delivered", n_ours, n_raw
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}   100",
        format!("resume after {RESUME_CHANGES} changes: entries delivered"),
        rn_ours,
        rn_raw,
        ""
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "resume: messages sent by the server", rmsg_ours, "-"
    );
    println!(
        "{:<44} {:>12.3} {:>12.3} {:>8.2}",
        "resume: time, ms",
        ms(rt_ours),
        ms(rt_raw),
        ms(rt_ours) / ms(rt_raw)
    );
    println!(
        "{:<44} {:>12} {:>12.3}",
        "full re-list instead: entries / time ms",
        full_n,
        ms(full_t)
    );
    println!("{:-<92}", "");
    println!(
        "setup: {} puts with acks awaited per {ACK_BATCH} in {:.2} s",
        sync_keys(),
        fill_time.as_secs_f64()
    );
}

fn server_version() -> String {
    std::process::Command::new(common::nats::nats_server_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
