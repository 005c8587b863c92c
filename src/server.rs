//! The socket API: HTTP/1.1 over a unix domain socket (axum). JSON in and out; every error
//! is `{"error": {"code", "message"}}` with the status of its [`Code`].

use std::future::Future;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio_util::io::ReaderStream;

use crate::auth::Secret;
use crate::digest::Digest;
use crate::error::{Code, Error};
use crate::policy::PullPolicy;
use crate::service::{CacheStatus, FetchRequest, Outcome, Service};
use crate::source::Source;

/// Body of `POST /v1/fetch`, as WasmPlugin spells it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FetchBody {
    /// The WasmPlugin `url`.
    pub url: String,
    /// Expected sha256 (module, manifest or index digest).
    #[serde(default)]
    pub sha256: Option<String>,
    /// `imagePullPolicy`.
    #[serde(default, alias = "imagePullPolicy")]
    pub pull_policy: Option<String>,
    /// `.dockerconfigjson` payload of the image pull secret.
    #[serde(default)]
    pub pull_secret: Option<Secret>,
    /// Which plugin resource asks, e.g. `ns/name`.
    #[serde(default)]
    pub resource_name: Option<String>,
    /// The plugin resource's version.
    #[serde(default)]
    pub resource_version: Option<String>,
    /// The plugin's name, for logs only.
    #[serde(default)]
    pub plugin_name: Option<String>,
}

/// Answer of `POST /v1/fetch`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchResponse {
    /// `sha256:<hex>` of the module bytes.
    pub digest: String,
    /// Module size in bytes.
    pub size: u64,
    /// Path on this socket that serves the module.
    pub module_url: String,
    /// OCI: the manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// `hit`, `miss` or `revalidated`.
    pub cache: String,
}

impl FetchBody {
    /// Validates the body into a request.
    pub fn into_request(self) -> Result<FetchRequest, Error> {
        let source = Source::parse(&self.url)?;
        let sha256 = match self.sha256.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(s.parse::<Digest>()?),
        };
        let policy = match &self.pull_policy {
            None => PullPolicy::Unspecified,
            Some(p) => p.parse()?,
        };
        let clean = |s: Option<String>| s.map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        Ok(FetchRequest {
            pull_secret: self.pull_secret.filter(|s| !s.expose().trim().is_empty()),
            source,
            sha256,
            policy,
            resource_name: clean(self.resource_name),
            resource_version: clean(self.resource_version),
        })
    }
}

/// Error body.
#[derive(Serialize)]
struct ErrorBody<'a> {
    /// `{code, message}`.
    error: ErrorInner<'a>,
}

/// The inner error object.
#[derive(Serialize)]
struct ErrorInner<'a> {
    /// Stable code.
    code: &'a str,
    /// Human message.
    message: &'a str,
}

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
        let body = ErrorBody {
            error: ErrorInner {
                code: self.0.code.as_str(),
                message: &self.0.message,
            },
        };
        (status, Json(body)).into_response()
    }
}

/// The router for the proxies' socket.
pub fn router(service: Service) -> Router {
    Router::new()
        .route("/v1/fetch", post(fetch))
        .route("/v1/modules/{digest}", get(module))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics))
        .fallback(no_such_endpoint)
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
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_unix(listener, router(service), shutdown).await
}

/// Serves `app` on a unix listener until `shutdown` completes.
pub async fn serve_unix(
    listener: UnixListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
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
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: FetchBody = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}")))?;
    let plugin = body.plugin_name.clone().unwrap_or_default();
    let req = body.into_request()?;
    tracing::debug!(source = %req.source, plugin, "fetch request");
    let Outcome {
        record,
        cache,
        grant,
    } = service.fetch(req).await?;
    if wants_wasm(&headers) {
        return serve_blob(&service, &record.module, false).await;
    }

    let cache = match cache {
        CacheStatus::Hit => "hit",
        CacheStatus::Miss => "miss",
        CacheStatus::Revalidated => "revalidated",
    };
    Ok(Json(FetchResponse {
        digest: record.module.to_string(),
        size: record.size,
        module_url: service.module_url(&record.module, &grant),
        image_digest: record.image_digest.map(|d| d.to_string()),
        cache: cache.to_string(),
    })
    .into_response())
}

/// Query of `GET /v1/modules/...` for private modules.
#[derive(Debug, Default, Deserialize)]
pub struct ModuleQuery {
    /// Credential id the token was issued for.
    #[serde(default)]
    pub cred: Option<String>,
    /// HMAC token bound to the module and the credential.
    #[serde(default)]
    pub token: Option<String>,
}

async fn module(
    State(service): State<Service>,
    method: axum::http::Method,
    Path(digest): Path<String>,
    Query(q): Query<ModuleQuery>,
) -> Result<Response, ApiError> {
    let d: Digest = digest.parse()?;
    service.check_module_access(&d, q.cred.as_deref(), q.token.as_deref())?;
    if !service.ensure_intact(&d).await? {
        return Err(Error::new(Code::NotPresent, format!("module {d} is not in the cache")).into());
    }
    let resp = serve_blob(&service, &d, method == axum::http::Method::HEAD).await?;
    service.index().touch(&d);
    Ok(resp)
}

async fn serve_blob(service: &Service, d: &Digest, head: bool) -> Result<Response, ApiError> {
    let not_present = || Error::new(Code::NotPresent, format!("module {d} is not in the cache"));
    let path = service.store().blob_path(d);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_present().into()),
        Err(e) => return Err(Error::internal("opening module", e).into()),
    };
    let len = file
        .metadata()
        .await
        .map_err(|e| Error::internal("reading module", e))?
        .len();
    let body = if head {
        Body::empty()
    } else {
        service.count_served(len);
        Body::from_stream(ReaderStream::with_capacity(file, 64 * 1024))
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/wasm"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{d}\"")) {
        h.insert(header::ETAG, etag);
    }
    Ok(resp)
}
