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
    /// The bucket's last revision, read after the ConfigMap was observed;
    /// `None` until looked up (only needed when the ConfigMap's cursor is
    /// ahead of ours).
    pub bucket_last: Option<u64>,
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
    /// The bucket's last revision (fresh).
    BucketLast,
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
    // A cursor ahead of ours is another writer's newer content (refused),
    // unless it is past the bucket's last revision: no writer ever saw
    // that revision, so it was edited by hand and the KV truth goes back.
    let mut bogus_cursor = false;
    if let (Some(theirs), Some(ours)) = (obs.cursor.version(), o.cursor.version())
        && theirs > ours
        && !other_incarnation
    {
        let Some(last) = o.bucket_last else {
            return Decision::Observe(Lookup::BucketLast);
        };
        if theirs.as_u64().is_none_or(|t| t <= last) {
            return Decision::Refuse(Refusal::StaleWriter {
                ours: ours.to_string(),
                theirs: theirs.to_string(),
            });
        }
        bogus_cursor = true;
    }
    let same = !bogus_cursor
        && obs.holds(content, o.target.policy)
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
mod tests;
