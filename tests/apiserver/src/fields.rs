//! Managed fields (server-side apply field ownership), in the `FieldsV1`
//! format of `sigs.k8s.io/structured-merge-diff`: `f:<field>` for map keys,
//! `k:{"key":"value"}` for items of keyed lists, `v:<json>` for set members,
//! `.` when a list item itself is owned.
//!
//! Granularity: every map key is a field; lists are atomic unless the schema
//! says `x-kubernetes-list-type: map` (keyed by `x-kubernetes-list-map-keys`)
//! or `set`. `metadata.ownerReferences` is keyed by `uid` (each reference is
//! atomic) and `metadata.finalizers` is a set, as in the built-in schemas.
//!
//! An update also owns the maps and non-atomic lists it creates (`.` in
//! `fieldsV1`); an apply owns only what its configuration sets. At most
//! [`MAX_UPDATE_MANAGERS`] update entries are kept: the oldest are merged
//! into `ancient-changes`, like kube-apiserver's `capManagersManager`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pe {
    /// A map key / struct field.
    F(String),
    /// A keyed list item, identified by the canonical JSON of its key fields.
    K(String),
    /// A set member, identified by its canonical JSON.
    V(String),
}

pub type Path = Vec<Pe>;
pub type FieldSet = BTreeSet<Path>;

#[derive(Debug, Clone, PartialEq)]
pub enum ListKind {
    Atomic,
    Set,
    Map(Vec<String>),
}

fn meta_schema() -> Value {
    json!({"type": "object", "properties": {
        "ownerReferences": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uid"],
            "items": {"type": "object", "x-kubernetes-map-type": "atomic"}},
        "finalizers": {"type": "array", "x-kubernetes-list-type": "set"},
        "labels": {"type": "object"},
        "annotations": {"type": "object"},
    }})
}

/// Navigates a structural schema alongside the object.
#[derive(Clone, Copy)]
pub struct Schema<'a>(pub Option<&'a Value>);

impl<'a> Schema<'a> {
    pub fn child(self, key: &str) -> Schema<'a> {
        let Some(s) = self.0 else { return Schema(None) };
        if let Some(p) = s.get("properties").and_then(|p| p.get(key)) {
            return Schema(Some(p));
        }
        match s.get("additionalProperties") {
            Some(a) if a.is_object() => Schema(Some(a)),
            _ => Schema(None),
        }
    }

    pub fn items(self) -> Schema<'a> {
        Schema(self.0.and_then(|s| s.get("items")))
    }

    pub fn list_kind(self) -> ListKind {
        let Some(s) = self.0 else {
            return ListKind::Atomic;
        };
        match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => ListKind::Set,
            Some("map") => ListKind::Map(
                s.get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|k| k.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            _ => ListKind::Atomic,
        }
    }
}

/// Which top-level part of an object a write is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything (resources without a status subresource).
    All,
    /// Everything but `status`.
    Main,
    /// Only `status`.
    Status,
}

const SERVER_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// Computes field ownership paths for objects of one resource.
pub struct Tracker<'a> {
    pub schema: Option<&'a Value>,
    pub scope: Scope,
    meta: Value,
}

fn canonical(v: &Value) -> String {
    // serde_json's Map is ordered by key, so this is the canonical form.
    v.to_string()
}

impl<'a> Tracker<'a> {
    pub fn new(schema: Option<&'a Value>, scope: Scope) -> Self {
        Self {
            schema,
            scope,
            meta: meta_schema(),
        }
    }

    fn root_child(&self, key: &str) -> Schema<'_> {
        if key == "metadata" {
            Schema(Some(&self.meta))
        } else {
            Schema(self.schema).child(key)
        }
    }

    /// Leaf and list-item paths present in `obj`.
    pub fn members(&self, obj: &Value) -> FieldSet {
        self.walk(obj, collect)
    }

    /// Paths of the maps and non-atomic lists in `obj` below the top level
    /// (`data`, `metadata.labels`, `spec`, `metadata.finalizers`, ...): an
    /// update that creates one owns it.
    pub fn nodes(&self, obj: &Value) -> FieldSet {
        self.walk(obj, collect_nodes)
    }

    /// Runs `collect` on each tracked top-level field of `obj` (on each
    /// field of `metadata` but the server's own) with its path and schema.
    fn walk(
        &self,
        obj: &Value,
        collect: fn(&Value, Schema<'_>, &mut Path, &mut FieldSet),
    ) -> FieldSet {
        let mut out = FieldSet::new();
        let Some(m) = obj.as_object() else { return out };
        for (k, v) in m {
            if !self.tracked(k) {
                continue;
            }
            let mut path = vec![Pe::F(k.clone())];
            if k == "metadata" {
                for (mk, mv) in v.as_object().into_iter().flatten() {
                    if SERVER_META.contains(&mk.as_str()) {
                        continue;
                    }
                    path.push(Pe::F(mk.clone()));
                    let schema = self.root_child("metadata").child(mk);
                    collect(mv, schema, &mut path, &mut out);
                    path.pop();
                }
                continue;
            }
            collect(v, self.root_child(k), &mut path, &mut out);
        }
        out
    }

    fn tracked(&self, k: &str) -> bool {
        !matches!(
            (self.scope, k),
            (_, "apiVersion" | "kind") | (Scope::Main, "status")
        ) && (self.scope != Scope::Status || k == "status")
    }

    /// Deep-merges an applied configuration into the live object.
    pub fn merge(&self, live: &mut Value, applied: &Value) {
        let (Some(l), Some(a)) = (live.as_object_mut(), applied.as_object()) else {
            *live = applied.clone();
            return;
        };
        for (k, av) in a {
            let schema = self.root_child(k);
            match l.get_mut(k) {
                Some(lv) => merge_value(lv, av, schema),
                None => {
                    l.insert(k.clone(), av.clone());
                }
            }
        }
    }
}

fn key_of(item: &Value, keys: &[String]) -> Option<String> {
    let obj = item.as_object()?;
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), obj.get(k)?.clone());
    }
    Some(canonical(&Value::Object(m)))
}

fn collect(v: &Value, schema: Schema<'_>, path: &mut Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                path.push(Pe::F(k.clone()));
                collect(c, schema.child(k), path, out);
                path.pop();
            }
        }
        Value::Array(items) => match schema.list_kind() {
            ListKind::Map(keys)
                if !keys.is_empty() && items.iter().all(|i| key_of(i, &keys).is_some()) =>
            {
                for item in items {
                    let Some(key) = key_of(item, &keys) else {
                        continue;
                    };
                    path.push(Pe::K(key));
                    out.insert(path.clone());
                    let atomic = schema
                        .items()
                        .0
                        .and_then(|s| s.get("x-kubernetes-map-type"))
                        .and_then(Value::as_str)
                        == Some("atomic");
                    if let Some(m) = item.as_object().filter(|_| !atomic) {
                        for (k, c) in m {
                            path.push(Pe::F(k.clone()));
                            collect(c, schema.items().child(k), path, out);
                            path.pop();
                        }
                    }
                    path.pop();
                }
            }
            ListKind::Set => {
                for item in items {
                    path.push(Pe::V(canonical(item)));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            _ => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

fn collect_nodes(v: &Value, schema: Schema<'_>, path: &mut Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.insert(path.clone());
            for (k, c) in m {
                path.push(Pe::F(k.clone()));
                collect_nodes(c, schema.child(k), path, out);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => match schema.list_kind() {
            ListKind::Set => {
                out.insert(path.clone());
            }
            ListKind::Map(keys) if !keys.is_empty() => {
                out.insert(path.clone());
                for item in items {
                    if let (Some(key), Some(m)) = (key_of(item, &keys), item.as_object()) {
                        path.push(Pe::K(key));
                        for (k, c) in m {
                            path.push(Pe::F(k.clone()));
                            collect_nodes(c, schema.items().child(k), path, out);
                            path.pop();
                        }
                        path.pop();
                    }
                }
            }
            _ => {}
        },
        _ => {}
    }
}

/// Most update (non-apply) entries an object keeps, as in kube-apiserver.
pub const MAX_UPDATE_MANAGERS: usize = 10;
const ANCIENT_CHANGES: &str = "ancient-changes";

/// Merges the oldest update entries (by time, then manager) into one
/// `ancient-changes` entry per API version until at most `max` update
/// entries are left; the same steps as kube-apiserver's `capUpdateManagers`.
pub fn cap_update_managers(entries: &mut Vec<Entry>, max: usize) {
    let mut updaters: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].operation != "Apply")
        .collect();
    if updaters.len() <= max {
        return;
    }
    // kube-apiserver orders equal times by the manager identifier, the JSON
    // of {manager, operation, apiVersion, subresource}.
    let ident = |e: &Entry| {
        let sub = if e.subresource.is_empty() {
            String::new()
        } else {
            format!(",\"subresource\":{}", json!(e.subresource))
        };
        format!(
            "{{\"manager\":{},\"operation\":\"Update\",\"apiVersion\":{}{sub}}}",
            json!(e.manager),
            json!(e.api_version)
        )
    };
    updaters.sort_by(|&a, &b| {
        (&entries[a].time, ident(&entries[a])).cmp(&(&entries[b].time, ident(&entries[b])))
    });
    let is_bucket = |e: &Entry, version: &str| {
        e.manager == ANCIENT_CHANGES
            && e.operation == "Update"
            && e.subresource.is_empty()
            && e.api_version == version
    };
    let mut first_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut merged: Vec<usize> = Vec::new();
    let mut left = updaters.len();
    for &i in &updaters {
        if left <= max {
            break;
        }
        let version = entries[i].api_version.clone();
        let Some(&first) = first_of.get(&version) else {
            first_of.insert(version, i);
            continue;
        };
        let bucket = (0..entries.len())
            .find(|&b| !merged.contains(&b) && is_bucket(&entries[b], &version))
            .unwrap_or_else(|| {
                let f = &mut entries[first];
                f.manager = ANCIENT_CHANGES.into();
                f.subresource.clear();
                f.changed();
                first
            });
        if bucket == i {
            continue;
        }
        let set = std::mem::take(&mut entries[i].set);
        let time = entries[i].time.clone();
        let b = &mut entries[bucket];
        b.set.extend(set);
        b.time = time;
        b.changed();
        merged.push(i);
        left -= 1;
    }
    merged.sort_unstable();
    for i in merged.into_iter().rev() {
        entries.remove(i);
    }
}

fn merge_value(live: &mut Value, applied: &Value, schema: Schema<'_>) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, av) in a {
                match l.get_mut(k) {
                    Some(lv) => merge_value(lv, av, schema.child(k)),
                    None => {
                        l.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(a)) => match schema.list_kind() {
            ListKind::Map(keys) if !keys.is_empty() => {
                for item in a {
                    let key = key_of(item, &keys);
                    match l
                        .iter_mut()
                        .find(|li| key.is_some() && key_of(li, &keys) == key)
                    {
                        Some(li) => merge_value(li, item, schema.items()),
                        None => l.push(item.clone()),
                    }
                }
            }
            ListKind::Set => {
                for item in a {
                    if !l.contains(item) {
                        l.push(item.clone());
                    }
                }
            }
            _ => *l = a.clone(),
        },
        (l, a) => *l = a.clone(),
    }
}

fn find_item(items: &[Value], pe: &Pe) -> Option<usize> {
    match pe {
        Pe::K(key) => {
            let want: Map<String, Value> = serde_json::from_str(key).ok()?;
            items
                .iter()
                .position(|i| want.iter().all(|(k, v)| i.get(k) == Some(v)))
        }
        Pe::V(val) => {
            let want: Value = serde_json::from_str(val).ok()?;
            items.iter().position(|i| *i == want)
        }
        Pe::F(_) => None,
    }
}

/// The value at `path`, if present.
pub fn get_at<'v>(obj: &'v Value, path: &[Pe]) -> Option<&'v Value> {
    let mut cur = obj;
    for pe in path {
        cur = match pe {
            Pe::F(k) => cur.as_object()?.get(k)?,
            _ => {
                let items = cur.as_array()?;
                &items[find_item(items, pe)?]
            }
        };
    }
    Some(cur)
}

/// Removes the field or list item at `path`, if present.
pub fn remove_at(obj: &mut Value, path: &[Pe]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for pe in parent {
        let next = match pe {
            Pe::F(k) => cur.as_object_mut().and_then(|m| m.get_mut(k)),
            _ => match cur.as_array_mut() {
                Some(items) => match find_item(items, pe) {
                    Some(i) => items.get_mut(i),
                    None => None,
                },
                None => None,
            },
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        Pe::F(k) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(k);
            }
        }
        _ => {
            if let Some(items) = cur.as_array_mut()
                && let Some(i) = find_item(items, last)
            {
                items.remove(i);
            }
        }
    }
}

/// Whether the value at a member path differs between two objects. List items
/// and set members count as changed only when they appear.
pub fn changed(old: Option<&Value>, new: &Value, path: &[Pe]) -> bool {
    let o = old.and_then(|o| get_at(o, path));
    match path.last() {
        Some(Pe::K(_)) | Some(Pe::V(_)) => o.is_none(),
        _ => o != get_at(new, path),
    }
}

fn pe_key(pe: &Pe) -> String {
    match pe {
        Pe::F(k) => format!("f:{k}"),
        Pe::K(k) => format!("k:{k}"),
        Pe::V(v) => format!("v:{v}"),
    }
}

/// Encodes a field set as `fieldsV1`.
pub fn encode(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for pe in path {
            let entry = cur
                .entry(pe_key(pe))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(m) = entry else { break };
            cur = m;
        }
    }
    // Members that also have owned children are marked with ".".
    fn mark(v: &mut Map<String, Value>, path: &mut Path, set: &FieldSet) {
        let keys: Vec<String> = v.keys().cloned().collect();
        for k in keys {
            if k == "." {
                continue;
            }
            let Some(pe) = parse_pe(&k) else { continue };
            path.push(pe);
            if let Some(Value::Object(child)) = v.get_mut(&k) {
                let has_children = child.keys().any(|c| c != ".");
                if has_children && set.contains(path) {
                    child.insert(".".to_string(), json!({}));
                }
                mark(child, path, set);
            }
            path.pop();
        }
    }
    mark(&mut root, &mut Vec::new(), set);
    Value::Object(root)
}

fn parse_pe(k: &str) -> Option<Pe> {
    if let Some(r) = k.strip_prefix("f:") {
        Some(Pe::F(r.to_string()))
    } else if let Some(r) = k.strip_prefix("k:") {
        Some(Pe::K(
            serde_json::from_str::<Value>(r)
                .map(|v| canonical(&v))
                .unwrap_or_else(|_| r.to_string()),
        ))
    } else {
        k.strip_prefix("v:").map(|r| {
            Pe::V(
                serde_json::from_str::<Value>(r)
                    .map(|v| canonical(&v))
                    .unwrap_or_else(|_| r.to_string()),
            )
        })
    }
}

/// Decodes `fieldsV1` into a field set.
pub fn decode(v: &Value) -> FieldSet {
    fn walk(m: &Map<String, Value>, path: &mut Path, out: &mut FieldSet) {
        for (k, child) in m {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            let Some(pe) = parse_pe(k) else { continue };
            path.push(pe);
            match child.as_object() {
                Some(c) if !c.is_empty() => walk(c, path, out),
                _ => {
                    out.insert(path.clone());
                }
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    if let Some(m) = v.as_object() {
        walk(m, &mut Vec::new(), &mut out);
    }
    out
}

/// `.data.key`, `.metadata.ownerReferences[uid="x"]`: the path format of apply conflict messages.
pub fn render_path(path: &[Pe]) -> String {
    let mut s = String::new();
    for pe in path {
        match pe {
            Pe::F(k) => {
                s.push('.');
                s.push_str(k);
            }
            Pe::K(k) => {
                let m: BTreeMap<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.push_str(&format!("[{}]", parts.join(",")));
            }
            Pe::V(v) => s.push_str(&format!("[={v}]")),
        }
    }
    s
}

/// One `metadata.managedFields[]` entry.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub set: FieldSet,
    /// Index of the `managedFields` item this entry was read from, while
    /// `set` is unchanged: its `fieldsV1` is copied instead of re-encoded
    /// (encoding is a large part of a write). Cleared by [`Entry::changed`].
    pub read_from: Option<usize>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.manager,
            &self.operation,
            &self.api_version,
            &self.time,
            &self.subresource,
            &self.set,
        ) == (
            &other.manager,
            &other.operation,
            &other.api_version,
            &other.time,
            &other.subresource,
            &other.set,
        )
    }
}

impl Entry {
    /// Marks `set` as modified since it was read.
    pub fn changed(&mut self) {
        self.read_from = None;
    }

    /// `old_items`: the `managedFields` of the object the entries were read from.
    pub fn to_json(&self, old_items: &[Value]) -> Value {
        let fields = match self.read_from.and_then(|i| old_items.get(i)) {
            Some(item) => {
                debug_assert_eq!(decode(&item["fieldsV1"]), self.set, "stale read_from");
                item["fieldsV1"].clone()
            }
            None => encode(&self.set),
        };
        let mut v = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        });
        if !self.subresource.is_empty() {
            v["subresource"] = json!(self.subresource);
        }
        v
    }

    pub fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            manager: v["manager"].as_str()?.to_string(),
            operation: v["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: v["apiVersion"].as_str().unwrap_or_default().to_string(),
            time: v["time"].as_str().unwrap_or_default().to_string(),
            subresource: v["subresource"].as_str().unwrap_or_default().to_string(),
            set: decode(&v["fieldsV1"]),
            read_from: None,
        })
    }
}

pub fn read_entries(obj: &Value) -> Vec<Entry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|a| {
            a.iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    Entry::from_json(v).map(|mut e| {
                        e.read_from = Some(i);
                        e
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `entries` as `obj`'s managed fields; `read_from` is the object
/// they were read from (see [`Entry::read_from`]).
pub fn write_entries(obj: &mut Value, entries: &[Entry], read_from: Option<&Value>) {
    let old_items: &[Value] = read_from
        .and_then(|o| o["metadata"]["managedFields"].as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| e.to_json(old_items))
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".to_string(), Value::Array(list));
        }
    }
}

/// Whether `path` or anything below it is in `set`.
pub fn owns_within(set: &FieldSet, path: &[Pe]) -> bool {
    set.range(path.to_vec()..)
        .next()
        .is_some_and(|p| p.starts_with(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_v1_round_trips_keyed_items_and_set_members() {
        let obj = json!({"metadata": {"labels": {"a": "1"}, "finalizers": ["x"],
            "ownerReferences": [{"uid": "u1", "name": "o", "kind": "K", "apiVersion": "v1"}]},
            "data": {"k": "v"}});
        let t = Tracker::new(None, Scope::All);
        let set = t.members(&obj);
        let enc = encode(&set);
        // Owner references are atomic: the item is owned, not its fields.
        assert_eq!(
            enc["f:metadata"]["f:ownerReferences"]["k:{\"uid\":\"u1\"}"],
            json!({})
        );
        assert_eq!(enc["f:metadata"]["f:finalizers"]["v:\"x\""], json!({}));
        assert_eq!(enc["f:data"]["f:k"], json!({}));
        assert_eq!(decode(&enc), set);
    }
}
