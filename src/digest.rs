//! sha256 digests: parsing the forms users write, and hashing while writing.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// A sha256 digest. Displays as `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses exactly the canonical form, `sha256:` and 64 lowercase hex digits: what a
    /// digest inside a manifest or in a registry path must be (it becomes a request path).
    pub fn parse_canonical(s: &str) -> Option<Digest> {
        let ok = s.len() == 71
            && s.starts_with("sha256:")
            && s[7..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return None;
        }
        s.parse().ok()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a digest does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Another algorithm than sha256.
    #[error("unsupported digest algorithm {0:?}: only sha256 is supported")]
    Algorithm(String),
    /// Not 64 hex digits.
    #[error("invalid sha256 {0:?}: expected 64 hex digits, optionally prefixed by 'sha256:'")]
    Malformed(String),
}

impl From<DigestError> for Error {
    fn from(e: DigestError) -> Error {
        Error::invalid(e.to_string())
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Accepts 64 hex digits, optionally prefixed by `sha256:`, in any case.
    fn from_str(s: &str) -> Result<Self, DigestError> {
        let trimmed = s.trim();
        let hexpart = match trimmed.split_once(':') {
            Some((algo, rest)) if algo.eq_ignore_ascii_case("sha256") => rest,
            Some((algo, _)) => return Err(DigestError::Algorithm(algo.to_string())),
            None => trimmed,
        };
        let mut out = [0u8; 32];
        if hexpart.len() != 64
            || hex::decode_to_slice(hexpart.to_ascii_lowercase(), &mut out).is_err()
        {
            return Err(DigestError::Malformed(s.to_string()));
        }
        Ok(Digest(out))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental sha256 that also counts bytes.
#[derive(Default, Clone)]
pub struct Hasher {
    /// The running hash state.
    inner: Sha256,
    /// Bytes hashed so far, for size checks.
    len: u64,
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hasher({} bytes)", self.len)
    }
}

impl Hasher {
    /// Feeds `bytes` into the hash.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing has been hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed in.
    pub fn finish(self) -> Digest {
        Digest(self.inner.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_every_accepted_form_to_the_same_digest() {
        let want = Digest::of(b"");
        for form in [
            HEX.to_string(),
            format!("sha256:{HEX}"),
            format!("SHA256:{}", HEX.to_uppercase()),
        ] {
            assert_eq!(form.parse::<Digest>().unwrap(), want, "{form}");
        }
        assert_eq!(want.to_string(), format!("sha256:{HEX}"));
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256:",
            "abc",
            &HEX[1..],
            "sha512:00",
            &format!("{HEX}0"),
        ] {
            let err = bad.parse::<Digest>().unwrap_err();
            assert_eq!(
                Error::from(err).code,
                crate::error::Code::InvalidRequest,
                "{bad}"
            );
        }
    }

    #[test]
    fn hasher_matches_one_shot() {
        let mut h = Hasher::default();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.len(), 11);
        assert_eq!(h.finish(), Digest::of(b"hello world"));
    }
}
