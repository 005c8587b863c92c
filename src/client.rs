//! The CLI's client for the daemon's socket.

use std::path::Path;

use reqwest::header::ACCEPT;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{ErrorBody, FetchBody, FetchResponse};
use crate::error::{Code, Error};

/// What the daemon answered to a fetch.
#[derive(Debug)]
pub enum FetchOutput {
    /// The answer.
    Answer(FetchResponse),
    /// The module was written to the requested file; its size.
    Written(u64),
}

fn client(socket: &Path) -> Result<reqwest::Client, Error> {
    // The CLI talks only to the daemon's unix socket: no upstream, nothing to guard.
    #[allow(clippy::disallowed_methods)]
    reqwest::Client::builder()
        .unix_socket(socket)
        .build()
        .map_err(|e| Error::internal("building socket client", e))
}

fn unreachable_daemon(socket: &Path, e: reqwest::Error) -> Error {
    Error::new(
        Code::UpstreamError,
        format!("cannot reach wasm-cache at {}: {e}", socket.display()),
    )
}

/// Sends a request to the daemon; a non-success answer becomes its decoded error.
async fn send(socket: &Path, req: reqwest::RequestBuilder) -> Result<reqwest::Response, Error> {
    let resp = req
        .send()
        .await
        .map_err(|e| unreachable_daemon(socket, e))?;
    if !resp.status().is_success() {
        return Err(api_error(resp).await);
    }
    Ok(resp)
}

/// Decodes an error answer.
async fn api_error(resp: reqwest::Response) -> Error {
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(b) => b.into(),
        Err(_) => Error::new(
            Code::Internal,
            format!(
                "daemon answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        ),
    }
}

/// Posts `body` to `/v1/fetch`; with `output`, streams the module into that file
/// (atomically: a temp file beside it, renamed when complete).
pub async fn fetch(
    socket: &Path,
    body: &FetchBody,
    output: Option<&Path>,
) -> Result<FetchOutput, Error> {
    let c = client(socket)?;
    let mut req = c.post("http://localhost/v1/fetch").json(body);
    if output.is_some() {
        req = req.header(ACCEPT, "application/wasm");
    }
    let resp = send(socket, req).await?;
    let Some(out) = output else {
        let answer: FetchResponse = resp
            .json()
            .await
            .map_err(|e| Error::internal("decoding answer", e))?;
        return Ok(FetchOutput::Answer(answer));
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::internal("creating output", e))?;
    let mut file = tokio::fs::File::from_std(
        tmp.as_file()
            .try_clone()
            .map_err(|e| Error::internal("creating output", e))?,
    );
    let mut resp = resp;
    let progress = progress_bar(resp.content_length());
    let mut n = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| unreachable_daemon(socket, e))?
    {
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
            .await
            .map_err(|e| Error::internal("writing output", e))?;
        n += chunk.len() as u64;
        if let Some(p) = &progress {
            p.set_position(n);
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(|e| Error::internal("writing output", e))?;
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .map_err(|e| Error::internal("writing output", e))?;
    tmp.persist(out)
        .map_err(|e| Error::internal("writing output", e.error))?;
    Ok(FetchOutput::Written(n))
}

/// Modules at least this large get a progress bar (on a terminal).
const PROGRESS_MIN_BYTES: u64 = 1 << 20;

/// A progress bar on stderr for a large download, when stderr is a terminal.
fn progress_bar(len: Option<u64>) -> Option<indicatif::ProgressBar> {
    let len = len.filter(|l| *l >= PROGRESS_MIN_BYTES)?;
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

/// Sends an admin request (a GET, or a POST of `body`); the decoded answer.
pub async fn admin<B: Serialize, T: DeserializeOwned>(
    socket: &Path,
    path: &str,
    body: Option<&B>,
) -> Result<T, Error> {
    let c = client(socket)?;
    let url = format!("http://localhost{path}");
    let req = match body {
        None => c.get(url),
        Some(b) => c.post(url).json(b),
    };
    send(socket, req)
        .await?
        .json()
        .await
        .map_err(|e| Error::internal("decoding answer", e))
}

/// `GET /healthz` (or, with `ready`, `/readyz`) on the proxies' socket, with a short
/// timeout.
pub async fn health(socket: &Path, ready: bool) -> Result<(), Error> {
    let path = if ready { "readyz" } else { "healthz" };
    let req = client(socket)?
        .get(format!("http://localhost/{path}"))
        .timeout(std::time::Duration::from_secs(5));
    send(socket, req).await.map(drop)
}
