//! The admin API, served only on the admin socket (mode 0600): list, purge, stats. The
//! proxies' socket has none of these routes.

use std::future::Future;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::UnixListener;

use crate::digest::Digest;
use crate::error::Error;
use crate::lifecycle::Selector;
use crate::server::ApiError;
use crate::service::Service;

/// Body of `POST /v1/admin/purge`: exactly one selector.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PurgeBody {
    /// Remove everything.
    #[serde(default)]
    pub all: bool,
    /// Remove what this url maps to.
    #[serde(default)]
    pub url: Option<String>,
    /// Remove this module.
    #[serde(default)]
    pub digest: Option<String>,
    /// Remove modules unused for this long, e.g. "7d".
    #[serde(default)]
    pub unused_for: Option<String>,
    /// Only report what would be removed.
    #[serde(default)]
    pub dry_run: bool,
}

impl PurgeBody {
    /// The selector, when exactly one is given.
    pub fn selector(&self) -> Result<Selector, Error> {
        let mut chosen = Vec::new();
        if self.all {
            chosen.push(Selector::All);
        }
        if let Some(u) = &self.url {
            chosen.push(Selector::Url(u.clone()));
        }
        if let Some(d) = &self.digest {
            chosen.push(Selector::Digest(d.parse::<Digest>()?));
        }
        if let Some(u) = &self.unused_for {
            let d = humantime::parse_duration(u).map_err(|e| {
                Error::invalid(format!(
                    "unusedFor {u:?} is not a duration like \"7d\": {e}"
                ))
            })?;
            chosen.push(Selector::UnusedForMs(d.as_millis() as u64));
        }
        match chosen.len() {
            1 => Ok(chosen.remove(0)),
            0 => Err(Error::invalid(
                "purge needs one of all, url, digest, unusedFor",
            )),
            _ => Err(Error::invalid(
                "purge takes only one of all, url, digest, unusedFor",
            )),
        }
    }
}

/// The router for the admin socket.
pub fn router(service: Service) -> Router {
    Router::new()
        .route("/v1/admin/modules", get(list))
        .route("/v1/admin/purge", post(purge))
        .route("/v1/admin/stats", get(stats))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(crate::server::no_such_endpoint)
        .with_state(service)
}

/// Serves the admin API on an already-bound listener until `shutdown` completes.
pub async fn run(
    listener: UnixListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::server::serve_unix(listener, router(service), shutdown).await
}

async fn list(State(s): State<Service>) -> impl IntoResponse {
    Json(serde_json::json!({ "modules": s.list() }))
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
