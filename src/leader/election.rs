//! [`LeaderElection`]: the handle `slipstream run` holds; it starts the
//! election tasks and hands out the write gate.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::info;

use super::{
    config::{ElectionConfig, Result},
    metrics::LeaderMetrics,
    shared::{Shared, Source},
    status::{LeaderStatus, NotReady, Role},
    tasks,
};
use crate::kv::{
    KvStore,
    filter::validate_key,
    lease::LeaseConfig,
    nats::{BucketConfig, ConnectOptions, NatsConnector},
};

/// A running election (or a fixed "always leader" when election is off).
pub struct LeaderElection {
    shared: Arc<Shared>,
    gate: watch::Receiver<bool>,
    status: watch::Receiver<LeaderStatus>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElection")
            .field("key", &self.shared.config.key)
            .field("identity", &self.shared.config.identity)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl LeaderElection {
    /// Starts an election for the lease in `bucket` (opened, or created
    /// with that config, on a connection of its own; see
    /// [`lease_bucket`](super::lease_bucket)). Must be called inside
    /// a Tokio runtime. NATS errors do not fail the start: the election
    /// retries and reports them through [`status`](Self::status).
    pub fn start(
        config: ElectionConfig,
        bucket: BucketConfig,
        opts: ConnectOptions,
        metrics: LeaderMetrics,
    ) -> Self {
        let connector = Box::new(NatsConnector::new(opts));
        Self::spawn(config, Source::Nats { connector, bucket }, metrics)
    }

    /// An election on an already opened store (tests, other backends).
    pub fn start_on(
        store: Arc<dyn KvStore>,
        config: ElectionConfig,
        metrics: LeaderMetrics,
    ) -> Result<Self> {
        config.lease.validate()?;
        validate_key(&config.key)?;
        Ok(Self::spawn(config, Source::Store(store), metrics))
    }

    /// No election: the gate is always open.
    pub fn disabled(metrics: LeaderMetrics) -> Self {
        let config = ElectionConfig {
            key: String::new(),
            identity: String::new(),
            lease: LeaseConfig::default(),
        };
        Self::with_role(config, Role::Disabled, metrics).0
    }

    fn spawn(config: ElectionConfig, source: Source, metrics: LeaderMetrics) -> Self {
        let (mut election, stop_rx) = Self::with_role(config, Role::Starting, metrics);
        let shared = &election.shared;
        info!(
            identity = %shared.config.identity,
            key = %shared.config.key,
            ttl = ?shared.config.lease.ttl,
            renew = ?shared.config.lease.renew_interval,
            "leader election started"
        );
        election.task = Some(tokio::spawn(tasks::run(shared.clone(), source, stop_rx)));
        election
    }

    /// A handle in `role` (its gate open only when election is disabled),
    /// and the receiver of its stop signal.
    fn with_role(
        config: ElectionConfig,
        role: Role,
        metrics: LeaderMetrics,
    ) -> (Self, watch::Receiver<bool>) {
        let open = role == Role::Disabled;
        metrics.is_leader.set(i64::from(open));
        let (gate_tx, gate) = watch::channel(open);
        let (status_tx, status) = watch::channel(LeaderStatus {
            role,
            holder: None,
            error: None,
        });
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            gate: gate_tx,
            status: status_tx,
            metrics,
            stopping: AtomicBool::new(false),
        });
        let election = Self {
            shared,
            gate,
            status,
            stop,
            task: None,
        };
        (election, stop_rx)
    }

    /// True while this replica may write. Check it right before each write.
    pub fn gate(&self) -> watch::Receiver<bool> {
        self.gate.clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.gate.borrow()
    }

    pub fn status(&self) -> watch::Receiver<LeaderStatus> {
        self.status.clone()
    }

    /// For `/readyz`: see [`LeaderStatus::readiness`].
    pub fn readiness(&self) -> std::result::Result<(), NotReady> {
        self.status.borrow().readiness()
    }

    pub fn identity(&self) -> &str {
        &self.shared.config.identity
    }

    pub fn key(&self) -> &str {
        &self.shared.config.key
    }

    /// Closes the gate for good, at once; the lease stays held until
    /// [`shutdown`](Self::shutdown), so a write already in flight can finish
    /// before another replica starts writing.
    pub fn stop_writing(&self) {
        if self.task.is_none() {
            return;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.set_gate(false);
    }

    /// Stops writing, stops renewing and releases the lease (CAS delete), so
    /// a standby takes over at once instead of after the TTL.
    pub async fn shutdown(mut self) {
        self.stop_writing();
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LeaderElection {
    fn drop(&mut self) {
        // Without `shutdown` the task still releases the lease when it sees this.
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.set_gate(false);
        let _ = self.stop.send(true);
    }
}
