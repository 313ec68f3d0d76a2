//! Leader election flags of `slipstream run`, turned into a running
//! [`LeaderElection`].

use std::time::Duration;

use clap::{Args, builder::BoolishValueParser};

use super::parse_duration;
use crate::{
    kv::{filter::validate_key, lease::LeaseConfig, nats::ConnectOptions},
    leader::{
        ElectionConfig, LeaderElection, LeaderError, LeaderMetrics, Result, lease_bucket,
        lease_config,
    },
};

/// Leader election flags of `slipstream run`.
#[derive(Args, Clone, Debug)]
pub struct LeaderArgs {
    /// Elect one writing replica with a lease in NATS KV (on by default, so
    /// a second instance never becomes a second writer). `=false` for a
    /// single instance: it then always writes.
    #[arg(
        long = "leader-election",
        env = "SLIPSTREAM_LEADER_ELECTION",
        num_args = 0..=1,
        default_value = "true",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub enabled: bool,
    /// KV bucket holding the lease record (created with history 1 when missing).
    #[arg(
        long = "lease-bucket",
        env = "SLIPSTREAM_LEASE_BUCKET",
        default_value = "slipstream-leases"
    )]
    pub bucket: String,
    /// Servers of a JetStream cluster that keep a copy of the lease bucket
    /// when it is created (1, 3 or 5; an existing bucket keeps its own).
    #[arg(long = "lease-replicas", env = "SLIPSTREAM_LEASE_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
    /// Lease key [default: `<release-name>.leader`].
    #[arg(long = "lease-key", env = "SLIPSTREAM_LEASE_KEY")]
    pub key: Option<String>,
    /// Name of this installation; its replicas share one lease.
    #[arg(
        long = "release-name",
        env = "SLIPSTREAM_RELEASE_NAME",
        default_value = "slipstream"
    )]
    pub release_name: String,
    /// How long a lease record stays valid after its last renew; a crashed
    /// leader is replaced within this time.
    #[arg(long = "lease-ttl", env = "SLIPSTREAM_LEASE_TTL", default_value = "15s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// How often the leader renews its lease (standbys poll as often).
    #[arg(long = "lease-renew", env = "SLIPSTREAM_LEASE_RENEW", default_value = "5s", value_parser = parse_duration)]
    pub renew: Duration,
    /// Holder identity written into the lease [default: env POD_NAME, else `<hostname>-<pid>`].
    #[arg(long = "identity", env = "SLIPSTREAM_IDENTITY")]
    pub identity: Option<String>,
}

impl Default for LeaderArgs {
    fn default() -> Self {
        Self {
            enabled: true,
            bucket: "slipstream-leases".to_owned(),
            replicas: 1,
            key: None,
            release_name: "slipstream".to_owned(),
            ttl: Duration::from_secs(15),
            renew: Duration::from_secs(5),
            identity: None,
        }
    }
}

impl LeaderArgs {
    /// The lease key: `--lease-key`, else `<release-name>.leader`.
    pub fn lease_key(&self) -> String {
        match &self.key {
            Some(k) if !k.is_empty() => k.clone(),
            _ => format!("{}.leader", self.release_name),
        }
    }

    /// `--identity`, else env `POD_NAME`, else `<hostname>-<pid>`.
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .filter(|i| !i.trim().is_empty())
            .or_else(|| std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()))
            .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()))
    }

    /// The lease timing for `--lease-ttl` and `--lease-renew` (see
    /// [`lease_config`]).
    pub fn lease_config(&self) -> Result<LeaseConfig> {
        lease_config(self.ttl, self.renew)
    }

    /// Everything [`LeaderElection::start`] needs, checked.
    pub fn election_config(&self) -> Result<ElectionConfig> {
        let key = self.lease_key();
        validate_key(&key).map_err(|e| {
            LeaderError::InvalidConfig(format!("--lease-key / --release-name: {e}"))
        })?;
        if !self
            .bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || self.bucket.is_empty()
        {
            return Err(LeaderError::InvalidConfig(format!(
                "--lease-bucket {:?}: use 1+ of [a-zA-Z0-9_-]",
                self.bucket
            )));
        }
        Ok(ElectionConfig {
            key,
            identity: self.identity(),
            lease: self.lease_config()?,
        })
    }

    /// The election these flags ask for (a fixed leader when
    /// `--leader-election` is off), started.
    pub fn start(&self, opts: ConnectOptions, metrics: LeaderMetrics) -> Result<LeaderElection> {
        if !self.enabled {
            return Ok(LeaderElection::disabled(metrics));
        }
        let config = self.election_config()?;
        Ok(LeaderElection::start(
            config,
            lease_bucket(&self.bucket, usize::from(self.replicas)),
            opts,
            metrics,
        ))
    }
}

fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "slipstream".to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        leader: LeaderArgs,
    }

    fn parse(args: &[&str]) -> std::result::Result<LeaderArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("slipstream").chain(args.iter().copied()))
            .map(|c| c.leader)
    }

    #[test]
    fn flags_default_to_an_election_on_with_15s_ttl_and_5s_renew() {
        let a = parse(&[]).unwrap();
        assert!(a.enabled);
        assert!(LeaderArgs::default().enabled);
        assert_eq!(a.bucket, "slipstream-leases");
        assert_eq!(a.lease_key(), "slipstream.leader");
        let c = a.lease_config().unwrap();
        assert_eq!(c.ttl, Duration::from_secs(15));
        assert_eq!(c.renew_interval, Duration::from_secs(5));
        assert_eq!(c.renew_deadline, Duration::from_secs(10));
    }

    #[test]
    fn leader_election_flag_accepts_bare_and_explicit_values() {
        assert!(parse(&["--leader-election"]).unwrap().enabled);
        assert!(parse(&["--leader-election=true"]).unwrap().enabled);
        assert!(!parse(&["--leader-election=false"]).unwrap().enabled);
        assert!(parse(&["--leader-election=maybe"]).is_err());
    }

    #[test]
    fn lease_key_derives_from_the_release_name_unless_given() {
        let a = parse(&["--release-name", "prod"]).unwrap();
        assert_eq!(a.lease_key(), "prod.leader");
        let a = parse(&["--release-name", "prod", "--lease-key", "custom"]).unwrap();
        assert_eq!(a.lease_key(), "custom");
    }

    #[test]
    fn explicit_identity_wins_and_the_fallback_is_never_empty() {
        let a = parse(&["--identity", "pod-7"]).unwrap();
        assert_eq!(a.identity(), "pod-7");
        let a = LeaderArgs::default();
        assert!(!a.identity().is_empty());
    }

    #[test]
    fn lease_timing_flags_parse_and_bad_ones_are_refused() {
        let c = parse(&["--lease-ttl", "2s", "--lease-renew", "500ms"])
            .unwrap()
            .lease_config()
            .unwrap();
        assert!(c.renew_interval < c.renew_deadline && c.renew_deadline < c.ttl);
        assert_eq!(c.renew_deadline, Duration::from_millis(1250));
        assert!(parse(&["--lease-ttl", "soon"]).is_err());
    }

    #[test]
    fn bad_keys_and_bucket_names_are_clear_errors() {
        let a = parse(&["--release-name", "has space"]).unwrap();
        let e = a.election_config().unwrap_err().to_string();
        assert!(e.contains("--lease-key"), "{e}");
        let a = parse(&["--lease-bucket", "a.b"]).unwrap();
        let e = a.election_config().unwrap_err().to_string();
        assert!(e.contains("--lease-bucket"), "{e}");
    }
}
