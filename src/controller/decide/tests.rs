//! The decision table: one row per situation of README's failure table
//! that the write path decides, plus the rows around them.

use k8s_openapi::api::core::v1::ConfigMap;

use super::*;
use crate::{
    kv::VersionToken,
    sink::configmap::{desired, object::test_target},
};

fn cursor(n: u64) -> WatchCursor {
    WatchCursor::after(VersionToken::from_u64(n))
}

fn target(policy: CreationPolicy) -> TargetRef {
    test_target(policy)
}

fn content(pairs: &[(&'static str, &'static str)]) -> Projected<'static> {
    Projected {
        data: pairs.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
        keys: pairs.len(),
        bytes: pairs.iter().map(|(_, v)| v.len()).sum(),
        ..Projected::default()
    }
}

/// A ConfigMap as our write of `pairs` at `at` left it (resourceVersion "7").
fn written(policy: CreationPolicy, pairs: &[(&'static str, &'static str)], at: u64) -> ConfigMap {
    desired(&target(policy), &content(pairs), cursor(at), Some("7"))
}

fn observed(cm: ConfigMap) -> TargetState {
    TargetState::Present(Box::new(Observed::from_configmap(&cm)))
}

fn with_claim(mut cm: ConfigMap, binding: Option<&str>) -> ConfigMap {
    let a = cm.metadata.annotations.get_or_insert_default();
    match binding {
        Some(b) => a.insert("slipstream.io/binding".into(), b.into()),
        None => a.remove("slipstream.io/binding"),
    };
    if binding != Some("b") {
        cm.metadata.owner_references = None;
    }
    cm
}

fn with_data(mut cm: ConfigMap, key: &str, value: &str) -> ConfigMap {
    cm.data
        .get_or_insert_default()
        .insert(key.into(), value.into());
    cm
}

fn with_incarnation(mut cm: ConfigMap, incarnation: u64) -> ConfigMap {
    cm.metadata.annotations.get_or_insert_default().insert(
        "slipstream.io/bucket-incarnation".into(),
        incarnation.to_string(),
    );
    cm
}

fn too_large() -> ProjectionError {
    ProjectionError::TooLarge {
        bytes: 2 << 20,
        limit: 1 << 20,
        largest_key: "big".into(),
    }
}

fn collision() -> ProjectionError {
    ProjectionError::KeyCollision {
        configmap_key: "a".into(),
        first: "x.a".into(),
        second: "y.a".into(),
    }
}

fn invalid_key() -> ProjectionError {
    ProjectionError::InvalidKey {
        key: "a/b".into(),
        reason: "'/' is not allowed".into(),
    }
}

/// One row: the situation (README's failure table where it applies)
/// and the decision it must get.
struct Row {
    situation: &'static str,
    policy: CreationPolicy,
    suspend: bool,
    content: Result<Projected<'static>, ProjectionError>,
    configmap: TargetState,
    other_binding_exists: Option<bool>,
    cursor: u64,
    incarnation: Option<u64>,
    applied_keys: Option<Vec<String>>,
    leader: bool,
    bucket_last: Option<u64>,
    want: Decision,
}

impl Default for Row {
    fn default() -> Self {
        Self {
            situation: "",
            policy: CreationPolicy::Owner,
            suspend: false,
            content: Ok(content(&[("a", "1")])),
            configmap: observed(written(CreationPolicy::Owner, &[("a", "1")], 5)),
            other_binding_exists: None,
            cursor: 5,
            incarnation: None,
            applied_keys: None,
            leader: true,
            bucket_last: None,
            want: Decision::SkipUnchanged { cursor: cursor(5) },
        }
    }
}

fn apply() -> Decision {
    Decision::Write(Write::Apply {
        resource_version: Some("7".into()),
    })
}

fn rows() -> Vec<Row> {
    use CreationPolicy::{Merge, Owner};
    let ours = || written(Owner, &[("a", "1")], 5);
    vec![
        Row {
            situation: "nothing changed: no write (invariant 5)",
            ..Row::default()
        },
        Row {
            situation: "a newer value: apply guarded by the resourceVersion read",
            content: Ok(content(&[("a", "2")])),
            cursor: 6,
            want: apply(),
            ..Row::default()
        },
        Row {
            situation: "suspend: true: nothing written, whatever changed",
            suspend: true,
            content: Ok(content(&[("a", "2")])),
            want: Decision::Refuse(Refusal::Suspended),
            ..Row::default()
        },
        Row {
            situation: "one value or the total over 1 MiB: last good content stays",
            content: Err(too_large()),
            want: Decision::Refuse(Refusal::Projection(too_large())),
            ..Row::default()
        },
        Row {
            situation: "two KV keys mapping to one ConfigMap key",
            content: Err(collision()),
            want: Decision::Refuse(Refusal::Projection(collision())),
            ..Row::default()
        },
        Row {
            situation: "key invalid for a ConfigMap under keyPolicy: Fail",
            content: Err(invalid_key()),
            want: Decision::Refuse(Refusal::Projection(invalid_key())),
            ..Row::default()
        },
        Row {
            situation: "ConfigMap not read yet: read it first",
            configmap: TargetState::Unknown,
            want: Decision::Observe(Lookup::Target),
            ..Row::default()
        },
        Row {
            situation: "ConfigMap missing (or deleted by hand): create it",
            configmap: TargetState::Absent,
            want: Decision::Write(Write::Create),
            ..Row::default()
        },
        Row {
            situation: "target exists and is not ours (Owner): refused",
            configmap: observed(with_claim(ours(), None)),
            want: Decision::Refuse(Refusal::TargetConflict(
                "ConfigMap \"cm\" exists and was not created by slipstream; \
                 delete it or use creationPolicy: Merge"
                    .into(),
            )),
            ..Row::default()
        },
        Row {
            situation: "a second binding targets the same ConfigMap: look it up first",
            configmap: observed(with_claim(ours(), Some("first"))),
            want: Decision::Observe(Lookup::OtherBinding("first".into())),
            ..Row::default()
        },
        Row {
            situation: "a second binding targets the same ConfigMap: refused, the first keeps it",
            policy: Merge,
            configmap: observed(with_claim(written(Merge, &[("a", "1")], 5), Some("first"))),
            other_binding_exists: Some(true),
            want: Decision::Refuse(Refusal::TargetConflict(
                "ConfigMap \"cm\" is already written by binding \"first\"".into(),
            )),
            ..Row::default()
        },
        Row {
            situation: "Merge: the claiming binding is gone, so its claim is stale",
            policy: Merge,
            configmap: observed(with_claim(written(Merge, &[("a", "1")], 5), Some("gone"))),
            other_binding_exists: Some(false),
            applied_keys: Some(vec!["a".into()]),
            want: apply(),
            ..Row::default()
        },
        Row {
            situation: "Merge into a ConfigMap someone else made: allowed",
            policy: Merge,
            configmap: observed(with_data(
                with_claim(written(Merge, &[], 0), None),
                "theirs",
                "x",
            )),
            want: apply(),
            ..Row::default()
        },
        Row {
            situation: "the ConfigMap holds a newer cursor: the bucket's last revision is read",
            configmap: observed(written(Owner, &[("a", "9")], 9)),
            want: Decision::Observe(Lookup::BucketLast),
            ..Row::default()
        },
        Row {
            situation: "a cursor past the bucket's last revision was edited by hand: the truth goes back",
            configmap: observed(written(Owner, &[("a", "1")], 99_999_999)),
            bucket_last: Some(7),
            want: apply(),
            ..Row::default()
        },
        Row {
            situation: "the ConfigMap holds a newer cursor (stale replica): refused",
            configmap: observed(written(Owner, &[("a", "9")], 9)),
            bucket_last: Some(9),
            want: Decision::Refuse(Refusal::StaleWriter {
                ours: "5".into(),
                theirs: "9".into(),
            }),
            ..Row::default()
        },
        Row {
            situation: "bucket deleted and created again: its cursor restarts, the write goes ahead",
            configmap: observed(with_incarnation(written(Owner, &[("a", "9")], 9), 1)),
            incarnation: Some(2),
            want: apply(),
            ..Row::default()
        },
        Row {
            situation: "ConfigMap edited by hand (value changed): put back",
            configmap: observed(with_data(ours(), "a", "edited")),
            want: apply(),
            ..Row::default()
        },
        Row {
            situation: "Owner ConfigMap with a key added by hand: removed in the same write",
            configmap: observed(with_data(ours(), "extra", "x")),
            want: Decision::Write(Write::ReplaceForeign {
                resource_version: "7".into(),
            }),
            ..Row::default()
        },
        Row {
            situation: "Merge: others' keys beside unchanged ones of ours: no write",
            policy: Merge,
            configmap: observed(with_data(written(Merge, &[("a", "1")], 5), "theirs", "x")),
            applied_keys: Some(vec!["a".into()]),
            ..Row::default()
        },
        Row {
            situation: "Merge: the first write after a start applies once to learn our keys",
            policy: Merge,
            configmap: observed(written(Merge, &[("a", "1")], 5)),
            want: apply(),
            ..Row::default()
        },
        Row {
            situation: "a binding spec change (new generation) rewrites the stamp",
            configmap: observed({
                let mut cm = ours();
                cm.metadata
                    .annotations
                    .get_or_insert_default()
                    .insert("slipstream.io/generation".into(), "2".into());
                cm
            }),
            want: apply(),
            ..Row::default()
        },
        Row {
            situation: "standby replica with a change: nothing written",
            content: Ok(content(&[("a", "2")])),
            cursor: 6,
            leader: false,
            want: Decision::Standby,
            ..Row::default()
        },
        Row {
            situation: "standby replica, ConfigMap missing: nothing written",
            configmap: TargetState::Absent,
            leader: false,
            want: Decision::Standby,
            ..Row::default()
        },
        Row {
            situation: "standby replica, nothing changed: mirrors the ConfigMap's cursor",
            leader: false,
            ..Row::default()
        },
    ]
}

#[test]
fn decide_table() {
    for row in rows() {
        let t = target(row.policy);
        let content = row.content.as_ref();
        let o = Observation {
            suspend: row.suspend,
            content,
            target: &t,
            configmap: &row.configmap,
            other_binding_exists: row.other_binding_exists,
            cursor: cursor(row.cursor),
            incarnation: row.incarnation,
            applied_keys: row.applied_keys.as_deref(),
            leader: row.leader,
            bucket_last: row.bucket_last,
        };
        assert_eq!(decide(&o), row.want, "{}", row.situation);
    }
}

#[test]
fn refusals_carry_their_reason_words() {
    assert_eq!(Refusal::Suspended.reason(), "Suspended");
    assert_eq!(Refusal::Projection(too_large()).reason(), "TooLarge");
    assert_eq!(Refusal::Projection(collision()).reason(), "KeyCollision");
    assert_eq!(Refusal::Projection(invalid_key()).reason(), "InvalidKey");
    let conflict = Refusal::TargetConflict("x".into());
    assert_eq!(conflict.reason(), "TargetConflict");
    assert_eq!(
        conflict.into_sink_error().map(|e| e.reason()),
        Some(Reason::TargetConflict)
    );
    let stale = Refusal::StaleWriter {
        ours: "1".into(),
        theirs: "2".into(),
    };
    assert_eq!(
        stale.clone().into_sink_error().map(|e| e.reason()),
        Some(Reason::StaleWriter)
    );
    assert!(Refusal::Suspended.into_sink_error().is_none());
}

#[test]
fn ownership_rules_table() {
    let theirs = Observed::default();
    let ours = Observed {
        binding: Some("b".into()),
        ..Observed::default()
    };
    let ours_by_owner_ref = Observed {
        owner_uid: Some("uid-1".into()),
        ..Observed::default()
    };
    let other = Observed {
        binding: Some("other".into()),
        ..Observed::default()
    };
    let owner = target(CreationPolicy::Owner);
    let merge = target(CreationPolicy::Merge);
    let rows: &[(&TargetRef, &Observed, bool, bool)] = &[
        (&owner, &ours, false, true),
        (&owner, &ours_by_owner_ref, false, true),
        (&owner, &theirs, false, false),
        (&merge, &theirs, false, true),
        (&merge, &other, true, false),
        // the other binding is gone: its claim is stale, Merge may take over
        (&merge, &other, false, true),
    ];
    for (i, (t, obs, other_exists, allowed)) in rows.iter().enumerate() {
        let got = ownership_conflict(t, obs, *other_exists);
        assert_eq!(got.is_none(), *allowed, "row {i}: {got:?}");
    }
}
