//! NATS JetStream implementation of the KV traits.

use std::{path::PathBuf, time::Duration};

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
