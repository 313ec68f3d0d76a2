//! Deploy artefacts cannot rot: the Helm chart lints and renders with the
//! properties a production install needs, its CRD is the generated one, and
//! every example parses and applies to the API emulator.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod chart;
mod chart_docs;
mod chart_values;
mod dist;
mod examples;
mod monitoring;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;
use serde_json::Value;

/// The repository root (the `slipstream` crate root).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn chart_dir() -> PathBuf {
    root().join("charts/slipstream")
}

/// Runs `helm <args>`; Ok(stdout) on success, Err(stderr) on failure.
pub fn run_helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(common::tool("helm"))
        .args(args)
        .output()
        .expect("helm runs");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("helm prints UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Every non-empty document of a multi-document YAML stream, as JSON values.
pub fn parse_documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|doc| {
            let v = serde_yaml::Value::deserialize(doc).expect("valid YAML");
            (!v.is_null()).then(|| serde_json::to_value(v).expect("YAML maps have string keys"))
        })
        .collect()
}
