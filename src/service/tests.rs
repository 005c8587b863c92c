//! The service core against an in-process fake upstream: every pull-policy x cache-state x
//! credential case of the README's "Semantics" and "Credentials and tenancy", and the
//! concurrent ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::*;
use crate::auth::Credential;
use crate::cache::store::Store;
use crate::config::{CacheSettings, VerifyPolicy};
use crate::fetch::KnownBlobs;
use crate::fetch::oci::Authorized;

/// What the fake registry and web server hold.
#[derive(Debug, Default)]
struct World {
    /// `oci://reg/repo:tag` -> manifest digest.
    tags: HashMap<String, Digest>,
    /// Manifest digest -> (source key, module bytes).
    manifests: HashMap<Digest, (String, Vec<u8>)>,
    /// http(s) and file urls -> (module bytes, etag).
    urls: HashMap<String, (Vec<u8>, Option<String>)>,
    /// Private repositories (source keys) -> user names the registry accepts.
    private: HashMap<String, Vec<String>>,
    /// The registry endpoint's view: manifest digest -> (bytes, media type).
    raw_manifests: HashMap<Digest, (Vec<u8>, String)>,
    /// Blob digest -> bytes.
    raw_blobs: HashMap<Digest, Vec<u8>>,
}

/// How many calls of each kind the fake answered.
#[derive(Debug, Default)]
struct Calls {
    fetch: AtomicUsize,
    resolve: AtomicUsize,
    verify: AtomicUsize,
    if_changed: AtomicUsize,
    raw_manifest: AtomicUsize,
    raw_blob: AtomicUsize,
    raw_check: AtomicUsize,
}

/// An in-process upstream with the semantics of a registry and a web server.
#[derive(Debug)]
struct Fake {
    /// Where fetched modules are written (the cache's store).
    store: Store,
    /// The content.
    world: Mutex<World>,
    /// Counters.
    calls: Calls,
    /// Every fetch takes this long (use with paused time).
    delay: Mutex<Duration>,
    /// The next fetch panics.
    panic_next: AtomicBool,
    /// Every operation fails with `upstream_error` (the registry is down).
    down: AtomicBool,
}

fn denied(source: &str) -> Error {
    Error::new(Code::AccessDenied, format!("registry refused {source}"))
}

impl Fake {
    fn w(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    /// Pushes `module` as `oci://reg/repo:tag`; the manifest digest.
    fn push(&self, location: &str, module: &[u8]) -> Digest {
        let src = Source::parse(location).unwrap();
        let manifest =
            Digest::of(format!("manifest of {location} {:?}", Digest::of(module)).as_bytes());
        let mut w = self.w();
        w.tags.insert(src.location_key(), manifest);
        w.manifests
            .insert(manifest, (src.source_key(), module.to_vec()));
        manifest
    }

    /// Pushes a CNCF Wasm artifact of `module` as `oci://reg/repo:tag` for the registry
    /// endpoint; the manifest digest and the layer digest.
    fn push_artifact(&self, location: &str, module: &[u8], media_type: &str) -> (Digest, Digest) {
        self.push_image(location, module, media_type, "application/wasm")
    }

    /// Pushes a one-layer image with these config and layer media types.
    fn push_image(
        &self,
        location: &str,
        module: &[u8],
        media_type: &str,
        layer_type: &str,
    ) -> (Digest, Digest) {
        let src = Source::parse(location).unwrap();
        let config = b"{}".to_vec();
        let (cd, ld) = (Digest::of(&config), Digest::of(module));
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{media_type}","digest":"{cd}","size":2}},"layers":[{{"mediaType":"{layer_type}","digest":"{ld}","size":{}}}]}}"#,
            crate::fetch::oci::OCI_MANIFEST,
            module.len()
        )
        .into_bytes();
        let md = Digest::of(&manifest);
        let mut w = self.w();
        w.tags.insert(src.location_key(), md);
        w.raw_manifests
            .insert(md, (manifest, crate::fetch::oci::OCI_MANIFEST.to_string()));
        w.raw_blobs.insert(cd, config);
        w.raw_blobs.insert(ld, module.to_vec());
        (md, ld)
    }

    fn serve(&self, url: &str, module: &[u8], etag: Option<&str>) {
        self.w()
            .urls
            .insert(url.to_string(), (module.to_vec(), etag.map(str::to_string)));
    }

    fn make_private(&self, source_key: &str, users: &[&str]) {
        self.w().private.insert(
            source_key.to_string(),
            users.iter().map(|u| u.to_string()).collect(),
        );
    }

    /// The credential the registry accepts for `source_key` among `creds`: `Ok(None)` is
    /// anonymous access to a public repository.
    fn accept(&self, source_key: &str, creds: &[Credential]) -> Result<Option<Credential>> {
        let users = self.w().private.get(source_key).cloned();
        match (users, creds.first()) {
            (None, None) => Ok(None),
            (None, Some(c)) => Ok(Some(c.clone())),
            (Some(users), _) => creds
                .iter()
                .find(|c| users.contains(&c.username))
                .cloned()
                .map(Some)
                .ok_or_else(|| denied(source_key)),
        }
    }

    async fn write(&self, bytes: &[u8]) -> Result<(tempfile::NamedTempFile, Digest, u64)> {
        let mut w = self.store.writer(u64::MAX, "module")?;
        w.write(bytes).await?;
        w.finish().await
    }

    async fn pause(&self) {
        let d = *self.delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
        if self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("upstream bug");
        }
    }

    /// `upstream_error` while the fake is down.
    fn up(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::new(Code::UpstreamError, "connection refused"));
        }
        Ok(())
    }

    fn manifest_of(&self, r: &OciRef) -> Result<Digest> {
        if let Some(d) = r.digest {
            return Ok(d);
        }
        self.w()
            .tags
            .get(&Source::Oci(r.clone()).location_key())
            .copied()
            .ok_or_else(|| Error::new(Code::NotFound, format!("{r}: no such tag")))
    }
}

impl Upstream for Fake {
    fn fetch<'a>(
        &'a self,
        source: &'a Source,
        _known: &'a dyn KnownBlobs,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Fetched>> {
        async move {
            self.calls.fetch.fetch_add(1, Ordering::SeqCst);
            self.pause().await;
            self.up()?;
            let (bytes, image_digest, credential, etag) = match source {
                Source::Oci(r) => {
                    let credential = self.accept(&source.source_key(), creds)?;
                    let manifest = self.manifest_of(r)?;
                    let (_, bytes) = self
                        .w()
                        .manifests
                        .get(&manifest)
                        .cloned()
                        .ok_or_else(|| Error::new(Code::NotFound, "no such manifest"))?;
                    (bytes, Some(manifest), credential, None)
                }
                other => {
                    let (bytes, etag) = self
                        .w()
                        .urls
                        .get(&other.location_key())
                        .cloned()
                        .ok_or_else(|| Error::new(Code::NotFound, "404"))?;
                    (bytes, None, None, etag)
                }
            };
            let (file, digest, size) = self.write(&bytes).await?;
            Ok(Fetched {
                image_digest,
                credential,
                etag,
                ..Fetched::plain(file, digest, size)
            })
        }
        .boxed()
    }

    fn resolve<'a>(
        &'a self,
        r: &'a OciRef,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Authorized<Digest>>> {
        async move {
            self.calls.resolve.fetch_add(1, Ordering::SeqCst);
            self.up()?;
            let credential = self.accept(&Source::Oci(r.clone()).source_key(), creds)?;
            Ok(Authorized {
                value: self.manifest_of(r)?,
                credential,
            })
        }
        .boxed()
    }

    fn verify<'a>(
        &'a self,
        r: &'a OciRef,
        _digest: &'a Digest,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Option<Credential>>> {
        async move {
            self.calls.verify.fetch_add(1, Ordering::SeqCst);
            self.up()?;
            self.accept(&Source::Oci(r.clone()).source_key(), creds)
        }
        .boxed()
    }

    fn signatures<'a>(
        &'a self,
        _r: &'a OciRef,
        _digest: &'a Digest,
        _creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Vec<crate::signature::Found>>> {
        async move { Ok(Vec::new()) }.boxed()
    }

    fn raw_manifest<'a>(
        &'a self,
        r: &'a OciRef,
        reference: &'a str,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Authorized<crate::fetch::oci::raw::RawManifest>>> {
        async move {
            self.calls.raw_manifest.fetch_add(1, Ordering::SeqCst);
            self.pause().await;
            self.up()?;
            let credential = self.accept(&Source::Oci(r.clone()).source_key(), creds)?;
            let digest = match reference.parse::<Digest>() {
                Ok(d) if reference.starts_with("sha256:") => d,
                _ => {
                    let mut tagged = r.clone();
                    tagged.tag = Some(reference.to_string());
                    tagged.digest = None;
                    self.manifest_of(&tagged)?
                }
            };
            let (bytes, media_type) = self
                .w()
                .raw_manifests
                .get(&digest)
                .cloned()
                .ok_or_else(|| Error::new(Code::NotFound, "no such manifest"))?;
            Ok(Authorized {
                value: crate::fetch::oci::raw::RawManifest {
                    bytes: bytes.into(),
                    digest,
                    media_type,
                    served_by: None,
                },
                credential,
            })
        }
        .boxed()
    }

    fn raw_blob<'a>(
        &'a self,
        r: &'a OciRef,
        digest: &'a Digest,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Authorized<crate::fetch::oci::raw::RawBlob>>> {
        async move {
            self.calls.raw_blob.fetch_add(1, Ordering::SeqCst);
            self.pause().await;
            self.up()?;
            let credential = self.accept(&Source::Oci(r.clone()).source_key(), creds)?;
            let bytes = self
                .w()
                .raw_blobs
                .get(digest)
                .cloned()
                .ok_or_else(|| Error::new(Code::NotFound, "no such blob"))?;
            let (file, _, size) = self.write(&bytes).await?;
            Ok(Authorized {
                value: crate::fetch::oci::raw::RawBlob {
                    file,
                    size,
                    media_type: "application/octet-stream".into(),
                    served_by: None,
                },
                credential,
            })
        }
        .boxed()
    }

    fn raw_check<'a>(
        &'a self,
        r: &'a OciRef,
        _path: &'a str,
        creds: &'a [Credential],
    ) -> BoxFuture<'a, Result<Option<Credential>>> {
        async move {
            self.calls.raw_check.fetch_add(1, Ordering::SeqCst);
            self.up()?;
            self.accept(&Source::Oci(r.clone()).source_key(), creds)
        }
        .boxed()
    }

    fn fetch_if_changed<'a>(
        &'a self,
        url: &'a reqwest::Url,
        etag: &'a str,
    ) -> BoxFuture<'a, Result<Option<Fetched>>> {
        async move {
            self.calls.if_changed.fetch_add(1, Ordering::SeqCst);
            let (bytes, now) = self
                .w()
                .urls
                .get(url.as_str())
                .cloned()
                .ok_or_else(|| Error::new(Code::NotFound, "404"))?;
            if now.as_deref() == Some(etag) {
                return Ok(None);
            }
            let (file, digest, size) = self.write(&bytes).await?;
            Ok(Some(Fetched {
                etag: now,
                ..Fetched::plain(file, digest, size)
            }))
        }
        .boxed()
    }
}

/// A service over a temp-dir cache and the fake.
struct Rig {
    /// Keeps the cache dir.
    dir: tempfile::TempDir,
    service: Service,
    fake: Arc<Fake>,
}

fn rig_with(verify: VerifyPolicy, max_size: Option<u64>) -> Rig {
    rig_settings(verify, max_size, Settings::default())
}

fn rig_settings(verify: VerifyPolicy, max_size: Option<u64>, settings: Settings) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (service, fake) = open_with(dir.path(), verify, max_size, settings);
    Rig { dir, service, fake }
}

fn rig() -> Rig {
    rig_with(VerifyPolicy::Ttl(Duration::from_secs(3600)), None)
}

fn open(
    path: &std::path::Path,
    verify: VerifyPolicy,
    max_size: Option<u64>,
) -> (Service, Arc<Fake>) {
    open_with(path, verify, max_size, Settings::default())
}

fn open_with(
    path: &std::path::Path,
    verify: VerifyPolicy,
    max_size: Option<u64>,
    service_settings: Settings,
) -> (Service, Arc<Fake>) {
    let metrics = Arc::new(Metrics::new());
    let settings = CacheSettings {
        unused_expiry: None,
        purge_interval: Duration::from_secs(3600),
        max_size,
        scan_at_start: false,
        memory_size: 64 << 20,
    };
    let cache = Cache::open(path, settings, Arc::clone(&metrics)).unwrap();
    let key = NodeKey::load_or_create(cache.store()).unwrap();
    let fake = Arc::new(Fake {
        store: cache.store().clone(),
        world: Mutex::default(),
        calls: Calls::default(),
        delay: Mutex::new(Duration::ZERO),
        panic_next: AtomicBool::new(false),
        down: AtomicBool::new(false),
    });
    let auth = AuthSettings {
        docker_config: None,
        allow_credential_helpers: false,
        verify,
        providers: Default::default(),
    };
    let upstream: Arc<dyn Upstream> = fake.clone();
    (
        Service::new(cache, upstream, key, &auth, service_settings, metrics),
        fake,
    )
}

/// A request built the way the socket builds it.
fn req(url: &str) -> ReqBuilder {
    ReqBuilder(FetchBody {
        url: url.into(),
        ..Default::default()
    })
}

struct ReqBuilder(FetchBody);

impl ReqBuilder {
    fn policy(mut self, p: &str) -> Self {
        self.0.pull_policy = Some(p.into());
        self
    }
    fn sha256(mut self, d: Digest) -> Self {
        self.0.sha256 = Some(d.to_string());
        self
    }
    fn version(mut self, name: &str, v: &str) -> Self {
        self.0.resource_name = Some(name.into());
        self.0.resource_version = Some(v.into());
        self
    }
    fn user(mut self, registry: &str, user: &str) -> Self {
        let auth = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{user}:pw-{user}"),
        );
        self.0.pull_secret = Some(Secret::new(format!(
            r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#
        )));
        self
    }
    fn build(self) -> FetchRequest {
        FetchRequest::try_from(self.0).unwrap()
    }
}

impl Rig {
    async fn get(&self, r: ReqBuilder) -> Result<Outcome> {
        self.service.fetch(r.build()).await
    }
    fn calls(&self) -> (usize, usize, usize) {
        let c = &self.fake.calls;
        (
            c.fetch.load(Ordering::SeqCst),
            c.resolve.load(Ordering::SeqCst),
            c.verify.load(Ordering::SeqCst),
        )
    }
}

fn module(name: &str) -> Vec<u8> {
    crate::testkit::wasm_module(name, 16)
}

const TAGGED: &str = "oci://reg.example/acme/acl:1.0";
const LATEST: &str = "oci://reg.example/acme/acl";

#[tokio::test]
async fn if_not_present_downloads_once_then_hits() {
    let t = rig();
    let m = module("acl");
    t.fake.push(TAGGED, &m);
    let first = t.get(req(TAGGED)).await.unwrap();
    assert_eq!(first.cache, CacheStatus::Miss);
    assert_eq!(first.record.module, Digest::of(&m));
    let second = t.get(req(TAGGED).policy("IfNotPresent")).await.unwrap();
    assert_eq!(second.cache, CacheStatus::Hit);
    assert_eq!(t.calls(), (1, 0, 0));
}

#[tokio::test]
async fn latest_defaults_to_always_and_revalidates_with_one_resolve() {
    let t = rig();
    t.fake.push(LATEST, &module("v1"));
    assert_eq!(t.get(req(LATEST)).await.unwrap().cache, CacheStatus::Miss);
    // Unchanged tag: one resolve, no download.
    let again = t.get(req(LATEST)).await.unwrap();
    assert_eq!(again.cache, CacheStatus::Revalidated);
    assert_eq!(t.calls(), (1, 1, 0));
    // The tag moved: the new module is downloaded.
    let v2 = module("v2");
    t.fake.push(LATEST, &v2);
    let moved = t.get(req(LATEST)).await.unwrap();
    assert_eq!(moved.cache, CacheStatus::Miss);
    assert_eq!(moved.record.module, Digest::of(&v2));
    assert_eq!(t.calls(), (2, 2, 0));
}

#[tokio::test]
async fn always_with_resource_version_asks_once_per_version() {
    let t = rig();
    t.fake.push(TAGGED, &module("acl"));
    let r = || req(TAGGED).policy("Always");
    assert_eq!(
        t.get(r().version("ns/acl", "1")).await.unwrap().cache,
        CacheStatus::Miss
    );
    assert_eq!(
        t.get(r().version("ns/acl", "1")).await.unwrap().cache,
        CacheStatus::Hit
    );
    assert_eq!(t.calls(), (1, 0, 0));
    assert_eq!(
        t.get(r().version("ns/acl", "2")).await.unwrap().cache,
        CacheStatus::Revalidated
    );
    assert_eq!(t.calls(), (1, 1, 0));
    // Another plugin resource has its own version.
    assert_eq!(
        t.get(r().version("ns/other", "1")).await.unwrap().cache,
        CacheStatus::Revalidated
    );
    // Without a version every request asks.
    assert_eq!(t.get(r()).await.unwrap().cache, CacheStatus::Revalidated);
    assert_eq!(t.calls(), (1, 3, 0));
    let versions = &t
        .service
        .cache()
        .index()
        .get(&Source::parse(TAGGED).unwrap().location_key())
        .unwrap()
        .versions;
    assert_eq!(versions.get("ns/acl").map(String::as_str), Some("2"));
    assert_eq!(versions.get("ns/other").map(String::as_str), Some("1"));
}

#[tokio::test]
async fn never_serves_only_from_the_cache() {
    let t = rig();
    t.fake.push(TAGGED, &module("acl"));
    let e = t.get(req(TAGGED).policy("Never")).await.unwrap_err();
    assert_eq!(e.code, Code::NotPresent);
    assert_eq!(t.calls(), (0, 0, 0));
    t.get(req(TAGGED)).await.unwrap();
    assert_eq!(
        t.get(req(TAGGED).policy("Never")).await.unwrap().cache,
        CacheStatus::Hit
    );
}

#[tokio::test]
async fn a_known_digest_is_served_from_the_cache_whatever_the_policy() {
    let t = rig();
    let m = module("acl");
    let manifest = t.fake.push(LATEST, &m);
    t.get(req(LATEST)).await.unwrap();
    for d in [manifest, Digest::of(&m)] {
        for p in ["Always", "IfNotPresent", "Never"] {
            let o = t.get(req(LATEST).policy(p).sha256(d)).await.unwrap();
            assert_eq!(o.cache, CacheStatus::Hit, "{p} with {d}");
        }
    }
    assert_eq!(t.calls(), (1, 0, 0));
}

#[tokio::test]
async fn a_digest_cached_from_another_source_is_downloaded_again() {
    let t = rig();
    let m = module("same-bytes");
    t.fake.push(TAGGED, &m);
    t.fake.push("oci://other.example/acme/acl:1.0", &m);
    t.get(req(TAGGED)).await.unwrap();
    let o = t
        .get(req("oci://other.example/acme/acl:1.0").sha256(Digest::of(&m)))
        .await
        .unwrap();
    assert_eq!(o.cache, CacheStatus::Miss);
    assert_eq!(t.calls().0, 2);
}

#[tokio::test]
async fn a_checksum_mismatch_caches_nothing() {
    let t = rig();
    t.fake.push(TAGGED, &module("acl"));
    let e = t
        .get(req(TAGGED).sha256(Digest::of(b"something else")))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::ChecksumMismatch);
    assert!(t.service.list().is_empty());
    assert_eq!(
        t.get(req(TAGGED).policy("Never")).await.unwrap_err().code,
        Code::NotPresent
    );
}

#[tokio::test]
async fn http_always_rechecks_with_the_etag() {
    let t = rig();
    let url = "https://web.example/filters/openid.wasm";
    t.fake.serve(url, &module("openid"), Some("\"v1\""));
    assert_eq!(t.get(req(url)).await.unwrap().cache, CacheStatus::Miss);
    let same = t.get(req(url).policy("Always")).await.unwrap();
    assert_eq!(same.cache, CacheStatus::Revalidated);
    assert_eq!(t.fake.calls.if_changed.load(Ordering::SeqCst), 1);
    let new = module("openid-2");
    t.fake.serve(url, &new, Some("\"v2\""));
    let changed = t.get(req(url).policy("Always")).await.unwrap();
    assert_eq!(changed.cache, CacheStatus::Miss);
    assert_eq!(changed.record.module, Digest::of(&new));
    assert_eq!(
        t.calls().0,
        1,
        "the changed module came from the conditional GET"
    );
}

#[tokio::test]
async fn a_private_module_reaches_only_callers_the_registry_accepts() {
    let t = rig();
    let m = module("private");
    t.fake.push(TAGGED, &m);
    t.fake
        .make_private("oci://reg.example/acme/acl", &["alice"]);
    let alice = || req(TAGGED).user("reg.example", "alice");
    // No credential: refused upstream.
    assert_eq!(
        t.get(req(TAGGED)).await.unwrap_err().code,
        Code::AccessDenied
    );
    let first = t.get(alice()).await.unwrap();
    assert_eq!(first.cache, CacheStatus::Miss);
    assert!(matches!(first.grant, Grant::Credential(_)));
    // Alice again within the TTL: a hit, no registry traffic.
    assert_eq!(t.get(alice()).await.unwrap().cache, CacheStatus::Hit);
    assert_eq!(t.calls(), (2, 0, 0));
    // Bob (no credential, or the wrong one) is checked with the registry and refused,
    // though the bytes are on disk.
    let e = t.get(req(TAGGED)).await.unwrap_err();
    assert_eq!(e.code, Code::AccessDenied);
    let e = t
        .get(req(TAGGED).user("reg.example", "bob"))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::AccessDenied);
    assert_eq!(t.calls(), (2, 0, 2));
    // Carol, newly allowed, is confirmed by the registry and then served.
    t.fake
        .make_private("oci://reg.example/acme/acl", &["alice", "carol"]);
    let carol = t
        .get(req(TAGGED).user("reg.example", "carol"))
        .await
        .unwrap();
    assert_eq!(carol.cache, CacheStatus::Revalidated);
    assert_eq!(t.calls(), (2, 0, 3));
}

#[tokio::test]
async fn a_pull_secret_with_no_entry_for_the_registry_says_so() {
    let t = rig();
    t.fake.push(TAGGED, &module("private"));
    t.fake
        .make_private("oci://reg.example/acme/acl", &["alice"]);
    let e = t
        .get(req(TAGGED).user("elsewhere.example", "alice"))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::AccessDenied);
    assert!(e.message.contains("reg.example"), "{}", e.message);
}

#[tokio::test]
async fn verify_always_asks_the_registry_on_every_hit() {
    let t = rig_with(VerifyPolicy::Always, None);
    t.fake.push(TAGGED, &module("private"));
    t.fake
        .make_private("oci://reg.example/acme/acl", &["alice"]);
    let alice = || req(TAGGED).user("reg.example", "alice");
    t.get(alice()).await.unwrap();
    for n in 1..=3 {
        assert_eq!(
            t.get(alice()).await.unwrap().cache,
            CacheStatus::Revalidated
        );
        assert_eq!(t.calls().2, n);
    }
    // Revoked: refused at once.
    t.fake.make_private("oci://reg.example/acme/acl", &[]);
    assert_eq!(t.get(alice()).await.unwrap_err().code, Code::AccessDenied);
}

#[tokio::test]
async fn public_modules_are_open_to_everyone() {
    let t = rig();
    let m = module("public");
    t.fake.push(TAGGED, &m);
    let first = t.get(req(TAGGED)).await.unwrap();
    assert_eq!(first.grant, Grant::Public);
    let other = t.get(req(TAGGED).user("reg.example", "bob")).await.unwrap();
    assert_eq!(other.cache, CacheStatus::Hit);
    let d = Digest::of(&m);
    assert_eq!(
        t.service.module_url(&d, &first.grant),
        format!("/v1/modules/{d}")
    );
    t.service.open_module(&d, None, None).await.unwrap();
}

#[tokio::test]
async fn module_urls_of_private_modules_carry_a_token_bound_to_the_module() {
    let t = rig();
    let m = module("private");
    let d = Digest::of(&m);
    t.fake.push(TAGGED, &m);
    t.fake
        .make_private("oci://reg.example/acme/acl", &["alice"]);
    let o = t
        .get(req(TAGGED).user("reg.example", "alice"))
        .await
        .unwrap();
    let url = t.service.module_url(&d, &o.grant);
    let query: BTreeMap<String, String> = url::Url::parse(&format!("http://x{url}"))
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    let (cred, token) = (query["cred"].as_str(), query["token"].as_str());
    let opened = t
        .service
        .open_module(&d, Some(cred), Some(token))
        .await
        .unwrap();
    assert_eq!(opened.len(), m.len() as u64);
    for (c, tk) in [
        (None, None),
        (Some(cred), Some("00")),
        (Some("other"), Some(token)),
    ] {
        let e = t.service.open_module(&d, c, tk).await.unwrap_err();
        assert_eq!(e.code, Code::AccessDenied);
    }
    // Once the credential is revoked (a registry refusal), its token stops working.
    let revoked = t
        .service
        .cache()
        .index()
        .revoke("oci://reg.example/acme/acl", &[cred.to_string()], false)
        .await
        .unwrap();
    assert!(revoked);
    let e = t
        .service
        .open_module(&d, Some(cred), Some(token))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::AccessDenied);
}

#[tokio::test(start_paused = true)]
async fn concurrent_identical_requests_cause_one_download() {
    let t = rig();
    t.fake.push(TAGGED, &module("herd"));
    *t.fake.delay.lock().unwrap() = Duration::from_secs(2);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let s = t.service.clone();
        tasks.push(tokio::spawn(
            async move { s.fetch(req(TAGGED).build()).await },
        ));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(t.calls().0, 1);
}

#[tokio::test(start_paused = true)]
async fn different_tenants_of_a_private_module_do_not_share_a_flight() {
    let t = rig();
    t.fake.push(TAGGED, &module("private"));
    t.fake
        .make_private("oci://reg.example/acme/acl", &["alice"]);
    *t.fake.delay.lock().unwrap() = Duration::from_secs(1);
    let a = t
        .service
        .fetch(req(TAGGED).user("reg.example", "alice").build());
    let b = t
        .service
        .fetch(req(TAGGED).user("reg.example", "bob").build());
    let (a, b) = tokio::join!(a, b);
    assert!(a.is_ok());
    assert_eq!(
        b.unwrap_err().code,
        Code::AccessDenied,
        "bob never rides on alice's pull"
    );
}

#[tokio::test]
async fn a_panic_upstream_does_not_poison_the_key() {
    let t = rig();
    t.fake.push(TAGGED, &module("acl"));
    t.fake.panic_next.store(true, Ordering::SeqCst);
    let e = t.get(req(TAGGED)).await.unwrap_err();
    assert_eq!(e.code, Code::Internal);
    let o = t.get(req(TAGGED)).await.unwrap();
    assert_eq!(o.cache, CacheStatus::Miss);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_hangs_up_does_not_cancel_the_download() {
    let t = rig();
    t.fake.push(TAGGED, &module("acl"));
    *t.fake.delay.lock().unwrap() = Duration::from_secs(5);
    let s = t.service.clone();
    let caller = tokio::spawn(async move { s.fetch(req(TAGGED).build()).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_secs(10)).await;
    // The download went on without its caller: the next request is served by it (a hit,
    // or the same flight's result) and nothing is downloaded twice.
    t.get(req(TAGGED).policy("IfNotPresent")).await.unwrap();
    assert_eq!(t.calls().0, 1);
    assert_eq!(t.service.list().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn followers_of_a_flight_record_their_own_resource_version() {
    let t = rig();
    t.fake.push(TAGGED, &module("acl"));
    *t.fake.delay.lock().unwrap() = Duration::from_secs(1);
    let mut tasks = Vec::new();
    for i in 0..5 {
        let s = t.service.clone();
        tasks.push(tokio::spawn(async move {
            s.fetch(
                req(TAGGED)
                    .policy("Always")
                    .version(&format!("ns/p{i}"), "7")
                    .build(),
            )
            .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let rec = t
        .service
        .cache()
        .index()
        .get(&Source::parse(TAGGED).unwrap().location_key())
        .unwrap();
    assert_eq!(rec.versions.len(), 5, "{:?}", rec.versions);
    // Each of them now hits for its version.
    *t.fake.delay.lock().unwrap() = Duration::ZERO;
    let o = t
        .get(req(TAGGED).policy("Always").version("ns/p3", "7"))
        .await
        .unwrap();
    assert_eq!(o.cache, CacheStatus::Hit);
}

#[tokio::test]
async fn a_corrupt_blob_is_dropped_and_fetched_again() {
    let t = rig();
    let m = module("acl");
    t.fake.push(TAGGED, &m);
    t.get(req(TAGGED)).await.unwrap();
    let path = t.dir.path().join("blobs/sha256").join(Digest::of(&m).hex());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"garbage"))
        .unwrap();
    // A restarted daemon re-hashes before the first serve.
    drop(t.service);
    let (service, fake) = open(t.dir.path(), VerifyPolicy::Never, None);
    fake.push(TAGGED, &m);
    let o = service.fetch(req(TAGGED).build()).await.unwrap();
    assert_eq!(o.cache, CacheStatus::Miss);
    assert_eq!(fake.calls.fetch.load(Ordering::SeqCst), 1);
    assert_eq!(std::fs::read(&path).unwrap(), m);
}

#[tokio::test]
async fn a_restart_serves_hits_without_upstream() {
    let t = rig();
    t.fake.push(TAGGED, &module("acl"));
    t.get(req(TAGGED)).await.unwrap();
    drop(t.service);
    let (service, fake) = open(t.dir.path(), VerifyPolicy::Never, None);
    let o = service.fetch(req(TAGGED).build()).await.unwrap();
    assert_eq!(o.cache, CacheStatus::Hit);
    assert_eq!(fake.calls.fetch.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn max_size_evicts_the_least_recently_used_and_refuses_only_the_too_large() {
    let t = rig_with(VerifyPolicy::Never, Some(200));
    for name in ["a", "b", "c"] {
        t.fake.push(
            &format!("oci://reg.example/acme/{name}:1"),
            &crate::testkit::wasm_module(name, 60),
        );
    }
    t.get(req("oci://reg.example/acme/a:1")).await.unwrap();
    t.get(req("oci://reg.example/acme/b:1")).await.unwrap();
    // a is used again, so b is the least recently used when c needs room.
    tokio::time::sleep(Duration::from_millis(5)).await;
    t.get(req("oci://reg.example/acme/a:1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    t.get(req("oci://reg.example/acme/c:1")).await.unwrap();
    let locations: Vec<String> = t
        .service
        .list()
        .iter()
        .flat_map(|m| m.locations.clone())
        .collect();
    assert!(
        locations.iter().any(|l| l.contains("/a:1")),
        "{locations:?}"
    );
    assert!(
        locations.iter().any(|l| l.contains("/c:1")),
        "{locations:?}"
    );
    assert!(
        !locations.iter().any(|l| l.contains("/b:1")),
        "{locations:?}"
    );
    t.fake.push(
        "oci://reg.example/acme/big:1",
        &crate::testkit::wasm_module("big", 300),
    );
    let e = t
        .get(req("oci://reg.example/acme/big:1"))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::TooLarge);
}

/// Issue 9: a repository once served anonymously stayed public for good. "Public" now lapses
/// like any verification (here at once) and is checked again anonymously, for fetches and
/// for token-less module GETs.
#[tokio::test]
async fn issue_9_a_public_grant_lapses_and_is_checked_again() {
    let t = rig_with(VerifyPolicy::Ttl(Duration::ZERO), None);
    let m = module("once-public");
    let d = Digest::of(&m);
    t.fake.push(TAGGED, &m);
    assert_eq!(t.get(req(TAGGED)).await.unwrap().grant, Grant::Public);
    // Still public: confirmed again, anonymously.
    let again = t.get(req(TAGGED)).await.unwrap();
    assert_eq!(
        (again.cache, again.grant),
        (CacheStatus::Revalidated, Grant::Public)
    );
    t.service.open_module(&d, None, None).await.unwrap();
    assert_eq!(t.calls().2, 2);
    // Made private: anonymous callers are refused, the bytes on disk notwithstanding.
    t.fake
        .make_private("oci://reg.example/acme/acl", &["alice"]);
    let e = t.get(req(TAGGED)).await.unwrap_err();
    assert_eq!(e.code, Code::AccessDenied);
    let e = t.service.open_module(&d, None, None).await.unwrap_err();
    assert_eq!(e.code, Code::AccessDenied);
    assert!(!t.service.list()[0].public, "no longer listed as public");
}

#[tokio::test]
async fn a_token_less_get_of_a_lapsed_public_module_is_served_after_an_anonymous_check() {
    let t = rig_with(VerifyPolicy::Ttl(Duration::ZERO), None);
    let m = module("public-get");
    let d = Digest::of(&m);
    t.fake.push(TAGGED, &m);
    t.get(req(TAGGED)).await.unwrap();
    let before = t.calls().2;
    let gets: Vec<_> = (0..20)
        .map(|_| {
            let s = t.service.clone();
            tokio::spawn(async move { s.open_module(&d, None, None).await.map(|m| m.len()) })
        })
        .collect();
    for g in gets {
        assert_eq!(g.await.unwrap().unwrap(), m.len() as u64);
    }
    assert!(t.calls().2 > before, "the registry was asked");
}

#[tokio::test]
async fn purging_a_module_forgets_the_access_records_of_its_source() {
    let t = rig();
    t.fake.push(TAGGED, &module("purged"));
    t.fake
        .make_private("oci://reg.example/acme/acl", &["alice"]);
    t.get(req(TAGGED).user("reg.example", "alice"))
        .await
        .unwrap();
    let index = t.service.cache().index();
    assert!(
        !index
            .access("oci://reg.example/acme/acl")
            .verified
            .is_empty()
    );
    t.service
        .purge(&crate::cache::lifecycle::Selector::All, false)
        .await
        .unwrap();
    assert_eq!(
        index.access("oci://reg.example/acme/acl"),
        Default::default()
    );
}

/// Issue 9: every new (resourceName, resourceVersion) pair was kept, so a client could grow a
/// record without bound. A record keeps at most 64 resource names.
#[tokio::test]
async fn issue_9_resource_versions_per_record_are_bounded() {
    let t = rig();
    t.fake.push(TAGGED, &module("versions"));
    for i in 0..100 {
        t.get(
            req(TAGGED)
                .policy("Always")
                .version(&format!("ns/p{i:03}"), "1"),
        )
        .await
        .unwrap();
    }
    let key = Source::parse(TAGGED).unwrap().location_key();
    let rec = t.service.cache().index().get(&key).unwrap();
    assert_eq!(rec.versions.len(), MAX_VERSIONS_PER_RECORD);
    assert!(rec.versions.contains_key("ns/p099"), "the newest is kept");
}

/// Issue 9: bytes being downloaded into `cache_dir/tmp` did not count against `[cache]
/// max_size`. They do now: an install makes room for them too, and downloads in progress
/// together may not hold more than the bound (`storage_full`).
#[tokio::test]
async fn issue_9_downloads_in_progress_count_against_max_size() {
    let t = rig_with(VerifyPolicy::Never, Some(300));
    let a = crate::testkit::wasm_module("a", 90);
    let b = crate::testkit::wasm_module("b", 90);
    t.fake.push("oci://reg.example/acme/a:1", &a);
    t.fake.push("oci://reg.example/acme/b:1", &b);
    t.get(req("oci://reg.example/acme/a:1")).await.unwrap();
    // A download of 150 bytes is in progress.
    let store = t.service.cache().store().clone();
    let mut w = store.writer(u64::MAX, "in progress").unwrap();
    w.write(&[0u8; 150]).await.unwrap();
    assert_eq!(store.pending_bytes(), 150);
    // a (102 bytes) + b (102) + 150 in progress > 300: a goes.
    t.get(req("oci://reg.example/acme/b:1")).await.unwrap();
    let cached: Vec<Digest> = t.service.list().iter().map(|m| m.digest).collect();
    assert_eq!(cached, vec![Digest::of(&b)]);
    // More in progress than the whole bound: refused.
    let mut w2 = store.writer(u64::MAX, "too much").unwrap();
    let e = w2.write(&[0u8; 151]).await.unwrap_err();
    assert_eq!(e.code, Code::StorageFull);
    drop((w, w2));
    assert_eq!(
        store.pending_bytes(),
        0,
        "finished and dropped writers give their bytes back"
    );
}

#[tokio::test]
async fn stale_if_error_serves_the_cached_module_when_the_registry_is_down() {
    let t = rig();
    let m = module("stale");
    t.fake.push(LATEST, &m);
    assert_eq!(t.get(req(LATEST)).await.unwrap().cache, CacheStatus::Miss);
    t.fake.down.store(true, Ordering::SeqCst);
    let stale = t.get(req(LATEST)).await.unwrap();
    assert_eq!(stale.cache, CacheStatus::Stale);
    assert_eq!(stale.record.module, Digest::of(&m));
    assert!(
        t.service
            .metrics_text()
            .contains("wasm_cache_stale_served_total 1")
    );
    // Back up: revalidated again.
    t.fake.down.store(false, Ordering::SeqCst);
    let r = t.get(req(LATEST).version("p", "2")).await.unwrap();
    assert_eq!(r.cache, CacheStatus::Revalidated);
}

#[tokio::test]
async fn stale_if_error_never_skips_an_access_check() {
    let t = rig_with(VerifyPolicy::Always, None);
    let src = Source::parse(LATEST).unwrap();
    t.fake.make_private(&src.source_key(), &["alice"]);
    t.fake.push(LATEST, &module("private-stale"));
    let alice = || req(LATEST).user("reg.example", "alice");
    assert_eq!(t.get(alice()).await.unwrap().cache, CacheStatus::Miss);
    t.fake.down.store(true, Ordering::SeqCst);
    // Every hit must be verified, and the registry cannot be asked: no stale answer.
    let e = t.get(alice()).await.unwrap_err();
    assert_eq!(e.code, Code::UpstreamError);
    let e = t
        .get(req(LATEST).user("reg.example", "bob"))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::UpstreamError);
}

#[tokio::test]
async fn a_failed_fetch_is_answered_from_memory_and_another_version_goes_upstream() {
    let t = rig();
    t.fake.push(TAGGED, &module("neg"));
    t.fake.down.store(true, Ordering::SeqCst);
    for _ in 0..20 {
        let e = t.get(req(TAGGED).version("p", "1")).await.unwrap_err();
        assert_eq!(e.code, Code::UpstreamError);
    }
    assert_eq!(t.calls().0, 1, "one upstream fetch for 20 failing requests");
    assert!(
        t.service
            .metrics_text()
            .contains("wasm_cache_negative_hits_total 19")
    );
    // A new resourceVersion may have fixed it: it goes upstream.
    t.fake.down.store(false, Ordering::SeqCst);
    let r = t.get(req(TAGGED).version("p", "2")).await.unwrap();
    assert_eq!(r.cache, CacheStatus::Miss);
    assert_eq!(t.calls().0, 2);
}

#[tokio::test]
async fn a_background_retry_makes_the_next_request_a_hit() {
    let t = rig();
    t.fake.push(TAGGED, &module("retry"));
    t.fake.down.store(true, Ordering::SeqCst);
    assert!(t.get(req(TAGGED)).await.is_err());
    t.fake.down.store(false, Ordering::SeqCst);
    tokio::time::pause();
    tokio::time::advance(Duration::from_millis(1100)).await;
    // Still answered from memory, and the due background retry starts.
    assert_eq!(
        t.get(req(TAGGED)).await.unwrap_err().code,
        Code::UpstreamError
    );
    for _ in 0..1000 {
        if t.service.inner.failures.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        t.service.inner.failures.is_empty(),
        "the retry did not finish"
    );
    let r = t.get(req(TAGGED)).await.unwrap();
    assert_eq!(r.cache, CacheStatus::Hit);
    assert_eq!(t.calls().0, 2);
    assert!(
        t.service
            .metrics_text()
            .contains("wasm_cache_background_retries_total{result=\"success\"} 1")
    );
}

// The registry endpoint's side of the service (the HTTP layer is tested with real clients in
// tests/it/endpoint.rs).

mod registry {
    use super::*;
    use crate::config::RegistrySettings;
    use crate::service::registry::Object;

    const REG: &str = "reg.example";
    const CNCF_CONFIG: &str = "application/vnd.wasm.config.v0+json";

    fn registry_rig(tag_ttl: Duration, any_artifact: bool) -> Rig {
        rig_settings(
            VerifyPolicy::Ttl(Duration::from_secs(3600)),
            None,
            Settings {
                registry: RegistrySettings {
                    tag_ttl,
                    any_artifact,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
    }

    fn repo(name: &str) -> OciRef {
        let Source::Oci(mut r) = Source::parse(&format!("oci://{REG}/{name}")).unwrap() else {
            unreachable!()
        };
        r.tag = None;
        r.implicit_tag = false;
        r
    }

    fn cred(user: &str) -> Option<Credential> {
        Some(Credential {
            username: user.into(),
            password: Secret::new(format!("pw-{user}")),
        })
    }

    impl Rig {
        fn raw_calls(&self) -> (usize, usize, usize, usize) {
            let c = &self.fake.calls;
            (
                c.raw_manifest.load(Ordering::SeqCst),
                c.raw_blob.load(Ordering::SeqCst),
                c.raw_check.load(Ordering::SeqCst),
                c.resolve.load(Ordering::SeqCst),
            )
        }
        async fn tag(&self, name: &str, tag: &str, who: Option<Credential>) -> Result<Digest> {
            let served = self
                .service
                .registry_get(&repo(name), &Object::Tag(tag.into()), who)
                .await?;
            Ok(served.digest)
        }
        async fn blob(&self, name: &str, d: Digest, who: Option<Credential>) -> Result<Vec<u8>> {
            let served = self
                .service
                .registry_get(&repo(name), &Object::Blob(d), who)
                .await?;
            match served.content {
                Resident::Memory(b) => Ok(b.to_vec()),
                Resident::File(f, len) => {
                    let mut buf = vec![0; len as usize];
                    std::os::unix::fs::FileExt::read_exact_at(&*f, &mut buf, 0).unwrap();
                    Ok(buf)
                }
            }
        }
    }

    #[tokio::test]
    async fn a_tag_is_a_hit_within_its_ttl_and_one_resolve_past_it() {
        let t = registry_rig(Duration::from_secs(60), false);
        let (md, _) =
            t.fake
                .push_artifact(&format!("oci://{REG}/a/f:1"), &module("r1"), CNCF_CONFIG);
        assert_eq!(t.tag("a/f", "1", None).await.unwrap(), md);
        assert_eq!(t.tag("a/f", "1", None).await.unwrap(), md);
        assert_eq!(t.raw_calls(), (1, 0, 0, 0), "the second is a hit");

        let t = registry_rig(Duration::ZERO, false);
        let (md, _) =
            t.fake
                .push_artifact(&format!("oci://{REG}/a/f:1"), &module("r1"), CNCF_CONFIG);
        assert_eq!(t.tag("a/f", "1", None).await.unwrap(), md);
        assert_eq!(t.tag("a/f", "1", None).await.unwrap(), md);
        assert_eq!(
            t.raw_calls(),
            (1, 0, 0, 1),
            "one resolve, no second download"
        );
        let (moved, _) =
            t.fake
                .push_artifact(&format!("oci://{REG}/a/f:1"), &module("r2"), CNCF_CONFIG);
        assert_eq!(t.tag("a/f", "1", None).await.unwrap(), moved);
        assert_eq!(t.raw_calls(), (2, 0, 0, 2));
        // Moved back to a manifest cached by digest: one resolve, no download.
        t.fake
            .push_artifact(&format!("oci://{REG}/a/f:1"), &module("r1"), CNCF_CONFIG);
        assert_eq!(t.tag("a/f", "1", None).await.unwrap(), md);
        assert_eq!(t.raw_calls(), (2, 0, 0, 3));
        t.fake
            .push_artifact(&format!("oci://{REG}/a/f:1"), &module("r2"), CNCF_CONFIG);
        assert_eq!(t.tag("a/f", "1", None).await.unwrap(), moved);
        assert_eq!(t.raw_calls(), (2, 0, 0, 4));
        // The registry goes down: the cached manifest, as stale, to a proven caller.
        t.fake.down.store(true, Ordering::SeqCst);
        let served = t
            .service
            .registry_get(&repo("a/f"), &Object::Tag("1".into()), None)
            .await
            .unwrap();
        assert_eq!(served.cache, CacheStatus::Stale);
        assert_eq!(served.digest, moved);
    }

    #[tokio::test]
    async fn private_objects_reach_only_callers_the_registry_accepts() {
        let t = registry_rig(Duration::from_secs(60), false);
        let m = module("private-raw");
        let (md, ld) = t
            .fake
            .push_artifact(&format!("oci://{REG}/p/f:1"), &m, CNCF_CONFIG);
        t.fake
            .make_private(&format!("oci://{REG}/p/f"), &["alice", "carol"]);
        let code = |r: Result<Digest>| r.unwrap_err().code;
        assert_eq!(code(t.tag("p/f", "1", None).await), Code::AccessDenied);
        assert_eq!(t.tag("p/f", "1", cred("alice")).await.unwrap(), md);
        assert_eq!(t.blob("p/f", ld, cred("alice")).await.unwrap(), m);
        // Cached: still refused to anonymous callers and other tenants...
        assert_eq!(code(t.tag("p/f", "1", None).await), Code::AccessDenied);
        assert_eq!(
            code(t.tag("p/f", "1", cred("bob")).await),
            Code::AccessDenied
        );
        let e = t.blob("p/f", ld, cred("bob")).await.unwrap_err();
        assert_eq!(e.code, Code::AccessDenied);
        // ...served to another tenant the registry accepts after one check, then a hit.
        let checks = t.raw_calls().2;
        assert_eq!(t.blob("p/f", ld, cred("carol")).await.unwrap(), m);
        assert_eq!(t.raw_calls().2, checks + 1);
        assert_eq!(t.blob("p/f", ld, cred("carol")).await.unwrap(), m);
        assert_eq!(t.raw_calls().2, checks + 1);
        assert_eq!(t.raw_calls().1, 1, "one blob download in all");
    }

    #[tokio::test]
    async fn only_wasm_artifacts_unless_any_artifact() {
        for any in [false, true] {
            let t = registry_rig(Duration::from_secs(60), any);
            let (_, wasm_layer) = t.fake.push_image(
                &format!("oci://{REG}/i/img:wasm"),
                &module("scope"),
                "application/vnd.oci.image.config.v1+json",
                "application/wasm",
            );
            let (_, tar_layer) = t.fake.push_image(
                &format!("oci://{REG}/i/img:tar"),
                b"a tar layer",
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar",
            );
            // A Wasm layer makes it a Wasm artifact, whatever the config says.
            assert!(t.tag("i/img", "wasm", None).await.is_ok());
            assert!(t.blob("i/img", wasm_layer, None).await.is_ok());
            // A container image is refused (and its layers), unless any_artifact.
            let got = t.tag("i/img", "tar", None).await;
            assert_eq!(got.is_ok(), any, "{got:?}");
            if !any {
                assert_eq!(got.unwrap_err().code, Code::Forbidden);
                let pulls = t.raw_calls().0;
                assert!(t.tag("i/img", "tar", None).await.is_err());
                assert_eq!(t.raw_calls().0, pulls, "refused from the cache");
            }
            assert_eq!(t.blob("i/img", tar_layer, None).await.is_ok(), any);
            // A blob no served manifest references is refused (any_artifact pulls it).
            let other = Digest::of(b"unreferenced");
            t.fake.w().raw_blobs.insert(other, b"unreferenced".to_vec());
            let got = t.blob("i/img", other, None).await;
            assert_eq!(got.is_ok(), any, "{got:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_pull() {
        let t = registry_rig(Duration::from_secs(60), false);
        let (md, ld) =
            t.fake
                .push_artifact(&format!("oci://{REG}/h/f:1"), &module("herd"), CNCF_CONFIG);
        *t.fake.delay.lock().unwrap() = Duration::from_millis(200);
        let tags = futures_util::future::join_all((0..50).map(|_| t.tag("h/f", "1", None))).await;
        assert!(tags.iter().all(|d| d.as_ref().ok() == Some(&md)));
        let blobs = futures_util::future::join_all((0..50).map(|_| t.blob("h/f", ld, None))).await;
        assert!(blobs.iter().all(|b| b.is_ok()));
        assert_eq!(t.raw_calls(), (1, 1, 0, 0));
    }
}
