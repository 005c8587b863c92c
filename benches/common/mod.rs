//! What the benchmarks share: a release `wasm-cache serve` in a temp dir, reading modules
//! from its own `files` directory, with a client on its socket.
// Each benchmark uses part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A daemon in a temp dir; killed (SIGTERM) on drop.
pub struct Daemon {
    /// Holds the socket, config, cache and module files.
    _dir: tempfile::TempDir,
    /// Where `file://` modules may be read from.
    pub files: PathBuf,
    /// The process.
    child: Child,
    /// A client on the proxies' socket.
    pub client: reqwest::Client,
    /// The proxies' socket.
    socket: PathBuf,
}

impl Daemon {
    /// The binary the benchmark measures: `WASM_CACHE_BENCH_BIN` (to compare with another
    /// build in the same run), else this build's.
    pub fn binary() -> PathBuf {
        std::env::var_os("WASM_CACHE_BENCH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wasm-cache")))
    }

    /// Starts `bin` after `prepare` has filled the files directory; waits for its socket.
    pub fn start(bin: &Path, prepare: impl FnOnce(&Path)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        prepare(&files);
        let socket = dir.path().join("s.sock");
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "socket = {socket:?}\nadmin_socket = {:?}\ncache_dir = {:?}\n[file]\nallowed_roots = [{files:?}]\n",
                dir.path().join("a.sock"),
                dir.path().join("cache")
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config)
            .env("WASM_CACHE_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..400 {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let client = reqwest::Client::builder()
            .unix_socket(socket.clone())
            .build()
            .unwrap();
        Daemon {
            _dir: dir,
            files,
            child,
            client,
            socket,
        }
    }

    /// The proxies' socket.
    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The `file://` url of `name` in the files directory.
    pub fn file_url(&self, name: &str) -> String {
        format!("file://{}", self.files.join(name).display())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// `POST /v1/fetch` of `url`; panics unless the daemon answers 200.
pub async fn fetch(client: &reqwest::Client, url: String) -> wasm_cache::api::FetchResponse {
    let body = wasm_cache::api::FetchBody {
        url,
        ..Default::default()
    };
    let r = client
        .post("http://localhost/v1/fetch")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    r.json().await.unwrap()
}
