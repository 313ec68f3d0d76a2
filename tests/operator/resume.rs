//! Restart resumes from the ConfigMap's cursor for every kind of binding,
//! and never trusts a ConfigMap that changed while the operator was away.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams, PostParams};
use slipstream::crd::ConfigBinding;
use slipstream::kv::KvWriter;

use crate::*;

/// Waits until `name` holds exactly `want`.
async fn wait_exact(env: &Env, name: &str, want: &BTreeMap<String, String>) -> ConfigMap {
    eventually(&format!("{name} holds {} keys", want.len()), || async {
        env.cm(name).await.filter(|cm| &data(cm) == want)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_and_multi_prefix_strip_bindings_resume_with_only_the_delta() {
    let env = Env::start().await;
    // one bucket per binding, so each bucket's catch-up count is its own
    let merge_kv = env.bucket("merged").await;
    let strip_kv = env.bucket("stripped").await;
    let mut merged = map(&[("theirs", "keep")]);
    let mut stripped = BTreeMap::new();
    for i in 0..50 {
        put(&merge_kv, &format!("m.k{i:02}"), "v0").await;
        merged.insert(format!("k{i:02}"), "v0".into());
        put(&strip_kv, &format!("a.x{i:02}"), "a0").await;
        put(&strip_kv, &format!("b.y{i:02}"), "b0").await;
        stripped.insert(format!("x{i:02}"), "a0".into());
        stripped.insert(format!("y{i:02}"), "b0".into());
    }
    let mut foreign = ConfigMap::default();
    foreign.metadata.name = Some("shared".into());
    foreign.data = Some(map(&[("theirs", "keep")]));
    env.configmaps()
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    let op = env.operator();
    env.create_binding(
        "merge",
        "bucket: merged\nprefixes: [m.]\nstripPrefix: true\ntarget: {name: shared, creationPolicy: Merge}",
    )
    .await;
    env.create_binding(
        "strip",
        "bucket: stripped\nprefixes: [a., b.]\nstripPrefix: true",
    )
    .await;
    wait_exact(&env, "shared", &merged).await;
    wait_exact(&env, "strip", &stripped).await;
    assert_eq!(op.metrics.delivered_count("merged", "catchup"), 50);
    assert_eq!(op.metrics.delivered_count("stripped", "catchup"), 100);
    op.kill();

    for i in 0..3 {
        put(&merge_kv, &format!("m.k{i:02}"), "v1").await;
        merged.insert(format!("k{i:02}"), "v1".into());
        put(&strip_kv, &format!("b.y{i:02}"), "b1").await;
        stripped.insert(format!("y{i:02}"), "b1".into());
    }
    merge_kv.delete("m.k49").await.unwrap();
    merged.remove("k49");
    strip_kv.delete("a.x49").await.unwrap();
    stripped.remove("x49");
    // a new key under the second prefix must not be mistaken for the first
    put(&strip_kv, "b.x00", "collides").await;

    let op = env.operator();
    wait_exact(&env, "shared", &merged).await;
    let b = wait_reason(&env, "strip", "KeyCollision").await;
    let status = b.status.unwrap();
    let ready = status.condition("Ready").unwrap();
    assert!(
        ready.message.contains("b.x00"),
        "the collision names the new key: {}",
        ready.message
    );
    assert_eq!(
        op.metrics.delivered_count("merged", "catchup"),
        4,
        "the Merge binding replays only the 4 changes made while down"
    );
    assert_eq!(
        op.metrics.delivered_count("stripped", "catchup"),
        5,
        "the two-prefix binding replays only the 5 changes made while down"
    );
    // last good content stays until the collision is gone, then the delta lands
    strip_kv.delete("b.x00").await.unwrap();
    wait_exact(&env, "strip", &stripped).await;
}

/// 15,000 keys from two stripped prefixes: the sources annotation (which
/// prefix each key came from) still fits, so a restart replays the delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_of_15000_keys_resumes_with_only_the_delta() {
    let env = Env::start().await;
    let kv = env.bucket("big").await;
    let mut want = BTreeMap::new();
    for i in 0..7_500 {
        put(&kv, &format!("a.setting-{i:05}"), "1").await;
        put(&kv, &format!("b.option-{i:05}"), "1").await;
        want.insert(format!("setting-{i:05}"), "1".to_owned());
        want.insert(format!("option-{i:05}"), "1".to_owned());
    }
    let op = env.operator();
    env.create_binding("big", "bucket: big\nprefixes: [a., b.]\nstripPrefix: true")
        .await;
    let cm = wait_exact(&env, "big", &want).await;
    let sources = cm.metadata.annotations.unwrap_or_default();
    assert!(
        sources.contains_key("slipstream.io/sources"),
        "the sources annotation is written for 15,000 keys"
    );
    op.kill();

    for i in 0..3 {
        put(&kv, &format!("b.option-{i:05}"), "2").await;
        want.insert(format!("option-{i:05}"), "2".to_owned());
    }
    let op = env.operator();
    wait_exact(&env, "big", &want).await;
    assert_eq!(
        op.metrics.delivered_count("big", "catchup"),
        3,
        "the restart replays the 3 changes, not 15,000 keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_edited_while_the_operator_was_down_is_repaired_on_restart() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    let mut want = BTreeMap::new();
    for i in 0..20 {
        put(&kv, &format!("e.k{i:02}"), "v").await;
        want.insert(format!("e.k{i:02}"), "v".to_string());
    }
    let op = env.operator();
    env.create_binding("e", "bucket: app\nprefixes: [e.]").await;
    wait_exact(&env, "e", &want).await;
    op.kill();

    let edit = serde_json::json!({"data": {"e.k05": "hacked"}});
    env.configmaps()
        .patch("e", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    let op = env.operator();
    wait_exact(&env, "e", &want).await;
    assert_eq!(
        op.metrics.delivered_count("app", "catchup"),
        20,
        "a ConfigMap that no longer matches its digest is rebuilt from the full state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_deleted_and_created_again_is_synced_from_its_new_revisions() {
    let env = Env::start().await;
    let kv = env.bucket("reborn").await;
    for i in 0..20 {
        put(&kv, &format!("r.k{i:02}"), "old").await;
    }
    let _op = env.operator();
    env.create_binding("r", "bucket: reborn\nprefixes: [r.]")
        .await;
    let old = eventually("20 old keys", || async {
        env.cm("r").await.filter(|cm| data(cm).len() == 20)
    })
    .await;
    assert_eq!(cursor(&old), Some(20));
    env.kv.delete_bucket("reborn").await.unwrap();
    wait_reason(&env, "r", "BucketNotFound").await;

    // the new bucket's revisions start again at 1, far below cursor 20
    let kv = env.bucket("reborn").await;
    put(&kv, "r.new", "1").await;
    let cm = wait_exact(&env, "r", &map(&[("r.new", "1")])).await;
    assert_eq!(cursor(&cm), Some(1), "the cursor restarts with the bucket");
    put(&kv, "r.later", "2").await;
    wait_exact(&env, "r", &map(&[("r.new", "1"), ("r.later", "2")])).await;
    assert_eq!(ready_reason(&env.binding("r").await), "Synced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_keys_are_still_listed_after_a_restart() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "s.ok", "1").await;
    put(&kv, "s.a/b", "2").await;
    let op = env.operator();
    env.create_binding(
        "s",
        "bucket: app\nprefixes: [s.]\nstripPrefix: true\nkeyPolicy: Skip",
    )
    .await;
    let listed = |b: ConfigBinding| {
        let s = b.status?;
        (s.skipped_count == Some(1) && s.skipped_keys == ["s.a/b"]).then_some(())
    };
    eventually("the bad key listed", || async {
        listed(env.binding("s").await)
    })
    .await;
    op.kill();
    put(&kv, "s.ok", "changed").await;
    let _op = env.operator();
    wait_exact(&env, "s", &map(&[("ok", "changed")])).await;
    eventually("still listed after the restart", || async {
        let b = env.binding("s").await;
        let synced = b.status.as_ref()?.cursor.as_deref() == Some("3");
        synced.then_some(())?;
        listed(b)
    })
    .await;
}

/// GETs and LISTs of ConfigMaps in the requests from index `from` on.
fn configmap_reads(env: &Env, from: usize) -> (usize, usize) {
    let reqs = env.api.requests();
    let cms = || reqs[from..].iter().filter(|r| r.resource == "configmaps");
    (
        cms().filter(|r| r.verb == "get").count(),
        cms().filter(|r| r.verb == "list").count(),
    )
}

/// Waits (reading bindings only, no ConfigMap) until every binding's status
/// holds at least cursor `at`.
async fn wait_status_cursors(env: &Env, names: &[String], at: u64) {
    for name in names {
        eventually(&format!("{name}'s status at cursor {at}"), || async {
            let cursor = env.binding(name).await.status?.cursor?;
            (cursor.parse::<u64>().ok()? >= at).then_some(())
        })
        .await;
    }
}

/// The start of many bindings reads their ConfigMaps from one paged list of
/// the namespace, not with a GET each: on a first start (nothing to read)
/// and on a restart (everything to read, and resume still delivers only the
/// changes made while the operator was away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_read_the_configmaps_with_a_list_not_a_get_per_binding() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    let names: Vec<String> = (0..12).map(|i| format!("b{i:02}")).collect();
    let mut last = 0;
    for i in 0..names.len() {
        last = put(&kv, &format!("p{i:02}.a"), "1").await;
    }
    let operator = || {
        env.operator_builder()
            .status_interval(std::time::Duration::from_millis(100))
            .start()
    };
    let from = env.api.requests().len();
    let op = operator();
    for (i, name) in names.iter().enumerate() {
        env.create_binding(name, &format!("bucket: app\nprefixes: [p{i:02}.]"))
            .await;
    }
    wait_status_cursors(&env, &names, last).await;
    let (gets, lists) = configmap_reads(&env, from);
    assert_eq!(gets, 0, "first start: no ConfigMap read one by one");
    assert!(lists <= 3, "first start: {lists} lists");
    op.kill();

    let mut changed = Vec::new();
    for i in 0..names.len() {
        changed.push(put(&kv, &format!("p{i:02}.a"), "2").await);
    }
    let from = env.api.requests().len();
    let op = operator();
    for (name, at) in names.iter().zip(&changed) {
        wait_status_cursors(&env, std::slice::from_ref(name), *at).await;
    }
    let (gets, lists) = configmap_reads(&env, from);
    assert_eq!(gets, 0, "restart: the ConfigMaps come from the list");
    assert!((1..=3).contains(&lists), "restart: {lists} lists");
    assert_eq!(
        op.metrics.delivered_count("app", "catchup"),
        names.len() as u64,
        "resumed from the listed cursors: only the changes"
    );
    for (i, name) in names.iter().enumerate() {
        wait_data(&env, name, &map(&[(&format!("p{i:02}.a"), "2")])).await;
    }
}

/// Successful ConfigMap patches of `name` in the requests so far.
fn configmap_patches(env: &Env, name: &str) -> usize {
    env.api
        .requests()
        .iter()
        .filter(|r| r.verb == "patch" && r.resource == "configmaps" && r.name == name)
        .filter(|r| (200..300).contains(&r.status))
        .count()
}

/// `slipstream.io/force-sync` set to a new value: one full state-sync from KV
/// (not a resume from the ConfigMap) and one rewrite even though nothing
/// differs, then `status.lastForceSync` says so and a restart does not do
/// it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_sync_annotation_resyncs_and_rewrites_once() {
    use slipstream::crd::FORCE_SYNC_ANNOTATION;
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    let mut want = BTreeMap::new();
    for i in 0..5 {
        put(&kv, &format!("k.{i}"), "v").await;
        want.insert(format!("k.{i}"), "v".to_owned());
    }
    let op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    wait_exact(&env, "b", &want).await;
    wait_reason(&env, "b", "Synced").await;
    assert_eq!(op.metrics.delivered_count("app", "catchup"), 5);
    let patches = configmap_patches(&env, "b");

    let annotate = serde_json::json!({"metadata": {"annotations": {FORCE_SYNC_ANNOTATION: "2026-11-28T14:00:00Z"}}});
    env.bindings()
        .patch("b", &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .unwrap();
    eventually("status.lastForceSync", || async {
        let done = env.binding("b").await.status?.last_force_sync?;
        (done == "2026-11-28T14:00:00Z").then_some(())
    })
    .await;
    assert_eq!(
        op.metrics.delivered_count("app", "catchup"),
        10,
        "a full state-sync, not a resume"
    );
    assert_eq!(configmap_patches(&env, "b"), patches + 1, "one rewrite");
    wait_exact(&env, "b", &want).await;
    op.kill();

    put(&kv, "k.new", "x").await;
    want.insert("k.new".into(), "x".into());
    let op = env.operator();
    wait_exact(&env, "b", &want).await;
    assert_eq!(
        op.metrics.delivered_count("app", "catchup"),
        1,
        "done once: the restart resumes from the ConfigMap"
    );
}

/// Sets the ConfigMap's cursor annotation by hand.
async fn edit_cursor(env: &Env, name: &str, cursor: &str) {
    let edit = serde_json::json!({"metadata": {"annotations": {"slipstream.io/cursor": cursor}}});
    env.configmaps()
        .patch(name, &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
}

/// Waits until `name` holds `want` at cursor `at` and its status says
/// Synced at that cursor.
async fn wait_synced_at(env: &Env, name: &str, want: &BTreeMap<String, String>, at: u64) {
    eventually(&format!("{name} synced at {at}"), || async {
        let cm = env.cm(name).await?;
        let b = env.binding(name).await;
        let status = b.status.as_ref()?;
        (&data(&cm) == want
            && cursor(&cm) == Some(at)
            && ready_reason(&b) == "Synced"
            && status.cursor.as_deref() == Some(at.to_string().as_str()))
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_edited_past_the_bucket_is_put_back_live_and_after_a_restart() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "t.a", "1").await;
    let op = env
        .operator_builder()
        .status_interval(std::time::Duration::from_millis(100))
        .start();
    env.create_binding("t", "bucket: app\nprefixes: [t.]").await;
    wait_exact(&env, "t", &map(&[("t.a", "1")])).await;

    // While running: the next write puts the truth and its cursor back.
    edit_cursor(&env, "t", "99999999").await;
    let last = put(&kv, "t.b", "2").await;
    wait_synced_at(&env, "t", &map(&[("t.a", "1"), ("t.b", "2")]), last).await;

    // While down: the restart must not resume from the bogus cursor.
    op.kill();
    edit_cursor(&env, "t", "99999999").await;
    let _op = env
        .operator_builder()
        .status_interval(std::time::Duration::from_millis(100))
        .start();
    let last = put(&kv, "t.c", "3").await;
    let want = map(&[("t.a", "1"), ("t.b", "2"), ("t.c", "3")]);
    wait_synced_at(&env, "t", &want, last).await;
}
