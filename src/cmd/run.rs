//! `slipstream run` (being built).

use clap::Args;

#[derive(Args, Debug)]
pub struct RunArgs {}

pub async fn main(_args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("`slipstream run` is not implemented yet")
}
