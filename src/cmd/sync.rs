//! `slipstream sync` (being built).

use clap::Args;

#[derive(Args, Debug)]
pub struct SyncArgs {}

pub async fn main(_args: SyncArgs) -> anyhow::Result<()> {
    anyhow::bail!("`slipstream sync` is not implemented yet")
}
