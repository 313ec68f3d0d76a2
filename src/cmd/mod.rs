//! Subcommands of the `slipstream` binary, one module each, and the flags
//! they share.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::kv::nats::ConnectOptions;

pub mod crd;
pub mod kv;
pub mod run;
pub mod sync;

/// NATS connection flags, shared by every subcommand that talks to NATS.
#[derive(Args, Clone, Debug)]
pub struct NatsArgs {
    /// NATS server URL(s), comma separated.
    #[arg(
        long = "nats",
        env = "SLIPSTREAM_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub url: String,
    /// Credentials file (JWT + nkey seed).
    #[arg(long = "nats-creds", env = "SLIPSTREAM_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// Token authentication.
    #[arg(
        long = "nats-token",
        env = "SLIPSTREAM_NATS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    #[arg(long = "nats-user", env = "SLIPSTREAM_NATS_USER")]
    pub user: Option<String>,
    #[arg(
        long = "nats-password",
        env = "SLIPSTREAM_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// File holding an nkey seed.
    #[arg(long = "nats-nkey-seed-file", env = "SLIPSTREAM_NATS_NKEY_SEED_FILE")]
    pub nkey_seed_file: Option<PathBuf>,
    /// CA bundle for the server certificate.
    #[arg(long = "nats-tls-ca", env = "SLIPSTREAM_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (mutual TLS).
    #[arg(long = "nats-tls-cert", env = "SLIPSTREAM_NATS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (mutual TLS).
    #[arg(long = "nats-tls-key", env = "SLIPSTREAM_NATS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Deadline for each NATS call.
    #[arg(long = "nats-timeout", env = "SLIPSTREAM_NATS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl NatsArgs {
    pub fn connect_options(&self, name: &str) -> ConnectOptions {
        ConnectOptions {
            url: self.url.clone(),
            creds_file: self.creds.clone(),
            token: self.token.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            nkey_seed_file: self.nkey_seed_file.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            request_timeout: self.timeout,
            name: Some(name.to_owned()),
        }
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 50ms, 5s, 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }
}
