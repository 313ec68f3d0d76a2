//! Connecting: credentials, bad options, connection state.

use std::time::Duration;

use slipstream::kv::{
    KvReader, KvWriter,
    nats::{BucketConfig, ConnectOptions, ConnectionState, NatsKv},
};

use crate::{b, common::NatsServer, connect, eventually, options};

async fn works(opts: &ConnectOptions) {
    let kv = NatsKv::connect(opts)
        .await
        .unwrap()
        .create_or_open(&BucketConfig::new("auth"))
        .await
        .unwrap();
    kv.put("k", b("v")).await.unwrap();
    assert!(kv.get("k").await.unwrap().is_some());
}

async fn refused(opts: &ConnectOptions) {
    let err = NatsKv::connect(opts).await.unwrap_err();
    assert_eq!(err.reason(), "ConnectionFailed", "{err}");
}

#[tokio::test]
async fn token_authentication_is_used_and_a_wrong_token_refused() {
    let server = NatsServer::start_with_config("authorization { token: \"s3cret\" }");
    let mut opts = options(&server);
    opts.token = Some("s3cret".into());
    works(&opts).await;
    opts.token = Some("wrong".into());
    refused(&opts).await;
}

#[tokio::test]
async fn user_and_password_authentication_is_used() {
    let server = NatsServer::start_with_config(
        "authorization { users: [ { user: \"op\", password: \"pw\" } ] }",
    );
    let mut opts = options(&server);
    opts.user = Some("op".into());
    opts.password = Some("pw".into());
    works(&opts).await;
    opts.password = Some("bad".into());
    refused(&opts).await;
    opts.password = None;
    refused(&opts).await;
}

#[tokio::test]
async fn nkey_seed_file_authentication_is_used() {
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}",
        user.public_key()
    ));
    let seed_file = server.scratch_dir().join("user.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed().unwrap())).unwrap();
    let mut opts = options(&server);
    opts.nkey_seed_file = Some(seed_file);
    works(&opts).await;
    let other = server.scratch_dir().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    opts.nkey_seed_file = Some(other);
    refused(&opts).await;
    opts.nkey_seed_file = Some(server.scratch_dir().join("missing.nk"));
    refused(&opts).await;
}

/// Refused with `ConnectionFailed`, and the message names `what`.
async fn refused_naming(opts: &ConnectOptions, what: &str) {
    let err = NatsKv::connect(opts).await.unwrap_err();
    assert_eq!(err.reason(), "ConnectionFailed", "{err}");
    assert!(
        err.to_string().contains(what),
        "{err:?} does not name {what:?}"
    );
}

#[tokio::test]
async fn an_unreachable_server_fails_with_connection_failed() {
    let server = NatsServer::start();
    let port = server.port();
    drop(server);
    refused(&ConnectOptions {
        request_timeout: Duration::from_secs(1),
        ..ConnectOptions::new(format!("nats://127.0.0.1:{port}"))
    })
    .await;
}

/// Each bad option is refused against a live server that accepts the same
/// options without it, so a refused socket cannot pass for the check.
#[tokio::test]
async fn bad_options_are_refused_naming_the_file_or_the_rule_while_the_server_is_up() {
    let server = NatsServer::start();
    works(&options(&server)).await;
    let missing = server.scratch_dir().join("missing");
    refused_naming(&ConnectOptions::new("not a url ::"), "not a url ::").await;
    let ca = missing.join("ca.pem");
    refused_naming(
        &ConnectOptions {
            tls_ca: Some(ca.clone()),
            ..options(&server)
        },
        &ca.display().to_string(),
    )
    .await;
    let (cert, key) = (missing.join("cert.pem"), missing.join("key.pem"));
    refused_naming(
        &ConnectOptions {
            tls_cert: Some(cert.clone()),
            ..options(&server)
        },
        "TLS client certificate and key must be given together",
    )
    .await;
    refused_naming(
        &ConnectOptions {
            tls_cert: Some(cert.clone()),
            tls_key: Some(key),
            ..options(&server)
        },
        &cert.display().to_string(),
    )
    .await;
    let creds = missing.join("user.creds");
    refused_naming(
        &ConnectOptions {
            creds_file: Some(creds.clone()),
            ..options(&server)
        },
        &creds.display().to_string(),
    )
    .await;
    refused_naming(
        &ConnectOptions {
            token: Some("t".into()),
            user: Some("u".into()),
            password: Some("p".into()),
            ..options(&server)
        },
        "use at most one of",
    )
    .await;
}

#[tokio::test]
async fn connection_state_follows_the_server_going_away_and_coming_back() {
    let mut server = NatsServer::start();
    let nats = connect(&server).await;
    assert!(nats.is_connected());
    let status = nats.connection_status();
    server.kill();
    assert!(
        eventually(Duration::from_secs(10), || async { !nats.is_connected() }).await,
        "disconnect noticed"
    );
    server.restart();
    assert!(
        eventually(Duration::from_secs(15), || async { nats.is_connected() }).await,
        "reconnect noticed"
    );
    assert_eq!(status.borrow().state, ConnectionState::Connected);
    assert!(status.borrow().reconnects >= 1);
    nats.close().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            nats.connection_status().borrow().state == ConnectionState::Closed
        })
        .await
    );
}

/// A frozen server (SIGSTOP: the socket stays open, nothing answers) is only
/// noticed by unanswered pings. With the client's default 60 s ping interval
/// that took two to three minutes, during which a NATS cluster client kept
/// waiting on the frozen node instead of moving to a live one.
#[tokio::test]
async fn a_frozen_server_is_noticed_by_pings_well_before_two_minutes() {
    let mut server = NatsServer::start();
    let nats = connect(&server).await;
    assert!(nats.is_connected());
    server.pause();
    let noticed = eventually(Duration::from_secs(40), || async { !nats.is_connected() }).await;
    server.resume();
    assert!(
        noticed,
        "a frozen server still counts as connected after 40 s"
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
fn write_pki(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, san, usage) in [
        ("server", "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", "client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_owned()]).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test]
async fn mutual_tls_uses_the_ca_and_the_client_certificate() {
    let pki = tempfile::tempdir().unwrap();
    write_pki(pki.path());
    let p = |f: &str| pki.path().join(f);
    let server = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true, timeout: 2 }}",
        p("server.pem").display(),
        p("server-key.pem").display(),
        p("ca.pem").display()
    ));
    let mut opts = options(&server);
    opts.tls_ca = Some(p("ca.pem"));
    opts.tls_cert = Some(p("client.pem"));
    opts.tls_key = Some(p("client-key.pem"));
    works(&opts).await;
    // The server requires a client certificate.
    opts.tls_cert = None;
    opts.tls_key = None;
    refused(&opts).await;
    // Without the CA the server's certificate is not trusted.
    let untrusted = ConnectOptions {
        tls_ca: None,
        tls_cert: Some(p("client.pem")),
        tls_key: Some(p("client-key.pem")),
        ..options(&server)
    };
    refused(&untrusted).await;
}

#[tokio::test]
async fn closing_the_client_ends_watches_with_a_final_not_connected() {
    use futures::StreamExt;
    use slipstream::kv::KvWatcher;

    let server = NatsServer::start();
    let nats = connect(&server).await;
    let kv = nats
        .create_or_open(&BucketConfig::new("app"))
        .await
        .unwrap();
    let mut w = kv.watch_all().await.unwrap();
    crate::until_synced(&mut w).await;
    nats.close().await.unwrap();
    let end = tokio::time::timeout(crate::EVENT_WAIT, w.next())
        .await
        .unwrap();
    match end {
        Some(Err(e)) => assert_eq!(e.reason(), "NotConnected", "{e}"),
        other => panic!("expected a final NotConnected, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(crate::EVENT_WAIT, w.next())
            .await
            .unwrap()
            .is_none()
    );
    assert!(kv.get("k").await.is_err());
}
