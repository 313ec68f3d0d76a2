//! `spec.target.rollout`: the workloads that consume the binding's
//! ConfigMap and are rolled when its content changes, and what status
//! reports about them.
//!
//! A workload is named by kind and name only: it is always in the
//! binding's own namespace. The item schema keeps unknown fields (instead
//! of letting the API server prune them silently) and the operator refuses
//! them, so `namespace: other` is refused loudly (Ready False `InvalidSpec`
//! naming the field) rather than turned into a same-named workload here.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default of `minInterval`.
pub const DEFAULT_MIN_INTERVAL: &str = "30s";
/// Most workloads one binding may roll.
pub const MAX_ROLLOUT_WORKLOADS: usize = 32;

/// Roll workloads when the ConfigMap's content changes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Deployments, StatefulSets and DaemonSets in the binding's namespace.
    /// Each gets the pod-template annotation
    /// `slipstream.io/config-digest-<binding>` set to a digest of the
    /// content, so Kubernetes rolls it the normal way (strategy,
    /// maxUnavailable and PodDisruptionBudgets apply).
    #[schemars(
        length(min = 1, max = 32),
        extend(
            "x-kubernetes-list-type" = "map",
            "x-kubernetes-list-map-keys" = ["kind", "name"]
        )
    )]
    pub workloads: Vec<WorkloadRef>,
    /// Least time between two rollouts of one workload (`30s`, `2m`, `1m 30s`).
    /// Changes in between are coalesced; the last content always gets its
    /// rollout when the interval ends.
    #[serde(default = "default_min_interval")]
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^([0-9]+(ms|s|m|h) ?)+$"))]
    pub min_interval: String,
}

fn default_min_interval() -> String {
    DEFAULT_MIN_INTERVAL.to_owned()
}

/// A workload in the binding's namespace, by kind and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    /// The workload's name (DNS-1123 subdomain).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// The workload kinds (group `apps/v1`) a binding may roll.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }

    /// The resource name under `apps/v1`.
    pub const fn plural(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "deployments",
            WorkloadKind::StatefulSet => "statefulsets",
            WorkloadKind::DaemonSet => "daemonsets",
        }
    }
}

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last rollout of one workload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub kind: WorkloadKind,
    pub name: String,
    /// The content digest set on the pod template.
    pub digest: String,
    /// When it was set (RFC 3339).
    pub time: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_reads_with_its_default_interval_and_refuses_a_namespace() {
        let r: Rollout =
            serde_yaml::from_str("workloads: [{kind: Deployment, name: web}]\n").unwrap();
        assert_eq!(r.min_interval, "30s");
        assert_eq!(r.workloads[0].kind, WorkloadKind::Deployment);
        let err = serde_yaml::from_str::<Rollout>(
            "workloads: [{kind: Deployment, name: web, namespace: other}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `namespace`"), "{err}");
        assert!(serde_yaml::from_str::<Rollout>("workloads: [{kind: Pod, name: web}]\n").is_err());
    }
}
