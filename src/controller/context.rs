//! What the controller's parts share: the tunables ([`Config`]), the
//! clients and the registry of running workers ([`Context`]).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use kube::{
    Client, Resource, ResourceExt,
    runtime::events::{Recorder, Reporter},
};
use tokio::sync::{Semaphore, mpsc, watch};

use super::{hub::Hub, startup::StartupReads};
use crate::{
    crd::ConfigBinding,
    kv::KvConnector,
    metrics::Metrics,
    policy::AccessPolicy,
    sink::configmap::{ConfigMapSink, Observed, TargetRef},
    util::lock,
};

/// How often a deferred write of a new or deleted binding looks at the API again.
const CHURN_BUSY_RETRY: Duration = Duration::from_millis(100);

/// Live bindings' data defers a write of a new or deleted binding by at most this long.
const MAX_CHURN_DEFER: Duration = Duration::from_secs(5);

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

/// Messages the controller sends a binding's worker (bucket news comes
/// from the hub on a channel of its own).
pub enum WorkerMsg {
    /// The target ConfigMap as the watch last saw it (`None`: deleted).
    Target(Option<Box<Observed>>),
}

pub(super) struct WorkerHandle {
    pub uid: String,
    pub generation: i64,
    /// The force-sync request the worker was started for.
    pub force_sync: Option<String>,
    /// The ConfigMap this worker writes: when a new generation names
    /// another, this one gets the binding's deletion policy.
    pub target: TargetRef,
    pub tx: mpsc::UnboundedSender<WorkerMsg>,
    pub task: tokio::task::JoinHandle<()>,
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
    pub(super) api_permits: Arc<Semaphore>,
    /// Live bindings' ConfigMap writes waiting for a permit or holding one.
    live_writes: Arc<AtomicUsize>,
    /// The ConfigMaps listed in bulk at start (the workers' first read).
    pub(super) startup: StartupReads,
    pub(super) workers: Mutex<HashMap<(String, String), WorkerHandle>>,
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
            live_writes: Arc::default(),
            startup: StartupReads::new(super::startup::STARTUP_WINDOW),
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

    /// ConfigMap writes hold a quarter or more of the API permits: the API
    /// is working for the data, and a write that only keeps books (a status
    /// that restates the cursor, a finalizer) would only add to its queue.
    pub(super) fn api_busy(&self) -> bool {
        let total = self.config.api_concurrency.max(1);
        let in_use = total.saturating_sub(self.api_permits.available_permits());
        in_use * 4 >= total
    }

    /// Live bindings' ConfigMap writes (of bindings that wrote or found
    /// their ConfigMap before), waiting for an API permit or holding one,
    /// number a quarter of the permits or more.
    fn live_data_busy(&self) -> bool {
        let total = self.config.api_concurrency.max(1);
        self.live_writes.load(Ordering::Relaxed) * 4 >= total
    }

    /// Counts a live binding's ConfigMap write, from its wait for an API
    /// permit until the guard drops.
    pub(super) fn live_write(&self) -> LiveWrite {
        self.live_writes.fetch_add(1, Ordering::Relaxed);
        LiveWrite(self.live_writes.clone())
    }

    /// Waits, before a write of a new or deleted binding (its finalizer,
    /// its first ConfigMap write, the cleanup of its target), while live
    /// bindings' data holds the API, at most [`MAX_CHURN_DEFER`]: their
    /// data goes first, and churn delays the new bindings, not the others.
    /// A cold start, where no binding is live yet, waits for nothing.
    pub(super) async fn yield_to_data_writes(&self) {
        let deadline = Instant::now() + MAX_CHURN_DEFER;
        let mut deferred = false;
        while self.live_data_busy() && Instant::now() < deadline {
            if !deferred {
                self.metrics.deferred_churn_writes.inc();
                deferred = true;
            }
            tokio::time::sleep(CHURN_BUSY_RETRY).await;
        }
    }

    pub(super) fn next_id(&self) -> u64 {
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

    pub(super) fn stop_worker(&self, key: &(String, String)) {
        if let Some(h) = lock(&self.workers).remove(key) {
            h.task.abort();
        }
    }

    pub(super) fn send_to_worker(&self, key: &(String, String), msg: WorkerMsg) {
        if let Some(h) = lock(&self.workers).get(key) {
            let _ = h.tx.send(msg);
        }
    }
}

pub(super) fn binding_key(b: &ConfigBinding) -> (String, String) {
    (b.namespace().unwrap_or_default(), b.name_any())
}

/// The ConfigMap `b` writes, and how.
pub fn target_of(b: &ConfigBinding) -> TargetRef {
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

/// A live binding's ConfigMap write in flight (see [`Context::live_write`]).
pub(super) struct LiveWrite(Arc<AtomicUsize>);

impl Drop for LiveWrite {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
