#![forbid(unsafe_code)]
//! The `wasm-cache` binary: parses flags and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use wasm_cache::cli::{Cli, Command};
use wasm_cache::client::{self, FetchOutput};
use wasm_cache::config::Config;

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASM_CACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            init_logs();
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("wasm-cache: {e}");
                    return ExitCode::from(2);
                }
            };
            match wasm_cache::daemon::serve(config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Fetch(args) => {
            let (socket, body) = match (args.socket_path(), args.body()) {
                (Ok(s), Ok(b)) => (s, b),
                (Err(e), _) => {
                    eprintln!("wasm-cache: {e}");
                    return ExitCode::from(2);
                }
                (_, Err(e)) => {
                    eprintln!("wasm-cache: {e}");
                    return ExitCode::from(2);
                }
            };
            match client::fetch(&socket, &body, args.output.as_deref()).await {
                Ok(FetchOutput::Json(v)) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(FetchOutput::Written(n)) => {
                    if let Some(out) = &args.output {
                        eprintln!("wrote {n} bytes to {}", out.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}: {}", e.code, e.message);
                    ExitCode::FAILURE
                }
            }
        }
    }
}
