//! The chaos run, shared by the short variant in `make test` and
//! `make chaos` (`examples/chaos.rs`): for a fixed time, random kills,
//! SIGTERMs and pauses of replicas, NATS kill -9 and restarts, and API
//! faults, while a writer updates random keys in several bindings. At the end
//! every ConfigMap must equal the KV truth, every version must hold the KV
//! state at its cursor, cursors must never go backward and only one replica
//! may write at a time (see [`Cluster::check`]).
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime},
};

use apiserver::FaultRule;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use crate::cluster::{Cluster, Report, Settings, spread};

#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub duration: Duration,
    pub seed: u64,
    pub settings: Settings,
}

/// What a chaos run did and found.
#[derive(Debug, Default)]
pub struct ChaosOutcome {
    pub faults: BTreeMap<&'static str, u32>,
    pub puts: u64,
    pub deletes: u64,
    pub writer_errors: u64,
    pub converged_in: Duration,
    /// Kill -9 / SIGTERM of the then-leader -> another replica's first write.
    pub failovers_kill: Vec<Duration>,
    pub failovers_term: Vec<Duration>,
    pub report: Report,
}

impl ChaosOutcome {
    pub fn print(&self, duration: Duration) {
        println!("chaos run: {duration:?}");
        println!("  faults injected:");
        for (what, n) in &self.faults {
            println!("    {what:<28} {n}");
        }
        println!(
            "  updates written: {} puts, {} deletes ({} writer calls failed during NATS outages)",
            self.puts, self.deletes, self.writer_errors
        );
        println!(
            "  failover after kill -9 of the leader: {}",
            spread(&self.failovers_kill)
        );
        println!(
            "  failover after SIGTERM of the leader: {}",
            spread(&self.failovers_term)
        );
        println!(
            "  converged to the KV truth {:?} after the last fault",
            self.converged_in
        );
        println!("  checks: {}", self.report.summary());
        for f in &self.report.failures {
            println!("  FAILED: {f}");
        }
    }
}

enum Pending {
    Restart(String),
    Resume(String),
    NatsStart,
}

fn pick(
    rng: &mut StdRng,
    cluster: &Cluster,
    want: impl Fn(&crate::cluster::Replica) -> bool,
) -> Option<String> {
    let names: Vec<String> = cluster
        .replicas
        .iter()
        .filter(|r| want(r))
        .map(|r| r.name.clone())
        .collect();
    if names.is_empty() {
        None
    } else {
        Some(names[rng.random_range(0..names.len())].clone())
    }
}

pub async fn run(bin: &Path, opts: ChaosOptions) -> ChaosOutcome {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut cluster = Cluster::start(bin, opts.settings.clone()).await;
    let ttl = cluster.settings.ttl;
    let writer = cluster.start_writer();
    let mut out = ChaosOutcome::default();
    let mut pending: Vec<(Instant, Pending)> = Vec::new();
    let end = Instant::now() + opts.duration;
    let mut next_fault = Instant::now() + Duration::from_millis(500);
    let count =
        |out: &mut ChaosOutcome, what: &'static str| *out.faults.entry(what).or_default() += 1;
    while Instant::now() < end {
        let now = Instant::now();
        // Recoveries that are due.
        let (due, later): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(t, _)| *t <= now);
        pending = later;
        for (_, p) in due {
            match p {
                Pending::Restart(name) => cluster.replica(&name).restart(),
                Pending::Resume(name) => cluster.replica(&name).resume(),
                Pending::NatsStart => tokio::task::block_in_place(|| cluster.nats.restart()),
            }
        }
        if now >= next_fault {
            let nats_down = pending.iter().any(|(_, p)| matches!(p, Pending::NatsStart));
            let choice = rng.random_range(0..100);
            let leader = cluster.holder().await;
            match choice {
                0..=19 => {
                    // kill -9, preferring the leader; measure when it was the leader
                    let target = leader
                        .clone()
                        .filter(|l| {
                            cluster
                                .replicas
                                .iter()
                                .any(|r| &r.name == l && r.is_running() && !r.is_paused())
                        })
                        .filter(|_| rng.random_bool(0.7))
                        .or_else(|| pick(&mut rng, &cluster, |r| r.is_running()));
                    if let Some(name) = target {
                        let t0 = SystemTime::now();
                        cluster.replica(&name).kill9();
                        count(&mut out, "replica kill -9");
                        if leader.as_deref() == Some(&name)
                            && !nats_down
                            && let Some(w) = cluster.wait_write_by_other(&name, t0, ttl * 4).await
                        {
                            out.failovers_kill
                                .push(w.end.duration_since(t0).unwrap_or_default());
                        }
                        pending.push((
                            Instant::now() + Duration::from_millis(rng.random_range(300..2000)),
                            Pending::Restart(name),
                        ));
                    }
                }
                20..=34 => {
                    let target = leader
                        .clone()
                        .filter(|l| {
                            cluster
                                .replicas
                                .iter()
                                .any(|r| &r.name == l && r.is_running() && !r.is_paused())
                        })
                        .or_else(|| pick(&mut rng, &cluster, |r| r.is_running()));
                    if let Some(name) = target {
                        let t0 = SystemTime::now();
                        tokio::task::block_in_place(|| cluster.replica(&name).terminate());
                        count(&mut out, "replica SIGTERM");
                        if leader.as_deref() == Some(&name)
                            && !nats_down
                            && let Some(w) = cluster.wait_write_by_other(&name, t0, ttl * 4).await
                        {
                            out.failovers_term
                                .push(w.end.duration_since(t0).unwrap_or_default());
                        }
                        pending.push((
                            Instant::now() + Duration::from_millis(rng.random_range(200..1500)),
                            Pending::Restart(name),
                        ));
                    }
                }
                35..=54 => {
                    let target = leader
                        .clone()
                        .filter(|_| rng.random_bool(0.7))
                        .filter(|l| {
                            cluster
                                .replicas
                                .iter()
                                .any(|r| &r.name == l && r.is_running() && !r.is_paused())
                        })
                        .or_else(|| pick(&mut rng, &cluster, |r| r.is_running() && !r.is_paused()));
                    if let Some(name) = target {
                        cluster.replica(&name).pause();
                        count(&mut out, "replica SIGSTOP/SIGCONT");
                        let hold = ttl + Duration::from_millis(rng.random_range(0..2000));
                        pending.push((Instant::now() + hold, Pending::Resume(name)));
                    }
                }
                55..=66 => {
                    if !nats_down {
                        cluster.nats.kill();
                        count(&mut out, "nats-server kill -9 + restart");
                        pending.push((
                            Instant::now() + Duration::from_millis(rng.random_range(300..2500)),
                            Pending::NatsStart,
                        ));
                    }
                }
                67..=76 => {
                    let code = [409u16, 500, 429][rng.random_range(0..3)];
                    let n = rng.random_range(1..6);
                    cluster
                        .api
                        .faults()
                        .add(FaultRule::new(code, n).verb("patch").resource("configmaps"));
                    count(
                        &mut out,
                        match code {
                            409 => "API 409 on ConfigMap writes",
                            500 => "API 500 on ConfigMap writes",
                            _ => "API 429 on ConfigMap writes",
                        },
                    );
                }
                77..=84 => {
                    cluster.api.faults().add(
                        FaultRule::new(500, rng.random_range(1..4))
                            .verb("patch")
                            .resource("configbindings"),
                    );
                    count(&mut out, "API 500 on status writes");
                }
                85..=92 => {
                    cluster.api.faults().close_watches();
                    count(&mut out, "API watch streams closed");
                }
                _ => {
                    // the real server cannot compact on demand: there the
                    // watches are only closed
                    if cluster.compact_and_close_watches() {
                        count(&mut out, "API compaction (410 on re-watch)");
                    } else {
                        count(&mut out, "API watch streams closed");
                    }
                }
            }
            next_fault = Instant::now() + Duration::from_millis(rng.random_range(400..1600));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Heal everything, stop writing, and see that nothing was lost.
    for (_, p) in pending {
        match p {
            Pending::Restart(name) => cluster.replica(&name).restart(),
            Pending::Resume(name) => cluster.replica(&name).resume(),
            Pending::NatsStart => tokio::task::block_in_place(|| cluster.nats.restart()),
        }
    }
    cluster.api.faults().clear();
    let (puts, deletes, errors) = writer.stop().await;
    out.puts = puts;
    out.deletes = deletes;
    out.writer_errors = errors;
    match cluster.converge(Duration::from_secs(90)).await {
        Ok(t) => out.converged_in = t,
        Err(e) => out
            .report
            .failures
            .push(format!("{e}\n{}", cluster.logs_tail())),
    }
    let report = cluster.check().await;
    let earlier = std::mem::take(&mut out.report.failures);
    out.report = report;
    out.report.failures.extend(earlier);
    out
}
