//! OCI registries: the distribution API over the guarded HTTP client.
//!
//! Formats are chosen by media type, never guessed: the Solo Wasm artifact, the CNCF Wasm
//! artifact, the "compat" image (a tar+gzip layer holding `plugin.wasm`), and an image index
//! or Docker manifest list leading to one of them. Manifests and blobs are verified against
//! their digests; blobs stream into temp files.
//!
//! `session`: sessions, tokens and the one challenge-and-retry path; `manifest`: manifests,
//! indexes and the choice among them; `blob`: layer streaming.

mod blob;
pub mod hosts;
mod manifest;
pub mod raw;
mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use reqwest::{Client, Method};

use blob::too_large;
use manifest::{
    ACCEPT_MANIFESTS, Descriptor, MAX_INDEX_DEPTH, TAR_GZIP_LAYERS, WASM_LAYERS, parse_digest,
    pick_from_index,
};
pub use manifest::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use session::Session;

use super::unpack::{TarEntry, UnpackError};
use super::{Fetched, KnownBlobs, unwrap_and_validate};
use crate::auth::Credential;
use crate::cache::store::Store;
use crate::config::{Config, FetchSettings};
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::netguard::NetGuard;
use crate::source::OciRef;

/// What a registry operation resolved to, and which credential the registry accepted
/// (`None`: it answered anonymously).
#[derive(Debug)]
pub struct Authorized<T> {
    /// The result.
    pub value: T,
    /// The credential that was accepted.
    pub credential: Option<Credential>,
}

/// Pulls modules from OCI registries.
#[derive(Debug)]
pub struct OciFetcher {
    /// Client that verifies TLS (extra CA roots applied).
    secure: Client,
    /// Client for registries marked `insecure` (unverified TLS).
    insecure: Client,
    /// Registries allowed over plain HTTP.
    insecure_registries: crate::config::InsecureRegistries,
    /// Remembers which scheme an insecure registry answered on.
    schemes: Mutex<HashMap<String, &'static str>>,
    /// Checks token realms and IP-literal registries.
    guard: Arc<NetGuard>,
    /// Timeouts and retries.
    settings: FetchSettings,
    /// Size cap for blobs and the module.
    max_size: u64,
    /// Where blobs are written.
    store: Store,
    /// Bearer tokens by (registry, repository, credential fingerprint), with their expiry.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Registry mirrors (containerd's hosts.toml and `[registries."host"] mirrors`), tried
    /// before the registry itself for requests without credentials.
    mirrors: hosts::Mirrors,
}

impl OciFetcher {
    /// A fetcher using the two clients.
    pub fn new(
        secure: Client,
        insecure: Client,
        guard: Arc<NetGuard>,
        config: &Config,
        store: Store,
        mirrors: hosts::Mirrors,
    ) -> Self {
        OciFetcher {
            mirrors,
            secure,
            insecure,
            insecure_registries: config.insecure_registries.clone(),
            schemes: Mutex::new(HashMap::new()),
            guard,
            settings: config.fetch.clone(),
            max_size: config.max_module_size,
            store,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The digest the reference points at now: HEAD on the manifest, falling back to GET.
    pub async fn resolve(&self, r: &OciRef, creds: &[Credential]) -> Result<Authorized<Digest>> {
        let usable = |ep: &hosts::Endpoint| ep.resolve || r.digest.is_some();
        let from_mirror = self
            .first_mirror(r, creds, usable, |s| {
                async move { self.resolve_at(s, r).await.map(Some) }.boxed()
            })
            .await;
        if let Some((found, _)) = from_mirror {
            return Ok(found);
        }
        let s = self.authorized_session(r, creds).await?;
        self.resolve_at(s, r).await
    }

    /// Resolves `r` on session `s`.
    async fn resolve_at(&self, mut s: Session<'_>, r: &OciRef) -> Result<Authorized<Digest>> {
        let reference = r.manifest_reference();
        let resp = self
            .request(
                &mut s,
                Method::HEAD,
                &format!("manifests/{reference}"),
                ACCEPT_MANIFESTS,
            )
            .await?;
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok())
        {
            return Ok(Authorized {
                value: d,
                credential: s.cred,
            });
        }
        let (_, digest, _) = self.manifest(&mut s, &reference).await?;
        Ok(Authorized {
            value: digest,
            credential: s.cred,
        })
    }

    /// Pulls the module `r` names. `known` says which blobs this source already served.
    pub async fn fetch(
        &self,
        r: &OciRef,
        source: &str,
        known: &dyn KnownBlobs,
        creds: &[Credential],
    ) -> Result<Fetched> {
        let mirrors: Vec<&hosts::Endpoint> =
            self.mirrors_for(r, creds).filter(|ep| ep.pull).collect();
        if mirrors.is_empty() {
            let s = self.authorized_session(r, creds).await?;
            return self.fetch_at(s, r, source, known).await;
        }
        // A mirror that may not resolve tags serves the tag's digest, resolved first.
        let mut target = r.clone();
        if r.digest.is_none() && mirrors.iter().any(|ep| !ep.resolve) {
            target.digest = Some(self.resolve(r, creds).await?.value);
        }
        let usable = |ep: &hosts::Endpoint| ep.pull && (target.digest.is_some() || ep.resolve);
        let from_mirror = self
            .first_mirror(&target, creds, usable, |s| {
                let target = &target;
                async move { self.fetch_at(s, target, source, known).await.map(Some) }.boxed()
            })
            .await;
        if let Some((f, mirror)) = from_mirror {
            return Ok(Fetched {
                served_by: Some(mirror),
                ..f
            });
        }
        let s = self.authorized_session(r, creds).await?;
        self.fetch_at(s, &target, source, known).await
    }

    /// The mirrors to try for a request with `creds`: none when it has credentials (a
    /// credential is sent only to the registry it was issued for).
    fn mirrors_for<'a>(
        &'a self,
        r: &OciRef,
        creds: &[Credential],
    ) -> impl Iterator<Item = &'a hosts::Endpoint> + 'a {
        let list: &[hosts::Endpoint] = if creds.is_empty() {
            self.mirrors.of(&r.registry)
        } else {
            &[]
        };
        list.iter()
    }

    /// Tries `work` on a session at each mirror of `target`'s registry that `usable` picks
    /// (none for a request with credentials), in order: the first answer `work` gives
    /// (`Some`), with that mirror's name. A mirror that fails is logged and the next one is
    /// tried; `None` leaves the request to the registry itself.
    async fn first_mirror<'a, T>(
        &'a self,
        target: &'a OciRef,
        creds: &[Credential],
        usable: impl Fn(&hosts::Endpoint) -> bool,
        mut work: impl FnMut(Session<'a>) -> BoxFuture<'a, Result<Option<T>>>,
    ) -> Option<(T, String)> {
        for ep in self.mirrors_for(target, creds).filter(|ep| usable(ep)) {
            let attempt = match self.mirror_session(ep, target) {
                Ok(s) => work(s).await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(Some(v)) => return Some((v, ep.name.clone())),
                Ok(None) => {}
                Err(e) => mirror_failed(ep, target, &e),
            }
        }
        None
    }

    /// Fetches `r` on session `s`.
    async fn fetch_at(
        &self,
        mut s: Session<'_>,
        r: &OciRef,
        source: &str,
        known: &dyn KnownBlobs,
    ) -> Result<Fetched> {
        let mut reference = r.manifest_reference();
        let mut index_digest = None;
        for depth in 0..=MAX_INDEX_DEPTH {
            let (doc, digest, media_type) = self.manifest(&mut s, &reference).await?;
            match media_type.as_str() {
                OCI_INDEX | DOCKER_LIST => {
                    if depth == MAX_INDEX_DEPTH {
                        break;
                    }
                    if index_digest.is_none() {
                        index_digest = Some(digest);
                    }
                    let entry = pick_from_index(doc.manifests.as_deref().unwrap_or_default())
                        .ok_or_else(|| {
                            Error::new(
                                Code::InvalidModule,
                                format!(
                                    "{}/{}: the image index lists no Wasm manifest",
                                    s.registry, s.repository
                                ),
                            )
                        })?;
                    reference = parse_digest(&entry.digest, "index entry digest")?.to_string();
                }
                OCI_MANIFEST | DOCKER_MANIFEST => {
                    let layers = doc.layers.unwrap_or_default();
                    let (file, module, size) = self
                        .module_from_layers(&mut s, &layers, source, known)
                        .await?;
                    return Ok(Fetched {
                        file,
                        digest: module,
                        size,
                        image_digest: Some(digest),
                        index_digest,
                        credential: s.cred,
                        etag: None,
                        served_by: None,
                    });
                }
                other => {
                    return Err(Error::new(
                        Code::InvalidModule,
                        format!(
                            "{}/{}: unsupported manifest type {other:?}",
                            s.registry, s.repository
                        ),
                    ));
                }
            }
        }
        Err(Error::new(
            Code::InvalidModule,
            format!(
                "{}/{}: image indexes nested too deeply",
                s.registry, s.repository
            ),
        ))
    }

    async fn module_from_layers(
        &self,
        s: &mut Session<'_>,
        layers: &[Descriptor],
        source: &str,
        known: &dyn KnownBlobs,
    ) -> Result<(tempfile::NamedTempFile, Digest, u64)> {
        let wasm: Vec<&Descriptor> = layers
            .iter()
            .filter(|l| WASM_LAYERS.contains(&l.media_type.as_str()))
            .collect();
        if wasm.len() > 1 {
            return Err(Error::new(
                Code::InvalidModule,
                format!(
                    "{}/{}: the manifest has {} Wasm layers; expected one",
                    s.registry,
                    s.repository,
                    wasm.len()
                ),
            ));
        }
        if let Some(layer) = wasm.first() {
            let digest = parse_digest(&layer.digest, "layer digest")?;
            if layer.size > self.max_size {
                return Err(too_large(layer.size, self.max_size));
            }
            if known.source_has(source, &digest).await
                && let Some(copy) = self.copy_stored(&digest).await?
            {
                // Same source served these exact bytes before: copy, no download.
                return Ok(copy);
            }
            let downloaded = self.blob(s, layer, digest).await?;
            let out = unwrap_and_validate(
                &self.store,
                downloaded,
                self.max_size,
                TarEntry::PluginWasm,
                false,
            );
            return out.await.map_err(Error::from);
        }
        let tars: Vec<&Descriptor> = layers
            .iter()
            .filter(|l| TAR_GZIP_LAYERS.contains(&l.media_type.as_str()))
            .collect();
        if tars.is_empty() {
            let types: Vec<&str> = layers.iter().map(|l| l.media_type.as_str()).collect();
            return Err(Error::new(
                Code::InvalidModule,
                format!(
                    "{}/{}: no Wasm layer among media types {types:?}",
                    s.registry, s.repository
                ),
            ));
        }
        // The compat image: the last tar+gzip layer that holds plugin.wasm.
        let mut last_err = None;
        for layer in tars.iter().rev() {
            let digest = parse_digest(&layer.digest, "layer digest")?;
            if layer.size > self.max_size {
                return Err(too_large(layer.size, self.max_size));
            }
            let downloaded = self.blob(s, layer, digest).await?;
            match unwrap_and_validate(
                &self.store,
                downloaded,
                self.max_size,
                TarEntry::PluginWasm,
                true,
            )
            .await
            {
                Ok(out) => return Ok(out),
                Err(e @ UnpackError::NoPluginWasm) => last_err = Some(Error::from(e)),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err.unwrap_or_else(|| UnpackError::NoPluginWasm.into()))
    }

    /// Checks that the registry lets `creds` (or anonymous, when empty) read manifest `digest`
    /// of `r`'s repository. Returns the credential that was accepted.
    pub async fn verify(
        &self,
        r: &OciRef,
        digest: &Digest,
        creds: &[Credential],
    ) -> Result<Option<Credential>> {
        let mut pinned = r.clone();
        pinned.digest = Some(*digest);
        // Anonymous access: what the node's mirrors serve anonymously, every caller on the
        // node can pull through them anyway.
        let path = format!("manifests/{digest}");
        let path = &path;
        let head = self.first_mirror(
            &pinned,
            creds,
            |_| true,
            |mut s| {
                async move {
                    self.request(&mut s, Method::HEAD, path, ACCEPT_MANIFESTS)
                        .await
                        .map(|_| Some(()))
                }
                .boxed()
            },
        );
        if head.await.is_some() {
            return Ok(None);
        }
        self.check_access(&pinned, path, creds).await
    }

    /// Checks with the registry itself that one of `creds` (anonymous when empty) may read
    /// `path` of `r`'s repository (a `HEAD`, e.g. of `manifests/<digest>` or
    /// `blobs/<digest>`); the credential it accepted. A `404` counts as a refusal, as
    /// registries hide private repositories behind one.
    pub async fn check_access(
        &self,
        r: &OciRef,
        path: &str,
        creds: &[Credential],
    ) -> Result<Option<Credential>> {
        let mut last = None;
        let candidates: Vec<Option<&Credential>> = if creds.is_empty() {
            vec![None]
        } else {
            creds.iter().map(Some).collect()
        };
        for cred in candidates {
            // A fresh token: a cached one proves only that the credential was valid when it
            // was issued, and verification is how a revoked credential is noticed.
            let mut s = self.session(r, cred).await?;
            s.token = None;
            match self
                .request(&mut s, Method::HEAD, path, ACCEPT_MANIFESTS)
                .await
            {
                Ok(_) => return Ok(s.cred),
                Err(e) if matches!(e.code, Code::AccessDenied | Code::NotFound) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        let e = last.expect("at least one candidate");
        Err(Error::new(
            Code::AccessDenied,
            format!("the registry did not confirm access to {r}: {}", e.message),
        ))
    }
}

/// Logs a mirror's failure; the next host is tried.
fn mirror_failed(ep: &hosts::Endpoint, r: &OciRef, e: &Error) {
    tracing::warn!(
        registry = %r.registry,
        repository = %r.repository,
        mirror = %ep.name,
        code = e.code.as_str(),
        error = %e.message,
        "mirror failed; trying the next host"
    );
}

impl OciFetcher {
    /// The cosign simple-signing signatures of manifest `digest` in `r`'s repository, from
    /// the registry itself (the manifest tagged `sha256-<hex>.sig`, its layers' payloads
    /// checked against their digests); empty when there is no such manifest.
    pub async fn signatures(
        &self,
        r: &OciRef,
        digest: &Digest,
        creds: &[Credential],
    ) -> Result<Vec<crate::signature::Found>> {
        // Sessions are opened on the signed manifest itself: with several credentials, the
        // one the registry accepts is found with a HEAD of a manifest that exists (the
        // `.sig` tag may not).
        let mut pinned = r.clone();
        pinned.digest = Some(*digest);
        // Signatures are checked against keys, so any host may serve them: the mirrors
        // first (anonymous requests only, hosts that may resolve tags), then the registry.
        let found = |s| {
            async move {
                let found = self.signatures_at(s, digest).await?;
                Ok((!found.is_empty()).then_some(found))
            }
            .boxed()
        };
        if let Some((found, _)) = self
            .first_mirror(&pinned, creds, |ep| ep.resolve, found)
            .await
        {
            return Ok(found);
        }
        let s = self.authorized_session(&pinned, creds).await?;
        self.signatures_at(s, digest).await
    }

    /// The signatures of manifest `digest` on session `s`.
    async fn signatures_at(
        &self,
        mut s: Session<'_>,
        digest: &Digest,
    ) -> Result<Vec<crate::signature::Found>> {
        use crate::signature::{MAX_PAYLOAD, MAX_SIGNATURES, SIGNATURE_ANNOTATION, SIMPLE_SIGNING};
        let tag = format!("sha256-{}.sig", digest.hex());
        let layers = match self.manifest(&mut s, &tag).await {
            Ok((doc, _, _)) => doc.layers.unwrap_or_default(),
            Err(e) if e.code == Code::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for layer in layers
            .iter()
            .filter(|l| l.media_type == SIMPLE_SIGNING)
            .take(MAX_SIGNATURES)
        {
            let Some(signature) = layer.annotations.get(SIGNATURE_ANNOTATION) else {
                continue;
            };
            if layer.size > MAX_PAYLOAD {
                continue;
            }
            let d = parse_digest(&layer.digest, "signature layer digest")?;
            let resp = self
                .request(&mut s, Method::GET, &format!("blobs/{d}"), "*/*")
                .await?;
            let payload = crate::fetch::client::read_capped(
                resp,
                &self.settings,
                MAX_PAYLOAD as usize,
                "signature payload",
            )
            .await?;
            if Digest::of(&payload) != d {
                continue;
            }
            out.push(crate::signature::Found::Simple {
                payload,
                signature: signature.clone(),
            });
        }
        out.extend(self.bundles(&mut s, digest).await?);
        Ok(out)
    }

    /// The Sigstore bundles that refer to manifest `digest`: through the OCI 1.1 referrers
    /// API, or, where the registry has none, the fallback tag `sha256-<hex>` (an index).
    async fn bundles(
        &self,
        s: &mut Session<'_>,
        digest: &Digest,
    ) -> Result<Vec<crate::signature::Found>> {
        use crate::signature::{BUNDLE, MAX_BUNDLE, MAX_SIGNATURES};
        let referrers = match self
            .request(s, Method::GET, &format!("referrers/{digest}"), OCI_INDEX)
            .await
        {
            Ok(resp) => {
                let body = crate::fetch::client::read_capped(
                    resp,
                    &self.settings,
                    manifest::MAX_MANIFEST as usize,
                    "referrers",
                )
                .await?;
                serde_json::from_slice::<manifest::ManifestDoc>(&body)
                    .ok()
                    .and_then(|d| d.manifests)
            }
            Err(e) if e.code == Code::NotFound || e.code == Code::UpstreamError => None,
            Err(e) => return Err(e),
        };
        let listed = match referrers {
            Some(m) => m,
            None => match self.manifest(s, &format!("sha256-{}", digest.hex())).await {
                Ok((doc, _, _)) => doc.manifests.unwrap_or_default(),
                Err(e) if e.code == Code::NotFound => Vec::new(),
                Err(e) => return Err(e),
            },
        };
        let mut out = Vec::new();
        for d in listed
            .iter()
            .filter(|d| d.artifact_type == BUNDLE)
            .take(MAX_SIGNATURES)
        {
            let manifest_digest = parse_digest(&d.digest, "referrer digest")?;
            let (doc, _, _) = self.manifest(s, &manifest_digest.to_string()).await?;
            for layer in doc
                .layers
                .unwrap_or_default()
                .iter()
                .filter(|l| l.media_type == BUNDLE)
            {
                if layer.size > MAX_BUNDLE {
                    continue;
                }
                let ld = parse_digest(&layer.digest, "bundle digest")?;
                let resp = self
                    .request(s, Method::GET, &format!("blobs/{ld}"), "*/*")
                    .await?;
                let body = crate::fetch::client::read_capped(
                    resp,
                    &self.settings,
                    MAX_BUNDLE as usize,
                    "signature bundle",
                )
                .await?;
                if Digest::of(&body) == ld {
                    out.push(crate::signature::Found::Bundle(body));
                }
            }
        }
        Ok(out)
    }
}
