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
