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

use std::{
    collections::{BTreeMap, HashMap},
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
    kv::{KvConnector, KvError, KvStore, KvUpdate, VersionToken, WatchCursor, WatchEvent, filter},
    metrics::Metrics,
    projection::ProjectionRules,
    reason::Reason,
    util::{backoff::Backoff, lock},
};

/// What a bucket watch tells its bindings.
#[derive(Clone)]
pub enum HubEvent {
    /// The shared watch is (re)started; ask for a catch-up from your cursor.
    Attached(Arc<dyn KvStore>),
    /// A live update matching the binding's prefixes, with when it arrived;
    /// shared by every binding it goes to (one copy however many match).
    Update(Arc<KvUpdate>, Instant),
    /// The shared watch failed; a new `Attached` follows once it recovers.
    Lost(KvError),
    /// The next updates of catch-up `ticket`, in revision order: only keys
    /// under the binding's prefixes, only revisions after the cursor it asked
    /// from (a full catch-up reports tombstones too). Sent in chunks of up to
    /// [`CATCHUP_CHUNK`]: a binding's channel holds a few events, not one
    /// slot per key, and nothing waits for the end of the scan.
    Catchup { ticket: u64, updates: Vec<KvUpdate> },
    /// Catch-up `ticket` is complete: every update of the binding's
    /// prefixes with a revision <= `cursor` was delivered or was covered by
    /// the cursor asked from (invariant 1).
    CaughtUp { ticket: u64, cursor: WatchCursor },
    /// Catch-up `ticket` failed; `CursorExpired` means this binding's own
    /// cursor is older than the bucket keeps.
    CatchupFailed { ticket: u64, error: KvError },
}

/// Most updates one `Catchup` event carries.
pub const CATCHUP_CHUNK: usize = 32;

struct Subscriber {
    rules: ProjectionRules,
    tx: mpsc::UnboundedSender<HubEvent>,
}

#[derive(Default)]
struct Shared {
    subscribers: HashMap<u64, Subscriber>,
    /// Subscriber ids by prefix, for the live fan-out.
    index: PrefixIndex<u64>,
    attached: Option<Arc<dyn KvStore>>,
    last_error: Option<KvError>,
}

impl Shared {
    fn add(&mut self, id: u64, sub: Subscriber) {
        self.remove(id);
        self.index.insert(sub.rules.prefixes(), id);
        self.subscribers.insert(id, sub);
    }

    fn remove(&mut self, id: u64) {
        if let Some(old) = self.subscribers.remove(&id) {
            self.index.remove(old.rules.prefixes(), id);
        }
    }
}

/// A binding's wish for its history: `from` none = full state.
struct CatchupRequest {
    id: u64,
    ticket: u64,
    from: WatchCursor,
}

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
            let runner = tokio::spawn(run_catchups(
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

/// A union of more prefixes than this is served by a watch of the whole
/// bucket (one filter instead of thousands in the consumer's config);
/// below it, a scan reads only the keys its requesters want, so bindings
/// arriving in several batches do not each pay for the whole bucket.
const MAX_SCAN_PREFIXES: usize = 2048;

/// Serves catch-up requests, one batch at a time.
///
/// A request that arrives while a scan runs waits for the next one rather
/// than joining: a state-sync delivers each key once, at its position in
/// the stream, so a late joiner would miss the keys already passed, and a
/// resume cannot go back before where it already is. Waiting costs at most
/// one scan; correctness needs no argument.
async fn run_catchups(
    bucket: String,
    shared: Arc<Mutex<Shared>>,
    mut rx: mpsc::UnboundedReceiver<CatchupRequest>,
    metrics: Metrics,
    gather: Duration,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        // the bindings created together ask within a few ms of each other
        tokio::time::sleep(gather).await;
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        serve_batch(&bucket, &shared, &metrics, std::mem::take(&mut batch)).await;
    }
}

/// A binding taking part in one scan.
struct Requester {
    ticket: u64,
    from: WatchCursor,
    prefixes: Vec<String>,
    tx: mpsc::UnboundedSender<HubEvent>,
    /// False once its binding left (its channel is closed).
    alive: bool,
    /// Updates not sent yet (fewer than [`CATCHUP_CHUNK`]).
    pending: Vec<KvUpdate>,
}

impl Requester {
    fn send(&mut self, event: HubEvent) {
        if self.alive && self.tx.send(event).is_err() {
            self.alive = false;
        }
    }

    fn push(&mut self, update: KvUpdate) {
        self.pending.push(update);
        if self.pending.len() >= CATCHUP_CHUNK {
            self.send_pending();
        }
    }

    fn send_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let updates = std::mem::take(&mut self.pending);
        let ticket = self.ticket;
        self.send(HubEvent::Catchup { ticket, updates });
    }

    fn fail(&mut self, error: KvError) {
        let ticket = self.ticket;
        self.send(HubEvent::CatchupFailed { ticket, error });
    }
}

async fn serve_batch(
    bucket: &str,
    shared: &Mutex<Shared>,
    metrics: &Metrics,
    mut batch: Vec<CatchupRequest>,
) {
    // a binding's newest request supersedes its older ones
    batch.sort_by_key(|r| (r.id, std::cmp::Reverse(r.ticket)));
    batch.dedup_by_key(|r| r.id);
    let (store, last_error, requesters) = {
        let s = lock(shared);
        let requesters: Vec<Requester> = batch
            .iter()
            .filter_map(|r| {
                let sub = s.subscribers.get(&r.id)?;
                Some(Requester {
                    ticket: r.ticket,
                    from: r.from,
                    prefixes: sub.rules.prefixes().to_vec(),
                    tx: sub.tx.clone(),
                    alive: true,
                    pending: Vec::new(),
                })
            })
            .collect();
        (s.attached.clone(), s.last_error.clone(), requesters)
    };
    if requesters.is_empty() {
        return;
    }
    let Some(store) = store else {
        let err = last_error.unwrap_or(KvError::NotConnected);
        for mut r in requesters {
            r.fail(err.clone());
        }
        return;
    };
    let (full, delta): (Vec<_>, Vec<_>) = requesters.into_iter().partition(|r| r.from.is_none());
    debug!(
        bucket,
        full = full.len(),
        delta = delta.len(),
        "catch-up batch"
    );
    futures::join!(
        scan(bucket, &store, metrics, full),
        resume(bucket, &store, metrics, delta),
    );
}

/// Resume for requesters with a cursor still retained (the others get
/// `CursorExpired`): by direct reads when a binding has few records to read
/// ([`resume_direct`]), else one scan per distinct cursor, see [`delta_runs`].
async fn resume(
    bucket: &str,
    store: &Arc<dyn KvStore>,
    metrics: &Metrics,
    mut requesters: Vec<Requester>,
) {
    if requesters.is_empty() {
        return;
    }
    let info = match store.info().await {
        Ok(info) => info,
        Err(e) => {
            for r in &mut requesters {
                r.fail(e.clone());
            }
            return;
        }
    };
    let first = info.first_revision.and_then(|v| v.as_u64());
    let last = info.last_revision.and_then(|v| v.as_u64()).unwrap_or(0);
    requesters.retain_mut(|r| {
        let Some(from) = r.from.version().and_then(|v| v.as_u64()) else {
            return true;
        };
        // `from + 1` must still be retained (exactly one before the first
        // is fine); a cursor past the last revision means a new stream
        let expired = first.is_some_and(|f| from.saturating_add(1) < f) || from > last;
        if expired {
            let first_retained = VersionToken::from_u64(first.unwrap_or(last + 1));
            r.fail(KvError::CursorExpired {
                cursor: VersionToken::from_u64(from),
                first_retained,
            });
        }
        !expired
    });
    let mut requesters = resume_direct(bucket, store, metrics, requesters, last).await;
    let at = |r: &Requester| r.from.version().and_then(|v| v.as_u64()).unwrap_or(0);
    requesters.sort_by_key(at);
    let cursors: Vec<u64> = requesters.iter().map(at).collect();
    let starts = delta_runs(&cursors);
    // one run at a time: still one delta consumer per bucket
    for (i, &start) in starts.iter().enumerate().rev() {
        let run = requesters.split_off(start);
        debug!(
            bucket,
            run = i,
            bindings = run.len(),
            from = cursors[start],
            "catch-up resume"
        );
        scan(bucket, store, metrics, run).await;
    }
}

/// Most records one binding's resume reads one by one; a binding with more
/// to read joins a resume scan instead.
const DIRECT_RESUME_READS: usize = 64;

/// Bindings whose records are read one by one at the same time.
const DIRECT_RESUME_CONCURRENCY: usize = 32;

/// Serves each requester's delta up to revision `last` by reading its
/// records one by one (a direct get per record, no consumer), answering it
/// with `Catchup` chunks and `CaughtUp`. A restart of thousands of bindings,
/// most with nothing or a few changes each, then costs a request per change
/// instead of one scan per distinct cursor. Returns the requesters it could
/// not serve this way (too many records, a failed read, no direct gets):
/// they go to the resume scans.
async fn resume_direct(
    bucket: &str,
    store: &Arc<dyn KvStore>,
    metrics: &Metrics,
    requesters: Vec<Requester>,
    last: u64,
) -> Vec<Requester> {
    if requesters.is_empty() || last == 0 {
        return requesters;
    }
    let upto = VersionToken::from_u64(last);
    let read: Vec<(Requester, Option<Vec<KvUpdate>>)> = futures::stream::iter(requesters)
        .map(|r| {
            let store = store.clone();
            async move {
                let updates = match r.from.version() {
                    Some(after) => store
                        .changes_between(&r.prefixes, after, upto, DIRECT_RESUME_READS)
                        .await
                        .unwrap_or_else(|e| {
                            debug!(reason = e.reason(), error = %e, "direct resume read failed; scanning instead");
                            None
                        }),
                    None => None,
                };
                (r, updates)
            }
        })
        .buffer_unordered(DIRECT_RESUME_CONCURRENCY)
        .collect()
        .await;
    // retention may have moved while reading: what it dropped was not read
    let first_now = match store.info().await {
        Ok(info) => info.first_revision,
        Err(_) => return read.into_iter().map(|(r, _)| r).collect(),
    };
    let mut rest = Vec::new();
    let mut delivered = 0u64;
    for (mut r, updates) in read {
        let Some(updates) = updates else {
            rest.push(r);
            continue;
        };
        if let (Some(cursor), Some(first)) = (r.from.version(), first_now)
            && !covers_before(cursor, first)
        {
            r.fail(KvError::CursorExpired {
                cursor,
                first_retained: first,
            });
            continue;
        }
        delivered += updates.len() as u64;
        for update in updates {
            r.push(update);
        }
        r.send_pending();
        let ticket = r.ticket;
        r.send(HubEvent::CaughtUp {
            ticket,
            cursor: WatchCursor::after(upto),
        });
    }
    metrics.delivered(bucket, "catchup", delivered);
    debug!(
        bucket,
        delivered,
        scanned = rest.len(),
        "catch-up resume by direct reads"
    );
    rest
}

/// Most resume scans one batch is split into (run one after another).
const MAX_DELTA_RUNS: usize = 1024;

/// Where the runs of a resume batch start, given its cursors sorted
/// ascending: one run per distinct cursor. A binding's cursor is the
/// revision of its own last write, so a resume from a smaller cursor would
/// re-deliver at least that update to every newer binding (a restart of
/// 10,000 bindings would deliver 10,000 updates for 1,000 changes).
/// Bindings with equal cursors (those that synced together and were not
/// written since) share a run. Beyond [`MAX_DELTA_RUNS`] distinct cursors
/// the narrowest gaps share a run. Runs go one at a time, so a bucket
/// never has more than one resume consumer.
fn delta_runs(cursors: &[u64]) -> Vec<usize> {
    if cursors.is_empty() {
        return Vec::new();
    }
    let mut splits: Vec<(u64, usize)> = cursors
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] > w[0])
        .map(|(i, w)| (w[1] - w[0], i + 1))
        .collect();
    if splits.len() >= MAX_DELTA_RUNS {
        splits.sort_by_key(|&(gap, i)| (std::cmp::Reverse(gap), i));
        splits.truncate(MAX_DELTA_RUNS - 1);
    }
    let mut starts: Vec<usize> = std::iter::once(0)
        .chain(splits.into_iter().map(|(_, i)| i))
        .collect();
    starts.sort_unstable();
    starts
}

/// Finds the bindings a key belongs to: prefixes grouped by length, so a
/// key costs one hash lookup per distinct prefix length, not one prefix
/// comparison per binding (thousands of bindings share a bucket).
struct PrefixIndex<T> {
    by_len: BTreeMap<usize, HashMap<String, Vec<T>>>,
}

impl<T> Default for PrefixIndex<T> {
    fn default() -> Self {
        Self {
            by_len: BTreeMap::new(),
        }
    }
}

impl<T: Copy + Ord> PrefixIndex<T> {
    fn insert(&mut self, prefixes: &[String], id: T) {
        for p in prefixes {
            let ids = self
                .by_len
                .entry(p.len())
                .or_default()
                .entry(p.clone())
                .or_default();
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }

    fn remove(&mut self, prefixes: &[String], id: T) {
        for p in prefixes {
            let Some(of_len) = self.by_len.get_mut(&p.len()) else {
                continue;
            };
            if let Some(ids) = of_len.get_mut(p) {
                ids.retain(|i| *i != id);
                if ids.is_empty() {
                    of_len.remove(p);
                }
            }
            if of_len.is_empty() {
                self.by_len.remove(&p.len());
            }
        }
    }

    /// Every id with a prefix that starts `key`, each once, sorted.
    fn route(&self, key: &str, out: &mut Vec<T>) {
        out.clear();
        for (len, prefixes) in &self.by_len {
            let Some(head) = key.get(..*len) else {
                break;
            };
            if let Some(ids) = prefixes.get(head) {
                out.extend_from_slice(ids);
            }
        }
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}

/// One watch over the union of the requesters' prefixes from the smallest
/// cursor (none: state-sync), fanned out until `Synced`, then closed.
async fn scan(
    bucket: &str,
    store: &Arc<dyn KvStore>,
    metrics: &Metrics,
    mut requesters: Vec<Requester>,
) {
    if requesters.is_empty() {
        return;
    }
    let mut stream = loop {
        let start = requesters.iter().map(|r| r.from).min().unwrap_or_default();
        let all: Vec<String> = requesters
            .iter()
            .flat_map(|r| r.prefixes.iter().cloned())
            .collect();
        let mut prefixes = filter::normalize_prefixes(&all);
        if prefixes.len() > MAX_SCAN_PREFIXES {
            prefixes = vec![String::new()];
        }
        match store.watch_prefixes_from(&prefixes, start).await {
            Ok(stream) => break stream,
            Err(KvError::CursorExpired { first_retained, .. }) if !start.is_none() => {
                // retention moved since `info`: fail those now behind it, retry the rest
                let before = requesters.len();
                requesters.retain_mut(|r| {
                    let expired = r
                        .from
                        .version()
                        .is_some_and(|v| !covers_before(v, first_retained));
                    if expired {
                        r.fail(KvError::CursorExpired {
                            cursor: r.from.version().unwrap_or(first_retained),
                            first_retained,
                        });
                    }
                    !expired
                });
                if requesters.is_empty() {
                    return;
                }
                if requesters.len() == before {
                    let err = KvError::WatchError(format!(
                        "catch-up scan from {start} refused as expired (first retained {first_retained})"
                    ));
                    for r in &mut requesters {
                        r.fail(err.clone());
                    }
                    return;
                }
            }
            Err(e) => {
                for r in &mut requesters {
                    r.fail(e.clone());
                }
                return;
            }
        }
    };
    metrics.open_watches.inc();
    let mut router = PrefixIndex::default();
    for (i, r) in requesters.iter().enumerate() {
        router.insert(&r.prefixes, i);
    }
    let mut targets = Vec::new();
    let mut delivered = 0u64;
    let outcome = loop {
        match stream.next().await {
            Some(Ok(WatchEvent::Update(update))) => {
                delivered += 1;
                router.route(update.key(), &mut targets);
                let version = update.version();
                targets.retain(|&i| requesters[i].alive && !requesters[i].from.covers(&version));
                if let Some((&last, rest)) = targets.split_last() {
                    for &i in rest {
                        requesters[i].push(update.clone());
                    }
                    requesters[last].push(update);
                }
                if delivered.is_multiple_of(1024) && !requesters.iter().any(|r| r.alive) {
                    // every binding left: stop the scan, the server can rest
                    break Ok(WatchCursor::none());
                }
            }
            Some(Ok(WatchEvent::Synced { cursor })) => break Ok(cursor),
            Some(Err(e)) => break Err(e),
            None => break Err(KvError::WatchError("catch-up watch ended".into())),
        }
    };
    drop(stream);
    metrics.open_watches.dec();
    metrics.delivered(bucket, "catchup", delivered);
    match outcome {
        Ok(cursor) => {
            for r in &mut requesters {
                r.send_pending();
                let ticket = r.ticket;
                r.send(HubEvent::CaughtUp { ticket, cursor });
            }
        }
        Err(e) => {
            warn!(bucket, reason = e.reason(), error = %e, "catch-up scan failed");
            for r in &mut requesters {
                let err = match &e {
                    // only a binding whose own cursor is behind the stream is expired
                    KvError::CursorExpired { first_retained, .. } => match r.from.version() {
                        Some(v) if !covers_before(v, *first_retained) => KvError::CursorExpired {
                            cursor: v,
                            first_retained: *first_retained,
                        },
                        _ => KvError::WatchError(format!("catch-up scan failed: {e}")),
                    },
                    other => other.clone(),
                };
                r.fail(err);
            }
        }
    }
}

/// True when resuming after `cursor` loses nothing if the oldest retained
/// revision is `first`: `cursor + 1 >= first`.
fn covers_before(cursor: VersionToken, first: VersionToken) -> bool {
    match (cursor.as_u64(), first.as_u64()) {
        (Some(c), Some(f)) => c.saturating_add(1) >= f,
        _ => cursor >= first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requester(prefixes: &[&str]) -> Requester {
        let (tx, _rx) = mpsc::unbounded_channel();
        Requester {
            ticket: 0,
            from: WatchCursor::none(),
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            tx,
            alive: true,
            pending: Vec::new(),
        }
    }

    #[test]
    fn prefix_index_finds_every_binding_whose_prefix_starts_the_key_once() {
        let rs = [
            requester(&["web.", "shared."]),
            requester(&["web.a"]),
            requester(&[""]),
            requester(&["api."]),
            requester(&["web.", "web.api"]),
        ];
        let mut router = PrefixIndex::default();
        for (i, r) in rs.iter().enumerate() {
            router.insert(&r.prefixes, i);
        }
        let mut out = Vec::new();
        let cases: &[(&str, &[usize])] = &[
            ("web.api.port", &[0, 1, 2, 4]),
            ("web.b", &[0, 2, 4]),
            ("shared.x", &[0, 2]),
            ("api.x", &[2, 3]),
            ("other", &[2]),
            ("w", &[2]),
        ];
        for (key, want) in cases {
            router.route(key, &mut out);
            assert_eq!(&out, want, "{key}");
        }
        // a binding that leaves is no longer routed to; others keep their prefixes
        router.remove(&rs[0].prefixes, 0);
        router.remove(&rs[2].prefixes, 2);
        router.route("web.api.port", &mut out);
        assert_eq!(out, vec![1, 4]);
        router.route("shared.x", &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn resume_batches_run_once_per_distinct_cursor() {
        assert!(delta_runs(&[]).is_empty());
        // bindings that synced together share one run
        assert_eq!(delta_runs(&[7, 7, 7]), vec![0]);
        assert_eq!(delta_runs(&[5, 7, 7, 9, 9, 9]), vec![0, 1, 3]);
        // past the cap the narrowest gaps share a run, the widest still split
        let mut many: Vec<u64> = (0..MAX_DELTA_RUNS as u64 + 10).collect();
        many.push(1_000_000);
        let runs = delta_runs(&many);
        assert_eq!(runs.len(), MAX_DELTA_RUNS);
        assert_eq!(runs[0], 0);
        assert!(runs.contains(&(many.len() - 1)), "the widest gap splits");
        assert!(runs.windows(2).all(|w| w[0] < w[1]));
    }
}
