//! What every part of a bucket handle shares: the stream, the client, the
//! connection status, the per-call deadline ([`timed`]) and the counters.

use std::{future::Future, sync::atomic::AtomicU64, time::Duration};

use async_nats::jetstream;
use tokio::sync::watch;

use crate::kv::{KvError, Result};

/// Whether the client currently has a server connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    Connected,
    /// Lost; the client reconnects by itself.
    Disconnected,
    /// Closed for good (drained or dropped); nothing will work again.
    Closed,
}

/// The connection state plus how many times it was re-established, so a
/// watcher can tell that its server-side consumer may be gone even when it
/// missed the `Disconnected` in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionStatus {
    pub state: ConnectionState,
    pub reconnects: u64,
}

/// Runs `fut` under `limit`; the outer error is the timeout.
pub(crate) async fn timed<T>(limit: Duration, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| KvError::Timeout(limit))
}

pub(crate) struct BucketInner {
    pub name: String,
    pub stream_name: String,
    /// `$KV.<bucket>.`
    pub subject_prefix: String,
    pub allow_direct: bool,
    /// The stream's creation time (Unix ns): tells a recreated bucket apart.
    pub incarnation: Option<u64>,
    pub stream: jetstream::stream::Stream,
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub timeout: Duration,
    pub status: watch::Receiver<ConnectionStatus>,
    pub stats: WatchCounters,
}

/// Counters of all watches (and scans) opened through one bucket handle.
#[derive(Default)]
pub(crate) struct WatchCounters {
    pub messages: AtomicU64,
    pub redeliveries_skipped: AtomicU64,
    pub consumers_created: AtomicU64,
}

/// What the server delivered to the watches of one bucket handle: proves
/// that a resume reads only the delta, and shows consumer churn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Data messages received from the server (before prefix filtering).
    pub messages: u64,
    /// Messages at or below an already yielded revision, dropped.
    pub redeliveries_skipped: u64,
    /// Server-side consumers created, recreations included.
    pub consumers_created: u64,
}

impl BucketInner {
    pub(crate) async fn stream_info(&self) -> Result<jetstream::stream::Info> {
        timed(self.timeout, self.stream.get_info())
            .await?
            .map_err(|e| {
                // The server's error arrives as the request's source (code 10059).
                if e.to_string().contains("stream not found") {
                    KvError::BucketNotFound(self.name.clone())
                } else {
                    KvError::OperationFailed(format!("stream info of {}: {e}", self.stream_name))
                }
            })
    }
}
