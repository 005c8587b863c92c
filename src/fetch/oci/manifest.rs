//! Manifests and indexes: the media types we read, fetching a manifest with its digest
//! verified, and choosing the manifest to follow from an index.

use std::collections::HashMap;

use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;

use super::OciFetcher;
use super::session::Session;
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::fetch::client::Body;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Every manifest type we read, for `Accept`.
pub(super) const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Layer types that are the raw module: Solo's artifact, the CNCF artifact, and a variant
/// seen in the wild.
pub(super) const WASM_LAYERS: &[&str] = &[
    "application/vnd.module.wasm.content.layer.v1+wasm",
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
];
/// Layer types of the "compat" image: a gzip'd tar holding `plugin.wasm`.
pub(super) const TAR_GZIP_LAYERS: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];
/// Largest manifest we read.
pub(super) const MAX_MANIFEST: u64 = 4 << 20;
/// How many index levels we follow.
pub(super) const MAX_INDEX_DEPTH: usize = 3;

/// A content descriptor, as in manifests and indexes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Descriptor {
    /// The content's media type.
    #[serde(default)]
    pub(super) media_type: String,
    /// Referrers: the artifact type (e.g. a Sigstore bundle).
    #[serde(default)]
    pub(super) artifact_type: String,
    /// `sha256:<hex>`.
    pub(super) digest: String,
    /// Declared size in bytes.
    #[serde(default)]
    pub(super) size: u64,
    /// Index entries: the platform the manifest is for.
    #[serde(default)]
    pub(super) platform: Option<Platform>,
    /// Index entries: annotations (attestations are marked here).
    #[serde(default)]
    pub(super) annotations: HashMap<String, String>,
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct Platform {
    /// e.g. `wasm`, `amd64`, `unknown`.
    #[serde(default)]
    pub(super) architecture: String,
    /// e.g. `wasip1`, `linux`, `unknown`.
    #[serde(default)]
    pub(super) os: String,
}

/// The parts of a manifest or index we read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ManifestDoc {
    /// Schema version; 2 for everything we read.
    #[serde(default)]
    pub(super) schema_version: u32,
    /// Media type declared in the body (optional in OCI).
    #[serde(default)]
    pub(super) media_type: Option<String>,
    /// Index: the manifests it lists.
    #[serde(default)]
    pub(super) manifests: Option<Vec<Descriptor>>,
    /// Manifest: the layers.
    #[serde(default)]
    pub(super) layers: Option<Vec<Descriptor>>,
    /// Manifest: the config blob.
    #[serde(default)]
    pub(super) config: Option<Descriptor>,
}

impl OciFetcher {
    /// GETs a manifest, verifying its digest. Returns it parsed, its digest and media type.
    pub(super) async fn manifest(
        &self,
        s: &mut Session<'_>,
        reference: &str,
    ) -> Result<(ManifestDoc, Digest, String)> {
        let what = format!("manifest {}/{}:{reference}", s.registry, s.repository);
        let (body, digest, header_type) = self.manifest_bytes(s, reference).await?;
        let header_type = header_type.map(|v| v.split(';').next().unwrap_or("").trim().to_string());
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
}

impl OciFetcher {
    /// GETs a manifest's bytes exactly as served, capped at [`MAX_MANIFEST`], checked against
    /// the digest it was asked by and the `Docker-Content-Digest` header. Returns the bytes,
    /// their digest and the `Content-Type` header.
    pub(super) async fn manifest_bytes(
        &self,
        s: &mut Session<'_>,
        reference: &str,
    ) -> Result<(Vec<u8>, Digest, Option<String>)> {
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
            .map(str::to_string);
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        let mut stream = Body::new(resp, &self.settings);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|a| a.error)?;
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
        Ok((body, digest, header_type))
    }
}

/// Picks the manifest to follow from an index: a `wasm` platform entry if any, else the
/// only (or first) entry that is not an attestation or unknown platform.
pub(super) fn pick_from_index(entries: &[Descriptor]) -> Option<&Descriptor> {
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

/// A digest inside a manifest or index: exactly `sha256:` and 64 lowercase hex digits, or the
/// manifest is `invalid_module` (its digests become request paths).
pub(super) fn parse_digest(s: &str, what: &str) -> Result<Digest> {
    Digest::parse_canonical(s).ok_or_else(|| {
        let shown: String = s.chars().take(80).collect();
        Error::new(
            Code::InvalidModule,
            format!("{what} {shown:?} is not sha256:<64 lowercase hex digits>"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(media_type: &str, arch: &str, os: &str, attestation: bool) -> Descriptor {
        let mut annotations = HashMap::new();
        if attestation {
            annotations.insert(
                "vnd.docker.reference.type".into(),
                "attestation-manifest".into(),
            );
        }
        Descriptor {
            artifact_type: String::new(),
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
    fn issue_9_digests_in_manifests_must_be_sha256_hex() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert!(parse_digest(&good, "layer digest").is_ok());
        for bad in [
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha512:{}", "ab".repeat(32)),
            format!("sha256:{}/../../x", "ab".repeat(32)),
            "ab".repeat(32),
            "../../v2/other/manifests/latest".to_string(),
        ] {
            let e = parse_digest(&bad, "layer digest").unwrap_err();
            assert_eq!(e.code, Code::InvalidModule, "{bad}");
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

    proptest::proptest! {
        /// Issue 9: any index picks a manifest or none, never panics; any manifest document
        /// parses or is refused.
        #[test]
        fn any_index_or_manifest_is_handled(
            entries in proptest::collection::vec(
                (
                    proptest::sample::select(vec![OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST, "x", ""]),
                    proptest::sample::select(vec!["wasm", "amd64", "unknown", ""]),
                    proptest::sample::select(vec!["wasip1", "linux", "unknown", ""]),
                    proptest::prelude::any::<bool>(),
                ),
                0..12,
            ),
            doc in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let entries: Vec<Descriptor> = entries
                .into_iter()
                .map(|(m, a, o, att)| entry(m, a, o, att))
                .collect();
            if let Some(d) = pick_from_index(&entries) {
                proptest::prop_assert!(entries.iter().any(|e| e.digest == d.digest));
            }
            let _ = serde_json::from_slice::<ManifestDoc>(&doc);
        }
    }
}
