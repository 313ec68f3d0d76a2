//! Shared test infrastructure. Include from a test crate with
//! `#[path = "../common/mod.rs"] mod common;`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod nats;

pub use nats::NatsServer;
