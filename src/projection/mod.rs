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

mod keys;
mod sources;

use std::{borrow::Cow, collections::BTreeMap};

pub use keys::{
    MAX_KEY_LEN, configmap_key_problem, escape_key, unescape_key, valid_bucket_name,
    valid_dns_subdomain,
};
pub use sources::MAX_SOURCES_BYTES;

use crate::{
    crd::{ConfigBindingSpec, KeyPolicy, MAX_BUCKET_LEN, MAX_PREFIX_LEN, MAX_PREFIXES},
    reason::Reason,
};

/// The most bytes of values a ConfigMap may hold; the API server rejects more.
pub const MAX_CONFIGMAP_BYTES: usize = 1024 * 1024;

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
    /// `{"<prefix>": ["<configmap key>", ...]}` (deflated when large, see
    /// [`sources`]): what a restart needs to map the ConfigMap back to KV
    /// keys when the keys alone cannot tell (Merge targets hold other
    /// writers' keys; stripped keys of several prefixes). `None` when it
    /// would exceed [`MAX_SOURCES_BYTES`].
    pub fn sources<'a>(&self, kv_keys: impl IntoIterator<Item = &'a str>) -> Option<String> {
        let mut by_prefix: BTreeMap<&str, Vec<Cow<'a, str>>> = BTreeMap::new();
        for kv_key in kv_keys {
            if let (Some(prefix), KeyDecision::Mapped(cm_key)) =
                (self.matching_prefix(kv_key), self.map_key(kv_key))
            {
                by_prefix.entry(prefix).or_default().push(cm_key);
            }
        }
        sources::encode(serde_json::to_string(&by_prefix).ok()?)
    }

    /// `(configmap key, kv key)` pairs from a [`Self::sources`] text; `None`
    /// when it does not parse or names a key these rules would not write.
    pub fn parse_sources(&self, text: &str) -> Option<Vec<(String, String)>> {
        let json = sources::decode(text)?;
        let by_prefix: BTreeMap<String, Vec<String>> = serde_json::from_str(&json).ok()?;
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

#[cfg(test)]
mod tests;
