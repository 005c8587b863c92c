//! `cargo bench --bench soak`: the daemon under hostile connection load (issue 9).
//!
//! 1. 1,000 idle connections and 200 connections dripping one header byte a second are
//!    opened; then a normal fetch and `/healthz` are timed (goal: the fetch answers within
//!    1 s, `/healthz` within 100 ms).
//! 2. 1,000 connections send 100 cache-hit fetches each (100k requests): errors (goal: 0),
//!    requests/s, and the daemon's peak and current RSS.
// A benchmark harness: writes its own fixture files.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::Daemon;

const IDLE: usize = 1000;
const DRIPPING: usize = 200;
const LOAD_CONNECTIONS: usize = 1000;
const REQUESTS_EACH: usize = 100;

fn rss(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let daemon = Daemon::start(&Daemon::binary(), |files| {
        std::fs::write(
            files.join("m.wasm"),
            wasm_cache::testkit::wasm_module("soak", 1000),
        )
        .unwrap();
    });
    let socket = daemon.socket();
    let body = wasm_cache::api::FetchBody {
        url: daemon.file_url("m.wasm"),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // 1. Idle and dripping connections.
    let idle: Vec<UnixStream> = (0..IDLE)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let mut dripping: Vec<UnixStream> = (0..DRIPPING)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dripper = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let head =
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for i in 0..head.len() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                for s in &mut dripping {
                    let _ = s.write_all(&head[i..i + 1]);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    rt.block_on(async {
        let client = daemon.client.clone();
        let mut fetch = Vec::new();
        let mut health = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let r = client
                .post("http://localhost/v1/fetch")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            fetch.push(t.elapsed());
            let t = Instant::now();
            let r = client.get("http://localhost/healthz").send().await.unwrap();
            assert_eq!(r.status(), 200);
            health.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fetch.sort();
        health.sort();
        println!(
            "with {IDLE} idle and {DRIPPING} dripping connections: fetch median {:?}, max {:?}; /healthz median {:?}, max {:?}",
            fetch[fetch.len() / 2],
            fetch[fetch.len() - 1],
            health[health.len() / 2],
            health[health.len() - 1]
        );
        assert!(fetch[fetch.len() - 1] < Duration::from_secs(1), "a fetch took over 1 s");

        // 2. The soak.
        let t = Instant::now();
        let tasks: Vec<_> = (0..LOAD_CONNECTIONS)
            .map(|_| {
                let body = serde_json::to_vec(&body).unwrap();
                let c = reqwest::Client::builder()
                    .unix_socket(socket.clone())
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap();
                tokio::spawn(async move {
                    let mut errors = 0usize;
                    for _ in 0..REQUESTS_EACH {
                        let ok = match c
                            .post("http://localhost/v1/fetch")
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await
                        {
                            Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                            Err(_) => false,
                        };
                        if !ok {
                            errors += 1;
                        }
                    }
                    errors
                })
            })
            .collect();
        let mut errors = 0;
        for task in tasks {
            errors += task.await.unwrap();
        }
        let elapsed = t.elapsed();
        let total = LOAD_CONNECTIONS * REQUESTS_EACH;
        println!(
            "soak: {total} requests over {LOAD_CONNECTIONS} connections in {elapsed:.2?} = {:.0} req/s, {errors} errors; daemon {}",
            total as f64 / elapsed.as_secs_f64(),
            rss(daemon.pid())
        );
        assert_eq!(errors, 0);
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = dripper.join();
    drop(idle);
}
