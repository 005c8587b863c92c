//! Fetchers: turn a [`Source`] into a verified module in a temp file of the store.
//!
//! Each fetcher (`oci`, `http`, `file`) returns content whose digest was computed while it
//! was written, unwrapped from gzip/tar where that applies, and validated as Wasm. Fetchers
//! never consult the cache index; that is the service's job.

pub mod client;
pub mod file;
pub mod http;
pub mod oci;
pub mod unpack;

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tempfile::NamedTempFile;

use crate::auth::Credential;
use crate::cache::store::Store;
use crate::config::Config;
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::netguard::NetGuard;
use crate::source::{OciRef, Source};

/// A fetched, verified module not yet in the store.
#[derive(Debug)]
pub struct Fetched {
    /// The module bytes, in a temp file under the cache dir.
    pub file: NamedTempFile,
    /// sha256 of the module bytes.
    pub digest: Digest,
    /// Module size in bytes.
    pub size: u64,
    /// OCI: digest of the image manifest.
    pub image_digest: Option<Digest>,
    /// OCI: digest of the image index the manifest was chosen from.
    pub index_digest: Option<Digest>,
    /// OCI: the credential the registry accepted; `None` when it served anonymously (and for
    /// http and file sources).
    pub credential: Option<Credential>,
    /// http(s): the response's `ETag`, for a conditional re-check.
    pub etag: Option<String>,
    /// OCI: the mirror that served the module (`host[:port]`), when not the registry itself.
    pub served_by: Option<String>,
}

impl Fetched {
    /// A module from an http or file source: no manifest, no credential, no validator.
    pub fn plain(file: NamedTempFile, digest: Digest, size: u64) -> Fetched {
        Fetched {
            file,
            digest,
            size,
            image_digest: None,
            served_by: None,
            index_digest: None,
            credential: None,
            etag: None,
        }
    }
}

/// All fetchers, built once from config.
#[derive(Debug)]
pub struct Fetchers {
    /// `http://` and `https://`.
    http: http::HttpFetcher,
    /// `file://`.
    file: file::FileFetcher,
    /// `oci://`.
    oci: oci::OciFetcher,
    /// Upper bound on a whole fetch, retries included (waiting for a slot too).
    total_timeout: std::time::Duration,
    /// Slots for upstream operations (`[fetch] max_concurrent`).
    slots: Arc<tokio::sync::Semaphore>,
    /// Operations waiting for a slot (a metric).
    queued: prometheus::IntGauge,
}

/// What the request service needs from upstream: the seam its unit tests replace with an
/// in-process fake. [`Fetchers`] is the real one. Every call is bounded by the fetch's
/// `total_timeout`.
pub trait Upstream: Send + Sync + std::fmt::Debug + 'static {
    /// Fetches, unwraps and validates the module at `source`. For OCI, `creds` are tried in
    /// order (anonymous when empty); `known` says which blobs this source served before.
    fn fetch<'a>(
        &'a self,
        source: &'a Source,
        known: &'a dyn KnownBlobs,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Fetched>>;

    /// The digest an OCI reference points at now, and the credential the registry accepted.
    fn resolve<'a>(
        &'a self,
        r: &'a OciRef,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<oci::Authorized<Digest>>>;

    /// Checks with the registry that `creds` (anonymous when empty) may read manifest
    /// `digest` of `r`'s repository; the credential it accepted.
    fn verify<'a>(
        &'a self,
        r: &'a OciRef,
        digest: &'a Digest,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Option<Credential>>>;

    /// Downloads an http(s) module unless it is unchanged since `etag` (`Ok(None)`).
    fn fetch_if_changed<'a>(
        &'a self,
        url: &'a reqwest::Url,
        etag: &'a str,
    ) -> BoxFuture<'a, Result<Option<Fetched>>>;

    /// The cosign simple-signing signatures of manifest `digest` in `r`'s repository (the
    /// manifest tagged `sha256-<hex>.sig`); empty when there is none.
    fn signatures<'a>(
        &'a self,
        r: &'a OciRef,
        digest: &'a Digest,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Vec<crate::signature::Found>>>;

    /// The registry endpoint: manifest `reference` of `r`'s repository exactly as served.
    fn raw_manifest<'a>(
        &'a self,
        r: &'a OciRef,
        reference: &'a str,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<oci::Authorized<oci::raw::RawManifest>>> {
        let _ = (r, reference, creds);
        async {
            Err(Error::new(
                Code::Forbidden,
                "this upstream has no raw content",
            ))
        }
        .boxed()
    }

    /// The registry endpoint: blob `digest` of `r`'s repository exactly as served.
    fn raw_blob<'a>(
        &'a self,
        r: &'a OciRef,
        digest: &'a Digest,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<oci::Authorized<oci::raw::RawBlob>>> {
        let _ = (r, digest, creds);
        async {
            Err(Error::new(
                Code::Forbidden,
                "this upstream has no raw content",
            ))
        }
        .boxed()
    }

    /// The registry endpoint: whether one of `creds` may read `path` (`blobs/<digest>`) of
    /// `r`'s repository; the credential the registry accepted.
    fn raw_check<'a>(
        &'a self,
        r: &'a OciRef,
        path: &'a str,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Option<Credential>>> {
        let _ = (r, path, creds);
        async {
            Err(Error::new(
                Code::Forbidden,
                "this upstream has no raw content",
            ))
        }
        .boxed()
    }
}

impl Upstream for Fetchers {
    fn fetch<'a>(
        &'a self,
        source: &'a Source,
        known: &'a dyn KnownBlobs,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Fetched>> {
        Fetchers::fetch(self, source, known, creds).boxed()
    }

    fn resolve<'a>(
        &'a self,
        r: &'a OciRef,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<oci::Authorized<Digest>>> {
        self.resolve_oci(r, creds).boxed()
    }

    fn verify<'a>(
        &'a self,
        r: &'a OciRef,
        digest: &'a Digest,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Option<Credential>>> {
        self.verify_oci(r, digest, creds).boxed()
    }

    fn fetch_if_changed<'a>(
        &'a self,
        url: &'a reqwest::Url,
        etag: &'a str,
    ) -> BoxFuture<'a, Result<Option<Fetched>>> {
        self.fetch_http_if_changed(url, etag).boxed()
    }

    fn signatures<'a>(
        &'a self,
        r: &'a OciRef,
        digest: &'a Digest,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Vec<crate::signature::Found>>> {
        async move {
            let source = Source::Oci(r.clone());
            self.bounded(&source, self.oci.signatures(r, digest, creds))
                .await
        }
        .boxed()
    }

    fn raw_manifest<'a>(
        &'a self,
        r: &'a OciRef,
        reference: &'a str,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<oci::Authorized<oci::raw::RawManifest>>> {
        let source = Source::Oci(r.clone());
        async move {
            self.bounded(&source, self.oci.raw_manifest(r, reference, creds))
                .await
        }
        .boxed()
    }

    fn raw_blob<'a>(
        &'a self,
        r: &'a OciRef,
        digest: &'a Digest,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<oci::Authorized<oci::raw::RawBlob>>> {
        let source = Source::Oci(r.clone());
        async move {
            self.bounded(&source, self.oci.raw_blob(r, digest, creds))
                .await
        }
        .boxed()
    }

    fn raw_check<'a>(
        &'a self,
        r: &'a OciRef,
        path: &'a str,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Option<Credential>>> {
        let source = Source::Oci(r.clone());
        async move {
            self.bounded(&source, self.oci.check_access(r, path, creds))
                .await
        }
        .boxed()
    }
}

/// Which already-stored blobs a fetch may reuse instead of downloading: only those that this
/// same source has served before.
pub trait KnownBlobs: Send + Sync {
    /// True when `source` already produced a module with digest `d`.
    fn source_has<'a>(&'a self, source: &'a str, d: &'a Digest) -> BoxFuture<'a, bool>;
}

impl Fetchers {
    /// Builds the fetchers for `config`, writing into `store`.
    pub fn new(
        config: &Config,
        store: Store,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Fetchers> {
        let guard = Arc::new(NetGuard::new(
            config.allow_cidrs.clone(),
            config.deny_cidrs.clone(),
        ));
        let secure = client::build_client(config, &guard, false)?;
        let insecure = client::build_client(config, &guard, true)?;
        let mirrors = oci::hosts::load(
            config.registry_hosts_dir.as_deref(),
            &config.registry_mirrors,
            &|roots, identity, skip_verify| {
                client::build_client_with(config, &guard, skip_verify, roots, identity)
            },
        )?;
        Ok(Fetchers {
            http: http::HttpFetcher::new(secure.clone(), Arc::clone(&guard), config, store.clone()),
            file: file::FileFetcher::new(
                config.file_roots.clone(),
                config.max_module_size,
                store.clone(),
            ),
            oci: oci::OciFetcher::new(secure, insecure, Arc::clone(&guard), config, store, mirrors),
            total_timeout: config.fetch.total_timeout,
            slots: Arc::new(tokio::sync::Semaphore::new(config.fetch.max_concurrent)),
            queued: metrics.upstream_queued.clone(),
        })
    }

    /// Fetches, unwraps and validates the module at `source`. For OCI, `creds` are tried
    /// in order (anonymous when empty).
    pub async fn fetch(
        &self,
        source: &Source,
        known: &dyn KnownBlobs,
        creds: &[Credential],
    ) -> Result<Fetched> {
        let work = async {
            match source {
                Source::Http(url) => self.http.fetch(url).await,
                Source::File(path) => self.file.fetch(path).await,
                Source::Oci(r) => self.oci.fetch(r, &source.source_key(), known, creds).await,
            }
        };
        self.bounded(source, work).await
    }

    /// Resolves an OCI reference to the digest its tag points at now (a HEAD where possible).
    pub async fn resolve_oci(
        &self,
        r: &OciRef,
        creds: &[Credential],
    ) -> Result<oci::Authorized<Digest>> {
        self.bounded(&Source::Oci(r.clone()), self.oci.resolve(r, creds))
            .await
    }

    /// Downloads an http(s) module unless it is unchanged since `etag` (`Ok(None)`).
    pub async fn fetch_http_if_changed(
        &self,
        url: &reqwest::Url,
        etag: &str,
    ) -> Result<Option<Fetched>> {
        let source = Source::Http(url.clone());
        self.bounded(&source, self.http.fetch_if_changed(url, Some(etag)))
            .await
    }

    /// Checks with the registry that `creds` (anonymous when empty) may read manifest
    /// `digest` of `r`'s repository; the credential it accepted.
    pub async fn verify_oci(
        &self,
        r: &OciRef,
        digest: &Digest,
        creds: &[Credential],
    ) -> Result<Option<Credential>> {
        self.bounded(&Source::Oci(r.clone()), self.oci.verify(r, digest, creds))
            .await
    }

    async fn bounded<T>(
        &self,
        source: &Source,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let slotted = async {
            let slot = {
                /// Counts an operation as queued until it has a slot (or gives up).
                struct Queued<'a>(&'a prometheus::IntGauge);
                impl Drop for Queued<'_> {
                    fn drop(&mut self) {
                        self.0.dec();
                    }
                }
                self.queued.inc();
                let _queued = Queued(&self.queued);
                self.slots.acquire().await
            };
            let _slot = slot.map_err(|e| Error::internal("upstream slots", e))?;
            work.await
        };
        match tokio::time::timeout(self.total_timeout, slotted).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                Code::Timeout,
                format!(
                    "fetching {source} took longer than {}",
                    humantime::format_duration(self.total_timeout)
                ),
            )),
        }
    }
}

/// Unwraps (gzip, tar: first regular file) and validates a download from an http or file
/// source, which has no manifest and needs no credential.
pub async fn plain_module(
    store: &Store,
    downloaded: (NamedTempFile, Digest, u64),
    max_size: u64,
) -> Result<Fetched> {
    let (file, digest, size) =
        unwrap_and_validate(store, downloaded, max_size, unpack::TarEntry::First, false)
            .await
            .map_err(Error::from)?;
    Ok(Fetched::plain(file, digest, size))
}

/// Validates a module file as Wasm (off the async runtime).
pub async fn validate(file: &NamedTempFile) -> Result<()> {
    let path = file.path().to_path_buf();
    crate::blocking::run("validating module", move |cancel| {
        crate::verify::validate_file(&path, Some(cancel))
    })
    .await?
}

/// Unwraps gzip/tar around a downloaded file (off the async runtime), then validates the
/// module. Returns the module file, digest and size.
pub async fn unwrap_and_validate(
    store: &Store,
    downloaded: (NamedTempFile, Digest, u64),
    max_size: u64,
    entry: unpack::TarEntry,
    require_tar: bool,
) -> unpack::Result<(NamedTempFile, Digest, u64)> {
    let (file, digest, size) = downloaded;
    let path = file.path().to_path_buf();
    let st = store.clone();
    let unwrapped = crate::blocking::run("unpacking module", move |cancel| {
        unpack::unwrap(&st, &path, max_size, entry, require_tar, Some(cancel))
    })
    .await??;
    let out = match unwrapped {
        unpack::Unwrapped::Plain => (file, digest, size),
        unpack::Unwrapped::Extracted(f, d, s) => (f, d, s),
    };
    validate(&out.0).await?;
    Ok(out)
}
