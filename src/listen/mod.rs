//! Serving a router on a listener with every connection bounded: at most `max_connections`
//! open at once (the rest wait in the kernel's backlog), a request head must arrive within
//! `header_read_timeout` (slow-header clients are dropped), and a connection with no request
//! in flight and no traffic for `idle_timeout` is closed. On shutdown, the listener stops
//! accepting, idle connections close, and requests in flight finish.
//!
//! A [`direct::Shortcut`] answers its requests (module downloads) on the connection itself,
//! before hyper sees it; see [`direct`].

pub mod direct;

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use bytes::{Buf, Bytes};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use crate::config::ConnSettings;

/// Something that accepts connections (a unix or TCP listener).
pub trait Accept: Send + 'static {
    /// The connection type.
    type Io: direct::Wire;
    /// Accepts the next connection.
    fn accept(&mut self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&mut self) -> std::io::Result<Self::Io> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&mut self) -> std::io::Result<Self::Io> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// What the idle check of one connection looks at.
#[derive(Debug)]
struct Activity {
    /// When bytes last moved either way (ms since `start`).
    last: AtomicU64,
    /// Requests whose response has not been produced yet.
    in_flight: AtomicUsize,
    /// The connection's start.
    start: Instant,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long the connection has been idle (zero while a request is in flight).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A connection's IO that records when bytes move.
struct Tracked<T> {
    /// Bytes read before hyper took over (by [`direct::serve`]), given back first.
    prefix: Bytes,
    /// The connection.
    io: T,
    /// Shared with the idle check.
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    /// Forwarded, so hyper writes head and body chunks without copying them into one buffer.
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts a request as in flight until its response is produced.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(a))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` under `limits` until `shutdown` completes, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: impl Accept,
    app: Router,
    limits: ConnSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, direct::Nothing, app, limits, shutdown).await
}

/// As [`serve`], with the requests `shortcut` wants answered on the connection itself.
pub async fn serve_with<S: direct::Shortcut>(
    mut listener: impl Accept,
    shortcut: S,
    app: Router,
    limits: ConnSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let io = tokio::select! {
            r = listener.accept() => match r {
                Ok(io) => io,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let app = app.clone();
        let shortcut = shortcut.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (io, prefix) = if !S::ACTIVE {
                (io, Bytes::new())
            } else {
                match direct::serve(io, &shortcut, &limits, &mut stop).await {
                    direct::Outcome::Closed => return,
                    direct::Outcome::Handoff(io, prefix) => (io, prefix),
                }
            };
            serve_hyper(io, prefix, app, limits, stop).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a slot until it ends.
    let _ = slots
        .acquire_many(limits.max_connections as u32)
        .await
        .expect("the semaphore is never closed");
    Ok(())
}

/// Serves the rest of a connection (starting with the bytes in `prefix`) with hyper and
/// `app`, bounded by `limits`, until it ends or `stop` (then gracefully).
async fn serve_hyper<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: T,
    prefix: Bytes,
    app: Router,
    limits: ConnSettings,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity {
        last: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        start: Instant::now(),
    });
    let io = TokioIo::new(Tracked {
        prefix,
        io,
        activity: Arc::clone(&activity),
    });
    let a = Arc::clone(&activity);
    let service = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
        // In flight until the handler has produced its response; the body that follows
        // counts through the IO it moves.
        let guard = InFlight::new(&a);
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(axum::body::Body::new)).await;
            drop(guard);
            resp
        }
    });
    let service = TowerToHyperService::new(service);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let mut conn = pin!(builder.serve_connection(io, service));
    let mut tick = tokio::time::interval(limits.idle_timeout.min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Once closing: a response still in progress may finish, but a client that stopped
    // reading it is dropped after one more idle period.
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
                break;
            }
            _ = tick.tick() => {
                match closing {
                    Some(at) if at.elapsed() >= limits.idle_timeout
                        && activity.idle_for() >= limits.idle_timeout => break,
                    Some(_) => {}
                    None if activity.idle_for() >= limits.idle_timeout => {
                        closing = Some(Instant::now());
                        conn.as_mut().graceful_shutdown();
                    }
                    None => {}
                }
            }
            _ = stop.wait_for(|s| *s), if closing.is_none() => {
                closing = Some(Instant::now());
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
