//! The election loop and its helpers: open the lease bucket, acquire or
//! renew, follow the lease key, close the gate at the renew deadline,
//! release on shutdown.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::StreamExt;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, info, warn};

use super::shared::{Shared, Source};
use crate::{
    kv::{
        KvStore, KvUpdate, WatchEvent,
        lease::{Lease, LeaseError, LeaseRecord, unix_ms},
    },
    util::{backoff::Backoff, time::sleep_until},
};

/// What the lease key watch tells the election loop.
#[derive(Debug)]
enum Hint {
    /// The key was released or removed: try now.
    Free,
    /// Somebody holds it until this instant.
    Held { holder: String, until: Instant },
}

/// The instant at which a record expiring at `expires_at_ms` (wall clock) may be taken.
fn instant_at(expires_at_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(expires_at_ms.saturating_sub(unix_ms()) + 1)
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The election loop: open the bucket, then acquire / renew until stopped,
/// then release.
pub(super) async fn run(shared: Arc<Shared>, source: Source, mut stop: watch::Receiver<bool>) {
    let Some(store) = open_store(&shared, source, &mut stop).await else {
        return;
    };
    let lease = match Lease::new(
        store.clone(),
        shared.config.key.clone(),
        shared.config.identity.clone(),
        shared.config.lease,
    ) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            warn!(error = %e, "leader election cannot start");
            shared.set_error(Some(e.to_string()));
            return;
        }
    };
    let guard = tokio::spawn(guard(lease.clone(), shared.clone(), stop.clone()));
    let (hint_tx, mut hints) = mpsc::channel(64);
    let watcher = tokio::spawn(watch_key(
        store,
        shared.config.key.clone(),
        shared.config.lease.renew_interval,
        hint_tx,
        stop.clone(),
    ));
    let cfg = shared.config.lease;
    let mut next = Instant::now();
    // Expiry of the record another replica holds, as last seen by the watch.
    let mut held_until: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            Some(hint) = hints.recv() => match hint {
                Hint::Free => {
                    held_until = None;
                    shared.set_holder(None);
                    if !lease.is_held() {
                        next = Instant::now();
                    }
                }
                Hint::Held { holder, until } => {
                    if holder != shared.config.identity {
                        if lease.is_held() {
                            // Someone else wrote our key: the next renew fails its CAS.
                            next = Instant::now();
                        } else {
                            held_until = Some(until);
                            next = next.min(until);
                        }
                    }
                    shared.set_holder(Some(holder));
                }
            },
            () = tokio::time::sleep_until(next) => {
                let outcome = tokio::select! {
                    () = stopped(&mut stop) => break,
                    o = attempt(&lease, &shared) => o,
                };
                let now = Instant::now();
                next = match outcome {
                    Outcome::Leader => now + cfg.renew_interval,
                    Outcome::Standby => {
                        let poll = now + cfg.renew_interval;
                        match held_until.filter(|t| *t > now) {
                            Some(t) => t.min(poll),
                            None => poll,
                        }
                    }
                    Outcome::Again => now,
                    Outcome::Failed => now + cfg.retry_interval,
                };
            }
        }
    }
    shared.stopping.store(true, Ordering::SeqCst);
    shared.set_gate(false);
    let _ = guard.await;
    watcher.abort();
    let held = lease.valid_until().is_some();
    match lease.release().await {
        Ok(()) if held => info!(key = %shared.config.key, "lease released"),
        Ok(()) => {}
        Err(e) => {
            warn!(key = %shared.config.key, error = %e, "lease release failed; it expires after its TTL")
        }
    }
}

enum Outcome {
    Leader,
    Standby,
    /// Lost just now: look again at once.
    Again,
    Failed,
}

async fn attempt(lease: &Lease, shared: &Shared) -> Outcome {
    if lease.is_held() {
        match lease.renew().await {
            Ok(()) => {
                shared.set_error(None);
                Outcome::Leader
            }
            Err(e @ (LeaseError::Lost { .. } | LeaseError::NotHeld { .. })) => {
                warn!(key = %shared.config.key, reason = e.reason(), error = %e, "lease lost");
                shared.set_gate(false);
                shared.set_error(None);
                Outcome::Again
            }
            Err(e) => {
                shared.metrics.renew_failures.inc();
                warn!(key = %shared.config.key, reason = e.reason(), error = %e, "lease renew failed; retrying until the renew deadline");
                shared.set_error(Some(e.to_string()));
                Outcome::Failed
            }
        }
    } else {
        match lease.try_acquire().await {
            Ok(true) => {
                shared.set_error(None);
                Outcome::Leader
            }
            Ok(false) => {
                shared.set_error(None);
                Outcome::Standby
            }
            Err(e) => {
                debug!(key = %shared.config.key, error = %e, "lease acquire failed");
                shared.set_error(Some(e.to_string()));
                Outcome::Failed
            }
        }
    }
}

/// Keeps the gate equal to the lease's holding state, and closes it when
/// the renew deadline passes even while a renew call is still hanging.
async fn guard(lease: Arc<Lease>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut held_rx = lease.subscribe();
    loop {
        held_rx.borrow_and_update();
        // is_held() also checks the deadline, so a renew that succeeded too
        // late never opens the gate.
        shared.set_gate(lease.is_held());
        let deadline = lease.valid_until();
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            changed = held_rx.changed() => if changed.is_err() { return },
            () = sleep_until(deadline) => {
                if !lease.is_held() {
                    warn!(key = %shared.config.key, "renew deadline passed without a successful renew: stopped writing");
                    shared.set_gate(false);
                    shared.set_error(Some(
                        "the renew deadline passed without a successful renew".to_owned(),
                    ));
                }
            }
        }
    }
}

/// Forwards changes of the lease key as hints; re-opens the watch after errors.
async fn watch_key(
    store: Arc<dyn KvStore>,
    key: String,
    backoff: Duration,
    hints: mpsc::Sender<Hint>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let opened = tokio::select! {
            () = stopped(&mut stop) => return,
            s = store.watch_prefix(&key) => s,
        };
        match opened {
            Ok(mut stream) => loop {
                let event = tokio::select! {
                    () = stopped(&mut stop) => return,
                    e = stream.next() => e,
                };
                let update = match event {
                    Some(Ok(WatchEvent::Update(u))) if u.key() == key => u,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        debug!(key = %key, error = %e, "lease watch failed; re-opening");
                        break;
                    }
                    None => break,
                };
                let hint = match update {
                    KvUpdate::Put(e) => match LeaseRecord::parse(&e.value) {
                        Ok(r) => Hint::Held {
                            holder: r.holder,
                            until: instant_at(r.expires_at_ms),
                        },
                        // Unparseable records are taken over at once.
                        Err(_) => Hint::Free,
                    },
                    KvUpdate::Delete { .. } | KvUpdate::Purge { .. } => Hint::Free,
                };
                if hints.send(hint).await.is_err() {
                    return;
                }
            },
            Err(e) => debug!(key = %key, error = %e, "cannot watch the lease key"),
        }
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(backoff) => {}
        }
    }
}

/// Opens the lease bucket, retrying until it answers or the election stops.
async fn open_store(
    shared: &Shared,
    source: Source,
    stop: &mut watch::Receiver<bool>,
) -> Option<Arc<dyn KvStore>> {
    let (connector, bucket) = match source {
        Source::Store(store) => return Some(store),
        Source::Nats { connector, bucket } => (connector, bucket),
    };
    let config = bucket;
    let bucket = &config.name;
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        shared.config.lease.renew_interval,
    );
    loop {
        let opened = tokio::select! {
            () = stopped(stop) => return None,
            b = connector.create_or_open(&config) => b,
        };
        match opened {
            Ok(b) => return Some(Arc::new(b)),
            Err(e) => {
                warn!(bucket = %bucket, error = %e, "cannot open the lease bucket; retrying");
                shared.set_error(Some(format!("lease bucket {bucket:?}: {e}")));
            }
        }
        tokio::select! {
            () = stopped(stop) => return None,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
