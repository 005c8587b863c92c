//! Registries that refuse anonymous access, registries behind TLS with a private CA, upstream
//! timeouts, and crash safety.

use std::sync::Arc;

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn tls_registry_is_trusted_only_through_the_configured_ca() {
    let opts = RegistryOpts {
        tls: true,
        ..Default::default()
    };
    let registry = Registry::start_with(opts.clone());
    let p = Pusher::for_registry(&registry, &opts);
    let m = wasm_module("tls", 10);
    push_solo(&p, "tls/mod", "v1", &m).await;
    let url = format!("oci://{}/tls/mod:v1", registry.addr);

    let untrusting = Daemon::start(DaemonOpts {
        secure_registries: true,
        ..Default::default()
    });
    let (status, code) = untrusting.fetch_err(json!({"url": url})).await;
    assert_eq!(
        (status, code.as_str()),
        (502, "upstream_error"),
        "unknown CA must fail"
    );

    let ca = pki().ca_cert.display().to_string();
    let trusting = Daemon::start(DaemonOpts {
        secure_registries: true,
        tables: format!("[tls]\nca_files = [{ca:?}]\n"),
        ..Default::default()
    });
    let a = trusting.fetch_ok(json!({"url": url})).await;
    assert_eq!(a["digest"], sha(&m));

    // Marked insecure: TLS is used without verification.
    let insecure = Daemon::start(DaemonOpts::default());
    assert_eq!(
        insecure.fetch_ok(json!({"url": url})).await["digest"],
        sha(&m)
    );
}

#[tokio::test]
async fn https_urls_use_the_configured_ca_too() {
    let opts = RegistryOpts {
        tls: true,
        ..Default::default()
    };
    let registry = Registry::start_with(opts.clone());
    let p = Pusher::for_registry(&registry, &opts);
    let m = wasm_module("https-blob", 10);
    let desc = p.blob("https/blob", "application/octet-stream", &m).await;
    // The registry's blob endpoint is an ordinary https url serving the module bytes.
    let url = format!(
        "https://{}/v2/https/blob/blobs/{}",
        registry.addr, desc.digest
    );
    let untrusting = Daemon::start(DaemonOpts::default());
    assert_eq!(
        untrusting.fetch_err(json!({"url": url})).await.1,
        "upstream_error"
    );
    let ca = pki().ca_cert.display().to_string();
    let trusting = Daemon::start(DaemonOpts {
        tables: format!("[tls]\nca_files = [{ca:?}]\n"),
        ..Default::default()
    });
    assert_eq!(
        trusting
            .fetch_ok(json!({"url": url, "sha256": sha(&m)}))
            .await["digest"],
        sha(&m)
    );
}

#[tokio::test]
async fn registry_refusing_anonymous_pulls_is_access_denied() {
    let opts = RegistryOpts {
        basic_users: vec![("alice".into(), "s3cret-pw".into())],
        ..Default::default()
    };
    let registry = Registry::start_with(opts.clone());
    let p = Pusher::for_registry(&registry, &opts);
    push_solo(&p, "private/mod", "v1", &wasm_module("private", 10)).await;
    let d = Daemon::start(DaemonOpts::default());
    let url = format!("{}/private/mod:v1", registry.addr);
    let (status, code) = d.fetch_err(json!({"url": url})).await;
    assert_eq!((status, code.as_str()), (403, "access_denied"));
    assert_eq!(d.blob_count(), 0);
}

#[tokio::test]
async fn a_stalled_upstream_times_out() {
    let srv = HttpServer::start(vec![("/stall.wasm", Route::Stall(100))]);
    let d = Daemon::start(DaemonOpts {
        fetch: Some("[fetch]\nrequest_timeout = \"300ms\"\nretries = 0\n".into()),
        ..Default::default()
    });
    let (status, code) = d.fetch_err(json!({"url": srv.url("/stall.wasm")})).await;
    assert_eq!((status, code.as_str()), (504, "timeout"));
    assert_eq!(d.blob_count(), 0);
}

// Multi-threaded: the request task runs while this thread polls the temp dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_download_leaves_no_partial_module() {
    let m = wasm_module("crash", 10);
    let srv = HttpServer::start(vec![
        ("/stall.wasm", Route::Stall(64 * 1024)),
        ("/ok.wasm", Route::Bytes(m.clone())),
    ]);
    let mut d = Daemon::start(DaemonOpts::default());
    let client = d.client();
    let url = srv.url("/stall.wasm");
    let pending = tokio::spawn(async move {
        client
            .post("http://localhost/v1/fetch")
            .json(&json!({"url": url}))
            .send()
            .await
    });
    // Wait until the daemon has written part of the body into a temp file, then kill -9.
    let tmp = d.cache_dir.join("tmp");
    wait_until(
        "a partial download in the cache's temp dir",
        400,
        std::time::Duration::from_millis(25),
        || {
            std::fs::read_dir(&tmp)
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
                })
                .unwrap_or(false)
        },
    );
    d.kill();
    assert!(
        pending.await.unwrap().is_err(),
        "the killed daemon cannot have answered"
    );
    d.start_again();
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temp files are removed at start"
    );
    assert_eq!(d.blob_count(), 0, "no partial module in the store");
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/stall.wasm"), "pullPolicy": "Never"}))
            .await
            .1,
        "not_present"
    );
    assert_eq!(
        d.fetch_ok(json!({"url": srv.url("/ok.wasm")})).await["digest"],
        sha(&m)
    );
}

/// Issue 9: upstream work had no concurrency bound. With `[fetch] max_concurrent = 1`, a
/// download held open by the server keeps the only slot: another module's fetch waits in
/// line (the `wasm_cache_upstream_queued` gauge says so, and the server never sees it) until
/// the first one ends. (Multi-threaded: the held request runs while this thread waits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_9_upstream_fetches_wait_for_a_slot() {
    let held = wasm_module("held", 10);
    let m = wasm_module("slot", 10);
    let gate = Arc::new(tokio::sync::Notify::new());
    let srv = HttpServer::start(vec![
        ("/held.wasm", Route::Gate(Arc::clone(&gate), held.clone())),
        ("/ok.wasm", Route::Bytes(m.clone())),
    ]);
    let d = Daemon::start(DaemonOpts {
        fetch: Some("[fetch]\nretries = 0\nmax_concurrent = 1\n".into()),
        ..Default::default()
    });
    let post = |url: String| {
        let client = d.client();
        tokio::spawn(async move {
            let r = client
                .post("http://localhost/v1/fetch")
                .json(&json!({"url": url}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        })
    };
    let first = post(srv.url("/held.wasm"));
    wait_until(
        "the held download to start",
        400,
        std::time::Duration::from_millis(10),
        || srv.count("/held.wasm") > 0,
    );
    let second = post(srv.url("/ok.wasm"));
    let mut queued = false;
    for _ in 0..400 {
        let (_, text) = d.get("/metrics").await;
        if String::from_utf8_lossy(&text).contains("wasm_cache_upstream_queued 1") {
            queued = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(queued, "the second fetch never queued for a slot");
    assert_eq!(srv.count("/ok.wasm"), 0, "it went upstream without a slot");
    gate.notify_one();
    let (s1, v1) = first.await.unwrap();
    let (s2, v2) = second.await.unwrap();
    assert_eq!((s1, s2), (200, 200), "{v1} {v2}");
    assert_eq!(v2["digest"], sha(&m));
}

/// Issue 9: `429 Too Many Requests` was retried on the fixed backoff, ignoring `Retry-After`.
/// The server's delay is now believed, clamped to `backoff_max`, so an absurd one cannot park
/// a fetch.
#[tokio::test]
async fn issue_9_retry_after_is_honoured_and_clamped() {
    let m = wasm_module("retry-after", 10);
    let srv = HttpServer::start(vec![
        ("/polite.wasm", Route::RetryAfter(1, 1, m.clone())),
        ("/absurd.wasm", Route::RetryAfter(1, 3600, m.clone())),
    ]);
    let d = Daemon::start(DaemonOpts {
        fetch: Some(
            "[fetch]\nretries = 2\nbackoff_min = \"10ms\"\nbackoff_max = \"2s\"\ntotal_timeout = \"20s\"\n"
                .into(),
        ),
        ..Default::default()
    });
    d.fetch_ok(json!({"url": srv.url("/polite.wasm")})).await;
    let t = srv.times("/polite.wasm");
    assert_eq!(t.len(), 2);
    assert!(
        t[1] - t[0] >= std::time::Duration::from_millis(900),
        "retried after {:?}, before the server's Retry-After: 1",
        t[1] - t[0]
    );
    // Retry-After: 3600 waits backoff_max (2 s), well inside the 20 s total timeout.
    d.fetch_ok(json!({"url": srv.url("/absurd.wasm")})).await;
    assert_eq!(srv.count("/absurd.wasm"), 2);
}

/// Issue 9: a server dripping a byte now and then never tripped the per-read timeout, so a
/// fetch hung until `total_timeout`. A body slower than `[fetch] min_rate` over
/// `min_rate_window` is now a `timeout` of its own.
#[tokio::test]
async fn issue_9_a_dripping_body_is_a_timeout() {
    let srv = HttpServer::start(vec![(
        "/drip.wasm",
        Route::Drip(10_000, std::time::Duration::from_millis(100)),
    )]);
    let d = Daemon::start(DaemonOpts {
        fetch: Some(
            "[fetch]\nrequest_timeout = \"20s\"\ntotal_timeout = \"60s\"\nretries = 0\nmin_rate = \"1KiB\"\nmin_rate_window = \"1s\"\n"
                .into(),
        ),
        ..Default::default()
    });
    let (status, v) = d.fetch(json!({"url": srv.url("/drip.wasm")})).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("less than 1024 bytes/s"), "{msg}");
}

/// Issue 9: `kill -9` at arbitrary moments during 100 downloads (10 rounds of 10 concurrent
/// fetches, each round cut short at a different moment). After every restart: no temp file is
/// left, no module is ever served with bytes other than its digest's, and every module the
/// daemon reported fetched is still served. (Multi-threaded: fetches run while this thread
/// kills the daemon.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_9_kill_9_at_random_moments_never_leaves_a_corrupt_or_lost_module() {
    let modules: Vec<Vec<u8>> = (0..100)
        .map(|i| wasm_module(&format!("kill9-{i}"), 64 << 10))
        .collect();
    let routes: Vec<(String, Route)> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("/m{i}.wasm"), Route::Bytes(m.clone())))
        .collect();
    let srv = HttpServer::start(
        routes
            .iter()
            .map(|(p, r)| (p.as_str(), r.clone()))
            .collect(),
    );
    let mut d = Daemon::start(DaemonOpts::default());
    let mut reported: Vec<usize> = Vec::new();
    // A fixed pseudo-random sequence of moments: the run is the same every time.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..10 {
        let client = d.client();
        let batch: Vec<_> = (round * 10..round * 10 + 10)
            .map(|i| {
                let (c, url) = (client.clone(), srv.url(&format!("/m{i}.wasm")));
                tokio::spawn(async move {
                    let r = c
                        .post("http://localhost/v1/fetch")
                        .json(&json!({"url": url}))
                        .send()
                        .await
                        .ok()?;
                    (r.status() == 200).then_some(i)
                })
            })
            .collect();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let moment = std::time::Duration::from_micros((seed >> 33) % 60_000);
        tokio::time::sleep(moment).await;
        d.kill();
        for t in batch {
            if let Some(i) = t.await.unwrap() {
                reported.push(i);
            }
        }
        d.start_again();
        let leftovers = std::fs::read_dir(d.cache_dir.join("tmp")).unwrap().count();
        assert_eq!(
            leftovers, 0,
            "round {round}: temp files left after a restart"
        );
        for (i, module) in modules.iter().enumerate().take(round * 10 + 10) {
            let (status, v) = d
                .fetch(json!({"url": srv.url(&format!("/m{i}.wasm")), "pullPolicy": "Never"}))
                .await;
            if status != 200 {
                assert!(
                    !reported.contains(&i),
                    "round {round}: module {i} was reported fetched, then lost"
                );
                continue;
            }
            let (s, body) = d.get(v["moduleUrl"].as_str().unwrap()).await;
            assert_eq!(s, 200);
            assert!(
                body == *module,
                "round {round}: module {i} served with other bytes"
            );
        }
    }
    eprintln!(
        "{} of 100 downloads finished before their kill",
        reported.len()
    );
    assert!(
        !reported.is_empty(),
        "no download ever finished before a kill"
    );
}

/// Issue 9, the hostile upstream: a connection reset mid-body is retried transparently, and
/// a body that never ends stops at `max_module_size` (`too_large`), with nothing kept.
#[tokio::test]
async fn issue_9_a_reset_mid_body_is_retried_and_an_endless_body_is_too_large() {
    let m = wasm_module("cut", 100_000);
    let srv = HttpServer::start(vec![
        ("/cut.wasm", Route::CutOnce(m.clone())),
        ("/endless.wasm", Route::Endless),
    ]);
    let d = Daemon::start(DaemonOpts {
        top: "max_module_size = \"2MiB\"".into(),
        ..Default::default()
    });
    let ok = d.fetch_ok(json!({"url": srv.url("/cut.wasm")})).await;
    assert_eq!(ok["digest"], sha(&m));
    assert_eq!(srv.count("/cut.wasm"), 2, "one cut, one retry");
    let (status, code) = d.fetch_err(json!({"url": srv.url("/endless.wasm")})).await;
    assert_eq!((status, code.as_str()), (422, "too_large"));
    assert_eq!(
        std::fs::read_dir(d.cache_dir.join("tmp")).unwrap().count(),
        0
    );
}

/// Issue 9: unpacking and validation ran to their end on the blocking pool after their fetch
/// had timed out. They now stop at the next chunk (and say so in the log).
#[tokio::test]
async fn issue_9_blocking_work_stops_when_its_fetch_times_out() {
    let d = Daemon::start(DaemonOpts {
        top: "max_module_size = \"2GiB\"".into(),
        fetch: Some("[fetch]\ntotal_timeout = \"300ms\"\nretries = 0\n".into()),
        ..Default::default()
    });
    // 1 GiB of zeros behind a small gzip: far more than 300 ms of decompression.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut gz, &zeros).unwrap();
    }
    std::fs::write(d.files_dir().join("bomb.wasm.gz"), gz.finish().unwrap()).unwrap();
    let url = format!("file://{}", d.files_dir().join("bomb.wasm.gz").display());
    let (status, code) = d.fetch_err(json!({"url": url})).await;
    assert_eq!((status, code.as_str()), (504, "timeout"));
    wait_until(
        "the unpacking to stop",
        400,
        std::time::Duration::from_millis(25),
        || {
            d.log_text()
                .contains("stopped: the fetch it was for timed out or was abandoned")
        },
    );
    wait_until(
        "its temp files to go",
        400,
        std::time::Duration::from_millis(25),
        || std::fs::read_dir(d.cache_dir.join("tmp")).unwrap().count() == 0,
    );
}

/// Issue 9, the hostile upstream: a small gzip'd tar whose GNU long-name header claims
/// megabytes (a header bomb) is `too_large` under a 1 MiB cap, with nothing kept.
#[tokio::test]
async fn issue_9_a_tar_header_bomb_from_a_server_is_too_large() {
    let name_len = 8 << 20;
    let mut tar = Vec::new();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(name_len as u64);
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend(std::iter::repeat_n(b'a', name_len));
    tar.extend(std::iter::repeat_n(0u8, 1024));
    let bomb = gzip(&tar);
    assert!(bomb.len() < 64 << 10, "the bomb is small: {}", bomb.len());
    let srv = HttpServer::start(vec![("/bomb.tar.gz", Route::Bytes(bomb))]);
    let d = Daemon::start(DaemonOpts {
        top: "max_module_size = \"1MiB\"".into(),
        ..Default::default()
    });
    let (status, code) = d.fetch_err(json!({"url": srv.url("/bomb.tar.gz")})).await;
    assert_eq!((status, code.as_str()), (422, "too_large"));
    assert_eq!(
        std::fs::read_dir(d.cache_dir.join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(d.blob_count(), 0);
}
