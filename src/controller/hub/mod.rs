//! Bucket watches shared by every binding on a bucket (invariant 6).
//!
//! Each bucket with at least one binding has ONE long-lived watch of the
//! whole bucket, started at the bucket's head; updates fan out to the
//! bindings whose prefixes match. A binding's own history before it joined
//! (its initial state, or the delta since its recorded cursor) comes from
//! the bucket's catch-up runner: requests that arrive together are served
//! by one scan (one state-sync for those without a cursor, one resume from
//! the smallest cursor for the others), so a bucket has at most three
//! consumers (live, full, delta) however many bindings start at once.
//!
//! The parts: [`event`] (what bindings receive), `shared` (one bucket's
//! subscribers), `index` (prefix routing), `catchup` (the catch-up runner);
//! this file holds the [`Hub`], the subscriptions and the live watch.

mod catchup;
pub mod event;
mod index;
mod shared;

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

use crate::{
    kv::{KvConnector, KvError, WatchCursor, WatchEvent},
    metrics::Metrics,
    projection::ProjectionRules,
    reason::Reason,
    util::{backoff::Backoff, lock},
};
pub use event::{CATCHUP_CHUNK, HubEvent};
use shared::{CatchupRequest, Shared, Subscriber};

struct BucketWatch {
    shared: Arc<Mutex<Shared>>,
    head: Arc<AtomicU64>,
    task: JoinHandle<()>,
    runner: JoinHandle<()>,
    requests: mpsc::UnboundedSender<CatchupRequest>,
}

/// All bucket watches of the operator.
#[derive(Clone)]
pub struct Hub {
    buckets: Arc<Mutex<HashMap<String, BucketWatch>>>,
    kv: Arc<dyn KvConnector>,
    metrics: Metrics,
    health_interval: Duration,
    /// How long the catch-up runner waits after a request for others to
    /// join its scan.
    gather: Duration,
    tickets: Arc<AtomicU64>,
}

/// A binding's membership in a bucket watch; leaves on drop.
pub struct Subscription {
    hub: Hub,
    bucket: String,
    id: u64,
    requests: mpsc::UnboundedSender<CatchupRequest>,
    /// Newest revision seen on the bucket (for lag).
    pub head: Arc<AtomicU64>,
}

impl Subscription {
    /// Asks for the binding's history after `from` (none: its full state,
    /// tombstones included). The answer arrives as `Catchup` events, then
    /// `CaughtUp` or `CatchupFailed`, all carrying the returned ticket;
    /// events of an older ticket are stale.
    pub fn request_catchup(&self, from: WatchCursor) -> Result<u64, KvError> {
        let ticket = self.hub.tickets.fetch_add(1, Ordering::Relaxed);
        self.requests
            .send(CatchupRequest {
                id: self.id,
                ticket,
                from,
            })
            .map_err(|_| KvError::WatchError("the bucket's catch-up runner is gone".into()))?;
        Ok(ticket)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.bucket, self.id);
    }
}

impl Hub {
    pub fn new(kv: Arc<dyn KvConnector>, metrics: Metrics, gather: Duration) -> Self {
        Self {
            buckets: Arc::default(),
            kv,
            metrics,
            health_interval: Duration::from_secs(2),
            gather,
            tickets: Arc::new(AtomicU64::new(1)),
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
            let (requests, rx) = mpsc::unbounded_channel();
            let runner = tokio::spawn(catchup::run_catchups(
                bucket.to_owned(),
                shared.clone(),
                rx,
                self.metrics.clone(),
                self.gather,
            ));
            BucketWatch {
                shared,
                head,
                task,
                runner,
                requests,
            }
        });
        {
            let mut shared = lock(&watch.shared);
            if let Some(store) = &shared.attached {
                let _ = tx.send(HubEvent::Attached(store.clone()));
            } else if let Some(err) = &shared.last_error {
                let _ = tx.send(HubEvent::Lost(err.clone()));
            }
            shared.add(id, Subscriber { rules, tx });
        }
        Subscription {
            hub: self.clone(),
            bucket: bucket.to_owned(),
            id,
            requests: watch.requests.clone(),
            head: watch.head.clone(),
        }
    }

    fn unsubscribe(&self, bucket: &str, id: u64) {
        let mut buckets = lock(&self.buckets);
        let empty = match buckets.get(bucket) {
            Some(w) => {
                let mut shared = lock(&w.shared);
                shared.remove(id);
                shared.subscribers.is_empty()
            }
            None => false,
        };
        if empty && let Some(w) = buckets.remove(bucket) {
            w.task.abort();
            w.runner.abort();
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
    let gone: Vec<u64> = s
        .subscribers
        .iter()
        .filter(|(_, sub)| sub.tx.send(event.clone()).is_err())
        .map(|(id, _)| *id)
        .collect();
    for id in gone {
        s.remove(id);
    }
}

async fn run_bucket(
    bucket: String,
    kv: Arc<dyn KvConnector>,
    shared: Arc<Mutex<Shared>>,
    head: Arc<AtomicU64>,
    metrics: Metrics,
    health_interval: Duration,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let err = watch_once(&bucket, &kv, &shared, &head, &metrics, health_interval).await;
        metrics.error(Reason::from(&err));
        let delay = backoff.next_delay();
        warn!(bucket, reason = err.reason(), error = %err, "bucket watch down; retrying in {delay:?}");
        broadcast(&shared, &HubEvent::Lost(err));
        tokio::time::sleep(delay).await;
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
    let mut targets = Vec::new();
    let err = loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(WatchEvent::Update(update))) => {
                    metrics.delivered(bucket, "shared", 1);
                    if let Some(v) = update.version().as_u64() {
                        head.fetch_max(v, Ordering::Relaxed);
                    }
                    let now = Instant::now();
                    let update = Arc::new(update);
                    let mut s = lock(shared);
                    s.index.route(update.key(), &mut targets);
                    for id in &targets {
                        let sent = s.subscribers.get(id).is_some_and(|sub| {
                            sub.tx.send(HubEvent::Update(update.clone(), now)).is_ok()
                        });
                        if !sent {
                            s.remove(*id);
                        }
                    }
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
