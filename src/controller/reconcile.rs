//! Reconcile, a small pipeline: finalizer -> validate spec and access policy
//! -> (re)start the binding's worker when its generation changed. Everything
//! that talks to KV or writes ConfigMaps lives in the worker, so a reconcile
//! never blocks on NATS.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use kube::{ResourceExt, runtime::controller::Action};
use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};

use super::{
    context::{Context, WorkerHandle, binding_key, target_of},
    finalizer::{self, FINALIZER},
    rollout::{Plan, PlanError},
    status::{self, ConditionType, Health, publish_event, set_conditions, write_status},
    worker::Worker,
};
use crate::{
    crd::{ConfigBinding, DeletionPolicy},
    metrics::BindingLabels,
    policy::{AccessPolicy, PolicyError},
    projection::{ProjectionRules, SpecError},
    reason::Reason,
    sink::configmap::{SinkError, TargetRef},
    util::{backoff::Backoff, lock, logging::binding_span},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("ConfigMap: {0}")]
    Sink(#[from] SinkError),
}

impl Error {
    pub fn reason(&self) -> Reason {
        match self {
            Error::Kube(_) => Reason::KubernetesError,
            Error::Sink(e) => e.reason(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a binding is not served at all (it never reads, never writes).
#[derive(Debug, thiserror::Error)]
enum Invalid {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{0}; nothing is read")]
    Denied(#[from] PolicyError),
    #[error(transparent)]
    Rollout(#[from] PlanError),
}

impl Invalid {
    fn reason(&self) -> Reason {
        match self {
            Invalid::Spec(e) => e.reason(),
            Invalid::Denied(e) => e.reason(),
            Invalid::Rollout(e) => e.reason(),
        }
    }
}

/// Spec and access policy.
fn validate(b: &ConfigBinding, policy: &AccessPolicy) -> Result<ProjectionRules, Invalid> {
    let rules = ProjectionRules::from_spec(&b.spec)?;
    Plan::from_spec(&b.spec)?;
    policy.check(
        &b.namespace().unwrap_or_default(),
        &b.spec.bucket,
        &b.spec.prefixes,
    )?;
    Ok(rules)
}

/// Reports a binding that is not served: Ready False and Stalled, with an
/// Event when that is news.
async fn report_invalid(b: &ConfigBinding, ctx: &Context, invalid: &Invalid) -> Result<()> {
    let (reason, message) = (invalid.reason(), invalid.to_string());
    ctx.metrics.error(reason);
    warn!(reason = reason.as_str(), detail = %message, "binding not served");
    let mut status = b.status.clone().unwrap_or_default();
    let ready = ConditionType::Ready.as_str();
    let before = status.condition(ready).cloned();
    let health = Health::err(reason, message, true);
    set_conditions(&mut status, &health, b.metadata.generation);
    let (namespace, binding) = binding_key(b);
    ctx.metrics
        .set_conditions(&BindingLabels { namespace, binding }, &status.conditions);
    status.observed_generation = b.metadata.generation;
    let changed = before.as_ref().map(|c| (&c.reason, &c.message, &c.status))
        != status
            .condition(ready)
            .map(|c| (&c.reason, &c.message, &c.status));
    if !changed || !*ctx.gate.borrow() {
        return Ok(());
    }
    write_status(&ctx.client, b, &status).await?;
    publish_event(&ctx.recorder, b, &health, status::Action::Validate).await;
    Ok(())
}

async fn apply(b: Arc<ConfigBinding>, ctx: Arc<Context>) -> Result<Action> {
    let key = binding_key(&b);
    let uid = b.uid().unwrap_or_default();
    let generation = b.metadata.generation.unwrap_or(0);
    let force_sync = b.pending_force_sync().map(str::to_owned);
    {
        let workers = lock(&ctx.workers);
        if let Some(h) = workers.get(&key)
            && h.uid == uid
            && h.generation == generation
            && (force_sync.is_none() || h.force_sync == force_sync)
            && !h.task.is_finished()
        {
            return Ok(Action::await_change());
        }
    }
    let old_target = lock(&ctx.workers).get(&key).map(|h| h.target.clone());
    ctx.stop_worker(&key);
    if let Some(old) = old_target
        && old.name != b.target_name()
    {
        release_old_target(&b, &ctx, &old).await;
    }
    let rules = match validate(&b, &ctx.policy) {
        Ok(r) => r,
        Err(invalid) => {
            report_invalid(&b, &ctx, &invalid).await?;
            return Ok(Action::await_change());
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let head = Arc::new(AtomicU64::new(0));
    let w = Worker::new(ctx.clone(), b.clone(), rules, rx, head);
    let task = tokio::spawn(Box::new(w).run().instrument(binding_span(&key.0, &key.1)));
    info!(generation, "binding started");
    lock(&ctx.workers).insert(
        key,
        WorkerHandle {
            uid,
            generation,
            force_sync,
            target: target_of(&b),
            tx,
            task,
        },
    );
    Ok(Action::await_change())
}

/// The binding now names another target: the one it wrote before gets
/// its deletion policy (Delete: deleted, or our keys withdrawn from a Merge
/// target; Retain: kept, our claim dropped), as if the binding had gone.
/// Only a ConfigMap that still carries this binding's claim is touched.
async fn release_old_target(b: &ConfigBinding, ctx: &Context, old: &TargetRef) {
    let delete = b.spec.target.deletion_policy == DeletionPolicy::Delete;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    for attempt in 1..=5 {
        match ctx.sink.release(old, delete).await {
            Ok(()) => {
                info!(old = %old.name, new = %b.target_name(), delete, "target changed; old target released");
                return;
            }
            Err(e) if e.is_not_found() => return,
            Err(e) if attempt == 5 => {
                ctx.metrics.error(e.reason());
                warn!(old = %old.name, error = %e, "target changed; the old target could not be released");
            }
            Err(_) => tokio::time::sleep(backoff.next_delay()).await,
        }
    }
}

async fn cleanup(b: Arc<ConfigBinding>, ctx: Arc<Context>) -> Result<Action> {
    let key = binding_key(&b);
    ctx.stop_worker(&key);
    ctx.metrics.forget_binding(&key.0, &key.1);
    let delete = b.spec.target.deletion_policy == DeletionPolicy::Delete;
    match ctx.sink.release(&target_of(&b), delete).await {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    info!(delete, "binding removed");
    Ok(Action::await_change())
}

pub(super) async fn reconcile(b: Arc<ConfigBinding>, ctx: Arc<Context>) -> Result<Action> {
    let (namespace, name) = binding_key(&b);
    reconcile_binding(b, ctx)
        .instrument(binding_span(&namespace, &name))
        .await
}

async fn reconcile_binding(b: Arc<ConfigBinding>, ctx: Arc<Context>) -> Result<Action> {
    if !*ctx.gate.borrow() {
        // standby: keep the projection warm, write nothing (not even the finalizer)
        if b.metadata.deletion_timestamp.is_some() {
            let key = binding_key(&b);
            ctx.stop_worker(&key);
            ctx.metrics.forget_binding(&key.0, &key.1);
        } else {
            let key = binding_key(&b);
            let running = lock(&ctx.workers).get(&key).is_some_and(|h| {
                h.generation == b.metadata.generation.unwrap_or(0) && !h.task.is_finished()
            });
            if !running && let Ok(rules) = validate(&b, &ctx.policy) {
                let (tx, rx) = mpsc::unbounded_channel();
                let w = Worker::new(ctx.clone(), b.clone(), rules, rx, Arc::default());
                let task = tokio::spawn(Box::new(w).run().instrument(binding_span(&key.0, &key.1)));
                let handle = WorkerHandle {
                    uid: b.uid().unwrap_or_default(),
                    generation: b.metadata.generation.unwrap_or(0),
                    force_sync: b.pending_force_sync().map(str::to_owned),
                    target: target_of(&b),
                    tx,
                    task,
                };
                lock(&ctx.workers).insert(key, handle);
            }
        }
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let finalizers = b.finalizers().to_vec();
    let has_finalizer = finalizer::has(&b);
    if b.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            // Owner + Delete: the garbage collector deletes the ConfigMap
            // once the binding is gone; write nothing more for it
            ctx.stop_worker(&binding_key(&b));
            return Ok(Action::await_change());
        }
        ctx.yield_to_data_writes().await;
        cleanup(b.clone(), ctx.clone()).await?;
        let rest: Vec<String> = finalizers.into_iter().filter(|f| f != FINALIZER).collect();
        finalizer::set(&ctx.client, &b, rest).await?;
        return Ok(Action::await_change());
    }
    if !has_finalizer && finalizer::needed(&b) {
        let mut all = finalizers;
        all.push(FINALIZER.to_owned());
        ctx.yield_to_data_writes().await;
        finalizer::set(&ctx.client, &b, all).await?;
        // the update triggers the next reconcile
        return Ok(Action::await_change());
    }
    apply(b, ctx).await
}

pub(super) fn error_policy(b: Arc<ConfigBinding>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(err.reason());
    let (namespace, binding) = binding_key(&b);
    warn!(%namespace, %binding, reason = err.reason().as_str(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}
