//! `cargo bench --bench large`: the daemon's memory while it caches a 200 MiB module whose
//! content is one custom section, then one whose content is one data segment (file://
//! sources: read, hashed, validated, stored). Goal (issue 9): each raises the daemon's peak
//! RSS by less than 64 MiB.
// A benchmark harness: writes its own fixture file.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{Daemon, peak_kib};

/// Module size.
const SIZE: usize = 200 << 20;

fn main() {
    let bin = Daemon::binary();
    println!("binary: {}", bin.display());
    let daemon = Daemon::start(&bin, |files| {
        std::fs::write(
            files.join("custom.wasm"),
            wasm_cache::testkit::wasm_module("big", SIZE),
        )
        .unwrap();
        std::fs::write(
            files.join("data.wasm"),
            wasm_cache::testkit::data_module(SIZE),
        )
        .unwrap();
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut worst = 0;
    for (name, what) in [
        ("data.wasm", "data-segment"),
        ("custom.wasm", "custom-section"),
    ] {
        let before = peak_kib(daemon.pid());
        let t = std::time::Instant::now();
        rt.block_on(common::fetch(&daemon.client, daemon.file_url(name)));
        let after = peak_kib(daemon.pid());
        let rise = after.saturating_sub(before);
        worst = worst.max(rise);
        println!(
            "cached a {} MiB {what} module in {:.2?}; peak RSS {} MiB -> {} MiB (+{} MiB)",
            SIZE >> 20,
            t.elapsed(),
            before >> 10,
            after >> 10,
            rise >> 10
        );
    }
    assert!(worst < 64 << 10, "peak RSS rose by {} MiB", worst >> 10);
}
