//! The request service: for each fetch, plan against the cache ([`plan`]), check the caller's
//! access ([`access`]), and go upstream once for all concurrent identical requests
//! ([`crate::singleflight`]). It depends on the [`Upstream`] trait, so its unit tests drive it
//! with an in-process fake.

pub mod access;
pub mod failures;
pub mod plan;
pub mod registry;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{CacheStatus, FetchBody, ModuleInfo, PurgeReport, StatsReport};
use crate::auth::{NodeKey, Secret};
use crate::cache::index::{Grant, Record, now_millis};
use crate::cache::lifecycle::Selector;
use crate::cache::{Cache, Resident};
use crate::config::{AuthSettings, FailureSettings, Limits};
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::fetch::{Fetched, Upstream};
use crate::metrics::Metrics;
use crate::policy::{Effective, PullPolicy};
use crate::singleflight::Flights;
use crate::source::{OciRef, Source};
use access::{Caller, GetAccess, Tenancy};
use failures::{Failures, Lookup};
use plan::{Plan, expected_digests};

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

impl FetchRequest {
    /// A request for `url` with every other field unset.
    pub fn for_url(url: &str) -> Result<FetchRequest> {
        FetchRequest::try_from(FetchBody {
            url: url.to_string(),
            ..Default::default()
        })
    }
}

impl TryFrom<FetchBody> for FetchRequest {
    type Error = Error;

    /// Validates a wire body into a request, under the default [`Limits`].
    fn try_from(body: FetchBody) -> Result<FetchRequest> {
        FetchRequest::from_body(body, &Limits::default())
    }
}

/// `invalid_request` for a field over its limit.
fn over_limit(field: &str, len: usize, max: usize) -> Error {
    Error::invalid(format!(
        "{field} is {len} bytes, more than the limit of {max} bytes ([limits])"
    ))
}

impl FetchRequest {
    /// Validates a wire body into a request: every field within `limits` (checked before
    /// anything is parsed), then parsed.
    pub fn from_body(body: FetchBody, limits: &Limits) -> Result<FetchRequest> {
        let check = |field: &str, v: Option<&str>, max: usize| match v {
            Some(v) if v.len() > max => Err(over_limit(field, v.len(), max)),
            _ => Ok(()),
        };
        check("url", Some(&body.url), limits.url)?;
        check(
            "resourceName",
            body.resource_name.as_deref(),
            limits.resource_name,
        )?;
        check(
            "resourceVersion",
            body.resource_version.as_deref(),
            limits.resource_version,
        )?;
        check(
            "pullSecret",
            body.pull_secret.as_ref().map(|s| s.expose()),
            limits.pull_secret,
        )?;
        let source = Source::parse(&body.url)?;
        let sha256 = match body.sha256.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(s.parse::<Digest>()?),
        };
        let policy = match &body.pull_policy {
            None => PullPolicy::Unspecified,
            Some(p) => p.parse()?,
        };
        let clean = |s: Option<String>| s.map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        Ok(FetchRequest {
            pull_secret: body.pull_secret.filter(|s| !s.expose().trim().is_empty()),
            source,
            sha256,
            policy,
            resource_name: clean(body.resource_name),
            resource_version: clean(body.resource_version),
        })
    }
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

/// What the service is configured with besides its parts.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    /// Bounds on request fields.
    pub limits: Limits,
    /// What happens when upstream fails.
    pub failures: FailureSettings,
    /// Signature policies.
    pub signatures: Arc<crate::signature::Policies>,
    /// The registry endpoint.
    pub registry: crate::config::RegistrySettings,
}

/// The service; cheap to clone.
#[derive(Debug, Clone)]
pub struct Service {
    /// Shared state.
    inner: Arc<Inner>,
}

/// What every clone of a [`Service`] shares.
#[derive(Debug)]
struct Inner {
    /// Blobs, index, lifecycle.
    cache: Cache,
    /// Registries, http servers and files.
    upstream: Arc<dyn Upstream>,
    /// Callers' credentials, access proofs and module tokens.
    tenancy: Tenancy,
    /// Upstream operations in progress (fetches and access checks), by kind, location and
    /// caller.
    flights: Flights<String, Result<Outcome>>,
    /// Anonymous re-checks of modules whose public grant lapsed, by source and digest.
    public_checks: Flights<String, Result<()>>,
    /// Signature checks in progress, by repository, manifest and caller (a hit whose check
    /// lapsed is checked once for all concurrent requests).
    signature_checks: Flights<String, Result<Option<crate::cache::index::SignatureCheck>>>,
    /// Prometheus metrics, also read by `stats`.
    metrics: Arc<Metrics>,
    /// Bounds on request fields.
    limits: Limits,
    /// Failed fetches answered from memory for a while (and retried in the background).
    failures: Failures,
    /// Serve the cached module when re-resolving it fails upstream.
    stale_if_error: bool,
    /// What `/readyz` says (false while `[prefetch] ready_after` warming runs).
    ready: std::sync::atomic::AtomicBool,
    /// Signature policies.
    signatures: Arc<crate::signature::Policies>,
    /// The registry endpoint's settings.
    registry: crate::config::RegistrySettings,
}

impl Service {
    /// A service over an opened cache and an upstream.
    pub fn new(
        cache: Cache,
        upstream: Arc<dyn Upstream>,
        key: NodeKey,
        auth: &AuthSettings,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let Settings {
            limits,
            failures: on_failure,
            signatures,
            registry,
        } = settings;
        Service {
            inner: Arc::new(Inner {
                registry,
                signatures,
                failures: Failures::new(on_failure.negative_ttl),
                stale_if_error: on_failure.stale_if_error,
                ready: std::sync::atomic::AtomicBool::new(true),
                cache,
                upstream,
                tenancy: Tenancy::new(key, auth, limits.pull_secret_entries),
                flights: Flights::new(),
                public_checks: Flights::new(),
                signature_checks: Flights::new(),
                metrics,
                limits,
            }),
        }
    }

    /// Whether `/readyz` answers ready.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets what `/readyz` answers.
    pub fn set_ready(&self, ready: bool) {
        self.inner
            .ready
            .store(ready, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bounds on request fields.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The cache.
    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// Answers a fetch request: from the cache when the policy and the caller's access
    /// allow, else upstream.
    pub async fn fetch(&self, req: FetchRequest) -> Result<Outcome> {
        let started = Instant::now();
        let result = self.fetch_inner(req).await;
        let label = match &result {
            Ok(o) => {
                self.cache().touch(&o.record.module);
                o.cache.as_str()
            }
            Err(_) => "error",
        };
        let m = &self.inner.metrics;
        m.lookups.with_label_values(&["api", label]).inc();
        m.request_seconds
            .with_label_values(&["api"])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// The path a caller with `grant` fetches `module` from (with a token when private).
    pub fn module_url(&self, module: &Digest, grant: &Grant) -> String {
        self.inner
            .tenancy
            .module_url(self.cache().index(), module, grant)
    }

    /// Opens `module` for a `GET /v1/modules/...` holding `cred` and `token` (needed for a
    /// private module), and counts it as served.
    pub async fn open_module(
        &self,
        module: &Digest,
        cred: Option<&str>,
        token: Option<&str>,
    ) -> Result<Resident> {
        let check =
            self.inner
                .tenancy
                .check_module_access(self.cache().index(), module, cred, token)?;
        if let GetAccess::RecheckAnonymous { source, digest } = check {
            self.recheck_public(module, &source, digest).await?;
        }
        self.check_signature_current(module)?;
        let m = self.cache().open_module(module).await?;
        self.cache().touch(module);
        Ok(m)
    }

    /// Asks the registry whether `source` still serves `digest` anonymously (a public grant
    /// that lapsed): renewed when it does; revoked, and `access_denied`, when it refuses.
    /// Concurrent GETs of the module share one check.
    async fn recheck_public(&self, module: &Digest, source: &str, digest: Digest) -> Result<()> {
        let Source::Oci(mut r) = Source::parse(source)? else {
            return Err(Error::internal("re-checking access", "not an OCI source"));
        };
        r.digest = Some(digest);
        let key = format!("public|{source}|{digest}");
        let this = self.clone();
        let module = *module;
        let src = source.to_string();
        let work = async move {
            let index = this.cache().index();
            match this.inner.upstream.verify(&r, &digest, &[]).await {
                Ok(_) => {
                    index.grant(&src, &Grant::Public).await?;
                    Ok(())
                }
                Err(e) if e.code == Code::AccessDenied => {
                    index.revoke(&src, &[], true).await?;
                    tracing::info!(source = %src, "registry no longer serves the source anonymously");
                    Err(Error::new(
                        Code::AccessDenied,
                        format!(
                            "module {module} is private now: use the moduleUrl answered by POST /v1/fetch"
                        ),
                    ))
                }
                Err(e) => Err(e),
            }
        };
        let joined = self.inner.public_checks.join(key, work);
        joined
            .flight
            .await
            .unwrap_or_else(|e| Err(Error::internal("re-checking access", e)))
    }

    /// Counts module bytes sent to a caller.
    pub fn count_served(&self, bytes: u64) {
        self.inner.metrics.served_bytes.inc_by(bytes);
    }

    /// Every cached module.
    pub fn list(&self) -> Vec<ModuleInfo> {
        self.cache().list()
    }

    /// Removes what `selector` picks (see [`Cache::purge`]).
    pub async fn purge(&self, selector: &Selector, dry_run: bool) -> Result<PurgeReport> {
        self.cache().purge(selector, dry_run).await
    }

    /// Counters and sizes.
    pub fn stats_report(&self) -> StatsReport {
        let (entries, bytes) = self.cache().index().totals();
        let m = &self.inner.metrics;
        StatsReport {
            entries,
            bytes,
            max_bytes: self.cache().settings().max_size,
            hits: m.lookups_of("hit"),
            misses: m.lookups_of("miss"),
            revalidated: m.lookups_of("revalidated"),
            errors: m.lookups_of("error"),
            evictions: m.evictions.get(),
            purged: m.purged.get(),
            corrupt: m.corrupt.get(),
        }
    }

    /// The Prometheus text exposition, with cache gauges brought up to date.
    pub fn metrics_text(&self) -> String {
        let (entries, bytes) = self.cache().index().totals();
        let m = &self.inner.metrics;
        m.entries.set(entries as i64);
        m.bytes.set(bytes as i64);
        m.render()
    }

    /// One expiry sweep (see [`Cache::sweep`]).
    pub async fn sweep(&self) -> Result<()> {
        self.cache()
            .sweep(self.inner.tenancy.verified_before())
            .await
    }

    /// Runs [`Service::sweep`] every `purge_interval` until `shutdown` changes.
    pub async fn sweep_every_interval(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let period: Duration = self.cache().settings().purge_interval;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.sweep().await {
                        tracing::warn!(error = %e, "cache sweep failed");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn fetch_inner(&self, req: FetchRequest) -> Result<Outcome> {
        let caller = self.inner.tenancy.caller(&req).await?;
        let policy = req.policy.effective(&req.source);
        let mut plan = plan::plan(self.cache(), &req, policy);
        // A cached blob that no longer matches its digest is dropped and fetched again.
        if let Some(r) = plan.served()
            && !self.cache().ensure_intact(&r.module).await?
        {
            plan = plan::plan(self.cache(), &req, policy);
        }
        let outcome = match plan {
            Plan::Serve(record) => self.authorize(&req, &caller, record).await?,
            Plan::NotPresent => {
                return Err(Error::new(
                    Code::NotPresent,
                    format!(
                        "{} is not in the cache and the pull policy is Never",
                        req.source
                    ),
                ));
            }
            Plan::Fetch => self.upstream_or_remembered(&req, caller.clone()).await?,
            Plan::Revalidate(record) => {
                match self.upstream_or_remembered(&req, caller.clone()).await {
                    Ok(outcome) => outcome,
                    Err(e) => self.stale(&caller, record, e)?,
                }
            }
        };
        let outcome = self.ensure_signed(&req, &caller, outcome).await?;
        // Followers of a flight record their own resource version too.
        if policy == Effective::Always
            && outcome.record.location == req.source.location_key()
            && let Some(v) = &req.resource_version
        {
            let name = req.resource_name.clone().unwrap_or_default();
            if outcome.record.versions.get(&name) != Some(v) {
                let v = v.clone();
                self.cache()
                    .index()
                    .update(&outcome.record.location, move |r| {
                        let mut r = r.cloned()?;
                        remember_version(&mut r, name, v);
                        Some(r)
                    })
                    .await?;
            }
        }
        Ok(outcome)
    }

    /// For a module download: refused when a policy applies to one of the module's sources and
    /// its check is not current under that policy's key set (a fetch checks it again).
    fn check_signature_current(&self, module: &Digest) -> Result<()> {
        let policies = &self.inner.signatures;
        if policies.is_empty() {
            return Ok(());
        }
        for rec in self.cache().index().records_of_module(module) {
            let Some((registry, repository)) = rec
                .source
                .strip_prefix("oci://")
                .and_then(|s| s.split_once('/'))
            else {
                continue;
            };
            let Some(policy) = policies.for_repository(registry, repository) else {
                continue;
            };
            if !check_is_current(policy, &rec) {
                return Err(Error::new(
                    Code::SignatureInvalid,
                    format!(
                        "module {module} was not verified under the current keys of policy {:?}; fetch it again to verify it",
                        policy.pattern
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The signature policy that applies to `r`'s repository, if any.
    fn repo_policy(&self, r: &OciRef) -> Option<&crate::signature::Policy> {
        self.inner
            .signatures
            .for_repository(&r.registry, &r.repository)
    }

    /// The policy that applies to `req`'s repository, when one checks anything.
    fn policy_for<'a>(
        &'a self,
        req: &'a FetchRequest,
    ) -> Option<(&'a OciRef, &'a crate::signature::Policy)> {
        let Source::Oci(r) = &req.source else {
            return None;
        };
        let p = self.repo_policy(r)?;
        Some((r, p))
    }

    /// `outcome` once its record's signature check is current under the policy that applies
    /// (checked again, and recorded, when the key set changed since).
    async fn ensure_signed(
        &self,
        req: &FetchRequest,
        caller: &Caller,
        outcome: Outcome,
    ) -> Result<Outcome> {
        let Some((_, policy)) = self.policy_for(req) else {
            return Ok(outcome);
        };
        if check_is_current(policy, &outcome.record) {
            return Ok(outcome);
        }
        let checked = self.signed(req, caller, outcome.record.clone()).await?;
        let signature = checked.signature.clone();
        let record = self
            .cache()
            .index()
            .update(&outcome.record.location, move |r| {
                let mut r = r.cloned()?;
                r.signature = signature;
                Some(r)
            })
            .await?
            .unwrap_or(checked);
        Ok(Outcome { record, ..outcome })
    }

    /// Checks `rec`'s signature under the policy that applies to `req` (if any) and notes
    /// the result on it; `signature_invalid` when the policy enforces and no key verifies.
    async fn signed(&self, req: &FetchRequest, caller: &Caller, mut rec: Record) -> Result<Record> {
        let Source::Oci(r) = &req.source else {
            return Ok(rec);
        };
        if let Some(check) = self.signature_check(r, rec.top_digest(), caller).await? {
            rec.signature = Some(check);
        }
        Ok(rec)
    }

    /// Checks the signature of manifest `digest` of `r`'s repository under the policy that
    /// applies (`None`: none does): the check to record, or `signature_invalid` when the
    /// policy enforces and no key verifies. Concurrent identical checks run once, and a
    /// failed one is answered from memory for `[fetch] negative_ttl`: a module whose check
    /// fails costs the registry one signature lookup per TTL, however many hits ask.
    async fn signature_check(
        &self,
        r: &OciRef,
        digest: Digest,
        caller: &Caller,
    ) -> Result<Option<crate::cache::index::SignatureCheck>> {
        let Some(policy) = self.repo_policy(r) else {
            return Ok(None);
        };
        let key = format!(
            "signature|{}|{digest}|{}|{}",
            Source::Oci(r.clone()).source_key(),
            policy.keyset,
            caller.flight_key()
        );
        let this = self.clone();
        let (r2, caller2) = (r.clone(), caller.clone());
        let work = async move { this.signature_check_now(&r2, digest, &caller2).await };
        let shared = async {
            self.inner
                .signature_checks
                .join(key.clone(), work)
                .flight
                .await
                .unwrap_or_else(|e| Err(Error::internal("checking a signature", e)))
        };
        self.unless_failed_lately(&key, shared).await
    }

    /// `work`'s result, unless the operation `key` failed within `[fetch] negative_ttl`:
    /// then that failure, from memory. A failure is remembered; a success forgets it.
    async fn unless_failed_lately<T>(
        &self,
        key: &str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let failures = &self.inner.failures;
        if let Lookup::Failed(e) = failures.lookup(key, None) {
            self.inner.metrics.negative_hits.inc();
            return Err(e);
        }
        let result = work.await;
        match &result {
            Ok(_) => failures.succeeded(key),
            Err(e) => failures.failed(key, None, e),
        }
        result
    }

    /// [`Service::signature_check`] itself: fetches the signatures and verifies them.
    async fn signature_check_now(
        &self,
        r: &OciRef,
        digest: Digest,
        caller: &Caller,
    ) -> Result<Option<crate::cache::index::SignatureCheck>> {
        use crate::signature::Mode;
        let Some(policy) = self.repo_policy(r) else {
            return Ok(None);
        };
        let found = self
            .inner
            .upstream
            .signatures(r, &digest, &caller.credentials())
            .await;
        let verdict = match found {
            // Parsing and up to MAX_SIGNATURES verifications per key: off the async workers.
            Ok(sigs) => {
                let policies = Arc::clone(&self.inner.signatures);
                let (registry, repository) = (r.registry.clone(), r.repository.clone());
                tokio::task::spawn_blocking(move || {
                    policies
                        .for_repository(&registry, &repository)
                        .map_or(Err("no policy".to_string()), |p| {
                            p.verify(&sigs, &digest, &registry, &repository)
                        })
                })
                .await
                .map_err(|e| Error::internal("verifying signatures", e))?
            }
            Err(e) if policy.mode == Mode::Enforce => return Err(e),
            Err(e) => Err(format!("fetching signatures: {}", e.message)),
        };
        let m = &self.inner.metrics.signatures;
        match verdict {
            Ok(key) => {
                m.with_label_values(&["verified"]).inc();
                tracing::info!(source = %r, digest = %digest, key = %key, "signature verified");
                Ok(Some(crate::cache::index::SignatureCheck {
                    keyset: policy.keyset.clone(),
                    key: Some(key),
                }))
            }
            Err(why) if policy.mode == Mode::Warn => {
                m.with_label_values(&["warned"]).inc();
                tracing::warn!(source = %r, digest = %digest, policy = %policy.pattern, reason = %why, "signature not verified (policy mode warn: served)");
                Ok(Some(crate::cache::index::SignatureCheck {
                    keyset: policy.keyset.clone(),
                    key: None,
                }))
            }
            Err(why) => {
                m.with_label_values(&["refused"]).inc();
                Err(Error::new(
                    Code::SignatureInvalid,
                    format!(
                        "{r}: no valid signature for {digest} by the keys of policy {:?} [{}] \
                         (signatures at {}/{}:sha256-{}.sig and in the manifest's referrers): {why}",
                        policy.pattern,
                        policy.key_ids(),
                        r.registry,
                        r.repository,
                        digest.hex()
                    ),
                ))
            }
        }
    }

    /// Lets `caller` have a cached `record`: at once when the index proves access;
    /// otherwise after the registry confirms it.
    async fn authorize(
        &self,
        req: &FetchRequest,
        caller: &Caller,
        record: Record,
    ) -> Result<Outcome> {
        let tenancy = &self.inner.tenancy;
        if let Some(grant) = tenancy.proven_grant(self.cache().index(), caller, &record) {
            return Ok(Outcome {
                record,
                cache: CacheStatus::Hit,
                grant,
            });
        }
        let Source::Oci(r) = &req.source else {
            // proven_grant grants every non-OCI record; a request and its record share a scheme.
            return Err(Error::internal(
                "authorizing",
                "an OCI record for a non-OCI url",
            ));
        };
        let key = format!(
            "verify|{}|{}|{}",
            record.source,
            record.top_digest(),
            caller.flight_key()
        );
        let this = self.clone();
        let r = r.clone();
        let caller = caller.clone();
        self.join(key, async move { this.verify(&r, caller, record).await })
            .await
    }

    /// Asks the registry whether `caller` may read `record`'s manifest.
    async fn verify(&self, r: &OciRef, caller: Caller, record: Record) -> Result<Outcome> {
        let digest = record.image_digest.unwrap_or(record.top_digest());
        let index = self.cache().index();
        let tenancy = &self.inner.tenancy;
        match self
            .inner
            .upstream
            .verify(r, &digest, &caller.credentials())
            .await
        {
            Ok(accepted) => {
                let grant = tenancy.grant_for(r, accepted.as_ref());
                index.grant(&record.source, &grant).await?;
                tracing::info!(source = %r, digest = %record.module, "registry confirmed access to a cached module");
                Ok(Outcome {
                    record,
                    cache: CacheStatus::Revalidated,
                    grant,
                })
            }
            Err(e) if e.code == Code::AccessDenied => {
                let anonymous = caller.ids().is_empty();
                index
                    .revoke(&record.source, &caller.ids(), anonymous)
                    .await?;
                Err(tenancy.explain_denied(r, &caller, e))
            }
            Err(e) => Err(e),
        }
    }

    /// When re-resolving `record`'s location failed with `e`: the cached module as `stale`
    /// if that is allowed and `caller` is entitled to it without asking the registry (an
    /// access check never falls back); else `e`.
    fn stale(&self, caller: &Caller, record: Record, e: Error) -> Result<Outcome> {
        if !self.inner.stale_if_error || !matches!(e.code, Code::UpstreamError | Code::Timeout) {
            return Err(e);
        }
        let tenancy = &self.inner.tenancy;
        let Some(grant) = tenancy.proven_grant(self.cache().index(), caller, &record) else {
            return Err(e);
        };
        self.inner.metrics.stale_served.inc();
        tracing::warn!(
            source = %record.source,
            digest = %record.module,
            error = %e.message,
            "re-resolving failed upstream; serving the cached module (stale_if_error)"
        );
        Ok(Outcome {
            record,
            cache: CacheStatus::Stale,
            grant,
        })
    }

    /// The key of the upstream flight for `req` by `caller`.
    fn fetch_key(req: &FetchRequest, caller: &Caller) -> String {
        format!(
            "fetch|{}|{}|{}",
            req.source.location_key(),
            req.sha256.map(|d| d.to_string()).unwrap_or_default(),
            caller.flight_key()
        )
    }

    /// Goes upstream, unless the same fetch failed moments ago: then its error, from memory
    /// (starting a background retry when one is due).
    async fn upstream_or_remembered(&self, req: &FetchRequest, caller: Caller) -> Result<Outcome> {
        let key = Self::fetch_key(req, &caller);
        let version = req.resource_version.as_deref();
        let failures = &self.inner.failures;
        match failures.lookup(&key, version) {
            Lookup::Miss => {}
            Lookup::Failed(e) => {
                self.inner.metrics.negative_hits.inc();
                return Err(e);
            }
            Lookup::FailedRetryNow(e) => {
                self.inner.metrics.negative_hits.inc();
                let this = self.clone();
                let (req, key) = (req.clone(), key.clone());
                tokio::spawn(async move {
                    let version = req.resource_version.clone();
                    let result = this.upstream(req, caller).await;
                    let label = match &result {
                        Ok(_) => {
                            this.inner.failures.succeeded(&key);
                            "success"
                        }
                        Err(e) => {
                            this.inner
                                .failures
                                .retry_failed(&key, version.as_deref(), e);
                            e.code.as_str()
                        }
                    };
                    this.inner
                        .metrics
                        .background_retries
                        .with_label_values(&[label])
                        .inc();
                });
                return Err(e);
            }
        }
        let result = self.upstream(req.clone(), caller).await;
        match &result {
            Ok(_) => failures.succeeded(&key),
            Err(e) => failures.failed(&key, version, e),
        }
        result
    }

    /// Goes upstream once for all concurrent identical requests of the same caller.
    async fn upstream(&self, req: FetchRequest, caller: Caller) -> Result<Outcome> {
        let key = Self::fetch_key(&req, &caller);
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
        let joined = self.inner.flights.join(key, work);
        let lost = |e: crate::singleflight::FlightError| Error::internal("upstream work", e);
        if joined.leader {
            return joined.flight.await.unwrap_or_else(|e| Err(lost(e)));
        }
        struct Waiting<'a>(&'a Metrics);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.waiters.dec();
            }
        }
        self.inner.metrics.waiters.inc();
        let _waiting = Waiting(&self.inner.metrics);
        joined.flight.await.unwrap_or_else(|e| Err(lost(e)))
    }

    /// The work of a fetch flight's leader.
    async fn lead(&self, req: FetchRequest, caller: Caller) -> Result<Outcome> {
        let policy = req.policy.effective(&req.source);
        let tenancy = &self.inner.tenancy;
        let upstream = &self.inner.upstream;
        // A flight that just finished may have filled the cache after this request looked.
        let previous = match plan::plan(self.cache(), &req, policy) {
            Plan::Serve(record) => return self.authorize(&req, &caller, record).await,
            Plan::NotPresent => {
                return Err(Error::new(
                    Code::NotPresent,
                    format!("{} is not in the cache", req.source),
                ));
            }
            Plan::Revalidate(prev) => Some(prev),
            Plan::Fetch => None,
        };
        let started = Instant::now();
        let fetched = match (&previous, &req.source) {
            // An OCI tag: one manifest HEAD; blobs only when the digest moved.
            (Some(prev), Source::Oci(r)) => {
                let resolved = upstream
                    .resolve(r, &caller.credentials())
                    .await
                    .map_err(|e| tenancy.explain_denied(r, &caller, e))?;
                let grant = tenancy.grant_for(r, resolved.credential.as_ref());
                self.cache().index().grant(&prev.source, &grant).await?;
                if resolved.value == prev.top_digest() {
                    return self.unchanged(prev, &req, grant).await;
                }
                // Fetch exactly what the tag points at now.
                let mut pinned = r.clone();
                pinned.digest = Some(resolved.value);
                let source = Source::Oci(pinned);
                upstream
                    .fetch(&source, self.cache(), &caller.credentials())
                    .await
            }
            // An http(s) module with a validator: a conditional GET; 304 means unchanged.
            (Some(prev), Source::Http(url)) if prev.etag.is_some() => {
                let etag = prev.etag.as_deref().unwrap_or_default();
                match upstream.fetch_if_changed(url, etag).await {
                    Ok(None) => return self.unchanged(prev, &req, Grant::Public).await,
                    Ok(Some(f)) => Ok(f),
                    Err(e) => Err(e),
                }
            }
            _ => {
                upstream
                    .fetch(&req.source, self.cache(), &caller.credentials())
                    .await
            }
        };
        if let Ok(f) = &fetched {
            self.note_mirror(&req.source, f.served_by.as_deref());
        }
        let checked = match (fetched, &req.source) {
            (Ok(f), Source::Oci(r)) => {
                let grant = tenancy.grant_for(r, f.credential.as_ref());
                check(&req, f).map(|(rec, file)| (rec, file, grant))
            }
            (Ok(f), _) => check(&req, f).map(|(rec, file)| (rec, file, Grant::Public)),
            (Err(e), Source::Oci(r)) => Err(tenancy.explain_denied(r, &caller, e)),
            (Err(e), _) => Err(e),
        };
        self.observe_fetch(&req.source, started, &checked);
        let (rec, file, grant) = checked?;
        // Before any byte is cached: a refused module's temp file goes with this error.
        let rec = self.signed(&req, &caller, rec).await?;
        if rec.is_oci() {
            self.cache().index().grant(&rec.source, &grant).await?;
        }
        let req2 = req.clone();
        let stored = self
            .cache()
            .install(file, rec, move |old, mut new| {
                // Keep what other requests noted on the location.
                if let Some(old) = old {
                    new.versions = old.versions.clone();
                }
                note_version(&mut new, &req2);
                new
            })
            .await?;
        let cache = match &previous {
            Some(p) if p.module == stored.module => CacheStatus::Revalidated,
            _ => CacheStatus::Miss,
        };
        Ok(Outcome {
            record: stored,
            cache,
            grant,
        })
    }

    /// Upstream says `prev` is still current: record the check and serve it.
    async fn unchanged(&self, prev: &Record, req: &FetchRequest, grant: Grant) -> Result<Outcome> {
        let fallback = prev.clone();
        let req2 = req.clone();
        let rec = self
            .cache()
            .index()
            .update(&prev.location, move |now| {
                let mut r = now.cloned().unwrap_or(fallback);
                r.resolved_at = now_millis();
                note_version(&mut r, &req2);
                Some(r)
            })
            .await?
            .unwrap_or_else(|| prev.clone());
        tracing::info!(source = %req.source, digest = %rec.module, "revalidated: unchanged upstream");
        Ok(Outcome {
            record: rec,
            cache: CacheStatus::Revalidated,
            grant,
        })
    }

    /// Counts and logs what a registry mirror served for `what` (nothing when `mirror` is
    /// `None`: the registry itself served).
    fn note_mirror(&self, what: &dyn std::fmt::Display, mirror: Option<&str>) {
        if let Some(mirror) = mirror {
            self.inner
                .metrics
                .mirror_served
                .with_label_values(&[mirror])
                .inc();
            tracing::info!(source = %what, mirror = %mirror, "served by a registry mirror");
        }
    }

    /// One log line and the metrics of an upstream fetch.
    fn observe_fetch<T>(
        &self,
        source: &Source,
        started: Instant,
        result: &Result<(Record, T, Grant)>,
    ) {
        let scheme = source.scheme();
        let secs = started.elapsed().as_secs_f64();
        let ms = started.elapsed().as_millis() as u64;
        let m = &self.inner.metrics;
        m.upstream_seconds
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
        m.upstream.with_label_values(&[scheme, label]).inc();
    }
}

/// True when `rec` was checked under `policy`'s current key set, and verified (or, under
/// `warn`, at least checked).
fn check_is_current(policy: &crate::signature::Policy, rec: &Record) -> bool {
    rec.signature.as_ref().is_some_and(|c| {
        c.keyset == policy.keyset
            && (c.key.is_some() || policy.mode == crate::signature::Mode::Warn)
    })
}

/// Checks the expected digests; the record to install and the module file.
fn check(req: &FetchRequest, f: Fetched) -> Result<(Record, tempfile::NamedTempFile)> {
    let now = now_millis();
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
        signature: None,
        raw: None,
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

/// Most plugin resources whose version one record remembers. Past it, the entry of the
/// first name in order is forgotten (that resource's next request asks upstream once more),
/// so what a record keeps is bounded however many names clients send.
const MAX_VERSIONS_PER_RECORD: usize = 64;

fn note_version(rec: &mut Record, req: &FetchRequest) {
    if let Some(v) = &req.resource_version {
        remember_version(
            rec,
            req.resource_name.clone().unwrap_or_default(),
            v.clone(),
        );
    }
}

fn remember_version(rec: &mut Record, name: String, version: String) {
    if !rec.versions.contains_key(&name) && rec.versions.len() >= MAX_VERSIONS_PER_RECORD {
        rec.versions.pop_first();
    }
    rec.versions.insert(name, version);
}
