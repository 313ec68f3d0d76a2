//! Proofs beyond examples: property tests of the pure core (escaping,
//! projection, the mirror a watch feeds, the access policy) over generated
//! inputs, and an exhaustive model check of the leader lease and the
//! ConfigMap write fence (`lease_model`). No server, no cluster.
//!
//! Every property runs a fixed number of cases from a fixed seed, so a run
//! is reproducible and bounded in time; `PROPTEST_CASES` raises the count
//! for a longer hunt.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod escaping;
mod kv_truth;
mod lease_model;
mod policy;
mod projection;

use proptest::test_runner::{Config, RngSeed};

/// The configuration of every property: `cases` cases from a fixed seed, no
/// regression files written into the source tree.
pub fn config(cases: u32) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(cases),
        rng_seed: RngSeed::Fixed(0x51_1b_57_ea),
        failure_persistence: None,
        ..Config::default()
    }
}
