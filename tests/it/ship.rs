//! Deployment artefacts and observability: Kubernetes manifests, systemd units and socket
//! activation, the Envoy example, metrics, logs, the health probe and the progress bar.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

/// Loads a YAML file with PyYAML (from the test virtualenv) and returns it as JSON.
fn yaml_to_json(path: &std::path::Path) -> Vec<Value> {
    let out = Command::new(venv_bin("python"))
        .args(["-c", "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn kubernetes_manifests_validate_and_agree_with_each_other() {
    let dir = repo_root().join("config/kubernetes");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(files.len() >= 5);
    let out = Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The ConfigMap's config parses with the daemon's own parser, and the probes and mounts
    // use its socket.
    let cm = &yaml_to_json(&dir.join("configmap.yaml"))[0];
    let toml = cm["data"]["wasm-cache.toml"].as_str().unwrap();
    let config = wasm_cache::config::Config::parse_raw(toml, std::path::Path::new("configmap"))
        .unwrap()
        .validate()
        .unwrap();
    let ds = &yaml_to_json(&dir.join("daemonset.yaml"))[0];
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let command = |probe: &str| -> Vec<&str> {
        c[probe]["exec"]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    };
    assert_eq!(
        command("livenessProbe"),
        [
            "/usr/bin/wasm-cache",
            "health",
            "--socket",
            config.socket.to_str().unwrap()
        ]
    );
    // Readiness asks /readyz (held while `[prefetch] ready_after` warming runs).
    assert_eq!(
        command("readinessProbe"),
        [
            "/usr/bin/wasm-cache",
            "health",
            "--ready",
            "--socket",
            config.socket.to_str().unwrap()
        ]
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let host_paths: Vec<&str> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert!(host_paths.contains(&config.cache_dir.to_str().unwrap()));
    assert!(host_paths.contains(&config.socket.parent().unwrap().to_str().unwrap()));
    // The Service reaches the registry endpoint of the client's own node.
    let svc = &yaml_to_json(&dir.join("service.yaml"))[0];
    assert_eq!(svc["spec"]["internalTrafficPolicy"], "Local");
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["selector"]["matchLabels"]
    );
    let target = svc["spec"]["ports"][0]["targetPort"].as_str().unwrap();
    let port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == target)
        .expect("the Service's targetPort is a container port");
    assert_eq!(
        port["containerPort"].as_u64(),
        config.registry.addr.map(|a| u64::from(a.port())),
        "the container port is [registry] addr's"
    );
    // The image's binary is where the probes look for it.
    let containerfile = std::fs::read_to_string(repo_root().join("Containerfile")).unwrap();
    assert!(containerfile.contains("/usr/bin/wasm-cache"));
}

#[test]
fn systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(repo_root().join("systemd/wasm-cache.service"))
        .unwrap()
        .replace("/usr/bin/wasm-cache", env!("CARGO_BIN_EXE_wasm-cache"));
    assert!(service.contains("Type=notify") && service.contains("ProtectSystem=strict"));
    std::fs::write(dir.path().join("wasm-cache.service"), service).unwrap();
    std::fs::copy(
        repo_root().join("systemd/wasm-cache.socket"),
        dir.path().join("wasm-cache.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "./wasm-cache.socket",
            "./wasm-cache.service",
        ])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze is installed by tests/run.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn socket_activation_and_sd_notify_ready() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let notify = dir.path().join("notify.sock");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {sock:?}\nadmin_socket = {:?}\ncache_dir = {:?}\n[file]\nallowed_roots = [{:?}]\n",
            dir.path().join("admin.sock"),
            dir.path().join("cache"),
            dir.path()
        ),
    )
    .unwrap();
    let m = wasm_module("activated", 10);
    std::fs::write(dir.path().join("m.wasm"), &m).unwrap();
    let notify_rx = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    notify_rx
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // systemd-socket-activate binds the socket and passes it to the daemon (LISTEN_FDS), as
    // systemd does with wasm-cache.socket.
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()))
        .arg(env!("CARGO_BIN_EXE_wasm-cache"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate is installed by tests/run.sh");
    let mut out = None;
    wait_until(
        "the activation socket",
        400,
        Duration::from_millis(25),
        || sock.exists(),
    );
    for _ in 0..3 {
        let o = Command::new(env!("CARGO_BIN_EXE_wasm-cache"))
            .args([
                "fetch",
                &format!("file://{}", dir.path().join("m.wasm").display()),
                "--socket",
            ])
            .arg(&sock)
            .output()
            .unwrap();
        if o.status.success() {
            out = Some(o);
            break;
        }
    }
    let mut buf = [0u8; 256];
    let n = notify_rx
        .recv(&mut buf)
        .expect("the daemon sent no sd_notify message");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let logs = std::fs::read_to_string(dir.path().join("log")).unwrap();
    let out = out.unwrap_or_else(|| panic!("no answer through the inherited socket: {logs}"));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["digest"], sha(&m));
    assert!(logs.contains("socket_activated=true"), "{logs}");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
}

#[tokio::test]
async fn health_probe() {
    let d = Daemon::start(DaemonOpts::default());
    let bin = env!("CARGO_BIN_EXE_wasm-cache");
    let ok = Command::new(bin)
        .args(["health", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let bad = Command::new(bin)
        .args(["health", "--socket", "/nonexistent/x.sock"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[tokio::test]
async fn metrics_are_valid_and_count_what_happened() {
    let port = free_port();
    let m = wasm_module("metrics", 1000);
    let srv = HttpServer::start(vec![("/m.wasm", Route::Bytes(m.clone()))]);
    let d = Daemon::start(DaemonOpts {
        top: format!("metrics_addr = \"127.0.0.1:{port}\""),
        ..Default::default()
    });
    let a = d.fetch_ok(json!({"url": srv.url("/m.wasm")})).await;
    d.fetch_ok(json!({"url": srv.url("/m.wasm")})).await;
    d.fetch_err(json!({"url": srv.url("/missing.wasm")})).await;
    d.get(a["moduleUrl"].as_str().unwrap()).await;
    let (s, body) = d.get("/metrics").await;
    assert_eq!(s, 200);
    let text = String::from_utf8(body).unwrap();
    for want in [
        "wasm_cache_lookups_total{interface=\"api\",result=\"hit\"} 1",
        "wasm_cache_lookups_total{interface=\"api\",result=\"miss\"} 1",
        "wasm_cache_lookups_total{interface=\"api\",result=\"error\"} 1",
        "wasm_cache_upstream_fetches_total{result=\"success\",scheme=\"http\"} 1",
        "wasm_cache_upstream_fetches_total{result=\"not_found\",scheme=\"http\"} 1",
        "wasm_cache_entries 1",
        &format!("wasm_cache_bytes {}", m.len()),
        &format!("wasm_cache_served_bytes_total {}", m.len()),
        "wasm_cache_upstream_fetch_duration_seconds_count{scheme=\"http\"} 2",
        "wasm_cache_singleflight_waiters 0",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed by tests/run.sh");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The TCP metrics endpoint serves the same, and nothing else.
    let r = reqwest::Client::builder().no_proxy().build().unwrap();
    let t = r
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(t.status(), 200);
    assert!(t.text().await.unwrap().contains("wasm_cache_entries 1"));
    let f = r
        .post(format!("http://127.0.0.1:{port}/v1/fetch"))
        .json(&json!({"url": srv.url("/m.wasm")}))
        .send()
        .await
        .unwrap();
    assert_eq!(f.status(), 404);
}

#[tokio::test]
async fn json_logs_have_one_line_per_upstream_fetch() {
    let m = wasm_module("json-logs", 10);
    let srv = HttpServer::start(vec![("/m.wasm", Route::Bytes(m.clone()))]);
    let d = Daemon::start(DaemonOpts {
        tables: "[log]\nformat = \"json\"\n".into(),
        ..Default::default()
    });
    let url = format!("http://user:hunter2@{}/m.wasm", srv.addr);
    d.fetch_ok(json!({"url": url})).await;
    d.fetch_ok(json!({"url": url})).await;
    let log = d.log_text();
    assert!(
        !log.contains("hunter2"),
        "credentials in a url are never logged"
    );
    let mut fetch_lines = Vec::new();
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["fields"]["message"] == "upstream fetch" {
            fetch_lines.push(v);
        }
    }
    assert_eq!(fetch_lines.len(), 1, "one upstream fetch, one line: {log}");
    let f = &fetch_lines[0]["fields"];
    assert_eq!(f["result"], "success");
    assert_eq!(f["digest"], sha(&m));
    assert_eq!(f["bytes"], m.len());
    assert!(f["ms"].is_u64());
    assert!(f["url"].as_str().unwrap().contains(&srv.addr.to_string()));
    assert!(
        !log.contains("hunter2"),
        "credentials in a url are never logged"
    );
}

#[tokio::test]
async fn envoy_example_points_at_what_the_daemon_serves() {
    let (registry, proxy) = shared();
    let p = Pusher::new(&registry.addr);
    let m = wasm_module("envoy", 2000);
    push_solo(&p, "envoy/filter", "v1", &m).await;
    let d = Daemon::start(DaemonOpts::default());
    let a = d
        .fetch_ok(json!({"url": format!("oci://{}/envoy/filter:v1", proxy.addr)}))
        .await;
    let template = std::fs::read_to_string(repo_root().join("config/envoy/envoy.yaml")).unwrap();
    let rendered = template
        .replace("{{SOCKET}}", d.socket.to_str().unwrap())
        .replace("{{MODULE_URL}}", a["moduleUrl"].as_str().unwrap())
        .replace(
            "{{MODULE_SHA256}}",
            a["digest"].as_str().unwrap().trim_start_matches("sha256:"),
        );
    assert!(!rendered.contains("{{"), "every placeholder is filled");
    let file = d.dir.path().join("envoy.yaml");
    std::fs::write(&file, rendered).unwrap();
    let cfg = &yaml_to_json(&file)[0];
    let cluster = &cfg["static_resources"]["clusters"][0];
    let wasm = &cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"][0]["typed_config"]["config"]["vm_config"]["code"]["remote"];
    assert_eq!(wasm["http_uri"]["cluster"], cluster["name"]);
    assert_eq!(cluster["type"], "STATIC");
    assert_eq!(
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
            ["path"],
        d.socket.to_str().unwrap()
    );
    assert!(wasm["retry_policy"]["num_retries"].as_u64().unwrap() > 0);
    // Fetch the uri through the socket, as Envoy would, and check the sha256 it was given.
    let uri = wasm["http_uri"]["uri"].as_str().unwrap();
    let path = uri.strip_prefix("http://wasm-cache").unwrap();
    let (s, bytes) = d.get(path).await;
    assert_eq!(s, 200);
    assert_eq!(
        sha(&bytes).trim_start_matches("sha256:"),
        wasm["sha256"].as_str().unwrap()
    );
    assert_eq!(bytes, m);
}

#[tokio::test]
async fn fetch_shows_progress_on_a_terminal_only() {
    let d = Daemon::start(DaemonOpts::default());
    let big = wasm_module("progress", 4 << 20);
    std::fs::write(d.files_dir().join("big.wasm"), &big).unwrap();
    let url = format!("file://{}", d.files_dir().join("big.wasm").display());
    let out_file = d.dir.path().join("out.wasm");
    let cmd = format!(
        "{} fetch {url} -o {} --socket {}",
        env!("CARGO_BIN_EXE_wasm-cache"),
        out_file.display(),
        d.socket.display()
    );
    // `script` runs the command on a pseudo-terminal, as a person's shell would.
    let tty = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    assert!(tty.status.success());
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(
        shown.contains("MiB/4.00 MiB") || shown.contains("4.00 MiB"),
        "no progress bar on a terminal: {shown:?}"
    );
    assert_eq!(std::fs::read(&out_file).unwrap(), big);
    let piped = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    assert!(piped.status.success());
    assert!(
        !String::from_utf8_lossy(&piped.stderr).contains("MiB/"),
        "no progress bar when not a terminal"
    );
}

/// Copies `src` (a file or a directory tree) to `dst`.
fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap().flatten() {
            copy_tree(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        std::fs::copy(src, dst).unwrap();
    }
}

/// Issue 8: the image build copied `Cargo.toml`, `Cargo.lock` and `src` while the manifest
/// declares a `[[bench]]`, so `cargo build` in the image failed. This copies exactly what the
/// `Containerfile`'s build stage copies and builds (checks) the binary there, offline.
#[test]
fn issue_8_the_containerfile_build_context_builds() {
    let containerfile = std::fs::read_to_string(repo_root().join("Containerfile")).unwrap();
    let ctx = tempfile::tempdir().unwrap();
    let mut copied = Vec::new();
    let mut in_build_stage = false;
    for line in containerfile.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["FROM", .., "AS", "build"] => in_build_stage = true,
            ["FROM", ..] => in_build_stage = false,
            ["COPY", args @ ..] if in_build_stage && !args[0].starts_with("--") => {
                let (srcs, dst) = args.split_at(args.len() - 1);
                for src in srcs {
                    let from = repo_root().join(src);
                    let to = if dst[0].ends_with('/') {
                        ctx.path().join(dst[0]).join(src)
                    } else {
                        ctx.path().join(dst[0])
                    };
                    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                    copy_tree(&from, &to);
                    copied.push(src.to_string());
                }
            }
            _ => {}
        }
    }
    assert!(copied.contains(&"src".to_string()), "{copied:?}");
    // The same target dir as the suite: dependencies are already checked there, only the
    // copied crate is compiled.
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "check",
            "--locked",
            "--offline",
            "--quiet",
            "--bin",
            "wasm-cache",
        ])
        .current_dir(ctx.path())
        .env("CARGO_TARGET_DIR", repo_root().join("target"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the Containerfile's build context ({copied:?}) does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
