//! Kubelet credential provider plugins (`kubelet.config.k8s.io/v1` `CredentialProviderConfig`):
//! how ECR, GCR/Artifact Registry and ACR credentials reach kubelets without a static
//! secret. For an OCI request without a pull secret, the providers whose `matchImages` match
//! the image are executed from `[auth] credential_provider_bin_dir` with a
//! `CredentialProviderRequest` on stdin; their `CredentialProviderResponse` is used and cached
//! as the kubelet does (per image, registry or globally, for `cacheDuration` or the
//! provider's `defaultCacheDuration`). Plugins run with a timeout, their output is
//! size-capped, and only their stderr is logged (capped, with any returned password blanked).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::dockerconfig::{DockerConfig, key_matches};
use super::{Credential, Secret};
use crate::source::OciRef;

/// Largest response read from a plugin.
const MAX_STDOUT: u64 = 1 << 20;
/// Most stderr kept for the log.
const MAX_STDERR: u64 = 4 << 10;
/// Cache entries kept per provider.
const MAX_CACHE: usize = 1024;
/// Shortest time an answer is kept, even one that asks not to be cached: every request
/// without a pull secret consults the providers, cache hits included, and must not run a
/// plugin each time.
const MIN_CACHE: Duration = Duration::from_secs(10);
/// API versions of the exec protocol a provider may speak.
const API_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];

/// `CredentialProviderConfig` as read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    providers: Vec<RawProvider>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProvider {
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    #[serde(default)]
    default_cache_duration: Option<String>,
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<RawEnv>,
}

#[derive(Debug, Deserialize)]
struct RawEnv {
    name: String,
    value: String,
}

/// One configured plugin.
#[derive(Debug)]
struct Provider {
    /// The executable's name in the bin dir.
    name: String,
    /// Its path.
    path: PathBuf,
    /// Images it serves (kubelet glob syntax).
    match_images: Vec<String>,
    /// Cache duration when the response gives none.
    default_cache: Duration,
    /// The protocol version it speaks.
    api_version: String,
    /// Its arguments.
    args: Vec<String>,
    /// Extra environment.
    env: Vec<(String, String)>,
    /// Cached responses by cache key; the lock also makes concurrent requests share one run.
    cache: tokio::sync::Mutex<HashMap<String, Cached>>,
}

/// A cached response.
#[derive(Debug)]
struct Cached {
    /// Until when it is used.
    until: Instant,
    /// Its credentials.
    creds: DockerConfig,
}

/// The configured providers.
#[derive(Debug, Default)]
pub struct Providers {
    /// In config order.
    list: Vec<Provider>,
    /// How long a plugin may run.
    timeout: Duration,
}

/// The exec protocol's response.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    cache_key_type: String,
    #[serde(default)]
    cache_duration: Option<String>,
    #[serde(default)]
    auth: HashMap<String, AuthEntry>,
}

#[derive(Debug, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

impl Providers {
    /// Reads `config` (YAML or JSON) and resolves each provider in `bin_dir`. Blocking.
    pub fn load(config: &Path, bin_dir: &Path, timeout: Duration) -> Result<Providers, String> {
        let text = crate::config::read_capped_text(config, crate::config::MAX_SIDE_FILE)
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let raw: RawConfig =
            serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
        if raw.kind != "CredentialProviderConfig"
            || !raw.api_version.starts_with("kubelet.config.k8s.io/")
        {
            return Err(format!(
                "{}: not a kubelet.config.k8s.io CredentialProviderConfig",
                config.display()
            ));
        }
        let mut list = Vec::new();
        for p in raw.providers {
            let bad = |m: String| format!("{}: provider {:?}: {m}", config.display(), p.name);
            if p.name.is_empty() || p.name.contains('/') || p.name == "." || p.name == ".." {
                return Err(bad(
                    "name must be a file name in credential_provider_bin_dir".into(),
                ));
            }
            if p.match_images.is_empty() {
                return Err(bad("matchImages is empty".into()));
            }
            if !API_VERSIONS.contains(&p.api_version.as_str()) {
                return Err(bad(format!("unsupported apiVersion {:?}", p.api_version)));
            }
            let default_cache = match &p.default_cache_duration {
                None => Duration::ZERO,
                Some(d) => {
                    go_duration(d).ok_or_else(|| bad(format!("bad defaultCacheDuration {d:?}")))?
                }
            };
            list.push(Provider {
                path: bin_dir.join(&p.name),
                name: p.name,
                match_images: p.match_images,
                default_cache,
                api_version: p.api_version,
                args: p.args,
                env: p.env.into_iter().map(|e| (e.name, e.value)).collect(),
                cache: tokio::sync::Mutex::new(HashMap::new()),
            });
        }
        Ok(Providers { list, timeout })
    }

    /// True when no provider is configured.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The credentials the matching providers give for `r`, most specific first (failures
    /// are logged and give none).
    pub async fn for_ref(&self, r: &OciRef) -> Vec<Credential> {
        let mut out: Vec<Credential> = Vec::new();
        for p in &self.list {
            if !p
                .match_images
                .iter()
                .any(|m| key_matches(m, &r.registry, &r.repository))
            {
                continue;
            }
            for c in p.credentials(r, self.timeout).await {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        out
    }
}

impl Provider {
    /// The image as the kubelet would name it.
    fn image(r: &OciRef) -> String {
        format!("{}/{}", r.registry, r.repository)
    }

    async fn credentials(&self, r: &OciRef, timeout: Duration) -> Vec<Credential> {
        let image = Self::image(r);
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        for key in [image.as_str(), r.registry.as_str(), ""] {
            if let Some(c) = cache.get(key)
                && now < c.until
            {
                return c.creds.matching(&r.registry, &r.repository);
            }
        }
        let resp = match self.run(&image, timeout).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(provider = %self.name, image = %image, error = %e, "credential provider failed");
                return Vec::new();
            }
        };
        let ttl = resp
            .cache_duration
            .as_deref()
            .and_then(go_duration)
            .unwrap_or(self.default_cache)
            .max(MIN_CACHE);
        let creds = DockerConfig::from_keyed(
            resp.auth
                .into_iter()
                .map(|(k, a)| (k, Credential::new(a.username, Secret::new(a.password))))
                .collect(),
        );
        let found = creds.matching(&r.registry, &r.repository);
        {
            let key = match resp.cache_key_type.as_str() {
                "Registry" => r.registry.clone(),
                "Global" => String::new(),
                _ => image,
            };
            cache.retain(|_, c| now < c.until);
            if cache.len() < MAX_CACHE {
                cache.insert(
                    key,
                    Cached {
                        until: now + ttl,
                        creds,
                    },
                );
            }
        }
        found
    }

    /// Runs the plugin for `image`.
    async fn run(&self, image: &str, timeout: Duration) -> Result<Response, String> {
        let request = serde_json::json!({
            "apiVersion": self.api_version,
            "kind": "CredentialProviderRequest",
            "image": image,
        });
        let mut child = tokio::process::Command::new(&self.path)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("running {}: {e}", self.path.display()))?;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        let mut stdout = child.stdout.take().ok_or("no stdout")?.take(MAX_STDOUT + 1);
        let mut stderr = child.stderr.take().ok_or("no stderr")?.take(MAX_STDERR);
        let work = async {
            let body = serde_json::to_vec(&request).unwrap_or_default();
            // A plugin may exit without reading its input; what it prints still counts.
            let _ = stdin.write_all(&body).await;
            drop(stdin);
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let (r1, r2) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
            r1.map_err(|e| e.to_string())?;
            let _ = r2;
            let status = child.wait().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, out, err))
        };
        let (status, out, err) = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))??;
        if out.len() as u64 > MAX_STDOUT {
            return Err(format!("answer larger than {MAX_STDOUT} bytes"));
        }
        let parsed: Result<Response, String> =
            serde_json::from_slice(&out).map_err(|e| format!("invalid response: {e}"));
        let stderr_text = |secrets: &[&str]| {
            let mut t = String::from_utf8_lossy(&err).trim().to_string();
            for s in secrets.iter().filter(|s| !s.is_empty()) {
                t = t.replace(s, "***");
            }
            t
        };
        if !status.success() {
            let secrets: Vec<&str> = parsed
                .as_ref()
                .map(|r| r.auth.values().map(|a| a.password.as_str()).collect())
                .unwrap_or_default();
            return Err(format!("exited with {status}: {}", stderr_text(&secrets)));
        }
        let resp = parsed?;
        if resp.kind != "CredentialProviderResponse" || resp.api_version != self.api_version {
            return Err(format!(
                "answered kind {:?} apiVersion {:?}, expected CredentialProviderResponse {}",
                resp.kind, resp.api_version, self.api_version
            ));
        }
        if !err.is_empty() {
            let secrets: Vec<&str> = resp.auth.values().map(|a| a.password.as_str()).collect();
            tracing::debug!(provider = %self.name, stderr = %stderr_text(&secrets), "credential provider said");
        }
        Ok(resp)
    }
}

/// A Go duration (`metav1.Duration`): `"12h"`, `"1h30m"`, `"6h0m0s"`, `"1.5s"`, `"300ms"`.
fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(go_duration("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(go_duration("6h0m0s"), Some(Duration::from_secs(6 * 3600)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("12"), None);
        assert_eq!(go_duration("h"), None);
        assert_eq!(go_duration(""), None);
    }

    #[test]
    // A test fixture, not a cache file.
    #[allow(clippy::disallowed_methods)]
    fn config_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| {
            let p = dir.path().join("c.yaml");
            std::fs::write(&p, text).unwrap();
            Providers::load(&p, dir.path(), Duration::from_secs(5))
        };
        let ok = write(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: ecr\n  matchImages: [\"*.dkr.ecr.*.amazonaws.com\"]\n  defaultCacheDuration: 12h\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
        )
        .unwrap();
        assert_eq!(ok.list[0].default_cache, Duration::from_secs(12 * 3600));
        for bad in [
            "apiVersion: v1\nkind: ConfigMap\n",
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: ../x\n  matchImages: [a]\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: x\n  matchImages: []\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: x\n  matchImages: [a]\n  apiVersion: v2\n",
        ] {
            assert!(write(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn match_images_follow_the_kubelet_globs() {
        let m = |p: &str, reg: &str, repo: &str| key_matches(p, reg, repo);
        assert!(m(
            "*.dkr.ecr.*.amazonaws.com",
            "123.dkr.ecr.eu-west-1.amazonaws.com",
            "x"
        ));
        assert!(!m(
            "*.amazonaws.com",
            "123.dkr.ecr.eu-west-1.amazonaws.com",
            "x"
        ));
        assert!(m("registry.io/team", "registry.io", "team/filter"));
        assert!(!m("registry.io/team", "registry.io", "other/filter"));
        assert!(m("127.0.0.1:5000", "127.0.0.1:5000", "a"));
        assert!(!m("127.0.0.1:5000", "127.0.0.1:5001", "a"));
    }
}
