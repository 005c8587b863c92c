//! Registries that refuse anonymous access, registries behind TLS with a private CA, upstream
//! timeouts, and crash safety.

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
