//! The socket API: HTTP/1.1 over a unix domain socket (axum). JSON in and out; every error
//! is `{"error": {"code", "message"}}` with the status of its [`Code`].

use std::future::Future;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::UnixListener;
use tokio_util::io::ReaderStream;

use crate::api::{ErrorBody, FetchBody, FetchResponse, ModuleQuery};
use crate::cache::ModuleFile;
use crate::config::ConnSettings;
use crate::digest::Digest;
use crate::error::{Code, Error};
use crate::service::{FetchRequest, Outcome, Service};

/// Wraps [`Error`] so handlers can return it.
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody::from(&self.0))).into_response()
    }
}

/// The router for the proxies' socket.
pub fn router(service: Service) -> Router {
    let body_limit = service.limits().fetch_body();
    Router::new()
        .route("/v1/fetch", post(fetch))
        .route("/v1/modules/{digest}", get(module))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics))
        .fallback(no_such_endpoint)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(service)
}

/// The answer for an unknown path.
pub async fn no_such_endpoint() -> Response {
    ApiError(Error::new(Code::NotFound, "no such endpoint")).into_response()
}

/// Serves the proxies' API on an already-bound listener until `shutdown` completes, then
/// finishes the requests in flight.
pub async fn run(
    listener: UnixListener,
    service: Service,
    conn: ConnSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::listen::serve(listener, router(service), conn, shutdown).await
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(service): State<Service>) -> Response {
    let mut resp = Response::new(Body::from(service.metrics_text()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// A router with only `GET /metrics`, for `metrics_addr`.
pub fn metrics_router(service: Service) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(service)
}

fn wants_wasm(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().starts_with("application/wasm"))
        })
}

async fn fetch(
    State(service): State<Service>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        Error::invalid(format!(
            "request body: {e} (at most {} bytes, from [limits])",
            service.limits().fetch_body()
        ))
    })?;
    let body: FetchBody = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}")))?;
    let plugin = body.plugin_name.clone().unwrap_or_default();
    let req = FetchRequest::from_body(body, service.limits())?;
    tracing::debug!(source = %req.source, plugin, "fetch request");
    let Outcome {
        record,
        cache,
        grant,
    } = service.fetch(req).await?;
    if wants_wasm(&headers) {
        let m = service.cache().open_module(&record.module).await?;
        return Ok(module_response(&service, &record.module, m, false));
    }
    Ok(Json(FetchResponse {
        digest: record.module,
        size: record.size,
        module_url: service.module_url(&record.module, &grant),
        image_digest: record.image_digest,
        cache,
    })
    .into_response())
}

async fn module(
    State(service): State<Service>,
    method: axum::http::Method,
    Path(digest): Path<String>,
    Query(q): Query<ModuleQuery>,
) -> Result<Response, ApiError> {
    let d: Digest = digest.parse().map_err(Error::from)?;
    let m = service
        .open_module(&d, q.cred.as_deref(), q.token.as_deref())
        .await?;
    Ok(module_response(
        &service,
        &d,
        m,
        method == axum::http::Method::HEAD,
    ))
}

/// The module's bytes (or, for `HEAD`, only its headers).
fn module_response(service: &Service, d: &Digest, m: ModuleFile, head: bool) -> Response {
    let body = if head {
        Body::empty()
    } else {
        service.count_served(m.len);
        let file = tokio::fs::File::from_std(m.file);
        Body::from_stream(ReaderStream::with_capacity(file, 64 * 1024))
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/wasm"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.len));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{d}\"")) {
        h.insert(header::ETAG, etag);
    }
    resp
}
