//! The admin socket and command: ls, purge, stats; expiry, eviction, integrity.

use std::process::Command;

use serde_json::{Value, json};

use crate::harness::*;

fn cli(d: &Daemon, args: &[&str]) -> (bool, String, String) {
    d.cli(args)
}

fn ls(d: &Daemon) -> Vec<Value> {
    let (ok, out, err) = cli(d, &["ls", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["modules"].as_array().unwrap().clone()
}

fn listed(d: &Daemon) -> Vec<String> {
    ls(d)
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect()
}

fn purge(d: &Daemon, args: &[&str]) -> Value {
    let mut a = vec!["purge", "--json"];
    a.extend_from_slice(args);
    let (ok, out, err) = cli(d, &a);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Serves `n` distinct modules over http; returns the server and the modules.
fn modules(tag: &str, n: usize, pad: usize) -> (HttpServer, Vec<Vec<u8>>) {
    let ms: Vec<Vec<u8>> = (0..n)
        .map(|i| wasm_module(&format!("{tag}-{i}"), pad))
        .collect();
    let routes = ms
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                Box::leak(format!("/{i}.wasm").into_boxed_str()) as &str,
                Route::Bytes(m.clone()),
            )
        })
        .collect();
    (HttpServer::start(routes), ms)
}

#[tokio::test]
async fn admin_socket_is_private_and_separate() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(DaemonOpts::default());
    let mode = std::fs::metadata(&d.admin_socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    for path in ["/v1/admin/modules", "/v1/admin/stats"] {
        let (s, _) = d.get(path).await;
        assert_eq!(s, 404, "{path} must not exist on the proxies' socket");
    }
    let r = d
        .client()
        .post("http://localhost/v1/admin/purge")
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let admin = reqwest::Client::builder()
        .unix_socket(d.admin_socket.clone())
        .build()
        .unwrap();
    let r = admin
        .get("http://localhost/v1/admin/modules")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Bad purge requests are clear errors.
    for body in [
        json!({}),
        json!({"all": true, "digest": sha(b"x")}),
        json!({"unusedFor": "soon"}),
    ] {
        let r = admin
            .post("http://localhost/v1/admin/purge")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_request");
    }
}

#[tokio::test]
async fn ls_purge_in_every_mode_and_stats() {
    let (srv, ms) = modules("purge", 4, 100);
    let d = Daemon::start(DaemonOpts::default());
    for i in 0..4 {
        d.fetch_ok(json!({"url": srv.url(&format!("/{i}.wasm"))}))
            .await;
    }
    d.fetch_ok(json!({"url": srv.url("/0.wasm")})).await;
    let (ok, table, _) = cli(&d, &["ls"]);
    assert!(ok);
    assert!(
        table.contains(&sha(&ms[0])) && table.contains("public") && table.contains("4 modules"),
        "{table}"
    );
    assert_eq!(listed(&d).len(), 4);

    let (ok, text, _) = cli(&d, &["stats"]);
    assert!(ok);
    assert!(
        text.contains("entries:     4")
            && text.contains("hits:        1")
            && text.contains("misses:      4"),
        "{text}"
    );

    // Dry run: reported, nothing removed.
    let r = purge(&d, &["--digest", &sha(&ms[1]), "--dry-run"]);
    assert_eq!(
        (
            r["dryRun"].as_bool(),
            r["removed"].as_array().unwrap().len()
        ),
        (Some(true), 1)
    );
    assert_eq!(listed(&d).len(), 4);
    // By digest.
    let r = purge(&d, &["--digest", &sha(&ms[1])]);
    assert_eq!(r["freedBytes"], ms[1].len());
    assert!(!listed(&d).contains(&sha(&ms[1])));
    assert_eq!(d.blob_count(), 3);
    // The next request for it is a miss that fetches again.
    assert_eq!(
        d.fetch_ok(json!({"url": srv.url("/1.wasm")})).await["cache"],
        "miss"
    );
    assert_eq!(srv.count("/1.wasm"), 2);
    // By url.
    let r = purge(&d, &["--url", &srv.url("/2.wasm")]);
    assert_eq!(r["removed"][0]["digest"], sha(&ms[2]));
    // By age: everything was just used, nothing is a day old; "0s" takes all that is left.
    assert_eq!(
        purge(&d, &["--unused-for", "1d"])["removed"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let (ok, text, _) = cli(&d, &["purge", "--all", "--dry-run"]);
    assert!(ok && text.contains("would remove 3 modules"), "{text}");
    assert_eq!(
        purge(&d, &["--unused-for", "0s"])["removed"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(listed(&d).is_empty());
    assert_eq!(d.blob_count(), 0);
    // Exactly one selector.
    let (ok, _, err) = cli(&d, &["purge"]);
    assert!(!ok && err.contains("required"), "{err}");
}

#[tokio::test]
async fn purge_by_untagged_oci_url_takes_every_tag() {
    let (registry, proxy) = shared();
    let p = Pusher::new(&registry.addr);
    let a = wasm_module("purge-oci-a", 10);
    let b = wasm_module("purge-oci-b", 10);
    push_solo(&p, "admin/purge", "a", &a).await;
    push_solo(&p, "admin/purge", "b", &b).await;
    let d = Daemon::start(DaemonOpts::default());
    let base = format!("{}/admin/purge", proxy.addr);
    d.fetch_ok(json!({"url": format!("{base}:a")})).await;
    d.fetch_ok(json!({"url": format!("{base}:b")})).await;
    let r = purge(&d, &["--url", &format!("oci://{base}:a")]);
    assert_eq!(r["removed"].as_array().unwrap().len(), 1);
    d.fetch_ok(json!({"url": format!("{base}:a")})).await;
    let r = purge(&d, &["--url", &base]);
    assert_eq!(r["removed"].as_array().unwrap().len(), 2);
    assert_eq!(
        d.fetch_ok(json!({"url": format!("{base}:b")})).await["cache"],
        "miss"
    );
}

#[tokio::test]
async fn unused_modules_expire_and_used_ones_stay() {
    let (srv, ms) = modules("expiry", 2, 10);
    let d = Daemon::start(DaemonOpts {
        tables: "[cache]\nunused_expiry = \"1s\"\npurge_interval = \"100ms\"\n".into(),
        ..Default::default()
    });
    let kept = d.fetch_ok(json!({"url": srv.url("/0.wasm")})).await;
    d.fetch_ok(json!({"url": srv.url("/1.wasm")})).await;
    let kept_url = kept["moduleUrl"].as_str().unwrap().to_string();
    let mut expired = false;
    for _ in 0..100 {
        // Serving counts as use: module 0 is fetched over GET all along.
        assert_eq!(d.get(&kept_url).await.0, 200);
        if !listed(&d).contains(&sha(&ms[1])) {
            expired = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(expired, "the unused module never expired");
    assert!(
        listed(&d).contains(&sha(&ms[0])),
        "a module in use must not expire"
    );
    assert_eq!(
        d.fetch_ok(json!({"url": srv.url("/1.wasm")})).await["cache"],
        "miss"
    );
}

#[tokio::test]
async fn max_size_evicts_least_recently_used_first() {
    // Each module is a little over 10 KiB: three fit in 32 KiB, four do not.
    let (srv, ms) = modules("lru", 4, 10 * 1024);
    let big = wasm_module("lru-big", 40 * 1024);
    let big_srv = HttpServer::start(vec![("/big.wasm", Route::Bytes(big.clone()))]);
    let d = Daemon::start(DaemonOpts {
        tables: "[cache]\nmax_size = \"32KiB\"\n".into(),
        ..Default::default()
    });
    for i in 0..3 {
        d.fetch_ok(json!({"url": srv.url(&format!("/{i}.wasm"))}))
            .await;
    }
    // Use 0 and 2 again: 1 is now the least recently used.
    d.fetch_ok(json!({"url": srv.url("/0.wasm")})).await;
    d.fetch_ok(json!({"url": srv.url("/2.wasm")})).await;
    d.fetch_ok(json!({"url": srv.url("/3.wasm")})).await;
    let now = listed(&d);
    assert!(
        !now.contains(&sha(&ms[1])),
        "the least recently used module is evicted"
    );
    for i in [0, 2, 3] {
        assert!(now.contains(&sha(&ms[i])), "module {i} stays");
    }
    assert_eq!(d.blob_count(), 3);
    // A module larger than the whole bound is refused, and nothing is evicted for it.
    assert_eq!(
        d.fetch_err(json!({"url": big_srv.url("/big.wasm")})).await,
        (422, "too_large".into())
    );
    assert_eq!(listed(&d).len(), 3);
    let (_, text, _) = cli(&d, &["stats"]);
    assert!(text.contains("evictions:   1"), "{text}");
}

#[tokio::test]
async fn a_blob_corrupted_on_disk_is_never_served() {
    let (srv, ms) = modules("corrupt", 2, 1000);
    let mut d = Daemon::start(DaemonOpts::default());
    let a = d.fetch_ok(json!({"url": srv.url("/0.wasm")})).await;
    d.fetch_ok(json!({"url": srv.url("/1.wasm")})).await;
    d.stop();
    // Flip bytes of both blobs behind the daemon's back.
    for m in &ms {
        let path = d
            .cache_dir
            .join("blobs/sha256")
            .join(sha(m).trim_start_matches("sha256:"));
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    d.start_again();
    // GET of the corrupt module: dropped, not served.
    let (s, body) = d.get(a["moduleUrl"].as_str().unwrap()).await;
    assert_eq!(s, 404, "{}", String::from_utf8_lossy(&body));
    // A fetch re-downloads good bytes.
    let again = d.fetch_ok(json!({"url": srv.url("/1.wasm")})).await;
    assert_eq!(again["cache"], "miss");
    assert_eq!(
        d.get(again["moduleUrl"].as_str().unwrap()).await,
        (200, ms[1].clone())
    );
    assert_eq!(srv.count("/1.wasm"), 2);
    let (_, text, _) = cli(&d, &["stats"]);
    assert!(text.contains("corrupt:     2"), "{text}");
    assert!(d.log_text().contains("corrupt"));
}

#[tokio::test]
async fn verify_blobs_scan_drops_corrupt_blobs_at_start() {
    let (srv, ms) = modules("scan", 1, 1000);
    let mut d = Daemon::start(DaemonOpts {
        tables: "[cache]\nverify_blobs = \"scan\"\n".into(),
        ..Default::default()
    });
    d.fetch_ok(json!({"url": srv.url("/0.wasm")})).await;
    d.stop();
    let path = d
        .cache_dir
        .join("blobs/sha256")
        .join(sha(&ms[0]).trim_start_matches("sha256:"));
    std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
    d.start_again();
    let mut gone = false;
    for _ in 0..100 {
        if listed(&d).is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(gone, "the start-up scan did not drop the corrupt blob");
}

#[tokio::test]
async fn purge_during_a_stream_does_not_break_it() {
    let big = wasm_module("stream", 16 << 20);
    let d = Daemon::start(DaemonOpts::default());
    std::fs::write(d.files_dir().join("big.wasm"), &big).unwrap();
    let a = d
        .fetch_ok(json!({"url": format!("file://{}", d.files_dir().join("big.wasm").display())}))
        .await;
    let mut resp = d
        .client()
        .get(format!(
            "http://localhost{}",
            a["moduleUrl"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    let mut got = resp.chunk().await.unwrap().unwrap().to_vec();
    assert!(got.len() < big.len());
    assert_eq!(
        purge(&d, &["--all"])["removed"].as_array().unwrap().len(),
        1
    );
    assert_eq!(d.blob_count(), 0);
    while let Some(c) = resp.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert_eq!(got.len(), big.len());
    assert!(got == big, "the stream delivered other bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_racing_fetches_leave_a_consistent_cache() {
    let (srv, _) = modules("race", 3, 20 * 1024);
    let d = Daemon::start(DaemonOpts::default());
    let admin = reqwest::Client::builder()
        .unix_socket(d.admin_socket.clone())
        .build()
        .unwrap();
    for _ in 0..15 {
        let mut tasks = Vec::new();
        for i in 0..3 {
            let c = d.client();
            let url = srv.url(&format!("/{i}.wasm"));
            tasks.push(tokio::spawn(async move {
                c.post("http://localhost/v1/fetch")
                    .json(&json!({"url": url}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }));
        }
        let a = admin.clone();
        let purge = tokio::spawn(async move {
            a.post("http://localhost/v1/admin/purge")
                .json(&json!({"all": true}))
                .send()
                .await
                .unwrap()
                .status()
        });
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
        assert_eq!(purge.await.unwrap(), 200);
    }
    // Every listed module has its blob, and every blob is listed.
    let modules = listed(&d);
    assert_eq!(modules.len(), d.blob_count());
    for m in &modules {
        assert!(
            d.cache_dir
                .join("blobs/sha256")
                .join(m.trim_start_matches("sha256:"))
                .is_file()
        );
    }
}

/// Issue 9: a damaged index made the daemon start empty and then delete every blob as an
/// orphan. The damaged file is now kept aside, the daemon starts, says so in its log and a
/// metric, keeps every blob, and serves again once the module is fetched.
#[tokio::test]
async fn issue_9_a_damaged_index_costs_no_blob() {
    let mut d = Daemon::start(DaemonOpts::default());
    let m = wasm_module("damaged-index", 100);
    std::fs::write(d.files_dir().join("m.wasm"), &m).unwrap();
    let url = format!("file://{}", d.files_dir().join("m.wasm").display());
    assert_eq!(d.fetch_ok(json!({"url": url})).await["cache"], "miss");
    d.stop();
    let index = d.cache_dir.join("index.redb");
    std::fs::write(
        &index,
        b"this is not a database, it is what a bad disk left",
    )
    .unwrap();
    d.restart();
    let (s, _) = d.get("/healthz").await;
    assert_eq!(s, 200);
    assert!(
        d.log_text().contains("the cache index is damaged"),
        "{}",
        d.log_text()
    );
    let (_, metrics) = d.get("/metrics").await;
    assert!(
        String::from_utf8_lossy(&metrics).contains("wasm_cache_index_damaged_total 1"),
        "no damaged-index metric"
    );
    let kept: Vec<_> = std::fs::read_dir(&d.cache_dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("index.redb.damaged-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the damaged index is kept for inspection");
    assert!(
        d.cache_dir
            .join("blobs/sha256")
            .join(&sha(&m)[7..])
            .exists(),
        "the blob survived"
    );
    // A second start (the damaged copy still there) keeps the blob too.
    d.stop();
    d.restart();
    assert!(
        d.cache_dir
            .join("blobs/sha256")
            .join(&sha(&m)[7..])
            .exists()
    );
    // The module is served again after a fetch.
    let again = d.fetch_ok(json!({"url": url})).await;
    assert_eq!(again["digest"], sha(&m));
    let (s, body) = d.get(again["moduleUrl"].as_str().unwrap()).await;
    assert_eq!((s, body), (200, m));
}

/// Issue 9: a password in an http(s) url was written into the index on disk and shown by
/// `ls`. It is kept only in memory for the fetch itself; everything else shows `user:***`.
#[tokio::test]
async fn issue_9_a_password_in_an_http_url_never_reaches_disk_listings_or_metrics() {
    let m = wasm_module("url-password", 10);
    let srv = HttpServer::start(vec![("/m.wasm", Route::Bytes(m.clone()))]);
    let d = Daemon::start(DaemonOpts::default());
    let url = format!("http://alice:s3cretpw@{}/m.wasm", srv.addr);
    assert_eq!(d.fetch_ok(json!({"url": url})).await["cache"], "miss");
    assert_eq!(d.fetch_ok(json!({"url": url})).await["cache"], "hit");
    let (status, code) = d
        .fetch_err(json!({"url": format!("http://alice:s3cretpw@{}/gone.wasm", srv.addr)}))
        .await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let (ok, listing, _) = cli(&d, &["ls"]);
    assert!(ok);
    assert!(listing.contains("alice:***@"), "{listing}");
    let (_, metrics) = d.get("/metrics").await;
    let mut seen = vec![
        ("ls", listing.into_bytes()),
        ("ls --json", cli(&d, &["ls", "--json"]).1.into_bytes()),
        ("metrics", metrics),
        ("log", d.log_text().into_bytes()),
    ];
    for e in walk(&d.cache_dir) {
        seen.push(("cache file", std::fs::read(e).unwrap()));
    }
    for (what, bytes) in seen {
        assert!(
            !bytes.windows(8).any(|w| w == b"s3cretpw"),
            "the password reached the {what}"
        );
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Unmounts a test tmpfs (lazily, so a process still inside cannot keep it).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Issue 9: a full disk was an `internal` error. It is now `storage_full` (507), nothing
/// partial is left, what was cached before is still served, and the same request succeeds
/// once space is free. The cache lives on a small tmpfs (skipped where mounting is not
/// allowed).
#[tokio::test]
async fn issue_9_a_full_disk_is_storage_full_and_leaves_nothing_behind() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&cache)
        .output();
    match &mounted {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "skipping issue_9_a_full_disk_is_storage_full_and_leaves_nothing_behind: cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!(
                "skipping issue_9_a_full_disk_is_storage_full_and_leaves_nothing_behind: no mount: {e}"
            );
            return;
        }
    }
    let _unmount = Unmount(cache.clone());
    let d = Daemon::start_in(std::sync::Arc::clone(&dir), DaemonOpts::default());
    let small = wasm_module("small", 1000);
    let big = wasm_module("big", 3 << 20);
    std::fs::write(d.files_dir().join("small.wasm"), &small).unwrap();
    std::fs::write(d.files_dir().join("big.wasm"), &big).unwrap();
    let url = |n: &str| format!("file://{}", d.files_dir().join(n).display());
    let cached = d.fetch_ok(json!({"url": url("small.wasm")})).await;
    // Something else fills the filesystem.
    let filler = cache.join("filler");
    std::fs::write(&filler, vec![0u8; 5 << 20]).unwrap();
    let (status, code) = d.fetch_err(json!({"url": url("big.wasm")})).await;
    assert_eq!((status, code.as_str()), (507, "storage_full"));
    let leftovers: Vec<_> = std::fs::read_dir(cache.join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    let (s, body) = d.get(cached["moduleUrl"].as_str().unwrap()).await;
    assert_eq!((s, body), (200, small));
    std::fs::remove_file(&filler).unwrap();
    let again = d.fetch_ok(json!({"url": url("big.wasm")})).await;
    assert_eq!(again["digest"], sha(&big));
}

/// Issue 9: after a damaged index, a fetch from the same source re-reads the manifest and
/// re-uses the blob on disk (checked against its digest) instead of downloading it; a
/// different source listing the same digest still downloads it (the cross-source rule).
#[tokio::test]
async fn issue_9_after_a_damaged_index_the_same_source_reuses_its_blob() {
    let (registry, proxy) = shared();
    let p = Pusher::new(&registry.addr);
    let m = wasm_module("reuse-after-damage", 5000);
    push_solo(&p, "damage/one", "v1", &m).await;
    push_solo(&p, "damage/two", "v1", &m).await;
    let mut d = Daemon::start(DaemonOpts::default());
    let one = format!("oci://{}/damage/one:v1", proxy.addr);
    let two = format!("oci://{}/damage/two:v1", proxy.addr);
    assert_eq!(d.fetch_ok(json!({"url": one})).await["cache"], "miss");
    d.stop();
    std::fs::write(d.cache_dir.join("index.redb"), b"not a database").unwrap();
    d.start_again();
    let blobs_one = proxy.count("GET /v2/damage/one/blobs/");
    let again = d.fetch_ok(json!({"url": one})).await;
    assert_eq!(again["digest"], sha(&m));
    assert_eq!(
        proxy.count("GET /v2/damage/one/blobs/"),
        blobs_one,
        "the same source's blob was downloaded again"
    );
    let blobs_two = proxy.count("GET /v2/damage/two/blobs/");
    assert_eq!(d.fetch_ok(json!({"url": two})).await["digest"], sha(&m));
    assert_eq!(
        proxy.count("GET /v2/damage/two/blobs/"),
        blobs_two + 1,
        "another source's listing must not open the blob"
    );
}
