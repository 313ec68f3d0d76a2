//! Key and name rules of Kubernetes and NATS: which strings are valid
//! ConfigMap keys, object names and bucket names, and the injective
//! Escape mapping (see the parent module's docs).

use std::borrow::Cow;

use crate::crd::MAX_BUCKET_LEN;

/// The longest ConfigMap key.
pub const MAX_KEY_LEN: usize = 253;

fn allowed_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'
}

/// Why `key` is not a valid ConfigMap key, if it is not.
pub fn configmap_key_problem(key: &str) -> Option<String> {
    if key.is_empty() {
        return Some("empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Some(format!("{} characters, over {MAX_KEY_LEN}", key.len()));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !c.is_ascii() || !allowed_byte(*c as u8))
    {
        return Some(format!(
            "character {c:?} is not allowed (only [-._a-zA-Z0-9])"
        ));
    }
    if key == "." || key == ".." || key.starts_with("..") {
        return Some("must not be '.', '..' or start with '..'".into());
    }
    None
}

/// The documented, injective Escape mapping (see the module docs).
pub fn escape_key(key: &str) -> Cow<'_, str> {
    let unchanged =
        key.bytes().all(|b| b != b'_' && allowed_byte(b)) && key != "." && !key.starts_with("..");
    if unchanged {
        return Cow::Borrowed(key);
    }
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'_' => out.push_str("__"),
            b if allowed_byte(b) => out.push(char::from(b)),
            b => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('_');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
    }
    if out == "." || out.starts_with("..") {
        out.replace_range(0..1, "_2E");
    }
    Cow::Owned(out)
}

/// Inverse of [`escape_key`]; `None` for strings `escape_key` never yields.
pub fn unescape_key(escaped: &str) -> Option<String> {
    let raw = escaped.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'_' {
            match raw.get(i + 1)? {
                b'_' => {
                    out.push(b'_');
                    i += 2;
                }
                _ => {
                    let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 3;
                }
            }
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    let key = String::from_utf8(out).ok()?;
    (escape_key(&key) == escaped).then_some(key)
}

/// NATS bucket names: letters, digits, `-`, `_`.
pub fn valid_bucket_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_BUCKET_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Kubernetes object names (DNS-1123 subdomain).
pub fn valid_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_is_injective_and_round_trips() {
        let keys = [
            "a/b",
            "a_2Fb",
            "a__b",
            "a_b",
            "_",
            "__",
            "a=b",
            "a_3Db",
            "..x",
            "_2E.x",
            ".",
            "..",
            ".a",
            "x.",
            "ü/ß",
            "tab\there",
            "",
        ];
        let mut seen = std::collections::HashMap::new();
        for k in keys {
            let e = escape_key(k);
            if !k.is_empty() {
                assert_eq!(configmap_key_problem(&e), None, "{k:?} -> {e:?}");
            }
            assert_eq!(unescape_key(&e).as_deref(), Some(k), "{k:?} -> {e:?}");
            if let Some(other) = seen.insert(e.clone(), k) {
                panic!("{other:?} and {k:?} both escape to {e:?}");
            }
        }
        assert_eq!(unescape_key("a_2"), None);
        assert_eq!(unescape_key("a_zz"), None);
        assert_eq!(
            unescape_key("a_2f"),
            None,
            "lower-case hex is never produced"
        );
    }
}
