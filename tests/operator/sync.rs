//! Happy paths: projection into ConfigMaps, restart delta, policies, hand edits.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use slipstream::kv::{KvPurge, KvWriter};

use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_and_deletes_reach_the_configmap_with_cursor_and_status() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "web.port", "8080").await;
    put(&kv, "api.port", "9090").await;
    let _op = env.operator();
    env.create_binding("web", "bucket: app\nprefixes: [web.]\nstripPrefix: true")
        .await;
    wait_data(&env, "web", &map(&[("port", "8080")])).await;
    put(&kv, "web.a/b", "x").await;
    let last = put(&kv, "web.gone", "1").await;
    kv.delete("web.gone").await.unwrap();
    let purge = kv.purge("web.port").await.unwrap().as_u64().unwrap();
    let cm = wait_data(&env, "web", &map(&[("a_2Fb", "x")])).await;
    assert!(cursor(&cm).unwrap() >= purge.max(last));
    let b = eventually("status mirrors the annotation", || async {
        let b = env.binding("web").await;
        (b.status.as_ref()?.cursor.as_deref()? == cursor(&cm).unwrap().to_string()).then_some(b)
    })
    .await;
    let status = b.status.unwrap();
    assert_eq!(status.keys, Some(1));
    assert_eq!(status.bytes, Some(1));
    assert_eq!(ready_reason(&env.binding("web").await), "Synced");
    let owner = cm.metadata.owner_references.unwrap();
    assert_eq!(owner[0].kind, "ConfigBinding");
    assert_eq!(owner[0].controller, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_restart_delivers_only_the_delta() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    for i in 0..200 {
        put(&kv, &format!("p.k{i:03}"), "v0").await;
    }
    let op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [p.]").await;
    eventually("200 keys", || async {
        env.cm("b").await.filter(|cm| data(cm).len() == 200)
    })
    .await;
    let first = op.metrics.delivered_count("app", "catchup");
    assert_eq!(first, 200, "initial state-sync delivers every key once");
    op.kill();
    for i in 0..7 {
        put(&kv, &format!("p.k{i:03}"), "v1").await;
    }
    kv.delete("p.k199").await.unwrap();
    let op = env.operator();
    let cm = eventually("delta applied", || async {
        env.cm("b").await.filter(|cm| {
            let d = data(cm);
            d.len() == 199 && d["p.k006"] == "v1"
        })
    })
    .await;
    assert_eq!(
        op.metrics.delivered_count("app", "catchup"),
        8,
        "a restart replays only the 8 changes after the recorded cursor"
    );
    assert_eq!(data(&cm)["p.k007"], "v0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_writes_only_its_keys_and_owner_refuses_a_foreign_configmap() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "m.a", "1").await;
    let mut foreign = ConfigMap::default();
    foreign.metadata.name = Some("shared".into());
    foreign.data = Some(map(&[("theirs", "keep")]));
    env.configmaps()
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    let _op = env.operator();
    env.create_binding(
        "owner",
        "bucket: app\nprefixes: [m.]\ntarget: {name: shared}",
    )
    .await;
    wait_reason(&env, "owner", "TargetConflict").await;
    wait_event(&env, "owner", "TargetConflict").await;
    assert_eq!(
        data(&env.cm("shared").await.unwrap()),
        map(&[("theirs", "keep")])
    );
    env.delete_binding("owner").await;
    eventually("owner binding gone", || async {
        env.bindings()
            .get_opt("owner")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    env.create_binding(
        "merge",
        "bucket: app\nprefixes: [m.]\nstripPrefix: true\ntarget: {name: shared, creationPolicy: Merge}",
    )
    .await;
    wait_data(&env, "shared", &map(&[("a", "1"), ("theirs", "keep")])).await;
    kv.delete("m.a").await.unwrap();
    wait_data(&env, "shared", &map(&[("theirs", "keep")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_edited_or_deleted_by_hand_is_put_back() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "h.a", "1").await;
    let _op = env.operator();
    env.create_binding("h", "bucket: app\nprefixes: [h.]").await;
    wait_data(&env, "h", &map(&[("h.a", "1")])).await;
    let edit = serde_json::json!({"data": {"h.a": "hacked", "extra": "x"}});
    env.configmaps()
        .patch("h", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    wait_data(&env, "h", &map(&[("h.a", "1")])).await;
    env.configmaps()
        .delete("h", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    wait_data(&env, "h", &map(&[("h.a", "1")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_policy_delete_removes_and_retain_keeps_the_configmap() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "d.a", "1").await;
    let _op = env.operator();
    env.create_binding("del", "bucket: app\nprefixes: [d.]")
        .await;
    env.create_binding(
        "ret",
        "bucket: app\nprefixes: [d.]\ntarget: {deletionPolicy: Retain}",
    )
    .await;
    wait_data(&env, "del", &map(&[("d.a", "1")])).await;
    wait_data(&env, "ret", &map(&[("d.a", "1")])).await;
    // Owner + Delete is the garbage collector's to clean up: no finalizer
    // (and no write for one); Retain needs ours
    let finalizers = |b: slipstream::crd::ConfigBinding| b.metadata.finalizers.unwrap_or_default();
    assert!(finalizers(env.binding("del").await).is_empty());
    assert_eq!(
        finalizers(env.binding("ret").await),
        [slipstream::controller::FINALIZER]
    );
    env.delete_binding("del").await;
    env.delete_binding("ret").await;
    eventually("bindings gone", || async {
        let a = env.bindings().get_opt("del").await.unwrap();
        let b = env.bindings().get_opt("ret").await.unwrap();
        (a.is_none() && b.is_none()).then_some(())
    })
    .await;
    eventually("del ConfigMap gone", || async {
        env.cm("del").await.is_none().then_some(())
    })
    .await;
    let kept = env.cm("ret").await.expect("Retain keeps the ConfigMap");
    assert_eq!(data(&kept), map(&[("d.a", "1")]));
    assert!(
        kept.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
}

/// A default binding's first sync costs three API writes: the ConfigMap
/// create (the claim), one apply of the content, one status write; no
/// finalizer, no Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_writes_a_create_an_apply_and_a_status() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "f.a", "1").await;
    let _op = env.operator();
    env.create_binding("f", "bucket: app\nprefixes: [f.]").await;
    wait_data(&env, "f", &map(&[("f.a", "1")])).await;
    wait_reason(&env, "f", "Synced").await;
    // past the status interval: a late status write would be counted
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes: Vec<String> = env
        .api
        .requests()
        .into_iter()
        .filter(|r| r.status < 300 && r.namespace == env.ns())
        .filter(|r| ["create", "update", "patch", "delete"].contains(&r.verb.as_str()))
        .map(|r| format!("{} {}/{}", r.verb, r.resource, r.subresource))
        .filter(|w| w != "create configbindings/")
        .collect();
    assert_eq!(
        writes,
        [
            "create configmaps/",
            "patch configmaps/",
            "patch configbindings/status"
        ],
        "(the binding itself, created by the test, is not counted)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_configmap_goes_with_its_binding_even_with_no_operator_running() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "o.a", "1").await;
    let op = env.operator();
    env.create_binding("o", "bucket: app\nprefixes: [o.]").await;
    wait_data(&env, "o", &map(&[("o.a", "1")])).await;
    op.kill();
    // no finalizer waits on the operator: the binding goes at once and the
    // garbage collector deletes the ConfigMap that names it as owner
    env.delete_binding("o").await;
    assert!(env.bindings().get_opt("o").await.unwrap().is_none());
    eventually("the garbage collector deletes ConfigMap o", || async {
        env.cm("o").await.is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_stops_writes_and_resume_writes_the_latest() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "s.a", "1").await;
    let _op = env.operator();
    env.create_binding("s", "bucket: app\nprefixes: [s.]").await;
    wait_data(&env, "s", &map(&[("s.a", "1")])).await;
    let patch = serde_json::json!({"spec": {"suspend": true}});
    env.bindings()
        .patch("s", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_reason(&env, "s", "Suspended").await;
    put(&kv, "s.a", "2").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(data(&env.cm("s").await.unwrap()), map(&[("s.a", "1")]));
    let patch = serde_json::json!({"spec": {"suspend": false}});
    env.bindings()
        .patch("s", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_data(&env, "s", &map(&[("s.a", "2")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_writes_nothing_and_writes_pending_content_when_it_becomes_leader() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "g.a", "1").await;
    let op = env.operator_builder().may_write(false).start();
    // Retain: a binding whose deletion needs our cleanup, so a finalizer
    env.create_binding(
        "g",
        "bucket: app\nprefixes: [g.]\ntarget: {deletionPolicy: Retain}",
    )
    .await;
    put(&kv, "g.b", "2").await;
    eventually("standby dropped a write", || async {
        (op.metrics.dropped_writes.get() > 0).then_some(())
    })
    .await;
    assert!(env.cm("g").await.is_none(), "a standby writes nothing");
    let b = env.binding("g").await;
    assert!(b.status.is_none(), "not even status");
    assert!(b.metadata.finalizers.unwrap_or_default().is_empty());
    let lists_before = env.api.counters().verb_resource("list", "configbindings");
    op.gate.send(true).unwrap();
    wait_data(&env, "g", &map(&[("g.a", "1"), ("g.b", "2")])).await;
    assert_eq!(
        env.api.counters().verb_resource("list", "configbindings"),
        lists_before,
        "pending content is written without a re-list"
    );
    // The finalizer goes on before the first write, so deleting the binding
    // right after it always runs its cleanup.
    let requests = env.api.requests();
    let first = |resource: &str| {
        requests.iter().position(|r| {
            r.verb == "patch"
                && r.resource == resource
                && r.subresource.is_empty()
                && r.status < 300
        })
    };
    let (finalizer, write) = (first("configbindings"), first("configmaps"));
    assert!(
        finalizer.is_some() && finalizer < write,
        "finalizer patch (request {finalizer:?}) before the first ConfigMap write (request {write:?})"
    );
    assert!(
        env.binding("g")
            .await
            .metadata
            .finalizers
            .unwrap_or_default()
            .contains(&slipstream::controller::FINALIZER.to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_deleted_removes_its_bindings_and_others_keep_syncing() {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::Api;
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "n.a", "1").await;
    let doomed = env.other_namespace("doomed").await;
    // One operator for both namespaces on the emulator; on the shared real
    // control plane an operator watches one namespace, so each gets its own.
    let (_op, _doomed_op) = if env.api.is_real() {
        let doomed_op = env.operator_builder().namespace(&doomed).start();
        (env.operator(), Some(doomed_op))
    } else {
        (env.operator_builder().all_namespaces().start(), None)
    };
    let spec = serde_yaml::from_str("bucket: app\nprefixes: [n.]").unwrap();
    let doomed_bindings: Api<slipstream::crd::ConfigBinding> =
        Api::namespaced(env.client.clone(), &doomed);
    doomed_bindings
        .create(
            &PostParams::default(),
            &slipstream::crd::ConfigBinding::new("b", spec),
        )
        .await
        .unwrap();
    env.create_binding("keep", "bucket: app\nprefixes: [n.]")
        .await;
    let doomed_cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &doomed);
    eventually("doomed ConfigMap written", || async {
        doomed_cms.get_opt("b").await.unwrap()
    })
    .await;
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    namespaces
        .delete(&doomed, &DeleteParams::default())
        .await
        .unwrap();
    // its binding is the garbage collector's to clean up: no finalizer holds the namespace
    eventually("namespace gone", || async {
        namespaces
            .get_opt(&doomed)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    put(&kv, "n.a", "2").await;
    wait_data(&env, "keep", &map(&[("n.a", "2")])).await;
}
