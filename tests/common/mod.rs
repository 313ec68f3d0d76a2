//! Shared test infrastructure. Include from a test crate with
//! `#[path = "../common/mod.rs"] mod common;`.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

pub mod http;
pub mod nats;
pub mod nats_cluster;
pub mod util;
pub mod workload;

pub use nats::NatsServer;
pub use util::{free_port, percentile, tool};
pub use workload::{WORKLOAD_IMAGE, workload_json};
