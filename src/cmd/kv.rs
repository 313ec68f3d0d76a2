//! `slipstream kv` (being built).

use clap::Args;

#[derive(Args, Debug)]
pub struct KvArgs {}

pub async fn main(_args: KvArgs) -> anyhow::Result<()> {
    anyhow::bail!("`slipstream kv` is not implemented yet")
}
