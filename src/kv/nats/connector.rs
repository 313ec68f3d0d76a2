//! [`NatsConnector`]: buckets opened on one NATS connection, made on first
//! use, so a process starts (and reports `NotConnected`) while NATS is down.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{
    bucket::NatsBucket,
    connect::{BucketConfig, ConnectOptions, NatsKv},
};
use crate::kv::{KvConnector, KvStore, Result};

/// [`KvConnector`] over one NATS connection, made on first use (and made
/// again on the next call when connecting failed).
pub struct NatsConnector {
    opts: ConnectOptions,
    conn: Mutex<Option<NatsKv>>,
}

impl NatsConnector {
    pub fn new(opts: ConnectOptions) -> Self {
        Self {
            opts,
            conn: Mutex::new(None),
        }
    }

    /// The connection, made now if there is none yet.
    pub async fn connection(&self) -> Result<NatsKv> {
        let mut conn = self.conn.lock().await;
        if let Some(kv) = conn.as_ref() {
            return Ok(kv.clone());
        }
        let kv = NatsKv::connect(&self.opts).await?;
        *conn = Some(kv.clone());
        Ok(kv)
    }

    /// Opens the bucket, creating it from `config` when missing.
    pub async fn create_or_open(&self, config: &BucketConfig) -> Result<NatsBucket> {
        self.connection().await?.create_or_open(config).await
    }
}

#[async_trait]
impl KvConnector for NatsConnector {
    async fn open(&self, bucket: &str) -> Result<Arc<dyn KvStore>> {
        let kv = self.connection().await?;
        Ok(Arc::new(kv.open(bucket).await?))
    }
}
