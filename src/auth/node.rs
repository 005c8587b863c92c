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
}

impl NodeCredentials {
    /// Credentials from `path`, running helpers only when `allow_helpers`.
    pub fn new(path: Option<PathBuf>, allow_helpers: bool) -> Self {
        NodeCredentials {
            path,
            allow_helpers,
            parsed: Mutex::new(None),
        }
    }

    /// The candidate credentials for `r`, most specific first; empty when there are none or
    /// the file cannot be read (logged).
    pub async fn for_ref(&self, r: &OciRef) -> Vec<Credential> {
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
