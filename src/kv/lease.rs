//! A compare-and-swap lease in a KV key: at most one holder at a time.
//!
//! - Acquire: `create` on a missing key (or one whose latest record is a
//!   tombstone); take over a record that is expired or unparseable by CAS
//!   `update` on exactly the revision that was read.
//! - Renew: CAS `update` on the revision this holder wrote last.
//! - Release: CAS delete (`delete_with_version`), so another contender can
//!   acquire at once.
//! - Any failed CAS means someone else wrote the key: the lease is lost at
//!   once.
//!
//! The record (JSON) holds the holder's identity and its expiry in wall-clock
//! milliseconds. The holder itself trusts only its monotonic clock: it
//! considers itself leader until `sent + renew_deadline`, where `sent` is the
//! moment the successful acquire/renew was *sent* and `renew_deadline < ttl`.
//! Since the record's expiry is `wall_now_before_send + ttl`, the holder
//! stops before anyone may take over; `ttl - renew_deadline` is the margin
//! for clock skew between contenders.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};

use super::{KvError, KvStore, KvUpdate, VersionToken};
use crate::util::{lock, time::sleep_until};

/// Timing of a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a record stays valid for other contenders after it was written.
    pub ttl: Duration,
    /// How long the holder trusts a successful renew, from the moment it was
    /// sent; must be shorter than `ttl`.
    pub renew_deadline: Duration,
    /// How often the holder renews; must be shorter than `renew_deadline`.
    pub renew_interval: Duration,
    /// How often a contender retries to acquire (and a holder retries a failed renew).
    pub retry_interval: Duration,
}

impl LeaseConfig {
    /// `renew_deadline` = 2/3, `renew_interval` = 1/3, `retry_interval` = 1/6 of `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            renew_deadline: ttl * 2 / 3,
            renew_interval: ttl / 3,
            retry_interval: (ttl / 6).max(Duration::from_millis(10)),
        }
    }

    pub fn validate(&self) -> Result<(), LeaseError> {
        let ok = !self.renew_interval.is_zero()
            && !self.retry_interval.is_zero()
            && self.renew_interval < self.renew_deadline
            && self.renew_deadline < self.ttl;
        if ok {
            Ok(())
        } else {
            Err(LeaseError::InvalidConfig(format!(
                "need 0 < renew_interval < renew_deadline < ttl and retry_interval > 0, got {self:?}"
            )))
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self::new(Duration::from_secs(15))
    }
}

/// The stored value of a lease key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    /// Unix milliseconds after which any contender may take the lease over.
    pub expires_at_ms: u64,
    /// Unix milliseconds of the acquisition that started this holder's term.
    pub acquired_at_ms: u64,
    /// Number of times the lease changed hands (incremented on every acquire).
    pub transitions: u64,
}

impl LeaseRecord {
    pub fn parse(raw: &[u8]) -> Result<Self, KvError> {
        serde_json::from_slice(raw)
            .map_err(|e| KvError::DeserializationError(format!("lease record: {e}")))
    }

    pub fn to_bytes(&self) -> Result<Bytes, KvError> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| KvError::SerializationError(format!("lease record: {e}")))
    }
}

/// What a contender may do with the record it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// No live record: acquire with `create`.
    Create,
    /// Expired or unparseable record at this revision: CAS `update` it.
    Replace(VersionToken),
    /// Somebody holds it until the given time.
    Held { holder: String, expires_at_ms: u64 },
}

/// The expiry decision, pure: `latest` is the key's latest record, `now_ms`
/// the contender's wall clock.
pub fn decide(latest: Option<&KvUpdate>, now_ms: u64) -> Takeover {
    match latest {
        None | Some(KvUpdate::Delete { .. } | KvUpdate::Purge { .. }) => Takeover::Create,
        Some(KvUpdate::Put(e)) => match LeaseRecord::parse(&e.value) {
            Err(_) => Takeover::Replace(e.version),
            Ok(r) if r.expires_at_ms <= now_ms => Takeover::Replace(e.version),
            Ok(r) => Takeover::Held {
                holder: r.holder,
                expires_at_ms: r.expires_at_ms,
            },
        },
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// Another writer changed the key: this holder is no longer leader.
    #[error("lease {key:?} lost: another writer changed it")]
    Lost { key: String },
    #[error("lease {key:?} is not held by this contender")]
    NotHeld { key: String },
    #[error("invalid lease config: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Kv(#[from] KvError),
}

impl LeaseError {
    pub fn reason(&self) -> &'static str {
        match self {
            LeaseError::Lost { .. } => "LeaseLost",
            LeaseError::NotHeld { .. } => "LeaseNotHeld",
            LeaseError::InvalidConfig(_) => "InvalidConfig",
            LeaseError::Kv(e) => e.reason(),
        }
    }
}

#[derive(Default)]
struct Held {
    revision: Option<VersionToken>,
    /// The holder is leader strictly before this instant.
    valid_until: Option<Instant>,
    acquired_at_ms: u64,
    transitions: u64,
}

/// One contender for one lease key.
pub struct Lease {
    store: Arc<dyn KvStore>,
    key: String,
    identity: String,
    config: LeaseConfig,
    held: Mutex<Held>,
    /// Serializes acquire / renew / release.
    op: tokio::sync::Mutex<()>,
    tx: watch::Sender<bool>,
    transitions: AtomicU64,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("identity", &self.identity)
            .field("held", &self.is_held())
            .finish()
    }
}

impl Lease {
    pub fn new(
        store: Arc<dyn KvStore>,
        key: impl Into<String>,
        identity: impl Into<String>,
        config: LeaseConfig,
    ) -> Result<Self, LeaseError> {
        config.validate()?;
        let key = key.into();
        super::filter::validate_key(&key)?;
        let (tx, _) = watch::channel(false);
        Ok(Self {
            store,
            key,
            identity: identity.into(),
            config,
            held: Mutex::new(Held::default()),
            op: tokio::sync::Mutex::new(()),
            tx,
            transitions: AtomicU64::new(0),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// True while this contender is leader: check it right before each write.
    pub fn is_held(&self) -> bool {
        let held = self.lock();
        let valid = held.valid_until.is_some_and(|t| Instant::now() < t);
        drop(held);
        if !valid {
            self.publish_not_leader();
        }
        valid
    }

    fn publish_not_leader(&self) {
        if self.tx.send_replace(false) {
            self.transitions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The instant until which this contender is leader, if it is.
    pub fn valid_until(&self) -> Option<Instant> {
        self.lock().valid_until.filter(|t| Instant::now() < *t)
    }

    /// Holding state; turns false at the latest when the renew deadline
    /// passes, while [`run`](Self::run) is running.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// How many times this contender gained or lost the lease.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    /// The current record of the key (`None` when free).
    pub async fn holder(&self) -> Result<Option<LeaseRecord>, LeaseError> {
        match self.store.entry(&self.key).await? {
            Some(KvUpdate::Put(e)) => Ok(Some(LeaseRecord::parse(&e.value)?)),
            _ => Ok(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        lock(&self.held)
    }

    fn set_held(
        &self,
        revision: VersionToken,
        sent: Instant,
        acquired_at_ms: u64,
        transitions: u64,
    ) {
        let mut held = self.lock();
        held.revision = Some(revision);
        held.valid_until = Some(sent + self.config.renew_deadline);
        held.acquired_at_ms = acquired_at_ms;
        held.transitions = transitions;
        drop(held);
        if !self.tx.send_replace(true) {
            self.transitions.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn set_lost(&self) {
        *self.lock() = Held::default();
        self.publish_not_leader();
    }

    fn record(&self, now_ms: u64, acquired_at_ms: u64, transitions: u64) -> Result<Bytes, KvError> {
        LeaseRecord {
            holder: self.identity.clone(),
            expires_at_ms: now_ms + u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX),
            acquired_at_ms,
            transitions,
        }
        .to_bytes()
    }

    /// One attempt to become holder. `Ok(true)` when this contender holds
    /// the lease now (also when it already did and renewed it).
    pub async fn try_acquire(&self) -> Result<bool, LeaseError> {
        if self.lock().revision.is_some() {
            // Still the last writer as far as we know (perhaps past the
            // deadline): a CAS renew tells, and is safe either way.
            return match self.renew().await {
                Ok(()) => Ok(true),
                Err(LeaseError::Lost { .. } | LeaseError::NotHeld { .. }) => Ok(false),
                Err(e) => Err(e),
            };
        }
        let _op = self.op.lock().await;
        let latest = self.store.entry(&self.key).await?;
        let previous_transitions = match &latest {
            Some(KvUpdate::Put(e)) => LeaseRecord::parse(&e.value)
                .map(|r| r.transitions)
                .unwrap_or(0),
            _ => 0,
        };
        let now_ms = unix_ms();
        let transitions = previous_transitions + 1;
        let value = self.record(now_ms, now_ms, transitions)?;
        let sent = Instant::now();
        let result = match decide(latest.as_ref(), now_ms) {
            Takeover::Held { .. } => return Ok(false),
            Takeover::Create => self.store.create(&self.key, value).await,
            Takeover::Replace(rev) => self.store.update(&self.key, value, rev).await,
        };
        match result {
            Ok(rev) => {
                self.set_held(rev, sent, now_ms, transitions);
                Ok(true)
            }
            Err(KvError::AlreadyExists(_) | KvError::RevisionMismatch { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Extends the lease by CAS on the revision this holder wrote last (also
    /// after the deadline passed: if nobody wrote since, nobody took over).
    /// `Lost` (and the holding state turns false) when anyone else wrote the key.
    pub async fn renew(&self) -> Result<(), LeaseError> {
        let _op = self.op.lock().await;
        let current = {
            let held = self.lock();
            held.revision
                .map(|r| (r, held.acquired_at_ms, held.transitions))
        };
        let Some((revision, acquired_at_ms, transitions)) = current else {
            self.publish_not_leader();
            return Err(LeaseError::NotHeld {
                key: self.key.clone(),
            });
        };
        let value = self.record(unix_ms(), acquired_at_ms, transitions)?;
        let sent = Instant::now();
        match self.store.update(&self.key, value, revision).await {
            Ok(rev) => {
                self.set_held(rev, sent, acquired_at_ms, transitions);
                Ok(())
            }
            Err(KvError::RevisionMismatch { .. } | KvError::AlreadyExists(_)) => {
                self.set_lost();
                Err(LeaseError::Lost {
                    key: self.key.clone(),
                })
            }
            // Unknown outcome (e.g. timeout): still leader until the deadline;
            // the next renew tells (a CAS on a changed revision fails).
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up with a CAS delete so another contender can take it
    /// at once. The holding state turns false before the call is sent.
    ///
    /// A renew abandoned in flight (shutdown raced it) may still have been
    /// stored, at a revision this holder never learned: a newer record of the
    /// same holder and term is deleted too, or standbys would wait out its TTL.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let _op = self.op.lock().await;
        let (revision, term) = {
            let held = self.lock();
            (held.revision, held.acquired_at_ms)
        };
        self.set_lost();
        let Some(mut revision) = revision else {
            return Ok(());
        };
        for _ in 0..3 {
            match self.store.delete_with_version(&self.key, revision).await {
                Ok(_) => return Ok(()),
                Err(KvError::RevisionMismatch { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            match self.store.entry(&self.key).await? {
                Some(KvUpdate::Put(e))
                    if LeaseRecord::parse(&e.value)
                        .is_ok_and(|r| r.holder == self.identity && r.acquired_at_ms == term) =>
                {
                    revision = e.version;
                }
                // Someone else's record, or already gone.
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// Keeps acquiring and renewing until `shutdown` resolves, then releases.
    /// The holding state is published on [`subscribe`](Self::subscribe) and
    /// turns false when the renew deadline passes without a successful renew,
    /// also while a renew call is still in flight. `is_held()` is exact; the
    /// published state may lag it by task scheduling.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut next = Instant::now();
        loop {
            let wake = match self.valid_until() {
                Some(d) if d < next => d,
                _ => next,
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep_until(wake) => {}
            }
            self.is_held();
            if Instant::now() < next {
                continue;
            }
            let attempt = self.try_acquire();
            tokio::pin!(attempt);
            let outcome = loop {
                let deadline = self.valid_until();
                tokio::select! {
                    r = &mut attempt => break Some(r),
                    () = &mut shutdown => break None,
                    () = sleep_until(deadline) => {
                        self.is_held();
                    }
                }
            };
            let Some(outcome) = outcome else { break };
            next = Instant::now()
                + match outcome {
                    Ok(true) => self.config.renew_interval,
                    Ok(false) => self.config.retry_interval,
                    Err(ref e) => {
                        tracing::debug!(key = %self.key, error = %e, "lease attempt failed");
                        self.config.retry_interval
                    }
                };
        }
        if let Err(e) = self.release().await {
            tracing::debug!(key = %self.key, error = %e, "lease release failed");
        }
    }

    /// Runs [`run`](Self::run) on a task; dropping or stopping the handle releases the lease.
    pub fn spawn(self: Arc<Self>) -> LeaseTask {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let lease = self.clone();
        let handle = tokio::spawn(async move {
            lease
                .run(async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                })
                .await;
        });
        LeaseTask {
            lease: self,
            stop: stop_tx,
            handle: Some(handle),
        }
    }
}

/// A lease kept by a background task.
pub struct LeaseTask {
    lease: Arc<Lease>,
    stop: watch::Sender<bool>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl LeaseTask {
    pub fn lease(&self) -> &Arc<Lease> {
        &self.lease
    }

    /// Stops renewing, releases the lease and waits for the task.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }
}

impl Drop for LeaseTask {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvEntry;

    fn put(value: &[u8], rev: u64) -> KvUpdate {
        KvUpdate::Put(KvEntry {
            key: "lease".into(),
            value: Bytes::copy_from_slice(value),
            version: VersionToken::from_u64(rev),
            published: None,
        })
    }

    fn record(expires_at_ms: u64) -> Vec<u8> {
        serde_json::to_vec(&LeaseRecord {
            holder: "a".into(),
            expires_at_ms,
            acquired_at_ms: 1,
            transitions: 1,
        })
        .unwrap()
    }

    #[test]
    fn records_round_trip_and_garbage_fails_to_parse() {
        let r = LeaseRecord {
            holder: "pod-1".into(),
            expires_at_ms: 42,
            acquired_at_ms: 7,
            transitions: 3,
        };
        assert_eq!(LeaseRecord::parse(&r.to_bytes().unwrap()).unwrap(), r);
        assert!(LeaseRecord::parse(b"not json").is_err());
        assert!(LeaseRecord::parse(b"{\"holder\":\"x\"}").is_err());
    }

    #[test]
    fn missing_or_tombstoned_keys_are_created() {
        assert_eq!(decide(None, 100), Takeover::Create);
        let del = KvUpdate::Delete {
            key: "lease".into(),
            version: VersionToken::from_u64(3),
        };
        assert_eq!(decide(Some(&del), 100), Takeover::Create);
    }

    #[test]
    fn expired_or_corrupt_records_are_replaced_by_cas_and_live_ones_kept() {
        let rev = VersionToken::from_u64(9);
        assert_eq!(
            decide(Some(&put(&record(100), 9)), 100),
            Takeover::Replace(rev)
        );
        assert_eq!(
            decide(Some(&put(&record(99), 9)), 100),
            Takeover::Replace(rev)
        );
        assert_eq!(
            decide(Some(&put(b"{garbage", 9)), 100),
            Takeover::Replace(rev)
        );
        assert_eq!(
            decide(Some(&put(&record(101), 9)), 100),
            Takeover::Held {
                holder: "a".into(),
                expires_at_ms: 101
            }
        );
    }

    #[test]
    fn config_requires_renew_deadline_below_ttl() {
        assert!(LeaseConfig::new(Duration::from_secs(3)).validate().is_ok());
        let bad = LeaseConfig {
            renew_deadline: Duration::from_secs(3),
            ..LeaseConfig::new(Duration::from_secs(3))
        };
        assert!(bad.validate().is_err());
        let bad = LeaseConfig {
            renew_interval: Duration::from_secs(2),
            ..LeaseConfig::new(Duration::from_secs(3))
        };
        assert!(bad.validate().is_err());
    }
}
