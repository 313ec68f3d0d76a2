//! The resource registry: the built-in types the operator touches, plus every
//! served version of every CustomResourceDefinition in the store.

use std::sync::Arc;

use serde_json::{Value, json};

/// One served resource (`group/version/plural`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub list_kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    /// Has a `/status` subresource (writes to the main resource keep status, and vice versa).
    pub status: bool,
    /// Served from a CRD: generation, schema validation, pruning, no strategic merge patch.
    pub custom: bool,
    /// `openAPIV3Schema` of the CRD version.
    pub schema: Option<Value>,
    pub printer_columns: Vec<Value>,
    /// Objects of all versions of one resource share one storage key.
    pub storage: String,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `configmaps` or `widgets.example.com`, as used in error messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether `metadata.generation` is maintained (custom resources and CRDs;
    /// ConfigMaps, Secrets, Events, Leases and Namespaces carry none).
    pub fn tracks_generation(&self) -> bool {
        self.custom || self.kind == "CustomResourceDefinition"
    }

    fn discovery_entry(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.status {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    short: &[&str],
    namespaced: bool,
    status: bool,
) -> Arc<ResourceDef> {
    Arc::new(ResourceDef {
        group: group.to_string(),
        version: version.to_string(),
        kind: kind.to_string(),
        list_kind: format!("{kind}List"),
        plural: plural.to_string(),
        singular: kind.to_lowercase(),
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: Vec::new(),
        namespaced,
        status,
        custom: false,
        schema: None,
        printer_columns: Vec::new(),
        storage: format!("{group}/{plural}"),
    })
}

/// Built-ins plus the CRD-served resources currently registered.
#[derive(Debug, Clone)]
pub struct Registry {
    builtins: Vec<Arc<ResourceDef>>,
    crds: Vec<Arc<ResourceDef>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        let builtins = vec![
            builtin("", "v1", "Namespace", "namespaces", &["ns"], false, true),
            builtin("", "v1", "ConfigMap", "configmaps", &["cm"], true, false),
            builtin("", "v1", "Secret", "secrets", &[], true, false),
            builtin("", "v1", "Event", "events", &["ev"], true, false),
            builtin(
                "events.k8s.io",
                "v1",
                "Event",
                "events",
                &["ev"],
                true,
                false,
            ),
            builtin(
                "coordination.k8s.io",
                "v1",
                "Lease",
                "leases",
                &[],
                true,
                false,
            ),
            // Served so deploy examples can be applied and rollouts patch
            // their pod templates; no controller runs them.
            builtin(
                "apps",
                "v1",
                "Deployment",
                "deployments",
                &["deploy"],
                true,
                true,
            ),
            builtin(
                "apps",
                "v1",
                "StatefulSet",
                "statefulsets",
                &["sts"],
                true,
                true,
            ),
            builtin("apps", "v1", "DaemonSet", "daemonsets", &["ds"], true, true),
            builtin(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                &["crd", "crds"],
                false,
                true,
            ),
        ];
        Self {
            builtins,
            crds: Vec::new(),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceDef>> {
        self.builtins.iter().chain(self.crds.iter())
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.all()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .cloned()
    }

    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceDef>> {
        self.all()
            .find(|r| r.api_version() == api_version && r.kind == kind)
            .cloned()
    }

    fn builtin_kind(&self, group: &str, kind: &str) -> Arc<ResourceDef> {
        let found = self
            .builtins
            .iter()
            .find(|r| r.group == group && r.kind == kind);
        // Both kinds are always in the built-in table.
        found.cloned().unwrap_or_else(|| self.builtins[0].clone())
    }

    pub fn namespace_def(&self) -> Arc<ResourceDef> {
        self.builtin_kind("", "Namespace")
    }

    pub fn crd_def(&self) -> Arc<ResourceDef> {
        self.builtin_kind("apiextensions.k8s.io", "CustomResourceDefinition")
    }

    /// All definitions sharing a storage key (the served versions of a CRD).
    pub fn by_storage(&self, storage: &str) -> Vec<Arc<ResourceDef>> {
        self.all()
            .filter(|r| r.storage == storage)
            .cloned()
            .collect()
    }

    /// Re-derives the CRD-served resources from the stored CRD objects.
    pub fn rebuild<'a>(&mut self, crds: impl Iterator<Item = &'a Value>) {
        self.crds = crds.flat_map(defs_from_crd).collect();
    }

    /// `(group, [versions])` in discovery order, core group excluded.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for r in self.all().filter(|r| !r.group.is_empty()) {
            match out.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, vs)) => {
                    if !vs.contains(&r.version) {
                        vs.push(r.version.clone());
                    }
                }
                None => out.push((r.group.clone(), vec![r.version.clone()])),
            }
        }
        out
    }

    pub fn api_group(&self, group: &str, versions: &[String]) -> Value {
        let vs: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
            .collect();
        json!({"name": group, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
    }

    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let defs: Vec<&Arc<ResourceDef>> = self
            .all()
            .filter(|r| r.group == group && r.version == version)
            .collect();
        if defs.is_empty() {
            return None;
        }
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        let resources: Vec<Value> = defs.iter().flat_map(|r| r.discovery_entry()).collect();
        Some(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        )
    }
}

/// The resources a CRD object serves (one per served version). A CRD that is
/// not yet valid serves nothing.
pub fn defs_from_crd(crd: &Value) -> Vec<Arc<ResourceDef>> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let names = &spec["names"];
    let plural = names["plural"].as_str().unwrap_or_default();
    let kind = names["kind"].as_str().unwrap_or_default();
    if group.is_empty() || plural.is_empty() || kind.is_empty() {
        return Vec::new();
    }
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for ver in spec["versions"].as_array().into_iter().flatten() {
        if ver["served"].as_bool() == Some(false) {
            continue;
        }
        let Some(version) = ver["name"].as_str() else {
            continue;
        };
        out.push(Arc::new(ResourceDef {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            list_kind: names["listKind"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{kind}List")),
            plural: plural.to_string(),
            singular: names["singular"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| kind.to_lowercase()),
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            status: ver["subresources"]["status"].is_object(),
            custom: true,
            schema: ver["schema"]["openAPIV3Schema"]
                .as_object()
                .map(|m| Value::Object(m.clone())),
            printer_columns: ver["additionalPrinterColumns"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            storage: format!("{group}/{plural}"),
        }));
    }
    out
}
