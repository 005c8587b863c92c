//! `cargo bench --bench index`: what a fetch miss costs as the cache grows.
//!
//! Starts two release `wasm-cache serve` daemons in temp dirs (or the binary named by
//! `WASM_CACHE_BENCH_BIN`, to compare with another build), fills one cache with 100 and the
//! other with 10,000 small `file://` modules, then measures batches of fetch misses on each,
//! alternating (so both see the same machine), with `CLIENTS` concurrent clients, and reports
//! the median misses/s of each and their ratio. A miss reads a file, validates it, writes the
//! blob and records it in the index; the goal is that its cost does not grow with the number
//! of entries (misses/s at 10,000 within 1.5x of misses/s at 100). Then it restarts the
//! daemon of the large cache a few times and reports the time from the process start to a
//! socket that answers `/healthz` (goal: under 100 ms) and that of the first hit after it
//! (goal: under 5 ms).
// A benchmark harness: writes its own fixture files and talks to the daemon's socket.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::Path;
use std::time::Instant;

use common::Daemon;

/// Cache sizes compared.
const SIZES: [usize; 2] = [100, 10_000];
/// Misses per batch.
const BATCH: usize = 100;
/// Batches per size, alternating between the two daemons.
const ROUNDS: usize = 7;
/// Concurrent clients.
const CLIENTS: usize = 4;
/// Restarts of the large cache's daemon.
const RESTARTS: usize = 5;

/// One daemon with its own cache and module files.
struct Bench {
    /// The daemon.
    daemon: Daemon,
    /// Next module file not fetched yet.
    next: usize,
}

impl Bench {
    fn start(bin: &Path, modules: usize) -> Bench {
        let daemon = Daemon::start(bin, |files| {
            for i in 0..modules {
                let m = wasm_cache::testkit::wasm_module(&format!("m{i}"), 64);
                std::fs::write(files.join(format!("{i}.wasm")), m).unwrap();
            }
        });
        Bench { daemon, next: 0 }
    }

    /// `n` misses; their rate.
    async fn misses(&mut self, n: usize) -> f64 {
        let t = Instant::now();
        let d = &self.daemon;
        misses(&d.client, &d.files, self.next..self.next + n).await;
        self.next += n;
        n as f64 / t.elapsed().as_secs_f64()
    }
}

fn main() {
    let bin = Daemon::binary();
    println!("binary: {}", bin.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut benches = Vec::new();
        for size in SIZES {
            let mut b = Bench::start(&bin, size + BATCH * ROUNDS);
            let t = Instant::now();
            b.misses(size).await;
            println!("filled {size} entries in {:.1?}", t.elapsed());
            benches.push(b);
        }
        let mut rates = vec![Vec::new(); SIZES.len()];
        for _ in 0..ROUNDS {
            for (i, b) in benches.iter_mut().enumerate() {
                rates[i].push(b.misses(BATCH).await);
            }
        }
        let medians: Vec<f64> = rates.iter().map(|r| common::median(r.clone())).collect();
        for (i, size) in SIZES.iter().enumerate() {
            let shown: Vec<String> = rates[i].iter().map(|r| format!("{r:.0}")).collect();
            println!(
                "misses at {size} entries: median {:.0} misses/s ({CLIENTS} clients, batches of {BATCH}: {})",
                medians[i],
                shown.join(" ")
            );
        }
        println!(
            "ratio (misses/s at {} / at {}): {:.2}",
            SIZES[1],
            SIZES[0],
            medians[1] / medians[0]
        );
        // Restarts on the large cache: time to a socket that answers, then the first hit.
        let b = benches.last_mut().unwrap();
        let url = format!("file://{}", b.daemon.files.join("0.wasm").display());
        let (mut ups, mut firsts) = (Vec::new(), Vec::new());
        for _ in 0..RESTARTS {
            ups.push(b.daemon.restart().as_secs_f64() * 1e3);
            let t = Instant::now();
            let a = common::fetch(&b.daemon.client, url.clone()).await;
            firsts.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(a.cache, wasm_cache::api::CacheStatus::Hit);
        }
        let entries = SIZES[1] + BATCH * ROUNDS;
        println!(
            "start with {entries} entries: median {:.1} ms to /healthz, first hit {:.2} ms ({RESTARTS} restarts)",
            common::median(ups),
            common::median(firsts)
        );
    });
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
                    let a = common::fetch(&c, url).await;
                    assert_eq!(a.cache, wasm_cache::api::CacheStatus::Miss);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}
