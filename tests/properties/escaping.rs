//! `keyPolicy: Escape`: every KV key escapes to a ConfigMap key that decodes
//! back to exactly that KV key, so two keys never merge, and an escaped key
//! that is written is always a valid ConfigMap key.

use proptest::prelude::*;
use slipstream::{
    crd::KeyPolicy,
    projection::{
        KeyDecision, MAX_KEY_LEN, ProjectionRules, configmap_key_problem, escape_key, unescape_key,
    },
};

/// Keys made of the characters the escaping treats specially (`_`, `.`,
/// hex digits, bytes it must escape) so that near-collisions such as `a/b`
/// vs `a_2Fb` vs `a__2Fb` come up often; plus arbitrary Unicode.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[_.2EFf/=aA-]{0,8}",
        1 => "[-/_=.a-zA-Z0-9]{1,40}",
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(crate::config(2048))]

    #[test]
    fn escape_round_trips_and_yields_only_allowed_characters(k in key()) {
        let escaped = escape_key(&k);
        let back = unescape_key(&escaped);
        prop_assert_eq!(back.as_deref(), Some(k.as_str()));
        if !k.is_empty() && escaped.len() <= MAX_KEY_LEN {
            prop_assert_eq!(configmap_key_problem(&escaped), None, "{:?} -> {:?}", k, escaped);
        }
    }

    #[test]
    fn two_different_keys_never_escape_to_one(a in key(), b in key()) {
        prop_assume!(a != b);
        prop_assert_ne!(escape_key(&a), escape_key(&b));
        // the nearest pair there is: a key and its own escaped form
        let ea = escape_key(&a);
        if ea != a {
            prop_assert_ne!(escape_key(&ea), ea.clone(), "{:?} and {:?}", a, ea);
        }
    }

    #[test]
    fn a_key_escape_maps_is_a_valid_configmap_key_that_maps_back(
        prefix in "[a-c]{1,2}\\.",
        strip in any::<bool>(),
        rest in key(),
    ) {
        let rules = ProjectionRules::new(vec![prefix.clone()], strip, KeyPolicy::Escape).unwrap();
        let kv_key = format!("{prefix}{rest}");
        match rules.map_key(&kv_key) {
            KeyDecision::Mapped(cm_key) => {
                prop_assert_eq!(configmap_key_problem(&cm_key), None, "{:?} -> {:?}", kv_key, cm_key);
                // one prefix: the mapping is invertible, as a restart needs
                prop_assert_eq!(rules.kv_key_of(&cm_key), Some(kv_key.clone()));
            }
            KeyDecision::Skip(why) => {
                // only keys that cannot be represented at all are left out
                let name = if strip { rest.as_str() } else { kv_key.as_str() };
                prop_assert!(
                    name.is_empty() || escape_key(name).len() > MAX_KEY_LEN,
                    "{:?} skipped: {}", kv_key, why
                );
            }
            other => prop_assert!(false, "{:?} -> {:?}", kv_key, other),
        }
    }
}
