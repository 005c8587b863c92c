//! The wire types of both sockets, shared by the servers, the client and the CLI: every JSON
//! body the daemon reads or writes is one of these, so no side builds JSON by hand.
//!
//! Times on the wire are unix milliseconds (`lastUsed`, `pulledAt`); sizes are bytes.

use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::digest::Digest;
use crate::error::{Code, Error};

/// Body of `POST /v1/fetch`, as WasmPlugin spells it.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FetchBody {
    /// The WasmPlugin `url`.
    pub url: String,
    /// Expected sha256 (module, manifest or index digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `imagePullPolicy`.
    #[serde(
        default,
        alias = "imagePullPolicy",
        skip_serializing_if = "Option::is_none"
    )]
    pub pull_policy: Option<String>,
    /// `.dockerconfigjson` payload of the image pull secret (JSON text or its base64).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "expose_secret"
    )]
    pub pull_secret: Option<Secret>,
    /// Which plugin resource asks, e.g. `ns/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<String>,
    /// The plugin resource's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// The plugin's name, for logs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
}

/// The pull secret goes on the wire only inside a fetch request (CLI to daemon).
fn expose_secret<S: serde::Serializer>(s: &Option<Secret>, ser: S) -> Result<S::Ok, S::Error> {
    match s {
        Some(s) => ser.serialize_some(s.expose()),
        None => ser.serialize_none(),
    }
}

/// How the cache answered a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStatus {
    /// Served from the cache with no upstream traffic.
    Hit,
    /// Downloaded.
    Miss,
    /// Served from the cache after asking upstream (the tag did not move, or the registry
    /// confirmed the caller's access).
    Revalidated,
    /// Served from the cache because re-resolving the location failed upstream
    /// (`[fetch] stale_if_error`).
    Stale,
}

impl CacheStatus {
    /// The wire spelling, also the `result` label of the lookup metric.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Stale => "stale",
        }
    }
}

/// Answer of `POST /v1/fetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchResponse {
    /// `sha256:<hex>` of the module bytes.
    pub digest: Digest,
    /// Module size in bytes.
    pub size: u64,
    /// Path on this socket that serves the module (with a token for a private module).
    pub module_url: String,
    /// OCI: the manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<Digest>,
    /// `hit`, `miss` or `revalidated`.
    pub cache: CacheStatus,
}

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inner error object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: Code,
    /// Human message; never holds a secret.
    pub message: String,
}

impl From<&Error> for ErrorBody {
    fn from(e: &Error) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: e.code,
                message: e.message.clone(),
            },
        }
    }
}

impl From<ErrorBody> for Error {
    fn from(b: ErrorBody) -> Self {
        Error::new(b.error.code, b.error.message)
    }
}

/// One cached module, as `wasm-cache ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleInfo {
    /// sha256 of the module bytes.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Locations (urls) that map to it.
    pub locations: Vec<String>,
    /// When it was last served (unix ms), if ever since it was cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<u64>,
    /// When it was first downloaded (unix ms).
    pub pulled_at: u64,
    /// True when some source it comes from may be read by anyone.
    pub public: bool,
    /// The id of the key that verified its signature, when a policy checked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<String>,
}

impl ModuleInfo {
    /// When it was last served, or pulled if never served since (unix ms): the LRU order.
    pub fn last_touched(&self) -> u64 {
        self.last_used.unwrap_or(self.pulled_at)
    }
}

/// Answer of `GET /v1/admin/modules`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModuleList {
    /// Every cached module, ordered by digest.
    pub modules: Vec<ModuleInfo>,
}

/// Body of `POST /v1/admin/purge`: exactly one selector.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PurgeBody {
    /// Remove everything.
    #[serde(default)]
    pub all: bool,
    /// Remove what this url maps to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Remove this module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Remove modules unused for this long, e.g. "7d".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused_for: Option<String>,
    /// Only report what would be removed.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a purge removed (or would remove, on a dry run).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PurgeReport {
    /// The modules.
    pub removed: Vec<ModuleInfo>,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// True when nothing was removed because it was a dry run.
    pub dry_run: bool,
}

/// Answer of `GET /v1/admin/stats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StatsReport {
    /// Cached modules.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Configured bound, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Fetch hits since start.
    pub hits: u64,
    /// Fetch misses since start.
    pub misses: u64,
    /// Revalidated fetches since start.
    pub revalidated: u64,
    /// Failed fetches since start.
    pub errors: u64,
    /// Evictions since start.
    pub evictions: u64,
    /// Modules purged since start.
    pub purged: u64,
    /// Corrupt blobs dropped since start.
    pub corrupt: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_body_round_trips_with_its_secret_and_istio_spelling() {
        let body = FetchBody {
            url: "oci://r/x:1".into(),
            pull_secret: Some(Secret::new("{\"auths\":{}}")),
            resource_version: Some("7".into()),
            ..Default::default()
        };
        let text = serde_json::to_string(&body).unwrap();
        assert_eq!(
            text,
            r#"{"url":"oci://r/x:1","pullSecret":"{\"auths\":{}}","resourceVersion":"7"}"#
        );
        let back: FetchBody = serde_json::from_str(&text).unwrap();
        assert_eq!(back.pull_secret.unwrap().expose(), "{\"auths\":{}}");
        let istio: FetchBody =
            serde_json::from_str(r#"{"url":"u","imagePullPolicy":"Always"}"#).unwrap();
        assert_eq!(istio.pull_policy.as_deref(), Some("Always"));
        assert!(serde_json::from_str::<FetchBody>(r#"{"url":"u","bogus":1}"#).is_err());
    }

    #[test]
    fn errors_keep_their_code_across_the_wire() {
        let e = Error::new(Code::ChecksumMismatch, "expected x");
        let text = serde_json::to_string(&ErrorBody::from(&e)).unwrap();
        assert_eq!(
            text,
            r#"{"error":{"code":"checksum_mismatch","message":"expected x"}}"#
        );
        let back: Error = serde_json::from_str::<ErrorBody>(&text).unwrap().into();
        assert_eq!(back, e);
    }
}
