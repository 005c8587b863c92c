#![forbid(unsafe_code)]
//! wasm-cache: a node-local agent that resolves, pulls, verifies, caches and serves the Wasm
//! modules behind Istio WasmPlugin urls to proxies over a unix socket.
//!
//! One request flows top to bottom through these modules:
//!
//! - [`server`]: the proxies' socket API (axum on a unix listener); [`admin`]: the admin
//!   socket API (list, purge, stats); [`api`]: every wire type both sockets, the client and
//!   the CLI share; [`listen`]: the connection loop that bounds every connection (header
//!   and idle timeouts, a cap on open connections), with [`listen::direct`] answering fetches
//!   and module downloads on the connection itself (`sendfile` for large modules).
//! - [`registry`]: the OCI registry endpoint (the read side of the distribution API, on the
//!   proxies' socket and `[registry] addr`), backed by [`service::registry`].
//! - [`service`]: decides per request: [`service::plan`] (the index lookups behind the pull
//!   policy), [`service::access`] (callers, access proofs, module-url tokens), and one
//!   upstream operation per key through [`singleflight`].
//! - [`policy`]: the pull-policy rules as a pure function; [`prefetch`]: the modules that
//!   WasmPlugin manifests name, warmed before proxies ask.
//! - [`source`]: parsing urls and OCI references (the one Docker Hub alias list and host:port
//!   parser).
//! - [`fetch`]: the [`fetch::Upstream`] trait the service depends on, and its fetchers
//!   (`oci` with its sessions, manifests and blobs; `http`; `file`), gzip/tar unwrapping,
//!   retries; [`netguard`]: which addresses the daemon may connect to.
//! - [`verify`]: Wasm validation; [`digest`]: sha256 parsing and hashing; [`signature`]:
//!   cosign signatures checked against the keys of `[[signatures.policy]]`.
//! - [`cache`]: content-addressed blobs with crash-safe writes ([`cache::store`]), the
//!   transactional index ([`cache::index`], redb), the hot set hits are served from
//!   ([`cache::hot`]: small modules in memory, large ones as open files), and the lifecycle
//!   ([`cache::lifecycle`]: purge, expiry, LRU eviction, integrity).
//! - [`auth`]: pull secrets, node credentials ([`auth::node`]) and credential helpers,
//!   secrets that never print, credential ids and module-url tokens (HMACs under the node
//!   key).
//! - [`config`]: the TOML file parsed once into validated settings; [`metrics`]: Prometheus
//!   counters.
//! - [`daemon`]: socket binding (or systemd socket activation), startup and shutdown;
//!   [`cli`], [`client`] and [`report`]: the command line and its output.
//! - [`blocking`]: blocking work that stops when its fetch is abandoned.
//! - [`error`]: the error type and its stable wire codes; [`testkit`]: Wasm modules for the
//!   tests and benchmarks.

pub mod admin;
pub mod api;
pub mod auth;
pub mod blocking;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod error;
pub mod fetch;
pub mod listen;
pub mod metrics;
pub mod netguard;
pub mod policy;
pub mod prefetch;
#[cfg(test)]
mod properties;
pub mod registry;
pub mod report;
pub mod server;
pub mod service;
pub mod signature;
pub mod singleflight;
pub mod source;
pub mod testkit;
pub mod verify;
