//! One task per binding: keeps the KV entries of its prefixes, coalesces
//! bursts, writes the projected content with one apply, then mirrors the
//! cursor into status.
//!
//! The cursor (`seen`) only covers updates already merged into `entries`,
//! and it reaches the ConfigMap only inside the write that carries those
//! entries (invariant 1). Updates at or below `seen` are dropped, and a
//! ConfigMap already holding a newer cursor is never overwritten
//! (invariant 2).

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Resource, ResourceExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    Context,
    decide::{Decision, Lookup, Observation, Refusal, TargetState, Write, content_keys, decide},
    hub::{HubEvent, Subscription},
    status::{Action, Health, publish_event, set_conditions, write_status},
};
use crate::{
    crd::{ConfigBinding, ConfigBindingStatus, CreationPolicy, MAX_SKIPPED_LISTED},
    kv::{
        KvError, KvStore, KvUpdate, WatchCursor,
        mirror::{Merge, Mirror},
    },
    metrics::BindingLabels,
    projection::{Projected, ProjectionError, ProjectionRules},
    reason::Reason,
    sink::configmap::{Observed, SinkError, TargetRef, content_digest, foreign_keys},
    util::{
        backoff::Backoff,
        time::{instant_of, now_rfc3339, sleep_until},
    },
};

/// Messages the controller sends a worker (bucket news comes from the hub
/// on a channel of its own).
pub enum WorkerMsg {
    /// The target ConfigMap as the watch last saw it (`None`: deleted).
    Target(Option<Box<Observed>>),
}

enum CatchupMode {
    /// Resume after `seen`: only the delta.
    Delta,
    /// State-sync into `fresh`; `prune` replaces the entries at the end.
    Full { prune: bool },
}

/// A catch-up asked from the bucket's runner and not answered yet.
struct Catchup {
    /// Answers carrying another ticket are stale (an earlier request).
    ticket: u64,
    mode: CatchupMode,
    fresh: BTreeMap<String, Bytes>,
    /// Keys a state-sync explicitly reported deleted (tombstones).
    removed: Vec<String>,
    max_version: WatchCursor,
}

impl Catchup {
    fn new(ticket: u64, mode: CatchupMode) -> Self {
        Self {
            ticket,
            mode,
            fresh: BTreeMap::new(),
            removed: Vec::new(),
            max_version: WatchCursor::none(),
        }
    }
}

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
    head: Arc<std::sync::atomic::AtomicU64>,
    /// The bucket incarnation `seen` and `entries` belong to.
    incarnation: Option<u64>,
    /// Received updates (catch-up and live) — what a restart costs.
    pub received: u64,
}

/// How long a deferred status write waits before looking at the API again.
const STATUS_BUSY_RETRY: Duration = Duration::from_secs(1);

/// A busy API defers a status write by at most this many status intervals.
const MAX_STATUS_DEFER: u32 = 6;

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
        let spec = &binding.spec;
        let target = TargetRef {
            namespace: namespace.clone(),
            name: binding.target_name(),
            binding: name.clone(),
            generation: binding.metadata.generation.unwrap_or(0),
            policy: spec.target.creation_policy,
            owner: binding.controller_owner_ref(&()),
            labels: spec.target.labels.clone(),
            annotations: spec.target.annotations.clone(),
        };
        let status = binding.status.clone().unwrap_or_default();
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
            status_dirty_since: None,
            status_written_at: None,
            status_due: None,
            status_written_generation: status.observed_generation,
            status,
            applied_keys: None,
            head,
            incarnation: None,
            received: 0,
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

    /// Reads the ConfigMap once at start and, when it is ours and was
    /// written with the same rules, rebuilds the entries from it so the
    /// catch-up only needs the delta after its cursor.
    async fn load_target(&mut self) {
        loop {
            let permit = self.ctx.api_permits.clone().acquire_owned().await.ok();
            let read = self
                .ctx
                .sink
                .read(&self.target.namespace, &self.target.name)
                .await;
            drop(permit);
            match read {
                Ok(None) => {
                    self.target_state = TargetState::Absent;
                    return;
                }
                Ok(Some(cm)) => {
                    let obs = Observed::from_configmap(&cm);
                    if let Some(entries) = self.resumable_entries(&cm, &obs) {
                        self.mirror = Mirror::restored(entries, obs.cursor);
                        self.incarnation = obs.incarnation;
                        info!(binding = %self.labels.binding, cursor = %self.mirror.cursor(), keys = self.mirror.entries().len(),
                              "resuming from the ConfigMap's cursor");
                    }
                    self.target_state = TargetState::Present(Box::new(obs));
                    return;
                }
                Err(e) => {
                    self.set_health(Health::err(e.reason(), e.to_string(), false))
                        .await;
                    tokio::time::sleep(self.backoff.next_delay()).await;
                }
            }
        }
    }

    /// The KV entries a ConfigMap we wrote reflects at its cursor: it names
    /// this binding and generation, its keys map back to KV keys (by the
    /// sources annotation, or by the keys themselves when the rules are
    /// invertible and the target is ours alone), our keys still hold what
    /// we wrote (digest), and no key was skipped (those are not in it). `None` means a full state-sync instead.
    fn resumable_entries(&self, cm: &ConfigMap, obs: &Observed) -> Option<BTreeMap<String, Bytes>> {
        if obs.binding.as_deref() != Some(self.target.binding.as_str())
            || obs.generation != Some(self.target.generation)
            || obs.cursor.is_none()
            || obs.skipped > 0
        {
            return None;
        }
        let written = obs.digest.as_deref()?;
        let data = cm.data.as_ref();
        let binary = cm.binary_data.as_ref();
        let pairs = match obs.sources.as_deref() {
            Some(text) => self.rules.parse_sources(text)?,
            None if self.target.policy == CreationPolicy::Owner && self.rules.is_invertible() => {
                let keys = data
                    .into_iter()
                    .flat_map(|d| d.keys())
                    .chain(binary.into_iter().flat_map(|b| b.keys()));
                keys.map(|k| Some((k.clone(), self.rules.kv_key_of(k)?)))
                    .collect::<Option<Vec<_>>>()?
            }
            None => return None,
        };
        let mut ours_text = BTreeMap::new();
        let mut ours_binary = BTreeMap::new();
        let mut entries = BTreeMap::new();
        for (cm_key, kv_key) in pairs {
            if let Some(v) = data.and_then(|d| d.get(&cm_key)) {
                entries.insert(kv_key, Bytes::copy_from_slice(v.as_bytes()));
                ours_text.insert(cm_key, v.as_bytes());
            } else if let Some(v) = binary.and_then(|b| b.get(&cm_key)) {
                entries.insert(kv_key, Bytes::copy_from_slice(&v.0));
                ours_binary.insert(cm_key, v.0.as_slice());
            } else {
                debug!(binding = %self.labels.binding, key = cm_key, "a key we wrote is gone; full resync");
                return None;
            }
        }
        let now = content_digest(
            ours_text.iter().map(|(k, v)| (k.as_str(), *v)),
            ours_binary.iter().map(|(k, v)| (k.as_str(), *v)),
        );
        if now != written {
            info!(binding = %self.labels.binding, "the ConfigMap was changed since our last write; full resync");
            return None;
        }
        Some(entries)
    }

    pub async fn run(mut self) {
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
                        // boxed, like the other handlers: the API call futures
                        // inside would otherwise sit in every idle worker's task
                        Box::pin(self.flush()).await;
                    }
                    if self.status_due.is_some_and(|s| s <= Instant::now()) {
                        self.status_due = None;
                        Box::pin(self.write_trailing_status()).await;
                    }
                },
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

    /// Asks the bucket's catch-up runner for the delta after `seen`, or the
    /// full state when there is no cursor; the answer comes as hub events.
    async fn start_catchup(&mut self) {
        let mode = if self.mirror.cursor().is_none() {
            CatchupMode::Full { prune: true }
        } else {
            CatchupMode::Delta
        };
        self.request_catchup(mode).await;
    }

    async fn request_catchup(&mut self, mode: CatchupMode) {
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
    /// current value, so a missing key really was deleted (invariant 3).
    async fn repair_mode(&mut self, store: &Arc<dyn KvStore>) -> CatchupMode {
        let prune = matches!(store.info().await, Ok(info) if info.keeps_current_values);
        warn!(binding = %self.labels.binding, prune, "cursor expired; resyncing");
        self.ctx.metrics.error(Reason::CursorExpired);
        if !prune {
            self.lingering = true;
        }
        CatchupMode::Full { prune }
    }

    /// An answer of the catch-up runner; answers to an older ticket are stale.
    async fn on_catchup(&mut self, ev: HubEvent) {
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
                    // a state-sync started after the ConfigMap was read covers its cursor
                    if let TargetState::Present(obs) = &self.target_state
                        && !self.other_incarnation(obs)
                        && let Some(v) = obs.cursor.version()
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
    fn adopt_incarnation(&mut self, now: Option<u64>) {
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
    fn other_incarnation(&self, obs: &Observed) -> bool {
        matches!((obs.incarnation, self.incarnation), (Some(a), Some(b)) if a != b)
    }

    /// [`Self::apply_live`] for an update the hub shares between bindings:
    /// copied only when another binding still holds it and it is news here.
    fn apply_shared(&mut self, update: Arc<KvUpdate>, at: Instant) {
        if self.mirror.covers(&update.version()) {
            return;
        }
        self.apply_live(Arc::unwrap_or_clone(update), at);
    }

    /// Merges one update in order. Old history (<= seen) is ignored.
    fn apply_live(&mut self, update: KvUpdate, at: Instant) {
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

    fn status_cursor(&self) -> WatchCursor {
        match &self.target_state {
            TargetState::Present(obs) => obs.cursor,
            _ => WatchCursor::none(),
        }
    }

    fn update_lag(&self, applied: WatchCursor) {
        let head = self.head.load(Ordering::Relaxed);
        let applied = applied.version().and_then(|v| v.as_u64()).unwrap_or(0);
        let lag = head.saturating_sub(applied);
        self.ctx
            .metrics
            .lag_revisions
            .get_or_create(&self.labels)
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    fn may_write(&self) -> bool {
        let ok = *self.ctx.gate.borrow();
        if !ok {
            self.ctx.metrics.dropped_writes.inc();
        }
        ok
    }

    async fn other_binding_exists(&self, name: &str) -> bool {
        let api: Api<ConfigBinding> =
            Api::namespaced(self.ctx.client.clone(), &self.target.namespace);
        !matches!(api.get_opt(name).await, Ok(None))
    }

    /// Writes the current content if it differs from the ConfigMap.
    async fn flush(&mut self) {
        if !self.synced {
            return;
        }
        // the projection borrows the entries while the write needs `&mut
        // self`; nothing else runs on this worker until the flush returns
        let entries = self.mirror.take_entries();
        self.flush_entries(&entries).await;
        self.mirror.put_back(entries);
    }

    /// The content to write: the projection of `entries`, stamped with what
    /// a restart needs to trust it (the pure "build" step).
    fn build<'a>(
        &self,
        entries: &'a BTreeMap<String, Bytes>,
    ) -> Result<Projected<'a>, ProjectionError> {
        let mut projected = self
            .rules
            .project(entries.iter().map(|(k, v)| (k.as_str(), v.as_ref())))?;
        projected.incarnation = self.incarnation;
        if self.target.policy == CreationPolicy::Merge || !self.rules.is_invertible() {
            // a restart needs this to map our keys back to KV keys
            projected.sources = self.rules.sources(entries.keys().map(String::as_str));
        }
        Ok(projected)
    }

    /// The write path: build the content, [`decide`] what to do with it,
    /// do it, report it. Reads the ConfigMap (or the binding named in its
    /// claim) only when the decision asks for it.
    async fn flush_entries(&mut self, entries: &BTreeMap<String, Bytes>) {
        // held through the write and its status write (bounded API concurrency)
        let _permit = self.ctx.api_permits.clone().acquire_owned().await.ok();
        let content = self.build(entries);
        let mut other_binding_exists = None;
        let decision = loop {
            let decision = decide(&Observation {
                suspend: self.binding.spec.suspend,
                content: content.as_ref(),
                target: &self.target,
                configmap: &self.target_state,
                other_binding_exists,
                cursor: self.mirror.cursor(),
                incarnation: self.incarnation,
                applied_keys: self.applied_keys.as_deref(),
                leader: *self.ctx.gate.borrow(),
            });
            match decision {
                Decision::Observe(Lookup::Target) => {
                    match self
                        .ctx
                        .sink
                        .read(&self.target.namespace, &self.target.name)
                        .await
                    {
                        Ok(None) => self.target_state = TargetState::Absent,
                        Ok(Some(cm)) => {
                            self.target_state =
                                TargetState::Present(Box::new(Observed::from_configmap(&cm)))
                        }
                        Err(e) => return self.write_failed(e).await,
                    }
                }
                Decision::Observe(Lookup::OtherBinding(name)) => {
                    other_binding_exists = Some(self.other_binding_exists(&name).await);
                }
                decision => break decision,
            }
        };
        let write = match decision {
            Decision::Observe(_) => return,
            Decision::Refuse(refusal) => return self.refused(refusal).await,
            Decision::SkipUnchanged { cursor } => {
                // invariant 5: nothing changed, nothing written
                self.dirty_since = None;
                if let Ok(content) = &content {
                    self.after_write(content, cursor).await;
                }
                return;
            }
            Decision::Standby => {
                self.ctx.metrics.dropped_writes.inc();
                debug!(binding = %self.labels.binding, "standby: write dropped");
                return;
            }
            Decision::Write(write) => write,
        };
        let Ok(content) = &content else {
            return;
        };
        match self.write(write, content).await {
            Ok(obs) => {
                self.last_write = Some(Instant::now());
                self.conflicts = 0;
                self.backoff.reset();
                let cursor = obs.cursor;
                self.target_state = TargetState::Present(Box::new(obs));
                self.ctx.metrics.writes.get_or_create(&self.labels).inc();
                if self.target.policy == CreationPolicy::Merge {
                    self.applied_keys = Some(content_keys(content));
                }
                if let Some(since) = self.dirty_since.take() {
                    self.ctx
                        .metrics
                        .propagation_seconds
                        .observe(since.elapsed().as_secs_f64());
                }
                self.after_write(content, cursor).await;
            }
            Err(SinkError::Conflict) if self.conflicts < 5 => {
                // someone wrote since our read: re-read, compare, retry
                self.conflicts += 1;
                self.target_state = TargetState::Unknown;
                self.schedule_flush(Duration::ZERO);
            }
            Err(e) => {
                self.conflicts = 0;
                self.target_state = TargetState::Unknown;
                self.write_failed(e).await
            }
        }
    }

    /// Reports why the content was not written; the ConfigMap keeps its
    /// last good content.
    async fn refused(&mut self, refusal: Refusal) {
        match refusal {
            Refusal::Suspended => {
                let message = "spec.suspend is true: watching, not writing";
                self.set_health(Health::err(Reason::Suspended, message, false))
                    .await;
            }
            Refusal::Projection(e) => {
                self.ctx.metrics.error(e.reason());
                warn!(binding = %self.labels.binding, reason = e.reason().as_str(), error = %e, "not writing");
                self.set_health(Health::err(
                    e.reason(),
                    format!("{e}; the ConfigMap keeps its last good content"),
                    false,
                ))
                .await;
            }
            sink @ (Refusal::TargetConflict(_) | Refusal::StaleWriter { .. }) => {
                if let Some(e) = sink.into_sink_error() {
                    self.write_failed(e).await;
                }
            }
        }
    }

    /// Carries out `write` (the sink guards it with the resourceVersion it
    /// was decided on).
    async fn write(
        &mut self,
        write: Write,
        content: &Projected<'_>,
    ) -> Result<Observed, SinkError> {
        let sink = &self.ctx.sink;
        let resource_version = match write {
            Write::Create => sink.create_empty(&self.target).await?,
            Write::Apply { resource_version } => resource_version,
            Write::ReplaceForeign { resource_version } => {
                // their names come from a fresh read: only hashes are kept
                let cm = sink.read(&self.target.namespace, &self.target.name).await?;
                let Some(cm) = cm
                    .filter(|cm| cm.metadata.resource_version.as_ref() == Some(&resource_version))
                else {
                    return Err(SinkError::Conflict);
                };
                let foreign = foreign_keys(&cm, content);
                return sink
                    .replace_content(
                        &self.target,
                        content,
                        self.mirror.cursor(),
                        &foreign,
                        &resource_version,
                    )
                    .await;
            }
        };
        sink.apply(
            &self.target,
            content,
            self.mirror.cursor(),
            resource_version.as_deref(),
        )
        .await
    }

    async fn write_failed(&mut self, e: SinkError) {
        self.ctx.metrics.error(e.reason());
        warn!(binding = %self.labels.binding, reason = e.reason().as_str(), error = %e, "ConfigMap write failed");
        let stalled = matches!(e, SinkError::TargetConflict(_));
        self.set_health(Health::err(e.reason(), e.to_string(), stalled))
            .await;
        self.retry_later();
    }

    /// The ConfigMap holds `content` at `cursor`: mirror it into status.
    async fn after_write(&mut self, content: &Projected<'_>, cursor: WatchCursor) {
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
        if status != self.status {
            self.status = status;
            self.mark_status_dirty();
        }
        let health = if self.lingering {
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
    }

    /// Records the condition in status. Written at once when readiness,
    /// reason, stalled, an error message or the generation changed (with an
    /// Event when readiness, reason or stalled changed); a change that only
    /// restates the cursor waits for the status interval (trailing write).
    async fn set_health(&mut self, health: Health) {
        // an Event per state change, not per new cursor in the message
        let announce = !health.same_state(&self.health);
        let urgent = announce
            || (!health.ready && health.message != self.health.message)
            || self.binding.metadata.generation != self.status_written_generation;
        let mut status = self.status.clone();
        set_conditions(&mut status, &health, self.binding.metadata.generation);
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

    fn mark_status_dirty(&mut self) {
        self.status_dirty_since.get_or_insert_with(Instant::now);
    }

    /// ConfigMap writes hold a quarter or more of the API permits: the API
    /// is working for the data, and a cursor-only status write would only
    /// add to its queue.
    fn api_busy(&self) -> bool {
        let total = self.ctx.config.api_concurrency.max(1);
        let in_use = total.saturating_sub(self.ctx.api_permits.available_permits());
        in_use * 4 >= total
    }

    /// A status write that only restates the cursor, counts or sync time:
    /// ConfigMap writes go first. While the API is busy it waits (the
    /// ConfigMap's cursor annotation is the truth; status mirrors it), but
    /// never longer than [`MAX_STATUS_DEFER`] intervals.
    async fn write_trailing_status(&mut self) {
        let limit = self.ctx.config.status_interval * MAX_STATUS_DEFER;
        let waiting = self.status_dirty_since.map(|since| since.elapsed());
        if waiting.is_some_and(|w| w < limit) && self.api_busy() {
            self.ctx.metrics.deferred_status_writes.inc();
            self.status_due = Some(Instant::now() + STATUS_BUSY_RETRY);
            return;
        }
        let _permit = self.ctx.api_permits.clone().acquire_owned().await.ok();
        self.write_pending_status(false).await;
    }

    /// Writes `status` if it holds unwritten changes (and this replica may
    /// write); `announce` also publishes the Ready condition as an Event.
    async fn write_pending_status(&mut self, announce: bool) {
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
                &self.binding,
                &self.health,
                Action::Sync,
            )
            .await;
        }
    }
}
