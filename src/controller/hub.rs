//! Bucket watches shared by every binding on a bucket (invariant 6).
//!
//! Each bucket with at least one binding has ONE long-lived watch of the
//! whole bucket, started at the bucket's head; updates fan out to the
//! bindings whose prefixes match. A binding's own history before it joined
//! (its initial state, or the delta since its recorded cursor) comes from a
//! bounded catch-up watch the binding runs itself and closes once synced, so
//! the number of consumers is one per bucket plus at most
//! `catchup_concurrency` short-lived ones, however many bindings exist.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use super::KvConnector;
use crate::{
    kv::{KvError, KvStore, KvUpdate, WatchCursor, WatchEvent},
    metrics::Metrics,
    projection::ProjectionRules,
};

/// What a bucket watch tells its bindings.
#[derive(Clone)]
pub enum HubEvent {
    /// The shared watch is (re)started; catch up from your cursor with `store`.
    Attached(Arc<dyn KvStore>),
    /// A live update matching the binding's prefixes, with when it arrived.
    Update(KvUpdate, Instant),
    /// The shared watch failed; a new `Attached` follows once it recovers.
    Lost(KvError),
}

struct Subscriber {
    rules: ProjectionRules,
    tx: mpsc::UnboundedSender<HubEvent>,
}

#[derive(Default)]
struct Shared {
    subscribers: HashMap<u64, Subscriber>,
    attached: Option<Arc<dyn KvStore>>,
    last_error: Option<KvError>,
}

struct BucketWatch {
    shared: Arc<Mutex<Shared>>,
    head: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// All bucket watches of the operator.
#[derive(Clone)]
pub struct Hub {
    buckets: Arc<Mutex<HashMap<String, BucketWatch>>>,
    kv: Arc<dyn KvConnector>,
    metrics: Metrics,
    health_interval: Duration,
}

/// A binding's membership in a bucket watch; leaves on drop.
pub struct Subscription {
    hub: Hub,
    bucket: String,
    id: u64,
    /// Newest revision seen on the bucket (for lag).
    pub head: Arc<AtomicU64>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.bucket, self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    pub fn new(kv: Arc<dyn KvConnector>, metrics: Metrics) -> Self {
        Self {
            buckets: Arc::default(),
            kv,
            metrics,
            health_interval: Duration::from_secs(2),
        }
    }

    /// Number of bucket watches running (one per bucket with bindings).
    pub fn bucket_count(&self) -> usize {
        lock(&self.buckets).len()
    }

    /// Joins `bucket`'s watch. The binding receives `Attached` (now, if the
    /// watch is up) and then every matching update.
    pub fn subscribe(
        &self,
        bucket: &str,
        id: u64,
        rules: ProjectionRules,
        tx: mpsc::UnboundedSender<HubEvent>,
    ) -> Subscription {
        let mut buckets = lock(&self.buckets);
        let watch = buckets.entry(bucket.to_owned()).or_insert_with(|| {
            let shared = Arc::new(Mutex::new(Shared::default()));
            let head = Arc::new(AtomicU64::new(0));
            let task = tokio::spawn(run_bucket(
                bucket.to_owned(),
                self.kv.clone(),
                shared.clone(),
                head.clone(),
                self.metrics.clone(),
                self.health_interval,
            ));
            BucketWatch { shared, head, task }
        });
        {
            let mut shared = lock(&watch.shared);
            if let Some(store) = &shared.attached {
                let _ = tx.send(HubEvent::Attached(store.clone()));
            } else if let Some(err) = &shared.last_error {
                let _ = tx.send(HubEvent::Lost(err.clone()));
            }
            shared.subscribers.insert(id, Subscriber { rules, tx });
        }
        Subscription {
            hub: self.clone(),
            bucket: bucket.to_owned(),
            id,
            head: watch.head.clone(),
        }
    }

    fn unsubscribe(&self, bucket: &str, id: u64) {
        let mut buckets = lock(&self.buckets);
        let empty = match buckets.get(bucket) {
            Some(w) => {
                let mut shared = lock(&w.shared);
                shared.subscribers.remove(&id);
                shared.subscribers.is_empty()
            }
            None => false,
        };
        if empty && let Some(w) = buckets.remove(bucket) {
            w.task.abort();
            debug!(bucket, "last binding left; bucket watch stopped");
        }
    }
}

fn broadcast(shared: &Mutex<Shared>, event: &HubEvent) {
    let mut s = lock(shared);
    if let HubEvent::Lost(e) = event {
        s.attached = None;
        s.last_error = Some(e.clone());
    }
    s.subscribers
        .retain(|_, sub| sub.tx.send(event.clone()).is_ok());
}

async fn run_bucket(
    bucket: String,
    kv: Arc<dyn KvConnector>,
    shared: Arc<Mutex<Shared>>,
    head: Arc<AtomicU64>,
    metrics: Metrics,
    health_interval: Duration,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let err = watch_once(&bucket, &kv, &shared, &head, &metrics, health_interval).await;
        metrics.error(err.reason());
        warn!(bucket, reason = err.reason(), error = %err, "bucket watch down; retrying in {backoff:?}");
        broadcast(&shared, &HubEvent::Lost(err));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Runs the shared watch until it fails; returns why.
async fn watch_once(
    bucket: &str,
    kv: &Arc<dyn KvConnector>,
    shared: &Arc<Mutex<Shared>>,
    head: &AtomicU64,
    metrics: &Metrics,
    health_interval: Duration,
) -> KvError {
    let store = match kv.open(bucket).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let info = match store.info().await {
        Ok(i) => i,
        Err(e) => return e,
    };
    let start = info
        .last_revision
        .map(WatchCursor::after)
        .unwrap_or_default();
    if let Some(last) = info.last_revision.and_then(|v| v.as_u64()) {
        head.fetch_max(last, Ordering::Relaxed);
    }
    let mut stream = match store.watch_all_from(start).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    {
        let mut s = lock(shared);
        s.attached = Some(store.clone());
        s.last_error = None;
    }
    broadcast(shared, &HubEvent::Attached(store.clone()));
    info!(bucket, from = %start, "bucket watch up");
    metrics.open_watches.inc();
    let mut health = tokio::time::interval(health_interval);
    health.tick().await;
    let err = loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(WatchEvent::Update(update))) => {
                    metrics.delivered(bucket, "shared", 1);
                    if let Some(v) = update.version().as_u64() {
                        head.fetch_max(v, Ordering::Relaxed);
                    }
                    let now = Instant::now();
                    let mut s = lock(shared);
                    s.subscribers.retain(|_, sub| {
                        !sub.rules.matches(update.key())
                            || sub.tx.send(HubEvent::Update(update.clone(), now)).is_ok()
                    });
                }
                Some(Ok(WatchEvent::Synced { .. })) => {}
                Some(Err(e)) => break e,
                None => break KvError::WatchError("bucket watch ended".into()),
            },
            _ = health.tick() => {
                if let Err(e) = store.info().await {
                    break e;
                }
            }
        }
    };
    metrics.open_watches.dec();
    err
}
