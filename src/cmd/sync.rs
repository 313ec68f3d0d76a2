//! `slipstream sync`: KV prefixes projected into a directory, no cluster
//! needed.
//!
//! Same projection rules as the operator ([`crate::projection`]), written
//! with the directory sink ([`crate::sink::dir`]): a reader never sees a half
//! set. The resume cursor and the KV keys behind each file are stored inside
//! the written version, so a restart watches only the delta after it and
//! rebuilds its state from the files (invariant 1: the stored cursor covers
//! exactly the written content). Until a watch reports `Synced`, nothing is
//! written, so the directory never holds a partial initial state.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::{NatsArgs, parse_duration};
use crate::{
    crd::KeyPolicy,
    digest::Fnv1a,
    kv::{
        KvError, KvUpdate, KvWatcher, WatchCursor, WatchEvent,
        mirror::{Merge, Mirror},
        nats::NatsConnector,
    },
    metrics::{http, sync::SyncMetrics},
    projection::{KeyDecision, Projected, ProjectionRules},
    sink::dir::{DirSink, Written},
    util::{
        backoff::Backoff,
        logging::{LogArgs, Output},
        shutdown::shutdown_signal,
        time::sleep_until,
    },
};

#[derive(Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// KV bucket to read.
    #[arg(long, env = "SLIPSTREAM_SYNC_BUCKET")]
    pub bucket: String,
    /// Key prefix to project (repeat, or list several after one flag; the
    /// env var takes a comma-separated list).
    #[arg(
        long = "prefix",
        env = "SLIPSTREAM_SYNC_PREFIXES",
        required = true,
        num_args = 1..,
        value_delimiter = ','
    )]
    pub prefixes: Vec<String>,
    /// Directory to write (created when missing).
    #[arg(long, env = "SLIPSTREAM_SYNC_DIR")]
    pub dir: PathBuf,
    /// Drop the matched prefix from file names.
    #[arg(long, env = "SLIPSTREAM_SYNC_STRIP_PREFIX")]
    pub strip_prefix: bool,
    /// Keys that are not valid file (ConfigMap) names: Escape, Skip or Fail.
    #[arg(long, env = "SLIPSTREAM_SYNC_KEY_POLICY", default_value = "Escape", value_parser = parse_key_policy)]
    pub key_policy: KeyPolicy,
    /// Burst coalescing window: updates within it become one write.
    #[arg(long, env = "SLIPSTREAM_COALESCE", default_value = "50ms", value_parser = parse_duration)]
    pub coalesce: Duration,
    /// Write the current state once, print a summary and exit.
    #[arg(long, env = "SLIPSTREAM_SYNC_ONCE")]
    pub once: bool,
    /// fsync every version before switching to it (survives power loss;
    /// costs a few ms per file). Without it, a version torn by a power loss
    /// is detected by checksum on restart and resynced.
    #[arg(long, env = "SLIPSTREAM_SYNC_FSYNC")]
    pub fsync: bool,
    /// Serve /metrics, /healthz and /readyz here (e.g. 0.0.0.0:8081);
    /// /readyz answers 200 once the directory holds a complete state.
    /// Default: no listener.
    #[arg(long, env = "SLIPSTREAM_SYNC_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub log: LogArgs,
}

fn parse_key_policy(s: &str) -> Result<KeyPolicy, String> {
    match s.to_ascii_lowercase().as_str() {
        "escape" => Ok(KeyPolicy::Escape),
        "skip" => Ok(KeyPolicy::Skip),
        "fail" => Ok(KeyPolicy::Fail),
        _ => Err(format!(
            "unknown key policy {s:?}: use Escape, Skip or Fail"
        )),
    }
}

/// What to sync where.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub bucket: String,
    pub prefixes: Vec<String>,
    pub strip_prefix: bool,
    pub key_policy: KeyPolicy,
    pub dir: PathBuf,
    pub coalesce: Duration,
    /// Make every version durable before switching to it.
    pub fsync: bool,
}

impl SyncConfig {
    fn rules(&self) -> anyhow::Result<ProjectionRules> {
        ProjectionRules::new(self.prefixes.clone(), self.strip_prefix, self.key_policy)
            .with_context(|| format!("invalid prefixes {:?}", self.prefixes))
    }
}

/// What a run did; `updates` counts the KV updates the watch delivered and
/// this run applied (the resume proof: after a restart it is the delta).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub resumed_from: WatchCursor,
    pub updates: u64,
    /// Versions swapped into the directory.
    pub swaps: u64,
    /// Projections refused (too large, collision, invalid key under Fail).
    pub refused: u64,
    pub cursor: WatchCursor,
    pub files: usize,
}

impl std::fmt::Display for SyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "resumed_from={} updates={} swaps={} refused={} files={} cursor={}",
            display_cursor(&self.resumed_from),
            self.updates,
            self.swaps,
            self.refused,
            self.files,
            display_cursor(&self.cursor)
        )
    }
}

fn display_cursor(c: &WatchCursor) -> String {
    if c.is_none() {
        "none".to_owned()
    } else {
        c.to_string()
    }
}

/// The blob stored next to the files: enough to resume with a delta watch.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct SyncState {
    format: u32,
    bucket: String,
    prefixes: Vec<String>,
    strip_prefix: bool,
    key_policy: KeyPolicy,
    /// Every update with a revision <= cursor is in the files.
    cursor: String,
    /// KV key -> the file written for it, for every written file.
    keys: BTreeMap<String, FileRef>,
}

/// A written file and what it must hold, so a restart can tell a complete
/// version from one torn by a crash (or edited by hand).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FileRef {
    file: String,
    len: usize,
    fnv1a: String,
}

impl FileRef {
    fn new(file: String, bytes: &[u8]) -> Self {
        Self {
            file,
            len: bytes.len(),
            fnv1a: format!("{:016x}", Fnv1a::of(bytes)),
        }
    }

    fn matches(&self, bytes: &[u8]) -> bool {
        *self == Self::new(self.file.clone(), bytes)
    }
}

const STATE_FORMAT: u32 = 1;

/// The sync loop's state: the KV entries of the prefixes, what has been
/// received, and what has been written.
struct Syncer {
    config: SyncConfig,
    rules: ProjectionRules,
    sink: DirSink,
    /// Everything received so far, and its cursor ("seen").
    mirror: Mirror,
    /// Everything in the directory.
    written: WatchCursor,
    /// A flush happened in this run (until then, write even when the
    /// cursor did not move, so a restored directory is re-checked).
    flushed: bool,
    report: SyncReport,
    metrics: SyncMetrics,
}

impl Syncer {
    fn open(config: SyncConfig, metrics: SyncMetrics) -> anyhow::Result<Self> {
        let rules = config.rules()?;
        let sink = DirSink::open(&config.dir)?.durable(config.fsync);
        let mut syncer = Self {
            config,
            rules,
            sink,
            mirror: Mirror::default(),
            written: WatchCursor::none(),
            flushed: false,
            report: SyncReport::default(),
            metrics,
        };
        syncer.restore()?;
        Ok(syncer)
    }

    /// Rebuilds the entries and cursor from the directory, when it was
    /// written by a sync of the same bucket, prefixes and rules.
    fn restore(&mut self) -> anyhow::Result<()> {
        let Some(content) = self.sink.read()? else {
            info!(dir = %self.config.dir.display(), "nothing synced here yet: full state-sync");
            return Ok(());
        };
        let state = content
            .state
            .as_deref()
            .and_then(|s| serde_json::from_slice::<SyncState>(s).ok());
        let Some(state) = state else {
            warn!(dir = %self.config.dir.display(), "no readable sync state in the directory: full resync");
            return Ok(());
        };
        let same_rules = state.format == STATE_FORMAT
            && state.bucket == self.config.bucket
            && state.prefixes == self.config.prefixes
            && state.strip_prefix == self.config.strip_prefix
            && state.key_policy == self.config.key_policy;
        if !same_rules {
            info!("directory was synced with other settings: full resync");
            return Ok(());
        }
        let Ok(cursor) = state.cursor.parse::<WatchCursor>() else {
            warn!(cursor = %state.cursor, "unreadable cursor in the directory: full resync");
            return Ok(());
        };
        let mut entries = BTreeMap::new();
        for (kv_key, file) in &state.keys {
            match content.files.get(&file.file) {
                Some(bytes) if file.matches(bytes) => {
                    entries.insert(kv_key.clone(), Bytes::from(bytes.clone()));
                }
                _ => {
                    warn!(file = %file.file, "a file is missing or not as written (crash or edit): full resync");
                    return Ok(());
                }
            }
        }
        info!(
            %cursor,
            files = content.files.len(),
            "resuming from the cursor stored in the directory"
        );
        self.mirror = Mirror::restored(entries, cursor);
        self.written = cursor;
        self.report.resumed_from = cursor;
        self.record_written();
        Ok(())
    }

    fn forget(&mut self) {
        self.mirror.clear();
        self.written = WatchCursor::none();
    }

    /// Applies one update; false when the cursor already covers it
    /// (re-delivered history must not move content backward).
    fn apply(&mut self, update: KvUpdate) -> bool {
        if self.mirror.apply(update) == Merge::Old {
            return false;
        }
        self.report.updates += 1;
        self.metrics.updates.inc();
        true
    }

    /// Writes the projection of everything seen, with its cursor. A
    /// projection that must not be written keeps the last good content and
    /// cursor (a restart replays from there).
    fn flush(&mut self) -> anyhow::Result<()> {
        if self.written == self.mirror.cursor() && self.flushed {
            return Ok(());
        }
        self.flushed = true;
        let projected = match self.rules.project(
            self.mirror
                .entries()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_ref())),
        ) {
            Ok(p) => p,
            Err(e) => {
                self.report.refused += 1;
                self.metrics.refused.inc();
                warn!(reason = e.reason().as_str(), error = %e, "not writing: the last good content stays");
                return Ok(());
            }
        };
        let files = files_of(&projected);
        let state = SyncState {
            format: STATE_FORMAT,
            bucket: self.config.bucket.clone(),
            prefixes: self.config.prefixes.clone(),
            strip_prefix: self.config.strip_prefix,
            key_policy: self.config.key_policy,
            cursor: self.mirror.cursor().to_string(),
            keys: self
                .mirror
                .entries()
                .keys()
                .filter_map(|k| match self.rules.map_key(k) {
                    KeyDecision::Mapped(file) => {
                        let bytes = files.get(file.as_ref())?;
                        Some((k.clone(), FileRef::new(file.into_owned(), bytes)))
                    }
                    _ => None,
                })
                .collect(),
        };
        let blob = serde_json::to_vec(&state)?;
        let started = Instant::now();
        let written = self.sink.write(&files, &blob)?;
        if let Written::Swapped(version) = &written {
            self.report.swaps += 1;
            self.metrics.swaps.inc();
            info!(
                %version,
                files = files.len(),
                cursor = %self.mirror.cursor(),
                skipped = projected.skipped.len(),
                micros = started.elapsed().as_micros() as u64,
                "wrote a new version"
            );
        }
        self.written = self.mirror.cursor();
        self.report.files = files.len();
        self.record_written();
        Ok(())
    }

    /// The directory holds a complete state at `written`.
    fn record_written(&self) {
        let revision = self.written.version().and_then(|v| v.as_u64()).unwrap_or(0);
        self.metrics
            .cursor
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
        self.metrics.ready.set(1);
    }
}

fn files_of(p: &Projected<'_>) -> BTreeMap<String, Vec<u8>> {
    p.data
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .chain(
            p.binary_data
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec())),
        )
        .collect()
}

/// Runs the sync against `store` until `shutdown` resolves (then writes what
/// is pending), or, with `once`, until the current state is written.
/// Watch failures are retried from what was received, with backoff; a
/// cursor the bucket no longer covers falls back to a full state-sync.
pub async fn run<F>(
    store: &dyn KvWatcher,
    config: SyncConfig,
    once: bool,
    shutdown: F,
) -> anyhow::Result<SyncReport>
where
    F: Future<Output = ()>,
{
    run_with_metrics(store, config, once, SyncMetrics::default(), shutdown).await
}

/// [`run`], counting into `metrics`.
pub async fn run_with_metrics<F>(
    store: &dyn KvWatcher,
    config: SyncConfig,
    once: bool,
    metrics: SyncMetrics,
    shutdown: F,
) -> anyhow::Result<SyncReport>
where
    F: Future<Output = ()>,
{
    let mut syncer = Syncer::open(config, metrics)?;
    let coalesce = syncer.config.coalesce;
    let prefixes = syncer.config.prefixes.clone();
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut synced = false;
    // When the first unwritten update arrived after the initial sync.
    let mut pending_since: Option<tokio::time::Instant> = None;

    'watch: loop {
        let mut stream = match store
            .watch_prefixes_from(&prefixes, syncer.mirror.cursor())
            .await
        {
            Ok(s) => s,
            Err(KvError::CursorExpired {
                cursor,
                first_retained,
            }) => {
                warn!(%cursor, %first_retained, "cursor expired: full resync");
                syncer.forget();
                synced = false;
                continue 'watch;
            }
            Err(e) if once => return Err(e).context("watch failed"),
            Err(e) => {
                let delay = backoff.next_delay();
                syncer.metrics.watch_restarts.inc();
                warn!(reason = e.reason(), error = %e, retry_in = ?delay, "watch failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => break 'watch,
                }
                continue 'watch;
            }
        };
        loop {
            let deadline = pending_since.map(|t| t + coalesce);
            let event = tokio::select! {
                ev = stream.next() => ev,
                () = sleep_until(deadline) => {
                    syncer.flush()?;
                    pending_since = None;
                    continue;
                }
                () = &mut shutdown => break 'watch,
            };
            match event {
                Some(Ok(WatchEvent::Update(update))) => {
                    if syncer.apply(update) && synced && pending_since.is_none() {
                        pending_since = Some(tokio::time::Instant::now());
                    }
                }
                Some(Ok(WatchEvent::Synced { .. })) => {
                    backoff.reset();
                    synced = true;
                    syncer.flush()?;
                    info!(
                        updates = syncer.report.updates,
                        cursor = %syncer.written,
                        "caught up"
                    );
                    pending_since = None;
                    if once {
                        break 'watch;
                    }
                }
                Some(Err(KvError::CursorExpired {
                    cursor,
                    first_retained,
                })) => {
                    warn!(%cursor, %first_retained, "cursor expired: full resync");
                    syncer.forget();
                    synced = false;
                    pending_since = None;
                    continue 'watch;
                }
                Some(Err(e)) if once => return Err(e).context("watch failed"),
                Some(Err(e)) => {
                    syncer.metrics.watch_restarts.inc();
                    warn!(reason = e.reason(), error = %e, "watch interrupted: resuming");
                    continue 'watch;
                }
                None if once => anyhow::bail!("watch ended before the initial state was delivered"),
                None => {
                    syncer.metrics.watch_restarts.inc();
                    warn!("watch ended: resuming");
                    continue 'watch;
                }
            }
        }
    }
    if synced {
        syncer.flush()?;
    }
    syncer.report.cursor = syncer.written;
    Ok(syncer.report)
}

pub async fn main(args: SyncArgs) -> anyhow::Result<()> {
    // stderr: stdout carries the `--once` summary
    args.log.init(Output::Stderr)?;
    let config = SyncConfig {
        bucket: args.bucket,
        prefixes: args.prefixes,
        strip_prefix: args.strip_prefix,
        key_policy: args.key_policy,
        dir: args.dir,
        coalesce: args.coalesce,
        fsync: args.fsync,
    };
    // Fail on bad rules, a malformed URL and a listener that cannot bind
    // before connecting.
    config.rules()?;
    args.nats.check_url()?;
    let metrics = SyncMetrics::default();
    if let Some(addr) = args.metrics_addr {
        let listener = http::bind(addr, "--metrics-addr").await?;
        let ready = metrics.clone();
        let readiness: http::Readiness = Arc::new(move || {
            if ready.is_ready() {
                Ok(())
            } else {
                Err("the directory does not hold a complete state yet".to_owned())
            }
        });
        let router = http::router(metrics.exposition(), readiness);
        tokio::spawn(async move {
            if let Err(e) = http::serve(listener, router).await {
                error!(error = format!("{e:#}"), "the /metrics listener stopped");
            }
        });
    }
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let nats = NatsConnector::new(args.nats.connect_options("slipstream-sync"));
    // `--once` fails at once; a long-running sync waits for NATS and the
    // bucket to appear (a sidecar may start before either).
    let bucket = loop {
        let opened = async {
            let kv = nats
                .connection()
                .await
                .with_context(|| format!("connecting to NATS at {}", args.nats.url))?;
            kv.open(&config.bucket)
                .await
                .with_context(|| format!("opening bucket {:?}", config.bucket))
        };
        match opened.await {
            Ok(bucket) => break bucket,
            Err(e) if args.once => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = format!("{e:#}"), retry_in = ?delay, "not syncing yet");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => return Ok(()),
                }
            }
        }
    };
    info!(bucket = %config.bucket, prefixes = ?config.prefixes, dir = %config.dir.display(), "syncing");
    let report = run_with_metrics(&bucket, config, args.once, metrics, shutdown).await?;
    info!(%report, "stopped");
    if args.once {
        println!("{report}");
        if report.swaps == 0 && report.refused > 0 {
            anyhow::bail!(
                "the projection was refused (see the warning above); nothing was written"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_policies_parse_case_insensitively_and_reject_others() {
        assert_eq!(parse_key_policy("Escape"), Ok(KeyPolicy::Escape));
        assert_eq!(parse_key_policy("skip"), Ok(KeyPolicy::Skip));
        assert_eq!(parse_key_policy("FAIL"), Ok(KeyPolicy::Fail));
        assert!(parse_key_policy("ignore").is_err());
    }

    #[test]
    fn file_checksums_are_stable_and_catch_changes() {
        let r = FileRef::new("f".into(), b"hello");
        assert!(r.matches(b"hello"));
        assert!(!r.matches(b"hellO"));
        assert!(!r.matches(b""));
    }

    #[test]
    fn report_prints_as_key_value_pairs() {
        let r = SyncReport {
            updates: 3,
            swaps: 1,
            files: 2,
            cursor: "7".parse().unwrap(),
            ..SyncReport::default()
        };
        assert_eq!(
            r.to_string(),
            "resumed_from=none updates=3 swaps=1 refused=0 files=2 cursor=7"
        );
    }
}
