//! The registry endpoint's side of the service: manifests, tags and blobs served from the
//! cache exactly as the upstream served them, pulled through on a miss (one upstream request
//! for every concurrent identical one), with the same tenancy rules as modules: a private
//! object is served only to a caller whose credential the registry accepted for the
//! repository within `[auth] verify`.

use std::time::Duration;

use crate::api::CacheStatus;
use crate::auth::Credential;
use crate::cache::Resident;
use crate::cache::index::{RawObject, Record, now_millis};
use crate::config::RegistrySettings;
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::fetch::oci::raw::describe;
use crate::source::{OciRef, Source};

use super::access::Caller;
use super::{Outcome, Service};

/// What a client asks the endpoint for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// A manifest or index by tag.
    Tag(String),
    /// A manifest or index by digest.
    Manifest(Digest),
    /// A config or layer blob.
    Blob(Digest),
}

impl Object {
    /// The distribution API path of the object under its repository.
    fn path(&self) -> String {
        match self {
            Object::Tag(t) => format!("manifests/{t}"),
            Object::Manifest(d) => format!("manifests/{d}"),
            Object::Blob(d) => format!("blobs/{d}"),
        }
    }
}

/// An object ready to be served.
#[derive(Debug)]
pub struct Served {
    /// Its digest (`Docker-Content-Digest`).
    pub digest: Digest,
    /// The `Content-Type` the upstream served it with.
    pub media_type: String,
    /// Its bytes.
    pub content: Resident,
    /// Whether it came from the cache.
    pub cache: CacheStatus,
}

/// Index depth the endpoint follows to decide whether an index leads to a Wasm module.
const MAX_DEPTH: usize = 3;

/// The record location of `object` in the repository `source` (`oci://host/repo`).
fn location(source: &str, object: &Object) -> String {
    format!("{source}#{}", object.path())
}

/// `DENIED`: outside what the endpoint serves.
fn out_of_scope(what: &str) -> Error {
    Error::new(
        Code::Forbidden,
        format!(
            "{what} is not a Wasm module (a Wasm artifact, a compat image, or an index leading \
             to one); this endpoint serves only those unless [registry] any_artifact = true"
        ),
    )
}

/// `signature_invalid` for a blob no manifest verified under `policy` references.
fn unverified_blob(source: &str, digest: &Digest, policy: &crate::signature::Policy) -> Error {
    Error::new(
        Code::SignatureInvalid,
        format!(
            "{source}: blob {digest} is not referenced by a manifest verified under the current \
             keys of policy {:?}; pull the manifest first",
            policy.pattern
        ),
    )
}

impl Service {
    /// The registry endpoint's settings.
    pub fn registry_settings(&self) -> &RegistrySettings {
        &self.inner.registry
    }

    /// Serves `object` of `r`'s repository to a client holding `cred` (HTTP Basic; `None`:
    /// the node's credentials apply).
    pub async fn registry_get(
        &self,
        r: &OciRef,
        object: &Object,
        cred: Option<Credential>,
    ) -> Result<Served> {
        let started = std::time::Instant::now();
        let caller = self.inner.tenancy.caller_with(r, cred).await;
        let result = self.registry_object(r, object, &caller, 0).await;
        let result = match result {
            Ok(o) => self
                .cache()
                .open_module(&o.record.module)
                .await
                .map(|content| {
                    self.cache().touch(&o.record.module);
                    Served {
                        digest: o.record.module,
                        media_type: o.record.raw.map_or_else(
                            || "application/octet-stream".to_string(),
                            |raw| raw.media_type,
                        ),
                        content,
                        cache: o.cache,
                    }
                }),
            Err(e) => Err(e),
        };
        let label = match &result {
            Ok(s) => s.cache.as_str(),
            Err(_) => "error",
        };
        let m = &self.inner.metrics;
        m.lookups.with_label_values(&["registry", label]).inc();
        m.request_seconds
            .with_label_values(&["registry"])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::info!(registry = %r.registry, repository = %r.repository, object = %object.path(), code = e.code.as_str(), error = %e.message, "registry endpoint request failed");
        }
        result
    }

    /// The record of `object`, from the cache when it is current and the caller may read
    /// it, else pulled through.
    /// (Boxed: following an index recurses.)
    fn registry_object<'a>(
        &'a self,
        r: &'a OciRef,
        object: &'a Object,
        caller: &'a Caller,
        depth: usize,
    ) -> futures_util::future::BoxFuture<'a, Result<Outcome>> {
        Box::pin(self.registry_object_inner(r, object, caller, depth))
    }

    async fn registry_object_inner(
        &self,
        r: &OciRef,
        object: &Object,
        caller: &Caller,
        depth: usize,
    ) -> Result<Outcome> {
        let source = Source::Oci(r.clone()).source_key();
        let loc = location(&source, object);
        let ttl: Duration = self.inner.registry.tag_ttl;
        if let Some(rec) = self.cache().record(&loc) {
            let current = match object {
                Object::Tag(_) => {
                    now_millis().saturating_sub(rec.resolved_at) < ttl.as_millis() as u64
                }
                _ => true,
            };
            if current {
                self.in_scope(&rec, &loc)?;
                let outcome = self.raw_authorize(r, object, caller, rec).await?;
                return self.ensure_raw_signed(r, caller, outcome).await;
            }
        }
        let key = format!("raw|{loc}|{}", caller.flight_key());
        let this = self.clone();
        let (r2, object2, caller2) = (r.clone(), object.clone(), caller.clone());
        let work = async move {
            match &object2 {
                Object::Blob(d) => this.pull_blob(&r2, d, &caller2).await,
                _ => this.pull_manifest(&r2, &object2, &caller2, depth).await,
            }
        };
        // A pull that failed moments ago fails again from memory (a client retrying a
        // missing tag in a loop costs the upstream one request per `negative_ttl`).
        let outcome = self
            .unless_failed_lately(&key, self.join(key.clone(), work))
            .await?;
        self.ensure_raw_signed(r, caller, outcome).await
    }

    /// `outcome` once its record's signature check is current under the policy that applies
    /// to the repository (if any): its own check, or one it inherits from a manifest that
    /// references it and is verified (an index's manifests, a manifest's blobs). A manifest
    /// checked under another key set is checked again; a blob no verified manifest
    /// references is `signature_invalid`.
    async fn ensure_raw_signed(
        &self,
        r: &OciRef,
        caller: &Caller,
        outcome: Outcome,
    ) -> Result<Outcome> {
        let rec = &outcome.record;
        let Some(policy) = self.repo_policy(r) else {
            return Ok(outcome);
        };
        if super::check_is_current(policy, rec) {
            return Ok(outcome);
        }
        let manifest = rec.raw.as_ref().is_some_and(|o| o.manifest);
        // A tag's check is its manifest's: kept on the manifest's own record, where the
        // manifest's blobs (and an index's manifests) look for it.
        let own = manifest
            .then(|| location(&rec.source, &Object::Manifest(rec.module)))
            .filter(|l| *l != rec.location);
        let current_own = own
            .as_deref()
            .and_then(|l| self.cache().record(l))
            .filter(|m| super::check_is_current(policy, m))
            .and_then(|m| m.signature);
        let check =
            match current_own.or_else(|| self.inherited_check(policy, &rec.source, &rec.module)) {
                Some(c) => c,
                None if manifest => self
                    .signature_check(r, rec.module, caller)
                    .await?
                    .ok_or_else(|| Error::internal("checking a signature", "no policy"))?,
                None => return Err(unverified_blob(&rec.source, &rec.module, policy)),
            };
        let index = self.cache().index();
        for l in own.iter() {
            let check = check.clone();
            index
                .update(l, move |now| {
                    let mut m = now.cloned()?;
                    m.signature = Some(check);
                    Some(m)
                })
                .await?;
        }
        let location = rec.location.clone();
        let fallback = rec.clone();
        let record = index
            .update(&location, move |now| {
                let mut r = now.cloned().unwrap_or(fallback);
                r.signature = Some(check);
                Some(r)
            })
            .await?
            .ok_or_else(|| Error::internal("recording a signature check", "vanished"))?;
        Ok(Outcome { record, ..outcome })
    }

    /// The check object `digest` of `source` inherits from a manifest of the repository
    /// that references it and is current under `policy`.
    fn inherited_check(
        &self,
        policy: &crate::signature::Policy,
        source: &str,
        digest: &Digest,
    ) -> Option<crate::cache::index::SignatureCheck> {
        self.cache()
            .index()
            .raw_referrers(source, digest)
            .into_iter()
            .find(|p| super::check_is_current(policy, p))
            .and_then(|p| p.signature)
    }

    /// `DENIED` for a record outside the endpoint's scope.
    fn in_scope(&self, rec: &Record, what: &str) -> Result<()> {
        let wasm = rec.raw.as_ref().is_some_and(|o| o.wasm);
        if wasm || self.inner.registry.any_artifact {
            Ok(())
        } else {
            Err(out_of_scope(what))
        }
    }

    /// Lets `caller` have a cached `rec`: at once when the index proves access, else after
    /// the registry confirms it (a `HEAD` of the object with the caller's credentials).
    async fn raw_authorize(
        &self,
        r: &OciRef,
        object: &Object,
        caller: &Caller,
        rec: Record,
    ) -> Result<Outcome> {
        let tenancy = &self.inner.tenancy;
        if let Some(grant) = tenancy.proven_grant(self.cache().index(), caller, &rec) {
            return Ok(Outcome {
                record: rec,
                cache: CacheStatus::Hit,
                grant,
            });
        }
        // A tag's access is the access to the manifest it points at.
        let path = match object {
            Object::Tag(_) => format!("manifests/{}", rec.module),
            o => o.path(),
        };
        let key = format!("raw-verify|{}|{path}|{}", rec.source, caller.flight_key());
        let this = self.clone();
        let (r, caller) = (r.clone(), caller.clone());
        self.join(key, async move {
            let index = this.cache().index();
            let tenancy = &this.inner.tenancy;
            match this
                .inner
                .upstream
                .raw_check(&r, &path, &caller.credentials())
                .await
            {
                Ok(accepted) => {
                    let grant = tenancy.grant_for(&r, accepted.as_ref());
                    index.grant(&rec.source, &grant).await?;
                    Ok(Outcome {
                        record: rec,
                        cache: CacheStatus::Revalidated,
                        grant,
                    })
                }
                Err(e) if e.code == Code::AccessDenied => {
                    let anonymous = caller.ids().is_empty();
                    index.revoke(&rec.source, &caller.ids(), anonymous).await?;
                    Err(e)
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Pulls a manifest (by tag: one `HEAD` first when the tag is cached but due) and
    /// records it, with its tag.
    async fn pull_manifest(
        &self,
        r: &OciRef,
        object: &Object,
        caller: &Caller,
        depth: usize,
    ) -> Result<Outcome> {
        let source = Source::Oci(r.clone()).source_key();
        let loc = location(&source, object);
        let tenancy = &self.inner.tenancy;
        let upstream = &self.inner.upstream;
        let creds = caller.credentials();
        let mut reference = match object {
            Object::Tag(t) => t.clone(),
            Object::Manifest(d) => d.to_string(),
            Object::Blob(_) => return Err(Error::internal("pulling", "a blob is no manifest")),
        };
        // A due tag: one HEAD; the manifest itself only when it moved.
        if let (Object::Tag(tag), Some(prev)) = (object, self.cache().record(&loc)) {
            let mut tagged = r.clone();
            tagged.tag = Some(tag.clone());
            tagged.digest = None;
            match upstream.resolve(&tagged, &creds).await {
                Ok(resolved) => {
                    let grant = tenancy.grant_for(r, resolved.credential.as_ref());
                    self.cache().index().grant(&source, &grant).await?;
                    let by_digest = location(&source, &Object::Manifest(resolved.value));
                    // Unchanged, or moved to a manifest already cached by digest: the tag
                    // points at that record; no download.
                    if let Some(target) = self.cache().record(&by_digest) {
                        self.in_scope(&target, &loc)?;
                        let rec = self.point_tag(&loc, target).await?;
                        return Ok(Outcome {
                            record: rec,
                            cache: CacheStatus::Revalidated,
                            grant,
                        });
                    }
                    reference = resolved.value.to_string();
                }
                Err(e)
                    if self.inner.stale_if_error
                        && matches!(e.code, Code::UpstreamError | Code::Timeout) =>
                {
                    let Some(grant) = tenancy.proven_grant(self.cache().index(), caller, &prev)
                    else {
                        return Err(e);
                    };
                    self.in_scope(&prev, &loc)?;
                    self.inner.metrics.stale_served.inc();
                    tracing::warn!(source = %source, tag = %tag, error = %e.message, "re-resolving a tag failed upstream; serving the cached manifest (stale_if_error)");
                    return Ok(Outcome {
                        record: prev,
                        cache: CacheStatus::Stale,
                        grant,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let started = std::time::Instant::now();
        let got = upstream.raw_manifest(r, &reference, &creds).await;
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                self.observe_raw(r, "manifest", started, Err(&e));
                return Err(e);
            }
        };
        let grant = tenancy.grant_for(r, got.credential.as_ref());
        let m = got.value;
        self.note_mirror(r, m.served_by.as_deref());
        let what = format!("{source}@{}", m.digest);
        let described = describe(&m.bytes, &m.media_type)?;
        let mut wasm = described.wasm || described.compat_layer.is_some();
        // Checked before anything is stored, and before an index's manifests are followed
        // (they inherit its check). A manifest out of scope is stored unchecked, so asking
        // again is refused from the cache.
        let signature = if wasm || described.index || self.inner.registry.any_artifact {
            self.new_manifest_signature(r, caller, &source, m.digest)
                .await?
        } else {
            None
        };
        let raw = RawObject {
            media_type: m.media_type.clone(),
            manifest: true,
            refs: described.refs,
            compat_layer: described.compat_layer,
            wasm,
        };
        let mut w = self
            .cache()
            .store()
            .writer(crate::fetch::oci::raw::MAX_MANIFEST_BYTES, &what)?;
        w.write(&m.bytes).await?;
        let (file, digest, size) = w.finish().await?;
        let now = now_millis();
        let by_digest = location(&source, &Object::Manifest(digest));
        let rec = Record {
            location: by_digest.clone(),
            source: source.clone(),
            module: digest,
            size,
            image_digest: None,
            index_digest: None,
            etag: None,
            fetched_at: now,
            resolved_at: now,
            versions: Default::default(),
            signature,
            raw: Some(raw),
        };
        self.cache().index().grant(&source, &grant).await?;
        let mut stored = self.cache().install(file, rec, |_, new| new).await?;
        self.observe_raw(r, "manifest", started, Ok(size));
        if described.index {
            // An index is in scope when the manifest a Wasm client follows from it is.
            if let Some(child) = described.picked
                && depth < MAX_DEPTH
            {
                let child = Object::Manifest(child);
                wasm = match self.registry_object(r, &child, caller, depth + 1).await {
                    Ok(o) => o.record.raw.is_some_and(|o| o.wasm),
                    Err(e) if e.code == Code::Forbidden => false,
                    Err(e) => return Err(e),
                };
            }
            if wasm {
                stored = self
                    .cache()
                    .index()
                    .update(&by_digest, |now| {
                        let mut rec = now.cloned()?;
                        if let Some(o) = rec.raw.as_mut() {
                            o.wasm = true;
                        }
                        Some(rec)
                    })
                    .await?
                    .ok_or_else(|| Error::internal("recording an index", "vanished"))?;
            }
        }
        let stored = match object {
            Object::Tag(_) => self.point_tag(&loc, stored).await?,
            _ => stored,
        };
        if !wasm && !self.inner.registry.any_artifact {
            return Err(out_of_scope(&what));
        }
        Ok(Outcome {
            record: stored,
            cache: CacheStatus::Miss,
            grant,
        })
    }

    /// Points the tag record at `loc` to the manifest record `target`, resolved now. The
    /// tag record carries what serving needs (digest, media type, scope, signature check);
    /// what the manifest references stays on the manifest's own record, so lookups of a
    /// blob's manifests see each manifest once, however many tags name it.
    async fn point_tag(&self, loc: &str, target: Record) -> Result<Record> {
        let mut rec = Record {
            location: loc.to_string(),
            resolved_at: now_millis(),
            ..target
        };
        if let Some(raw) = rec.raw.as_mut() {
            raw.refs = Vec::new();
            raw.compat_layer = None;
        }
        self.cache()
            .index()
            .update(loc, move |_| Some(rec))
            .await?
            .ok_or_else(|| Error::internal("recording a tag", "vanished"))
    }

    /// The signature check of a manifest just pulled, under the policy that applies (if
    /// any): inherited from a verified manifest that references it, else its own.
    async fn new_manifest_signature(
        &self,
        r: &OciRef,
        caller: &Caller,
        source: &str,
        digest: Digest,
    ) -> Result<Option<crate::cache::index::SignatureCheck>> {
        let Some(policy) = self.repo_policy(r) else {
            return Ok(None);
        };
        match self.inherited_check(policy, source, &digest) {
            Some(c) => Ok(Some(c)),
            None => self.signature_check(r, digest, caller).await,
        }
    }

    /// Pulls a blob a cached manifest of the repository references (any blob under
    /// `any_artifact`), checks a compat image's layer, and records it.
    async fn pull_blob(&self, r: &OciRef, digest: &Digest, caller: &Caller) -> Result<Outcome> {
        let source = Source::Oci(r.clone()).source_key();
        let loc = location(&source, &Object::Blob(*digest));
        let referrers = self.cache().index().raw_referrers(&source, digest);
        let wasm = referrers
            .iter()
            .any(|m| m.raw.as_ref().is_some_and(|o| o.wasm));
        if !wasm && !self.inner.registry.any_artifact {
            return Err(if referrers.is_empty() {
                // Unknown here: a client pulls the manifest first (and a pushing client,
                // told so, goes on to the upload, which is refused with 405).
                Error::new(
                    Code::NotFound,
                    format!(
                        "{source}: blob {digest} is not referenced by a manifest this endpoint served; \
                         pull the manifest first"
                    ),
                )
            } else {
                out_of_scope(&format!("{source}: blob {digest}"))
            });
        }
        if let Some(policy) = self.repo_policy(r)
            && self.inherited_check(policy, &source, digest).is_none()
        {
            return Err(unverified_blob(&source, digest, policy));
        }
        let compat = referrers
            .iter()
            .any(|m| m.raw.as_ref().and_then(|o| o.compat_layer) == Some(*digest));
        // The session probes a manifest that exists when several credentials are tried.
        let mut pinned = r.clone();
        pinned.digest = referrers.first().map(|m| m.module);
        let started = std::time::Instant::now();
        let got = match self
            .inner
            .upstream
            .raw_blob(&pinned, digest, &caller.credentials())
            .await
        {
            Ok(g) => g,
            Err(e) => {
                self.observe_raw(r, "blob", started, Err(&e));
                return Err(e);
            }
        };
        let grant = self.inner.tenancy.grant_for(r, got.credential.as_ref());
        let blob = got.value;
        self.note_mirror(r, blob.served_by.as_deref());
        if compat {
            // The compat image's layer must hold a valid plugin.wasm.
            let store = self.cache().store().clone();
            let max = self.inner.registry.max_blob_size;
            let path = blob.file.path().to_path_buf();
            let checked = crate::blocking::run("checking a compat layer", move |cancel| {
                use crate::fetch::unpack;
                match unpack::unwrap(
                    &store,
                    &path,
                    max,
                    unpack::TarEntry::PluginWasm,
                    true,
                    Some(cancel),
                )? {
                    unpack::Unwrapped::Extracted(f, _, _) => {
                        crate::verify::validate_file(f.path(), Some(cancel))
                            .map_err(unpack::UnpackError::from)
                    }
                    unpack::Unwrapped::Plain => Err(unpack::UnpackError::NoPluginWasm),
                }
            })
            .await?;
            if let Err(e) = checked {
                let e = Error::from(e);
                let e = Error::new(
                    Code::Forbidden,
                    format!(
                        "{source}: layer {digest} of a compat image holds no valid plugin.wasm: {}",
                        e.message
                    ),
                );
                self.observe_raw(r, "blob", started, Err(&e));
                return Err(e);
            }
        }
        let now = now_millis();
        let size = blob.size;
        let rec = Record {
            location: loc,
            source: source.clone(),
            module: *digest,
            size,
            image_digest: None,
            index_digest: None,
            etag: None,
            fetched_at: now,
            resolved_at: now,
            versions: Default::default(),
            signature: None,
            raw: Some(RawObject {
                media_type: blob.media_type,
                manifest: false,
                refs: Vec::new(),
                compat_layer: None,
                wasm,
            }),
        };
        self.cache().index().grant(&source, &grant).await?;
        let stored = self.cache().install(blob.file, rec, |_, new| new).await?;
        self.observe_raw(r, "blob", started, Ok(size));
        Ok(Outcome {
            record: stored,
            cache: CacheStatus::Miss,
            grant,
        })
    }

    /// One log line and the upstream metrics of a pull through the endpoint.
    fn observe_raw(
        &self,
        r: &OciRef,
        kind: &str,
        started: std::time::Instant,
        result: std::result::Result<u64, &Error>,
    ) {
        let ms = started.elapsed().as_millis() as u64;
        let m = &self.inner.metrics;
        m.upstream_seconds
            .with_label_values(&["oci"])
            .observe(started.elapsed().as_secs_f64());
        let label = match result {
            Ok(bytes) => {
                tracing::info!(interface = "registry", registry = %r.registry, repository = %r.repository, kind, result = "success", bytes, ms, "upstream fetch");
                "success"
            }
            Err(e) => {
                tracing::warn!(interface = "registry", registry = %r.registry, repository = %r.repository, kind, result = e.code.as_str(), error = %e.message, ms, "upstream fetch");
                e.code.as_str()
            }
        };
        m.upstream.with_label_values(&["oci", label]).inc();
    }
}
