//! Configuration: the TOML file (every key optional) parsed once into a validated [`Config`].
//!
//! `config/wasm-cache.toml` documents every key with its default.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// The file as written; every field optional. Only [`RawConfig::validate`] reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Path of the proxies' unix socket.
    pub socket: Option<PathBuf>,
    /// Path of the admin socket (mode 0600).
    pub admin_socket: Option<PathBuf>,
    /// Optional TCP address serving only `GET /metrics`, e.g. "127.0.0.1:9102".
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Logging.
    pub log: RawLog,
    /// Octal permission bits of the socket, e.g. "0660".
    pub socket_mode: Option<String>,
    /// Directory of the cache (blobs, index, temp files).
    pub cache_dir: Option<PathBuf>,
    /// Largest module accepted, e.g. "256MiB".
    pub max_module_size: Option<String>,
    /// Upstream fetch settings.
    pub fetch: RawFetch,
    /// Per-registry settings keyed by `host[:port]`, and containerd's hosts directory.
    pub registries: RawRegistries,
    /// Extra trusted roots.
    pub tls: RawTls,
    /// `file://` settings.
    pub file: RawFile,
    /// The network guard.
    pub network: RawNetwork,
    /// Credentials and access checks.
    pub auth: RawAuth,
    /// Cache lifecycle.
    pub cache: RawCache,
    /// Bounds on request fields.
    pub limits: RawLimits,
    /// Bounds on connections to the sockets.
    pub server: RawServer,
    /// Modules warmed at start and on SIGHUP.
    pub prefetch: RawPrefetch,
    /// Signature policies.
    pub signatures: RawSignatures,
    /// The OCI registry endpoint (the read side of the distribution API).
    pub registry: RawRegistryEndpoint,
}

/// `[registry]`: the node-local OCI registry endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRegistryEndpoint {
    /// TCP address of the registry endpoint, e.g. "0.0.0.0:5000" (off when unset; the
    /// proxies' socket always answers `/v2/`).
    pub addr: Option<std::net::SocketAddr>,
    /// PEM certificate chain for TLS on `addr`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key for TLS on `addr`.
    pub key_file: Option<PathBuf>,
    /// Aliases for upstream registries as the first path component, e.g.
    /// `{ internal = "registry.internal:5000" }`.
    pub upstreams: std::collections::BTreeMap<String, String>,
    /// Serve any artifact, not only Wasm modules.
    pub any_artifact: bool,
    /// How long a tag's manifest is served before it is resolved again, e.g. "60s".
    pub tag_ttl: Option<String>,
}

/// `[signatures]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSignatures {
    /// `[[signatures.policy]]` entries.
    pub policy: Vec<crate::signature::RawPolicy>,
}

/// `[prefetch]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawPrefetch {
    /// Urls warmed at start.
    pub urls: Vec<String>,
    /// Directories of WasmPlugin manifests (`*.yaml`, `*.yml`, `*.json`) warmed at start and
    /// re-read on SIGHUP.
    pub wasmplugin_dirs: Vec<PathBuf>,
    /// Keep `/readyz` not ready until the warming at start is done.
    pub ready_after: bool,
    /// Modules fetched at once while warming (default 4).
    pub concurrency: Option<usize>,
}

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawServer {
    /// A request head must arrive within this, e.g. "10s".
    pub header_read_timeout: Option<String>,
    /// A connection with nothing in flight and no traffic for this long is closed.
    pub idle_timeout: Option<String>,
    /// Most connections open at once, per socket.
    pub max_connections: Option<usize>,
    /// Threads running the sockets and fetches (unset: one per CPU).
    pub worker_threads: Option<usize>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLimits {
    /// Longest `url`, e.g. "8KiB".
    pub url: Option<String>,
    /// Longest `resourceName`.
    pub resource_name: Option<String>,
    /// Longest `resourceVersion`.
    pub resource_version: Option<String>,
    /// Largest `pullSecret`.
    pub pull_secret: Option<String>,
    /// Most `auths` entries in a pull secret.
    pub pull_secret_entries: Option<usize>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    /// "text" (default) or "json".
    pub format: Option<String>,
}

/// `[cache]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCache {
    /// Modules not served for this long are removed by the sweep ("0s" disables).
    pub unused_expiry: Option<String>,
    /// How often the sweep runs.
    pub purge_interval: Option<String>,
    /// Upper bound on the bytes of cached modules, e.g. "10GiB" (unset: no bound).
    pub max_size: Option<String>,
    /// Memory for small modules served without reading their blob again (default 64MiB).
    pub memory_size: Option<String>,
    /// "lazy": re-hash each blob before it is first served after a start; "scan": also
    /// re-hash every blob in the background at start.
    pub verify_blobs: Option<String>,
}

/// `[auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAuth {
    /// Node credentials (the kubelet's or Docker's config.json), used without a pull secret.
    pub docker_config: Option<PathBuf>,
    /// Let `docker_config` run credential helpers (`credsStore`, `credHelpers`).
    pub allow_credential_helpers: bool,
    /// When cached private modules are re-checked: "ttl", "always" or "never".
    pub verify: Option<String>,
    /// How long a verified credential stays verified under `verify = "ttl"`.
    pub verify_ttl: Option<String>,
    /// The kubelet's `CredentialProviderConfig` (YAML or JSON): plugins run for requests
    /// without a pull secret.
    pub credential_provider_config: Option<PathBuf>,
    /// Where the plugins it names live.
    pub credential_provider_bin_dir: Option<PathBuf>,
    /// How long one plugin run may take, e.g. "30s".
    pub credential_provider_timeout: Option<String>,
}

/// `[fetch]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawFetch {
    /// Timeout of one upstream HTTP request, e.g. "15s".
    pub request_timeout: Option<String>,
    /// Timeout of one whole fetch including retries, e.g. "5m".
    pub total_timeout: Option<String>,
    /// Attempts after the first on connect errors and 5xx.
    pub retries: Option<usize>,
    /// First retry delay.
    pub backoff_min: Option<String>,
    /// Longest retry delay.
    pub backoff_max: Option<String>,
    /// Most distinct upstream operations at once.
    pub max_concurrent: Option<usize>,
    /// Slowest body accepted, e.g. "1KiB" (per second); "0" disables.
    pub min_rate: Option<String>,
    /// Over how long the rate is measured, e.g. "30s".
    pub min_rate_window: Option<String>,
    /// Serve the last module of a location when re-resolving it fails upstream.
    pub stale_if_error: Option<bool>,
    /// How long a failed fetch is answered from memory, e.g. "10s" ("0s" disables).
    pub negative_ttl: Option<String>,
}

/// `[registries]`: `config_path` and `[registries."HOST:PORT"]` tables.
#[derive(Debug, Default, Deserialize)]
pub struct RawRegistries {
    /// containerd's registry hosts directory (`<host>/hosts.toml`, `_default/hosts.toml`).
    #[serde(default)]
    pub config_path: Option<PathBuf>,
    /// Per-registry settings.
    #[serde(flatten)]
    pub hosts: HashMap<String, RawRegistry>,
}

/// `[registries."HOST:PORT"]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRegistry {
    /// Allow plain HTTP and unverified TLS for this registry.
    pub insecure: bool,
    /// Mirrors tried before the registry, e.g. `["https://mirror.internal:5000"]`.
    pub mirrors: Vec<String>,
}

/// `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTls {
    /// PEM files of extra trusted root certificates for every HTTPS fetch.
    pub ca_files: Vec<PathBuf>,
}

/// `[file]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawFile {
    /// Directories `file://` urls may read from. Empty: `file://` is refused.
    pub allowed_roots: Vec<PathBuf>,
}

/// `[network]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawNetwork {
    /// Ranges re-allowed although denied by default (loopback, link-local...).
    pub allow_cidrs: Vec<IpNet>,
    /// Extra ranges to refuse; they win over `allow_cidrs`.
    pub deny_cidrs: Vec<IpNet>,
}

/// Validated settings for the whole daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the proxies' socket is bound.
    pub socket: PathBuf,
    /// Permission bits applied to the socket file.
    pub socket_mode: u32,
    /// Root of the on-disk cache.
    pub cache_dir: PathBuf,
    /// Largest module (and largest blob or archive entry) accepted, in bytes.
    pub max_module_size: u64,
    /// Timeouts and retries of upstream fetches.
    pub fetch: FetchSettings,
    /// Registries allowed over plain HTTP / unverified TLS: `host[:port]` names and IP ranges.
    pub insecure_registries: InsecureRegistries,
    /// containerd's registry hosts directory (`[registries] config_path`).
    pub registry_hosts_dir: Option<PathBuf>,
    /// Mirrors listed in `[registries."host"] mirrors`, by registry.
    pub registry_mirrors: HashMap<String, Vec<String>>,
    /// PEM bytes of extra trusted roots, read once at start.
    pub ca_pems: Vec<(PathBuf, Vec<u8>)>,
    /// Canonicalised roots `file://` urls may read from.
    pub file_roots: Vec<PathBuf>,
    /// Ranges re-allowed by the network guard.
    pub allow_cidrs: Vec<IpNet>,
    /// Ranges the network guard refuses in addition to its defaults.
    pub deny_cidrs: Vec<IpNet>,
    /// Credentials and access checks.
    pub auth: AuthSettings,
    /// Where the admin socket is bound.
    pub admin_socket: PathBuf,
    /// TCP address for `GET /metrics`, if any.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Log lines as JSON instead of text.
    pub log_json: bool,
    /// Cache lifecycle.
    pub cache: CacheSettings,
    /// Bounds on request fields.
    pub limits: Limits,
    /// Bounds on connections to the sockets.
    pub conn: ConnSettings,
    /// Threads of the async runtime (`[server] worker_threads`; `None`: one per CPU).
    pub worker_threads: Option<usize>,
    /// What is warmed at start and on SIGHUP.
    pub prefetch: PrefetchSettings,
    /// Signature policies with their keys.
    pub signatures: std::sync::Arc<crate::signature::Policies>,
    /// The OCI registry endpoint.
    pub registry: RegistrySettings,
}

/// `[registry]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySettings {
    /// TCP address of the endpoint, when it has one.
    pub addr: Option<std::net::SocketAddr>,
    /// PEM certificate chain and key for TLS on `addr`, read at start.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Upstream registries (`host[:port]`) by alias.
    pub upstreams: std::collections::BTreeMap<String, String>,
    /// Serve any artifact, not only Wasm modules.
    pub any_artifact: bool,
    /// How long a tag's manifest is served before it is resolved again.
    pub tag_ttl: Duration,
    /// Largest blob the endpoint pulls (`max_module_size`).
    pub max_blob_size: u64,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            addr: None,
            tls: None,
            upstreams: Default::default(),
            any_artifact: false,
            tag_ttl: Duration::from_secs(60),
            max_blob_size: 256 << 20,
        }
    }
}

impl RawRegistryEndpoint {
    /// Checks the aliases, reads the TLS files and fills in defaults.
    fn validate(self, max_blob_size: u64) -> Result<RegistrySettings, ConfigError> {
        let tls = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                let read = |key: &'static str, p: &Path| {
                    read_capped_file(p, MAX_SIDE_FILE)
                        .map_err(|e| invalid(key, format!("{}: {e}", p.display())))
                };
                Some((
                    read("registry.cert_file", c)?,
                    read("registry.key_file", k)?,
                ))
            }
            _ => {
                return Err(invalid(
                    "registry.cert_file",
                    "cert_file and key_file go together",
                ));
            }
        };
        if tls.is_some() && self.addr.is_none() {
            return Err(invalid(
                "registry.cert_file",
                "TLS needs a TCP listener: set registry.addr",
            ));
        }
        let mut upstreams = std::collections::BTreeMap::new();
        for (alias, target) in self.upstreams {
            let component_ok = !alias.is_empty()
                && alias.len() <= 64
                && alias
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
            if !component_ok {
                return Err(invalid(
                    "registry.upstreams",
                    format!("alias {alias:?} must be one lowercase path component"),
                ));
            }
            let target = target.trim().to_ascii_lowercase();
            match crate::source::Source::parse(&format!("oci://{target}/probe:latest")) {
                Ok(crate::source::Source::Oci(r)) if r.registry == target => {}
                _ => {
                    return Err(invalid(
                        "registry.upstreams",
                        format!("{alias} = {target:?} is not a registry host[:port]"),
                    ));
                }
            }
            upstreams.insert(alias, target);
        }
        Ok(RegistrySettings {
            max_blob_size,
            addr: self.addr,
            tls,
            upstreams,
            any_artifact: self.any_artifact,
            tag_ttl: duration(
                "registry.tag_ttl",
                &self.tag_ttl,
                RegistrySettings::default().tag_ttl,
            )?,
        })
    }
}

/// `[prefetch]`, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefetchSettings {
    /// Urls warmed at start.
    pub urls: Vec<String>,
    /// Directories of WasmPlugin manifests warmed at start and on SIGHUP.
    pub wasmplugin_dirs: Vec<PathBuf>,
    /// `/readyz` answers 503 until the warming at start is done.
    pub ready_after: bool,
    /// Modules fetched at once while warming.
    pub concurrency: usize,
}

/// `[server]`, validated: bounds on every connection to the sockets and `metrics_addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSettings {
    /// A request head must arrive within this (slow-header clients are dropped).
    pub header_read_timeout: Duration,
    /// A connection with nothing in flight and no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Most connections open at once per socket; more wait in the kernel's backlog.
    pub max_connections: usize,
}

impl Default for ConnSettings {
    fn default() -> Self {
        ConnSettings {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// `[limits]`, validated: the largest request fields accepted, in bytes. Over a limit is
/// `invalid_request` naming the field, before any work is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `url`.
    pub url: usize,
    /// `resourceName`.
    pub resource_name: usize,
    /// `resourceVersion`.
    pub resource_version: usize,
    /// `pullSecret` (the Kubernetes Secret size limit by default).
    pub pull_secret: usize,
    /// `auths` entries in a pull secret.
    pub pull_secret_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            url: 8 << 10,
            resource_name: 512,
            resource_version: 256,
            pull_secret: 1 << 20,
            pull_secret_entries: 256,
        }
    }
}

impl Limits {
    /// The largest `POST /v1/fetch` body these limits allow (fields, JSON escaping of the
    /// pull secret, and room for the rest).
    pub fn fetch_body(&self) -> usize {
        self.url + self.resource_name + self.resource_version + 2 * self.pull_secret + (64 << 10)
    }
}

/// `[cache]`, validated.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Remove modules unused for this long; `None` keeps them.
    pub unused_expiry: Option<Duration>,
    /// Sweep period.
    pub purge_interval: Duration,
    /// Bound on cached module bytes; `None` is unbounded.
    pub max_size: Option<u64>,
    /// Re-hash every blob in the background at start (besides before its first serve).
    pub scan_at_start: bool,
    /// Bytes of small modules kept in memory for hits ("0" keeps none).
    pub memory_size: u64,
}

/// When a credential verified for a cached private module must be checked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyPolicy {
    /// Trust a verification for this long (KEP-2535 style).
    Ttl(Duration),
    /// Check the registry on every cache hit.
    Always,
    /// Trust the first verification forever.
    Never,
}

/// `[auth]`, validated.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Node credentials file.
    pub docker_config: Option<PathBuf>,
    /// Whether `docker_config` may run credential helpers.
    pub allow_credential_helpers: bool,
    /// Re-verification of credentials for cached private modules.
    pub verify: VerifyPolicy,
    /// Kubelet credential provider plugins (none when not configured).
    pub providers: std::sync::Arc<crate::auth::provider::Providers>,
}

/// Registries marked `insecure`, by name or by address range (as Docker's
/// `insecure-registries`).
#[derive(Debug, Clone, Default)]
pub struct InsecureRegistries {
    /// `host[:port]`, lowercase.
    pub hosts: Vec<String>,
    /// IP ranges; a registry whose host is an IP literal in one of them matches.
    pub ranges: Vec<IpNet>,
}

impl InsecureRegistries {
    /// True when `registry` (`host[:port]` as in a reference) is marked insecure.
    pub fn matches(&self, registry: &str) -> bool {
        if self.hosts.iter().any(|h| h == registry) {
            return true;
        }
        let (host, _) = crate::source::split_port(registry);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.hosts.iter().any(|h| h == host)
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| self.ranges.iter().any(|n| n.contains(&ip)))
    }
}

/// Timeouts and retries for upstream requests.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// Timeout of one HTTP request (connect + headers + body).
    pub request_timeout: Duration,
    /// Timeout of one whole fetch, retries included.
    pub total_timeout: Duration,
    /// Retries after the first attempt for transient failures.
    pub retries: usize,
    /// First backoff delay.
    pub backoff_min: Duration,
    /// Backoff ceiling.
    pub backoff_max: Duration,
    /// Most distinct upstream operations (fetches, tag checks, access checks) at once; the
    /// others wait in line inside their `total_timeout`.
    pub max_concurrent: usize,
    /// A body that brings fewer than this many bytes per second over `min_rate_window` is a
    /// `timeout` (0: no minimum). Catches a server that drips a byte now and then, which the
    /// per-read `request_timeout` never sees.
    pub min_rate: u64,
    /// The window the minimum rate is measured over.
    pub min_rate_window: Duration,
    /// What happens when upstream fails.
    pub failures: FailureSettings,
}

/// `[fetch]` keys on upstream failures, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureSettings {
    /// When `Always` re-resolution fails with `upstream_error` or `timeout`, serve the cached
    /// module of the location (to a caller entitled to it) as `cache: "stale"`.
    pub stale_if_error: bool,
    /// A failed fetch is answered from memory with the same error for this long (zero: not).
    pub negative_ttl: Duration,
}

impl Default for FailureSettings {
    fn default() -> Self {
        FailureSettings {
            stale_if_error: true,
            negative_ttl: Duration::from_secs(10),
        }
    }
}

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("parsing config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("config key {key}: {message}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Loads `path`, or the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let raw = match path {
            None => RawConfig::default(),
            Some(p) => {
                let text =
                    read_capped_text(p, MAX_SIDE_FILE).map_err(|source| ConfigError::Read {
                        path: p.to_path_buf(),
                        source,
                    })?;
                Self::parse_raw(&text, p)?
            }
        };
        raw.validate()
    }

    /// Parses TOML text (for tests and `load`).
    pub fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn duration(
    key: &'static str,
    v: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s)
            .map_err(|e| invalid(key, format!("{s:?} is not a duration like \"15s\": {e}"))),
    }
}

/// Largest auxiliary file the daemon reads at start or on SIGHUP (manifests, keys,
/// certificates, plugin configs): more is an error, not a truncation.
pub const MAX_SIDE_FILE: u64 = 1 << 20;

/// Reads at most `max` bytes of `path`; a larger file is an `InvalidData` error naming the
/// limit, read no further. Blocking.
pub fn read_capped_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(buf)
}

/// As [`read_capped_file`], as UTF-8 text.
pub fn read_capped_text(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_capped_file(path, max)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Parses sizes like `"256MiB"`, `"10GB"`, `"4096"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"256MiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// True when this process runs as root (uid 0).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Default admin socket: beside the default proxies' socket.
pub fn default_admin_socket() -> PathBuf {
    default_paths().0.with_file_name("admin.sock")
}

/// Default socket and cache paths: system paths for root, per-user paths otherwise.
pub fn default_paths() -> (PathBuf, PathBuf) {
    if running_as_root() {
        return (
            PathBuf::from("/run/wasm-cache/wasm-cache.sock"),
            PathBuf::from("/var/lib/wasm-cache"),
        );
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let runtime = env("XDG_RUNTIME_DIR").unwrap_or_else(std::env::temp_dir);
    let cache = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    (
        runtime.join("wasm-cache").join("wasm-cache.sock"),
        cache.join("wasm-cache"),
    )
}

impl RawConfig {
    /// Checks every value and fills in defaults.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let (default_socket, default_cache) = default_paths();
        let socket_mode = match &self.socket_mode {
            None => 0o660,
            Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    invalid(
                        "socket_mode",
                        format!("{s:?} is not an octal mode like \"0660\""),
                    )
                })?,
        };
        let max_module_size = match &self.max_module_size {
            None => 256 << 20,
            Some(s) => parse_size(s).map_err(|m| invalid("max_module_size", m))?,
        };
        if max_module_size == 0 {
            return Err(invalid("max_module_size", "must be positive"));
        }
        let f = &self.fetch;
        let fetch = FetchSettings {
            request_timeout: duration(
                "fetch.request_timeout",
                &f.request_timeout,
                Duration::from_secs(15),
            )?,
            total_timeout: duration(
                "fetch.total_timeout",
                &f.total_timeout,
                Duration::from_secs(300),
            )?,
            retries: f.retries.unwrap_or(4),
            backoff_min: duration(
                "fetch.backoff_min",
                &f.backoff_min,
                Duration::from_millis(500),
            )?,
            backoff_max: duration("fetch.backoff_max", &f.backoff_max, Duration::from_secs(30))?,
            min_rate: match &f.min_rate {
                None => 1 << 10,
                Some(v) => parse_size(v).map_err(|m| invalid("fetch.min_rate", m))?,
            },
            min_rate_window: duration(
                "fetch.min_rate_window",
                &f.min_rate_window,
                Duration::from_secs(30),
            )?,
            failures: FailureSettings {
                stale_if_error: f.stale_if_error.unwrap_or(true),
                negative_ttl: duration(
                    "fetch.negative_ttl",
                    &f.negative_ttl,
                    FailureSettings::default().negative_ttl,
                )?,
            },
            max_concurrent: match f.max_concurrent {
                None => 8,
                Some(n) if (1..=1024).contains(&n) => n,
                Some(_) => {
                    return Err(invalid(
                        "fetch.max_concurrent",
                        "must be between 1 and 1024",
                    ));
                }
            },
        };
        if fetch.backoff_min > fetch.backoff_max {
            return Err(invalid(
                "fetch.backoff_min",
                "must not exceed fetch.backoff_max",
            ));
        }
        let mut ca_pems = Vec::new();
        for path in &self.tls.ca_files {
            let pem = read_capped_file(path, MAX_SIDE_FILE)
                .map_err(|e| invalid("tls.ca_files", format!("reading {}: {e}", path.display())))?;
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                invalid(
                    "tls.ca_files",
                    format!("{} is not a PEM certificate: {e}", path.display()),
                )
            })?;
            ca_pems.push((path.clone(), pem));
        }
        let mut file_roots = Vec::new();
        for root in &self.file.allowed_roots {
            let canon = std::fs::canonicalize(root)
                .map_err(|e| invalid("file.allowed_roots", format!("{}: {e}", root.display())))?;
            file_roots.push(canon);
        }
        let mut insecure_registries = InsecureRegistries::default();
        for (key, r) in &self.registries.hosts {
            if !r.insecure {
                continue;
            }
            match key.parse::<IpNet>() {
                Ok(net) => insecure_registries.ranges.push(net),
                Err(_) => insecure_registries.hosts.push(key.to_ascii_lowercase()),
            }
        }
        insecure_registries.hosts.sort();
        let ttl = duration(
            "auth.verify_ttl",
            &self.auth.verify_ttl,
            Duration::from_secs(3600),
        )?;
        let verify = match self.auth.verify.as_deref().unwrap_or("ttl") {
            "ttl" => VerifyPolicy::Ttl(ttl),
            "always" => VerifyPolicy::Always,
            "never" => VerifyPolicy::Never,
            other => {
                return Err(invalid(
                    "auth.verify",
                    format!("{other:?}: expected \"ttl\", \"always\" or \"never\""),
                ));
            }
        };
        let providers = match (
            &self.auth.credential_provider_config,
            &self.auth.credential_provider_bin_dir,
        ) {
            (None, None) => crate::auth::provider::Providers::default(),
            (Some(config), Some(bin_dir)) => {
                let timeout = duration(
                    "auth.credential_provider_timeout",
                    &self.auth.credential_provider_timeout,
                    Duration::from_secs(30),
                )?;
                crate::auth::provider::Providers::load(config, bin_dir, timeout)
                    .map_err(|m| invalid("auth.credential_provider_config", m))?
            }
            _ => {
                return Err(invalid(
                    "auth.credential_provider_config",
                    "credential_provider_config and credential_provider_bin_dir go together",
                ));
            }
        };
        let auth = AuthSettings {
            docker_config: self.auth.docker_config.clone(),
            allow_credential_helpers: self.auth.allow_credential_helpers,
            verify,
            providers: std::sync::Arc::new(providers),
        };
        let c = &self.cache;
        let expiry = duration(
            "cache.unused_expiry",
            &c.unused_expiry,
            Duration::from_secs(24 * 3600),
        )?;
        let purge_interval = duration(
            "cache.purge_interval",
            &c.purge_interval,
            Duration::from_secs(3600),
        )?;
        if purge_interval.is_zero() {
            return Err(invalid("cache.purge_interval", "must be positive"));
        }
        let max_size = match &c.max_size {
            None => None,
            Some(s) => Some(parse_size(s).map_err(|m| invalid("cache.max_size", m))?),
        };
        let memory_size = match &c.memory_size {
            None => 64 << 20,
            Some(s) => parse_size(s).map_err(|m| invalid("cache.memory_size", m))?,
        };
        let scan_at_start = match c.verify_blobs.as_deref().unwrap_or("lazy") {
            "lazy" => false,
            "scan" => true,
            other => {
                return Err(invalid(
                    "cache.verify_blobs",
                    format!("{other:?}: expected \"lazy\" or \"scan\""),
                ));
            }
        };
        let cache = CacheSettings {
            unused_expiry: (!expiry.is_zero()).then_some(expiry),
            purge_interval,
            max_size,
            scan_at_start,
            memory_size,
        };
        let log_json = match self.log.format.as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("{other:?}: expected \"text\" or \"json\""),
                ));
            }
        };
        let defaults = Limits::default();
        let size_limit =
            |key: &'static str, v: &Option<String>, default: usize| -> Result<usize, ConfigError> {
                match v {
                    None => Ok(default),
                    Some(s) => {
                        let n = parse_size(s).map_err(|m| invalid(key, m))?;
                        if n == 0 || n > (64 << 20) {
                            return Err(invalid(key, "must be between 1 byte and 64MiB"));
                        }
                        Ok(n as usize)
                    }
                }
            };
        let limits = Limits {
            url: size_limit("limits.url", &self.limits.url, defaults.url)?,
            resource_name: size_limit(
                "limits.resource_name",
                &self.limits.resource_name,
                defaults.resource_name,
            )?,
            resource_version: size_limit(
                "limits.resource_version",
                &self.limits.resource_version,
                defaults.resource_version,
            )?,
            pull_secret: size_limit(
                "limits.pull_secret",
                &self.limits.pull_secret,
                defaults.pull_secret,
            )?,
            pull_secret_entries: match self.limits.pull_secret_entries {
                None => defaults.pull_secret_entries,
                Some(0) => return Err(invalid("limits.pull_secret_entries", "must be positive")),
                Some(n) => n,
            },
        };
        let conn_defaults = ConnSettings::default();
        let conn = ConnSettings {
            header_read_timeout: duration(
                "server.header_read_timeout",
                &self.server.header_read_timeout,
                conn_defaults.header_read_timeout,
            )?,
            idle_timeout: duration(
                "server.idle_timeout",
                &self.server.idle_timeout,
                conn_defaults.idle_timeout,
            )?,
            max_connections: match self.server.max_connections {
                None => conn_defaults.max_connections,
                Some(n) if (1..=1 << 20).contains(&n) => n,
                Some(_) => {
                    return Err(invalid(
                        "server.max_connections",
                        "must be between 1 and 1048576",
                    ));
                }
            },
        };
        if conn.header_read_timeout.is_zero() || conn.idle_timeout.is_zero() {
            return Err(invalid(
                "server",
                "header_read_timeout and idle_timeout must be positive",
            ));
        }
        let worker_threads = match self.server.worker_threads {
            None => None,
            Some(n) if (1..=1024).contains(&n) => Some(n),
            Some(_) => {
                return Err(invalid(
                    "server.worker_threads",
                    "must be between 1 and 1024",
                ));
            }
        };
        let p = self.prefetch;
        let prefetch = PrefetchSettings {
            concurrency: match p.concurrency {
                None => 4,
                Some(n) if (1..=64).contains(&n) => n,
                Some(_) => {
                    return Err(invalid("prefetch.concurrency", "must be between 1 and 64"));
                }
            },
            urls: p.urls,
            wasmplugin_dirs: p.wasmplugin_dirs,
            ready_after: p.ready_after,
        };
        let signatures = crate::signature::Policies::load(&self.signatures.policy)
            .map_err(|m| invalid("signatures.policy", m))?;
        let registry = self.registry.validate(max_module_size)?;
        Ok(Config {
            registry,
            conn,
            worker_threads,
            prefetch,
            signatures: std::sync::Arc::new(signatures),
            limits,
            metrics_addr: self.metrics_addr,
            log_json,
            admin_socket: self.admin_socket.unwrap_or_else(default_admin_socket),
            cache,
            auth,
            socket: self.socket.unwrap_or(default_socket),
            socket_mode,
            cache_dir: self.cache_dir.unwrap_or(default_cache),
            max_module_size,
            fetch,
            insecure_registries,
            registry_hosts_dir: self.registries.config_path.clone(),
            registry_mirrors: self
                .registries
                .hosts
                .iter()
                .filter(|(_, r)| !r.mirrors.is_empty())
                .map(|(k, r)| (k.to_ascii_lowercase(), r.mirrors.clone()))
                .collect(),
            ca_pems,
            file_roots,
            allow_cidrs: self.network.allow_cidrs,
            deny_cidrs: self.network.deny_cidrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example config documents every key: it parses, and what it sets is the default.
    #[test]
    fn the_example_config_parses_to_the_defaults() {
        let text = include_str!("../config/wasm-cache.toml");
        let example = Config::parse_raw(text, Path::new("config/wasm-cache.toml"))
            .unwrap()
            .validate()
            .unwrap();
        let defaults = Config::parse_raw("", Path::new("empty.toml"))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(example.limits, defaults.limits);
        assert_eq!(example.registry, defaults.registry);
        assert_eq!(example.conn, defaults.conn);
        assert_eq!(example.fetch.max_concurrent, defaults.fetch.max_concurrent);
        assert_eq!(example.fetch.min_rate, defaults.fetch.min_rate);
        assert_eq!(
            example.fetch.min_rate_window,
            defaults.fetch.min_rate_window
        );
        assert_eq!(example.max_module_size, defaults.max_module_size);
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_raw(text, Path::new("t.toml"))?.validate()
    }

    #[test]
    fn empty_config_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.max_module_size, 256 << 20);
        assert_eq!(c.fetch.request_timeout, Duration::from_secs(15));
        assert!(c.file_roots.is_empty() && c.allow_cidrs.is_empty());
        assert_eq!(c.auth.verify, VerifyPolicy::Ttl(Duration::from_secs(3600)));
        assert!(!c.auth.allow_credential_helpers);
        assert_eq!(c.cache.unused_expiry, Some(Duration::from_secs(86400)));
        assert_eq!(c.cache.max_size, None);
        assert_eq!(c.cache.memory_size, 64 << 20);
        assert_eq!(c.admin_socket.file_name().unwrap(), "admin.sock");
    }

    #[test]
    // Fixture files, not cache files.
    #[allow(clippy::disallowed_methods)]
    fn side_files_over_their_cap_are_refused_not_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![b'x'; 11]).unwrap();
        assert_eq!(read_capped_file(&p, 11).unwrap().len(), 11);
        let e = read_capped_file(&p, 10).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("larger than 10 bytes"), "{e}");
    }

    #[test]
    fn worker_threads_are_bounded() {
        assert_eq!(parse("").unwrap().worker_threads, None);
        let c = parse("[server]\nworker_threads = 1\n").unwrap();
        assert_eq!(c.worker_threads, Some(1));
        let e = parse("[server]\nworker_threads = 0\n").unwrap_err();
        assert!(e.to_string().contains("server.worker_threads"), "{e}");
    }

    #[test]
    fn memory_size_parses_and_zero_keeps_nothing_in_memory() {
        let c = parse("[cache]\nmemory_size = \"0\"\n").unwrap();
        assert_eq!(c.cache.memory_size, 0);
        let c = parse("[cache]\nmemory_size = \"8MiB\"\n").unwrap();
        assert_eq!(c.cache.memory_size, 8 << 20);
        let e = parse("[cache]\nmemory_size = \"lots\"\n").unwrap_err();
        assert!(e.to_string().contains("cache.memory_size"), "{e}");
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"
            socket = "/tmp/x.sock"
            socket_mode = "0600"
            cache_dir = "/tmp/c"
            max_module_size = "2MiB"
            [fetch]
            request_timeout = "2s"
            retries = 1
            [registries."LocalHost:5000"]
            insecure = true
            [registries."127.0.0.0/8"]
            insecure = true
            [registries."secure.example.com"]
            insecure = false
            [file]
            allowed_roots = ["/tmp"]
            [network]
            allow_cidrs = ["127.0.0.0/8"]
            "#,
        )
        .unwrap();
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.max_module_size, 2 << 20);
        assert_eq!(c.fetch.retries, 1);
        let i = &c.insecure_registries;
        assert!(i.matches("localhost:5000") && i.matches("127.0.0.9:80"));
        assert!(!i.matches("localhost:5001") && !i.matches("secure.example.com"));
        assert_eq!(c.allow_cidrs.len(), 1);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("socket_mode = \"999\"", "socket_mode"),
            ("max_module_size = \"12 parsecs\"", "max_module_size"),
            (
                "[fetch]\nrequest_timeout = \"soon\"",
                "fetch.request_timeout",
            ),
            (
                "[file]\nallowed_roots = [\"/does/not/exist\"]",
                "file.allowed_roots",
            ),
        ] {
            match parse(text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("unknown_key = 1"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1kb").unwrap(), 1000);
        assert!(parse_size("MiB").is_err());
    }
}
