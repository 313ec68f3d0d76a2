//! High availability with real processes: three replicas of the
//! `slipstream` binary with leader election on, one nats-server, and a
//! Kubernetes API server: the emulator, or the real control plane with
//! `SLIPSTREAM_TEST_APISERVER=real` (tests in `emulator_only` need the
//! emulator's on-demand compaction). Leaders are killed, terminated and paused, NATS
//! is restarted and the API fails, while a writer streams updates; the
//! checks of [`cluster::Cluster::check`] then prove nothing was lost, no
//! ConfigMap moved backward and one replica wrote at a time. Failover
//! figures are printed (run with `--nocapture`); they are measurements, not
//! assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod chaos;
mod cluster;
mod election;

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use apiserver::FaultRule;
use cluster::{Cluster, Settings, Takedown, fail_over, spread};

/// The tests run several processes each; one at a time keeps the 2-core
/// CI machine from starving them.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slipstream"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_fails_over_without_losing_or_regressing_anything() {
    let _serial = serial().await;
    let mut c = Cluster::start(&bin(), Settings::default()).await;
    let writer = c.start_writer();
    let mut times = Vec::new();
    for _ in 0..3 {
        let f = fail_over(&mut c, Takedown::Kill9).await.unwrap();
        let (old, new, took) = (f.old, f.new, f.took);
        assert_eq!(
            f.relists, 0,
            "the new leader wrote from its warm state, without re-listing"
        );
        println!("kill -9 {old}: {new} wrote after {took:?}");
        times.push(took);
    }
    writer.stop().await;
    c.converge(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs_tail()));
    let report = c.check().await;
    println!("failover after kill -9 (ttl 2 s): {}", spread(&times));
    println!("{}", report.summary());
    report.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_and_a_standby_writes_without_waiting_for_the_ttl() {
    let _serial = serial().await;
    let mut c = Cluster::start(&bin(), Settings::default()).await;
    let writer = c.start_writer();
    let mut times = Vec::new();
    for _ in 0..3 {
        let f = fail_over(&mut c, Takedown::Sigterm).await.unwrap();
        let (old, new, took) = (f.old, f.new, f.took);
        assert_eq!(
            f.relists, 0,
            "the new leader wrote from its warm state, without re-listing"
        );
        println!("SIGTERM {old}: {new} wrote after {took:?}");
        assert!(
            c.replica(&old).log().contains("lease released"),
            "{old} released its lease on SIGTERM"
        );
        let expires = f
            .lease_expires
            .unwrap_or_else(|| panic!("{old}'s lease record was not readable before SIGTERM"));
        assert!(
            f.new_write_at < expires,
            "{new} wrote only after {old}'s lease record expired: it waited for the TTL\n{}",
            c.logs_tail()
        );
        times.push(took);
    }
    writer.stop().await;
    c.converge(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs_tail()));
    let report = c.check().await;
    println!("failover after SIGTERM (ttl 2 s): {}", spread(&times));
    println!("{}", report.summary());
    report.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_ttl_is_replaced_and_after_sigcont_becomes_a_standby() {
    let _serial = serial().await;
    let mut c = Cluster::start(&bin(), Settings::default()).await;
    let writer = c.start_writer();
    let old = c.wait_leader(Duration::from_secs(30)).await.unwrap();
    let paused_at = SystemTime::now();
    c.replica(&old).pause();
    let w = c
        .wait_write_by_other(&old, paused_at, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("nobody took over\n{}", c.logs_tail()));
    println!(
        "SIGSTOP {old}: {} wrote after {:?}",
        w.replica,
        w.end.duration_since(paused_at).unwrap()
    );
    // The new leader moves the ConfigMaps ahead while the old one sleeps.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.replica(&old).resume();
    let resumed_at = SystemTime::now();
    tokio::time::sleep(c.settings.ttl * 3).await;
    let metrics = c.replica(&old).metrics().await;
    assert!(
        metrics.lines().any(|l| l == "slipstream_is_leader 0"),
        "{old} is a standby after SIGCONT:\n{metrics}"
    );
    assert!(
        metrics.contains("slipstream_lease_transitions_total{to=\"standby\"}"),
        "{metrics}"
    );
    assert!(
        c.replica(&old).log().contains("stopped writing"),
        "{old} logged that it stopped writing"
    );
    let ready = c.replica(&old).readyz().await.unwrap_or_default();
    assert!(
        ready.starts_with("HTTP/1.1 200") || ready.starts_with("HTTP/1.0 200"),
        "a standby is ready: {ready}"
    );
    assert_ne!(c.holder().await.as_deref(), Some(old.as_str()));
    let late = c
        .writes()
        .into_iter()
        .filter(|w| w.replica == old && w.start > resumed_at)
        .count();
    println!("successful writes by {old} after SIGCONT: {late}");
    writer.stop().await;
    c.converge(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs_tail()));
    let report = c.check().await;
    println!("{}", report.summary());
    report.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_kill_9_and_restart_mid_stream_settles_on_one_leader_and_converges() {
    let _serial = serial().await;
    let mut c = Cluster::start(&bin(), Settings::default()).await;
    let writer = c.start_writer();
    for outage in [Duration::from_millis(500), Duration::from_secs(3)] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.nats.kill();
        tokio::time::sleep(outage).await;
        tokio::task::block_in_place(|| c.nats.restart());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (puts, deletes, errors) = writer.stop().await;
    println!("writer: {puts} puts, {deletes} deletes, {errors} failed during outages");
    let took = c
        .converge(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs_tail()));
    println!("converged {took:?} after the writer stopped");
    // Exactly one replica says it is leader, and it is the lease holder.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut leaders = Vec::new();
        for r in &c.replicas {
            if r.metrics()
                .await
                .lines()
                .any(|l| l == "slipstream_is_leader 1")
            {
                leaders.push(r.name.clone());
            }
        }
        let holder = c.holder().await;
        if leaders.len() == 1 && holder.as_deref() == Some(leaders[0].as_str()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leadership did not settle: {leaders:?} say leader, lease holder {holder:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = c.check().await;
    println!("{}", report.summary());
    report.assert_ok();
}

/// Tests the real server cannot run: they compact the API's history on
/// demand, so every re-watch gets 410 Gone, which only the emulator offers.
mod emulator_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_write_errors_closed_watches_and_410_on_rewatch_lose_nothing() {
        let _serial = serial().await;
        let c = Cluster::start(&bin(), Settings::default()).await;
        let writer = c.start_writer();
        let faults = c.api.faults();
        for round in 0..3 {
            for code in [409u16, 500, 429] {
                faults.add(FaultRule::new(code, 3).verb("patch").resource("configmaps"));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            faults.add(
                FaultRule::new(500, 2)
                    .verb("patch")
                    .resource("configbindings"),
            );
            faults.close_watches();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(c.compact_and_close_watches(), "compacted");
            tokio::time::sleep(Duration::from_millis(500)).await;
            println!("fault round {round} done");
        }
        writer.stop().await;
        faults.clear();
        c.converge(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", c.logs_tail()));
        let failed = c
            .api
            .requests()
            .into_iter()
            .filter(|r| r.is_write() && r.resource == "configmaps" && r.status >= 400)
            .count();
        assert!(failed > 0, "the injected write faults reached the operator");
        let report = c.check().await;
        println!(
            "{failed} ConfigMap writes failed on purpose; {}",
            report.summary()
        );
        report.assert_ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_chaos_run_loses_nothing_and_never_moves_backward() {
        let _serial = serial().await;
        let secs = std::env::var("HA_CHAOS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(25);
        let duration = Duration::from_secs(secs);
        let outcome = chaos::run(
            &bin(),
            chaos::ChaosOptions {
                duration,
                seed: 7,
                settings: Settings::default(),
            },
        )
        .await;
        outcome.print(duration);
        assert!(
            outcome.faults.values().sum::<u32>() >= 5,
            "chaos injected faults"
        );
        assert!(outcome.puts > 0);
        outcome.report.assert_ok();
    }
}

/// The checks themselves must be able to fail.
mod checks {
    use std::{collections::BTreeMap, time::SystemTime};

    use crate::cluster::{KvOp, Observed, backward_moves, stale_keys};

    fn op(revision: u64, key: &str, value: Option<&str>) -> KvOp {
        KvOp {
            revision,
            key: key.to_owned(),
            value: value.map(str::to_owned),
        }
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn version(rv: u64, cursor: Option<u64>) -> Observed {
        Observed {
            at: SystemTime::now(),
            name: "b0".into(),
            resource_version: rv,
            cursor,
            data: BTreeMap::new(),
        }
    }

    #[test]
    fn content_check_flags_a_missing_covered_update_and_accepts_newer_content() {
        let ops = [
            op(1, "b0.a", Some("1")),
            op(2, "b0.b", Some("1")),
            op(3, "b0.a", Some("2")),
            op(4, "b0.b", None),
            op(5, "b1.x", Some("other binding")),
        ];
        // Exactly the state at cursor 3.
        assert!(stale_keys(&ops, "b0.", 3, &data(&[("a", "2"), ("b", "1")])).is_empty());
        // Newer than the cursor (b deleted at 4): the cursor is a lower bound.
        assert!(stale_keys(&ops, "b0.", 3, &data(&[("a", "2")])).is_empty());
        // Misses update 3, which cursor 3 covers.
        assert_eq!(
            stale_keys(&ops, "b0.", 3, &data(&[("a", "1"), ("b", "1")])).len(),
            1
        );
        // A value no key ever had, and a key that never existed.
        assert_eq!(
            stale_keys(&ops, "b0.", 4, &data(&[("a", "9"), ("zz", "1")])).len(),
            2
        );
    }

    #[test]
    fn monotone_check_flags_a_cursor_that_moves_backward_or_disappears() {
        let ok = [
            version(1, None),
            version(2, Some(5)),
            version(3, Some(5)),
            version(4, Some(9)),
        ];
        assert!(backward_moves(&ok).is_empty());
        let back = [version(2, Some(9)), version(3, Some(5))];
        assert_eq!(backward_moves(&back).len(), 1);
        let lost = [version(2, Some(9)), version(3, None)];
        assert_eq!(backward_moves(&lost).len(), 1);
    }
}
