//! Connecting to NATS ([`NatsKv`]) and opening, creating and deleting
//! buckets.

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::jetstream::{
    self, ErrorCode, context::GetStreamErrorKind, kv as nats_kv, stream::StorageType,
};
use tokio::sync::watch;

use super::{
    bucket::NatsBucket,
    codec::incarnation_of,
    handle::{BucketInner, ConnectionState, ConnectionStatus, WatchCounters, timed},
};
use crate::kv::{KvError, Result};

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

/// How often the client pings the server. The client gives a connection up
/// after two unanswered pings, so a frozen (SIGSTOPped) server is left for
/// another cluster node within about three intervals instead of the default
/// 60 s interval's three minutes.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);

/// The schemes a NATS server URL may name.
const URL_SCHEMES: [&str; 4] = ["nats", "tls", "ws", "wss"];

/// Parses a comma-separated list of NATS server URLs. Each is
/// `scheme://host[:port]` with a NATS scheme, or `host:port`; anything else
/// (a bare word, `http://`, a port past 65535) is refused here, before any
/// connection attempt, so a typo fails at start instead of retrying forever.
pub fn parse_server_urls(urls: &str) -> Result<Vec<async_nats::ServerAddr>> {
    let bad = |url: &str, why: &str| {
        KvError::ConnectionFailed(format!(
            "NATS URL {url:?}: {why} (expected nats://host:port, tls://, ws://, wss:// or host:port)"
        ))
    };
    let mut addrs = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let full = match url.split_once("://") {
            Some((scheme, _)) if URL_SCHEMES.contains(&scheme) => url.to_owned(),
            Some((scheme, _)) => return Err(bad(url, &format!("scheme {scheme:?} is not NATS"))),
            None if url
                .rsplit_once(':')
                .is_some_and(|(_, port)| !port.is_empty()) =>
            {
                format!("nats://{url}")
            }
            None => return Err(bad(url, "no scheme and no port")),
        };
        let addr = full
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| bad(url, &e.to_string()))?;
        if addr.host().is_empty() {
            return Err(bad(url, "no host"));
        }
        addrs.push(addr);
    }
    if addrs.is_empty() {
        return Err(KvError::ConnectionFailed("no NATS URL given".to_owned()));
    }
    Ok(addrs)
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
        let addrs = parse_server_urls(&opts.url)?;

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
            .ping_interval(PING_INTERVAL)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_are_checked_before_any_call() {
        assert!(is_valid_bucket_name("app-config_1"));
        assert!(!is_valid_bucket_name(""));
        assert!(!is_valid_bucket_name("a.b"));
        assert!(!is_valid_bucket_name("a b"));
    }

    #[test]
    fn malformed_nats_urls_are_refused_before_connecting() {
        for good in [
            "nats://127.0.0.1:4222",
            "127.0.0.1:4222",
            "nats://a:1, tls://b:2",
            "nats://nats.nats.svc",
        ] {
            assert!(parse_server_urls(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("not-a-url", "no scheme and no port"),
            ("http://127.0.0.1:4222", "not NATS"),
            ("nats://127.0.0.1:99999", "port"),
            ("nats://:4222", "host"),
            ("", "no NATS URL"),
        ] {
            let err = parse_server_urls(bad).unwrap_err();
            assert_eq!(err.reason(), "ConnectionFailed");
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
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
