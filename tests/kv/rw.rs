//! Reads and writes: KvReader, KvWriter, KvTtl, KvPurge, bucket management.

use std::time::Duration;

use slipstream::kv::{
    KvError, KvPurge, KvReader, KvTtl, KvUpdate, KvWatcher, KvWriter, VersionToken,
    nats::{BucketConfig, Storage},
};

use crate::{b, bucket, bucket_with, common::NatsServer, connect, next_update};

#[tokio::test]
async fn put_then_get_returns_the_value_with_increasing_versions() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    let v1 = kv.put("web.port", b("80")).await.unwrap();
    let v2 = kv.put("web.port", b("8080")).await.unwrap();
    assert!(v2 > v1);
    let e = kv.get("web.port").await.unwrap().unwrap();
    assert_eq!(
        (e.key.as_str(), &e.value[..], e.version),
        ("web.port", &b"8080"[..], v2)
    );
    assert_eq!(kv.get("missing").await.unwrap(), None);
    assert_eq!(kv.entry("missing").await.unwrap(), None);
}

#[tokio::test]
async fn create_refuses_a_live_key_and_succeeds_over_a_tombstone() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    let v1 = kv.create("k", b("1")).await.unwrap();
    assert!(matches!(
        kv.create("k", b("2")).await,
        Err(KvError::AlreadyExists(k)) if k == "k"
    ));
    let del = kv.delete("k").await.unwrap();
    assert!(del > v1);
    let v3 = kv.create("k", b("3")).await.unwrap();
    assert!(v3 > del);
    assert_eq!(&kv.get("k").await.unwrap().unwrap().value[..], b"3");
    kv.purge("k").await.unwrap();
    kv.create("k", b("4")).await.unwrap();
    assert_eq!(&kv.get("k").await.unwrap().unwrap().value[..], b"4");
}

#[tokio::test]
async fn update_is_compare_and_swap_on_the_latest_version() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    let v1 = kv.put("k", b("1")).await.unwrap();
    let v2 = kv.update("k", b("2"), v1).await.unwrap();
    assert!(matches!(
        kv.update("k", b("stale"), v1).await,
        Err(KvError::RevisionMismatch { key }) if key == "k"
    ));
    assert_eq!(kv.get("k").await.unwrap().unwrap().version, v2);
    // A version that is not a NATS revision can never match.
    let opaque = VersionToken::from_bytes(&[1; 10]).unwrap();
    assert!(matches!(
        kv.update("k", b("x"), opaque).await,
        Err(KvError::RevisionMismatch { .. })
    ));
}

#[tokio::test]
async fn cas_delete_writes_a_tombstone_that_concurrent_cas_writers_conflict_with() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    let v1 = kv.put("k", b("1")).await.unwrap();
    let v2 = kv.put("k", b("2")).await.unwrap();
    assert!(matches!(
        kv.delete_with_version("k", v1).await,
        Err(KvError::RevisionMismatch { .. })
    ));
    let tomb = kv.delete_with_version("k", v2).await.unwrap();
    // The writer that read v2 loses against the tombstone.
    assert!(matches!(
        kv.update("k", b("late"), v2).await,
        Err(KvError::RevisionMismatch { .. })
    ));
    assert_eq!(
        kv.entry("k").await.unwrap(),
        Some(KvUpdate::Delete {
            key: "k".into(),
            version: tomb
        })
    );
}

#[tokio::test]
async fn tombstones_are_visible_through_entry_and_hidden_by_get_scan_and_keys() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    kv.put("web.a", b("a")).await.unwrap();
    kv.put("web.b", b("b")).await.unwrap();
    let vc = kv.put("web.c", b("c")).await.unwrap();
    kv.put("web.d", b("d")).await.unwrap();
    let del = kv.delete("web.b").await.unwrap();
    let pur = kv.purge("web.d").await.unwrap();
    let cas = kv.delete_with_version("web.c", vc).await.unwrap();

    assert_eq!(
        kv.entry("web.b").await.unwrap(),
        Some(KvUpdate::Delete {
            key: "web.b".into(),
            version: del
        })
    );
    assert_eq!(
        kv.entry("web.d").await.unwrap(),
        Some(KvUpdate::Purge {
            key: "web.d".into(),
            version: pur
        })
    );
    assert_eq!(
        kv.entry("web.c").await.unwrap(),
        Some(KvUpdate::Delete {
            key: "web.c".into(),
            version: cas
        })
    );
    for k in ["web.b", "web.c", "web.d"] {
        assert_eq!(kv.get(k).await.unwrap(), None, "{k}");
    }
    assert_eq!(kv.keys("web.").await.unwrap(), vec!["web.a"]);
    let scan = kv.scan("").await.unwrap();
    assert_eq!(scan.len(), 1);
    assert_eq!(scan[0].key, "web.a");
}

#[tokio::test]
async fn keys_and_scan_match_plain_string_prefixes_in_key_order() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    for k in ["webapp.x", "web.b", "web.a", "web", "api.web", "shared.tz"] {
        kv.put(k, b(k)).await.unwrap();
    }
    assert_eq!(
        kv.keys("web").await.unwrap(),
        vec!["web", "web.a", "web.b", "webapp.x"]
    );
    assert_eq!(kv.keys("web.").await.unwrap(), vec!["web.a", "web.b"]);
    assert_eq!(kv.keys("nothing.").await.unwrap(), Vec::<String>::new());
    let scan = kv.scan("shared.").await.unwrap();
    assert_eq!(scan.len(), 1);
    assert_eq!(&scan[0].value[..], b"shared.tz");
    assert_eq!(kv.scan("").await.unwrap().len(), 6);
}

#[tokio::test]
async fn purge_reclaims_the_history_of_a_key() {
    let server = NatsServer::start();
    let mut config = BucketConfig::new("app");
    config.history = 10;
    let kv = bucket_with(&server, config).await;
    for i in 0..5 {
        kv.put("k", b(&i.to_string())).await.unwrap();
    }
    kv.put("other", b("x")).await.unwrap();
    let nats = connect(&server).await;
    let js = async_nats::jetstream::new(nats.client().clone());
    let messages = |js: async_nats::jetstream::Context| async move {
        js.get_stream("KV_app")
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap()
            .state
            .messages
    };
    assert_eq!(messages(js.clone()).await, 6);
    let pur = kv.purge("k").await.unwrap();
    // Only the purge marker of "k" and "other" remain.
    assert_eq!(messages(js).await, 2);
    assert_eq!(
        kv.entry("k").await.unwrap(),
        Some(KvUpdate::Purge {
            key: "k".into(),
            version: pur
        })
    );
}

#[tokio::test]
async fn put_with_ttl_expires_and_the_expiry_is_watched_as_a_purge() {
    let server = NatsServer::start();
    let mut config = BucketConfig::new("ttl");
    config.limit_markers = Some(Duration::from_secs(60));
    let kv = bucket_with(&server, config).await;
    let mut w = kv.watch_prefix("s.").await.unwrap();
    crate::until_synced(&mut w).await;
    let put = kv
        .put_with_ttl("s.token", b("t"), Duration::from_secs(1))
        .await
        .unwrap();
    kv.put("s.keep", b("k")).await.unwrap();
    assert!(matches!(next_update(&mut w, "put").await, KvUpdate::Put(e) if e.version == put));
    next_update(&mut w, "keep").await;
    match next_update(&mut w, "expiry").await {
        KvUpdate::Purge { key, version } => {
            assert_eq!(key, "s.token");
            assert!(version > put);
        }
        other => panic!("expected the expiry as Purge, got {other:?}"),
    }
    assert_eq!(kv.get("s.token").await.unwrap(), None);
    assert!(matches!(
        kv.entry("s.token").await.unwrap(),
        Some(KvUpdate::Purge { .. })
    ));
    assert!(kv.get("s.keep").await.unwrap().is_some());
}

#[tokio::test]
async fn put_with_ttl_on_a_bucket_without_limit_markers_fails_with_a_hint() {
    let server = NatsServer::start();
    let kv = bucket(&server, "plain").await;
    let err = kv
        .put_with_ttl("k", b("v"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "OperationFailed", "{err}");
    assert!(err.to_string().contains("limit_markers"), "{err}");
    let err = kv
        .put_with_ttl("k", b("v"), Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "OperationFailed");
}

#[tokio::test]
async fn invalid_keys_and_prefixes_are_refused_before_any_call() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    for key in ["", ".a", "a.", "a b", "a*", "a..b"] {
        assert_eq!(
            kv.put(key, b("v")).await.unwrap_err().reason(),
            "InvalidKey",
            "{key:?}"
        );
        assert_eq!(kv.get(key).await.unwrap_err().reason(), "InvalidKey");
    }
    assert_eq!(kv.keys("a b").await.unwrap_err().reason(), "InvalidKey");
    assert_eq!(
        kv.watch_prefix(".x").await.err().map(|e| e.reason()),
        Some("InvalidKey")
    );
}

#[tokio::test]
async fn buckets_are_opened_created_and_deleted() {
    let server = NatsServer::start();
    let nats = connect(&server).await;
    assert!(matches!(nats.open("nope").await, Err(KvError::BucketNotFound(b)) if b == "nope"));
    let mut config = BucketConfig::new("mem");
    config.storage = Storage::Memory;
    config.history = 5;
    let kv = nats.create_or_open(&config).await.unwrap();
    kv.put("k", b("v")).await.unwrap();
    // Opening again keeps the data.
    let again = nats.create_or_open(&config).await.unwrap();
    assert!(again.get("k").await.unwrap().is_some());
    nats.delete_bucket("mem").await.unwrap();
    assert!(matches!(
        nats.open("mem").await,
        Err(KvError::BucketNotFound(_))
    ));
    assert!(matches!(
        nats.delete_bucket("mem").await,
        Err(KvError::BucketNotFound(_))
    ));
    assert_eq!(
        nats.open("bad.name").await.unwrap_err().reason(),
        "OperationFailed"
    );
    let mut bad = BucketConfig::new("bad");
    bad.history = 0;
    assert!(nats.create_or_open(&bad).await.is_err());
}

#[tokio::test]
async fn info_reports_retained_revisions_and_whether_current_values_are_kept() {
    let server = NatsServer::start();
    let kv = bucket(&server, "app").await;
    let info = kv.info().await.unwrap();
    assert_eq!((info.first_revision, info.last_revision), (None, None));
    assert!(info.keeps_current_values);
    kv.put("a", b("1")).await.unwrap();
    kv.put("a", b("2")).await.unwrap(); // history 1: revision 1 is gone
    let v3 = kv.put("b", b("1")).await.unwrap();
    let info = kv.info().await.unwrap();
    assert_eq!(info.name, "app");
    assert_eq!(info.first_revision, Some(VersionToken::from_u64(2)));
    assert_eq!(info.last_revision, Some(v3));

    let mut aging = BucketConfig::new("aging");
    aging.max_age = Some(Duration::from_secs(3600));
    let aging = bucket_with(&server, aging).await;
    assert!(!aging.info().await.unwrap().keeps_current_values);
}
