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
//!
//! The parts: [`config`] (what an election needs, checked), [`election`]
//! (the handle), `tasks` (the election loop), [`status`] (for `/readyz`),
//! [`metrics`].

pub mod config;
pub mod election;
pub mod metrics;
mod shared;
pub mod status;
mod tasks;

pub use config::{ElectionConfig, LeaderError, Result, lease_bucket, lease_config};
pub use election::LeaderElection;
pub use metrics::{LeaderMetrics, TransitionLabels};
pub use status::{LeaderStatus, NotReady, Role};
