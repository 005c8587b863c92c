//! A real `wasm-cache serve` process on a socket in a temp dir.

use super::*;

/// A running `wasm-cache serve`.
pub struct Daemon {
    /// The proxies' socket.
    pub socket: PathBuf,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// Where the daemon's stderr goes.
    pub log: PathBuf,
    /// The process.
    child: Option<Child>,
    /// Directory prepended to PATH.
    path_prepend: Option<PathBuf>,
    /// Extra environment.
    env: Vec<(String, String)>,
    /// The command prefix of an empty network namespace, when the daemon runs in one.
    netns: Option<Vec<&'static str>>,
    /// Temp dir holding all of the above.
    pub dir: Arc<tempfile::TempDir>,
}

/// Config snippets a test adds to the daemon's config.
#[derive(Default, Clone)]
pub struct DaemonOpts {
    /// Extra TOML appended at top level (before any table).
    pub top: String,
    /// Extra tables.
    pub tables: String,
    /// Leave `[network] allow_cidrs` out (the guard's defaults apply).
    pub no_loopback_allow: bool,
    /// Leave out `[registries."127.0.0.0/8"] insecure = true` (registries need verified TLS).
    pub secure_registries: bool,
    /// Replaces the test default `[fetch]` table (5s requests, 3 fast retries).
    pub fetch: Option<String>,
    /// Directory prepended to the daemon's PATH (for credential helpers).
    pub path_prepend: Option<PathBuf>,
    /// Extra environment variables for the daemon.
    pub env: Vec<(String, String)>,
    /// Run the daemon in an empty network namespace (`unshare -n`; see [`empty_netns`]):
    /// only its unix sockets reach it, and nothing it sends can leave the machine.
    pub empty_netns: bool,
}

/// The command prefix that runs a process in an empty network namespace (`unshare -n` as
/// root, `unshare -rn` otherwise), or `None` (with the reason) where that is not allowed.
pub fn empty_netns() -> Result<Vec<&'static str>, String> {
    let prefix: Vec<&'static str> = if runs_as_root() {
        vec!["unshare", "-n"]
    } else {
        vec!["unshare", "-rn"]
    };
    let out = Command::new(prefix[0])
        .args(&prefix[1..])
        .arg("true")
        .output()
        .map_err(|e| format!("unshare is not available: {e}"))?;
    if out.status.success() {
        Ok(prefix)
    } else {
        Err(format!(
            "unshare is not allowed here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// True when this process runs as root (from `/proc/self/status`, no libc call).
fn runs_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}

impl Daemon {
    /// Starts a daemon in a new temp dir.
    pub fn start(opts: DaemonOpts) -> Daemon {
        Self::start_in(Arc::new(tempfile::tempdir().unwrap()), opts)
    }

    /// Starts a daemon whose files live in `dir` (reused across restarts).
    pub fn start_in(dir: Arc<tempfile::TempDir>, opts: DaemonOpts) -> Daemon {
        let socket = dir.path().join("run").join("wasm-cache.sock");
        let admin_socket = dir.path().join("run").join("admin.sock");
        let cache_dir = dir.path().join("cache");
        let config = dir.path().join("wasm-cache.toml");
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        let network = if opts.no_loopback_allow {
            String::new()
        } else {
            "[network]\nallow_cidrs = [\"127.0.0.0/8\"]\n".to_string()
        };
        let fetch = opts.fetch.clone().unwrap_or_else(|| {
            "[fetch]\nrequest_timeout = \"5s\"\ntotal_timeout = \"30s\"\nretries = 3\nbackoff_min = \"10ms\"\nbackoff_max = \"50ms\"\n".to_string()
        });
        let registries = if opts.secure_registries {
            ""
        } else {
            "[registries.\"127.0.0.0/8\"]\ninsecure = true\n"
        };
        std::fs::write(
            &config,
            format!(
                "socket = {socket:?}\nadmin_socket = {admin_socket:?}\ncache_dir = {cache_dir:?}\n{}\n{fetch}\n[file]\nallowed_roots = [{files:?}]\n\n{network}\n{registries}\n{}\n",
                opts.top, opts.tables
            ),
        )
        .unwrap();
        let log = dir.path().join("daemon.log");
        let mut d = Daemon {
            netns: opts
                .empty_netns
                .then(|| empty_netns().expect("check empty_netns() before asking for it")),
            env: opts.env.clone(),
            admin_socket,
            path_prepend: opts.path_prepend.clone(),
            socket,
            config,
            cache_dir,
            log,
            child: None,
            dir,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let bin = env!("CARGO_BIN_EXE_wasm-cache");
        let mut cmd = match &self.netns {
            Some(prefix) => {
                let mut c = Command::new(prefix[0]);
                c.args(&prefix[1..]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("WASM_CACHE_LOG", "debug")
            .env(
                "PATH",
                match &self.path_prepend {
                    Some(p) => format!(
                        "{}:{}",
                        p.display(),
                        std::env::var("PATH").unwrap_or_default()
                    ),
                    None => std::env::var("PATH").unwrap_or_default(),
                },
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.socket.clone();
        let log = self.log.clone();
        let mut tries = 0;
        wait_until(
            "the daemon's socket",
            400,
            Duration::from_millis(25),
            || {
                tries += 1;
                if let Some(c) = self.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    panic!(
                        "daemon exited with {status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                std::os::unix::net::UnixStream::connect(&sock).is_ok()
            },
        );
    }

    /// Stops the daemon with SIGTERM and waits for it; its exit status, if it was running.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().ok()
    }

    /// Kills the daemon with SIGKILL (a crash: no cleanup runs).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again after [`Daemon::stop`] or [`Daemon::kill`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.spawn();
    }

    /// Stops and starts again on the same config and cache.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Purges every cached module through the admin API.
    pub async fn purge_all(&self) {
        let r = reqwest::Client::builder()
            .unix_socket(self.admin_socket.clone())
            .build()
            .unwrap()
            .post("http://localhost/v1/admin/purge")
            .json(&serde_json::json!({"all": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon is running").id()
    }

    /// The directory `file://` urls may read.
    pub fn files_dir(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    /// A client for the socket.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .unix_socket(self.socket.clone())
            .build()
            .unwrap()
    }

    /// POSTs `/v1/fetch`; returns status and JSON body.
    pub async fn fetch(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .client()
            .post("http://localhost/v1/fetch")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v = r.json().await.unwrap_or(serde_json::Value::Null);
        (status, v)
    }

    /// POSTs `/v1/fetch` expecting success; returns the JSON.
    pub async fn fetch_ok(&self, body: serde_json::Value) -> serde_json::Value {
        let (s, v) = self.fetch(body.clone()).await;
        assert_eq!(
            s,
            200,
            "fetch {body} answered {v}\nlog:\n{}",
            self.log_text()
        );
        v
    }

    /// POSTs `/v1/fetch` expecting an error; returns its code.
    pub async fn fetch_err(&self, body: serde_json::Value) -> (u16, String) {
        let (s, v) = self.fetch(body.clone()).await;
        assert_ne!(s, 200, "fetch {body} unexpectedly succeeded: {v}");
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {v}"))
            .to_string();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        (s, code)
    }

    /// GETs a module path; returns status and bytes.
    pub async fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let r = self
            .client()
            .get(format!("http://localhost{path}"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
    }

    /// Runs `wasm-cache ARGS --admin-socket <its admin socket>`: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_wasm-cache"))
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Module blobs in the cache (not the source lists beside them).
    pub fn blob_count(&self) -> usize {
        std::fs::read_dir(self.cache_dir.join("blobs").join("sha256"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().ends_with(".sources"))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
