//! The worker's rollout hook: after each write (or confirmation) of the
//! ConfigMap, the content's digest is offered to each workload's
//! [`Coalescer`]; what is due is read and, when the template carries
//! another digest, applied (see [`crate::controller::rollout`]).
//!
//! Fenced like the ConfigMap writes: only while this replica may write
//! (the lease gate, checked right before each apply), with the
//! resourceVersion just read as the apply's precondition, and never while
//! `spec.suspend` is set. Outcomes go to status (`rollouts`, the `Rollout`
//! condition), Events and metrics; Ready stays about the ConfigMap.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::Worker;
use crate::{
    controller::{
        rollout::{Coalescer, Offer, Plan, annotation_key, field_manager, workload},
        status::{Action, ConditionType, Health, publish_event, set_condition},
    },
    crd::{ConfigBindingStatus, RolloutStatus, WorkloadRef},
    projection::Projected,
    reason::Reason,
    sink::configmap::projected_digest,
    util::time::now_rfc3339_seconds,
};

/// How soon a rollout that failed (missing workload, API error) is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Re-reads after a 409 (the workload changed between read and apply).
const CONFLICT_RETRIES: usize = 3;

/// `time` (RFC 3339, from status) on this process's monotonic clock;
/// `None` when unreadable or in the future.
fn instant_of_rfc3339(time: &str) -> Option<Instant> {
    let t =
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).ok()?;
    let age = time::OffsetDateTime::now_utc() - t;
    let age = Duration::try_from(age).ok()?;
    Instant::now().checked_sub(age)
}

/// Why a workload does not carry the content's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    reason: Reason,
    message: String,
}

struct Target {
    workload: WorkloadRef,
    coalescer: Coalescer,
    failure: Option<Failure>,
}

/// The rollout state of one binding's worker.
pub(super) struct Rollouts {
    annotation: String,
    field_manager: String,
    targets: Vec<Target>,
    /// A rollout was attempted (before that, no condition is reported).
    attempted: bool,
}

impl Rollouts {
    /// The rollout state for `plan`; the last rollouts recorded in `status`
    /// (by this or an earlier process) start each interval.
    pub(super) fn new(plan: Plan, binding: &str, status: &ConfigBindingStatus) -> Self {
        let last_roll = |w: &WorkloadRef| {
            let r = status
                .rollouts
                .iter()
                .find(|r| r.kind == w.kind && r.name == w.name)?;
            instant_of_rfc3339(&r.time)
        };
        Self {
            annotation: annotation_key(binding),
            field_manager: field_manager(binding),
            targets: plan
                .workloads
                .into_iter()
                .map(|workload| Target {
                    coalescer: Coalescer::resumed(plan.min_interval, last_roll(&workload)),
                    workload,
                    failure: None,
                })
                .collect(),
            attempted: false,
        }
    }

    pub(super) fn due(&self) -> Option<Instant> {
        self.targets.iter().filter_map(|t| t.coalescer.due()).min()
    }

    /// Keeps only what describes the workloads of this plan in `status`
    /// (a binding without a plan reports no rollouts).
    pub(super) fn prune_status(plan: Option<&Self>, status: &mut ConfigBindingStatus) {
        let named = |kind, name: &str| {
            plan.is_some_and(|p| {
                p.targets
                    .iter()
                    .any(|t| t.workload.kind == kind && t.workload.name == name)
            })
        };
        status.rollouts.retain(|r| named(r.kind, &r.name));
        if plan.is_none() {
            let rollout = ConditionType::Rollout.as_str();
            status.conditions.retain(|c| c.type_ != rollout);
        }
    }
}

/// What one rollout attempt came to.
enum Outcome {
    Rolled,
    Unchanged,
    /// Not the leader any more: nothing written, nothing reported.
    Standby,
    Failed(Failure),
}

impl Worker {
    pub(super) fn rollout_due(&self) -> Option<Instant> {
        self.rollout.as_ref().and_then(Rollouts::due)
    }

    fn rollouts_allowed(&self) -> bool {
        !self.binding.spec.suspend && *self.ctx.gate.borrow()
    }

    /// The ConfigMap holds `content`: offer its digest to every workload
    /// and roll those that are not waiting for their interval.
    pub(super) async fn offer_rollouts(&mut self, content: &Projected<'_>) {
        if self.rollout.is_none() || !self.rollouts_allowed() {
            return;
        }
        let digest = projected_digest(content);
        let Some(mut r) = self.rollout.take() else {
            return;
        };
        let now = Instant::now();
        let mut batch = Vec::new();
        for (i, t) in r.targets.iter_mut().enumerate() {
            if let Offer::Now(d) = t.coalescer.offer(&digest, now) {
                batch.push((i, d));
            }
        }
        self.roll(&mut r, batch, now).await;
        self.rollout = Some(r);
    }

    /// The interval of some workload ended: roll its pending digest.
    pub(super) async fn fire_rollouts(&mut self) {
        let Some(mut r) = self.rollout.take() else {
            return;
        };
        if !self.rollouts_allowed() {
            // a standby or a suspended binding rolls nothing; taking over
            // (or resuming) writes the ConfigMap and offers again
            r.targets.iter_mut().for_each(|t| t.coalescer.forget());
        } else {
            let _permit = self.ctx.api_permits.clone().acquire_owned().await.ok();
            let now = Instant::now();
            let batch: Vec<(usize, String)> = r
                .targets
                .iter_mut()
                .enumerate()
                .filter_map(|(i, t)| t.coalescer.take_due(now).map(|d| (i, d)))
                .collect();
            self.roll(&mut r, batch, now).await;
        }
        self.rollout = Some(r);
    }

    async fn roll(&mut self, r: &mut Rollouts, batch: Vec<(usize, String)>, decided: Instant) {
        let coalesced: u64 = r
            .targets
            .iter_mut()
            .map(|t| t.coalescer.take_coalesced())
            .sum();
        if coalesced > 0 {
            self.ctx
                .metrics
                .rollouts_coalesced
                .get_or_create(&self.labels)
                .inc_by(coalesced);
        }
        if batch.is_empty() {
            return;
        }
        let mut rolled = Vec::new();
        for (i, digest) in batch {
            let outcome = self.roll_one(r, &r.targets[i].workload, &digest).await;
            let t = &mut r.targets[i];
            match outcome {
                Outcome::Rolled => {
                    t.coalescer.rolled(&digest, decided);
                    t.failure = None;
                    self.ctx
                        .metrics
                        .rollouts_triggered
                        .get_or_create(&self.labels)
                        .inc();
                    info!(binding = %self.labels.binding, kind = %t.workload.kind, name = %t.workload.name, %digest, "rolled out");
                    rolled.push((t.workload.clone(), digest));
                }
                Outcome::Unchanged => {
                    t.coalescer.unchanged(&digest);
                    t.failure = None;
                }
                Outcome::Standby => t.coalescer.forget(),
                Outcome::Failed(failure) => {
                    self.ctx.metrics.error(failure.reason);
                    // logged when it starts or changes, not at every retry
                    if t.failure.as_ref() != Some(&failure) {
                        warn!(binding = %self.labels.binding, kind = %t.workload.kind, name = %t.workload.name, reason = failure.reason.as_str(), message = %failure.message, "rollout not written; retrying");
                    }
                    t.coalescer.retry(&digest, Instant::now() + RETRY_AFTER);
                    t.failure = Some(failure);
                }
            }
        }
        r.attempted = true;
        self.report_rollouts(r, rolled).await;
    }

    /// Reads `w` and sets its digest annotation when it differs.
    async fn roll_one(&self, r: &Rollouts, w: &WorkloadRef, digest: &str) -> Outcome {
        let ns = &self.target.namespace;
        let client = &self.ctx.client;
        let failed = |e: kube::Error| {
            let reason = match &e {
                kube::Error::Api(s) if s.code == 403 => Reason::Forbidden,
                kube::Error::Api(s) if s.code == 422 => Reason::Invalid,
                _ => Reason::KubernetesError,
            };
            Outcome::Failed(Failure {
                reason,
                message: format!("{} {:?}: {e}", w.kind, w.name),
            })
        };
        for _ in 0..CONFLICT_RETRIES {
            let seen = match workload::read(client, ns, w, &r.annotation).await {
                Ok(Some(seen)) => seen,
                Ok(None) => {
                    return Outcome::Failed(Failure {
                        reason: Reason::WorkloadNotFound,
                        message: format!(
                            "{} {:?} not found in namespace {ns:?}; the ConfigMap keeps syncing",
                            w.kind, w.name
                        ),
                    });
                }
                Err(e) => return failed(e),
            };
            if seen.digest.as_deref() == Some(digest) {
                return Outcome::Unchanged;
            }
            // the lease gate, right before the write (like ConfigMap writes)
            if !self.may_write() {
                return Outcome::Standby;
            }
            let rv = seen.resource_version.as_deref();
            match workload::apply(client, ns, w, &r.annotation, &r.field_manager, digest, rv).await
            {
                Ok(()) => return Outcome::Rolled,
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return failed(e),
            }
        }
        Outcome::Failed(Failure {
            reason: Reason::WriteConflict,
            message: format!(
                "{} {:?} changed under every one of {CONFLICT_RETRIES} attempts",
                w.kind, w.name
            ),
        })
    }

    /// Mirrors the outcomes into status (`rollouts`, the `Rollout`
    /// condition), written at once, with an Event for each rollout and for
    /// each change of the condition.
    async fn report_rollouts(&mut self, r: &Rollouts, rolled: Vec<(WorkloadRef, String)>) {
        let now = now_rfc3339_seconds();
        let mut status = self.status.clone();
        for (w, digest) in &rolled {
            let entry = RolloutStatus {
                kind: w.kind,
                name: w.name.clone(),
                digest: digest.clone(),
                time: now.clone(),
            };
            match status
                .rollouts
                .iter_mut()
                .find(|s| s.kind == w.kind && s.name == w.name)
            {
                Some(s) => *s = entry,
                None => status.rollouts.push(entry),
            }
        }
        status
            .rollouts
            .sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        let failures: Vec<&Failure> = r
            .targets
            .iter()
            .filter_map(|t| t.failure.as_ref())
            .collect();
        let health = match failures.first() {
            Some(first) => Health::err(
                first.reason,
                failures
                    .iter()
                    .map(|f| f.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                false,
            ),
            None => Health::ok(
                Reason::RolledOut,
                format!(
                    "{} workloads carry the content digest in {}",
                    r.targets.len(),
                    r.annotation
                ),
            ),
        };
        let rollout = ConditionType::Rollout.as_str();
        let before = status
            .condition(rollout)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        if r.attempted {
            set_condition(
                &mut status,
                ConditionType::Rollout,
                health.ready,
                health.reason,
                &health.message,
                self.binding.metadata.generation,
            );
        }
        let after = status
            .condition(rollout)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        if status == self.status {
            return;
        }
        self.status = status;
        self.mark_status_dirty();
        self.write_pending_status(false).await;
        let changed =
            before.map(|(s, reason, _)| (s, reason)) != after.map(|(s, reason, _)| (s, reason));
        for (w, digest) in &rolled {
            let event = Health::ok(
                Reason::RolledOut,
                format!(
                    "{} {:?}: pod template annotation {} set to {digest}",
                    w.kind, w.name, r.annotation
                ),
            );
            publish_event(&self.ctx.recorder, &*self.binding, &event, Action::Rollout).await;
        }
        if changed && !health.ready {
            publish_event(&self.ctx.recorder, &*self.binding, &health, Action::Rollout).await;
        }
    }
}
