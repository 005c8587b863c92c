//! Credentials: pull secrets and node credentials, the registry credentials they hold, and
//! the keyed hashes that stand for a credential wherever one must be remembered.
//!
//! A secret is held in a [`Secret`] from the moment the JSON is parsed, so it cannot reach a
//! log or an error message by accident. Nothing here writes a secret anywhere: the cache
//! only ever records [`NodeKey::credential_id`], an HMAC under a key that never leaves the
//! node.

pub mod dockerconfig;
pub mod helper;
pub mod node;
pub mod provider;

use std::fmt;
use std::io::Read;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::cache::store::Store;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// A secret string. `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself; only the credential code reads it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A registry login.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The user name (not secret, but not logged either).
    pub username: String,
    /// The password or token.
    pub password: Secret,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

impl Credential {
    /// A credential.
    pub fn new(username: impl Into<String>, password: Secret) -> Self {
        Credential {
            username: username.into(),
            password,
        }
    }

    /// An in-memory fingerprint, to key caches of tokens and flights. Never persisted.
    pub fn fingerprint(&self) -> Digest {
        let mut m = Vec::with_capacity(self.username.len() + self.password.0.len() + 1);
        m.extend_from_slice(self.username.as_bytes());
        m.push(0);
        m.extend_from_slice(self.password.0.as_bytes());
        Digest::of(&m)
    }
}

type HmacSha256 = Hmac<Sha256>;

/// File name of the node key under `cache_dir`.
const KEY_FILE: &str = "node.key";

/// A random key kept in the cache dir (mode 0600): credential ids and module-url tokens are
/// HMACs under it, so what the cache records cannot be reversed or forged elsewhere.
#[derive(Clone)]
pub struct NodeKey([u8; 32]);

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeKey(<redacted>)")
    }
}

impl NodeKey {
    /// Loads the key, creating it on first start. Blocking.
    pub fn load_or_create(store: &Store) -> Result<NodeKey> {
        if let Some(bytes) = store.read_meta(KEY_FILE)?
            && let Ok(k) = <[u8; 32]>::try_from(bytes.as_slice())
        {
            return Ok(NodeKey(k));
        }
        let mut k = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut k))
            .map_err(|e| Error::internal("reading /dev/urandom", e))?;
        store.write_meta(KEY_FILE, &k, 0o600)?;
        Ok(NodeKey(k))
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        hex::encode(m.finalize().into_bytes())
    }

    /// The id recorded for `cred` used against `registry`.
    pub fn credential_id(&self, registry: &str, cred: &Credential) -> String {
        self.mac(&[
            b"credential",
            registry.as_bytes(),
            cred.username.as_bytes(),
            cred.password.0.as_bytes(),
        ])
    }

    /// The token that opens `module` for the holder of credential `cred_id`.
    pub fn module_token(&self, module: &Digest, cred_id: &str) -> String {
        self.mac(&[b"module", &module.0, cred_id.as_bytes()])
    }

    /// Constant-time check of a module token.
    pub fn check_module_token(&self, module: &Digest, cred_id: &str, token: &str) -> bool {
        let Ok(given) = hex::decode(token) else {
            return false;
        };
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in [&b"module"[..], &module.0, cred_id.as_bytes()] {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m.verify_slice(&given).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_secret() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
        let c = Credential::new("alice", s);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn node_key_persists_and_ids_differ_by_registry_and_password() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let k1 = NodeKey::load_or_create(&store).unwrap();
        let k2 = NodeKey::load_or_create(&store).unwrap();
        let c = Credential::new("alice", Secret::new("pw"));
        assert_eq!(k1.credential_id("r:1", &c), k2.credential_id("r:1", &c));
        assert_ne!(k1.credential_id("r:1", &c), k1.credential_id("r:2", &c));
        let other = Credential::new("alice", Secret::new("pw2"));
        assert_ne!(k1.credential_id("r:1", &c), k1.credential_id("r:1", &other));
        let id = k1.credential_id("r:1", &c);
        let d = Digest::of(b"m");
        let t = k1.module_token(&d, &id);
        assert!(k1.check_module_token(&d, &id, &t));
        assert!(!k1.check_module_token(&Digest::of(b"n"), &id, &t));
        assert!(!k1.check_module_token(&d, &id, "00"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
