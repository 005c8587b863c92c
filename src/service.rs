//! The request service: the one place that decides, per request, between serving from the
//! cache, revalidating upstream and fetching, and that makes concurrent identical requests
//! share one upstream fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::fetch::{Fetched, Fetchers, KnownBlobs};
use crate::index::{Index, Record, now_secs};
use crate::policy::{Action, Effective, Known, PullPolicy, decide};
use crate::source::Source;
use crate::store::Store;

/// A validated fetch request.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// Where the module comes from.
    pub source: Source,
    /// The `sha256` field: module, manifest or index digest the result must match.
    pub sha256: Option<Digest>,
    /// `imagePullPolicy` as given.
    pub policy: PullPolicy,
    /// Which plugin resource asks (e.g. `ns/name`), for `Always`.
    pub resource_name: Option<String>,
    /// The plugin resource's version, for `Always`.
    pub resource_version: Option<String>,
}

/// How the cache answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStatus {
    /// Served from the cache with no upstream traffic.
    Hit,
    /// Downloaded.
    Miss,
    /// Checked upstream; unchanged, so served from the cache.
    Revalidated,
}

/// The answer to a fetch.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The record of the module served.
    pub record: Record,
    /// Whether it came from the cache.
    pub cache: CacheStatus,
}

/// One upstream operation that concurrent identical requests wait on.
type Flight = Shared<BoxFuture<'static, Result<Outcome>>>;

/// The service; cheap to clone (shared state behind `Arc`s).
#[derive(Debug, Clone)]
pub struct Service {
    /// Module blobs.
    store: Store,
    /// Location -> module records.
    index: Index,
    /// Upstream fetchers.
    fetchers: Arc<Fetchers>,
    /// Upstream operations in progress, by location (and expected digest).
    flights: Arc<Mutex<HashMap<String, Flight>>>,
}

impl KnownBlobs for Index {
    fn source_has(&self, source: &str, d: &Digest) -> bool {
        self.source_has_module(source, d)
    }
}

impl Service {
    /// A service over an opened store and index.
    pub fn new(store: Store, index: Index, fetchers: Fetchers) -> Self {
        Service {
            store,
            index,
            fetchers: Arc::new(fetchers),
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The content store (for serving blobs).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Answers a fetch request: from the cache when the policy allows, else upstream.
    pub async fn fetch(&self, req: FetchRequest) -> Result<Outcome> {
        let policy = req.policy.effective(&req.source);
        let (action, record) = self.plan(&req, policy);
        let outcome = match action {
            Action::ServeDigest | Action::ServeLocation => {
                let record = record.expect("a serve action has a record");
                return Ok(Outcome {
                    record,
                    cache: CacheStatus::Hit,
                });
            }
            Action::NotPresent => {
                return Err(Error::new(
                    Code::NotPresent,
                    format!(
                        "{} is not in the cache and the pull policy is Never",
                        req.source
                    ),
                ));
            }
            Action::Fetch | Action::Revalidate => self.upstream(req.clone(), policy).await?,
        };
        // Followers of a flight record their own resource version too.
        if let Some(v) = &req.resource_version
            && policy == Effective::Always
            && outcome.record.location == req.source.location_key()
        {
            let name = req.resource_name.clone().unwrap_or_default();
            if outcome.record.versions.get(&name) != Some(v) {
                let mut r = self
                    .index
                    .get(&outcome.record.location)
                    .unwrap_or(outcome.record.clone());
                r.versions.insert(name, v.clone());
                self.index.put(r).await?;
            }
        }
        Ok(outcome)
    }

    /// Looks at the index and applies the policy.
    fn plan(&self, req: &FetchRequest, policy: Effective) -> (Action, Option<Record>) {
        let expected = expected_digests(req);
        let digest_rec = if expected.is_empty() {
            None
        } else {
            self.index
                .find_by_digests(&req.source.source_key(), &expected)
                .filter(|r| self.store.has(&r.module))
        };
        let loc_rec = self
            .index
            .get(&req.source.location_key())
            .filter(|r| self.store.has(&r.module));
        let version_seen = match (&req.resource_version, &loc_rec) {
            (Some(v), Some(r)) => {
                r.versions.get(req.resource_name.as_deref().unwrap_or("")) == Some(v)
            }
            _ => false,
        };
        let action = decide(
            policy,
            Known {
                digest_known: !expected.is_empty(),
                digest_hit: digest_rec.is_some(),
                location_cached: loc_rec.is_some(),
                version_seen,
            },
        );
        let record = match action {
            Action::ServeDigest => digest_rec,
            _ => loc_rec,
        };
        (action, record)
    }

    /// Goes upstream once for all concurrent identical requests. The work runs in its own
    /// task, so callers that hang up never cancel a download others wait on; the task
    /// removes its flight when done.
    async fn upstream(&self, req: FetchRequest, policy: Effective) -> Result<Outcome> {
        let key = format!(
            "{}|{}",
            req.source.location_key(),
            req.sha256.map(|d| d.to_string()).unwrap_or_default()
        );
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            let this = self.clone();
            let k = key.clone();
            flights
                .entry(key)
                .or_insert_with(move || {
                    // Spawned while the map is locked: the task cannot remove its entry
                    // before it is inserted.
                    let task = tokio::spawn(async move {
                        let result = this.lead(req, policy).await;
                        this.flights
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&k);
                        result
                    });
                    async move {
                        task.await
                            .unwrap_or_else(|e| Err(Error::internal("fetch task", e)))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        flight.await
    }

    /// The work of a flight's leader.
    async fn lead(&self, req: FetchRequest, policy: Effective) -> Result<Outcome> {
        // A flight that just finished may have filled the cache after this request looked.
        let (action, record) = self.plan(&req, policy);
        match action {
            Action::ServeDigest | Action::ServeLocation => {
                return Ok(Outcome {
                    record: record.expect("a serve action has a record"),
                    cache: CacheStatus::Hit,
                });
            }
            Action::NotPresent => {
                return Err(Error::new(
                    Code::NotPresent,
                    format!("{} is not in the cache", req.source),
                ));
            }
            Action::Revalidate | Action::Fetch => {}
        }
        let previous = record.filter(|_| action == Action::Revalidate);
        let mut fetch_source = req.source.clone();
        if let (Some(prev), Source::Oci(r)) = (&previous, &req.source) {
            let top = self.fetchers.resolve_oci(r).await?;
            if top == prev.top_digest() {
                let mut rec = prev.clone();
                rec.resolved_at = now_secs();
                self.note_version(&mut rec, &req);
                self.index.put(rec.clone()).await?;
                tracing::info!(source = %req.source, digest = %rec.module, "revalidated: unchanged upstream");
                return Ok(Outcome {
                    record: rec,
                    cache: CacheStatus::Revalidated,
                });
            }
            // Fetch exactly what the tag points at now.
            let mut pinned = r.clone();
            pinned.digest = Some(top);
            fetch_source = Source::Oci(pinned);
        }
        let started = std::time::Instant::now();
        let fetched = self.fetchers.fetch(&fetch_source, &self.index).await;
        let fetched = match fetched {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(source = %req.source, code = %e.code, error = %e.message, "upstream fetch failed");
                return Err(e);
            }
        };
        let mut rec = self.commit(&req, fetched).await?;
        let cache = match &previous {
            Some(p) if p.module == rec.module => CacheStatus::Revalidated,
            _ => CacheStatus::Miss,
        };
        if let Some(p) = &previous {
            rec.versions = p.versions.clone();
        }
        self.note_version(&mut rec, &req);
        self.index.put(rec.clone()).await?;
        tracing::info!(
            source = %req.source,
            digest = %rec.module,
            bytes = rec.size,
            ms = started.elapsed().as_millis() as u64,
            "fetched module"
        );
        Ok(Outcome { record: rec, cache })
    }

    fn note_version(&self, rec: &mut Record, req: &FetchRequest) {
        if let Some(v) = &req.resource_version {
            rec.versions
                .insert(req.resource_name.clone().unwrap_or_default(), v.clone());
        }
    }

    /// Checks the expected digests, then moves the module into the store.
    async fn commit(&self, req: &FetchRequest, f: Fetched) -> Result<Record> {
        let now = now_secs();
        let rec = Record {
            location: req.source.location_key(),
            source: req.source.source_key(),
            module: f.digest,
            size: f.size,
            image_digest: f.image_digest,
            index_digest: f.index_digest,
            fetched_at: now,
            resolved_at: now,
            versions: Default::default(),
        };
        for want in expected_digests(req) {
            if !rec.answers_to(&want) {
                let mut got = format!("module {}", rec.module);
                if let Some(m) = rec.image_digest {
                    got.push_str(&format!(", manifest {m}"));
                }
                if let Some(i) = rec.index_digest {
                    got.push_str(&format!(", index {i}"));
                }
                return Err(Error::new(
                    Code::ChecksumMismatch,
                    format!("{}: expected sha256 {want}, got {got}", req.source),
                ));
            }
        }
        let store = self.store.clone();
        let digest = f.digest;
        let file = f.file;
        tokio::task::spawn_blocking(move || store.commit(file, &digest))
            .await
            .map_err(|e| Error::internal("storing module", e))??;
        Ok(rec)
    }
}

/// The digests a request pins: the url's `@sha256:` and the `sha256` field.
fn expected_digests(req: &FetchRequest) -> Vec<Digest> {
    let mut v: Vec<Digest> = req.source.pinned_digest().into_iter().collect();
    if let Some(d) = req.sha256
        && !v.contains(&d)
    {
        v.push(d);
    }
    v
}
