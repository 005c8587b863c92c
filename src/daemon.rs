//! `wasm-cache serve`: opens the cache, binds the sockets and runs the servers and the
//! expiry sweep until SIGTERM.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::config::Config;
use std::sync::Arc;

use crate::cache::Cache;
use crate::fetch::Fetchers;
use crate::metrics::Metrics;
use crate::service::Service;

/// Binds the unix socket at `path` with `mode`, replacing a stale socket file but refusing
/// to steal one that a live daemon still listens on (or that it cannot prove dead).
///
/// The socket is created in a private directory beside `path` (mode 0700), given its mode
/// there and renamed into place, so it never exists at `path` with any other mode, and no
/// chmod can be redirected by a symlink. A socket directory inside a world-writable
/// directory (the `/tmp` fallback) is used only when this process's user owns it and no one
/// else may write to it.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    if let Some(grand) = parent.parent()
        && !grand.as_os_str().is_empty()
        && std::fs::metadata(grand)?.mode() & 0o002 != 0
    {
        let me = std::fs::metadata("/proc/self")?.uid();
        let dir = std::fs::symlink_metadata(parent)?;
        if !dir.is_dir() || dir.uid() != me || dir.mode() & 0o022 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is inside a world-writable directory but is not a directory that only uid {me} may write to",
                    parent.display()
                ),
            ));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("another process is listening on {}", path.display()),
                    ));
                }
                // Nobody listens: a socket a crash left behind, replaced below.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot tell whether {} is still in use ({e}); not replacing it",
                            path.display()
                        ),
                    ));
                }
            }
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    // Short: a socket path has at most 107 bytes.
    let private = parent.join(format!(".b{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = (|| {
        let tmp = private.join("s");
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Builds the service for `config`: opens the cache (blocking work at start).
pub fn build_service(config: &Config) -> Result<Service, crate::error::Error> {
    let metrics = Arc::new(Metrics::new());
    let cache = Cache::open(
        &config.cache_dir,
        config.cache.clone(),
        Arc::clone(&metrics),
    )?;
    let fetchers = Fetchers::new(config, cache.store().clone(), &metrics)?;
    let key = crate::auth::NodeKey::load_or_create(cache.store())?;
    tracing::info!(cache_dir = %config.cache_dir.display(), records = cache.index().len(), "cache opened");
    Ok(Service::new(
        cache,
        Arc::new(fetchers),
        key,
        &config.auth,
        crate::service::Settings {
            limits: config.limits,
            failures: config.fetch.failures,
            signatures: std::sync::Arc::clone(&config.signatures),
            registry: config.registry.clone(),
        },
        metrics,
    ))
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A socket could not be bound (or is taken by another process).
    #[error("binding {what} {path}: {source}")]
    Bind {
        /// Which socket (`socket`, `admin_socket`, `metrics_addr`).
        what: &'static str,
        /// Its path or address.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A socket systemd passed could not be adopted.
    #[error("adopting inherited socket {index}: {source}")]
    Inherit {
        /// Its position in `LISTEN_FDS`.
        index: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cache could not be opened.
    #[error(transparent)]
    Cache(#[from] crate::error::Error),
    /// A server failed while serving.
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
    /// A server task panicked.
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A socket inherited from systemd (`LISTEN_FDS`, index `idx`), or `None`.
fn inherited(fds: &mut listenfd::ListenFd, idx: usize) -> Result<Option<UnixListener>, ServeError> {
    let err = |source| ServeError::Inherit { index: idx, source };
    let Some(l) = fds.take_unix_listener(idx).map_err(err)? else {
        return Ok(None);
    };
    l.set_nonblocking(true).map_err(err)?;
    UnixListener::from_std(l).map(Some).map_err(err)
}

/// Warms `[prefetch]` at start (holding `/readyz` until done with `ready_after`), then
/// again on every SIGHUP: the directories are re-read and what is new is fetched.
async fn warm(
    service: Service,
    settings: crate::config::PrefetchSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use std::collections::BTreeSet;
    use tokio::signal::unix::{SignalKind, signal};
    // Installed first, so a SIGHUP during the first warming is not lost (or fatal).
    let mut hup = signal(SignalKind::hangup()).ok();
    if settings.urls.is_empty() && settings.wasmplugin_dirs.is_empty() {
        return;
    }
    if settings.ready_after {
        service.set_ready(false);
    }
    let mut warmed: BTreeSet<crate::prefetch::Item> = BTreeSet::new();
    loop {
        let dirs = settings.wasmplugin_dirs.clone();
        let (mut items, errors) =
            match tokio::task::spawn_blocking(move || crate::prefetch::read_dirs(&dirs)).await {
                Ok(found) => found,
                Err(e) => (BTreeSet::new(), vec![e.to_string()]),
            };
        for e in errors {
            tracing::warn!(error = %e, "reading WasmPlugin manifests for prefetch");
        }
        items.extend(settings.urls.iter().map(|u| crate::prefetch::Item::url(u)));
        let new: Vec<_> = items.difference(&warmed).cloned().collect();
        let report = crate::prefetch::warm(&service, new, settings.concurrency).await;
        tracing::info!(
            fetched = report.fetched,
            cached = report.cached,
            failed = report.failed,
            "prefetch done"
        );
        // Failed modules are tried again on the next SIGHUP.
        let failed: BTreeSet<String> = report
            .modules
            .iter()
            .filter(|o| o.result == crate::prefetch::Warmed::Failed)
            .map(|o| o.url.clone())
            .collect();
        warmed.extend(items.into_iter().filter(|i| !failed.contains(&i.url)));
        service.set_ready(true);
        let Some(h) = hup.as_mut() else { return };
        tokio::select! {
            got = h.recv() => if got.is_none() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        tracing::info!("SIGHUP: re-reading prefetch directories");
    }
}

/// Runs the daemon until a shutdown signal. Sockets passed by systemd socket activation
/// (`LISTEN_FDS`: the proxies' socket first, optionally the admin socket second) are used
/// instead of binding; readiness is reported with `sd_notify` when `NOTIFY_SOCKET` is set.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let mut fds = listenfd::ListenFd::from_env();
    let (listener, own_socket) = match inherited(&mut fds, 0)? {
        Some(l) => (l, false),
        None => (
            bind(&config.socket, config.socket_mode).map_err(|source| ServeError::Bind {
                what: "socket",
                path: config.socket.display().to_string(),
                source,
            })?,
            true,
        ),
    };
    let (admin, own_admin) = match inherited(&mut fds, 1)? {
        Some(l) => (l, false),
        None => (
            bind(&config.admin_socket, 0o600).map_err(|source| ServeError::Bind {
                what: "admin_socket",
                path: config.admin_socket.display().to_string(),
                source,
            })?,
            true,
        ),
    };
    // The sockets first: a second daemon on the same socket is told so before it touches
    // the cache that the first one holds.
    let service = match build_service(&config) {
        Ok(s) => s,
        Err(e) => {
            if own_socket {
                let _ = std::fs::remove_file(&config.socket);
            }
            if own_admin {
                let _ = std::fs::remove_file(&config.admin_socket);
            }
            return Err(e.into());
        }
    };
    tracing::info!(
        socket = %config.socket.display(),
        admin_socket = %config.admin_socket.display(),
        socket_activated = !own_socket,
        "listening"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if config.cache.scan_at_start {
        let s = service.clone();
        tokio::spawn(async move {
            if let Err(e) = s.cache().scan().await {
                tracing::warn!(error = %e, "blob integrity scan failed");
            }
        });
    }
    let warmer = tokio::spawn(warm(
        service.clone(),
        config.prefetch.clone(),
        stop_rx.clone(),
    ));
    let sweeper = {
        let s = service.clone();
        let rx = stop_rx.clone();
        tokio::spawn(async move { s.sweep_every_interval(rx).await })
    };
    let proxies = tokio::spawn(crate::server::run(
        listener,
        service.clone(),
        config.conn,
        stopped(stop_rx.clone()),
    ));
    let metrics_server = match config.metrics_addr {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    what: "metrics_addr",
                    path: addr.to_string(),
                    source,
                })?;
            tracing::info!(%addr, "serving /metrics over TCP");
            let router = crate::server::metrics_router(service.clone());
            let stop = stopped(stop_rx.clone());
            Some(tokio::spawn(crate::listen::serve(
                l,
                router,
                config.conn,
                stop,
            )))
        }
    };
    let registry_server = match config.registry.addr {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    what: "registry.addr",
                    path: addr.to_string(),
                    source,
                })?;
            let router = crate::registry::router(service.clone());
            let stop = stopped(stop_rx.clone());
            let conn = config.conn;
            Some(match &config.registry.tls {
                None => {
                    tracing::info!(%addr, "serving the registry endpoint over plain HTTP");
                    tokio::spawn(crate::listen::serve(l, router, conn, stop))
                }
                Some((cert, key)) => {
                    let tls = crate::registry::tls::TlsListener::new(
                        l,
                        cert,
                        key,
                        conn.header_read_timeout,
                    )
                    .map_err(|source| ServeError::Bind {
                        what: "registry.addr",
                        path: addr.to_string(),
                        source,
                    })?;
                    tracing::info!(%addr, "serving the registry endpoint over TLS");
                    tokio::spawn(crate::listen::serve(tls, router, conn, stop))
                }
            })
        }
    };
    let admin_server = tokio::spawn(crate::admin::run(
        admin,
        service.clone(),
        config.conn,
        stopped(stop_rx),
    ));
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    shutdown_signal().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let r1 = proxies.await;
    let r2 = admin_server.await;
    let _ = sweeper.await;
    warmer.abort();
    for m in [metrics_server, registry_server].into_iter().flatten() {
        let _ = m.await;
    }
    // Last-use times live in memory between sweeps.
    if let Err(e) = service.cache().flush().await {
        tracing::warn!(error = %e, "writing the index at shutdown failed");
    }
    // Sockets systemd passed in stay: systemd owns them.
    if own_socket {
        let _ = std::fs::remove_file(&config.socket);
    }
    if own_admin {
        let _ = std::fs::remove_file(&config.admin_socket);
    }
    for r in [r1, r2] {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ServeError::Serve(e)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
