//! Slipstream: push-based sync of NATS JetStream KV prefixes into Kubernetes
//! ConfigMaps. The modules follow the layers of DESIGN.md, top to bottom.

pub mod cmd;
pub mod controller;
pub mod crd;
pub mod digest;
pub mod kv;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod projection;
pub mod reason;
pub mod sink;
pub mod util;
