//! Leader election metrics: `slipstream_is_leader`,
//! `slipstream_lease_transitions_total`, `slipstream_lease_renew_failures_total`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// `leader` or `standby`.
    pub to: String,
}

/// Leader election metrics; register them once with [`LeaderMetrics::register`].
#[derive(Clone, Default)]
pub struct LeaderMetrics {
    /// 1 while this replica may write.
    pub is_leader: Gauge,
    /// Changes of this replica's role.
    pub transitions: Family<TransitionLabels, Counter>,
    /// Renews that failed without losing the lease (NATS slow or unreachable).
    pub renew_failures: Counter,
}

impl LeaderMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "is_leader",
            "Whether this replica holds the lease and may write (1) or not (0)",
            self.is_leader.clone(),
        );
        registry.register(
            "lease_transitions",
            "Changes of this replica's role, by the role it moved to",
            self.transitions.clone(),
        );
        registry.register(
            "lease_renew_failures",
            "Lease renewals that failed without an answer (NATS slow or unreachable)",
            self.renew_failures.clone(),
        );
    }

    /// Transitions into `to` (`leader` or `standby`) so far.
    pub fn transitions_to(&self, to: &str) -> u64 {
        self.transitions
            .get(&TransitionLabels { to: to.to_owned() })
            .map(|c| c.get())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_register_under_their_names() {
        let m = LeaderMetrics::default();
        let mut r = Registry::with_prefix("slipstream");
        m.register(&mut r);
        m.is_leader.set(1);
        m.transitions
            .get_or_create(&TransitionLabels {
                to: "leader".into(),
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(text.contains("slipstream_is_leader 1"), "{text}");
        assert!(
            text.contains("slipstream_lease_transitions_total{to=\"leader\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("slipstream_lease_renew_failures_total"),
            "{text}"
        );
        assert_eq!(m.transitions_to("leader"), 1);
    }
}
