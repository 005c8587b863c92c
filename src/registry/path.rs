//! Request paths of the registry endpoint: `/v2/<upstream>/<repository>/(manifests|blobs)/<ref>`
//! or containerd's `/v2/<repository>/...?ns=<upstream-host>`, parsed into the upstream
//! reference and the object asked for. Registry and repository go through the one OCI
//! reference parser ([`crate::source::OciRef`]), so Docker Hub names and the grammar are
//! handled in one place.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::digest::Digest;
use crate::service::registry::Object;
use crate::source::OciRef;

/// Longest repository name accepted (the distribution spec's limit).
const MAX_NAME: usize = 255;
/// Longest tag (the spec's grammar: 128 characters).
const MAX_TAG: usize = 128;

/// Manifests or blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/manifests/`.
    Manifest,
    /// `/blobs/`.
    Blob,
}

/// A parsed request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The upstream registry and repository, with the tag or manifest digest when the
    /// object is a manifest.
    pub reference: OciRef,
    /// What is asked for.
    pub object: Object,
}

/// A path the endpoint does not serve, with its distribution error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    /// HTTP status.
    pub status: StatusCode,
    /// Distribution error code, e.g. `NAME_INVALID`.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

impl IntoResponse for PathError {
    fn into_response(self) -> Response {
        super::distribution_error(self.status, self.code, &self.message, None)
    }
}

fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> PathError {
    PathError {
        status,
        code,
        message: message.into(),
    }
}

/// True for a tag of the spec's grammar, `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_tag(t: &str) -> bool {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    !t.is_empty()
        && t.len() <= MAX_TAG
        && t.bytes().next().is_some_and(ok)
        && t.bytes().all(|b| ok(b) || b == b'.' || b == b'-')
}

/// True when the first path component names a registry host rather than a repository
/// (the rule OCI clients use: a dot, a port, or `localhost`).
fn is_host(c: &str) -> bool {
    c.contains('.') || c.contains(':') || c == "localhost"
}

impl Target {
    /// Parses `path` (starting with `/v2/`) and its query, resolving an upstream alias.
    pub fn parse(
        path: &str,
        query: Option<&str>,
        upstreams: &BTreeMap<String, String>,
    ) -> Result<Target, PathError> {
        let rest = path.strip_prefix("/v2/").unwrap_or(path);
        if rest.contains('%') || rest.contains("//") {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "NAME_INVALID",
                "the path must not be percent-encoded or have empty components",
            ));
        }
        let split = |marker: &str, kind: Kind| {
            rest.rfind(marker)
                .map(|i| (&rest[..i], &rest[i + marker.len()..], kind))
                .filter(|(_, r, _)| !r.contains('/'))
        };
        let Some((name, reference, kind)) =
            split("/manifests/", Kind::Manifest).or_else(|| split("/blobs/", Kind::Blob))
        else {
            let what = if rest.ends_with("/tags/list") {
                "listing tags"
            } else if rest.contains("/blobs/uploads") {
                "pushing"
            } else if rest.contains("/referrers/") {
                "the referrers API"
            } else {
                "this path"
            };
            return Err(err(
                StatusCode::NOT_FOUND,
                "UNSUPPORTED",
                format!(
                    "wasm-cache's registry endpoint does not serve {what}: only manifests and blobs"
                ),
            ));
        };
        if name.is_empty() || name.len() > MAX_NAME + 64 {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "NAME_INVALID",
                "the repository name is empty or too long",
            ));
        }
        let ns = query.and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ns")
                .map(|(_, v)| v.into_owned())
        });
        let (host, repository) = match ns {
            // containerd's mirror request: the whole name is the repository.
            Some(ns) => (ns.to_ascii_lowercase(), name.to_string()),
            None => {
                let Some((first, repo)) = name.split_once('/') else {
                    return Err(err(
                        StatusCode::NOT_FOUND,
                        "NAME_UNKNOWN",
                        format!(
                            "{name:?}: the first path component names the upstream registry \
                             (e.g. /v2/ghcr.io/org/repo/...), then the repository"
                        ),
                    ));
                };
                let host = match upstreams.get(first) {
                    Some(h) => h.clone(),
                    None if is_host(first) => first.to_ascii_lowercase(),
                    None => {
                        return Err(err(
                            StatusCode::NOT_FOUND,
                            "NAME_UNKNOWN",
                            format!(
                                "{first:?} is neither a registry host nor an alias in [registry] upstreams"
                            ),
                        ));
                    }
                };
                (host, repo.to_string())
            }
        };
        let mut r = OciRef::parse(&format!("{host}/{repository}"))
            .map_err(|e| err(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string()))?;
        if r.registry != crate::source::canonical_registry(&host) {
            // The first component was taken as part of the repository: not a host.
            return Err(err(
                StatusCode::BAD_REQUEST,
                "NAME_INVALID",
                format!("{host:?} is not a registry host[:port]"),
            ));
        }
        r.tag = None;
        r.implicit_tag = false;
        r.digest = None;
        let digest = |s: &str| -> Result<Digest, PathError> {
            Digest::parse_canonical(s).ok_or_else(|| {
                err(
                    StatusCode::BAD_REQUEST,
                    "DIGEST_INVALID",
                    format!("{s:?} is not sha256:<64 lowercase hex digits>"),
                )
            })
        };
        let object = match kind {
            Kind::Blob => Object::Blob(digest(reference)?),
            Kind::Manifest if reference.contains(':') => {
                let d = digest(reference)?;
                r.digest = Some(d);
                Object::Manifest(d)
            }
            Kind::Manifest if is_tag(reference) => {
                r.tag = Some(reference.to_string());
                Object::Tag(reference.to_string())
            }
            Kind::Manifest => {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "TAG_INVALID",
                    format!("{reference:?} is not a tag or a digest"),
                ));
            }
        };
        Ok(Target {
            reference: r,
            object,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str, query: Option<&str>) -> Result<Target, PathError> {
        let aliases =
            BTreeMap::from([("internal".to_string(), "registry.internal:5000".to_string())]);
        Target::parse(path, query, &aliases)
    }

    #[test]
    fn upstream_host_alias_port_and_ns() {
        let d = format!("sha256:{}", "a".repeat(64));
        let t = parse("/v2/ghcr.io/acme/filters/acl/manifests/1.2", None).unwrap();
        assert_eq!(t.reference.registry, "ghcr.io");
        assert_eq!(t.reference.repository, "acme/filters/acl");
        assert_eq!(t.object, Object::Tag("1.2".into()));
        let t = parse("/v2/internal/team/f/manifests/latest", None).unwrap();
        assert_eq!(t.reference.registry, "registry.internal:5000");
        assert_eq!(t.reference.repository, "team/f");
        let t = parse(&format!("/v2/127.0.0.1:5000/a/blobs/{d}"), None).unwrap();
        assert_eq!(t.reference.registry, "127.0.0.1:5000");
        assert_eq!(t.object, Object::Blob(d.parse().unwrap()));
        let t = parse("/v2/team/f/manifests/v1", Some("ns=registry.internal:5000")).unwrap();
        assert_eq!(t.reference.registry, "registry.internal:5000");
        assert_eq!(t.reference.repository, "team/f");
        let t = parse("/v2/docker.io/istio/plugin/manifests/1", None).unwrap();
        assert_eq!(t.reference.repository, "istio/plugin");
        // A repository named "manifests" still parses: the last marker wins.
        let t = parse("/v2/ghcr.io/a/manifests/manifests/t", None).unwrap();
        assert_eq!(t.reference.repository, "a/manifests");
    }

    #[test]
    fn refuses_what_it_does_not_serve() {
        for (path, code) in [
            ("/v2/acme/f/manifests/1", "NAME_UNKNOWN"),
            ("/v2/ghcr.io/manifests/1", "NAME_UNKNOWN"),
            ("/v2/ghcr.io/a/manifests/sha256:xyz", "DIGEST_INVALID"),
            ("/v2/ghcr.io/a/blobs/latest", "DIGEST_INVALID"),
            ("/v2/ghcr.io/a/manifests/-bad", "TAG_INVALID"),
            ("/v2/ghcr.io/A/manifests/1", "NAME_INVALID"),
            ("/v2/ghcr.io/a/tags/list", "UNSUPPORTED"),
            ("/v2/ghcr.io/a/blobs/uploads/", "UNSUPPORTED"),
            ("/v2/ghcr.io/a%2fb/manifests/1", "NAME_INVALID"),
        ] {
            let e = parse(path, None).unwrap_err();
            assert_eq!(e.code, code, "{path}: {}", e.message);
        }
    }

    proptest::proptest! {
        /// Any path parses or is refused with a distribution error, never a panic.
        #[test]
        fn any_path_is_handled(path in "/v2/[a-zA-Z0-9:./_@%-]{0,80}", q in proptest::option::of("ns=[a-z0-9.:]{0,20}")) {
            let _ = parse(&path, q.as_deref());
        }
    }
}
