//! Rolling the workloads that consume a binding's ConfigMap
//! (`spec.target.rollout`).
//!
//! When the content a binding wrote changes (its digest, the value of the
//! ConfigMap's `slipstream.io/content-digest`; the cursor is not content),
//! each named Deployment, StatefulSet or DaemonSet in the binding's
//! namespace gets the pod-template annotation [`annotation_key`] set to that
//! digest, by a server-side apply under the field manager
//! [`field_manager`] that owns this one annotation and nothing else.
//! Kubernetes then rolls the workload the normal way.
//!
//! The parts: [`plan`] (what the spec asks for, checked), [`coalescer`]
//! (at most one rollout per workload per `minInterval`, the last content
//! always delivered), [`workload`] (the read and the apply). The worker's
//! `rollout` hook drives them: leader only, checked right before each
//! write, nothing while suspended, and nothing written when the template
//! already carries the digest (so a restart or a failover rolls nothing).

pub mod coalescer;
pub mod plan;
pub mod workload;

pub use coalescer::{Coalescer, Offer};
pub use plan::{Plan, PlanError};

use crate::digest::Fnv1a;

/// The pod-template annotation prefix; the binding's name follows.
pub const ANNOTATION_PREFIX: &str = "slipstream.io/config-digest-";
/// The field manager prefix; the binding's name follows.
pub const FIELD_MANAGER_PREFIX: &str = "slipstream-rollout-";

/// Longest name part of an annotation key (a qualified name).
const MAX_ANNOTATION_NAME: usize = 63;
/// Longest field manager name the API accepts.
const MAX_FIELD_MANAGER: usize = 128;

/// `prefix` + `binding`, shortened to `max` characters when needed: a long
/// name keeps its head and gets a digest of the whole name, so two
/// bindings never share one annotation or field manager.
fn named(prefix: &str, binding: &str, max: usize) -> String {
    if prefix.len() + binding.len() <= max {
        return format!("{prefix}{binding}");
    }
    let hash = Fnv1a::of(binding.as_bytes());
    let room = max - prefix.len() - 17;
    let head = binding[..room.min(binding.len())].trim_end_matches(['.', '-']);
    format!("{prefix}{head}-{hash:016x}")
}

/// `slipstream.io/config-digest-<binding>`: one per binding, so two
/// bindings feeding one workload each own their own annotation.
pub fn annotation_key(binding: &str) -> String {
    let name = ANNOTATION_PREFIX
        .split_once('/')
        .map_or(ANNOTATION_PREFIX, |(_, n)| n);
    let domain = &ANNOTATION_PREFIX[..ANNOTATION_PREFIX.len() - name.len()];
    format!("{domain}{}", named(name, binding, MAX_ANNOTATION_NAME))
}

/// `slipstream-rollout-<binding>`.
pub fn field_manager(binding: &str) -> String {
    named(FIELD_MANAGER_PREFIX, binding, MAX_FIELD_MANAGER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_binding_and_fit_the_api_limits() {
        assert_eq!(annotation_key("web"), "slipstream.io/config-digest-web");
        assert_eq!(field_manager("web"), "slipstream-rollout-web");
        let long = "a".repeat(200) + ".example";
        let key = annotation_key(&long);
        let (_, name) = key.split_once('/').unwrap();
        assert!(name.len() <= 63, "{name}");
        assert!(name.starts_with("config-digest-aaa"));
        assert_ne!(annotation_key(&long), annotation_key(&(long.clone() + "x")));
        assert!(field_manager(&long).len() <= 128);
    }
}
