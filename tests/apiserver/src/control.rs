//! Test controls: fault injection, the request log and counters.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use crate::Shared;

/// Fails the next `remaining` requests that match, with `code`.
#[derive(Debug, Clone)]
pub struct FaultRule {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`; `None` = any.
    pub verb: Option<String>,
    /// Plural resource name (`configmaps`); `None` = any.
    pub resource: Option<String>,
    /// Object name; `None` = any.
    pub name: Option<String>,
    /// Namespace of the request; `None` = any (cluster-scoped requests too).
    pub namespace: Option<String>,
    /// HTTP status to answer with (500, 429, 409, 410, 503, ...).
    pub code: u16,
    pub remaining: usize,
}

impl FaultRule {
    pub fn new(code: u16, count: usize) -> Self {
        Self {
            verb: None,
            resource: None,
            name: None,
            namespace: None,
            code,
            remaining: count,
        }
    }

    pub fn verb(mut self, verb: &str) -> Self {
        self.verb = Some(verb.to_string());
        self
    }

    pub fn resource(mut self, resource: &str) -> Self {
        self.resource = Some(resource.to_string());
        self
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_string());
        self
    }

    pub(crate) fn matches(&self, verb: &str, resource: &str, namespace: &str, name: &str) -> bool {
        self.remaining > 0
            && self.verb.as_deref().is_none_or(|v| v == verb)
            && self.resource.as_deref().is_none_or(|r| r == resource)
            && self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.name.as_deref().is_none_or(|n| n == name)
    }
}

/// The Kubernetes verb of a request: its method, whether the path names
/// an object, and `?watch=`.
pub(crate) fn verb(method: &str, names_object: bool, watch: bool) -> &'static str {
    match (method, names_object) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

/// Pending fault rules and the write latency (for all, or one namespace):
/// what the emulator and the real server's proxy inject, kept one way.
#[derive(Default)]
pub(crate) struct FaultSet {
    rules: Mutex<Vec<FaultRule>>,
    /// The latency for every namespace, and the ones set per namespace.
    latency: Mutex<(Duration, HashMap<String, Duration>)>,
}

impl FaultSet {
    pub(crate) fn with_latency(latency: Duration) -> Self {
        let set = Self::default();
        set.set_write_latency(latency);
        set
    }

    pub(crate) fn add(&self, rule: FaultRule) {
        if let Ok(mut f) = self.rules.lock() {
            f.push(rule);
        }
    }

    /// Every pending rule.
    pub(crate) fn clear(&self) {
        if let Ok(mut f) = self.rules.lock() {
            f.clear();
        }
    }

    /// The pending rules scoped to `namespace`.
    pub(crate) fn clear_in(&self, namespace: &str) {
        if let Ok(mut f) = self.rules.lock() {
            f.retain(|r| r.namespace.as_deref() != Some(namespace));
        }
    }

    pub(crate) fn set_write_latency(&self, latency: Duration) {
        if let Ok(mut l) = self.latency.lock() {
            *l = (latency, HashMap::new());
        }
    }

    pub(crate) fn set_write_latency_in(&self, namespace: &str, latency: Duration) {
        if let Ok(mut l) = self.latency.lock() {
            l.1.insert(namespace.to_owned(), latency);
        }
    }

    /// The delay before a write in `namespace` is committed or forwarded.
    pub(crate) fn write_latency(&self, namespace: &str) -> Duration {
        self.latency
            .lock()
            .map(|l| l.1.get(namespace).copied().unwrap_or(l.0))
            .unwrap_or(Duration::ZERO)
    }

    /// The code of the first rule matching the request, counting it down.
    pub(crate) fn take(
        &self,
        verb: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Option<u16> {
        let mut faults = self.rules.lock().ok()?;
        let rule = faults
            .iter_mut()
            .find(|r| r.matches(verb, resource, namespace, name))?;
        rule.remaining -= 1;
        let code = rule.code;
        faults.retain(|r| r.remaining > 0);
        Some(code)
    }
}

/// Handle for injecting faults into a running emulator.
#[derive(Clone)]
pub struct Faults {
    pub(crate) shared: Arc<Shared>,
}

impl Faults {
    /// Fails the next `count` requests of any kind with `code`.
    pub fn fail_next(&self, count: usize, code: u16) {
        self.add(FaultRule::new(code, count));
    }

    /// Fails the next requests matching `rule`.
    pub fn add(&self, rule: FaultRule) {
        self.shared.faults.add(rule);
    }

    /// Removes all pending fault rules.
    pub fn clear(&self) {
        self.shared.faults.clear();
    }

    /// Delay added before every write is committed (models etcd latency).
    pub fn set_write_latency(&self, latency: Duration) {
        self.shared.faults.set_write_latency(latency);
    }

    /// Computes every write while holding the store lock, as the emulator
    /// did before writes ran in parallel (`false`, the default: writes are
    /// computed outside it and committed if the object is unchanged). For
    /// benchmarks comparing the two; answers are the same either way.
    pub fn serialize_writes(&self, on: bool) {
        self.shared
            .state
            .serialized
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Ends every open watch stream (clients see the stream end and re-watch).
    pub fn close_watches(&self) {
        self.shared.close_watches.send_modify(|g| *g += 1);
    }

    /// Drops the watch history: a watch from any resourceVersion older than
    /// the current one gets an ERROR event with 410 Gone (reason Expired).
    pub fn compact(&self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.compact();
        }
    }

    /// Holds every new request until [`Faults::resume`].
    pub fn pause(&self) {
        self.shared.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.shared.paused.send_replace(false);
    }
}

/// One served request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection (or `discovery`).
    pub verb: String,
    pub path: String,
    pub query: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Patch content type for patches (`apply`, `merge`, `json`, `strategic`).
    pub patch_type: String,
    /// `?fieldManager=`, else the manager derived from the user agent (writes only).
    pub field_manager: String,
    pub user_agent: String,
    pub status: u16,
    /// Objects this request wrote to storage (0 for reads, failures and no-op writes).
    pub storage_writes: u64,
    pub timestamp: SystemTime,
    pub duration: Duration,
}

impl RequestRecord {
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

/// Request counts (all status codes).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub by_verb: BTreeMap<String, u64>,
    pub by_resource: BTreeMap<String, u64>,
    pub by_field_manager: BTreeMap<String, u64>,
    pub by_verb_resource: BTreeMap<(String, String), u64>,
    /// Successful write requests (2xx create/update/patch/delete/deletecollection),
    /// including no-op writes the server answered without storing anything.
    pub writes: u64,
    /// Storage writes caused by requests (a no-op apply or patch adds nothing here).
    /// Garbage-collector writes are not requests and are not counted.
    pub storage_writes: u64,
}

impl Counters {
    pub fn from_log(log: &[RequestRecord]) -> Self {
        let mut c = Self::default();
        for r in log {
            c.add(r);
        }
        c
    }

    /// Counts one request.
    pub fn add(&mut self, r: &RequestRecord) {
        *self.by_verb.entry(r.verb.clone()).or_default() += 1;
        if !r.resource.is_empty() {
            *self.by_resource.entry(r.resource.clone()).or_default() += 1;
            *self
                .by_verb_resource
                .entry((r.verb.clone(), r.resource.clone()))
                .or_default() += 1;
        }
        if !r.field_manager.is_empty() {
            *self
                .by_field_manager
                .entry(r.field_manager.clone())
                .or_default() += 1;
        }
        if r.is_write() && (200..300).contains(&r.status) {
            self.writes += 1;
        }
        self.storage_writes += r.storage_writes;
    }

    pub fn verb(&self, verb: &str) -> u64 {
        self.by_verb.get(verb).copied().unwrap_or(0)
    }

    pub fn verb_resource(&self, verb: &str, resource: &str) -> u64 {
        self.by_verb_resource
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub fn manager(&self, manager: &str) -> u64 {
        self.by_field_manager.get(manager).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_count_down_and_namespace_scoped_ones_clear_alone() {
        let f = FaultSet::default();
        f.add(FaultRule::new(500, 2).verb("patch").namespace("a"));
        f.add(FaultRule::new(429, 1).resource("configmaps"));
        assert_eq!(f.take("patch", "configmaps", "b", "x"), Some(429));
        assert_eq!(f.take("patch", "configmaps", "b", "x"), None);
        assert_eq!(f.take("patch", "configmaps", "a", "x"), Some(500));
        f.clear_in("a");
        assert_eq!(f.take("patch", "configmaps", "a", "x"), None);
    }

    #[test]
    fn write_latency_of_one_namespace_leaves_the_others_alone() {
        let ms = Duration::from_millis;
        let f = FaultSet::with_latency(ms(5));
        f.set_write_latency_in("a", ms(50));
        assert_eq!(
            (f.write_latency("a"), f.write_latency("b")),
            (ms(50), ms(5))
        );
        f.set_write_latency(ms(1));
        assert_eq!((f.write_latency("a"), f.write_latency("b")), (ms(1), ms(1)));
    }

    #[test]
    fn verbs_follow_method_name_and_watch() {
        assert_eq!(verb("GET", false, true), "watch");
        assert_eq!(verb("GET", true, false), "get");
        assert_eq!(verb("GET", false, false), "list");
        assert_eq!(verb("DELETE", false, false), "deletecollection");
        assert_eq!(verb("OPTIONS", false, false), "unknown");
    }
}
