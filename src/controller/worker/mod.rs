//! One task per binding: keeps the KV entries of its prefixes, coalesces
//! bursts, writes the projected content with one apply, then mirrors the
//! cursor into status.
//!
//! The cursor (the [`Mirror`]'s) only covers updates already merged into
//! its entries, and it reaches the ConfigMap only inside the write that
//! carries those entries (invariant 1). Updates at or below it are dropped,
//! and a ConfigMap already holding a newer cursor is never overwritten
//! (invariant 2, see [`decide`](super::decide)).
//!
//! The worker's parts are `impl Worker` blocks by concern: `catchup`
//! (history before joining the bucket watch, and merging updates),
//! `resume` (rebuilding the entries from the ConfigMap at start), `write`
//! (the write path: build -> [`decide`](super::decide) -> write), `report`
//! (status, conditions, Events, lag).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use kube::ResourceExt;
use tokio::sync::mpsc;

use super::{
    context::{Context, WorkerMsg, target_of},
    decide::TargetState,
    finalizer,
    hub::{HubEvent, Subscription},
    status::Health,
};
use crate::{
    crd::{ConfigBinding, ConfigBindingStatus},
    kv::{KvStore, KvUpdate, mirror::Mirror},
    metrics::BindingLabels,
    projection::ProjectionRules,
    reason::Reason,
    sink::configmap::{Observed, TargetRef},
    util::{backoff::Backoff, time::sleep_until},
};

mod catchup;
mod report;
mod resume;
mod rollout;
mod write;

use catchup::Catchup;

pub struct Worker {
    ctx: Arc<Context>,
    binding: Arc<ConfigBinding>,
    rules: ProjectionRules,
    target: TargetRef,
    labels: BindingLabels,
    rx: mpsc::UnboundedReceiver<WorkerMsg>,
    store: Option<Arc<dyn KvStore>>,
    /// Set once `Attached` arrived and until the catch-up watch is synced.
    catching_up: bool,
    catchup: Option<Catchup>,
    /// Membership in the bucket's watch; catch-ups are asked through it.
    sub: Option<Subscription>,
    buffered: Vec<(Arc<KvUpdate>, Instant)>,
    /// The entries of the binding's prefixes and the cursor they are
    /// complete through ("seen"; it reaches the ConfigMap only with them).
    mirror: Mirror,
    /// `entries` are complete through `seen` and may be written.
    synced: bool,
    target_state: TargetState,
    /// When the oldest update not yet written arrived.
    dirty_since: Option<Instant>,
    flush_at: Option<Instant>,
    /// When the last ConfigMap write completed: a change after a quiet
    /// window is written at once, later ones wait for the window to end.
    last_write: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    conflicts: u32,
    health: Health,
    /// A resync could not tell deleted keys from aged-out ones.
    lingering: bool,
    /// The status we want in the API (written, or waiting for `status_due`).
    status: ConfigBindingStatus,
    /// Since when `status` holds changes not written yet (`None`: all
    /// written); bounds how long a busy API may defer them.
    status_dirty_since: Option<Instant>,
    /// When status was last written: cursor-only changes wait until
    /// `config.status_interval` has passed since.
    status_written_at: Option<Instant>,
    /// The trailing status write (or its retry).
    status_due: Option<Instant>,
    /// `observedGeneration` as last written: a new generation is news.
    status_written_generation: Option<i64>,
    /// Keys of our last apply (Merge cannot tell ours from others' by
    /// looking); `None` until we wrote once, so the first flush writes.
    applied_keys: Option<Vec<String>>,
    /// Keys of a Merge target owned by another field manager (with the
    /// manager), left out of our last write.
    refused: Vec<(String, String)>,
    head: Arc<std::sync::atomic::AtomicU64>,
    /// The bucket incarnation `seen` and `entries` belong to.
    incarnation: Option<u64>,
    /// Received updates (catch-up and live) — what a restart costs.
    pub received: u64,
    /// The binding carries our finalizer or needs none (a worker started on
    /// a standby may see the binding before any leader added it).
    finalized: bool,
    /// A `slipstream.io/force-sync` value to carry out: no resume from the
    /// ConfigMap, and one write of the full state even if nothing differs.
    force_sync: Option<String>,
    /// `target.rollout`: the workloads rolled when the content changes.
    rollout: Option<rollout::Rollouts>,
}

fn min_deadline(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn rv_number(rv: Option<&str>) -> Option<u64> {
    rv.and_then(|r| r.parse().ok())
}

impl Worker {
    pub fn new(
        ctx: Arc<Context>,
        binding: Arc<ConfigBinding>,
        rules: ProjectionRules,
        rx: mpsc::UnboundedReceiver<WorkerMsg>,
        head: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        let namespace = binding.namespace().unwrap_or_default();
        let name = binding.name_any();
        let target = target_of(&binding);
        let mut status = binding.status.clone().unwrap_or_default();
        // validated by reconcile before the worker starts
        let plan = super::rollout::Plan::from_spec(&binding.spec)
            .ok()
            .flatten();
        let rollout = plan.map(|p| rollout::Rollouts::new(p, &name, &status));
        let before = status.clone();
        rollout::Rollouts::prune_status(rollout.as_ref(), &mut status);
        let status_dirty_since = (status != before).then(Instant::now);
        Self {
            labels: BindingLabels {
                namespace,
                binding: name,
            },
            ctx,
            rules,
            target,
            rx,
            store: None,
            catching_up: false,
            catchup: None,
            sub: None,
            buffered: Vec::new(),
            mirror: Mirror::default(),
            synced: false,
            target_state: TargetState::Unknown,
            dirty_since: None,
            flush_at: None,
            last_write: None,
            retry_at: None,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            conflicts: 0,
            health: Health::from_status(&status),
            lingering: false,
            status_dirty_since,
            status_written_at: None,
            status_due: None,
            status_written_generation: status.observed_generation,
            status,
            applied_keys: None,
            refused: Vec::new(),
            head,
            incarnation: None,
            received: 0,
            finalized: finalizer::has(&binding) || !finalizer::needed(&binding),
            force_sync: binding.pending_force_sync().map(str::to_owned),
            rollout,
            binding,
        }
    }

    fn retry_later(&mut self) {
        self.retry_at = Some(Instant::now() + self.backoff.next_delay());
    }

    fn schedule_flush(&mut self, after: Duration) {
        let at = Instant::now() + after;
        self.flush_at = Some(self.flush_at.map_or(at, |f| f.min(at)));
    }

    /// The worker's task. Boxed: an async fn that takes its state by value
    /// keeps room for it twice, and this one lives as long as its binding.
    pub async fn run(mut self: Box<Self>) {
        // boxed: its API read would otherwise stay in the task's size forever
        Box::pin(self.load_target()).await;
        self.backoff.reset();
        let (tx, mut hub_rx) = mpsc::unbounded_channel();
        let sub = self.ctx.hub.subscribe(
            &self.binding.spec.bucket,
            self.ctx.next_id(),
            self.rules.clone(),
            tx,
        );
        self.head = sub.head.clone();
        self.sub = Some(sub);
        let mut gate = self.ctx.gate.clone();
        loop {
            let deadline =
                min_deadline(min_deadline(self.flush_at, self.retry_at), self.status_due);
            let rollout_due = self.rollout_due();
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    None => break,
                    Some(WorkerMsg::Target(cm)) => self.on_target(cm),
                },
                Some(ev) = hub_rx.recv() => Box::pin(self.on_hub(ev)).await,
                _ = sleep_until(deadline) => {
                    let now = Instant::now();
                    if self.retry_at.is_some_and(|r| r <= now) {
                        self.retry_at = None;
                        if self.store.is_some() && !self.synced && self.catchup.is_none() {
                            Box::pin(self.start_catchup()).await;
                        } else {
                            self.flush_at = Some(now);
                        }
                    }
                    if self.flush_at.is_some_and(|f| f <= Instant::now()) {
                        self.flush_at = None;
                        if self.synced {
                            // the wait for the API outside the boxed write: at
                            // a cold start thousands of workers wait at once
                            let admission = self.admit().await;
                            // boxed, like the other handlers: the API call futures
                            // inside would otherwise sit in every idle worker's task
                            Box::pin(self.flush(admission)).await;
                        }
                    }
                    if self.status_due.is_some_and(|s| s <= Instant::now()) {
                        self.status_due = None;
                        Box::pin(self.write_trailing_status()).await;
                    }
                },
                _ = sleep_until(rollout_due) => Box::pin(self.fire_rollouts()).await,
                changed = gate.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if *gate.borrow() {
                        self.flush_at = Some(Instant::now());
                    }
                }
            }
        }
        self.sub = None;
    }

    async fn on_hub(&mut self, ev: HubEvent) {
        match ev {
            HubEvent::Attached(store) => {
                self.adopt_incarnation(store.incarnation());
                self.store = Some(store);
                self.synced = false;
                self.catching_up = true;
                self.start_catchup().await;
            }
            HubEvent::Update(update, at) => {
                if self.catching_up || !self.synced {
                    self.buffered.push((update, at));
                } else {
                    self.apply_shared(update, at);
                }
            }
            HubEvent::Catchup { .. }
            | HubEvent::CaughtUp { .. }
            | HubEvent::CatchupFailed { .. } => self.on_catchup(ev).await,
            HubEvent::Lost(err) => {
                self.store = None;
                self.catchup = None;
                self.synced = false;
                self.catching_up = false;
                self.buffered.clear();
                self.set_health(Health::err(Reason::from(&err), err.to_string(), false))
                    .await;
            }
        }
    }

    fn on_target(&mut self, obs: Option<Box<Observed>>) {
        let new = match obs {
            None => TargetState::Absent,
            Some(obs) => {
                // a late event older than what we wrote (the echo of our own
                // write, most often) tells nothing new
                if let TargetState::Present(cur) = &self.target_state
                    && let (Some(a), Some(b)) = (
                        rv_number(obs.resource_version.as_deref()),
                        rv_number(cur.resource_version.as_deref()),
                    )
                    && a <= b
                {
                    return;
                }
                TargetState::Present(obs)
            }
        };
        self.target_state = new;
        if self.synced {
            self.schedule_flush(Duration::ZERO);
        }
    }
}
