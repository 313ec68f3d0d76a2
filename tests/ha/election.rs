//! `LeaderElection` in-process against a real nats-server: one leader among
//! contenders, a release hands over at once, and a leader cut off from NATS
//! closes its gate before its record can be taken over.

use std::{sync::Arc, time::Duration};

use slipstream::{
    kv::{
        KvStore,
        lease::{LeaseRecord, unix_ms},
        nats::{BucketConfig, ConnectOptions, NatsKv},
    },
    leader::{ElectionConfig, LeaderElection, LeaderMetrics, lease_config},
};
use tokio::time::Instant;

use crate::common::NatsServer;

const KEY: &str = "test.leader";

async fn store(nats: &NatsServer) -> Arc<dyn KvStore> {
    let kv = NatsKv::connect(&ConnectOptions {
        request_timeout: Duration::from_millis(500),
        ..ConnectOptions::new(nats.url())
    })
    .await
    .unwrap();
    Arc::new(
        kv.create_or_open(&BucketConfig::new("leases"))
            .await
            .unwrap(),
    )
}

fn contender(store: Arc<dyn KvStore>, name: &str) -> (LeaderElection, LeaderMetrics) {
    let metrics = LeaderMetrics::default();
    let config = ElectionConfig {
        key: KEY.to_owned(),
        identity: name.to_owned(),
        lease: lease_config(Duration::from_secs(2), Duration::from_millis(500)).unwrap(),
    };
    (
        LeaderElection::start_on(store, config, metrics.clone()).unwrap(),
        metrics,
    )
}

async fn wait_one_leader(all: &[&LeaderElection]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leaders: Vec<usize> = (0..all.len()).filter(|i| all[*i].is_leader()).collect();
        assert!(leaders.len() <= 1, "two gates open at once: {leaders:?}");
        if let [one] = leaders[..] {
            return one;
        }
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contenders_elect_one_leader_and_a_release_hands_over_at_once() {
    let _serial = crate::serial().await;
    let nats = NatsServer::start();
    let probe = store(&nats).await;
    let record =
        || async { LeaseRecord::parse(&probe.get(KEY).await.unwrap().unwrap().value).unwrap() };
    let mut contenders = Vec::new();
    for i in 0..3 {
        contenders.push(contender(store(&nats).await, &format!("c{i}")));
    }
    let mut handover = Vec::new();
    for _round in 0..3 {
        let refs: Vec<&LeaderElection> = contenders.iter().map(|(e, _)| e).collect();
        let leader = wait_one_leader(&refs).await;
        // Several renew intervals with exactly one open gate.
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            let open = refs.iter().filter(|e| e.is_leader()).count();
            assert!(open <= 1, "{open} gates open at once");
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        assert!(refs[leader].readiness().is_ok());
        for (i, e) in refs.iter().enumerate() {
            if i != leader {
                assert!(e.readiness().is_ok(), "a standby is ready");
            }
        }
        let (old, old_metrics) = contenders.remove(leader);
        let name = old.identity().to_owned();
        // its record now; a renew before the release only moves the expiry later
        let released_term = record().await;
        assert_eq!(released_term.holder, name);
        let t0 = Instant::now();
        old.shutdown().await;
        assert_eq!(old_metrics.is_leader.get(), 0);
        assert!(old_metrics.transitions_to("standby") >= 1);
        let refs: Vec<&LeaderElection> = contenders.iter().map(|(e, _)| e).collect();
        let next = wait_one_leader(&refs).await;
        handover.push(t0.elapsed());
        let term = record().await;
        assert_eq!(term.holder, refs[next].identity());
        // A release is not a TTL wait: the next term began while the
        // released record would still have been valid.
        assert!(
            term.acquired_at_ms < released_term.expires_at_ms,
            "{} acquired at {} ms, after {name}'s record expired at {} ms",
            term.holder,
            term.acquired_at_ms,
            released_term.expires_at_ms
        );
        contenders.push(contender(store(&nats).await, &name));
    }
    println!(
        "release -> next leader (in-process): {}",
        crate::cluster::spread(&handover)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_nats_closes_its_gate_before_its_record_expires() {
    let _serial = crate::serial().await;
    let mut nats = NatsServer::start();
    let store = store(&nats).await;
    let (leader, metrics) = contender(store.clone(), "solo");
    wait_one_leader(&[&leader]).await;
    // Let it renew a few times; remember the newest expiry it wrote.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let record = LeaseRecord::parse(&store.get(KEY).await.unwrap().unwrap().value).unwrap();
    assert_eq!(record.holder, "solo");
    nats.pause();
    let mut gate = leader.gate();
    tokio::time::timeout(Duration::from_secs(10), gate.wait_for(|open| !*open))
        .await
        .expect("gate closes while NATS is unreachable")
        .unwrap();
    let closed_at = unix_ms();
    // The newest record it could have written expires no earlier than the
    // one read before the pause; the gate closed before that.
    assert!(
        closed_at < record.expires_at_ms,
        "gate closed at {closed_at}, record expired at {}",
        record.expires_at_ms
    );
    let mut status = leader.status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.readiness().is_err()),
    )
    .await
    .expect("/readyz reports the failure")
    .unwrap();
    assert_eq!(metrics.is_leader.get(), 0);
    nats.resume();
    tokio::time::timeout(Duration::from_secs(20), gate.wait_for(|open| *open))
        .await
        .expect("leader again once NATS answers")
        .unwrap();
    assert!(leader.readiness().is_ok());
    leader.shutdown().await;
}
