//! The "Bad input" rows of issue 4: the binding gets a clear condition and
//! Event, other bindings keep syncing, nothing synced is lost.

use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use slipstream::{
    crd::{ConfigBinding, ConfigBindingSpec},
    kv::{KvWriter, nats::BucketConfig},
};

use crate::{common::NatsServer, *};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bucket_is_reported_and_recovers_once_created() {
    let env = Env::start().await;
    let _op = env.operator();
    env.create_binding("b", "bucket: later\nprefixes: [k.]")
        .await;
    let b = wait_reason(&env, "b", "BucketNotFound").await;
    assert_eq!(
        b.status.unwrap().condition("Ready").unwrap().status,
        "False"
    );
    wait_event(&env, "b", "BucketNotFound").await;
    let kv = env.bucket("later").await;
    put(&kv, "k.a", "1").await;
    wait_data(&env, "b", &map(&[("k.a", "1")])).await;
    wait_reason(&env, "b", "Synced").await;
}

/// The CRD's schema refuses a bad bucket name, an empty prefix list and a
/// prefix named twice (`x-kubernetes-list-type: set`) with a 422 on both
/// servers, so nothing reaches the operator. The operator's own checks of
/// what the schema refuses run in `loose_crd::emulator_only` (an older CRD
/// could let them in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bucket_name_zero_and_duplicate_prefixes_never_sync() {
    let env = Env::start().await;
    let _op = env.operator();
    for (name, yaml) in [
        ("badbucket", "bucket: 'no.dots'\nprefixes: [k.]"),
        ("noprefix", "bucket: app\nprefixes: []"),
        ("dup", "bucket: app\nprefixes: [k., k.]"),
    ] {
        let spec: ConfigBindingSpec = serde_yaml::from_str(yaml).unwrap();
        match env
            .bindings()
            .create(&PostParams::default(), &ConfigBinding::new(name, spec))
            .await
        {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{name}: {s:?}"),
            other => panic!("{name}: the CRD schema must refuse it, got {other:?}"),
        }
        assert!(env.cm(name).await.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_prefixes_sync_with_the_longest_match_and_say_so() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "a.x", "short").await;
    put(&kv, "a.b.y", "long").await;
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [a., a.b.]\nstripPrefix: true")
        .await;
    wait_data(&env, "b", &map(&[("x", "short"), ("y", "long")])).await;
    let b = wait_reason(&env, "b", "Synced").await;
    let msg = b
        .status
        .unwrap()
        .condition("Ready")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("overlapping prefixes"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_binding_on_one_configmap_gets_target_conflict_first_keeps_syncing() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "one.a", "1").await;
    put(&kv, "two.a", "2").await;
    let _op = env.operator();
    env.create_binding(
        "first",
        "bucket: app\nprefixes: [one.]\ntarget: {name: shared}",
    )
    .await;
    wait_data(&env, "shared", &map(&[("one.a", "1")])).await;
    env.create_binding(
        "second",
        "bucket: app\nprefixes: [two.]\ntarget: {name: shared}",
    )
    .await;
    let b = wait_reason(&env, "second", "TargetConflict").await;
    assert!(
        b.status
            .unwrap()
            .condition("Ready")
            .unwrap()
            .message
            .contains("first")
    );
    put(&kv, "one.a", "1b").await;
    wait_data(&env, "shared", &map(&[("one.a", "1b")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_are_escaped_skipped_or_fail_by_key_policy() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "k.ok", "1").await;
    put(&kv, "k.a/b=c", "2").await;
    let _op = env.operator();
    env.create_binding(
        "esc",
        "bucket: app\nprefixes: [k.]\nstripPrefix: true\nkeyPolicy: Escape",
    )
    .await;
    env.create_binding(
        "skip",
        "bucket: app\nprefixes: [k.]\nstripPrefix: true\nkeyPolicy: Skip",
    )
    .await;
    env.create_binding(
        "fail",
        "bucket: app\nprefixes: [k.]\nstripPrefix: true\nkeyPolicy: Fail",
    )
    .await;
    wait_data(&env, "esc", &map(&[("ok", "1"), ("a_2Fb_3Dc", "2")])).await;
    wait_data(&env, "skip", &map(&[("ok", "1")])).await;
    let skip = eventually("skipped keys in status", || async {
        let b = env.binding("skip").await;
        let s = b.status?;
        (!s.skipped_keys.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(skip.skipped_keys, ["k.a/b=c"]);
    assert_eq!(skip.skipped_count, Some(1));
    let fail = wait_reason(&env, "fail", "InvalidKey").await;
    assert!(
        fail.status
            .unwrap()
            .condition("Ready")
            .unwrap()
            .message
            .contains("k.a/b=c")
    );
    assert!(env.cm("fail").await.is_none(), "nothing partial is written");
    kv.delete("k.a/b=c").await.unwrap();
    wait_data(&env, "fail", &map(&[("ok", "1")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_values_go_to_binary_data() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    kv.put("k.bin", Bytes::from_static(&[0xff, 0x00, 0xfe]))
        .await
        .unwrap();
    put(&kv, "k.txt", "héllo").await;
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]\nstripPrefix: true")
        .await;
    let cm = wait_data(&env, "b", &map(&[("txt", "héllo")])).await;
    let bin = cm.binary_data.unwrap_or_default();
    assert_eq!(bin.get("bin"), Some(&ByteString(vec![0xff, 0x00, 0xfe])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_at_start_reports_and_recovers_when_it_comes_up() {
    let mut env = Scenario::new().nats_down().start().await;
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    let b = eventually("not ready while NATS is down", || async {
        let b = env.binding("b").await;
        let c = b.status.as_ref()?.condition("Ready")?.clone();
        (c.status == "False" && c.reason != "Syncing").then_some(b)
    })
    .await;
    let reason = ready_reason(&b);
    assert!(
        ["ConnectionFailed", "NotConnected", "Timeout"].contains(&reason.as_str()),
        "{reason}"
    );
    env.nats.restart();
    let kv = env.reconnect().await.bucket("app").await;
    put(&kv, "k.a", "1").await;
    wait_data(&env, "b", &map(&[("k.a", "1")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_nats_credentials_are_reported() {
    let nats = NatsServer::start_with_config("authorization { token: \"right\" }");
    let env = Scenario::new().nats(nats).token("right").start().await;
    // the bucket exists: only the credentials can be what fails
    let kv = env.bucket("app").await;
    put(&kv, "k.a", "1").await;
    let _op = env
        .operator_builder()
        .nats_url(&format!("nats://wrong@127.0.0.1:{}", env.nats.port()))
        .start();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    let b = eventually("credentials error", || async {
        let b = env.binding("b").await;
        let c = b.status.as_ref()?.condition("Ready")?.clone();
        (c.status == "False" && c.reason != "Syncing").then_some(b)
    })
    .await;
    let ready = b.status.unwrap().condition("Ready").unwrap().clone();
    assert_ne!(ready.reason, "BucketNotFound", "{ready:?}");
    assert!(
        ready.message.to_lowercase().contains("author"),
        "the message names the authorization failure: {ready:?}"
    );
    assert!(env.cm("b").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_deleted_while_bound_keeps_content_and_others_keep_syncing() {
    let env = Env::start().await;
    let kv = env.bucket("doomed").await;
    let other = env.bucket("other").await;
    put(&kv, "k.a", "1").await;
    let _op = env.operator();
    env.create_binding("b", "bucket: doomed\nprefixes: [k.]")
        .await;
    env.create_binding("o", "bucket: other\nprefixes: [k.]")
        .await;
    wait_data(&env, "b", &map(&[("k.a", "1")])).await;
    env.kv.delete_bucket("doomed").await.unwrap();
    wait_reason(&env, "b", "BucketNotFound").await;
    assert_eq!(
        data(&env.cm("b").await.unwrap()),
        map(&[("k.a", "1")]),
        "last content kept"
    );
    put(&other, "k.x", "1").await;
    wait_data(&env, "o", &map(&[("k.x", "1")])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_deleted_mid_burst_leaves_no_configmap_behind() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    put(&kv, "k.first", "1").await;
    wait_data(&env, "b", &map(&[("k.first", "1")])).await;
    let writer = {
        let kv = env
            .kv
            .create_or_open(&BucketConfig::new("app"))
            .await
            .unwrap();
        tokio::spawn(async move {
            for i in 0..300 {
                put(&kv, &format!("k.{}", i % 10), &i.to_string()).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    env.delete_binding("b").await;
    writer.await.unwrap();
    eventually("binding and ConfigMap gone", || async {
        let b = env.bindings().get_opt("b").await.unwrap();
        (b.is_none() && env.cm("b").await.is_none()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        env.cm("b").await.is_none(),
        "no write after the binding went"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_value_over_1_mib_is_not_written_and_the_last_good_content_stays() {
    // nats-server refuses payloads over 1 MB unless told otherwise
    let env = Scenario::new()
        .nats(NatsServer::start_with_config("max_payload: 4MB"))
        .start()
        .await;
    let kv = env.bucket("app").await;
    put(&kv, "k.small", "ok").await;
    let _op = env.operator();
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    env.create_binding("other", "bucket: app\nprefixes: [o.]")
        .await;
    wait_data(&env, "b", &map(&[("k.small", "ok")])).await;
    let huge = "x".repeat(1024 * 1024 + 1);
    put(&kv, "k.huge", &huge).await;
    let b = wait_reason(&env, "b", "TooLarge").await;
    assert_eq!(
        b.status.unwrap().condition("Ready").unwrap().status,
        "False"
    );
    wait_event(&env, "b", "TooLarge").await;
    put(&kv, "o.x", "1").await;
    wait_data(&env, "other", &map(&[("o.x", "1")])).await;
    assert_eq!(
        data(&env.cm("b").await.unwrap()),
        map(&[("k.small", "ok")]),
        "the last good content stays"
    );
    kv.delete("k.huge").await.unwrap();
    put(&kv, "k.after", "2").await;
    wait_data(&env, "b", &map(&[("k.small", "ok"), ("k.after", "2")])).await;
    wait_reason(&env, "b", "Synced").await;
}
