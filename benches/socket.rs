#![allow(clippy::disallowed_methods)]
//! Throughput and latency of the daemon over its unix socket, and its memory.
//!
//! `cargo bench --bench socket` starts a release `wasm-cache serve` in a temp dir and
//! measures, with 200 concurrent clients (a node full of proxies):
//! - a cold start: 200 identical requests for one uncached module (must cause one fetch);
//! - cache hits: `POST /v1/fetch` answered from the cache (requests/s, p50/p99 latency);
//! - module downloads: `GET /v1/modules/...` of a 1 MiB module (MiB/s);
//! - the daemon's peak resident memory (VmHWM).
//!
//! Goals (checked here, not in the test suite): one upstream fetch for the cold burst, and
//! hits at p99 under 20 ms with 200 clients on a 2-core machine.

mod common;

use common::Daemon;
use std::time::{Duration, Instant};

const CLIENTS: usize = 200;
const HITS_PER_CLIENT: usize = 100;
const GETS_PER_CLIENT: usize = 5;

fn module(size: usize) -> Vec<u8> {
    wasm_cache::testkit::wasm_module("b", size)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let daemon = Daemon::start(&Daemon::binary(), |files| {
        std::fs::write(files.join("m.wasm"), module(1 << 20)).unwrap();
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = daemon.file_url("m.wasm");
    rt.block_on(async {
        let client = daemon.client.clone();
        let body = serde_json::json!({ "url": url });

        // Cold burst.
        let t = Instant::now();
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (c, b) = (client.clone(), body.clone());
                tokio::spawn(async move {
                    let r = c
                        .post("http://localhost/v1/fetch")
                        .json(&b)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.json::<serde_json::Value>().await.unwrap()
                })
            })
            .collect();
        let mut module_url = String::new();
        for t in tasks {
            module_url = t.await.unwrap()["moduleUrl"].as_str().unwrap().to_string();
        }
        let cold = t.elapsed();
        let metrics = client
            .get("http://localhost/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let fetches: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("wasm_cache_upstream_fetches_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        println!(
            "cold burst: {CLIENTS} identical requests in {cold:?}, upstream fetches: {fetches}"
        );
        assert_eq!(fetches, 1, "200 concurrent requests must cause one fetch");

        // Hits.
        let t = Instant::now();
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (c, b) = (client.clone(), body.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(HITS_PER_CLIENT);
                    for _ in 0..HITS_PER_CLIENT {
                        let s = Instant::now();
                        let r = c
                            .post("http://localhost/v1/fetch")
                            .json(&b)
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status(), 200);
                        r.bytes().await.unwrap();
                        lat.push(s.elapsed());
                    }
                    lat
                })
            })
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let elapsed = t.elapsed();
        lat.sort();
        println!(
            "hits: {} requests in {elapsed:?} = {:.0} req/s; p50 {:?}, p99 {:?}, max {:?}",
            lat.len(),
            lat.len() as f64 / elapsed.as_secs_f64(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().unwrap()
        );

        // Module downloads.
        let t = Instant::now();
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let c = client.clone();
                let u = format!("http://localhost{module_url}");
                tokio::spawn(async move {
                    let mut n = 0usize;
                    for _ in 0..GETS_PER_CLIENT {
                        n += c.get(&u).send().await.unwrap().bytes().await.unwrap().len();
                    }
                    n
                })
            })
            .collect();
        let mut bytes = 0usize;
        for t in tasks {
            bytes += t.await.unwrap();
        }
        let elapsed = t.elapsed();
        println!(
            "module GETs: {} MiB in {elapsed:?} = {:.0} MiB/s",
            bytes >> 20,
            (bytes >> 20) as f64 / elapsed.as_secs_f64()
        );
    });
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap_or_default();
    for line in status
        .lines()
        .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
    {
        println!("daemon {line}");
    }
}
