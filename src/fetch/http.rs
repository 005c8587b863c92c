//! `http://` and `https://` urls, with retries, the network guard and gzip/tar unwrapping.

use std::sync::Arc;

use reqwest::{Client, Url};

use super::client::{download, response_error, send, with_retries};
use super::{Fetched, plain_module};
use crate::cache::store::Store;
use crate::config::{Config, FetchSettings};
use crate::error::{Error, Result};
use crate::netguard::NetGuard;
use crate::source::redact;

/// Downloads modules over HTTP(S).
#[derive(Debug)]
pub struct HttpFetcher {
    /// Guarded client (extra CA roots applied).
    client: Client,
    /// Checks IP-literal hosts before connecting.
    guard: Arc<NetGuard>,
    /// Timeouts and retries.
    settings: FetchSettings,
    /// Size cap, before and after unwrapping.
    max_size: u64,
    /// Where downloads are written.
    store: Store,
}

impl HttpFetcher {
    /// A fetcher using `client`.
    pub fn new(client: Client, guard: Arc<NetGuard>, config: &Config, store: Store) -> Self {
        HttpFetcher {
            client,
            guard,
            settings: config.fetch.clone(),
            max_size: config.max_module_size,
            store,
        }
    }

    /// Downloads `url`, unwraps it and validates the module.
    pub async fn fetch(&self, url: &Url) -> Result<Fetched> {
        self.fetch_if_changed(url, None)
            .await?
            .ok_or_else(|| Error::internal("fetching", "304 without a validator"))
    }

    /// Downloads `url` unless the server answers `304 Not Modified` to `If-None-Match:
    /// etag` (`Ok(None)`). The result carries the response's `ETag` for the next check.
    pub async fn fetch_if_changed(&self, url: &Url, etag: Option<&str>) -> Result<Option<Fetched>> {
        self.guard.check_url(url)?;
        let shown = redact(url.as_str());
        let downloaded = with_retries(&self.settings, || async {
            let mut req = self.client.get(url.clone());
            if let Some(tag) = etag {
                req = req.header(reqwest::header::IF_NONE_MATCH, tag);
            }
            let resp = send(req, url.as_str()).await?;
            if etag.is_some() && resp.status() == reqwest::StatusCode::NOT_MODIFIED {
                return Ok(None);
            }
            if !resp.status().is_success() {
                return Err(response_error(&shown, &resp));
            }
            let new_tag = resp
                .headers()
                .get(reqwest::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut w = self.store.writer(self.max_size, &shown)?;
            download(resp, &self.settings, &mut w).await?;
            Ok(Some((w.finish().await?, new_tag)))
        })
        .await?;
        let Some((downloaded, new_tag)) = downloaded else {
            return Ok(None);
        };
        let mut f = plain_module(&self.store, downloaded, self.max_size).await?;
        f.etag = new_tag;
        Ok(Some(f))
    }
}
