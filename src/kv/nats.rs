//! NATS JetStream implementation of the KV traits.
//!
//! A bucket is the JetStream stream `KV_<bucket>` with subjects
//! `$KV.<bucket>.<key>`; a version is the stream sequence of the write.
//! Every call to the server runs under [`ConnectOptions::request_timeout`]
//! and fails with [`KvError::Timeout`] instead of hanging, also when the
//! server is alive on TCP but does not answer.

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::{
    HeaderMap, HeaderName, HeaderValue,
    header::{
        NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MARKER_REASON, NATS_MESSAGE_TTL, NATS_ROLLUP,
    },
    jetstream::{
        self, ErrorCode,
        context::{GetStreamErrorKind, PublishError, PublishErrorKind},
        kv as nats_kv,
        message::StreamMessage,
        stream::{
            DirectGetError, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind, StorageType,
        },
    },
};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use super::{
    BucketInfo, KvEntry, KvError, KvPurge, KvReader, KvTtl, KvUpdate, KvWatcher, KvWriter, Result,
    VersionToken, WatchCursor, WatchStream,
    filter::{self, validate_key, validate_prefix},
    nats_watch,
};

/// How to reach NATS: a URL plus at most one way to authenticate, and TLS.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub url: String,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// CA bundle that signs the server's certificate.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Deadline for every single NATS call.
    pub request_timeout: Duration,
    /// Connection name shown by the server.
    pub name: Option<String>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            creds_file: None,
            token: None,
            user: None,
            password: None,
            nkey_seed_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            request_timeout: Duration::from_secs(5),
            name: None,
        }
    }
}

impl ConnectOptions {
    /// Options for `url` with everything else at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }
}

/// Whether the client currently has a server connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    Connected,
    /// Lost; the client reconnects by itself.
    Disconnected,
    /// Closed for good (drained or dropped); nothing will work again.
    Closed,
}

/// The connection state plus how many times it was re-established, so a
/// watcher can tell that its server-side consumer may be gone even when it
/// missed the `Disconnected` in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionStatus {
    pub state: ConnectionState,
    pub reconnects: u64,
}

/// A connected NATS client, the factory of [`NatsBucket`]s.
#[derive(Clone)]
pub struct NatsKv {
    client: async_nats::Client,
    js: jetstream::Context,
    timeout: Duration,
    status: watch::Receiver<ConnectionStatus>,
}

impl std::fmt::Debug for NatsKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsKv")
            .field("status", &*self.status.borrow())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Where a bucket keeps its data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Storage {
    #[default]
    File,
    Memory,
}

/// What [`NatsKv::create_or_open`] creates when the bucket is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketConfig {
    pub name: String,
    /// Revisions kept per key (1..=64).
    pub history: u8,
    /// Age after which any entry is removed; `None` keeps entries forever.
    pub max_age: Option<Duration>,
    /// Size limit of the bucket; writes beyond it are refused (never evicts).
    pub max_bytes: Option<u64>,
    pub storage: Storage,
    pub replicas: usize,
    /// Enables per-key TTL ([`KvTtl`]) and expiry markers; the value is how
    /// long a removal marker is kept. Needs nats-server 2.11+.
    pub limit_markers: Option<Duration>,
}

impl BucketConfig {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            history: 1,
            max_age: None,
            max_bytes: None,
            storage: Storage::File,
            replicas: 1,
            limit_markers: None,
        }
    }
}

/// Runs `fut` under `limit`; the outer error is the timeout.
pub(crate) async fn timed<T>(limit: Duration, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| KvError::Timeout(limit))
}

fn is_valid_bucket_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn validate_bucket_name(name: &str) -> Result<()> {
    if is_valid_bucket_name(name) {
        Ok(())
    } else {
        Err(KvError::OperationFailed(format!(
            "invalid bucket name {name:?}: use 1+ of [a-zA-Z0-9_-]"
        )))
    }
}

/// Reads the seed out of an nkey seed file (the first line starting with `S`).
fn read_nkey_seed(path: &PathBuf) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        KvError::ConnectionFailed(format!("nkey seed file {}: {e}", path.display()))
    })?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with('S'))
        .map(str::to_owned)
        .ok_or_else(|| {
            KvError::ConnectionFailed(format!(
                "nkey seed file {} holds no seed (a line starting with 'S')",
                path.display()
            ))
        })
}

fn require_readable(what: &str, path: &PathBuf) -> Result<()> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| KvError::ConnectionFailed(format!("{what} {}: {e}", path.display())))
}

impl NatsKv {
    /// Connects to NATS. Fails with `ConnectionFailed` on bad options or an
    /// unreachable server, `Timeout` when the server does not answer in time.
    /// After the first connection the client reconnects by itself.
    pub async fn connect(opts: &ConnectOptions) -> Result<NatsKv> {
        let auth_methods = [
            opts.creds_file.is_some(),
            opts.token.is_some(),
            opts.user.is_some() || opts.password.is_some(),
            opts.nkey_seed_file.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if auth_methods > 1 {
            return Err(KvError::ConnectionFailed(
                "use at most one of: creds file, token, user/password, nkey seed".to_owned(),
            ));
        }
        let mut o = async_nats::ConnectOptions::new();
        if let Some(path) = &opts.creds_file {
            o = o.credentials_file(path).await.map_err(|e| {
                KvError::ConnectionFailed(format!("creds file {}: {e}", path.display()))
            })?;
        }
        if let Some(token) = &opts.token {
            o = o.token(token.clone());
        }
        match (&opts.user, &opts.password) {
            (Some(u), Some(p)) => o = o.user_and_password(u.clone(), p.clone()),
            (None, None) => {}
            _ => {
                return Err(KvError::ConnectionFailed(
                    "user and password must be given together".to_owned(),
                ));
            }
        }
        if let Some(path) = &opts.nkey_seed_file {
            o = o.nkey(read_nkey_seed(path)?);
        }
        if let Some(ca) = &opts.tls_ca {
            require_readable("TLS CA file", ca)?;
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&opts.tls_cert, &opts.tls_key) {
            (Some(cert), Some(key)) => {
                require_readable("TLS client certificate", cert)?;
                require_readable("TLS client key", key)?;
                o = o
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true);
            }
            (None, None) => {}
            _ => {
                return Err(KvError::ConnectionFailed(
                    "TLS client certificate and key must be given together".to_owned(),
                ));
            }
        }
        if let Some(name) = &opts.name {
            o = o.name(name);
        }
        let addrs = opts
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<async_nats::ServerAddr>()
                    .map_err(|e| KvError::ConnectionFailed(format!("NATS URL {s:?}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        if addrs.is_empty() {
            return Err(KvError::ConnectionFailed("no NATS URL given".to_owned()));
        }

        let (tx, status) = watch::channel(ConnectionStatus {
            state: ConnectionState::Connected,
            reconnects: 0,
        });
        let tx = Arc::new(tx);
        let events = tx.clone();
        // The client's own deadlines are longer than ours, so every call
        // ends with our `Timeout`, whatever layer was waiting.
        let inner_timeout = opts.request_timeout * 2;
        o = o
            .connection_timeout(opts.request_timeout)
            .request_timeout(Some(inner_timeout))
            .event_callback(move |event| {
                let tx = events.clone();
                async move { on_event(&tx, &event) }
            });
        let client = timed(opts.request_timeout * 2, o.connect(addrs))
            .await?
            .map_err(|e| KvError::ConnectionFailed(e.to_string()))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(inner_timeout)
            .build(client.clone());
        Ok(NatsKv {
            client,
            js,
            timeout: opts.request_timeout,
            status,
        })
    }

    /// The underlying client (for callers that need raw NATS, e.g. benchmarks).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// True while the client has a live server connection.
    pub fn is_connected(&self) -> bool {
        self.status.borrow().state == ConnectionState::Connected
    }

    /// Connection state changes, e.g. for a readiness probe.
    pub fn connection_status(&self) -> watch::Receiver<ConnectionStatus> {
        self.status.clone()
    }

    /// Flushes and closes the connection; every bucket of this client stops working.
    pub async fn close(&self) -> Result<()> {
        timed(self.timeout, self.client.drain())
            .await?
            .map_err(|e| KvError::OperationFailed(format!("drain: {e}")))
    }

    /// Opens an existing bucket; `BucketNotFound` when there is none.
    pub async fn open(&self, bucket: &str) -> Result<NatsBucket> {
        validate_bucket_name(bucket)?;
        let stream_name = format!("KV_{bucket}");
        let stream = timed(self.timeout, self.js.get_stream(&stream_name))
            .await?
            .map_err(|e| match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    KvError::BucketNotFound(bucket.to_owned())
                }
                _ => KvError::OperationFailed(format!("open bucket {bucket:?}: {e}")),
            })?;
        if stream.cached_info().config.max_messages_per_subject < 1 {
            return Err(KvError::OperationFailed(format!(
                "stream {stream_name} is not a KV bucket (no per-key history limit)"
            )));
        }
        Ok(NatsBucket {
            inner: Arc::new(BucketInner {
                name: bucket.to_owned(),
                subject_prefix: format!("$KV.{bucket}."),
                stream_name,
                allow_direct: stream.cached_info().config.allow_direct,
                incarnation: incarnation_of(stream.cached_info()),
                stream,
                js: self.js.clone(),
                client: self.client.clone(),
                timeout: self.timeout,
                status: self.status.clone(),
                stats: WatchCounters::default(),
            }),
        })
    }

    /// Opens the bucket, creating it from `config` when missing. An existing
    /// bucket is opened as it is (its configuration is not changed).
    pub async fn create_or_open(&self, config: &BucketConfig) -> Result<NatsBucket> {
        match self.open(&config.name).await {
            Err(KvError::BucketNotFound(_)) => {}
            other => return other,
        }
        if !(1..=64).contains(&config.history) {
            return Err(KvError::OperationFailed(format!(
                "bucket {:?}: history must be 1..=64, got {}",
                config.name, config.history
            )));
        }
        let max_bytes = match config.max_bytes {
            None => -1,
            Some(b) => i64::try_from(b).map_err(|_| {
                KvError::OperationFailed(format!("bucket {:?}: max_bytes too large", config.name))
            })?,
        };
        let kv_config = nats_kv::Config {
            bucket: config.name.clone(),
            history: i64::from(config.history),
            max_age: config.max_age.unwrap_or_default(),
            max_bytes,
            storage: match config.storage {
                Storage::File => StorageType::File,
                Storage::Memory => StorageType::Memory,
            },
            num_replicas: config.replicas.max(1),
            limit_markers: config.limit_markers,
            ..Default::default()
        };
        let created = timed(self.timeout, self.js.create_key_value(kv_config)).await?;
        match created {
            Ok(_) => self.open(&config.name).await,
            // Lost a creation race: the bucket now exists.
            Err(e) => match self.open(&config.name).await {
                Ok(bucket) => Ok(bucket),
                Err(_) => Err(KvError::OperationFailed(format!(
                    "create bucket {:?}: {e}",
                    config.name
                ))),
            },
        }
    }

    /// Deletes a bucket and all its data; `BucketNotFound` when there is none.
    pub async fn delete_bucket(&self, name: &str) -> Result<()> {
        validate_bucket_name(name)?;
        let res = timed(self.timeout, self.js.delete_stream(format!("KV_{name}"))).await?;
        match res {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Err(KvError::BucketNotFound(name.to_owned()))
                }
                _ => Err(KvError::OperationFailed(format!(
                    "delete bucket {name:?}: {e}"
                ))),
            },
        }
    }
}

fn on_event(tx: &watch::Sender<ConnectionStatus>, event: &async_nats::Event) {
    match event {
        async_nats::Event::Connected => tx.send_modify(|s| {
            if s.state != ConnectionState::Connected {
                s.state = ConnectionState::Connected;
                s.reconnects += 1;
            }
        }),
        async_nats::Event::Disconnected => tx.send_modify(|s| {
            if s.state == ConnectionState::Connected {
                s.state = ConnectionState::Disconnected;
            }
        }),
        async_nats::Event::Closed => tx.send_modify(|s| s.state = ConnectionState::Closed),
        other => tracing::debug!(event = %other, "nats client event"),
    }
}

/// One KV bucket on a [`NatsKv`] connection. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct NatsBucket {
    pub(crate) inner: Arc<BucketInner>,
}

impl std::fmt::Debug for NatsBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBucket")
            .field("name", &self.inner.name)
            .finish()
    }
}

pub(crate) struct BucketInner {
    pub name: String,
    pub stream_name: String,
    /// `$KV.<bucket>.`
    pub subject_prefix: String,
    pub allow_direct: bool,
    /// The stream's creation time (Unix ns): tells a recreated bucket apart.
    pub incarnation: Option<u64>,
    pub stream: jetstream::stream::Stream,
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub timeout: Duration,
    pub status: watch::Receiver<ConnectionStatus>,
    pub stats: WatchCounters,
}

/// A stream's creation time in Unix nanoseconds, which changes when a
/// bucket is deleted and created again.
pub(crate) fn incarnation_of(info: &jetstream::stream::Info) -> Option<u64> {
    u64::try_from(info.created.unix_timestamp_nanos()).ok()
}

/// Counters of all watches (and scans) opened through one bucket handle.
#[derive(Default)]
pub(crate) struct WatchCounters {
    pub messages: AtomicU64,
    pub redeliveries_skipped: AtomicU64,
    pub consumers_created: AtomicU64,
}

/// What the server delivered to the watches of one bucket handle: proves
/// that a resume reads only the delta, and shows consumer churn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Data messages received from the server (before prefix filtering).
    pub messages: u64,
    /// Messages at or below an already yielded revision, dropped.
    pub redeliveries_skipped: u64,
    /// Server-side consumers created, recreations included.
    pub consumers_created: u64,
}

pub(crate) const KV_OPERATION: HeaderName = HeaderName::from_static("KV-Operation");

/// What a stored record means, from its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    Put,
    Delete,
    Purge,
}

/// Maps the `KV-Operation` header, else the server's `Nats-Marker-Reason`
/// (set on TTL expiry and limit markers), to an operation.
pub(crate) fn operation_of(kv_operation: Option<&str>, marker_reason: Option<&str>) -> Operation {
    match (kv_operation, marker_reason) {
        (Some("DEL"), _) => Operation::Delete,
        (Some("PURGE"), _) => Operation::Purge,
        (Some(_), _) => Operation::Put,
        (None, Some("Remove")) => Operation::Delete,
        // "MaxAge", "Purge" and any future reason: the key is gone.
        (None, Some(_)) => Operation::Purge,
        (None, None) => Operation::Put,
    }
}

pub(crate) fn operation_from_headers(headers: Option<&HeaderMap>) -> Operation {
    match headers {
        None => Operation::Put,
        Some(h) => operation_of(
            h.get(KV_OPERATION).map(HeaderValue::as_str),
            h.get(NATS_MARKER_REASON).map(HeaderValue::as_str),
        ),
    }
}

pub(crate) fn to_update(
    key: String,
    op: Operation,
    value: Bytes,
    revision: u64,
    published: Option<std::time::SystemTime>,
) -> KvUpdate {
    let version = VersionToken::from_u64(revision);
    match op {
        Operation::Put => KvUpdate::Put(KvEntry {
            key,
            // detached from the connection's read buffer: a value kept for
            // long pins its own bytes, not the 64 KiB buffer it arrived in
            value: Bytes::copy_from_slice(&value),
            version,
            published,
        }),
        Operation::Delete => KvUpdate::Delete { key, version },
        Operation::Purge => KvUpdate::Purge { key, version },
    }
}

/// Whole seconds for the `Nats-TTL` header: rounded up, at least one.
pub(crate) fn ttl_seconds(ttl: Duration) -> Result<u64> {
    if ttl.is_zero() {
        return Err(KvError::OperationFailed(
            "ttl must be positive (NATS counts whole seconds)".to_owned(),
        ));
    }
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Ok(secs)
}

fn expected_revision(key: &str, expected: VersionToken) -> Result<u64> {
    expected.as_u64().ok_or_else(|| KvError::RevisionMismatch {
        key: key.to_owned(),
    })
}

impl NatsBucket {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Counters of the watches and scans opened through this handle (and its clones).
    pub fn watch_stats(&self) -> WatchStats {
        let c = &self.inner.stats;
        WatchStats {
            messages: c.messages.load(Ordering::Relaxed),
            redeliveries_skipped: c.redeliveries_skipped.load(Ordering::Relaxed),
            consumers_created: c.consumers_created.load(Ordering::Relaxed),
        }
    }

    /// Number of consumers on the bucket's stream, fresh from the server.
    pub async fn consumer_count(&self) -> Result<usize> {
        Ok(self.stream_info().await?.state.consumer_count)
    }

    pub(crate) async fn stream_info(&self) -> Result<jetstream::stream::Info> {
        self.inner.stream_info().await
    }

    fn subject(&self, key: &str) -> String {
        format!("{}{key}", self.inner.subject_prefix)
    }

    async fn publish(&self, key: &str, headers: Option<HeaderMap>, payload: Bytes) -> Result<u64> {
        validate_key(key)?;
        let subject = self.subject(key);
        let js = &self.inner.js;
        let send = async {
            let ack = match headers {
                Some(h) => js.publish_with_headers(subject, h, payload).await?,
                None => js.publish(subject, payload).await?,
            };
            ack.await
        };
        match timed(self.inner.timeout, send).await? {
            Ok(ack) => Ok(ack.sequence),
            Err(e) => Err(self.publish_error(key, e)),
        }
    }

    fn publish_error(&self, key: &str, e: PublishError) -> KvError {
        match e.kind() {
            PublishErrorKind::WrongLastSequence => KvError::RevisionMismatch {
                key: key.to_owned(),
            },
            PublishErrorKind::TimedOut => KvError::Timeout(self.inner.timeout),
            PublishErrorKind::StreamNotFound => KvError::BucketNotFound(self.inner.name.clone()),
            _ => KvError::OperationFailed(format!("write {key:?}: {e}")),
        }
    }

    fn headers(op: Option<&'static str>, expected: Option<u64>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(op) = op {
            h.insert(KV_OPERATION, op);
        }
        if let Some(rev) = expected {
            h.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, HeaderValue::from(rev));
        }
        h
    }
}

impl BucketInner {
    pub(crate) async fn stream_info(&self) -> Result<jetstream::stream::Info> {
        timed(self.timeout, self.stream.get_info())
            .await?
            .map_err(|e| {
                // The server's error arrives as the request's source (code 10059).
                if e.to_string().contains("stream not found") {
                    KvError::BucketNotFound(self.name.clone())
                } else {
                    KvError::OperationFailed(format!("stream info of {}: {e}", self.stream_name))
                }
            })
    }
}

#[async_trait]
impl KvReader for NatsBucket {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        Ok(match self.entry(key).await? {
            Some(KvUpdate::Put(e)) => Some(e),
            _ => None,
        })
    }

    async fn entry(&self, key: &str) -> Result<Option<KvUpdate>> {
        validate_key(key)?;
        let subject = self.subject(key);
        let stream = &self.inner.stream;
        let t = self.inner.timeout;
        let message = if self.inner.allow_direct {
            let got = timed(t, stream.direct_get_last_for_subject(subject)).await?;
            match direct_answer(got, t, || format!("get {key:?}"))? {
                Some(m) => m,
                None => return Ok(None),
            }
        } else {
            match timed(t, stream.get_last_raw_message_by_subject(&subject)).await? {
                Ok(m) => m,
                Err(e) => {
                    return match e.kind() {
                        LastRawMessageErrorKind::NoMessageFound => Ok(None),
                        _ => Err(KvError::OperationFailed(format!("get {key:?}: {e}"))),
                    };
                }
            }
        };
        Ok(Some(record_update(key.to_owned(), message)))
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        validate_prefix(prefix)?;
        let latest = nats_watch::snapshot(&self.inner, prefix, true).await?;
        Ok(live(latest).map(|e| e.key).collect())
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<KvEntry>> {
        validate_prefix(prefix)?;
        let latest = nats_watch::snapshot(&self.inner, prefix, false).await?;
        Ok(live(latest).collect())
    }

    async fn info(&self) -> Result<BucketInfo> {
        let info = self.stream_info().await?;
        let state = &info.state;
        let config = &info.config;
        let evicts_on_limits = config.discard == DiscardPolicy::Old
            && (config.max_bytes > 0 || config.max_messages > 0);
        Ok(BucketInfo {
            name: self.inner.name.clone(),
            first_revision: (state.messages > 0)
                .then(|| VersionToken::from_u64(state.first_sequence)),
            last_revision: (state.last_sequence > 0)
                .then(|| VersionToken::from_u64(state.last_sequence)),
            keeps_current_values: config.max_age.is_zero() && !evicts_on_limits,
        })
    }

    fn incarnation(&self) -> Option<u64> {
        self.inner.incarnation
    }

    async fn changes_between(
        &self,
        prefixes: &[String],
        after: VersionToken,
        upto: VersionToken,
        max_reads: usize,
    ) -> Result<Option<Vec<KvUpdate>>> {
        let (Some(after), Some(upto)) = (after.as_u64(), upto.as_u64()) else {
            return Ok(None);
        };
        if !self.inner.allow_direct || prefixes.is_empty() {
            return Ok(None);
        }
        let prefixes = filter::checked_prefixes(prefixes)?;
        let subject_prefix = &self.inner.subject_prefix;
        let t = self.inner.timeout;
        let mut out = Vec::new();
        let mut reads = 0usize;
        // the filters do not overlap: each record is read once
        for subject in filter::subject_filters(subject_prefix, &prefixes) {
            let mut next = after.saturating_add(1);
            while next <= upto {
                if reads == max_reads {
                    return Ok(None);
                }
                reads += 1;
                let got = timed(
                    t,
                    self.inner
                        .stream
                        .direct_get_next_for_subject(subject.as_str(), Some(next)),
                )
                .await?;
                let what = || format!("direct get after {next} on {subject}");
                let Some(message) = direct_answer(got, t, what)? else {
                    break;
                };
                if message.sequence > upto {
                    break;
                }
                next = message.sequence + 1;
                self.inner.stats.messages.fetch_add(1, Ordering::Relaxed);
                let Some(key) = message
                    .subject
                    .as_str()
                    .strip_prefix(subject_prefix.as_str())
                else {
                    continue;
                };
                if !filter::matches_any(key, &prefixes) {
                    continue;
                }
                out.push(record_update(key.to_owned(), message));
            }
        }
        out.sort_by_key(KvUpdate::version);
        Ok(Some(out))
    }
}

/// A direct get's record; `None` when no record matches.
fn direct_answer(
    got: std::result::Result<StreamMessage, DirectGetError>,
    timeout: Duration,
    what: impl FnOnce() -> String,
) -> Result<Option<StreamMessage>> {
    match got {
        Ok(m) => Ok(Some(m)),
        Err(e) => match e.kind() {
            DirectGetErrorKind::NotFound => Ok(None),
            DirectGetErrorKind::TimedOut => Err(KvError::Timeout(timeout)),
            _ => Err(KvError::OperationFailed(format!("{}: {e}", what()))),
        },
    }
}

/// The update a stored record of `key` stands for.
fn record_update(key: String, message: StreamMessage) -> KvUpdate {
    let op = operation_from_headers(Some(&message.headers));
    to_update(key, op, message.payload, message.sequence, None)
}

/// Live entries of a snapshot, in key order.
fn live(latest: BTreeMap<String, KvUpdate>) -> impl Iterator<Item = KvEntry> {
    latest.into_values().filter_map(|u| match u {
        KvUpdate::Put(e) => Some(e),
        _ => None,
    })
}

#[async_trait]
impl KvWatcher for NatsBucket {
    async fn watch_prefixes_from(
        &self,
        prefixes: &[String],
        cursor: WatchCursor,
    ) -> Result<WatchStream> {
        nats_watch::watch(self.inner.clone(), prefixes, cursor).await
    }
}

#[async_trait]
impl KvWriter for NatsBucket {
    async fn put(&self, key: &str, value: Bytes) -> Result<VersionToken> {
        self.publish(key, None, value)
            .await
            .map(VersionToken::from_u64)
    }

    async fn delete(&self, key: &str) -> Result<VersionToken> {
        self.publish(key, Some(Self::headers(Some("DEL"), None)), Bytes::new())
            .await
            .map(VersionToken::from_u64)
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<VersionToken> {
        // Expect "no record"; else, if the latest record is a tombstone,
        // replace exactly that tombstone (CAS), so two creators still conflict.
        let mut expected = 0u64;
        for _ in 0..8 {
            let headers = Self::headers(None, Some(expected));
            match self.publish(key, Some(headers), value.clone()).await {
                Ok(rev) => return Ok(VersionToken::from_u64(rev)),
                Err(KvError::RevisionMismatch { .. }) => {}
                Err(e) => return Err(e),
            }
            match self.entry(key).await? {
                Some(KvUpdate::Put(_)) => return Err(KvError::AlreadyExists(key.to_owned())),
                Some(removed) => expected = removed.version().as_u64().unwrap_or(0),
                None => expected = 0,
            }
        }
        Err(KvError::RevisionMismatch {
            key: key.to_owned(),
        })
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: VersionToken,
    ) -> Result<VersionToken> {
        let rev = expected_revision(key, expected)?;
        self.publish(key, Some(Self::headers(None, Some(rev))), value)
            .await
            .map(VersionToken::from_u64)
    }

    async fn delete_with_version(&self, key: &str, expected: VersionToken) -> Result<VersionToken> {
        let rev = expected_revision(key, expected)?;
        self.publish(
            key,
            Some(Self::headers(Some("DEL"), Some(rev))),
            Bytes::new(),
        )
        .await
        .map(VersionToken::from_u64)
    }
}

#[async_trait]
impl KvTtl for NatsBucket {
    async fn put_with_ttl(&self, key: &str, value: Bytes, ttl: Duration) -> Result<VersionToken> {
        let secs = ttl_seconds(ttl)?;
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_TTL, HeaderValue::from(secs));
        self.publish(key, Some(headers), value)
            .await
            .map(VersionToken::from_u64)
            .map_err(|e| match e {
                KvError::OperationFailed(msg) if msg.to_ascii_lowercase().contains("ttl") => {
                    KvError::OperationFailed(format!(
                        "{msg} (per-key TTL needs a bucket created with limit_markers)"
                    ))
                }
                other => other,
            })
    }
}

#[async_trait]
impl KvPurge for NatsBucket {
    async fn purge(&self, key: &str) -> Result<VersionToken> {
        let mut headers = Self::headers(Some("PURGE"), None);
        headers.insert(NATS_ROLLUP, "sub");
        self.publish(key, Some(headers), Bytes::new())
            .await
            .map(VersionToken::from_u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_comes_from_kv_header_then_marker_reason() {
        assert_eq!(operation_of(None, None), Operation::Put);
        assert_eq!(operation_of(Some("PUT"), None), Operation::Put);
        assert_eq!(operation_of(Some("DEL"), None), Operation::Delete);
        assert_eq!(
            operation_of(Some("PURGE"), Some("MaxAge")),
            Operation::Purge
        );
        assert_eq!(operation_of(None, Some("MaxAge")), Operation::Purge);
        assert_eq!(operation_of(None, Some("Purge")), Operation::Purge);
        assert_eq!(operation_of(None, Some("Remove")), Operation::Delete);
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds_and_rejects_zero() {
        assert_eq!(ttl_seconds(Duration::from_secs(2)).unwrap(), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(1500)).unwrap(), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(1)).unwrap(), 1);
        assert!(ttl_seconds(Duration::ZERO).is_err());
    }

    #[test]
    fn bucket_names_are_checked_before_any_call() {
        assert!(is_valid_bucket_name("app-config_1"));
        assert!(!is_valid_bucket_name(""));
        assert!(!is_valid_bucket_name("a.b"));
        assert!(!is_valid_bucket_name("a b"));
    }

    #[test]
    fn reconnects_are_counted_once_per_lost_connection() {
        let (tx, rx) = watch::channel(ConnectionStatus {
            state: ConnectionState::Connected,
            reconnects: 0,
        });
        // The initial connect's event changes nothing.
        on_event(&tx, &async_nats::Event::Connected);
        assert_eq!(rx.borrow().reconnects, 0);
        on_event(&tx, &async_nats::Event::Disconnected);
        assert_eq!(rx.borrow().state, ConnectionState::Disconnected);
        on_event(&tx, &async_nats::Event::Connected);
        on_event(&tx, &async_nats::Event::Connected);
        assert_eq!(
            *rx.borrow(),
            ConnectionStatus {
                state: ConnectionState::Connected,
                reconnects: 1
            }
        );
        on_event(&tx, &async_nats::Event::Closed);
        on_event(&tx, &async_nats::Event::Disconnected);
        assert_eq!(rx.borrow().state, ConnectionState::Closed);
    }

    #[test]
    fn only_one_auth_method_is_accepted() {
        let opts = ConnectOptions {
            token: Some("t".into()),
            user: Some("u".into()),
            password: Some("p".into()),
            ..ConnectOptions::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(NatsKv::connect(&opts)).unwrap_err();
        assert_eq!(err.reason(), "ConnectionFailed");
    }
}
