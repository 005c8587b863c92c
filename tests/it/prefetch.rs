//! Issue 11, pre-warming: `wasm-cache prefetch` with urls and WasmPlugin manifests, and the
//! daemon's `[prefetch]` warming at start (holding `/readyz`) and on SIGHUP.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

fn prefetch(d: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-cache"))
        .arg("prefetch")
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 11: `prefetch -f` reads a multi-document WasmPlugin YAML (other kinds skipped),
/// fetches each plugin's module through the daemon (a private one with `--pull-secret`, as
/// it names an `imagePullSecret`), prints one line per module and a summary, exits non-zero
/// when one failed, and reports in JSON with `--json`; a second run finds them cached.
#[tokio::test]
async fn issue_11_prefetch_of_a_multi_document_wasmplugin_yaml() {
    let private = Registry::start_with(RegistryOpts {
        basic_users: vec![("alice".into(), "alice-pw".into())],
        ..Default::default()
    });
    let pusher = Pusher::for_registry(
        &private,
        &RegistryOpts {
            basic_users: vec![("alice".into(), "alice-pw".into())],
            ..Default::default()
        },
    );
    let secret_module = wasm_module("prefetch-private", 100);
    push_solo(&pusher, "pre/private", "v1", &secret_module).await;
    let (shared_registry, _) = shared();
    let public_module = wasm_module("prefetch-public", 100);
    push_solo(
        &Pusher::new(&shared_registry.addr),
        "pre/public",
        "v1",
        &public_module,
    )
    .await;
    let d = Daemon::start(DaemonOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: public, namespace: mesh}}
spec:
  url: oci://{shared}/pre/public:v1
  pluginConfig: {{any: thing}}
---
apiVersion: v1
kind: Secret
metadata: {{name: pull}}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: private, namespace: mesh}}
spec:
  url: oci://{private}/pre/private:v1
  imagePullPolicy: IfNotPresent
  imagePullSecret: pull
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: missing, namespace: mesh}}
spec:
  url: oci://{shared}/pre/missing:v1
"#,
        shared = shared_registry.addr,
        private = private.addr
    );
    let plugins = dir.path().join("plugins.yaml");
    std::fs::write(&plugins, yaml).unwrap();
    let secret = dir.path().join("secret.json");
    std::fs::write(
        &secret,
        docker_config(&[(&private.addr, "alice", "alice-pw")]),
    )
    .unwrap();
    let f = plugins.to_str().unwrap();
    let s = secret.to_str().unwrap();
    let (ok, out, err) = prefetch(&d, &["-f", f, "--pull-secret", s]);
    assert!(!ok, "a failed module must fail the command\n{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("fetched") && l.contains("pre/public:v1 (mesh/public)")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("fetched") && l.contains(&sha(&secret_module))),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("failed") && l.contains("not_found")),
        "{out}"
    );
    assert!(
        out.contains("3 modules: 2 fetched, 0 already cached, 1 failed"),
        "{out}"
    );
    // Again, as JSON: the two are cached now.
    let (_, out, _) = prefetch(&d, &["-f", f, "--pull-secret", s, "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&report["fetched"], &report["cached"], &report["failed"]),
        (&json!(0), &json!(2), &json!(1)),
        "{report}"
    );
    // Without the pull secret the private plugin is refused, not served from the cache.
    let private_url = format!("oci://{}/pre/private:v1", private.addr);
    let (ok, out, _) = prefetch(&d, &[&private_url]);
    assert!(!ok && out.contains("access_denied"), "{out}");
}

/// Issue 11: `[prefetch] wasmplugin_dirs` with `ready_after`: `/readyz` answers 503 (and
/// `health --ready` fails) until the modules at start are cached, `/healthz` is fine all
/// along; a manifest added later is warmed on SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_prefetch_at_start_holds_readyz_and_sighup_warms_new_plugins() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let first = wasm_module("warm-first", 200);
    let second = wasm_module("warm-second", 200);
    let srv = HttpServer::start(vec![
        ("/first.wasm", Route::Gate(Arc::clone(&gate), first.clone())),
        ("/second.wasm", Route::Bytes(second.clone())),
    ]);
    let plugins = tempfile::tempdir().unwrap();
    let plugin = |name: &str, url: &str| {
        format!("kind: WasmPlugin\nmetadata: {{name: {name}}}\nspec:\n  url: {url}\n")
    };
    std::fs::write(
        plugins.path().join("first.yaml"),
        plugin("first", &srv.url("/first.wasm")),
    )
    .unwrap();
    let d = Daemon::start(DaemonOpts {
        tables: format!(
            "[prefetch]\nwasmplugin_dirs = [{:?}]\nready_after = true\n",
            plugins.path()
        ),
        ..Default::default()
    });
    assert_eq!(d.get("/healthz").await.0, 200);
    assert_eq!(d.get("/readyz").await.0, 503);
    let health = |ready: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_wasm-cache"));
        c.arg("health").arg("--socket").arg(&d.socket);
        if ready {
            c.arg("--ready");
        }
        c.status().unwrap().success()
    };
    assert!(health(false));
    assert!(!health(true), "ready while warming");
    gate.notify_one();
    wait_until(
        "ready after warming",
        300,
        Duration::from_millis(50),
        || health(true),
    );
    let a = d.fetch_ok(json!({"url": srv.url("/first.wasm")})).await;
    assert_eq!(a["cache"], "hit");

    std::fs::write(
        plugins.path().join("second.yaml"),
        plugin("second", &srv.url("/second.wasm")),
    )
    .unwrap();
    let pid = d.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_until(
        "the new plugin warmed",
        300,
        Duration::from_millis(50),
        || d.blob_count() == 2,
    );
    let a = d.fetch_ok(json!({"url": srv.url("/second.wasm")})).await;
    assert_eq!(a["cache"], "hit");
    assert_eq!(a["digest"], sha(&second));
}
