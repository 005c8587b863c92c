//! Shared test helpers, one module per real component:
//!
//! - [`registry`]: a real `docker-registry` on 127.0.0.1 (anonymous, htpasswd, token, TLS);
//! - [`token`]: the token server for Bearer auth; [`pki`]: the test CA;
//! - [`proxy`]: a counting proxy in front of a registry, with fault injection;
//! - [`pusher`]: artifact pushing through the registry HTTP API;
//! - [`daemon`]: a real `wasm-cache serve` process on a socket in a temp dir;
//! - [`http`]: test HTTP servers for http(s) sources;
//!
//! and here, the artifact builders (Wasm modules come from `wasm_cache::testkit`, shared with
//! the unit tests and the benchmarks) and small process helpers.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

mod daemon;
mod http;
mod pki;
mod proxy;
mod pusher;
mod registry;
mod token;

pub use daemon::*;
pub use http::*;
pub use pki::*;
pub use proxy::*;
pub use pusher::*;
pub use registry::*;
pub use token::*;

/// sha256 as `sha256:<hex>`.
pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub use wasm_cache::testkit::wasm_module;

/// A gzip'd tar holding `files`.
pub fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    gzip(&tar(files))
}

/// A tar holding `files`.
pub fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// gzip of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Serves `app` on `bind` from a thread with its own runtime (tests' runtimes come and go);
/// the bound address.
pub fn serve_on_thread(bind: &str, app: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind(bind).unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `ready` up to `tries` times, `every` apart; panics with `what` if it never holds.
pub fn wait_until(what: &str, tries: usize, every: Duration, mut ready: impl FnMut() -> bool) {
    for _ in 0..tries {
        if ready() {
            return;
        }
        std::thread::sleep(every);
    }
    panic!("timed out waiting for {what}");
}

pub fn which(bin: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(bin);
        if p.is_file() {
            return p;
        }
    }
    for p in [format!("/usr/bin/{bin}"), format!("/usr/sbin/{bin}")] {
        if Path::new(&p).is_file() {
            return p.into();
        }
    }
    panic!("{bin} is not installed: run the README's test command, which installs it");
}

/// Status of a plain HTTP/1.0 GET (blocking, no runtime), or `None` when nothing answers.
fn blocking_get(url: &str) -> Option<u16> {
    use std::io::Read;
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).ok()?;
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

/// A `.dockerconfigjson` payload with one `auth` entry per `(key, user, password)`.
pub fn docker_config(entries: &[(&str, &str, &str)]) -> String {
    use base64::Engine as _;
    let mut auths = serde_json::Map::new();
    for (key, u, p) in entries {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        auths.insert(key.to_string(), serde_json::json!({"auth": auth}));
    }
    serde_json::json!({"auths": auths}).to_string()
}

/// A tool from the test virtualenv that `tests/run.sh` makes (kubernetes-validate, python
/// with PyYAML).
pub fn venv_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WASM_CACHE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"));
    let p = dir.join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run tests/run.sh, which installs it",
        p.display()
    );
    p
}

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
