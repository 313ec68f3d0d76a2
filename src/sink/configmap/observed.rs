//! What a read of a ConfigMap tells the operator: its claim and stamp
//! ([`Observed`]) and its content as hashes ([`ContentHashes`]), read from
//! the API as [`ConfigMapHead`] without a copy of the content.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString, api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::annotations::{
    BINDING_ANNOTATION, CREATE_FIELD_MANAGER, CURSOR_ANNOTATION, DIGEST_ANNOTATION, FIELD_MANAGER,
    GENERATION_ANNOTATION, INCARNATION_ANNOTATION, SKIPPED_ANNOTATION, SOURCES_ANNOTATION,
    projected_digest,
};
use crate::{crd::CreationPolicy, digest::fast_hash, kv::WatchCursor, projection::Projected};

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
    /// Keys of `data` and `binaryData` another field manager owns (with
    /// the manager's name), sorted: a Merge binding never writes them.
    pub foreign_owned: Vec<(String, String)>,
}

/// A ConfigMap's `data` and `binaryData` as one `(key hash, value hash)` pair
/// per entry, sorted: enough to tell "same content", "holds these keys" and
/// "has keys besides these" (64-bit hashes; a collision among one
/// ConfigMap's keys or a key's old and new value is not a practical concern)
/// at 16 bytes per key instead of a copy of every key and value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentHashes(Vec<(u64, u64)>);

/// Key hashes tell `data` from `binaryData`: moving a key is a change.
fn key_hash(binary: bool, key: &str) -> u64 {
    fast_hash(u8::from(binary), key.as_bytes())
}

fn value_hash(value: &[u8]) -> u64 {
    fast_hash(2, value)
}

/// A ConfigMap as the operator reads it back from watches and writes: its
/// metadata and the [`ContentHashes`] of its content, computed while parsing,
/// so no copy of the keys and values is built (a write's response and its
/// watch echo would otherwise cost two whole-content copies per update).
#[derive(Debug, Clone, Default, kube::Resource)]
#[resource(inherit = ConfigMap)]
pub struct ConfigMapHead {
    pub metadata: ObjectMeta,
    pub content: ContentHashes,
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
        // kept per binding for as long as it runs: no room to grow
        entries.shrink_to_fit();
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
            foreign_owned: foreign_owned_keys(metadata),
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

/// The `data` and `binaryData` keys that field managers other than ours own
/// (`managedFields`), each with its manager; sorted by key.
fn foreign_owned_keys(metadata: &ObjectMeta) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in metadata.managed_fields.iter().flatten() {
        let manager = entry.manager.as_deref().unwrap_or_default();
        if manager == FIELD_MANAGER || manager == CREATE_FIELD_MANAGER {
            continue;
        }
        let Some(fields) = entry.fields_v1.as_ref().and_then(|f| f.0.as_object()) else {
            continue;
        };
        for map in ["f:data", "f:binaryData"] {
            let keys = fields.get(map).and_then(|m| m.as_object()).into_iter();
            for key in keys.flat_map(|m| m.keys()) {
                if let Some(key) = key.strip_prefix("f:") {
                    out.push((key.to_owned(), manager.to_owned()));
                }
            }
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// Keys in `cm` that `content` does not have.
pub fn foreign_keys(cm: &ConfigMap, content: &Projected<'_>) -> Vec<String> {
    let text = cm.data.iter().flatten().map(|(k, _)| k);
    let text = text.filter(|k| !content.data.contains_key(k.as_str()));
    let binary = cm.binary_data.iter().flatten().map(|(k, _)| k);
    let binary = binary.filter(|k| !content.binary_data.contains_key(k.as_str()));
    text.chain(binary).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn keys_other_field_managers_own_are_named_with_their_manager() {
        let entry = |manager: &str, fields: serde_json::Value| {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
                manager: Some(manager.into()),
                fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(
                    fields,
                )),
                ..Default::default()
            }
        };
        let cm = ConfigMap {
            metadata: ObjectMeta {
                managed_fields: Some(vec![
                    entry(
                        "kubectl-create",
                        serde_json::json!({"f:data": {".": {}, "f:a": {}, "f:secret": {}}}),
                    ),
                    entry(
                        FIELD_MANAGER,
                        serde_json::json!({"f:data": {"f:b": {}}, "f:metadata": {}}),
                    ),
                    entry("helm", serde_json::json!({"f:binaryData": {"f:bin": {}}})),
                ]),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        let obs = Observed::from_configmap(&cm);
        let owned: Vec<(&str, &str)> = obs
            .foreign_owned
            .iter()
            .map(|(k, m)| (k.as_str(), m.as_str()))
            .collect();
        assert_eq!(
            owned,
            [
                ("a", "kubectl-create"),
                ("bin", "helm"),
                ("secret", "kubectl-create")
            ]
        );
    }
}
