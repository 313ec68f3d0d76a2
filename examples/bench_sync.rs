//! `slipstream sync` benchmark: KV put -> file visible in the synced
//! directory, next to the put -> watch floor of the KV layer, in one run
//! against one nats-server it starts itself. Prints a table; asserts nothing.
//!
//! `cargo run --release --example bench_sync`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{NatsServer, percentile};
use futures::StreamExt;
use slipstream::{
    cmd::sync::{SyncConfig, run},
    crd::KeyPolicy,
    kv::{
        KvWatcher, KvWriter, WatchEvent,
        nats::{BucketConfig, ConnectOptions, NatsBucket, NatsKv},
    },
};

const ROUNDS: usize = 200;
const VALUE_BYTES: usize = 100;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "| {name:<44} | {:>8.2} | {:>8.2} | {:>8.2} |",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap())
    );
}

fn value(round: usize) -> Bytes {
    let mut v = format!("{round:08}").into_bytes();
    v.resize(VALUE_BYTES, b'.');
    Bytes::from(v)
}

/// put -> the KV layer's own watch delivers it: the floor.
async fn floor(bucket: &NatsBucket) -> Vec<Duration> {
    let mut w = bucket.watch_prefix("floor.").await.unwrap();
    while !matches!(w.next().await.unwrap().unwrap(), WatchEvent::Synced { .. }) {}
    let mut out = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let t = Instant::now();
        bucket.put("floor.k", value(i)).await.unwrap();
        while !matches!(w.next().await.unwrap().unwrap(), WatchEvent::Update(_)) {}
        out.push(t.elapsed());
    }
    out
}

/// put -> the new value is readable at DIR/k0000 (polled every 50 µs).
async fn to_file(
    bucket: &NatsBucket,
    keys: usize,
    coalesce: Duration,
    fsync: bool,
) -> Vec<Duration> {
    let prefix = format!("s{keys}c{}f{}.", coalesce.as_millis(), u8::from(fsync));
    for k in 0..keys {
        bucket
            .put(&format!("{prefix}k{k:04}"), value(0))
            .await
            .unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let config = SyncConfig {
        bucket: bucket.name().to_owned(),
        prefixes: vec![prefix.clone()],
        strip_prefix: true,
        key_policy: KeyPolicy::Escape,
        dir: dir.clone(),
        coalesce,
        fsync,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = bucket.clone();
    let task = tokio::spawn(async move {
        run(&watcher, config, false, async {
            let _ = stopped.await;
        })
        .await
    });
    let file = dir.join("k0000");
    wait_for(&file, &value(0)).await;
    let mut out = Vec::with_capacity(ROUNDS);
    for i in 1..=ROUNDS {
        let t = Instant::now();
        bucket
            .put(&format!("{prefix}k0000"), value(i))
            .await
            .unwrap();
        wait_for(&file, &value(i)).await;
        out.push(t.elapsed());
    }
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    out
}

async fn wait_for(file: &Path, want: &[u8]) {
    loop {
        if std::fs::read(file).is_ok_and(|got| got == want) {
            return;
        }
        tokio::time::sleep(Duration::from_micros(50)).await;
    }
}

#[tokio::main]
async fn main() {
    let server = NatsServer::start();
    let kv = NatsKv::connect(&ConnectOptions::new(server.url()))
        .await
        .unwrap();
    let bucket = kv
        .create_or_open(&BucketConfig::new("bench"))
        .await
        .unwrap();

    println!(
        "slipstream sync: KV put -> file readable in the synced directory ({ROUNDS} sequential puts of {VALUE_BYTES} B each)"
    );
    println!(
        "| {:<44} | {:>8} | {:>8} | {:>8} |",
        "path", "p50 ms", "p99 ms", "max ms"
    );
    println!("|{:-<46}|{:->10}|{:->10}|{:->10}|", "", "", "", "");
    row(
        "floor: put -> KV layer watch delivery",
        floor(&bucket).await,
    );
    for (keys, coalesce, fsync) in [
        (10, 0, false),
        (1000, 0, false),
        (10, 50, false),
        (10, 0, true),
    ] {
        let samples = to_file(&bucket, keys, Duration::from_millis(coalesce), fsync).await;
        let durable = if fsync { ", --fsync" } else { "" };
        row(
            &format!("sync, {keys} files, coalesce {coalesce} ms{durable}"),
            samples,
        );
    }
    println!(
        "Each write is a new version of every file and one rename (kubelet layout), so cost grows with the file count; --fsync adds an fsync per file."
    );
}
