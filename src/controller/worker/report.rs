//! What the worker tells the user: status (cursor, counts, conditions),
//! written at once when a condition changes and at most once per status
//! interval otherwise; Events on a change of state; the cursor and lag
//! metrics.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::Worker;
use crate::{
    controller::{
        decide::TargetState,
        status::{Action, Health, publish_event, set_conditions, write_status},
    },
    crd::MAX_SKIPPED_LISTED,
    kv::WatchCursor,
    projection::Projected,
    reason::Reason,
    util::time::now_rfc3339,
};

/// How long a deferred status write waits before looking at the API again.
const STATUS_BUSY_RETRY: Duration = Duration::from_secs(1);

/// A busy API defers a status write by at most this many status intervals.
const MAX_STATUS_DEFER: u32 = 6;

impl Worker {
    pub(super) fn status_cursor(&self) -> WatchCursor {
        match &self.target_state {
            TargetState::Present(obs) => obs.cursor,
            _ => WatchCursor::none(),
        }
    }

    pub(super) fn update_lag(&self, applied: WatchCursor) {
        let head = self.head.load(Ordering::Relaxed);
        let applied = applied.version().and_then(|v| v.as_u64()).unwrap_or(0);
        let lag = head.saturating_sub(applied);
        self.ctx
            .metrics
            .lag_revisions
            .get_or_create(&self.labels)
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    /// The ConfigMap holds `content` at `cursor`: mirror it into status.
    pub(super) async fn after_write(&mut self, content: &Projected<'_>, cursor: WatchCursor) {
        if let Some(v) = cursor.version().and_then(|v| v.as_u64()) {
            self.ctx
                .metrics
                .applied_cursor
                .get_or_create(&self.labels)
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        self.update_lag(cursor);
        let mut status = self.status.clone();
        status.observed_generation = self.binding.metadata.generation;
        status.cursor = cursor.version().map(|v| v.to_string());
        status.keys = Some(content.keys as i64);
        status.bytes = Some(content.bytes as i64);
        status.skipped_count =
            (!content.skipped.is_empty()).then_some(content.skipped.len() as i64);
        status.skipped_keys = content
            .skipped
            .iter()
            .take(MAX_SKIPPED_LISTED)
            .cloned()
            .collect();
        if status.cursor != self.status.cursor || status.last_sync_time.is_none() {
            status.last_sync_time = Some(now_rfc3339());
        }
        if let Some(done) = self.force_sync.take() {
            info!(binding = %self.labels.binding, value = %done, "force-sync carried out");
            status.last_force_sync = Some(done);
        }
        if status != self.status {
            self.status = status;
            self.mark_status_dirty();
        }
        let health = if !self.refused.is_empty() {
            let named: Vec<String> = self
                .refused
                .iter()
                .map(|(key, manager)| format!("{key:?} (field manager {manager:?})"))
                .collect();
            Health::err(
                Reason::KeyOwnedByOther,
                format!(
                    "ConfigMap {:?} keys {} belong to another field manager: not written, \
                     never deleted; the other {} keys are at cursor {cursor}",
                    self.target.name,
                    named.join(", "),
                    content.keys
                ),
                true,
            )
        } else if self.lingering {
            Health::ok(
                Reason::ResyncedWithoutPrune,
                "the cursor expired on a bucket that ages out values: keys deleted while the \
                 operator was away may linger in the ConfigMap",
            )
        } else {
            let overlaps = self.rules.overlaps();
            let message = if overlaps.is_empty() {
                format!("{} keys at cursor {cursor}", content.keys)
            } else {
                format!(
                    "{} keys at cursor {cursor}; overlapping prefixes {overlaps:?}: the longest match wins",
                    content.keys
                )
            };
            Health::ok(Reason::Synced, message)
        };
        self.set_health(health).await;
        self.offer_rollouts(content).await;
    }

    /// Records the condition in status. Written at once when readiness,
    /// reason, stalled, an error message or the generation changed (with an
    /// Event when that change is one a user needs to see); a change that
    /// only restates the cursor waits for the status interval (trailing write).
    pub(super) async fn set_health(&mut self, health: Health) {
        let changed = !health.same_state(&self.health);
        let announce = changed && health.worth_an_event(&self.health);
        let urgent = changed
            || (!health.ready && health.message != self.health.message)
            || self.binding.metadata.generation != self.status_written_generation;
        let mut status = self.status.clone();
        set_conditions(&mut status, &health, self.binding.metadata.generation);
        self.ctx
            .metrics
            .set_conditions(&self.labels, &status.conditions);
        status.observed_generation = self.binding.metadata.generation;
        if health != self.health {
            self.health = health;
        }
        if status != self.status {
            self.status = status;
            self.mark_status_dirty();
        }
        if self.status_dirty_since.is_none() {
            return;
        }
        if urgent {
            return self.write_pending_status(announce).await;
        }
        // not urgent: after the ConfigMap write's permit is released, and no
        // sooner than the interval after the last status write
        let now = Instant::now();
        let interval = self.ctx.config.status_interval;
        let due = self
            .status_written_at
            .map_or(now, |at| (at + interval).max(now));
        self.status_due.get_or_insert(due);
    }

    pub(super) fn mark_status_dirty(&mut self) {
        self.status_dirty_since.get_or_insert_with(Instant::now);
    }

    /// A status write that only restates the cursor, counts or sync time:
    /// ConfigMap writes go first. While the API is busy it waits (the
    /// ConfigMap's cursor annotation is the truth; status mirrors it), but
    /// never longer than [`MAX_STATUS_DEFER`] intervals.
    pub(super) async fn write_trailing_status(&mut self) {
        let limit = self.ctx.config.status_interval * MAX_STATUS_DEFER;
        let waiting = self.status_dirty_since.map(|since| since.elapsed());
        if waiting.is_some_and(|w| w < limit) && self.ctx.api_busy() {
            self.ctx.metrics.deferred_status_writes.inc();
            self.status_due = Some(Instant::now() + STATUS_BUSY_RETRY);
            return;
        }
        let _permit = self.ctx.api_permits.clone().acquire_owned().await.ok();
        self.write_pending_status(false).await;
    }

    /// Writes `status` if it holds unwritten changes (and this replica may
    /// write); `announce` also publishes the Ready condition as an Event.
    pub(super) async fn write_pending_status(&mut self, announce: bool) {
        if self.status_dirty_since.is_none() || !self.may_write() {
            // a standby writes nothing; taking over flushes, which rewrites
            self.status_due = None;
            return;
        }
        self.status_due = None;
        match write_status(&self.ctx.client, &self.binding, &self.status).await {
            Ok(()) => {
                self.status_dirty_since = None;
                self.status_written_at = Some(Instant::now());
                self.status_written_generation = self.status.observed_generation;
            }
            Err(e) => {
                self.ctx.metrics.error(Reason::StatusWriteFailed);
                warn!(binding = %self.labels.binding, error = %e, "status write failed");
                self.retry_later();
                self.status_due = self.retry_at;
            }
        }
        if announce {
            publish_event(
                &self.ctx.recorder,
                &*self.binding,
                &self.health,
                Action::Sync,
            )
            .await;
        }
    }
}
