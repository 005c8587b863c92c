//! Layer blobs: streamed into a temp file of the store while their digest and size are
//! checked, through the session's one challenge-and-retry path.

use reqwest::Method;

use super::OciFetcher;
use super::manifest::Descriptor;
use super::session::Session;
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::fetch::client::{Attempt, download};

impl OciFetcher {
    /// A copy of a blob this same source served before, as a new temp file (no download),
    /// checked against its digest on the way (it may be what a damaged index left).
    pub(super) async fn copy_stored(
        &self,
        digest: &Digest,
    ) -> Result<Option<(tempfile::NamedTempFile, Digest, u64)>> {
        let src = self.store.blob_path(digest);
        let mut file = match tokio::fs::File::open(&src).await {
            Ok(f) => f,
            Err(_) => return Ok(None),
        };
        let mut w = self
            .store
            .writer(self.max_size, &format!("cached blob {digest}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf)
                .await
                .map_err(|e| Error::io("copying cached blob", e))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n]).await?;
        }
        let out = w.finish().await?;
        Ok((out.1 == *digest).then_some(out))
    }

    /// Streams a blob into a temp file, checking its size and digest. The request goes
    /// through the session's challenge-and-retry path (a token that expired since the
    /// manifest was read is renewed); a body cut short is downloaded again, with backoff,
    /// up to `[fetch] retries` times.
    pub(super) async fn blob(
        &self,
        s: &mut Session<'_>,
        layer: &Descriptor,
        digest: Digest,
    ) -> Result<(tempfile::NamedTempFile, Digest, u64)> {
        let (file, d, size, _) = self.blob_typed(s, layer.size, digest).await?;
        Ok((file, d, size))
    }

    /// [`OciFetcher::blob`] with the blob's declared size (0: unknown), also returning the
    /// `Content-Type` it was served with.
    pub(super) async fn blob_typed(
        &self,
        s: &mut Session<'_>,
        declared: u64,
        digest: Digest,
    ) -> Result<(tempfile::NamedTempFile, Digest, u64, Option<String>)> {
        let what = format!("blob {digest} of {}/{}", s.registry, s.repository);
        let path = format!("blobs/{digest}");
        let mut attempt = 0;
        let out = loop {
            let resp = self.request(s, Method::GET, &path, "*/*").await?;
            let media_type = super::raw::content_type(&resp);
            match self.stream_to_store(resp, &what).await {
                Ok((f, d, n)) => break (f, d, n, media_type),
                Err(a) if a.retry && attempt < self.settings.retries => {
                    attempt += 1;
                    let delay = self
                        .settings
                        .backoff_min
                        .saturating_mul(1 << attempt.min(16))
                        .min(self.settings.backoff_max);
                    tracing::debug!(error = %a.error, ?delay, "retrying blob download");
                    tokio::time::sleep(delay).await;
                }
                Err(a) => return Err(a.error),
            }
        };
        if out.1 != digest {
            return Err(Error::new(
                Code::ChecksumMismatch,
                format!("{what}: the registry served content with digest {}", out.1),
            ));
        }
        if declared != 0 && out.2 != declared {
            return Err(Error::new(
                Code::UpstreamError,
                format!(
                    "{what}: {} bytes served, the manifest declares {}",
                    out.2, declared
                ),
            ));
        }
        Ok(out)
    }
}

impl OciFetcher {
    /// Writes a response body into a new temp file, hashing it and enforcing the size cap.
    async fn stream_to_store(
        &self,
        resp: reqwest::Response,
        what: &str,
    ) -> std::result::Result<(tempfile::NamedTempFile, Digest, u64), Attempt> {
        let mut w = self.store.writer(self.max_size, what)?;
        download(resp, &self.settings, &mut w).await?;
        Ok(w.finish().await?)
    }
}

/// The `too_large` error of a layer whose declared size is over the cap.
pub(super) fn too_large(size: u64, max: u64) -> Error {
    Error::new(
        Code::TooLarge,
        format!("the layer is {size} bytes, more than the maximum module size of {max} bytes"),
    )
}
