//! Pushing artifacts (blobs, manifests, indexes) through the registry HTTP API.

use super::*;

/// A descriptor as pushed.
#[derive(Clone, Debug)]
pub struct Desc {
    /// Media type.
    pub media_type: String,
    /// Digest.
    pub digest: String,
    /// Size.
    pub size: usize,
}

impl Desc {
    /// As manifest JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// Pushes to a registry through its HTTP API.
pub struct Pusher {
    /// `http://127.0.0.1:port` (or https).
    base: String,
    /// HTTP client.
    client: reqwest::Client,
    /// Basic credentials, for registries with htpasswd auth.
    basic: Option<(String, String)>,
    /// A push token, for registries with token auth.
    bearer: Option<String>,
}

impl Pusher {
    /// A pusher for a plain-HTTP anonymous registry at `addr`.
    pub fn new(addr: &str) -> Pusher {
        Pusher {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            basic: None,
            bearer: None,
        }
    }

    /// A pusher for `registry` as set up by `opts` (TLS trusting the test CA, Basic auth with
    /// the first user).
    pub fn for_registry(registry: &Registry, opts: &RegistryOpts) -> Pusher {
        assert!(
            opts.token_realm.is_none(),
            "use Pusher::with_token for token-auth registries"
        );
        let mut b = reqwest::Client::builder().no_proxy();
        let scheme = if opts.tls {
            let ca =
                reqwest::Certificate::from_pem(&std::fs::read(&pki().ca_cert).unwrap()).unwrap();
            b = b.tls_certs_merge([ca]);
            "https"
        } else {
            "http"
        };
        Pusher {
            base: format!("{scheme}://{}", registry.addr),
            client: b.build().unwrap(),
            basic: opts.basic_users.first().cloned(),
            bearer: None,
        }
    }

    /// A pusher for a token-auth registry: it signs its own push token for `repo`.
    pub fn with_token(registry: &Registry, repo: &str) -> Pusher {
        let pki = pki();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&pki.signer_key).unwrap())
            .unwrap();
        use base64::Engine as _;
        let pem = std::fs::read_to_string(&pki.signer_cert).unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": "pusher", "aud": TOKEN_SERVICE, "exp": now + 600, "nbf": now - 10, "iat": now,
            "jti": format!("push-{repo}-{now}"),
            "access": [{"type": "repository", "name": repo, "actions": ["pull", "push"]}],
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.x5c = Some(vec![
            base64::engine::general_purpose::STANDARD.encode(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            ),
        ]);
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        Pusher {
            base: format!("http://{}", registry.addr),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            basic: None,
            bearer: Some(token),
        }
    }

    fn req(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let r = self.client.request(method, url);
        match (&self.basic, &self.bearer) {
            (_, Some(t)) => r.bearer_auth(t),
            (Some((u, p)), None) => r.basic_auth(u, Some(p)),
            (None, None) => r,
        }
    }

    /// Uploads a blob; returns its descriptor.
    pub async fn blob(&self, repo: &str, media_type: &str, data: &[u8]) -> Desc {
        let digest = sha(data);
        let r = self
            .req(
                reqwest::Method::POST,
                format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "starting upload");
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .req(reqwest::Method::PUT, format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "finishing upload: {}",
            r.text().await.unwrap()
        );
        Desc {
            media_type: media_type.to_string(),
            digest,
            size: data.len(),
        }
    }

    /// Puts a manifest under `reference`; returns its descriptor.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &serde_json::Value,
    ) -> Desc {
        let bytes = serde_json::to_vec(body).unwrap();
        let r = self
            .req(
                reqwest::Method::PUT,
                format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("content-type", media_type)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "putting manifest: {}",
            r.text().await.unwrap()
        );
        Desc {
            media_type: media_type.to_string(),
            digest: sha(&bytes),
            size: bytes.len(),
        }
    }

    /// An OCI/Docker image manifest with `config` and `layers`, tagged `reference`.
    pub async fn image(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        config: &Desc,
        layers: &[Desc],
        extra: serde_json::Value,
    ) -> Desc {
        let mut m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.json(),
            "layers": layers.iter().map(Desc::json).collect::<Vec<_>>(),
        });
        if let serde_json::Value::Object(e) = extra {
            m.as_object_mut().unwrap().extend(e);
        }
        self.manifest(repo, reference, media_type, &m).await
    }
}

/// Media types used in tests.
pub mod mt {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const SOLO_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
    pub const SOLO_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
    pub const CNCF_CONFIG: &str = "application/vnd.wasm.config.v0+json";
    pub const CNCF_LAYER: &str = "application/wasm";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_TGZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
}

/// Pushes a Solo-format artifact of `module` as `repo:tag`; returns the manifest descriptor.
pub async fn push_solo(p: &Pusher, repo: &str, tag: &str, module: &[u8]) -> Desc {
    let config = p.blob(repo, mt::SOLO_CONFIG, b"{}").await;
    let layer = p.blob(repo, mt::SOLO_LAYER, module).await;
    p.image(
        repo,
        tag,
        mt::OCI_MANIFEST,
        &config,
        &[layer],
        serde_json::json!({}),
    )
    .await
}
