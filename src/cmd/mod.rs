//! Subcommands of the `slipstream` binary, one module each, and the flags
//! they share.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::kv::{
    KvError,
    nats::{ConnectOptions, parse_server_urls},
};

pub mod crd;
pub mod kv;
pub mod leader;
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
    /// Refuses a malformed `--nats` before anything connects: a lazy
    /// connection would otherwise retry a URL that can never work forever.
    pub fn check_url(&self) -> Result<(), KvError> {
        parse_server_urls(&self.url).map(|_| ())
    }

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

// Kept for compatibility (`examples/chaos.rs` names it here); the flags'
// parser lives in `util::duration`.
pub use crate::util::duration::parse_duration;
