//! What `spec.target.rollout` asks for, checked the way the CRD schema
//! checks it (so the emulator and older servers give the same answers).

use std::time::Duration;

use crate::{
    crd::{ConfigBindingSpec, MAX_ROLLOUT_WORKLOADS, WorkloadRef},
    projection::valid_dns_subdomain,
    reason::Reason,
    util::duration::parse_duration,
};

/// The workloads to roll and how often at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Sorted, no duplicates.
    pub workloads: Vec<WorkloadRef>,
    pub min_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("rollout.minInterval {0:?} is not a duration (e.g. 30s, 2m, 1m 30s)")]
    InvalidInterval(String),
    #[error("rollout names {0} workloads: list 1 to {MAX_ROLLOUT_WORKLOADS}")]
    WorkloadCount(usize),
    #[error("rollout workload name {0:?} is not a DNS-1123 subdomain of at most 253 characters")]
    InvalidName(String),
    #[error("rollout names {0} {1:?} twice")]
    Duplicate(String, String),
}

impl PlanError {
    pub fn reason(&self) -> Reason {
        Reason::InvalidRollout
    }
}

impl Plan {
    /// The plan of `spec`; `None` when it asks for no rollouts.
    pub fn from_spec(spec: &ConfigBindingSpec) -> Result<Option<Plan>, PlanError> {
        let Some(rollout) = &spec.target.rollout else {
            return Ok(None);
        };
        let min_interval = parse_duration(&rollout.min_interval)
            .map_err(|_| PlanError::InvalidInterval(rollout.min_interval.clone()))?;
        let n = rollout.workloads.len();
        if n == 0 || n > MAX_ROLLOUT_WORKLOADS {
            return Err(PlanError::WorkloadCount(n));
        }
        let mut workloads = rollout.workloads.clone();
        workloads.sort();
        for pair in workloads.windows(2) {
            if pair[0] == pair[1] {
                return Err(PlanError::Duplicate(
                    pair[0].kind.to_string(),
                    pair[0].name.clone(),
                ));
            }
        }
        if let Some(bad) = workloads.iter().find(|w| !valid_dns_subdomain(&w.name)) {
            return Err(PlanError::InvalidName(bad.name.clone()));
        }
        Ok(Some(Plan {
            workloads,
            min_interval,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WorkloadKind;

    fn spec(rollout: &str) -> ConfigBindingSpec {
        serde_yaml::from_str(&format!(
            "bucket: b\nprefixes: [a.]\ntarget: {{rollout: {rollout}}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn plans_read_the_interval_and_refuse_bad_input() {
        let plan = Plan::from_spec(&spec(
            "{workloads: [{kind: StatefulSet, name: db}, {kind: Deployment, name: web}], minInterval: 1m 30s}",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(plan.min_interval, Duration::from_secs(90));
        assert_eq!(plan.workloads[0].kind, WorkloadKind::Deployment);
        let default = Plan::from_spec(&spec("{workloads: [{kind: DaemonSet, name: agent}]}"))
            .unwrap()
            .unwrap();
        assert_eq!(default.min_interval, Duration::from_secs(30));
        assert_eq!(
            Plan::from_spec(&serde_yaml::from_str("bucket: b\nprefixes: [a.]\n").unwrap()),
            Ok(None)
        );
        for (bad, want) in [
            (
                "{workloads: [{kind: Deployment, name: web}], minInterval: soon}",
                "not a duration",
            ),
            ("{workloads: []}", "0 workloads"),
            ("{workloads: [{kind: Deployment, name: Web}]}", "DNS-1123"),
            (
                "{workloads: [{kind: Deployment, name: web}, {kind: Deployment, name: web}]}",
                "twice",
            ),
        ] {
            let err = Plan::from_spec(&spec(bad)).unwrap_err();
            assert!(err.to_string().contains(want), "{bad}: {err}");
            assert_eq!(err.reason(), Reason::InvalidRollout);
        }
    }
}
