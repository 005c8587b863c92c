//! Issue 12: only signed modules. Keys are made with `openssl`, payloads are signed with
//! `openssl dgst -sha256 -sign` (the ECDSA P-256 DER signature cosign makes), and signatures
//! are pushed in cosign's simple-signing layout (`sha256-<hex>.sig`) with the registry's
//! HTTP API.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::harness::*;

const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A P-256 key pair in `dir`: (private, public) PEM paths.
pub(crate) fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let (p, q) = (private.to_str().unwrap(), public.to_str().unwrap());
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        p,
    ]);
    openssl(&["ec", "-in", p, "-pubout", "-out", q]);
    (private, public)
}

/// cosign's simple-signing payload for `manifest` of `reference`.
pub(crate) fn payload(reference: &str, manifest: &str) -> Vec<u8> {
    json!({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": manifest},
            "type": "cosign container image signature"
        },
        "optional": null
    })
    .to_string()
    .into_bytes()
}

/// The base64 ECDSA signature of `data` by `key`.
pub(crate) fn sign(dir: &Path, key: &Path, data: &[u8]) -> String {
    let file = dir.join("payload.json");
    std::fs::write(&file, data).unwrap();
    let sig = openssl(&[
        "dgst",
        "-sha256",
        "-sign",
        key.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    base64::engine::general_purpose::STANDARD.encode(sig)
}

/// Pushes `signatures` (payload, base64 signature) for `manifest` of `repo` as cosign does.
pub(crate) async fn push_signatures(
    p: &Pusher,
    repo: &str,
    manifest: &str,
    signatures: &[(Vec<u8>, String)],
) {
    let config = p
        .blob(repo, "application/vnd.oci.image.config.v1+json", b"{}")
        .await;
    let mut layers = Vec::new();
    for (payload, sig) in signatures {
        let d = p.blob(repo, SIMPLE_SIGNING, payload).await;
        layers.push(json!({
            "mediaType": SIMPLE_SIGNING,
            "digest": d.digest,
            "size": d.size,
            "annotations": {"dev.cosignproject.cosign/signature": sig}
        }));
    }
    let manifest_json = json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_MANIFEST,
        "config": config.json(),
        "layers": layers,
    });
    let tag = format!("sha256-{}.sig", manifest.trim_start_matches("sha256:"));
    p.manifest(repo, &tag, mt::OCI_MANIFEST, &manifest_json)
        .await;
}

pub(crate) fn policy(pattern: &str, keys: &[&Path], mode: &str) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    format!(
        "[[signatures.policy]]\nmatch = {pattern:?}\nkeys = [{}]\nmode = {mode:?}\n",
        keys.join(", ")
    )
}

fn ls(d: &Daemon) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-cache"))
        .args(["ls", "--json", "--admin-socket"])
        .arg(&d.admin_socket)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["modules"].as_array().unwrap().clone()
}

async fn metric(d: &Daemon, result: &str) -> u64 {
    let (_, body) = d.get("/metrics").await;
    let needle = format!("wasm_cache_signature_verifications_total{{result=\"{result}\"}} ");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(str::to_string))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Issue 12: under an enforcing policy, a module signed by a configured key is served (and
/// `ls` shows the key); unsigned, signed by another key, signed for another manifest, or
/// with a tampered payload, it is `signature_invalid` and nothing is cached.
#[tokio::test]
async fn issue_12_only_modules_signed_by_a_configured_key_are_served() {
    let (registry, _) = shared();
    let p = Pusher::new(&registry.addr);
    let keys = tempfile::tempdir().unwrap();
    let (a_key, a_pub) = keypair(keys.path(), "a");
    let (b_key, _) = keypair(keys.path(), "b");
    let reg = &registry.addr;
    let mut manifests = std::collections::HashMap::new();
    for name in ["signed", "unsigned", "otherkey", "wrongdigest", "tampered"] {
        let m = wasm_module(&format!("sig-{name}"), 200);
        let d = push_solo(&p, &format!("sig/{name}"), "v1", &m).await;
        manifests.insert(name, (d.digest, m));
    }
    let sig = |key: &Path, repo: &str, digest: &str| {
        let data = payload(&format!("{reg}/sig/{repo}"), digest);
        (data.clone(), sign(keys.path(), key, &data))
    };
    let signed = sig(&a_key, "signed", &manifests["signed"].0);
    push_signatures(&p, "sig/signed", &manifests["signed"].0, &[signed]).await;
    let other = sig(&b_key, "otherkey", &manifests["otherkey"].0);
    push_signatures(&p, "sig/otherkey", &manifests["otherkey"].0, &[other]).await;
    // A valid signature, but of the manifest of "signed".
    let wrong = sig(&a_key, "wrongdigest", &manifests["signed"].0);
    push_signatures(&p, "sig/wrongdigest", &manifests["wrongdigest"].0, &[wrong]).await;
    // Signed, then the payload changed (names another digest).
    let (_, good_sig) = sig(&a_key, "tampered", &manifests["tampered"].0);
    let tampered = payload(&format!("{reg}/sig/tampered"), &manifests["signed"].0);
    push_signatures(
        &p,
        "sig/tampered",
        &manifests["tampered"].0,
        &[(tampered, good_sig)],
    )
    .await;

    let d = Daemon::start(DaemonOpts {
        tables: policy(&format!("{reg}/sig/*"), &[&a_pub], "enforce"),
        ..Default::default()
    });
    let a = d
        .fetch_ok(json!({"url": format!("oci://{reg}/sig/signed:v1")}))
        .await;
    assert_eq!(a["digest"], sha(&manifests["signed"].1));
    assert_eq!(d.get(a["moduleUrl"].as_str().unwrap()).await.0, 200);
    let listed = ls(&d);
    assert_eq!(listed.len(), 1);
    let key_id = listed[0]["signed"].as_str().unwrap().to_string();
    assert_eq!(key_id.len(), 16, "{listed:?}");
    for name in ["unsigned", "otherkey", "wrongdigest", "tampered"] {
        let (status, body) = d
            .fetch(json!({"url": format!("oci://{reg}/sig/{name}:v1")}))
            .await;
        assert_eq!(status, 403, "{name}: {body}");
        assert_eq!(body["error"]["code"], "signature_invalid", "{name}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&key_id) && message.contains(".sig"),
            "{name}: the message names the keys and where signatures were looked up: {message}"
        );
    }
    assert_eq!(d.blob_count(), 1, "a refused module was cached");
    assert_eq!(metric(&d, "verified").await, 1);
    assert_eq!(metric(&d, "refused").await, 4);
}

/// Issue 12: `mode = "warn"`: an unsigned module is served, logged and counted.
#[tokio::test]
async fn issue_12_warn_mode_serves_logs_and_counts() {
    let (registry, _) = shared();
    let p = Pusher::new(&registry.addr);
    let keys = tempfile::tempdir().unwrap();
    let (_, a_pub) = keypair(keys.path(), "a");
    let m = wasm_module("sig-warn", 100);
    push_solo(&p, "sigwarn/unsigned", "v1", &m).await;
    let d = Daemon::start(DaemonOpts {
        tables: policy(&format!("{}/sigwarn/**", registry.addr), &[&a_pub], "warn"),
        ..Default::default()
    });
    let url = format!("oci://{}/sigwarn/unsigned:v1", registry.addr);
    let a = d.fetch_ok(json!({"url": url})).await;
    assert_eq!(a["digest"], sha(&m));
    assert_eq!(d.get(a["moduleUrl"].as_str().unwrap()).await.0, 200);
    // Checked once: a hit under the same keys is not checked again.
    assert_eq!(d.fetch_ok(json!({"url": url})).await["cache"], "hit");
    assert_eq!(metric(&d, "warned").await, 1);
    assert!(d.log_text().contains("signature not verified"));
    assert_eq!(ls(&d)[0].get("signed"), None);
}

/// Issue 12: key rotation. Signed by key A, served under keys [A, B]; with A removed, the
/// cached module is checked again before it is served, and refused (fetch and download).
#[tokio::test]
async fn issue_12_a_removed_key_makes_cached_modules_verify_again() {
    let (registry, proxy) = shared();
    let p = Pusher::new(&registry.addr);
    let keys = tempfile::tempdir().unwrap();
    let (a_key, a_pub) = keypair(keys.path(), "a");
    let (_, b_pub) = keypair(keys.path(), "b");
    let m = wasm_module("sig-rotate", 100);
    let manifest = push_solo(&p, "sigrot/filter", "v1", &m).await;
    let data = payload(&format!("{}/sigrot/filter", proxy.addr), &manifest.digest);
    let s = sign(keys.path(), &a_key, &data);
    push_signatures(&p, "sigrot/filter", &manifest.digest, &[(data, s)]).await;
    let pattern = format!("{}/sigrot/*", proxy.addr);
    let mut d = Daemon::start(DaemonOpts {
        tables: policy(&pattern, &[&a_pub, &b_pub], "enforce"),
        ..Default::default()
    });
    let url = format!("oci://{}/sigrot/filter:v1", proxy.addr);
    let a = d.fetch_ok(json!({"url": url})).await;
    let module_url = a["moduleUrl"].as_str().unwrap().to_string();
    assert_eq!(d.fetch_ok(json!({"url": url})).await["cache"], "hit");
    // Rotate: only B now.
    d.stop();
    let config = std::fs::read_to_string(&d.config).unwrap();
    let a_entry = format!("{a_pub:?}, ");
    assert!(config.contains(&a_entry));
    std::fs::write(&d.config, config.replace(&a_entry, "")).unwrap();
    d.start_again();
    let (status, body) = d.get(&module_url).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let (status, code) = d.fetch_err(json!({"url": url})).await;
    assert_eq!((status, code.as_str()), (403, "signature_invalid"));
    // Hits whose check fails ask the registry for signatures once per negative_ttl, not
    // once per request.
    let sig_tag = format!(
        "GET /v2/sigrot/filter/manifests/sha256-{}.sig",
        manifest.digest.trim_start_matches("sha256:")
    );
    let before = proxy.count(&sig_tag);
    for _ in 0..20 {
        let (status, code) = d.fetch_err(json!({"url": url})).await;
        assert_eq!((status, code.as_str()), (403, "signature_invalid"));
    }
    assert_eq!(proxy.count(&sig_tag), before, "remembered for negative_ttl");
}

/// Issue 12: the signature repository is private: signatures are read with the caller's
/// credentials; and a module that a pull-through mirror serves is still checked (its
/// signature read from the registry itself).
#[tokio::test]
async fn issue_12_private_signatures_and_modules_served_by_a_mirror() {
    let opts = RegistryOpts {
        basic_users: vec![("alice".into(), "alice-pw".into())],
        ..Default::default()
    };
    let private = Registry::start_with(opts.clone());
    let p = Pusher::for_registry(&private, &opts);
    let keys = tempfile::tempdir().unwrap();
    let (a_key, a_pub) = keypair(keys.path(), "a");
    let m = wasm_module("sig-private", 100);
    let manifest = push_solo(&p, "sigpriv/filter", "v1", &m).await;
    let data = payload(
        &format!("{}/sigpriv/filter", private.addr),
        &manifest.digest,
    );
    let s = sign(keys.path(), &a_key, &data);
    push_signatures(&p, "sigpriv/filter", &manifest.digest, &[(data, s)]).await;

    let upstream = Registry::start();
    let up = Pusher::new(&upstream.addr);
    let signed = wasm_module("sig-mirror-signed", 100);
    let unsigned = wasm_module("sig-mirror-unsigned", 100);
    let signed_manifest = push_solo(&up, "sigmirror/signed", "v1", &signed).await;
    push_solo(&up, "sigmirror/unsigned", "v1", &unsigned).await;
    let data = payload(
        &format!("{}/sigmirror/signed", upstream.addr),
        &signed_manifest.digest,
    );
    let s = sign(keys.path(), &a_key, &data);
    push_signatures(
        &up,
        "sigmirror/signed",
        &signed_manifest.digest,
        &[(data, s)],
    )
    .await;
    let (_mirror, counting) = pull_through(&upstream);

    let d = Daemon::start(DaemonOpts {
        tables: format!(
            "{}{}[registries.\"{}\"]\nmirrors = [\"http://{}\"]\n",
            policy(&format!("{}/sigpriv/*", private.addr), &[&a_pub], "enforce"),
            policy(
                &format!("{}/sigmirror/*", upstream.addr),
                &[&a_pub],
                "enforce"
            ),
            upstream.addr,
            counting.addr
        ),
        ..Default::default()
    });
    let secret = docker_config(&[(&private.addr, "alice", "alice-pw")]);
    let a = d
        .fetch_ok(json!({"url": format!("oci://{}/sigpriv/filter:v1", private.addr), "pullSecret": secret}))
        .await;
    assert_eq!(a["digest"], sha(&m));

    let a = d
        .fetch_ok(json!({"url": format!("oci://{}/sigmirror/signed:v1", upstream.addr)}))
        .await;
    assert_eq!(a["digest"], sha(&signed));
    let (status, code) = d
        .fetch_err(json!({"url": format!("oci://{}/sigmirror/unsigned:v1", upstream.addr)}))
        .await;
    assert_eq!((status, code.as_str()), (403, "signature_invalid"));
    assert!(
        counting.count("GET /v2/sigmirror/unsigned/blobs/") >= 1,
        "the mirror served the module"
    );
    // Air-gapped: with the registry gone and the cache emptied, the module and its
    // signature both come from the mirror, and the signature is still checked.
    upstream.stop();
    d.purge_all().await;
    let pinned = format!(
        "oci://{}/sigmirror/signed@{}",
        upstream.addr, signed_manifest.digest
    );
    let a = d.fetch_ok(json!({"url": pinned})).await;
    assert_eq!(
        (&a["digest"], &a["cache"]),
        (&json!(sha(&signed)), &json!("miss"))
    );
    assert!(
        counting.count(&format!(
            "GET /v2/sigmirror/signed/manifests/sha256-{}.sig",
            signed_manifest.digest.trim_start_matches("sha256:")
        )) >= 1
    );
}

const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// DSSE's pre-authentication encoding.
fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    [
        format!(
            "DSSEv1 {} {payload_type} {} ",
            payload_type.len(),
            body.len()
        )
        .as_bytes(),
        body,
    ]
    .concat()
}

/// Pushes `bundle` as an OCI 1.1 referrer of `subject`, listed in the fallback tag index
/// `sha256-<hex>` (the registry has no referrers API).
async fn push_bundle(p: &Pusher, repo: &str, subject: &Desc, bundle: &[u8]) {
    let empty = p
        .blob(repo, "application/vnd.oci.empty.v1+json", b"{}")
        .await;
    let layer = p.blob(repo, BUNDLE, bundle).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_MANIFEST,
        "artifactType": BUNDLE,
        "config": empty.json(),
        "layers": [layer.json()],
        "subject": subject.json(),
    });
    let digest = sha(&serde_json::to_vec(&manifest).unwrap());
    let d = p.manifest(repo, &digest, mt::OCI_MANIFEST, &manifest).await;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_INDEX,
        "manifests": [{
            "mediaType": mt::OCI_MANIFEST,
            "digest": d.digest,
            "size": d.size,
            "artifactType": BUNDLE,
        }],
    });
    let tag = format!("sha256-{}", subject.digest.trim_start_matches("sha256:"));
    p.manifest(repo, &tag, mt::OCI_INDEX, &index).await;
}

/// A keyed DSSE bundle whose in-toto statement has `subject` as its subject, signed by `key`.
fn dsse_bundle(dir: &Path, key: &Path, subject: &str) -> Vec<u8> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let statement = json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"digest": {"sha256": subject.trim_start_matches("sha256:")}}],
        "predicateType": "https://sigstore.dev/cosign/sign/v1",
        "predicate": {},
    })
    .to_string();
    let payload_type = "application/vnd.in-toto+json";
    let sig = sign(dir, key, &pae(payload_type, statement.as_bytes()));
    json!({
        "mediaType": BUNDLE,
        "verificationMaterial": {"publicKey": {"hint": "test"}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": b64(statement.as_bytes()),
            "payloadType": payload_type,
            "signatures": [{"sig": sig, "keyid": ""}],
        },
    })
    .to_string()
    .into_bytes()
}

/// Issue 12: Sigstore bundles (keyed, offline) found through the referrers fallback tag: a
/// DSSE envelope over an in-toto statement about the manifest, or a message signature over
/// the manifest, by a configured key is served; by another key, or keyless, it is refused.
#[tokio::test]
async fn issue_12_sigstore_bundles_through_the_referrers_fallback_tag() {
    let (registry, _) = shared();
    let p = Pusher::new(&registry.addr);
    let keys = tempfile::tempdir().unwrap();
    let (a_key, a_pub) = keypair(keys.path(), "a");
    let (b_key, _) = keypair(keys.path(), "b");
    let reg = &registry.addr;
    let mut pushed = std::collections::HashMap::new();
    for name in ["dsse", "message", "otherkey", "keyless"] {
        let m = wasm_module(&format!("bundle-{name}"), 150);
        let d = push_solo(&p, &format!("sigbundle/{name}"), "v1", &m).await;
        pushed.insert(name, (d, m));
    }
    let dsse = dsse_bundle(keys.path(), &a_key, &pushed["dsse"].0.digest);
    push_bundle(&p, "sigbundle/dsse", &pushed["dsse"].0, &dsse).await;
    let other = dsse_bundle(keys.path(), &b_key, &pushed["otherkey"].0.digest);
    push_bundle(&p, "sigbundle/otherkey", &pushed["otherkey"].0, &other).await;
    // A message signature over the manifest's bytes, as the registry serves them.
    let manifest_bytes = reqwest::Client::new()
        .get(format!(
            "http://{reg}/v2/sigbundle/message/manifests/{}",
            pushed["message"].0.digest
        ))
        .header("accept", mt::OCI_MANIFEST)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha(&manifest_bytes), pushed["message"].0.digest);
    let digest_b64 = base64::engine::general_purpose::STANDARD
        .encode(hex::decode(pushed["message"].0.digest.trim_start_matches("sha256:")).unwrap());
    let message = json!({
        "mediaType": BUNDLE,
        "verificationMaterial": {"publicKey": {"hint": "test"}},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": digest_b64},
            "signature": sign(keys.path(), &a_key, &manifest_bytes),
        },
    })
    .to_string();
    push_bundle(
        &p,
        "sigbundle/message",
        &pushed["message"].0,
        message.as_bytes(),
    )
    .await;
    // Keyless (a certificate): not accepted offline even though the key signed it.
    let mut keyless: Value = serde_json::from_slice(&dsse_bundle(
        keys.path(),
        &a_key,
        &pushed["keyless"].0.digest,
    ))
    .unwrap();
    keyless["verificationMaterial"] = json!({"certificate": {"rawBytes": "AAAA"}});
    push_bundle(
        &p,
        "sigbundle/keyless",
        &pushed["keyless"].0,
        keyless.to_string().as_bytes(),
    )
    .await;

    let d = Daemon::start(DaemonOpts {
        tables: policy(&format!("{reg}/sigbundle/*"), &[&a_pub], "enforce"),
        ..Default::default()
    });
    for name in ["dsse", "message"] {
        let a = d
            .fetch_ok(json!({"url": format!("oci://{reg}/sigbundle/{name}:v1")}))
            .await;
        assert_eq!(a["digest"], sha(&pushed[name].1), "{name}");
    }
    assert!(ls(&d).iter().all(|m| m["signed"].is_string()));
    for name in ["otherkey", "keyless"] {
        let (status, body) = d
            .fetch(json!({"url": format!("oci://{reg}/sigbundle/{name}:v1")}))
            .await;
        assert_eq!(status, 403, "{name}: {body}");
        assert_eq!(body["error"]["code"], "signature_invalid", "{name}");
    }
    let (_, body) = d
        .fetch(json!({"url": format!("oci://{reg}/sigbundle/keyless:v1")}))
        .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("public key"),
        "{body}"
    );
}

/// Review regression: with several matching credentials, the signature lookup picked its
/// credential by probing the `.sig` tag; a module signed only with a bundle (no such tag)
/// then failed with `not_found`. The probe is now the signed manifest itself.
#[tokio::test]
async fn issue_12_several_credentials_and_a_bundle_only_signature() {
    let opts = RegistryOpts {
        basic_users: vec![("alice".into(), "alice-pw".into())],
        ..Default::default()
    };
    let private = Registry::start_with(opts.clone());
    let p = Pusher::for_registry(&private, &opts);
    let keys = tempfile::tempdir().unwrap();
    let (a_key, a_pub) = keypair(keys.path(), "a");
    let m = wasm_module("sig-several-creds", 100);
    let manifest = push_solo(&p, "sigcreds/filter", "v1", &m).await;
    let bundle = dsse_bundle(keys.path(), &a_key, &manifest.digest);
    push_bundle(&p, "sigcreds/filter", &manifest, &bundle).await;
    let d = Daemon::start(DaemonOpts {
        tables: policy(
            &format!("{}/sigcreds/*", private.addr),
            &[&a_pub],
            "enforce",
        ),
        ..Default::default()
    });
    // Two entries match; the more specific one is wrong, so the registry must be asked.
    let secret = docker_config(&[
        (&format!("{}/sigcreds", private.addr), "mallory", "wrong"),
        (&private.addr, "alice", "alice-pw"),
    ]);
    let a = d
        .fetch_ok(json!({"url": format!("oci://{}/sigcreds/filter:v1", private.addr), "pullSecret": secret}))
        .await;
    assert_eq!(a["digest"], sha(&m));
}
