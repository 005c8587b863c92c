//! Shared test helpers: a real `docker-registry` on 127.0.0.1, a counting proxy in front of
//! it, artifact pushing through the registry HTTP API, test HTTP servers, and a real
//! `wasm-cache serve` process on a socket in a temp dir.

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

/// A test CA and a server certificate for 127.0.0.1 / localhost, made once per test binary
/// with the openssl command.
pub struct Pki {
    /// Holds the files.
    _dir: tempfile::TempDir,
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// Server certificate signed by the CA.
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Token-signing certificate (the registry's `rootcertbundle`).
    pub signer_cert: PathBuf,
    /// Token-signing key (PKCS#8 PEM).
    pub signer_key: PathBuf,
}

/// The test PKI (see [`Pki`]).
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl is installed");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        std::fs::write(
            p("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "3", "-subj", "/CN=wasm-cache test CA", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        run(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
        run(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "3", "-extfile", "server.ext"]);
        run(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "signer.key", "-out", "signer.pem", "-days", "3", "-subj", "/CN=wasm-cache test token signer"]);
        Pki {
            signer_cert: p("signer.pem"),
            signer_key: p("signer.key"),
            ca_cert: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            _dir: dir,
        }
    })
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
}

impl Registry {
    /// Starts an anonymous plain-HTTP registry on a free loopback port.
    pub fn start() -> Registry {
        Self::start_with(RegistryOpts::default())
    }

    /// Starts a registry set up as `opts` says.
    pub fn start_with(opts: RegistryOpts) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
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

fn which(bin: &str) -> PathBuf {
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

/// `service` of test token-auth registries.
pub const TOKEN_SERVICE: &str = "wasm-cache-test-registry";
/// `issuer` of test tokens.
pub const TOKEN_ISSUER: &str = "wasm-cache-test-issuer";

/// A small registry token server (distribution's `auth: token`): checks Basic credentials
/// against its users and issues ES256 JWTs granting `pull` on the repositories each user (or
/// anonymous) may read.
pub struct TokenServer {
    /// `http://127.0.0.1:port/token`.
    pub realm: String,
    /// Users, public repositories and counters.
    state: Arc<TokenState>,
}

struct TokenState {
    /// user -> (password, repositories the user may pull).
    users: Mutex<HashMap<String, (String, Vec<String>)>>,
    /// Repositories anyone may pull.
    public: Mutex<Vec<String>>,
    /// Token requests answered (any outcome).
    requests: Mutex<usize>,
    /// The next token expires (for the registry, past its 60 s leeway) within seconds,
    /// although the answer says it lasts 300 s.
    short_next: Mutex<bool>,
    /// Signing key.
    key: jsonwebtoken::EncodingKey,
    /// x5c header value (the signing certificate, DER, base64).
    x5c: String,
}

impl TokenServer {
    /// Starts a token server on 127.0.0.1.
    pub fn start() -> TokenServer {
        use base64::Engine as _;
        let pki = pki();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&pki.signer_key).unwrap())
            .unwrap();
        let pem = std::fs::read_to_string(&pki.signer_cert).unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let state = Arc::new(TokenState {
            users: Mutex::default(),
            public: Mutex::default(),
            requests: Mutex::new(0),
            short_next: Mutex::new(false),
            key,
            x5c: base64::engine::general_purpose::STANDARD.encode(der),
        });
        let app = axum::Router::new()
            .route("/token", axum::routing::get(issue_token))
            .with_state(Arc::clone(&state));
        let addr = serve_on_thread("127.0.0.1:0", app);
        TokenServer {
            realm: format!("http://{addr}/token"),
            state,
        }
    }

    /// Adds (or replaces) a user who may pull `repos`.
    pub fn set_user(&self, user: &str, password: &str, repos: &[&str]) {
        self.state.users.lock().unwrap().insert(
            user.to_string(),
            (
                password.to_string(),
                repos.iter().map(|r| r.to_string()).collect(),
            ),
        );
    }

    /// Removes a user (their credentials stop working).
    pub fn remove_user(&self, user: &str) {
        self.state.users.lock().unwrap().remove(user);
    }

    /// Lets anyone pull `repo`.
    pub fn make_public(&self, repo: &str) {
        self.state.public.lock().unwrap().push(repo.to_string());
    }

    /// Makes the next token one the registry stops accepting a few seconds from now.
    pub fn next_token_short_lived(&self) {
        *self.state.short_next.lock().unwrap() = true;
    }

    /// Token requests so far.
    pub fn requests(&self) -> usize {
        *self.state.requests.lock().unwrap()
    }
}

async fn issue_token(
    State(st): State<Arc<TokenState>>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    use base64::Engine as _;
    *st.requests.lock().unwrap() += 1;
    let user = match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        None => None,
        Some(h) => {
            let decoded = h
                .strip_prefix("Basic ")
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok());
            let ok = decoded
                .as_deref()
                .and_then(|d| d.split_once(':'))
                .and_then(|(u, p)| {
                    let users = st.users.lock().unwrap();
                    users
                        .get(u)
                        .filter(|(pw, _)| pw == p)
                        .map(|_| u.to_string())
                });
            match ok {
                Some(u) => Some(u),
                None => {
                    return Response::builder()
                        .status(401)
                        .body(Body::from("bad credentials"))
                        .unwrap();
                }
            }
        }
    };
    let mut access = Vec::new();
    if let Some(scope) = q.get("scope")
        && let Some(repo) = scope
            .strip_prefix("repository:")
            .and_then(|s| s.strip_suffix(":pull"))
    {
        let allowed = st.public.lock().unwrap().iter().any(|r| r == repo)
            || user.as_ref().is_some_and(|u| {
                st.users
                    .lock()
                    .unwrap()
                    .get(u)
                    .is_some_and(|(_, repos)| repos.iter().any(|r| r == repo))
            });
        if allowed {
            access
                .push(serde_json::json!({"type": "repository", "name": repo, "actions": ["pull"]}));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // distribution accepts tokens up to 60 s past `exp`: 57 s ago leaves about 3 s.
    let exp = if std::mem::take(&mut *st.short_next.lock().unwrap()) {
        now - 57
    } else {
        now + 300
    };
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": user.clone().unwrap_or_default(),
        "aud": q.get("service").cloned().unwrap_or_default(),
        "exp": exp,
        "nbf": now - 120,
        "iat": now - 120,
        "jti": format!("{now}-{}", *st.requests.lock().unwrap()),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.x5c = Some(vec![st.x5c.clone()]);
    let token = jsonwebtoken::encode(&header, &claims, &st.key).unwrap();
    axum::Json(serde_json::json!({"token": token, "expires_in": 300})).into_response()
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

/// Forwards to a registry and counts requests by `METHOD path`, so tests can assert exactly
/// what the daemon asked upstream. Counts are final by the time the daemon has its answer.
pub struct CountingProxy {
    /// `127.0.0.1:port` the daemon talks to.
    pub addr: String,
    /// Shared state with the proxy task.
    state: Arc<ProxyState>,
}

/// An injected answer: path substring, how many more times, status, `WWW-Authenticate`.
type Fault = (String, usize, u16, Option<String>);

struct ProxyState {
    upstream: String,
    counts: Mutex<HashMap<String, usize>>,
    /// Per path substring: how many more requests answer with the given status (and
    /// `WWW-Authenticate` header, if any).
    faults: Mutex<Vec<Fault>>,
    client: reqwest::Client,
}

impl CountingProxy {
    /// Starts a proxy to `upstream` on its own thread and runtime.
    pub fn start(upstream: &str) -> CountingProxy {
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            counts: Mutex::new(HashMap::new()),
            faults: Mutex::new(Vec::new()),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&state));
        let addr = serve_on_thread("127.0.0.1:0", app).to_string();
        CountingProxy { addr, state }
    }

    /// Requests seen whose `METHOD path` starts with `prefix` (e.g. `GET /v2/repo/blobs/`).
    pub fn count(&self, prefix: &str) -> usize {
        self.state
            .counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }

    /// Requests seen for repository `repo` (any method, manifests and blobs).
    pub fn repo_count(&self, repo: &str) -> usize {
        let needle = format!(" /v2/{repo}/");
        self.state
            .counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains(&needle))
            .map(|(_, v)| v)
            .sum()
    }

    /// Makes the next `n` requests whose path contains `path_part` answer `status`.
    pub fn fail_next(&self, path_part: &str, n: usize, status: u16) {
        self.state
            .faults
            .lock()
            .unwrap()
            .push((path_part.to_string(), n, status, None));
    }

    /// Makes the next `n` requests whose path contains `path_part` answer `401` with the
    /// Bearer challenge `challenge`, as a registry does for a token that expired.
    pub fn reject_token_next(&self, path_part: &str, n: usize, challenge: &str) {
        self.state.faults.lock().unwrap().push((
            path_part.to_string(),
            n,
            401,
            Some(challenge.to_string()),
        ));
    }
}

async fn forward(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    let method = req.method().clone();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    *st.counts
        .lock()
        .unwrap()
        .entry(format!("{method} {path}"))
        .or_default() += 1;
    {
        let mut faults = st.faults.lock().unwrap();
        if let Some(f) = faults.iter_mut().find(|f| f.1 > 0 && path.contains(&f.0)) {
            f.1 -= 1;
            let mut b = Response::builder().status(f.2);
            if let Some(c) = &f.3 {
                b = b.header("www-authenticate", c);
            }
            return b.body(Body::from("injected fault")).unwrap();
        }
    }
    let headers: HeaderMap = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    let mut out = st
        .client
        .request(method, format!("http://{}{pq}", st.upstream))
        .body(body);
    for name in ["accept", "authorization", "content-type"] {
        for v in headers.get_all(name) {
            out = out.header(name, v);
        }
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(_) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::empty())
                .unwrap();
        }
    };
    let mut b = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if matches!(
            k.as_str(),
            "content-type"
                | "docker-content-digest"
                | "content-length"
                | "www-authenticate"
                | "etag"
                | "location"
        ) {
            b = b.header(k, v);
        }
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    b.body(Body::from(bytes)).unwrap()
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

/// A descriptor as pushed.
#[derive(Clone, Debug)]
pub struct Desc {
    /// Media type.
    pub media_type: String,
    /// Digest.
    pub digest: String,
    /// Size.
    pub size: usize,
}

impl Desc {
    /// As manifest JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// Pushes to a registry through its HTTP API.
pub struct Pusher {
    /// `http://127.0.0.1:port` (or https).
    base: String,
    /// HTTP client.
    client: reqwest::Client,
    /// Basic credentials, for registries with htpasswd auth.
    basic: Option<(String, String)>,
    /// A push token, for registries with token auth.
    bearer: Option<String>,
}

impl Pusher {
    /// A pusher for a plain-HTTP anonymous registry at `addr`.
    pub fn new(addr: &str) -> Pusher {
        Pusher {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            basic: None,
            bearer: None,
        }
    }

    /// A pusher for `registry` as set up by `opts` (TLS trusting the test CA, Basic auth with
    /// the first user).
    pub fn for_registry(registry: &Registry, opts: &RegistryOpts) -> Pusher {
        assert!(
            opts.token_realm.is_none(),
            "use Pusher::with_token for token-auth registries"
        );
        let mut b = reqwest::Client::builder().no_proxy();
        let scheme = if opts.tls {
            let ca =
                reqwest::Certificate::from_pem(&std::fs::read(&pki().ca_cert).unwrap()).unwrap();
            b = b.tls_certs_merge([ca]);
            "https"
        } else {
            "http"
        };
        Pusher {
            base: format!("{scheme}://{}", registry.addr),
            client: b.build().unwrap(),
            basic: opts.basic_users.first().cloned(),
            bearer: None,
        }
    }

    /// A pusher for a token-auth registry: it signs its own push token for `repo`.
    pub fn with_token(registry: &Registry, repo: &str) -> Pusher {
        let pki = pki();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&pki.signer_key).unwrap())
            .unwrap();
        use base64::Engine as _;
        let pem = std::fs::read_to_string(&pki.signer_cert).unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": "pusher", "aud": TOKEN_SERVICE, "exp": now + 600, "nbf": now - 10, "iat": now,
            "jti": format!("push-{repo}-{now}"),
            "access": [{"type": "repository", "name": repo, "actions": ["pull", "push"]}],
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.x5c = Some(vec![
            base64::engine::general_purpose::STANDARD.encode(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            ),
        ]);
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        Pusher {
            base: format!("http://{}", registry.addr),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            basic: None,
            bearer: Some(token),
        }
    }

    fn req(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let r = self.client.request(method, url);
        match (&self.basic, &self.bearer) {
            (_, Some(t)) => r.bearer_auth(t),
            (Some((u, p)), None) => r.basic_auth(u, Some(p)),
            (None, None) => r,
        }
    }

    /// Uploads a blob; returns its descriptor.
    pub async fn blob(&self, repo: &str, media_type: &str, data: &[u8]) -> Desc {
        let digest = sha(data);
        let r = self
            .req(
                reqwest::Method::POST,
                format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "starting upload");
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .req(reqwest::Method::PUT, format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "finishing upload: {}",
            r.text().await.unwrap()
        );
        Desc {
            media_type: media_type.to_string(),
            digest,
            size: data.len(),
        }
    }

    /// Puts a manifest under `reference`; returns its descriptor.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &serde_json::Value,
    ) -> Desc {
        let bytes = serde_json::to_vec(body).unwrap();
        let r = self
            .req(
                reqwest::Method::PUT,
                format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("content-type", media_type)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "putting manifest: {}",
            r.text().await.unwrap()
        );
        Desc {
            media_type: media_type.to_string(),
            digest: sha(&bytes),
            size: bytes.len(),
        }
    }

    /// An OCI/Docker image manifest with `config` and `layers`, tagged `reference`.
    pub async fn image(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        config: &Desc,
        layers: &[Desc],
        extra: serde_json::Value,
    ) -> Desc {
        let mut m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.json(),
            "layers": layers.iter().map(Desc::json).collect::<Vec<_>>(),
        });
        if let serde_json::Value::Object(e) = extra {
            m.as_object_mut().unwrap().extend(e);
        }
        self.manifest(repo, reference, media_type, &m).await
    }
}

/// Media types used in tests.
pub mod mt {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const SOLO_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
    pub const SOLO_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
    pub const CNCF_CONFIG: &str = "application/vnd.wasm.config.v0+json";
    pub const CNCF_LAYER: &str = "application/wasm";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_TGZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
}

/// Pushes a Solo-format artifact of `module` as `repo:tag`; returns the manifest descriptor.
pub async fn push_solo(p: &Pusher, repo: &str, tag: &str, module: &[u8]) -> Desc {
    let config = p.blob(repo, mt::SOLO_CONFIG, b"{}").await;
    let layer = p.blob(repo, mt::SOLO_LAYER, module).await;
    p.image(
        repo,
        tag,
        mt::OCI_MANIFEST,
        &config,
        &[layer],
        serde_json::json!({}),
    )
    .await
}

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
        let child = Command::new(env!("CARGO_BIN_EXE_wasm-cache"))
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

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Module blobs in the cache.
    pub fn blob_count(&self) -> usize {
        std::fs::read_dir(self.cache_dir.join("blobs").join("sha256"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tiny HTTP server for `http(s)://` tests: serves fixed routes, counts requests, can
/// fail the first N requests of a route.
pub struct HttpServer {
    /// `127.0.0.1:port`.
    pub addr: SocketAddr,
    /// Requests per path.
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// One route of [`HttpServer`].
#[derive(Clone)]
pub enum Route {
    /// 200 with these bytes (with an ETag, honouring If-None-Match).
    Bytes(Vec<u8>),
    /// Like `Bytes`, with content the test may replace.
    Mutable(Arc<Mutex<Vec<u8>>>),
    /// `status` for the first `n` requests, then 200 with the bytes.
    FailFirst(usize, u16, Vec<u8>),
    /// 302 to this url.
    Redirect(String),
    /// 200 with a declared length, `n` bytes of body, then silence (the connection stays open).
    Stall(usize),
}

impl HttpServer {
    /// Starts serving `routes` on 127.0.0.1 (thread + runtime of its own).
    pub fn start(routes: Vec<(&str, Route)>) -> HttpServer {
        Self::start_on("127.0.0.1:0", routes)
    }

    /// Starts serving `routes` on `bind`.
    pub fn start_on(bind: &str, routes: Vec<(&str, Route)>) -> HttpServer {
        let routes: HashMap<String, Route> = routes
            .into_iter()
            .map(|(p, r)| (p.to_string(), r))
            .collect();
        let routes = Arc::new(routes);
        let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let c = Arc::clone(&counts);
        let app = axum::Router::new().fallback(move |req: Request| {
            let routes = Arc::clone(&routes);
            let c = Arc::clone(&c);
            async move {
                let path = req.uri().path().to_string();
                let n = {
                    let mut m = c.lock().unwrap();
                    let e = m.entry(path.clone()).or_default();
                    *e += 1;
                    *e
                };
                let resp =
                    |s: u16, b: Vec<u8>| Response::builder().status(s).body(Body::from(b)).unwrap();
                let if_none_match = req
                    .headers()
                    .get("if-none-match")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                match routes.get(&path) {
                    None => resp(404, b"no such file".to_vec()),
                    // Static files carry an ETag and honour If-None-Match, as web servers do.
                    Some(route @ (Route::Bytes(_) | Route::Mutable(_))) => {
                        let b = match route {
                            Route::Mutable(m) => m.lock().unwrap().clone(),
                            Route::Bytes(b) => b.clone(),
                            _ => unreachable!(),
                        };
                        let b = &b;
                        let etag = format!("\"{}\"", sha(b));
                        if if_none_match.as_deref() == Some(etag.as_str()) {
                            *c.lock().unwrap().entry(format!("304 {path}")).or_default() += 1;
                            return Response::builder().status(304).body(Body::empty()).unwrap();
                        }
                        Response::builder()
                            .status(200)
                            .header("etag", etag)
                            .body(Body::from(b.clone()))
                            .unwrap()
                    }
                    Some(Route::FailFirst(k, s, b)) if n <= *k => {
                        let _ = b;
                        resp(*s, b"try again".to_vec())
                    }
                    Some(Route::FailFirst(_, _, b)) => resp(200, b.clone()),
                    Some(Route::Stall(n)) => {
                        let first = vec![0u8; *n];
                        let stream = futures_util::stream::once(async move {
                            Ok::<_, std::io::Error>(axum::body::Bytes::from(first))
                        })
                        .chain(futures_util::stream::pending());
                        Response::builder()
                            .status(200)
                            .header("content-length", (n * 4).to_string())
                            .body(Body::from_stream(stream))
                            .unwrap()
                    }
                    Some(Route::Redirect(to)) => Response::builder()
                        .status(302)
                        .header("location", to)
                        .body(Body::empty())
                        .unwrap(),
                }
            }
        });
        let addr = serve_on_thread(bind, app);
        HttpServer { addr, counts }
    }

    /// Requests for `path` answered `304 Not Modified`.
    pub fn not_modified(&self, path: &str) -> usize {
        self.count(&format!("304 {path}"))
    }

    /// Requests seen for `path`.
    pub fn count(&self, path: &str) -> usize {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
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
