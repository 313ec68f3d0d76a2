//! What a binding tells its user: the `Ready`, `Reconciling` and `Stalled`
//! conditions in `status` (the kstatus conventions `kubectl wait`, Flux and
//! kpt read), the status write, and the Events that announce a change.
//!
//! Condition types are [`ConditionType`]; reason words are
//! [`Reason`](crate::reason::Reason), the same word in the condition, the
//! Event and the `reason` label of `slipstream_errors_total`.

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::{Event as KubeEvent, EventType, Recorder},
};
use tracing::debug;

use crate::{
    crd::{Condition, ConfigBinding, ConfigBindingStatus},
    reason::Reason,
    util::time::now_rfc3339_seconds,
};

/// The condition types a binding's status carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// The ConfigMap holds the KV content (what `kubectl wait
    /// --for=condition=Ready` waits for).
    Ready,
    /// Not Ready yet, and the operator is working on it: a first sync, or
    /// retrying an error that may pass (NATS down, bucket not there yet). A
    /// binding that is not Ready always says Reconciling or Stalled, so
    /// kstatus never reads it as current.
    Reconciling,
    /// Retrying will not help: a human must change something.
    Stalled,
    /// The workloads of `target.rollout` carry the content's digest
    /// (`RolledOut`), or why not (`WorkloadNotFound`, `Forbidden`, ...).
    /// Only on bindings that name workloads; Ready does not depend on it.
    Rollout,
}

impl ConditionType {
    pub const fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Reconciling => "Reconciling",
            ConditionType::Stalled => "Stalled",
            ConditionType::Rollout => "Rollout",
        }
    }
}

/// A condition's `status` word.
const fn status_word(on: bool) -> &'static str {
    if on { "True" } else { "False" }
}

/// The state a binding reports: Ready or not, why, and whether it is stalled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
    pub stalled: bool,
}

impl Health {
    pub fn ok(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            ready: true,
            reason,
            message: message.into(),
            stalled: false,
        }
    }

    pub fn err(reason: Reason, message: impl Into<String>, stalled: bool) -> Self {
        Self {
            ready: false,
            reason,
            message: message.into(),
            stalled,
        }
    }

    /// What the stored status already says (a restarted worker does not
    /// re-announce it); `Syncing` for a new binding, or one whose reason
    /// word this version does not know.
    pub fn from_status(status: &ConfigBindingStatus) -> Self {
        let ready = status.condition(ConditionType::Ready.as_str());
        match ready.and_then(|c| Some((c, Reason::from_word(&c.reason)?))) {
            Some((c, reason)) => Self {
                ready: c.status == status_word(true),
                reason,
                message: c.message.clone(),
                stalled: status
                    .condition(ConditionType::Stalled.as_str())
                    .is_some_and(|s| s.status == status_word(true)),
            },
            None => Self::err(Reason::Syncing, "waiting for the bucket watch", false),
        }
    }

    /// Same Ready state, reason and stalled flag.
    pub fn same_state(&self, other: &Health) -> bool {
        (self.ready, self.reason, self.stalled) == (other.ready, other.reason, other.stalled)
    }

    /// Whether the change from `before` to this state deserves an Event:
    /// every failure and the recovery from one, but not the first sync of a
    /// binding (from the initial Syncing), which the Ready condition already
    /// tells, and which would cost one Event write per binding on a cold start.
    pub fn worth_an_event(&self, before: &Health) -> bool {
        !(self.ready && before.reason == Reason::Syncing)
    }

    /// Working towards Ready: not there, not stalled, not suspended on purpose.
    pub fn reconciling(&self) -> bool {
        !self.ready && !self.stalled && self.reason != Reason::Suspended
    }
}

/// Sets Ready, Reconciling and Stalled the way `kubectl wait
/// --for=condition=Ready` and kstatus read them. Transition times have whole
/// seconds, like `metav1.Condition`.
pub fn set_conditions(status: &mut ConfigBindingStatus, health: &Health, generation: Option<i64>) {
    let now = now_rfc3339_seconds();
    let mut set = |type_: ConditionType, on: bool, reason: Reason, message: &str| {
        set_condition_at(status, type_, on, reason, message, generation, &now);
    };
    set(
        ConditionType::Ready,
        health.ready,
        health.reason,
        &health.message,
    );
    if health.reconciling() {
        set(
            ConditionType::Reconciling,
            true,
            health.reason,
            &health.message,
        );
    } else {
        set(ConditionType::Reconciling, false, health.reason, "");
    }
    if health.stalled {
        set(ConditionType::Stalled, true, health.reason, &health.message);
    } else {
        set(ConditionType::Stalled, false, Reason::Progressing, "");
    }
}

/// Sets one condition; its transition time moves only when its status flips.
pub fn set_condition(
    status: &mut ConfigBindingStatus,
    type_: ConditionType,
    on: bool,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
) {
    let now = now_rfc3339_seconds();
    set_condition_at(status, type_, on, reason, message, generation, &now);
}

fn set_condition_at(
    status: &mut ConfigBindingStatus,
    type_: ConditionType,
    on: bool,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
    now: &str,
) {
    let value = status_word(on);
    match status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == type_.as_str())
    {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = Some(now.to_owned());
            }
            c.status = value.into();
            c.reason = reason.as_str().into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => status.conditions.push(Condition {
            type_: type_.as_str().into(),
            status: value.into(),
            reason: reason.as_str().into(),
            message: message.into(),
            last_transition_time: Some(now.to_owned()),
            observed_generation: generation,
        }),
    }
}

/// Writes status with a merge patch; absent fields are cleared explicitly.
pub async fn write_status(
    client: &kube::Client,
    binding: &ConfigBinding,
    status: &ConfigBindingStatus,
) -> Result<(), kube::Error> {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        for field in [
            "observedGeneration",
            "cursor",
            "keys",
            "bytes",
            "lastSyncTime",
            "skippedCount",
            "skippedKeys",
            "lastForceSync",
            "rollouts",
            "conditions",
        ] {
            map.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    let api: Api<ConfigBinding> =
        Api::namespaced(client.clone(), &binding.namespace().unwrap_or_default());
    api.patch_status(
        &binding.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": value })),
    )
    .await
    .map(|_| ())
}

/// What the operator was doing when it published an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Checking the spec and the access policy.
    Validate,
    /// Syncing content.
    Sync,
    /// Rolling the workloads of `target.rollout`.
    Rollout,
}

impl Action {
    const fn as_str(self) -> &'static str {
        match self {
            Action::Validate => "Validate",
            Action::Sync => "Sync",
            Action::Rollout => "Rollout",
        }
    }
}

/// Announces `health` as an Event on the binding: Normal when Ready,
/// Warning otherwise. A failure to record it is logged, not returned.
pub async fn publish_event(
    recorder: &Recorder,
    binding: &impl Resource<DynamicType = ()>,
    health: &Health,
    action: Action,
) {
    let event = KubeEvent {
        type_: if health.ready {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: health.reason.as_str().into(),
        note: Some(health.message.chars().take(1000).collect()),
        action: action.as_str().into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &binding.object_ref(&())).await {
        debug!(error = %e, "event not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_follow_health_and_transition_times_move_only_on_a_flip() {
        let mut status = ConfigBindingStatus::default();
        set_conditions(
            &mut status,
            &Health::err(Reason::TargetConflict, "not ours", true),
            Some(2),
        );
        let ready = status.condition("Ready").unwrap().clone();
        let stalled = status.condition("Stalled").unwrap().clone();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "TargetConflict")
        );
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "TargetConflict")
        );
        assert_eq!(ready.observed_generation, Some(2));

        let mut flipped = status.clone();
        flipped.conditions[0].last_transition_time = Some("before".into());
        set_conditions(&mut flipped, &Health::ok(Reason::Synced, "3 keys"), Some(2));
        let ready = flipped.condition("Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Synced")
        );
        assert_ne!(ready.last_transition_time.as_deref(), Some("before"));
        let stalled = flipped.condition("Stalled").unwrap();
        assert_eq!(
            (
                stalled.status.as_str(),
                stalled.reason.as_str(),
                stalled.message.as_str()
            ),
            ("False", "Progressing", "")
        );

        let mut same = flipped.clone();
        same.conditions[0].last_transition_time = Some("kept".into());
        set_conditions(&mut same, &Health::ok(Reason::Synced, "4 keys"), Some(2));
        let ready = same.condition("Ready").unwrap();
        assert_eq!(ready.last_transition_time.as_deref(), Some("kept"));
        assert_eq!(ready.message, "4 keys");
    }

    /// kstatus' reading of a generic resource: Stalled True is Failed,
    /// Reconciling True is InProgress, otherwise Current.
    fn kstatus(status: &ConfigBindingStatus) -> &'static str {
        let on = |t: &str| status.condition(t).is_some_and(|c| c.status == "True");
        if on("Stalled") {
            "Failed"
        } else if on("Reconciling") {
            "InProgress"
        } else {
            "Current"
        }
    }

    #[test]
    fn only_a_synced_or_suspended_binding_reads_as_current_to_kstatus() {
        let table = [
            (Health::ok(Reason::Synced, "1 key"), "True", "Current"),
            (
                Health::from_status(&ConfigBindingStatus::default()),
                "False",
                "InProgress",
            ),
            (
                Health::err(Reason::BucketNotFound, "no bucket", false),
                "False",
                "InProgress",
            ),
            (
                Health::err(Reason::Timeout, "NATS", false),
                "False",
                "InProgress",
            ),
            (
                Health::err(Reason::KeyCollision, "a", true),
                "False",
                "Failed",
            ),
            (
                Health::err(Reason::Suspended, "suspended", false),
                "False",
                "Current",
            ),
        ];
        for (health, ready, want) in table {
            let mut status = ConfigBindingStatus::default();
            set_conditions(&mut status, &health, Some(3));
            assert_eq!(
                status.condition("Ready").unwrap().status,
                ready,
                "{health:?}"
            );
            assert_eq!(kstatus(&status), want, "{health:?}");
            let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
            assert_eq!(types, ["Ready", "Reconciling", "Stalled"]);
            for c in &status.conditions {
                assert_eq!(c.observed_generation, Some(3));
                let at = c.last_transition_time.as_deref().unwrap();
                assert!(
                    at.ends_with('Z') && !at.contains('.'),
                    "whole seconds: {at}"
                );
            }
        }
    }

    #[test]
    fn events_announce_failures_and_recoveries_but_not_a_first_sync() {
        let syncing = Health::from_status(&ConfigBindingStatus::default());
        let synced = Health::ok(Reason::Synced, "1 key");
        let failed = Health::err(Reason::BucketNotFound, "gone", false);
        assert!(!synced.worth_an_event(&syncing));
        assert!(failed.worth_an_event(&syncing));
        assert!(synced.worth_an_event(&failed));
        assert!(failed.worth_an_event(&synced));
    }

    #[test]
    fn stored_health_reads_back_and_unknown_words_mean_syncing() {
        let mut status = ConfigBindingStatus::default();
        let health = Health::err(Reason::TooLarge, "big", false);
        set_conditions(&mut status, &health, None);
        assert_eq!(Health::from_status(&status), health);
        status.conditions[0].reason = "SomethingOld".into();
        assert_eq!(Health::from_status(&status).reason, Reason::Syncing);
        let fresh = Health::from_status(&ConfigBindingStatus::default());
        assert!(!fresh.ready && fresh.reason == Reason::Syncing);
    }
}
