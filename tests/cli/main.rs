//! `slipstream sync` and `slipstream kv` against a real nats-server, both as
//! library calls and through the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod kv;
mod startup;
mod sync;

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::NatsServer;
use slipstream::kv::nats::{BucketConfig, ConnectOptions, NatsBucket, NatsKv};

pub const BIN: &str = env!("CARGO_BIN_EXE_slipstream");

pub async fn bucket(server: &NatsServer, name: &str) -> NatsBucket {
    bucket_with(server, BucketConfig::new(name)).await
}

pub async fn bucket_with(server: &NatsServer, config: BucketConfig) -> NatsBucket {
    let kv = NatsKv::connect(&ConnectOptions::new(server.url()))
        .await
        .unwrap();
    kv.create_or_open(&config).await.unwrap()
}

/// Runs `slipstream ARGS` with `input` on stdin; returns its output.
pub fn slipstream(args: &[&str], input: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(bytes) = input {
        std::io::Write::write_all(&mut stdin, bytes).unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// Like [`slipstream`], failing the test when the command fails.
pub fn slipstream_ok(args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    let out = slipstream(args, input);
    assert!(
        out.status.success(),
        "slipstream {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The `key=value` fields of a `sync --once` summary line.
pub fn summary(stdout: &[u8]) -> BTreeMap<String, String> {
    let text = String::from_utf8(stdout.to_vec()).unwrap();
    let line = text
        .lines()
        .rfind(|l| l.contains("updates="))
        .unwrap_or_else(|| panic!("no summary line in {text:?}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The user-visible files of a synced directory (per-key symlinks), read
/// through one resolved `..data` version so the set is consistent.
pub fn read_dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    loop {
        let Ok(version) = std::fs::read_link(dir.join("..data")) else {
            return BTreeMap::new();
        };
        let mut files = BTreeMap::new();
        let mut raced = false;
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("..") {
                continue;
            }
            match std::fs::read(dir.join(&version).join(&name)) {
                Ok(bytes) => {
                    files.insert(name, bytes);
                }
                // A symlink for a key of another version; retry.
                Err(_) => raced = true,
            }
        }
        if !raced {
            return files;
        }
    }
}

/// Polls `check` until it holds or 15 s pass.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn files(pairs: &[(&str, &[u8])]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect()
}
