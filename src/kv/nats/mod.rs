//! NATS JetStream implementation of the KV traits.
//!
//! A bucket is the JetStream stream `KV_<bucket>` with subjects
//! `$KV.<bucket>.<key>`; a version is the stream sequence of the write.
//! Every call to the server runs under [`ConnectOptions::request_timeout`]
//! and fails with [`KvError::Timeout`](crate::kv::KvError::Timeout) instead
//! of hanging, also when the server is alive on TCP but does not answer.
//!
//! The parts, each depending only on the ones above it:
//! - [`codec`]: what records and deliveries mean (headers, ack subjects);
//! - [`handle`]: what a bucket handle shares (stream, client, deadline);
//! - [`watch`]: the ordered push consumer behind every watch and scan;
//! - [`bucket`]: [`NatsBucket`], the KV traits over JetStream;
//! - [`connect`]: [`NatsKv`], connecting and opening buckets;
//! - [`connector`]: [`NatsConnector`], one lazy connection for the operator;
//! - [`inspect`]: a key's history and a bucket's settings (`slipstream kv`).

mod bucket;
mod codec;
mod connect;
mod connector;
mod handle;
mod inspect;
mod watch;

pub use bucket::NatsBucket;
pub use connect::{
    BucketConfig, ConnectOptions, NatsKv, PING_INTERVAL, Storage, parse_server_urls,
};
pub use connector::NatsConnector;
pub use handle::{ConnectionState, ConnectionStatus, WatchStats};
pub use inspect::BucketStatus;
