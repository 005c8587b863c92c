//! Raw content for the registry endpoint: manifests and blobs exactly as the registry serves
//! them (bytes, digest, `Content-Type`), each checked against its digest, and what a
//! manifest says about its scope (a Wasm artifact or not) and the blobs it references.

use futures_util::FutureExt;

use reqwest::header::CONTENT_TYPE;

use super::manifest::{
    DOCKER_LIST, Descriptor, ManifestDoc, OCI_INDEX, TAR_GZIP_LAYERS, WASM_LAYERS, parse_digest,
    pick_from_index,
};
use super::{Authorized, OciFetcher};
use crate::auth::Credential;
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::source::OciRef;

/// Config media types of Wasm artifacts: the CNCF one and Solo's.
const WASM_CONFIGS: &[&str] = &[
    "application/vnd.wasm.config.v0+json",
    "application/vnd.module.wasm.config.v1+json",
];
/// Largest manifest the endpoint stores (what the fetcher reads).
pub const MAX_MANIFEST_BYTES: u64 = super::manifest::MAX_MANIFEST;
/// Most descriptors a manifest the endpoint serves may list.
pub const MAX_REFS: usize = 1024;

/// A manifest as the registry served it.
#[derive(Debug, Clone)]
pub struct RawManifest {
    /// The bytes, unchanged.
    pub bytes: bytes::Bytes,
    /// Their sha256.
    pub digest: Digest,
    /// The `Content-Type` it was served with (or the body's `mediaType`).
    pub media_type: String,
    /// The mirror that served it (`host[:port]`), when not the registry itself.
    pub served_by: Option<String>,
}

/// A blob as the registry served it, in a temp file of the store.
#[derive(Debug)]
pub struct RawBlob {
    /// The bytes, checked against the digest asked for.
    pub file: tempfile::NamedTempFile,
    /// Size in bytes.
    pub size: u64,
    /// The `Content-Type` it was served with.
    pub media_type: String,
    /// The mirror that served it (`host[:port]`), when not the registry itself.
    pub served_by: Option<String>,
}

/// What the endpoint needs to know about a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// An image index or manifest list.
    pub index: bool,
    /// Manifests: config and layers; indexes: the manifests listed.
    pub refs: Vec<Digest>,
    /// Indexes: the entry a Wasm client follows (what decides the index's scope).
    pub picked: Option<Digest>,
    /// Manifests: a Wasm artifact (Solo's or the CNCF one) by its media types.
    pub wasm: bool,
    /// Manifests: the layer of a "compat" image (one tar+gzip layer, which must hold
    /// `plugin.wasm`).
    pub compat_layer: Option<Digest>,
}

/// Reads what a manifest references and whether it is a Wasm artifact. `invalid_module` for
/// something that is not a schema 2 manifest or index, or lists more than [`MAX_REFS`].
pub fn describe(bytes: &[u8], media_type: &str) -> Result<Described> {
    let doc: ManifestDoc = serde_json::from_slice(bytes).map_err(|e| {
        Error::new(
            Code::InvalidModule,
            format!("the manifest is not valid JSON: {e}"),
        )
    })?;
    if doc.schema_version != 2 {
        return Err(Error::new(
            Code::InvalidModule,
            format!("unsupported manifest schema version {}", doc.schema_version),
        ));
    }
    let mt = doc.media_type.as_deref().unwrap_or(media_type);
    let index =
        matches!(mt, OCI_INDEX | DOCKER_LIST) || (doc.manifests.is_some() && doc.layers.is_none());
    let digests = |list: &[Descriptor]| -> Result<Vec<Digest>> {
        if list.len() > MAX_REFS {
            return Err(Error::new(
                Code::InvalidModule,
                format!(
                    "the manifest lists {} descriptors, more than {MAX_REFS}",
                    list.len()
                ),
            ));
        }
        list.iter()
            .map(|d| parse_digest(&d.digest, "descriptor digest"))
            .collect()
    };
    if index {
        let entries = doc.manifests.unwrap_or_default();
        let picked = pick_from_index(&entries)
            .map(|d| parse_digest(&d.digest, "index entry digest"))
            .transpose()?;
        return Ok(Described {
            index: true,
            refs: digests(&entries)?,
            picked,
            wasm: false,
            compat_layer: None,
        });
    }
    let layers = doc.layers.unwrap_or_default();
    let mut listed: Vec<Descriptor> = layers.clone();
    let config_type = doc.config.as_ref().map(|c| c.media_type.clone());
    listed.extend(doc.config);
    let wasm = config_type
        .as_deref()
        .is_some_and(|t| WASM_CONFIGS.contains(&t))
        || layers
            .iter()
            .any(|l| WASM_LAYERS.contains(&l.media_type.as_str()));
    let refs = digests(&listed)?;
    let compat_layer = match layers.as_slice() {
        [only] if !wasm && TAR_GZIP_LAYERS.contains(&only.media_type.as_str()) => {
            Some(parse_digest(&only.digest, "layer digest")?)
        }
        _ => None,
    };
    Ok(Described {
        index: false,
        refs,
        picked: None,
        wasm,
        compat_layer,
    })
}

impl OciFetcher {
    /// GETs manifest `reference` (a tag or digest) of `r`'s repository as served: for an
    /// anonymous request from the node's mirrors first (those that may resolve tags, for a
    /// tag), then from the registry with the first of `creds` it accepts.
    pub async fn raw_manifest(
        &self,
        r: &OciRef,
        reference: &str,
        creds: &[Credential],
    ) -> Result<Authorized<RawManifest>> {
        let by_digest = reference.starts_with("sha256:");
        let usable = |ep: &super::hosts::Endpoint| if by_digest { ep.pull } else { ep.resolve };
        let from_mirror = self
            .first_mirror(r, creds, usable, |mut s| {
                async move { self.manifest_bytes(&mut s, reference).await.map(Some) }.boxed()
            })
            .await;
        if let Some((got, mirror)) = from_mirror {
            return Ok(Authorized {
                value: raw_manifest(got, Some(mirror)),
                credential: None,
            });
        }
        let mut s = self.authorized_session(r, creds).await?;
        let got = self.manifest_bytes(&mut s, reference).await?;
        Ok(Authorized {
            value: raw_manifest(got, None),
            credential: s.cred,
        })
    }

    /// Streams blob `digest` of `r`'s repository into a temp file (checked against the
    /// digest, at most `max_module_size` bytes): for an anonymous request from the node's
    /// mirrors first, then from the registry. `r` names a manifest of the repository, which
    /// the session probes when there are several credentials.
    pub async fn raw_blob(
        &self,
        r: &OciRef,
        digest: &Digest,
        creds: &[Credential],
    ) -> Result<Authorized<RawBlob>> {
        let blob = |(file, _, size, media_type): (_, Digest, u64, Option<String>),
                    served_by: Option<String>| RawBlob {
            file,
            size,
            media_type: media_type.unwrap_or_else(|| "application/octet-stream".into()),
            served_by,
        };
        let from_mirror = self
            .first_mirror(
                r,
                creds,
                |ep| ep.pull,
                |mut s| async move { self.blob_typed(&mut s, 0, *digest).await.map(Some) }.boxed(),
            )
            .await;
        if let Some((got, mirror)) = from_mirror {
            return Ok(Authorized {
                value: blob(got, Some(mirror)),
                credential: None,
            });
        }
        let mut s = self.authorized_session(r, creds).await?;
        let got = self.blob_typed(&mut s, 0, *digest).await?;
        Ok(Authorized {
            value: blob(got, None),
            credential: s.cred,
        })
    }
}

/// A manifest as [`OciFetcher::manifest_bytes`] read it: its media type from the
/// `Content-Type` header, else the body's `mediaType`.
fn raw_manifest(
    (bytes, digest, header_type): (Vec<u8>, Digest, Option<String>),
    served_by: Option<String>,
) -> RawManifest {
    let media_type = header_type
        .filter(|t| !t.trim().is_empty())
        .or_else(|| {
            serde_json::from_slice::<ManifestDoc>(&bytes)
                .ok()
                .and_then(|d| d.media_type)
        })
        .unwrap_or_else(|| super::OCI_MANIFEST.to_string());
    RawManifest {
        bytes: bytes.into(),
        digest,
        media_type,
        served_by,
    }
}

/// The `Content-Type` of a response, as sent.
pub(super) fn content_type(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn describes_wasm_artifacts_images_and_indexes() {
        let cncf = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.wasm.config.v0+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/wasm","digest":"{}","size":8}}]}}"#,
            d('a'),
            d('b')
        );
        let got = describe(cncf.as_bytes(), super::super::OCI_MANIFEST).unwrap();
        assert!(got.wasm && got.compat_layer.is_none() && !got.index);
        assert_eq!(got.refs.len(), 2);
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":8}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":8}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let got = describe(image.as_bytes(), super::super::OCI_MANIFEST).unwrap();
        assert!(
            !got.wasm && got.compat_layer.is_none(),
            "a two-layer image is not a compat image"
        );
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1,"platform":{{"architecture":"wasm","os":"wasip1"}}}}]}}"#,
            d('a'),
            d('b')
        );
        let got = describe(index.as_bytes(), "").unwrap();
        assert!(got.index);
        assert_eq!(got.picked, Some(d('b').parse().unwrap()));
        for bad in [
            "{}",
            "[",
            r#"{"schemaVersion":2,"layers":[{"digest":"../x"}]}"#,
        ] {
            assert_eq!(
                describe(bad.as_bytes(), "").unwrap_err().code,
                Code::InvalidModule,
                "{bad}"
            );
        }
    }
}
