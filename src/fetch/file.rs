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
    pub async fn fetch(&self, path: &Path) -> Result<Fetched> {
        let shown = path.display().to_string();
        let canon = match tokio::fs::canonicalize(path).await {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    Code::NotFound,
                    format!("file://{shown} does not exist"),
                ));
            }
            Err(e) => return Err(Error::new(Code::NotFound, format!("file://{shown}: {e}"))),
        };
        if !self.roots.iter().any(|r| canon.starts_with(r)) {
            return Err(Error::new(
                Code::Forbidden,
                format!("file://{shown} is outside [file] allowed_roots"),
            ));
        }
        let mut f = tokio::fs::File::open(&canon)
            .await
            .map_err(|e| Error::new(Code::NotFound, format!("file://{shown}: {e}")))?;
        let meta = f
            .metadata()
            .await
            .map_err(|e| Error::internal("reading file", e))?;
        if !meta.is_file() {
            return Err(Error::new(
                Code::NotFound,
                format!("file://{shown} is not a regular file"),
            ));
        }
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
