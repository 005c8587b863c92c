//! Issue 13: the node-local OCI registry endpoint, driven by real OCI clients (skopeo, the
//! `oras` Python package), reqwest and curl, against a real `docker-registry` upstream
//! behind a counting proxy (which tells exactly what reached the upstream).

use std::process::Command;

use serde_json::{Value, json};

use crate::harness::*;

/// A daemon with the registry endpoint on a TCP port; `up` is an alias of the shared
/// registry's counting proxy.
struct Endpoint {
    d: Daemon,
    /// `127.0.0.1:port` of the endpoint.
    addr: String,
}

/// Starts a daemon whose `[registry]` table has `addr`, the alias `up` for the shared
/// registry (through its counting proxy), and `extra` lines.
fn endpoint_with(upstreams: &str, extra: &str) -> Endpoint {
    let addr = extra
        .strip_prefix("addr = \"")
        .and_then(|a| a.split('"').next())
        .map(str::to_string)
        .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
    let listen = if extra.starts_with("addr") {
        String::new()
    } else {
        format!("addr = \"{addr}\"\n")
    };
    let d = Daemon::start(DaemonOpts {
        tables: format!("[registry]\n{listen}upstreams = {{ {upstreams} }}\n{extra}\n"),
        ..Default::default()
    });
    wait_until(
        "the registry endpoint",
        400,
        std::time::Duration::from_millis(25),
        || std::net::TcpStream::connect(&addr).is_ok(),
    );
    Endpoint { d, addr }
}

fn endpoint(extra: &str) -> Endpoint {
    endpoint_with(&format!("up = \"{}\"", shared().1.addr), extra)
}

/// Runs skopeo; (success, stdout, stderr).
fn skopeo(args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new(which("skopeo"))
        .args(args)
        .env("REGISTRY_AUTH_FILE", "/nonexistent/auth.json")
        .output()
        .unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli(d: &Daemon, args: &[&str]) -> String {
    let (ok, out, err) = d.cli(args);
    assert!(ok, "{err}");
    out
}

/// Pushes a CNCF Wasm artifact (`application/wasm` layer with a title) as `repo:tag`.
async fn push_cncf(p: &Pusher, repo: &str, tag: &str, module: &[u8]) -> (Desc, Desc) {
    let config = p
        .blob(
            repo,
            mt::CNCF_CONFIG,
            b"{\"architecture\":\"wasm\",\"os\":\"wasip1\"}",
        )
        .await;
    let layer = p.blob(repo, mt::CNCF_LAYER, module).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_MANIFEST,
        "artifactType": "application/vnd.wasm.config.v0+json",
        "config": config.json(),
        "layers": [{
            "mediaType": layer.media_type, "digest": layer.digest, "size": layer.size,
            "annotations": {"org.opencontainers.image.title": "filter.wasm"}
        }],
    });
    (
        p.manifest(repo, tag, mt::OCI_MANIFEST, &manifest).await,
        layer,
    )
}

fn any_log(d: &Daemon) -> String {
    d.log_text()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn get(url: &str) -> reqwest::Response {
    http().get(url).send().await.unwrap()
}

/// The first error code of a distribution error body.
async fn error_code(resp: reqwest::Response) -> String {
    let v: Value = resp.json().await.unwrap();
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn skopeo_inspects_and_copies_a_module_byte_for_byte() {
    let e = endpoint("");
    let (reg, proxy) = shared();
    let p = Pusher::new(&reg.addr);
    let m = wasm_module("endpoint-solo", 3000);
    let desc = push_solo(&p, "endpoint/solo", "1.0", &m).await;
    let img = format!("docker://{}/up/endpoint/solo:1.0", e.addr);

    let (ok, raw, err) = skopeo(&["inspect", "--raw", "--tls-verify=false", "--no-creds", &img]);
    assert!(ok, "{err}");
    assert_eq!(
        sha(&raw),
        desc.digest,
        "the manifest's bytes are the upstream's"
    );
    // The config blob (skopeo's image view refuses non-image artifacts, as it should).
    let (ok, config, err) = skopeo(&[
        "inspect",
        "--raw",
        "--config",
        "--tls-verify=false",
        "--no-creds",
        &img,
    ]);
    assert!(ok, "{err}");
    assert_eq!(config, b"{}");

    let dir = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:copied", dir.path().display());
    let (ok, _, err) = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-no-creds",
        &img,
        &dest,
    ]);
    assert!(ok, "{err}");
    let layer = std::fs::read(dir.path().join("blobs/sha256").join(&sha(&m)[7..])).unwrap();
    assert_eq!(layer, m, "skopeo verified and stored the module's layer");
    let blob_gets = proxy.count("GET /v2/endpoint/solo/blobs/");
    assert_eq!(blob_gets, 2, "config and layer, once each");

    // A second copy is served from the cache.
    let dir2 = tempfile::tempdir().unwrap();
    let dest2 = format!("oci:{}:again", dir2.path().display());
    let (ok, _, err) = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-no-creds",
        &img,
        &dest2,
    ]);
    assert!(ok, "{err}");
    assert_eq!(proxy.count("GET /v2/endpoint/solo/blobs/"), blob_gets);
    assert_eq!(proxy.count("GET /v2/endpoint/solo/manifests/"), 1);

    // `ls` shows what the endpoint stored; purging the repository removes it.
    let listed = cli(&e.d, &["ls", "--json"]);
    for want in ["endpoint/solo#manifests/1.0", "endpoint/solo#blobs/"] {
        assert!(listed.contains(want), "{want} in {listed}");
    }
    let source = format!("oci://{}/endpoint/solo", proxy.addr);
    cli(&e.d, &["purge", "--url", &source]);
    assert!(!cli(&e.d, &["ls", "--json"]).contains("endpoint/solo#"));

    // Pushing is refused.
    let push = format!("docker://{}/up/endpoint/solo:pushed", e.addr);
    let (ok, _, err) = skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-no-creds",
        &dest,
        &push,
    ]);
    assert!(!ok, "a push must fail");
    assert!(
        err.contains("405") || err.contains("UNSUPPORTED") || err.contains("unsupported"),
        "{err}"
    );
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        assert_eq!(
            proxy.count(&format!("{method} /v2/endpoint/solo/")),
            0,
            "{method} upstream"
        );
    }
    let resp = http()
        .post(format!(
            "http://{}/v2/up/endpoint/solo/blobs/uploads/",
            e.addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(error_code(resp).await, "UNSUPPORTED");
}

#[tokio::test]
async fn the_distribution_api_over_tcp_and_the_socket() {
    let e = endpoint("");
    let (reg, proxy) = shared();
    let p = Pusher::new(&reg.addr);
    let m = wasm_module("endpoint-api", 500);
    let (desc, layer) = push_cncf(&p, "endpoint/api", "v1", &m).await;
    let base = format!("http://{}", e.addr);

    // The version check: a Basic challenge until credentials come; an empty one is none.
    let r = get(&format!("{base}/v2/")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"wasm-cache\""
    );
    let r = http()
        .get(format!("{base}/v2/"))
        .header("authorization", "Basic Og==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http()
        .get(format!("{base}/v2/"))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );

    // The upstream's own answer, to compare with.
    let upstream = http()
        .get(format!("http://{}/v2/endpoint/api/manifests/v1", reg.addr))
        .header("accept", mt::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    let up_type = upstream.headers()["content-type"].clone();
    let up_bytes = upstream.bytes().await.unwrap();

    // A raw host:port upstream, the alias, and containerd's ?ns= form: the same bytes.
    for url in [
        format!("{base}/v2/{}/endpoint/api/manifests/v1", proxy.addr),
        format!("{base}/v2/up/endpoint/api/manifests/v1"),
        format!("{base}/v2/endpoint/api/manifests/v1?ns={}", proxy.addr),
        format!("{base}/v2/up/endpoint/api/manifests/{}", desc.digest),
    ] {
        let r = get(&url).await;
        assert_eq!(r.status(), 200, "{url}");
        assert_eq!(r.headers()["docker-content-digest"], desc.digest.as_str());
        assert_eq!(r.headers()["content-type"], up_type);
        assert_eq!(
            r.headers()["content-length"],
            up_bytes.len().to_string().as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), up_bytes, "{url}");
    }
    let r = http()
        .head(format!("{base}/v2/up/endpoint/api/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        up_bytes.len().to_string().as_str()
    );

    // The layer, with the upstream's Content-Type.
    let up_blob = get(&format!(
        "http://{}/v2/endpoint/api/blobs/{}",
        reg.addr, layer.digest
    ))
    .await;
    let up_blob_type = up_blob.headers()["content-type"].clone();
    let r = get(&format!("{base}/v2/up/endpoint/api/blobs/{}", layer.digest)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], up_blob_type);
    assert_eq!(r.headers()["docker-content-digest"], layer.digest.as_str());
    assert_eq!(r.bytes().await.unwrap(), m);

    // Errors follow the spec.
    for _ in 0..3 {
        let r = get(&format!("{base}/v2/up/endpoint/api/manifests/missing")).await;
        assert_eq!(r.status(), 404);
        assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    }
    assert_eq!(
        proxy.count("GET /v2/endpoint/api/manifests/missing"),
        1,
        "a missing tag is remembered for negative_ttl"
    );
    let r = get(&format!("{base}/v2/acme/api/manifests/v1")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    let r = get(&format!(
        "{base}/v2/up/endpoint/api/blobs/{}",
        sha(b"never referenced")
    ))
    .await;
    assert_eq!(r.status(), 404, "a blob no served manifest references");
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    for method in [
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::PATCH,
    ] {
        let r = http()
            .request(
                method.clone(),
                format!("{base}/v2/up/endpoint/api/manifests/v1"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(error_code(r).await, "UNSUPPORTED");
    }

    // The proxies' socket answers the same API (curl, a real client).
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "--unix-socket"])
        .arg(&e.d.socket)
        .arg("http://localhost/v2/up/endpoint/api/manifests/v1")
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("docker-content-digest: {}", desc.digest)),
        "{head}"
    );

    // Metrics are labelled by interface; one upstream manifest GET for all of the above.
    let (_, metrics) = e.d.get("/metrics").await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("wasm_cache_lookups_total{interface=\"registry\",result=\"hit\"}"),
        "{metrics}"
    );
    assert_eq!(proxy.count("GET /v2/endpoint/api/manifests/v1"), 1);
}

#[tokio::test]
async fn only_wasm_artifacts_unless_any_artifact() {
    let (reg, _) = shared();
    let p = Pusher::new(&reg.addr);
    let config = p
        .blob("endpoint/image", mt::OCI_CONFIG, b"{\"os\":\"linux\"}")
        .await;
    let l1 = p
        .blob("endpoint/image", mt::OCI_TGZ, &tar_gz(&[("bin/sh", b"#!")]))
        .await;
    let l2 = p
        .blob(
            "endpoint/image",
            mt::OCI_TGZ,
            &tar_gz(&[("etc/passwd", b"root")]),
        )
        .await;
    p.image(
        "endpoint/image",
        "v1",
        mt::OCI_MANIFEST,
        &config,
        &[l1.clone(), l2],
        json!({}),
    )
    .await;
    // A one-layer image without plugin.wasm looks like a compat image until its layer is read.
    let l3 = p
        .blob(
            "endpoint/image",
            mt::OCI_TGZ,
            &tar_gz(&[("app", b"not wasm")]),
        )
        .await;
    p.image(
        "endpoint/image",
        "one-layer",
        mt::OCI_MANIFEST,
        &config,
        std::slice::from_ref(&l3),
        json!({}),
    )
    .await;

    let e = endpoint("");
    let base = format!("http://{}/v2/up/endpoint/image", e.addr);
    for _ in 0..3 {
        let r = get(&format!("{base}/manifests/v1")).await;
        assert_eq!(r.status(), 403);
        assert_eq!(error_code(r).await, "DENIED");
    }
    let (_, proxy) = shared();
    assert_eq!(
        proxy.count("GET /v2/endpoint/image/manifests/v1"),
        1,
        "refused from the cache: {}",
        any_log(&e.d)
    );
    let r = get(&format!("{base}/manifests/one-layer")).await;
    assert_eq!(r.status(), 200);
    let r = get(&format!("{base}/blobs/{}", l3.digest)).await;
    assert_eq!(r.status(), 403, "a compat layer must hold plugin.wasm");
    assert_eq!(error_code(r).await, "DENIED");

    let any = endpoint("any_artifact = true");
    let base = format!("http://{}/v2/up/endpoint/image", any.addr);
    let r = get(&format!("{base}/manifests/v1")).await;
    assert_eq!(r.status(), 200);
    let r = get(&format!("{base}/blobs/{}", l1.digest)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn an_index_of_several_platforms_is_copied_whole() {
    let (reg, _) = shared();
    let p = Pusher::new(&reg.addr);
    let repo = "endpoint/multi";
    let wasm = wasm_module("endpoint-multi-wasm", 100);
    let (cncf, _) = push_cncf(&p, repo, "wasm-only", &wasm).await;
    // A compat image for linux/amd64 (one tar+gzip layer with plugin.wasm).
    let compat_module = wasm_module("endpoint-multi-compat", 100);
    let config = p
        .blob(
            repo,
            mt::OCI_CONFIG,
            b"{\"architecture\":\"amd64\",\"os\":\"linux\"}",
        )
        .await;
    let layer = p
        .blob(
            repo,
            mt::OCI_TGZ,
            &tar_gz(&[("plugin.wasm", &compat_module)]),
        )
        .await;
    let compat = p
        .image(
            repo,
            "compat-only",
            mt::OCI_MANIFEST,
            &config,
            std::slice::from_ref(&layer),
            json!({}),
        )
        .await;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_INDEX,
        "manifests": [
            {"mediaType": mt::OCI_MANIFEST, "digest": compat.digest, "size": compat.size,
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": mt::OCI_MANIFEST, "digest": cncf.digest, "size": cncf.size,
             "platform": {"architecture": "wasm", "os": "wasip1"}},
        ],
    });
    let idx = p.manifest(repo, "multi", mt::OCI_INDEX, &index).await;

    let e = endpoint("");
    let img = format!("docker://{}/up/{repo}:multi", e.addr);
    let (ok, raw, err) = skopeo(&["inspect", "--raw", "--tls-verify=false", "--no-creds", &img]);
    assert!(ok, "{err}");
    assert_eq!(sha(&raw), idx.digest);
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:multi", dir.path().display());
    let (ok, _, err) = skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--src-no-creds",
        &img,
        &dest,
    ]);
    assert!(ok, "{err}");
    for d in [
        &idx.digest,
        &cncf.digest,
        &compat.digest,
        &layer.digest,
        &sha(&wasm),
    ] {
        assert!(
            dir.path().join("blobs/sha256").join(&d[7..]).is_file(),
            "{d} copied"
        );
    }
}

#[tokio::test]
async fn oras_pulls_a_cncf_artifact() {
    let (reg, _) = shared();
    let p = Pusher::new(&reg.addr);
    let m = wasm_module("endpoint-oras", 700);
    push_cncf(&p, "endpoint/oras", "v1", &m).await;
    let e = endpoint("");
    let dir = tempfile::tempdir().unwrap();
    let script = "import sys, oras.client\n\
                  c = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)\n\
                  print(c.pull(target=sys.argv[2], outdir=sys.argv[3]))\n";
    let out = Command::new(venv_bin("python"))
        .args(["-c", script, &e.addr])
        .arg(format!("{}/up/endpoint/oras:v1", e.addr))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.path().join("filter.wasm")).unwrap(), m);
}

#[tokio::test]
async fn a_private_repository_needs_a_credential_the_registry_accepts() {
    let tokens = TokenServer::start();
    let registry = Registry::start_with(RegistryOpts {
        token_realm: Some(tokens.realm.clone()),
        ..Default::default()
    });
    let proxy = CountingProxy::start(&registry.addr);
    tokens.set_user("alice", "alice-pw", &["team/private"]);
    tokens.set_user("carol", "carol-pw", &["team/private"]);
    tokens.set_user("bob", "bob-pw", &["team/bob"]);
    let m = wasm_module("endpoint-private", 200);
    let desc = push_solo(
        &Pusher::with_token(&registry, "team/private"),
        "team/private",
        "v1",
        &m,
    )
    .await;
    let e = endpoint_with(&format!("priv = \"{}\"", proxy.addr), "");
    let img = format!("docker://{}/priv/team/private:v1", e.addr);
    let inspect = |creds: Option<&str>| {
        let mut args = vec!["inspect", "--raw", "--tls-verify=false"];
        match creds {
            Some(c) => args.extend(["--creds", c]),
            None => args.push("--no-creds"),
        }
        args.push(&img);
        skopeo(&args)
    };

    let (ok, _, err) = inspect(None);
    assert!(!ok, "anonymous must be refused");
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("401"),
        "{err}"
    );
    let (ok, _, _) = inspect(Some("bob:bob-pw"));
    assert!(!ok, "another tenant must be refused");
    let (ok, raw, err) = inspect(Some("alice:alice-pw"));
    assert!(ok, "{err}");
    assert_eq!(sha(&raw), desc.digest);
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:p", dir.path().display());
    let (ok, _, err) = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        "alice:alice-pw",
        &img,
        &dest,
    ]);
    assert!(ok, "{err}");
    let blob_gets = proxy.count("GET /v2/team/private/blobs/");

    // Cached now: still refused to those the registry refuses.
    let (ok, _, _) = inspect(None);
    assert!(!ok, "anonymous must be refused from the cache too");
    let (ok, _, _) = inspect(Some("bob:bob-pw"));
    assert!(!ok, "another tenant must be refused from the cache too");
    let r = http()
        .get(format!(
            "http://{}/v2/priv/team/private/blobs/{}",
            e.addr,
            sha(&m)
        ))
        .basic_auth("bob", Some("bob-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"wasm-cache\""
    );
    // Another tenant the registry accepts gets it from the cache (after one check).
    let dir2 = tempfile::tempdir().unwrap();
    let dest2 = format!("oci:{}:p", dir2.path().display());
    let (ok, _, err) = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        "carol:carol-pw",
        &img,
        &dest2,
    ]);
    assert!(ok, "{err}");
    assert_eq!(proxy.count("GET /v2/team/private/blobs/"), blob_gets);
    assert!(
        !e.d.log_text().contains("alice-pw"),
        "a password reached the log"
    );
}

#[tokio::test]
async fn a_hundred_clients_cause_one_upstream_request() {
    let (reg, proxy) = shared();
    let p = Pusher::new(&reg.addr);
    let m = wasm_module("endpoint-herd", 2 << 20);
    let (_, layer) = push_cncf(&p, "endpoint/herd", "v1", &m).await;
    let e = endpoint("");
    let base = format!("http://{}/v2/up/endpoint/herd", e.addr);
    let client = http();
    let manifests = futures_util::future::join_all((0..100).map(|_| {
        let c = client.clone();
        let url = format!("{base}/manifests/v1");
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    }))
    .await;
    assert!(manifests.iter().all(|s| *s == 200), "{manifests:?}");
    assert_eq!(proxy.count("GET /v2/endpoint/herd/manifests/"), 1);
    let blobs = futures_util::future::join_all((0..100).map(|_| {
        let c = client.clone();
        let url = format!("{base}/blobs/{}", layer.digest);
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), sha(&r.bytes().await.unwrap()))
        }
    }))
    .await;
    assert!(blobs.iter().all(|(s, d)| *s == 200 && *d == layer.digest));
    assert_eq!(
        proxy.count(&format!("GET /v2/endpoint/herd/blobs/{}", layer.digest)),
        1
    );

    // Concurrent skopeo clients of an uncached tag: one upstream manifest GET too.
    push_cncf(&p, "endpoint/herd", "v2", &m).await;
    let img = format!("docker://{}/up/endpoint/herd:v2", e.addr);
    let runs: Vec<_> = (0..10)
        .map(|_| {
            let img = img.clone();
            std::thread::spawn(move || {
                skopeo(&["inspect", "--raw", "--tls-verify=false", "--no-creds", &img]).0
            })
        })
        .collect();
    for r in runs {
        assert!(r.join().unwrap());
    }
    assert_eq!(proxy.count("GET /v2/endpoint/herd/manifests/v2"), 1);
}

#[tokio::test]
async fn a_tag_older_than_its_ttl_is_re_resolved_with_one_head() {
    let (reg, proxy) = shared();
    let p = Pusher::new(&reg.addr);
    let (first, _) = push_cncf(&p, "endpoint/ttl", "v1", &wasm_module("endpoint-ttl-1", 10)).await;
    // tag_ttl = 0: every request is past the TTL.
    let e = endpoint("tag_ttl = \"0s\"");
    let url = format!("http://{}/v2/up/endpoint/ttl/manifests/v1", e.addr);
    let digest = |r: &reqwest::Response| {
        r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let r = get(&url).await;
    assert_eq!(digest(&r), first.digest);
    assert_eq!(proxy.count("GET /v2/endpoint/ttl/manifests/"), 1);
    assert_eq!(proxy.count("HEAD /v2/endpoint/ttl/manifests/"), 0);
    let r = get(&url).await;
    assert_eq!(digest(&r), first.digest);
    assert_eq!(
        proxy.count("HEAD /v2/endpoint/ttl/manifests/"),
        1,
        "one HEAD"
    );
    assert_eq!(
        proxy.count("GET /v2/endpoint/ttl/manifests/"),
        1,
        "no GET when unchanged"
    );
    // The tag moves: the HEAD sees it, the new manifest is fetched by digest.
    let (second, _) = push_cncf(&p, "endpoint/ttl", "v1", &wasm_module("endpoint-ttl-2", 10)).await;
    let r = get(&url).await;
    assert_eq!(digest(&r), second.digest);
    assert_eq!(proxy.count("HEAD /v2/endpoint/ttl/manifests/"), 2);
    assert_eq!(
        proxy.count(&format!("GET /v2/endpoint/ttl/manifests/{}", second.digest)),
        1
    );

    // Within the TTL (the default 60 s): no upstream request at all.
    let fresh = endpoint("");
    let url = format!("http://{}/v2/up/endpoint/ttl/manifests/v1", fresh.addr);
    let before = proxy.repo_count("endpoint/ttl");
    assert_eq!(get(&url).await.status(), 200);
    assert_eq!(proxy.repo_count("endpoint/ttl"), before + 1);
    assert_eq!(get(&url).await.status(), 200);
    assert_eq!(proxy.repo_count("endpoint/ttl"), before + 1);
}

/// A path that names this wasm-cache as its own upstream is refused at the first hop, not
/// pulled through itself until connections and upstream slots run out.
#[tokio::test]
async fn a_path_naming_this_endpoint_as_upstream_is_a_loop() {
    let addr = format!("127.0.0.1:{}", free_port());
    let e = endpoint_with(
        &format!("up = \"{}\", me = \"{addr}\"", shared().1.addr),
        &format!("addr = \"{addr}\""),
    );
    let base = format!("http://{}", e.addr);
    let url = format!("{base}/v2/me/me/up/endpoint/loop/manifests/v1");
    let r = get(&url).await;
    assert_eq!(
        r.status(),
        502,
        "the inner hop was refused: {}",
        r.text().await.unwrap()
    );
    assert!(e.d.log_text().contains("508"), "{}", e.d.log_text());
}

#[tokio::test]
async fn tls_on_the_tcp_listener() {
    let pki = pki();
    let e = endpoint(&format!(
        "cert_file = {:?}\nkey_file = {:?}",
        pki.server_cert, pki.server_key
    ));
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca_cert).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let r = client
        .get(format!("https://{}/v2/", e.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // skopeo, trusting the test CA.
    let (reg, _) = shared();
    let desc = push_solo(
        &Pusher::new(&reg.addr),
        "endpoint/tls",
        "v1",
        &wasm_module("endpoint-tls", 10),
    )
    .await;
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(&pki.ca_cert, certs.path().join("ca.crt")).unwrap();
    let img = format!("docker://{}/up/endpoint/tls:v1", e.addr);
    let (ok, raw, err) = skopeo(&[
        "inspect",
        "--raw",
        "--no-creds",
        "--cert-dir",
        certs.path().to_str().unwrap(),
        &img,
    ]);
    assert!(ok, "{err}");
    assert_eq!(sha(&raw), desc.digest);
    // Plain HTTP to the TLS port gets nothing.
    assert!(
        http()
            .get(format!("http://{}/v2/", e.addr))
            .send()
            .await
            .is_err()
    );
}

/// A signature policy holds on the endpoint too: a signed manifest (and what an index that is
/// signed leads to) is served; an unsigned one, and its blobs, are `DENIED`.
#[tokio::test]
async fn signature_policies_hold_on_the_endpoint() {
    use crate::signatures::{keypair, payload, policy, push_signatures, sign};
    let (reg, proxy) = shared();
    let p = Pusher::new(&reg.addr);
    let repo = "endpoint/signed";
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keypair(keys.path(), "k");
    let reference = format!("{}/{repo}", proxy.addr);
    let sign_for = |digest: &str| {
        let data = payload(&reference, digest);
        let sig = sign(keys.path(), &key, &data);
        (data, sig)
    };
    let (signed, signed_layer) =
        push_cncf(&p, repo, "signed", &wasm_module("endpoint-signed", 50)).await;
    push_signatures(&p, repo, &signed.digest, &[sign_for(&signed.digest)]).await;
    let (unsigned, unsigned_layer) =
        push_cncf(&p, repo, "unsigned", &wasm_module("endpoint-unsigned", 50)).await;
    let (child, _) = push_cncf(&p, repo, "child", &wasm_module("endpoint-signed-child", 50)).await;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_INDEX,
        "manifests": [{"mediaType": mt::OCI_MANIFEST, "digest": child.digest, "size": child.size,
                       "platform": {"architecture": "wasm", "os": "wasip1"}}],
    });
    let idx = p.manifest(repo, "multi", mt::OCI_INDEX, &index).await;
    push_signatures(&p, repo, &idx.digest, &[sign_for(&idx.digest)]).await;

    let e = endpoint(&format!(
        "\n{}",
        policy(
            &format!("{}/endpoint/**", proxy.addr),
            &[&public],
            "enforce"
        )
    ));
    let base = format!("http://{}/v2/up/{repo}", e.addr);
    let r = get(&format!("{base}/manifests/signed")).await;
    assert_eq!(r.status(), 200);
    let r = get(&format!("{base}/blobs/{}", signed_layer.digest)).await;
    assert_eq!(r.status(), 200);
    let r = get(&format!("{base}/manifests/unsigned")).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "DENIED");
    assert_eq!(v["errors"][0]["detail"]["code"], "signature_invalid");
    let r = get(&format!("{base}/manifests/{}", unsigned.digest)).await;
    assert_eq!(r.status(), 403);
    let r = get(&format!("{base}/blobs/{}", unsigned_layer.digest)).await;
    // The refused manifest was not stored: its blobs are unknown here, and never fetched.
    assert_eq!(
        r.status(),
        404,
        "a blob only an unsigned manifest references"
    );
    assert_eq!(
        proxy.count(&format!("GET /v2/{repo}/blobs/{}", unsigned_layer.digest)),
        0
    );
    // The signed index's manifest inherits its check: skopeo copies the whole index.
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:multi", dir.path().display());
    let img = format!("docker://{}/up/{repo}:multi", e.addr);
    let (ok, _, err) = skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--src-no-creds",
        &img,
        &dest,
    ]);
    assert!(ok, "{err}");
    assert!(
        dir.path()
            .join("blobs/sha256")
            .join(&child.digest[7..])
            .is_file()
    );
}

/// Anonymous pulls through the endpoint use the node's registry mirrors, as module fetches
/// do: the registry itself sees nothing.
#[tokio::test]
async fn anonymous_pulls_go_through_the_nodes_mirrors() {
    let upstream = Registry::start();
    let counted = CountingProxy::start(&upstream.addr);
    let (_mirror, mirror_proxy) = pull_through(&upstream);
    let p = Pusher::new(&upstream.addr);
    let m = wasm_module("endpoint-mirrored", 300);
    let (desc, _) = push_cncf(&p, "endpoint/mirrored", "v1", &m).await;
    let e = endpoint_with(
        &format!("iso = \"{}\"", counted.addr),
        &format!(
            "\n[registries.\"{}\"]\nmirrors = [\"http://{}\"]\n",
            counted.addr, mirror_proxy.addr
        ),
    );
    let img = format!("docker://{}/iso/endpoint/mirrored:v1", e.addr);
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:m", dir.path().display());
    let (ok, _, err) = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-no-creds",
        &img,
        &dest,
    ]);
    assert!(ok, "{err}");
    assert!(
        dir.path()
            .join("blobs/sha256")
            .join(&desc.digest[7..])
            .is_file()
    );
    assert_eq!(
        counted.repo_count("endpoint/mirrored"),
        0,
        "the registry saw nothing"
    );
    assert!(
        mirror_proxy.repo_count("endpoint/mirrored") >= 3,
        "manifest and two blobs"
    );
    let (_, metrics) = e.d.get("/metrics").await;
    assert!(
        String::from_utf8_lossy(&metrics).contains("wasm_cache_mirror_served_total"),
        "mirror metric"
    );
}

/// The network guard holds for upstreams named in request paths: cloud metadata, loopback (by
/// address or by name) and the unspecified address are refused before any connection. The
/// daemon runs in an empty network namespace, so a regression could not reach anything.
#[tokio::test]
async fn upstreams_named_in_paths_pass_the_network_guard() {
    if let Err(why) = empty_netns() {
        println!("skipped: {why}");
        return;
    }
    let d = Daemon::start(DaemonOpts {
        no_loopback_allow: true,
        empty_netns: true,
        ..Default::default()
    });
    for upstream in [
        "169.254.169.254",
        "168.63.129.16",
        "127.0.0.1:5000",
        "localhost:5000",
        "0.0.0.0:5000",
    ] {
        let path = format!("/v2/{upstream}/team/f/manifests/v1");
        let (status, body) = d.get(&path).await;
        assert_eq!(
            status,
            403,
            "{upstream}: {}",
            String::from_utf8_lossy(&body)
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "DENIED", "{upstream}");
        assert_eq!(v["errors"][0]["detail"]["code"], "forbidden", "{upstream}");
        let (status, _) = d
            .get(&format!("/v2/team/f/manifests/v1?ns={upstream}"))
            .await;
        assert_eq!(status, 403, "?ns={upstream}");
    }
}

/// A node whose mirror list names this wasm-cache (containerd's hosts.toml read by both)
/// does not pull through itself: its request to itself is refused as a loop and the registry
/// serves.
#[tokio::test]
async fn listing_itself_as_a_mirror_falls_back_to_the_registry() {
    let (reg, proxy) = shared();
    let p = Pusher::new(&reg.addr);
    let m = wasm_module("endpoint-self-mirror", 40);
    let (desc, _) = push_cncf(&p, "endpoint/selfmirror", "v1", &m).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let e = endpoint_with(
        &format!("up = \"{}\"", proxy.addr),
        &format!(
            "addr = \"{addr}\"\n\n[registries.\"{}\"]\nmirrors = [\"http://{addr}\"]\n",
            proxy.addr
        ),
    );
    let r = get(&format!(
        "http://{addr}/v2/up/endpoint/selfmirror/manifests/v1"
    ))
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], desc.digest.as_str());
    assert_eq!(proxy.count("GET /v2/endpoint/selfmirror/manifests/v1"), 1);
    assert!(
        e.d.log_text().contains("mirror failed"),
        "{}",
        e.d.log_text()
    );
}
