//! The cache: module blobs ([`store`]), what locations resolved to and who may read them
//! ([`index`]), blob integrity, and the lock under which blobs and records change together.
//! Its lifecycle (purge, expiry sweep, LRU eviction, integrity scan) is in [`lifecycle`].
//!
//! Nothing outside this module builds paths under `cache_dir` or changes a blob.

pub mod hot;
pub mod index;
pub mod lifecycle;
pub mod store;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tempfile::NamedTempFile;

use crate::config::CacheSettings;
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::metrics::Metrics;
use hot::Hot;
pub use hot::Resident;
use index::{Index, Record};
use store::Store;

/// The cache of one daemon. Cheap to clone (shared state behind `Arc`s).
#[derive(Debug, Clone)]
pub struct Cache {
    /// Module blobs and metadata files.
    store: Store,
    /// Records, access and use times.
    index: Index,
    /// Expiry, size bound and integrity settings.
    settings: CacheSettings,
    /// Eviction, purge and corruption counters.
    metrics: Arc<Metrics>,
    /// Held while blobs and records change together (install, purge, eviction), so a purge
    /// racing a fetch leaves blobs and records consistent.
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Blobs re-hashed (or written) since this process started.
    intact: Arc<Mutex<HashSet<Digest>>>,
    /// Modules served without opening or reading their blob again.
    hot: Hot,
}

impl Cache {
    /// Opens the cache at `settings.dir`-style `root`: removes leftover temp files, opens
    /// (or migrates) the index, drops records without blobs and blobs without records.
    /// Blocking.
    pub fn open(
        root: &std::path::Path,
        settings: CacheSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Cache> {
        let store = Store::open(root)?.with_limit(settings.max_size);
        let index = Index::open(&store)?;
        if index.damaged().is_some() {
            metrics.index_damaged.inc();
        }
        Ok(Cache {
            store,
            index,
            metrics,
            lock: Arc::new(tokio::sync::Mutex::new(())),
            intact: Arc::new(Mutex::new(HashSet::new())),
            hot: Hot::new(settings.memory_size),
            settings,
        })
    }

    /// The content store (temp files for fetchers, the node key).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The cache settings.
    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// The record for `location`. Memory only: a blob removed behind the daemon's back is
    /// noticed when it is opened (and its records dropped then).
    pub fn record(&self, location: &str) -> Option<Record> {
        self.index.get(location)
    }

    /// A record of `source` answering to every digest in `digests`.
    pub fn record_by_digests(&self, source: &str, digests: &[Digest]) -> Option<Record> {
        self.index.find_by_digests(source, digests)
    }

    /// Moves a checked module into the store and records it, evicting least recently used
    /// modules first if `[cache] max_size` needs room. `merge` sees the record the location
    /// has now (if any), so what concurrent requests noted on it is kept.
    pub async fn install(
        &self,
        file: NamedTempFile,
        rec: Record,
        merge: impl FnOnce(Option<&Record>, Record) -> Record,
    ) -> Result<Record> {
        let _guard = self.lock.lock().await;
        self.make_room(&rec).await?;
        let store = self.store.clone();
        let digest = rec.module;
        let source = rec.is_oci().then(|| rec.source.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            store.commit(file, &digest)?;
            // Best effort: without the list, a damaged index only costs a download.
            if let Some(src) = source
                && let Err(e) = store.add_source(&digest, &src)
            {
                tracing::warn!(error = %e, "could not note the source of a blob");
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::internal("storing module", e))??;
        self.intact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest);
        let location = rec.location.clone();
        let stored = self
            .index
            .update(&location, move |old| Some(merge(old, rec)))
            .await?;
        stored.ok_or_else(|| Error::internal("installing module", "record vanished"))
    }

    /// The module `d`, ready to be served: from the hot set without any disk access, else
    /// opened (and, when small, read into memory) after re-hashing it if this process has
    /// not yet. A corrupt or vanished blob is dropped with its records and `not_present`.
    pub async fn open_module(&self, d: &Digest) -> Result<Resident> {
        if let Some(m) = self.hot.get(d) {
            return Ok(m);
        }
        let not_present =
            || Error::new(Code::NotPresent, format!("module {d} is not in the cache"));
        if !self.ensure_intact(d).await? {
            return Err(not_present());
        }
        let epoch = self.hot.epoch();
        let path = self.store.blob_path(d);
        let hot = self.hot.clone();
        let opened = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = std::fs::File::open(&path)?;
            let len = file.metadata()?.len();
            if hot.holds_in_memory(len) {
                let mut buf = Vec::with_capacity(len as usize);
                (&mut file).take(len).read_to_end(&mut buf)?;
                return Ok(Resident::Memory(buf.into()));
            }
            Ok::<_, std::io::Error>(Resident::File(Arc::new(file), len))
        })
        .await
        .map_err(|e| Error::internal("opening module", e))?;
        match opened {
            Ok(m) => {
                self.hot.insert(*d, m.clone(), epoch);
                Ok(m)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::error!(digest = %d, "cached module vanished from disk; dropping its records");
                let _guard = self.lock.lock().await;
                self.remove(&[*d]).await?;
                Err(not_present())
            }
            Err(e) => Err(Error::internal("opening module", e)),
        }
    }

    /// Notes that `module` was served (drives expiry and LRU).
    pub fn touch(&self, module: &Digest) {
        self.index.touch(module);
    }

    /// Writes use times not yet on disk (at shutdown).
    pub async fn flush(&self) -> Result<()> {
        self.index.flush_used().await
    }

    /// Drops modules from the index (on disk first), then deletes their blobs. Call with
    /// the lock held.
    async fn remove(&self, digests: &[Digest]) -> Result<()> {
        if digests.is_empty() {
            return Ok(());
        }
        // Records go first: a crash in between leaves an unreferenced blob, never a record
        // without its blob.
        self.index.remove_modules(digests).await?;
        let store = self.store.clone();
        let ds = digests.to_vec();
        tokio::task::spawn_blocking(move || ds.iter().try_for_each(|d| store.remove(d)))
            .await
            .map_err(|e| Error::internal("removing modules", e))??;
        self.hot.remove(digests);
        let mut intact = self.intact.lock().unwrap_or_else(|p| p.into_inner());
        for d in digests {
            intact.remove(d);
        }
        Ok(())
    }

    /// True when the blob for `d` matches its digest (re-hashing it once per process);
    /// otherwise drops the module and its records and returns false.
    pub async fn ensure_intact(&self, d: &Digest) -> Result<bool> {
        if self
            .intact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(d)
        {
            return Ok(true);
        }
        let path = self.store.blob_path(d);
        let actual = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(|e| Error::internal("hashing module", e))??;
        if actual == Some(*d) {
            self.intact
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*d);
            return Ok(true);
        }
        tracing::error!(
            digest = %d,
            found = ?actual,
            "cached module is corrupt or missing; dropping it (it will be fetched again)"
        );
        self.metrics.corrupt.inc();
        let _guard = self.lock.lock().await;
        self.remove(&[*d]).await?;
        Ok(false)
    }
}

impl crate::fetch::KnownBlobs for Cache {
    /// The index says so, or (after a damaged index) the list kept beside the blob does.
    fn source_has<'a>(
        &'a self,
        source: &'a str,
        d: &'a Digest,
    ) -> futures_util::future::BoxFuture<'a, bool> {
        use futures_util::FutureExt;
        async move {
            self.index.source_has_module(source, d) || self.store.listed_source(d, source).await
        }
        .boxed()
    }
}

/// sha256 of a file; `None` when it does not exist.
fn hash_file(path: &std::path::Path) -> Result<Option<Digest>> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::internal("opening module", e)),
    };
    let mut h = crate::digest::Hasher::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::internal("reading module", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Some(h.finish()))
}
