//! The admin API, served only on the admin socket (mode 0600): list, purge, stats. The
//! proxies' socket has none of these routes.

use std::future::Future;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::UnixListener;

use crate::api::{ModuleList, PurgeBody};
use crate::error::Error;
use crate::server::ApiError;
use crate::service::Service;

/// The router for the admin socket.
pub fn router(service: Service) -> Router {
    Router::new()
        .route("/v1/admin/modules", get(list))
        .route("/v1/admin/purge", post(purge))
        .route("/v1/admin/stats", get(stats))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(crate::server::no_such_endpoint)
        // Purge bodies are a few fields.
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .with_state(service)
}

/// Serves the admin API on an already-bound listener until `shutdown` completes.
pub async fn run(
    listener: UnixListener,
    service: Service,
    conn: crate::config::ConnSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::listen::serve(listener, router(service), conn, shutdown).await
}

async fn list(State(s): State<Service>) -> impl IntoResponse {
    Json(ModuleList { modules: s.list() })
}

async fn stats(State(s): State<Service>) -> impl IntoResponse {
    Json(s.stats_report())
}

async fn purge(
    State(s): State<Service>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let body: PurgeBody = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("invalid purge request: {e}")))?;
    let selector = body.selector()?;
    Ok(Json(s.purge(&selector, body.dry_run).await?))
}
