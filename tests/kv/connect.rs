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

#[tokio::test]
async fn bad_options_and_unreachable_servers_fail_with_connection_failed() {
    let server = NatsServer::start();
    let port = server.port();
    drop(server);
    refused(&ConnectOptions {
        request_timeout: Duration::from_secs(1),
        ..ConnectOptions::new(format!("nats://127.0.0.1:{port}"))
    })
    .await;
    refused(&ConnectOptions::new("not a url ::")).await;
    refused(&ConnectOptions {
        tls_ca: Some("/nonexistent/ca.pem".into()),
        ..ConnectOptions::default()
    })
    .await;
    refused(&ConnectOptions {
        tls_cert: Some("/nonexistent/cert.pem".into()),
        ..ConnectOptions::default()
    })
    .await;
    refused(&ConnectOptions {
        creds_file: Some("/nonexistent/user.creds".into()),
        ..ConnectOptions::default()
    })
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
