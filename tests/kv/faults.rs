//! Faults: a hung server gives timeouts, a killed and restarted server keeps
//! watches going with no update lost or repeated, resume reads only the delta.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use slipstream::kv::{
    KvError, KvReader, KvUpdate, KvWatcher, KvWriter, WatchEvent, WatchStream,
    nats::{BucketConfig, NatsBucket},
};

use crate::{b, bucket_with, common::NatsServer, connect, next, next_update, until_synced};

const HANG_LIMIT: Duration = Duration::from_secs(20);

async fn must_time_out<T: std::fmt::Debug>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, KvError>>,
) {
    match tokio::time::timeout(HANG_LIMIT, fut).await {
        Err(_) => panic!("{what} hung against a stopped server"),
        Ok(Ok(v)) => panic!("{what} succeeded against a stopped server: {v:?}"),
        Ok(Err(e)) => assert_eq!(e.reason(), "Timeout", "{what}: {e}"),
    }
}

#[tokio::test]
async fn calls_against_a_sigstopped_server_time_out_instead_of_hanging() {
    let mut server = NatsServer::start();
    let nats = connect(&server).await;
    let kv = nats
        .create_or_open(&BucketConfig::new("app"))
        .await
        .unwrap();
    let v = kv.put("k", b("v")).await.unwrap();

    server.pause();
    must_time_out("put", kv.put("k", b("w"))).await;
    must_time_out("get", kv.get("k")).await;
    must_time_out("update", kv.update("k", b("w"), v)).await;
    must_time_out("keys", kv.keys("")).await;
    must_time_out("info", kv.info()).await;
    must_time_out("watch", async { kv.watch_all().await.map(|_| ()) }).await;
    must_time_out("open", async { nats.open("app").await.map(|_| ()) }).await;

    server.resume();
    let ok = crate::eventually(Duration::from_secs(15), || async {
        kv.get("k").await.is_ok()
    })
    .await;
    assert!(ok, "calls work again after SIGCONT");
}

/// Puts with retries while the server comes back; returns the revisions
/// the server acknowledged.
async fn put_retrying(kv: &NatsBucket, key: &str, value: Bytes) {
    for _ in 0..100 {
        match kv.put(key, value.clone()).await {
            Ok(_) => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("put {key} never succeeded after the restart");
}

/// Reads updates until the watch has seen `want` (key -> value) as its
/// latest state; returns every update read.
async fn read_until_state(
    w: &mut WatchStream,
    state: &mut BTreeMap<String, Bytes>,
    want: &BTreeMap<String, Bytes>,
) -> Vec<KvUpdate> {
    let mut seen = Vec::new();
    while state != want {
        match next(w, "updates after the restart").await {
            WatchEvent::Update(u) => {
                if let KvUpdate::Put(e) = &u {
                    state.insert(e.key.clone(), e.value.clone());
                } else {
                    state.remove(u.key());
                }
                seen.push(u);
            }
            WatchEvent::Synced { .. } => panic!("Synced twice"),
        }
    }
    seen
}

#[tokio::test]
async fn a_watch_survives_kill_9_and_restart_with_no_update_lost_or_repeated() {
    let mut server = NatsServer::start();
    let kv = bucket_with(&server, BucketConfig::new("app")).await;
    let mut want = BTreeMap::new();
    for i in 0..30 {
        let (k, v) = (format!("k{i}"), b(&format!("v{i}")));
        kv.put(&k, v.clone()).await.unwrap();
        want.insert(k, v);
    }
    let mut w = kv.watch_all().await.unwrap();
    let (initial, _) = until_synced(&mut w).await;
    let mut state: BTreeMap<String, Bytes> = initial
        .iter()
        .filter_map(|u| match u {
            KvUpdate::Put(e) => Some((e.key.clone(), e.value.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(state, want);
    let mut versions: Vec<_> = initial.iter().map(KvUpdate::version).collect();

    // Live updates, then the server dies mid-stream.
    for i in 0..10 {
        let (k, v) = (format!("k{i}"), b("before-kill"));
        kv.put(&k, v.clone()).await.unwrap();
        want.insert(k, v);
    }
    let seen = read_until_state(&mut w, &mut state, &want).await;
    versions.extend(seen.iter().map(KvUpdate::version));
    let messages_before = kv.watch_stats().messages;
    let last_before = kv.info().await.unwrap().last_revision.unwrap();

    server.kill();
    server.restart();

    for i in 5..25 {
        let (k, v) = (format!("k{i}"), b("after-restart"));
        put_retrying(&kv, &k, v.clone()).await;
        want.insert(k, v);
    }
    kv.delete("k29").await.unwrap();
    want.remove("k29");
    let seen = read_until_state(&mut w, &mut state, &want).await;
    versions.extend(seen.iter().map(KvUpdate::version));

    // Strictly increasing revisions: nothing repeated, nothing reordered.
    assert!(versions.windows(2).all(|p| p[0] < p[1]), "{versions:?}");
    // Every message the server stored after the kill was delivered once,
    // and nothing older (the recreated consumer started after the position).
    let last_after = kv.info().await.unwrap().last_revision.unwrap();
    let written_after = last_after.as_u64().unwrap() - last_before.as_u64().unwrap();
    assert_eq!(kv.watch_stats().messages - messages_before, written_after);
    let stats = kv.watch_stats();
    assert_eq!(stats.redeliveries_skipped, 0);
    assert!(
        stats.consumers_created >= 2,
        "the consumer was recreated: {stats:?}"
    );
    assert_eq!(kv.consumer_count().await.unwrap(), 1);
}

#[tokio::test]
async fn resume_after_a_server_restart_delivers_only_the_delta_counted_at_the_source() {
    let mut server = NatsServer::start();
    let kv = bucket_with(&server, BucketConfig::new("app")).await;
    for i in 0..500 {
        kv.put(&format!("web.k{i}"), b("1")).await.unwrap();
    }
    let mut w = kv.watch_prefix("web.").await.unwrap();
    let (state, cursor) = until_synced(&mut w).await;
    assert_eq!(state.len(), 500);
    drop(w);
    drop(kv);

    server.kill();
    server.restart();

    // A fresh client (as after an operator restart) writes the delta.
    let kv = connect(&server).await.open("app").await.unwrap();
    for i in 0..7 {
        kv.put(&format!("web.k{i}"), b("2")).await.unwrap();
    }
    kv.delete("web.k100").await.unwrap();

    let mut r = kv.watch_prefix_from("web.", cursor).await.unwrap();
    let (delta, _) = until_synced(&mut r).await;
    assert_eq!(delta.len(), 8);
    assert!(delta[7].is_removal());
    // 8 messages left the server, not the 500-key state.
    assert_eq!(kv.watch_stats().messages, 8);
    kv.put("web.live", b("x")).await.unwrap();
    assert_eq!(next_update(&mut r, "live").await.key(), "web.live");
}

#[tokio::test]
async fn a_lost_consumer_is_recreated_and_redelivered_history_is_not_passed_on() {
    let server = NatsServer::start();
    let kv = bucket_with(&server, BucketConfig::new("app")).await;
    // Large enough that the server stalls on flow control while unread.
    let value = Bytes::from(vec![b'x'; 16 * 1024]);
    let n = 1500;
    for i in 0..n {
        kv.put(&format!("k{i:05}"), value.clone()).await.unwrap();
    }
    let mut w = kv.watch_all().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(next_update(&mut w, "first updates").await);
    }
    // Delete the consumer behind the watch's back, mid state-sync.
    let nats = connect(&server).await;
    let js = async_nats::jetstream::new(nats.client().clone());
    let stream = js.get_stream("KV_app").await.unwrap();
    let names: Vec<String> = stream
        .consumer_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(names.len(), 1);
    stream.delete_consumer(&names[0]).await.unwrap();

    let (rest, _) = until_synced(&mut w).await;
    got.extend(rest);
    let keys: Vec<&str> = got.iter().map(KvUpdate::key).collect();
    let expected: Vec<String> = (0..n).map(|i| format!("k{i:05}")).collect();
    assert_eq!(
        keys,
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(got.windows(2).all(|p| p[0].version() < p[1].version()));
    let stats = kv.watch_stats();
    assert!(stats.consumers_created >= 2, "{stats:?}");
    assert!(stats.redeliveries_skipped > 0, "{stats:?}");
}

#[tokio::test]
async fn a_watch_recovers_after_the_server_was_frozen_past_its_heartbeats() {
    let mut server = NatsServer::start();
    let kv = bucket_with(&server, BucketConfig::new("app")).await;
    let mut w = kv.watch_all().await.unwrap();
    until_synced(&mut w).await;
    // Read the watch all the time, as the operator does.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(ev) = w.next().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    let v1 = kv.put("k", b("1")).await.unwrap();
    assert_eq!(recv(&mut rx).await.version(), v1);

    // Frozen longer than the missed-heartbeat limit: the watch starts
    // recreating its consumer, each attempt timing out, until SIGCONT.
    server.pause();
    tokio::time::sleep(Duration::from_secs(7)).await;
    server.resume();

    put_retrying(&kv, "k", b("2")).await;
    let u = recv(&mut rx).await;
    assert!(
        matches!(&u, KvUpdate::Put(e) if &e.value[..] == b"2"),
        "{u:?}"
    );
    assert!(u.version() > v1);
    let stats = kv.watch_stats();
    assert!(stats.consumers_created >= 2, "{stats:?}");
    assert_eq!(stats.redeliveries_skipped, 0);
    reader.abort();
}

async fn recv(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<WatchEvent, KvError>>,
) -> KvUpdate {
    match tokio::time::timeout(crate::EVENT_WAIT, rx.recv()).await {
        Ok(Some(Ok(WatchEvent::Update(u)))) => u,
        other => panic!("expected an update, got {other:?}"),
    }
}
