//! The write path: build the content, [`decide`] what to do with it, do
//! it (one guarded write through the sink), and hand over to `report`.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use bytes::Bytes;
use kube::Api;
use tracing::{debug, warn};

use super::Worker;
use crate::{
    controller::{
        context::LiveWrite,
        decide::{
            Decision, Lookup, Observation, Refusal, TargetState, Write, content_keys, decide,
        },
        finalizer,
        status::Health,
    },
    crd::{ConfigBinding, CreationPolicy},
    projection::{KeyDecision, Projected, ProjectionError},
    reason::Reason,
    sink::configmap::{Observed, SinkError, foreign_keys},
};

/// What [`Worker::admit`] grants: an API permit, and for a live binding
/// its place in the count of live data writes.
pub(super) struct Admission {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    _live: Option<LiveWrite>,
}

impl Worker {
    pub(super) fn may_write(&self) -> bool {
        let ok = *self.ctx.gate.borrow();
        if !ok {
            self.ctx.metrics.dropped_writes.inc();
        }
        ok
    }

    pub(super) async fn other_binding_exists(&self, name: &str) -> bool {
        let api: Api<ConfigBinding> =
            Api::namespaced(self.ctx.client.clone(), &self.target.namespace);
        !matches!(api.get_opt(name).await, Ok(None))
    }

    /// Leave to write: a new binding's first write gives way to live
    /// bindings' data, waiting or written (churn delays the new bindings,
    /// not the others); then an API permit (bounded API concurrency).
    pub(super) async fn admit(&self) -> Admission {
        let live =
            self.last_write.is_some() || matches!(self.target_state, TargetState::Present(_));
        let live = live.then(|| self.ctx.live_write());
        if live.is_none() {
            self.ctx.yield_to_data_writes().await;
        }
        let permit = self.ctx.api_permits.clone().acquire_owned().await.ok();
        Admission {
            _permit: permit,
            _live: live,
        }
    }

    /// Writes the current content (complete: `synced`) if it differs from
    /// the ConfigMap.
    pub(super) async fn flush(&mut self, admission: Admission) {
        // the projection borrows the entries while the write needs `&mut
        // self`; nothing else runs on this worker until the flush returns
        let entries = self.mirror.take_entries();
        self.flush_entries(&entries, admission).await;
        self.mirror.put_back(entries);
    }

    /// The content to write: the projection of `entries`, stamped with what
    /// a restart needs to trust it (the pure "build" step). Entries whose
    /// ConfigMap key is in `refused` (sorted) are left out entirely.
    pub(super) fn build<'a>(
        &self,
        entries: &'a BTreeMap<String, Bytes>,
        refused: &[(String, String)],
    ) -> Result<Projected<'a>, ProjectionError> {
        let kept = |kv_key: &str| {
            refused.is_empty()
                || !matches!(self.rules.map_key(kv_key), KeyDecision::Mapped(cm_key)
                    if refused.binary_search_by(|(k, _)| k.as_str().cmp(&cm_key)).is_ok())
        };
        let entries = entries.iter().filter(|(k, _)| kept(k));
        let mut projected = self
            .rules
            .project(entries.clone().map(|(k, v)| (k.as_str(), v.as_ref())))?;
        projected.incarnation = self.incarnation;
        if self.target.policy == CreationPolicy::Merge || !self.rules.is_invertible() {
            // a restart needs this to map our keys back to KV keys
            projected.sources = self.rules.sources(entries.map(|(k, _)| k.as_str()));
        }
        Ok(projected)
    }

    /// Keys of a Merge target that another field manager owns: never
    /// written, so never taken over and never deleted by us.
    fn refused_keys(&self) -> Vec<(String, String)> {
        match &self.target_state {
            TargetState::Present(obs) if self.target.policy == CreationPolicy::Merge => {
                obs.foreign_owned.clone()
            }
            _ => Vec::new(),
        }
    }

    /// The refused keys this binding has an entry for: another manager's
    /// keys it would never write are no concern of its condition.
    fn written_by_us(
        &self,
        entries: &BTreeMap<String, Bytes>,
        refused: Vec<(String, String)>,
    ) -> Vec<(String, String)> {
        if refused.is_empty() {
            return refused;
        }
        let mut wanted = vec![false; refused.len()];
        for kv_key in entries.keys() {
            if let KeyDecision::Mapped(cm_key) = self.rules.map_key(kv_key)
                && let Ok(i) = refused.binary_search_by(|(k, _)| k.as_str().cmp(&cm_key))
            {
                wanted[i] = true;
            }
        }
        refused
            .into_iter()
            .zip(wanted)
            .filter_map(|(key, wanted)| wanted.then_some(key))
            .collect()
    }

    /// The write path: build the content, [`decide`] what to do with it,
    /// do it, report it. Reads the ConfigMap (or the binding named in its
    /// claim) only when the decision asks for it.
    /// `admission` is held through the write and its status write.
    pub(super) async fn flush_entries(
        &mut self,
        entries: &BTreeMap<String, Bytes>,
        _admission: Admission,
    ) {
        let mut refused = self.refused_keys();
        let mut content = self.build(entries, &refused);
        let mut other_binding_exists = None;
        let mut bucket_last = None;
        let decision = loop {
            let now_refused = self.refused_keys();
            if now_refused != refused {
                refused = now_refused;
                content = self.build(entries, &refused);
            }
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
                bucket_last,
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
                Decision::Observe(Lookup::BucketLast) => match self.bucket_last().await {
                    Ok(last) => bucket_last = Some(last),
                    Err(e) => {
                        self.ctx.metrics.error(Reason::from(&e));
                        self.set_health(Health::err(Reason::from(&e), e.to_string(), false))
                            .await;
                        return self.retry_later();
                    }
                },
                decision => break decision,
            }
        };
        self.refused = self.written_by_us(entries, refused);
        let write = match decision {
            Decision::Observe(_) => return,
            Decision::Refuse(refusal) => return self.refused(refusal).await,
            // a force-sync rewrites once even when nothing differs
            Decision::SkipUnchanged { .. }
                if self.force_sync.is_some() && *self.ctx.gate.borrow() =>
            {
                Write::Apply {
                    resource_version: match &self.target_state {
                        TargetState::Present(obs) => obs.resource_version.clone(),
                        _ => None,
                    },
                }
            }
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
        if !self.finalized {
            // nothing is written before the finalizer is on, so a deletion
            // always runs the cleanup its deletionPolicy asks for
            match finalizer::ensure(&self.ctx.client, &self.binding).await {
                Ok(true) => self.finalized = true,
                Ok(false) => return, // being deleted: the cleanup takes over
                Err(e) => return self.write_failed(SinkError::Kube(e)).await,
            }
        }
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
    pub(super) async fn refused(&mut self, refusal: Refusal) {
        match refusal {
            Refusal::Suspended => {
                let message = "spec.suspend is true: watching, not writing";
                self.set_health(Health::err(Reason::Suspended, message, false))
                    .await;
            }
            Refusal::Projection(e) => {
                self.ctx.metrics.error(e.reason());
                warn!(binding = %self.labels.binding, reason = e.reason().as_str(), error = %e, "not writing");
                // retrying cannot help: the KV content or the spec must change
                self.set_health(Health::err(
                    e.reason(),
                    format!("{e}; the ConfigMap keeps its last good content"),
                    true,
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
    pub(super) async fn write(
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

    pub(super) async fn write_failed(&mut self, e: SinkError) {
        self.ctx.metrics.error(e.reason());
        warn!(binding = %self.labels.binding, reason = e.reason().as_str(), error = %e, "ConfigMap write failed");
        let stalled = matches!(e, SinkError::TargetConflict(_));
        self.set_health(Health::err(e.reason(), e.to_string(), stalled))
            .await;
        self.retry_later();
    }
}
