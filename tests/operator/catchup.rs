//! Catch-up as a hub service: bindings that start or restart together
//! share one scan per bucket, so NATS consumers stay at one live watch plus
//! at most two catch-up scans per bucket, and a restart still delivers only
//! what changed.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use slipstream::{
    kv::{KvWriter, nats::NatsBucket},
    metrics::ReasonLabels,
};

use crate::*;

/// Samples the bucket stream's consumer count every few ms and keeps the
/// peak, until dropped.
struct ConsumerPeak {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl ConsumerPeak {
    fn start(kv: &NatsBucket) -> Self {
        let peak = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (kv, p, s) = (kv.clone(), peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = kv.consumer_count().await {
                    p.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Self { peak, stop }
    }

    fn take(&self) -> usize {
        self.peak.swap(0, Ordering::Relaxed)
    }
}

impl Drop for ConsumerPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn cursor_expired_count(op: &Operator) -> u64 {
    op.metrics
        .errors
        .get(&ReasonLabels {
            reason: "CursorExpired".into(),
        })
        .map(|c| c.get())
        .unwrap_or(0)
}

/// `n` bindings `b000..` on bucket `app`, binding i on prefix `p{i}.`.
async fn create_bindings(env: &Env, n: usize) {
    for i in 0..n {
        env.create_binding(
            &format!("b{i:03}"),
            &format!("bucket: app\nprefixes: [p{i:03}.]"),
        )
        .await;
    }
}

/// Waits until every binding's ConfigMap holds exactly `truth[i]`.
async fn wait_all(env: &Env, truth: &[BTreeMap<String, String>]) {
    for (i, want) in truth.iter().enumerate() {
        wait_data(env, &format!("b{i:03}"), want).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_bindings_created_together_share_scans_within_three_consumers() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    let mut truth = Vec::new();
    for i in 0..200 {
        let mut want = BTreeMap::new();
        for k in 0..5 {
            let key = format!("p{i:03}.k{k}");
            put(&kv, &key, &format!("{i}-{k}")).await;
            want.insert(key, format!("{i}-{k}"));
        }
        truth.push(want);
    }
    put(&kv, "unbound.k", "nobody asks for this").await;
    let peak = ConsumerPeak::start(&kv);
    let op = env.operator();
    create_bindings(&env, 200).await;
    wait_all(&env, &truth).await;
    for i in 0..200 {
        wait_reason(&env, &format!("b{i:03}"), "Synced").await;
    }
    let during = peak.take();
    assert!(
        during <= 3,
        "one live watch plus at most a full and a delta scan, whatever the number of bindings: peak {during}"
    );
    assert_eq!(
        op.metrics.delivered_count("app", "catchup"),
        1000,
        "each binding's keys were scanned once, and no key outside their prefixes"
    );
    eventually("catch-up consumers closed", || async {
        (kv.consumer_count().await.unwrap() == 1).then_some(())
    })
    .await;
    // live updates still fan out through the one consumer
    put(&kv, "p199.k0", "live").await;
    truth[199].insert("p199.k0".into(), "live".into());
    wait_data(&env, "b199", &truth[199]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_one_hundred_bindings_with_spread_cursors_delivers_only_the_changes_made_while_down()
 {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    let mut truth = Vec::new();
    for i in 0..100 {
        let mut want = BTreeMap::new();
        for k in 0..10 {
            let key = format!("p{i:03}.k{k}");
            put(&kv, &key, "v0").await;
            want.insert(key, "v0".to_string());
        }
        truth.push(want);
    }
    let op = env.operator();
    create_bindings(&env, 100).await;
    wait_all(&env, &truth).await;
    assert_eq!(op.metrics.delivered_count("app", "catchup"), 1000);
    // live writes to every fifth binding give them cursors of their own
    for i in (0..100).step_by(5) {
        let key = format!("p{i:03}.k0");
        put(&kv, &key, "live").await;
        truth[i].insert(key, "live".into());
        wait_data(&env, &format!("b{i:03}"), &truth[i]).await;
    }
    op.kill();

    // 60 puts and 7 deletes spread over the bindings while the operator is down
    let mut changes = 0;
    for n in 0..60usize {
        let (i, k) = ((n * 37) % 100, (n * 7) % 10);
        let key = format!("p{i:03}.k{k}");
        put(&kv, &key, &format!("v{n}")).await;
        truth[i].insert(key, format!("v{n}"));
        changes += 1;
    }
    for i in [3usize, 14, 15, 92, 65, 35, 89] {
        let key = format!("p{i:03}.k9");
        kv.delete(&key).await.unwrap();
        truth[i].remove(&key);
        changes += 1;
    }
    let peak = ConsumerPeak::start(&kv);
    let op = env.operator();
    wait_all(&env, &truth).await;
    let during = peak.take();
    // each binding has a few changes: read record by record, so nothing but
    // the bucket's live watch holds a consumer
    assert!(during <= 1, "restart consumers peak {during}");
    assert_eq!(
        op.metrics.delivered_count("app", "catchup"),
        changes,
        "the resume delivered each change made while down once, nothing older"
    );
    assert_eq!(cursor_expired_count(&op), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_cursor_fails_only_its_own_binding_in_a_shared_restart() {
    let env = Env::start().await;
    let kv = env.bucket("app").await; // history 1: a rewrite drops the old revision
    put(&kv, "a.k", "1").await; // 1
    put(&kv, "b.k", "1").await; // 2
    let op = env.operator();
    env.create_binding("old", "bucket: app\nprefixes: [a.]")
        .await;
    env.create_binding("new", "bucket: app\nprefixes: [b.]")
        .await;
    wait_data(&env, "old", &map(&[("a.k", "1")])).await;
    put(&kv, "b.k", "2").await; // 3
    let four = put(&kv, "b.k", "3").await; // 4
    let cm = wait_data(&env, "new", &map(&[("b.k", "3")])).await;
    let cm = if cursor(&cm) == Some(four) {
        cm
    } else {
        eventually("new's cursor at 4", || async {
            env.cm("new").await.filter(|c| cursor(c) == Some(four))
        })
        .await
    };
    assert_eq!(cursor(&cm), Some(four));
    assert_eq!(cursor(&env.cm("old").await.unwrap()), Some(2));
    op.kill();

    // "old" (cursor 2) now points before the first retained revision (4);
    // "new" (cursor 4) does not
    put(&kv, "a.k", "x").await; // 5, drops 1
    put(&kv, "a.k", "2").await; // 6, drops 5
    put(&kv, "b.n", "new").await; // 7
    let op = env.operator();
    wait_data(&env, "old", &map(&[("a.k", "2")])).await;
    wait_data(&env, "new", &map(&[("b.k", "3"), ("b.n", "new")])).await;
    // pruned (the bucket keeps current values), no lingering-keys warning
    wait_reason(&env, "old", "Synced").await;
    wait_reason(&env, "new", "Synced").await;
    assert_eq!(
        cursor_expired_count(&op),
        1,
        "only the binding whose cursor is behind the stream resyncs"
    );
    assert_eq!(
        op.metrics.delivered_count("app", "catchup"),
        2,
        "old's full state (a.k) and new's delta (b.n), nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_leaving_during_a_scan_do_not_stall_the_others() {
    let env = Env::start().await;
    let kv = env.bucket("app").await;
    let mut truth = Vec::new();
    for i in 0..40 {
        let mut want = BTreeMap::new();
        for k in 0..200 {
            let key = format!("p{i:03}.k{k:03}");
            want.insert(key.clone(), "v".to_string());
            kv.put(&key, bytes::Bytes::from_static(b"v")).await.unwrap();
        }
        truth.push(want);
    }
    let _op = env.operator();
    create_bindings(&env, 40).await;
    for i in (0..40).step_by(2) {
        env.delete_binding(&format!("b{i:03}")).await;
    }
    for i in (1..40).step_by(2) {
        wait_data(&env, &format!("b{i:03}"), &truth[i]).await;
    }
    // the runner still serves newcomers
    env.create_binding("late", "bucket: app\nprefixes: [p000.]")
        .await;
    wait_data(&env, "late", &truth[0]).await;
    eventually("only the live consumer left", || async {
        (kv.consumer_count().await.unwrap() == 1).then_some(())
    })
    .await;
}
