//! `slipstream crd` (being built).

use clap::Args;

#[derive(Args, Debug)]
pub struct CrdArgs {}

pub async fn main(_args: CrdArgs) -> anyhow::Result<()> {
    anyhow::bail!("`slipstream crd` is not implemented yet")
}
