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
    KvError, KvPurge, KvReader, KvUpdate, KvWatcher, KvWriter, VersionToken, WatchEvent,
    nats::{BucketConfig, NatsKv},
};

/// `slipstream kv`. The NATS flags and `--bucket` are global: they may
/// come before or after the verb.
#[derive(Args, Debug)]
pub struct KvArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The KV bucket (required).
    #[arg(long, env = "SLIPSTREAM_KV_BUCKET", global = true)]
    pub bucket: Option<String>,
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
    /// Remove every record of a key, leaving one purge marker; prints its revision.
    Purge {
        /// The key.
        key: String,
    },
    /// Print every retained record of a key, oldest first (`PUT key @rev value`,
    /// `DEL key @rev`, `PURGE key @rev`).
    History {
        /// The key.
        key: String,
    },
    /// Print the bucket's settings (history, max_age, storage, replicas,
    /// limits) and state (keys, records, bytes, first and last revision).
    Info,
    /// Write a value only if the key's latest revision is REVISION
    /// (compare-and-set; 0: only if the key has no live value); prints the new revision.
    Update {
        /// The key.
        key: String,
        /// The value [default: stdin].
        value: Option<String>,
        /// The revision the key must be at.
        #[arg(long, env = "SLIPSTREAM_KV_REVISION")]
        revision: u64,
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

/// `value`, else all of stdin.
fn value_or_stdin(value: Option<String>) -> anyhow::Result<Bytes> {
    Ok(match value {
        Some(v) => Bytes::from(v),
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the value from stdin")?;
            Bytes::from(buf)
        }
    })
}

/// One record as `watch` and `history` print it.
fn record_line(update: &KvUpdate) -> String {
    match update {
        KvUpdate::Put(e) => format!(
            "PUT {} @{} {}",
            e.key,
            e.version,
            String::from_utf8_lossy(&e.value).escape_debug()
        ),
        KvUpdate::Delete { key, version } => format!("DEL {key} @{version}"),
        KvUpdate::Purge { key, version } => format!("PURGE {key} @{version}"),
    }
}

pub async fn main(args: KvArgs) -> anyhow::Result<()> {
    let Some(bucket_name) = args.bucket.clone().filter(|b| !b.is_empty()) else {
        anyhow::bail!("--bucket (env SLIPSTREAM_KV_BUCKET) is required: the KV bucket to use");
    };
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
        let mut config = BucketConfig::new(&bucket_name);
        config.history = history;
        config.replicas = usize::from(replicas);
        config.max_age = max_age;
        config.limit_markers = max_age.map(|age| age.max(Duration::from_secs(1)));
        if memory {
            config.storage = crate::kv::nats::Storage::Memory;
        }
        kv.create_or_open(&config)
            .await
            .with_context(|| format!("creating bucket {bucket_name:?}"))?;
        writeln!(out, "bucket {bucket_name} ready")?;
        return Ok(());
    }
    let bucket = kv
        .open(&bucket_name)
        .await
        .with_context(|| format!("opening bucket {bucket_name:?}"))?;
    match args.command {
        KvCommand::Put { key, value } => {
            let value = value_or_stdin(value)?;
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
                    WatchEvent::Update(update) => record_line(&update),
                    WatchEvent::Synced { cursor } => format!("-- synced at {cursor}"),
                };
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
        }
        KvCommand::Purge { key } => {
            let rev = bucket
                .purge(&key)
                .await
                .with_context(|| format!("purge {key:?}"))?;
            writeln!(out, "{rev}")?;
        }
        KvCommand::History { key } => {
            let records = bucket
                .history(&key)
                .await
                .with_context(|| format!("history {key:?}"))?;
            if records.is_empty() {
                anyhow::bail!("key {key:?} has no record in bucket {bucket_name:?}");
            }
            for record in &records {
                writeln!(out, "{}", record_line(record))?;
            }
        }
        KvCommand::Info => {
            let status = bucket
                .status()
                .await
                .context("reading the bucket's state")?;
            writeln!(out, "{status}")?;
        }
        KvCommand::Update {
            key,
            value,
            revision,
        } => {
            let value = value_or_stdin(value)?;
            let written = if revision == 0 {
                bucket.create(&key, value).await
            } else {
                bucket
                    .update(&key, value, VersionToken::from_u64(revision))
                    .await
            };
            match written {
                Ok(rev) => writeln!(out, "{rev}")?,
                Err(KvError::RevisionMismatch { .. } | KvError::AlreadyExists(_)) => {
                    let now = bucket
                        .entry(&key)
                        .await
                        .ok()
                        .flatten()
                        .map_or("no record".to_owned(), |u| {
                            format!("revision {}", u.version())
                        });
                    anyhow::bail!(
                        "update {key:?} refused: expected revision {revision}, the key is at {now}"
                    );
                }
                Err(e) => return Err(e).with_context(|| format!("update {key:?}")),
            }
        }
        KvCommand::CreateBucket { .. } => {}
    }
    Ok(())
}
