//! The controller: reconciles ConfigBindings, runs one KV watch per bucket
//! ([`hub`]), and one worker per binding ([`worker`]) that coalesces bursts
//! and writes the ConfigMap.
//!
//! Reconcile is a small pipeline: finalizer -> validate spec and access
//! policy -> (re)start the binding's worker when its generation changed.
//! Everything that talks to KV or writes ConfigMaps lives in the worker, so a
//! reconcile never blocks on NATS.

pub mod decide;
pub mod hub;
pub mod status;
pub mod worker;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Recorder, Reporter},
        reflector, watcher,
    },
};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::{
    crd::{ConfigBinding, DeletionPolicy},
    metrics::Metrics,
    policy::{AccessPolicy, PolicyError},
    projection::{ProjectionRules, SpecError},
    reason::Reason,
    sink::configmap::{
        BINDING_ANNOTATION, ConfigMapHead, ConfigMapSink, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
        Observed, SinkError, TargetRef,
    },
    util::lock,
};
use hub::Hub;
use status::{ConditionType, Health, publish_event, set_conditions, write_status};
use worker::{Worker, WorkerMsg};

pub const FINALIZER: &str = "slipstream.io/cleanup";

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

// Kept for compatibility: tests and examples name these through `controller`.
pub use crate::kv::{KvConnector, nats::NatsConnector};

/// Tunables of the controller.
#[derive(Debug, Clone)]
pub struct Config {
    /// Wait this long after the first update of a burst before writing.
    pub coalesce: Duration,
    /// Watch only this namespace (all when `None`).
    pub namespace: Option<String>,
    /// How long a bucket's catch-up runner waits after a request for more
    /// to share its scan (bindings created or restarted together).
    pub catchup_gather: Duration,
    /// Most ConfigMap reads and writes (with their status write) in flight
    /// at once: thousands of bindings starting together must not open
    /// thousands of API connections.
    pub api_concurrency: usize,
    /// Least time between two status writes of one binding carrying only a
    /// new cursor, counts or sync time; condition changes are written at once
    /// and the last change after a quiet spell is always written when the
    /// interval ends.
    pub status_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            coalesce: Duration::from_millis(50),
            namespace: None,
            catchup_gather: Duration::from_millis(20),
            api_concurrency: 64,
            status_interval: Duration::from_secs(10),
        }
    }
}

struct WorkerHandle {
    uid: String,
    generation: i64,
    tx: mpsc::UnboundedSender<WorkerMsg>,
    task: tokio::task::JoinHandle<()>,
}

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub kv: Arc<dyn KvConnector>,
    pub policy: AccessPolicy,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// "May write": false on a standby replica.
    pub gate: watch::Receiver<bool>,
    pub config: Config,
    pub hub: Hub,
    pub sink: ConfigMapSink,
    api_permits: Arc<Semaphore>,
    workers: Mutex<HashMap<(String, String), WorkerHandle>>,
    ids: AtomicU64,
}

impl Context {
    pub fn new(
        client: Client,
        kv: Arc<dyn KvConnector>,
        policy: AccessPolicy,
        metrics: Metrics,
        gate: watch::Receiver<bool>,
        config: Config,
    ) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "slipstream".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Arc::new(Self {
            hub: Hub::new(kv.clone(), metrics.clone(), config.catchup_gather),
            sink: ConfigMapSink::new(client.clone()),
            api_permits: Arc::new(Semaphore::new(config.api_concurrency.max(1))),
            workers: Mutex::default(),
            ids: AtomicU64::new(1),
            client,
            kv,
            policy,
            metrics,
            recorder,
            gate,
            config,
        })
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Number of bindings with a running worker.
    pub fn worker_count(&self) -> usize {
        lock(&self.workers).len()
    }

    /// Stops every worker at once (and with them the bucket watches), like
    /// a crash: nothing pending is flushed.
    pub fn shutdown(&self) {
        let handles: Vec<WorkerHandle> = lock(&self.workers).drain().map(|(_, h)| h).collect();
        for h in handles {
            h.task.abort();
        }
    }

    fn stop_worker(&self, key: &(String, String)) {
        if let Some(h) = lock(&self.workers).remove(key) {
            h.task.abort();
        }
    }

    fn send_to_worker(&self, key: &(String, String), msg: WorkerMsg) {
        if let Some(h) = lock(&self.workers).get(key) {
            let _ = h.tx.send(msg);
        }
    }
}

fn binding_key(b: &ConfigBinding) -> (String, String) {
    (b.namespace().unwrap_or_default(), b.name_any())
}

fn target_of(b: &ConfigBinding) -> TargetRef {
    TargetRef {
        namespace: b.namespace().unwrap_or_default(),
        name: b.target_name(),
        binding: b.name_any(),
        generation: b.metadata.generation.unwrap_or(0),
        policy: b.spec.target.creation_policy,
        owner: b.controller_owner_ref(&()),
        labels: b.spec.target.labels.clone(),
        annotations: b.spec.target.annotations.clone(),
    }
}

/// Why a binding is not served at all (it never reads, never writes).
#[derive(Debug, thiserror::Error)]
enum Invalid {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{0}; nothing is read")]
    Denied(#[from] PolicyError),
}

impl Invalid {
    fn reason(&self) -> Reason {
        match self {
            Invalid::Spec(e) => e.reason(),
            Invalid::Denied(e) => e.reason(),
        }
    }
}

/// Spec and access policy.
fn validate(b: &ConfigBinding, policy: &AccessPolicy) -> Result<ProjectionRules, Invalid> {
    let rules = ProjectionRules::from_spec(&b.spec)?;
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
    warn!(binding = %b.name_any(), namespace = ?b.namespace(), reason = reason.as_str(), message, "binding not served");
    let mut status = b.status.clone().unwrap_or_default();
    let ready = ConditionType::Ready.as_str();
    let before = status.condition(ready).cloned();
    let health = Health::err(reason, message, true);
    set_conditions(&mut status, &health, b.metadata.generation);
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
    {
        let workers = lock(&ctx.workers);
        if let Some(h) = workers.get(&key)
            && h.uid == uid
            && h.generation == generation
            && !h.task.is_finished()
        {
            return Ok(Action::await_change());
        }
    }
    ctx.stop_worker(&key);
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
    let task = tokio::spawn(w.run());
    info!(binding = %key.1, namespace = %key.0, generation, "binding started");
    lock(&ctx.workers).insert(
        key,
        WorkerHandle {
            uid,
            generation,
            tx,
            task,
        },
    );
    Ok(Action::await_change())
}

async fn cleanup(b: Arc<ConfigBinding>, ctx: Arc<Context>) -> Result<Action> {
    let key = binding_key(&b);
    ctx.stop_worker(&key);
    let delete = b.spec.target.deletion_policy == DeletionPolicy::Delete;
    match ctx.sink.release(&target_of(&b), delete).await {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    info!(binding = %key.1, namespace = %key.0, delete, "binding removed");
    Ok(Action::await_change())
}

async fn reconcile(b: Arc<ConfigBinding>, ctx: Arc<Context>) -> Result<Action> {
    if !*ctx.gate.borrow() {
        // standby: keep the projection warm, write nothing (not even the finalizer)
        if b.metadata.deletion_timestamp.is_some() {
            ctx.stop_worker(&binding_key(&b));
        } else {
            let key = binding_key(&b);
            let running = lock(&ctx.workers).get(&key).is_some_and(|h| {
                h.generation == b.metadata.generation.unwrap_or(0) && !h.task.is_finished()
            });
            if !running && let Ok(rules) = validate(&b, &ctx.policy) {
                let (tx, rx) = mpsc::unbounded_channel();
                let w = Worker::new(ctx.clone(), b.clone(), rules, rx, Arc::default());
                let task = tokio::spawn(w.run());
                let handle = WorkerHandle {
                    uid: b.uid().unwrap_or_default(),
                    generation: b.metadata.generation.unwrap_or(0),
                    tx,
                    task,
                };
                lock(&ctx.workers).insert(key, handle);
            }
        }
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let api: Api<ConfigBinding> =
        Api::namespaced(ctx.client.clone(), &b.namespace().unwrap_or_default());
    let finalizers = b.finalizers().to_vec();
    let has_finalizer = finalizers.iter().any(|f| f == FINALIZER);
    if b.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        cleanup(b.clone(), ctx).await?;
        let rest: Vec<String> = finalizers.into_iter().filter(|f| f != FINALIZER).collect();
        set_finalizers(&api, &b, rest).await?;
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        let mut all = finalizers;
        all.push(FINALIZER.to_owned());
        set_finalizers(&api, &b, all).await?;
        // the update triggers the next reconcile
        return Ok(Action::await_change());
    }
    apply(b, ctx).await
}

/// Replaces the finalizer list, guarded by the resourceVersion we read.
async fn set_finalizers(
    api: &Api<ConfigBinding>,
    b: &ConfigBinding,
    list: Vec<String>,
) -> Result<()> {
    let patch = serde_json::json!({
        "metadata": {"finalizers": list, "resourceVersion": b.resource_version()}
    });
    match api
        .patch(
            &b.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn error_policy(b: Arc<ConfigBinding>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(err.reason());
    warn!(binding = %b.name_any(), reason = err.reason().as_str(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Routes ConfigMap changes (hand edits, deletes) to the writing binding's
/// worker, read as [`ConfigMapHead`]: metadata and content hashes, no copy of
/// the content (most events are the echo of our own write).
async fn watch_configmaps(ctx: Arc<Context>) {
    let api: Api<ConfigMapHead> = match &ctx.config.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let wc = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    let mut stream = watcher(api, wc).boxed();
    while let Some(ev) = stream.next().await {
        let (cm, deleted) = match ev {
            Ok(watcher::Event::Apply(cm)) | Ok(watcher::Event::InitApply(cm)) => (cm, false),
            Ok(watcher::Event::Delete(cm)) => (cm, true),
            Ok(_) => continue,
            Err(e) => {
                debug!(error = %e, "ConfigMap watch error; the watcher retries");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Some(binding) = cm.annotations().get(BINDING_ANNOTATION).cloned() else {
            continue;
        };
        let key = (cm.namespace().unwrap_or_default(), binding);
        let msg = WorkerMsg::Target((!deleted).then(|| Box::new(Observed::from_head(cm))));
        ctx.send_to_worker(&key, msg);
    }
}

/// Runs the controller until the process is told to stop.
pub async fn run(ctx: Arc<Context>) {
    if ctx.policy.is_allow_all() {
        info!("no access policy given: every namespace may read every bucket and prefix");
    }
    let bindings: Api<ConfigBinding> = match &ctx.config.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let cm_task = tokio::spawn(watch_configmaps(ctx.clone()));
    let api_concurrency = u16::try_from(ctx.config.api_concurrency.max(1)).unwrap_or(u16::MAX);
    // the cached copies drop managedFields (about 9 KB per binding, never
    // read); for_stream keeps the reflector otherwise what Controller::new builds
    let (reader, writer) = reflector::store();
    let trigger = reflector(
        writer,
        watcher(bindings, watcher::Config::default().any_semantic())
            .modify(|b: &mut ConfigBinding| b.managed_fields_mut().clear()),
    )
    .applied_objects();
    Controller::for_stream(trigger, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(api_concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile error");
            }
        })
        .await;
    cm_task.abort();
    ctx.shutdown();
}
