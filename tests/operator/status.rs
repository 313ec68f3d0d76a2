//! Status writes: cursor-only changes wait for `status_interval`, condition
//! changes go out at once, and the last change is always written.

use std::time::Duration;

use slipstream::kv::nats::NatsBucket;

use crate::*;

/// An in-process operator with its own status interval.
fn operator(env: &Env, status_interval: Duration) -> Operator {
    env.operator_builder()
        .status_interval(status_interval)
        .start()
}

/// Successful status patches of binding `name` so far.
fn status_writes(env: &Env, name: &str) -> usize {
    env.api
        .requests()
        .iter()
        .filter(|r| {
            r.verb == "patch"
                && r.resource == "configbindings"
                && r.subresource == "status"
                && r.name == name
                && (200..300).contains(&r.status)
        })
        .count()
}

async fn status_cursor(env: &Env, name: &str) -> Option<String> {
    env.binding(name).await.status?.cursor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_binding_writes_status_at_most_once_per_interval_and_the_last_cursor_always() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "k.a", "0").await;
    let interval = Duration::from_millis(700);
    let op = operator(&env, interval);
    env.create_binding("b", "bucket: app\nprefixes: [k.]").await;
    wait_data(&env, "b", &map(&[("k.a", "0")])).await;
    wait_reason(&env, "b", "Synced").await;
    // let any trailing write of the start go out
    tokio::time::sleep(interval * 2).await;
    let status_before = status_writes(&env, "b");
    let cm_before = op.metrics.write_count(env.ns(), "b");
    let started = std::time::Instant::now();
    for i in 1..=20 {
        put(&kv, "k.a", &i.to_string()).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let cm = wait_data(&env, "b", &map(&[("k.a", "20")])).await;
    let last = cursor(&cm).unwrap().to_string();
    // the trailing write brings status.cursor to the ConfigMap's cursor
    eventually("status.cursor reaches the ConfigMap's cursor", || async {
        (status_cursor(&env, "b").await.as_deref() == Some(last.as_str())).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    let status = status_writes(&env, "b") - status_before;
    let cm_writes = op.metrics.write_count(env.ns(), "b") - cm_before;
    let allowed = (elapsed.as_secs_f64() / interval.as_secs_f64()).floor() as usize + 1;
    assert!(
        status <= allowed,
        "{status} status writes in {elapsed:?} with a {interval:?} interval (at most {allowed})"
    );
    assert!(
        cm_writes > status as u64,
        "{cm_writes} ConfigMap writes, {status} status writes: status must be written less often"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condition_change_is_written_at_once_with_the_deferred_cursor() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "a.x", "1").await;
    // an interval far longer than the test: only urgent writes can happen
    let _op = operator(&env, Duration::from_secs(3600));
    env.create_binding("b", "bucket: app\nprefixes: [a., b.]\nstripPrefix: true")
        .await;
    let cm = wait_data(&env, "b", &map(&[("x", "1")])).await;
    let first = cursor(&cm).unwrap().to_string();
    wait_reason(&env, "b", "Synced").await;
    assert_eq!(
        status_cursor(&env, "b").await.as_deref(),
        Some(first.as_str())
    );
    let writes = status_writes(&env, "b");
    put(&kv, "a.x", "2").await;
    let cm = wait_data(&env, "b", &map(&[("x", "2")])).await;
    let second = cursor(&cm).unwrap().to_string();
    // the ConfigMap moved; status waits for the interval
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status_writes(&env, "b"),
        writes,
        "cursor-only change deferred"
    );
    assert_eq!(
        status_cursor(&env, "b").await.as_deref(),
        Some(first.as_str())
    );
    // a collision is a condition change: written at once, cursor included
    put(&kv, "b.x", "3").await;
    let b = wait_reason(&env, "b", "KeyCollision").await;
    assert_eq!(b.status.unwrap().cursor.as_deref(), Some(second.as_str()));
    wait_event(&env, "b", "KeyCollision").await;
}

/// Bindings that keep the API full in the tests below.
const BUSY: usize = 8;

/// Creates bindings `b0`..`b7` on prefixes `p0.`..`p7.` of bucket `app`,
/// waits until they are synced by an operator started with one API permit
/// (so any ConfigMap write in flight fills the API), then puts 40 ms of
/// latency on every API write.
async fn fill_the_api_with_bindings(env: &Env) {
    for i in 0..BUSY {
        env.create_binding(&format!("b{i}"), &format!("bucket: app\nprefixes: [p{i}.]"))
            .await;
    }
    for i in 0..BUSY {
        wait_reason(env, &format!("b{i}"), "Synced").await;
    }
    env.api
        .faults()
        .set_write_latency(Duration::from_millis(40));
}

/// Puts `rounds` new values into every busy binding, one round per 100 ms:
/// 8 writes of 40 ms wanted per 100 ms keep the API full.
async fn keep_the_api_full(kv: NatsBucket, rounds: u32) {
    for round in 1..=rounds {
        for i in 0..BUSY {
            put(&kv, &format!("p{i}.k"), &round.to_string()).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bucket `app` with one key under each busy binding's prefix.
async fn busy_bucket(env: &Env) -> NatsBucket {
    let kv = env.bucket("app").await;
    for i in 0..BUSY {
        put(&kv, &format!("p{i}.k"), "0").await;
    }
    kv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_waits_while_configmap_writes_fill_the_api_then_mirrors_every_cursor() {
    let env = Env::start().await;
    let kv = busy_bucket(&env).await;
    let op = env
        .operator_builder()
        .status_interval(Duration::from_millis(200))
        .api_concurrency(1)
        .start();
    fill_the_api_with_bindings(&env).await;
    keep_the_api_full(kv.clone(), 20).await;
    let deferred = op.metrics.deferred_status_writes.get();
    assert!(
        deferred > 0,
        "no status write gave way to the ConfigMap writes"
    );
    env.api.faults().set_write_latency(Duration::ZERO);
    // with the API free again every status catches up with its ConfigMap
    for i in 0..BUSY {
        let name = format!("b{i}");
        let key = format!("p{i}.k");
        let cm = wait_data(&env, &name, &map(&[(key.as_str(), "20")])).await;
        let want = cursor(&cm).unwrap().to_string();
        eventually("status.cursor mirrors the ConfigMap's cursor", || async {
            (status_cursor(&env, &name).await.as_deref() == Some(want.as_str())).then_some(())
        })
        .await;
    }
}

/// Churn: the writes of a new binding (its first ConfigMap write; for a
/// Retain binding its finalizer first) wait while the live bindings'
/// ConfigMap writes fill the API (at most a few seconds), then it syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_bindings_writes_give_way_to_live_data_writes_then_it_syncs() {
    let env = Env::start().await;
    let kv = busy_bucket(&env).await;
    put(&kv, "late.k", "1").await;
    let op = env.operator_builder().api_concurrency(1).start();
    fill_the_api_with_bindings(&env).await;
    let load = tokio::spawn(keep_the_api_full(kv.clone(), 30));
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.create_binding("late", "bucket: app\nprefixes: [late.]")
        .await;
    wait_reason(&env, "late", "Synced").await;
    let first_write = op.metrics.deferred_churn_writes.get();
    assert!(
        first_write > 0,
        "the new binding's first write did not give way to the ConfigMap writes"
    );
    load.await.unwrap();
    // long enough for both: the finalizer waits at most 5 s, then the
    // first write finds the live data still writing
    let load = tokio::spawn(keep_the_api_full(kv.clone(), 80));
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.create_binding(
        "kept",
        "bucket: app\nprefixes: [late.]\ntarget: {deletionPolicy: Retain}",
    )
    .await;
    wait_reason(&env, "kept", "Synced").await;
    assert!(
        op.metrics.deferred_churn_writes.get() >= first_write + 2,
        "the Retain binding's finalizer and first write did not both give way"
    );
    load.await.unwrap();
    env.api.faults().set_write_latency(Duration::ZERO);
}

/// An Event for each change a user needs to see: a failure and the recovery
/// from it, but not the first sync of a new binding, which the Ready
/// condition already tells (a cold start of N bindings would otherwise cost
/// N Event writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_a_failure_and_its_recovery_but_not_a_first_sync() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    put(&kv, "k.a", "1").await;
    let _op = env.operator();
    env.create_binding("fresh", "bucket: app\nprefixes: [k.]")
        .await;
    env.create_binding("late", "bucket: later\nprefixes: [k.]")
        .await;
    wait_reason(&env, "fresh", "Synced").await;
    wait_event(&env, "late", "BucketNotFound").await;
    let later = env.bucket("later").await;
    put(&later, "k.b", "2").await;
    wait_reason(&env, "late", "Synced").await;
    wait_event(&env, "late", "Synced").await;
    // fresh's first sync came well before late's recovery was announced
    assert_eq!(event_reasons(&env, "fresh").await, Vec::<String>::new());
}
