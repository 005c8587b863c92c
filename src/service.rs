//! The request service: the one place that decides, per request, between serving from the
//! cache, verifying the caller with the registry, revalidating upstream and fetching; and
//! that makes concurrent identical requests share one upstream operation.
//!
//! Tenancy: a cached OCI module is served to a caller only when its source is public
//! (the registry served it anonymously) or when one of the caller's credentials was accepted
//! by the registry for that source recently enough (`[auth] verify`). Otherwise the registry
//! is asked (a manifest HEAD with the caller's credentials) before the bytes are handed out.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::auth::dockerconfig::{DockerConfig, no_entry_error};
use crate::auth::{Credential, NodeKey, Secret, helper};
use crate::config::{AuthSettings, CacheSettings, VerifyPolicy};
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::fetch::{Fetched, Fetchers, KnownBlobs};
use crate::index::{Grant, Index, Record, now_millis, now_secs};
use crate::metrics::Metrics;
use crate::policy::{Action, Effective, Known, PullPolicy, decide};
use crate::source::{OciRef, Source};
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
    /// `.dockerconfigjson` payload of the image pull secret.
    pub pull_secret: Option<Secret>,
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
    /// Served from the cache after asking upstream (the tag did not move, or the registry
    /// confirmed the caller's access).
    Revalidated,
}

/// The answer to a fetch.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The record of the module served.
    pub record: Record,
    /// Whether it came from the cache.
    pub cache: CacheStatus,
    /// Why the caller may have it: `Public`, or the credential id the registry accepted.
    pub grant: Grant,
}

/// One upstream operation that concurrent identical requests wait on.
type Flight = Shared<BoxFuture<'static, Result<Outcome>>>;

/// The caller's registry credentials for one request, each with its recorded id.
#[derive(Debug, Clone, Default)]
struct Caller {
    /// Candidate credentials, most specific first, with their ids.
    creds: Vec<(Credential, String)>,
    /// The request carried a pull secret (so a miss of every entry is worth saying).
    from_secret: bool,
}

impl Caller {
    fn credentials(&self) -> Vec<Credential> {
        self.creds.iter().map(|(c, _)| c.clone()).collect()
    }

    fn ids(&self) -> Vec<String> {
        self.creds.iter().map(|(_, id)| id.clone()).collect()
    }

    /// Distinguishes callers in flight keys (in memory only).
    fn flight_key(&self) -> String {
        let mut fp = String::new();
        for (c, _) in &self.creds {
            fp.push_str(&c.fingerprint().hex()[..16]);
        }
        fp
    }
}

/// The service; cheap to clone (shared state behind `Arc`s).
#[derive(Debug, Clone)]
pub struct Service {
    /// Module blobs.
    pub(crate) store: Store,
    /// Location -> module records, and access per source.
    pub(crate) index: Index,
    /// Upstream fetchers.
    fetchers: Arc<Fetchers>,
    /// Upstream operations in progress, by kind, location and caller.
    flights: Arc<Mutex<HashMap<String, Flight>>>,
    /// Key for credential ids and module tokens.
    key: NodeKey,
    /// Node credentials and re-verification policy.
    pub(crate) auth: AuthSettings,
    /// Expiry, size bound and integrity settings.
    pub(crate) cache: CacheSettings,
    /// Prometheus metrics, also read by `stats`.
    pub(crate) metrics: Arc<Metrics>,
    /// Held while blobs and records change together (install, purge, eviction), so a purge
    /// racing a fetch leaves blobs and records consistent.
    pub(crate) cache_lock: Arc<tokio::sync::Mutex<()>>,
    /// Blobs re-hashed (or written) since this process started.
    pub(crate) intact: Arc<Mutex<HashSet<Digest>>>,
    /// The parsed node credentials file and the modification time it was read at.
    node_config: Arc<Mutex<Option<(std::time::SystemTime, DockerConfig)>>>,
}

impl KnownBlobs for Index {
    fn source_has(&self, source: &str, d: &Digest) -> bool {
        self.source_has_module(source, d)
    }
}

impl Service {
    /// A service over an opened store and index.
    pub fn new(
        store: Store,
        index: Index,
        fetchers: Fetchers,
        key: NodeKey,
        auth: AuthSettings,
        cache: CacheSettings,
    ) -> Self {
        Service {
            store,
            index,
            fetchers: Arc::new(fetchers),
            flights: Arc::new(Mutex::new(HashMap::new())),
            key,
            auth,
            cache,
            metrics: Arc::new(Metrics::new()),
            cache_lock: Arc::new(tokio::sync::Mutex::new(())),
            intact: Arc::new(Mutex::new(HashSet::new())),
            node_config: Arc::new(Mutex::new(None)),
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

    /// The path a caller with `grant` fetches `module` from: plain for public modules, with
    /// a credential id and token for private ones.
    pub fn module_url(&self, module: &Digest, grant: &Grant) -> String {
        match grant {
            Grant::Credential(id) if self.index.module_public(module) != Some(true) => format!(
                "/v1/modules/{module}?cred={id}&token={}",
                self.key.module_token(module, id)
            ),
            _ => format!("/v1/modules/{module}"),
        }
    }

    /// Checks that a `GET /v1/modules/...` may read `module`: public modules are open; a
    /// private one needs a token issued for a credential still verified for it.
    pub fn check_module_access(
        &self,
        module: &Digest,
        cred: Option<&str>,
        token: Option<&str>,
    ) -> Result<()> {
        match self.index.module_public(module) {
            None => {
                return Err(Error::new(
                    Code::NotPresent,
                    format!("module {module} is not in the cache"),
                ));
            }
            Some(true) => return Ok(()),
            Some(false) => {}
        }
        let denied = |why: &str| {
            Error::new(
                Code::AccessDenied,
                format!("module {module} is private: {why}"),
            )
        };
        let (Some(id), Some(token)) = (cred, token) else {
            return Err(denied("use the moduleUrl answered by POST /v1/fetch"));
        };
        if !self.key.check_module_token(module, id, token) {
            return Err(denied("the token is not valid"));
        }
        let verified = self
            .index
            .credential_verified_for_module(module, id)
            .ok_or_else(|| denied("the credential is no longer verified"))?;
        // Under "always" a token stays usable for a short while after its verification.
        let fresh = match self.auth.verify {
            VerifyPolicy::Always => is_fresh(VerifyPolicy::Ttl(Duration::from_secs(300)), verified),
            p => is_fresh(p, verified),
        };
        if !fresh {
            return Err(denied("the credential's verification expired; fetch again"));
        }
        Ok(())
    }

    /// Answers a fetch request: from the cache when the policy and the caller's access
    /// allow, else upstream.
    pub async fn fetch(&self, req: FetchRequest) -> Result<Outcome> {
        let started = std::time::Instant::now();
        let result = self.fetch_inner(req).await;
        let label = match &result {
            Ok(o) => {
                self.index.touch(&o.record.module);
                match o.cache {
                    CacheStatus::Hit => "hit",
                    CacheStatus::Miss => "miss",
                    CacheStatus::Revalidated => "revalidated",
                }
            }
            Err(_) => "error",
        };
        self.metrics.lookups.with_label_values(&[label]).inc();
        self.metrics
            .request_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn fetch_inner(&self, req: FetchRequest) -> Result<Outcome> {
        let caller = self.caller(&req).await?;
        let policy = req.policy.effective(&req.source);
        let (mut action, mut record) = self.plan(&req, policy);
        // A cached blob that no longer matches its digest is dropped and fetched again.
        if let (Action::ServeDigest | Action::ServeLocation, Some(r)) = (action, &record)
            && !self.ensure_intact(&r.module).await?
        {
            (action, record) = self.plan(&req, policy);
        }
        let outcome = match action {
            Action::ServeDigest | Action::ServeLocation => {
                let record = record.expect("a serve action has a record");
                self.authorize(&req, &caller, record).await?
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
            Action::Fetch | Action::Revalidate => self.upstream(req.clone(), caller).await?,
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

    /// The caller's candidate credentials for the request's registry and repository: from
    /// the pull secret, else from the node's credentials file (and helpers, if allowed).
    async fn caller(&self, req: &FetchRequest) -> Result<Caller> {
        let Source::Oci(r) = &req.source else {
            return Ok(Caller::default());
        };
        let (creds, from_secret) = if let Some(secret) = &req.pull_secret {
            (
                DockerConfig::parse(secret)?.matching(&r.registry, &r.repository),
                true,
            )
        } else {
            (self.node_credentials(r).await, false)
        };
        let creds = creds
            .into_iter()
            .map(|c| {
                let id = self.key.credential_id(&r.registry, &c);
                (c, id)
            })
            .collect();
        Ok(Caller { creds, from_secret })
    }

    async fn node_credentials(&self, r: &OciRef) -> Vec<Credential> {
        let Some(path) = &self.auth.docker_config else {
            return Vec::new();
        };
        let Some(cfg) = self.node_config(path).await else {
            return Vec::new();
        };
        let creds = cfg.matching(&r.registry, &r.repository);
        if !creds.is_empty() || !self.auth.allow_credential_helpers {
            return creds;
        }
        let host = r.registry.as_str();
        let helper_name = cfg
            .helpers
            .per_registry
            .get(host)
            .or(cfg.helpers.store.as_ref());
        match helper_name {
            Some(name) => match helper::get(name, host).await {
                Ok(c) => c.into_iter().collect(),
                Err(e) => {
                    tracing::warn!(helper = %name, error = %e.message, "credential helper failed");
                    Vec::new()
                }
            },
            None => Vec::new(),
        }
    }

    /// The node credentials file, parsed; re-read only when its modification time changes
    /// (it is consulted on every OCI request without a pull secret, cache hits included).
    async fn node_config(&self, path: &std::path::Path) -> Option<DockerConfig> {
        let mtime = match tokio::fs::metadata(path).await.and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read [auth] docker_config");
                return None;
            }
        };
        if let Some((at, cfg)) = &*self.node_config.lock().unwrap_or_else(|p| p.into_inner())
            && *at == mtime
        {
            return Some(cfg.clone());
        }
        let parsed = match tokio::fs::read_to_string(path).await {
            Ok(text) => DockerConfig::parse(&Secret::new(text)),
            Err(e) => Err(Error::internal("reading", e)),
        };
        match parsed {
            Ok(cfg) => {
                *self.node_config.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((mtime, cfg.clone()));
                Some(cfg)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e.message, "ignoring [auth] docker_config");
                None
            }
        }
    }

    /// Lets `caller` have a cached `record`: at once when its source is public (or not OCI)
    /// or one of the caller's credentials is freshly verified for it; otherwise after the
    /// registry confirms access.
    async fn authorize(
        &self,
        req: &FetchRequest,
        caller: &Caller,
        record: Record,
    ) -> Result<Outcome> {
        let Source::Oci(_) = &req.source else {
            return Ok(Outcome {
                record,
                cache: CacheStatus::Hit,
                grant: Grant::Public,
            });
        };
        let access = self.index.access(&record.source);
        if access.public {
            return Ok(Outcome {
                record,
                cache: CacheStatus::Hit,
                grant: Grant::Public,
            });
        }
        for (_, id) in &caller.creds {
            if let Some(at) = access.verified.get(id)
                && is_fresh(self.auth.verify, *at)
            {
                return Ok(Outcome {
                    record,
                    cache: CacheStatus::Hit,
                    grant: Grant::Credential(id.clone()),
                });
            }
        }
        let key = format!(
            "verify|{}|{}|{}",
            record.source,
            record.top_digest(),
            caller.flight_key()
        );
        let this = self.clone();
        let req = req.clone();
        let caller = caller.clone();
        self.join(key, async move { this.verify(req, caller, record).await })
            .await
    }

    /// Asks the registry whether `caller` may read `record`'s manifest.
    async fn verify(&self, req: FetchRequest, caller: Caller, record: Record) -> Result<Outcome> {
        let Source::Oci(r) = &req.source else {
            unreachable!("only OCI sources are verified")
        };
        let digest = record.image_digest.unwrap_or(record.top_digest());
        let result = self
            .fetchers
            .verify_oci(r, &digest, &caller.credentials())
            .await;
        match result {
            Ok(accepted) => {
                let grant = self.grant_for(r, accepted.as_ref());
                self.index.grant(&record.source, &grant);
                self.index.persist().await?;
                tracing::info!(source = %req.source, digest = %record.module, "registry confirmed access to a cached module");
                Ok(Outcome {
                    record,
                    cache: CacheStatus::Revalidated,
                    grant,
                })
            }
            Err(e) if e.code == Code::AccessDenied => {
                if self.index.revoke(&record.source, &caller.ids()) {
                    self.index.persist().await?;
                }
                Err(self.explain_denied(r, &caller, e))
            }
            Err(e) => Err(e),
        }
    }

    fn grant_for(&self, r: &OciRef, accepted: Option<&Credential>) -> Grant {
        match accepted {
            None => Grant::Public,
            Some(c) => Grant::Credential(self.key.credential_id(&r.registry, c)),
        }
    }

    /// An access_denied error; says so when the pull secret had no entry for the registry.
    fn explain_denied(&self, r: &OciRef, caller: &Caller, e: Error) -> Error {
        if caller.from_secret && caller.creds.is_empty() {
            let base = no_entry_error(&r.registry);
            return Error::new(
                Code::AccessDenied,
                format!("{}; {}", base.message, e.message),
            );
        }
        e
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

    /// Goes upstream once for all concurrent identical requests of the same caller.
    async fn upstream(&self, req: FetchRequest, caller: Caller) -> Result<Outcome> {
        let key = format!(
            "fetch|{}|{}|{}",
            req.source.location_key(),
            req.sha256.map(|d| d.to_string()).unwrap_or_default(),
            caller.flight_key()
        );
        let this = self.clone();
        self.join(key, async move { this.lead(req, caller).await })
            .await
    }

    /// Joins (or starts) the flight for `key`, counting the callers that wait on a flight
    /// another caller started.
    async fn join(
        &self,
        key: String,
        work: impl Future<Output = Result<Outcome>> + Send + 'static,
    ) -> Result<Outcome> {
        let (flight, started_here) = self.flight(key, work);
        if started_here {
            return flight.await;
        }
        struct Waiting<'a>(&'a Metrics);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.waiters.dec();
            }
        }
        self.metrics.waiters.inc();
        let _waiting = Waiting(&self.metrics);
        flight.await
    }

    /// Runs `work` once per `key` at a time; concurrent callers with the same key share its
    /// result. The work runs in its own task, so callers that hang up never cancel it, and
    /// the task removes its flight when done.
    fn flight(
        &self,
        key: String,
        work: impl Future<Output = Result<Outcome>> + Send + 'static,
    ) -> (Flight, bool) {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = flights.get(&key) {
            return (f.clone(), false);
        }
        let registry = Arc::clone(&self.flights);
        let k = key.clone();
        let f = flights
            .entry(key)
            .or_insert_with(move || {
                // Spawned while the map is locked: the task cannot remove its entry before
                // it is inserted.
                let task = tokio::spawn(async move {
                    let result = work.await;
                    registry
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
            .clone();
        (f, true)
    }

    /// The work of a fetch flight's leader.
    async fn lead(&self, req: FetchRequest, caller: Caller) -> Result<Outcome> {
        let policy = req.policy.effective(&req.source);
        // A flight that just finished may have filled the cache after this request looked.
        let (action, record) = self.plan(&req, policy);
        match action {
            Action::ServeDigest | Action::ServeLocation => {
                let record = record.expect("a serve action has a record");
                return self.authorize(&req, &caller, record).await;
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
            let resolved = self
                .fetchers
                .resolve_oci(r, &caller.credentials())
                .await
                .map_err(|e| self.explain_denied(r, &caller, e))?;
            let grant = self.grant_for(r, resolved.credential.as_ref());
            self.index.grant(&prev.source, &grant);
            if resolved.value == prev.top_digest() {
                return self.unchanged(prev, &req, grant).await;
            }
            // Fetch exactly what the tag points at now.
            let mut pinned = r.clone();
            pinned.digest = Some(resolved.value);
            fetch_source = Source::Oci(pinned);
        }
        let started = std::time::Instant::now();
        let fetched = match (&previous, &req.source) {
            // An http(s) module with a validator: a conditional GET; 304 means unchanged.
            (Some(prev), Source::Http(url)) if prev.etag.is_some() => {
                let etag = prev.etag.as_deref().unwrap_or_default();
                match self.fetchers.fetch_http_if_changed(url, etag).await {
                    Ok(None) => return self.unchanged(prev, &req, Grant::Public).await,
                    Ok(Some(f)) => Ok(f),
                    Err(e) => Err(e),
                }
            }
            _ => {
                self.fetchers
                    .fetch(&fetch_source, &self.index, &caller.credentials())
                    .await
            }
        };
        let checked = match fetched {
            Ok(f) => {
                let grant = match &req.source {
                    Source::Oci(r) => self.grant_for(r, f.credential.as_ref()),
                    _ => Grant::Public,
                };
                self.check(&req, f).map(|(rec, file)| (rec, file, grant))
            }
            Err(e) => Err(match &req.source {
                Source::Oci(r) => self.explain_denied(r, &caller, e),
                _ => e,
            }),
        };
        self.observe_fetch(&req.source, started, &checked);
        let (mut rec, file, grant) = checked?;
        let cache = match &previous {
            Some(p) if p.module == rec.module => CacheStatus::Revalidated,
            _ => CacheStatus::Miss,
        };
        if let Some(p) = &previous {
            rec.versions = p.versions.clone();
        }
        note_version(&mut rec, &req);
        if matches!(req.source, Source::Oci(_)) {
            self.index.grant(&rec.source, &grant);
        }
        self.install(file, rec.clone()).await?;
        Ok(Outcome {
            record: rec,
            cache,
            grant,
        })
    }

    /// Upstream says `prev` is still current: record the check and serve it.
    async fn unchanged(&self, prev: &Record, req: &FetchRequest, grant: Grant) -> Result<Outcome> {
        let mut rec = prev.clone();
        rec.resolved_at = now_secs();
        note_version(&mut rec, req);
        self.index.put(rec.clone()).await?;
        tracing::info!(source = %req.source, digest = %rec.module, "revalidated: unchanged upstream");
        Ok(Outcome {
            record: rec,
            cache: CacheStatus::Revalidated,
            grant,
        })
    }

    /// One log line and the metrics of an upstream fetch.
    fn observe_fetch<T>(
        &self,
        source: &Source,
        started: std::time::Instant,
        result: &Result<(Record, T, Grant)>,
    ) {
        let scheme = source.scheme();
        let secs = started.elapsed().as_secs_f64();
        let ms = started.elapsed().as_millis() as u64;
        self.metrics
            .upstream_seconds
            .with_label_values(&[scheme])
            .observe(secs);
        let label = match result {
            Ok((rec, _, _)) => {
                tracing::info!(url = %source, result = "success", digest = %rec.module, bytes = rec.size, ms, "upstream fetch");
                "success"
            }
            Err(e) => {
                tracing::warn!(url = %source, result = e.code.as_str(), error = %e.message, ms, "upstream fetch");
                e.code.as_str()
            }
        };
        self.metrics
            .upstream
            .with_label_values(&[scheme, label])
            .inc();
    }

    /// Checks the expected digests; the record to install and the module file.
    fn check(&self, req: &FetchRequest, f: Fetched) -> Result<(Record, tempfile::NamedTempFile)> {
        let now = now_secs();
        let rec = Record {
            location: req.source.location_key(),
            source: req.source.source_key(),
            module: f.digest,
            size: f.size,
            image_digest: f.image_digest,
            index_digest: f.index_digest,
            etag: f.etag.clone(),
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
        Ok((rec, f.file))
    }

    /// Moves a checked module into the store and records it, evicting least recently used
    /// modules first if `[cache] max_size` needs room.
    async fn install(&self, file: tempfile::NamedTempFile, rec: Record) -> Result<()> {
        let _guard = self.cache_lock.lock().await;
        self.make_room(&rec).await?;
        let store = self.store.clone();
        let digest = rec.module;
        tokio::task::spawn_blocking(move || store.commit(file, &digest))
            .await
            .map_err(|e| Error::internal("storing module", e))??;
        self.intact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest);
        self.index.put(rec).await
    }
}

/// True when a verification at `at` (unix ms) still counts under `policy`.
fn is_fresh(policy: VerifyPolicy, at: u64) -> bool {
    match policy {
        VerifyPolicy::Never => true,
        VerifyPolicy::Always => false,
        VerifyPolicy::Ttl(ttl) => now_millis().saturating_sub(at) < ttl.as_millis() as u64,
    }
}

fn note_version(rec: &mut Record, req: &FetchRequest) {
    if let Some(v) = &req.resource_version {
        rec.versions
            .insert(req.resource_name.clone().unwrap_or_default(), v.clone());
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
