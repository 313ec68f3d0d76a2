//! The `slipstream` binary: parse flags, dispatch to a subcommand
//! ([`slipstream::cmd::Cli`]).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    slipstream::cmd::Cli::parse().run().await
}
