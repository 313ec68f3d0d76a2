//! The in-memory object store and every write rule: one global
//! resourceVersion counter, uid/creationTimestamp/generation, optimistic
//! concurrency, status subresource, managed fields, finalizers, deletion and
//! garbage collection. HTTP handlers and the direct test API both call these.
//!
//! A request's write is computed outside the store lock from a [`View`] and
//! committed by [`write()`] only if the store still holds what it read.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::{
    errors::{ApiError, ApiResult, Cause},
    fields::{self, Entry, FieldSet, Scope, Tracker},
    resources::{Registry, ResourceDef},
    selectors::Selectors,
    validation,
};

/// `(storage, namespace, name)`; cluster-scoped objects use an empty namespace.
pub type Key = (String, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One committed write, as kept in the watch history and broadcast to watches.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub storage: String,
    pub ns: String,
    pub etype: EventType,
    pub obj: Arc<Value>,
    /// `obj` serialized once, shared by every watch.
    pub json: Bytes,
    /// The whole watch event line for `etype` (`json` is a slice of it).
    pub line: Bytes,
    /// The object before this write (for selector transitions on watches).
    pub old: Option<Arc<Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml"
            | "application/apply-patch+json"
            | "application/apply-patch+cbor" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Who writes, and how.
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    pub manager: String,
    pub dry_run: bool,
    pub force: bool,
    /// `fieldValidation=Strict`: unknown fields are an error instead of being dropped.
    pub strict: bool,
}

#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    pub propagation: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

enum Managed {
    Update(String),
    Apply(Vec<Entry>),
    Keep,
}

/// History entries kept in [`State::trash`] until a caller drops them outside the lock.
const TRASH_MAX: usize = 4096;

/// Retained watch history is also capped at this many serialized bytes.
pub const HISTORY_BYTES_MAX: usize = 256 * 1024 * 1024;

pub const CRD_CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn scope_for(res: &ResourceDef, status: bool) -> Scope {
    match (res.status, status) {
        (false, _) => Scope::All,
        (true, false) => Scope::Main,
        (true, true) => Scope::Status,
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    match &mut obj["metadata"] {
        Value::Object(m) => m,
        // Made an object just above.
        _ => unreachable!("metadata is an object"),
    }
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn set_finalizers(obj: &mut Value, list: &[String]) {
    let m = meta_mut(obj);
    if list.is_empty() {
        m.remove("finalizers");
    } else {
        m.insert("finalizers".into(), json!(list));
    }
}

/// Random suffix alphabet of `names.SimpleNameGenerator` (no vowels, no confusables).
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

fn random_suffix() -> String {
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| SUFFIX_ALPHABET[*b as usize % SUFFIX_ALPHABET.len()] as char)
        .collect()
}

/// Parses a JSON body, or YAML for apply patches.
pub fn parse_body(body: &[u8], yaml_ok: bool) -> ApiResult<Value> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(e) if yaml_ok => serde_yaml::from_slice::<Value>(body).map_err(|ye| {
            ApiError::bad_request(format!("error decoding YAML: {ye} (as JSON: {e})"))
        }),
        Err(e) => Err(ApiError::bad_request(format!(
            "error decoding request body: {e}"
        ))),
    }
}

/// A stored object and its JSON, serialized once when it was committed and
/// shared by every read (get, list, watch) and by the write's own response.
#[derive(Debug, Clone)]
pub struct Stored {
    pub obj: Arc<Value>,
    pub json: Bytes,
}

impl Stored {
    fn serialize(obj: Value) -> Self {
        let json = Bytes::from(serde_json::to_vec(&obj).unwrap_or_default());
        Self {
            obj: Arc::new(obj),
            json,
        }
    }

    /// The object's JSON as served through `res` (another served version of
    /// a CRD relabels `apiVersion`).
    pub fn body(&self, res: &ResourceDef) -> Bytes {
        if api_version_is(&self.obj, res) {
            self.json.clone()
        } else {
            Bytes::from(State::present(res, &self.obj).to_string())
        }
    }

    /// The object as served through `res`.
    pub fn value(&self, res: &ResourceDef) -> Value {
        State::present(res, &self.obj)
    }
}

/// An object's JSON with the value of `metadata.resourceVersion` left out,
/// so it can be serialized before the commit assigns the resourceVersion.
#[derive(Debug)]
pub struct Body {
    json: Vec<u8>,
    /// Where the resourceVersion digits go (between the quotes of `""`).
    hole: usize,
}

impl Body {
    /// Serializes `obj` exactly as `serde_json::to_vec` does, except that the
    /// value of `metadata.resourceVersion` is written as `""` and its position
    /// kept. `None` when the object has no such field.
    fn with_hole(obj: &Value) -> Option<Self> {
        let Value::Object(top) = obj else {
            return None;
        };
        let mut json = Vec::with_capacity(1024);
        let mut hole = None;
        json.push(b'{');
        for (i, (k, v)) in top.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            serde_json::to_writer(&mut json, k).ok()?;
            json.push(b':');
            match v {
                Value::Object(meta) if k == "metadata" => {
                    json.push(b'{');
                    for (j, (mk, mv)) in meta.iter().enumerate() {
                        if j > 0 {
                            json.push(b',');
                        }
                        serde_json::to_writer(&mut json, mk).ok()?;
                        json.push(b':');
                        if mk == "resourceVersion" {
                            json.push(b'"');
                            hole = Some(json.len());
                            json.push(b'"');
                        } else {
                            serde_json::to_writer(&mut json, mv).ok()?;
                        }
                    }
                    json.push(b'}');
                }
                _ => serde_json::to_writer(&mut json, v).ok()?,
            }
        }
        json.push(b'}');
        Some(Self { json, hole: hole? })
    }

    /// The body of an object whose resourceVersion is already set (slower:
    /// under the lock, for the rare object without a `metadata` map).
    fn of(obj: &Value) -> Self {
        let json = serde_json::to_vec(obj).unwrap_or_default();
        Self {
            hole: json.len(),
            json,
        }
    }

    /// The watch event line for this body at resourceVersion `rv`, and the
    /// object's JSON as a slice of it.
    fn event_line(&self, etype: EventType, rv: u64) -> (Bytes, Bytes) {
        let head = format!("{{\"type\":\"{}\",\"object\":", etype.as_str());
        // `of` bodies carry their resourceVersion already.
        let digits = if self.hole < self.json.len() {
            rv.to_string()
        } else {
            String::new()
        };
        let mut buf = Vec::with_capacity(head.len() + self.json.len() + digits.len() + 2);
        buf.extend_from_slice(head.as_bytes());
        let start = buf.len();
        buf.extend_from_slice(&self.json[..self.hole]);
        buf.extend_from_slice(digits.as_bytes());
        buf.extend_from_slice(&self.json[self.hole..]);
        let end = buf.len();
        buf.extend_from_slice(b"}\n");
        let line = Bytes::from(buf);
        let json = line.slice(start..end);
        (line, json)
    }
}

/// A storage write computed from a [`View`], waiting for its commit.
#[derive(Debug)]
pub struct Pending {
    key: Key,
    /// The object it was computed from (`None`: a create).
    old: Option<Arc<Value>>,
    new: Value,
    /// `new` serialized (without its resourceVersion); `None`: serialize at commit.
    body: Option<Body>,
    /// The write removes the object (its last finalizer went while deleting).
    remove: bool,
}

impl Pending {
    /// Does the expensive part of a write (serializing the object) up front.
    fn new(key: Key, old: Option<Arc<Value>>, mut new: Value, remove: bool) -> Self {
        let body = if new.is_object() {
            // The field exists (in its final position) before serializing;
            // the commit fills in its value.
            meta_mut(&mut new).insert("resourceVersion".into(), json!(""));
            Body::with_hole(&new)
        } else {
            None
        };
        Self {
            key,
            old,
            new,
            body,
            remove,
        }
    }
}

/// What a write computed from a [`View`] does.
#[derive(Debug)]
pub enum Plan {
    /// Nothing is stored (a no-op write or a dry run); this is the answer.
    Done(Stored),
    /// One storage write.
    Write(Pending),
}

/// The result of a write request.
#[derive(Debug)]
pub struct Written {
    pub stored: Stored,
    /// No object existed before (a create, or an apply that created).
    pub created: bool,
    /// Storage writes made (0 for no-op writes and dry runs).
    pub writes: u64,
    /// The garbage collector has work.
    pub gc: bool,
}

/// The store's mutex, counting how long it is held (the figure that shows
/// whether requests serialize on it).
pub struct StoreLock {
    inner: Mutex<State>,
    held_ns: AtomicU64,
    acquired: AtomicU64,
    /// Every write computed under the lock (no optimistic attempts): how the
    /// emulator worked before, kept switchable for A/B benchmarks.
    pub serialized: AtomicBool,
}

/// The store, locked; adds its hold time to [`StoreLock`] when dropped.
pub struct StoreGuard<'a> {
    guard: MutexGuard<'a, State>,
    since: Instant,
    lock: &'a StoreLock,
}

impl StoreLock {
    pub fn new(state: State) -> Self {
        Self {
            inner: Mutex::new(state),
            held_ns: AtomicU64::new(0),
            acquired: AtomicU64::new(0),
            serialized: AtomicBool::new(false),
        }
    }

    /// Fails only when a thread panicked while holding it.
    pub fn lock(&self) -> Result<StoreGuard<'_>, Poisoned> {
        let guard = self.inner.lock().map_err(|_| Poisoned)?;
        Ok(self.guard(guard))
    }

    pub fn try_lock(&self) -> Option<StoreGuard<'_>> {
        self.inner.try_lock().ok().map(|g| self.guard(g))
    }

    fn guard<'a>(&'a self, guard: MutexGuard<'a, State>) -> StoreGuard<'a> {
        self.acquired.fetch_add(1, Ordering::Relaxed);
        StoreGuard {
            guard,
            since: Instant::now(),
            lock: self,
        }
    }

    /// Total time the lock was held, and how often it was taken.
    pub fn held(&self) -> (Duration, u64) {
        (
            Duration::from_nanos(self.held_ns.load(Ordering::Relaxed)),
            self.acquired.load(Ordering::Relaxed),
        )
    }
}

/// The store lock was poisoned by a panic.
#[derive(Debug, Clone, Copy)]
pub struct Poisoned;

impl std::ops::Deref for StoreGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl std::ops::DerefMut for StoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for StoreGuard<'_> {
    fn drop(&mut self) {
        let ns = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.lock.held_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// Optimistic attempts of a write before it is computed under the store lock.
pub const OPTIMISTIC_ATTEMPTS: usize = 16;

/// Runs one write the way kube-apiserver's `GuaranteedUpdate` does: read the
/// current object under the store lock, compute the new one outside it
/// (parsing, merging, field management, validation, serialization), then
/// commit under the lock only if the object (and for a create, its
/// namespace; and the set of served resources) is still what was read;
/// otherwise compute again from the newer object. A `resourceVersion`
/// precondition is checked against the object each attempt reads, so a
/// stale one still gets 409. The real storage loop retries without bound;
/// here, after [`OPTIMISTIC_ATTEMPTS`] lost races, the write is computed
/// while holding the lock, so it cannot lose again and no request fails for
/// contention alone.
pub fn write(
    state: &StoreLock,
    res: &ResourceDef,
    ns: Option<&str>,
    name: &str,
    mut plan: impl FnMut(&View) -> ApiResult<Plan>,
) -> ApiResult<Written> {
    let lock = || {
        state
            .lock()
            .map_err(|_| ApiError::internal("store lock poisoned"))
    };
    let attempts = if state.serialized.load(Ordering::Relaxed) {
        0
    } else {
        OPTIMISTIC_ATTEMPTS
    };
    for _ in 0..attempts {
        let view = lock()?.view(res, ns, name);
        let created = view.current.is_none();
        match plan(&view)? {
            Plan::Done(stored) => {
                return Ok(Written {
                    stored,
                    created,
                    writes: 0,
                    gc: false,
                });
            }
            Plan::Write(p) => {
                let mut st = lock()?;
                if st.unchanged(&view, created) {
                    let stored = st.execute(res, p);
                    let gc = st.gc_dirty;
                    let trash = std::mem::take(&mut st.trash);
                    drop(st);
                    drop(trash);
                    return Ok(Written {
                        stored,
                        created,
                        writes: 1,
                        gc,
                    });
                }
            }
        }
    }
    let mut st = lock()?;
    let view = st.view(res, ns, name);
    let created = view.current.is_none();
    let (stored, writes) = match plan(&view)? {
        Plan::Done(stored) => (stored, 0),
        Plan::Write(p) => (st.execute(res, p), 1),
    };
    let gc = st.gc_dirty;
    let trash = std::mem::take(&mut st.trash);
    drop(st);
    drop(trash);
    Ok(Written {
        stored,
        created,
        writes,
        gc,
    })
}

/// Gives a POST body with `generateName` and no name its generated name
/// (once, before the store is read) and returns the name.
pub fn name_for_create(body: &mut Value) -> String {
    if !body.is_object() {
        return String::new();
    }
    let meta = meta_mut(body);
    let has_name = meta
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !has_name
        && let Some(g) = meta
            .get("generateName")
            .and_then(Value::as_str)
            .filter(|g| !g.is_empty())
    {
        let name = format!("{g}{}", random_suffix());
        meta.insert("name".into(), json!(name));
    }
    meta.get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn api_version_is(obj: &Value, res: &ResourceDef) -> bool {
    let Some(av) = obj["apiVersion"].as_str() else {
        return false;
    };
    if res.group.is_empty() {
        av == res.version
    } else {
        av.strip_prefix(res.group.as_str())
            .and_then(|r| r.strip_prefix('/'))
            == Some(res.version.as_str())
    }
}

/// The uids an object's `metadata.ownerReferences` name.
fn owner_uids(obj: &Value) -> impl Iterator<Item = &str> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
}

/// What the garbage collector has to look at, kept up to date by every
/// write so that its work is proportional to what changed, never to the
/// number of stored objects.
#[derive(Debug, Default)]
pub struct GcIndex {
    /// uid -> object.
    uids: HashMap<String, Key>,
    /// Owner uid -> objects whose ownerReferences name it.
    dependents: HashMap<String, BTreeSet<Key>>,
    /// Objects being deleted that wait on the collector: namespaces, CRDs with
    /// the cleanup finalizer, owners with the `orphan` or `foregroundDeletion` finalizer.
    deleting: BTreeSet<Key>,
    /// Objects whose owners may be gone (an owner was removed, or the object
    /// was written naming a uid that does not exist).
    check: BTreeSet<Key>,
}

pub struct State {
    pub rv: u64,
    pub objects: BTreeMap<Key, Stored>,
    pub gc: GcIndex,
    pub history: VecDeque<Arc<Change>>,
    /// Watches starting at a resourceVersion below this get 410 Gone.
    pub floor: u64,
    pub window: usize,
    /// Serialized size of the retained history.
    pub history_bytes: usize,
    pub tx: broadcast::Sender<Arc<Change>>,
    /// Replaced (never mutated) when CRDs change, so a write's [`View`] can hold it.
    pub registry: Arc<Registry>,
    /// Set by deletions and deletion marks: the garbage collector has work.
    pub gc_dirty: bool,
    /// History entries that left the window, dropped after the lock is
    /// released (the last reference to an old object frees a whole tree).
    pub trash: Vec<Arc<Change>>,
}

impl State {
    pub fn new(window: usize, tx: broadcast::Sender<Arc<Change>>) -> Self {
        let mut st = Self {
            rv: 0,
            objects: BTreeMap::new(),
            gc: GcIndex::default(),
            history: VecDeque::new(),
            floor: 0,
            window,
            history_bytes: 0,
            tx,
            registry: Arc::new(Registry::new()),
            gc_dirty: false,
            trash: Vec::new(),
        };
        let ns = st.registry.namespace_def();
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let opts = WriteOpts {
                manager: "kube-apiserver".into(),
                ..Default::default()
            };
            let _ = st.create(&ns, None, json!({"metadata": {"name": name}}), &opts);
        }
        st
    }

    pub fn key(res: &ResourceDef, ns: Option<&str>, name: &str) -> Key {
        let ns = if res.namespaced {
            ns.unwrap_or_default()
        } else {
            ""
        };
        (res.storage.clone(), ns.to_string(), name.to_string())
    }

    /// Rewrites `apiVersion` for a resource served in several CRD versions.
    pub fn present(res: &ResourceDef, obj: &Arc<Value>) -> Value {
        let mut v = (**obj).clone();
        if v["apiVersion"].as_str() != Some(res.api_version().as_str()) {
            v["apiVersion"] = json!(res.api_version());
        }
        v
    }

    pub fn get(&self, res: &ResourceDef, ns: Option<&str>, name: &str) -> ApiResult<Arc<Value>> {
        self.get_stored(res, ns, name).map(|s| s.obj)
    }

    pub fn get_stored(&self, res: &ResourceDef, ns: Option<&str>, name: &str) -> ApiResult<Stored> {
        self.objects
            .get(&Self::key(res, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Objects of one resource (in one namespace, or all), ordered by namespace and name.
    pub fn list(&self, res: &ResourceDef, ns: Option<&str>, sel: &Selectors) -> Vec<Stored> {
        let start = (
            res.storage.clone(),
            ns.filter(|_| res.namespaced)
                .unwrap_or_default()
                .to_string(),
            String::new(),
        );
        self.objects
            .range(start..)
            .take_while(|((s, n, _), _)| {
                *s == res.storage && (!res.namespaced || ns.is_none() || Some(n.as_str()) == ns)
            })
            .filter(|(_, o)| sel.matches(&o.obj))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// The distinct storages holding objects: one range lookup each, not a scan.
    fn storages(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut next: Option<String> = self.objects.keys().next().map(|k| k.0.clone());
        while let Some(storage) = next {
            // `storage + "\0"` is the least string above `storage`: the next storage starts there.
            let mut after = storage.clone();
            after.push('\0');
            next = self
                .objects
                .range((after, String::new(), String::new())..)
                .next()
                .map(|(k, _)| k.0.clone());
            out.push(storage);
        }
        out
    }

    /// Objects of `storage` (in namespace `ns`, or all with `None`).
    fn range_of<'a>(
        &'a self,
        storage: &'a str,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Key, &'a Stored)> + 'a {
        let start = (
            storage.to_string(),
            ns.unwrap_or_default().to_string(),
            String::new(),
        );
        self.objects
            .range(start..)
            .take_while(move |(k, _)| k.0 == storage && ns.is_none_or(|n| k.1 == n))
    }

    /// Records a committed write in the watch history and broadcasts it;
    /// returns the object's JSON (a slice of the event line).
    fn push_change(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        etype: EventType,
        obj: Arc<Value>,
        old: Option<Arc<Value>>,
        body: &Body,
    ) -> Bytes {
        if etype == EventType::Deleted || obj["metadata"]["deletionTimestamp"].is_string() {
            self.gc_dirty = true;
        }
        let (line, json) = body.event_line(etype, self.rv);
        let change = Arc::new(Change {
            rv: self.rv,
            storage: res.storage.clone(),
            ns: ns.to_string(),
            etype,
            obj,
            json: json.clone(),
            line,
            old,
        });
        self.history_bytes += change.line.len();
        self.history.push_back(change.clone());
        // The window is bounded by count and by serialized size (large ConfigMaps).
        while self.history.len() > self.window
            || (self.history_bytes > HISTORY_BYTES_MAX && self.history.len() > 1)
        {
            if let Some(c) = self.history.pop_front() {
                self.history_bytes -= c.line.len();
                self.floor = self.floor.max(c.rv);
                if self.trash.len() < TRASH_MAX {
                    self.trash.push(c);
                }
            }
        }
        let _ = self.tx.send(change);
        json
    }

    /// Re-derives the served CRD resources after a CRD write.
    fn crds_changed(&mut self, res: &ResourceDef) {
        if res.kind != "CustomResourceDefinition" {
            return;
        }
        let crds: Vec<Arc<Value>> = self
            .range_of(&res.storage, None)
            .map(|(_, s)| s.obj.clone())
            .collect();
        let mut registry = (*self.registry).clone();
        registry.rebuild(crds.iter().map(|v| &**v));
        self.registry = Arc::new(registry);
    }

    /// Whether a deleting object needs the collector to finish its deletion.
    fn waits_on_gc(&self, key: &Key, obj: &Value) -> bool {
        if !obj["metadata"]["deletionTimestamp"].is_string() {
            return false;
        }
        let fin = finalizers(obj);
        fin.iter()
            .any(|f| f == "orphan" || f == "foregroundDeletion")
            || key.0 == self.registry.namespace_def().storage
            || (key.0 == self.registry.crd_def().storage
                && fin.iter().any(|f| f == CRD_CLEANUP_FINALIZER))
    }

    /// Keeps [`GcIndex`] in step with a write of `key` from `old` to `new`
    /// (`None`: absent). Cost: the object's owner references, not the store.
    fn reindex(&mut self, key: &Key, old: Option<&Value>, new: Option<&Value>) {
        let old_uid = old.and_then(|o| meta_str(o, "uid"));
        let new_uid = new.and_then(|o| meta_str(o, "uid"));
        if old_uid != new_uid {
            if let Some(u) = old_uid
                && self.gc.uids.get(u) == Some(key)
            {
                self.gc.uids.remove(u);
            }
            if let Some(u) = new_uid {
                self.gc.uids.insert(u.to_string(), key.clone());
            }
        }
        if old.map(|o| &o["metadata"]["ownerReferences"])
            != new.map(|o| &o["metadata"]["ownerReferences"])
        {
            for u in old.map(owner_uids).into_iter().flatten() {
                if let Some(set) = self.gc.dependents.get_mut(u) {
                    set.remove(key);
                    if set.is_empty() {
                        self.gc.dependents.remove(u);
                    }
                }
            }
            for u in new.map(owner_uids).into_iter().flatten() {
                self.gc
                    .dependents
                    .entry(u.to_string())
                    .or_default()
                    .insert(key.clone());
                if !self.gc.uids.contains_key(u) {
                    // Written naming an owner that does not exist.
                    self.gc.check.insert(key.clone());
                    self.gc_dirty = true;
                }
            }
        }
        match new {
            Some(n) if self.waits_on_gc(key, n) => {
                self.gc.deleting.insert(key.clone());
            }
            _ => {
                self.gc.deleting.remove(key);
            }
        }
        if new.is_none()
            && let Some(u) = old_uid
            && let Some(deps) = self.gc.dependents.get(u)
        {
            // An owner is gone: its dependents are checked.
            self.gc.check.extend(deps.iter().cloned());
            self.gc_dirty = true;
        }
    }

    /// Removes `key`; `last` is the object the DELETED event carries.
    fn remove(&mut self, res: &ResourceDef, key: Key, last: Value) -> Stored {
        let old = self.objects.get(&key).map(|s| s.obj.clone());
        self.execute(res, Pending::new(key, old, last, true))
    }

    /// Commits a computed write: the next resourceVersion, indexes, watch
    /// history and broadcast. Everything expensive was done by [`Pending::new`].
    fn execute(&mut self, res: &ResourceDef, p: Pending) -> Stored {
        let Pending {
            key,
            old,
            mut new,
            body,
            remove,
        } = p;
        self.rv += 1;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let obj = Arc::new(new);
        let etype = if remove {
            self.objects.remove(&key);
            self.reindex(&key, old.as_deref(), None);
            EventType::Deleted
        } else {
            self.reindex(&key, old.as_deref(), Some(&obj));
            if old.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            }
        };
        let body = body.unwrap_or_else(|| Body::of(&obj));
        let json = self.push_change(res, &key.1, etype, obj.clone(), old, &body);
        let stored = Stored { obj, json };
        if !remove {
            self.objects.insert(key, stored.clone());
        }
        self.crds_changed(res);
        stored
    }

    /// The object a write read, captured under the lock for work done outside it.
    pub fn view(&self, res: &ResourceDef, ns: Option<&str>, name: &str) -> View {
        let key = Self::key(res, ns, name);
        let namespace = if res.namespaced && !key.1.is_empty() {
            let nsdef = self.registry.namespace_def();
            self.objects.get(&Self::key(&nsdef, None, &key.1)).cloned()
        } else {
            None
        };
        View {
            registry: self.registry.clone(),
            current: self.objects.get(&key).cloned(),
            namespace,
            key,
        }
    }

    /// Whether the store still holds what `view` read: the same object (or
    /// none), the same resource registry, and for a create the same namespace.
    fn unchanged(&self, view: &View, create: bool) -> bool {
        fn same(a: Option<&Stored>, b: Option<&Stored>) -> bool {
            match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(&a.obj, &b.obj),
                _ => false,
            }
        }
        if !Arc::ptr_eq(&self.registry, &view.registry)
            || !same(self.objects.get(&view.key), view.current.as_ref())
        {
            return false;
        }
        if create && !view.key.1.is_empty() {
            let nsdef = self.registry.namespace_def();
            let now = self.objects.get(&Self::key(&nsdef, None, &view.key.1));
            return same(now, view.namespace.as_ref());
        }
        true
    }

    /// Runs a write computed under the lock.
    fn run(&mut self, res: &ResourceDef, plan: Plan) -> Stored {
        match plan {
            Plan::Done(stored) => stored,
            Plan::Write(p) => self.execute(res, p),
        }
    }

    /// Drops the retained history: a watch from any earlier resourceVersion gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.history_bytes = 0;
        self.floor = self.rv;
    }

    /// POST under the store lock (the direct test API).
    pub fn create(
        &mut self,
        res: &ResourceDef,
        ns: Option<&str>,
        mut body: Value,
        opts: &WriteOpts,
    ) -> ApiResult<Stored> {
        let name = name_for_create(&mut body);
        let plan = self.view(res, ns, &name).create(res, ns, body, opts)?;
        Ok(self.run(res, plan))
    }

    pub(crate) fn check_name(res: &ResourceDef, body: &Value, name: &str) -> ApiResult<()> {
        match meta_str(body, "name") {
            Some(n) if !n.is_empty() && n != name => Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            ))),
            _ => {
                let _ = res;
                Ok(())
            }
        }
    }
}

/// What a write read from the store, taken under the store lock and used
/// outside it. A write is computed from a view and committed only if the
/// store still holds what the view saw (optimistic concurrency, like
/// kube-apiserver's `GuaranteedUpdate` against etcd); see [`write()`].
#[derive(Debug, Clone)]
pub struct View {
    pub registry: Arc<Registry>,
    pub key: Key,
    /// The object at `key`, if any.
    pub current: Option<Stored>,
    /// The namespace object `key` lives in (namespaced resources).
    pub namespace: Option<Stored>,
}

impl View {
    fn get(&self, res: &ResourceDef, name: &str) -> ApiResult<Stored> {
        self.current
            .clone()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    fn check_namespace(&self, res: &ResourceDef, ns: Option<&str>) -> ApiResult<()> {
        if !res.namespaced {
            return Ok(());
        }
        let Some(ns) = ns.filter(|n| !n.is_empty()) else {
            return Err(ApiError::bad_request(
                "the server could not find the requested resource: a namespace is required",
            ));
        };
        match &self.namespace {
            None => Err(ApiError::namespace_not_found(ns)),
            Some(o) if o.obj["metadata"]["deletionTimestamp"].is_string() => {
                Err(ApiError::forbidden(format!(
                    "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    res.qualified(),
                    "",
                )))
            }
            Some(_) => Ok(()),
        }
    }

    /// POST: `body` already named by [`name_for_create`].
    pub fn create(
        &self,
        res: &ResourceDef,
        ns: Option<&str>,
        mut body: Value,
        opts: &WriteOpts,
    ) -> ApiResult<Plan> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        self.check_kind(res, &body)?;
        let meta = meta_mut(&mut body);
        if res.namespaced {
            match (meta.get("namespace").and_then(Value::as_str), ns) {
                (Some(b), Some(p)) if !b.is_empty() && b != p => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
            if let Some(p) = ns {
                meta.insert("namespace".into(), json!(p));
            }
        } else {
            meta.remove("namespace");
        }
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            return Err(ApiError::invalid(
                res,
                "",
                vec![Cause::required(
                    "metadata.name",
                    "name or generateName is required",
                )],
            ));
        }
        self.check_namespace(res, ns)?;
        if self.current.is_some() {
            return Err(ApiError::already_exists(res, &name));
        }
        plan_finish(
            res,
            ns,
            None,
            body,
            false,
            Managed::Update(opts.manager.clone()),
            opts,
        )
    }

    fn check_kind(&self, res: &ResourceDef, body: &Value) -> ApiResult<()> {
        if let Some(k) = body["kind"].as_str()
            && !k.is_empty()
            && k != res.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind of the provided object ({k}) does not match the resource ({})",
                res.kind
            )));
        }
        if let Some(av) = body["apiVersion"].as_str()
            && !av.is_empty()
            && self
                .registry
                .by_storage(&res.storage)
                .iter()
                .all(|r| r.api_version() != av)
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                res.api_version()
            )));
        }
        Ok(())
    }

    /// DELETE of one object: removed at once, or marked (deletionTimestamp)
    /// while finalizers remain.
    pub fn delete(
        &self,
        res: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> ApiResult<Plan> {
        let current = self.get(res, name)?;
        let old = current.obj.clone();
        if let Some(uid) = &opts.uid
            && Some(uid.as_str()) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = &opts.resource_version
            && Some(rv.as_str()) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&old, "resourceVersion").unwrap_or_default()
                ),
            ));
        }
        let mut new = (*old).clone();
        let mut fin = finalizers(&new);
        match opts.propagation.as_deref() {
            Some("Foreground") if !fin.iter().any(|f| f == "foregroundDeletion") => {
                fin.push("foregroundDeletion".into())
            }
            Some("Orphan") if !fin.iter().any(|f| f == "orphan") => fin.push("orphan".into()),
            None | Some("Background") | Some("Foreground") | Some("Orphan") => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    res,
                    name,
                    vec![Cause::not_supported(
                        "propagationPolicy",
                        &json!(other),
                        &[json!("Foreground"), json!("Background"), json!("Orphan")],
                    )],
                ));
            }
        }
        let is_namespace = res.kind == "Namespace" && res.group.is_empty();
        if is_namespace {
            new["status"]["phase"] = json!("Terminating");
        }
        let key = State::key(res, ns, name);
        if opts.dry_run {
            return Ok(Plan::Done(current));
        }
        if fin.is_empty() && !is_namespace {
            return Ok(Plan::Write(Pending::new(key, Some(old), new, true)));
        }
        set_finalizers(&mut new, &fin);
        let meta = meta_mut(&mut new);
        if !meta.contains_key("deletionTimestamp") {
            meta.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
        }
        if new == *old {
            return Ok(Plan::Done(current));
        }
        Ok(Plan::Write(Pending::new(key, Some(old), new, false)))
    }

    /// PUT on the main resource or `/status`.
    pub fn update(
        &self,
        res: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        status: bool,
        body: Value,
        opts: &WriteOpts,
    ) -> ApiResult<Plan> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        self.check_kind(res, &body)?;
        State::check_name(res, &body, name)?;
        let current = self.get(res, name)?;
        let old = current.obj.clone();
        if let Some(rv) = meta_str(&body, "resourceVersion").filter(|r| !r.is_empty())
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::stale(res, name));
        }
        plan_finish(
            res,
            ns,
            Some(&current),
            body,
            status,
            Managed::Update(opts.manager.clone()),
            opts,
        )
    }

    /// PATCH with any of the four patch types; apply creates a missing object.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        res: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        status: bool,
        ptype: PatchType,
        body: &[u8],
        opts: &WriteOpts,
    ) -> ApiResult<Plan> {
        if ptype == PatchType::Apply {
            return self.apply(res, ns, name, status, body, opts);
        }
        if ptype == PatchType::Strategic && res.custom {
            return Err(ApiError::unsupported_media_type(
                "application/strategic-merge-patch+json",
            ));
        }
        let current = self.get(res, name)?;
        let old = current.obj.clone();
        let mut doc = (*old).clone();
        match ptype {
            PatchType::Merge | PatchType::Strategic => {
                let patch = parse_body(body, false)?;
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                if let Some(rv) = meta_str(&patch, "resourceVersion")
                    && Some(rv) != meta_str(&old, "resourceVersion")
                {
                    return Err(ApiError::stale(res, name));
                }
                if ptype == PatchType::Merge {
                    json_patch::merge(&mut doc, &patch);
                } else {
                    strategic_merge(&mut doc, &patch, "")?;
                }
            }
            PatchType::Json => {
                let ops: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
                    ApiError::bad_request(format!("error decoding JSON patch: {e}"))
                })?;
                apply_json_patch(&mut doc, &ops).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "the server rejected our request due to an error in our request: {e}"
                        ),
                    )
                })?;
            }
            PatchType::Apply => {}
        }
        // A patch may not rename the object.
        State::check_name(res, &doc, name)?;
        plan_finish(
            res,
            ns,
            Some(&current),
            doc,
            status,
            Managed::Update(opts.manager.clone()),
            opts,
        )
    }

    fn apply(
        &self,
        res: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        status: bool,
        body: &[u8],
        opts: &WriteOpts,
    ) -> ApiResult<Plan> {
        if opts.manager.is_empty() {
            return Err(ApiError::invalid(
                res,
                name,
                vec![Cause::required(
                    "fieldManager",
                    "is required for apply patch",
                )],
            ));
        }
        let mut applied = parse_body(body, true)?;
        if !applied.is_object() {
            return Err(ApiError::bad_request(
                "an apply configuration must be an object",
            ));
        }
        if applied["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
            || applied["kind"].as_str().unwrap_or_default().is_empty()
        {
            return Err(ApiError::bad_request(
                "apply configurations must set apiVersion and kind",
            ));
        }
        self.check_kind(res, &applied)?;
        State::check_name(res, &applied, name)?;
        let named = meta_str(&applied, "name").is_some_and(|n| !n.is_empty());
        if res.namespaced
            && let (Some(b), Some(p)) = (meta_str(&applied, "namespace"), ns)
            && !b.is_empty()
            && b != p
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        if res.custom {
            // Unlike a create or an update, an apply does not prune: a field the
            // schema does not declare fails the typed conversion (500, no reason).
            let undeclared = validation::undeclared_fields(res, &applied);
            if !undeclared.is_empty() {
                let errs: Vec<String> = undeclared
                    .iter()
                    .map(|p| format!(".{p}: field not declared in schema"))
                    .collect();
                let errs = match errs.as_slice() {
                    [one] => one.clone(),
                    many => format!("errors:\n  {}", many.join("\n  ")),
                };
                return Err(ApiError::new(
                    500,
                    "",
                    format!(
                        "failed to create typed patch object ({}/{}; {}, Kind={}): {errs}",
                        meta_str(&applied, "namespace").unwrap_or_default(),
                        meta_str(&applied, "name").unwrap_or_default(),
                        res.api_version(),
                        res.kind
                    ),
                ));
            }
        }
        let scope = scope_for(res, status);
        // Only the part of the object this endpoint writes counts.
        if let Some(m) = applied.as_object_mut() {
            match scope {
                Scope::Main => {
                    m.remove("status");
                }
                Scope::Status => m.retain(|k, _| {
                    matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status")
                }),
                Scope::All => {}
            }
        }
        let rv_pre = meta_str(&applied, "resourceVersion").map(str::to_string);
        {
            let meta = meta_mut(&mut applied);
            meta.remove("resourceVersion");
            meta.remove("managedFields");
            meta.insert("name".into(), json!(name));
            if res.namespaced
                && let Some(n) = ns
            {
                meta.insert("namespace".into(), json!(n));
            }
        }
        if status && let Some(m) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
            m.retain(|k, _| k == "name" || k == "namespace");
        }
        let tracker = Tracker::new(res.schema.as_ref(), scope);
        let new_set = tracker.members(&applied);
        let sub = if status { "status" } else { "" };
        let now = now_rfc3339();
        let mine =
            |e: &Entry| e.manager == opts.manager && e.operation == "Apply" && e.subresource == sub;
        let current = match self.get(res, name) {
            Ok(o) => o,
            Err(_) => {
                if status {
                    return Err(ApiError::not_found(res, name));
                }
                if !named {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({name} based on URL) was undeterminable: name must be provided"
                    )));
                }
                if rv_pre.is_some() {
                    return Err(ApiError::conflict(
                        res,
                        name,
                        "the object has been modified; please apply your changes to the latest version and try again",
                    ));
                }
                self.check_namespace(res, ns)?;
                let entry = Entry {
                    manager: opts.manager.clone(),
                    operation: "Apply".into(),
                    api_version: res.api_version(),
                    time: now,
                    subresource: sub.into(),
                    set: new_set,
                    read_from: None,
                };
                return plan_finish(
                    res,
                    ns,
                    None,
                    applied,
                    false,
                    Managed::Apply(vec![entry]),
                    opts,
                );
            }
        };
        let old = current.obj.clone();
        if let Some(rv) = rv_pre
            && Some(rv.as_str()) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::stale(res, name));
        }
        let mut entries = fields::read_entries(&old);
        if entries.is_empty() {
            let all = Tracker::new(res.schema.as_ref(), Scope::All).members(&old);
            if !all.is_empty() {
                entries.push(Entry {
                    manager: "before-first-apply".into(),
                    operation: "Update".into(),
                    api_version: res.api_version(),
                    time: now.clone(),
                    subresource: String::new(),
                    set: all,
                    read_from: None,
                });
            }
        }
        let mut merged = (*old).clone();
        if let Some(m) = merged.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
        tracker.merge(&mut merged, &applied);
        // Conflicts: fields another manager owns whose value this apply changes.
        let mut conflicts: Vec<(usize, fields::Path)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if mine(e) || e.manager == opts.manager {
                continue;
            }
            for p in new_set.intersection(&e.set) {
                if fields::changed(Some(&old), &merged, p) {
                    conflicts.push((i, p.clone()));
                }
            }
        }
        if !conflicts.is_empty() {
            if !opts.force {
                return Err(apply_conflict(res, name, &entries, &conflicts));
            }
            for (i, p) in &conflicts {
                entries[*i].set.remove(p);
                entries[*i].changed();
            }
        }
        // Fields this manager applied before and no longer applies go away,
        // unless another manager also owns them.
        if let Some(prev) = entries.iter().find(|e| mine(e)).map(|e| &e.set) {
            for r in prev.difference(&new_set) {
                let co_owned = entries
                    .iter()
                    .any(|e| !mine(e) && fields::owns_within(&e.set, r));
                if !co_owned {
                    fields::remove_at(&mut merged, r);
                }
            }
        }
        match entries.iter_mut().find(|e| mine(e)) {
            Some(e) => {
                if e.set != new_set {
                    e.set = new_set;
                    e.time = now;
                    e.changed();
                }
            }
            None => entries.push(Entry {
                manager: opts.manager.clone(),
                operation: "Apply".into(),
                api_version: res.api_version(),
                time: now,
                subresource: sub.into(),
                set: new_set,
                read_from: None,
            }),
        }
        plan_finish(
            res,
            ns,
            Some(&current),
            merged,
            status,
            Managed::Apply(entries),
            opts,
        )
    }
}

/// The common tail of every write: server-owned metadata, subresource
/// scoping, validation, managed fields, generation, no-op detection, commit.
#[allow(clippy::too_many_arguments)]
fn plan_finish(
    res: &ResourceDef,
    ns: Option<&str>,
    current: Option<&Stored>,
    mut new: Value,
    status: bool,
    managed: Managed,
    opts: &WriteOpts,
) -> ApiResult<Plan> {
    let old = current.map(|c| c.obj.clone());
    let now = now_rfc3339();
    if let Some(m) = new.as_object_mut() {
        m.insert("apiVersion".into(), json!(res.api_version()));
        m.insert("kind".into(), json!(res.kind));
    }
    match &old {
        Some(old) => {
            if res.status {
                if status {
                    let st = new.get("status").cloned();
                    new = (**old).clone();
                    if let Some(m) = new.as_object_mut() {
                        m.insert("apiVersion".into(), json!(res.api_version()));
                        match st {
                            Some(s) => m.insert("status".into(), s),
                            None => m.remove("status"),
                        };
                    }
                } else if let Some(m) = new.as_object_mut() {
                    match old.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
            }
            let old_meta = &old["metadata"];
            let meta = meta_mut(&mut new);
            for k in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ] {
                match old_meta.get(k) {
                    Some(v) => meta.insert(k.into(), v.clone()),
                    None => meta.remove(k),
                };
            }
            // Rewritten from the tracked entries below.
            meta.remove("managedFields");
        }
        None => {
            if res.status
                && (res.custom || res.kind == "CustomResourceDefinition")
                && let Some(m) = new.as_object_mut()
            {
                m.remove("status");
            }
            let meta = meta_mut(&mut new);
            for k in [
                "uid",
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "managedFields",
                "selfLink",
            ] {
                meta.remove(k);
            }
            meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            meta.insert("creationTimestamp".into(), json!(now));
            if res.tracks_generation() {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
            if res.kind == "Namespace" && res.group.is_empty() {
                new["spec"] = json!({"finalizers": ["kubernetes"]});
                new["status"] = json!({"phase": "Active"});
                let name = meta_str(&new, "name").unwrap_or_default().to_string();
                let labels = meta_mut(&mut new)
                    .entry("labels")
                    .or_insert_with(|| json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
            }
            if res.kind == "CustomResourceDefinition" {
                let mut f = finalizers(&new);
                if !f.iter().any(|x| x == CRD_CLEANUP_FINALIZER) {
                    f.push(CRD_CLEANUP_FINALIZER.into());
                }
                set_finalizers(&mut new, &f);
            }
        }
    }
    let name = meta_str(&new, "name").unwrap_or_default().to_string();
    // Validation (after pruning and defaulting for custom resources).
    let mut causes = validation::validate_meta(res, &new);
    causes.extend(validation::validate_config(res, &new));
    causes.extend(validation::validate_event(res, &new));
    if res.custom {
        let mut pruned = Vec::new();
        causes.extend(validation::validate_custom(res, &mut new, &mut pruned));
        if opts.strict && !pruned.is_empty() {
            let fields: Vec<String> = pruned
                .iter()
                .map(|p| format!("unknown field \"{p}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                res.kind,
                res.version,
                res.kind,
                fields.join(", ")
            )));
        }
    }
    if res.kind == "CustomResourceDefinition" {
        causes.extend(validation::validate_crd(&new));
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(res, &name, causes));
    }
    if res.kind == "CustomResourceDefinition" {
        let names = new["spec"]["names"].clone();
        let stored: Vec<Value> = new["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["storage"].as_bool() == Some(true))
            .map(|v| v["name"].clone())
            .collect();
        let t = old
            .as_ref()
            .and_then(|o| {
                o["status"]["conditions"][0]["lastTransitionTime"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| now.clone());
        new["status"] = json!({
            "acceptedNames": names,
            "storedVersions": stored,
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": t},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": t},
            ],
        });
    }
    // Managed fields.
    let scope = scope_for(res, status);
    let entries = match managed {
        Managed::Apply(entries) => entries,
        Managed::Keep => fields::read_entries(old.as_deref().unwrap_or(&Value::Null)),
        Managed::Update(manager) => {
            let tracker = Tracker::new(res.schema.as_ref(), scope);
            let mut entries = old.as_deref().map(fields::read_entries).unwrap_or_default();
            let old_members = old
                .as_deref()
                .map(|o| tracker.members(o))
                .unwrap_or_default();
            let new_members = tracker.members(&new);
            let mut changed: FieldSet = new_members
                .iter()
                .filter(|p| fields::changed(old.as_deref(), &new, p))
                .cloned()
                .collect();
            let mut removed: FieldSet = old_members.difference(&new_members).cloned().collect();
            // Maps and lists this update creates are its own; those it removes are nobody's.
            let old_nodes = old.as_deref().map(|o| tracker.nodes(o)).unwrap_or_default();
            let new_nodes = tracker.nodes(&new);
            changed.extend(new_nodes.difference(&old_nodes).cloned());
            removed.extend(old_nodes.difference(&new_nodes).cloned());
            for e in entries.iter_mut() {
                let before = e.set.len();
                e.set
                    .retain(|p| !changed.contains(p) && !removed.contains(p));
                if e.set.len() != before {
                    e.changed();
                }
            }
            let sub = if status { "status" } else { "" };
            if !changed.is_empty() {
                match entries.iter_mut().find(|e| {
                    e.manager == manager && e.operation == "Update" && e.subresource == sub
                }) {
                    Some(e) => {
                        e.set.extend(changed);
                        e.time = now.clone();
                        e.changed();
                    }
                    None => entries.push(Entry {
                        manager: manager.clone(),
                        operation: "Update".into(),
                        api_version: res.api_version(),
                        time: now.clone(),
                        subresource: sub.into(),
                        set: changed,
                        read_from: None,
                    }),
                }
            }
            fields::cap_update_managers(&mut entries, fields::MAX_UPDATE_MANAGERS);
            entries
        }
    };
    fields::write_entries(&mut new, &entries, old.as_deref());
    // Generation moves on spec changes only (everything but metadata and status).
    if let Some(old) = &old
        && res.tracks_generation()
    {
        // Compared in place: cloning both objects would cost more than the write.
        let spec_eq = |a: &Value, b: &Value| -> bool {
            let skip = |k: &str| matches!(k, "metadata" | "status" | "apiVersion" | "kind");
            match (a.as_object(), b.as_object()) {
                (Some(a), Some(b)) => {
                    a.keys().filter(|k| !skip(k)).count() == b.keys().filter(|k| !skip(k)).count()
                        && a.iter()
                            .filter(|(k, _)| !skip(k))
                            .all(|(k, v)| b.get(k) == Some(v))
                }
                _ => a == b,
            }
        };
        let changed = if res.status {
            !spec_eq(old, &new)
        } else {
            !spec_eq(old, &new) || old.get("status") != new.get("status")
        };
        if changed {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            meta_mut(&mut new).insert("generation".into(), json!(g));
        }
    }
    let key = State::key(res, ns, &name);
    if let Some(current) = current {
        // The real server skips the storage write when nothing changed.
        if *current.obj == new {
            return Ok(Plan::Done(current.clone()));
        }
    }
    if opts.dry_run {
        return Ok(Plan::Done(Stored::serialize(new)));
    }
    let deleting = new["metadata"]["deletionTimestamp"].is_string();
    let remove = deleting && finalizers(&new).is_empty();
    Ok(Plan::Write(Pending::new(key, old, new, remove)))
}

impl State {
    /// DELETE under the store lock (the garbage collector, `deletecollection`, the direct test API).
    pub fn delete(
        &mut self,
        res: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> ApiResult<Stored> {
        let plan = self.view(res, ns, name).delete(res, ns, name, opts)?;
        Ok(self.run(res, plan))
    }

    pub fn delete_collection(
        &mut self,
        res: &ResourceDef,
        ns: Option<&str>,
        sel: &Selectors,
        opts: &DeleteOpts,
    ) -> ApiResult<Vec<Stored>> {
        let items = self.list(res, ns, sel);
        let mut out = Vec::new();
        for o in items {
            let name = meta_str(&o.obj, "name").unwrap_or_default().to_string();
            let ons = meta_str(&o.obj, "namespace").map(str::to_string);
            out.push(self.delete(res, ons.as_deref(), &name, opts)?);
        }
        Ok(out)
    }

    fn def_for_storage(&self, storage: &str) -> Option<Arc<ResourceDef>> {
        self.registry.by_storage(storage).into_iter().next()
    }

    fn drop_finalizer(&mut self, key: &Key, finalizer: &str) {
        let Some(obj) = self.objects.get(key).map(|s| s.obj.clone()) else {
            return;
        };
        let Some(res) = self.def_for_storage(&key.0) else {
            return;
        };
        let mut new = (*obj).clone();
        let fin: Vec<String> = finalizers(&new)
            .into_iter()
            .filter(|f| f != finalizer)
            .collect();
        set_finalizers(&mut new, &fin);
        let ns = (!key.1.is_empty()).then_some(key.1.clone());
        let opts = WriteOpts {
            manager: "kube-controller-manager".into(),
            ..Default::default()
        };
        let current = self.objects.get(key).cloned();
        if let Ok(Plan::Write(p)) = plan_finish(
            &res,
            ns.as_deref(),
            current.as_ref(),
            new,
            false,
            Managed::Keep,
            &opts,
        ) {
            self.execute(&res, p);
        }
    }

    fn delete_key(&mut self, key: &Key) {
        let Some(res) = self.def_for_storage(&key.0) else {
            // The resource is no longer served (its CRD is gone): drop the object.
            let any = self.registry.all().next().cloned();
            if let Some(o) = self.objects.get(key).map(|s| s.obj.clone())
                && let Some(def) = any
            {
                let mut phantom = (*def).clone();
                phantom.storage = key.0.clone();
                self.remove(&phantom, key.clone(), (*o).clone());
            }
            return;
        };
        let ns = (!key.1.is_empty()).then_some(key.1.clone());
        let _ = self.delete(&res, ns.as_deref(), &key.2, &DeleteOpts::default());
    }

    /// Of `objects`, whether any exists, and up to `limit` of those not yet being deleted.
    fn to_delete<'k>(
        objects: impl Iterator<Item = (&'k Key, &'k Stored)>,
        limit: usize,
    ) -> (bool, Vec<Key>) {
        let mut any = false;
        let mut out = Vec::new();
        for (k, o) in objects {
            any = true;
            if out.len() < limit && !o.obj["metadata"]["deletionTimestamp"].is_string() {
                out.push(k.clone());
            }
        }
        (any, out)
    }

    /// Whether all garbage-collector work is done (nothing queued, nothing waiting).
    pub fn gc_idle(&self) -> bool {
        self.gc.check.is_empty() && self.gc.deleting.is_empty()
    }

    /// One slice of the namespace, CRD-cleanup and garbage collectors, at most
    /// about `budget` storage writes, so the caller can let requests in
    /// between slices. Its cost follows the work queued by writes (owners
    /// removed, objects being deleted), never the number of stored objects.
    /// Returns whether more work may remain.
    pub fn gc_step(&mut self, budget: u64) -> bool {
        let rv0 = self.rv;
        let left = |st: &Self| budget.saturating_sub(st.rv - rv0) as usize;
        // Dependents whose owners are all gone are deleted; dangling references are removed.
        while left(self) > 0 {
            let Some(key) = self.gc.check.pop_first() else {
                break;
            };
            self.check_owners(&key);
        }
        let waiting: Vec<Key> = self.gc.deleting.iter().cloned().collect();
        for key in waiting {
            if left(self) == 0 {
                break;
            }
            self.finish_deletion(&key, left(self));
        }
        !self.gc.check.is_empty() || self.rv != rv0
    }

    fn check_owners(&mut self, key: &Key) {
        let Some(obj) = self.objects.get(key).map(|s| s.obj.clone()) else {
            return;
        };
        let Some(refs) = obj["metadata"]["ownerReferences"].as_array() else {
            return;
        };
        let missing: Vec<String> = refs
            .iter()
            .filter_map(|r| r["uid"].as_str())
            .filter(|u| !self.gc.uids.contains_key(*u))
            .map(str::to_string)
            .collect();
        if missing.is_empty() {
            return;
        }
        if missing.len() == refs.len() {
            if !obj["metadata"]["deletionTimestamp"].is_string() {
                self.delete_key(key);
            }
        } else {
            self.strip_owner_refs(key, &missing);
        }
    }

    /// Moves the deletion of a namespace, a CRD or an owner with the `orphan`
    /// or `foregroundDeletion` finalizer forward, with at most `limit` deletions.
    fn finish_deletion(&mut self, key: &Key, limit: usize) {
        let Some(obj) = self.objects.get(key).map(|s| s.obj.clone()) else {
            return;
        };
        let fin = finalizers(&obj);
        if key.0 == self.registry.namespace_def().storage {
            let ns_storage = self.registry.namespace_def().storage.clone();
            let storages = self.storages();
            let contents = storages
                .iter()
                .filter(|s| **s != ns_storage)
                .flat_map(|s| self.range_of(s, Some(&key.2)));
            let (any, doomed) = Self::to_delete(contents, limit);
            if !any {
                if let Some(res) = self.def_for_storage(&key.0) {
                    self.remove(&res, key.clone(), (*obj).clone());
                }
            } else {
                for k in doomed {
                    self.delete_key(&k);
                }
            }
            return;
        }
        if key.0 == self.registry.crd_def().storage
            && fin.iter().any(|f| f == CRD_CLEANUP_FINALIZER)
        {
            let storage = format!(
                "{}/{}",
                obj["spec"]["group"].as_str().unwrap_or_default(),
                obj["spec"]["names"]["plural"].as_str().unwrap_or_default()
            );
            let (any, doomed) = Self::to_delete(self.range_of(&storage, None), limit);
            if !any {
                self.drop_finalizer(key, CRD_CLEANUP_FINALIZER);
            } else {
                for k in doomed {
                    self.delete_key(&k);
                }
            }
            return;
        }
        let uid = meta_str(&obj, "uid").unwrap_or_default().to_string();
        let dependents: Vec<Key> = self
            .gc
            .dependents
            .get(&uid)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default();
        if fin.iter().any(|f| f == "orphan") {
            for k in &dependents {
                self.strip_owner_refs(k, std::slice::from_ref(&uid));
            }
            self.drop_finalizer(key, "orphan");
        } else if fin.iter().any(|f| f == "foregroundDeletion") {
            // Every dependent is deleted; the owner waits only for those whose
            // reference to it says `blockOwnerDeletion: true`.
            let blocks = |o: &Stored| {
                o.obj["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r["uid"] == uid.as_str() && r["blockOwnerDeletion"] == true)
            };
            let deps: Vec<(&Key, &Stored)> = dependents
                .iter()
                .filter_map(|k| self.objects.get_key_value(k))
                .collect();
            let blocked = deps.iter().any(|(_, o)| blocks(o));
            let (_, doomed) = Self::to_delete(deps.into_iter(), limit);
            for k in doomed {
                self.delete_key(&k);
            }
            if !blocked {
                self.drop_finalizer(key, "foregroundDeletion");
            }
        }
    }

    fn strip_owner_refs(&mut self, key: &Key, uids: &[String]) {
        let Some(obj) = self.objects.get(key).map(|s| s.obj.clone()) else {
            return;
        };
        let Some(res) = self.def_for_storage(&key.0) else {
            return;
        };
        let mut new = (*obj).clone();
        if let Some(refs) = new["metadata"]["ownerReferences"].as_array_mut() {
            refs.retain(|r| {
                !r["uid"]
                    .as_str()
                    .is_some_and(|u| uids.iter().any(|x| x == u))
            });
            if refs.is_empty()
                && let Some(m) = new["metadata"].as_object_mut()
            {
                m.remove("ownerReferences");
            }
        }
        let ns = (!key.1.is_empty()).then_some(key.1.clone());
        let opts = WriteOpts {
            manager: "kube-controller-manager".into(),
            ..Default::default()
        };
        let current = self.objects.get(key).cloned();
        if let Ok(Plan::Write(p)) = plan_finish(
            &res,
            ns.as_deref(),
            current.as_ref(),
            new,
            false,
            Managed::Update("kube-controller-manager".into()),
            &opts,
        ) {
            self.execute(&res, p);
        }
    }
}

/// RFC 6902 as kube-apiserver applies it (evanphx/json-patch): a `test` for
/// `null` succeeds on a missing path (kube-runtime's finalizer helper relies on it).
fn apply_json_patch(
    doc: &mut Value,
    ops: &json_patch::Patch,
) -> Result<(), json_patch::PatchError> {
    for op in &ops.0 {
        if let json_patch::PatchOperation::Test(t) = op
            && t.value.is_null()
            && doc.pointer(t.path.as_str()).is_none()
        {
            continue;
        }
        json_patch::patch(doc, std::slice::from_ref(op))?;
    }
    Ok(())
}

fn apply_conflict(
    res: &ResourceDef,
    name: &str,
    entries: &[Entry],
    conflicts: &[(usize, fields::Path)],
) -> ApiError {
    let n = conflicts.len();
    let mut by_manager: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut causes = Vec::new();
    for (i, p) in conflicts {
        let e = &entries[*i];
        let field = fields::render_path(p);
        causes.push(json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\" using {}", e.manager, e.api_version), "field": field}));
        by_manager
            .entry(format!("\"{}\" using {}", e.manager, e.api_version))
            .or_default()
            .push(field);
    }
    let message = if n == 1 {
        let (m, fs) = by_manager
            .iter()
            .next()
            .map(|(m, f)| (m.clone(), f.clone()))
            .unwrap_or_default();
        format!(
            "Apply failed with 1 conflict: conflict with {m}: {}",
            fs.join("")
        )
    } else {
        let mut s = format!("Apply failed with {n} conflicts: ");
        for (m, fs) in &by_manager {
            s.push_str(&format!("conflicts with {m}:"));
            for f in fs {
                s.push_str(&format!("\n- {f}"));
            }
            s.push('\n');
        }
        s.trim_end().to_string()
    };
    let mut d = json!({"name": name, "kind": res.plural, "causes": causes});
    if !res.group.is_empty() {
        d["group"] = json!(res.group);
    }
    ApiError {
        code: 409,
        reason: "Conflict",
        message,
        details: Some(d),
    }
}

/// Strategic merge patch for the built-in kinds served here: a JSON merge
/// patch plus the `$patch`/`$retainKeys`/`$setElementOrder`/
/// `$deleteFromPrimitiveList` directives, `ownerReferences` merged by `uid`
/// and `finalizers` merged as a set (their `patchStrategy` in the Go types).
pub fn strategic_merge(doc: &mut Value, patch: &Value, path: &str) -> ApiResult<()> {
    let Some(p) = patch.as_object() else {
        *doc = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut c = patch.clone();
            if let Some(m) = c.as_object_mut() {
                m.remove("$patch");
            }
            *doc = c;
            return Ok(());
        }
        Some("delete") => {
            *doc = Value::Null;
            return Ok(());
        }
        _ => {}
    }
    if !doc.is_object() {
        *doc = json!({});
    }
    let Some(d) = doc.as_object_mut() else {
        return Ok(());
    };
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(list), Some(del)) =
                (d.get_mut(field).and_then(Value::as_array_mut), v.as_array())
            {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let child_path = format!("{path}.{k}");
        if v.is_null() {
            d.remove(k);
            continue;
        }
        match (child_path.as_str(), v) {
            (".metadata.ownerReferences", Value::Array(items)) => {
                let cur = d.entry(k.clone()).or_insert_with(|| json!([]));
                if let Some(list) = cur.as_array_mut() {
                    for item in items {
                        let uid = &item["uid"];
                        if item["$patch"].as_str() == Some("delete") {
                            list.retain(|x| x["uid"] != *uid);
                        } else if let Some(x) = list.iter_mut().find(|x| x["uid"] == *uid) {
                            strategic_merge(x, item, &child_path)?;
                        } else {
                            list.push(item.clone());
                        }
                    }
                }
            }
            (".metadata.finalizers", Value::Array(items)) => {
                let cur = d.entry(k.clone()).or_insert_with(|| json!([]));
                if let Some(list) = cur.as_array_mut() {
                    for item in items {
                        if !list.contains(item) {
                            list.push(item.clone());
                        }
                    }
                }
            }
            (_, Value::Object(_)) => {
                let cur = d.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(cur, v, &child_path)?;
                if cur.is_null() {
                    d.remove(k);
                }
            }
            _ => {
                d.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> StoreLock {
        let (tx, _) = broadcast::channel(1024);
        StoreLock::new(State::new(1000, tx))
    }

    fn configmaps(st: &StoreLock) -> Arc<ResourceDef> {
        st.lock()
            .unwrap()
            .registry
            .find("", "v1", "configmaps")
            .unwrap()
    }

    fn opts(manager: &str) -> WriteOpts {
        WriteOpts {
            manager: manager.into(),
            ..Default::default()
        }
    }

    fn merge(
        st: &StoreLock,
        res: &ResourceDef,
        name: &str,
        patch: Value,
        manager: &str,
    ) -> ApiResult<Written> {
        let body = patch.to_string();
        write(st, res, Some("default"), name, |v| {
            v.patch(
                res,
                Some("default"),
                name,
                false,
                PatchType::Merge,
                body.as_bytes(),
                &opts(manager),
            )
        })
    }

    fn create_cm(st: &StoreLock, res: &ResourceDef, name: &str) -> Stored {
        let body = json!({"metadata": {"name": name}, "data": {"a": "1"}});
        st.lock()
            .unwrap()
            .create(res, Some("default"), body, &opts("test"))
            .unwrap()
    }

    #[test]
    fn stored_json_and_event_lines_are_the_serialized_object_with_its_resource_version() {
        let st = state();
        let res = configmaps(&st);
        let mut rx = st.lock().unwrap().tx.subscribe();
        let created = create_cm(&st, &res, "cm");
        let patched = merge(&st, &res, "cm", json!({"data": {"b": "2"}}), "m")
            .unwrap()
            .stored;
        for (s, etype) in [(&created, "ADDED"), (&patched, "MODIFIED")] {
            assert_eq!(s.json, serde_json::to_vec(&*s.obj).unwrap());
            let c = rx.try_recv().unwrap();
            assert_eq!(c.etype.as_str(), etype);
            assert_eq!(c.json, s.json);
            let want = format!(
                "{{\"type\":\"{etype}\",\"object\":{}}}\n",
                String::from_utf8_lossy(&s.json)
            );
            assert_eq!(c.line, want.as_bytes());
            assert_eq!(
                s.obj["metadata"]["resourceVersion"],
                json!(c.rv.to_string())
            );
        }
    }

    #[test]
    fn a_write_whose_object_moved_before_its_commit_is_recomputed_from_the_newer_object() {
        let st = state();
        let res = configmaps(&st);
        create_cm(&st, &res, "cm");
        let rv0 = st.lock().unwrap().rv;
        let mut attempts = 0;
        let body = json!({"data": {"c": "3"}}).to_string();
        let w = write(&st, &res, Some("default"), "cm", |v| {
            attempts += 1;
            if attempts == 1 {
                // Another writer commits between this write's read and its commit.
                merge(&st, &res, "cm", json!({"data": {"b": "2"}}), "other").unwrap();
            }
            v.patch(
                &res,
                Some("default"),
                "cm",
                false,
                PatchType::Merge,
                body.as_bytes(),
                &opts("mine"),
            )
        })
        .unwrap();
        assert_eq!(attempts, 2);
        assert_eq!(w.writes, 1);
        assert_eq!(w.stored.obj["data"], json!({"a": "1", "b": "2", "c": "3"}));
        assert_eq!(st.lock().unwrap().rv, rv0 + 2);
        let managers: Vec<String> = fields::read_entries(&w.stored.obj)
            .into_iter()
            .map(|e| e.manager)
            .collect();
        assert_eq!(managers, ["test", "other", "mine"]);
    }

    #[test]
    fn a_stale_resource_version_precondition_is_checked_against_the_object_each_attempt_reads() {
        let st = state();
        let res = configmaps(&st);
        let rv = create_cm(&st, &res, "cm").obj["metadata"]["resourceVersion"].clone();
        let mut attempts = 0;
        let body = json!({"metadata": {"resourceVersion": rv}, "data": {"c": "3"}}).to_string();
        let r = write(&st, &res, Some("default"), "cm", |v| {
            attempts += 1;
            if attempts == 1 {
                merge(&st, &res, "cm", json!({"data": {"b": "2"}}), "other").unwrap();
            }
            v.patch(
                &res,
                Some("default"),
                "cm",
                false,
                PatchType::Merge,
                body.as_bytes(),
                &opts("mine"),
            )
        });
        assert_eq!(attempts, 2);
        assert_eq!(r.unwrap_err().code, 409);
    }

    #[test]
    fn a_write_that_keeps_losing_races_is_computed_under_the_lock_and_lands() {
        let st = state();
        let res = configmaps(&st);
        create_cm(&st, &res, "cm");
        let rv0 = st.lock().unwrap().rv;
        let mut attempts = 0;
        let body = json!({"data": {"mine": "x"}}).to_string();
        let w = write(&st, &res, Some("default"), "cm", |v| {
            attempts += 1;
            // A competing write before every optimistic commit; the last
            // attempt runs with the store locked, so none can get in.
            if st.try_lock().is_some() {
                let p = json!({"data": {format!("other-{attempts}"): "y"}});
                merge(&st, &res, "cm", p, "other").unwrap();
            }
            v.patch(
                &res,
                Some("default"),
                "cm",
                false,
                PatchType::Merge,
                body.as_bytes(),
                &opts("mine"),
            )
        })
        .unwrap();
        assert_eq!(attempts, OPTIMISTIC_ATTEMPTS + 1);
        let data = w.stored.obj["data"].as_object().unwrap();
        assert_eq!(data.len(), 2 + OPTIMISTIC_ATTEMPTS);
        assert_eq!(data["mine"], "x");
        assert_eq!(st.lock().unwrap().rv, rv0 + OPTIMISTIC_ATTEMPTS as u64 + 1);
    }

    #[test]
    fn a_patch_racing_the_deletion_of_its_object_is_404_and_does_not_bring_it_back() {
        let st = state();
        let res = configmaps(&st);
        create_cm(&st, &res, "cm");
        let mut attempts = 0;
        let body = json!({"data": {"c": "3"}}).to_string();
        let r = write(&st, &res, Some("default"), "cm", |v| {
            attempts += 1;
            if attempts == 1 {
                st.lock()
                    .unwrap()
                    .delete(&res, Some("default"), "cm", &DeleteOpts::default())
                    .unwrap();
            }
            v.patch(
                &res,
                Some("default"),
                "cm",
                false,
                PatchType::Merge,
                body.as_bytes(),
                &opts("mine"),
            )
        });
        assert_eq!(attempts, 2);
        assert_eq!(r.unwrap_err().code, 404);
        let key = State::key(&res, Some("default"), "cm");
        assert!(!st.lock().unwrap().objects.contains_key(&key));
    }

    #[test]
    fn a_create_is_not_committed_into_a_namespace_that_started_terminating_after_it_read_it() {
        let st = state();
        let res = configmaps(&st);
        let nsdef = st.lock().unwrap().registry.namespace_def();
        st.lock()
            .unwrap()
            .create(
                &nsdef,
                None,
                json!({"metadata": {"name": "doomed"}}),
                &opts("t"),
            )
            .unwrap();
        let mut attempts = 0;
        let body = json!({"metadata": {"name": "late"}, "data": {"a": "1"}});
        let r = write(&st, &res, Some("doomed"), "late", |v| {
            attempts += 1;
            if attempts == 1 {
                st.lock()
                    .unwrap()
                    .delete(&nsdef, None, "doomed", &DeleteOpts::default())
                    .unwrap();
            }
            v.create(&res, Some("doomed"), body.clone(), &opts("t"))
        });
        assert_eq!(attempts, 2);
        assert_eq!(r.unwrap_err().code, 403);
        assert!(!st.lock().unwrap().objects.contains_key(&State::key(
            &res,
            Some("doomed"),
            "late"
        )));
    }
}
