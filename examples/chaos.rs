//! `make chaos`: random kills, SIGTERMs and pauses of three `slipstream run`
//! replicas, nats-server kill -9 and restarts, and Kubernetes API faults, for
//! a fixed time while a writer updates random keys in several bindings. Then
//! it checks that every ConfigMap equals the KV truth, that every ConfigMap
//! version ever served holds all updates its cursor covers, that no cursor
//! went backward and that one replica wrote at a time; prints what it did and
//! what it checked, and exits non-zero on any failure.
//!
//! `cargo run --release --example chaos -- --duration 120s [--seed N] [--bin PATH]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/ha/cluster.rs"]
mod cluster;

#[path = "../tests/ha/chaos.rs"]
mod chaos;

use std::time::Duration;

use slipstream::cmd::parse_duration;

struct Args {
    duration: Duration,
    seed: u64,
    bin: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        duration: Duration::from_secs(120),
        seed: 1,
        bin: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => args.duration = parse_duration(&value()?)?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--bin" => args.bin = Some(value()?.into()),
            "-h" | "--help" => {
                return Err("usage: chaos [--duration 120s] [--seed N] [--bin PATH]".into());
            }
            other => return Err(format!("unknown argument {other:?}; try --help")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let bin = match args.bin {
        Some(b) => b,
        None => cluster::build_replica_bin().unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2);
        }),
    };
    println!(
        "chaos: 3 replicas of {}, seed {}, {:?}",
        bin.display(),
        args.seed,
        args.duration
    );
    let outcome = chaos::run(
        &bin,
        chaos::ChaosOptions {
            duration: args.duration,
            seed: args.seed,
            settings: cluster::Settings {
                // Enough keys that no key outgrows the 64 revisions of history
                // the final content check reads back.
                keys_per_binding: 60,
                seed: args.seed,
                ..cluster::Settings::default()
            },
        },
    )
    .await;
    outcome.print(args.duration);
    if outcome.report.failures.is_empty() {
        println!("chaos: PASSED");
    } else {
        println!("chaos: FAILED ({} checks)", outcome.report.failures.len());
        std::process::exit(1);
    }
}
