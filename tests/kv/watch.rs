//! Watch properties: state-sync, one consumer for N prefixes, resume deltas,
//! CursorExpired, removals with revisions, Synced when nothing matches.

use std::time::Duration;

use slipstream::kv::{
    KvError, KvPurge, KvReader, KvUpdate, KvWatcher, KvWriter, VersionToken, WatchCursor,
    WatchEvent, nats::BucketConfig,
};

use crate::{
    assert_quiet, b, bucket, bucket_with, common::NatsServer, eventually, keys_of, next,
    next_update, until_synced,
};

fn prefixes(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn watch_all_delivers_current_values_then_synced_then_live_changes() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    kv.put("a", b("old")).await.unwrap();
    let va = kv.put("a", b("new")).await.unwrap();
    kv.put("b", b("1")).await.unwrap();
    kv.put("c", b("1")).await.unwrap();
    kv.delete("c").await.unwrap();

    let mut w = kv.watch_all().await.unwrap();
    let (state, cursor) = until_synced(&mut w).await;
    // Current value of each key once (deleted "c" arrives as its tombstone).
    assert_eq!(keys_of(&state), vec!["a", "b", "c"]);
    assert!(matches!(&state[0], KvUpdate::Put(e) if &e.value[..] == b"new" && e.version == va));
    assert!(state[2].is_removal());
    let last = kv.info().await.unwrap().last_revision.unwrap();
    assert_eq!(cursor, WatchCursor::after(last));

    let vd = kv.put("d", b("live")).await.unwrap();
    assert!(matches!(next_update(&mut w, "live put").await, KvUpdate::Put(e) if e.version == vd));
}

#[tokio::test]
async fn watch_prefix_delivers_only_keys_with_that_string_prefix() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    for k in ["web", "web.a", "webapp.x", "api.web", "shared.tz"] {
        kv.put(k, b(k)).await.unwrap();
    }
    let mut w = kv.watch_prefix("web").await.unwrap();
    let (state, _) = until_synced(&mut w).await;
    assert_eq!(keys_of(&state), vec!["web", "web.a", "webapp.x"]);

    let mut dotted = kv.watch_prefix("web.").await.unwrap();
    let (state, _) = until_synced(&mut dotted).await;
    assert_eq!(keys_of(&state), vec!["web.a"]);
    kv.put("api.x", b("x")).await.unwrap();
    kv.put("web.b", b("b")).await.unwrap();
    assert_eq!(next_update(&mut dotted, "web.b").await.key(), "web.b");
}

#[tokio::test]
async fn n_prefixes_are_served_by_one_server_consumer() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    for k in ["web.a", "shared.tz", "api.x", "db.host"] {
        kv.put(k, b(k)).await.unwrap();
    }
    assert_eq!(kv.consumer_count().await.unwrap(), 0);
    let mut w = kv
        .watch_prefixes(&prefixes(&["web.", "shared.", "db."]))
        .await
        .unwrap();
    let (state, _) = until_synced(&mut w).await;
    assert_eq!(keys_of(&state), vec!["web.a", "shared.tz", "db.host"]);
    assert_eq!(kv.consumer_count().await.unwrap(), 1);
    kv.put("shared.lang", b("en")).await.unwrap();
    kv.put("api.y", b("y")).await.unwrap();
    kv.put("web.b", b("b")).await.unwrap();
    assert_eq!(
        next_update(&mut w, "shared.lang").await.key(),
        "shared.lang"
    );
    assert_eq!(next_update(&mut w, "web.b").await.key(), "web.b");
    assert_eq!(kv.consumer_count().await.unwrap(), 1);

    drop(w);
    assert!(
        eventually(Duration::from_secs(5), || async {
            kv.consumer_count().await.unwrap() == 0
        })
        .await,
        "a dropped watch deletes its consumer"
    );
}

#[tokio::test]
async fn synced_arrives_when_the_bucket_is_empty_or_nothing_matches() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    let mut empty = kv.watch_all().await.unwrap();
    assert_eq!(
        next(&mut empty, "Synced on empty bucket").await,
        WatchEvent::Synced {
            cursor: WatchCursor::after(VersionToken::from_u64(0))
        }
    );
    kv.put("api.x", b("x")).await.unwrap();
    kv.put("api.y", b("y")).await.unwrap();
    // "api" keys exist but none matches: the consumer's pending count says so.
    let mut none = kv
        .watch_prefixes(&prefixes(&["web.", "db."]))
        .await
        .unwrap();
    let (state, cursor) = until_synced(&mut none).await;
    assert!(state.is_empty());
    assert_eq!(cursor, WatchCursor::after(VersionToken::from_u64(2)));
    // Partial-token prefix: the server filter covers all keys, the client none.
    let mut partial = kv.watch_prefix("ap").await.unwrap();
    assert_eq!(until_synced(&mut partial).await.0.len(), 2);
    let mut miss = kv.watch_prefix("zz").await.unwrap();
    assert!(until_synced(&mut miss).await.0.is_empty());
    // A resume from the head is synced at once too.
    let mut head = kv.watch_all_from(cursor).await.unwrap();
    let (delta, c2) = until_synced(&mut head).await;
    assert!(delta.is_empty());
    assert_eq!(c2, cursor);
}

#[tokio::test]
async fn watch_from_a_cursor_delivers_only_the_delta() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    for i in 0..20 {
        kv.put(&format!("web.k{i}"), b("1")).await.unwrap();
        kv.put(&format!("api.k{i}"), b("1")).await.unwrap();
    }
    let mut w = kv.watch_prefix("web.").await.unwrap();
    let (_, cursor) = until_synced(&mut w).await;
    drop(w);

    let v1 = kv.put("web.k3", b("2")).await.unwrap();
    kv.put("api.k3", b("2")).await.unwrap();
    let v2 = kv.delete("web.k4").await.unwrap();

    let before = kv.watch_stats();
    let mut r = kv.watch_prefix_from("web.", cursor).await.unwrap();
    let (delta, c2) = until_synced(&mut r).await;
    assert_eq!(
        delta,
        vec![
            KvUpdate::Put(slipstream::kv::KvEntry {
                key: "web.k3".into(),
                value: b("2"),
                version: v1,
                published: None,
            }),
            KvUpdate::Delete {
                key: "web.k4".into(),
                version: v2
            },
        ]
    );
    assert_eq!(c2, WatchCursor::after(v2));
    // Counted at the source: the server sent the 2 newer web.* messages
    // only, not the 40-key state (api.* is filtered on the server).
    assert_eq!(kv.watch_stats().messages - before.messages, 2);
}

#[tokio::test]
async fn watch_from_a_cursor_with_n_prefixes_delivers_only_their_delta() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    for p in ["web", "shared", "api"] {
        for i in 0..10 {
            kv.put(&format!("{p}.k{i}"), b("1")).await.unwrap();
        }
    }
    let cursor = WatchCursor::after(kv.info().await.unwrap().last_revision.unwrap());
    kv.put("web.k1", b("2")).await.unwrap();
    kv.put("api.k1", b("2")).await.unwrap();
    kv.put("shared.k2", b("2")).await.unwrap();
    kv.purge("web.k5").await.unwrap();

    let before = kv.watch_stats();
    let mut w = kv
        .watch_prefixes_from(&prefixes(&["web.", "shared."]), cursor)
        .await
        .unwrap();
    let (delta, _) = until_synced(&mut w).await;
    assert_eq!(keys_of(&delta), vec!["web.k1", "shared.k2", "web.k5"]);
    assert!(matches!(delta[2], KvUpdate::Purge { .. }));
    assert_eq!(kv.consumer_count().await.unwrap(), 1);
    // Two subject filters: the api.* write never left the server.
    assert_eq!(kv.watch_stats().messages - before.messages, 3);
    kv.put("shared.k9", b("3")).await.unwrap();
    assert_eq!(next_update(&mut w, "live").await.key(), "shared.k9");
}

#[tokio::test]
async fn a_cursor_older_than_the_first_retained_revision_is_cursor_expired() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await; // history 1
    let v1 = kv.put("a", b("1")).await.unwrap();
    let v2 = kv.put("b", b("1")).await.unwrap();
    kv.put("a", b("2")).await.unwrap(); // drops revision 1
    kv.put("b", b("2")).await.unwrap(); // drops revision 2: first retained is 3
    assert_eq!(
        kv.info().await.unwrap().first_revision,
        Some(VersionToken::from_u64(3))
    );
    match kv.watch_all_from(WatchCursor::after(v1)).await {
        Err(KvError::CursorExpired {
            cursor,
            first_retained,
        }) => {
            assert_eq!(cursor, v1);
            assert_eq!(first_retained, VersionToken::from_u64(3));
        }
        Err(e) => panic!("expected CursorExpired, got {e}"),
        Ok(_) => panic!("expected CursorExpired, got a watch"),
    }
    // cursor == first - 1: nothing was lost.
    let mut w = kv.watch_all_from(WatchCursor::after(v2)).await.unwrap();
    let (delta, _) = until_synced(&mut w).await;
    assert_eq!(keys_of(&delta), vec!["a", "b"]);
    // A cursor ahead of the stream (bucket recreated) must resync as well.
    assert!(matches!(
        kv.watch_all_from(WatchCursor::after(VersionToken::from_u64(1000)))
            .await,
        Err(KvError::CursorExpired { .. })
    ));
}

#[tokio::test]
async fn deletes_and_purges_arrive_with_their_revisions() {
    let server = NatsServer::start();
    let mut config = BucketConfig::new("app");
    config.history = 5;
    let kv = bucket_with(&server, config).await;
    kv.put("k1", b("1")).await.unwrap();
    let vk2 = kv.put("k2", b("1")).await.unwrap();
    let mut w = kv.watch_all().await.unwrap();
    until_synced(&mut w).await;
    let d = kv.delete("k1").await.unwrap();
    let p = kv.purge("k2").await.unwrap();
    let c = kv.put("k3", b("x")).await.unwrap();
    let cd = kv.delete_with_version("k3", c).await.unwrap();
    assert_eq!(
        next_update(&mut w, "delete").await,
        KvUpdate::Delete {
            key: "k1".into(),
            version: d
        }
    );
    assert_eq!(
        next_update(&mut w, "purge").await,
        KvUpdate::Purge {
            key: "k2".into(),
            version: p
        }
    );
    assert!(p > vk2);
    next_update(&mut w, "put k3").await;
    assert_eq!(
        next_update(&mut w, "cas delete").await,
        KvUpdate::Delete {
            key: "k3".into(),
            version: cd
        }
    );
    assert_quiet(&mut w, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_watch_never_yields_a_revision_twice_or_out_of_order() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    for i in 0..50 {
        kv.put(&format!("k{}", i % 7), b(&i.to_string()))
            .await
            .unwrap();
    }
    let mut w = kv.watch_all().await.unwrap();
    let writer = {
        let kv = kv.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                kv.put(&format!("k{}", i % 7), b(&i.to_string()))
                    .await
                    .unwrap();
            }
        })
    };
    let (state, _) = until_synced(&mut w).await;
    writer.await.unwrap();
    let last = kv.info().await.unwrap().last_revision.unwrap();
    let mut all = state;
    while all.last().map(KvUpdate::version) != Some(last) {
        all.push(next_update(&mut w, "live").await);
    }
    assert!(all.windows(2).all(|p| p[0].version() < p[1].version()));
    assert_eq!(kv.watch_stats().redeliveries_skipped, 0);
}

#[tokio::test]
async fn deleting_the_bucket_ends_its_watches_with_bucket_not_found() {
    let server = NatsServer::start();
    let nats = crate::connect(&server).await;
    let kv = nats
        .create_or_open(&BucketConfig::new("gone"))
        .await
        .unwrap();
    kv.put("k", b("v")).await.unwrap();
    let mut w = kv.watch_all().await.unwrap();
    until_synced(&mut w).await;
    nats.delete_bucket("gone").await.unwrap();
    match tokio::time::timeout(crate::EVENT_WAIT, futures::StreamExt::next(&mut w)).await {
        Ok(Some(Err(e))) => assert_eq!(e.reason(), "BucketNotFound", "{e}"),
        other => panic!("expected BucketNotFound, got {other:?}"),
    }
    assert_eq!(kv.info().await.unwrap_err().reason(), "BucketNotFound");
}

#[tokio::test]
async fn a_bucket_created_again_is_a_new_incarnation_and_old_watches_never_read_it() {
    let server = NatsServer::start();
    let nats = crate::connect(&server).await;
    let kv = nats
        .create_or_open(&BucketConfig::new("again"))
        .await
        .unwrap();
    let first = kv
        .incarnation()
        .expect("NATS buckets know their incarnation");
    kv.put("k", b("old")).await.unwrap();
    let mut w = kv.watch_all().await.unwrap();
    until_synced(&mut w).await;
    nats.delete_bucket("again").await.unwrap();
    let again = nats
        .create_or_open(&BucketConfig::new("again"))
        .await
        .unwrap();
    for i in 0..10 {
        again.put(&format!("n{i}"), b("new")).await.unwrap();
    }
    assert_ne!(again.incarnation(), Some(first));
    assert_eq!(kv.incarnation(), Some(first), "a handle keeps its own");
    // revision 2.. of the new bucket must not pass for what follows revision 1
    match tokio::time::timeout(crate::EVENT_WAIT, futures::StreamExt::next(&mut w)).await {
        Ok(Some(Err(e))) => assert!(
            ["BucketNotFound", "CursorExpired"].contains(&e.reason()),
            "{e}"
        ),
        other => panic!("expected the old watch to end, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_deliveries_carry_when_nats_stored_them_not_when_they_arrived() {
    let server = NatsServer::start();
    let kv = bucket(&server, "stamped").await;
    let before = std::time::SystemTime::now();
    kv.put("k", b("v")).await.unwrap();
    let after = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut w = kv.watch_all().await.unwrap();
    let (updates, _) = until_synced(&mut w).await;
    let KvUpdate::Put(e) = &updates[0] else {
        panic!("expected a put, got {updates:?}")
    };
    let published = e.published.expect("watch deliveries are stamped");
    // the server's clock is this machine's; allow for its rounding
    let slack = Duration::from_millis(50);
    assert!(
        published + slack >= before && published <= after + slack,
        "stored between {before:?} and {after:?}, stamped {published:?}"
    );
    assert_eq!(
        kv.get("k").await.unwrap().unwrap(),
        *e,
        "equality ignores the stamp"
    );
}

#[tokio::test]
async fn changes_between_reads_the_delta_of_some_prefixes_in_order_without_a_consumer() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    kv.put("web.a", b("1")).await.unwrap();
    kv.put("api.x", b("1")).await.unwrap();
    let after = kv.put("web.b", b("1")).await.unwrap();
    let v1 = kv.put("api.y", b("2")).await.unwrap();
    kv.put("db.z", b("other prefix")).await.unwrap();
    let v2 = kv.delete("web.a").await.unwrap();
    let v3 = kv.put("web.b", b("2")).await.unwrap();
    let upto = kv.put("api.x", b("3")).await.unwrap();
    // after the bound: left for the live watch
    kv.put("web.c", b("late")).await.unwrap();
    let before = kv.watch_stats().consumers_created;

    let got = kv
        .changes_between(&prefixes(&["web.", "api.y"]), after, upto, 64)
        .await
        .unwrap()
        .expect("few records: read directly");
    let seen: Vec<(String, VersionToken, bool)> = got
        .iter()
        .map(|u| (u.key().to_owned(), u.version(), u.is_removal()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("api.y".to_owned(), v1, false),
            ("web.a".to_owned(), v2, true),
            ("web.b".to_owned(), v3, false),
        ],
        "only the prefixes' records in (after, upto], in revision order, tombstones included"
    );
    assert_eq!(kv.watch_stats().consumers_created, before, "no consumer");

    // nothing changed after the bound: an empty delta, not a fallback
    let none = kv
        .changes_between(&prefixes(&["web."]), upto, upto, 64)
        .await;
    assert_eq!(none.unwrap(), Some(Vec::new()));
    // more records than allowed: the caller watches instead
    let all = prefixes(&[""]);
    let many = kv.changes_between(&all, VersionToken::from_u64(0), upto, 3);
    assert_eq!(many.await.unwrap(), None);
}
