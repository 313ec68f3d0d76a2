//! `slipstream kv`: small commands against one bucket, for when no NATS CLI
//! is at hand (the demo and the kind e2e use them).

use std::{
    io::{IsTerminal, Read, Write},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::StreamExt;

use super::{NatsArgs, parse_duration};
use crate::kv::{
    KvReader, KvUpdate, KvWatcher, KvWriter, WatchEvent,
    nats::{BucketConfig, NatsKv},
};

#[derive(Args, Debug)]
pub struct KvArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The KV bucket.
    #[arg(long, env = "SLIPSTREAM_KV_BUCKET")]
    pub bucket: String,
    #[command(subcommand)]
    pub command: KvCommand,
}

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Write a value (read from stdin when VALUE is left out); prints the revision.
    Put {
        /// The key.
        key: String,
        /// The value [default: stdin].
        value: Option<String>,
    },
    /// Print a value exactly as stored (a newline is added only on a terminal).
    Get {
        /// The key.
        key: String,
    },
    /// Delete a key; prints the revision of the delete marker.
    Del {
        /// The key.
        key: String,
    },
    /// List live keys, optionally under a prefix.
    Ls {
        /// Only keys starting with this.
        prefix: Option<String>,
    },
    /// Print the current values, then every change, until Ctrl-C.
    Watch {
        /// Only keys starting with this.
        prefix: Option<String>,
    },
    /// Create the bucket (no error when it exists).
    CreateBucket {
        /// Revisions kept per key.
        #[arg(long, env = "SLIPSTREAM_KV_HISTORY", default_value_t = 1)]
        history: u8,
        /// Remove entries older than this (e.g. 24h); default: keep forever.
        /// The bucket then leaves a removal marker for each key that ages
        /// out (kept as long as max_age, at least 1 s), so watchers such as
        /// the operator remove the key too.
        #[arg(long, env = "SLIPSTREAM_KV_MAX_AGE", value_parser = parse_duration)]
        max_age: Option<Duration>,
        /// Keep the bucket in memory instead of on disk.
        #[arg(long, env = "SLIPSTREAM_KV_MEMORY")]
        memory: bool,
        /// Servers of a JetStream cluster that keep a copy (1, 3 or 5).
        #[arg(long, env = "SLIPSTREAM_KV_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: u8,
    },
}

pub async fn main(args: KvArgs) -> anyhow::Result<()> {
    let kv = NatsKv::connect(&args.nats.connect_options("slipstream-kv"))
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats.url))?;
    let mut out = std::io::stdout().lock();
    if let KvCommand::CreateBucket {
        history,
        max_age,
        memory,
        replicas,
    } = args.command
    {
        let mut config = BucketConfig::new(&args.bucket);
        config.history = history;
        config.replicas = usize::from(replicas);
        config.max_age = max_age;
        config.limit_markers = max_age.map(|age| age.max(Duration::from_secs(1)));
        if memory {
            config.storage = crate::kv::nats::Storage::Memory;
        }
        kv.create_or_open(&config)
            .await
            .with_context(|| format!("creating bucket {:?}", args.bucket))?;
        writeln!(out, "bucket {} ready", args.bucket)?;
        return Ok(());
    }
    let bucket = kv
        .open(&args.bucket)
        .await
        .with_context(|| format!("opening bucket {:?}", args.bucket))?;
    match args.command {
        KvCommand::Put { key, value } => {
            let value = match value {
                Some(v) => Bytes::from(v),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("reading the value from stdin")?;
                    Bytes::from(buf)
                }
            };
            let rev = bucket
                .put(&key, value)
                .await
                .with_context(|| format!("put {key:?}"))?;
            writeln!(out, "{rev}")?;
        }
        KvCommand::Get { key } => {
            let entry = bucket
                .get(&key)
                .await
                .with_context(|| format!("get {key:?}"))?
                .with_context(|| format!("key {key:?} not found"))?;
            out.write_all(&entry.value)?;
            if std::io::stdout().is_terminal() {
                writeln!(out)?;
            }
        }
        KvCommand::Del { key } => {
            let rev = bucket
                .delete(&key)
                .await
                .with_context(|| format!("delete {key:?}"))?;
            writeln!(out, "{rev}")?;
        }
        KvCommand::Ls { prefix } => {
            for key in bucket
                .keys(prefix.as_deref().unwrap_or(""))
                .await
                .context("listing keys")?
            {
                writeln!(out, "{key}")?;
            }
        }
        KvCommand::Watch { prefix } => {
            let mut stream = bucket
                .watch_prefix(prefix.as_deref().unwrap_or(""))
                .await
                .context("starting the watch")?;
            drop(out);
            loop {
                let event = tokio::select! {
                    ev = stream.next() => ev,
                    _ = tokio::signal::ctrl_c() => break,
                };
                let Some(event) = event else { break };
                let line = match event.context("watch failed")? {
                    WatchEvent::Update(KvUpdate::Put(e)) => format!(
                        "PUT {} @{} {}",
                        e.key,
                        e.version,
                        String::from_utf8_lossy(&e.value).escape_debug()
                    ),
                    WatchEvent::Update(KvUpdate::Delete { key, version }) => {
                        format!("DEL {key} @{version}")
                    }
                    WatchEvent::Update(KvUpdate::Purge { key, version }) => {
                        format!("PURGE {key} @{version}")
                    }
                    WatchEvent::Synced { cursor } => format!("-- synced at {cursor}"),
                };
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
        }
        KvCommand::CreateBucket { .. } => {}
    }
    Ok(())
}
