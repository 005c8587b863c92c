//! Tenancy: who the caller is (its candidate credentials and their ids), what the index
//! already proves about the caller's access to a cached module, and the module-url tokens
//! that carry that proof to `GET /v1/modules/...`.
//!
//! A cached OCI module is served to a caller only when its source is public (the registry
//! served it anonymously) or when one of the caller's credentials was accepted by the
//! registry for that source recently enough (`[auth] verify`). Otherwise the service asks
//! the registry before the bytes are handed out.

use std::time::Duration;

use crate::auth::dockerconfig::{DockerConfig, no_entry_error};
use crate::auth::node::NodeCredentials;
use crate::auth::{Credential, NodeKey};
use crate::cache::index::{Grant, Index, Record, now_millis};
use crate::config::{AuthSettings, VerifyPolicy};
use crate::digest::Digest;
use crate::error::{Code, Error, Result};
use crate::source::{OciRef, Source};

use super::FetchRequest;

/// How long a module-url token stays usable after its verification under
/// `verify = "always"` (Envoy fetches the module right after the control plane's fetch).
const ALWAYS_TOKEN_GRACE: Duration = Duration::from_secs(300);

/// The caller's registry credentials for one request, each with its recorded id.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// Candidate credentials, most specific first, with their ids.
    creds: Vec<(Credential, String)>,
    /// The request carried a pull secret (so a miss of every entry is worth saying).
    from_secret: bool,
}

impl Caller {
    /// The candidate credentials, most specific first.
    pub fn credentials(&self) -> Vec<Credential> {
        self.creds.iter().map(|(c, _)| c.clone()).collect()
    }

    /// Their ids.
    pub fn ids(&self) -> Vec<String> {
        self.creds.iter().map(|(_, id)| id.clone()).collect()
    }

    /// Distinguishes callers in flight keys (in memory only).
    pub fn flight_key(&self) -> String {
        let mut fp = String::new();
        for (c, _) in &self.creds {
            fp.push_str(&c.fingerprint().hex()[..16]);
        }
        fp
    }
}

/// The node's tenancy rules: its key, its credentials and the re-verification policy.
#[derive(Debug)]
pub struct Tenancy {
    /// Key for credential ids and module tokens.
    key: NodeKey,
    /// How long a registry's confirmation counts.
    verify: VerifyPolicy,
    /// Credentials for requests without a pull secret.
    node: NodeCredentials,
    /// Most `auths` entries accepted in a pull secret.
    max_secret_entries: usize,
}

/// True when a verification at `at` (unix ms) still counts under `policy`.
pub fn is_fresh(policy: VerifyPolicy, at: u64) -> bool {
    match policy {
        VerifyPolicy::Never => true,
        VerifyPolicy::Always => false,
        VerifyPolicy::Ttl(ttl) => now_millis().saturating_sub(at) < ttl.as_millis() as u64,
    }
}

impl Tenancy {
    /// The rules of `auth`, with ids and tokens under `key`.
    pub fn new(key: NodeKey, auth: &AuthSettings, max_secret_entries: usize) -> Self {
        Tenancy {
            key,
            max_secret_entries,
            verify: auth.verify,
            node: NodeCredentials::new(
                auth.docker_config.clone(),
                auth.allow_credential_helpers,
                std::sync::Arc::clone(&auth.providers),
            ),
        }
    }

    /// The caller's candidate credentials for the request's registry and repository: from
    /// the pull secret, else from the node's credentials (and helpers, if allowed). Empty
    /// for http and file sources.
    pub async fn caller(&self, req: &FetchRequest) -> Result<Caller> {
        let Source::Oci(r) = &req.source else {
            return Ok(Caller::default());
        };
        let (creds, from_secret) = match &req.pull_secret {
            Some(secret) => (
                DockerConfig::parse(secret, self.max_secret_entries)?
                    .matching(&r.registry, &r.repository),
                true,
            ),
            None => (self.node.for_ref(r).await, false),
        };
        Ok(self.caller_of(r, creds, from_secret))
    }

    /// A caller holding `creds` for `r`'s registry, each with its id.
    fn caller_of(&self, r: &OciRef, creds: Vec<Credential>, from_secret: bool) -> Caller {
        let creds = creds
            .into_iter()
            .map(|c| {
                let id = self.key.credential_id(&r.registry, &c);
                (c, id)
            })
            .collect();
        Caller { creds, from_secret }
    }

    /// The caller of a registry endpoint request for `r`: the client's own credential (HTTP
    /// Basic) when it sent one, else the node's credentials.
    pub async fn caller_with(&self, r: &OciRef, cred: Option<Credential>) -> Caller {
        let creds = match cred {
            Some(c) => vec![c],
            None => self.node.for_ref(r).await,
        };
        self.caller_of(r, creds, false)
    }

    /// What the registry's acceptance of `accepted` (anonymous when `None`) grants.
    pub fn grant_for(&self, r: &OciRef, accepted: Option<&Credential>) -> Grant {
        match accepted {
            None => Grant::Public,
            Some(c) => Grant::Credential(self.key.credential_id(&r.registry, c)),
        }
    }

    /// The grant the index already proves for `caller` on `record` (no upstream traffic), or
    /// `None` when the registry must be asked.
    pub fn proven_grant(&self, index: &Index, caller: &Caller, record: &Record) -> Option<Grant> {
        if !record.is_oci() {
            return Some(Grant::Public);
        }
        let access = index.access(&record.source);
        if access.public_at.is_some_and(|at| is_fresh(self.verify, at)) {
            return Some(Grant::Public);
        }
        caller.creds.iter().find_map(|(_, id)| {
            let at = access.verified.get(id)?;
            is_fresh(self.verify, *at).then(|| Grant::Credential(id.clone()))
        })
    }

    /// Verifications made before this time (unix ms) no longer count and may be forgotten.
    pub fn verified_before(&self) -> Option<u64> {
        match self.verify {
            VerifyPolicy::Ttl(ttl) => Some(now_millis().saturating_sub(ttl.as_millis() as u64)),
            _ => None,
        }
    }

    /// An access_denied error; says so when the pull secret had no entry for the registry.
    pub fn explain_denied(&self, r: &OciRef, caller: &Caller, e: Error) -> Error {
        if e.code == Code::AccessDenied && caller.from_secret && caller.creds.is_empty() {
            let base = no_entry_error(&r.registry);
            return Error::new(
                Code::AccessDenied,
                format!("{}; {}", base.message, e.message),
            );
        }
        e
    }

    /// Whether a GET-time proof (a public grant, a token's verification) made at `at` still
    /// counts: under `verify = "always"` for a short grace, since Envoy fetches the module
    /// right after the control plane's fetch verified it.
    fn fresh_for_get(&self, at: u64) -> bool {
        match self.verify {
            VerifyPolicy::Always => is_fresh(VerifyPolicy::Ttl(ALWAYS_TOKEN_GRACE), at),
            p => is_fresh(p, at),
        }
    }

    /// The path a caller with `grant` fetches `module` from: plain for public modules, with
    /// a credential id and token for private ones.
    pub fn module_url(&self, index: &Index, module: &Digest, grant: &Grant) -> String {
        let open = index
            .module_access(module)
            .is_some_and(|m| m.open || m.public_at.is_some_and(|at| self.fresh_for_get(at)));
        match grant {
            Grant::Credential(id) if !open => format!(
                "/v1/modules/{module}?cred={id}&token={}",
                self.key.module_token(module, id)
            ),
            _ => format!("/v1/modules/{module}"),
        }
    }

    /// Checks that a `GET /v1/modules/...` may read `module`: modules of http(s) and file urls
    /// and freshly public ones are open; a private one needs a token issued for a credential
    /// still verified for it; a module whose public grant lapsed needs the registry asked
    /// again ([`GetAccess::RecheckAnonymous`]).
    pub fn check_module_access(
        &self,
        index: &Index,
        module: &Digest,
        cred: Option<&str>,
        token: Option<&str>,
    ) -> Result<GetAccess> {
        let Some(access) = index.module_access(module) else {
            return Err(Error::new(
                Code::NotPresent,
                format!("module {module} is not in the cache"),
            ));
        };
        if access.open || access.public_at.is_some_and(|at| self.fresh_for_get(at)) {
            return Ok(GetAccess::Open);
        }
        let denied = |why: &str| {
            Error::new(
                Code::AccessDenied,
                format!("module {module} is private: {why}"),
            )
        };
        let (Some(id), Some(token)) = (cred, token) else {
            // Public once, not confirmed lately: the registry decides.
            if access.public_at.is_some()
                && let Some((source, digest)) = access.oci
            {
                return Ok(GetAccess::RecheckAnonymous { source, digest });
            }
            return Err(denied("use the moduleUrl answered by POST /v1/fetch"));
        };
        if !self.key.check_module_token(module, id, token) {
            return Err(denied("the token is not valid"));
        }
        let verified = index
            .credential_verified_for_module(module, id)
            .ok_or_else(|| denied("the credential is no longer verified"))?;
        if !self.fresh_for_get(verified) {
            return Err(denied("the credential's verification expired; fetch again"));
        }
        Ok(GetAccess::Open)
    }
}

/// What a `GET /v1/modules/...` may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetAccess {
    /// Serve it.
    Open,
    /// It was public, but that lapsed: ask the registry anonymously for `digest` of
    /// `source` first.
    RecheckAnonymous {
        /// The OCI source key (`oci://registry/repository`).
        source: String,
        /// The manifest to ask for.
        digest: Digest,
    },
}
