//! The one error type a request can end in, and its stable wire code.
//!
//! Every leaf (parsing, fetching, storing) returns an [`Error`]; the server maps it to an HTTP
//! status and `{"error": {"code", "message"}}` in exactly one place ([`Code::status`]).
//! Messages name the url, registry and status that failed, never a credential.

use std::fmt;

/// Stable error codes, as they appear on the wire. Clients match on these; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The request is malformed (bad JSON, bad digest, bad policy, bad reference).
    InvalidRequest,
    /// The url has a scheme we do not fetch.
    UnsupportedScheme,
    /// Local policy refuses the request (network guard, file roots).
    Forbidden,
    /// The upstream refused our credentials, or the caller may not read a cached module.
    AccessDenied,
    /// The upstream says the module does not exist.
    NotFound,
    /// The module is not in the cache and the policy forbids fetching it, or an unknown digest.
    NotPresent,
    /// The fetched content does not match the expected sha256.
    ChecksumMismatch,
    /// The content is not a valid Wasm module, or the artifact holds no module we understand.
    InvalidModule,
    /// The module (or an archive entry, or a manifest) exceeds the configured size cap.
    TooLarge,
    /// The upstream failed (5xx, connection error, protocol error).
    UpstreamError,
    /// The upstream did not answer within the configured time.
    Timeout,
    /// The cache's filesystem is full (ENOSPC, EDQUOT): nothing was kept; retry once space
    /// is free.
    StorageFull,
    /// A signature policy applies and no configured key verified the module's signature.
    SignatureInvalid,
    /// Something failed on this node (an I/O error, a bug).
    Internal,
}

impl Code {
    /// The wire spelling, e.g. `checksum_mismatch`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidRequest => "invalid_request",
            Code::UnsupportedScheme => "unsupported_scheme",
            Code::Forbidden => "forbidden",
            Code::AccessDenied => "access_denied",
            Code::NotFound => "not_found",
            Code::NotPresent => "not_present",
            Code::ChecksumMismatch => "checksum_mismatch",
            Code::InvalidModule => "invalid_module",
            Code::TooLarge => "too_large",
            Code::UpstreamError => "upstream_error",
            Code::Timeout => "timeout",
            Code::StorageFull => "storage_full",
            Code::SignatureInvalid => "signature_invalid",
            Code::Internal => "internal",
        }
    }

    /// The HTTP status the socket API answers with for this code.
    pub fn status(self) -> u16 {
        match self {
            Code::InvalidRequest | Code::UnsupportedScheme => 400,
            Code::Forbidden | Code::AccessDenied | Code::SignatureInvalid => 403,
            Code::NotFound | Code::NotPresent => 404,
            Code::ChecksumMismatch | Code::InvalidModule | Code::TooLarge => 422,
            Code::UpstreamError => 502,
            Code::Timeout => 504,
            Code::StorageFull => 507,
            Code::Internal => 500,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed request: a stable code and a human message. Cheap to clone, so one failed
/// upstream fetch can be reported to every caller that waited on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    /// What kind of failure; decides the HTTP status.
    pub code: Code,
    /// What failed and where; never contains a secret.
    pub message: String,
}

impl Error {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }

    /// Shorthand for [`Code::InvalidRequest`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidRequest, message)
    }

    /// A local I/O failure: [`Code::StorageFull`] when the filesystem is full, else
    /// [`Code::Internal`].
    pub fn io(context: &str, err: std::io::Error) -> Self {
        let full = matches!(
            err.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        );
        if full {
            return Self::new(
                Code::StorageFull,
                format!("{context}: the cache's filesystem is full ({err})"),
            );
        }
        Self::internal(context, err)
    }

    /// Shorthand for [`Code::Internal`], for local failures.
    pub fn internal(context: &str, err: impl fmt::Display) -> Self {
        Self::new(Code::Internal, format!("{context}: {err}"))
    }
}

/// The result of anything that can end a request.
pub type Result<T, E = Error> = std::result::Result<T, E>;
