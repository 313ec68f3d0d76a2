//! Prometheus metrics of the operator, served on `/metrics`.
//!
//! The parts: this module (the operator's metrics and the registry they
//! live in), [`exposition`] (OpenMetrics or classic text, by `Accept`),
//! [`http`] (the `/metrics`, `/healthz`, `/readyz` listener), [`process`]
//! (CPU, memory, fds from `/proc/self`), [`api_client`] (Kubernetes API
//! requests by verb and code), [`sync`] (`slipstream sync`'s own).

pub mod api_client;
pub mod exposition;
pub mod http;
pub mod process;
pub mod sync;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub use api_client::ApiClientMetrics;
pub use exposition::{Exposition, Format};

use crate::{crd::Condition, reason::Reason};

/// Condition types a binding reports (`slipstream_binding_condition`).
const CONDITION_TYPES: [&str; 3] = ["Ready", "Reconciling", "Stalled"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub binding: String,
    /// `Ready`, `Reconciling` or `Stalled`.
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    /// The Rust target the binary was built for (`x86_64-linux`, ...).
    pub target: String,
}

/// A registry with what every slipstream process exports: the process
/// metrics (unprefixed, as client libraries name them) and
/// `slipstream_build_info`. Register the rest under the `slipstream`
/// prefix with `registry.sub_registry_with_prefix("slipstream")`.
pub fn base_registry() -> Registry {
    let mut root = Registry::default();
    root.register_collector(Box::new(process::ProcessCollector));
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        })
        .set(1);
    root.sub_registry_with_prefix("slipstream").register(
        "build_info",
        "Always 1; the labels say which slipstream build runs",
        build,
    );
    root
}

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
    exposition: Exposition,
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
    /// Writes of new and deleted bindings (finalizer, first ConfigMap
    /// write, cleanup) put off because live bindings' data held the API.
    pub deferred_churn_writes: Counter,
    /// Seconds from receiving a KV update to the ConfigMap write that contains it.
    pub propagation_seconds: Histogram,
    /// NATS consumers (watches) open right now.
    pub open_watches: Gauge,
    /// 1 while the binding is Ready, else 0.
    pub ready: Family<BindingLabels, Gauge>,
    /// 1 per condition type whose status is True, else 0.
    pub conditions: Family<ConditionLabels, Gauge>,
    /// Leader election: is_leader, lease transitions, renew failures.
    pub leader: crate::leader::LeaderMetrics,
    /// Requests of the Kubernetes client built with [`ApiClientMetrics::layer`].
    pub api: ApiClientMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = base_registry();
        let registry = root.sub_registry_with_prefix("slipstream");
        let applied_cursor = Family::<BindingLabels, Gauge>::default();
        let lag_revisions = Family::<BindingLabels, Gauge>::default();
        let writes = Family::<BindingLabels, Counter>::default();
        let errors = Family::<ReasonLabels, Counter>::default();
        let delivered = Family::<DeliveryLabels, Counter>::default();
        let rollouts_triggered = Family::<BindingLabels, Counter>::default();
        let rollouts_coalesced = Family::<BindingLabels, Counter>::default();
        let dropped_writes = Counter::default();
        let deferred_status_writes = Counter::default();
        let deferred_churn_writes = Counter::default();
        let propagation_seconds = Histogram::new([
            0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let open_watches = Gauge::default();
        let ready = Family::<BindingLabels, Gauge>::default();
        let conditions = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "binding_ready",
            "Whether the binding's Ready condition is True (1) or not (0)",
            ready.clone(),
        );
        registry.register(
            "binding_condition",
            "Whether the binding's condition of this type is True (1) or not (0)",
            conditions.clone(),
        );
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
            "churn_writes_deferred",
            "Writes of new and deleted bindings (finalizer, first ConfigMap write, cleanup) \
             put off because live bindings' ConfigMap writes held a quarter of the API concurrency",
            deferred_churn_writes.clone(),
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
        leader.register(registry);
        let api = ApiClientMetrics::default();
        api.register(registry);
        Self {
            exposition: Exposition::new(root),
            applied_cursor,
            lag_revisions,
            writes,
            errors,
            delivered,
            rollouts_triggered,
            rollouts_coalesced,
            dropped_writes,
            deferred_status_writes,
            deferred_churn_writes,
            propagation_seconds,
            open_watches,
            ready,
            conditions,
            leader,
            api,
        }
    }

    /// Mirrors a binding's conditions into `binding_ready` and
    /// `binding_condition`.
    pub fn set_conditions(&self, labels: &BindingLabels, conditions: &[Condition]) {
        let is_true = |t: &str| {
            conditions
                .iter()
                .any(|c| c.type_ == t && c.status == "True")
        };
        self.ready
            .get_or_create(labels)
            .set(i64::from(is_true("Ready")));
        for t in CONDITION_TYPES {
            self.conditions
                .get_or_create(&condition_labels(labels, t))
                .set(i64::from(is_true(t)));
        }
    }

    /// Drops every series labelled with this binding (it was deleted).
    pub fn forget_binding(&self, namespace: &str, binding: &str) {
        let labels = BindingLabels {
            namespace: namespace.to_owned(),
            binding: binding.to_owned(),
        };
        self.applied_cursor.remove(&labels);
        self.lag_revisions.remove(&labels);
        self.writes.remove(&labels);
        self.rollouts_triggered.remove(&labels);
        self.rollouts_coalesced.remove(&labels);
        self.ready.remove(&labels);
        for t in CONDITION_TYPES {
            self.conditions.remove(&condition_labels(&labels, t));
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
        binding_count(&self.writes, namespace, binding)
    }

    /// Workload rollouts one binding wrote so far.
    pub fn rollout_count(&self, namespace: &str, binding: &str) -> u64 {
        binding_count(&self.rollouts_triggered, namespace, binding)
    }

    /// Content changes of one binding coalesced away so far.
    pub fn coalesced_count(&self, namespace: &str, binding: &str) -> u64 {
        binding_count(&self.rollouts_coalesced, namespace, binding)
    }

    /// The registry, to serve or encode.
    pub fn exposition(&self) -> Exposition {
        self.exposition.clone()
    }

    /// The exposition in OpenMetrics text.
    pub fn encode(&self) -> String {
        self.exposition.encode(Format::OpenMetrics)
    }
}

fn condition_labels(labels: &BindingLabels, type_: &str) -> ConditionLabels {
    ConditionLabels {
        namespace: labels.namespace.clone(),
        binding: labels.binding.clone(),
        r#type: type_.to_owned(),
    }
}

/// One binding's count in a per-binding counter family.
fn binding_count(family: &Family<BindingLabels, Counter>, namespace: &str, binding: &str) -> u64 {
    family
        .get(&BindingLabels {
            namespace: namespace.to_owned(),
            binding: binding.to_owned(),
        })
        .map(|c| c.get())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::new();
        m.error(Reason::TooLarge);
        m.delivered("app", "shared", 3);
        let text = m.encode();
        for name in [
            "slipstream_errors_total{reason=\"TooLarge\"} 1",
            "slipstream_kv_updates_delivered_total{bucket=\"app\",source=\"shared\"} 3",
            "slipstream_dropped_writes_total",
            "slipstream_status_writes_deferred_total",
            "slipstream_propagation_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert_eq!(m.delivered_count("app", "shared"), 3);
    }

    fn condition(type_: &str, status: &str) -> Condition {
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: "R".to_owned(),
            ..Condition::default()
        }
    }

    #[test]
    fn binding_series_come_and_go_with_the_binding() {
        let m = Metrics::new();
        let web = BindingLabels {
            namespace: "shop".into(),
            binding: "web".into(),
        };
        m.writes.get_or_create(&web).inc();
        m.applied_cursor.get_or_create(&web).set(7);
        m.set_conditions(
            &web,
            &[condition("Ready", "True"), condition("Stalled", "False")],
        );
        let text = m.encode();
        for line in [
            "slipstream_binding_ready{namespace=\"shop\",binding=\"web\"} 1",
            "slipstream_binding_condition{namespace=\"shop\",binding=\"web\",type=\"Ready\"} 1",
            "slipstream_binding_condition{namespace=\"shop\",binding=\"web\",type=\"Stalled\"} 0",
            "slipstream_build_info{version=",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        m.forget_binding("shop", "web");
        let text = m.encode();
        assert!(!text.contains("binding=\"web\""), "{text}");
    }
}
