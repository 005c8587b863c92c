//! Node credentials: the kubelet's or Docker's `config.json` named by `[auth] docker_config`,
//! used for OCI requests that carry no pull secret, and the credential helpers it names
//! (only with `[auth] allow_credential_helpers = true`).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use super::dockerconfig::DockerConfig;
use super::{Credential, Secret, helper};
use crate::error::Error;
use crate::source::OciRef;

/// The node's credentials file, parsed once per modification.
#[derive(Debug)]
pub struct NodeCredentials {
    /// `[auth] docker_config`; `None`: the node has no credentials.
    path: Option<PathBuf>,
    /// Whether the file may run credential helpers.
    allow_helpers: bool,
    /// The parsed file and the modification time it was read at (it is consulted on every
    /// OCI request without a pull secret, cache hits included).
    parsed: Mutex<Option<(SystemTime, DockerConfig)>>,
    /// Kubelet credential provider plugins, asked after the file.
    providers: std::sync::Arc<super::provider::Providers>,
}

impl NodeCredentials {
    /// Credentials from `path`, running helpers only when `allow_helpers`, then from
    /// `providers`.
    pub fn new(
        path: Option<PathBuf>,
        allow_helpers: bool,
        providers: std::sync::Arc<super::provider::Providers>,
    ) -> Self {
        NodeCredentials {
            path,
            allow_helpers,
            parsed: Mutex::new(None),
            providers,
        }
    }

    /// The candidate credentials for `r`, most specific first: the file's (or its helper's),
    /// then the credential providers'; empty when there are none (failures are logged).
    pub async fn for_ref(&self, r: &OciRef) -> Vec<Credential> {
        let mut creds = self.file_credentials(r).await;
        if !self.providers.is_empty() {
            for c in self.providers.for_ref(r).await {
                if !creds.contains(&c) {
                    creds.push(c);
                }
            }
        }
        creds
    }

    /// The candidates from the credentials file and its helpers.
    async fn file_credentials(&self, r: &OciRef) -> Vec<Credential> {
        let Some(cfg) = self.config().await else {
            return Vec::new();
        };
        let creds = cfg.matching(&r.registry, &r.repository);
        if !creds.is_empty() || !self.allow_helpers {
            return creds;
        }
        let host = r.registry.as_str();
        let helper_name = cfg
            .helpers
            .per_registry
            .get(host)
            .or(cfg.helpers.store.as_ref());
        match helper_name {
            Some(name) => match helper::get(name, host).await {
                Ok(c) => c.into_iter().collect(),
                Err(e) => {
                    tracing::warn!(helper = %name, error = %e.message, "credential helper failed");
                    Vec::new()
                }
            },
            None => Vec::new(),
        }
    }

    /// The parsed file; re-read only when its modification time changes.
    async fn config(&self) -> Option<DockerConfig> {
        let path = self.path.as_ref()?;
        let mtime = match tokio::fs::metadata(path).await.and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read [auth] docker_config");
                return None;
            }
        };
        if let Some((at, cfg)) = &*self.parsed.lock().unwrap_or_else(|p| p.into_inner())
            && *at == mtime
        {
            return Some(cfg.clone());
        }
        let parsed = match tokio::fs::read_to_string(path).await {
            // The node's own file: no entry limit.
            Ok(text) => DockerConfig::parse(&Secret::new(text), usize::MAX),
            Err(e) => Err(Error::internal("reading", e)),
        };
        match parsed {
            Ok(cfg) => {
                *self.parsed.lock().unwrap_or_else(|p| p.into_inner()) = Some((mtime, cfg.clone()));
                Some(cfg)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e.message, "ignoring [auth] docker_config");
                None
            }
        }
    }
}
