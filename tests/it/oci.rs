//! OCI registry fetching against a real `docker-registry`.

use serde_json::json;

use crate::harness::*;

/// Repository names are unique per test so the shared registry keeps tests apart.
fn setup(repo: &str) -> (&'static CountingProxy, Pusher, String) {
    let (registry, proxy) = shared();
    (
        proxy,
        Pusher::new(&registry.addr),
        format!("{}/{repo}", proxy.addr),
    )
}

async fn assert_serves(d: &Daemon, answer: &serde_json::Value, module: &[u8]) {
    assert_eq!(answer["digest"], sha(module), "{answer}");
    assert_eq!(answer["size"], module.len());
    let (status, bytes) = d.get(answer["moduleUrl"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, module, "served bytes differ from the pushed module");
}

#[tokio::test]
async fn solo_artifact_then_cache_hit_without_registry_traffic() {
    let (proxy, p, base) = setup("fmt/solo");
    let module = wasm_module("solo", 100);
    let manifest = push_solo(&p, "fmt/solo", "v1", &module).await;
    let d = Daemon::start(DaemonOpts::default());
    let a = d.fetch_ok(json!({"url": format!("oci://{base}:v1")})).await;
    assert_eq!(a["cache"], "miss");
    assert_eq!(a["imageDigest"], manifest.digest);
    assert_serves(&d, &a, &module).await;

    let before = proxy.repo_count("fmt/solo");
    let a = d.fetch_ok(json!({"url": format!("oci://{base}:v1")})).await;
    assert_eq!(a["cache"], "hit");
    assert_eq!(
        proxy.repo_count("fmt/solo"),
        before,
        "a hit under IfNotPresent must not reach the registry"
    );
}

#[tokio::test]
async fn cncf_artifact() {
    let (_, p, base) = setup("fmt/cncf");
    let module = wasm_module("cncf", 10);
    let config = p
        .blob("fmt/cncf", mt::CNCF_CONFIG, br#"{"layerDigests":[]}"#)
        .await;
    let layer = p.blob("fmt/cncf", mt::CNCF_LAYER, &module).await;
    p.image(
        "fmt/cncf",
        "1.0",
        mt::OCI_MANIFEST,
        &config,
        &[layer],
        json!({"artifactType": "application/vnd.wasm.config.v0+json"}),
    )
    .await;
    let d = Daemon::start(DaemonOpts::default());
    let a = d.fetch_ok(json!({"url": format!("{base}:1.0")})).await;
    assert_serves(&d, &a, &module).await;
}

#[tokio::test]
async fn compat_oci_image_with_readme_layer() {
    let (_, p, base) = setup("fmt/compat-oci");
    let module = wasm_module("compat-oci", 10);
    let config = p
        .blob(
            "fmt/compat-oci",
            mt::OCI_CONFIG,
            br#"{"architecture":"amd64","os":"linux"}"#,
        )
        .await;
    let readme = p
        .blob(
            "fmt/compat-oci",
            "application/vnd.module.wasm.doc.v1+markdown",
            b"# readme",
        )
        .await;
    let layer = p
        .blob(
            "fmt/compat-oci",
            mt::OCI_TGZ,
            &tar_gz(&[("runtime-config.json", b"{}"), ("plugin.wasm", &module)]),
        )
        .await;
    p.image(
        "fmt/compat-oci",
        "v1",
        mt::OCI_MANIFEST,
        &config,
        &[readme, layer],
        json!({"annotations": {"module.wasm.image/variant": "compat"}}),
    )
    .await;
    let d = Daemon::start(DaemonOpts::default());
    let a = d.fetch_ok(json!({"url": format!("oci://{base}:v1")})).await;
    assert_serves(&d, &a, &module).await;
}

#[tokio::test]
async fn compat_docker_v2_image_and_manifest_list() {
    let (_, p, base) = setup("fmt/compat-docker");
    let module = wasm_module("compat-docker", 10);
    let config = p
        .blob(
            "fmt/compat-docker",
            mt::DOCKER_CONFIG,
            br#"{"architecture":"amd64","os":"linux"}"#,
        )
        .await;
    let layer = p
        .blob(
            "fmt/compat-docker",
            mt::DOCKER_TGZ,
            &tar_gz(&[("plugin.wasm", &module)]),
        )
        .await;
    let m = p
        .image(
            "fmt/compat-docker",
            "v2",
            mt::DOCKER_MANIFEST,
            &config,
            &[layer],
            json!({}),
        )
        .await;
    let list = json!({
        "schemaVersion": 2,
        "mediaType": mt::DOCKER_LIST,
        "manifests": [{"mediaType": m.media_type, "digest": m.digest, "size": m.size, "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    let l = p
        .manifest("fmt/compat-docker", "list", mt::DOCKER_LIST, &list)
        .await;
    let d = Daemon::start(DaemonOpts::default());
    // The Docker v2 manifest keeps its digest (no schema1 conversion).
    let a = d
        .fetch_ok(json!({"url": format!("{base}:v2"), "sha256": m.digest}))
        .await;
    assert_eq!(a["imageDigest"], m.digest);
    assert_serves(&d, &a, &module).await;
    let a = d
        .fetch_ok(json!({"url": format!("{base}:list"), "sha256": l.digest}))
        .await;
    assert_eq!(a["imageDigest"], m.digest);
    assert_serves(&d, &a, &module).await;
}

#[tokio::test]
async fn index_picks_the_wasm_platform_and_skips_attestations() {
    let (_, p, base) = setup("fmt/index");
    let wasm = wasm_module("index-wasm", 10);
    let other = wasm_module("index-amd64", 10);
    let solo = push_solo(&p, "fmt/index", "wasm-only", &wasm).await;
    let config = p.blob("fmt/index", mt::OCI_CONFIG, b"{}").await;
    let layer = p
        .blob(
            "fmt/index",
            mt::OCI_TGZ,
            &tar_gz(&[("plugin.wasm", &other)]),
        )
        .await;
    let amd = p
        .image(
            "fmt/index",
            "amd-only",
            mt::OCI_MANIFEST,
            &config,
            &[layer],
            json!({}),
        )
        .await;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_INDEX,
        "manifests": [
            {"mediaType": mt::OCI_MANIFEST, "digest": amd.digest, "size": amd.size, "platform": {"architecture": "unknown", "os": "unknown"},
             "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
            {"mediaType": mt::OCI_MANIFEST, "digest": amd.digest, "size": amd.size, "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": mt::OCI_MANIFEST, "digest": solo.digest, "size": solo.size, "platform": {"architecture": "wasm", "os": "wasip1"}},
        ],
    });
    let idx = p
        .manifest("fmt/index", "multi", mt::OCI_INDEX, &index)
        .await;
    let d = Daemon::start(DaemonOpts::default());
    let a = d.fetch_ok(json!({"url": format!("{base}:multi")})).await;
    assert_eq!(a["imageDigest"], solo.digest);
    assert_serves(&d, &a, &wasm).await;
    // The index digest is an accepted sha256, and so is a pin by index digest.
    let a = d
        .fetch_ok(json!({"url": format!("{base}@{}", idx.digest), "sha256": idx.digest}))
        .await;
    assert_serves(&d, &a, &wasm).await;
}

#[tokio::test]
async fn untagged_means_latest_and_defaults_to_always() {
    let (proxy, p, base) = setup("policy/latest");
    let v1 = wasm_module("latest-1", 10);
    push_solo(&p, "policy/latest", "latest", &v1).await;
    let d = Daemon::start(DaemonOpts::default());
    let a = d.fetch_ok(json!({"url": format!("oci://{base}")})).await;
    assert_eq!(a["cache"], "miss");
    assert_serves(&d, &a, &v1).await;

    // Unset policy on latest is Always: without a resource version every request asks the
    // registry (one HEAD), but downloads nothing when the tag did not move.
    let blobs = proxy.count("GET /v2/policy/latest/blobs/");
    let heads = proxy.count("HEAD /v2/policy/latest/manifests/latest");
    let a = d
        .fetch_ok(json!({"url": format!("oci://{base}:latest")}))
        .await;
    assert_eq!(a["cache"], "revalidated");
    assert_eq!(
        proxy.count("HEAD /v2/policy/latest/manifests/latest"),
        heads + 1
    );
    assert_eq!(proxy.count("GET /v2/policy/latest/blobs/"), blobs);

    // The tag moves: the next request downloads the new module.
    let v2 = wasm_module("latest-2", 10);
    push_solo(&p, "policy/latest", "latest", &v2).await;
    let a = d.fetch_ok(json!({"url": format!("{base}")})).await;
    assert_eq!(a["cache"], "miss");
    assert_serves(&d, &a, &v2).await;
    assert!(proxy.count("GET /v2/policy/latest/blobs/") > blobs);
}

#[tokio::test]
async fn always_reresolves_once_per_resource_version() {
    let (proxy, p, base) = setup("policy/always");
    let v1 = wasm_module("always-1", 10);
    push_solo(&p, "policy/always", "v", &v1).await;
    let d = Daemon::start(DaemonOpts::default());
    let req = |ver: &str| json!({"url": format!("{base}:v"), "pullPolicy": "Always", "resourceName": "ns/acl", "resourceVersion": ver});
    assert_eq!(d.fetch_ok(req("1")).await["cache"], "miss");
    let all = proxy.repo_count("policy/always");
    assert_eq!(d.fetch_ok(req("1")).await["cache"], "hit");
    assert_eq!(
        proxy.repo_count("policy/always"),
        all,
        "same resource version: no registry traffic"
    );

    let heads = proxy.count("HEAD /v2/policy/always/manifests/");
    let blobs = proxy.count("GET /v2/policy/always/blobs/");
    assert_eq!(d.fetch_ok(req("2")).await["cache"], "revalidated");
    assert_eq!(proxy.count("HEAD /v2/policy/always/manifests/"), heads + 1);
    assert_eq!(proxy.count("GET /v2/policy/always/blobs/"), blobs);

    let v2 = wasm_module("always-2", 10);
    push_solo(&p, "policy/always", "v", &v2).await;
    assert_eq!(
        d.fetch_ok(req("2")).await["cache"],
        "hit",
        "version 2 was resolved already"
    );
    let a = d.fetch_ok(req("3")).await;
    assert_eq!(a["cache"], "miss");
    assert_serves(&d, &a, &v2).await;
}

#[tokio::test]
async fn never_serves_only_from_cache() {
    let (proxy, p, base) = setup("policy/never");
    let m = wasm_module("never", 10);
    push_solo(&p, "policy/never", "v1", &m).await;
    let d = Daemon::start(DaemonOpts::default());
    let url = format!("{base}:v1");
    let before = proxy.repo_count("policy/never");
    assert_eq!(
        d.fetch_err(json!({"url": url, "pullPolicy": "Never"}))
            .await,
        (404, "not_present".into())
    );
    assert_eq!(
        proxy.repo_count("policy/never"),
        before,
        "Never must not reach the registry"
    );
    d.fetch_ok(json!({"url": url, "pullPolicy": "IfNotPresent"}))
        .await;
    let a = d.fetch_ok(json!({"url": url, "pullPolicy": "Never"})).await;
    assert_eq!(a["cache"], "hit");
}

#[tokio::test]
async fn checksum_match_and_mismatch() {
    let (_, p, base) = setup("digest/check");
    let m = wasm_module("checksum", 10);
    let manifest = push_solo(&p, "digest/check", "v1", &m).await;
    let d = Daemon::start(DaemonOpts::default());
    let url = format!("{base}:v1");

    let wrong = sha(b"something else");
    assert_eq!(
        d.fetch_err(json!({"url": url, "sha256": wrong})).await,
        (422, "checksum_mismatch".into())
    );
    assert_eq!(d.blob_count(), 0, "nothing is cached after a mismatch");
    assert_eq!(
        d.fetch_err(json!({"url": url, "pullPolicy": "Never"}))
            .await
            .1,
        "not_present"
    );

    // The module digest (any case, with or without prefix) and the manifest digest both match.
    let bare = sha(&m).trim_start_matches("sha256:").to_uppercase();
    let a = d.fetch_ok(json!({"url": url, "sha256": bare})).await;
    assert_eq!(a["cache"], "miss");
    let a = d
        .fetch_ok(json!({"url": url, "sha256": manifest.digest}))
        .await;
    assert_eq!(a["cache"], "hit");

    // Pinned url and a contradicting sha256.
    let pinned = format!("{base}@{}", manifest.digest);
    assert_eq!(
        d.fetch_err(json!({"url": pinned, "sha256": wrong})).await.1,
        "checksum_mismatch"
    );
}

#[tokio::test]
async fn digest_pinned_url_is_a_hit_whatever_the_policy() {
    let (proxy, p, base) = setup("digest/pinned");
    let m = wasm_module("pinned", 10);
    let manifest = push_solo(&p, "digest/pinned", "latest", &m).await;
    let d = Daemon::start(DaemonOpts::default());
    let url = format!("oci://{base}@{}", manifest.digest);
    assert_eq!(d.fetch_ok(json!({"url": url})).await["cache"], "miss");
    let before = proxy.repo_count("digest/pinned");
    assert_eq!(
        d.fetch_ok(json!({"url": url, "pullPolicy": "Always"}))
            .await["cache"],
        "hit"
    );
    // The sha256 field names content this source already gave: a hit, also under a tag.
    let a = d
        .fetch_ok(
            json!({"url": format!("{base}:latest"), "pullPolicy": "Always", "sha256": sha(&m)}),
        )
        .await;
    assert_eq!(a["cache"], "hit");
    assert_eq!(proxy.repo_count("digest/pinned"), before);
}

#[tokio::test]
async fn cached_bytes_are_not_handed_to_another_source_by_digest() {
    let (proxy, p, base) = setup("tenancy/one");
    let m = wasm_module("shared-bytes", 10);
    push_solo(&p, "tenancy/one", "v1", &m).await;
    let d = Daemon::start(DaemonOpts::default());
    d.fetch_ok(json!({"url": format!("{base}:v1")})).await;
    // Another repository with no such module: knowing the digest must not get the bytes.
    let other = format!("{}/tenancy/other:v1", proxy.addr);
    let (status, code) = d.fetch_err(json!({"url": other, "sha256": sha(&m)})).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let (status, code) = d
        .fetch_err(json!({"url": other, "sha256": sha(&m), "pullPolicy": "Never"}))
        .await;
    assert_eq!((status, code.as_str()), (404, "not_present"));
}

#[tokio::test]
async fn parallel_identical_requests_download_once() {
    let (proxy, p, base) = setup("singleflight/many");
    let m = wasm_module("singleflight", 512 * 1024);
    push_solo(&p, "singleflight/many", "v1", &m).await;
    let d = Daemon::start(DaemonOpts::default());
    let client = d.client();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let c = client.clone();
        let url = format!("{base}:v1");
        tasks.push(tokio::spawn(async move {
            let r = c
                .post("http://localhost/v1/fetch")
                .json(&json!({"url": url}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["digest"]
                .as_str()
                .unwrap()
                .to_string()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), sha(&m));
    }
    let layer = sha(&m);
    assert_eq!(
        proxy.count(&format!("GET /v2/singleflight/many/blobs/{layer}")),
        1,
        "200 requests, one download"
    );
}

#[tokio::test]
async fn invalid_module_and_missing_image() {
    let (_, p, base) = setup("bad/module");
    push_solo(&p, "bad/module", "v1", b"\0asm\x01\0\0\0\x01\x05garbage").await;
    let d = Daemon::start(DaemonOpts::default());
    assert_eq!(
        d.fetch_err(json!({"url": format!("{base}:v1")})).await,
        (422, "invalid_module".into())
    );
    assert_eq!(d.blob_count(), 0);
    assert_eq!(
        d.fetch_err(json!({"url": format!("{base}:nope")})).await,
        (404, "not_found".into())
    );
    // An ordinary image with no Wasm in it.
    let config = p.blob("bad/module", mt::OCI_CONFIG, b"{}").await;
    let layer = p
        .blob(
            "bad/module",
            "application/vnd.oci.image.layer.v1.tar",
            &tar(&[("x", b"y")]),
        )
        .await;
    p.image(
        "bad/module",
        "plain",
        mt::OCI_MANIFEST,
        &config,
        &[layer],
        json!({}),
    )
    .await;
    assert_eq!(
        d.fetch_err(json!({"url": format!("{base}:plain")})).await.1,
        "invalid_module"
    );
}

#[tokio::test]
async fn module_size_cap_is_an_error() {
    let (_, p, base) = setup("cap/oci");
    let big = wasm_module("big", 64 * 1024);
    push_solo(&p, "cap/oci", "raw", &big).await;
    let config = p.blob("cap/oci", mt::OCI_CONFIG, b"{}").await;
    // Compresses well below the cap, but the module inside is larger.
    let layer = p
        .blob("cap/oci", mt::OCI_TGZ, &tar_gz(&[("plugin.wasm", &big)]))
        .await;
    p.image(
        "cap/oci",
        "tgz",
        mt::OCI_MANIFEST,
        &config,
        &[layer],
        json!({}),
    )
    .await;
    let d = Daemon::start(DaemonOpts {
        top: "max_module_size = \"32KiB\"".into(),
        ..Default::default()
    });
    assert_eq!(
        d.fetch_err(json!({"url": format!("{base}:raw")})).await,
        (422, "too_large".into())
    );
    assert_eq!(
        d.fetch_err(json!({"url": format!("{base}:tgz")})).await,
        (422, "too_large".into())
    );
    assert_eq!(d.blob_count(), 0);
}

#[tokio::test]
async fn restart_serves_hits_with_the_registry_stopped() {
    let registry = Registry::start();
    let p = Pusher::new(&registry.addr);
    let m = wasm_module("restart", 10);
    push_solo(&p, "restart/me", "v1", &m).await;
    let mut d = Daemon::start(DaemonOpts::default());
    let url = format!("{}/restart/me:v1", registry.addr);
    assert_eq!(d.fetch_ok(json!({"url": url})).await["cache"], "miss");
    registry.stop();
    d.restart();
    let a = d.fetch_ok(json!({"url": url})).await;
    assert_eq!(a["cache"], "hit");
    assert_serves(&d, &a, &m).await;
    // Re-resolving with the registry down serves the cached module as stale (issue 11).
    let a = d
        .fetch_ok(json!({"url": url, "pullPolicy": "Always"}))
        .await;
    assert_eq!(a["cache"], "stale");
    assert_serves(&d, &a, &m).await;
    // Anything that has nothing to fall back on fails fast with a clear code.
    let other = format!("{}/restart/other:v1", registry.addr);
    let (status, code) = d.fetch_err(json!({"url": other})).await;
    assert_eq!((status, code.as_str()), (502, "upstream_error"));
}

/// Issue 11: with `stale_if_error = false`, re-resolving with the registry down is an error;
/// and a url that fails is answered from memory for `negative_ttl`: 50 fetches of a missing
/// tag make one upstream request, and a new resource version goes upstream again.
#[tokio::test]
async fn issue_11_stale_if_error_off_and_the_negative_cache() {
    let registry = Registry::start();
    let p = Pusher::new(&registry.addr);
    let m = wasm_module("no-stale", 10);
    push_solo(&p, "nostale/me", "latest", &m).await;
    let fetch = "[fetch]\nrequest_timeout = \"5s\"\ntotal_timeout = \"30s\"\nretries = 0\nstale_if_error = false\n";
    let d = Daemon::start(DaemonOpts {
        fetch: Some(fetch.into()),
        ..Default::default()
    });
    let url = format!("{}/nostale/me", registry.addr);
    assert_eq!(d.fetch_ok(json!({"url": url})).await["cache"], "miss");
    registry.stop();
    let (status, code) = d.fetch_err(json!({"url": url})).await;
    assert_eq!((status, code.as_str()), (502, "upstream_error"));

    let (_, proxy) = shared();
    let missing = format!("{}/negative/missing:v1", proxy.addr);
    for _ in 0..50 {
        let (status, code) = d.fetch_err(json!({"url": missing})).await;
        assert_eq!((status, code.as_str()), (404, "not_found"));
    }
    assert_eq!(proxy.count("GET /v2/negative/missing/manifests/"), 1);
    let (_, code) = d
        .fetch_err(json!({"url": missing, "resourceVersion": "2"}))
        .await;
    assert_eq!(code, "not_found");
    assert_eq!(proxy.count("GET /v2/negative/missing/manifests/"), 2);
    let metrics = d.get("/metrics").await.1;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("wasm_cache_negative_hits_total 49"),
        "{metrics}"
    );
}

#[tokio::test]
async fn registry_5xx_is_retried() {
    let (proxy, p, base) = setup("retry/oci");
    let m = wasm_module("retry-oci", 10);
    push_solo(&p, "retry/oci", "v1", &m).await;
    proxy.fail_next("/retry/oci/blobs/", 2, 503);
    let d = Daemon::start(DaemonOpts::default());
    let a = d.fetch_ok(json!({"url": format!("{base}:v1")})).await;
    assert_serves(&d, &a, &m).await;
    assert_eq!(
        proxy.count(&format!("GET /v2/retry/oci/blobs/{}", sha(&m))),
        3
    );
}

#[tokio::test]
async fn network_guard_refuses_loopback_registries_by_default() {
    let (proxy, p, _) = setup("guard/oci");
    push_solo(&p, "guard/oci", "v1", &wasm_module("guard", 1)).await;
    let d = Daemon::start(DaemonOpts {
        no_loopback_allow: true,
        ..Default::default()
    });
    let before = proxy.repo_count("guard/oci");
    for url in [
        format!("{}/guard/oci:v1", proxy.addr),
        format!(
            "localhost:{}/guard/oci:v1",
            proxy.addr.rsplit(':').next().unwrap()
        ),
    ] {
        assert_eq!(
            d.fetch_err(json!({"url": url})).await,
            (403, "forbidden".into()),
            "{url}"
        );
    }
    assert_eq!(
        proxy.repo_count("guard/oci"),
        before,
        "nothing reached the registry"
    );
}

/// Issue 9: an insecure registry whose HTTPS probe failed was remembered as plain HTTP for
/// good, so a registry that was down at first contact and came back with TLS was never
/// reached again. Only a scheme the registry answered on is remembered.
#[tokio::test]
async fn issue_9_a_registry_down_at_first_contact_is_not_remembered_as_plain_http() {
    let port = free_port();
    let d = Daemon::start(DaemonOpts::default());
    let url = format!("oci://127.0.0.1:{port}/probe/late:v1");
    let (_, code) = d.fetch_err(json!({"url": url})).await;
    assert_eq!(code, "upstream_error");
    let opts = RegistryOpts {
        tls: true,
        port: Some(port),
        ..Default::default()
    };
    let registry = Registry::start_with(opts.clone());
    let m = wasm_module("late-tls", 10);
    push_solo(
        &Pusher::for_registry(&registry, &opts),
        "probe/late",
        "v1",
        &m,
    )
    .await;
    // (A new resource version: the failure is not answered from memory.)
    let body = d
        .fetch_ok(json!({"url": url, "resourceVersion": "2"}))
        .await;
    assert_eq!(body["digest"], sha(&m));
}
