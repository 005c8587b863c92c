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

use crate::api::{ErrorBody, FetchBody, FetchResponse, ModuleQuery};
use crate::cache::Resident;
use crate::config::ConnSettings;
use crate::digest::Digest;
use crate::error::{Code, Error};
use crate::listen::direct::{Reply, ReplyBody};
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
    let modules = Modules(service.clone());
    crate::listen::serve_with(listener, modules, router(service), conn, shutdown).await
}

/// `GET`/`HEAD /v1/modules/{digest}` answered on the connection (from memory or with
/// `sendfile`), with the same status, headers and error bodies as the router's handler.
#[derive(Clone)]
struct Modules(Service);

/// The path prefix of module downloads.
const MODULES: &str = "/v1/modules/";

impl crate::listen::direct::Shortcut for Modules {
    fn wants(&self, method: &axum::http::Method, path: &str) -> bool {
        (method == axum::http::Method::GET || method == axum::http::Method::HEAD)
            && path.starts_with(MODULES)
    }

    async fn answer(&self, method: axum::http::Method, path: String) -> Reply {
        let service = &self.0;
        let rest = &path[MODULES.len()..];
        let (digest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut cred, mut token) = (None, None);
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "cred" => cred = Some(v.into_owned()),
                "token" => token = Some(v.into_owned()),
                _ => {}
            }
        }
        let opened = match digest.parse::<Digest>() {
            Ok(d) => service
                .open_module(&d, cred.as_deref(), token.as_deref())
                .await
                .map(|m| (d, m)),
            Err(e) => Err(Error::from(e)),
        };
        let (d, m) = match opened {
            Ok(x) => x,
            Err(e) => {
                let status = StatusCode::from_u16(e.code.status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let body = serde_json::to_vec(&ErrorBody::from(&e)).unwrap_or_default();
                return Reply {
                    status,
                    headers: vec![(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body: ReplyBody::Bytes(body.into()),
                };
            }
        };
        let mut headers = vec![(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/wasm"),
        )];
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{d}\"")) {
            headers.push((header::ETAG, etag));
        }
        let body = if method == axum::http::Method::HEAD {
            ReplyBody::Empty(m.len())
        } else {
            service.count_served(m.len());
            match m {
                Resident::Memory(b) => ReplyBody::Bytes(b),
                Resident::File(f, len) => ReplyBody::File(f, len),
            }
        };
        Reply {
            status: StatusCode::OK,
            headers,
            body,
        }
    }
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
fn module_response(service: &Service, d: &Digest, m: Resident, head: bool) -> Response {
    let len = m.len();
    let body = if head {
        Body::empty()
    } else {
        service.count_served(len);
        match m {
            Resident::Memory(b) => Body::from(b),
            Resident::File(file, len) => Body::from_stream(file_chunks(file, len)),
        }
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
    resp
}

/// The bytes of a shared open file in 256 KiB chunks, read at their offsets (the handle's own
/// position is never used) on the blocking pool.
fn file_chunks(
    file: std::sync::Arc<std::fs::File>,
    len: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    const CHUNK: u64 = 256 * 1024;
    futures_util::stream::try_unfold(0u64, move |off| {
        let file = std::sync::Arc::clone(&file);
        async move {
            if off >= len {
                return Ok(None);
            }
            let n = CHUNK.min(len - off) as usize;
            let chunk = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, off)?;
                Ok::<_, std::io::Error>(Bytes::from(buf))
            })
            .await
            .map_err(std::io::Error::other)??;
            Ok(Some((chunk, off + n as u64)))
        }
    })
}
