//! A binding's history before it joined the bucket watch (its initial
//! state, or the delta since its cursor), asked from the bucket's catch-up
//! runner, and the merging of every update into the binding's mirror.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tracing::{debug, warn};

use super::Worker;
use crate::{
    controller::{decide::TargetState, hub::HubEvent, status::Health},
    kv::{KvError, KvStore, KvUpdate, WatchCursor, mirror::Merge},
    reason::Reason,
    sink::configmap::Observed,
    util::time::instant_of,
};

pub(super) enum CatchupMode {
    /// Resume after `seen`: only the delta.
    Delta,
    /// State-sync into `fresh`; `prune` replaces the entries at the end.
    Full { prune: bool },
}

/// A catch-up asked from the bucket's runner and not answered yet.
pub(super) struct Catchup {
    /// Answers carrying another ticket are stale (an earlier request).
    ticket: u64,
    mode: CatchupMode,
    fresh: BTreeMap<String, Bytes>,
    /// Keys a state-sync explicitly reported deleted (tombstones).
    removed: Vec<String>,
    max_version: WatchCursor,
}

impl Catchup {
    pub(super) fn new(ticket: u64, mode: CatchupMode) -> Self {
        Self {
            ticket,
            mode,
            fresh: BTreeMap::new(),
            removed: Vec::new(),
            max_version: WatchCursor::none(),
        }
    }
}

impl Worker {
    /// Asks the bucket's catch-up runner for the delta after `seen`, or the
    /// full state when there is no cursor; the answer comes as hub events.
    pub(super) async fn start_catchup(&mut self) {
        let mode = if self.mirror.cursor().is_none() {
            CatchupMode::Full { prune: true }
        } else {
            CatchupMode::Delta
        };
        self.request_catchup(mode).await;
    }

    pub(super) async fn request_catchup(&mut self, mode: CatchupMode) {
        let from = match mode {
            CatchupMode::Full { .. } => WatchCursor::none(),
            CatchupMode::Delta => self.mirror.cursor(),
        };
        let asked = match &self.sub {
            Some(sub) => sub.request_catchup(from),
            None => Err(KvError::NotConnected),
        };
        match asked {
            Ok(ticket) => self.catchup = Some(Catchup::new(ticket, mode)),
            Err(e) => {
                self.catchup = None;
                self.ctx.metrics.error(Reason::from(&e));
                self.set_health(Health::err(Reason::from(&e), e.to_string(), false))
                    .await;
                self.retry_later();
            }
        }
    }

    /// After `CursorExpired`: prune only when the bucket keeps every
    /// current value, or marks every age-out, so a missing key really was
    /// deleted (invariant 3).
    pub(super) async fn repair_mode(&mut self, store: &Arc<dyn KvStore>) -> CatchupMode {
        let prune = matches!(store.info().await,
            Ok(info) if info.keeps_current_values || info.marks_age_outs);
        warn!(binding = %self.labels.binding, prune, "cursor expired; resyncing");
        self.ctx.metrics.error(Reason::CursorExpired);
        if !prune {
            self.lingering = true;
        }
        CatchupMode::Full { prune }
    }

    /// An answer of the catch-up runner; answers to an older ticket are stale.
    pub(super) async fn on_catchup(&mut self, ev: HubEvent) {
        let ticket = match &ev {
            HubEvent::Catchup { ticket, .. }
            | HubEvent::CaughtUp { ticket, .. }
            | HubEvent::CatchupFailed { ticket, .. } => *ticket,
            _ => return,
        };
        let Some(c) = self.catchup.as_mut().filter(|c| c.ticket == ticket) else {
            return;
        };
        match ev {
            HubEvent::Catchup { updates, .. } => {
                self.received += updates.len() as u64;
                if let Some(last) = updates.last() {
                    c.max_version.advance(last.version());
                }
                match c.mode {
                    CatchupMode::Full { .. } => {
                        for update in updates {
                            match update {
                                KvUpdate::Put(e) => {
                                    c.fresh.insert(e.key, e.value);
                                }
                                KvUpdate::Delete { key, .. } | KvUpdate::Purge { key, .. } => {
                                    c.fresh.remove(&key);
                                    c.removed.push(key);
                                }
                            }
                        }
                    }
                    CatchupMode::Delta => {
                        let now = Instant::now();
                        for update in updates {
                            self.apply_live(update, now);
                        }
                    }
                }
            }
            HubEvent::CaughtUp { cursor, .. } => {
                let Some(c) = self.catchup.take() else {
                    return;
                };
                if let CatchupMode::Full { prune } = c.mode {
                    let changed = if prune {
                        self.mirror.replace_entries(c.fresh)
                    } else {
                        // keep keys we cannot prove deleted, drop those with a tombstone
                        self.mirror.merge_entries(c.fresh, &c.removed)
                    };
                    if changed {
                        self.dirty_since.get_or_insert_with(Instant::now);
                    }
                    // a state-sync started after the ConfigMap was read covers
                    // its cursor, unless that cursor is past the bucket's last
                    // revision (edited by hand: never trusted)
                    if let TargetState::Present(obs) = &self.target_state
                        && !self.other_incarnation(obs)
                        && let Some(v) = obs.cursor.version()
                        && let Ok(last) = self.bucket_last().await
                        && v.as_u64().is_some_and(|v| v <= last)
                    {
                        self.mirror.advance(v);
                    }
                }
                if let Some(v) = c.max_version.version() {
                    self.mirror.advance(v);
                }
                if let Some(v) = cursor.version() {
                    self.mirror.advance(v);
                }
                self.catching_up = false;
                self.synced = true;
                self.backoff.reset();
                for (update, at) in std::mem::take(&mut self.buffered) {
                    self.apply_shared(update, at);
                }
                debug!(binding = %self.labels.binding, cursor = %self.mirror.cursor(), received = self.received, "caught up");
                self.schedule_flush(Duration::ZERO);
            }
            HubEvent::CatchupFailed {
                error: KvError::CursorExpired { .. },
                ..
            } => {
                self.catchup = None;
                // a resume cursor past the bucket's last revision was edited
                // by hand: the entries rebuilt from it are not the KV truth
                if let Ok(last) = self.bucket_last().await
                    && self
                        .mirror
                        .cursor()
                        .version()
                        .and_then(|v| v.as_u64())
                        .is_some_and(|v| v > last)
                {
                    warn!(binding = %self.labels.binding, cursor = %self.mirror.cursor(), last,
                          "the ConfigMap's cursor is past the bucket's last revision; resyncing");
                    self.mirror.clear();
                }
                if let Some(store) = self.store.clone() {
                    let mode = self.repair_mode(&store).await;
                    self.request_catchup(mode).await;
                }
            }
            HubEvent::CatchupFailed { error, .. } => {
                self.catchup = None;
                self.ctx.metrics.error(Reason::from(&error));
                self.set_health(Health::err(Reason::from(&error), error.to_string(), false))
                    .await;
                self.retry_later();
            }
            _ => {}
        }
    }

    /// A bucket deleted and created again restarts its revisions at 1: the
    /// entries and cursor we hold belong to the old one. Start over with a
    /// pruning state-sync of the new bucket; its first write replaces the old
    /// cursor (cursors are compared within one incarnation only).
    pub(super) fn adopt_incarnation(&mut self, now: Option<u64>) {
        if let (Some(old), Some(new)) = (self.incarnation, now)
            && old != new
        {
            warn!(binding = %self.labels.binding, "the bucket was deleted and created again; resyncing from its new content");
            self.ctx.metrics.error(Reason::BucketRecreated);
            self.mirror.forget_cursor();
        }
        if now.is_some() {
            self.incarnation = now;
        }
    }

    /// The ConfigMap's cursor counts revisions of another bucket incarnation.
    /// The bucket's last revision, read now (0 for an empty bucket).
    pub(super) async fn bucket_last(&self) -> Result<u64, KvError> {
        let store = self.store.as_ref().ok_or(KvError::NotConnected)?;
        let info = store.info().await?;
        Ok(info.last_revision.and_then(|v| v.as_u64()).unwrap_or(0))
    }

    pub(super) fn other_incarnation(&self, obs: &Observed) -> bool {
        matches!((obs.incarnation, self.incarnation), (Some(a), Some(b)) if a != b)
    }

    /// [`Self::apply_live`] for an update the hub shares between bindings:
    /// copied only when another binding still holds it and it is news here.
    pub(super) fn apply_shared(&mut self, update: Arc<KvUpdate>, at: Instant) {
        if self.mirror.covers(&update.version()) {
            return;
        }
        self.apply_live(Arc::unwrap_or_clone(update), at);
    }

    /// Merges one update in order. Old history (<= seen) is ignored.
    pub(super) fn apply_live(&mut self, update: KvUpdate, at: Instant) {
        if self.mirror.covers(&update.version()) {
            return;
        }
        // a live change counts from when NATS stored it (receipt can lag
        // under load); replayed history from when it arrived
        let at = match &update {
            KvUpdate::Put(e) if !self.catching_up => {
                e.published.and_then(instant_of).map_or(at, |p| p.min(at))
            }
            _ => at,
        };
        if !self.catching_up {
            self.received += 1;
        }
        let changed = self.mirror.apply(update) == Merge::Changed;
        self.update_lag(self.status_cursor());
        if changed {
            self.dirty_since.get_or_insert(at);
            if self.synced && self.flush_at.is_none() {
                // at most one write per window: the first change after a
                // quiet window goes out at once, the rest of a burst waits
                let wait = self.last_write.map_or(Duration::ZERO, |w| {
                    (w + self.ctx.config.coalesce).saturating_duration_since(Instant::now())
                });
                self.schedule_flush(wait);
            }
        }
    }
}
