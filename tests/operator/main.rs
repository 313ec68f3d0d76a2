//! Operator integration tests: a real nats-server, a Kubernetes API server
//! (the emulator, or the real control plane with
//! `SLIPSTREAM_TEST_APISERVER=real`) and the controller running in-process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod binary;
mod catchup;
mod expiry;
mod harness;
mod invariants;
mod loose_crd;
mod nats_cluster;
mod observability;
mod ownership;
mod resume;
mod rollout;
mod status;
mod sync;

pub use harness::*;
