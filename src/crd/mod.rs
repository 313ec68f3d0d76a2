//! The `ConfigBinding` custom resource (`slipstream.io/v1alpha1`): user intent
//! in `spec`, everything the operator observed in `status`.
//!
//! Types only. The schema validation below ends up in the generated
//! `openAPIV3Schema` (checked in under `crds/`), so a real API server rejects
//! malformed bindings before the operator ever sees them; the controller
//! validates again so the emulator and older servers get the same answers.

// several `printcolumn(...)` entries repeat the same keys by design
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod rollout;
pub use rollout::*;

/// Longest NATS bucket name the operator accepts.
pub const MAX_BUCKET_LEN: usize = 64;
/// Most prefixes one binding may serve.
pub const MAX_PREFIXES: usize = 32;
/// Longest prefix the operator accepts.
pub const MAX_PREFIX_LEN: usize = 253;
/// Most skipped keys listed in status (the count is always exact).
pub const MAX_SKIPPED_LISTED: usize = 20;
/// Setting this annotation on a binding to a new value (a timestamp, say)
/// makes it do a full state-sync from KV and rewrite its ConfigMap once;
/// `status.lastForceSync` then holds the value.
pub const FORCE_SYNC_ANNOTATION: &str = "slipstream.io/force-sync";

/// Projects NATS JetStream KV prefixes into a ConfigMap in the binding's namespace.
// kube's printcolumn(...) repeats `type_ =` by design; clippy reads that as a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "slipstream.io",
    version = "v1alpha1",
    kind = "ConfigBinding",
    namespaced,
    status = "ConfigBindingStatus",
    shortname = "cb",
    category = "slipstream",
    doc = "Projects NATS JetStream KV prefixes into a ConfigMap in the binding's namespace.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Bucket", type_ = "string", json_path = ".spec.bucket"),
    printcolumn(name = "Cursor", type_ = "string", json_path = ".status.cursor"),
    printcolumn(name = "Keys", type_ = "integer", json_path = ".status.keys"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].message"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ConfigBindingSpec {
    /// The NATS KV bucket to read (letters, digits, `-` and `_`).
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-zA-Z0-9_-]+$"))]
    pub bucket: String,
    /// Key prefixes served together (plain string prefixes, e.g. `web.`).
    /// When several match one key, the longest wins. No duplicates (a set:
    /// the API server refuses a list naming one prefix twice).
    #[schemars(
        length(min = 1, max = 32),
        inner(length(min = 1, max = 253)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub prefixes: Vec<String>,
    /// Drop the matched prefix from ConfigMap keys. Default false: keys keep
    /// their full KV name, so two prefixes can never produce the same key.
    #[serde(default)]
    pub strip_prefix: bool,
    /// What to do with a KV key that is not a valid ConfigMap key
    /// (`[-._a-zA-Z0-9]+`, at most 253 characters).
    #[serde(default)]
    pub key_policy: KeyPolicy,
    /// The ConfigMap to write, always in the binding's namespace.
    #[serde(default)]
    pub target: Target,
    /// Stop writing (watches stay up); resuming writes the latest content.
    #[serde(default)]
    pub suspend: bool,
}

/// How KV keys that are invalid as ConfigMap keys are handled.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum KeyPolicy {
    /// Escape invalid characters: `_` becomes `__`, any other invalid byte
    /// becomes `_` plus two upper-case hex digits (`/` -> `_2F`, `=` -> `_3D`),
    /// a leading `.` of `.`/`..`-like keys becomes `_2E`. Injective: two
    /// different KV keys never escape to one ConfigMap key.
    #[default]
    Escape,
    /// Leave the key out and list it in `status.skippedKeys`.
    Skip,
    /// Stop syncing the binding (condition `InvalidKey`) until the key is gone.
    Fail,
}

/// The ConfigMap a binding writes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// ConfigMap name (DNS-1123 subdomain). Default: the binding's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: Option<String>,
    /// Labels stamped on the ConfigMap.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations stamped on the ConfigMap.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Owner: create the ConfigMap and own it; refuse one someone else made.
    /// Merge: write only this binding's keys into the ConfigMap, leave others' keys alone.
    #[serde(default)]
    pub creation_policy: CreationPolicy,
    /// What happens to the written keys when the binding is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Workloads (in the binding's namespace) to roll when the ConfigMap's
    /// content changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CreationPolicy {
    /// Create the ConfigMap and own it (controller owner reference).
    #[default]
    Owner,
    /// Write only this binding's keys into the ConfigMap, creating it when missing.
    Merge,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the ConfigMap (Owner) or remove this binding's keys (Merge).
    #[default]
    Delete,
    /// Leave the ConfigMap and its content as they are.
    Retain,
}

/// What the operator observed. Every field is written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigBindingStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Every KV update with a revision <= cursor is in the ConfigMap. Mirrors
    /// the ConfigMap's `slipstream.io/cursor` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Keys written to the ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<i64>,
    /// Bytes of values written (counted as the API server counts them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// When the ConfigMap last reached the KV state (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    /// Number of KV keys left out by `keyPolicy: Skip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_count: Option<i64>,
    /// The first few keys left out by `keyPolicy: Skip`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_keys: Vec<String>,
    /// The `slipstream.io/force-sync` value last carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_force_sync: Option<String>,
    /// Per workload of `target.rollout`: the last content digest rolled and when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["kind", "name"]
    ))]
    pub rollouts: Vec<RolloutStatus>,
    /// `Ready` (content synced), `Reconciling` (working on it) and
    /// `Stalled` (needs a human), with reason words; one of each type;
    /// `Rollout` when `target.rollout` names workloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Reconciling`, `Stalled` or `Rollout`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A reason word (`Synced`, `BucketNotFound`, `TooLarge`, `KeyCollision`, ...).
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl ConfigBinding {
    /// The ConfigMap name this binding writes.
    pub fn target_name(&self) -> String {
        self.spec
            .target
            .name
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }

    /// The `slipstream.io/force-sync` value asked for and not yet carried out.
    pub fn pending_force_sync(&self) -> Option<&str> {
        let asked = self
            .metadata
            .annotations
            .as_ref()?
            .get(FORCE_SYNC_ANNOTATION)?;
        let done = self
            .status
            .as_ref()
            .and_then(|s| s.last_force_sync.as_ref());
        (Some(asked) != done).then_some(asked.as_str())
    }
}

impl ConfigBindingStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// The CRD as YAML, exactly what `slipstream crd` prints and `crds/` holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&ConfigBinding::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crd_matches_the_rust_types() {
        let generated = crd_yaml().unwrap();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/crds/slipstream.io_configbindings.yaml"
        );
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            generated == checked_in,
            "crds/slipstream.io_configbindings.yaml is stale; regenerate it with \
             `cargo run -- crd > crds/slipstream.io_configbindings.yaml`"
        );
    }

    #[test]
    fn schema_carries_the_validation_a_real_api_server_enforces() {
        let yaml = crd_yaml().unwrap();
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let props = &spec["properties"];
        assert_eq!(props["bucket"]["pattern"], "^[a-zA-Z0-9_-]+$");
        assert_eq!(props["bucket"]["maxLength"], 64);
        assert_eq!(props["prefixes"]["minItems"], 1);
        assert_eq!(props["prefixes"]["maxItems"], 32);
        assert_eq!(props["prefixes"]["items"]["minLength"], 1);
        assert_eq!(props["target"]["properties"]["name"]["maxLength"], 253);
        let policies = props["keyPolicy"]["enum"].as_array().unwrap();
        assert_eq!(policies.len(), 3);
        let creation = &props["target"]["properties"]["creationPolicy"]["enum"];
        assert_eq!(creation.as_array().unwrap().len(), 2);
        let required: Vec<&str> = spec["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(required, ["bucket", "prefixes"]);
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "cb");
        let columns = &crd["spec"]["versions"][0]["additionalPrinterColumns"];
        let names: Vec<&str> = columns
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Ready", "Reason", "Bucket", "Cursor", "Keys", "Age", "Message"
            ]
        );
        assert_eq!(columns[6]["priority"], 1, "the message only in -o wide");
        assert_eq!(crd["spec"]["names"]["categories"][0], "slipstream");
        assert_eq!(props["prefixes"]["x-kubernetes-list-type"], "set");
        let rollout = &props["target"]["properties"]["rollout"]["properties"];
        let workload = &rollout["workloads"]["items"];
        let fields: Vec<&String> = workload["properties"].as_object().unwrap().keys().collect();
        assert_eq!(
            fields,
            ["kind", "name"],
            "a workload cannot name a namespace"
        );
        // kept rather than pruned, so the operator can refuse it out loud
        assert_eq!(workload["x-kubernetes-preserve-unknown-fields"], true);
        assert_eq!(rollout["workloads"]["x-kubernetes-list-type"], "map");
        assert_eq!(rollout["minInterval"]["default"], "30s");
        let conditions = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
        assert!(crd["spec"]["versions"][0]["subresources"]["status"].is_object());
    }

    #[test]
    fn minimal_binding_gets_documented_defaults() {
        let spec: ConfigBindingSpec =
            serde_yaml::from_str("bucket: app\nprefixes: [web.]\n").unwrap();
        assert!(!spec.strip_prefix);
        assert_eq!(spec.key_policy, KeyPolicy::Escape);
        assert_eq!(spec.target.creation_policy, CreationPolicy::Owner);
        assert_eq!(spec.target.deletion_policy, DeletionPolicy::Delete);
        assert!(!spec.suspend);
    }
}
