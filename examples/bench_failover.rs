//! Failover figures with real processes: three `slipstream run` replicas
//! (lease TTL 2 s, renew 500 ms), one nats-server, the API emulator and a
//! writer streaming updates. The leader is killed with SIGKILL N times, then
//! stopped with SIGTERM N times (each time restarted afterwards); printed is
//! the time from the signal to the first ConfigMap write by another replica
//! (min / median / max), then the same checks as the HA tests. Prints
//! figures; exits non-zero only when a check fails.
//!
//! `cargo run --release --example bench_failover -- [--runs 10] [--bin PATH]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/ha/cluster.rs"]
mod cluster;

use std::time::Duration;

use cluster::{Cluster, Settings, Takedown, fail_over, spread};

#[tokio::main]
async fn main() {
    let mut runs = 10usize;
    let mut bin = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--runs", Some(v)) => match v.parse() {
                Ok(n) => runs = n,
                Err(e) => {
                    eprintln!("--runs {v:?}: {e}");
                    std::process::exit(2);
                }
            },
            ("--bin", Some(v)) => bin = Some(std::path::PathBuf::from(v)),
            _ => {
                eprintln!("usage: bench_failover [--runs 10] [--bin PATH]");
                std::process::exit(2);
            }
        }
    }
    let bin = match bin {
        Some(b) => b,
        None => cluster::build_replica_bin().unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2);
        }),
    };
    let settings = Settings {
        keys_per_binding: 60,
        ..Settings::default()
    };
    let ttl = settings.ttl;
    let mut c = Cluster::start(&bin, settings).await;
    let writer = c.start_writer();
    let mut figures = Vec::new();
    for (how, label) in [(Takedown::Kill9, "kill -9"), (Takedown::Sigterm, "SIGTERM")] {
        let mut times = Vec::new();
        for i in 0..runs {
            match fail_over(&mut c, how).await {
                Ok(f) => {
                    println!(
                        "{label} #{}: {} -> {} wrote after {:?} ({} list requests before that write)",
                        i + 1,
                        f.old,
                        f.new,
                        f.took,
                        f.relists
                    );
                    times.push(f.took);
                }
                Err(e) => {
                    eprintln!("{label} #{}: {e}", i + 1);
                    std::process::exit(1);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let within = times
            .iter()
            .filter(|t| **t <= ttl + Duration::from_secs(1))
            .count();
        figures.push(format!(
            "failover after {label:<8} {}; within TTL + 1 s: {within}/{}",
            spread(&times),
            times.len()
        ));
    }
    let (puts, deletes, _) = writer.stop().await;
    if let Err(e) = c.converge(Duration::from_secs(60)).await {
        eprintln!("{e}");
        std::process::exit(1);
    }
    let report = c.check().await;
    println!();
    println!(
        "3 replicas, lease TTL {ttl:?}, renew {:?}; writer: {puts} puts, {deletes} deletes",
        c.settings.renew
    );
    for f in &figures {
        println!("{f}");
    }
    println!("checks: {}", report.summary());
    for f in &report.failures {
        println!("FAILED: {f}");
    }
    if !report.failures.is_empty() {
        std::process::exit(1);
    }
}
