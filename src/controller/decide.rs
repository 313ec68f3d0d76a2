//! The pure step of a binding's write path: from what was observed, what to do.
//!
//! ```text
//! observe (worker: entries, cursor, ConfigMap head, leadership)
//!   -> build (projection: entries -> content)
//!   -> decide (here: write, skip as unchanged, refuse, or look something up first)
//!   -> write (sink: one guarded server-side apply)
//!   -> report (status, Events, metrics)
//! ```
//!
//! [`decide`] does no I/O. When it needs a fact the worker has not read yet
//! (the ConfigMap, or whether a binding named in its claim still exists) it
//! says so ([`Decision::Observe`]); the worker reads it and asks again.

use crate::{
    crd::CreationPolicy,
    kv::WatchCursor,
    projection::{Projected, ProjectionError},
    reason::Reason,
    sink::configmap::{Observed, SinkError, TargetRef},
};

/// What the worker knows about its ConfigMap.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetState {
    /// Not read yet (or a write failed, so what we knew is stale).
    Unknown,
    Absent,
    Present(Box<Observed>),
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// `spec.suspend`.
    pub suspend: bool,
    /// The projected content, or why it must not be written (invariant 4).
    pub content: Result<&'a Projected<'a>, &'a ProjectionError>,
    pub target: &'a TargetRef,
    pub configmap: &'a TargetState,
    /// Whether the binding named in the ConfigMap's claim (when it is not
    /// us) still exists; `None` until looked up.
    pub other_binding_exists: Option<bool>,
    /// The content is complete through this cursor (invariant 1).
    pub cursor: WatchCursor,
    /// The bucket incarnation `cursor` counts in.
    pub incarnation: Option<u64>,
    /// Keys of our last apply (Merge targets cannot tell ours from others'
    /// by looking); `None` until we wrote once.
    pub applied_keys: Option<&'a [String]>,
    /// This replica holds the lease (checked right before each write).
    pub leader: bool,
}

/// What to do with the content.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A fact is missing: read it, then decide again.
    Observe(Lookup),
    /// Do not write; the ConfigMap keeps its last good content.
    Refuse(Refusal),
    /// The ConfigMap already holds the content at `cursor` (invariant 5).
    SkipUnchanged {
        cursor: WatchCursor,
    },
    /// A standby replica writes nothing.
    Standby,
    Write(Write),
}

/// What [`Decision::Observe`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Read the ConfigMap.
    Target,
    /// Does this binding (named in the ConfigMap's claim) still exist?
    OtherBinding(String),
}

/// Why content is not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `spec.suspend` is true.
    Suspended,
    /// Too large, colliding keys, or an invalid key under `keyPolicy: Fail`.
    Projection(ProjectionError),
    /// The ConfigMap belongs to someone else.
    TargetConflict(String),
    /// The ConfigMap holds a newer cursor than ours (invariant 2).
    StaleWriter { ours: String, theirs: String },
}

impl Refusal {
    pub fn reason(&self) -> Reason {
        match self {
            Refusal::Suspended => Reason::Suspended,
            Refusal::Projection(e) => e.reason(),
            Refusal::TargetConflict(_) => Reason::TargetConflict,
            Refusal::StaleWriter { .. } => Reason::StaleWriter,
        }
    }

    /// The sink's error for the refusals it defines.
    pub fn into_sink_error(self) -> Option<SinkError> {
        match self {
            Refusal::TargetConflict(m) => Some(SinkError::TargetConflict(m)),
            Refusal::StaleWriter { ours, theirs } => Some(SinkError::StaleWriter { ours, theirs }),
            Refusal::Suspended | Refusal::Projection(_) => None,
        }
    }
}

/// How the content is written; every write is guarded by the
/// resourceVersion it was decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Create the ConfigMap empty (create-only, so two bindings cannot both
    /// take it), then apply the content.
    Create,
    /// One server-side apply of the content and its cursor.
    Apply { resource_version: Option<String> },
    /// An `Owner` ConfigMap with keys added by hand: write the content and
    /// remove those keys in one patch.
    ReplaceForeign { resource_version: String },
}

/// Decides what to do with the content; see the module documentation.
pub fn decide(o: &Observation<'_>) -> Decision {
    if o.suspend {
        return Decision::Refuse(Refusal::Suspended);
    }
    let content = match o.content {
        Ok(c) => c,
        Err(e) => return Decision::Refuse(Refusal::Projection(e.clone())),
    };
    let obs = match o.configmap {
        TargetState::Unknown => return Decision::Observe(Lookup::Target),
        TargetState::Absent => {
            return if o.leader {
                Decision::Write(Write::Create)
            } else {
                Decision::Standby
            };
        }
        TargetState::Present(obs) => obs,
    };
    let other_exists = match obs.binding.as_deref() {
        Some(other) if other != o.target.binding => match o.other_binding_exists {
            Some(exists) => exists,
            None => return Decision::Observe(Lookup::OtherBinding(other.to_owned())),
        },
        _ => false,
    };
    if let Some(conflict) = ownership_conflict(o.target, obs, other_exists) {
        return Decision::Refuse(Refusal::TargetConflict(conflict));
    }
    let other_incarnation =
        matches!((obs.incarnation, o.incarnation), (Some(a), Some(b)) if a != b);
    if let (Some(theirs), Some(ours)) = (obs.cursor.version(), o.cursor.version())
        && theirs > ours
        && !other_incarnation
    {
        return Decision::Refuse(Refusal::StaleWriter {
            ours: ours.to_string(),
            theirs: theirs.to_string(),
        });
    }
    let same = obs.holds(content, o.target.policy)
        && obs.stamped(content)
        && obs.binding.as_deref() == Some(o.target.binding.as_str())
        && obs.generation == Some(o.target.generation)
        && match o.target.policy {
            CreationPolicy::Owner => !obs.has_foreign_keys(content),
            CreationPolicy::Merge => o.applied_keys == Some(content_keys(content).as_slice()),
        };
    if same {
        return Decision::SkipUnchanged { cursor: obs.cursor };
    }
    if !o.leader {
        return Decision::Standby;
    }
    let resource_version = obs.resource_version.clone();
    match resource_version {
        // hand-added keys are not ours to keep; remove them in the same write
        Some(rv) if o.target.policy == CreationPolicy::Owner && obs.has_foreign_keys(content) => {
            Decision::Write(Write::ReplaceForeign {
                resource_version: rv,
            })
        }
        resource_version => Decision::Write(Write::Apply { resource_version }),
    }
}

/// The ConfigMap keys of `content` (what a Merge target remembers as ours).
pub fn content_keys(p: &Projected<'_>) -> Vec<String> {
    p.data
        .keys()
        .chain(p.binary_data.keys())
        .map(|k| k.to_string())
        .collect()
}

/// Why this binding may not write an existing ConfigMap, if it may not.
/// `other_binding_exists` says whether the binding named in its claim (if
/// not us) still exists: a claim of a deleted binding is stale.
pub fn ownership_conflict(
    target: &TargetRef,
    observed: &Observed,
    other_binding_exists: bool,
) -> Option<String> {
    if let Some(other) = &observed.binding
        && other != &target.binding
        && other_binding_exists
    {
        return Some(format!(
            "ConfigMap {:?} is already written by binding {other:?}",
            target.name
        ));
    }
    if target.policy == CreationPolicy::Owner {
        let ours = observed.binding.as_deref() == Some(target.binding.as_str())
            || (observed.owner_uid.is_some()
                && observed.owner_uid.as_deref() == target.owner.as_ref().map(|o| o.uid.as_str()));
        if !ours {
            return Some(format!(
                "ConfigMap {:?} exists and was not created by slipstream; \
                 delete it or use creationPolicy: Merge",
                target.name
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
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
    fn written(
        policy: CreationPolicy,
        pairs: &[(&'static str, &'static str)],
        at: u64,
    ) -> ConfigMap {
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
                situation: "the ConfigMap holds a newer cursor (stale replica): refused",
                configmap: observed(written(Owner, &[("a", "9")], 9)),
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
}
