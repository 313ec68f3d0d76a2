//! The objects a write sends: the desired ConfigMap and the apply body that
//! borrows the content instead of copying it.

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{
    ByteString,
    api::core::v1::ConfigMap,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

use super::annotations::{
    BINDING_ANNOTATION, CURSOR_ANNOTATION, DIGEST_ANNOTATION, GENERATION_ANNOTATION,
    INCARNATION_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SKIPPED_ANNOTATION,
    SOURCES_ANNOTATION, projected_digest,
};
use crate::{crd::CreationPolicy, kv::WatchCursor, projection::Projected};

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

/// The ConfigMap object a write of `content` at `cursor` sends: our claim,
/// label, stamp and (for `Owner`) owner reference, guarded by
/// `resource_version`.
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

/// The body of an apply: [`desired`]'s metadata with the
/// content borrowed, not copied, on every write.
#[derive(Debug, serde::Serialize)]
pub(super) struct ApplyBody<'a> {
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
    pub(super) fn new(
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
        let mut object = desired(target, &empty, cursor, resource_version);
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

/// The target the unit tests write: ConfigMap `ns/cm` of binding `b`
/// (generation 3, owner uid `uid-1`, label `team: web`).
#[cfg(test)]
pub(crate) fn test_target(policy: CreationPolicy) -> TargetRef {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{kv::VersionToken, sink::configmap::Observed};

    fn target(policy: CreationPolicy) -> TargetRef {
        test_target(policy)
    }

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
            let want = serde_json::to_value(desired(&t, &content, cursor, Some("5"))).unwrap();
            let got =
                serde_json::to_value(ApplyBody::new(&t, &content, cursor, Some("5"))).unwrap();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn desired_configmap_carries_content_cursor_and_claim_in_one_object() {
        let mut content = Projected::default();
        content.data.insert("a".into(), "1");
        let cm = desired(
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
        let merge = desired(
            &target(CreationPolicy::Merge),
            &content,
            WatchCursor::after(VersionToken::from_u64(1)),
            None,
        );
        assert!(merge.metadata.owner_references.is_none());
    }
}
