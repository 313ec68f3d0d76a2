//! What the operator records on a ConfigMap besides the content, and the
//! digest that lets a restart trust it.

use crate::{digest::Fnv1a, projection::Projected};

pub const FIELD_MANAGER: &str = "slipstream";
/// The field manager of [`ConfigMapSink::create_empty`].
pub const CREATE_FIELD_MANAGER: &str = "slipstream-create";
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

/// FNV-1a (64 bit, hex; see [`crate::digest`] for why FNV) over `data`
/// then `binaryData` entries in key order, each length-prefixed. Stable
/// across builds and platforms, so it can be stored in an annotation and
/// checked by a later process.
pub fn content_digest<'a>(
    data: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    binary_data: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> String {
    let mut h = Fnv1a::new();
    for (k, v) in data {
        h.write_framed(k.as_bytes());
        h.write_framed(v);
    }
    h.write_framed(b"binaryData");
    for (k, v) in binary_data {
        h.write_framed(k.as_bytes());
        h.write_framed(v);
    }
    h.hex()
}

/// [`content_digest`] of projected content.
pub fn projected_digest(content: &Projected<'_>) -> String {
    content_digest(
        content.data.iter().map(|(k, v)| (k.as_ref(), v.as_bytes())),
        content.binary_data.iter().map(|(k, v)| (k.as_ref(), *v)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_content_digest_is_stable_across_versions() {
        // stored in annotations: a change here makes every restart resync
        let digest = content_digest([("a", b"1".as_slice())], [("b", [0xff].as_slice())]);
        assert_eq!(
            digest,
            content_digest([("a", b"1".as_slice())], [("b", [0xff].as_slice())])
        );
        assert_ne!(
            digest,
            content_digest([("b", [0xff].as_slice())], [("a", b"1".as_slice())])
        );
        assert_eq!(content_digest([], []), DIGEST_OF_NOTHING);
    }

    /// [`content_digest`] of no keys, as every earlier version computed it.
    const DIGEST_OF_NOTHING: &str = "dafa6e0f3d075732";
}
