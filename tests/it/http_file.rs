//! `http://` and `file://` modules.

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn http_plain_gzip_tar_and_tar_gz() {
    let m = wasm_module("http-plain", 10);
    let srv = HttpServer::start(vec![
        ("/plain.wasm", Route::Bytes(m.clone())),
        ("/m.wasm.gz", Route::Bytes(gzip(&m))),
        ("/m.tar", Route::Bytes(tar(&[("filter.wasm", &m)]))),
        ("/m.tar.gz", Route::Bytes(tar_gz(&[("filter.wasm", &m)]))),
    ]);
    let d = Daemon::start(DaemonOpts::default());
    for path in ["/plain.wasm", "/m.wasm.gz", "/m.tar", "/m.tar.gz"] {
        let a = d
            .fetch_ok(json!({"url": srv.url(path), "sha256": sha(&m)}))
            .await;
        assert_eq!(a["digest"], sha(&m), "{path}");
        assert_eq!(a["cache"], "miss", "{path}");
        let (s, bytes) = d.get(a["moduleUrl"].as_str().unwrap()).await;
        assert_eq!((s, bytes), (200, m.clone()), "{path}");
    }
    // IfNotPresent (the default for http): the second request is a hit without traffic.
    let a = d.fetch_ok(json!({"url": srv.url("/plain.wasm")})).await;
    assert_eq!(a["cache"], "hit");
    assert_eq!(srv.count("/plain.wasm"), 1);
    // Always without a resource version asks again; unchanged content is "revalidated".
    let a = d
        .fetch_ok(json!({"url": srv.url("/plain.wasm"), "pullPolicy": "Always"}))
        .await;
    assert_eq!(a["cache"], "revalidated");
    assert_eq!(srv.count("/plain.wasm"), 2);
    assert_eq!(
        srv.not_modified("/plain.wasm"),
        1,
        "the re-check is a conditional GET"
    );
}

#[tokio::test]
async fn http_5xx_then_success_is_retried_and_404_is_not() {
    let m = wasm_module("http-retry", 10);
    let srv = HttpServer::start(vec![
        ("/flaky.wasm", Route::FailFirst(2, 503, m.clone())),
        ("/broken.wasm", Route::FailFirst(100, 500, m.clone())),
    ]);
    let d = Daemon::start(DaemonOpts::default());
    let a = d.fetch_ok(json!({"url": srv.url("/flaky.wasm")})).await;
    assert_eq!(a["digest"], sha(&m));
    assert_eq!(srv.count("/flaky.wasm"), 3);
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/missing.wasm")})).await,
        (404, "not_found".into())
    );
    assert_eq!(srv.count("/missing.wasm"), 1, "404 is not retried");
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/broken.wasm")})).await,
        (502, "upstream_error".into())
    );
    assert_eq!(
        srv.count("/broken.wasm"),
        4,
        "first attempt + 3 retries from the test config"
    );
}

#[tokio::test]
async fn http_size_cap_checksum_and_invalid_module() {
    let big = wasm_module("http-big", 40 * 1024);
    let small = wasm_module("http-small", 10);
    // A gzip bomb in miniature: small on the wire, large once decompressed.
    let srv = HttpServer::start(vec![
        ("/big.wasm", Route::Bytes(big.clone())),
        ("/big.wasm.gz", Route::Bytes(gzip(&big))),
        ("/small.wasm", Route::Bytes(small.clone())),
        ("/text", Route::Bytes(b"<html>not wasm</html>".to_vec())),
    ]);
    let d = Daemon::start(DaemonOpts {
        top: "max_module_size = \"32KiB\"".into(),
        ..Default::default()
    });
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/big.wasm")})).await,
        (422, "too_large".into())
    );
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/big.wasm.gz")})).await,
        (422, "too_large".into())
    );
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/text")})).await,
        (422, "invalid_module".into())
    );
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/small.wasm"), "sha256": sha(b"other")}))
            .await,
        (422, "checksum_mismatch".into())
    );
    assert_eq!(d.blob_count(), 0, "nothing rejected is cached");
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/small.wasm"), "pullPolicy": "Never"}))
            .await
            .1,
        "not_present"
    );
}

#[tokio::test]
async fn network_guard_blocks_loopback_and_redirects_into_it() {
    let m = wasm_module("guarded", 10);
    let target = HttpServer::start_on("127.0.0.2:0", vec![("/m.wasm", Route::Bytes(m.clone()))]);
    let srv = HttpServer::start(vec![
        ("/m.wasm", Route::Bytes(m.clone())),
        ("/redirect", Route::Redirect(target.url("/m.wasm"))),
    ]);
    // Default guard: loopback is refused, by IP literal and by name.
    let d = Daemon::start(DaemonOpts {
        no_loopback_allow: true,
        ..Default::default()
    });
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/m.wasm")})).await,
        (403, "forbidden".into())
    );
    let by_name = format!("http://localhost:{}/m.wasm", srv.addr.port());
    assert_eq!(
        d.fetch_err(json!({"url": by_name})).await,
        (403, "forbidden".into())
    );
    assert_eq!(srv.count("/m.wasm"), 0);
    // Cloud metadata: asked of a daemon in an empty network namespace, so that a regression
    // could not send anything off the machine.
    match empty_netns() {
        Err(why) => println!("skipped the metadata address: {why}"),
        Ok(_) => {
            let isolated = Daemon::start(DaemonOpts {
                no_loopback_allow: true,
                empty_netns: true,
                ..Default::default()
            });
            assert_eq!(
                isolated
                    .fetch_err(json!({"url": "http://169.254.169.254/latest/meta-data"}))
                    .await
                    .1,
                "forbidden"
            );
        }
    }

    // Only 127.0.0.1 allowed: a redirect to 127.0.0.2 is refused at the redirect.
    let d = Daemon::start(DaemonOpts {
        tables: "[network]\nallow_cidrs = [\"127.0.0.1/32\"]\n".into(),
        no_loopback_allow: true,
        ..Default::default()
    });
    assert_eq!(
        d.fetch_err(json!({"url": srv.url("/redirect")})).await,
        (403, "forbidden".into())
    );
    assert_eq!(srv.count("/redirect"), 1);
    assert_eq!(target.count("/m.wasm"), 0);
    d.fetch_ok(json!({"url": srv.url("/m.wasm")})).await;
}

#[tokio::test]
async fn file_roots_traversal_and_symlinks() {
    let d = Daemon::start(DaemonOpts::default());
    let root = d.files_dir();
    let m = wasm_module("file", 10);
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/ok.wasm"), &m).unwrap();
    std::fs::write(root.join("ok.wasm.gz"), gzip(&m)).unwrap();
    let outside = d.dir.path().join("secret.wasm");
    std::fs::write(&outside, &m).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape.wasm")).unwrap();

    let url = |p: &std::path::Path| format!("file://{}", p.display());
    let a = d
        .fetch_ok(json!({"url": url(&root.join("sub/ok.wasm")), "sha256": sha(&m)}))
        .await;
    assert_eq!(a["digest"], sha(&m));
    let a = d
        .fetch_ok(json!({"url": url(&root.join("ok.wasm.gz"))}))
        .await;
    assert_eq!(a["digest"], sha(&m));
    for bad in [
        url(&outside),
        format!("file://{}/sub/../../secret.wasm", root.display()),
        url(&root.join("escape.wasm")),
    ] {
        assert_eq!(
            d.fetch_err(json!({"url": bad})).await,
            (403, "forbidden".into()),
            "{bad}"
        );
    }
    assert_eq!(
        d.fetch_err(json!({"url": url(&root.join("none.wasm"))}))
            .await,
        (404, "not_found".into())
    );
}

#[tokio::test]
async fn http_always_rechecks_with_the_etag_and_fetches_changed_content() {
    let v1 = wasm_module("etag-1", 10);
    let v2 = wasm_module("etag-2", 10);
    let content = std::sync::Arc::new(std::sync::Mutex::new(v1.clone()));
    let srv = HttpServer::start(vec![("/m.wasm", Route::Mutable(content.clone()))]);
    let d = Daemon::start(DaemonOpts::default());
    let req = |v: &str| json!({"url": srv.url("/m.wasm"), "pullPolicy": "Always", "resourceName": "ns/p", "resourceVersion": v});
    assert_eq!(d.fetch_ok(req("1")).await["cache"], "miss");
    assert_eq!(d.fetch_ok(req("1")).await["cache"], "hit");
    let a = d.fetch_ok(req("2")).await;
    assert_eq!(
        (a["cache"].as_str(), srv.not_modified("/m.wasm")),
        (Some("revalidated"), 1)
    );
    *content.lock().unwrap() = v2.clone();
    let a = d.fetch_ok(req("3")).await;
    assert_eq!(a["cache"], "miss");
    assert_eq!(a["digest"], sha(&v2));
    assert_eq!(srv.count("/m.wasm"), 3, "one request per resource version");
}

/// Issue 9: a FIFO under the roots hung a thread on open (waiting for a writer), and a path
/// outside the roots answered differently whether it existed or not.
#[tokio::test]
async fn issue_9_file_urls_refuse_fifos_and_hide_what_is_outside_the_roots() {
    let d = Daemon::start(DaemonOpts::default());
    let root = d.files_dir();
    let fifo = root.join("pipe.wasm");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let url = |p: &std::path::Path| format!("file://{}", p.display());
    let (status, v) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        d.fetch(json!({"url": url(&fifo)})),
    )
    .await
    .expect("a FIFO hung the fetch");
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{v}"
    );
    // Outside the roots: the same answer for a file that exists and one that does not.
    let existing = d.dir.path().join("secret.wasm");
    std::fs::write(&existing, wasm_module("secret", 1)).unwrap();
    let missing = d.dir.path().join("missing.wasm");
    let a = d.fetch(json!({"url": url(&existing)})).await;
    let b = d.fetch(json!({"url": url(&missing)})).await;
    assert_eq!((a.0, &a.1["error"]["code"]), (403, &json!("forbidden")));
    assert_eq!((b.0, &b.1["error"]["code"]), (403, &json!("forbidden")));
    let shape = |v: &serde_json::Value, p: &std::path::Path| {
        v["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&p.display().to_string(), "PATH")
    };
    assert_eq!(shape(&a.1, &existing), shape(&b.1, &missing));
}
