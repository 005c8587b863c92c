//! `cargo bench --bench index`: what a fetch miss costs as the cache grows.
//!
//! Starts a release `wasm-cache serve` in a temp dir (or the binary named by
//! `WASM_CACHE_BENCH_BIN`, to compare with another build in the same run), fills its cache
//! with small `file://` modules, and measures fetch misses per second at each size in
//! `SIZES` with `CLIENTS` concurrent clients. A miss reads a file, validates it, writes the
//! blob and records it in the index; the goal is that its cost does not grow with the
//! number of entries (misses/s at 10,000 within 1.5x of misses/s at 100).
// A benchmark harness: writes its own fixture files and talks to the daemon's socket.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Cache sizes at which misses are measured.
const SIZES: [usize; 2] = [100, 10_000];
/// Misses measured at each size.
const MEASURED: usize = 400;
/// Concurrent clients.
const CLIENTS: usize = 4;

fn main() {
    let bin = std::env::var_os("WASM_CACHE_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wasm-cache")));
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let total = SIZES[SIZES.len() - 1] + MEASURED * SIZES.len();
    for i in 0..total {
        let m = wasm_cache::testkit::wasm_module(&format!("m{i}"), 64);
        std::fs::write(files.join(format!("{i}.wasm")), m).unwrap();
    }
    let socket = dir.path().join("s.sock");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {socket:?}\nadmin_socket = {:?}\ncache_dir = {:?}\n[file]\nallowed_roots = [{files:?}]\n",
            dir.path().join("a.sock"),
            dir.path().join("cache")
        ),
    )
    .unwrap();
    let mut daemon = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("WASM_CACHE_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("binary: {}", bin.display());
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .unix_socket(socket.clone())
            .build()
            .unwrap();
        let mut next = 0;
        let mut entries = 0;
        for size in SIZES {
            // Fill up to `size` entries (not timed), then time MEASURED misses.
            misses(&client, &files, next..next + (size - entries)).await;
            next += size - entries;
            let t = Instant::now();
            misses(&client, &files, next..next + MEASURED).await;
            let elapsed = t.elapsed();
            next += MEASURED;
            entries = size + MEASURED;
            println!(
                "misses at {size} entries: {MEASURED} in {elapsed:.2?} = {:.0} misses/s ({CLIENTS} clients)",
                MEASURED as f64 / elapsed.as_secs_f64()
            );
        }
    });
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
}

/// Fetches modules `range` (each a miss) with `CLIENTS` clients.
async fn misses(client: &reqwest::Client, files: &Path, range: std::ops::Range<usize>) {
    let ids: Vec<usize> = range.collect();
    let chunks: Vec<Vec<usize>> = ids
        .chunks(ids.len().div_ceil(CLIENTS).max(1))
        .map(<[usize]>::to_vec)
        .collect();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let c = client.clone();
            let files = files.to_path_buf();
            tokio::spawn(async move {
                for i in chunk {
                    let url = format!("file://{}", files.join(format!("{i}.wasm")).display());
                    let body = wasm_cache::api::FetchBody {
                        url,
                        ..Default::default()
                    };
                    let r = c
                        .post("http://localhost/v1/fetch")
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
                    let a: wasm_cache::api::FetchResponse = r.json().await.unwrap();
                    assert_eq!(a.cache, wasm_cache::api::CacheStatus::Miss);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}
