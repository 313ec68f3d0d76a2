//! The catch-up runner of one bucket: a binding's history before it joined
//! (its initial state, or the delta since its cursor). Requests that arrive
//! together are served by one scan, or by direct reads when a binding has
//! only a few records to read.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    event::{CATCHUP_CHUNK, HubEvent},
    index::PrefixIndex,
    shared::{CatchupRequest, Shared},
};
use crate::{
    kv::{KvError, KvStore, KvUpdate, VersionToken, WatchCursor, WatchEvent, filter},
    metrics::Metrics,
    util::lock,
};

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
pub(super) async fn run_catchups(
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
    let last = info.last_revision.and_then(|v| v.as_u64()).unwrap_or(0);
    // an empty stream retains nothing: every revision up to `last` is gone
    // (aged out, say), so its first retained revision is the next one
    let first = info
        .first_revision
        .and_then(|v| v.as_u64())
        .unwrap_or(last + 1);
    requesters.retain_mut(|r| {
        let Some(from) = r.from.version().and_then(|v| v.as_u64()) else {
            return true;
        };
        // `from + 1` must still be retained (exactly one before the first
        // is fine); a cursor past the last revision means a new stream
        let expired = from.saturating_add(1) < first || from > last;
        if expired {
            let first_retained = VersionToken::from_u64(first);
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
