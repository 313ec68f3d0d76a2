//! Projection: which KV keys a binding sees and how they become ConfigMap
//! content. Pure functions, no I/O, table-tested.
//!
//! Callers (the controller, `slipstream sync`) keep the KV entries of their
//! prefixes and call [`ProjectionRules::project`] whenever they want the
//! content to write:
//!
//! ```
//! use slipstream::projection::ProjectionRules;
//! use slipstream::crd::KeyPolicy;
//!
//! let rules = ProjectionRules::new(vec!["web.".into()], true, KeyPolicy::Escape).unwrap();
//! let out = rules
//!     .project([("web.a/b", b"1".as_slice()), ("api.x", b"2".as_slice())])
//!     .unwrap();
//! assert_eq!(out.data["a_2Fb"], "1");
//! assert_eq!(out.keys, 1);
//! ```
//!
//! Key mapping (`keyPolicy: Escape`): ConfigMap keys allow `[-._a-zA-Z0-9]`,
//! at most 253 characters, and may not be `.`, `..` or start with `..`. Each
//! byte of the KV key that is not allowed becomes `_` plus two upper-case hex
//! digits (`/` -> `_2F`, `=` -> `_3D`, `é` -> `_C3_A9`), `_` itself becomes
//! `__`, and a leading `.` of a `.`/`..`-like key becomes `_2E`. Every escaped
//! key decodes back to exactly one KV key, so Escape never merges two keys.
//! A key that cannot be represented (empty after stripping the prefix, or
//! longer than 253 characters once escaped) is skipped and listed.

use std::{borrow::Cow, collections::BTreeMap};

use crate::{
    crd::{ConfigBindingSpec, KeyPolicy, MAX_BUCKET_LEN, MAX_PREFIX_LEN, MAX_PREFIXES},
    reason::Reason,
};

/// The most bytes of values a ConfigMap may hold; the API server rejects more.
pub const MAX_CONFIGMAP_BYTES: usize = 1024 * 1024;
/// The longest ConfigMap key.
pub const MAX_KEY_LEN: usize = 253;
/// Most bytes of the sources annotation (a ConfigMap's annotations share
/// 256 KiB); past it a restart re-reads the full state instead.
pub const MAX_SOURCES_BYTES: usize = 128 * 1024;

/// A binding spec the operator cannot serve. Reason word: `InvalidSpec`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid bucket name {0:?}: use 1-{MAX_BUCKET_LEN} letters, digits, '-' or '_'")]
    InvalidBucketName(String),
    #[error("no prefixes: list 1 to {MAX_PREFIXES} key prefixes")]
    NoPrefixes,
    #[error("{0} prefixes: at most {MAX_PREFIXES} are allowed")]
    TooManyPrefixes(usize),
    #[error("prefix {0:?} is empty or longer than {MAX_PREFIX_LEN} characters")]
    InvalidPrefix(String),
    #[error("prefix {0:?} is listed twice")]
    DuplicatePrefix(String),
    #[error("invalid target name {0:?}: must be a DNS-1123 subdomain of at most 253 characters")]
    InvalidTargetName(String),
}

impl SpecError {
    pub fn reason(&self) -> Reason {
        match self {
            SpecError::InvalidBucketName(_) => Reason::InvalidBucketName,
            SpecError::NoPrefixes
            | SpecError::TooManyPrefixes(_)
            | SpecError::InvalidPrefix(_)
            | SpecError::DuplicatePrefix(_) => Reason::InvalidPrefixes,
            SpecError::InvalidTargetName(_) => Reason::InvalidTargetName,
        }
    }
}

/// Content that must not be written (invariant 4): the last good content stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProjectionError {
    #[error(
        "content is {bytes} bytes, over the ConfigMap limit of {limit} bytes (largest value: {largest_key:?})"
    )]
    TooLarge {
        bytes: usize,
        limit: usize,
        largest_key: String,
    },
    #[error("KV keys {first:?} and {second:?} both map to ConfigMap key {configmap_key:?}")]
    KeyCollision {
        configmap_key: String,
        first: String,
        second: String,
    },
    #[error("KV key {key:?} is not a valid ConfigMap key ({reason}) and keyPolicy is Fail")]
    InvalidKey { key: String, reason: String },
}

impl ProjectionError {
    pub fn reason(&self) -> Reason {
        match self {
            ProjectionError::TooLarge { .. } => Reason::TooLarge,
            ProjectionError::KeyCollision { .. } => Reason::KeyCollision,
            ProjectionError::InvalidKey { .. } => Reason::InvalidKey,
        }
    }
}

/// What happens to one KV key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDecision<'a> {
    /// Written under this ConfigMap key (borrowed from the KV key when no
    /// character needed escaping).
    Mapped(Cow<'a, str>),
    /// Outside the binding's prefixes.
    NotMine,
    /// Left out and listed in status, with the reason.
    Skip(String),
    /// Blocks the whole binding (`keyPolicy: Fail`), with the reason.
    Invalid(String),
}

/// Everything the projection of one binding needs, checked once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionRules {
    /// Longest first, so the first match is the longest.
    prefixes: Vec<String>,
    strip_prefix: bool,
    key_policy: KeyPolicy,
}

/// The content of a ConfigMap for one binding, borrowed from the KV entries
/// it was projected from: a write serialises it without copying the values
/// (and the keys, unless escaping changed them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Projected<'a> {
    pub data: BTreeMap<Cow<'a, str>, &'a str>,
    pub binary_data: BTreeMap<Cow<'a, str>, &'a [u8]>,
    /// KV keys left out by the key policy, sorted.
    pub skipped: Vec<String>,
    /// Bytes of values, counted as the API server counts them.
    pub bytes: usize,
    /// Keys written (`data` + `binaryData`).
    pub keys: usize,
    /// [`ProjectionRules::sources`] when the target needs it on record.
    pub sources: Option<String>,
    /// The bucket incarnation the content was read from, put on record.
    pub incarnation: Option<u64>,
}

impl Projected<'_> {
    /// True when both hold the same ConfigMap content (skips are not content).
    pub fn same_content(&self, other: &Projected<'_>) -> bool {
        self.data == other.data && self.binary_data == other.binary_data
    }
}

impl ProjectionRules {
    /// Rules from a binding spec, after checking what the CRD schema checks
    /// (so bad input gets the same answer without a validating API server).
    pub fn from_spec(spec: &ConfigBindingSpec) -> Result<Self, SpecError> {
        if !valid_bucket_name(&spec.bucket) {
            return Err(SpecError::InvalidBucketName(spec.bucket.clone()));
        }
        if let Some(name) = &spec.target.name
            && !valid_dns_subdomain(name)
        {
            return Err(SpecError::InvalidTargetName(name.clone()));
        }
        Self::new(spec.prefixes.clone(), spec.strip_prefix, spec.key_policy)
    }

    pub fn new(
        mut prefixes: Vec<String>,
        strip_prefix: bool,
        key_policy: KeyPolicy,
    ) -> Result<Self, SpecError> {
        if prefixes.is_empty() {
            return Err(SpecError::NoPrefixes);
        }
        if prefixes.len() > MAX_PREFIXES {
            return Err(SpecError::TooManyPrefixes(prefixes.len()));
        }
        if let Some(bad) = prefixes
            .iter()
            .find(|p| p.is_empty() || p.len() > MAX_PREFIX_LEN)
        {
            return Err(SpecError::InvalidPrefix(bad.clone()));
        }
        prefixes.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        if let Some(w) = prefixes.windows(2).find(|w| w[0] == w[1]) {
            return Err(SpecError::DuplicatePrefix(w[0].clone()));
        }
        Ok(Self {
            prefixes,
            strip_prefix,
            key_policy,
        })
    }

    /// The prefixes, longest first.
    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }

    /// Pairs `(shorter, longer)` where one prefix contains another. Allowed
    /// (the longest match wins) but worth telling the user.
    pub fn overlaps(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, long) in self.prefixes.iter().enumerate() {
            for short in &self.prefixes[i + 1..] {
                if long.starts_with(short.as_str()) {
                    out.push((short.clone(), long.clone()));
                }
            }
        }
        out
    }

    /// The longest prefix matching `kv_key`.
    pub fn matching_prefix(&self, kv_key: &str) -> Option<&str> {
        self.prefixes
            .iter()
            .find(|p| kv_key.starts_with(p.as_str()))
            .map(String::as_str)
    }

    pub fn matches(&self, kv_key: &str) -> bool {
        self.matching_prefix(kv_key).is_some()
    }

    pub fn map_key<'a>(&self, kv_key: &'a str) -> KeyDecision<'a> {
        let Some(prefix) = self.matching_prefix(kv_key) else {
            return KeyDecision::NotMine;
        };
        let name = if self.strip_prefix {
            &kv_key[prefix.len()..]
        } else {
            kv_key
        };
        match self.key_policy {
            KeyPolicy::Escape => {
                if name.is_empty() {
                    return KeyDecision::Skip("empty after stripping the prefix".into());
                }
                let escaped = escape_key(name);
                if escaped.len() > MAX_KEY_LEN {
                    return KeyDecision::Skip(format!(
                        "{} characters once escaped, over {MAX_KEY_LEN}",
                        escaped.len()
                    ));
                }
                KeyDecision::Mapped(escaped)
            }
            KeyPolicy::Skip => match configmap_key_problem(name) {
                None => KeyDecision::Mapped(Cow::Borrowed(name)),
                Some(why) => KeyDecision::Skip(why),
            },
            KeyPolicy::Fail => match configmap_key_problem(name) {
                None => KeyDecision::Mapped(Cow::Borrowed(name)),
                Some(why) => KeyDecision::Invalid(why),
            },
        }
    }

    /// True when every ConfigMap key names exactly one KV key, so the KV
    /// state can be rebuilt from a written ConfigMap (no resync on restart).
    pub fn is_invertible(&self) -> bool {
        !self.strip_prefix || self.prefixes.len() == 1
    }

    /// The KV key a ConfigMap key came from, when [`Self::is_invertible`].
    pub fn kv_key_of(&self, configmap_key: &str) -> Option<String> {
        if !self.is_invertible() {
            return None;
        }
        let name = match self.key_policy {
            KeyPolicy::Escape => unescape_key(configmap_key)?,
            KeyPolicy::Skip | KeyPolicy::Fail => configmap_key.to_owned(),
        };
        let kv_key = if self.strip_prefix {
            format!("{}{}", self.prefixes.first()?, name)
        } else {
            name
        };
        (self.map_key(&kv_key) == KeyDecision::Mapped(Cow::Borrowed(configmap_key)))
            .then_some(kv_key)
    }

    /// The KV key that ConfigMap key `configmap_key` came from when it was
    /// matched by `prefix` (one of the binding's prefixes), if these rules
    /// map it back there. Works for every rule set, unlike [`Self::kv_key_of`].
    pub fn kv_key_under(&self, prefix: &str, configmap_key: &str) -> Option<String> {
        let name = match self.key_policy {
            KeyPolicy::Escape => unescape_key(configmap_key)?,
            KeyPolicy::Skip | KeyPolicy::Fail => configmap_key.to_owned(),
        };
        let kv_key = if self.strip_prefix {
            format!("{prefix}{name}")
        } else {
            name
        };
        (self.matching_prefix(&kv_key) == Some(prefix)
            && self.map_key(&kv_key) == KeyDecision::Mapped(Cow::Borrowed(configmap_key)))
        .then_some(kv_key)
    }

    /// Which prefix each written ConfigMap key came from, as JSON
    /// `{"<prefix>": ["<configmap key>", ...]}`: what a restart needs to map
    /// the ConfigMap back to KV keys when the keys alone cannot tell (Merge
    /// targets hold other writers' keys; stripped keys of several prefixes).
    /// `None` when it would exceed [`MAX_SOURCES_BYTES`].
    pub fn sources<'a>(&self, kv_keys: impl IntoIterator<Item = &'a str>) -> Option<String> {
        let mut by_prefix: BTreeMap<&str, Vec<Cow<'a, str>>> = BTreeMap::new();
        for kv_key in kv_keys {
            if let (Some(prefix), KeyDecision::Mapped(cm_key)) =
                (self.matching_prefix(kv_key), self.map_key(kv_key))
            {
                by_prefix.entry(prefix).or_default().push(cm_key);
            }
        }
        let text = serde_json::to_string(&by_prefix).ok()?;
        (text.len() <= MAX_SOURCES_BYTES).then_some(text)
    }

    /// `(configmap key, kv key)` pairs from a [`Self::sources`] text; `None`
    /// when it does not parse or names a key these rules would not write.
    pub fn parse_sources(&self, text: &str) -> Option<Vec<(String, String)>> {
        let by_prefix: BTreeMap<String, Vec<String>> = serde_json::from_str(text).ok()?;
        let mut out = Vec::new();
        for (prefix, cm_keys) in by_prefix {
            if !self.prefixes.contains(&prefix) {
                return None;
            }
            for cm_key in cm_keys {
                let kv_key = self.kv_key_under(&prefix, &cm_key)?;
                out.push((cm_key, kv_key));
            }
        }
        Some(out)
    }

    /// Projects KV entries `(key, value)` (keys outside the prefixes are
    /// ignored) into ConfigMap content, or says why it must not be written.
    pub fn project<'a, I>(&self, entries: I) -> Result<Projected<'a>, ProjectionError>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let mut out = Projected::default();
        let entries = entries.into_iter();
        // KV keys written so far: only read to name the first key of a collision
        let mut written: Vec<&'a str> = Vec::with_capacity(entries.size_hint().0);
        let mut largest: (usize, &str) = (0, "");
        for (kv_key, value) in entries {
            let cm_key = match self.map_key(kv_key) {
                KeyDecision::NotMine => continue,
                KeyDecision::Skip(_) => {
                    out.skipped.push(kv_key.to_owned());
                    continue;
                }
                KeyDecision::Invalid(reason) => {
                    return Err(ProjectionError::InvalidKey {
                        key: kv_key.to_owned(),
                        reason,
                    });
                }
                KeyDecision::Mapped(k) => k,
            };
            // borrowed, not copied; a ConfigMap key is unique across data
            // and binaryData
            let collided = match std::str::from_utf8(value) {
                Ok(text) => {
                    out.binary_data.contains_key(&cm_key) || out.data.insert(cm_key, text).is_some()
                }
                Err(_) => {
                    out.data.contains_key(&cm_key)
                        || out.binary_data.insert(cm_key, value).is_some()
                }
            };
            if collided {
                return Err(self.collision(&written, kv_key));
            }
            written.push(kv_key);
            out.bytes += value.len();
            if value.len() > largest.0 {
                largest = (value.len(), kv_key);
            }
        }
        if out.bytes > MAX_CONFIGMAP_BYTES {
            return Err(ProjectionError::TooLarge {
                bytes: out.bytes,
                limit: MAX_CONFIGMAP_BYTES,
                largest_key: largest.1.to_owned(),
            });
        }
        out.keys = out.data.len() + out.binary_data.len();
        out.skipped.sort();
        Ok(out)
    }
}

impl ProjectionRules {
    /// The error for `second` mapping to a ConfigMap key one of `written`
    /// already took (the error path only: it maps the keys again).
    fn collision(&self, written: &[&str], second: &str) -> ProjectionError {
        let mapped = self.map_key(second);
        let first = written
            .iter()
            .find(|k| self.map_key(k) == mapped)
            .copied()
            .unwrap_or(second);
        let (first, second) = if first <= second {
            (first, second)
        } else {
            (second, first)
        };
        let configmap_key = match mapped {
            KeyDecision::Mapped(k) => k.into_owned(),
            _ => String::new(),
        };
        ProjectionError::KeyCollision {
            configmap_key,
            first: first.to_owned(),
            second: second.to_owned(),
        }
    }
}

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

    fn rules(prefixes: &[&str], strip: bool, policy: KeyPolicy) -> ProjectionRules {
        ProjectionRules::new(
            prefixes.iter().map(|s| s.to_string()).collect(),
            strip,
            policy,
        )
        .unwrap()
    }

    #[test]
    fn key_mapping_table() {
        use KeyDecision::{Mapped, NotMine};
        use KeyPolicy::{Escape, Fail};
        let skip = KeyPolicy::Skip;
        let skipped = |s: &str| KeyDecision::Skip(s.into());
        let invalid = |s: &str| KeyDecision::Invalid(s.into());
        let rows: &[(&[&str], bool, KeyPolicy, &str, KeyDecision)] = &[
            (
                &["web."],
                false,
                Escape,
                "web.port",
                Mapped("web.port".into()),
            ),
            (&["web."], true, Escape, "web.port", Mapped("port".into())),
            (&["web."], true, Escape, "api.port", NotMine),
            (
                &["web."],
                true,
                Escape,
                "web.a/b=c",
                Mapped("a_2Fb_3Dc".into()),
            ),
            (&["web."], true, Escape, "web.a_b", Mapped("a__b".into())),
            (
                &["web."],
                true,
                Escape,
                "web.a_2Fb",
                Mapped("a__2Fb".into()),
            ),
            (&["web."], true, Escape, "web.é", Mapped("_C3_A9".into())),
            (&["web."], true, Escape, "web...x", Mapped("_2E.x".into())),
            (&["web."], true, Escape, "web..", Mapped("_2E".into())),
            (
                &["web."],
                true,
                Escape,
                "web.",
                skipped("empty after stripping the prefix"),
            ),
            (
                &["web."],
                true,
                skip,
                "web.a/b",
                skipped("character '/' is not allowed (only [-._a-zA-Z0-9])"),
            ),
            (
                &["web."],
                true,
                skip,
                "web.ok-key_1",
                Mapped("ok-key_1".into()),
            ),
            (
                &["web."],
                true,
                Fail,
                "web.a=b",
                invalid("character '=' is not allowed (only [-._a-zA-Z0-9])"),
            ),
            (
                &["web."],
                true,
                Fail,
                "web...",
                invalid("must not be '.', '..' or start with '..'"),
            ),
            // longest prefix wins
            (&["a.", "a.b."], true, Escape, "a.b.c", Mapped("c".into())),
            (&["a.", "a.b."], true, Escape, "a.x", Mapped("x".into())),
            (
                &["a.", "a.b."],
                false,
                Escape,
                "a.b.c",
                Mapped("a.b.c".into()),
            ),
        ];
        for (prefixes, strip, policy, key, want) in rows {
            let got = rules(prefixes, *strip, *policy).map_key(key);
            assert_eq!(&got, want, "{prefixes:?} strip={strip} {policy:?} {key:?}");
        }
    }

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

    #[test]
    fn escaped_keys_over_253_are_skipped_not_truncated() {
        let long = format!("web.{}", "/".repeat(100));
        let r = rules(&["web."], true, KeyPolicy::Escape);
        assert!(matches!(r.map_key(&long), KeyDecision::Skip(_)));
    }

    #[test]
    fn utf8_goes_to_data_other_bytes_to_binary_data() {
        let r = rules(&["p."], true, KeyPolicy::Escape);
        let out = r
            .project([("p.text", "héllo".as_bytes()), ("p.bin", &[0xff, 0x00][..])])
            .unwrap();
        assert_eq!(out.data["text"], "héllo");
        assert_eq!(out.binary_data["bin"], &[0xff, 0x00][..]);
        assert_eq!(out.keys, 2);
        assert_eq!(out.bytes, "héllo".len() + 2);
    }

    #[test]
    fn skip_policy_lists_skipped_keys_sorted() {
        let r = rules(&["p."], true, KeyPolicy::Skip);
        let out = r
            .project([("p.z/1", &b"1"[..]), ("p.ok", b"2"), ("p.a=1", b"3")])
            .unwrap();
        assert_eq!(out.skipped, ["p.a=1", "p.z/1"]);
        assert_eq!(out.data.keys().collect::<Vec<_>>(), ["ok"]);
    }

    #[test]
    fn fail_policy_refuses_the_whole_content() {
        let r = rules(&["p."], true, KeyPolicy::Fail);
        let err = r
            .project([("p.ok", &b"1"[..]), ("p.a/b", b"2")])
            .unwrap_err();
        assert_eq!(err.reason(), "InvalidKey");
        assert!(err.to_string().contains("p.a/b"));
    }

    #[test]
    fn colliding_keys_name_both_kv_keys() {
        let r = rules(&["a.", "b."], true, KeyPolicy::Escape);
        let err = r.project([("b.x", &b"1"[..]), ("a.x", b"2")]).unwrap_err();
        assert_eq!(
            err,
            ProjectionError::KeyCollision {
                configmap_key: "x".into(),
                first: "a.x".into(),
                second: "b.x".into()
            }
        );
    }

    #[test]
    fn content_over_one_mebibyte_is_too_large_and_exactly_at_limit_is_fine() {
        let r = rules(&["p."], false, KeyPolicy::Escape);
        let half = vec![b'x'; MAX_CONFIGMAP_BYTES / 2];
        assert!(r.project([("p.a", &half[..]), ("p.b", &half[..])]).is_ok());
        let err = r
            .project([("p.a", &half[..]), ("p.b", &half[..]), ("p.c", b"!")])
            .unwrap_err();
        assert_eq!(err.reason(), "TooLarge");
        let one = vec![0xffu8; MAX_CONFIGMAP_BYTES + 1];
        let err = r.project([("p.big", &one[..])]).unwrap_err();
        assert!(
            matches!(err, ProjectionError::TooLarge { largest_key, .. } if largest_key == "p.big")
        );
    }

    #[test]
    fn keys_outside_the_prefixes_are_ignored() {
        let r = rules(&["p."], false, KeyPolicy::Escape);
        let out = r.project([("q.a", &b"1"[..]), ("p", b"2")]).unwrap();
        assert_eq!(out, Projected::default());
    }

    #[test]
    fn invertible_rules_rebuild_kv_keys_from_configmap_keys() {
        let cases = [
            (rules(&["web."], true, KeyPolicy::Escape), "web.a/b_c"),
            (rules(&["a.", "b."], false, KeyPolicy::Escape), "b.x=1"),
            (rules(&["a."], false, KeyPolicy::Skip), "a.plain"),
        ];
        for (r, kv) in cases {
            let KeyDecision::Mapped(cm) = r.map_key(kv) else {
                panic!("{kv} not mapped")
            };
            assert_eq!(r.kv_key_of(&cm).as_deref(), Some(kv));
        }
        let r = rules(&["a.", "b."], true, KeyPolicy::Escape);
        assert!(!r.is_invertible());
        assert_eq!(r.kv_key_of("x"), None);
        // a ConfigMap key this binding would not produce maps to nothing
        assert_eq!(
            rules(&["web."], false, KeyPolicy::Escape).kv_key_of("api.x"),
            None
        );
    }

    #[test]
    fn sources_map_stripped_keys_of_several_prefixes_back() {
        let r = rules(&["a.", "b.", "b.x."], true, KeyPolicy::Escape);
        let kv = ["a.k/1", "b.j", "b.x.j2"];
        let text = r.sources(kv).unwrap();
        assert_eq!(text, r#"{"a.":["k_2F1"],"b.":["j"],"b.x.":["j2"]}"#);
        let mut back = r.parse_sources(&text).unwrap();
        back.sort();
        assert_eq!(
            back,
            [
                ("j".to_string(), "b.j".to_string()),
                ("j2".into(), "b.x.j2".into()),
                ("k_2F1".into(), "a.k/1".into()),
            ]
        );
        // a key listed under a prefix that does not produce it is refused
        assert_eq!(r.parse_sources(r#"{"b.":["x.j2"]}"#), None);
        assert_eq!(r.parse_sources(r#"{"c.":["j"]}"#), None);
        assert_eq!(r.parse_sources("not json"), None);
    }

    #[test]
    fn sources_too_large_for_an_annotation_are_left_out() {
        let r = rules(&["p."], false, KeyPolicy::Escape);
        let keys: Vec<String> = (0..20_000).map(|i| format!("p.key-{i:08}")).collect();
        assert_eq!(r.sources(keys.iter().map(String::as_str)), None);
        assert!(r.sources(keys[..100].iter().map(String::as_str)).is_some());
    }

    #[test]
    fn spec_validation_table() {
        let ok: ConfigBindingSpec = serde_yaml::from_str("bucket: app\nprefixes: [a.]").unwrap();
        let cases: &[(&str, Option<&str>)] = &[
            ("bucket: app\nprefixes: [a., b.]", None),
            (
                "bucket: 'bad.name'\nprefixes: [a.]",
                Some("InvalidBucketName"),
            ),
            ("bucket: ''\nprefixes: [a.]", Some("InvalidBucketName")),
            ("bucket: app\nprefixes: []", Some("InvalidPrefixes")),
            ("bucket: app\nprefixes: ['']", Some("InvalidPrefixes")),
            ("bucket: app\nprefixes: [a., a.]", Some("InvalidPrefixes")),
            (
                "bucket: app\nprefixes: [a.]\ntarget: {name: Bad_Name}",
                Some("InvalidTargetName"),
            ),
        ];
        assert!(ProjectionRules::from_spec(&ok).is_ok());
        for (yaml, want) in cases {
            let spec: ConfigBindingSpec = serde_yaml::from_str(yaml).unwrap();
            let got = ProjectionRules::from_spec(&spec)
                .err()
                .map(|e| e.reason().as_str());
            assert_eq!(got, *want, "{yaml}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("p{i}.")).collect();
        assert_eq!(
            ProjectionRules::new(many, false, KeyPolicy::Escape),
            Err(SpecError::TooManyPrefixes(33))
        );
    }

    #[test]
    fn overlapping_prefixes_are_reported() {
        let r = rules(&["a.", "a.b.", "c."], true, KeyPolicy::Escape);
        assert_eq!(r.overlaps(), [("a.".to_string(), "a.b.".to_string())]);
    }
}
