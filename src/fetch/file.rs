//! `file://` urls: modules on this node, only under the configured roots.

use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;

use super::{Fetched, plain_module};
use crate::cache::store::Store;
use crate::error::{Code, Error, Result};

/// Reads modules from allowed directories.
#[derive(Debug)]
pub struct FileFetcher {
    /// Canonical directories files may be read from; empty refuses every `file://` url.
    roots: Vec<PathBuf>,
    /// Size cap.
    max_size: u64,
    /// Where the copy is written.
    store: Store,
}

impl FileFetcher {
    /// A fetcher for `roots` (already canonical).
    pub fn new(roots: Vec<PathBuf>, max_size: u64, store: Store) -> Self {
        FileFetcher {
            roots,
            max_size,
            store,
        }
    }

    /// Copies the module at `path` into the store's temp area, unwrapped and validated.
    ///
    /// A path outside the roots is `forbidden` whether or not it exists. The file is opened
    /// without following a symlink in its last component (the roots check and the open
    /// cannot be told apart by swapping it) and without blocking (a FIFO is refused, never
    /// waited on).
    pub async fn fetch(&self, path: &Path) -> Result<Fetched> {
        let shown = path.display().to_string();
        let outside = || {
            Error::new(
                Code::Forbidden,
                format!("file://{shown} is outside [file] allowed_roots"),
            )
        };
        let under_roots = |p: &Path| self.roots.iter().any(|r| p.starts_with(r));
        let canon = match tokio::fs::canonicalize(path).await {
            Ok(c) => c,
            Err(_) if !under_roots(path) => return Err(outside()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    Code::NotFound,
                    format!("file://{shown} does not exist"),
                ));
            }
            Err(e) => return Err(Error::new(Code::NotFound, format!("file://{shown}: {e}"))),
        };
        if !under_roots(&canon) {
            return Err(outside());
        }
        let opened = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&canon)?;
            let is_file = f.metadata()?.is_file();
            Ok::<_, std::io::Error>((f, is_file))
        })
        .await
        .map_err(|e| Error::internal("opening file", e))?;
        let f = match opened {
            Ok((_, false)) => {
                return Err(Error::new(
                    Code::NotFound,
                    format!("file://{shown} is not a regular file"),
                ));
            }
            Ok((f, true)) => f,
            Err(e) => return Err(Error::new(Code::NotFound, format!("file://{shown}: {e}"))),
        };
        let mut f = tokio::fs::File::from_std(f);
        let mut w = self
            .store
            .writer(self.max_size, &format!("file://{shown}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| Error::internal("reading file", e))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n]).await?;
        }
        plain_module(&self.store, w.finish().await?, self.max_size).await
    }
}
