//! One test per DESIGN.md invariant; each fails when its invariant breaks.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use apiserver::FaultRule;
use bytes::Bytes;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use slipstream::{
    crd::ConfigBinding,
    kv::{
        KvReader, KvWriter,
        nats::{BucketConfig, NatsBucket},
    },
    policy::AccessPolicy,
    sink::configmap::CURSOR_ANNOTATION,
};

use crate::*;

type Versions = Arc<Mutex<Vec<(Option<u64>, BTreeMap<String, String>)>>>;

/// Records every version of a ConfigMap the emulator serves: (cursor, data).
fn record_versions(env: &Env, name: &str) -> Versions {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api = env.configmaps();
    let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let out = seen.clone();
    tokio::spawn(async move {
        // backoff: once the emulator is gone, errors must not spin the runtime
        let mut s = watcher(api, wc).default_backoff().boxed();
        while let Some(ev) = s.next().await {
            if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = ev {
                out.lock().unwrap().push((cursor(&cm), data(&cm)));
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_1_every_written_cursor_matches_the_kv_state_at_that_revision() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    let _op = env
        .operator_builder()
        .coalesce(Duration::from_millis(5))
        .start();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    eventually("empty ConfigMap", || async { env.cm("b").await }).await;
    let versions = record_versions(&env, "b");
    // truth: the KV state after each revision
    let mut truth: BTreeMap<u64, BTreeMap<String, String>> = BTreeMap::new();
    let mut state = BTreeMap::new();
    for i in 0..300u32 {
        let key = format!("k.{}", i % 7);
        let rev = if i % 5 == 4 {
            state.remove(&key);
            kv.delete(&key).await.unwrap().as_u64().unwrap()
        } else {
            let v = format!("v{i}");
            state.insert(key.clone(), v.clone());
            put(&kv, &key, &v).await
        };
        truth.insert(rev, state.clone());
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    wait_data(&env, "b", &state).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let versions = versions.lock().unwrap().clone();
    assert!(versions.len() > 2, "the burst was written in several steps");
    let mut last = 0;
    for (c, d) in versions {
        let Some(c) = c else { continue };
        assert!(c >= last, "cursor went backward: {last} -> {c}");
        last = c;
        let at = truth
            .range(..=c)
            .next_back()
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        assert_eq!(d, at, "ConfigMap at cursor {c} is not the KV state at {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_1_a_failed_write_does_not_advance_the_cursor() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "k.a", "1").await;
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    let cm = wait_data(&env, "b", &map(&[("k.a", "1")])).await;
    let before = cursor(&cm).unwrap();
    env.api
        .faults()
        .add(FaultRule::new(500, 3).verb("patch").resource("configmaps"));
    put(&kv, "k.a", "2").await;
    let b = wait_reason(&env, "b", "KubernetesError").await;
    assert_eq!(b.status.unwrap().cursor, Some(before.to_string()));
    assert_eq!(cursor(&env.cm("b").await.unwrap()), Some(before));
    let cm = wait_data(&env, "b", &map(&[("k.a", "2")])).await;
    assert!(cursor(&cm).unwrap() > before);
    wait_reason(&env, "b", "Synced").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_2_a_configmap_holding_a_newer_cursor_is_never_overwritten() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "k.a", "1").await;
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    wait_data(&env, "b", &map(&[("k.a", "1")])).await;
    // revisions this binding has no reason to look at (other prefixes)
    let mut newest = 0;
    for i in 0..9 {
        newest = put(&kv, &format!("other.k{i}"), "x").await;
    }
    // another writer (e.g. a second replica) already wrote the bucket's
    // newest revision, which this replica has not reached
    let newer = serde_json::json!({
        "metadata": {"annotations": {CURSOR_ANNOTATION: newest.to_string()}},
        "data": {"k.a": "from-the-future"}
    });
    env.configmaps()
        .patch("b", &PatchParams::default(), &Patch::Merge(&newer))
        .await
        .unwrap();
    wait_reason(&env, "b", "StaleWriter").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cm = env.cm("b").await.unwrap();
    assert_eq!(cursor(&cm), Some(newest));
    assert_eq!(data(&cm), map(&[("k.a", "from-the-future")]));
}

async fn expire_cursor_scenario(config: BucketConfig, age_out: bool) -> (Env, ConfigBinding) {
    let env = Env::start().await;
    let kv: NatsBucket = env.kv.create_or_open(&config).await.unwrap();
    put(&kv, "k.a", "1").await;
    put(&kv, "k.b", "1").await;
    let op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    wait_data(&env, "b", &map(&[("k.a", "1"), ("k.b", "1")])).await;
    op.kill();
    if age_out {
        let tombstone = kv.delete("k.b").await.unwrap().as_u64().unwrap();
        // everything written so far, the tombstone included, ages out:
        // wait for the stream to say so, not for the clock
        eventually("the tombstone aged out of the stream", || async {
            let info = kv.info().await.unwrap();
            let first = info.first_revision.map(|r| r.as_u64().unwrap());
            first.is_none_or(|f| f > tombstone).then_some(())
        })
        .await;
        put(&kv, "k.a", "x").await;
        put(&kv, "k.a", "2").await;
    } else {
        // history 1: rewriting k.a drops the revision right after the cursor
        put(&kv, "k.a", "x").await;
        put(&kv, "k.a", "2").await;
        kv.delete("k.b").await.unwrap();
    }
    put(&kv, "k.c", "3").await;
    let op = env.operator();
    let b = wait_reason_any(&env, "b", &["Synced", "ResyncedWithoutPrune"]).await;
    assert!(
        op.metrics
            .errors
            .get(&slipstream::metrics::ReasonLabels {
                reason: "CursorExpired".into()
            })
            .is_some(),
        "the resume hit CursorExpired"
    );
    std::mem::forget(op);
    (env, b)
}

async fn wait_reason_any(env: &Env, name: &str, reasons: &[&str]) -> ConfigBinding {
    eventually("binding synced after repair", || async {
        let b = env.binding(name).await;
        let cm = env.cm(name).await?;
        let synced = data(&cm).get("k.c").map(String::as_str) == Some("3");
        // status written after that ConfigMap write, not a reason left from before
        let current = b.status.as_ref()?.cursor.as_deref()? == cursor(&cm)?.to_string();
        (synced && current && reasons.contains(&ready_reason(&b).as_str())).then_some(b)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_3_expired_cursor_on_a_bucket_keeping_values_resyncs_and_prunes() {
    let (env, b) = expire_cursor_scenario(BucketConfig::new("app"), false).await;
    assert_eq!(ready_reason(&b), "Synced");
    let cm = env.cm("b").await.unwrap();
    assert_eq!(
        data(&cm),
        map(&[("k.a", "2"), ("k.c", "3")]),
        "deleted k.b is pruned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_3_expired_cursor_on_an_aging_bucket_does_not_prune_and_says_so() {
    let mut config = BucketConfig::new("app");
    config.max_age = Some(Duration::from_secs(2));
    let (env, b) = expire_cursor_scenario(config, true).await;
    assert_eq!(ready_reason(&b), "ResyncedWithoutPrune");
    let message = b
        .status
        .unwrap()
        .condition("Ready")
        .unwrap()
        .message
        .clone();
    assert!(message.contains("may linger"), "{message}");
    let cm = env.cm("b").await.unwrap();
    assert_eq!(
        data(&cm),
        map(&[("k.a", "2"), ("k.b", "1"), ("k.c", "3")]),
        "k.b's tombstone aged out: deleted and aged out look the same, so k.b stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_3_delete_purge_ttl_and_cas_tombstones_remove_keys() {
    let env = Env::start().await;
    let mut config = BucketConfig::new("app");
    config.limit_markers = Some(Duration::from_secs(60));
    let kv = env.kv.create_or_open(&config).await.unwrap();
    for k in ["del", "purge", "ttl", "cas", "stay"] {
        put(&kv, &format!("k.{k}"), "1").await;
    }
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]\nstripPrefix: true")
        .await;
    eventually("5 keys", || async {
        env.cm("b").await.filter(|c| data(c).len() == 5)
    })
    .await;
    use slipstream::kv::{KvPurge, KvTtl};
    kv.delete("k.del").await.unwrap();
    kv.purge("k.purge").await.unwrap();
    let cas = kv.get("k.cas").await.unwrap().unwrap().version;
    kv.delete_with_version("k.cas", cas).await.unwrap();
    kv.put_with_ttl(
        "k.ttl",
        Bytes::from_static(b"short"),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let want = map(&[("stay", "1")]);
    let got = eventually("only k.stay left", || async {
        let cm = env.cm("b").await?;
        let d = data(&cm);
        (d == want).then_some(d)
    })
    .await;
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_4_too_large_content_is_not_written_and_recovers_when_back_under() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "k.small", "ok").await;
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]\nstripPrefix: true")
        .await;
    env.create_binding("other", "bucket: app\nprefixes: [o.]")
        .await;
    wait_data(&env, "b", &map(&[("small", "ok")])).await;
    let big = "x".repeat(600 * 1024);
    put(&kv, "k.big1", &big).await;
    put(&kv, "k.big2", &big).await;
    let b = wait_reason(&env, "b", "TooLarge").await;
    let cond = b.status.unwrap().condition("Ready").unwrap().clone();
    assert_eq!(cond.status, "False");
    assert!(
        cond.message.contains("last good content"),
        "{}",
        cond.message
    );
    wait_event(&env, "b", "TooLarge").await;
    // other bindings keep syncing
    put(&kv, "o.x", "1").await;
    wait_data(&env, "other", &map(&[("o.x", "1")])).await;
    let cm = env.cm("b").await.unwrap();
    assert!(
        data(&cm) == map(&[("small", "ok")])
            || data(&cm) == map(&[("small", "ok"), ("big1", &big)]),
        "never over the limit"
    );
    kv.delete("k.big2").await.unwrap();
    wait_data(&env, "b", &map(&[("small", "ok"), ("big1", &big)])).await;
    wait_reason(&env, "b", "Synced").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_4_colliding_keys_are_not_written_and_the_condition_names_both() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "a.x", "1").await;
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [a., b.]\nstripPrefix: true")
        .await;
    wait_data(&env, "b", &map(&[("x", "1")])).await;
    put(&kv, "b.x", "2").await;
    let b = wait_reason(&env, "b", "KeyCollision").await;
    let msg = b
        .status
        .unwrap()
        .condition("Ready")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("a.x") && msg.contains("b.x"), "{msg}");
    assert_eq!(data(&env.cm("b").await.unwrap()), map(&[("x", "1")]));
    kv.delete("a.x").await.unwrap();
    wait_data(&env, "b", &map(&[("x", "2")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_5_reputting_the_same_value_costs_no_api_write() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "k.a", "same").await;
    let op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    wait_data(&env, "b", &map(&[("k.a", "same")])).await;
    wait_reason(&env, "b", "Synced").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let writes_before = env.api.counters().writes;
    let cm_writes_before = op.metrics.write_count(env.ns(), "b");
    let version_before = env.cm("b").await.unwrap().metadata.resource_version;
    for _ in 0..20 {
        put(&kv, "k.a", "same").await;
    }
    put(&kv, "z.not-mine", "x").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(op.metrics.write_count(env.ns(), "b"), cm_writes_before);
    assert_eq!(
        env.api.counters().writes,
        writes_before,
        "no API write at all"
    );
    assert_eq!(
        env.cm("b").await.unwrap().metadata.resource_version,
        version_before,
        "the ConfigMap was not stored again"
    );
    // a real change is still written
    put(&kv, "k.a", "changed").await;
    wait_data(&env, "b", &map(&[("k.a", "changed")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_6_sixty_bindings_on_one_bucket_share_one_consumer() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    for i in 0..60 {
        put(&kv, &format!("p{i}.k"), &format!("{i}")).await;
    }
    let op = env.operator();
    for i in 0..60 {
        env.create_binding(&format!("b{i}"), &format!("bucket: app\nprefixes: [p{i}.]"))
            .await;
    }
    for i in 0..60 {
        wait_data(
            &env,
            &format!("b{i}"),
            &map(&[(&format!("p{i}.k"), &format!("{i}"))]),
        )
        .await;
    }
    let consumers = eventually("catch-up consumers closed", || async {
        let n = kv.consumer_count().await.unwrap();
        (n == 1).then_some(n)
    })
    .await;
    assert_eq!(consumers, 1);
    assert_eq!(op.ctx.hub.bucket_count(), 1);
    // live updates still reach every binding through the one consumer
    put(&kv, "p59.k", "live").await;
    wait_data(&env, "b59", &map(&[("p59.k", "live")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_7_access_denied_reads_nothing_and_writes_only_in_own_namespace() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "secret.k", "s").await;
    put(&kv, "web.k", "w").await;
    let team = env.other_namespace("team").await;
    let policy = format!(
        "namespaces:\n  {}:\n    - bucket: app\n      prefixes: [web.]\n  {team}:\n    - bucket: app\n      prefixes: [web.]\n",
        env.ns()
    );
    let policy = || AccessPolicy::from_yaml(&policy, "test").unwrap();
    // One operator for both namespaces on the emulator; on the shared real
    // control plane an operator watches one namespace, so each gets its own.
    let (op, _team_op) = if env.api.is_real() {
        let team_op = env
            .operator_builder()
            .policy(policy())
            .namespace(&team)
            .start();
        (
            env.operator_builder().policy(policy()).start(),
            Some(team_op),
        )
    } else {
        let op = env
            .operator_builder()
            .policy(policy())
            .all_namespaces()
            .start();
        (op, None)
    };
    env.create_binding("denied", "bucket: app\nprefixes: [web., secret.]")
        .await;
    env.create_binding("allowed", "bucket: app\nprefixes: [web.]")
        .await;
    let b = wait_reason(&env, "denied", "AccessDenied").await;
    let s = b.status.unwrap();
    assert_eq!(s.condition("Stalled").unwrap().status, "True");
    assert!(s.condition("Ready").unwrap().message.contains("secret."));
    wait_event(&env, "denied", "AccessDenied").await;
    wait_data(&env, "allowed", &map(&[("web.k", "w")])).await;
    assert!(env.cm("denied").await.is_none());
    assert_eq!(op.ctx.worker_count(), 1, "a denied binding runs no watch");
    // a binding in namespace `team` writes its ConfigMap in `team` only
    let spec =
        serde_yaml::from_str("bucket: app\nprefixes: [web.]\ntarget: {name: allowed}").unwrap();
    let tb = slipstream::crd::ConfigBinding::new("t", spec);
    let team_bindings: Api<slipstream::crd::ConfigBinding> =
        Api::namespaced(env.client.clone(), &team);
    team_bindings
        .create(&PostParams::default(), &tb)
        .await
        .unwrap();
    let team_cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &team);
    eventually("team ConfigMap", || async {
        team_cms
            .get_opt("allowed")
            .await
            .unwrap()
            .filter(|c| data(c) == map(&[("web.k", "w")]))
    })
    .await;
    let own_cm = env.cm("allowed").await.unwrap();
    assert_eq!(
        own_cm.metadata.annotations.unwrap()["slipstream.io/binding"],
        "allowed",
        "the team binding never touched the test namespace's ConfigMap"
    );
}
