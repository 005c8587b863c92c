//! Where a module comes from: parsing WasmPlugin `url`s and OCI references.
//!
//! `oci://` (also when there is no scheme), `http://`, `https://` and `file://` are accepted;
//! OCI references parse like Kubernetes image names.

use std::fmt;
use std::path::PathBuf;

use reqwest::Url;

use crate::digest::Digest;
use crate::error::{Code, Error};

/// Why a url or reference does not parse. Mapped to a wire code in one place (below).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Nothing was given.
    #[error("url is empty")]
    Empty,
    /// An http(s) url that does not parse (shown redacted).
    #[error("invalid url {url}: {source}")]
    Url {
        /// The url, its secrets hidden.
        url: String,
        /// What the parser said.
        #[source]
        source: url::ParseError,
    },
    /// An http(s) url without a host (shown redacted).
    #[error("url {0} has no host")]
    NoHost(String),
    /// A file url that is not an absolute path.
    #[error("invalid file url {url:?}: {why}")]
    FileUrl {
        /// The url.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// A scheme other than oci, http, https and file.
    #[error("unsupported url scheme {0:?}: expected oci, http, https or file")]
    Scheme(String),
    /// An OCI reference outside the grammar.
    #[error("invalid OCI reference {reference:?}: {why}")]
    Reference {
        /// The reference.
        reference: String,
        /// What is wrong.
        why: String,
    },
}

impl From<SourceError> for Error {
    fn from(e: SourceError) -> Error {
        let code = match e {
            SourceError::Scheme(_) => Code::UnsupportedScheme,
            _ => Code::InvalidRequest,
        };
        Error::new(code, e.to_string())
    }
}

/// The result of parsing a url or reference.
type Result<T, E = SourceError> = std::result::Result<T, E>;

/// Docker Hub's name in references, after normalisation.
pub const DOCKER_HUB: &str = "docker.io";

/// Other names of Docker Hub that registry names, pull-secret keys and node credentials use;
/// each is the same registry as [`DOCKER_HUB`]. The one list of them.
const DOCKER_HUB_ALIASES: &[&str] = &[
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// A registry host name with Docker Hub's aliases folded into [`DOCKER_HUB`] (lowercase).
pub fn canonical_registry(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        DOCKER_HUB.to_string()
    } else {
        host
    }
}

/// True when `registry` is `host[:port]` as the distribution reference grammar allows: DNS
/// labels of letters, digits and inner hyphens (at most 63 bytes each, 253 in all), an IPv4
/// address, or an IPv6 address in brackets; a port of 1 to 5 digits up to 65535.
pub fn valid_registry(registry: &str) -> bool {
    let (host, port) = split_port(registry);
    if let Some(p) = port
        && (p.len() > 5 || p.parse::<u32>().map_or(true, |n| n > 65535))
    {
        return false;
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// Splits `host[:port]` into the host and the port, when the part after the last `:` is a
/// non-empty run of digits (so an IPv6 literal in brackets keeps its colons). The one
/// host:port parser.
pub fn split_port(hostport: &str) -> (&str, Option<&str>) {
    match hostport.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (hostport, None),
    }
}

/// A parsed module location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An image or artifact in an OCI registry.
    Oci(OciRef),
    /// A module (possibly gzip/tar wrapped) behind an http(s) url.
    Http(Url),
    /// A module file on this node.
    File(PathBuf),
}

/// An OCI reference, `host[:port]/path[:tag][@sha256:hex]`, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    /// Registry as `host[:port]`, lowercase; `docker.io` for Docker Hub.
    pub registry: String,
    /// Repository path, e.g. `library/nginx`.
    pub repository: String,
    /// The tag; `latest` when the reference has neither tag nor digest.
    pub tag: Option<String>,
    /// True when `tag` was filled in as the implicit `latest`.
    pub implicit_tag: bool,
    /// The pinned manifest (or index) digest, if any.
    pub digest: Option<Digest>,
}

impl Source {
    /// Parses a WasmPlugin `url`.
    pub fn parse(url: &str) -> Result<Source> {
        let url = url.trim();
        if url.is_empty() {
            return Err(SourceError::Empty);
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return OciRef::parse(url).map(Source::Oci);
        };
        match scheme.to_ascii_lowercase().as_str() {
            "oci" => OciRef::parse(rest).map(Source::Oci),
            "http" | "https" => {
                let parsed = Url::parse(url).map_err(|e| SourceError::Url {
                    url: redact(url),
                    source: e,
                })?;
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(SourceError::NoHost(redact(url)));
                }
                Ok(Source::Http(parsed))
            }
            "file" => {
                let parsed = Url::parse(url).map_err(|e| SourceError::FileUrl {
                    url: url.to_string(),
                    why: e.to_string(),
                })?;
                let path = parsed.to_file_path().map_err(|()| SourceError::FileUrl {
                    url: url.to_string(),
                    why: "expected file:///absolute/path".to_string(),
                })?;
                if path
                    .as_os_str()
                    .as_encoded_bytes()
                    .iter()
                    .any(|b| b.is_ascii_control())
                {
                    return Err(SourceError::FileUrl {
                        url: url.to_string(),
                        why: "control characters in the path".to_string(),
                    });
                }
                Ok(Source::File(path))
            }
            other => Err(SourceError::Scheme(other.to_string())),
        }
    }

    /// Identity of the place the bytes come from, independent of tag: `oci://registry/repo`,
    /// the http url (its password shown as `***`: urls that differ only in their password are
    /// one source, and http modules are public), or `file://path`. Cached bytes are only ever handed out for the same
    /// source key they were fetched from.
    pub fn source_key(&self) -> String {
        match self {
            Source::Oci(r) => format!("oci://{}/{}", r.registry, r.repository),
            Source::Http(u) => {
                // The key is written to disk and listed: never with a password in it.
                let mut u = u.clone();
                u.set_fragment(None);
                redact_url(&u)
            }
            // Percent-encoded as a url, so the key parses back to the same path.
            Source::File(p) => Url::from_file_path(p)
                .map(|u| u.to_string())
                .unwrap_or_else(|()| format!("file://{}", p.display())),
        }
    }

    /// Identity of this exact reference (with tag and digest), the key of the cache index.
    pub fn location_key(&self) -> String {
        match self {
            Source::Oci(r) => format!("oci://{r}"),
            _ => self.source_key(),
        }
    }

    /// The digest pinned in the url itself (`@sha256:`), if any.
    pub fn pinned_digest(&self) -> Option<Digest> {
        match self {
            Source::Oci(r) => r.digest,
            _ => None,
        }
    }

    /// The scheme, for logs and metrics.
    pub fn scheme(&self) -> &'static str {
        match self {
            Source::Oci(_) => "oci",
            Source::Http(u) if u.scheme() == "https" => "https",
            Source::Http(_) => "http",
            Source::File(_) => "file",
        }
    }
}

impl fmt::Display for Source {
    /// A form safe for logs and error messages: http credentials are redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Oci(r) => write!(f, "oci://{r}"),
            Source::Http(u) => f.write_str(&redact(u.as_str())),
            Source::File(p) => write!(f, "file://{}", p.display()),
        }
    }
}

/// A url with its secret part hidden, for keys on disk, logs, listings and errors:
/// `user:password@` becomes `user:***@`, and a lone `token@` becomes `***@`.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(u) => redact_url(&u),
        Err(_) => match url.rsplit_once('@') {
            Some((_, host)) if url.contains("://") => format!("***@{host}"),
            _ => url.to_string(),
        },
    }
}

fn redact_url(u: &Url) -> String {
    if u.username().is_empty() && u.password().is_none() {
        return u.to_string();
    }
    let mut u = u.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    } else {
        let _ = u.set_username("***");
    }
    u.to_string()
}

/// A url for an error message: redacted, and without its query, which for a redirect target
/// (a presigned blob url) is a credential.
pub fn redact_for_error(url: &str) -> String {
    let shown = redact(url);
    match shown.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => shown,
    }
}

impl OciRef {
    /// Parses `host[:port]/path[:tag][@sha256:hex]` the way Kubernetes parses image names.
    pub fn parse(reference: &str) -> Result<OciRef> {
        let bad = |why: &str| SourceError::Reference {
            reference: reference.to_string(),
            why: why.to_string(),
        };
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) => {
                let digest = d.parse::<Digest>().map_err(|e| bad(&e.to_string()))?;
                if !d.to_ascii_lowercase().starts_with("sha256:") {
                    return Err(bad("a digest must be written as @sha256:<hex>"));
                }
                (n, Some(digest))
            }
            None => (reference, None),
        };
        // A tag is a ':' after the last '/'.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !ok {
                return Err(bad("invalid tag"));
            }
        }
        let (registry, repository) = match path.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_ascii_lowercase(), rest.to_string())
            }
            Some(_) => (DOCKER_HUB.to_string(), path.to_string()),
            None => (DOCKER_HUB.to_string(), format!("library/{path}")),
        };
        let registry = canonical_registry(&registry);
        if !valid_registry(&registry) {
            return Err(bad(
                "the registry must be a host name or IP address with an optional port",
            ));
        }
        if registry.is_empty() {
            return Err(bad("empty registry"));
        }
        if repository.is_empty() {
            return Err(bad("empty repository"));
        }
        for component in repository.split('/') {
            let ok = !component.is_empty()
                && component
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && component
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric());
            if !ok {
                return Err(bad(
                    "repository path components must be lowercase letters, digits and . _ -",
                ));
            }
        }
        let implicit_tag = tag.is_none() && digest.is_none();
        let tag = match tag {
            Some(t) => Some(t.to_string()),
            None if implicit_tag => Some("latest".to_string()),
            None => None,
        };
        Ok(OciRef {
            registry,
            repository,
            tag,
            implicit_tag,
            digest,
        })
    }

    /// The host to talk to for the registry API (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// The reference the manifest is asked for by: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// True when the tag is `latest` (written or implied) and no digest is pinned.
    pub fn is_latest(&self) -> bool {
        self.digest.is_none() && self.tag.as_deref() == Some("latest")
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9: urls carried passwords to disk and listings, and redirect targets (presigned
    /// blob urls) their signatures into errors.
    #[test]
    fn issue_9_urls_are_shown_without_secrets() {
        assert_eq!(
            redact("https://alice:pw@h.example/m.wasm?v=1"),
            "https://alice:***@h.example/m.wasm?v=1"
        );
        assert_eq!(
            redact("https://ghp_token@h.example/m"),
            "https://***@h.example/m"
        );
        assert_eq!(
            redact_for_error("https://s3.example/b?X-Amz-Signature=abc&X-Amz-Credential=k"),
            "https://s3.example/b?…"
        );
        let s = Source::parse("https://alice:pw@h.example/m.wasm#frag").unwrap();
        assert_eq!(s.source_key(), "https://alice:***@h.example/m.wasm");
        assert!(!s.to_string().contains("pw@"));
        // The fetch itself still has the password.
        let Source::Http(u) = s else { panic!() };
        assert_eq!(u.password(), Some("pw"));
    }

    /// Issue 9: a registry name outside the reference grammar reached credential matching
    /// and the network.
    #[test]
    fn issue_9_registry_hosts_outside_the_reference_grammar_are_invalid() {
        for bad in [
            "oci://reg#x.io/r:1",
            "oci://a?b.io/r:1",
            "oci://a\\b.io/r:1",
            "oci://a b.io/r:1",
            "oci://a\u{1}b.io/r:1",
            "oci://-a.io/r:1",
            "oci://a-.io/r:1",
            "oci://a..io/r:1",
            "oci://reg.io:99999/r:1",
            "oci://reg.io:/r:1",
            "oci://[::1/r:1",
            "oci://[nope]:5000/r:1",
        ] {
            let e = Source::parse(bad).unwrap_err();
            assert_eq!(Error::from(e).code, Code::InvalidRequest, "{bad}");
        }
        for good in [
            "oci://reg.example.com/r:1",
            "oci://reg.example.com:5000/r:1",
            "oci://127.0.0.1:5000/r:1",
            "oci://[::1]:5000/r:1",
            "oci://localhost/r:1",
            "oci://localhost:5000/r:1",
            "oci://xn--bcher-kva.example/r:1",
        ] {
            assert!(Source::parse(good).is_ok(), "{good}");
        }
    }

    fn oci(s: &str) -> OciRef {
        match Source::parse(s).unwrap() {
            Source::Oci(r) => r,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    #[test]
    fn no_scheme_means_oci_and_docker_hub_names_normalise() {
        let r = oci("nginx");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/nginx")
        );
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(r.implicit_tag && r.is_latest());
        let r = oci("istio/plugin:1.0");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "istio/plugin")
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert!(!r.is_latest());
        let r = oci("oci://index.docker.io/istio/plugin:1.0");
        assert_eq!(r.registry, "docker.io");
    }

    #[test]
    fn registry_with_port_tag_and_digest() {
        let d = "a".repeat(64);
        let r = oci(&format!("oci://localhost:5000/team/acl:v2@sha256:{d}"));
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "team/acl");
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert_eq!(r.digest.unwrap().hex(), d);
        assert_eq!(r.manifest_reference(), format!("sha256:{d}"));
        let r = oci(&format!("127.0.0.1:5000/acl@sha256:{d}"));
        assert_eq!(r.tag, None);
        assert!(!r.implicit_tag && !r.is_latest());
        let r = oci("registry.example.com/acl");
        assert_eq!(r.registry, "registry.example.com");
        assert!(r.is_latest());
    }

    #[test]
    fn other_schemes() {
        assert!(matches!(
            Source::parse("https://h/x.wasm").unwrap(),
            Source::Http(_)
        ));
        assert_eq!(
            Source::parse("file:///opt/filters/a.wasm").unwrap(),
            Source::File("/opt/filters/a.wasm".into())
        );
        let err = Source::parse("ftp://h/x.wasm").unwrap_err();
        assert_eq!(Error::from(err).code, Code::UnsupportedScheme);
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "oci://",
            "Registry.io/UPPER:tag",
            "host:5000/x:",
            "host:5000/x@sha256:123",
            "host:5000/x:bad/tag",
            "host:5000//x",
        ] {
            let err = Source::parse(bad).unwrap_err();
            assert_eq!(Error::from(err).code, Code::InvalidRequest, "{bad:?}");
        }
    }

    #[test]
    fn display_redacts_http_credentials() {
        let s = Source::parse("https://user:hunter2@h.example/x.wasm").unwrap();
        assert!(!s.to_string().contains("hunter2"), "{s}");
        assert!(!redact("https://user:hunter2@h.example/x").contains("hunter2"));
    }
}
