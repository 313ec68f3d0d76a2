//! Subcommands of the `slipstream` binary, one module each, and the flags
//! they share.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::kv::{
    KvError,
    nats::{ConnectOptions, parse_server_urls},
};

pub mod crd;
pub mod kv;
pub mod leader;
pub mod run;
pub mod sync;

/// The `slipstream` command line. Every option has help text and an env
/// var (`SLIPSTREAM_*`); a test walks the tree to keep it so.
#[derive(Parser, Debug)]
#[command(
    name = "slipstream",
    version,
    about = "Sync NATS JetStream KV prefixes into Kubernetes ConfigMaps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator: reconcile ConfigBindings into ConfigMaps.
    Run(run::RunArgs),
    /// Print the ConfigBinding CustomResourceDefinition as YAML.
    Crd(crd::CrdArgs),
    /// Project KV prefixes into a directory, laid out like a ConfigMap volume.
    Sync(sync::SyncArgs),
    /// Small commands against a KV bucket: put, get, del, ls, watch, ...
    Kv(kv::KvArgs),
}

impl Cli {
    /// Runs the chosen subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run(args) => run::main(args).await,
            Command::Crd(args) => crd::main(args).await,
            Command::Sync(args) => sync::main(args).await,
            Command::Kv(args) => kv::main(args).await,
        }
    }
}

/// NATS connection flags, shared by every subcommand that talks to NATS
/// (global: `slipstream kv put --nats URL ...` works too).
#[derive(Args, Clone, Debug)]
pub struct NatsArgs {
    /// NATS server URL(s), comma separated.
    #[arg(
        long = "nats",
        global = true,
        env = "SLIPSTREAM_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub url: String,
    /// Credentials file (JWT + nkey seed).
    #[arg(long = "nats-creds", global = true, env = "SLIPSTREAM_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// Token authentication.
    #[arg(
        long = "nats-token",
        global = true,
        env = "SLIPSTREAM_NATS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// User name (with --nats-password).
    #[arg(long = "nats-user", global = true, env = "SLIPSTREAM_NATS_USER")]
    pub user: Option<String>,
    /// Password (with --nats-user).
    #[arg(
        long = "nats-password",
        global = true,
        env = "SLIPSTREAM_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// File holding an nkey seed.
    #[arg(
        long = "nats-nkey-seed-file",
        global = true,
        env = "SLIPSTREAM_NATS_NKEY_SEED_FILE"
    )]
    pub nkey_seed_file: Option<PathBuf>,
    /// CA bundle for the server certificate.
    #[arg(long = "nats-tls-ca", global = true, env = "SLIPSTREAM_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (mutual TLS).
    #[arg(
        long = "nats-tls-cert",
        global = true,
        env = "SLIPSTREAM_NATS_TLS_CERT"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Client key (mutual TLS).
    #[arg(long = "nats-tls-key", global = true, env = "SLIPSTREAM_NATS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Deadline for each NATS call.
    #[arg(long = "nats-timeout", global = true,
        env = "SLIPSTREAM_NATS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every argument of every subcommand, with the path of subcommands to it.
    fn all_args(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Arg)>) {
        for arg in cmd.get_arguments() {
            out.push((path.clone(), arg.clone()));
        }
        for sub in cmd.get_subcommands() {
            all_args(sub, format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_arg_has_help_and_every_option_an_env_var() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut args = Vec::new();
        all_args(&cli, "slipstream".to_owned(), &mut args);
        assert!(args.len() > 40, "walked {} args", args.len());
        let mut missing = Vec::new();
        for (path, arg) in &args {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {id}: no help"));
            }
            let is_option = arg.get_long().is_some() || arg.get_short().is_some();
            match arg.get_env() {
                None if is_option => missing.push(format!("{path} --{id}: no env var")),
                Some(env) if !env.to_string_lossy().starts_with("SLIPSTREAM_") => {
                    missing.push(format!("{path} --{id}: env {env:?} not SLIPSTREAM_*"))
                }
                _ => {}
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
