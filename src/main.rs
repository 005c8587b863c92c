#![forbid(unsafe_code)]
//! The `wasm-cache` binary: parses flags and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use wasm_cache::api::{ModuleList, PurgeBody, PurgeReport, StatsReport};
use wasm_cache::cli::{AdminArgs, Cli, Command, LogFormat};
use wasm_cache::client::{self, FetchOutput};
use wasm_cache::config::Config;

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASM_CACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve { config, log_format } = &cli.command {
        let config = match Config::load(config.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("wasm-cache: {e}");
                return ExitCode::from(2);
            }
        };
        init_logs(match log_format {
            Some(LogFormat::Json) => true,
            Some(LogFormat::Text) => false,
            None => config.log_json,
        });
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = config.worker_threads {
            rt.worker_threads(n);
        }
        let rt = match rt.enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("wasm-cache: starting the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match rt.block_on(wasm_cache::daemon::serve(config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    // The commands are clients of the daemon: one thread is plenty.
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(command(cli)),
        Err(e) => {
            eprintln!("wasm-cache: starting the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a client command.
async fn command(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { .. } => unreachable!("handled in main"),
        Command::Health {
            socket,
            config,
            ready,
        } => {
            let socket = match socket {
                Some(s) => s,
                None => match Config::load(config.as_deref()) {
                    Ok(c) => c.socket,
                    Err(e) => {
                        eprintln!("wasm-cache: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            match client::health(&socket, ready).await {
                Ok(()) => {
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("unhealthy: {}", e.message);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ls { json, admin } => {
            admin_command(&admin, json, |s| async move {
                let list: ModuleList = client::admin(&s, "/v1/admin/modules", None::<&()>).await?;
                let text = wasm_cache::report::modules_table(&list.modules);
                Ok((to_json(&list), text))
            })
            .await
        }
        Command::Stats { json, admin } => {
            admin_command(&admin, json, |s| async move {
                let r: StatsReport = client::admin(&s, "/v1/admin/stats", None::<&()>).await?;
                Ok((to_json(&r), wasm_cache::report::stats_text(&r)))
            })
            .await
        }
        Command::Purge(p) => {
            let body = PurgeBody {
                all: p.all,
                url: p.url.clone(),
                digest: p.digest.clone(),
                unused_for: p.unused_for.clone(),
                dry_run: p.dry_run,
            };
            admin_command(&p.admin, p.json, |s| async move {
                let r: PurgeReport = client::admin(&s, "/v1/admin/purge", Some(&body)).await?;
                Ok((to_json(&r), wasm_cache::report::purge_summary(&r)))
            })
            .await
        }
        Command::Prefetch(args) => {
            let (socket, (items, secret)) = match usage(args.daemon.socket_path())
                .and_then(|s| Ok((s, usage(args.items())?)))
            {
                Ok(x) => x,
                Err(code) => return code,
            };
            let json = args.json;
            let report = wasm_cache::prefetch::through_socket(
                &socket,
                items,
                secret,
                args.concurrency.into(),
                |o| {
                    if !json {
                        println!("{}", o.line());
                    }
                },
            )
            .await;
            if json {
                println!("{}", to_json(&report));
            } else {
                println!("{}", report.summary());
            }
            if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Fetch(args) => {
            let (socket, body) =
                match usage(args.daemon.socket_path()).and_then(|s| Ok((s, usage(args.body())?))) {
                    Ok(x) => x,
                    Err(code) => return code,
                };
            match client::fetch(&socket, &body, args.output.as_deref()).await {
                Ok(FetchOutput::Answer(a)) => {
                    println!("{}", to_json(&a));
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

/// A usage error (bad flags, unreadable files) is printed and exits 2.
fn usage<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, ExitCode> {
    r.map_err(|e| {
        eprintln!("wasm-cache: {e}");
        ExitCode::from(2)
    })
}

/// An answer as pretty JSON (what `--json` prints).
fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Runs an admin request and prints its JSON (with `--json`) or its text.
async fn admin_command<F, Fut>(admin: &AdminArgs, json: bool, run: F) -> ExitCode
where
    F: FnOnce(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<(String, String), wasm_cache::error::Error>>,
{
    let socket = match admin.socket_path() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wasm-cache: {e}");
            return ExitCode::from(2);
        }
    };
    match run(socket).await {
        Ok((json_text, text)) => {
            if json {
                println!("{json_text}");
            } else {
                print!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {}", e.code, e.message);
            ExitCode::FAILURE
        }
    }
}
