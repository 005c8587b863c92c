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
    /// The binary, the config and the temp dir, for a restart on the same cache.
    bin: PathBuf,
    /// The config file.
    config: PathBuf,
    /// A client on the admin socket.
    pub admin: reqwest::Client,
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
        Daemon::start_with(bin, "", prepare)
    }

    /// As [`Daemon::start`], with `extra` appended to the config file.
    pub fn start_with(bin: &Path, extra: &str, prepare: impl FnOnce(&Path)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        prepare(&files);
        let socket = dir.path().join("s.sock");
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "socket = {socket:?}\nadmin_socket = {:?}\ncache_dir = {:?}\n{extra}\n[file]\nallowed_roots = [{files:?}]\n",
                dir.path().join("a.sock"),
                dir.path().join("cache")
            ),
        )
        .unwrap();
        let child = spawn(bin, &config, &socket);
        let client = reqwest::Client::builder()
            .unix_socket(socket.clone())
            .build()
            .unwrap();
        let admin = reqwest::Client::builder()
            .unix_socket(dir.path().join("a.sock"))
            .build()
            .unwrap();
        Daemon {
            files,
            child,
            client,
            socket,
            bin: bin.to_path_buf(),
            config,
            admin,
            _dir: dir,
        }
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self._dir.path().join("cache")
    }

    /// Stops the daemon (SIGTERM, waits), starts it again on the same cache and returns how
    /// long it took from the start of the process until the socket answered `/healthz`.
    pub fn restart(&mut self) -> Duration {
        self.stop();
        let _ = std::fs::remove_file(&self.socket);
        let t = std::time::Instant::now();
        self.child = spawn(&self.bin, &self.config, &self.socket);
        let up = t.elapsed();
        self.client = reqwest::Client::builder()
            .unix_socket(self.socket.clone())
            .build()
            .unwrap();
        up
    }

    /// Removes every cached module (`POST /v1/admin/purge {"all": true}`).
    pub async fn purge_all(&self) {
        let r = self
            .admin
            .post("http://localhost/v1/admin/purge")
            .json(&serde_json::json!({ "all": true }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }

    /// The sum of the samples of `metric` in `/metrics` whose line starts with `prefix`.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = self
            .client
            .get("http://localhost/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
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
        self.stop();
    }
}

/// Starts `bin serve --config config` and waits (bounded) until `socket` answers `/healthz`.
fn spawn(bin: &Path, config: &Path, socket: &Path) -> Child {
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env("WASM_CACHE_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..20_000 {
        if healthy(socket) {
            return child;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the daemon did not answer on {}", socket.display());
}

/// True when `GET /healthz` on `socket` answers 200 (blocking, one short connection).
fn healthy(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: l\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// The peak resident memory (`VmHWM`) of process `pid`, in KiB.
pub fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets the peak resident memory of `pid` to its current RSS (`clear_refs` 5).
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The median of `v` (upper median for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
