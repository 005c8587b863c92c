//! `cargo bench --bench socket` (or `benches/run.sh`, which installs the peers first): the
//! daemon's serving path side by side with nginx and skopeo, in one run, alternating.
//!
//! - `GET /v1/modules/...` of a 41 B, a 10 MiB and a 100 MiB module, 32 concurrent clients
//!   (oha over the unix socket), against nginx (one worker, `sendfile on`) serving the very
//!   same blob files from a unix socket: req/s, MiB/s, p99 and their ratios;
//! - `POST /v1/fetch` answered from the cache, against nginx's 41 B file;
//! - the daemon's peak RSS (`VmHWM`, reset before each phase) while serving 100 MiB to 32
//!   clients, and during a herd of 200 concurrent fetches of one uncached 10 MiB module
//!   (which must cause one upstream blob GET);
//! - cold pulls of a 10 MiB and a 100 MiB module from a local `docker-registry`, against
//!   `skopeo copy` of the same image into an OCI layout;
//! - `skopeo copy` of a 10 MiB module through the registry endpoint (`[registry] addr`),
//!   cached and cold (purged before each copy), against `skopeo copy` from the registry
//!   itself.
//!
//! Medians over `ROUNDS` alternating rounds; ratios are what count (absolute numbers move by
//! a third between runs on a shared 2-core machine). Needs `oha`, `nginx`, `skopeo` and
//! `docker-registry` on the PATH (or `OHA`, `NGINX`, `SKOPEO`, `REGISTRY` naming them).
// A benchmark harness: writes fixture files, starts peers and talks to them.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, median, peak_kib, reset_peak};

/// Concurrent clients of the serving comparisons.
const CLIENTS: usize = 32;
/// Alternating rounds per comparison.
const ROUNDS: usize = 3;
/// Length of one load run.
const RUN: &str = "2s";
/// Concurrent fetches in the herd.
const HERD: usize = 200;

fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    for dir in [PathBuf::from("/usr/sbin"), home.join(".cargo/bin")] {
        if dir.join(name).is_file() {
            return dir.join(name);
        }
    }
    PathBuf::from(name)
}

/// What one oha run measured.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Requests per second.
    rps: f64,
    /// Body bytes per second.
    bytes_per_s: f64,
    /// 99th percentile latency, seconds.
    p99: f64,
    /// Server CPU time per request, seconds (user + system, all its processes).
    cpu: f64,
}

/// CPU time used so far by `pids` (user + system), seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let hz: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // Fields 14 and 15 of proc(5): utime and stime (11 and 12 after the name).
            (ticks(11) + ticks(12)) / hz
        })
        .sum()
}

/// `pid` and its child processes (nginx's workers).
fn family(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, a)| a.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        if ppid == Some(pid) {
            all.push(child);
        }
    }
    all
}

/// One load run of `clients` clients against `path` on `socket`; `body` makes it a JSON POST.
/// (`pids` are the server's processes, for its CPU time.) With `requests`, that many requests
/// instead of a run of `RUN` (a slow server may not finish one large download within it).
fn oha(
    socket: &Path,
    pids: &[u32],
    path: &str,
    requests: Option<usize>,
    body: Option<&str>,
) -> Load {
    let mut cmd = Command::new(tool("OHA", "oha"));
    cmd.args(["--no-tui", "--output-format", "json", "-c"])
        .arg(CLIENTS.to_string());
    match requests {
        Some(n) => cmd.arg("-n").arg(n.to_string()),
        None => cmd.args(["-z", RUN]),
    };
    cmd.arg("--unix-socket").arg(socket);
    if let Some(b) = body {
        cmd.args(["-m", "POST", "-T", "application/json", "-d", b]);
    }
    cmd.arg(format!("http://localhost{path}"));
    let cpu_before = cpu_seconds(pids);
    let out = cmd.stderr(Stdio::inherit()).output().expect("running oha");
    let cpu = cpu_seconds(pids) - cpu_before;
    assert!(out.status.success(), "oha failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("oha's JSON");
    let codes = &v["statusCodeDistribution"];
    let ok = codes["200"].as_u64().unwrap_or(0);
    let all: u64 = codes
        .as_object()
        .map(|o| o.values().filter_map(|c| c.as_u64()).sum())
        .unwrap_or(0);
    assert!(
        ok > 0 && ok == all,
        "{path}: status codes {codes}, errors {}",
        v["errorDistribution"]
    );
    Load {
        cpu: cpu / all as f64,
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap(),
        bytes_per_s: v["summary"]["sizePerSec"].as_f64().unwrap_or(0.0),
        p99: v["latencyPercentiles"]["p99"].as_f64().unwrap(),
    }
}

/// nginx with one worker serving `root` on a unix socket; stopped on drop.
struct Nginx {
    /// Its prefix (config, pid, temp dirs).
    _dir: tempfile::TempDir,
    /// Its socket.
    socket: PathBuf,
    /// The master process.
    child: Child,
}

impl Nginx {
    fn start(root: &Path) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nginx.sock");
        let user = if std::env::var("USER").as_deref() == Ok("root") || is_root() {
            "user root;"
        } else {
            ""
        };
        let conf = format!(
            "{user}
worker_processes 1;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000000;
  keepalive_timeout 60s;
  client_body_temp_path {p}/body;
  proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fastcgi;
  uwsgi_temp_path {p}/uwsgi;
  scgi_temp_path {p}/scgi;
  default_type application/wasm;
  server {{
    listen unix:{s};
    root {r};
  }}
}}
",
            p = dir.path().display(),
            s = socket.display(),
            r = root.display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(tool("NGINX", "nginx"))
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting nginx");
        for _ in 0..2000 {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Nginx {
            _dir: dir,
            socket,
            child,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-QUIT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Debian's `docker-registry` on a free loopback port, anonymous, in a temp dir.
struct Registry {
    /// Storage and config.
    _dir: tempfile::TempDir,
    /// `127.0.0.1:port`.
    addr: String,
    /// The process.
    child: Child,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(tool("REGISTRY", "docker-registry"))
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        for _ in 0..2000 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Registry {
            _dir: dir,
            addr,
            child,
        }
    }

    /// Pushes `module` as a Wasm artifact `repo:tag` through the registry's HTTP API.
    async fn push(&self, repo: &str, tag: &str, module: &[u8]) {
        let c = reqwest::Client::builder().no_proxy().build().unwrap();
        let base = format!("http://{}", self.addr);
        let blob = |data: Vec<u8>| {
            let c = c.clone();
            let base = base.clone();
            async move {
                let digest = format!("sha256:{}", hex::encode(sha2_digest(&data)));
                let r = c
                    .post(format!("{base}/v2/{repo}/blobs/uploads/"))
                    .send()
                    .await
                    .unwrap();
                let loc = r.headers()["location"].to_str().unwrap().to_string();
                let loc = if loc.starts_with("http") {
                    loc
                } else {
                    format!("{base}{loc}")
                };
                let sep = if loc.contains('?') { '&' } else { '?' };
                let size = data.len();
                let r = c
                    .put(format!("{loc}{sep}digest={digest}"))
                    .body(data)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                (digest, size)
            }
        };
        let (cd, cs) = blob(b"{}".to_vec()).await;
        let (ld, ls) = blob(module.to_vec()).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.module.wasm.config.v1+json", "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.module.wasm.content.layer.v1+wasm", "digest": ld, "size": ls}],
        });
        let r = c
            .put(format!("{base}/v2/{repo}/manifests/{tag}"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(serde_json::to_vec(&manifest).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha2_digest(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

fn mib(bytes_per_s: f64) -> f64 {
    bytes_per_s / f64::from(1u32 << 20)
}

/// One row of the results table.
struct Row {
    figure: String,
    ours: String,
    peer: String,
    ratio: String,
}

fn main() {
    let bin = Daemon::binary();
    println!("binary: {}", bin.display());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    println!(
        "machine: {} x {cpu}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (env, name, arg) in [
        ("OHA", "oha", "--version"),
        ("NGINX", "nginx", "-v"),
        ("SKOPEO", "skopeo", "--version"),
    ] {
        if let Ok(o) = Command::new(tool(env, name)).arg(arg).output() {
            let text = [o.stdout, o.stderr].concat();
            println!("{}", String::from_utf8_lossy(&text).trim());
        }
    }
    let registry = Registry::start();
    // WASM_CACHE_BENCH_WORKERS=N runs the daemon with `[server] worker_threads = N`.
    let workers = std::env::var("WASM_CACHE_BENCH_WORKERS")
        .map(|n| format!("[server]\nworker_threads = {n}\n"))
        .unwrap_or_default();
    let endpoint = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let extra = format!(
        "{workers}[network]\nallow_cidrs = [\"127.0.0.0/8\"]\n[registries.\"{}\"]\ninsecure = true\n[registry]\naddr = \"{endpoint}\"\nupstreams = {{ bench = \"{}\" }}\n",
        registry.addr, registry.addr
    );
    let sizes: [(&str, usize); 3] = [("41 B", 41), ("10 MiB", 10 << 20), ("100 MiB", 100 << 20)];
    let daemon = Daemon::start_with(&bin, &extra, |files| {
        for (i, (_, size)) in sizes.iter().enumerate() {
            std::fs::write(
                files.join(format!("{i}.wasm")),
                wasm_cache::testkit::wasm_module("b", *size),
            )
            .unwrap();
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();

    // Cache the three modules; nginx serves the same blob files.
    let fetched: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, _)| {
            rt.block_on(common::fetch(
                &daemon.client,
                daemon.file_url(&format!("{i}.wasm")),
            ))
        })
        .collect();
    let nginx = Nginx::start(&daemon.cache_dir());
    let blob_path = |d: &wasm_cache::digest::Digest| format!("/blobs/sha256/{}", d.hex());

    for (i, (label, _)) in sizes.iter().enumerate() {
        let ours_path = fetched[i].module_url.clone();
        let theirs_path = blob_path(&fetched[i].digest);
        // Large modules: a fixed number of downloads (about 3 GiB), timed whole.
        let requests = (sizes[i].1 >= 1 << 20).then(|| (3usize << 30) / sizes[i].1);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut peak = 0;
        for _ in 0..ROUNDS {
            reset_peak(daemon.pid());
            ours.push(oha(
                &daemon.socket(),
                &[daemon.pid()],
                &ours_path,
                requests,
                None,
            ));
            peak = peak.max(peak_kib(daemon.pid()));
            theirs.push(oha(
                &nginx.socket,
                &family(nginx.child.id()),
                &theirs_path,
                requests,
                None,
            ));
        }
        let (o, t) = (summary(&ours), summary(&theirs));
        let small = i == 0;
        let fmt = |l: &Load| {
            if small {
                format!(
                    "{:.0} req/s, p99 {:.2} ms, CPU {:.1} µs/req",
                    l.rps,
                    l.p99 * 1e3,
                    l.cpu * 1e6
                )
            } else {
                format!(
                    "{:.0} MiB/s, p99 {:.1} ms, CPU {:.0} µs/req",
                    mib(l.bytes_per_s),
                    l.p99 * 1e3,
                    l.cpu * 1e6
                )
            }
        };
        rows.push(Row {
            figure: format!("`GET` module, {label}, {CLIENTS} clients"),
            ours: format!("{}, peak RSS {} MiB", fmt(&o), peak >> 10),
            peer: fmt(&t),
            ratio: ratios(&o, &t),
        });
    }

    // Fetch hits against nginx's small file.
    {
        let body = serde_json::json!({ "url": daemon.file_url("0.wasm") }).to_string();
        let theirs_path = blob_path(&fetched[0].digest);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.push(oha(
                &daemon.socket(),
                &[daemon.pid()],
                "/v1/fetch",
                None,
                Some(&body),
            ));
            theirs.push(oha(
                &nginx.socket,
                &family(nginx.child.id()),
                &theirs_path,
                None,
                None,
            ));
        }
        let (o, t) = (summary(&ours), summary(&theirs));
        rows.push(Row {
            figure: format!("`POST /v1/fetch` hit, {CLIENTS} clients (nginx: `GET` 41 B)"),
            ours: format!(
                "{:.0} req/s, p99 {:.2} ms, CPU {:.1} µs/req",
                o.rps,
                o.p99 * 1e3,
                o.cpu * 1e6
            ),
            peer: format!(
                "{:.0} req/s, p99 {:.2} ms, CPU {:.1} µs/req",
                t.rps,
                t.p99 * 1e3,
                t.cpu * 1e6
            ),
            ratio: ratios(&o, &t),
        });
    }
    drop(nginx);

    // The herd: one upstream pull for 200 concurrent fetches of an uncached 10 MiB module.
    rt.block_on(async {
        let m = wasm_cache::testkit::wasm_module("herd", 10 << 20);
        registry.push("bench/herd", "v1", &m).await;
        let url = format!("oci://{}/bench/herd:v1", registry.addr);
        let before = daemon.metric("wasm_cache_upstream_fetches_total").await;
        reset_peak(daemon.pid());
        let t = Instant::now();
        let tasks: Vec<_> = (0..HERD)
            .map(|_| {
                let (c, u) = (daemon.client.clone(), url.clone());
                tokio::spawn(async move { common::fetch(&c, u).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let took = t.elapsed();
        let peak = peak_kib(daemon.pid());
        let fetches = daemon.metric("wasm_cache_upstream_fetches_total").await - before;
        rows.push(Row {
            figure: format!("herd: {HERD} concurrent fetches of one uncached 10 MiB module"),
            ours: format!(
                "{fetches} upstream fetch(es), {:.3} s, peak RSS {} MiB",
                took.as_secs_f64(),
                peak >> 10
            ),
            peer: String::new(),
            ratio: String::new(),
        });
    });

    // Cold pulls against skopeo.
    for (label, size) in [("10 MiB", 10usize << 20), ("100 MiB", 100 << 20)] {
        let repo = format!("bench/cold{}", size >> 20);
        rt.block_on(registry.push(&repo, "v1", &wasm_cache::testkit::wasm_module("cold", size)));
        let url = format!("oci://{}/{repo}:v1", registry.addr);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS + 2 {
            rt.block_on(daemon.purge_all());
            let t = Instant::now();
            rt.block_on(common::fetch(&daemon.client, url.clone()));
            ours.push(t.elapsed().as_secs_f64());
            let out = tempfile::tempdir().unwrap();
            let t = Instant::now();
            let st = Command::new(tool("SKOPEO", "skopeo"))
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .arg(format!("docker://{}/{repo}:v1", registry.addr))
                .arg(format!("oci:{}:v1", out.path().display()))
                .status()
                .expect("running skopeo");
            theirs.push(t.elapsed().as_secs_f64());
            assert!(st.success(), "skopeo copy failed");
        }
        let (o, t) = (median(ours), median(theirs));
        rows.push(Row {
            figure: format!("cold pull {label} from a local registry"),
            ours: format!("{o:.3} s"),
            peer: format!("skopeo {t:.3} s"),
            ratio: format!("{:.2}x", o / t),
        });
    }

    // skopeo through the registry endpoint, against skopeo from the registry itself.
    {
        let repo = "bench/endpoint";
        rt.block_on(registry.push(
            repo,
            "v1",
            &wasm_cache::testkit::wasm_module("ep", 10 << 20),
        ));
        let copy = |from: String| {
            let out = tempfile::tempdir().unwrap();
            let t = Instant::now();
            let st = Command::new(tool("SKOPEO", "skopeo"))
                .args([
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    "--src-no-creds",
                ])
                .arg(from)
                .arg(format!("oci:{}:v1", out.path().display()))
                .status()
                .expect("running skopeo");
            assert!(st.success(), "skopeo copy failed");
            t.elapsed().as_secs_f64()
        };
        let direct = format!("docker://{}/{repo}:v1", registry.addr);
        let through = format!("docker://{endpoint}/bench/{repo}:v1");
        copy(through.clone());
        let (mut cached, mut cold, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS + 2 {
            cached.push(copy(through.clone()));
            theirs.push(copy(direct.clone()));
            rt.block_on(daemon.purge_all());
            cold.push(copy(through.clone()));
        }
        let (c, k, t) = (median(cached), median(cold), median(theirs));
        for (figure, o) in [("cached", c), ("cold", k)] {
            rows.push(Row {
                figure: format!("skopeo copy 10 MiB through the registry endpoint, {figure}"),
                ours: format!("{o:.3} s"),
                peer: format!("from the registry {t:.3} s"),
                ratio: format!("{:.2}x", o / t),
            });
        }
    }

    println!();
    println!("| figure | wasm-cache | nginx / skopeo | ratio |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} |", r.figure, r.ours, r.peer, r.ratio);
    }
}

/// Throughput, p99 and CPU-per-request ratios (ours / theirs).
fn ratios(o: &Load, t: &Load) -> String {
    format!(
        "{:.2}x (p99 {:.2}x, CPU/req {:.2}x)",
        o.rps / t.rps,
        o.p99 / t.p99,
        o.cpu / t.cpu
    )
}

/// The median of each figure over the rounds.
fn summary(runs: &[Load]) -> Load {
    Load {
        rps: median(runs.iter().map(|l| l.rps).collect()),
        bytes_per_s: median(runs.iter().map(|l| l.bytes_per_s).collect()),
        p99: median(runs.iter().map(|l| l.p99).collect()),
        cpu: median(runs.iter().map(|l| l.cpu).collect()),
    }
}
