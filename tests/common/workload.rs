//! The workloads tests and benchmarks roll: a minimal valid apps/v1 object.

use serde_json::{Value, json};

/// A minimal valid workload `kind` (Deployment, StatefulSet, DaemonSet)
/// named `name`: one busybox container, selector and labels `app: name`.
pub fn workload_json(kind: &str, name: &str) -> Value {
    let mut spec = json!({
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "app", "image": WORKLOAD_IMAGE}]},
        },
    });
    if kind != "DaemonSet" {
        spec["replicas"] = json!(1);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// The image of [`workload_json`]'s container.
pub const WORKLOAD_IMAGE: &str = "busybox:1.36";
