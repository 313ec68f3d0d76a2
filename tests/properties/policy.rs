//! The access policy (invariant 7) never grants a bucket or a key outside a
//! grant: for arbitrary policies and requests, `check` allows exactly the
//! requests whose every prefix starts with a prefix granted to the
//! namespace (or to `"*"`) on that bucket, and so every key such a binding
//! can read lies inside a grant.

use std::collections::BTreeMap;

use proptest::{prelude::*, sample::select};
use slipstream::policy::AccessPolicy;

type Grants = BTreeMap<String, Vec<(String, Vec<String>)>>;

const BUCKETS: [&str; 3] = ["app", "public", "other"];

fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec!["", "a", "a.", "a.b.", "ab.", "b.", "web."]).prop_map(String::from),
        "[ab]{1,2}(\\.[ab]{0,2}){0,2}",
    ]
}

fn grants() -> impl Strategy<Value = Grants> {
    proptest::collection::btree_map(
        select(vec!["shop", "dev", "*"]).prop_map(String::from),
        proptest::collection::vec(
            (
                select(BUCKETS.to_vec()).prop_map(String::from),
                proptest::collection::vec(prefix(), 0..3),
            ),
            0..3,
        ),
        0..3,
    )
}

/// The policy file for `grants`, as YAML (JSON is YAML).
fn policy_file(grants: &Grants) -> String {
    let namespaces: serde_json::Map<String, serde_json::Value> = grants
        .iter()
        .map(|(ns, list)| {
            let list = list
                .iter()
                .map(|(bucket, prefixes)| serde_json::json!({"bucket": bucket, "prefixes": prefixes}))
                .collect();
            (ns.clone(), serde_json::Value::Array(list))
        })
        .collect();
    serde_json::json!({ "namespaces": namespaces }).to_string()
}

/// The prefixes granted to `namespace` on `bucket`.
fn granted<'a>(grants: &'a Grants, namespace: &str, bucket: &str) -> Vec<&'a str> {
    [namespace, "*"]
        .iter()
        .filter_map(|ns| grants.get(*ns))
        .flatten()
        .filter(|(b, _)| b == bucket)
        .flat_map(|(_, prefixes)| prefixes.iter().map(String::as_str))
        .collect()
}

proptest! {
    #![proptest_config(crate::config(1024))]

    #[test]
    fn the_access_policy_never_grants_a_bucket_or_prefix_outside_a_grant(
        grants in grants(),
        namespace in select(vec!["shop", "dev", "tenant-x"]),
        bucket in select(BUCKETS.to_vec()),
        requested in proptest::collection::vec(prefix(), 1..4),
        suffixes in proptest::collection::vec("[ab.]{0,3}", 4),
    ) {
        let policy = AccessPolicy::from_yaml(&policy_file(&grants), "policy.yaml").unwrap();
        let allowed = policy.check(namespace, bucket, &requested);
        let prefixes = granted(&grants, namespace, bucket);
        let bucket_granted = [namespace, "*"]
            .iter()
            .filter_map(|ns| grants.get(*ns))
            .flatten()
            .any(|(b, _)| b == bucket);
        let within = bucket_granted
            && requested.iter().all(|r| prefixes.iter().any(|g| r.starts_with(g)));
        prop_assert_eq!(allowed.is_ok(), within, "{:?} {} {} {:?}: {:?}", grants, namespace, bucket, requested, allowed);
        if let Err(e) = &allowed {
            prop_assert_eq!(e.reason().as_str(), "AccessDenied");
        }
        if allowed.is_ok() {
            // any key the binding reads is inside a granted prefix
            for (r, s) in requested.iter().zip(&suffixes) {
                let key = format!("{r}{s}");
                prop_assert!(prefixes.iter().any(|g| key.starts_with(g)), "{} readable outside {:?}", key, prefixes);
            }
        }
    }
}
