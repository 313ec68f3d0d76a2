//! Pure key and prefix rules of the NATS backend: which keys are valid, and
//! which subject filters cover a set of string prefixes.
//!
//! NATS subject filters match whole dot-separated tokens, while our prefixes
//! are plain string prefixes. A prefix maps to the narrowest token filter that
//! covers it, overlapping filters are merged (the server rejects overlapping
//! `filter_subjects`), and the watch filters by string prefix on the client.

use super::{KvError, Result};

/// True for a key NATS KV accepts: `[-/_=.a-zA-Z0-9]+`, no leading or
/// trailing dot, no empty token.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..")
        && key.bytes().all(is_key_byte)
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.')
}

/// Rejects keys NATS cannot store, with the reason in the error.
pub fn validate_key(key: &str) -> Result<()> {
    if is_valid_key(key) {
        Ok(())
    } else {
        Err(KvError::InvalidKey(format!(
            "{key:?}: a key is 1+ of [-/_=.a-zA-Z0-9], without leading, trailing or double dots"
        )))
    }
}

/// True when `prefix` is a prefix of at least one valid key ("" included).
pub fn is_valid_prefix(prefix: &str) -> bool {
    prefix.is_empty()
        || (!prefix.starts_with('.') && !prefix.contains("..") && prefix.bytes().all(is_key_byte))
}

/// Rejects prefixes no valid key can start with (they would silently match nothing).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if is_valid_prefix(prefix) {
        Ok(())
    } else {
        Err(KvError::InvalidKey(format!(
            "prefix {prefix:?}: no valid key starts with it (keys are [-/_=.a-zA-Z0-9], no leading or double dots)"
        )))
    }
}

/// The complete tokens a prefix pins down. Every key starting with `prefix`
/// has these as its leading tokens and at least one token more.
///
/// "web." -> [web]; "web.ap" -> [web]; "web" -> []; "" -> [].
fn fixed_tokens(prefix: &str) -> Vec<&str> {
    match prefix.rfind('.') {
        Some(dot) => prefix[..dot].split('.').collect(),
        None => Vec::new(),
    }
}

/// Subject filters (each `<subject_prefix><tokens>.>` or `<subject_prefix>>`)
/// that together cover every key starting with any of `prefixes`, with no
/// filter overlapping another. `subject_prefix` is `$KV.<bucket>.`.
pub fn subject_filters(subject_prefix: &str, prefixes: &[String]) -> Vec<String> {
    let mut token_sets: Vec<Vec<&str>> = prefixes.iter().map(|p| fixed_tokens(p)).collect();
    // Shorter token lists cover longer ones that start with them.
    token_sets.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    let mut kept: Vec<Vec<&str>> = Vec::new();
    for tokens in token_sets {
        if !kept.iter().any(|k| tokens.starts_with(k)) {
            kept.push(tokens);
        }
    }
    kept.sort();
    kept.into_iter()
        .map(|tokens| {
            if tokens.is_empty() {
                format!("{subject_prefix}>")
            } else {
                format!("{subject_prefix}{}.>", tokens.join("."))
            }
        })
        .collect()
}

/// Client-side string-prefix match, after the server's token filter.
pub fn matches_any(key: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| key.starts_with(p.as_str()))
}

/// Prefixes with duplicates and prefixes covered by a shorter one removed.
/// An empty list means "nothing"; callers reject it before.
pub fn normalize_prefixes(prefixes: &[String]) -> Vec<String> {
    let mut sorted: Vec<String> = prefixes.to_vec();
    sorted.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    let mut kept: Vec<String> = Vec::new();
    for p in sorted {
        if !kept.iter().any(|k| p.starts_with(k.as_str())) {
            kept.push(p);
        }
    }
    kept.sort();
    kept
}

/// Each prefix validated, then [`normalize_prefixes`]: what a read or watch
/// over several prefixes works with.
pub fn checked_prefixes(prefixes: &[String]) -> Result<Vec<String>> {
    for p in prefixes {
        validate_prefix(p)?;
    }
    Ok(normalize_prefixes(prefixes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn keys_follow_nats_kv_rules() {
        for ok in ["a", "web.port", "a/b=c", "A-1_2", "x.y.z"] {
            assert!(is_valid_key(ok), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>", "ä"] {
            assert!(!is_valid_key(bad), "{bad}");
            assert!(validate_key(bad).is_err());
        }
    }

    #[test]
    fn prefixes_may_end_with_a_dot_but_not_start_with_one() {
        for ok in ["", "web", "web.", "web.ap", "a/b="] {
            assert!(is_valid_prefix(ok), "{ok}");
        }
        for bad in [".", ".web", "web..", "a b", "*", ">"] {
            assert!(!is_valid_prefix(bad), "{bad}");
        }
    }

    #[test]
    fn each_prefix_maps_to_the_narrowest_covering_filter() {
        let table: &[(&str, &str)] = &[
            ("", "$KV.B.>"),
            ("web", "$KV.B.>"),
            ("web.", "$KV.B.web.>"),
            ("web.ap", "$KV.B.web.>"),
            ("a.b.", "$KV.B.a.b.>"),
            ("a.b.c", "$KV.B.a.b.>"),
        ];
        for (prefix, filter) in table {
            assert_eq!(
                subject_filters("$KV.B.", &s(&[prefix])),
                s(&[filter]),
                "{prefix}"
            );
        }
    }

    #[test]
    fn overlapping_filters_are_merged_and_disjoint_ones_kept() {
        assert_eq!(
            subject_filters("$KV.B.", &s(&["web.", "shared.", "web.a."])),
            s(&["$KV.B.shared.>", "$KV.B.web.>"])
        );
        assert_eq!(
            subject_filters("$KV.B.", &s(&["web.", "web.", "web.x"])),
            s(&["$KV.B.web.>"])
        );
        assert_eq!(
            subject_filters("$KV.B.", &s(&["web.", "api"])),
            s(&["$KV.B.>"])
        );
        // "ab." and "a." share no token prefix: both stay.
        assert_eq!(
            subject_filters("$KV.B.", &s(&["ab.", "a."])),
            s(&["$KV.B.a.>", "$KV.B.ab.>"])
        );
    }

    #[test]
    fn client_side_match_is_a_plain_string_prefix() {
        let p = s(&["web", "shared."]);
        assert!(matches_any("web", &p));
        assert!(matches_any("webapp.x", &p));
        assert!(matches_any("shared.tz", &p));
        assert!(!matches_any("shared", &p));
        assert!(!matches_any("api.web", &p));
        assert!(matches_any("anything", &s(&[""])));
    }

    #[test]
    fn normalized_prefixes_drop_duplicates_and_covered_ones() {
        assert_eq!(
            normalize_prefixes(&s(&["web.a", "web.", "web.", "api"])),
            s(&["api", "web."])
        );
        assert_eq!(normalize_prefixes(&s(&["x", ""])), s(&[""]));
    }
}
