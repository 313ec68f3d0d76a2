//! The `slipstream` binary: parse flags, dispatch to a subcommand.

use clap::{Parser, Subcommand};
use slipstream::cmd;

#[derive(Parser, Debug)]
#[command(
    name = "slipstream",
    version,
    about = "Sync NATS JetStream KV prefixes into Kubernetes ConfigMaps"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator: reconcile ConfigBindings into ConfigMaps.
    Run(cmd::run::RunArgs),
    /// Print the ConfigBinding CustomResourceDefinition as YAML.
    Crd(cmd::crd::CrdArgs),
    /// Project KV prefixes into a directory, laid out like a ConfigMap volume.
    Sync(cmd::sync::SyncArgs),
    /// Small commands against a KV bucket: put, get, del, ls, watch.
    Kv(cmd::kv::KvArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => cmd::run::main(args).await,
        Command::Crd(args) => cmd::crd::main(args).await,
        Command::Sync(args) => cmd::sync::main(args).await,
        Command::Kv(args) => cmd::kv::main(args).await,
    }
}
