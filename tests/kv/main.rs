//! The KV layer against a real nats-server: every trait method, every watch
//! property of DESIGN.md, fault behaviour and the lease.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod connect;
mod faults;
mod lease;
mod rw;
mod watch;

use std::time::Duration;

use bytes::Bytes;
use common::NatsServer;
use futures::StreamExt;
use slipstream::kv::{
    KvUpdate, WatchCursor, WatchEvent, WatchStream,
    nats::{BucketConfig, ConnectOptions, NatsBucket, NatsKv},
};

/// How long a test waits for an event that must come.
pub const EVENT_WAIT: Duration = Duration::from_secs(15);

pub fn options(server: &NatsServer) -> ConnectOptions {
    ConnectOptions {
        request_timeout: Duration::from_secs(2),
        ..ConnectOptions::new(server.url())
    }
}

pub async fn connect(server: &NatsServer) -> NatsKv {
    NatsKv::connect(&options(server)).await.unwrap()
}

pub async fn bucket(server: &NatsServer, name: &str) -> NatsBucket {
    bucket_with(server, BucketConfig::new(name)).await
}

pub async fn bucket_with(server: &NatsServer, config: BucketConfig) -> NatsBucket {
    connect(server).await.create_or_open(&config).await.unwrap()
}

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The next event, or a panic naming what was expected.
pub async fn next(w: &mut WatchStream, what: &str) -> WatchEvent {
    match tokio::time::timeout(EVENT_WAIT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed while waiting for {what}: {e}"),
        Ok(None) => panic!("watch ended while waiting for {what}"),
        Err(_) => panic!("no event within {EVENT_WAIT:?} while waiting for {what}"),
    }
}

pub async fn next_update(w: &mut WatchStream, what: &str) -> KvUpdate {
    match next(w, what).await {
        WatchEvent::Update(u) => u,
        other => panic!("expected an update ({what}), got {other:?}"),
    }
}

/// Updates up to the `Synced` event, and its cursor.
pub async fn until_synced(w: &mut WatchStream) -> (Vec<KvUpdate>, WatchCursor) {
    let mut updates = Vec::new();
    loop {
        match next(w, "Synced").await {
            WatchEvent::Update(u) => updates.push(u),
            WatchEvent::Synced { cursor } => return (updates, cursor),
        }
    }
}

/// Asserts that nothing arrives for `d`.
pub async fn assert_quiet(w: &mut WatchStream, d: Duration) {
    if let Ok(ev) = tokio::time::timeout(d, w.next()).await {
        panic!("expected no event, got {ev:?}");
    }
}

pub fn keys_of(updates: &[KvUpdate]) -> Vec<&str> {
    updates.iter().map(KvUpdate::key).collect()
}

/// Polls `f` until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
