//! Command-line flags, parsed into validated settings before anything runs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    },
    /// Ask the daemon for a module and print its answer (or write the module with -o).
    Fetch(FetchArgs),
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
    /// The daemon's socket.
    #[arg(long, conflicts_with = "config", env = "WASM_CACHE_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Read the socket path from this config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl FetchArgs {
    /// The socket to talk to: `--socket`, else the config's, else the default.
    pub fn socket_path(&self) -> Result<PathBuf, ConfigError> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        Ok(Config::load(self.config.as_deref())?.socket)
    }

    /// The JSON body for `POST /v1/fetch`.
    pub fn body(&self) -> Result<serde_json::Value, String> {
        let mut body = serde_json::json!({ "url": self.url });
        let obj = body.as_object_mut().expect("object");
        let mut set = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                obj.insert(k.to_string(), serde_json::Value::String(v.clone()));
            }
        };
        set("sha256", &self.sha256);
        set("pullPolicy", &self.pull_policy);
        set("resourceName", &self.resource_name);
        set("resourceVersion", &self.resource_version);
        if let Some(p) = &self.pull_secret {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("reading pull secret {}: {e}", p.display()))?;
            obj.insert(
                "pullSecret".into(),
                serde_json::Value::String(text.trim().to_string()),
            );
        }
        Ok(body)
    }
}
