#![allow(clippy::disallowed_methods)]
//! Integration tests: a real `docker-registry`, real HTTP servers and files, a real
//! `wasm-cache serve` process, driven over its unix socket by reqwest, curl and the CLI.

mod harness;

mod admin;
mod api;
mod auth;
mod endpoint;
mod http_file;
mod mirrors;
mod oci;
mod prefetch;
mod providers;
mod registry_access;
mod serving;
mod ship;
pub(crate) mod signatures;
