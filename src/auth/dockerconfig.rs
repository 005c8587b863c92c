//! `.dockerconfigjson` payloads (Kubernetes image pull secrets, and the kubelet's or Docker's
//! `config.json`), interpreted as Kubernetes does: only `auths`; keys may carry a scheme, a
//! `/v1/` suffix, a path prefix or `*` globs; every matching entry is tried, most specific
//! first. `credsStore` and `credHelpers` are never run from a pull secret.

use std::collections::HashMap;

use base64::Engine as _;
use serde::Deserialize;

use super::{Credential, Secret};
use crate::error::{Code, Error, Result};
use crate::source::{canonical_registry, split_port};

/// One `auths` entry, parsed.
#[derive(Clone)]
pub struct Entry {
    /// Host part of the key, lowercase, without scheme (may hold `*` globs).
    host: String,
    /// Port of the key, if it names one.
    port: Option<String>,
    /// Repository path prefix of the key (empty: the whole registry).
    path: String,
    /// The credential.
    pub credential: Credential,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entry({}:{:?}/{})", self.host, self.port, self.path)
    }
}

/// A parsed credential file: its `auths` entries.
#[derive(Debug, Clone, Default)]
pub struct DockerConfig {
    /// Entries in the order of the file.
    entries: Vec<Entry>,
    /// Credential helpers named by the file (used only for node credentials, when allowed).
    pub helpers: HelperNames,
}

/// `credsStore` and `credHelpers` of a config file.
#[derive(Debug, Clone, Default)]
pub struct HelperNames {
    /// Default helper for every registry.
    pub store: Option<String>,
    /// Helper per registry host.
    pub per_registry: HashMap<String, String>,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(default)]
    auths: HashMap<String, RawAuth>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct RawAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl DockerConfig {
    /// Parses a payload: the JSON text, or its base64 form (as stored in a Secret's data).
    /// Errors name what is wrong, never the content.
    pub fn parse(payload: &Secret, max_entries: usize) -> Result<DockerConfig> {
        let text = payload.expose().trim();
        let decoded;
        let json = if text.starts_with('{') {
            text
        } else {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|_| {
                    Error::invalid("pull secret is neither JSON nor base64-encoded JSON")
                })?;
            decoded = String::from_utf8(bytes)
                .map_err(|_| Error::invalid("pull secret decodes to non-UTF-8 bytes"))?;
            decoded.as_str()
        };
        let raw: RawFile = serde_json::from_str(json).map_err(|e| {
            Error::invalid(format!(
                "pull secret is not a .dockerconfigjson document (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if raw.auths.len() > max_entries {
            return Err(Error::invalid(format!(
                "pullSecret has {} auths entries, more than the limit of {max_entries} ([limits] pull_secret_entries)",
                raw.auths.len()
            )));
        }
        let mut entries = Vec::new();
        for (key, a) in raw.auths {
            let (user, pass) = match (a.auth, a.username, a.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| {
                            Error::invalid(format!(
                                "pull secret entry for {} has an invalid base64 'auth'",
                                shown_key(&key)
                            ))
                        })?;
                    let s = String::from_utf8(bytes).map_err(|_| {
                        Error::invalid(format!(
                            "pull secret entry for {} has a non-UTF-8 'auth'",
                            shown_key(&key)
                        ))
                    })?;
                    let (u, p) = s.split_once(':').ok_or_else(|| {
                        Error::invalid(format!(
                            "pull secret entry for {}: 'auth' is not user:password",
                            shown_key(&key)
                        ))
                    })?;
                    (u.to_string(), p.to_string())
                }
                (_, Some(u), Some(p)) => (u, p),
                _ => continue,
            };
            let (host, port, path) = parse_key(&key);
            if host.is_empty() {
                continue;
            }
            entries.push(Entry {
                host,
                port,
                path,
                credential: Credential::new(user, Secret::new(pass)),
            });
        }
        sort_entries(&mut entries);
        Ok(DockerConfig {
            entries,
            helpers: HelperNames {
                store: raw.creds_store.filter(|s| !s.is_empty()),
                per_registry: raw.cred_helpers,
            },
        })
    }

    /// Credentials whose key matches `registry` (`host[:port]`) and `repository`, most
    /// specific first, without duplicates.
    pub fn matching(&self, registry: &str, repository: &str) -> Vec<Credential> {
        let mut out: Vec<Credential> = Vec::new();
        for e in &self.entries {
            if e.matches(registry, repository) && !out.contains(&e.credential) {
                out.push(e.credential.clone());
            }
        }
        out
    }

    /// True when the file has no usable entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Credentials keyed the way config files key them (e.g. a kubelet credential
    /// provider's `auth` map); no helpers.
    pub fn from_keyed(keyed: Vec<(String, Credential)>) -> DockerConfig {
        let mut entries: Vec<Entry> = keyed
            .into_iter()
            .filter_map(|(key, credential)| {
                let (host, port, path) = parse_key(&key);
                (!host.is_empty()).then_some(Entry {
                    host,
                    port,
                    path,
                    credential,
                })
            })
            .collect();
        sort_entries(&mut entries);
        DockerConfig {
            entries,
            helpers: HelperNames::default(),
        }
    }
}

/// Deterministic order: most specific first (longer path, no glob, longer host).
fn sort_entries(entries: &mut [Entry]) {
    entries.sort_by(|a, b| {
        b.path
            .len()
            .cmp(&a.path.len())
            .then(a.host.contains('*').cmp(&b.host.contains('*')))
            .then(b.host.len().cmp(&a.host.len()))
            .then(a.host.cmp(&b.host))
    });
}

/// Whether `key` (a config key, or a kubelet `matchImages` pattern: host globs, optional
/// port, optional path prefix) matches `registry` and `repository`.
pub fn key_matches(key: &str, registry: &str, repository: &str) -> bool {
    let (host, port, path) = parse_key(key);
    !host.is_empty() && matches_parts(&host, port.as_deref(), &path, registry, repository)
}

/// A key as it may appear in messages: the host and path, never anything else.
fn shown_key(key: &str) -> String {
    let (h, p, path) = parse_key(key);
    match p {
        Some(p) => format!("{h}:{p}/{path}").trim_end_matches('/').to_string(),
        None => format!("{h}/{path}").trim_end_matches('/').to_string(),
    }
}

/// Splits a key into host, port and path prefix, dropping the scheme and a `/v1` or `/v2`
/// suffix; Docker Hub aliases become `docker.io`.
fn parse_key(key: &str) -> (String, Option<String>, String) {
    let k = key.trim();
    let k = k.split_once("://").map_or(k, |(_, rest)| rest);
    let (hostport, path) = k.split_once('/').unwrap_or((k, ""));
    let mut path = path.trim_matches('/').to_string();
    for suffix in ["v1", "v2"] {
        if path == suffix {
            path.clear();
        }
    }
    let (host, port) = split_port(hostport);
    (canonical_registry(host), port.map(str::to_string), path)
}

impl Entry {
    fn matches(&self, registry: &str, repository: &str) -> bool {
        matches_parts(
            &self.host,
            self.port.as_deref(),
            &self.path,
            registry,
            repository,
        )
    }
}

fn matches_parts(
    host_glob: &str,
    port: Option<&str>,
    path: &str,
    registry: &str,
    repository: &str,
) -> bool {
    let (host, reg_port) = split_port(registry);
    if port != reg_port || !glob_host(host_glob, host) {
        return false;
    }
    path.is_empty() || repository == path || repository.starts_with(&format!("{path}/"))
}

/// Kubernetes host globbing: the same number of dot-separated parts, each matched with `*`
/// standing for any run of characters within the part.
fn glob_host(pattern: &str, host: &str) -> bool {
    let pp: Vec<&str> = pattern.split('.').collect();
    let hp: Vec<&str> = host.split('.').collect();
    pp.len() == hp.len() && pp.iter().zip(&hp).all(|(p, h)| glob_part(p, h))
}

/// Longest label a glob part is matched against: a DNS label is at most 63 bytes, and a
/// registry name that is not a host name never matches a glob.
const MAX_LABEL: usize = 255;

/// `*` matches any run of characters within one label. Greedy matching that backtracks only
/// to the last `*`: at most `p.len() * h.len()` steps, never exponential (a key like
/// `*a*a*a...*b` used to pin a worker).
pub(crate) fn glob_part(p: &str, h: &str) -> bool {
    if !p.contains('*') {
        return p == h;
    }
    if p.len() > MAX_LABEL || h.len() > MAX_LABEL {
        return false;
    }
    let (p, h) = (p.as_bytes(), h.as_bytes());
    let (mut pi, mut hi) = (0, 0);
    // Where the last `*` was, and the text position it is currently standing for.
    let mut star: Option<(usize, usize)> = None;
    while hi < h.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, hi));
            pi += 1;
        } else if pi < p.len() && p[pi] == h[hi] {
            pi += 1;
            hi += 1;
        } else if let Some((sp, sh)) = star {
            // Let the last `*` take one more byte and retry from there.
            pi = sp + 1;
            hi = sh + 1;
            star = Some((sp, sh + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Rejects a payload that names no registry entry at all, with a message naming `registry`.
pub fn no_entry_error(registry: &str) -> Error {
    Error::new(
        Code::AccessDenied,
        format!("the pull secret has no credentials for registry {registry}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> DockerConfig {
        DockerConfig::parse(&Secret::new(json), 256).unwrap()
    }

    fn users(c: &DockerConfig, reg: &str, repo: &str) -> Vec<String> {
        c.matching(reg, repo)
            .iter()
            .map(|c| c.username.clone())
            .collect()
    }

    #[test]
    fn auth_and_username_password_forms_and_base64_payload() {
        let json = r#"{"auths":{"reg.example.com":{"auth":"YWxpY2U6cHc="},"other.io":{"username":"bob","password":"x"}}}"#;
        let c = cfg(json);
        assert_eq!(users(&c, "reg.example.com", "a/b"), ["alice"]);
        assert_eq!(
            c.matching("reg.example.com", "a")[0].password.expose(),
            "pw"
        );
        assert_eq!(users(&c, "other.io", "x"), ["bob"]);
        assert!(users(&c, "third.io", "x").is_empty());
        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
        assert_eq!(users(&cfg(&b64), "other.io", "x"), ["bob"]);
    }

    #[test]
    fn docker_hub_keys_schemes_and_ports() {
        let c = cfg(
            r#"{"auths":{"https://index.docker.io/v1/":{"username":"hub","password":"x"},
            "http://127.0.0.1:5000/v2/":{"username":"local","password":"x"}}}"#,
        );
        assert_eq!(users(&c, "docker.io", "library/nginx"), ["hub"]);
        assert_eq!(users(&c, "127.0.0.1:5000", "x"), ["local"]);
        assert!(users(&c, "127.0.0.1:5001", "x").is_empty());
        assert!(users(&c, "127.0.0.1", "x").is_empty());
    }

    #[test]
    fn globs_and_path_prefixes_most_specific_first() {
        let c = cfg(r#"{"auths":{
            "*.example.com":{"username":"glob","password":"x"},
            "reg.example.com":{"username":"host","password":"x"},
            "reg.example.com/team":{"username":"team","password":"x"},
            "reg.example.com/team/sub":{"username":"sub","password":"x"}}}"#);
        assert_eq!(
            users(&c, "reg.example.com", "team/sub/x"),
            ["sub", "team", "host", "glob"]
        );
        assert_eq!(users(&c, "reg.example.com", "teams/x"), ["host", "glob"]);
        assert_eq!(users(&c, "a.example.com", "x"), ["glob"]);
        assert!(
            users(&c, "a.b.example.com", "x").is_empty(),
            "a glob matches one label"
        );
        assert!(users(&c, "example.com", "x").is_empty());
    }

    #[test]
    fn glob_parts_match_like_kubernetes() {
        for (p, h, want) in [
            ("*", "reg", true),
            ("*", "", true),
            ("r*g", "reg", true),
            ("r*g", "rg", true),
            ("r*g", "regx", false),
            ("*a*b", "xaxxb", true),
            ("*a*b", "xbxa", false),
            ("a**", "abc", true),
            ("ab", "ab", true),
            ("ab", "abc", false),
        ] {
            assert_eq!(glob_part(p, h), want, "{p:?} ~ {h:?}");
        }
    }

    /// Issue 9: `*a*a*a...*b.x` (30 stars) against a 60-letter label backtracked
    /// exponentially on an async worker. It must answer at once; a regression would hang
    /// here, so the match runs on a thread with a generous deadline.
    #[test]
    fn issue_9_a_thirty_star_glob_key_matches_in_linear_time() {
        let key = format!("{}b.x", "*a".repeat(30));
        let host = format!("{}.x", "a".repeat(60));
        let secret = format!(r#"{{"auths":{{"{key}":{{"username":"u","password":"p"}}}}}}"#);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let c = cfg(&secret);
            let _ = tx.send(users(&c, &host, "r").len());
        });
        let matched = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the glob match did not finish: it backtracks exponentially again");
        assert_eq!(matched, 0);
    }

    #[test]
    fn issue_9_a_pull_secret_with_too_many_entries_is_invalid() {
        let entries: Vec<String> = (0..300)
            .map(|i| format!(r#""r{i}.io":{{"username":"u","password":"p"}}"#))
            .collect();
        let json = format!(r#"{{"auths":{{{}}}}}"#, entries.join(","));
        let err = DockerConfig::parse(&Secret::new(json.clone()), 256).unwrap_err();
        assert_eq!(err.code, Code::InvalidRequest);
        assert!(
            err.message.contains("pull_secret_entries"),
            "{}",
            err.message
        );
        assert!(DockerConfig::parse(&Secret::new(json), 300).is_ok());
    }

    #[test]
    fn malformed_secrets_are_invalid_requests_that_do_not_echo_the_secret() {
        for bad in [
            "{not json",
            "%%%not-base64%%%",
            r#"{"auths":{"r.io":{"auth":"!!!hunter2"}}}"#,
        ] {
            let err = DockerConfig::parse(&Secret::new(bad), 256).unwrap_err();
            assert_eq!(err.code, Code::InvalidRequest, "{bad}");
            assert!(
                !err.message.contains("hunter2") && !err.message.contains("not json"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn helpers_are_read_but_not_entries() {
        let c = cfg(r#"{"credsStore":"desktop","credHelpers":{"gcr.io":"gcloud"},"auths":{}}"#);
        assert!(c.is_empty());
        assert_eq!(c.helpers.store.as_deref(), Some("desktop"));
    }
}
