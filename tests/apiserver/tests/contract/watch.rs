//! Watch semantics (API concepts: "Efficient detection of changes", "Watch
//! bookmarks", "Streaming lists", "410 Gone responses").

use std::time::Duration;

use apiserver::Config;
use futures::{StreamExt, TryStreamExt};
use kube::{
    ResourceExt,
    api::{Patch, PatchParams, WatchEvent, WatchParams},
};

use super::*;

type Stream = futures::stream::BoxStream<'static, Result<WatchEvent<ConfigMap>, kube::Error>>;

async fn watch(cms: &Api<ConfigMap>, wp: &WatchParams, rv: &str) -> Stream {
    cms.watch(wp, rv).await.unwrap().boxed()
}

async fn next(s: &mut Stream) -> WatchEvent<ConfigMap> {
    tokio::time::timeout(Duration::from_secs(10), s.try_next())
        .await
        .expect("watch event in time")
        .unwrap()
        .expect("stream open")
}

fn describe(e: &WatchEvent<ConfigMap>) -> String {
    match e {
        WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
        WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
        WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
        WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
        WatchEvent::Error(e) => format!("ERROR {} {}", e.code, e.reason),
    }
}

#[tokio::test]
async fn watch_from_a_resource_version_streams_only_later_events_in_order() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let a = cms
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    let wp = WatchParams::default().disable_bookmarks();
    let mut s = watch(&cms, &wp, a.metadata.resource_version.as_deref().unwrap()).await;
    assert_eq!(
        describe(&next(&mut s).await),
        "ADDED b",
        "history after the given resourceVersion is replayed"
    );
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"x": "1"}})),
    )
    .await
    .unwrap();
    assert_eq!(describe(&next(&mut s).await), "MODIFIED a");
    cms.delete("b", &Default::default()).await.unwrap();
    match next(&mut s).await {
        WatchEvent::Deleted(o) => {
            assert_eq!(o.name_any(), "b");
            assert!(
                rv_of(&o.metadata) > rv_of(&a.metadata),
                "DELETED carries the deletion's resourceVersion"
            );
        }
        other => panic!("expected DELETED, got {}", describe(&other)),
    }
}

#[tokio::test]
async fn watch_without_a_resource_version_starts_with_the_current_objects() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"x": "1"}})),
    )
    .await
    .unwrap();
    cms.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    let mut s = watch(&cms, &WatchParams::default().disable_bookmarks(), "0").await;
    // Synthetic ADDED events for the current state, not the history.
    assert_eq!(describe(&next(&mut s).await), "ADDED a");
    assert_eq!(describe(&next(&mut s).await), "ADDED b");
    cms.create(&PostParams::default(), &cm("c", &[]))
        .await
        .unwrap();
    assert_eq!(describe(&next(&mut s).await), "ADDED c");
}

#[tokio::test]
async fn timeout_seconds_ends_the_watch_stream() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let mut s = watch(
        &cms,
        &WatchParams::default().timeout(1).disable_bookmarks(),
        "0",
    )
    .await;
    let end = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("stream ends by itself");
    assert!(end.is_none(), "stream closed without events");
}

#[tokio::test]
async fn label_selector_watch_sees_objects_entering_as_added_and_leaving_as_deleted() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let mut s = watch(
        &cms,
        &WatchParams::default().labels("app=web").disable_bookmarks(),
        "0",
    )
    .await;
    cms.create(&PostParams::default(), &cm("x", &[]))
        .await
        .unwrap();
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .unwrap();
    assert_eq!(describe(&next(&mut s).await), "ADDED x");
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .unwrap();
    assert_eq!(describe(&next(&mut s).await), "MODIFIED x");
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "api"}}})),
    )
    .await
    .unwrap();
    assert_eq!(describe(&next(&mut s).await), "DELETED x");
}

#[tokio::test]
async fn field_selector_watch_sees_only_the_named_object() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let mut s = watch(
        &cms,
        &WatchParams::default()
            .fields("metadata.name=b")
            .disable_bookmarks(),
        "0",
    )
    .await;
    cms.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    assert_eq!(describe(&next(&mut s).await), "ADDED b");
}

#[tokio::test]
async fn send_initial_events_streams_the_state_then_an_initial_events_end_bookmark() {
    let (_api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    let last = cms
        .create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    let mut s = watch(&cms, &WatchParams::streaming_lists(), "0").await;
    assert_eq!(describe(&next(&mut s).await), "ADDED a");
    assert_eq!(describe(&next(&mut s).await), "ADDED b");
    match next(&mut s).await {
        WatchEvent::Bookmark(b) => {
            assert_eq!(
                b.metadata
                    .annotations
                    .get("k8s.io/initial-events-end")
                    .map(String::as_str),
                Some("true")
            );
            // The state it ends is at least as new as the last write.
            let rv: u64 = b.metadata.resource_version.parse().unwrap();
            assert!(rv >= rv_of(&last.metadata), "{rv}");
        }
        other => panic!(
            "expected the initial-events-end bookmark, got {}",
            describe(&other)
        ),
    }
}

#[tokio::test]
async fn close_watches_ends_open_streams() {
    let (api, client) = start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let now = cms.list(&Default::default()).await.unwrap().metadata;
    let mut s = watch(
        &cms,
        &WatchParams::default().disable_bookmarks(),
        now.resource_version.as_deref().unwrap(),
    )
    .await;
    api.faults().close_watches();
    let end = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("stream ends");
    assert!(end.is_none());
}

mod emulator_only {
    use super::*;

    #[tokio::test]
    async fn bookmarks_are_sent_when_allow_watch_bookmarks_is_set() {
        let api = ApiServer::start_with(Config {
            bookmark_interval: Duration::from_millis(50),
            ..Default::default()
        })
        .await
        .unwrap();
        let cms: Api<ConfigMap> = Api::default_namespaced(api.client());
        let c = cms
            .create(&PostParams::default(), &cm("a", &[]))
            .await
            .unwrap();
        let mut s = watch(
            &cms,
            &WatchParams::default(),
            c.metadata.resource_version.as_deref().unwrap(),
        )
        .await;
        match next(&mut s).await {
            WatchEvent::Bookmark(b) => {
                assert_eq!(
                    b.metadata.resource_version,
                    api.resource_version().to_string()
                );
                assert_eq!(b.types.kind, "ConfigMap");
            }
            other => panic!("expected BOOKMARK, got {}", describe(&other)),
        }
        // Without allowWatchBookmarks, none arrive: the next event is the write.
        let mut quiet = watch(
            &cms,
            &WatchParams::default().disable_bookmarks(),
            &api.resource_version().to_string(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        cms.create(&PostParams::default(), &cm("b", &[]))
            .await
            .unwrap();
        assert_eq!(describe(&next(&mut quiet).await), "ADDED b");
    }

    #[tokio::test]
    async fn watch_older_than_the_history_window_gets_410_gone_expired() {
        let api = ApiServer::start_with(Config {
            history_window: 3,
            ..Default::default()
        })
        .await
        .unwrap();
        let cms: Api<ConfigMap> = Api::default_namespaced(api.client());
        let first = cms
            .create(&PostParams::default(), &cm("a", &[]))
            .await
            .unwrap();
        for i in 0..5 {
            cms.create(&PostParams::default(), &cm(&format!("n{i}"), &[]))
                .await
                .unwrap();
        }
        let mut s = watch(
            &cms,
            &WatchParams::default(),
            first.metadata.resource_version.as_deref().unwrap(),
        )
        .await;
        match next(&mut s).await {
            WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
            other => panic!("expected 410, got {}", describe(&other)),
        }
        // Within the window, the same watch works.
        let recent = (api.resource_version() - 1).to_string();
        let mut ok = watch(&cms, &WatchParams::default().disable_bookmarks(), &recent).await;
        assert_eq!(describe(&next(&mut ok).await), "ADDED n4");

        // compact() expires everything before the current resourceVersion.
        api.faults().compact();
        let mut s = watch(&cms, &WatchParams::default(), &recent).await;
        assert_eq!(describe(&next(&mut s).await), "ERROR 410 Expired");
    }
}
