//! Access policy (invariant 7): which buckets and prefixes each namespace's
//! bindings may read.
//!
//! A YAML file maps namespaces (or `"*"` for every namespace) to grants:
//!
//! ```yaml
//! namespaces:
//!   shop:
//!     - bucket: app-config
//!       prefixes: [web., shared.]
//!   "*":
//!     - bucket: public
//!       prefixes: [""]        # the whole bucket
//! ```
//!
//! A binding is allowed when every one of its prefixes starts with a prefix
//! granted to its namespace on its bucket. Without a policy file everything
//! is allowed (the operator logs that at start).

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Deserializer, de};

use crate::{crd::MAX_BUCKET_LEN, projection::valid_bucket_name, reason::Reason};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid policy file {path}{at}: {source}")]
    Parse {
        path: String,
        /// ` line N`, where the parser knows it.
        at: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("namespace {namespace:?} may not read {what}")]
    Denied { namespace: String, what: String },
}

impl PolicyError {
    pub fn reason(&self) -> Reason {
        match self {
            PolicyError::Read { .. } | PolicyError::Parse { .. } => Reason::InvalidPolicy,
            PolicyError::Denied { .. } => Reason::AccessDenied,
        }
    }
}

/// One grant: a bucket and the key prefixes readable in it.
///
/// Unknown fields and invalid bucket names are errors (naming the line), so
/// a typo such as `prefix:` fails at start instead of silently denying.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    #[serde(deserialize_with = "bucket_name")]
    pub bucket: String,
    #[serde(default)]
    pub prefixes: Vec<String>,
}

fn bucket_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if valid_bucket_name(&name) {
        Ok(name)
    } else {
        Err(de::Error::custom(format!(
            "invalid bucket name {name:?}: use 1-{MAX_BUCKET_LEN} letters, digits, '-' or '_'"
        )))
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    namespaces: BTreeMap<String, Vec<Grant>>,
}

/// The operator's access policy; `allow_all()` unless a file is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// `None`: everything is allowed.
    grants: Option<BTreeMap<String, Vec<Grant>>>,
}

impl AccessPolicy {
    pub fn allow_all() -> Self {
        Self { grants: None }
    }

    pub fn is_allow_all(&self) -> bool {
        self.grants.is_none()
    }

    pub fn from_yaml(text: &str, path: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = serde_yaml::from_str(text).map_err(|source| PolicyError::Parse {
            path: path.to_owned(),
            at: source
                .location()
                .map(|l| format!(" line {}", l.line()))
                .unwrap_or_default(),
            source,
        })?;
        Ok(Self {
            grants: Some(file.namespaces),
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_yaml(&text, &shown)
    }

    /// Ok when `namespace` may read every prefix in `bucket`.
    pub fn check(
        &self,
        namespace: &str,
        bucket: &str,
        prefixes: &[String],
    ) -> Result<(), PolicyError> {
        let Some(grants) = &self.grants else {
            return Ok(());
        };
        let granted: Vec<&Grant> = [namespace, "*"]
            .iter()
            .filter_map(|ns| grants.get(*ns))
            .flatten()
            .filter(|g| g.bucket == bucket)
            .collect();
        if granted.is_empty() {
            return Err(PolicyError::Denied {
                namespace: namespace.to_owned(),
                what: format!("bucket {bucket:?}"),
            });
        }
        for prefix in prefixes {
            let ok = granted
                .iter()
                .any(|g| g.prefixes.iter().any(|p| prefix.starts_with(p.as_str())));
            if !ok {
                return Err(PolicyError::Denied {
                    namespace: namespace.to_owned(),
                    what: format!("prefix {prefix:?} of bucket {bucket:?}"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
namespaces:
  shop:
    - bucket: app
      prefixes: [web., shared.]
  "*":
    - bucket: public
      prefixes: [""]
"#;

    #[test]
    fn grants_table() {
        let p = AccessPolicy::from_yaml(POLICY, "test").unwrap();
        let rows: &[(&str, &str, &[&str], bool)] = &[
            ("shop", "app", &["web."], true),
            ("shop", "app", &["web.sub.", "shared."], true),
            ("shop", "app", &["web.", "admin."], false),
            ("shop", "app", &["we"], false),
            ("shop", "other", &["web."], false),
            ("dev", "app", &["web."], false),
            ("dev", "public", &["anything"], true),
            ("shop", "public", &["x."], true),
        ];
        for (ns, bucket, prefixes, allowed) in rows {
            let prefixes: Vec<String> = prefixes.iter().map(|s| s.to_string()).collect();
            let got = p.check(ns, bucket, &prefixes);
            assert_eq!(got.is_ok(), *allowed, "{ns} {bucket} {prefixes:?}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.reason(), "AccessDenied");
            }
        }
    }

    #[test]
    fn no_policy_allows_everything_and_bad_files_are_errors() {
        assert!(
            AccessPolicy::allow_all()
                .check("x", "y", &["z".into()])
                .is_ok()
        );
        let err = AccessPolicy::from_yaml("namespaces: [1, 2]", "p.yaml").unwrap_err();
        assert_eq!(err.reason(), "InvalidPolicy");
        assert!(err.to_string().contains("p.yaml"));
    }

    #[test]
    fn typos_and_invalid_bucket_names_are_errors_naming_the_line() {
        let rows: &[(&str, &str, &str)] = &[
            (
                "namespace:\n  shop: []\n",
                "unknown field `namespace`",
                "line 1",
            ),
            (
                "namespaces:\n  shop:\n    - bucket: app\n      prefix: [web.]\n",
                "unknown field `prefix`",
                "line 4",
            ),
            (
                "namespaces:\n  shop:\n    - {bucket: app, prefixes: [a.]}\n    - bucket: 'bad name!'\n",
                "invalid bucket name \"bad name!\"",
                "line 4",
            ),
        ];
        for (yaml, says, line) in rows {
            let err = AccessPolicy::from_yaml(yaml, "p.yaml").unwrap_err();
            let text = format!("{err:#}");
            assert_eq!(err.reason(), "InvalidPolicy", "{yaml}");
            for want in ["p.yaml", says, line] {
                assert!(text.contains(want), "{yaml:?}: {text:?} lacks {want:?}");
            }
        }
    }
}
