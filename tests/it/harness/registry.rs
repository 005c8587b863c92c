//! A real `docker-registry` (CNCF distribution) on 127.0.0.1 with its own config, and the
//! registry and proxy shared by every test of this binary.

use super::*;

/// A `docker-registry` (CNCF distribution) process with its own config and storage.
pub struct Registry {
    /// `127.0.0.1:port`.
    pub addr: String,
    /// The wrapper shell; closing its stdin stops the registry.
    child: Mutex<Option<Child>>,
    /// Storage and config.
    _dir: tempfile::TempDir,
}

/// How a test registry is set up.
#[derive(Default, Clone)]
pub struct RegistryOpts {
    /// Serve TLS with a certificate of the test CA (see [`pki`]).
    pub tls: bool,
    /// htpasswd Basic auth with these users and passwords.
    pub basic_users: Vec<(String, String)>,
    /// Bearer token auth with this realm (a [`TokenServer`]'s url, or any url to test).
    pub token_realm: Option<String>,
    /// Listen on this loopback port instead of a free one.
    pub port: Option<u16>,
    /// Run as a pull-through cache (distribution's proxy mode) of this registry url.
    pub proxy_remote: Option<String>,
}

impl Registry {
    /// Starts an anonymous plain-HTTP registry on a free loopback port.
    pub fn start() -> Registry {
        Self::start_with(RegistryOpts::default())
    }

    /// Starts a registry set up as `opts` says.
    pub fn start_with(opts: RegistryOpts) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = opts.port.unwrap_or_else(free_port);
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if opts.tls {
            let pki = pki();
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pki.server_cert.display(),
                pki.server_key.display()
            ));
        }
        if !opts.basic_users.is_empty() {
            let htpasswd = dir.path().join("htpasswd");
            let lines: String = opts
                .basic_users
                .iter()
                .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()))
                .collect();
            std::fs::write(&htpasswd, lines).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: wasm-cache-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some(realm) = &opts.token_realm {
            yaml.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                pki().signer_cert.display()
            ));
        }
        if let Some(remote) = &opts.proxy_remote {
            yaml.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        std::fs::write(&config, yaml).unwrap();
        let bin = which("docker-registry");
        // The wrapper stops the registry when this test process goes away (stdin closes),
        // even if it dies without running destructors.
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#""$0" serve "$1" >"$2" 2>&1 & pid=$!; cat >/dev/null; kill $pid; wait $pid 2>/dev/null"#)
            .arg(&bin)
            .arg(&config)
            .arg(dir.path().join("registry.log"))
            .stdin(Stdio::piped())
            .spawn()
            .expect("starting docker-registry");
        // Any HTTP answer means it listens (a TLS registry answers plain HTTP with 400, an
        // authenticating one with 401).
        let url = format!("http://{addr}/v2/");
        let log = dir.path().join("registry.log");
        let mut tries = 0;
        wait_until(
            "docker-registry to listen",
            400,
            Duration::from_millis(25),
            || {
                tries += 1;
                assert!(
                    tries < 400,
                    "docker-registry did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                blocking_get(&url).is_some()
            },
        );
        Registry {
            addr,
            child: Mutex::new(Some(child)),
            _dir: dir,
        }
    }

    /// Stops the registry.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A pull-through mirror of `upstream` (distribution in proxy mode), behind a counting
/// proxy that tells which requests reached it; the mirror's url is `http://<proxy addr>`.
pub fn pull_through(upstream: &Registry) -> (Registry, CountingProxy) {
    let mirror = Registry::start_with(RegistryOpts {
        proxy_remote: Some(format!("http://{}", upstream.addr)),
        ..Default::default()
    });
    let counting = CountingProxy::start(&mirror.addr);
    (mirror, counting)
}

/// The registry and proxy shared by every test of this binary (separate repositories per
/// test keep them apart).
pub fn shared() -> &'static (Registry, CountingProxy) {
    static SHARED: OnceLock<(Registry, CountingProxy)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let r = Registry::start();
        let p = CountingProxy::start(&r.addr);
        (r, p)
    })
}
