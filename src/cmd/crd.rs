//! `slipstream crd`: print the ConfigBinding CustomResourceDefinition as YAML.

use clap::Args;

#[derive(Args, Debug)]
pub struct CrdArgs {}

pub async fn main(_args: CrdArgs) -> anyhow::Result<()> {
    print!("{}", crate::crd::crd_yaml()?);
    Ok(())
}
