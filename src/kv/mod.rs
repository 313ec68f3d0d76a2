//! The storage contract Slipstream is written against, and its NATS JetStream
//! implementation.
//!
//! Every trait is object-safe (`Arc<dyn KvStore>` works), so tests and other
//! backends can stand in for NATS. Versions and cursors are opaque tokens; the
//! only thing a caller may do with two of them is compare them.

use std::{fmt, pin::Pin, str::FromStr, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::reason::Reason;

pub mod filter;
pub mod lease;
pub mod mirror;
pub mod nats;

/// Errors of the KV layer. `Clone` so one failure can be fanned out to every
/// binding that shares a watch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    #[error("not connected to the KV backend")]
    NotConnected,
    #[error("connection failed: {0}")]
    ConnectionFailed(String),
    #[error("bucket {0:?} not found")]
    BucketNotFound(String),
    #[error("key {0:?} not found")]
    KeyNotFound(String),
    /// A key or prefix the backend cannot store or match.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("key {0:?} already exists")]
    AlreadyExists(String),
    #[error("revision mismatch on key {key:?}")]
    RevisionMismatch { key: String },
    #[error("serialization failed: {0}")]
    SerializationError(String),
    #[error("deserialization failed: {0}")]
    DeserializationError(String),
    #[error("watch failed: {0}")]
    WatchError(String),
    #[error("operation failed: {0}")]
    OperationFailed(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The cursor points before the oldest update the backend still keeps:
    /// resuming would silently skip updates, so the caller must resync.
    #[error("cursor {cursor} expired: oldest retained revision is {first_retained}")]
    CursorExpired {
        cursor: VersionToken,
        first_retained: VersionToken,
    },
}

impl KvError {
    /// A short reason word for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        Reason::from(self).as_str()
    }
}

impl From<&KvError> for Reason {
    fn from(e: &KvError) -> Self {
        match e {
            KvError::NotConnected => Reason::NotConnected,
            KvError::ConnectionFailed(_) => Reason::ConnectionFailed,
            KvError::BucketNotFound(_) => Reason::BucketNotFound,
            KvError::KeyNotFound(_) => Reason::KeyNotFound,
            KvError::InvalidKey(_) => Reason::InvalidKey,
            KvError::AlreadyExists(_) => Reason::AlreadyExists,
            KvError::RevisionMismatch { .. } => Reason::RevisionMismatch,
            KvError::SerializationError(_) => Reason::SerializationError,
            KvError::DeserializationError(_) => Reason::DeserializationError,
            KvError::WatchError(_) => Reason::WatchError,
            KvError::OperationFailed(_) => Reason::OperationFailed,
            KvError::Timeout(_) => Reason::Timeout,
            KvError::CursorExpired { .. } => Reason::CursorExpired,
        }
    }
}

pub type Result<T, E = KvError> = std::result::Result<T, E>;

/// An opaque version of one write, stored inline (at most 10 bytes).
///
/// Tokens from one bucket are totally ordered: a later write has a greater
/// token. NATS stores its u64 stream sequence as minimal big-endian bytes,
/// so ordering by (length, bytes) equals numeric ordering.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionToken {
    len: u8,
    bytes: [u8; VersionToken::MAX_LEN],
}

impl VersionToken {
    pub const MAX_LEN: usize = 10;

    /// A token from raw bytes; `None` when longer than [`Self::MAX_LEN`].
    pub fn from_bytes(raw: &[u8]) -> Option<Self> {
        if raw.len() > Self::MAX_LEN {
            return None;
        }
        let mut bytes = [0u8; Self::MAX_LEN];
        bytes[..raw.len()].copy_from_slice(raw);
        Some(Self {
            len: raw.len() as u8,
            bytes,
        })
    }

    pub fn from_u64(rev: u64) -> Self {
        let be = rev.to_be_bytes();
        let skip = be.iter().take_while(|b| **b == 0).count();
        let mut bytes = [0u8; Self::MAX_LEN];
        let len = be.len() - skip;
        bytes[..len].copy_from_slice(&be[skip..]);
        Self {
            len: len as u8,
            bytes,
        }
    }

    /// The u64 this token encodes, when it is one (NATS revisions are).
    pub fn as_u64(&self) -> Option<u64> {
        if self.len as usize > 8 {
            return None;
        }
        Some(
            self.as_bytes()
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        )
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl Ord for VersionToken {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.len
            .cmp(&other.len)
            .then_with(|| self.as_bytes().cmp(other.as_bytes()))
    }
}

impl PartialOrd for VersionToken {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Decimal for u64 tokens (what users see in `status.cursor`), `x` + hex otherwise.
impl fmt::Display for VersionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_u64() {
            Some(n) => write!(f, "{n}"),
            None => {
                f.write_str("x")?;
                self.as_bytes()
                    .iter()
                    .try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

impl fmt::Debug for VersionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VersionToken({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version token {0:?}")]
pub struct InvalidToken(pub String);

impl FromStr for VersionToken {
    type Err = InvalidToken;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || InvalidToken(s.to_owned());
        if let Some(hex) = s.strip_prefix('x') {
            if hex.len() % 2 != 0 || hex.len() > 2 * Self::MAX_LEN {
                return Err(bad());
            }
            let raw = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                .collect::<std::result::Result<Vec<u8>, _>>()
                .map_err(|_| bad())?;
            return Self::from_bytes(&raw).ok_or_else(bad);
        }
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse::<u64>().map(Self::from_u64).map_err(|_| bad())
    }
}

/// Where a watch resumes. `none()` asks for a full state-sync; `after(v)`
/// for only the updates newer than `v`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WatchCursor(Option<VersionToken>);

impl WatchCursor {
    pub const fn none() -> Self {
        Self(None)
    }

    pub const fn after(version: VersionToken) -> Self {
        Self(Some(version))
    }

    pub fn version(&self) -> Option<VersionToken> {
        self.0
    }

    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    /// True when an update with `version` is already covered by this cursor.
    pub fn covers(&self, version: &VersionToken) -> bool {
        self.0.is_some_and(|c| *version <= c)
    }

    /// Moves forward to `version`; never backward.
    pub fn advance(&mut self, version: VersionToken) {
        if !self.covers(&version) {
            self.0 = Some(version);
        }
    }
}

/// Empty string for `none()`, else the token.
impl fmt::Display for WatchCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}

impl FromStr for WatchCursor {
    type Err = InvalidToken;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s.is_empty() {
            Ok(Self::none())
        } else {
            s.parse().map(Self::after)
        }
    }
}

/// A live value.
///
/// Equality compares the record (key, value, version); `published` is when
/// the server stored it, known for watch deliveries, `None` for reads.
#[derive(Clone, Debug)]
pub struct KvEntry {
    pub key: String,
    pub value: Bytes,
    pub version: VersionToken,
    pub published: Option<std::time::SystemTime>,
}

impl PartialEq for KvEntry {
    fn eq(&self, other: &Self) -> bool {
        (&self.key, &self.value, self.version) == (&other.key, &other.value, other.version)
    }
}

impl Eq for KvEntry {}

/// One change to a key, as a watch delivers it.
///
/// `Delete` covers plain deletes and CAS delete tombstones; `Purge` covers
/// purges and per-key TTL expiry (NATS marks both as purges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvUpdate {
    Put(KvEntry),
    Delete { key: String, version: VersionToken },
    Purge { key: String, version: VersionToken },
}

impl KvUpdate {
    pub fn key(&self) -> &str {
        match self {
            KvUpdate::Put(e) => &e.key,
            KvUpdate::Delete { key, .. } | KvUpdate::Purge { key, .. } => key,
        }
    }

    pub fn version(&self) -> VersionToken {
        match self {
            KvUpdate::Put(e) => e.version,
            KvUpdate::Delete { version, .. } | KvUpdate::Purge { version, .. } => *version,
        }
    }

    /// True for every kind of removal (delete, purge, TTL expiry, tombstone).
    pub fn is_removal(&self) -> bool {
        !matches!(self, KvUpdate::Put(_))
    }
}

/// What a watch stream yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Update(KvUpdate),
    /// Everything that existed (state-sync) or was missed (resume) when the
    /// watch started has now been delivered; yielded exactly once per watch,
    /// also when nothing matched. `cursor` covers everything delivered so far.
    Synced {
        cursor: WatchCursor,
    },
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

/// What the operator needs to know about a bucket's retention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketInfo {
    pub name: String,
    /// Oldest revision still retained (none when the stream is empty).
    pub first_revision: Option<VersionToken>,
    pub last_revision: Option<VersionToken>,
    /// True when the bucket never evicts a key's current value (no max_age,
    /// no discard-old size limits), so a full state-sync can tell deleted
    /// keys from aged-out ones and prune safely.
    pub keeps_current_values: bool,
    /// True when the bucket leaves a removal marker for every key that ages
    /// out (`max_age` with limit markers, as `slipstream kv create-bucket
    /// --max-age` creates it): an age-out is a deletion that watches see, so
    /// a key missing from a state-sync is gone from KV and may be pruned.
    pub marks_age_outs: bool,
}

#[async_trait]
pub trait KvReader: Send + Sync {
    /// The live value; tombstones read as `None`.
    async fn get(&self, key: &str) -> Result<Option<KvEntry>>;
    /// The latest record of the key as stored, tombstones included.
    async fn entry(&self, key: &str) -> Result<Option<KvUpdate>>;
    /// Live keys starting with `prefix` (string prefix; "" = all), sorted.
    async fn keys(&self, prefix: &str) -> Result<Vec<String>>;
    /// Live entries starting with `prefix`, sorted by key.
    async fn scan(&self, prefix: &str) -> Result<Vec<KvEntry>>;
    async fn info(&self) -> Result<BucketInfo>;
    /// Which incarnation of the bucket this handle serves. A bucket deleted
    /// and created again under the same name restarts its revisions at 1,
    /// so a cursor means something only within the incarnation it came
    /// from. `None` when the backend cannot tell.
    fn incarnation(&self) -> Option<u64> {
        None
    }
    /// The records of keys under `prefixes` with a revision in
    /// `(after, upto]`, in revision order (tombstones included), read
    /// record by record without a server-side consumer: cheap when there are
    /// a few. `None` when more than `max_reads` records would have to be read
    /// or the backend cannot read this way; a watch from `after` then does
    /// it. Does not check retention: the caller compares `after` with
    /// [`BucketInfo::first_revision`] before and after.
    async fn changes_between(
        &self,
        prefixes: &[String],
        after: VersionToken,
        upto: VersionToken,
        max_reads: usize,
    ) -> Result<Option<Vec<KvUpdate>>> {
        let _ = (prefixes, after, upto, max_reads);
        Ok(None)
    }
}

/// Watches. Prefixes are plain string prefixes of keys ("" matches all).
///
/// With `WatchCursor::none()` a watch is state-sync: the current value of
/// every matching key, then `Synced`, then live changes. With a cursor it
/// delivers only updates after the cursor, then `Synced` once caught up to
/// the head at start, then live changes; a cursor older than the oldest
/// retained revision yields `CursorExpired` instead of a silent clamp.
/// Updates at or below the last delivered version are never yielded twice.
///
/// A lost connection or server-side consumer is recovered inside the watch
/// (from the last position reached; the stream is silent while the server
/// is unreachable). An `Err` item is final: the stream ends after it, and
/// the caller resumes with a `_from` watch after the last version it got
/// (or resyncs on `CursorExpired`). An empty prefix list is an error.
#[async_trait]
pub trait KvWatcher: Send + Sync {
    /// The union of `prefixes`, served by one server-side consumer.
    async fn watch_prefixes_from(
        &self,
        prefixes: &[String],
        cursor: WatchCursor,
    ) -> Result<WatchStream>;

    async fn watch_all(&self) -> Result<WatchStream> {
        self.watch_prefixes_from(&[String::new()], WatchCursor::none())
            .await
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<WatchStream> {
        self.watch_prefixes_from(&[prefix.to_owned()], WatchCursor::none())
            .await
    }

    async fn watch_prefixes(&self, prefixes: &[String]) -> Result<WatchStream> {
        self.watch_prefixes_from(prefixes, WatchCursor::none())
            .await
    }

    async fn watch_all_from(&self, cursor: WatchCursor) -> Result<WatchStream> {
        self.watch_prefixes_from(&[String::new()], cursor).await
    }

    async fn watch_prefix_from(&self, prefix: &str, cursor: WatchCursor) -> Result<WatchStream> {
        self.watch_prefixes_from(&[prefix.to_owned()], cursor).await
    }
}

#[async_trait]
pub trait KvWriter: Send + Sync {
    async fn put(&self, key: &str, value: Bytes) -> Result<VersionToken>;
    async fn delete(&self, key: &str) -> Result<VersionToken>;
    /// Fails with `AlreadyExists` when the key holds a live value.
    async fn create(&self, key: &str, value: Bytes) -> Result<VersionToken>;
    /// CAS: fails with `RevisionMismatch` unless the key's latest version is `expected`.
    async fn update(&self, key: &str, value: Bytes, expected: VersionToken)
    -> Result<VersionToken>;
    /// CAS delete: writes an empty-value tombstone, so a concurrent CAS
    /// writer holding the old version still conflicts.
    async fn delete_with_version(&self, key: &str, expected: VersionToken) -> Result<VersionToken>;
}

#[async_trait]
pub trait KvTtl: Send + Sync {
    /// A value that the backend removes after `ttl` (whole seconds on NATS),
    /// delivering the expiry to watches as a `Purge`.
    async fn put_with_ttl(&self, key: &str, value: Bytes, ttl: Duration) -> Result<VersionToken>;
}

#[async_trait]
pub trait KvPurge: Send + Sync {
    /// Removes the key and reclaims its history.
    async fn purge(&self, key: &str) -> Result<VersionToken>;
}

/// Everything a bucket offers.
pub trait KvStore: KvReader + KvWatcher + KvWriter + KvTtl + KvPurge {}

impl<T: KvReader + KvWatcher + KvWriter + KvTtl + KvPurge> KvStore for T {}

/// Opens buckets by name. Implementations connect lazily, so the operator
/// starts (and reports `NotConnected`) while the backend is down.
#[async_trait]
pub trait KvConnector: Send + Sync + 'static {
    async fn open(&self, bucket: &str) -> Result<std::sync::Arc<dyn KvStore>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_tokens_order_numerically_and_round_trip() {
        let revs = [0u64, 1, 255, 256, 65_535, 1 << 40, u64::MAX];
        for w in revs.windows(2) {
            assert!(VersionToken::from_u64(w[0]) < VersionToken::from_u64(w[1]));
        }
        for r in revs {
            let t = VersionToken::from_u64(r);
            assert_eq!(t.as_u64(), Some(r));
            assert_eq!(t.to_string().parse::<VersionToken>(), Ok(t));
        }
    }

    #[test]
    fn opaque_tokens_round_trip_through_hex() {
        let t = VersionToken::from_bytes(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).unwrap();
        assert_eq!(t.to_string(), "x0102030405060708090a");
        assert_eq!(t.to_string().parse::<VersionToken>(), Ok(t));
        assert!(VersionToken::from_bytes(&[0; 11]).is_none());
        assert!("x0".parse::<VersionToken>().is_err());
        assert!("-1".parse::<VersionToken>().is_err());
        assert!("".parse::<VersionToken>().is_err());
    }

    #[test]
    fn cursor_covers_and_never_moves_backward() {
        let mut c = WatchCursor::none();
        assert!(!c.covers(&VersionToken::from_u64(0)));
        c.advance(VersionToken::from_u64(10));
        c.advance(VersionToken::from_u64(7));
        assert_eq!(c.version(), Some(VersionToken::from_u64(10)));
        assert!(c.covers(&VersionToken::from_u64(10)));
        assert!(!c.covers(&VersionToken::from_u64(11)));
        assert_eq!(c.to_string(), "10");
        assert_eq!("".parse::<WatchCursor>(), Ok(WatchCursor::none()));
        assert_eq!("10".parse::<WatchCursor>(), Ok(c));
    }
}
