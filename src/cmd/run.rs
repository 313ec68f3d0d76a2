//! `slipstream run`: the operator. Parse flags, build the context, run.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{Router, http::StatusCode, routing::get};
use clap::{Args, ValueEnum};
use tokio::sync::watch;
use tracing::info;

use super::{NatsArgs, leader::LeaderArgs, parse_duration};
use crate::{
    controller::{self, Config, Context},
    kv::nats::NatsConnector,
    leader::LeaderStatus,
    metrics::Metrics,
    policy::AccessPolicy,
    util::shutdown::shutdown_signal,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Wait this long after the first update of a burst before writing.
    #[arg(long, env = "SLIPSTREAM_COALESCE", default_value = "50ms", value_parser = parse_duration)]
    pub coalesce: Duration,
    /// Least time between two status writes of one binding that only move
    /// its cursor, counts or lastSyncTime (condition changes go out at once;
    /// the last change is always written when the interval ends).
    #[arg(long, env = "SLIPSTREAM_STATUS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub status_interval: Duration,
    /// Most ConfigMap reads and writes (each with its status write) in
    /// flight at once. While writes hold a quarter of them, status
    /// writes that only move the cursor wait (at most six status intervals).
    #[arg(long, env = "SLIPSTREAM_API_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub api_concurrency: u16,
    /// YAML access policy (namespaces -> buckets and prefixes). Default: allow all.
    #[arg(long, env = "SLIPSTREAM_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "SLIPSTREAM_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    #[arg(
        long,
        env = "SLIPSTREAM_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub leader: LeaderArgs,
    /// Watch only this namespace.
    #[arg(long, env = "SLIPSTREAM_NAMESPACE")]
    pub namespace: Option<String>,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Binds the metrics address before anything else starts, so an address in
/// use is an error at start, not a silently missing `/healthz`.
async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot serve /metrics, /healthz, /readyz on --metrics-addr {addr}")
    })
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    leader: watch::Receiver<LeaderStatus>,
) -> anyhow::Result<()> {
    let readyz = move || {
        let ready = leader.borrow().readiness();
        async move {
            match ready {
                Ok(()) => (StatusCode::OK, "ok".to_owned()),
                Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why.to_string()),
            }
        }
    };
    let app = Router::new()
        .route("/metrics", get(move || async move { metrics.encode() }))
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route("/readyz", get(readyz));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    axum::serve(listener, app).await?;
    Ok(())
}

pub async fn main(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let policy = match &args.policy_file {
        Some(path) => AccessPolicy::from_file(path)?,
        None => AccessPolicy::allow_all(),
    };
    args.nats.check_url()?;
    let listener = bind_metrics(args.metrics_addr).await?;
    let metrics = Metrics::new();
    let leader = args.leader.start(
        args.nats.connect_options("slipstream-leader"),
        metrics.leader.clone(),
    )?;
    // The user agent names the replica, so API server audit logs tell writers apart.
    let mut kube_config = kube::Config::infer().await?;
    let user_agent = format!(
        "slipstream/{} ({})",
        env!("CARGO_PKG_VERSION"),
        args.leader.identity()
    );
    if let Ok(value) = axum::http::HeaderValue::from_str(&user_agent) {
        kube_config
            .headers
            .push((axum::http::header::USER_AGENT, value));
    }
    let client = kube::Client::try_from(kube_config)?;
    let mut server = tokio::spawn(serve_metrics(listener, metrics.clone(), leader.status()));
    let gate = leader.gate();
    let kv = Arc::new(NatsConnector::new(
        args.nats.connect_options("slipstream-operator"),
    ));
    let config = Config {
        coalesce: args.coalesce,
        status_interval: args.status_interval,
        api_concurrency: usize::from(args.api_concurrency),
        namespace: args.namespace,
        ..Config::default()
    };
    let ctx = Context::new(client, kv, policy, metrics, gate, config);
    let mut failed = None;
    tokio::select! {
        () = controller::run(ctx) => {}
        () = shutdown_signal() => info!("shutdown signal received"),
        served = &mut server => {
            failed = Some(match served {
                Ok(Err(e)) => e.context("the /metrics server stopped"),
                Ok(Ok(())) => anyhow::anyhow!("the /metrics server stopped"),
                Err(e) => anyhow::anyhow!("the /metrics server stopped: {e}"),
            });
        }
    }
    // Stop writing at once (an in-flight write is abandoned; fencing keeps
    // it harmless), then release the lease so a standby takes over now.
    leader.stop_writing();
    leader.shutdown().await;
    failed.map_or(Ok(()), Err)
}
