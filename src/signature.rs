//! Signed modules: cosign "simple signing" signatures checked against keys the operator
//! configures (`[[signatures.policy]]`), offline (no Rekor, no Fulcio).
//!
//! A policy matches OCI repositories by glob (`ghcr.io/acme/filters/*`: one path segment;
//! `registry.internal:5000/**`: any depth); the most specific match wins, and a repository no
//! policy matches is not checked. Signatures live where cosign puts them: the manifest tagged
//! `sha256-<hex>.sig` in the module's repository, one layer per signature, the payload in the
//! layer and the base64 signature in its `dev.cosignproject.cosign/signature` annotation.
//! The payload must name the manifest digest the module was resolved to, be of type
//! `cosign container image signature`, and, when it names a repository, name this one.
//!
//! Sigstore bundles (`application/vnd.dev.sigstore.bundle.v0.3+json`) that refer to the
//! manifest (the OCI 1.1 referrers API, or its fallback tag `sha256-<hex>`) count too, when
//! keyed (a public-key verification material): a `messageSignature` over the manifest, or a
//! DSSE envelope over an in-toto statement whose subject is the manifest.

use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::digest::Digest;

/// Largest signature payload accepted (cosign's are a few hundred bytes).
pub const MAX_PAYLOAD: u64 = 64 << 10;
/// Most signatures looked at per module.
pub const MAX_SIGNATURES: usize = 32;
/// Largest key file read (an RSA-8192 public key is under 2 KiB).
const MAX_KEY_FILE: u64 = 64 << 10;
/// Media type of a simple-signing layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// Artifact (and layer) media type of a Sigstore bundle.
pub const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// Largest bundle read.
pub const MAX_BUNDLE: u64 = 256 << 10;

/// A signature as found in the registry (its bytes verified against their digests).
#[derive(Debug, Clone)]
pub enum Found {
    /// A cosign simple-signing layer.
    Simple {
        /// The signed payload (JSON).
        payload: Vec<u8>,
        /// The base64 signature from the layer annotation.
        signature: String,
    },
    /// A Sigstore bundle (JSON) that refers to the manifest.
    Bundle(Vec<u8>),
}

/// What a policy does with a module that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse it (`signature_invalid`).
    Enforce,
    /// Log and count it, serve it anyway.
    Warn,
    /// Do not check.
    Off,
}

/// A public key.
#[derive(Debug)]
enum Verifier {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
    Rsa(rsa::pkcs1v15::VerifyingKey<sha2::Sha256>),
}

/// A configured key.
#[derive(Debug)]
pub struct Key {
    /// The first 16 hex digits of the sha256 of the key's DER (SubjectPublicKeyInfo).
    pub id: String,
    /// Where it was read from.
    pub path: PathBuf,
    /// The key.
    verifier: Verifier,
}

impl Key {
    /// Reads a PEM public key (ECDSA P-256 or P-384, Ed25519, RSA).
    pub fn load(path: &Path) -> Result<Key, String> {
        use p256::pkcs8::DecodePublicKey;
        let pem = crate::config::read_capped_text(path, MAX_KEY_FILE)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let (_, der) = p256::pkcs8::der::Document::from_pem(&pem)
            .map_err(|e| format!("{}: not a PEM public key: {e}", path.display()))?;
        let verifier = if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_pem(&pem) {
            Verifier::P256(k)
        } else if let Ok(k) = p384::ecdsa::VerifyingKey::from_public_key_pem(&pem) {
            Verifier::P384(k)
        } else if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(&pem) {
            Verifier::Ed25519(k)
        } else if let Ok(k) = rsa::RsaPublicKey::from_public_key_pem(&pem) {
            Verifier::Rsa(rsa::pkcs1v15::VerifyingKey::new(k))
        } else {
            return Err(format!(
                "{}: not an ECDSA P-256/P-384, Ed25519 or RSA public key",
                path.display()
            ));
        };
        Ok(Key {
            id: hex::encode(sha2::Sha256::digest(der.as_bytes()))[..16].to_string(),
            path: path.to_path_buf(),
            verifier,
        })
    }

    /// True when `signature` is this key's signature of a message whose SHA-256 is `digest`
    /// (a bundle's `messageSignature`; Ed25519 signs messages, not digests).
    fn verifies_prehash(&self, digest: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        match &self.verifier {
            Verifier::P256(k) => p256::ecdsa::Signature::from_der(signature)
                .is_ok_and(|s| k.verify_prehash(digest, &s).is_ok()),
            Verifier::P384(k) => p384::ecdsa::Signature::from_der(signature)
                .is_ok_and(|s| k.verify_prehash(digest, &s).is_ok()),
            Verifier::Ed25519(_) => false,
            Verifier::Rsa(k) => rsa::pkcs1v15::Signature::try_from(signature)
                .is_ok_and(|s| k.verify_prehash(digest, &s).is_ok()),
        }
    }

    /// True when `signature` (raw bytes) is this key's signature of `payload`.
    fn verifies(&self, payload: &[u8], signature: &[u8]) -> bool {
        use ed25519_dalek::Verifier as _;
        match &self.verifier {
            Verifier::P256(k) => p256::ecdsa::Signature::from_der(signature)
                .or_else(|_| p256::ecdsa::Signature::from_slice(signature))
                .is_ok_and(|s| k.verify(payload, &s).is_ok()),
            Verifier::P384(k) => p384::ecdsa::Signature::from_der(signature)
                .or_else(|_| p384::ecdsa::Signature::from_slice(signature))
                .is_ok_and(|s| k.verify(payload, &s).is_ok()),
            Verifier::Ed25519(k) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|s| k.verify(payload, &s).is_ok()),
            Verifier::Rsa(k) => rsa::pkcs1v15::Signature::try_from(signature)
                .is_ok_and(|s| k.verify(payload, &s).is_ok()),
        }
    }
}

/// One `[[signatures.policy]]`.
#[derive(Debug)]
pub struct Policy {
    /// The repository glob.
    pub pattern: String,
    /// What happens on failure.
    pub mode: Mode,
    /// The keys any of which may verify.
    pub keys: Vec<Key>,
    /// Names this key set: a record verified under another key set is verified again.
    pub keyset: String,
}

/// All policies.
#[derive(Debug, Default)]
pub struct Policies {
    /// In config order.
    list: Vec<Policy>,
}

/// A policy as written in the config.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Repository glob, e.g. `ghcr.io/acme/filters/*`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// PEM public key files.
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    /// `enforce` (default), `warn` or `off`.
    #[serde(default)]
    pub mode: Option<String>,
}

impl Policies {
    /// Validates the policies and reads their keys. Blocking; at start.
    pub fn load(raw: &[RawPolicy]) -> Result<Policies, String> {
        let mut list = Vec::new();
        for p in raw {
            let mode = match p.mode.as_deref().unwrap_or("enforce") {
                "enforce" => Mode::Enforce,
                "warn" => Mode::Warn,
                "off" => Mode::Off,
                other => {
                    return Err(format!(
                        "policy {:?}: mode {other:?}: expected \"enforce\", \"warn\" or \"off\"",
                        p.pattern
                    ));
                }
            };
            if p.pattern.trim().is_empty() || p.pattern.contains("://") {
                return Err(format!(
                    "policy {:?}: match is a repository glob like \"ghcr.io/acme/*\"",
                    p.pattern
                ));
            }
            if mode != Mode::Off && p.keys.is_empty() {
                return Err(format!("policy {:?}: no keys", p.pattern));
            }
            let keys = p
                .keys
                .iter()
                .map(|k| Key::load(k))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("policy {:?}: {e}", p.pattern))?;
            let mut ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
            ids.sort();
            list.push(Policy {
                pattern: p.pattern.trim().to_ascii_lowercase(),
                mode,
                keyset: ids.join(","),
                keys,
            });
        }
        Ok(Policies { list })
    }

    /// The most specific policy matching `registry/repository` that checks anything.
    pub fn for_repository(&self, registry: &str, repository: &str) -> Option<&Policy> {
        if self.list.is_empty() {
            return None;
        }
        let name = format!("{registry}/{repository}").to_ascii_lowercase();
        self.list
            .iter()
            .filter(|p| glob_matches(&p.pattern, &name))
            .max_by_key(|p| specificity(&p.pattern))
            .filter(|p| p.mode != Mode::Off)
    }

    /// True when no policy is configured.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Literal segments count most, then the pattern's length.
fn specificity(pattern: &str) -> (usize, usize) {
    let literal = pattern.split('/').filter(|s| !s.contains('*')).count();
    (literal, pattern.len())
}

/// `*` is one path segment (or, inside a segment, any run of characters but `/`); `**` is
/// any number of segments. Iterative, at most `segments(pattern) * segments(name)` steps.
fn glob_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let n: Vec<&str> = name.split('/').collect();
    // reach[j]: the first i pattern segments can match the first j name segments.
    let mut reach = vec![false; n.len() + 1];
    reach[0] = true;
    for seg in &p {
        let mut next = vec![false; n.len() + 1];
        if *seg == "**" {
            let mut any = false;
            for j in 0..=n.len() {
                any |= reach[j];
                next[j] = any;
            }
        } else {
            for j in 0..n.len() {
                if reach[j] && crate::auth::dockerconfig::glob_part(seg, n[j]) {
                    next[j + 1] = true;
                }
            }
        }
        reach = next;
    }
    reach[n.len()]
}

/// A Sigstore bundle, as far as keyed verification reads it.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    verification_material: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    message_signature: Option<MessageSignature>,
    #[serde(default)]
    dsse_envelope: Option<Envelope>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageSignature {
    message_digest: MessageDigest,
    signature: String,
}

#[derive(Debug, serde::Deserialize)]
struct MessageDigest {
    algorithm: String,
    digest: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    #[serde(default)]
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, serde::Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

/// An in-toto statement's subjects.
#[derive(Debug, serde::Deserialize)]
struct Statement {
    #[serde(default)]
    subject: Vec<Subject>,
}

#[derive(Debug, serde::Deserialize)]
struct Subject {
    #[serde(default)]
    digest: std::collections::HashMap<String, String>,
}

/// The payload fields checked.
#[derive(Debug, serde::Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Debug, serde::Deserialize)]
struct Critical {
    #[serde(default)]
    identity: Option<Identity>,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, serde::Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference", default)]
    docker_reference: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

impl Policy {
    /// The id of the key that verified one of `sigs` for manifest `digest` of
    /// `registry/repository`; otherwise why none did.
    pub fn verify(
        &self,
        sigs: &[Found],
        digest: &Digest,
        registry: &str,
        repository: &str,
    ) -> Result<String, String> {
        use base64::Engine as _;
        if sigs.is_empty() {
            return Err("no signature".into());
        }
        let mut why = Vec::new();
        for found in sigs.iter().take(MAX_SIGNATURES) {
            let (payload_bytes, signature) = match found {
                Found::Simple { payload, signature } => (payload, signature),
                Found::Bundle(bytes) => match self.verify_bundle(bytes, digest) {
                    Ok(key) => return Ok(key),
                    Err(e) => {
                        why.push(e);
                        continue;
                    }
                },
            };
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
                why.push("a signature is not base64".to_string());
                continue;
            };
            let Some(key) = self.keys.iter().find(|k| k.verifies(payload_bytes, &raw)) else {
                why.push("a signature is by none of the keys".to_string());
                continue;
            };
            let payload: Payload = match serde_json::from_slice(payload_bytes) {
                Ok(p) => p,
                Err(e) => {
                    why.push(format!(
                        "a signed payload is not a simple-signing payload: {e}"
                    ));
                    continue;
                }
            };
            let c = payload.critical;
            if c.kind != "cosign container image signature" {
                why.push(format!("a signed payload has type {:?}", c.kind));
                continue;
            }
            if c.image.docker_manifest_digest != digest.to_string() {
                why.push(format!(
                    "a signature is for {}, not {digest}",
                    c.image.docker_manifest_digest
                ));
                continue;
            }
            if let Some(reference) = c.identity.and_then(|i| i.docker_reference)
                && !names_repository(&reference, registry, repository)
            {
                why.push(format!(
                    "a signature names another repository ({reference})"
                ));
                continue;
            }
            return Ok(key.id.clone());
        }
        why.dedup();
        Err(why.join("; "))
    }

    /// The key that verified a Sigstore bundle (keyed: a public-key verification material)
    /// for manifest `digest`: a `messageSignature` over the manifest, or a DSSE envelope whose
    /// in-toto statement has the manifest as a subject.
    fn verify_bundle(&self, bytes: &[u8], digest: &Digest) -> Result<String, String> {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s.trim());
        let bundle: Bundle =
            serde_json::from_slice(bytes).map_err(|e| format!("a bundle does not parse: {e}"))?;
        if !bundle
            .media_type
            .starts_with("application/vnd.dev.sigstore.bundle")
        {
            return Err(format!("a bundle has media type {:?}", bundle.media_type));
        }
        if bundle
            .verification_material
            .as_ref()
            .is_none_or(|m| m.get("publicKey").is_none())
        {
            return Err("a bundle is not signed with a public key (keyless bundles need Fulcio and Rekor, which are not used)".into());
        }
        let want = hex::decode(digest.hex()).unwrap_or_default();
        if let Some(ms) = bundle.message_signature {
            if ms.message_digest.algorithm != "SHA2_256"
                || b64(&ms.message_digest.digest).ok().as_deref() != Some(&want[..])
            {
                return Err(format!("a bundle signs another message than {digest}"));
            }
            let sig = b64(&ms.signature).map_err(|_| "a bundle signature is not base64")?;
            return self
                .keys
                .iter()
                .find(|k| k.verifies_prehash(&want, &sig))
                .map(|k| k.id.clone())
                .ok_or_else(|| "a bundle is signed by none of the keys".to_string());
        }
        let Some(env) = bundle.dsse_envelope else {
            return Err("a bundle has neither a message signature nor a DSSE envelope".into());
        };
        if env.payload_type != "application/vnd.in-toto+json" {
            return Err(format!(
                "a DSSE envelope has payload type {:?}",
                env.payload_type
            ));
        }
        let payload = b64(&env.payload).map_err(|_| "a DSSE payload is not base64")?;
        let pae = [
            format!(
                "DSSEv1 {} {} {} ",
                env.payload_type.len(),
                env.payload_type,
                payload.len()
            )
            .as_bytes(),
            &payload,
        ]
        .concat();
        let key = env
            .signatures
            .iter()
            .filter_map(|s| b64(&s.sig).ok())
            .find_map(|sig| self.keys.iter().find(|k| k.verifies(&pae, &sig)))
            .ok_or("a DSSE envelope is signed by none of the keys")?;
        let statement: Statement = serde_json::from_slice(&payload)
            .map_err(|e| format!("a DSSE payload is not an in-toto statement: {e}"))?;
        if !statement.subject.iter().any(|s| {
            s.digest
                .get("sha256")
                .is_some_and(|h| h.eq_ignore_ascii_case(&digest.hex()))
        }) {
            return Err(format!("a signed statement is not about {digest}"));
        }
        Ok(key.id.clone())
    }

    /// The key ids, for messages.
    pub fn key_ids(&self) -> String {
        self.keys
            .iter()
            .map(|k| format!("{} ({})", k.id, k.path.display()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// True when a payload's `docker-reference` (`registry/repository`, maybe with a tag or
/// digest) names `registry/repository`.
fn names_repository(reference: &str, registry: &str, repository: &str) -> bool {
    // The reference parser of urls: the same Docker Hub aliases, case and grammar.
    matches!(
        crate::source::Source::parse(reference),
        Ok(crate::source::Source::Oci(r)) if r.registry == registry && r.repository == repository
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_segments() {
        assert!(glob_matches(
            "ghcr.io/acme/filters/*",
            "ghcr.io/acme/filters/acl"
        ));
        assert!(!glob_matches(
            "ghcr.io/acme/filters/*",
            "ghcr.io/acme/filters/a/b"
        ));
        assert!(glob_matches(
            "registry.internal:5000/**",
            "registry.internal:5000/a/b/c"
        ));
        assert!(glob_matches("ghcr.io/acme/f*", "ghcr.io/acme/filters"));
        assert!(!glob_matches("ghcr.io/acme/*", "ghcr.io/other/x"));
        // Many `**` against a deep name: polynomial, and right.
        let long = vec!["a"; 200].join("/");
        assert!(glob_matches(
            &vec!["**"; 100].join("/"),
            &format!("{long}/b")
        ));
        assert!(!glob_matches(
            &format!("{}/c", vec!["**"; 100].join("/")),
            &long
        ));
        assert!(specificity("ghcr.io/acme/filters/*") > specificity("ghcr.io/**"));
    }

    /// Runs openssl (installed by tests/run.sh) with `args`.
    fn openssl(args: &[&str]) -> Vec<u8> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
        out.stdout
    }

    #[test]
    // Fixture files, not cache files.
    #[allow(clippy::disallowed_methods)]
    fn p384_ed25519_and_rsa_keys_verify_and_other_keys_do_not() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n).display().to_string();
        let digest = Digest::of(b"manifest");
        let payload = serde_json::json!({
            "critical": {
                "identity": {"docker-reference": "reg.example/acme/acl"},
                "image": {"docker-manifest-digest": digest.to_string()},
                "type": "cosign container image signature"
            }
        })
        .to_string();
        std::fs::write(path("payload"), &payload).unwrap();
        let kinds: [(&str, Vec<&str>, Vec<&str>); 3] = [
            (
                "p384",
                vec!["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out"],
                vec!["dgst", "-sha384", "-sign"],
            ),
            (
                "ed25519",
                vec!["genpkey", "-algorithm", "ed25519", "-out"],
                vec!["pkeyutl", "-sign", "-rawin", "-in"],
            ),
            (
                "rsa",
                vec![
                    "genpkey",
                    "-algorithm",
                    "rsa",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ],
                vec!["dgst", "-sha256", "-sign"],
            ),
        ];
        let mut keys = Vec::new();
        for (name, gen_args, _) in &kinds {
            let (k, p) = (path(&format!("{name}.key")), path(&format!("{name}.pub")));
            let mut a = gen_args.clone();
            a.push(&k);
            openssl(&a);
            openssl(&["pkey", "-in", &k, "-pubout", "-out", &p]);
            keys.push((k, p));
        }
        for (i, (name, _, sign_args)) in kinds.iter().enumerate() {
            let (k, p) = &keys[i];
            let mut a = sign_args.clone();
            let payload_path = path("payload");
            if *name == "ed25519" {
                a.extend([payload_path.as_str(), "-inkey", k.as_str()]);
            } else {
                a.extend([k.as_str(), payload_path.as_str()]);
            }
            let sig = base64::engine::general_purpose::STANDARD.encode(openssl(&a));
            let found = [Found::Simple {
                payload: payload.clone().into_bytes(),
                signature: sig,
            }];
            let policy = |key: &str| {
                Policies::load(&[RawPolicy {
                    pattern: "reg.example/**".into(),
                    keys: vec![PathBuf::from(key)],
                    mode: None,
                }])
                .unwrap()
            };
            let mine = policy(p);
            let mine = mine.for_repository("reg.example", "acme/acl").unwrap();
            assert_eq!(
                mine.verify(&found, &digest, "reg.example", "acme/acl"),
                Ok(mine.keys[0].id.clone()),
                "{name}"
            );
            let other = policy(&keys[(i + 1) % keys.len()].1);
            let other = other.for_repository("reg.example", "acme/acl").unwrap();
            assert!(
                other
                    .verify(&found, &digest, "reg.example", "acme/acl")
                    .is_err(),
                "{name} verified with another key"
            );
        }
    }

    #[test]
    fn bad_policies_are_refused_at_start() {
        let raw = |pattern: &str, keys: Vec<PathBuf>, mode: Option<&str>| RawPolicy {
            pattern: pattern.into(),
            keys,
            mode: mode.map(str::to_string),
        };
        for bad in [
            raw("ghcr.io/*", vec![], None),
            raw("oci://ghcr.io/*", vec!["k.pub".into()], None),
            raw("ghcr.io/*", vec!["k.pub".into()], Some("strict")),
            raw("ghcr.io/*", vec!["/nonexistent/k.pub".into()], None),
        ] {
            assert!(
                Policies::load(std::slice::from_ref(&bad)).is_err(),
                "{bad:?}"
            );
        }
        // `off` needs no keys, and checks nothing.
        let off = Policies::load(&[raw("ghcr.io/**", vec![], Some("off"))]).unwrap();
        assert!(off.for_repository("ghcr.io", "acme/acl").is_none());
    }

    #[test]
    fn references_name_the_repository() {
        assert!(names_repository("ghcr.io/acme/acl", "ghcr.io", "acme/acl"));
        assert!(names_repository(
            "ghcr.io/acme/acl:1.2",
            "ghcr.io",
            "acme/acl"
        ));
        assert!(names_repository(
            &format!("127.0.0.1:5000/acme/acl@sha256:{}", "ab".repeat(32)),
            "127.0.0.1:5000",
            "acme/acl"
        ));
        assert!(names_repository(
            "index.docker.io/acme/acl",
            "docker.io",
            "acme/acl"
        ));
        assert!(!names_repository(
            "ghcr.io/acme/other",
            "ghcr.io",
            "acme/acl"
        ));
    }
}
