//! The registry endpoint: the read side of the OCI distribution API, on the proxies' socket
//! and on the optional TCP listener `[registry] addr` (with TLS when configured). Any OCI
//! client (Istio's agent, skopeo, oras, containerd as a mirror) pulls through the cache:
//!
//! - `GET /v2/`: `401` with a Basic challenge without credentials (clients send theirs only
//!   after one), `200` with them;
//! - `GET`/`HEAD /v2/<upstream>/<repository>/manifests/<tag|digest>` and `.../blobs/<digest>`,
//!   where `<upstream>` is a registry host (`ghcr.io`), an alias from `[registry] upstreams`,
//!   or a raw `host:port`; or containerd's mirror form `/v2/<repository>/...?ns=<host>`;
//! - everything else that writes: `405`. Errors have the spec's body,
//!   `{"errors":[{"code","message","detail"}]}`, with wasm-cache's own code in `detail`.
//!
//! [`path`] parses request paths; [`tls`] is the TLS listener.

pub mod path;
pub mod tls;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine;

use crate::auth::{Credential, Secret};
use crate::error::{Code, Error};
use crate::listen::direct::{Reply, ReplyBody};
use crate::service::Service;
use crate::service::registry::Object;
use path::{Kind, Target};

/// The `WWW-Authenticate` challenge the endpoint sends.
const CHALLENGE: &str = "Basic realm=\"wasm-cache\"";
/// The API version header every answer carries.
const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// The endpoint's routes, for the proxies' socket and the TCP listener.
pub fn routes() -> Router<Service> {
    Router::new()
        .route("/v2", any(base))
        .route("/v2/", any(base))
        .route("/v2/{*rest}", any(object))
}

/// The router of the TCP listener: the endpoint only.
pub fn router(service: Service) -> Router {
    routes()
        .fallback(|| async {
            distribution_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint", None)
        })
        .with_state(service)
}

/// A distribution API error answer.
fn distribution_error(
    status: StatusCode,
    code: &str,
    message: &str,
    ours: Option<Code>,
) -> Response {
    let mut e = serde_json::json!({ "code": code, "message": message });
    if let Some(c) = ours {
        e["detail"] = serde_json::json!({ "code": c.as_str() });
    }
    let body = serde_json::json!({ "errors": [e] }).to_string();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    if status == StatusCode::UNAUTHORIZED {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(CHALLENGE),
        );
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

/// The distribution answer for a wasm-cache error about `kind`.
fn error_response(e: &Error, kind: Option<Kind>) -> Response {
    let unknown = match kind {
        Some(Kind::Blob) => "BLOB_UNKNOWN",
        _ => "MANIFEST_UNKNOWN",
    };
    let (status, code) = match e.code {
        Code::NotFound | Code::NotPresent => (StatusCode::NOT_FOUND, unknown),
        Code::AccessDenied => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        Code::Forbidden | Code::SignatureInvalid | Code::TooLarge => {
            (StatusCode::FORBIDDEN, "DENIED")
        }
        Code::InvalidRequest | Code::UnsupportedScheme => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
        Code::ChecksumMismatch | Code::InvalidModule | Code::UpstreamError => {
            (StatusCode::BAD_GATEWAY, "UNAVAILABLE")
        }
        Code::Timeout => (StatusCode::GATEWAY_TIMEOUT, "UNAVAILABLE"),
        Code::StorageFull => (StatusCode::INSUFFICIENT_STORAGE, "UNAVAILABLE"),
        Code::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
    };
    distribution_error(status, code, &e.message, Some(e.code))
}

/// The client's credential from `Authorization: Basic`; `None` without one, for another
/// scheme, or for an empty one (`:`).
fn basic_credential(headers: &HeaderMap) -> Result<Option<Credential>, Error> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| Error::invalid("the Authorization header is not text"))?;
    let Some((scheme, rest)) = v.trim().split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| Error::invalid("the Basic credential is not base64"))?;
    let text =
        String::from_utf8(raw).map_err(|_| Error::invalid("the Basic credential is not UTF-8"))?;
    let (user, pass) = text.split_once(':').unwrap_or((text.as_str(), ""));
    if user.is_empty() && pass.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credential {
        username: user.to_string(),
        password: Secret::new(pass.to_string()),
    }))
}

/// `GET /v2/`: the version check and the place OCI clients learn to send credentials.
async fn base(method: Method, headers: HeaderMap) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return not_allowed();
    }
    match basic_credential(&headers) {
        Ok(Some(_)) => {
            let mut resp = Response::new(Body::from("{}"));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
            resp
        }
        Ok(None) => distribution_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authentication required (Basic; the credentials are checked by the upstream registry per repository)",
            None,
        ),
        Err(e) => error_response(&e, None),
    }
}

/// `405` for anything that writes.
fn not_allowed() -> Response {
    distribution_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
        "wasm-cache is a read-only registry endpoint: push to the upstream registry",
        None,
    )
}

/// `GET`/`HEAD` of a manifest or blob.
async fn object(
    State(service): State<Service>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return not_allowed();
    }
    let hop = crate::fetch::client::HOP_HEADER;
    if headers
        .get(hop)
        .is_some_and(|v| v.as_bytes() == crate::fetch::client::hop_id().as_bytes())
    {
        return distribution_error(
            StatusCode::LOOP_DETECTED,
            "DENIED",
            "request loop: the upstream named in the path is this wasm-cache itself",
            None,
        );
    }
    let target = match Target::parse(
        uri.path(),
        uri.query(),
        &service.registry_settings().upstreams,
    ) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let cred = match basic_credential(&headers) {
        Ok(c) => c,
        Err(e) => return error_response(&e, Some(target.kind())),
    };
    let head = method == Method::HEAD;
    let object = target.object.clone();
    match service.registry_get(&target.reference, &object, cred).await {
        Ok(served) => {
            let len = served.content.len();
            if !head {
                service.count_served(len);
            }
            let body = if head {
                ReplyBody::Empty(len)
            } else {
                match served.content {
                    crate::cache::Resident::Memory(b) => ReplyBody::Bytes(b),
                    crate::cache::Resident::File(f, n) => ReplyBody::File(f, n),
                }
            };
            let mut headers = vec![(
                header::HeaderName::from_static("docker-content-digest"),
                HeaderValue::from_str(&served.digest.to_string())
                    .unwrap_or(HeaderValue::from_static("")),
            )];
            if let Ok(v) = HeaderValue::from_str(&served.media_type) {
                headers.push((header::CONTENT_TYPE, v));
            }
            headers.push((
                header::HeaderName::from_static(API_VERSION.0),
                HeaderValue::from_static(API_VERSION.1),
            ));
            if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", served.digest)) {
                headers.push((header::ETAG, etag));
            }
            crate::server::into_response(Reply {
                status: StatusCode::OK,
                headers,
                body,
            })
        }
        Err(e) => error_response(&e, Some(target.kind())),
    }
}

impl Target {
    /// What kind of object the target names.
    fn kind(&self) -> Kind {
        match self.object {
            Object::Blob(_) => Kind::Blob,
            _ => Kind::Manifest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn basic_credentials_and_what_counts_as_none() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let c = basic_credential(&headers(&format!("Basic {}", b64("alice:pw:with:colons"))))
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "alice");
        assert_eq!(c.password.expose(), "pw:with:colons");
        assert!(basic_credential(&HeaderMap::new()).unwrap().is_none());
        assert!(
            basic_credential(&headers("Basic Og==")).unwrap().is_none(),
            "\":\""
        );
        assert!(basic_credential(&headers("Bearer abc")).unwrap().is_none());
        assert_eq!(
            basic_credential(&headers("Basic !!!")).unwrap_err().code,
            Code::InvalidRequest
        );
    }

    #[test]
    fn errors_have_the_spec_codes_and_the_challenge() {
        let r = error_response(&Error::new(Code::AccessDenied, "no"), Some(Kind::Blob));
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], CHALLENGE);
        let r = error_response(&Error::new(Code::NotFound, "no"), Some(Kind::Blob));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = error_response(&Error::new(Code::SignatureInvalid, "no"), None);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(not_allowed().headers()[header::ALLOW], "GET, HEAD");
    }
}
