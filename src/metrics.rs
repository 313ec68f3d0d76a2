//! Prometheus metrics of the operator, served on `/metrics`.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::reason::Reason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BindingLabels {
    pub namespace: String,
    pub binding: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub bucket: String,
    /// `shared` (the bucket's one live watch) or `catchup` (the bucket's
    /// catch-up scans: a state-sync or resume shared by the bindings that
    /// asked together).
    pub source: String,
}

/// Every metric the operator exports. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Applied cursor per binding (the revision in its ConfigMap annotation).
    pub applied_cursor: Family<BindingLabels, Gauge>,
    /// Revisions the binding's ConfigMap is behind the newest revision seen on its bucket.
    pub lag_revisions: Family<BindingLabels, Gauge>,
    /// ConfigMap writes.
    pub writes: Family<BindingLabels, Counter>,
    /// Errors by reason word.
    pub errors: Family<ReasonLabels, Counter>,
    /// KV updates received from NATS, by bucket and watch kind.
    pub delivered: Family<DeliveryLabels, Counter>,
    /// Workload rollouts written (`target.rollout`).
    pub rollouts_triggered: Family<BindingLabels, Counter>,
    /// Content changes that got no rollout of their own (coalesced into a later one).
    pub rollouts_coalesced: Family<BindingLabels, Counter>,
    /// Writes a standby (not leader) skipped.
    pub dropped_writes: Counter,
    /// Status writes put off because ConfigMap writes held the API.
    pub deferred_status_writes: Counter,
    /// Seconds from receiving a KV update to the ConfigMap write that contains it.
    pub propagation_seconds: Histogram,
    /// NATS consumers (watches) open right now.
    pub open_watches: Gauge,
    /// Leader election: is_leader, lease transitions, renew failures.
    pub leader: crate::leader::LeaderMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slipstream");
        let applied_cursor = Family::<BindingLabels, Gauge>::default();
        let lag_revisions = Family::<BindingLabels, Gauge>::default();
        let writes = Family::<BindingLabels, Counter>::default();
        let errors = Family::<ReasonLabels, Counter>::default();
        let delivered = Family::<DeliveryLabels, Counter>::default();
        let rollouts_triggered = Family::<BindingLabels, Counter>::default();
        let rollouts_coalesced = Family::<BindingLabels, Counter>::default();
        let dropped_writes = Counter::default();
        let deferred_status_writes = Counter::default();
        let propagation_seconds = Histogram::new([
            0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let open_watches = Gauge::default();
        registry.register(
            "binding_applied_cursor",
            "KV revision recorded in the binding's ConfigMap",
            applied_cursor.clone(),
        );
        registry.register(
            "binding_lag_revisions",
            "Revisions between the newest seen on the bucket and the binding's applied cursor",
            lag_revisions.clone(),
        );
        registry.register("configmap_writes", "ConfigMap writes", writes.clone());
        registry.register("errors", "Errors by reason", errors.clone());
        registry.register(
            "rollouts_triggered",
            "Workload rollouts written (the pod-template digest annotation set)",
            rollouts_triggered.clone(),
        );
        registry.register(
            "rollouts_coalesced",
            "Content changes coalesced into a later rollout by minInterval",
            rollouts_coalesced.clone(),
        );
        registry.register(
            "kv_updates_delivered",
            "KV updates received from NATS",
            delivered.clone(),
        );
        registry.register(
            "dropped_writes",
            "Writes skipped because this replica is not the leader",
            dropped_writes.clone(),
        );
        registry.register(
            "status_writes_deferred",
            "Status writes put off because ConfigMap writes held most of the API concurrency",
            deferred_status_writes.clone(),
        );
        registry.register(
            "propagation_seconds",
            "From the KV write (as NATS stored it) to the ConfigMap write containing it; \
             history replayed at startup counts from when it was received",
            propagation_seconds.clone(),
        );
        registry.register(
            "open_watches",
            "NATS watches open now",
            open_watches.clone(),
        );
        let leader = crate::leader::LeaderMetrics::default();
        leader.register(&mut registry);
        Self {
            registry: Arc::new(registry),
            applied_cursor,
            lag_revisions,
            writes,
            errors,
            delivered,
            rollouts_triggered,
            rollouts_coalesced,
            dropped_writes,
            deferred_status_writes,
            propagation_seconds,
            open_watches,
            leader,
        }
    }

    /// Counts an error under its reason word.
    pub fn error(&self, reason: Reason) {
        self.errors
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    pub fn delivered(&self, bucket: &str, source: &str, n: u64) {
        self.delivered
            .get_or_create(&DeliveryLabels {
                bucket: bucket.to_owned(),
                source: source.to_owned(),
            })
            .inc_by(n);
    }

    /// Total KV updates delivered for `bucket` by `source` so far.
    pub fn delivered_count(&self, bucket: &str, source: &str) -> u64 {
        self.delivered
            .get(&DeliveryLabels {
                bucket: bucket.to_owned(),
                source: source.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// ConfigMap writes of one binding so far.
    pub fn write_count(&self, namespace: &str, binding: &str) -> u64 {
        self.writes
            .get(&BindingLabels {
                namespace: namespace.to_owned(),
                binding: binding.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Workload rollouts one binding wrote so far.
    pub fn rollout_count(&self, namespace: &str, binding: &str) -> u64 {
        self.rollouts_triggered
            .get(&BindingLabels {
                namespace: namespace.to_owned(),
                binding: binding.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Content changes of one binding coalesced away so far.
    pub fn coalesced_count(&self, namespace: &str, binding: &str) -> u64 {
        self.rollouts_coalesced
            .get(&BindingLabels {
                namespace: namespace.to_owned(),
                binding: binding.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::new();
        m.error(Reason::TooLarge);
        m.delivered("app", "shared", 3);
        let web = BindingLabels {
            namespace: "shop".into(),
            binding: "web".into(),
        };
        m.rollouts_triggered.get_or_create(&web).inc();
        m.rollouts_coalesced.get_or_create(&web).inc_by(9);
        let text = m.encode();
        for name in [
            "slipstream_errors_total{reason=\"TooLarge\"} 1",
            "slipstream_kv_updates_delivered_total{bucket=\"app\",source=\"shared\"} 3",
            "slipstream_dropped_writes_total",
            "slipstream_status_writes_deferred_total",
            "slipstream_propagation_seconds_bucket",
            "slipstream_rollouts_triggered_total{namespace=\"shop\",binding=\"web\"} 1",
            "slipstream_rollouts_coalesced_total{namespace=\"shop\",binding=\"web\"} 9",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert_eq!(m.delivered_count("app", "shared"), 3);
        assert_eq!(m.rollout_count("shop", "web"), 1);
        assert_eq!(m.coalesced_count("shop", "web"), 9);
    }
}
