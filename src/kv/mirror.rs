//! A local copy of the entries under some prefixes and the cursor they are
//! complete through: what a binding's worker and `slipstream sync` both
//! keep between a watch and their sink.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{KvUpdate, VersionToken, WatchCursor};

/// What [`Mirror::apply`] did with an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// At or below the cursor: old history, ignored (invariant 2).
    Old,
    /// News, but the entries already said so (same value, or a removal of
    /// a key that is not there); the cursor moved.
    Unchanged,
    /// The entries changed; the cursor moved.
    Changed,
}

/// KV entries and the cursor they reflect: every update with a revision
/// at or below `cursor` is merged into `entries` (invariant 1 starts here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mirror {
    entries: BTreeMap<String, Bytes>,
    cursor: WatchCursor,
}

impl Mirror {
    /// Entries restored from a sink, complete through `cursor`.
    pub fn restored(entries: BTreeMap<String, Bytes>, cursor: WatchCursor) -> Self {
        Self {
            entries: compact(entries),
            cursor,
        }
    }

    pub fn entries(&self) -> &BTreeMap<String, Bytes> {
        &self.entries
    }

    pub fn cursor(&self) -> WatchCursor {
        self.cursor
    }

    /// True when an update with `version` is already merged.
    pub fn covers(&self, version: &VersionToken) -> bool {
        self.cursor.covers(version)
    }

    /// Merges one update, in revision order; deletes, purges, TTL expiry
    /// and tombstones all remove the key (invariant 3).
    pub fn apply(&mut self, update: KvUpdate) -> Merge {
        let version = update.version();
        if self.cursor.covers(&version) {
            return Merge::Old;
        }
        self.cursor.advance(version);
        let changed = match update {
            KvUpdate::Put(e) => {
                if self.entries.get(&e.key) == Some(&e.value) {
                    false
                } else {
                    self.entries.insert(e.key, e.value);
                    true
                }
            }
            KvUpdate::Delete { key, .. } | KvUpdate::Purge { key, .. } => {
                self.entries.remove(&key).is_some()
            }
        };
        if changed {
            Merge::Changed
        } else {
            Merge::Unchanged
        }
    }

    /// Moves the cursor forward to `version` (never backward): everything
    /// up to it is known to be merged.
    pub fn advance(&mut self, version: VersionToken) {
        self.cursor.advance(version);
    }

    /// Replaces the entries with a complete state (a pruning state-sync);
    /// true when that changed them.
    pub fn replace_entries(&mut self, fresh: BTreeMap<String, Bytes>) -> bool {
        let changed = self.entries != fresh;
        self.entries = compact(fresh);
        changed
    }

    /// Merges a state-sync that cannot prove absent keys deleted: keys it
    /// reported removed go, the others it holds are set, the rest stays.
    /// True when that changed the entries.
    pub fn merge_entries(&mut self, fresh: BTreeMap<String, Bytes>, removed: &[String]) -> bool {
        let changed = fresh.iter().any(|(k, v)| self.entries.get(k) != Some(v))
            || removed.iter().any(|k| self.entries.contains_key(k));
        for k in removed {
            self.entries.remove(k);
        }
        self.entries.extend(fresh);
        self.entries = compact(std::mem::take(&mut self.entries));
        changed
    }

    /// Forgets everything: the next watch is a full state-sync.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.cursor = WatchCursor::none();
    }

    /// Forgets the cursor but keeps the entries (they are replaced or
    /// merged by the state-sync that follows).
    pub fn forget_cursor(&mut self) {
        self.cursor = WatchCursor::none();
    }

    /// Lends the entries out (the worker projects them while it needs
    /// `&mut self` for the write); give them back with [`Self::put_back`].
    pub fn take_entries(&mut self) -> BTreeMap<String, Bytes> {
        std::mem::take(&mut self.entries)
    }

    pub fn put_back(&mut self, entries: BTreeMap<String, Bytes>) {
        self.entries = entries;
    }
}

/// The same map with full nodes. A map filled key by key in order (a
/// state-sync delivers a binding's keys in stream order, often sorted) is
/// left with half-full nodes, twice the memory per entry; building it again
/// from its sorted entries fills them, for a copy of the pointers only.
fn compact(entries: BTreeMap<String, Bytes>) -> BTreeMap<String, Bytes> {
    entries.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvEntry;

    fn put(key: &str, value: &str, rev: u64) -> KvUpdate {
        KvUpdate::Put(KvEntry {
            key: key.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
            version: VersionToken::from_u64(rev),
            published: None,
        })
    }

    fn delete(key: &str, rev: u64) -> KvUpdate {
        KvUpdate::Delete {
            key: key.into(),
            version: VersionToken::from_u64(rev),
        }
    }

    #[test]
    fn updates_merge_in_order_and_old_history_is_ignored() {
        let mut m = Mirror::default();
        let rows = [
            (put("a", "1", 1), Merge::Changed),
            (put("a", "1", 2), Merge::Unchanged),
            (put("a", "0", 1), Merge::Old),
            (delete("b", 3), Merge::Unchanged),
            (put("b", "2", 4), Merge::Changed),
            (delete("b", 5), Merge::Changed),
            (put("b", "late", 5), Merge::Old),
        ];
        for (i, (update, want)) in rows.into_iter().enumerate() {
            assert_eq!(m.apply(update), want, "row {i}");
        }
        assert_eq!(m.cursor().to_string(), "5");
        assert_eq!(m.entries().keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn state_syncs_replace_or_merge() {
        let fresh = |pairs: &[(&str, &str)]| -> BTreeMap<String, Bytes> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), Bytes::copy_from_slice(v.as_bytes())))
                .collect()
        };
        let mut m = Mirror::restored(fresh(&[("a", "1"), ("b", "2")]), WatchCursor::none());
        assert!(
            !m.merge_entries(fresh(&[("a", "1")]), &[]),
            "b may have aged out: kept"
        );
        assert!(
            m.merge_entries(fresh(&[]), &["b".into()]),
            "b has a tombstone: removed"
        );
        assert_eq!(m.entries(), &fresh(&[("a", "1")]));
        assert!(m.replace_entries(fresh(&[("c", "3")])));
        assert!(!m.replace_entries(fresh(&[("c", "3")])));
    }
}
