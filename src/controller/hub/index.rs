//! Which bindings a key belongs to, in one hash lookup per distinct
//! prefix length.

use std::collections::{BTreeMap, HashMap};

/// Finds the bindings a key belongs to: prefixes grouped by length, so a
/// key costs one hash lookup per distinct prefix length, not one prefix
/// comparison per binding (thousands of bindings share a bucket).
pub(super) struct PrefixIndex<T> {
    by_len: BTreeMap<usize, HashMap<String, Vec<T>>>,
}

impl<T> Default for PrefixIndex<T> {
    fn default() -> Self {
        Self {
            by_len: BTreeMap::new(),
        }
    }
}

impl<T: Copy + Ord> PrefixIndex<T> {
    pub fn insert(&mut self, prefixes: &[String], id: T) {
        for p in prefixes {
            let ids = self
                .by_len
                .entry(p.len())
                .or_default()
                .entry(p.clone())
                .or_default();
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }

    pub fn remove(&mut self, prefixes: &[String], id: T) {
        for p in prefixes {
            let Some(of_len) = self.by_len.get_mut(&p.len()) else {
                continue;
            };
            if let Some(ids) = of_len.get_mut(p) {
                ids.retain(|i| *i != id);
                if ids.is_empty() {
                    of_len.remove(p);
                }
            }
            if of_len.is_empty() {
                self.by_len.remove(&p.len());
            }
        }
    }

    /// Every id with a prefix that starts `key`, each once, sorted.
    pub fn route(&self, key: &str, out: &mut Vec<T>) {
        out.clear();
        for (len, prefixes) in &self.by_len {
            let Some(head) = key.get(..*len) else {
                break;
            };
            if let Some(ids) = prefixes.get(head) {
                out.extend_from_slice(ids);
            }
        }
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_index_finds_every_binding_whose_prefix_starts_the_key_once() {
        let rs: Vec<Vec<String>> = [
            &["web.", "shared."][..],
            &["web.a"],
            &[""],
            &["api."],
            &["web.", "web.api"],
        ]
        .iter()
        .map(|ps| ps.iter().map(|p| (*p).to_owned()).collect())
        .collect();
        let mut router = PrefixIndex::default();
        for (i, prefixes) in rs.iter().enumerate() {
            router.insert(prefixes, i);
        }
        let mut out = Vec::new();
        let cases: &[(&str, &[usize])] = &[
            ("web.api.port", &[0, 1, 2, 4]),
            ("web.b", &[0, 2, 4]),
            ("shared.x", &[0, 2]),
            ("api.x", &[2, 3]),
            ("other", &[2]),
            ("w", &[2]),
        ];
        for (key, want) in cases {
            router.route(key, &mut out);
            assert_eq!(&out, want, "{key}");
        }
        // a binding that leaves is no longer routed to; others keep their prefixes
        router.remove(&rs[0], 0);
        router.remove(&rs[2], 2);
        router.route("web.api.port", &mut out);
        assert_eq!(out, vec![1, 4]);
        router.route("shared.x", &mut out);
        assert!(out.is_empty());
    }
}
