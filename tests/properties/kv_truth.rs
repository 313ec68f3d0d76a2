//! For any sequence of puts, deletes, purges and TTL expiries, delivered as
//! `KvUpdate`s with increasing revisions (with gaps, re-deliveries of old
//! history and restarts in between), the content projected from the
//! product's [`Mirror`] at cursor N is the KV truth at revision N
//! (invariants 1-3), for the binding's prefix.
//!
//! The product's path is the one the controller's workers and `slipstream
//! sync` share: `Mirror::apply` per update, `ProjectionRules::project` of the
//! mirror's entries, and on restart `Mirror::restored` from the written
//! content mapped back with `ProjectionRules::kv_key_of`. The truth is a
//! plain map. A TTL expiry reaches a watch as a `Purge` at its own revision
//! (NATS writes an expiry marker); a delete as a `Delete`.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use slipstream::{
    crd::KeyPolicy,
    kv::{
        KvEntry, KvUpdate, VersionToken, WatchCursor,
        mirror::{Merge, Mirror},
    },
    projection::ProjectionRules,
};

const PREFIX: &str = "p.";

#[derive(Clone, Debug)]
enum Op {
    Put(usize, Vec<u8>),
    Delete(usize),
    Purge(usize),
    /// The per-key TTL ran out.
    Expire(usize),
    /// Revisions taken by keys outside the watch: the next one is higher.
    Gap(u64),
    /// A recreated consumer re-delivers an update already applied.
    Redeliver(usize),
    /// The process restarts from what it wrote: the ConfigMap's content
    /// and cursor.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let value = prop_oneof![
        "[a-z]{0,3}".prop_map(String::into_bytes),
        Just(Vec::new()),
        proptest::collection::vec(128u8.., 1..3),
    ];
    prop_oneof![
        6 => (any::<usize>(), value).prop_map(|(k, v)| Op::Put(k, v)),
        2 => any::<usize>().prop_map(Op::Delete),
        1 => any::<usize>().prop_map(Op::Purge),
        1 => any::<usize>().prop_map(Op::Expire),
        1 => (1u64..4).prop_map(Op::Gap),
        2 => any::<usize>().prop_map(Op::Redeliver),
        1 => Just(Op::Restart),
    ]
}

/// Valid NATS keys under the binding's prefix (escaping has work to do:
/// `/`, `=`, `_`) and a few outside it.
fn keys() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(
        (
            prop_oneof![3 => Just(PREFIX), 1 => Just("q."), 1 => Just("p.x.")],
            "[ab/_=]{1,3}",
        )
            .prop_map(|(p, s)| format!("{p}{s}")),
        1..6,
    )
}

fn token(rev: u64) -> VersionToken {
    VersionToken::from_u64(rev)
}

fn rules() -> ProjectionRules {
    ProjectionRules::new(vec![PREFIX.into()], true, KeyPolicy::Escape).unwrap()
}

/// The written content, as KV keys: every ConfigMap key mapped back.
fn content_as_kv(rules: &ProjectionRules, mirror: &Mirror) -> BTreeMap<String, Bytes> {
    let p = rules
        .project(
            mirror
                .entries()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_ref())),
        )
        .unwrap();
    let text = p.data.iter().map(|(k, v)| (k, v.as_bytes()));
    let binary = p.binary_data.iter().map(|(k, v)| (k, *v));
    text.chain(binary)
        .map(|(cm_key, v)| {
            let kv_key = rules.kv_key_of(cm_key).expect("a written key maps back");
            (kv_key, Bytes::copy_from_slice(v))
        })
        .collect()
}

fn under_prefix(truth: &BTreeMap<String, Bytes>) -> BTreeMap<String, Bytes> {
    truth
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

proptest! {
    #![proptest_config(crate::config(512))]

    #[test]
    fn projected_content_at_cursor_n_is_the_kv_truth_at_n(
        keys in keys(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let rules = rules();
        let mut truth: BTreeMap<String, Bytes> = BTreeMap::new();
        let mut delivered: Vec<KvUpdate> = Vec::new();
        let mut mirror = Mirror::default();
        let mut rev = 0u64;
        for (step, op) in ops.into_iter().enumerate() {
            let before = under_prefix(&truth);
            let update = match op {
                Op::Put(k, v) => {
                    rev += 1;
                    let key = keys[k % keys.len()].clone();
                    let value = Bytes::from(v);
                    truth.insert(key.clone(), value.clone());
                    Some(KvUpdate::Put(KvEntry { key, value, version: token(rev), published: None }))
                }
                Op::Delete(k) => {
                    rev += 1;
                    let key = keys[k % keys.len()].clone();
                    truth.remove(&key);
                    Some(KvUpdate::Delete { key, version: token(rev) })
                }
                Op::Purge(k) | Op::Expire(k) => {
                    rev += 1;
                    let key = keys[k % keys.len()].clone();
                    truth.remove(&key);
                    Some(KvUpdate::Purge { key, version: token(rev) })
                }
                Op::Gap(n) => {
                    rev += n;
                    None
                }
                Op::Redeliver(back) => {
                    if !delivered.is_empty() {
                        let old = delivered[delivered.len() - 1 - back % delivered.len()].clone();
                        let was = mirror.clone();
                        prop_assert_eq!(mirror.apply(old.clone()), Merge::Old, "step {}: {:?}", step, old);
                        prop_assert_eq!(&mirror, &was, "step {}: old history changed the mirror", step);
                    }
                    None
                }
                Op::Restart => {
                    let entries = content_as_kv(&rules, &mirror);
                    mirror = Mirror::restored(entries, mirror.cursor());
                    None
                }
            };
            if let Some(update) = update {
                delivered.push(update.clone());
                let merge = mirror.apply(update.clone());
                prop_assert_ne!(merge, Merge::Old, "step {}: news taken for old history", step);
                if under_prefix(&truth) != before {
                    prop_assert_eq!(merge, Merge::Changed, "step {}: a change that schedules no write: {:?}", step, update);
                }
                // the cursor is the revision of the last update merged
                prop_assert_eq!(mirror.cursor(), WatchCursor::after(token(rev)));
            }
            prop_assert_eq!(
                content_as_kv(&rules, &mirror),
                under_prefix(&truth),
                "step {}: content at cursor {} is not the truth", step, mirror.cursor()
            );
        }
    }
}
