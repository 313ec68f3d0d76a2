//! Keys that age out of a `max_age` bucket: `slipstream kv create-bucket
//! --max-age` makes the server leave a removal marker for each, so the
//! ConfigMap loses them too, live and across a restart.

use slipstream::kv::KvReader;

use crate::*;

/// Creates `bucket` the way a user would: `slipstream kv create-bucket --max-age`.
fn create_aging_bucket(env: &Env, bucket: &str, max_age: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slipstream"))
        .args(["kv", "--nats", &env.nats.url(), "--bucket", bucket])
        .args(["create-bucket", "--max-age", max_age])
        .output()
        .unwrap();
    assert!(out.status.success(), "kv create-bucket: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_aging_out_of_a_max_age_bucket_leave_the_configmap_live_and_across_a_restart() {
    let env = Env::start().await;
    create_aging_bucket(&env, "aging", "2s");
    let kv = env.kv.open("aging").await.unwrap();
    put(&kv, "a.old", "1").await;
    let op = env.operator();
    env.create_binding("a", "bucket: aging\nprefixes: [a.]")
        .await;
    wait_data(&env, "a", &map(&[("a.old", "1")])).await;
    // live: the key ages out of KV, then out of the ConfigMap
    wait_data(&env, "a", &map(&[])).await;
    assert!(kv.get("a.old").await.unwrap().is_none());
    wait_reason(&env, "a", "Synced").await;

    // while the operator is down: a key it wrote ages out, and so does
    // every record of it (the marker too), so a restart sees nothing of it
    let last = put(&kv, "a.gone", "1").await;
    wait_data(&env, "a", &map(&[("a.gone", "1")])).await;
    op.kill();
    eventually("every record up to a.gone's marker aged out", || async {
        let info = kv.info().await.ok()?;
        let first = info.first_revision.and_then(|r| r.as_u64());
        let newest = info.last_revision.and_then(|r| r.as_u64())?;
        (newest > last && first.is_none_or(|f| f > newest)).then_some(())
    })
    .await;
    let _op = env.operator();
    wait_data(&env, "a", &map(&[])).await;
    wait_reason(&env, "a", "Synced").await;
}
