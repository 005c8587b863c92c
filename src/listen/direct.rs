//! Requests answered on the connection itself, before (and without) hyper: a [`Shortcut`]
//! picks them by method and path and turns them into a [`Reply`], which is written here,
//! with its body sent from memory in one vectored write or from the page cache with
//! `sendfile(2)`. Module downloads take this path, because writing from user memory through
//! hyper's body writer tops out near 0.6x of what nginx sends.
//!
//! Anything else (a request with a body, an unknown path, a head that does not parse or is
//! too large) hands the connection, with the bytes already read, to hyper for the rest of
//! its life. Every wait is bounded: the first request head by `header_read_timeout`, the
//! wait for a later one by `idle_timeout` (then its head by `header_read_timeout`), and every
//! write by `idle_timeout` without progress.

use std::future::Future;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::sync::watch;

use crate::config::ConnSettings;

/// The largest request head read here; a larger one goes to hyper (and its limits).
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed at most; more go to hyper.
const MAX_HEADERS: usize = 32;
/// Bytes handed to one `sendfile(2)` call (the socket buffer bounds what it sends anyway).
const SENDFILE_CHUNK: usize = 4 << 20;

/// The body of a [`Reply`].
#[derive(Debug)]
pub enum ReplyBody {
    /// Headers only (`HEAD`), with this `content-length`.
    Empty(u64),
    /// Bytes in memory.
    Bytes(Bytes),
    /// `len` bytes of a shared open file from offset 0 (sent with positional `sendfile`).
    File(Arc<std::fs::File>, u64),
}

/// A response to write.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// Headers besides `content-length`, `date` and `connection`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body.
    pub body: ReplyBody,
}

/// A request as a [`Shortcut`] sees it.
#[derive(Debug)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The request target (path and query).
    pub path: String,
    /// The `Accept` header (content negotiation), when sent.
    pub accept: Option<HeaderValue>,
    /// The body (`Content-Length` bytes; empty without one).
    pub body: Bytes,
}

/// Requests answered without hyper.
pub trait Shortcut: Clone + Send + Sync + 'static {
    /// False when it answers nothing: connections go to hyper at once, unread.
    const ACTIVE: bool = true;
    /// Whether this request is one of ours.
    fn wants(&self, method: &Method, path: &str) -> bool;
    /// The largest body read here; a larger one (or a chunked one) goes to hyper.
    fn max_body(&self) -> usize;
    /// The reply to a request [`Shortcut::wants`].
    fn answer(&self, req: Request) -> impl Future<Output = Reply> + Send;
}

/// No request is answered without hyper.
#[derive(Clone, Copy, Debug)]
pub struct Nothing;

impl Shortcut for Nothing {
    const ACTIVE: bool = false;
    fn wants(&self, _: &Method, _: &str) -> bool {
        false
    }
    fn max_body(&self) -> usize {
        0
    }
    async fn answer(&self, _: Request) -> Reply {
        unreachable!("Nothing wants no request")
    }
}

/// A connection that can send from a file: `sendfile(2)` at `offset`, waiting for room in
/// the socket buffer.
pub trait Wire: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    /// Sends up to `count` bytes of `file` from `offset`; the number sent.
    fn sendfile(
        &self,
        file: &std::fs::File,
        offset: u64,
        count: usize,
    ) -> impl Future<Output = std::io::Result<usize>> + Send;
}

macro_rules! wire {
    ($t:ty) => {
        impl Wire for $t {
            async fn sendfile(
                &self,
                file: &std::fs::File,
                offset: u64,
                count: usize,
            ) -> std::io::Result<usize> {
                loop {
                    self.writable().await?;
                    let mut off = offset;
                    match self.try_io(Interest::WRITABLE, || {
                        rustix::fs::sendfile(self, file, Some(&mut off), count)
                            .map_err(std::io::Error::from)
                    }) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        r => return r,
                    }
                }
            }
        }
    };
}
wire!(tokio::net::UnixStream);
wire!(tokio::net::TcpStream);

/// What became of a connection served here.
pub enum Outcome<Io> {
    /// Closed (by the client, a timeout, an error, `Connection: close` or shutdown).
    Closed,
    /// Hyper takes it from here; the bytes already read come first.
    Handoff(Io, Bytes),
}

/// Serves requests on `io` while `shortcut` wants them.
pub async fn serve<Io: Wire, S: Shortcut>(
    mut io: Io,
    shortcut: &S,
    limits: &ConnSettings,
    stop: &mut watch::Receiver<bool>,
) -> Outcome<Io> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut first = true;
    loop {
        if *stop.borrow() && buf.is_empty() {
            return Outcome::Closed;
        }
        // The next request's first byte: within the head timeout for the first request,
        // within the idle timeout for later ones; shutdown closes an idle connection.
        if buf.is_empty() {
            let wait = if first {
                limits.header_read_timeout
            } else {
                limits.idle_timeout
            };
            let read = tokio::select! {
                r = tokio::time::timeout(wait, io.read_buf(&mut buf)) => r,
                _ = stop.wait_for(|s| *s) => return Outcome::Closed,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Outcome::Closed,
            }
        }
        let head =
            match tokio::time::timeout(limits.header_read_timeout, read_head(&mut io, &mut buf))
                .await
            {
                Ok(Ok(Some(head))) => head,
                Ok(Ok(None)) => return Outcome::Handoff(io, buf.freeze()),
                Ok(Err(_)) | Err(_) => return Outcome::Closed,
            };
        if head.unusual
            || head.content_length > shortcut.max_body() as u64
            || !shortcut.wants(&head.method, &head.path)
        {
            return Outcome::Handoff(io, buf.freeze());
        }
        let total = head.len + head.content_length as usize;
        while buf.len() < total {
            buf.reserve(total - buf.len());
            match tokio::time::timeout(limits.idle_timeout, io.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Outcome::Closed,
            }
        }
        let mut request = buf.split_to(total);
        let body = request.split_off(head.len).freeze();
        first = false;
        let reply = shortcut
            .answer(Request {
                method: head.method,
                path: head.path,
                accept: head.accept,
                body,
            })
            .await;
        let keep_alive = head.keep_alive && !*stop.borrow();
        if write_reply(&mut io, reply, keep_alive, limits.idle_timeout)
            .await
            .is_err()
            || !keep_alive
        {
            let _ = tokio::time::timeout(limits.idle_timeout, io.shutdown()).await;
            return Outcome::Closed;
        }
    }
}

/// A parsed request head.
struct Head {
    /// Its length in the buffer.
    len: usize,
    /// The method.
    method: Method,
    /// The request target (path and query).
    path: String,
    /// Whether the connection stays open after the response.
    keep_alive: bool,
    /// `Content-Length` (0 without one).
    content_length: u64,
    /// The `Accept` header.
    accept: Option<HeaderValue>,
    /// A chunked body, `Expect`, an upgrade, an HTTP/1.0 keep-alive, a second or invalid
    /// `Content-Length`: left to hyper.
    unusual: bool,
}

/// Reads until `buf` holds a whole head. `None`: not for this path (too large, too many
/// headers, does not parse): hyper decides.
async fn read_head<Io: Wire>(io: &mut Io, buf: &mut BytesMut) -> std::io::Result<Option<Head>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => return Ok(head(&req, len)),
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return Ok(None),
        }
        if io.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn head(req: &httparse::Request<'_, '_>, len: usize) -> Option<Head> {
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let path = req.path?.to_string();
    let version = req.version?;
    let mut keep_alive = version == 1;
    let mut unusual = false;
    let mut content_length = None;
    let mut accept = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            for token in String::from_utf8_lossy(h.value).split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == 0 {
                    // An HTTP/1.0 keep-alive is left to hyper, which knows the dance.
                    unusual = true;
                } else if token.eq_ignore_ascii_case("upgrade") {
                    unusual = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            unusual |= n.is_none() || content_length.is_some();
            content_length = n;
        } else if name.eq_ignore_ascii_case("accept") {
            accept = HeaderValue::from_bytes(h.value).ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            unusual = true;
        }
    }
    Some(Head {
        len,
        method,
        path,
        keep_alive,
        content_length: content_length.unwrap_or(0),
        accept,
        unusual,
    })
}

/// Writes `reply`; every write must make progress within `idle`.
async fn write_reply<Io: Wire>(
    io: &mut Io,
    reply: Reply,
    keep_alive: bool,
    idle: Duration,
) -> std::io::Result<()> {
    let len = match &reply.body {
        ReplyBody::Empty(n) | ReplyBody::File(_, n) => *n,
        ReplyBody::Bytes(b) => b.len() as u64,
    };
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(reply.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        reply
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    head.extend_from_slice(b"\r\n");
    for (name, value) in &reply.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(format!("content-length: {len}\r\n").as_bytes());
    if !keep_alive {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    match reply.body {
        ReplyBody::Empty(_) => write_all(io, &head, &[], idle).await,
        ReplyBody::Bytes(b) => write_all(io, &head, &b, idle).await,
        ReplyBody::File(file, len) => {
            write_all(io, &head, &[], idle).await?;
            let mut off = 0u64;
            while off < len {
                let count = SENDFILE_CHUNK.min((len - off) as usize);
                let n = tokio::time::timeout(idle, io.sendfile(&file, off, count))
                    .await
                    .map_err(|_| timed_out())??;
                if n == 0 {
                    // The file is shorter than its length said (it never should be).
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                off += n as u64;
            }
            Ok(())
        }
    }
}

/// Writes `a` then `b` with vectored writes, each making progress within `idle`.
async fn write_all<Io: Wire>(
    io: &mut Io,
    mut a: &[u8],
    mut b: &[u8],
    idle: Duration,
) -> std::io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let bufs = [IoSlice::new(a), IoSlice::new(b)];
        let n = tokio::time::timeout(idle, io.write_vectored(&bufs))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Option<Head> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(raw.as_bytes()).ok()? {
            httparse::Status::Complete(len) => head(&req, len),
            httparse::Status::Partial => None,
        }
    }

    #[test]
    fn plain_requests_are_ours_and_keep_alive_follows_the_version() {
        let h = parse("GET /v1/modules/x HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert!(h.keep_alive && !h.unusual && h.content_length == 0);
        assert_eq!(h.path, "/v1/modules/x");
        let h = parse("GET /x HTTP/1.1\r\nConnection: Keep-Alive, close\r\n\r\n").unwrap();
        assert!(!h.keep_alive && !h.unusual);
        let h = parse("GET /x HTTP/1.0\r\n\r\n").unwrap();
        assert!(!h.keep_alive && !h.unusual);
        let h = parse(
            "POST /v1/fetch HTTP/1.1\r\nContent-Length: 12\r\nAccept: application/wasm\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.content_length, 12);
        assert_eq!(h.accept.unwrap(), "application/wasm");
    }

    #[test]
    fn anything_unusual_is_left_to_hyper() {
        for raw in [
            "POST /v1/fetch HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /v1/fetch HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST /v1/fetch HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST /v1/fetch HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST /v1/fetch HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST /v1/fetch HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
            "GET /x HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            "GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ] {
            assert!(parse(raw).unwrap().unusual, "{raw:?}");
        }
    }

    /// A [`Wire`] over a unix socket pair, reading what the server side wrote.
    #[tokio::test]
    async fn replies_are_written_with_length_date_and_close() {
        let (mut ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let reply = Reply {
            status: StatusCode::NOT_FOUND,
            headers: vec![(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body: ReplyBody::Bytes(Bytes::from_static(b"{}")),
        };
        write_reply(&mut ours, reply, false, Duration::from_secs(5))
            .await
            .unwrap();
        drop(ours);
        let mut out = String::new();
        theirs.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
        assert!(out.contains("content-type: application/json\r\n"));
        assert!(out.contains("content-length: 2\r\n"));
        assert!(out.contains("connection: close\r\n"));
        assert!(out.contains("\r\ndate: "));
        assert!(out.ends_with("\r\n\r\n{}"), "{out}");
    }

    #[tokio::test]
    async fn a_file_body_is_sent_whole() {
        use std::io::Write;
        let (mut ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let reply = Reply {
            status: StatusCode::OK,
            headers: vec![],
            body: ReplyBody::File(Arc::new(f), data.len() as u64),
        };
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            theirs.read_to_end(&mut out).await.unwrap();
            out
        });
        write_reply(&mut ours, reply, true, Duration::from_secs(5))
            .await
            .unwrap();
        drop(ours);
        let out = reader.await.unwrap();
        let body_at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(&out[body_at..], &data[..]);
    }
}
