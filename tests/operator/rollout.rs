//! `spec.target.rollout`: a content change sets the digest annotation on
//! the named workloads' pod templates (on the real control plane the
//! deployment controller then makes a new ReplicaSet); what does not change
//! the content, a restart and a failover roll nothing; bursts are
//! coalesced; bad input is refused out loud.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use slipstream::kv::nats::NatsBucket;
use slipstream::{
    controller::rollout::annotation_key, crd::ConfigBinding, sink::configmap::DIGEST_ANNOTATION,
};
use tokio::time::Instant;

use crate::{
    common::{WORKLOAD_IMAGE, workload_json},
    *,
};

fn workloads(env: &Env, kind: &str, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("apps", "v1", kind);
    Api::namespaced_with(env.client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

/// Bucket `app` holding `key` = `value`, a Deployment `web`, an operator,
/// and binding `web` (prefix `web.`) rolling the Deployment at most once per
/// `interval`; returns once the ConfigMap holds the value.
async fn deployment_rolled_by_web(
    env: &Env,
    key: &str,
    value: &str,
    interval: &str,
) -> (NatsBucket, Operator, ConfigMap) {
    let kv = env.bucket("app").await;
    put(&kv, key, value).await;
    create_workload(env, "Deployment", "web").await;
    let op = env.operator();
    env.create_binding(
        "web",
        &spec("web.", "[{kind: Deployment, name: web}]", interval),
    )
    .await;
    let cm = wait_data(env, "web", &map(&[(key, value)])).await;
    (kv, op, cm)
}

/// A minimal valid workload of `kind` (Deployment, StatefulSet, DaemonSet).
async fn create_workload_in(env: &Env, ns: &str, kind: &str, name: &str) {
    let obj: DynamicObject = serde_json::from_value(workload_json(kind, name)).unwrap();
    workloads(env, kind, ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap();
}

async fn create_workload(env: &Env, kind: &str, name: &str) {
    create_workload_in(env, env.ns(), kind, name).await;
}

async fn workload(env: &Env, kind: &str, name: &str) -> DynamicObject {
    workloads(env, kind, env.ns()).get(name).await.unwrap()
}

/// The binding's digest annotation on the workload's pod template.
fn template_digest(obj: &DynamicObject, binding: &str) -> Option<String> {
    obj.data["spec"]["template"]["metadata"]["annotations"][annotation_key(binding)]
        .as_str()
        .map(str::to_owned)
}

fn cm_digest(cm: &k8s_openapi::api::core::v1::ConfigMap) -> String {
    cm.annotations()[DIGEST_ANNOTATION].clone()
}

/// Waits until `kind/name` carries `digest` for `binding`.
async fn wait_template(env: &Env, kind: &str, name: &str, binding: &str, digest: &str) {
    eventually(&format!("{kind} {name} carries {digest}"), || async {
        let obj = workload(env, kind, name).await;
        (template_digest(&obj, binding).as_deref() == Some(digest)).then_some(())
    })
    .await;
}

/// Rollout applies the operator sent (any workload) since request `from`.
fn rollout_patches(env: &Env, from: usize) -> usize {
    env.api.requests()[from..]
        .iter()
        .filter(|r| {
            r.verb == "patch"
                && r.group == "apps"
                && r.field_manager.starts_with("slipstream-rollout-")
        })
        .count()
}

/// Reads of `name` (any apps kind) since request `from`.
fn workload_reads(env: &Env, from: usize, name: &str) -> usize {
    env.api.requests()[from..]
        .iter()
        .filter(|r| r.verb == "get" && r.group == "apps" && r.name == name)
        .count()
}

fn rollout_condition(b: &ConfigBinding) -> Option<(String, String, String)> {
    let c = b.status.as_ref()?.condition("Rollout")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_rollout_reason(env: &Env, binding: &str, reason: &str) -> ConfigBinding {
    eventually(&format!("{binding} Rollout {reason}"), || async {
        let b = env.binding(binding).await;
        (rollout_condition(&b)?.1 == reason).then_some(b)
    })
    .await
}

fn spec(prefix: &str, workloads: &str, min_interval: &str) -> String {
    format!(
        "bucket: app\nprefixes: [{prefix}]\ntarget:\n  rollout:\n    workloads: {workloads}\n    minInterval: {min_interval}\n"
    )
}

/// The ReplicaSets the deployment controller made for Deployment `name`.
async fn replica_sets(env: &Env, name: &str) -> Vec<DynamicObject> {
    let gvk = GroupVersionKind::gvk("apps", "v1", "ReplicaSet");
    let api: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), env.ns(), &ApiResource::from_gvk(&gvk));
    api.list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|rs| {
            rs.owner_references()
                .iter()
                .any(|o| o.kind == "Deployment" && o.name == name)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_change_rolls_each_workload_with_an_annotation_only_apply() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "web.greeting", "hello").await;
    for (kind, name) in [
        ("Deployment", "web"),
        ("StatefulSet", "db"),
        ("DaemonSet", "agent"),
    ] {
        create_workload(&env, kind, name).await;
    }
    let op = env.operator();
    let workloads = "[{kind: Deployment, name: web}, {kind: StatefulSet, name: db}, {kind: DaemonSet, name: agent}]";
    env.create_binding("web", &spec("web.", workloads, "1s"))
        .await;
    let cm = wait_data(&env, "web", &map(&[("web.greeting", "hello")])).await;
    let first = cm_digest(&cm);
    for (kind, name) in [
        ("Deployment", "web"),
        ("StatefulSet", "db"),
        ("DaemonSet", "agent"),
    ] {
        wait_template(&env, kind, name, "web", &first).await;
    }
    if env.api.is_real() {
        eventually("a ReplicaSet for the first template", || async {
            (replica_sets(&env, "web").await.len() >= 2).then_some(())
        })
        .await;
    }
    let sets_before = if env.api.is_real() {
        replica_sets(&env, "web").await.len()
    } else {
        0
    };

    put(&kv, "web.greeting", "bonjour").await;
    let cm = wait_data(&env, "web", &map(&[("web.greeting", "bonjour")])).await;
    let second = cm_digest(&cm);
    assert_ne!(first, second);
    wait_template(&env, "Deployment", "web", "web", &second).await;
    wait_template(&env, "StatefulSet", "db", "web", &second).await;
    wait_template(&env, "DaemonSet", "agent", "web", &second).await;
    assert_eq!(op.metrics.rollout_count(env.ns(), "web"), 6);

    // the apply owns the one annotation and nothing else
    let deploy = workload(&env, "Deployment", "web").await;
    let entry = deploy
        .managed_fields()
        .iter()
        .find(|m| m.manager.as_deref() == Some("slipstream-rollout-web"))
        .expect("a managedFields entry of the rollout field manager")
        .clone();
    assert_eq!(entry.operation.as_deref(), Some("Apply"));
    let fields = serde_json::to_value(entry.fields_v1.unwrap()).unwrap();
    let key = format!("f:{}", annotation_key("web"));
    assert_eq!(
        fields,
        json!({"f:spec": {"f:template": {"f:metadata": {"f:annotations": {key: {}}}}}}),
    );
    assert_eq!(
        deploy.data["spec"]["template"]["spec"]["containers"][0]["image"], WORKLOAD_IMAGE,
        "the rest of the template is untouched"
    );

    // the condition says RolledOut since the first rollout: wait for the
    // status write that records the second one
    wait_rollout_reason(&env, "web", "RolledOut").await;
    let b = eventually("status.rollouts record the second rollout", || async {
        let b = env.binding("web").await;
        let rollouts = &b.status.as_ref()?.rollouts;
        (rollouts.len() == 3 && rollouts.iter().all(|r| r.digest == second)).then_some(b)
    })
    .await;
    let status = b.status.unwrap();
    for r in &status.rollouts {
        assert!(r.time.ends_with('Z'), "{r:?}");
    }
    assert_eq!(
        status.condition("Ready").unwrap().reason,
        "Synced",
        "Ready stays about the ConfigMap"
    );
    wait_event(&env, "web", "RolledOut").await;
    if env.api.is_real() {
        // the real deployment controller rolls: a ReplicaSet for the new template
        let sets = eventually("a new ReplicaSet", || async {
            let sets = replica_sets(&env, "web").await;
            (sets.len() > sets_before).then_some(sets)
        })
        .await;
        assert!(
            sets.iter()
                .any(|rs| template_digest(rs, "web").as_deref() == Some(second.as_str())),
            "the new ReplicaSet's template carries the new digest"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_content_a_restart_and_a_failover_roll_nothing() {
    let env = Env::start().await;
    let (kv, op, cm) = deployment_rolled_by_web(&env, "web.greeting", "hello", "100ms").await;
    let digest = cm_digest(&cm);
    wait_template(&env, "Deployment", "web", "web", &digest).await;
    let from = env.api.requests().len();

    // an unchanged put moves the bucket's cursor, not the content (the
    // ConfigMap is not even written)
    let delivered = op.metrics.delivered_count("app", "shared");
    put(&kv, "web.greeting", "hello").await;
    put(&kv, "other.key", "x").await;
    eventually("the operator received both", || async {
        (op.metrics.delivered_count("app", "shared") >= delivered + 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rollout_patches(&env, from),
        0,
        "a cursor-only move rolls nothing"
    );
    assert_eq!(op.metrics.rollout_count(env.ns(), "web"), 1);

    // a restart reads the workload, finds the digest, writes nothing
    op.kill();
    let from = env.api.requests().len();
    let op = env.operator();
    eventually("the restarted operator read the workload", || async {
        (workload_reads(&env, from, "web") > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rollout_patches(&env, from), 0, "a restart rolls nothing");

    // failover: a standby takes over
    let standby = env.operator_builder().may_write(false).start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from = env.api.requests().len();
    op.gate.send(false).unwrap();
    op.kill();
    standby.gate.send(true).unwrap();
    eventually("the new leader read the workload", || async {
        (workload_reads(&env, from, "web") > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rollout_patches(&env, from), 0, "a failover rolls nothing");
    assert_eq!(standby.metrics.rollout_count(env.ns(), "web"), 0);

    // and the new leader rolls the next change
    put(&kv, "web.greeting", "bonjour").await;
    let cm = wait_data(&env, "web", &map(&[("web.greeting", "bonjour")])).await;
    wait_template(&env, "Deployment", "web", "web", &cm_digest(&cm)).await;
    assert_eq!(standby.metrics.rollout_count(env.ns(), "web"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_to_the_interval_of_the_last_rollout() {
    let env = Env::start().await;
    let (kv, op, cm) = deployment_rolled_by_web(&env, "web.a", "1", "4s").await;
    wait_template(&env, "Deployment", "web", "web", &cm_digest(&cm)).await;
    let rolled = Instant::now();
    eventually("status.rollouts written", || async {
        let b = env.binding("web").await;
        (!b.status?.rollouts.is_empty()).then_some(())
    })
    .await;
    op.kill();
    let _op = env.operator();
    put(&kv, "web.a", "2").await;
    let cm = wait_data(&env, "web", &map(&[("web.a", "2")])).await;
    wait_template(&env, "Deployment", "web", "web", &cm_digest(&cm)).await;
    // status times have whole seconds: the interval may start up to 1 s early
    assert!(
        rolled.elapsed() >= Duration::from_secs(3),
        "rolled again {:?} after the last rollout",
        rolled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_gives_at_most_one_rollout_per_min_interval_plus_the_last() {
    let env = Env::start().await;
    let (kv, op, cm) = deployment_rolled_by_web(&env, "web.n", "0", "1s").await;
    wait_template(&env, "Deployment", "web", "web", &cm_digest(&cm)).await;
    let before = op.metrics.rollout_count(env.ns(), "web");
    let from = env.api.requests().len();

    // 3 s of changes
    let min_interval = Duration::from_secs(1);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        n += 1;
        put(&kv, "web.n", &n.to_string()).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // the burst as the operator sees it: until the ConfigMap holds the last value
    let cm = wait_data(&env, "web", &map(&[("web.n", &n.to_string())])).await;
    let burst = start.elapsed();
    wait_template(&env, "Deployment", "web", "web", &cm_digest(&cm)).await;
    tokio::time::sleep(min_interval * 2).await;
    let rollouts = op.metrics.rollout_count(env.ns(), "web") - before;
    let bound = (burst.as_secs_f64() / min_interval.as_secs_f64()).ceil() as u64 + 1;
    println!(
        "{n} updates in {burst:?}: {rollouts} rollouts (bound {bound}), {} ConfigMap writes, {} coalesced",
        op.metrics.write_count(env.ns(), "web"),
        op.metrics.coalesced_count(env.ns(), "web"),
    );
    assert!(rollouts >= 1 && rollouts <= bound, "{rollouts} > {bound}");
    assert_eq!(rollout_patches(&env, from) as u64, rollouts);
    assert!(op.metrics.coalesced_count(env.ns(), "web") > 0);
    assert!(n > 50, "a burst: {n} updates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_in_another_namespace_cannot_be_named() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "web.a", "1").await;
    let other = env.other_namespace("rollout-other").await;
    create_workload_in(&env, &other, "Deployment", "web").await;
    let _op = env.operator();
    // sent as raw JSON: the Rust type has no such field
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "slipstream.io/v1alpha1",
        "kind": "ConfigBinding",
        "metadata": {"name": "cross"},
        "spec": {"bucket": "app", "prefixes": ["web."], "target": {"rollout": {
            "workloads": [{"kind": "Deployment", "name": "web", "namespace": other}],
        }}},
    }))
    .unwrap();
    let ar = ApiResource::erase::<ConfigBinding>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), env.ns(), &ar);
    raw.create(&PostParams::default(), &obj).await.unwrap();
    let stored = raw.get("cross").await.unwrap();
    assert_eq!(
        stored.data["spec"]["target"]["rollout"]["workloads"][0]["namespace"],
        Value::String(other.clone()),
        "kept, not pruned: the operator sees what was asked"
    );
    let message = eventually("cross refused", || async {
        let b = raw.get("cross").await.ok()?;
        let ready = b.data["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?
            .clone();
        (ready["reason"] == "InvalidSpec" && ready["status"] == "False")
            .then(|| ready["message"].as_str().unwrap_or_default().to_owned())
    })
    .await;
    assert!(message.contains("namespace"), "{message}");
    wait_event(&env, "cross", "InvalidSpec").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let theirs = workloads(&env, "Deployment", &other)
        .get("web")
        .await
        .unwrap();
    assert_eq!(template_digest(&theirs, "cross"), None, "never touched");
    assert!(
        env.cm("cross").await.is_none(),
        "the refused binding writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_workload_is_a_condition_and_the_configmap_keeps_syncing() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "web.a", "1").await;
    let _op = env.operator();
    env.create_binding(
        "web",
        &spec("web.", "[{kind: Deployment, name: ghost}]", "1s"),
    )
    .await;
    wait_data(&env, "web", &map(&[("web.a", "1")])).await;
    let b = wait_rollout_reason(&env, "web", "WorkloadNotFound").await;
    let (status, _, message) = rollout_condition(&b).unwrap();
    assert_eq!(status, "False");
    assert!(message.contains("ghost"), "{message}");
    wait_event(&env, "web", "WorkloadNotFound").await;
    put(&kv, "web.a", "2").await;
    let cm = wait_data(&env, "web", &map(&[("web.a", "2")])).await;
    assert_eq!(
        ready_reason(&wait_reason(&env, "web", "Synced").await),
        "Synced"
    );

    // once it exists, it gets the current digest
    create_workload(&env, "Deployment", "ghost").await;
    wait_template(&env, "Deployment", "ghost", "web", &cm_digest(&cm)).await;
    let b = wait_rollout_reason(&env, "web", "RolledOut").await;
    assert_eq!(rollout_condition(&b).unwrap().0, "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_stops_rollouts_and_resume_rolls_the_latest() {
    let env = Env::start().await;
    let (kv, op, cm) = deployment_rolled_by_web(&env, "web.a", "1", "100ms").await;
    let first = cm_digest(&cm);
    wait_template(&env, "Deployment", "web", "web", &first).await;
    let suspend = |on: bool| {
        let bindings = env.bindings();
        async move {
            let patch = json!({"spec": {"suspend": on}});
            bindings
                .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    suspend(true).await;
    wait_reason(&env, "web", "Suspended").await;
    let from = env.api.requests().len();
    put(&kv, "web.a", "2").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rollout_patches(&env, from), 0, "suspended: no rollout");
    let obj = workload(&env, "Deployment", "web").await;
    assert_eq!(template_digest(&obj, "web"), Some(first));
    assert_eq!(op.metrics.rollout_count(env.ns(), "web"), 1);
    suspend(false).await;
    let cm = wait_data(&env, "web", &map(&[("web.a", "2")])).await;
    wait_template(&env, "Deployment", "web", "web", &cm_digest(&cm)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_min_interval_that_is_no_duration_is_refused_by_the_schema() {
    let env = Env::start().await;
    let spec: slipstream::crd::ConfigBindingSpec =
        serde_yaml::from_str(&spec("web.", "[{kind: Deployment, name: web}]", "soon")).unwrap();
    let err = env
        .bindings()
        .create(&PostParams::default(), &ConfigBinding::new("web", spec))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code, 422);
    assert!(status.message.contains("minInterval"), "{}", status.message);
}

/// Emulator only: the real server refuses a duplicate key of a list-map
/// itself; the operator's own check gives the same answer elsewhere.
mod emulator_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_workload_named_twice_is_refused_by_the_operator() {
        let env = Env::start().await;
        let kv = env.bucket("app").await;
        put(&kv, "web.a", "1").await;
        let _op = env.operator();
        let twice = "[{kind: Deployment, name: web}, {kind: Deployment, name: web}]";
        env.create_binding("web", &spec("web.", twice, "1s")).await;
        let b = wait_reason(&env, "web", "InvalidRollout").await;
        let ready = b.status.unwrap().condition("Ready").unwrap().clone();
        assert!(ready.message.contains("twice"), "{}", ready.message);
        wait_event(&env, "web", "InvalidRollout").await;
        assert!(env.cm("web").await.is_none());
    }
}
