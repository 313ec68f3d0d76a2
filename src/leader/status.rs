//! What `/readyz` and logs know about this replica's part in the election.

/// This replica's part in the election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Election off: this replica always writes.
    Disabled,
    /// Waiting for the lease bucket or the first attempt.
    Starting,
    Standby,
    Leader,
}

/// What `/readyz` and logs need to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderStatus {
    pub role: Role,
    /// The holder last seen in the lease record (`None`: free or unknown).
    pub holder: Option<String>,
    /// The last lease operation's failure; cleared by the next success.
    pub error: Option<String>,
}

/// Why `/readyz` answers 503; its `Display` is the response body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("leader cannot renew its lease (writes stop at the renew deadline): {0}")]
    LeaderCannotRenew(String),
    #[error("lease unreachable: {0}")]
    LeaseUnreachable(String),
    #[error("leader election starting")]
    Starting,
}

impl LeaderStatus {
    /// `Ok` for a working leader and for a standby; an error for a leader
    /// that cannot renew and for any replica that cannot reach the lease.
    pub fn readiness(&self) -> Result<(), NotReady> {
        match (self.role, &self.error) {
            (Role::Disabled, _) => Ok(()),
            (Role::Leader, Some(e)) => Err(NotReady::LeaderCannotRenew(e.clone())),
            (_, Some(e)) => Err(NotReady::LeaseUnreachable(e.clone())),
            (Role::Starting, None) => Err(NotReady::Starting),
            (Role::Standby | Role::Leader, None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_fails_only_for_a_failing_leader_or_an_unreachable_lease() {
        let s = |role, error: Option<&str>| LeaderStatus {
            role,
            holder: None,
            error: error.map(str::to_owned),
        };
        assert!(s(Role::Standby, None).readiness().is_ok());
        assert!(s(Role::Leader, None).readiness().is_ok());
        assert!(s(Role::Disabled, Some("x")).readiness().is_ok());
        assert_eq!(s(Role::Starting, None).readiness(), Err(NotReady::Starting));
        let e = s(Role::Leader, Some("timed out")).readiness().unwrap_err();
        assert!(e.to_string().contains("cannot renew"), "{e}");
        assert_eq!(
            s(Role::Standby, Some("timed out")).readiness(),
            Err(NotReady::LeaseUnreachable("timed out".into()))
        );
    }
}
