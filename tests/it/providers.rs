//! Issue 11: kubelet credential provider plugins (the exec protocol), against a registry with
//! htpasswd auth. The plugin is a small script that speaks the real protocol.

use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use crate::harness::*;

/// Writes an executable plugin `name` into `bin` with `body` as its shell script.
fn plugin(bin: &std::path::Path, name: &str, body: &str) {
    let p = bin.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A `CredentialProviderConfig` with one provider.
fn provider_config(name: &str, match_image: &str, env: &[(&str, String)]) -> String {
    let env: Vec<_> = env
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    // JSON is YAML: the file is written as JSON.
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": [{
            "name": name,
            "matchImages": [match_image],
            "defaultCacheDuration": "10m",
            "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
            "args": ["get-credentials"],
            "env": env,
        }]
    })
    .to_string()
}

/// Issue 11: a request without a pull secret for a registry the provider's `matchImages`
/// names runs the plugin with a `CredentialProviderRequest` and pulls with the credentials
/// it answers; the answer is cached per registry (`cacheKeyType: Registry`), so a second
/// repository does not run it again; the password never reaches the log.
#[tokio::test]
async fn issue_11_a_credential_provider_plugin_supplies_registry_credentials() {
    let users = vec![("alice".to_string(), "alice-provider-pw".to_string())];
    let opts = RegistryOpts {
        basic_users: users,
        ..Default::default()
    };
    let registry = Registry::start_with(opts.clone());
    let pusher = Pusher::for_registry(&registry, &opts);
    let one = wasm_module("provider-one", 100);
    let two = wasm_module("provider-two", 100);
    push_solo(&pusher, "prov/one", "v1", &one).await;
    push_solo(&pusher, "prov/two", "v1", &two).await;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let calls = dir.path().join("calls");
    plugin(
        &bin,
        "test-provider",
        r#"[ "$1" = get-credentials ] || exit 3
cat >> "$CALLS"; echo >> "$CALLS"
echo "issuing alice-provider-pw for you" >&2
printf '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"1h","auth":{"%s":{"username":"alice","password":"alice-provider-pw"}}}' "$REGISTRY""#,
    );
    let config = dir.path().join("providers.json");
    std::fs::write(
        &config,
        provider_config(
            "test-provider",
            &registry.addr,
            &[
                ("CALLS", calls.display().to_string()),
                ("REGISTRY", registry.addr.clone()),
            ],
        ),
    )
    .unwrap();
    let d = Daemon::start(DaemonOpts {
        tables: format!(
            "[auth]\ncredential_provider_config = {config:?}\ncredential_provider_bin_dir = {bin:?}\n"
        ),
        env: vec![("WASM_CACHE_LOG".into(), "debug".into())],
        ..Default::default()
    });
    let a = d
        .fetch_ok(json!({"url": format!("{}/prov/one:v1", registry.addr)}))
        .await;
    assert_eq!(a["digest"], sha(&one));
    let seen = std::fs::read_to_string(&calls).unwrap();
    let request: serde_json::Value = serde_json::from_str(seen.lines().next().unwrap()).unwrap();
    assert_eq!(request["kind"], "CredentialProviderRequest");
    assert_eq!(
        request["apiVersion"],
        "credentialprovider.kubelet.k8s.io/v1"
    );
    assert_eq!(request["image"], format!("{}/prov/one", registry.addr));
    let b = d
        .fetch_ok(json!({"url": format!("{}/prov/two:v1", registry.addr)}))
        .await;
    assert_eq!(b["digest"], sha(&two));
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap().lines().count(),
        1,
        "the registry-wide answer is cached"
    );
    let log = d.log_text();
    assert!(log.contains("credential provider said"), "{log}");
    assert!(
        !log.contains("alice-provider-pw"),
        "a password reached the log"
    );
}

/// Issue 11: a plugin that answers garbage (or is not there) gives no credentials: the pull
/// is `access_denied`, and the log says which provider failed.
#[tokio::test]
async fn issue_11_a_failing_credential_provider_gives_no_credentials() {
    let opts = RegistryOpts {
        basic_users: vec![("alice".into(), "pw".into())],
        ..Default::default()
    };
    let registry = Registry::start_with(opts.clone());
    push_solo(
        &Pusher::for_registry(&registry, &opts),
        "prov/bad",
        "v1",
        &wasm_module("provider-bad", 10),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    plugin(
        dir.path(),
        "bad-provider",
        "cat >/dev/null; echo 'not json'",
    );
    let config = dir.path().join("providers.yaml");
    std::fs::write(
        &config,
        provider_config("bad-provider", &registry.addr, &[]),
    )
    .unwrap();
    let d = Daemon::start(DaemonOpts {
        tables: format!(
            "[auth]\ncredential_provider_config = {config:?}\ncredential_provider_bin_dir = {:?}\n",
            dir.path()
        ),
        ..Default::default()
    });
    let (status, code) = d
        .fetch_err(json!({"url": format!("{}/prov/bad:v1", registry.addr)}))
        .await;
    assert_eq!((status, code.as_str()), (403, "access_denied"));
    let log = d.log_text();
    assert!(
        log.contains("credential provider failed") && log.contains("bad-provider"),
        "{log}"
    );
}
