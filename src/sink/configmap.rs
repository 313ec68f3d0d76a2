//! The ConfigMap sink: one server-side apply (field manager `slipstream`)
//! writes a binding's whole content together with the cursor it reflects, so
//! data and cursor can never disagree (invariant 1).
//!
//! Writes carry `metadata.resourceVersion` from the last read or write as a
//! precondition: a concurrent writer makes the apply fail with 409 instead
//! of silently interleaving, and the caller re-reads and compares cursors
//! before trying again (invariant 2).

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{
    ByteString,
    api::core::v1::ConfigMap,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};

#[cfg(test)]
use crate::kv::VersionToken;
use crate::{crd::CreationPolicy, kv::WatchCursor, projection::Projected};

pub const FIELD_MANAGER: &str = "slipstream";
/// The KV revision the ConfigMap's content reflects.
pub const CURSOR_ANNOTATION: &str = "slipstream.io/cursor";
/// The binding that writes the ConfigMap (one writer per ConfigMap).
pub const BINDING_ANNOTATION: &str = "slipstream.io/binding";
/// The binding generation whose rules produced the content.
pub const GENERATION_ANNOTATION: &str = "slipstream.io/generation";
/// [`content_digest`] of the keys the operator wrote: a restart resumes
/// from the cursor only when the ConfigMap still holds exactly them.
pub const DIGEST_ANNOTATION: &str = "slipstream.io/content-digest";
/// The bucket incarnation (see `KvReader::incarnation`) the cursor belongs to.
pub const INCARNATION_ANNOTATION: &str = "slipstream.io/bucket-incarnation";
/// How many KV keys the key policy left out. Their names are not in the
/// ConfigMap, so a restart with skipped keys re-reads the full state.
pub const SKIPPED_ANNOTATION: &str = "slipstream.io/skipped-keys";
/// Which prefix each written key came from (see `ProjectionRules::sources`),
/// on targets whose keys alone cannot be mapped back to KV keys.
pub const SOURCES_ANNOTATION: &str = "slipstream.io/sources";
/// Stamped on every ConfigMap the operator writes; the operator watches it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "slipstream";

pub type Result<T, E = SinkError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Someone wrote the ConfigMap since we read it; re-read and retry.
    #[error("the ConfigMap changed since it was read (409 Conflict)")]
    Conflict,
    #[error("{0}")]
    TargetConflict(String),
    /// The ConfigMap already reflects a newer cursor than this writer has.
    #[error("refusing to write cursor {ours}: the ConfigMap already holds cursor {theirs}")]
    StaleWriter { ours: String, theirs: String },
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
}

impl SinkError {
    pub fn reason(&self) -> &'static str {
        match self {
            SinkError::Conflict => "WriteConflict",
            SinkError::TargetConflict(_) => "TargetConflict",
            SinkError::StaleWriter { .. } => "StaleWriter",
            SinkError::Kube(kube::Error::Api(s)) if s.code == 404 => "NotFound",
            SinkError::Kube(kube::Error::Api(s)) if s.code == 403 => "Forbidden",
            SinkError::Kube(kube::Error::Api(s)) if s.code == 422 => "Invalid",
            SinkError::Kube(_) => "KubernetesError",
        }
    }

    /// Namespace gone or being deleted: writing cannot succeed.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SinkError::Kube(kube::Error::Api(s)) if s.code == 404)
    }
}

impl From<kube::Error> for SinkError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 409 => SinkError::Conflict,
            e => SinkError::Kube(e),
        }
    }
}

/// FNV-1a (64 bit, hex) over `data` then `binaryData` entries in key order,
/// each length-prefixed. Stable across builds and platforms, so it can be
/// stored in an annotation and checked by a later process.
pub fn content_digest<'a>(
    data: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    binary_data: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    fn feed(h: &mut u64, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            *h = (*h ^ u64::from(*b)).wrapping_mul(PRIME);
        }
    }
    let mut h = OFFSET;
    for (k, v) in data {
        feed(&mut h, k.as_bytes());
        feed(&mut h, v);
    }
    feed(&mut h, b"binaryData");
    for (k, v) in binary_data {
        feed(&mut h, k.as_bytes());
        feed(&mut h, v);
    }
    format!("{h:016x}")
}

/// [`content_digest`] of projected content.
pub fn projected_digest(content: &Projected<'_>) -> String {
    content_digest(
        content.data.iter().map(|(k, v)| (k.as_ref(), v.as_bytes())),
        content.binary_data.iter().map(|(k, v)| (k.as_ref(), *v)),
    )
}

/// Records what a write carries besides the content: its digest and, when
/// the target needs it, the key sources.
fn stamp(annotations: &mut BTreeMap<String, String>, content: &Projected<'_>) {
    annotations.insert(DIGEST_ANNOTATION.into(), projected_digest(content));
    match &content.sources {
        Some(sources) => annotations.insert(SOURCES_ANNOTATION.into(), sources.clone()),
        None => annotations.remove(SOURCES_ANNOTATION),
    };
    match content.skipped.len() {
        0 => annotations.remove(SKIPPED_ANNOTATION),
        n => annotations.insert(SKIPPED_ANNOTATION.into(), n.to_string()),
    };
    match content.incarnation {
        Some(i) => annotations.insert(INCARNATION_ANNOTATION.into(), i.to_string()),
        None => annotations.remove(INCARNATION_ANNOTATION),
    };
}

/// Which ConfigMap a binding writes, and how.
#[derive(Debug, Clone)]
pub struct TargetRef {
    pub namespace: String,
    pub name: String,
    pub binding: String,
    pub generation: i64,
    pub policy: CreationPolicy,
    /// Controller owner reference to the binding (used with `Owner`).
    pub owner: Option<OwnerReference>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// What a read of the target told us.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub resource_version: Option<String>,
    /// The cursor annotation (none when absent or unparsable).
    pub cursor: WatchCursor,
    pub binding: Option<String>,
    pub generation: Option<i64>,
    pub owner_uid: Option<String>,
    /// [`DIGEST_ANNOTATION`]: what we last wrote, as we wrote it.
    pub digest: Option<String>,
    /// [`SOURCES_ANNOTATION`].
    pub sources: Option<String>,
    /// [`INCARNATION_ANNOTATION`].
    pub incarnation: Option<u64>,
    /// [`SKIPPED_ANNOTATION`] (0 when absent).
    pub skipped: usize,
    /// The content as hashes, not a copy: a binding keeps this per target.
    pub content: ContentHashes,
}

/// A ConfigMap's `data` and `binaryData` as one `(key hash, value hash)` pair
/// per entry, sorted: enough to tell "same content", "holds these keys" and
/// "has keys besides these" (64-bit hashes; a collision among one
/// ConfigMap's keys or a key's old and new value is not a practical concern)
/// at 16 bytes per key instead of a copy of every key and value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentHashes(Vec<(u64, u64)>);

fn hash_of(tag: u8, bytes: &[u8]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // fixed seed: equal content hashes equal in every part of the process
    let mut h = foldhash::quality::FixedState::with_seed(0x5115_7ea4).build_hasher();
    h.write_u8(tag);
    h.write(bytes);
    h.finish()
}

/// Key hashes tell `data` from `binaryData`: moving a key is a change.
fn key_hash(binary: bool, key: &str) -> u64 {
    hash_of(u8::from(binary), key.as_bytes())
}

fn value_hash(value: &[u8]) -> u64 {
    hash_of(2, value)
}

/// A ConfigMap as the operator reads it back from watches and writes: its
/// metadata and the [`ContentHashes`] of its content, computed while parsing,
/// so no copy of the keys and values is built (a write's response and its
/// watch echo would otherwise cost two whole-content copies per update).
#[derive(Debug, Clone, Default)]
pub struct ConfigMapHead {
    pub metadata: ObjectMeta,
    pub content: ContentHashes,
}

impl kube::Resource for ConfigMapHead {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "ConfigMap".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "configmaps".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<'de> serde::Deserialize<'de> for ConfigMapHead {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Raw {
            #[serde(default)]
            metadata: ObjectMeta,
            #[serde(default, deserialize_with = "hash_text_entries")]
            data: Vec<(u64, u64)>,
            /// Rare and usually small: decoded, then hashed.
            #[serde(default, rename = "binaryData")]
            binary_data: Option<BTreeMap<String, ByteString>>,
        }
        let raw = Raw::deserialize(d)?;
        let mut entries = raw.data;
        let binary = raw.binary_data.into_iter().flatten();
        entries.extend(binary.map(|(k, v)| (key_hash(true, &k), value_hash(&v.0))));
        entries.sort_unstable();
        Ok(Self {
            metadata: raw.metadata,
            content: ContentHashes(entries),
        })
    }
}

/// `data` (a map of strings, or null) as hash pairs, borrowing the strings
/// from the input where it has no escapes.
fn hash_text_entries<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<(u64, u64)>, D::Error> {
    use std::borrow::Cow;

    #[derive(serde::Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<(u64, u64)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of strings or null")
        }
        fn visit_none<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_some<D: serde::Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some((Text(k), Text(v))) = map.next_entry()? {
                out.push((key_hash(false, &k), value_hash(v.as_bytes())));
            }
            Ok(out)
        }
    }
    d.deserialize_option(Entries)
}

impl ContentHashes {
    pub fn of_configmap(cm: &ConfigMap) -> Self {
        let text = cm.data.iter().flatten();
        let binary = cm.binary_data.iter().flatten();
        let mut v: Vec<(u64, u64)> = text
            .map(|(k, v)| (key_hash(false, k), value_hash(v.as_bytes())))
            .chain(binary.map(|(k, v)| (key_hash(true, k), value_hash(&v.0))))
            .collect();
        v.sort_unstable();
        Self(v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn value_of(&self, key: u64) -> Option<u64> {
        let i = self.0.binary_search_by_key(&key, |(k, _)| *k).ok()?;
        Some(self.0[i].1)
    }

    /// Every key of `content` is here with the same value.
    fn contains_all(&self, content: &Projected<'_>) -> bool {
        let text = content.data.iter().map(|(k, v)| (false, k, v.as_bytes()));
        let binary = content.binary_data.iter().map(|(k, v)| (true, k, *v));
        text.chain(binary)
            .all(|(bin, k, v)| self.value_of(key_hash(bin, k)) == Some(value_hash(v)))
    }

    /// How many keys of `content` are here (whatever their values).
    fn count_present(&self, content: &Projected<'_>) -> usize {
        let text = content.data.keys().map(|k| key_hash(false, k));
        let binary = content.binary_data.keys().map(|k| key_hash(true, k));
        text.chain(binary)
            .filter(|k| self.value_of(*k).is_some())
            .count()
    }
}

impl Observed {
    pub fn from_configmap(cm: &ConfigMap) -> Self {
        Self::from_parts(&cm.metadata, ContentHashes::of_configmap(cm))
    }

    /// From a watch event or write response read as [`ConfigMapHead`].
    pub fn from_head(head: ConfigMapHead) -> Self {
        Self::from_parts(&head.metadata, head.content)
    }

    fn from_parts(metadata: &ObjectMeta, content: ContentHashes) -> Self {
        let ann = metadata.annotations.as_ref();
        let get = |k: &str| ann.and_then(|a| a.get(k)).cloned();
        Self {
            resource_version: metadata.resource_version.clone(),
            cursor: get(CURSOR_ANNOTATION)
                .and_then(|c| c.parse().ok())
                .unwrap_or_default(),
            binding: get(BINDING_ANNOTATION),
            generation: get(GENERATION_ANNOTATION).and_then(|g| g.parse().ok()),
            digest: get(DIGEST_ANNOTATION),
            sources: get(SOURCES_ANNOTATION),
            incarnation: get(INCARNATION_ANNOTATION).and_then(|i| i.parse().ok()),
            skipped: get(SKIPPED_ANNOTATION)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            owner_uid: metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| o.uid.clone()),
            content,
        }
    }

    /// True when the ConfigMap holds exactly `content` under our keys: all
    /// of them for `Owner`, only the projected ones for `Merge`.
    pub fn holds(&self, content: &Projected<'_>, policy: CreationPolicy) -> bool {
        let same_size = self.content.len() == content.data.len() + content.binary_data.len();
        match policy {
            // keys are unique: as many entries, each of ours present, is equality
            CreationPolicy::Owner => same_size && self.content.contains_all(content),
            CreationPolicy::Merge => self.content.contains_all(content),
        }
    }

    /// True when our annotations already describe `content` (digest and
    /// sources), so writing it again would change nothing.
    pub fn stamped(&self, content: &Projected<'_>) -> bool {
        self.sources == content.sources
            && self.incarnation == content.incarnation
            && self.skipped == content.skipped.len()
            && self.digest.as_deref() == Some(projected_digest(content).as_str())
    }

    /// The ConfigMap has keys that `content` does not (hand-added keys,
    /// which an `Owner` binding removes; [`foreign_keys`] names them).
    pub fn has_foreign_keys(&self, content: &Projected<'_>) -> bool {
        self.content.count_present(content) < self.content.len()
    }
}

/// Keys in `cm` that `content` does not have.
pub fn foreign_keys(cm: &ConfigMap, content: &Projected<'_>) -> Vec<String> {
    let text = cm.data.iter().flatten().map(|(k, _)| k);
    let text = text.filter(|k| !content.data.contains_key(k.as_str()));
    let binary = cm.binary_data.iter().flatten().map(|(k, _)| k);
    let binary = binary.filter(|k| !content.binary_data.contains_key(k.as_str()));
    text.chain(binary).cloned().collect()
}

/// May this binding write an existing ConfigMap? Pure; `other_binding_exists`
/// says whether the binding named in its annotation (if not us) still exists.
pub fn check_ownership(
    target: &TargetRef,
    observed: &Observed,
    other_binding_exists: bool,
) -> Result<()> {
    if let Some(other) = &observed.binding
        && other != &target.binding
        && other_binding_exists
    {
        return Err(SinkError::TargetConflict(format!(
            "ConfigMap {:?} is already written by binding {other:?}",
            target.name
        )));
    }
    if target.policy == CreationPolicy::Owner {
        let ours = observed.binding.as_deref() == Some(target.binding.as_str())
            || (observed.owner_uid.is_some()
                && observed.owner_uid.as_deref() == target.owner.as_ref().map(|o| o.uid.as_str()));
        if !ours {
            return Err(SinkError::TargetConflict(format!(
                "ConfigMap {:?} exists and was not created by slipstream; \
                 delete it or use creationPolicy: Merge",
                target.name
            )));
        }
    }
    Ok(())
}

/// The body of an apply: [`ConfigMapSink::desired`]'s metadata with the
/// content borrowed, not copied, on every write.
#[derive(Debug, serde::Serialize)]
struct ApplyBody<'a> {
    #[serde(flatten)]
    object: ConfigMap,
    #[serde(skip_serializing_if = "is_empty")]
    data: &'a BTreeMap<Cow<'a, str>, &'a str>,
    #[serde(
        rename = "binaryData",
        skip_serializing_if = "is_empty",
        serialize_with = "base64_values"
    )]
    binary_data: &'a BTreeMap<Cow<'a, str>, &'a [u8]>,
}

fn is_empty<K, V>(m: &&BTreeMap<K, V>) -> bool {
    m.is_empty()
}

/// `binaryData` values as the API carries them (standard base64), encoded
/// straight into the request body.
fn base64_values<S: serde::Serializer>(
    m: &&BTreeMap<Cow<'_, str>, &[u8]>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_map(m.iter().map(|(k, v)| (k, Base64(v))))
}

struct Base64<'a>(&'a [u8]);

impl serde::Serialize for Base64<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use base64::{display::Base64Display, engine::general_purpose::STANDARD};
        s.collect_str(&Base64Display::new(self.0, &STANDARD))
    }
}

impl<'a> ApplyBody<'a> {
    fn new(
        target: &TargetRef,
        content: &'a Projected,
        cursor: WatchCursor,
        resource_version: Option<&str>,
    ) -> Self {
        let empty = Projected {
            bytes: content.bytes,
            keys: content.keys,
            ..Projected::default()
        };
        let mut object = ConfigMapSink::desired(target, &empty, cursor, resource_version);
        if let Some(annotations) = object.metadata.annotations.as_mut() {
            stamp(annotations, content);
        }
        Self {
            object,
            data: &content.data,
            binary_data: &content.binary_data,
        }
    }
}

/// Writes ConfigMaps of one Kubernetes client.
#[derive(Clone)]
pub struct ConfigMapSink {
    client: Client,
}

impl ConfigMapSink {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn api(&self, namespace: &str) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The same objects, read back as [`ConfigMapHead`].
    fn head_api(&self, namespace: &str) -> Api<ConfigMapHead> {
        Api::namespaced(self.client.clone(), namespace)
    }

    pub async fn read(&self, namespace: &str, name: &str) -> Result<Option<ConfigMap>> {
        Ok(self.api(namespace).get_opt(name).await?)
    }

    /// The ConfigMap object a write sends (also used by tests).
    pub fn desired(
        target: &TargetRef,
        content: &Projected<'_>,
        cursor: WatchCursor,
        resource_version: Option<&str>,
    ) -> ConfigMap {
        let mut labels = target.labels.clone();
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
        let mut annotations = target.annotations.clone();
        if !cursor.is_none() {
            annotations.insert(CURSOR_ANNOTATION.into(), cursor.to_string());
        }
        annotations.insert(BINDING_ANNOTATION.into(), target.binding.clone());
        annotations.insert(GENERATION_ANNOTATION.into(), target.generation.to_string());
        stamp(&mut annotations, content);
        let owner_references = match target.policy {
            CreationPolicy::Owner => target.owner.clone().map(|o| vec![o]),
            CreationPolicy::Merge => None,
        };
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(target.name.clone()),
                namespace: Some(target.namespace.clone()),
                labels: Some(labels),
                annotations: Some(annotations),
                owner_references,
                resource_version: resource_version.map(str::to_owned),
                ..ObjectMeta::default()
            },
            data: (!content.data.is_empty()).then(|| {
                let pairs = content.data.iter();
                pairs.map(|(k, v)| (k.to_string(), v.to_string())).collect()
            }),
            binary_data: (!content.binary_data.is_empty()).then(|| {
                let pairs = content.binary_data.iter();
                pairs
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect()
            }),
            ..ConfigMap::default()
        }
    }

    /// The JSON body [`Self::apply`] sends (for profiling the write path
    /// without a server: `examples/profile_flush.rs`).
    pub fn apply_body_json(
        target: &TargetRef,
        content: &Projected<'_>,
        cursor: WatchCursor,
        resource_version: Option<&str>,
    ) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&ApplyBody::new(target, content, cursor, resource_version))
    }

    /// One server-side apply of the whole content and its cursor.
    /// `resource_version` is the precondition (none: create, or first write).
    pub async fn apply(
        &self,
        target: &TargetRef,
        content: &Projected<'_>,
        cursor: WatchCursor,
        resource_version: Option<&str>,
    ) -> Result<Observed> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let written = self
            .head_api(&target.namespace)
            .patch(
                &target.name,
                &pp,
                &Patch::Apply(&ApplyBody::new(target, content, cursor, resource_version)),
            )
            .await?;
        Ok(Observed::from_head(written))
    }

    /// Writes the content and cursor AND removes `foreign` keys (added by
    /// hand, owned by another field manager, which an apply cannot remove)
    /// in one merge patch guarded by `resource_version`.
    pub async fn replace_content(
        &self,
        target: &TargetRef,
        content: &Projected<'_>,
        cursor: WatchCursor,
        foreign: &[String],
        resource_version: &str,
    ) -> Result<Observed> {
        let desired = Self::desired(target, content, cursor, Some(resource_version));
        let mut patch = serde_json::to_value(&desired)
            .map_err(|e| SinkError::Kube(kube::Error::SerdeError(e)))?;
        for field in ["data", "binaryData"] {
            let map = patch
                .as_object_mut()
                .map(|o| o.entry(field).or_insert_with(|| serde_json::json!({})));
            if let Some(serde_json::Value::Object(m)) = map {
                for k in foreign {
                    m.entry(k.clone()).or_insert(serde_json::Value::Null);
                }
            }
        }
        let written = self
            .head_api(&target.namespace)
            .patch(
                &target.name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await?;
        Ok(Observed::from_head(written))
    }

    /// Carries out `deletionPolicy` when a binding goes.
    /// Delete: delete the ConfigMap (Owner) or withdraw our keys (Merge).
    /// Retain: keep the content, drop the owner reference and our claim.
    pub async fn release(&self, target: &TargetRef, delete: bool) -> Result<()> {
        let api = self.api(&target.namespace);
        let Some(cm) = api.get_opt(&target.name).await? else {
            return Ok(());
        };
        let observed = Observed::from_configmap(&cm);
        if observed.binding.as_deref() != Some(target.binding.as_str()) {
            return Ok(());
        }
        let result = match (delete, target.policy) {
            (true, CreationPolicy::Owner) => api
                .delete(&target.name, &DeleteParams::default())
                .await
                .map(|_| ()),
            (true, CreationPolicy::Merge) => {
                let empty = serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": target.name, "namespace": target.namespace},
                });
                api.patch(
                    &target.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&empty),
                )
                .await
                .map(|_| ())
            }
            (false, _) => {
                let patch = serde_json::json!({
                    "metadata": {
                        "ownerReferences": null,
                        "annotations": {BINDING_ANNOTATION: null},
                    }
                });
                api.patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            other => Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_body_serializes_exactly_like_the_desired_configmap() {
        let content = Projected {
            data: BTreeMap::from([("a".into(), "1")]),
            binary_data: BTreeMap::from([("b".into(), &[0xff][..])]),
            keys: 2,
            bytes: 2,
            ..Projected::default()
        };
        let cursor = WatchCursor::after(VersionToken::from_u64(7));
        for (content, policy) in [
            (content.clone(), CreationPolicy::Owner),
            (Projected::default(), CreationPolicy::Merge),
        ] {
            let t = target(policy);
            let want =
                serde_json::to_value(ConfigMapSink::desired(&t, &content, cursor, Some("5")))
                    .unwrap();
            let got =
                serde_json::to_value(ApplyBody::new(&t, &content, cursor, Some("5"))).unwrap();
            assert_eq!(got, want);
        }
    }

    fn target(policy: CreationPolicy) -> TargetRef {
        TargetRef {
            namespace: "ns".into(),
            name: "cm".into(),
            binding: "b".into(),
            generation: 3,
            policy,
            owner: Some(OwnerReference {
                api_version: "slipstream.io/v1alpha1".into(),
                kind: "ConfigBinding".into(),
                name: "b".into(),
                uid: "uid-1".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }),
            labels: BTreeMap::from([("team".into(), "web".into())]),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn desired_configmap_carries_content_cursor_and_claim_in_one_object() {
        let mut content = Projected::default();
        content.data.insert("a".into(), "1");
        let cm = ConfigMapSink::desired(
            &target(CreationPolicy::Owner),
            &content,
            WatchCursor::after(VersionToken::from_u64(42)),
            Some("7"),
        );
        let obs = Observed::from_configmap(&cm);
        assert_eq!(obs.cursor, WatchCursor::after(VersionToken::from_u64(42)));
        assert_eq!(obs.binding.as_deref(), Some("b"));
        assert_eq!(obs.generation, Some(3));
        assert_eq!(obs.owner_uid.as_deref(), Some("uid-1"));
        assert_eq!(cm.metadata.resource_version.as_deref(), Some("7"));
        assert!(obs.holds(&content, CreationPolicy::Owner));
        let labels = cm.metadata.labels.unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        assert_eq!(labels["team"], "web");
        let merge = ConfigMapSink::desired(
            &target(CreationPolicy::Merge),
            &content,
            WatchCursor::after(VersionToken::from_u64(1)),
            None,
        );
        assert!(merge.metadata.owner_references.is_none());
    }

    #[test]
    fn ownership_rules_table() {
        let theirs = Observed::default();
        let ours = Observed {
            binding: Some("b".into()),
            ..Observed::default()
        };
        let other = Observed {
            binding: Some("other".into()),
            ..Observed::default()
        };
        let owner = target(CreationPolicy::Owner);
        let merge = target(CreationPolicy::Merge);
        assert!(check_ownership(&owner, &ours, false).is_ok());
        assert_eq!(
            check_ownership(&owner, &theirs, false)
                .unwrap_err()
                .reason(),
            "TargetConflict"
        );
        assert!(check_ownership(&merge, &theirs, false).is_ok());
        assert_eq!(
            check_ownership(&merge, &other, true).unwrap_err().reason(),
            "TargetConflict"
        );
        // the other binding is gone: its claim is stale, Merge may take over
        assert!(check_ownership(&merge, &other, false).is_ok());
    }

    #[test]
    fn content_hashes_see_a_changed_value_a_moved_key_and_a_missing_key() {
        let mut content = Projected::default();
        content.data.insert("a".into(), "1");
        content.binary_data.insert("b".into(), &[0xff][..]);
        let cm = |data: &[(&str, &str)], binary: &[(&str, &[u8])]| ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            binary_data: Some(
                binary
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..ConfigMap::default()
        };
        let table: &[(ConfigMap, bool)] = &[
            (cm(&[("a", "1")], &[("b", &[0xff])]), true),
            (cm(&[("a", "2")], &[("b", &[0xff])]), false),
            (cm(&[("a", "1"), ("b", "\u{ff}")], &[]), false),
            (cm(&[("a", "1")], &[]), false),
            (cm(&[], &[("a", b"1"), ("b", &[0xff])]), false),
        ];
        for (i, (cm, same)) in table.iter().enumerate() {
            let obs = Observed::from_configmap(cm);
            assert_eq!(obs.holds(&content, CreationPolicy::Owner), *same, "row {i}");
        }
    }

    #[test]
    fn head_read_from_json_hashes_like_the_whole_configmap() {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("cm".into()),
                resource_version: Some("9".into()),
                annotations: Some(BTreeMap::from([(CURSOR_ANNOTATION.into(), "5".into())])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                ("plain".into(), "1".into()),
                ("escaped".into(), "line\n\"quoted\" \u{e9}".into()),
            ])),
            binary_data: Some(BTreeMap::from([("bin".into(), ByteString(vec![0, 0xff]))])),
            ..ConfigMap::default()
        };
        let json = serde_json::to_string(&cm).unwrap();
        let head: ConfigMapHead = serde_json::from_str(&json).unwrap();
        assert_eq!(Observed::from_head(head), Observed::from_configmap(&cm));
        for empty in [r#"{"metadata":{}}"#, r#"{"metadata":{},"data":null}"#] {
            let head: ConfigMapHead = serde_json::from_str(empty).unwrap();
            assert!(head.content.is_empty());
        }
        let err = serde_json::from_str::<ConfigMapHead>(r#"{"data":{"a":1}}"#);
        assert!(
            err.is_err(),
            "a non-string value is an error, not a silent skip"
        );
    }

    #[test]
    fn merge_compares_only_our_keys_owner_compares_all() {
        let mut content = Projected::default();
        content.data.insert("a".into(), "1");
        let cm = ConfigMap {
            data: Some(BTreeMap::from([
                ("a".into(), "1".into()),
                ("theirs".into(), "x".into()),
            ])),
            ..ConfigMap::default()
        };
        let obs = Observed::from_configmap(&cm);
        assert!(obs.holds(&content, CreationPolicy::Merge));
        assert!(!obs.holds(&content, CreationPolicy::Owner));
        assert!(obs.has_foreign_keys(&content));
        assert_eq!(foreign_keys(&cm, &content), ["theirs"]);
    }
}
