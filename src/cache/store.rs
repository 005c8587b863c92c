//! The content store: module blobs addressed by sha256, plus small metadata files, under
//! `cache_dir`. The only module that builds paths under `cache_dir`.
//!
//! Every write goes to a temp file in `cache_dir/tmp`, is fsynced, renamed into place, and
//! the directory is fsynced, so a crash leaves either the old state or the new one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tempfile::NamedTempFile;
use tokio::io::AsyncWriteExt;

use crate::digest::{Digest, Hasher};
use crate::error::{Code, Error, Result};

/// Handle on the cache directory.
#[derive(Debug, Clone)]
pub struct Store {
    /// `cache_dir` itself, where metadata files live.
    root: PathBuf,
    /// `cache_dir/blobs/sha256`, one file per module digest.
    blobs: PathBuf,
    /// `cache_dir/tmp`, for writes in progress; emptied at start.
    tmp: PathBuf,
    /// Bytes of downloads in progress, counted against `[cache] max_size`.
    pending: Arc<Pending>,
}

/// Bytes being written into `cache_dir/tmp` by downloads in progress.
#[derive(Debug, Default)]
struct Pending {
    /// Their sum.
    bytes: AtomicU64,
    /// `[cache] max_size`: downloads in progress may not hold more.
    max: Option<u64>,
}

/// One writer's share of [`Pending`], given back when the writer is done.
#[derive(Debug)]
struct Reservation {
    /// The shared count.
    pending: Arc<Pending>,
    /// This writer's bytes.
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pending.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

fn io(context: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(&format!("{context} {}", path.display()), e)
}

impl Store {
    /// Opens (creating if needed) the cache at `root` and removes temp files a crash left.
    pub fn open(root: &Path) -> Result<Store> {
        let blobs = root.join("blobs").join("sha256");
        let tmp = root.join("tmp");
        for dir in [root, &blobs, &tmp] {
            fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o750))
            .map_err(|e| io("setting permissions of", root, e))?;
        let mut removed = 0;
        for entry in fs::read_dir(&tmp).map_err(|e| io("listing", &tmp, e))? {
            let entry = entry.map_err(|e| io("listing", &tmp, e))?;
            let p = entry.path();
            let res = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            res.map_err(|e| io("removing leftover", &p, e))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, "removed leftover temp files from an earlier run");
        }
        Ok(Store {
            root: root.to_path_buf(),
            blobs,
            tmp,
            pending: Arc::default(),
        })
    }

    /// The same store with downloads in progress bounded by `max` bytes in all (`[cache]
    /// max_size`). Call before cloning the store.
    pub fn with_limit(mut self, max: Option<u64>) -> Store {
        self.pending = Arc::new(Pending {
            bytes: AtomicU64::new(0),
            max,
        });
        self
    }

    /// Bytes of downloads in progress (counted against `[cache] max_size`).
    pub fn pending_bytes(&self) -> u64 {
        self.pending.bytes.load(Ordering::Relaxed)
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A new temp file in the cache's temp directory (same filesystem as the blobs).
    pub fn temp_file(&self) -> Result<NamedTempFile> {
        NamedTempFile::new_in(&self.tmp).map_err(|e| io("creating temp file in", &self.tmp, e))
    }

    /// A writer that hashes and size-checks what it writes into a new temp file.
    pub fn writer(&self, max_size: u64, what: &str) -> Result<BlobWriter> {
        let tmp = self.temp_file()?;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| io("opening", tmp.path(), e))?;
        Ok(BlobWriter {
            tmp,
            file: tokio::fs::File::from_std(file),
            hasher: Hasher::default(),
            max_size,
            what: what.to_string(),
            reservation: Reservation {
                pending: Arc::clone(&self.pending),
                bytes: 0,
            },
        })
    }

    /// Where the blob for `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// True when the blob for `digest` is on disk.
    pub fn has(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Moves a finished temp file into place as the blob for `digest`: fsync, rename, fsync
    /// the directory. Blocking.
    pub fn commit(&self, tmp: NamedTempFile, digest: &Digest) -> Result<PathBuf> {
        let dest = self.blob_path(digest);
        tmp.as_file()
            .sync_all()
            .map_err(|e| io("syncing", tmp.path(), e))?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))
            .map_err(|e| io("setting permissions of", tmp.path(), e))?;
        tmp.persist(&dest)
            .map_err(|e| io("renaming into", &dest, e.error))?;
        sync_dir(&self.blobs)?;
        Ok(dest)
    }

    /// Digests of every blob on disk (files with other names are ignored). Blocking.
    pub fn blob_digests(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.blobs).map_err(|e| io("listing", &self.blobs, e))? {
            let e = e.map_err(|e| io("listing", &self.blobs, e))?;
            if let Some(d) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Digest>().ok())
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Where the sources a blob came from are listed (one source key a line).
    fn sources_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(format!("{}.sources", digest.hex()))
    }

    /// Notes that `source` produced the blob `digest`, beside the blob, so that the fact
    /// survives a damaged index. Written to a temp file and renamed: the list is whole or
    /// absent, never cut short (a cut line could name another source). Blocking.
    pub fn add_source(&self, digest: &Digest, source: &str) -> Result<()> {
        let path = self.sources_path(digest);
        let mut lines: Vec<String> = match fs::read_to_string(&path) {
            Ok(t) => t.lines().map(str::to_string).collect(),
            Err(_) => Vec::new(),
        };
        if lines.iter().any(|l| l == source) {
            return Ok(());
        }
        lines.push(source.to_string());
        let mut tmp = self.temp_file()?;
        tmp.write_all((lines.join("\n") + "\n").as_bytes())
            .map_err(|e| io("writing", tmp.path(), e))?;
        tmp.persist(&path)
            .map_err(|e| io("renaming into", &path, e.error))?;
        Ok(())
    }

    /// True when `source` is listed beside the blob `digest` (read off the async workers'
    /// threads, at most 64 KiB of it).
    pub async fn listed_source(&self, digest: &Digest, source: &str) -> bool {
        use tokio::io::AsyncReadExt;
        let Ok(f) = tokio::fs::File::open(self.sources_path(digest)).await else {
            return false;
        };
        let mut text = String::new();
        if f.take(64 << 10).read_to_string(&mut text).await.is_err() {
            return false;
        }
        text.lines().any(|l| l == source)
    }

    /// Removes the blob for `digest`, if present. Open readers keep their bytes.
    pub fn remove(&self, digest: &Digest) -> Result<()> {
        let _ = fs::remove_file(self.sources_path(digest));
        let p = self.blob_path(digest);
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(&self.blobs),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &p, e)),
        }
    }

    /// Atomically replaces the metadata file `name` (in `cache_dir`) with `bytes`. Blocking.
    pub fn write_meta(&self, name: &str, bytes: &[u8], mode: u32) -> Result<()> {
        let dest = self.root.join(name);
        let mut tmp = self.temp_file()?;
        tmp.write_all(bytes)
            .map_err(|e| io("writing", tmp.path(), e))?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| io("syncing", tmp.path(), e))?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))
            .map_err(|e| io("setting permissions of", tmp.path(), e))?;
        tmp.persist(&dest)
            .map_err(|e| io("renaming into", &dest, e.error))?;
        sync_dir(&self.root)
    }

    /// Renames the metadata file `from` to `to` (both in `cache_dir`) and fsyncs the
    /// directory. Blocking.
    pub fn rename_meta(&self, from: &str, to: &str) -> Result<()> {
        let (a, b) = (self.root.join(from), self.root.join(to));
        fs::rename(&a, &b).map_err(|e| io("renaming", &a, e))?;
        sync_dir(&self.root)
    }

    /// True when a metadata file whose name starts with `prefix` exists. Blocking.
    pub fn has_meta_prefixed(&self, prefix: &str) -> Result<bool> {
        for e in fs::read_dir(&self.root).map_err(|e| io("listing", &self.root, e))? {
            let e = e.map_err(|e| io("listing", &self.root, e))?;
            if e.file_name().to_string_lossy().starts_with(prefix) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The size of the metadata file `name`, `None` when absent. Blocking.
    pub fn meta_len(&self, name: &str) -> Result<Option<u64>> {
        let p = self.root.join(name);
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &p, e)),
        }
    }

    /// Reads the metadata file `name`, `None` when absent.
    pub fn read_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let p = self.root.join(name);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &p, e)),
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing directory", dir, e))
}

/// A temp file being filled from a stream; hashes and enforces the size cap as it goes.
#[derive(Debug)]
pub struct BlobWriter {
    /// The temp file; deleted on drop unless committed.
    tmp: NamedTempFile,
    /// Async handle on the same file.
    file: tokio::fs::File,
    /// sha256 and length of what was written.
    hasher: Hasher,
    /// Largest size accepted.
    max_size: u64,
    /// What is being written, for the `too_large` message.
    what: String,
    /// Its bytes in the count of downloads in progress, until it is finished or dropped.
    reservation: Reservation,
}

impl BlobWriter {
    /// Appends `chunk`, failing with `too_large` past the cap.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        if self.hasher.len() + chunk.len() as u64 > self.max_size {
            return Err(Error::new(
                Code::TooLarge,
                format!(
                    "{} exceeds the maximum size of {} bytes",
                    self.what, self.max_size
                ),
            ));
        }
        let n = chunk.len() as u64;
        let now = self
            .reservation
            .pending
            .bytes
            .fetch_add(n, Ordering::Relaxed)
            + n;
        self.reservation.bytes += n;
        if let Some(max) = self.reservation.pending.max
            && self.reservation.bytes > max
        {
            return Err(Error::new(
                Code::TooLarge,
                format!(
                    "{} is more than the whole cache may hold ([cache] max_size = {max})",
                    self.what
                ),
            ));
        }
        if let Some(max) = self.reservation.pending.max
            && now > max
        {
            return Err(Error::new(
                Code::StorageFull,
                format!(
                    "{}: downloads in progress would hold more than [cache] max_size ({max} bytes)",
                    self.what
                ),
            ));
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .await
            .map_err(|e| io("writing", self.tmp.path(), e))
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }

    /// Flushes and returns the temp file with the digest and size of its content.
    pub async fn finish(mut self) -> Result<(NamedTempFile, Digest, u64)> {
        self.file
            .flush()
            .await
            .map_err(|e| io("writing", self.tmp.path(), e))?;
        let len = self.hasher.len();
        Ok((self.tmp, self.hasher.finish(), len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_commit_and_reopen_cleans_temp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.writer(10, "module").unwrap();
        w.write(b"hello").await.unwrap();
        let (tmp, digest, len) = w.finish().await.unwrap();
        assert_eq!((digest, len), (Digest::of(b"hello"), 5));
        let path = store.commit(tmp, &digest).unwrap();
        assert_eq!(fs::read(path).unwrap(), b"hello");
        assert!(store.has(&digest));

        // A crash mid-write leaves a temp file; reopening removes it.
        let leftover = store.temp_file().unwrap().keep().unwrap().1;
        assert!(leftover.exists());
        let _store = Store::open(dir.path()).unwrap();
        assert!(!leftover.exists());
        assert!(_store.has(&digest));
    }

    #[tokio::test]
    async fn writer_enforces_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.writer(4, "module").unwrap();
        let err = w.write(b"hello").await.unwrap_err();
        assert_eq!(err.code, Code::TooLarge);
    }
}
