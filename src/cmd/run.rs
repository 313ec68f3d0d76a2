//! `slipstream run`: the operator. Parse flags, build the context, run.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use tokio::sync::watch;
use tracing::info;

use super::{NatsArgs, leader::LeaderArgs, parse_duration};
use crate::{
    controller::{self, Config, Context},
    kv::nats::NatsConnector,
    leader::LeaderStatus,
    metrics::{Metrics, http},
    policy::AccessPolicy,
    util::{
        logging::{LogArgs, Output},
        shutdown::shutdown_signal,
    },
};

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
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub leader: LeaderArgs,
    /// Watch only this namespace.
    #[arg(long, env = "SLIPSTREAM_NAMESPACE")]
    pub namespace: Option<String>,
}

/// `/readyz` of the operator: the leader election's readiness.
fn readiness(leader: watch::Receiver<LeaderStatus>) -> http::Readiness {
    Arc::new(move || leader.borrow().readiness().map_err(|why| why.to_string()))
}

/// The kube client: inferred config, a user agent naming the replica (so
/// API server audit logs tell writers apart), request metrics.
async fn kube_client(identity: &str, metrics: &Metrics) -> anyhow::Result<kube::Client> {
    let mut kube_config = kube::Config::infer().await?;
    let user_agent = format!("slipstream/{} ({identity})", env!("CARGO_PKG_VERSION"));
    if let Ok(value) = axum::http::HeaderValue::from_str(&user_agent) {
        kube_config
            .headers
            .push((axum::http::header::USER_AGENT, value));
    }
    Ok(kube::client::ClientBuilder::try_from(kube_config)?
        .with_layer(&metrics.api.layer())
        .build())
}

pub async fn main(args: RunArgs) -> anyhow::Result<()> {
    args.log.init(Output::Stdout)?;
    let policy = match &args.policy_file {
        Some(path) => AccessPolicy::from_file(path)?,
        None => AccessPolicy::allow_all(),
    };
    args.nats.check_url()?;
    let listener = http::bind(args.metrics_addr, "--metrics-addr").await?;
    let metrics = Metrics::new();
    let leader = args.leader.start(
        args.nats.connect_options("slipstream-leader"),
        metrics.leader.clone(),
    )?;
    let client = kube_client(&args.leader.identity(), &metrics).await?;
    let router = http::router(metrics.exposition(), readiness(leader.status()));
    let mut server = tokio::spawn(http::serve(listener, router));
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
        // the controller stops on SIGTERM or SIGINT itself
        () = controller::run(ctx) => info!("shutdown signal received"),
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
