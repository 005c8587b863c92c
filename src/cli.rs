//! Command-line flags, parsed into validated settings before anything runs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::api::FetchBody;
use crate::auth::Secret;
use crate::config::{Config, ConfigError};

/// Node-local cache of Wasm modules for service-mesh proxies.
#[derive(Debug, Parser)]
#[command(name = "wasm-cache", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (embedded defaults when no config is given).
    Serve {
        /// Config file (TOML); see config/wasm-cache.toml.
        #[arg(long, env = "WASM_CACHE_CONFIG")]
        config: Option<PathBuf>,
        /// Log format (overrides `[log] format`).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Ask the daemon for a module and print its answer (or write the module with -o).
    Fetch(FetchArgs),
    /// Warm the cache: fetch the modules of urls and WasmPlugin manifests through the daemon.
    Prefetch(PrefetchArgs),
    /// Exit 0 when the daemon answers on its socket (for liveness/readiness probes).
    Health {
        /// Ask `/readyz` (not ready while `[prefetch] ready_after` warming runs).
        #[arg(long)]
        ready: bool,
        /// The daemon's socket.
        #[arg(long, conflicts_with = "config", env = "WASM_CACHE_SOCKET")]
        socket: Option<PathBuf>,
        /// Read the socket path from this config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List cached modules (admin socket).
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Where the admin socket is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove cached modules (admin socket).
    Purge(PurgeArgs),
    /// Cache entries, bytes and hit/miss counters (admin socket).
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Where the admin socket is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Log line format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// How to reach the admin socket.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The daemon's admin socket.
    #[arg(long, conflicts_with = "config", env = "WASM_CACHE_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Read the admin socket path from this config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl AdminArgs {
    /// `--admin-socket`, else the config's, else the default.
    pub fn socket_path(&self) -> Result<PathBuf, ConfigError> {
        if let Some(s) = &self.admin_socket {
            return Ok(s.clone());
        }
        Ok(Config::load(self.config.as_deref())?.admin_socket)
    }
}

/// `wasm-cache purge`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["all", "url", "digest", "unused_for"])))]
pub struct PurgeArgs {
    /// Remove every module.
    #[arg(long)]
    pub all: bool,
    /// Remove the modules this url maps to (an untagged OCI repository: all its tags).
    #[arg(long)]
    pub url: Option<String>,
    /// Remove this module (sha256:HEX; a manifest or index digest also names it).
    #[arg(long)]
    pub digest: Option<String>,
    /// Remove modules not served for this long, e.g. 7d or 12h.
    #[arg(long)]
    pub unused_for: Option<String>,
    /// Only show what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Where the admin socket is.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `wasm-cache prefetch`.
#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// Urls to warm.
    pub urls: Vec<String>,
    /// WasmPlugin manifests: multi-document YAML or JSON, `List`s included (repeatable).
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
    /// File holding the `.dockerconfigjson` payload for plugins that name an
    /// `imagePullSecret`.
    #[arg(long)]
    pub pull_secret: Option<PathBuf>,
    /// Modules fetched at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Print one JSON report instead of progress lines.
    #[arg(long)]
    pub json: bool,
    /// Where the daemon's socket is.
    #[command(flatten)]
    pub daemon: SocketArgs,
}

/// How to reach the proxies' socket.
#[derive(Debug, Args)]
pub struct SocketArgs {
    /// The daemon's socket.
    #[arg(long, conflicts_with = "config", env = "WASM_CACHE_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Read the socket path from this config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl SocketArgs {
    /// The socket to talk to: `--socket`, else the config's, else the default.
    pub fn socket_path(&self) -> Result<PathBuf, ConfigError> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        Ok(Config::load(self.config.as_deref())?.socket)
    }
}

/// The `.dockerconfigjson` payload in the file at `path`, if one is given.
fn read_pull_secret(path: Option<&std::path::Path>) -> Result<Option<Secret>, String> {
    let Some(p) = path else { return Ok(None) };
    let text = crate::config::read_capped_text(p, crate::config::MAX_SIDE_FILE)
        .map_err(|e| format!("reading pull secret {}: {e}", p.display()))?;
    Ok(Some(Secret::new(text.trim())))
}

impl PrefetchArgs {
    /// The modules to warm (urls first, then the manifests' plugins) and the pull secret.
    pub fn items(&self) -> Result<(Vec<crate::prefetch::Item>, Option<Secret>), String> {
        let mut items: Vec<_> = self
            .urls
            .iter()
            .map(|u| crate::prefetch::Item::url(u))
            .collect();
        for f in &self.files {
            items.extend(crate::prefetch::read_file(f)?);
        }
        if items.is_empty() {
            return Err("nothing to prefetch: give urls or -f manifests".into());
        }
        Ok((items, read_pull_secret(self.pull_secret.as_deref())?))
    }
}

/// `wasm-cache fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The WasmPlugin url (oci://, http(s)://, file://; no scheme means oci://).
    pub url: String,
    /// Expected sha256 (module bytes, or for OCI the manifest or index digest).
    #[arg(long)]
    pub sha256: Option<String>,
    /// IfNotPresent, Always or Never (default: Always for `latest`, else IfNotPresent).
    #[arg(long)]
    pub pull_policy: Option<String>,
    /// File holding a `.dockerconfigjson` payload (JSON or base64).
    #[arg(long)]
    pub pull_secret: Option<PathBuf>,
    /// Plugin resource asking, e.g. ns/name (drives Always).
    #[arg(long)]
    pub resource_name: Option<String>,
    /// Plugin resource version (drives Always).
    #[arg(long)]
    pub resource_version: Option<String>,
    /// Write the module to this file instead of printing the JSON answer.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Where the daemon's socket is.
    #[command(flatten)]
    pub daemon: SocketArgs,
}

impl FetchArgs {
    /// The body for `POST /v1/fetch`.
    pub fn body(&self) -> Result<FetchBody, String> {
        let pull_secret = read_pull_secret(self.pull_secret.as_deref())?;
        Ok(FetchBody {
            url: self.url.clone(),
            sha256: self.sha256.clone(),
            pull_policy: self.pull_policy.clone(),
            pull_secret,
            resource_name: self.resource_name.clone(),
            resource_version: self.resource_version.clone(),
            plugin_name: None,
        })
    }
}
