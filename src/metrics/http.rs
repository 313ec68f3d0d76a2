//! The HTTP listener of `/metrics`, `/healthz` and `/readyz`, shared by
//! `slipstream run` and `slipstream sync`.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use axum::{
    Router,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;
use tracing::info;

use super::exposition::{Exposition, Format};

/// Binds `addr` before anything else starts, so an address in use is an
/// error at start, not a silently missing `/healthz`. `flag` names the flag
/// in the error.
pub async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve /metrics, /healthz, /readyz on {flag} {addr}"))
}

/// Tells `/readyz` whether to answer 200 (`Ok`) or 503 with the reason.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// `/metrics` (format by `Accept`), `/healthz` (200 while the process
/// serves), `/readyz` (by `ready`).
pub fn router(exposition: Exposition, ready: Readiness) -> Router {
    let metrics = move |headers: HeaderMap| {
        let exposition = exposition.clone();
        async move {
            let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
            let format = Format::negotiate(accept);
            (
                [(header::CONTENT_TYPE, format.content_type())],
                exposition.encode(format),
            )
                .into_response()
        }
    };
    let readyz = move || {
        let answer = ready();
        async move {
            match answer {
                Ok(()) => (StatusCode::OK, "ok".to_owned()),
                Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
            }
        }
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route("/readyz", get(readyz))
}

/// Serves `router` on `listener` until the listener fails.
pub async fn serve(listener: TcpListener, router: Router) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    axum::serve(listener, router).await?;
    Ok(())
}
