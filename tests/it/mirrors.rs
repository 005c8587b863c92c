//! Issue 11: registry mirrors, the containerd way (`[registries] config_path` with
//! `hosts.toml` files) and `[registries."host"] mirrors`, against real registries: CNCF
//! distribution in proxy mode as a pull-through mirror, a TLS mirror trusted through
//! `ca`, and a digest-only mirror.

use serde_json::json;

use crate::harness::*;

/// The sum of the `wasm_cache_mirror_served_total` samples for `mirror`.
async fn mirror_served(d: &Daemon, mirror: &str) -> u64 {
    let (_, body) = d.get("/metrics").await;
    let text = String::from_utf8_lossy(&body).into_owned();
    let needle = format!("wasm_cache_mirror_served_total{{mirror=\"{mirror}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Issue 11: with a pull-through mirror (distribution in proxy mode) listed for a registry,
/// anonymous pulls go through the mirror (which says so in the log and the metric), and
/// once the mirror has the module, pulls still succeed with the registry stopped.
#[tokio::test]
async fn issue_11_a_pull_through_mirror_serves_with_the_upstream_stopped() {
    let upstream = Registry::start();
    let m = wasm_module("mirror-pull-through", 2000);
    let manifest = push_solo(&Pusher::new(&upstream.addr), "mirror/one", "v1", &m).await;
    let (_mirror, counting) = pull_through(&upstream);
    let d = Daemon::start(DaemonOpts {
        tables: format!(
            "[registries.\"{}\"]\nmirrors = [\"http://{}\"]\n",
            upstream.addr, counting.addr
        ),
        ..Default::default()
    });
    let url = format!("oci://{}/mirror/one:v1", upstream.addr);
    let a = d.fetch_ok(json!({"url": url})).await;
    assert_eq!(a["digest"], sha(&m));
    assert_eq!(
        counting.count(&format!("GET /v2/mirror/one/blobs/{}", sha(&m))),
        1,
        "the module came through the mirror"
    );
    assert_eq!(mirror_served(&d, &counting.addr).await, 1);
    assert!(d.log_text().contains("served by a registry mirror"));

    // The registry goes away; the mirror still has it. The cache is emptied first, so the
    // module must be downloaded again.
    upstream.stop();
    d.purge_all().await;
    let pinned = format!("oci://{}/mirror/one@{}", upstream.addr, manifest.digest);
    let a = d.fetch_ok(json!({"url": pinned})).await;
    assert_eq!(
        (&a["digest"], &a["cache"]),
        (&json!(sha(&m)), &json!("miss"))
    );
    assert_eq!(
        counting.count(&format!("GET /v2/mirror/one/blobs/{}", sha(&m))),
        2
    );
    // The tag too: the mirror resolves it from what it holds (not a stale answer).
    let b = d
        .fetch_ok(json!({"url": url, "pullPolicy": "Always"}))
        .await;
    assert_eq!(b["digest"], sha(&m));
    assert_ne!(b["cache"], "stale", "{b}");
}

/// Issue 11: a mirror that is down is skipped: the registry itself serves the module, and
/// the log says the mirror failed.
#[tokio::test]
async fn issue_11_a_dead_mirror_falls_back_to_the_registry() {
    let (registry, _) = shared();
    let m = wasm_module("mirror-dead", 300);
    push_solo(&Pusher::new(&registry.addr), "mirror/dead", "v1", &m).await;
    let d = Daemon::start(DaemonOpts {
        tables: format!(
            "[registries.\"{}\"]\nmirrors = [\"http://127.0.0.1:{}\"]\n",
            registry.addr,
            free_port()
        ),
        ..Default::default()
    });
    let a = d
        .fetch_ok(json!({"url": format!("oci://{}/mirror/dead:v1", registry.addr)}))
        .await;
    assert_eq!(a["digest"], sha(&m));
    let failures = |d: &Daemon| d.log_text().matches("mirror failed").count();
    assert_eq!(failures(&d), 1, "{}", d.log_text());
    // A request with credentials for the registry never goes to a mirror: a credential is
    // sent only to the registry it was issued for.
    let secret = docker_config(&[(&registry.addr, "tenant", "tenant-pw")]);
    push_solo(&Pusher::new(&registry.addr), "mirror/dead", "v2", &m).await;
    let a = d
        .fetch_ok(
            json!({"url": format!("oci://{}/mirror/dead:v2", registry.addr), "pullSecret": secret}),
        )
        .await;
    assert_eq!(a["digest"], sha(&m));
    assert_eq!(failures(&d), 1, "a mirror was tried with credentials");
}

/// Issue 11: containerd's `hosts.toml`: a digest-only mirror (`capabilities = ["pull"]`)
/// first, then a TLS mirror trusted through `ca`. With the registry stopped, the tag is
/// resolved by the TLS mirror (never by the digest-only one), and the module is pulled by
/// digest from the digest-only mirror.
#[tokio::test]
async fn issue_11_hosts_toml_with_a_digest_only_mirror_and_a_tls_mirror() {
    let upstream = Registry::start();
    let m = wasm_module("mirror-hosts-toml", 1500);
    push_solo(&Pusher::new(&upstream.addr), "mirror/hosts", "v1", &m).await;
    let pull_only = Registry::start();
    push_solo(&Pusher::new(&pull_only.addr), "mirror/hosts", "v1", &m).await;
    let pull_only_counting = CountingProxy::start(&pull_only.addr);
    let tls_opts = RegistryOpts {
        tls: true,
        ..Default::default()
    };
    let tls = Registry::start_with(tls_opts.clone());
    push_solo(
        &Pusher::for_registry(&tls, &tls_opts),
        "mirror/hosts",
        "v1",
        &m,
    )
    .await;
    let hosts = tempfile::tempdir().unwrap();
    let dir = hosts.path().join(&upstream.addr);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{up}\"\n\
             [host.\"http://{pull}\"]\n  capabilities = [\"pull\"]\n\
             [host.\"https://{tls}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = {ca:?}\n",
            up = upstream.addr,
            pull = pull_only_counting.addr,
            tls = tls.addr,
            ca = pki().ca_cert,
        ),
    )
    .unwrap();
    let d = Daemon::start(DaemonOpts {
        // Only the plain-HTTP hosts are insecure; the TLS mirror is verified against the CA.
        secure_registries: true,
        tables: format!(
            "[registries]\nconfig_path = {:?}\n[registries.\"{}\"]\ninsecure = true\n[registries.\"{}\"]\ninsecure = true\n",
            hosts.path(),
            upstream.addr,
            pull_only_counting.addr
        ),
        ..Default::default()
    });
    upstream.stop();
    let a = d
        .fetch_ok(json!({"url": format!("oci://{}/mirror/hosts:v1", upstream.addr)}))
        .await;
    assert_eq!(a["digest"], sha(&m));
    assert_eq!(
        pull_only_counting.count("HEAD /v2/mirror/hosts/manifests/v1")
            + pull_only_counting.count("GET /v2/mirror/hosts/manifests/v1"),
        0,
        "a pull-only mirror resolved a tag"
    );
    assert_eq!(
        pull_only_counting.count(&format!("GET /v2/mirror/hosts/blobs/{}", sha(&m))),
        1
    );
    assert_eq!(mirror_served(&d, &pull_only_counting.addr).await, 1);
}
