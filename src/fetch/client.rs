//! HTTP plumbing shared by the http and OCI fetchers: guarded reqwest clients, retries with
//! backoff, status and error mapping.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::{Client, Response, StatusCode};

use crate::config::{Config, FetchSettings};
use crate::error::{Code, Error, Result};
use crate::netguard::{NetGuard, is_denied};
use crate::source::redact_for_error;

/// The header every upstream request of this process carries: the registry endpoint refuses
/// a request that carries its own process's id (a path that names this wasm-cache as its
/// own upstream would otherwise pull through itself until the connections run out).
pub const HOP_HEADER: &str = "wasm-cache-hop";

/// This process's hop id (random per process).
pub fn hop_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let seed = format!(
            "{}|{:?}|{:p}",
            std::process::id(),
            std::time::SystemTime::now(),
            &ID
        );
        crate::digest::Digest::of(seed.as_bytes()).hex()[..16].to_string()
    })
}

/// Builds a client whose every connection passes the network guard, trusting the
/// configured extra roots; `insecure` also accepts any certificate.
pub fn build_client(config: &Config, guard: &Arc<NetGuard>, insecure: bool) -> Result<Client> {
    build_client_with(config, guard, insecure, Vec::new(), None)
}

/// As [`build_client`], also trusting `extra_roots` and presenting `identity` (a registry
/// mirror's `ca` and `client` from hosts.toml).
pub fn build_client_with(
    config: &Config,
    guard: &Arc<NetGuard>,
    insecure: bool,
    extra_roots: Vec<reqwest::Certificate>,
    identity: Option<reqwest::Identity>,
) -> Result<Client> {
    let redirect_guard = Arc::clone(guard);
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("too many redirects");
        }
        match redirect_guard.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(crate::netguard::Denied(e.message)),
        }
    });
    let mut hop = reqwest::header::HeaderMap::new();
    hop.insert(
        HOP_HEADER,
        reqwest::header::HeaderValue::from_str(hop_id())
            .map_err(|e| Error::internal("the hop header", e))?,
    );
    // The one constructor of upstream clients (clippy.toml bans the others).
    #[allow(clippy::disallowed_methods)]
    let mut b = Client::builder()
        .user_agent(concat!("wasm-cache/", env!("CARGO_PKG_VERSION")))
        .default_headers(hop)
        .no_proxy()
        .redirect(policy)
        .connect_timeout(config.fetch.request_timeout)
        .read_timeout(config.fetch.request_timeout)
        .dns_resolver(guard.resolver());
    let mut certs = extra_roots;
    if let Some(id) = identity {
        b = b.identity(id);
    }
    for (path, pem) in &config.ca_pems {
        let bundle = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| Error::internal(&format!("loading CA file {}", path.display()), e))?;
        certs.extend(bundle);
    }
    if !certs.is_empty() {
        b = b.tls_certs_merge(certs);
    }
    if insecure {
        b = b.tls_danger_accept_invalid_certs(true);
    }
    b.build()
        .map_err(|e| Error::internal("building HTTP client", e))
}

/// One failed attempt: the error, and whether trying again may help.
#[derive(Debug)]
pub struct Attempt {
    /// What went wrong.
    pub error: Error,
    /// Connect errors, timeouts, 429 and most 5xx are worth retrying.
    pub retry: bool,
    /// The server's `Retry-After`, when it gave one (clamped to `backoff_max` when used).
    pub retry_after: Option<Duration>,
}

impl From<Error> for Attempt {
    fn from(error: Error) -> Self {
        Attempt {
            error,
            retry: false,
            retry_after: None,
        }
    }
}

/// Runs `op` with exponential backoff while it fails with a retryable error.
pub async fn with_retries<T, F, Fut>(settings: &FetchSettings, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, Attempt>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(settings.backoff_min)
        .with_max_delay(settings.backoff_max)
        .with_max_times(settings.retries)
        .with_jitter();
    op.retry(backoff)
        .sleep(tokio::time::sleep)
        .when(|a: &Attempt| a.retry)
        // A server that says when to come back is believed, within backoff_max.
        .adjust(|a: &Attempt, planned| match (a.retry_after, planned) {
            (Some(after), Some(_)) => Some(after.min(settings.backoff_max)),
            (_, planned) => planned,
        })
        .notify(|a: &Attempt, after: Duration| {
            tracing::debug!(error = %a.error, ?after, "retrying upstream request");
        })
        .await
        .map_err(|a| a.error)
}

/// Maps a transport error of a request to `url` to an attempt outcome.
pub fn transport_error(url: &str, e: reqwest::Error) -> Attempt {
    if let Some(msg) = is_denied(&e) {
        return Attempt {
            error: Error::new(Code::Forbidden, msg),
            retry: false,
            retry_after: None,
        };
    }
    let url = redact_for_error(url);
    if e.is_timeout() {
        return Attempt {
            error: Error::new(Code::Timeout, format!("{url}: upstream timed out")),
            retry: true,
            retry_after: None,
        };
    }
    // The url (which may carry user:password) is in the message already, redacted.
    let e = e.without_url();
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        src = s.source();
    }
    Attempt {
        error: Error::new(Code::UpstreamError, format!("{url}: {detail}")),
        retry: e.is_connect() || e.is_request() || e.is_body() || e.is_decode(),
        retry_after: None,
    }
}

/// Maps a non-success status from `what` (e.g. "registry 127.0.0.1:5000") to an attempt.
pub fn status_error(what: &str, status: StatusCode) -> Attempt {
    let (code, retry) = match status.as_u16() {
        401 | 403 => (Code::AccessDenied, false),
        404 => (Code::NotFound, false),
        408 | 429 => (Code::UpstreamError, true),
        501 | 505 | 511 => (Code::UpstreamError, false),
        500..=599 => (Code::UpstreamError, true),
        _ => (Code::UpstreamError, false),
    };
    Attempt {
        error: Error::new(code, format!("{what} answered {status}")),
        retry,
        retry_after: None,
    }
}

/// [`status_error`] for a response, with its `Retry-After` (delay-seconds; an HTTP date is
/// ignored and the backoff applies).
pub fn response_error(what: &str, resp: &Response) -> Attempt {
    let mut a = status_error(what, resp.status());
    a.retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    a
}

/// Sends a prepared request, mapping transport errors.
pub async fn send(
    req: reqwest::RequestBuilder,
    url: &str,
) -> std::result::Result<Response, Attempt> {
    req.send().await.map_err(|e| transport_error(url, e))
}

/// A response body read chunk by chunk, refused (`timeout`, worth a retry) when it brings
/// fewer than `[fetch] min_rate` bytes a second over a `min_rate_window`.
pub struct Body {
    /// The chunks.
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    /// For messages (redacted when shown).
    url: String,
    /// Bytes a window must bring (0: no minimum).
    min_per_window: u64,
    /// The window.
    window: Duration,
    /// When the current window started.
    window_start: tokio::time::Instant,
    /// Bytes in the current window.
    window_bytes: u64,
}

impl Body {
    /// The body of `resp`, under `settings`' minimum rate.
    pub fn new(resp: Response, settings: &FetchSettings) -> Body {
        use futures_util::StreamExt;
        let window = settings.min_rate_window;
        Body {
            url: resp.url().to_string(),
            stream: resp.bytes_stream().boxed(),
            min_per_window: settings.min_rate.saturating_mul(window.as_secs().max(1)),
            window,
            window_start: tokio::time::Instant::now(),
            window_bytes: 0,
        }
    }

    /// The next chunk; `None` at the end.
    pub async fn next(&mut self) -> Option<std::result::Result<bytes::Bytes, Attempt>> {
        use futures_util::StreamExt;
        loop {
            if self.min_per_window == 0 {
                return Some(
                    self.stream
                        .next()
                        .await?
                        .map_err(|e| transport_error(&self.url, e)),
                );
            }
            let deadline = self.window_start + self.window;
            let next = tokio::time::timeout_at(deadline, self.stream.next()).await;
            if tokio::time::Instant::now() >= deadline {
                if self.window_bytes < self.min_per_window {
                    return Some(Err(Attempt {
                        error: Error::new(
                            Code::Timeout,
                            format!(
                                "{}: the body arrived at less than {} bytes/s",
                                redact_for_error(&self.url),
                                self.min_per_window / self.window.as_secs().max(1)
                            ),
                        ),
                        retry: true,
                        retry_after: None,
                    }));
                }
                self.window_start = tokio::time::Instant::now();
                self.window_bytes = 0;
            }
            match next {
                Ok(Some(Ok(chunk))) => {
                    self.window_bytes += chunk.len() as u64;
                    return Some(Ok(chunk));
                }
                Ok(Some(Err(e))) => return Some(Err(transport_error(&self.url, e))),
                Ok(None) => return None,
                Err(_) => continue,
            }
        }
    }
}

/// Streams a response body into `w` (hashed and size-capped there), at the minimum rate.
pub async fn download(
    resp: Response,
    settings: &FetchSettings,
    w: &mut crate::cache::store::BlobWriter,
) -> std::result::Result<(), Attempt> {
    let mut body = Body::new(resp, settings);
    while let Some(chunk) = body.next().await {
        w.write(&chunk?).await?;
    }
    Ok(())
}

/// Reads a response body of at most `max` bytes into memory; a longer one (declared or
/// streamed) is an `upstream_error` naming `what`, and nothing past `max` is buffered.
pub async fn read_capped(
    resp: Response,
    settings: &FetchSettings,
    max: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let too_long = || {
        Error::new(
            Code::UpstreamError,
            format!("{what} answered more than {max} bytes"),
        )
    };
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_long());
    }
    let mut body = Vec::new();
    let mut stream = Body::new(resp, settings);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|a| a.error)?;
        if body.len() + chunk.len() > max {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
