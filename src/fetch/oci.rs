//! OCI registries: the distribution API over the guarded HTTP client.
//!
//! Formats are chosen by media type, never guessed: the Solo Wasm artifact, the CNCF Wasm
//! artifact, the "compat" image (a tar+gzip layer holding `plugin.wasm`), and an image index
//! or Docker manifest list leading to one of them. Manifests and blobs are verified against
//! their digests; blobs stream into temp files.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Client, Method, Response, StatusCode, Url};
use serde::Deserialize;

use super::client::{Attempt, send, status_error, transport_error, with_retries};
use super::{Fetched, KnownBlobs, unpack::TarEntry, unwrap_and_validate};
use crate::auth::Credential;
use crate::cache::store::Store;
use crate::config::{Config, FetchSettings};
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::netguard::NetGuard;
use crate::source::OciRef;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Every manifest type we read, for `Accept`.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Layer types that are the raw module: Solo's artifact, the CNCF artifact, and a variant
/// seen in the wild.
const WASM_LAYERS: &[&str] = &[
    "application/vnd.module.wasm.content.layer.v1+wasm",
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
];
/// Layer types of the "compat" image: a gzip'd tar holding `plugin.wasm`.
const TAR_GZIP_LAYERS: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];
/// Largest manifest we read.
const MAX_MANIFEST: u64 = 4 << 20;
/// How many index levels we follow.
const MAX_INDEX_DEPTH: usize = 3;

/// A content descriptor, as in manifests and indexes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    /// The content's media type.
    #[serde(default)]
    media_type: String,
    /// `sha256:<hex>`.
    digest: String,
    /// Declared size in bytes.
    #[serde(default)]
    size: u64,
    /// Index entries: the platform the manifest is for.
    #[serde(default)]
    platform: Option<Platform>,
    /// Index entries: annotations (attestations are marked here).
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize)]
struct Platform {
    /// e.g. `wasm`, `amd64`, `unknown`.
    #[serde(default)]
    architecture: String,
    /// e.g. `wasip1`, `linux`, `unknown`.
    #[serde(default)]
    os: String,
}

/// The parts of a manifest or index we read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    /// Schema version; 2 for everything we read.
    #[serde(default)]
    schema_version: u32,
    /// Media type declared in the body (optional in OCI).
    #[serde(default)]
    media_type: Option<String>,
    /// Index: the manifests it lists.
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    /// Manifest: the layers.
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// A registry endpoint for one repository and one credential (or none), with the token it
/// earned. Credentials never cross sessions: tenant A's login is never sent for tenant B.
struct Session<'a> {
    /// Guarded client (insecure one for insecure registries).
    client: &'a Client,
    /// `https://host/v2/<repo>/` (or `http://` for insecure registries).
    base: Url,
    /// Registry name, for messages.
    registry: String,
    /// Repository, for messages and token scopes.
    repository: String,
    /// The login to use; `None` pulls anonymously.
    cred: Option<Credential>,
    /// Send the login as HTTP Basic (after the registry asked for Basic).
    basic: bool,
    /// Bearer token obtained from the registry's token service.
    token: Option<String>,
    /// Key of this session's token in the token cache.
    token_key: String,
}

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
}

fn parse_digest(s: &str, what: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e: Error| Error::new(Code::UpstreamError, format!("{what}: {}", e.message)))
}

impl OciFetcher {
    /// A fetcher using the two clients.
    pub fn new(
        secure: Client,
        insecure: Client,
        guard: Arc<NetGuard>,
        config: &Config,
        store: Store,
    ) -> Self {
        OciFetcher {
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

    async fn session(&self, r: &OciRef, cred: Option<&Credential>) -> Result<Session<'_>> {
        let host = r.api_host().to_string();
        let insecure = self.insecure_registries.matches(&r.registry);
        // Before any connection, the scheme probe included.
        let probe = Url::parse(&format!("https://{host}/v2/"))
            .map_err(|e| Error::invalid(format!("invalid registry {host}: {e}")))?;
        self.guard.check_url(&probe)?;
        let scheme = if insecure {
            self.probe_scheme(&host).await
        } else {
            "https"
        };
        let base = Url::parse(&format!("{scheme}://{host}/v2/{}/", r.repository))
            .map_err(|e| Error::invalid(format!("invalid registry {host}: {e}")))?;
        self.guard.check_url(&base)?;
        Ok(Session {
            client: if insecure {
                &self.insecure
            } else {
                &self.secure
            },
            base,
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            token_key: format!(
                "{}|{}|{}",
                r.registry,
                r.repository,
                cred.map(|c| c.fingerprint().to_string())
                    .unwrap_or_default()
            ),
            token: None,
            cred: cred.cloned(),
            basic: false,
        }
        .with_cached_token(self))
    }

    /// Opens a session with the first of `creds` the registry accepts for `r` (probing with a
    /// manifest HEAD when there are several), or anonymously when `creds` is empty.
    async fn authorized_session(&self, r: &OciRef, creds: &[Credential]) -> Result<Session<'_>> {
        if creds.len() <= 1 {
            return self.session(r, creds.first()).await;
        }
        let reference = r.manifest_reference();
        let mut last = None;
        for cred in creds {
            let mut s = self.session(r, Some(cred)).await?;
            match self
                .request(
                    &mut s,
                    Method::HEAD,
                    &format!("manifests/{reference}"),
                    ACCEPT_MANIFESTS,
                )
                .await
            {
                Ok(_) => return Ok(s),
                Err(e) if e.code == Code::AccessDenied => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::new(Code::AccessDenied, "no credential was accepted")))
    }

    /// For an insecure registry: HTTPS (unverified) if it answers TLS, else plain HTTP.
    async fn probe_scheme(&self, host: &str) -> &'static str {
        if let Some(s) = self
            .schemes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
        {
            return s;
        }
        let url = format!("https://{host}/v2/");
        let scheme = match self.insecure.get(&url).send().await {
            Ok(_) => "https",
            Err(_) => "http",
        };
        self.schemes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string(), scheme);
        scheme
    }

    /// The digest the reference points at now: HEAD on the manifest, falling back to GET.
    pub async fn resolve(&self, r: &OciRef, creds: &[Credential]) -> Result<Authorized<Digest>> {
        let mut s = self.authorized_session(r, creds).await?;
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
        let mut s = self.authorized_session(r, creds).await?;
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
                    reference = entry.digest.clone();
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
            if known.source_has(source, &digest) && self.store.has(&digest) {
                // Same source served these exact bytes before: copy, no download.
                return self.copy_stored(&digest).await;
            }
            let downloaded = self.blob(s, layer, digest).await?;
            let out = unwrap_and_validate(
                &self.store,
                downloaded,
                self.max_size,
                TarEntry::PluginWasm,
                false,
            );
            return out.await;
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
                Err(e) if e.code == Code::InvalidModule && e.message.contains("no plugin.wasm") => {
                    last_err = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| Error::new(Code::InvalidModule, "no plugin.wasm in any layer")))
    }

    async fn copy_stored(&self, digest: &Digest) -> Result<(tempfile::NamedTempFile, Digest, u64)> {
        let src = self.store.blob_path(digest);
        let tmp = self.store.temp_file()?;
        let dst = tmp.path().to_path_buf();
        let size = tokio::fs::copy(&src, &dst)
            .await
            .map_err(|e| Error::internal("copying cached blob", e))?;
        Ok((tmp, *digest, size))
    }

    /// GETs a manifest, verifying its digest. Returns it parsed, its digest and media type.
    async fn manifest(
        &self,
        s: &mut Session<'_>,
        reference: &str,
    ) -> Result<(ManifestDoc, Digest, String)> {
        let what = format!("manifest {}/{}:{reference}", s.registry, s.repository);
        let resp = self
            .request(
                s,
                Method::GET,
                &format!("manifests/{reference}"),
                ACCEPT_MANIFESTS,
            )
            .await?;
        let header_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string());
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let url = resp.url().to_string();
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| transport_error(&url, e).error)?;
            if (body.len() + chunk.len()) as u64 > MAX_MANIFEST {
                return Err(Error::new(
                    Code::TooLarge,
                    format!("{what} is larger than {MAX_MANIFEST} bytes"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let digest = Digest::of(&body);
        if let Ok(pinned) = reference.parse::<Digest>()
            && reference.starts_with("sha256:")
            && pinned != digest
        {
            return Err(Error::new(
                Code::ChecksumMismatch,
                format!("{what}: the registry served content with digest {digest}"),
            ));
        }
        if let Some(h) = header_digest
            && let Ok(hd) = h.parse::<Digest>()
            && hd != digest
        {
            return Err(Error::new(
                Code::UpstreamError,
                format!("{what}: Docker-Content-Digest {hd} does not match the content ({digest})"),
            ));
        }
        let doc: ManifestDoc = serde_json::from_slice(&body).map_err(|e| {
            Error::new(
                Code::UpstreamError,
                format!("{what} is not valid JSON: {e}"),
            )
        })?;
        if doc.schema_version != 2 {
            return Err(Error::new(
                Code::InvalidModule,
                format!(
                    "{what}: unsupported manifest schema version {}",
                    doc.schema_version
                ),
            ));
        }
        let media_type = doc.media_type.clone().or(header_type).unwrap_or_else(|| {
            if doc.manifests.is_some() {
                OCI_INDEX
            } else {
                OCI_MANIFEST
            }
            .to_string()
        });
        Ok((doc, digest, media_type))
    }

    /// Streams a blob into a temp file, checking its size and digest.
    async fn blob(
        &self,
        s: &mut Session<'_>,
        layer: &Descriptor,
        digest: Digest,
    ) -> Result<(tempfile::NamedTempFile, Digest, u64)> {
        let what = format!("blob {digest} of {}/{}", s.registry, s.repository);
        let path = format!("blobs/{digest}");
        let max = self.max_size;
        let store = &self.store;
        let sess: &Session<'_> = s;
        let out = with_retries(&self.settings, || {
            let what = what.clone();
            let path = path.clone();
            async move {
                let s = sess;
                let resp = self.send_once(s, Method::GET, &path, "*/*").await?;
                if !resp.status().is_success() {
                    return Err(status_error(&what, resp.status()));
                }
                let url = resp.url().to_string();
                let mut w = store.writer(max, &what)?;
                let mut body = resp.bytes_stream();
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(|e| transport_error(&url, e))?;
                    w.write(&chunk).await?;
                }
                Ok(w.finish().await?)
            }
        })
        .await?;
        if out.1 != digest {
            return Err(Error::new(
                Code::ChecksumMismatch,
                format!("{what}: the registry served content with digest {}", out.1),
            ));
        }
        if layer.size != 0 && out.2 != layer.size {
            return Err(Error::new(
                Code::UpstreamError,
                format!(
                    "{what}: {} bytes served, the manifest declares {}",
                    out.2, layer.size
                ),
            ));
        }
        Ok(out)
    }

    /// Sends a request with retries. On a 401 it answers the challenge once: a Bearer token
    /// from the realm (with the session's login, if any), or HTTP Basic with the login.
    async fn request(
        &self,
        s: &mut Session<'_>,
        method: Method,
        path: &str,
        accept: &str,
    ) -> Result<Response> {
        let mut answered = false;
        loop {
            let resp = with_retries(&self.settings, || {
                self.send_once(s, method.clone(), path, accept)
            })
            .await?;
            if resp.status() == StatusCode::UNAUTHORIZED && !answered {
                answered = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if let Some(params) = parse_bearer(&challenge) {
                    s.token = Some(self.token(s, &params).await?);
                    continue;
                }
                if challenge
                    .trim_start()
                    .to_ascii_lowercase()
                    .starts_with("basic")
                    && s.cred.is_some()
                {
                    s.basic = true;
                    continue;
                }
            }
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(denied(s, status));
            }
            if !status.is_success() {
                let what = format!("registry {} ({}, {path})", s.registry, s.repository);
                return Err(status_error(&what, status).error);
            }
            return Ok(resp);
        }
    }

    async fn send_once(
        &self,
        s: &Session<'_>,
        method: Method,
        path: &str,
        accept: &str,
    ) -> std::result::Result<Response, Attempt> {
        let url = s
            .base
            .join(path)
            .map_err(|e| Attempt::from(Error::invalid(format!("bad registry path {path}: {e}"))))?;
        let mut req = s.client.request(method, url.clone()).header(ACCEPT, accept);
        if let Some(t) = &s.token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        } else if let (true, Some(c)) = (s.basic, &s.cred) {
            req = req.basic_auth(&c.username, Some(c.password.expose()));
        }
        let resp = send(req, url.as_str()).await?;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            let what = format!("registry {}", s.registry);
            return Err(status_error(&what, status));
        }
        Ok(resp)
    }

    /// A Bearer token for a `WWW-Authenticate: Bearer realm=...` challenge, from the token
    /// service (with the session's login as Basic, if any). Cached per registry, repository
    /// and credential until it expires.
    async fn token(&self, s: &Session<'_>, params: &HashMap<String, String>) -> Result<String> {
        let realm = params.get("realm").ok_or_else(|| {
            Error::new(
                Code::UpstreamError,
                format!("registry {}: Bearer challenge without realm", s.registry),
            )
        })?;
        let mut url = Url::parse(realm).map_err(|e| {
            Error::new(
                Code::Forbidden,
                format!("registry {}: invalid token realm: {e}", s.registry),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::new(
                Code::Forbidden,
                format!("registry {}: token realm must be http(s)", s.registry),
            ));
        }
        self.guard.check_url(&url)?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
            // Ask for pull on this repository only, whatever the challenge suggests.
            q.append_pair("scope", &format!("repository:{}:pull", s.repository));
        }
        let token_url = url.to_string();
        let shown = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.path()
        );
        let resp = with_retries(&self.settings, || async {
            let mut req = s.client.get(url.clone());
            if let Some(c) = &s.cred {
                req = req.basic_auth(&c.username, Some(c.password.expose()));
            }
            let resp = send(req, &token_url).await?;
            if resp.status().is_server_error() {
                return Err(status_error(
                    &format!("token service {shown}"),
                    resp.status(),
                ));
            }
            Ok(resp)
        })
        .await?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(denied(s, resp.status()));
        }
        if !resp.status().is_success() {
            return Err(Error::new(
                Code::UpstreamError,
                format!(
                    "registry {}: token service {shown} answered {}",
                    s.registry,
                    resp.status()
                ),
            ));
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let body: TokenResponse = resp.json().await.map_err(|_| {
            Error::new(
                Code::UpstreamError,
                format!(
                    "registry {}: the token service answered something other than a token",
                    s.registry
                ),
            )
        })?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::new(
                    Code::UpstreamError,
                    format!(
                        "registry {}: the token service answered no token",
                        s.registry
                    ),
                )
            })?;
        // Refresh a little before the registry would refuse it (60 s is the spec's default).
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        let expires = Instant::now() + lifetime.mul_f64(0.9);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s.token_key.clone(), (token.clone(), expires));
        Ok(token)
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
        let mut last = None;
        let candidates: Vec<Option<&Credential>> = if creds.is_empty() {
            vec![None]
        } else {
            creds.iter().map(Some).collect()
        };
        for cred in candidates {
            // A fresh token: a cached one proves only that the credential was valid when it
            // was issued, and verification is how a revoked credential is noticed.
            let mut s = self.session(&pinned, cred).await?;
            s.token = None;
            match self
                .request(
                    &mut s,
                    Method::HEAD,
                    &format!("manifests/{digest}"),
                    ACCEPT_MANIFESTS,
                )
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

impl Session<'_> {
    fn with_cached_token(mut self, f: &OciFetcher) -> Self {
        let tokens = f.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, exp)) = tokens.get(&self.token_key)
            && *exp > Instant::now()
        {
            self.token = Some(t.clone());
        }
        self
    }
}

fn denied(s: &Session<'_>, status: StatusCode) -> Error {
    let how = if s.cred.is_some() {
        "with the given credentials"
    } else {
        "anonymously"
    };
    Error::new(
        Code::AccessDenied,
        format!(
            "registry {} refused access to {} {how} ({status})",
            s.registry, s.repository
        ),
    )
}

fn too_large(size: u64, max: u64) -> Error {
    Error::new(
        Code::TooLarge,
        format!("the layer is {size} bytes, more than the maximum module size of {max} bytes"),
    )
}

/// Picks the manifest to follow from an index: a `wasm` platform entry if any, else the
/// only (or first) entry that is not an attestation or unknown platform.
fn pick_from_index(entries: &[Descriptor]) -> Option<&Descriptor> {
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            matches!(
                d.media_type.as_str(),
                OCI_MANIFEST | DOCKER_MANIFEST | OCI_INDEX | DOCKER_LIST
            )
        })
        .filter(|d| {
            d.annotations
                .get("vnd.docker.reference.type")
                .map(String::as_str)
                != Some("attestation-manifest")
        })
        .filter(|d| {
            d.platform
                .as_ref()
                .is_none_or(|p| !(p.architecture == "unknown" && p.os == "unknown"))
        })
        .collect();
    candidates
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.architecture == "wasm")
        })
        .or_else(|| {
            candidates.iter().find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os.starts_with("wasi"))
            })
        })
        .or(candidates.first())
        .copied()
}

/// Parses `Bearer realm="...",service="...",scope="..."` into its parameters.
pub fn parse_bearer(header: &str) -> Option<HashMap<String, String>> {
    let (scheme, rest) = header.trim().split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut out = HashMap::new();
    let mut chars = rest.trim().chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let value: String = if chars.peek() == Some(&'"') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => break,
                    c => v.push(c),
                }
            }
            v
        } else {
            chars.by_ref().take_while(|c| *c != ',').collect()
        };
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let p = parse_bearer(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(p["realm"], "https://auth.example.com/token");
        assert_eq!(p["service"], "registry.example.com");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        assert!(parse_bearer(r#"Basic realm="x""#).is_none());
    }

    fn entry(media_type: &str, arch: &str, os: &str, attestation: bool) -> Descriptor {
        let mut annotations = HashMap::new();
        if attestation {
            annotations.insert(
                "vnd.docker.reference.type".into(),
                "attestation-manifest".into(),
            );
        }
        Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{arch}{os}"),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
            }),
            annotations,
        }
    }

    #[test]
    fn index_prefers_wasm_and_skips_attestations() {
        let entries = vec![
            entry(OCI_MANIFEST, "unknown", "unknown", true),
            entry(OCI_MANIFEST, "amd64", "linux", false),
            entry(OCI_MANIFEST, "wasm", "wasip1", false),
        ];
        assert_eq!(
            pick_from_index(&entries)
                .unwrap()
                .platform
                .as_ref()
                .unwrap()
                .architecture,
            "wasm"
        );
        let entries = vec![
            entry(OCI_MANIFEST, "unknown", "unknown", true),
            entry(DOCKER_MANIFEST, "amd64", "linux", false),
        ];
        assert_eq!(
            pick_from_index(&entries)
                .unwrap()
                .platform
                .as_ref()
                .unwrap()
                .architecture,
            "amd64"
        );
        assert!(pick_from_index(&[entry(OCI_MANIFEST, "unknown", "unknown", true)]).is_none());
    }
}
