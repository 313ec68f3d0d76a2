//! A Kubernetes API emulator for Slipstream's tests: plain HTTP on loopback,
//! an in-memory store with one global resourceVersion, list/watch,
//! server-side apply with managed fields, status subresource, finalizers,
//! garbage collection, validation, CRD-served resources, fault injection and
//! a request log. See README.md for what is emulated and what is not.
//!
//! ```no_run
//! # async fn demo() -> Result<(), apiserver::Error> {
//! let api = apiserver::ApiServer::start().await?;
//! let client = api.client();
//! # let _ = client; Ok(()) }
//! ```

pub mod backend;
pub mod control;
pub mod errors;
pub mod fields;
mod http;
mod openapi;
mod protobuf;
pub mod real;
pub mod resources;
pub mod selectors;
pub mod store;
mod table;
pub mod validation;
mod watch;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;
use tokio::sync::{Notify, broadcast, watch as tokio_watch};

use crate::{
    control::FaultSet,
    selectors::Selectors,
    store::{DeleteOpts, State, StoreLock, WriteOpts},
};
pub use crate::{
    control::{Counters, FaultRule, Faults, RequestRecord},
    errors::{ApiError, Cause},
};

/// Emulator settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How many past writes a watch can resume from; older resourceVersions get 410 Gone.
    pub history_window: usize,
    /// Delay before each write is committed (models etcd); change later with [`Faults::set_write_latency`].
    pub write_latency: Duration,
    /// How often watches with `allowWatchBookmarks` get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Loopback port; 0 picks a free one.
    pub port: u16,
    /// How often the garbage collector looks for work without being poked.
    pub gc_interval: Duration,
    /// Request log entries kept (oldest dropped first).
    pub log_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            history_window: 10_000,
            write_latency: Duration::ZERO,
            bookmark_interval: Duration::from_secs(1),
            port: 0,
            gc_interval: Duration::from_millis(200),
            log_capacity: 200_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("emulator I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("building the kube client failed: {0}")]
    Client(#[from] kube::Error),
    #[error("the emulator thread stopped before it was ready")]
    NotStarted,
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0}")]
    Other(String),
}

pub(crate) struct Shared {
    pub(crate) state: StoreLock,
    pub(crate) config: Config,
    pub(crate) addr: SocketAddr,
    pub(crate) faults: FaultSet,
    pub(crate) paused: tokio_watch::Sender<bool>,
    pub(crate) close_watches: tokio_watch::Sender<u64>,
    pub(crate) shutdown: tokio_watch::Sender<bool>,
    pub(crate) log: Mutex<std::collections::VecDeque<RequestRecord>>,
    pub(crate) counters: Mutex<Counters>,
    pub(crate) gc: Notify,
}

impl Shared {
    pub(crate) fn record(&self, r: RequestRecord) {
        if let Ok(mut c) = self.counters.lock() {
            c.add(&r);
        }
        if let Ok(mut log) = self.log.lock() {
            if log.len() >= self.config.log_capacity {
                log.pop_front();
            }
            log.push_back(r);
        }
    }
}

/// A running emulator. Stops (and frees its port) when dropped.
pub struct ApiServer {
    shared: Arc<Shared>,
    client: kube::Client,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Starts with default settings on a free loopback port.
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(Config::default()).await
    }

    /// Starts on its own OS thread and multi-thread runtime, so it keeps
    /// serving while a current-thread test runtime is blocked.
    pub async fn start_with(config: Config) -> Result<Self, Error> {
        let (ready_tx, ready_rx) =
            tokio::sync::oneshot::channel::<Result<Arc<Shared>, std::io::Error>>();
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || serve_thread(config, ready_tx))?;
        let shared = ready_rx.await.map_err(|_| Error::NotStarted)??;
        let mut kc = kube::Config::new(
            format!("http://{}", shared.addr)
                .parse()
                .map_err(|e| Error::Other(format!("bad url: {e}")))?,
        );
        kc.default_namespace = "default".into();
        kc.read_timeout = Some(Duration::from_secs(300));
        let client = kube::Client::try_from(kc)?;
        Ok(Self {
            shared,
            client,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A client for this emulator (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The kubeconfig a child process or `kubectl` uses to reach this emulator.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\ncurrent-context: emulator\nusers:\n- name: emulator\n  user: {{}}\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        std::fs::write(path, self.kubeconfig_yaml())?;
        Ok(())
    }

    pub fn faults(&self) -> Faults {
        Faults {
            shared: self.shared.clone(),
        }
    }

    /// A copy of the request log, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Empties the request log and resets the counters.
    pub fn clear_requests(&self) {
        if let Ok(mut l) = self.shared.log.lock() {
            l.clear();
        }
        if let Ok(mut c) = self.shared.counters.lock() {
            *c = Counters::default();
        }
    }

    /// Request counts since start (or the last [`ApiServer::clear_requests`]);
    /// exact even when the log has dropped old entries.
    pub fn counters(&self) -> Counters {
        self.shared
            .counters
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// How long the store lock has been held in total since start, and how
    /// many times it was taken (requests serialize only while it is held).
    pub fn store_lock_held(&self) -> (Duration, u64) {
        self.shared.state.held()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state.lock().map(|s| s.rv).unwrap_or(0)
    }

    fn def(&self, api_version: &str, kind: &str) -> Result<Arc<resources::ResourceDef>, Error> {
        let st = self
            .shared
            .state
            .lock()
            .map_err(|_| Error::Other("store lock poisoned".into()))?;
        st.registry
            .find_kind(api_version, kind)
            .ok_or_else(|| Error::Other(format!("no resource serves {api_version} {kind}")))
    }

    /// Creates an object straight in the store (same rules as POST), by its apiVersion/kind.
    pub fn create_object(&self, obj: Value) -> Result<Value, Error> {
        let res = self.def(
            obj["apiVersion"].as_str().unwrap_or_default(),
            obj["kind"].as_str().unwrap_or_default(),
        )?;
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .map(str::to_string)
            .or_else(|| res.namespaced.then(|| "default".to_string()));
        let mut st = self
            .shared
            .state
            .lock()
            .map_err(|_| Error::Other("store lock poisoned".into()))?;
        let opts = WriteOpts {
            manager: "apiserver-test".into(),
            ..Default::default()
        };
        Ok(st.create(&res, ns.as_deref(), obj, &opts)?.value(&res))
    }

    pub fn get_object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let res = self.def(api_version, kind).ok()?;
        let st = self.shared.state.lock().ok()?;
        st.get(&res, namespace, name)
            .ok()
            .map(|o| State::present(&res, &o))
    }

    /// Objects of a kind, in one namespace or all (`None`).
    pub fn list(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let Ok(res) = self.def(api_version, kind) else {
            return Vec::new();
        };
        let Ok(st) = self.shared.state.lock() else {
            return Vec::new();
        };
        st.list(&res, namespace, &Selectors::default())
            .iter()
            .map(|o| o.value(&res))
            .collect()
    }

    pub fn delete_object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        let res = self.def(api_version, kind)?;
        let mut st = self
            .shared
            .state
            .lock()
            .map_err(|_| Error::Other("store lock poisoned".into()))?;
        let v = st
            .delete(&res, namespace, name, &DeleteOpts::default())?
            .value(&res);
        drop(st);
        self.shared.gc.notify_one();
        Ok(v)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        self.shared.paused.send_replace(false);
        // Not joined: the thread ends by itself once its runtime is shut down,
        // and joining here would block the caller's runtime.
        drop(self.thread.take());
    }
}

fn serve_thread(
    config: Config,
    ready: tokio::sync::oneshot::Sender<Result<Arc<Shared>, std::io::Error>>,
) {
    // Requests are served in parallel (writes are computed outside the store
    // lock): one worker per core, at least two.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("apiserver-rt")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", config.port)).await {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let (tx, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            state: StoreLock::new(State::new(config.history_window.max(1), tx)),
            faults: FaultSet::with_latency(config.write_latency),
            config,
            addr,
            paused: tokio_watch::channel(false).0,
            close_watches: tokio_watch::channel(0).0,
            shutdown: tokio_watch::channel(false).0,
            log: Mutex::new(Default::default()),
            counters: Mutex::new(Counters::default()),
            gc: Notify::new(),
        });
        let mut shutdown = shared.shutdown.subscribe();
        tokio::spawn(gc_loop(shared.clone()));
        // kube-apiserver accepts request bodies up to 3 MiB.
        let app = axum::Router::new()
            .fallback(http::handle)
            .layer(axum::extract::DefaultBodyLimit::max(3 * 1024 * 1024))
            .with_state(shared.clone());
        if ready.send(Ok(shared)).is_err() {
            return;
        }
        let server = axum::serve(listener, app);
        tokio::select! {
            r = server => if let Err(e) = r { tracing::warn!("emulator server stopped: {e}") },
            _ = shutdown.wait_for(|s| *s) => {}
        }
    });
    rt.shutdown_background();
}

/// Storage writes the garbage collector makes per slice before it lets
/// requests take the store lock again.
const GC_SLICE_WRITES: u64 = 64;

async fn gc_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let woken = tokio::select! {
            _ = shared.gc.notified() => true,
            _ = tokio::time::sleep(shared.config.gc_interval) => false,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        // Work arrives through the store's queues (owners removed, objects
        // being deleted); with none queued a tick costs nothing.
        let Ok(idle) = shared.state.lock().map(|st| !st.gc_dirty && st.gc_idle()) else {
            return;
        };
        if idle && !woken {
            continue;
        }
        loop {
            let (more, trash) = match shared.state.lock() {
                Ok(mut st) => {
                    st.gc_dirty = false;
                    (st.gc_step(GC_SLICE_WRITES), std::mem::take(&mut st.trash))
                }
                Err(_) => return,
            };
            drop(trash);
            if !more {
                break;
            }
            // Requests waiting for the store lock go first.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
