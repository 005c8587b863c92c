//! Issue 10: the serving path. Module downloads and fetches are answered on the connection
//! (from memory, or with `sendfile` from an open blob), hits touch neither the registry nor
//! the disk, and what HTTP clients rely on (keep-alive, pipelining, `HEAD`, `Connection:
//! close`, chunked bodies, errors) answers as before.

use super::harness::*;
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Writes `request` on a fresh connection and reads until the daemon closes it.
fn exchange(d: &Daemon, request: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

/// Splits raw HTTP/1.1 responses (each with a `content-length`) into (head, body) pairs.
fn responses(mut raw: &[u8], heads_only: bool) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete head");
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        let body_len = if heads_only { 0 } else { len };
        raw = &raw[end + 4..];
        out.push((head, raw[..body_len].to_vec()));
        raw = &raw[body_len..];
    }
    out
}

fn write_module(d: &Daemon, name: &str, bytes: &[u8]) -> String {
    let path = d.files_dir().join(name);
    std::fs::write(&path, bytes).unwrap();
    format!("file://{}", path.display())
}

fn blob_path(d: &Daemon, digest: &str) -> std::path::PathBuf {
    d.cache_dir
        .join("blobs")
        .join("sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Issue 10: once a module has been served, fetch hits and downloads come from memory (a
/// small module) or from the blob the daemon holds open (a large one): with the blob files
/// gone from the disk behind the daemon's back, both still answer with the right bytes, and
/// an OCI hit makes no request to the registry.
#[tokio::test]
async fn issue_10_hits_touch_neither_the_registry_nor_the_disk() {
    let (registry, proxy) = shared();
    let p = Pusher::new(&registry.addr);
    let small = wasm_module("hot-small", 41);
    let large = wasm_module("hot-large", 3 << 20);
    push_solo(&p, "serving/hot", "v1", &small).await;
    let d = Daemon::start(DaemonOpts::default());
    let oci = json!({"url": format!("oci://{}/serving/hot:v1", proxy.addr), "imagePullPolicy": "IfNotPresent"});
    let file = json!({"url": write_module(&d, "large.wasm", &large)});
    let mut urls = Vec::new();
    for (req, bytes) in [(&oci, &small), (&file, &large)] {
        let a = d.fetch_ok(req.clone()).await;
        assert_eq!(a["cache"], "miss");
        let url = a["moduleUrl"].as_str().unwrap().to_string();
        assert_eq!(d.get(&url).await, (200, bytes.clone()));
        urls.push((url, a["digest"].as_str().unwrap().to_string()));
    }
    for (_, digest) in &urls {
        std::fs::remove_file(blob_path(&d, digest)).unwrap();
    }
    let before = proxy.repo_count("serving/hot");
    for _ in 0..3 {
        for ((req, bytes), (url, _)) in [(&oci, &small), (&file, &large)].into_iter().zip(&urls) {
            assert_eq!(d.fetch_ok(req.clone()).await["cache"], "hit");
            assert_eq!(&d.get(url).await, &(200, bytes.clone()));
        }
    }
    assert_eq!(
        proxy.repo_count("serving/hot"),
        before,
        "a hit went to the registry"
    );
}

/// Issue 10: hits no longer look at the disk, so a blob deleted behind the daemon's back
/// (never served since, so not held) is noticed when it is opened: the download is
/// `not_present`, the module's records are dropped, and the next fetch downloads it again.
#[tokio::test]
async fn issue_10_a_vanished_blob_is_fetched_again() {
    let d = Daemon::start(DaemonOpts::default());
    let m = wasm_module("vanish", 300);
    let req = json!({"url": write_module(&d, "vanish.wasm", &m)});
    let a = d.fetch_ok(req.clone()).await;
    let url = a["moduleUrl"].as_str().unwrap().to_string();
    std::fs::remove_file(blob_path(&d, a["digest"].as_str().unwrap())).unwrap();
    let (status, body) = d.get(&url).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "not_present");
    assert_eq!(d.fetch_ok(req).await["cache"], "miss");
    assert_eq!(d.get(&url).await, (200, m));
}

/// Issue 10: a module held in memory or open is gone with a purge: the download after it is
/// `not_present`, not the held bytes.
#[tokio::test]
async fn issue_10_a_purged_module_is_not_served_from_memory() {
    let d = Daemon::start(DaemonOpts::default());
    for (name, size) in [("purge-small.wasm", 100), ("purge-large.wasm", 2 << 20)] {
        let m = wasm_module(name, size);
        let a = d.fetch_ok(json!({"url": write_module(&d, name, &m)})).await;
        let url = a["moduleUrl"].as_str().unwrap().to_string();
        assert_eq!(d.get(&url).await, (200, m));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasm-cache"))
            .args(["purge", "--digest", a["digest"].as_str().unwrap()])
            .arg("--admin-socket")
            .arg(&d.admin_socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(d.get(&url).await.0, 404);
    }
}

/// Issue 10: requests on the direct path behave as HTTP/1.1 clients expect: pipelined
/// requests on one keep-alive connection are answered in order, `HEAD` gives the headers
/// with the length and no body, `Connection: close` closes after the response, and errors
/// are the JSON error body.
#[tokio::test]
async fn issue_10_pipelined_head_and_close_on_the_direct_path() {
    let d = Daemon::start(DaemonOpts::default());
    let small = wasm_module("pipe-small", 64);
    let large = wasm_module("pipe-large", 2 << 20);
    let mut paths = Vec::new();
    for (name, m) in [("ps.wasm", &small), ("pl.wasm", &large)] {
        let a = d.fetch_ok(json!({"url": write_module(&d, name, m)})).await;
        paths.push(a["moduleUrl"].as_str().unwrap().to_string());
    }
    let fetch_body =
        json!({"url": format!("file://{}", d.files_dir().join("ps.wasm").display())}).to_string();
    let request = format!(
        "GET {a} HTTP/1.1\r\nHost: x\r\n\r\n\
         GET {b} HTTP/1.1\r\nHost: x\r\n\r\n\
         POST /v1/fetch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n\r\n{fetch_body}\
         GET /v1/modules/sha256:{zeros} HTTP/1.1\r\nHost: x\r\n\r\n\
         GET {a} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        a = paths[0],
        b = paths[1],
        n = fetch_body.len(),
        zeros = "0".repeat(64),
    );
    let raw = exchange(&d, request.as_bytes());
    let r = responses(&raw, false);
    assert_eq!(
        r.len(),
        5,
        "{}",
        String::from_utf8_lossy(&raw[..raw.len().min(2000)])
    );
    assert!(r[0].0.starts_with("http/1.1 200"), "{}", r[0].0);
    assert!(r[0].0.contains("content-type: application/wasm"));
    assert!(r[0].0.contains(&format!("etag: \"{}\"", sha(&small))));
    assert_eq!(r[0].1, small);
    assert_eq!(r[1].1, large);
    assert!(r[2].0.starts_with("http/1.1 200"), "{}", r[2].0);
    let a: serde_json::Value = serde_json::from_slice(&r[2].1).unwrap();
    assert_eq!(a["cache"], "hit");
    assert!(r[3].0.starts_with("http/1.1 404"), "{}", r[3].0);
    let e: serde_json::Value = serde_json::from_slice(&r[3].1).unwrap();
    assert_eq!(e["error"]["code"], "not_present");
    assert!(r[4].0.contains("connection: close"), "{}", r[4].0);
    assert_eq!(r[4].1, small);

    // HEAD: the length of the module, no body (the connection is then closed by request).
    let raw = exchange(
        &d,
        format!(
            "HEAD {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            paths[1]
        )
        .as_bytes(),
    );
    let r = responses(&raw, true);
    assert_eq!(r.len(), 1, "{}", String::from_utf8_lossy(&raw));
    assert!(
        r[0].0.contains(&format!("content-length: {}", large.len())),
        "{}",
        r[0].0
    );
}

/// Issue 10: what the direct path leaves to hyper still works on the same connection: a
/// chunked fetch body, then a download after it, then an unknown path.
#[tokio::test]
async fn issue_10_chunked_fetch_bodies_and_other_paths_still_answer() {
    let d = Daemon::start(DaemonOpts::default());
    let m = wasm_module("chunked", 500);
    let url = write_module(&d, "chunked.wasm", &m);
    let body = json!({"url": url}).to_string();
    let (first, rest) = body.split_at(10);
    let request = format!(
        "POST /v1/fetch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{first}\r\n{:x}\r\n{rest}\r\n0\r\n\r\n\
         GET /v1/modules/{} HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        first.len(),
        rest.len(),
        sha(&m),
    );
    let raw = exchange(&d, request.as_bytes());
    let r = responses(&raw, false);
    assert_eq!(r.len(), 3, "{}", String::from_utf8_lossy(&raw));
    let a: serde_json::Value = serde_json::from_slice(&r[0].1).unwrap();
    assert_eq!(a["digest"], sha(&m));
    assert_eq!(r[1].1, m);
    assert!(r[2].0.starts_with("http/1.1 404"), "{}", r[2].0);
}

/// Issue 10: a client that stops reading a large module (sent with `sendfile`) is dropped
/// after the idle timeout instead of holding its connection forever.
#[tokio::test]
async fn issue_10_a_client_that_stops_reading_a_large_module_is_dropped() {
    let d = Daemon::start(DaemonOpts {
        tables: "[server]\nidle_timeout = \"1s\"\n".into(),
        ..Default::default()
    });
    let m = wasm_module("stall", 32 << 20);
    let a = d
        .fetch_ok(json!({"url": write_module(&d, "stall.wasm", &m)}))
        .await;
    let path = a["moduleUrl"].as_str().unwrap().to_string();
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    // Read a little, then nothing: the daemon must give up on the connection. Polling by
    // writing (which does not drain what the daemon sent) fails once it has closed it.
    let mut buf = vec![0u8; 4096];
    s.read_exact(&mut buf).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    wait_until(
        "the daemon drops the stalled reader",
        300,
        Duration::from_millis(100),
        || match s.write(b"x") {
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
        },
    );
}
