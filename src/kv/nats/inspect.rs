//! Looking at a bucket rather than syncing it (`slipstream kv history`,
//! `slipstream kv info`): a key's retained records, the bucket's settings
//! and revision range.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{kv::Operation as NatsOperation, stream::StorageType};
use futures::StreamExt;

use super::{
    bucket::NatsBucket,
    codec::{Operation, to_update},
    handle::timed,
};
use crate::kv::{KvError, KvReader, KvUpdate, Result, filter::validate_key};

/// A bucket's settings and state, as `slipstream kv info` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketStatus {
    pub name: String,
    /// Revisions kept per key.
    pub history: i64,
    /// Age after which records are removed (`None`: kept forever).
    pub max_age: Option<Duration>,
    /// How long removal markers of aged-out keys stay (`None`: no markers).
    pub limit_markers: Option<Duration>,
    pub storage: &'static str,
    pub replicas: usize,
    /// Size limits (`-1`: none).
    pub max_bytes: i64,
    pub max_value_size: i32,
    /// Records retained (values, tombstones and older revisions).
    pub records: u64,
    pub bytes: u64,
    /// Keys with at least one retained record.
    pub keys: u64,
    /// Oldest and newest revision retained (`None` when empty).
    pub first_revision: Option<u64>,
    pub last_revision: Option<u64>,
}

impl std::fmt::Display for BucketStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let age = |d: Option<Duration>| {
            d.map_or("forever".to_owned(), |d| {
                humantime::format_duration(d).to_string()
            })
        };
        let rev = |r: Option<u64>| r.map_or("-".to_owned(), |r| r.to_string());
        writeln!(f, "bucket: {}", self.name)?;
        writeln!(f, "history: {}", self.history)?;
        writeln!(f, "max_age: {}", age(self.max_age))?;
        writeln!(
            f,
            "limit_markers: {}",
            self.limit_markers
                .map_or("off".to_owned(), |d| humantime::format_duration(d)
                    .to_string())
        )?;
        writeln!(f, "storage: {}", self.storage)?;
        writeln!(f, "replicas: {}", self.replicas)?;
        writeln!(f, "max_bytes: {}", self.max_bytes)?;
        writeln!(f, "max_value_size: {}", self.max_value_size)?;
        writeln!(f, "keys: {}", self.keys)?;
        writeln!(f, "records: {}", self.records)?;
        writeln!(f, "bytes: {}", self.bytes)?;
        writeln!(f, "first_revision: {}", rev(self.first_revision))?;
        write!(f, "last_revision: {}", rev(self.last_revision))
    }
}

impl NatsBucket {
    /// The bucket's settings and current state, read from its stream.
    pub async fn status(&self) -> Result<BucketStatus> {
        let info = self.stream_info().await?;
        let (config, state) = (&info.config, &info.state);
        Ok(BucketStatus {
            name: self.name().to_owned(),
            history: config.max_messages_per_subject,
            max_age: (!config.max_age.is_zero()).then_some(config.max_age),
            limit_markers: config.subject_delete_marker_ttl,
            storage: match config.storage {
                StorageType::File => "file",
                StorageType::Memory => "memory",
            },
            replicas: config.num_replicas,
            max_bytes: config.max_bytes,
            max_value_size: config.max_message_size,
            records: state.messages,
            bytes: state.bytes,
            keys: state.subjects_count,
            first_revision: (state.messages > 0).then_some(state.first_sequence),
            last_revision: (state.last_sequence > 0).then_some(state.last_sequence),
        })
    }

    /// Every retained record of `key`, oldest first (puts, deletes, purges).
    /// Empty when the bucket holds no record of it.
    pub async fn history(&self, key: &str) -> Result<Vec<KvUpdate>> {
        validate_key(key)?;
        if self.entry(key).await?.is_none() {
            return Ok(Vec::new());
        }
        let t = self.inner.timeout;
        let failed =
            |e: &dyn std::fmt::Display| KvError::OperationFailed(format!("history {key:?}: {e}"));
        let store = timed(t, self.inner.js.get_key_value(self.name()))
            .await?
            .map_err(|e| failed(&e))?;
        let mut records = timed(t, store.history(key))
            .await?
            .map_err(|e| failed(&e))?;
        let mut out = Vec::new();
        while let Some(entry) = timed(t, records.next()).await? {
            let entry = entry.map_err(|e| failed(&e))?;
            let op = match entry.operation {
                NatsOperation::Put => Operation::Put,
                NatsOperation::Delete => Operation::Delete,
                NatsOperation::Purge => Operation::Purge,
            };
            let published = SystemTime::from(entry.created);
            let last = entry.delta == 0;
            out.push(to_update(
                entry.key,
                op,
                entry.value,
                entry.revision,
                Some(published),
            ));
            if last {
                break;
            }
        }
        Ok(out)
    }
}
