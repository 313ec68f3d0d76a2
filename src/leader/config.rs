//! What an election needs, checked: the lease key, this replica's identity,
//! and the lease timing.

use std::time::Duration;

use crate::kv::{
    KvError,
    lease::{LeaseConfig, LeaseError},
    nats::BucketConfig,
};

pub type Result<T, E = LeaderError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid leader election settings: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// Which lease this replica contends for, as whom, with what timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    pub key: String,
    pub identity: String,
    pub lease: LeaseConfig,
}

/// The lease bucket: history 1 (only the current record matters) on
/// `replicas` servers of a JetStream cluster, so losing a node does not
/// lose the lease.
pub fn lease_bucket(name: &str, replicas: usize) -> BucketConfig {
    let mut config = BucketConfig::new(name);
    config.history = 1;
    config.replicas = replicas;
    config
}

/// The lease timing for `--lease-ttl` and `--lease-renew`: the holder
/// trusts a renew for halfway between the renew interval and the TTL
/// (10 s for 15 s / 5 s), leaving the rest as margin for clock skew and a
/// write already in flight.
pub fn lease_config(ttl: Duration, renew: Duration) -> Result<LeaseConfig> {
    if renew.is_zero() || renew >= ttl {
        return Err(LeaderError::InvalidConfig(format!(
            "--lease-renew ({renew:?}) must be above zero and shorter than --lease-ttl ({ttl:?})"
        )));
    }
    let config = LeaseConfig {
        ttl,
        renew_deadline: renew + (ttl - renew) / 2,
        renew_interval: renew,
        retry_interval: (renew / 4).max(Duration::from_millis(20)),
    };
    config
        .validate()
        .map_err(|e| LeaderError::InvalidConfig(e.to_string()))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renew_must_be_shorter_than_ttl_and_the_deadline_lies_between() {
        let c = lease_config(Duration::from_secs(2), Duration::from_millis(500)).unwrap();
        assert!(c.renew_interval < c.renew_deadline && c.renew_deadline < c.ttl);
        assert_eq!(c.renew_deadline, Duration::from_millis(1250));
        assert!(lease_config(Duration::from_secs(5), Duration::from_secs(5)).is_err());
        assert!(lease_config(Duration::from_secs(5), Duration::ZERO).is_err());
    }
}
