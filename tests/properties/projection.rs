//! Projection of any entry set (invariant 4): the content depends on the set,
//! not on the order it arrives in; it holds exactly the mapped entries,
//! whole; over 1 MiB, with colliding keys or (under `Fail`) an invalid key
//! it is refused as a whole and the error names the cause.

use std::collections::{BTreeMap, BTreeSet};

use proptest::{prelude::*, sample::select};
use slipstream::{
    crd::KeyPolicy,
    projection::{
        KeyDecision, MAX_CONFIGMAP_BYTES, ProjectionError, ProjectionRules, configmap_key_problem,
    },
};

pub fn rules() -> impl Strategy<Value = ProjectionRules> {
    (
        proptest::sample::subsequence(vec!["a.", "b.", "a.b.", "c"], 1..=4),
        any::<bool>(),
        select(vec![KeyPolicy::Escape, KeyPolicy::Skip, KeyPolicy::Fail]),
    )
        .prop_map(|(prefixes, strip, policy)| {
            ProjectionRules::new(
                prefixes.into_iter().map(String::from).collect(),
                strip,
                policy,
            )
            .unwrap()
        })
}

/// Keys under (and outside) the prefixes above, with suffixes short and
/// alike enough that stripping and escaping collide now and then.
fn kv_key() -> impl Strategy<Value = String> {
    (
        select(vec!["a.", "b.", "a.b.", "c", "c.", "d.", ""]),
        "[xy_/=.]{0,3}",
    )
        .prop_map(|(p, s)| format!("{p}{s}"))
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z é]{0,6}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..6),
        Just(vec![0xff, 0x00]),
    ]
}

fn entries() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
    proptest::collection::btree_map(kv_key(), value(), 0..12)
}

/// What projecting `entries` must give, worked out key by key.
struct Expected {
    data: BTreeMap<String, String>,
    binary: BTreeMap<String, Vec<u8>>,
    skipped: Vec<String>,
    bytes: usize,
    /// Causes that must refuse the content; empty when it may be written.
    causes: BTreeSet<&'static str>,
    /// ConfigMap keys claimed by more than one KV key, with those KV keys.
    collisions: BTreeMap<String, Vec<String>>,
}

fn expected(rules: &ProjectionRules, entries: &BTreeMap<String, Vec<u8>>) -> Expected {
    let mut claims: BTreeMap<String, Vec<(&str, &[u8])>> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut causes = BTreeSet::new();
    for (k, v) in entries {
        match rules.map_key(k) {
            KeyDecision::NotMine => {}
            KeyDecision::Skip(_) => skipped.push(k.clone()),
            KeyDecision::Invalid(_) => {
                causes.insert("InvalidKey");
            }
            KeyDecision::Mapped(cm) => claims.entry(cm.into_owned()).or_default().push((k, v)),
        }
    }
    let collisions: BTreeMap<String, Vec<String>> = claims
        .iter()
        .filter(|(_, kv)| kv.len() > 1)
        .map(|(cm, kv)| (cm.clone(), kv.iter().map(|(k, _)| k.to_string()).collect()))
        .collect();
    if !collisions.is_empty() {
        causes.insert("KeyCollision");
    }
    let bytes = claims.values().flatten().map(|(_, v)| v.len()).sum();
    if bytes > MAX_CONFIGMAP_BYTES {
        causes.insert("TooLarge");
    }
    let mut data = BTreeMap::new();
    let mut binary = BTreeMap::new();
    for (cm, kv) in claims {
        let v = kv[0].1;
        if let Ok(text) = std::str::from_utf8(v) {
            data.insert(cm, text.to_owned());
        } else {
            binary.insert(cm, v.to_vec());
        }
    }
    Expected {
        data,
        binary,
        skipped,
        bytes,
        causes,
        collisions,
    }
}

/// data, binaryData, skipped, bytes, keys
type Content = (
    BTreeMap<String, String>,
    BTreeMap<String, Vec<u8>>,
    Vec<String>,
    usize,
    usize,
);

fn project(
    rules: &ProjectionRules,
    entries: &[(String, Vec<u8>)],
) -> Result<Content, ProjectionError> {
    let p = rules.project(entries.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    Ok((
        p.data
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        p.binary_data
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect(),
        p.skipped.clone(),
        p.bytes,
        p.keys,
    ))
}

/// Entries whose value sizes add up to around the limit, many exactly at
/// it or one byte either side; text or binary.
fn sized_entries() -> impl Strategy<Value = Vec<(String, usize, u8)>> {
    (
        proptest::collection::vec(0usize..=MAX_CONFIGMAP_BYTES / 2, 0..5),
        -2i64..=2,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(mut sizes, delta, near_limit, binary)| {
            let sum: usize = sizes.iter().sum();
            if near_limit {
                let last = MAX_CONFIGMAP_BYTES as i64 - sum as i64 + delta;
                if last >= 0 {
                    sizes.push(last as usize);
                }
            }
            let fill = if binary { 0xff } else { b'x' };
            sizes
                .into_iter()
                .enumerate()
                .map(|(i, size)| (format!("p.k{i}"), size, fill))
                .collect()
        })
}

proptest! {
    #![proptest_config(crate::config(512))]

    #[test]
    fn projection_depends_on_the_entry_set_not_on_its_order(
        rules in rules(),
        shuffled in entries()
            .prop_map(|m| m.into_iter().collect::<Vec<_>>())
            .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
    ) {
        let (sorted, shuffled) = shuffled;
        let a = project(&rules, &sorted);
        let b = project(&rules, &shuffled);
        match (&a, &b) {
            (Ok(x), Ok(y)) => prop_assert_eq!(x, y),
            (Err(x), Err(y)) => prop_assert_eq!(x.reason(), y.reason(), "{} vs {}", x, y),
            _ => prop_assert!(false, "sorted: {:?}, shuffled: {:?}", a, b),
        }
    }

    #[test]
    fn projection_writes_exactly_the_mapped_entries_or_refuses_naming_the_cause(
        rules in rules(),
        entries in entries(),
    ) {
        let want = expected(&rules, &entries);
        let pairs: Vec<_> = entries.clone().into_iter().collect();
        match project(&rules, &pairs) {
            Ok((data, binary, skipped, bytes, keys)) => {
                prop_assert!(want.causes.is_empty(), "written despite {:?}", want.causes);
                prop_assert_eq!(&data, &want.data);
                prop_assert_eq!(&binary, &want.binary);
                prop_assert_eq!(&skipped, &want.skipped);
                prop_assert_eq!(bytes, want.bytes);
                prop_assert_eq!(keys, data.len() + binary.len());
                for k in data.keys().chain(binary.keys()) {
                    prop_assert_eq!(configmap_key_problem(k), None, "written key {:?}", k);
                    prop_assert!(!(data.contains_key(k) && binary.contains_key(k)), "{:?} twice", k);
                }
            }
            Err(e) => {
                prop_assert!(want.causes.contains(e.reason().as_str()), "{} but causes {:?}", e, want.causes);
                if let ProjectionError::KeyCollision { configmap_key, first, second } = &e {
                    let claimants = want.collisions.get(configmap_key);
                    prop_assert!(claimants.is_some(), "{} names no collision", e);
                    let claimants = claimants.unwrap();
                    prop_assert!(first != second && claimants.contains(first) && claimants.contains(second), "{}", e);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(crate::config(256))]

    #[test]
    fn content_over_one_mebibyte_is_refused_whole_and_never_written_in_part(
        sized in sized_entries(),
        policy in select(vec![KeyPolicy::Escape, KeyPolicy::Skip, KeyPolicy::Fail]),
    ) {
        let rules = ProjectionRules::new(vec!["p.".into()], false, policy).unwrap();
        let values: Vec<(String, Vec<u8>)> = sized
            .iter()
            .map(|(k, size, fill)| (k.clone(), vec![*fill; *size]))
            .collect();
        let total: usize = sized.iter().map(|(_, s, _)| s).sum();
        match rules.project(values.iter().map(|(k, v)| (k.as_str(), v.as_slice()))) {
            Ok(p) => {
                prop_assert!(total <= MAX_CONFIGMAP_BYTES, "{} bytes written", total);
                prop_assert_eq!(p.bytes, total);
                prop_assert_eq!(p.keys, values.len());
                for (k, v) in &values {
                    let written = p.data.get(k.as_str()).map(|s| s.as_bytes())
                        .or_else(|| p.binary_data.get(k.as_str()).copied());
                    prop_assert_eq!(written, Some(v.as_slice()), "{} not written whole", k);
                }
            }
            Err(ProjectionError::TooLarge { bytes, limit, largest_key }) => {
                prop_assert!(total > MAX_CONFIGMAP_BYTES, "refused at {} bytes", total);
                prop_assert_eq!(bytes, total);
                prop_assert_eq!(limit, MAX_CONFIGMAP_BYTES);
                let largest = sized.iter().map(|(_, s, _)| *s).max().unwrap_or(0);
                let named = sized.iter().find(|(k, _, _)| *k == largest_key);
                prop_assert_eq!(named.map(|(_, s, _)| *s), Some(largest), "names {}", largest_key);
            }
            Err(e) => prop_assert!(false, "unexpected {}", e),
        }
    }
}
