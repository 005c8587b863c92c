#![forbid(unsafe_code)]
//! wasm-cache: a node-local agent that resolves, pulls, verifies, caches and serves the Wasm
//! modules behind Istio WasmPlugin urls to proxies over a unix socket.
//!
//! One request flows top to bottom through these modules:
//!
//! - [`server`]: the proxies' socket API (axum on a unix listener), JSON in and out, errors
//!   as codes; [`admin`]: the admin socket API (list, purge, stats).
//! - [`service`]: the one place that decides (pull policy, tenant access, singleflight).
//! - [`lifecycle`]: purges, expiry sweep, LRU eviction, blob integrity; [`metrics`]:
//!   Prometheus counters.
//! - [`policy`]: the pull-policy rules as a pure function.
//! - [`source`]: parsing urls and OCI references.
//! - [`fetch`]: the fetchers (`oci`, `http`, `file`), gzip/tar unwrapping, retries.
//! - [`netguard`]: which addresses the daemon may connect to.
//! - [`verify`]: Wasm validation; [`digest`]: sha256 parsing and hashing.
//! - [`store`]: content-addressed blobs with crash-safe writes; [`index`]: what each
//!   location resolved to, persisted.
//! - [`auth`]: pull secrets and node credentials, secrets that never print, credential ids
//!   and module-url tokens (HMACs under the node key).
//! - [`config`]: the TOML file parsed once into validated settings.
//! - [`daemon`]: socket binding (or systemd socket activation), startup and shutdown;
//!   [`cli`], [`client`] and [`report`]: the command line and its output.
//! - [`error`]: the error type and its stable wire codes.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod error;
pub mod fetch;
pub mod metrics;
pub mod netguard;
pub mod policy;
pub mod report;
pub mod server;
pub mod service;
pub mod singleflight;
pub mod source;
pub mod testkit;
pub mod verify;
