//! The text of the `slipstream.io/sources` annotation: which prefix each
//! written ConfigMap key came from, as JSON `{"<prefix>": ["<key>", ...]}`.
//! Small texts stay plain JSON, readable with kubectl. Larger ones are
//! deflated and base64-encoded behind [`DEFLATED`]: sorted keys that share
//! their beginnings shrink about tenfold, so a binding of tens of thousands
//! of keys keeps the annotation (and its restart stays a delta) within
//! [`MAX_SOURCES_BYTES`].

use std::{
    borrow::Cow,
    io::{Read as _, Write as _},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use flate2::{Compression, read::DeflateDecoder, write::DeflateEncoder};

/// Longest sources annotation written; a larger one is left out and that
/// binding's restart re-reads its full state (the API server allows 256 KiB
/// of annotations in all).
pub const MAX_SOURCES_BYTES: usize = 128 * 1024;

/// Texts up to this size are written as plain JSON.
const PLAIN_LIMIT: usize = 4 * 1024;

/// Marks a deflated text.
const DEFLATED: &str = "deflate:";

/// Most bytes a deflated text may expand to (a corrupt or hostile
/// annotation must not make the operator allocate without bound).
const MAX_INFLATED_BYTES: u64 = 64 * 1024 * 1024;

/// The annotation text for sources `json`; `None` when even deflated it
/// exceeds [`MAX_SOURCES_BYTES`].
pub(super) fn encode(json: String) -> Option<String> {
    if json.len() <= PLAIN_LIMIT {
        return Some(json);
    }
    let mut deflate = DeflateEncoder::new(Vec::new(), Compression::default());
    deflate.write_all(json.as_bytes()).ok()?;
    let packed = deflate.finish().ok()?;
    let text = format!("{DEFLATED}{}", STANDARD.encode(packed));
    (text.len() <= MAX_SOURCES_BYTES).then_some(text)
}

/// The JSON of an annotation text written by [`encode`] (plain or deflated).
pub(super) fn decode(text: &str) -> Option<Cow<'_, str>> {
    let Some(packed) = text.strip_prefix(DEFLATED) else {
        return Some(Cow::Borrowed(text));
    };
    let packed = STANDARD.decode(packed).ok()?;
    let mut json = String::new();
    DeflateDecoder::new(packed.as_slice())
        .take(MAX_INFLATED_BYTES)
        .read_to_string(&mut json)
        .ok()?;
    Some(Cow::Owned(json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_texts_stay_plain_json() {
        let json = r#"{"a.":["k"]}"#.to_owned();
        assert_eq!(encode(json.clone()).as_deref(), Some(json.as_str()));
        assert_eq!(decode(&json).as_deref(), Some(json.as_str()));
    }

    #[test]
    fn large_texts_are_deflated_and_come_back_unchanged() {
        let keys: Vec<String> = (0..15_000).map(|i| format!("\"item-{i:06}\"")).collect();
        let json = format!("{{\"a.\":[{}]}}", keys.join(","));
        let text = encode(json.clone()).unwrap();
        assert!(text.starts_with(DEFLATED));
        assert!(
            text.len() * 4 < json.len(),
            "{} of {}",
            text.len(),
            json.len()
        );
        assert_eq!(decode(&text).as_deref(), Some(json.as_str()));
    }

    #[test]
    fn corrupt_deflated_texts_decode_to_nothing() {
        assert_eq!(decode("deflate:not base64!"), None);
        assert_eq!(decode("deflate:AAAA"), None);
    }
}
