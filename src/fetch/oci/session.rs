//! Registry sessions: one endpoint, repository and credential (or none) each, with the
//! Bearer token it earned. Every request goes through [`OciFetcher::request`], which retries
//! transient failures and answers a `401` challenge once (a fresh token, or HTTP Basic), so a
//! token that expires between two requests of a pull is renewed, not a hard failure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Client, Method, Response, StatusCode, Url};
use serde::Deserialize;

use super::OciFetcher;
use super::manifest::ACCEPT_MANIFESTS;
use crate::auth::Credential;
use crate::error::{Code, Error, Result};
use crate::fetch::client::{
    Attempt, read_capped, response_error, send, status_error, with_retries,
};
use crate::source::OciRef;

/// Largest token service answer read (tokens are a few KiB; Docker Hub's are about 2 KiB).
const MAX_TOKEN_ANSWER: usize = 64 << 10;
/// Token cache size past which expired tokens are dropped on insert.
const TOKEN_PRUNE_AT: usize = 256;
/// Longest a token is cached, whatever `expires_in` says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A registry endpoint for one repository and one credential (or none), with the token it
/// earned. Credentials never cross sessions: tenant A's login is never sent for tenant B.
pub(super) struct Session<'a> {
    /// Guarded client (insecure one for insecure registries).
    pub(super) client: &'a Client,
    /// `https://host/v2/<repo>/` (or `http://` for insecure registries).
    pub(super) base: Url,
    /// Registry name, for messages.
    pub(super) registry: String,
    /// Repository, for messages and token scopes.
    pub(super) repository: String,
    /// The login to use; `None` pulls anonymously.
    pub(super) cred: Option<Credential>,
    /// Send the login as HTTP Basic (after the registry asked for Basic).
    pub(super) basic: bool,
    /// Bearer token obtained from the registry's token service.
    pub(super) token: Option<String>,
    /// Key of this session's token in the token cache.
    pub(super) token_key: String,
    /// An insecure registry's host whose scheme was guessed (HTTPS failed, so plain HTTP):
    /// remembered only once the registry answers on it.
    pub(super) unconfirmed_scheme: Option<String>,
    /// A mirror's headers and the registry it stands for (sent as `?ns=`).
    pub(super) mirror: Option<(&'a reqwest::header::HeaderMap, String)>,
}

impl OciFetcher {
    pub(super) async fn session(
        &self,
        r: &OciRef,
        cred: Option<&Credential>,
    ) -> Result<Session<'_>> {
        let host = r.api_host().to_string();
        let insecure = self.insecure_registries.matches(&r.registry);
        // Before any connection, the scheme probe included.
        let probe = Url::parse(&format!("https://{host}/v2/"))
            .map_err(|e| Error::invalid(format!("invalid registry {host}: {e}")))?;
        self.guard.check_url(&probe)?;
        let (scheme, confirmed) = if insecure {
            self.probe_scheme(&host).await
        } else {
            ("https", true)
        };
        let base = Url::parse(&format!("{scheme}://{host}/v2/{}/", r.repository))
            .map_err(|e| Error::invalid(format!("invalid registry {host}: {e}")))?;
        self.guard.check_url(&base)?;
        Ok(Session {
            client: if insecure {
                &self.insecure
            } else {
                &self.secure
            },
            base,
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            token_key: format!(
                "{}|{}|{}",
                r.registry,
                r.repository,
                cred.map(|c| c.fingerprint().to_string())
                    .unwrap_or_default()
            ),
            token: None,
            cred: cred.cloned(),
            basic: false,
            unconfirmed_scheme: (!confirmed).then_some(host),
            mirror: None,
        }
        .with_cached_token(self))
    }

    /// An anonymous session for `r` at mirror `ep` (its client, path, headers and `?ns=`).
    pub(super) fn mirror_session<'a>(
        &'a self,
        ep: &'a super::hosts::Endpoint,
        r: &OciRef,
    ) -> Result<Session<'a>> {
        let base = ep
            .api
            .join(&format!("{}/", r.repository))
            .map_err(|e| Error::invalid(format!("invalid mirror path {}: {e}", ep.name)))?;
        self.guard.check_url(&base)?;
        Ok(Session {
            client: &ep.client,
            base,
            registry: format!("{} (mirror {})", r.registry, ep.name),
            repository: r.repository.clone(),
            token_key: format!("mirror|{}|{}|{}", ep.name, r.registry, r.repository),
            token: None,
            cred: None,
            basic: false,
            unconfirmed_scheme: None,
            mirror: Some((&ep.headers, r.registry.clone())),
        }
        .with_cached_token(self))
    }

    /// Opens a session with the first of `creds` the registry accepts for `r` (probing with a
    /// manifest HEAD when there are several), or anonymously when `creds` is empty.
    pub(super) async fn authorized_session(
        &self,
        r: &OciRef,
        creds: &[Credential],
    ) -> Result<Session<'_>> {
        if creds.len() <= 1 {
            return self.session(r, creds.first()).await;
        }
        let reference = r.manifest_reference();
        let mut last = None;
        for cred in creds {
            let mut s = self.session(r, Some(cred)).await?;
            match self
                .request(
                    &mut s,
                    Method::HEAD,
                    &format!("manifests/{reference}"),
                    ACCEPT_MANIFESTS,
                )
                .await
            {
                Ok(_) => return Ok(s),
                Err(e) if e.code == Code::AccessDenied => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::new(Code::AccessDenied, "no credential was accepted")))
    }

    /// For an insecure registry: HTTPS (unverified) if it answers TLS, else plain HTTP.
    pub(super) async fn probe_scheme(&self, host: &str) -> (&'static str, bool) {
        if let Some(s) = self
            .schemes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
        {
            return (s, true);
        }
        let url = format!("https://{host}/v2/");
        if self.insecure.get(&url).send().await.is_err() {
            // Not remembered: the registry may just be down, and come back with TLS.
            return ("http", false);
        }
        self.remember_scheme(host, "https");
        ("https", true)
    }

    fn remember_scheme(&self, host: &str, scheme: &'static str) {
        self.schemes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string(), scheme);
    }

    /// Sends a request with retries. On a 401 it answers the challenge once: a Bearer token
    /// from the realm (with the session's login, if any), or HTTP Basic with the login.
    pub(super) async fn request(
        &self,
        s: &mut Session<'_>,
        method: Method,
        path: &str,
        accept: &str,
    ) -> Result<Response> {
        let mut answered = false;
        // A mirror gets one attempt: the next host is a better retry than the same one.
        let mirror_settings;
        let settings = if s.mirror.is_some() {
            mirror_settings = crate::config::FetchSettings {
                retries: 0,
                ..self.settings.clone()
            };
            &mirror_settings
        } else {
            &self.settings
        };
        loop {
            let resp =
                with_retries(settings, || self.send_once(s, method.clone(), path, accept)).await?;
            // The registry answered over plain HTTP: that guess is now a fact.
            if let Some(host) = s.unconfirmed_scheme.take() {
                self.remember_scheme(&host, "http");
            }
            if resp.status() == StatusCode::UNAUTHORIZED && !answered {
                answered = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if let Some(params) = parse_bearer(&challenge) {
                    s.token = Some(self.token(s, &params).await?);
                    continue;
                }
                if challenge
                    .trim_start()
                    .to_ascii_lowercase()
                    .starts_with("basic")
                    && s.cred.is_some()
                {
                    s.basic = true;
                    continue;
                }
            }
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(denied(s, status));
            }
            if !status.is_success() {
                let what = format!("registry {} ({}, {path})", s.registry, s.repository);
                return Err(status_error(&what, status).error);
            }
            return Ok(resp);
        }
    }

    pub(super) async fn send_once(
        &self,
        s: &Session<'_>,
        method: Method,
        path: &str,
        accept: &str,
    ) -> std::result::Result<Response, Attempt> {
        let mut url = s
            .base
            .join(path)
            .map_err(|e| Attempt::from(Error::invalid(format!("bad registry path {path}: {e}"))))?;
        if let Some((_, ns)) = &s.mirror {
            url.query_pairs_mut().append_pair("ns", ns);
        }
        let mut req = s.client.request(method, url.clone()).header(ACCEPT, accept);
        if let Some((headers, _)) = &s.mirror {
            req = req.headers((*headers).clone());
        }
        if let Some(t) = &s.token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        } else if let (true, Some(c)) = (s.basic, &s.cred) {
            req = req.basic_auth(&c.username, Some(c.password.expose()));
        }
        let resp = send(req, url.as_str()).await?;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            let what = format!("registry {}", s.registry);
            return Err(response_error(&what, &resp));
        }
        Ok(resp)
    }

    /// A Bearer token for a `WWW-Authenticate: Bearer realm=...` challenge, from the token
    /// service (with the session's login as Basic, if any). Cached per registry, repository
    /// and credential until it expires.
    pub(super) async fn token(
        &self,
        s: &Session<'_>,
        params: &HashMap<String, String>,
    ) -> Result<String> {
        let realm = params.get("realm").ok_or_else(|| {
            Error::new(
                Code::UpstreamError,
                format!("registry {}: Bearer challenge without realm", s.registry),
            )
        })?;
        let mut url = Url::parse(realm).map_err(|e| {
            Error::new(
                Code::Forbidden,
                format!("registry {}: invalid token realm: {e}", s.registry),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::new(
                Code::Forbidden,
                format!("registry {}: token realm must be http(s)", s.registry),
            ));
        }
        self.guard.check_url(&url)?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
            // Ask for pull on this repository only, whatever the challenge suggests.
            q.append_pair("scope", &format!("repository:{}:pull", s.repository));
        }
        let token_url = url.to_string();
        let shown = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.path()
        );
        let resp = with_retries(&self.settings, || async {
            let mut req = s.client.get(url.clone());
            if let Some(c) = &s.cred {
                req = req.basic_auth(&c.username, Some(c.password.expose()));
            }
            let resp = send(req, &token_url).await?;
            if resp.status().is_server_error() {
                return Err(status_error(
                    &format!("token service {shown}"),
                    resp.status(),
                ));
            }
            Ok(resp)
        })
        .await?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(denied(s, resp.status()));
        }
        if !resp.status().is_success() {
            return Err(Error::new(
                Code::UpstreamError,
                format!(
                    "registry {}: token service {shown} answered {}",
                    s.registry,
                    resp.status()
                ),
            ));
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let bytes = read_capped(
            resp,
            &self.settings,
            MAX_TOKEN_ANSWER,
            &format!("registry {}: token service {shown}", s.registry),
        )
        .await?;
        let body: TokenResponse = serde_json::from_slice(&bytes).map_err(|_| {
            Error::new(
                Code::UpstreamError,
                format!(
                    "registry {}: the token service answered something other than a token",
                    s.registry
                ),
            )
        })?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::new(
                    Code::UpstreamError,
                    format!(
                        "registry {}: the token service answered no token",
                        s.registry
                    ),
                )
            })?;
        // Refresh a little before the registry would refuse it (60 s is the spec's default).
        // Clamped: a lifetime from upstream never overflows a deadline or outlives a day.
        let lifetime = Duration::from_secs(
            body.expires_in
                .unwrap_or(60)
                .clamp(1, MAX_TOKEN_LIFETIME.as_secs()),
        );
        self.cache_token(&s.token_key, &token, lifetime);
        Ok(token)
    }

    /// Caches `token` under `key` until a little before `lifetime` ends; expired tokens go
    /// as new ones come, so the cache holds what is still usable.
    pub(super) fn cache_token(&self, key: &str, token: &str, lifetime: Duration) {
        let now = Instant::now();
        let expires = now + lifetime.mul_f64(0.9);
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= TOKEN_PRUNE_AT {
            tokens.retain(|_, (_, exp)| *exp > now);
        }
        tokens.insert(key.to_string(), (token.to_string(), expires));
    }

    /// Tokens cached.
    #[cfg(test)]
    pub(super) fn cached_tokens(&self) -> usize {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Session<'_> {
    fn with_cached_token(mut self, f: &OciFetcher) -> Self {
        let tokens = f.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, exp)) = tokens.get(&self.token_key)
            && *exp > Instant::now()
        {
            self.token = Some(t.clone());
        }
        self
    }
}

pub(super) fn denied(s: &Session<'_>, status: StatusCode) -> Error {
    let how = if s.cred.is_some() {
        "with the given credentials"
    } else {
        "anonymously"
    };
    Error::new(
        Code::AccessDenied,
        format!(
            "registry {} refused access to {} {how} ({status})",
            s.registry, s.repository
        ),
    )
}

/// Parses `Bearer realm="...",service="...",scope="..."` into its parameters.
pub fn parse_bearer(header: &str) -> Option<HashMap<String, String>> {
    let (scheme, rest) = header.trim().split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut out = HashMap::new();
    let mut chars = rest.trim().chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let value: String = if chars.peek() == Some(&'"') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => break,
                    c => v.push(c),
                }
            }
            v
        } else {
            chars.by_ref().take_while(|c| *c != ',').collect()
        };
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9: the Bearer token cache grew with every (registry, repository, credential)
    /// seen. Expired tokens are dropped as new ones come.
    #[test]
    fn issue_9_expired_tokens_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse_raw("", std::path::Path::new("t.toml"))
            .unwrap()
            .validate()
            .unwrap();
        let store = crate::cache::store::Store::open(dir.path()).unwrap();
        let guard = std::sync::Arc::new(crate::netguard::NetGuard::new(vec![], vec![]));
        let client = crate::fetch::client::build_client(&config, &guard, false).unwrap();
        let f = OciFetcher::new(
            client.clone(),
            client,
            guard,
            &config,
            store,
            Default::default(),
        );
        for i in 0..10_000 {
            f.cache_token(&format!("reg|repo{i}|cred"), "t", Duration::ZERO);
        }
        assert!(f.cached_tokens() <= TOKEN_PRUNE_AT, "{}", f.cached_tokens());
        f.cache_token("reg|live|cred", "t", Duration::from_secs(3600));
        assert!(f.cached_tokens() <= TOKEN_PRUNE_AT);
    }

    #[test]
    fn parses_bearer_challenges() {
        let p = parse_bearer(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(p["realm"], "https://auth.example.com/token");
        assert_eq!(p["service"], "registry.example.com");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        assert!(parse_bearer(r#"Basic realm="x""#).is_none());
    }
}
