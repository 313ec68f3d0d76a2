//! The state the election tasks and the `LeaderElection` handle share: the
//! gate, the status, the metrics.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    config::ElectionConfig,
    metrics::{LeaderMetrics, TransitionLabels},
    status::{LeaderStatus, Role},
};
use crate::kv::{
    KvStore,
    nats::{BucketConfig, NatsConnector},
};

/// State shared by the election tasks and the handle.
pub(super) struct Shared {
    pub config: ElectionConfig,
    pub gate: watch::Sender<bool>,
    pub status: watch::Sender<LeaderStatus>,
    pub metrics: LeaderMetrics,
    /// Set on shutdown: the gate never opens again.
    pub stopping: AtomicBool,
}

impl Shared {
    /// Opens or closes the gate; logs and counts a change.
    pub fn set_gate(&self, leader: bool) {
        let now_leader = leader && !self.stopping.load(Ordering::SeqCst);
        let changed = self.gate.send_if_modified(|g| {
            if std::mem::replace(g, now_leader) == now_leader {
                return false;
            }
            // the metrics move before the gate is published: whoever sees
            // the gate move also sees them moved
            let to = if now_leader { "leader" } else { "standby" };
            self.metrics.is_leader.set(i64::from(now_leader));
            self.metrics
                .transitions
                .get_or_create(&TransitionLabels { to: to.to_owned() })
                .inc();
            true
        });
        if !changed {
            return;
        }
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
        } else if self.stopping.load(Ordering::SeqCst) {
            // a shutdown (SIGTERM) gives the lease up on purpose
            info!(identity = %self.config.identity, key = %self.config.key, "shutting down: this replica stopped writing");
        } else {
            warn!(identity = %self.config.identity, key = %self.config.key, "leadership lost or given up: this replica stopped writing");
        }
    }

    pub fn set_error(&self, error: Option<String>) {
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

    pub fn set_holder(&self, holder: Option<String>) {
        self.status.send_if_modified(|s| {
            let changed = s.holder != holder;
            s.holder = holder;
            changed
        });
    }
}

/// Where the election finds its lease bucket.
pub(super) enum Source {
    /// Connect, then open (or create with this config) the lease bucket,
    /// retrying until NATS answers. The lease has its own connection.
    Nats {
        connector: Box<NatsConnector>,
        bucket: BucketConfig,
    },
    Store(Arc<dyn KvStore>),
}
