//! Leader election: several replicas of `slipstream run` serve one cluster
//! and exactly one of them writes.
//!
//! Built on the KV [`Lease`]. The gate handed to the controller
//! ([`LeaderElection::gate`]) is true only while this replica holds the lease
//! and its last successful renew is younger than the renew deadline, which
//! is shorter than the TTL stored in the record: a leader that cannot renew
//! (NATS unreachable, CAS lost) stops writing before anyone may take over.
//! The gate is the efficiency and safety gate, not the only safety net:
//! every ConfigMap write is also fenced on resourceVersion and cursor
//! (invariant 2), so a leader that was paused past its deadline and wakes up
//! before noticing cannot regress content.
//!
//! Standbys watch the lease key. A release (CAS delete, on SIGTERM) makes
//! them try at once, so a graceful handover takes milliseconds; a live
//! record schedules an attempt at its expiry, so a crashed leader is
//! replaced within the TTL. A poll every renew interval backs the watch up.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::{Args, builder::BoolishValueParser};
use futures::StreamExt;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    cmd::parse_duration,
    kv::{
        KvError, KvStore, KvUpdate, WatchEvent,
        filter::validate_key,
        lease::{Lease, LeaseConfig, LeaseError, LeaseRecord, unix_ms},
        nats::{BucketConfig, ConnectOptions, NatsBucket, NatsKv},
    },
};

pub type Result<T, E = LeaderError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid leader election settings: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// Leader election flags of `slipstream run`.
#[derive(Args, Clone, Debug)]
pub struct LeaderArgs {
    /// Elect one writing replica with a lease in NATS KV. Required when more
    /// than one replica runs; when off, this replica always writes.
    #[arg(
        long = "leader-election",
        env = "SLIPSTREAM_LEADER_ELECTION",
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub enabled: bool,
    /// KV bucket holding the lease record (created with history 1 when missing).
    #[arg(
        long = "lease-bucket",
        env = "SLIPSTREAM_LEASE_BUCKET",
        default_value = "slipstream-leases"
    )]
    pub bucket: String,
    /// Lease key [default: `<release-name>.leader`].
    #[arg(long = "lease-key", env = "SLIPSTREAM_LEASE_KEY")]
    pub key: Option<String>,
    /// Name of this installation; its replicas share one lease.
    #[arg(
        long = "release-name",
        env = "SLIPSTREAM_RELEASE_NAME",
        default_value = "slipstream"
    )]
    pub release_name: String,
    /// How long a lease record stays valid after its last renew; a crashed
    /// leader is replaced within this time.
    #[arg(long = "lease-ttl", env = "SLIPSTREAM_LEASE_TTL", default_value = "15s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// How often the leader renews its lease (standbys poll as often).
    #[arg(long = "lease-renew", env = "SLIPSTREAM_LEASE_RENEW", default_value = "5s", value_parser = parse_duration)]
    pub renew: Duration,
    /// Holder identity written into the lease [default: env POD_NAME, else `<hostname>-<pid>`].
    #[arg(long = "identity", env = "SLIPSTREAM_IDENTITY")]
    pub identity: Option<String>,
}

impl Default for LeaderArgs {
    fn default() -> Self {
        Self {
            enabled: false,
            bucket: "slipstream-leases".to_owned(),
            key: None,
            release_name: "slipstream".to_owned(),
            ttl: Duration::from_secs(15),
            renew: Duration::from_secs(5),
            identity: None,
        }
    }
}

impl LeaderArgs {
    /// The lease key: `--lease-key`, else `<release-name>.leader`.
    pub fn lease_key(&self) -> String {
        match &self.key {
            Some(k) if !k.is_empty() => k.clone(),
            _ => format!("{}.leader", self.release_name),
        }
    }

    /// `--identity`, else env `POD_NAME`, else `<hostname>-<pid>`.
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .filter(|i| !i.trim().is_empty())
            .or_else(|| std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()))
            .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()))
    }

    /// The lease timing for `--lease-ttl` and `--lease-renew`: the holder
    /// trusts a renew for halfway between the renew interval and the TTL
    /// (10 s for 15 s / 5 s), leaving the rest as margin for clock skew and
    /// a write already in flight.
    pub fn lease_config(&self) -> Result<LeaseConfig> {
        lease_config(self.ttl, self.renew)
    }

    /// Everything [`LeaderElection::start`] needs, checked.
    pub fn election_config(&self) -> Result<ElectionConfig> {
        let key = self.lease_key();
        validate_key(&key).map_err(|e| {
            LeaderError::InvalidConfig(format!("--lease-key / --release-name: {e}"))
        })?;
        if !self
            .bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || self.bucket.is_empty()
        {
            return Err(LeaderError::InvalidConfig(format!(
                "--lease-bucket {:?}: use 1+ of [a-zA-Z0-9_-]",
                self.bucket
            )));
        }
        Ok(ElectionConfig {
            key,
            identity: self.identity(),
            lease: self.lease_config()?,
        })
    }
}

/// See [`LeaderArgs::lease_config`].
pub fn lease_config(ttl: Duration, renew: Duration) -> Result<LeaseConfig> {
    if renew.is_zero() || renew >= ttl {
        return Err(LeaderError::InvalidConfig(format!(
            "--lease-renew ({renew:?}) must be above zero and shorter than --lease-ttl ({ttl:?})"
        )));
    }
    let config = LeaseConfig {
        ttl,
        renew_deadline: renew + (ttl - renew) / 2,
        renew_interval: renew,
        retry_interval: (renew / 4).max(Duration::from_millis(20)),
    };
    config
        .validate()
        .map_err(|e| LeaderError::InvalidConfig(e.to_string()))?;
    Ok(config)
}

fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "slipstream".to_owned())
}

/// Which lease this replica contends for, as whom, with what timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    pub key: String,
    pub identity: String,
    pub lease: LeaseConfig,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// `leader` or `standby`.
    pub to: String,
}

/// Leader election metrics; register them once with [`LeaderMetrics::register`].
#[derive(Clone, Default)]
pub struct LeaderMetrics {
    /// 1 while this replica may write.
    pub is_leader: Gauge,
    /// Changes of this replica's role.
    pub transitions: Family<TransitionLabels, Counter>,
    /// Renews that failed without losing the lease (NATS slow or unreachable).
    pub renew_failures: Counter,
}

impl LeaderMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "is_leader",
            "Whether this replica holds the lease and may write (1) or not (0)",
            self.is_leader.clone(),
        );
        registry.register(
            "lease_transitions",
            "Changes of this replica's role, by the role it moved to",
            self.transitions.clone(),
        );
        registry.register(
            "lease_renew_failures",
            "Lease renewals that failed without an answer (NATS slow or unreachable)",
            self.renew_failures.clone(),
        );
    }

    /// Transitions into `to` (`leader` or `standby`) so far.
    pub fn transitions_to(&self, to: &str) -> u64 {
        self.transitions
            .get(&TransitionLabels { to: to.to_owned() })
            .map(|c| c.get())
            .unwrap_or(0)
    }
}

/// This replica's part in the election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Election off: this replica always writes.
    Disabled,
    /// Waiting for the lease bucket or the first attempt.
    Starting,
    Standby,
    Leader,
}

/// What `/readyz` and logs need to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderStatus {
    pub role: Role,
    /// The holder last seen in the lease record (`None`: free or unknown).
    pub holder: Option<String>,
    /// The last lease operation's failure; cleared by the next success.
    pub error: Option<String>,
}

impl LeaderStatus {
    /// `Ok` for a working leader and for a standby; an error for a leader
    /// that cannot renew and for any replica that cannot reach the lease.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        match (self.role, &self.error) {
            (Role::Disabled, _) => Ok(()),
            (Role::Leader, Some(e)) => Err(format!(
                "leader cannot renew its lease (writes stop at the renew deadline): {e}"
            )),
            (_, Some(e)) => Err(format!("lease unreachable: {e}")),
            (Role::Starting, None) => Err("leader election starting".to_owned()),
            (Role::Standby | Role::Leader, None) => Ok(()),
        }
    }
}

/// State shared by the election tasks and the handle.
struct Shared {
    config: ElectionConfig,
    gate: watch::Sender<bool>,
    status: watch::Sender<LeaderStatus>,
    metrics: LeaderMetrics,
    /// Set on shutdown: the gate never opens again.
    stopping: AtomicBool,
}

impl Shared {
    /// Opens or closes the gate; logs and counts a change.
    fn set_gate(&self, leader: bool) {
        let changed = self.gate.send_if_modified(|g| {
            let want = leader && !self.stopping.load(Ordering::SeqCst);
            std::mem::replace(g, want) != want
        });
        if !changed {
            return;
        }
        let now_leader = *self.gate.borrow();
        let to = if now_leader { "leader" } else { "standby" };
        self.metrics.is_leader.set(i64::from(now_leader));
        self.metrics
            .transitions
            .get_or_create(&TransitionLabels { to: to.to_owned() })
            .inc();
        self.status.send_modify(|s| {
            s.role = if now_leader {
                Role::Leader
            } else {
                Role::Standby
            };
            if now_leader {
                s.holder = Some(self.config.identity.clone());
            }
        });
        if now_leader {
            info!(identity = %self.config.identity, key = %self.config.key, "leadership acquired: this replica writes");
        } else {
            warn!(identity = %self.config.identity, key = %self.config.key, "leadership lost or given up: this replica stopped writing");
        }
    }

    fn set_error(&self, error: Option<String>) {
        self.status.send_if_modified(|s| {
            let changed = s.error != error;
            s.error = error;
            if s.role == Role::Starting {
                s.role = Role::Standby;
                return true;
            }
            changed
        });
    }

    fn set_holder(&self, holder: Option<String>) {
        self.status.send_if_modified(|s| {
            let changed = s.holder != holder;
            s.holder = holder;
            changed
        });
    }
}

/// Where the election finds its lease bucket.
enum Source {
    /// Connect, then open (or create, history 1) this bucket, retrying
    /// until NATS answers. The lease has its own connection.
    Nats {
        opts: Box<ConnectOptions>,
        bucket: String,
    },
    Store(Arc<dyn KvStore>),
}

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
    /// Starts the election `args` describe, or a fixed leader when
    /// `--leader-election` is off. Must be called inside a Tokio runtime.
    /// NATS errors do not fail the start: the election retries and
    /// reports them through [`status`](Self::status).
    pub fn start(args: &LeaderArgs, opts: ConnectOptions, metrics: LeaderMetrics) -> Result<Self> {
        if !args.enabled {
            return Ok(Self::disabled(metrics));
        }
        let config = args.election_config()?;
        Ok(Self::spawn(
            config,
            Source::Nats {
                opts: Box::new(opts),
                bucket: args.bucket.clone(),
            },
            metrics,
        ))
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
        metrics.is_leader.set(1);
        let (gate_tx, gate) = watch::channel(true);
        let (status_tx, status) = watch::channel(LeaderStatus {
            role: Role::Disabled,
            holder: None,
            error: None,
        });
        let (stop, _) = watch::channel(false);
        Self {
            shared: Arc::new(Shared {
                config: ElectionConfig {
                    key: String::new(),
                    identity: String::new(),
                    lease: LeaseConfig::default(),
                },
                gate: gate_tx,
                status: status_tx,
                metrics,
                stopping: AtomicBool::new(false),
            }),
            gate,
            status,
            stop,
            task: None,
        }
    }

    fn spawn(config: ElectionConfig, source: Source, metrics: LeaderMetrics) -> Self {
        metrics.is_leader.set(0);
        let (gate_tx, gate) = watch::channel(false);
        let (status_tx, status) = watch::channel(LeaderStatus {
            role: Role::Starting,
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
        info!(
            identity = %shared.config.identity,
            key = %shared.config.key,
            ttl = ?shared.config.lease.ttl,
            renew = ?shared.config.lease.renew_interval,
            "leader election started"
        );
        let task = tokio::spawn(run(shared.clone(), source, stop_rx));
        Self {
            shared,
            gate,
            status,
            stop,
            task: Some(task),
        }
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
    pub fn readiness(&self) -> std::result::Result<(), String> {
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

/// What the lease key watch tells the election loop.
#[derive(Debug)]
enum Hint {
    /// The key was released or removed: try now.
    Free,
    /// Somebody holds it until this instant.
    Held { holder: String, until: Instant },
}

/// The instant at which a record expiring at `expires_at_ms` (wall clock) may be taken.
fn instant_at(expires_at_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(expires_at_ms.saturating_sub(unix_ms()) + 1)
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The election loop: open the bucket, then acquire / renew until stopped,
/// then release.
async fn run(shared: Arc<Shared>, source: Source, mut stop: watch::Receiver<bool>) {
    let Some(store) = open_store(&shared, source, &mut stop).await else {
        return;
    };
    let lease = match Lease::new(
        store.clone(),
        shared.config.key.clone(),
        shared.config.identity.clone(),
        shared.config.lease,
    ) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            warn!(error = %e, "leader election cannot start");
            shared.set_error(Some(e.to_string()));
            return;
        }
    };
    let guard = tokio::spawn(guard(lease.clone(), shared.clone(), stop.clone()));
    let (hint_tx, mut hints) = mpsc::channel(64);
    let watcher = tokio::spawn(watch_key(
        store,
        shared.config.key.clone(),
        shared.config.lease.renew_interval,
        hint_tx,
        stop.clone(),
    ));
    let cfg = shared.config.lease;
    let mut next = Instant::now();
    // Expiry of the record another replica holds, as last seen by the watch.
    let mut held_until: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            Some(hint) = hints.recv() => match hint {
                Hint::Free => {
                    held_until = None;
                    shared.set_holder(None);
                    if !lease.is_held() {
                        next = Instant::now();
                    }
                }
                Hint::Held { holder, until } => {
                    if holder != shared.config.identity {
                        if lease.is_held() {
                            // Someone else wrote our key: the next renew fails its CAS.
                            next = Instant::now();
                        } else {
                            held_until = Some(until);
                            next = next.min(until);
                        }
                    }
                    shared.set_holder(Some(holder));
                }
            },
            () = tokio::time::sleep_until(next) => {
                let outcome = tokio::select! {
                    () = stopped(&mut stop) => break,
                    o = attempt(&lease, &shared) => o,
                };
                let now = Instant::now();
                next = match outcome {
                    Outcome::Leader => now + cfg.renew_interval,
                    Outcome::Standby => {
                        let poll = now + cfg.renew_interval;
                        match held_until.filter(|t| *t > now) {
                            Some(t) => t.min(poll),
                            None => poll,
                        }
                    }
                    Outcome::Again => now,
                    Outcome::Failed => now + cfg.retry_interval,
                };
            }
        }
    }
    shared.stopping.store(true, Ordering::SeqCst);
    shared.set_gate(false);
    let _ = guard.await;
    watcher.abort();
    let held = lease.valid_until().is_some();
    match lease.release().await {
        Ok(()) if held => info!(key = %shared.config.key, "lease released"),
        Ok(()) => {}
        Err(e) => {
            warn!(key = %shared.config.key, error = %e, "lease release failed; it expires after its TTL")
        }
    }
}

enum Outcome {
    Leader,
    Standby,
    /// Lost just now: look again at once.
    Again,
    Failed,
}

async fn attempt(lease: &Lease, shared: &Shared) -> Outcome {
    if lease.is_held() {
        match lease.renew().await {
            Ok(()) => {
                shared.set_error(None);
                Outcome::Leader
            }
            Err(e @ (LeaseError::Lost { .. } | LeaseError::NotHeld { .. })) => {
                warn!(key = %shared.config.key, reason = e.reason(), error = %e, "lease lost");
                shared.set_gate(false);
                shared.set_error(None);
                Outcome::Again
            }
            Err(e) => {
                shared.metrics.renew_failures.inc();
                warn!(key = %shared.config.key, reason = e.reason(), error = %e, "lease renew failed; retrying until the renew deadline");
                shared.set_error(Some(e.to_string()));
                Outcome::Failed
            }
        }
    } else {
        match lease.try_acquire().await {
            Ok(true) => {
                shared.set_error(None);
                Outcome::Leader
            }
            Ok(false) => {
                shared.set_error(None);
                Outcome::Standby
            }
            Err(e) => {
                debug!(key = %shared.config.key, error = %e, "lease acquire failed");
                shared.set_error(Some(e.to_string()));
                Outcome::Failed
            }
        }
    }
}

/// Keeps the gate equal to the lease's holding state, and closes it when
/// the renew deadline passes even while a renew call is still hanging.
async fn guard(lease: Arc<Lease>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut held_rx = lease.subscribe();
    loop {
        held_rx.borrow_and_update();
        // is_held() also checks the deadline, so a renew that succeeded too
        // late never opens the gate.
        shared.set_gate(lease.is_held());
        let deadline = lease.valid_until();
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return,
            changed = held_rx.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                if !lease.is_held() {
                    warn!(key = %shared.config.key, "renew deadline passed without a successful renew: stopped writing");
                    shared.set_gate(false);
                    shared.set_error(Some(
                        "the renew deadline passed without a successful renew".to_owned(),
                    ));
                }
            }
        }
    }
}

/// Forwards changes of the lease key as hints; re-opens the watch after errors.
async fn watch_key(
    store: Arc<dyn KvStore>,
    key: String,
    backoff: Duration,
    hints: mpsc::Sender<Hint>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let opened = tokio::select! {
            () = stopped(&mut stop) => return,
            s = store.watch_prefix(&key) => s,
        };
        match opened {
            Ok(mut stream) => loop {
                let event = tokio::select! {
                    () = stopped(&mut stop) => return,
                    e = stream.next() => e,
                };
                let update = match event {
                    Some(Ok(WatchEvent::Update(u))) if u.key() == key => u,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        debug!(key = %key, error = %e, "lease watch failed; re-opening");
                        break;
                    }
                    None => break,
                };
                let hint = match update {
                    KvUpdate::Put(e) => match LeaseRecord::parse(&e.value) {
                        Ok(r) => Hint::Held {
                            holder: r.holder,
                            until: instant_at(r.expires_at_ms),
                        },
                        // Unparseable records are taken over at once.
                        Err(_) => Hint::Free,
                    },
                    KvUpdate::Delete { .. } | KvUpdate::Purge { .. } => Hint::Free,
                };
                if hints.send(hint).await.is_err() {
                    return;
                }
            },
            Err(e) => debug!(key = %key, error = %e, "cannot watch the lease key"),
        }
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(backoff) => {}
        }
    }
}

async fn connect_and_open(
    nats: &mut Option<NatsKv>,
    opts: &ConnectOptions,
    config: &BucketConfig,
) -> Result<NatsBucket, KvError> {
    let kv = match nats {
        Some(kv) => kv.clone(),
        None => {
            let kv = NatsKv::connect(opts).await?;
            *nats = Some(kv.clone());
            kv
        }
    };
    kv.create_or_open(config).await
}

/// Opens the lease bucket, retrying until it answers or the election stops.
async fn open_store(
    shared: &Shared,
    source: Source,
    stop: &mut watch::Receiver<bool>,
) -> Option<Arc<dyn KvStore>> {
    let (opts, bucket) = match source {
        Source::Store(store) => return Some(store),
        Source::Nats { opts, bucket } => (opts, bucket),
    };
    let mut config = BucketConfig::new(bucket.clone());
    config.history = 1;
    let mut nats: Option<NatsKv> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let opened = tokio::select! {
            () = stopped(stop) => return None,
            b = connect_and_open(&mut nats, &opts, &config) => b,
        };
        match opened {
            Ok(b) => return Some(Arc::new(b)),
            Err(e) => {
                warn!(bucket = %bucket, error = %e, "cannot open the lease bucket; retrying");
                shared.set_error(Some(format!("lease bucket {bucket:?}: {e}")));
            }
        }
        tokio::select! {
            () = stopped(stop) => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(shared.config.lease.renew_interval);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        leader: LeaderArgs,
    }

    fn parse(args: &[&str]) -> std::result::Result<LeaderArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("slipstream").chain(args.iter().copied()))
            .map(|c| c.leader)
    }

    #[test]
    fn flags_default_to_an_election_off_with_15s_ttl_and_5s_renew() {
        let a = parse(&[]).unwrap();
        assert!(!a.enabled);
        assert_eq!(a.bucket, "slipstream-leases");
        assert_eq!(a.lease_key(), "slipstream.leader");
        let c = a.lease_config().unwrap();
        assert_eq!(c.ttl, Duration::from_secs(15));
        assert_eq!(c.renew_interval, Duration::from_secs(5));
        assert_eq!(c.renew_deadline, Duration::from_secs(10));
    }

    #[test]
    fn leader_election_flag_accepts_bare_and_explicit_values() {
        assert!(parse(&["--leader-election"]).unwrap().enabled);
        assert!(parse(&["--leader-election=true"]).unwrap().enabled);
        assert!(!parse(&["--leader-election=false"]).unwrap().enabled);
        assert!(parse(&["--leader-election=maybe"]).is_err());
    }

    #[test]
    fn lease_key_derives_from_the_release_name_unless_given() {
        let a = parse(&["--release-name", "prod"]).unwrap();
        assert_eq!(a.lease_key(), "prod.leader");
        let a = parse(&["--release-name", "prod", "--lease-key", "custom"]).unwrap();
        assert_eq!(a.lease_key(), "custom");
    }

    #[test]
    fn explicit_identity_wins_and_the_fallback_is_never_empty() {
        let a = parse(&["--identity", "pod-7"]).unwrap();
        assert_eq!(a.identity(), "pod-7");
        let a = LeaderArgs::default();
        assert!(!a.identity().is_empty());
    }

    #[test]
    fn renew_must_be_shorter_than_ttl_and_the_deadline_lies_between() {
        let c = lease_config(Duration::from_secs(2), Duration::from_millis(500)).unwrap();
        assert!(c.renew_interval < c.renew_deadline && c.renew_deadline < c.ttl);
        assert_eq!(c.renew_deadline, Duration::from_millis(1250));
        assert!(lease_config(Duration::from_secs(5), Duration::from_secs(5)).is_err());
        assert!(lease_config(Duration::from_secs(5), Duration::ZERO).is_err());
        assert!(parse(&["--lease-ttl", "soon"]).is_err());
    }

    #[test]
    fn bad_keys_and_bucket_names_are_clear_errors() {
        let a = parse(&["--release-name", "has space"]).unwrap();
        let e = a.election_config().unwrap_err().to_string();
        assert!(e.contains("--lease-key"), "{e}");
        let a = parse(&["--lease-bucket", "a.b"]).unwrap();
        let e = a.election_config().unwrap_err().to_string();
        assert!(e.contains("--lease-bucket"), "{e}");
    }

    #[test]
    fn readiness_fails_only_for_a_failing_leader_or_an_unreachable_lease() {
        let s = |role, error: Option<&str>| LeaderStatus {
            role,
            holder: None,
            error: error.map(str::to_owned),
        };
        assert!(s(Role::Standby, None).readiness().is_ok());
        assert!(s(Role::Leader, None).readiness().is_ok());
        assert!(s(Role::Disabled, Some("x")).readiness().is_ok());
        assert!(s(Role::Starting, None).readiness().is_err());
        let e = s(Role::Leader, Some("timed out")).readiness().unwrap_err();
        assert!(e.contains("cannot renew"), "{e}");
        assert!(s(Role::Standby, Some("timed out")).readiness().is_err());
    }

    #[test]
    fn metrics_register_under_their_names() {
        let m = LeaderMetrics::default();
        let mut r = Registry::with_prefix("slipstream");
        m.register(&mut r);
        m.is_leader.set(1);
        m.transitions
            .get_or_create(&TransitionLabels {
                to: "leader".into(),
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(text.contains("slipstream_is_leader 1"), "{text}");
        assert!(
            text.contains("slipstream_lease_transitions_total{to=\"leader\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("slipstream_lease_renew_failures_total"),
            "{text}"
        );
        assert_eq!(m.transitions_to("leader"), 1);
    }
}
