//! A bucket on a NATS connection: the KV traits over JetStream.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use async_nats::{
    HeaderMap, HeaderValue,
    header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_TTL, NATS_ROLLUP},
    jetstream::{
        self,
        context::{PublishError, PublishErrorKind},
        message::StreamMessage,
        stream::{DirectGetError, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind},
    },
};
use async_trait::async_trait;
use bytes::Bytes;

use super::{
    codec::{KV_OPERATION, record_update, ttl_seconds},
    handle::{BucketInner, WatchStats, timed},
    watch,
};
use crate::kv::{
    BucketInfo, KvEntry, KvError, KvPurge, KvReader, KvTtl, KvUpdate, KvWatcher, KvWriter, Result,
    VersionToken, WatchCursor, WatchStream,
    filter::{self, validate_key, validate_prefix},
};

/// One KV bucket on a [`NatsKv`] connection. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct NatsBucket {
    pub(crate) inner: Arc<BucketInner>,
}

impl std::fmt::Debug for NatsBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBucket")
            .field("name", &self.inner.name)
            .finish()
    }
}

fn expected_revision(key: &str, expected: VersionToken) -> Result<u64> {
    expected.as_u64().ok_or_else(|| KvError::RevisionMismatch {
        key: key.to_owned(),
    })
}

impl NatsBucket {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Counters of the watches and scans opened through this handle (and its clones).
    pub fn watch_stats(&self) -> WatchStats {
        let c = &self.inner.stats;
        WatchStats {
            messages: c.messages.load(Ordering::Relaxed),
            redeliveries_skipped: c.redeliveries_skipped.load(Ordering::Relaxed),
            consumers_created: c.consumers_created.load(Ordering::Relaxed),
        }
    }

    /// Number of consumers on the bucket's stream, fresh from the server.
    pub async fn consumer_count(&self) -> Result<usize> {
        Ok(self.stream_info().await?.state.consumer_count)
    }

    pub(crate) async fn stream_info(&self) -> Result<jetstream::stream::Info> {
        self.inner.stream_info().await
    }

    fn subject(&self, key: &str) -> String {
        format!("{}{key}", self.inner.subject_prefix)
    }

    async fn publish(&self, key: &str, headers: Option<HeaderMap>, payload: Bytes) -> Result<u64> {
        validate_key(key)?;
        let subject = self.subject(key);
        let js = &self.inner.js;
        let send = async {
            let ack = match headers {
                Some(h) => js.publish_with_headers(subject, h, payload).await?,
                None => js.publish(subject, payload).await?,
            };
            ack.await
        };
        match timed(self.inner.timeout, send).await? {
            Ok(ack) => Ok(ack.sequence),
            Err(e) => Err(self.publish_error(key, e)),
        }
    }

    fn publish_error(&self, key: &str, e: PublishError) -> KvError {
        match e.kind() {
            PublishErrorKind::WrongLastSequence => KvError::RevisionMismatch {
                key: key.to_owned(),
            },
            PublishErrorKind::TimedOut => KvError::Timeout(self.inner.timeout),
            PublishErrorKind::StreamNotFound => KvError::BucketNotFound(self.inner.name.clone()),
            _ => KvError::OperationFailed(format!("write {key:?}: {e}")),
        }
    }

    fn headers(op: Option<&'static str>, expected: Option<u64>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(op) = op {
            h.insert(KV_OPERATION, op);
        }
        if let Some(rev) = expected {
            h.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, HeaderValue::from(rev));
        }
        h
    }
}

#[async_trait]
impl KvReader for NatsBucket {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        Ok(match self.entry(key).await? {
            Some(KvUpdate::Put(e)) => Some(e),
            _ => None,
        })
    }

    async fn entry(&self, key: &str) -> Result<Option<KvUpdate>> {
        validate_key(key)?;
        let subject = self.subject(key);
        let stream = &self.inner.stream;
        let t = self.inner.timeout;
        let message = if self.inner.allow_direct {
            let got = timed(t, stream.direct_get_last_for_subject(subject)).await?;
            match direct_answer(got, t, || format!("get {key:?}"))? {
                Some(m) => m,
                None => return Ok(None),
            }
        } else {
            match timed(t, stream.get_last_raw_message_by_subject(&subject)).await? {
                Ok(m) => m,
                Err(e) => {
                    return match e.kind() {
                        LastRawMessageErrorKind::NoMessageFound => Ok(None),
                        _ => Err(KvError::OperationFailed(format!("get {key:?}: {e}"))),
                    };
                }
            }
        };
        Ok(Some(record_update(key.to_owned(), message)))
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        validate_prefix(prefix)?;
        let latest = watch::snapshot(&self.inner, prefix, true).await?;
        Ok(live(latest).map(|e| e.key).collect())
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<KvEntry>> {
        validate_prefix(prefix)?;
        let latest = watch::snapshot(&self.inner, prefix, false).await?;
        Ok(live(latest).collect())
    }

    async fn info(&self) -> Result<BucketInfo> {
        let info = self.stream_info().await?;
        let state = &info.state;
        let config = &info.config;
        let evicts_on_limits = config.discard == DiscardPolicy::Old
            && (config.max_bytes > 0 || config.max_messages > 0);
        Ok(BucketInfo {
            name: self.inner.name.clone(),
            first_revision: (state.messages > 0)
                .then(|| VersionToken::from_u64(state.first_sequence)),
            last_revision: (state.last_sequence > 0)
                .then(|| VersionToken::from_u64(state.last_sequence)),
            keeps_current_values: config.max_age.is_zero() && !evicts_on_limits,
            marks_age_outs: config.subject_delete_marker_ttl.is_some() && !evicts_on_limits,
        })
    }

    fn incarnation(&self) -> Option<u64> {
        self.inner.incarnation
    }

    async fn changes_between(
        &self,
        prefixes: &[String],
        after: VersionToken,
        upto: VersionToken,
        max_reads: usize,
    ) -> Result<Option<Vec<KvUpdate>>> {
        let (Some(after), Some(upto)) = (after.as_u64(), upto.as_u64()) else {
            return Ok(None);
        };
        if !self.inner.allow_direct || prefixes.is_empty() {
            return Ok(None);
        }
        let prefixes = filter::checked_prefixes(prefixes)?;
        let subject_prefix = &self.inner.subject_prefix;
        let t = self.inner.timeout;
        let mut out = Vec::new();
        let mut reads = 0usize;
        // the filters do not overlap: each record is read once
        for subject in filter::subject_filters(subject_prefix, &prefixes) {
            let mut next = after.saturating_add(1);
            while next <= upto {
                if reads == max_reads {
                    return Ok(None);
                }
                reads += 1;
                let got = timed(
                    t,
                    self.inner
                        .stream
                        .direct_get_next_for_subject(subject.as_str(), Some(next)),
                )
                .await?;
                let what = || format!("direct get after {next} on {subject}");
                let Some(message) = direct_answer(got, t, what)? else {
                    break;
                };
                if message.sequence > upto {
                    break;
                }
                next = message.sequence + 1;
                self.inner.stats.messages.fetch_add(1, Ordering::Relaxed);
                let Some(key) = message
                    .subject
                    .as_str()
                    .strip_prefix(subject_prefix.as_str())
                else {
                    continue;
                };
                if !filter::matches_any(key, &prefixes) {
                    continue;
                }
                out.push(record_update(key.to_owned(), message));
            }
        }
        out.sort_by_key(KvUpdate::version);
        Ok(Some(out))
    }
}

/// A direct get's record; `None` when no record matches.
fn direct_answer(
    got: std::result::Result<StreamMessage, DirectGetError>,
    timeout: Duration,
    what: impl FnOnce() -> String,
) -> Result<Option<StreamMessage>> {
    match got {
        Ok(m) => Ok(Some(m)),
        Err(e) => match e.kind() {
            DirectGetErrorKind::NotFound => Ok(None),
            DirectGetErrorKind::TimedOut => Err(KvError::Timeout(timeout)),
            _ => Err(KvError::OperationFailed(format!("{}: {e}", what()))),
        },
    }
}

/// Live entries of a snapshot, in key order.
fn live(latest: BTreeMap<String, KvUpdate>) -> impl Iterator<Item = KvEntry> {
    latest.into_values().filter_map(|u| match u {
        KvUpdate::Put(e) => Some(e),
        _ => None,
    })
}

#[async_trait]
impl KvWatcher for NatsBucket {
    async fn watch_prefixes_from(
        &self,
        prefixes: &[String],
        cursor: WatchCursor,
    ) -> Result<WatchStream> {
        watch::watch(self.inner.clone(), prefixes, cursor).await
    }
}

#[async_trait]
impl KvWriter for NatsBucket {
    async fn put(&self, key: &str, value: Bytes) -> Result<VersionToken> {
        self.publish(key, None, value)
            .await
            .map(VersionToken::from_u64)
    }

    async fn delete(&self, key: &str) -> Result<VersionToken> {
        self.publish(key, Some(Self::headers(Some("DEL"), None)), Bytes::new())
            .await
            .map(VersionToken::from_u64)
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<VersionToken> {
        // Expect "no record"; else, if the latest record is a tombstone,
        // replace exactly that tombstone (CAS), so two creators still conflict.
        let mut expected = 0u64;
        for _ in 0..8 {
            let headers = Self::headers(None, Some(expected));
            match self.publish(key, Some(headers), value.clone()).await {
                Ok(rev) => return Ok(VersionToken::from_u64(rev)),
                Err(KvError::RevisionMismatch { .. }) => {}
                Err(e) => return Err(e),
            }
            match self.entry(key).await? {
                Some(KvUpdate::Put(_)) => return Err(KvError::AlreadyExists(key.to_owned())),
                Some(removed) => expected = removed.version().as_u64().unwrap_or(0),
                None => expected = 0,
            }
        }
        Err(KvError::RevisionMismatch {
            key: key.to_owned(),
        })
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: VersionToken,
    ) -> Result<VersionToken> {
        let rev = expected_revision(key, expected)?;
        self.publish(key, Some(Self::headers(None, Some(rev))), value)
            .await
            .map(VersionToken::from_u64)
    }

    async fn delete_with_version(&self, key: &str, expected: VersionToken) -> Result<VersionToken> {
        let rev = expected_revision(key, expected)?;
        self.publish(
            key,
            Some(Self::headers(Some("DEL"), Some(rev))),
            Bytes::new(),
        )
        .await
        .map(VersionToken::from_u64)
    }
}

#[async_trait]
impl KvTtl for NatsBucket {
    async fn put_with_ttl(&self, key: &str, value: Bytes, ttl: Duration) -> Result<VersionToken> {
        let secs = ttl_seconds(ttl)?;
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_TTL, HeaderValue::from(secs));
        self.publish(key, Some(headers), value)
            .await
            .map(VersionToken::from_u64)
            .map_err(|e| match e {
                KvError::OperationFailed(msg) if msg.to_ascii_lowercase().contains("ttl") => {
                    KvError::OperationFailed(format!(
                        "{msg} (per-key TTL needs a bucket created with limit_markers)"
                    ))
                }
                other => other,
            })
    }
}

#[async_trait]
impl KvPurge for NatsBucket {
    async fn purge(&self, key: &str) -> Result<VersionToken> {
        let mut headers = Self::headers(Some("PURGE"), None);
        headers.insert(NATS_ROLLUP, "sub");
        self.publish(key, Some(headers), Bytes::new())
            .await
            .map(VersionToken::from_u64)
    }
}
