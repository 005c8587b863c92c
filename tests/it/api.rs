//! The socket API and the CLI, as clients use them: curl and `wasm-cache fetch`.

use std::process::Command;

use serde_json::json;

use crate::harness::*;

fn curl(d: &Daemon, args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .arg("-sS")
        .arg("--unix-socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .expect("curl is installed by the README's test command");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn curl_fetches_and_downloads_a_module() {
    let (registry, proxy) = shared();
    let p = Pusher::new(&registry.addr);
    let m = wasm_module("curl", 1000);
    push_solo(&p, "api/curl", "v1", &m).await;
    let d = Daemon::start(DaemonOpts::default());
    let body = json!({"url": format!("oci://{}/api/curl:v1", proxy.addr)}).to_string();
    let (out, err) = curl(
        &d,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            "http://localhost/v1/fetch",
        ],
    );
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert_eq!(v["digest"], sha(&m));
    let module_url = v["moduleUrl"].as_str().unwrap();
    assert_eq!(module_url, format!("/v1/modules/{}", sha(&m)));

    let file = d.dir.path().join("out.wasm");
    let (_, err) = curl(
        &d,
        &[
            "-f",
            "-o",
            file.to_str().unwrap(),
            &format!("http://localhost{module_url}"),
        ],
    );
    assert_eq!(std::fs::read(&file).unwrap(), m, "{err}");
    let (headers, _) = curl(&d, &["-I", &format!("http://localhost{module_url}")]);
    let h = headers.to_ascii_lowercase();
    assert!(h.starts_with("http/1.1 200"), "{headers}");
    assert!(h.contains("content-type: application/wasm"), "{headers}");
    assert!(
        h.contains(&format!("content-length: {}", m.len())),
        "{headers}"
    );
    assert!(h.contains(&format!("etag: \"{}\"", sha(&m))), "{headers}");

    // Accept: application/wasm answers the bytes directly.
    let file2 = d.dir.path().join("out2.wasm");
    curl(
        &d,
        &[
            "-f",
            "-o",
            file2.to_str().unwrap(),
            "-H",
            "accept: application/wasm",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            "http://localhost/v1/fetch",
        ],
    );
    assert_eq!(std::fs::read(&file2).unwrap(), m);

    let (out, _) = curl(&d, &["http://localhost/healthz"]);
    assert_eq!(out.trim(), "ok");
}

#[tokio::test]
async fn bad_requests_get_stable_codes() {
    let d = Daemon::start(DaemonOpts::default());
    let cases = [
        (
            json!({"url": "ftp://example.com/x.wasm"}),
            400,
            "unsupported_scheme",
        ),
        (json!({"url": ""}), 400, "invalid_request"),
        (json!({"url": "Reg.io/UPPER:x"}), 400, "invalid_request"),
        (
            json!({"url": "reg.io/a:1", "sha256": "xyz"}),
            400,
            "invalid_request",
        ),
        (
            json!({"url": "reg.io/a:1", "pullPolicy": "Sometimes"}),
            400,
            "invalid_request",
        ),
        (json!({"nourl": true}), 400, "invalid_request"),
    ];
    for (body, status, code) in cases {
        assert_eq!(
            d.fetch_err(body.clone()).await,
            (status, code.to_string()),
            "{body}"
        );
    }
    let (s, body) = d.get(&format!("/v1/modules/{}", sha(b"unknown"))).await;
    assert_eq!(s, 404);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "not_present");
    let (s, _) = d.get("/v1/modules/sha256:nothex").await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn cli_fetch_prints_json_writes_files_and_reports_errors() {
    let d = Daemon::start(DaemonOpts::default());
    let m = wasm_module("cli", 10);
    let path = d.files_dir().join("cli.wasm");
    std::fs::write(&path, &m).unwrap();
    let url = format!("file://{}", path.display());
    let bin = env!("CARGO_BIN_EXE_wasm-cache");

    let out = Command::new(bin)
        .args(["fetch", &url, "--sha256", &sha(&m), "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["digest"], sha(&m));

    let file = d.dir.path().join("cli-out.wasm");
    let out = Command::new(bin)
        .args(["fetch", &url, "-o"])
        .arg(&file)
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&file).unwrap(), m);

    let out = Command::new(bin)
        .args(["fetch", &url, "--sha256", &sha(b"x"), "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum_mismatch"), "{err}");

    let out = Command::new(bin)
        .args(["fetch", &url, "--socket", "/nonexistent/wasm-cache.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach wasm-cache"));
}

#[tokio::test]
async fn socket_mode_and_stale_socket_replacement() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::start(DaemonOpts {
        top: "socket_mode = \"0600\"".into(),
        ..Default::default()
    });
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second daemon on the same socket refuses to steal it.
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-cache"))
        .args(["serve", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process is listening"));
    // SIGTERM: a clean exit that removes the socket.
    let status = d.stop().expect("the daemon was running");
    assert!(status.success(), "{status}");
    assert!(!d.socket.exists());
    // A stale socket file (left by a crash) is replaced.
    drop(std::os::unix::net::UnixListener::bind(d.dir.path().join("unused.sock")).unwrap());
    std::fs::rename(d.dir.path().join("unused.sock"), &d.socket).unwrap();
    d.restart();
    let (s, _) = d.get("/healthz").await;
    assert_eq!(s, 200);
}

/// Issue 9: request fields had no length limit, so a client could grow the index without
/// bound. Over a limit is `invalid_request` naming the field; a body past every limit is
/// refused before it is parsed. Limits are config keys (`[limits]`).
#[tokio::test]
async fn issue_9_oversized_request_fields_are_invalid_request_naming_the_field() {
    let d = Daemon::start(DaemonOpts {
        tables: "[limits]\nresource_version = \"16B\"\n".into(),
        ..Default::default()
    });
    let url = format!("file://{}", d.files_dir().join("none.wasm").display());
    let cases = [
        ("url", json!({"url": format!("{url}{}", "a".repeat(9000))})),
        (
            "resourceName",
            json!({"url": url, "resourceName": "n".repeat(513), "resourceVersion": "1"}),
        ),
        (
            "resourceVersion",
            json!({"url": url, "resourceName": "ns/p", "resourceVersion": "7".repeat(17)}),
        ),
        (
            "pullSecret",
            json!({"url": "oci://127.0.0.1:1/a/b:1", "pullSecret": "x".repeat((1 << 20) + 1)}),
        ),
    ];
    for (field, body) in cases {
        let (status, v) = d.fetch(body).await;
        assert_eq!(status, 400, "{field}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request", "{field}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(field), "{field}: {msg}");
    }
    // A body larger than all limits together is refused as a whole, unread: the daemon may
    // answer and close while the client is still writing, so this one goes over a raw socket.
    let body = serde_json::to_vec(&json!({"url": url, "pluginName": "p".repeat(4 << 20)})).unwrap();
    let (status, answer) = raw_post(&d.socket, "/v1/fetch", &body);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("invalid_request"), "{answer}");
    // Within the limits, the daemon answers as usual.
    let (status, _) = d
        .fetch(json!({"url": url, "resourceVersion": "7".repeat(16)}))
        .await;
    assert_eq!(status, 404);
}

/// Reads from a raw connection until the daemon closes it; false if it stays open `within`.
fn closed_within(s: &mut std::os::unix::net::UnixStream, within: std::time::Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Issue 9: the sockets had no header-read timeout, no idle timeout and no connection limit,
/// so slow or idle connections held resources forever. A slow header and an idle keep-alive
/// connection are now closed, and with every connection slot taken by silent clients a real
/// request still gets through once they are dropped.
#[tokio::test]
async fn issue_9_slow_idle_and_excess_connections_are_bounded() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    let d = Daemon::start(DaemonOpts {
        tables:
            "[server]\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\nmax_connections = 8\n"
                .into(),
        ..Default::default()
    });
    // A header that never ends.
    let mut slow = UnixStream::connect(&d.socket).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(15)),
        "slow header kept open"
    );
    // A keep-alive connection that goes quiet after one request.
    let mut idle = UnixStream::connect(&d.socket).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        closed_within(&mut idle, Duration::from_secs(15)),
        "idle connection kept open"
    );
    // Every slot taken by clients that say nothing: a real request waits for a slot, and
    // gets one when the daemon drops them.
    let silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let (s, _) = tokio::time::timeout(Duration::from_secs(30), d.get("/healthz"))
        .await
        .expect("a request never got a connection slot");
    assert_eq!(s, 200);
    drop(silent);
}

/// POSTs `body` over a raw connection, writing on a thread of its own (a write the daemon
/// refuses to read ends in EPIPE, which is fine) while reading the answer here.
fn raw_post(socket: &std::path::Path, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let body = body.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w
            .write_all(head.as_bytes())
            .and_then(|_| w.write_all(&body));
    });
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let _ = writer.join();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Runs `wasm-cache serve` with a config whose sockets live in `sock_dir`; the exit status
/// and stderr once it exits by itself (killed, and `None`, if it is still running after 10 s).
fn serve_once(dir: &std::path::Path, sock_dir: &std::path::Path) -> Option<(bool, String)> {
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {:?}\nadmin_socket = {:?}\ncache_dir = {:?}\n",
            sock_dir.join("s.sock"),
            sock_dir.join("a.sock"),
            dir.join("cache")
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-cache"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return Some((status.success(), err));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Issue 9: the socket directory under a world-writable directory (the `/tmp` fallback) was
/// used whoever owned it, so another user could pre-create it and own the daemon's sockets.
#[test]
fn issue_9_a_socket_dir_in_a_world_writable_dir_must_be_ours() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let theirs = shared.join("wasm-cache");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, err) = serve_once(dir.path(), &theirs)
        .expect("the daemon started in a directory others may write to");
    assert!(!ok);
    assert!(err.contains("world-writable"), "{err}");
    assert!(!theirs.join("s.sock").exists());
    // Owned by someone else, even if only they may write to it.
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
    if std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).is_ok() {
        let (ok, err) = serve_once(dir.path(), &theirs)
            .expect("the daemon started in a directory another user owns");
        assert!(!ok);
        assert!(err.contains("world-writable"), "{err}");
    } else {
        eprintln!("skipping the other-owner half: chown is not allowed here");
    }
}

/// Issue 9: a client that stops reading a module it asked for held its connection (and,
/// at the cap, every other client's slot) forever. Once idle, such a connection is given one
/// more idle period to finish, then dropped.
#[tokio::test]
async fn issue_9_a_client_that_stops_reading_is_dropped() {
    use std::io::Write;
    let d = Daemon::start(DaemonOpts {
        tables:
            "[server]\nheader_read_timeout = \"1s\"\nidle_timeout = \"1s\"\nmax_connections = 1\n"
                .into(),
        ..Default::default()
    });
    let big = wasm_module("unread", 16 << 20);
    std::fs::write(d.files_dir().join("big.wasm"), &big).unwrap();
    let url = format!("file://{}", d.files_dir().join("big.wasm").display());
    let module_url = d.fetch_ok(json!({"url": url})).await["moduleUrl"]
        .as_str()
        .unwrap()
        .to_string();
    // Ask for 16 MiB and never read them.
    let mut stalled = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    write!(stalled, "GET {module_url} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (s, _) = tokio::time::timeout(std::time::Duration::from_secs(30), d.get("/healthz"))
        .await
        .expect("the stalled reader kept the only connection slot");
    assert_eq!(s, 200);
    drop(stalled);
}
