//! Whose keys and which ConfigMap a binding may touch: a Merge binding
//! leaves keys another field manager owns alone, and a binding whose target
//! moves carries out its deletion policy on the old one.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;

use crate::*;

/// Creates ConfigMap `name` with `data` as field manager `manager` (what
/// `kubectl create configmap --from-literal` does).
async fn create_cm_as(env: &Env, manager: &str, name: &str, data: &[(&str, &str)]) {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.data = Some(map(data));
    let pp = PostParams {
        field_manager: Some(manager.into()),
        ..PostParams::default()
    };
    env.configmaps().create(&pp, &cm).await.unwrap();
}

async fn wait_binding_gone(env: &Env, name: &str) {
    eventually(&format!("binding {name} gone"), || async {
        env.bindings()
            .get_opt(name)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_refuses_a_key_another_field_manager_owns_and_never_deletes_it() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "m.a", "mine").await;
    put(&kv, "m.b", "1").await;
    create_cm_as(
        &env,
        "kubectl-create",
        "shared",
        &[("secret", "keep"), ("a", "theirs")],
    )
    .await;
    let _op = env.operator();
    env.create_binding(
        "merge",
        "bucket: app\nprefixes: [m.]\nstripPrefix: true\n\
         target: {name: shared, creationPolicy: Merge, deletionPolicy: Delete}",
    )
    .await;
    let refused = wait_reason(&env, "merge", "KeyOwnedByOther").await;
    let status = refused.status.unwrap();
    let message = &status.condition("Ready").unwrap().message;
    assert!(
        message.contains("\"a\"") && message.contains("kubectl-create"),
        "the condition names the key and its manager: {message}"
    );
    assert!(
        !message.contains("\"secret\""),
        "a key the binding never writes is no refusal: {message}"
    );
    wait_event(&env, "merge", "KeyOwnedByOther").await;
    let want = map(&[("secret", "keep"), ("a", "theirs"), ("b", "1")]);
    wait_data(&env, "shared", &want).await;

    // Later changes of our other keys still go out; theirs stays.
    put(&kv, "m.b", "2").await;
    put(&kv, "m.a", "mine again").await;
    let want = map(&[("secret", "keep"), ("a", "theirs"), ("b", "2")]);
    wait_data(&env, "shared", &want).await;
    assert_eq!(ready_reason(&env.binding("merge").await), "KeyOwnedByOther");

    // deletionPolicy Delete withdraws our keys only.
    env.delete_binding("merge").await;
    wait_binding_gone(&env, "merge").await;
    wait_data(&env, "shared", &map(&[("secret", "keep"), ("a", "theirs")])).await;
}
/// Another manager's keys that the binding has no entry for are simply
/// left alone: the binding is Ready and Synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_into_a_configmap_with_other_managers_keys_is_synced() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "m.a", "mine").await;
    create_cm_as(&env, "kubectl-create", "shared", &[("theirs", "kept")]).await;
    let _op = env.operator();
    env.create_binding(
        "merge",
        "bucket: app\nprefixes: [m.]\ntarget: {name: shared, creationPolicy: Merge}",
    )
    .await;
    wait_reason(&env, "merge", "Synced").await;
    wait_data(&env, "shared", &map(&[("theirs", "kept"), ("m.a", "mine")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_target_name_applies_the_deletion_policy_to_the_old_target() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "t.a", "1").await;
    let _op = env.operator();
    for (binding, policy) in [("del", "Delete"), ("ret", "Retain")] {
        env.create_binding(
            binding,
            &format!("bucket: app\nprefixes: [t.]\ntarget: {{name: {binding}-old, deletionPolicy: {policy}}}"),
        )
        .await;
        wait_data(&env, &format!("{binding}-old"), &map(&[("t.a", "1")])).await;
        let patch = serde_json::json!({"spec": {"target": {"name": format!("{binding}-new")}}});
        env.bindings()
            .patch(
                binding,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap();
        wait_data(&env, &format!("{binding}-new"), &map(&[("t.a", "1")])).await;
    }
    put(&kv, "t.a", "2").await;
    wait_data(&env, "del-new", &map(&[("t.a", "2")])).await;
    wait_data(&env, "ret-new", &map(&[("t.a", "2")])).await;
    eventually("the old Delete target is deleted", || async {
        env.cm("del-old").await.is_none().then_some(())
    })
    .await;
    // Retain: the old target keeps its content, no longer claimed by us.
    let kept = env
        .cm("ret-old")
        .await
        .expect("Retain keeps the old target");
    assert_eq!(data(&kept), map(&[("t.a", "1")]));
    eventually("the retained target released", || async {
        let cm = env.cm("ret-old").await?;
        let claimed = cm
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(slipstream::sink::configmap::BINDING_ANNOTATION);
        (!claimed && cm.metadata.owner_references.unwrap_or_default().is_empty()).then_some(())
    })
    .await;
}
