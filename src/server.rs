//! The socket API: HTTP/1.1 over a unix domain socket (axum). JSON in and out; every error
//! is `{"error": {"code", "message"}}` with the status of its [`Code`].

use std::future::Future;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::UnixListener;

use crate::api::{ErrorBody, FetchBody, FetchResponse};
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
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::registry::routes())
        .fallback(no_such_endpoint)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(service)
}

/// `GET /readyz`: 503 while the warming at start runs (`[prefetch] ready_after`).
async fn readyz(State(service): State<Service>) -> Response {
    if service.is_ready() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "warming\n").into_response()
    }
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
    let direct = Direct(service.clone());
    crate::listen::serve_with(listener, direct, router(service), conn, shutdown).await
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

/// True when an `Accept` header asks for the module itself.
fn wants_wasm(accept: Option<&HeaderValue>) -> bool {
    accept.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().starts_with("application/wasm"))
    })
}

/// `POST /v1/fetch` with `body`: the JSON answer, or the module itself when `accept` asks
/// for `application/wasm`.
async fn fetch_reply(
    service: &Service,
    accept: Option<&HeaderValue>,
    body: &[u8],
) -> Result<Reply, Error> {
    let body: FetchBody = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("invalid request body: {e}")))?;
    let plugin = body.plugin_name.clone().unwrap_or_default();
    let req = FetchRequest::from_body(body, service.limits())?;
    tracing::debug!(source = %req.source, plugin, "fetch request");
    let Outcome {
        record,
        cache,
        grant,
    } = service.fetch(req).await?;
    if wants_wasm(accept) {
        let m = service.cache().open_module(&record.module).await?;
        return Ok(module_reply(service, &record.module, m, false));
    }
    let answer = FetchResponse {
        digest: record.module,
        size: record.size,
        module_url: service.module_url(&record.module, &grant),
        image_digest: record.image_digest,
        cache,
    };
    let json = serde_json::to_vec(&answer).map_err(|e| Error::internal("answering", e))?;
    Ok(Reply {
        status: StatusCode::OK,
        headers: vec![(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body: ReplyBody::Bytes(json.into()),
    })
}

/// `GET`/`HEAD /v1/modules/{digest}?cred=..&token=..`; `rest` is the target after
/// `/v1/modules/`.
async fn get_module(service: &Service, head: bool, rest: &str) -> Result<Reply, Error> {
    let (digest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (mut cred, mut token) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "cred" => cred = Some(v.into_owned()),
            "token" => token = Some(v.into_owned()),
            _ => {}
        }
    }
    let d: Digest = digest.parse()?;
    let m = service
        .open_module(&d, cred.as_deref(), token.as_deref())
        .await?;
    Ok(module_reply(service, &d, m, head))
}

/// The module's bytes (or, for `HEAD`, only its headers).
fn module_reply(service: &Service, d: &Digest, m: Resident, head: bool) -> Reply {
    let mut headers = vec![(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/wasm"),
    )];
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{d}\"")) {
        headers.push((header::ETAG, etag));
    }
    let body = if head {
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

/// The `{"error": ...}` reply for `e`.
fn error_reply(e: &Error) -> Reply {
    let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&ErrorBody::from(e)).unwrap_or_default();
    Reply {
        status,
        headers: vec![(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body: ReplyBody::Bytes(body.into()),
    }
}

/// A reply as an axum response (for connections hyper serves).
pub(crate) fn into_response(reply: Reply) -> Response {
    let (len, body) = match reply.body {
        ReplyBody::Empty(n) => (n, Body::empty()),
        ReplyBody::Bytes(b) => (b.len() as u64, Body::from(b)),
        ReplyBody::File(f, n) => (n, Body::from_stream(file_chunks(f, n))),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = reply.status;
    let h = resp.headers_mut();
    for (name, value) in reply.headers {
        h.insert(name, value);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// The router's `POST /v1/fetch` (a connection hyper serves).
async fn fetch(
    State(service): State<Service>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let reply = match body {
        Err(e) => Err(Error::invalid(format!(
            "request body: {e} (at most {} bytes, from [limits])",
            service.limits().fetch_body()
        ))),
        Ok(body) => fetch_reply(&service, headers.get(header::ACCEPT), &body).await,
    };
    into_response(reply.unwrap_or_else(|e| error_reply(&e)))
}

/// The router's `GET /v1/modules/{digest}` (a connection hyper serves).
async fn module(
    State(service): State<Service>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    let target = uri.path_and_query().map_or("", |p| p.as_str());
    let rest = target.strip_prefix(MODULES).unwrap_or_default();
    let head = method == axum::http::Method::HEAD;
    into_response(
        get_module(&service, head, rest)
            .await
            .unwrap_or_else(|e| error_reply(&e)),
    )
}

/// `POST /v1/fetch` and `GET`/`HEAD /v1/modules/{digest}` answered on the connection
/// (modules from memory or with `sendfile`); the router's handlers give the same answers
/// on connections hyper serves.
#[derive(Clone)]
struct Direct(Service);

/// The path prefix of module downloads.
const MODULES: &str = "/v1/modules/";

impl crate::listen::direct::Shortcut for Direct {
    fn wants(&self, method: &axum::http::Method, path: &str) -> bool {
        use axum::http::Method;
        match path.strip_prefix(MODULES) {
            Some(rest) => {
                (method == Method::GET || method == Method::HEAD)
                    && !rest.split('?').next().unwrap_or_default().contains('/')
            }
            None => method == Method::POST && path == "/v1/fetch",
        }
    }

    fn max_body(&self) -> usize {
        self.0.limits().fetch_body()
    }

    async fn answer(&self, req: crate::listen::direct::Request) -> Reply {
        let service = &self.0;
        let reply = match req.path.strip_prefix(MODULES) {
            Some(rest) => get_module(service, req.method == axum::http::Method::HEAD, rest).await,
            None => fetch_reply(service, req.accept.as_ref(), &req.body).await,
        };
        reply.unwrap_or_else(|e| error_reply(&e))
    }
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
