//! `wasm-cache serve`: opens the cache, binds the socket and runs the server until SIGTERM.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::config::Config;
use crate::fetch::Fetchers;
use crate::index::Index;
use crate::service::Service;
use crate::store::Store;

/// Binds the unix socket at `path` with `mode`, replacing a stale socket file but refusing
/// to steal one that a live daemon still listens on.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another process is listening on {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Builds the service for `config`: opens the store and index (blocking work at start).
pub fn build_service(config: &Config) -> Result<Service, crate::error::Error> {
    let store = Store::open(&config.cache_dir)?;
    let index = Index::load(&store)?;
    let fetchers = Fetchers::new(config, store.clone())?;
    tracing::info!(cache_dir = %config.cache_dir.display(), records = index.len(), "cache opened");
    let key = crate::auth::NodeKey::load_or_create(&store)?;
    Ok(Service::new(
        store,
        index,
        fetchers,
        key,
        config.auth.clone(),
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

/// Runs the daemon until a shutdown signal.
pub async fn serve(config: Config) -> Result<(), String> {
    let service = build_service(&config).map_err(|e| e.to_string())?;
    let listener = bind(&config.socket, config.socket_mode)
        .map_err(|e| format!("binding {}: {e}", config.socket.display()))?;
    tracing::info!(socket = %config.socket.display(), "listening");
    let result = crate::server::run(listener, service, shutdown_signal()).await;
    let _ = std::fs::remove_file(&config.socket);
    result.map_err(|e| format!("serving: {e}"))
}
