//! The `idemgate` binary: parses the command line, starts the runtime, delegates.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use idemgate_proxy::EX_USAGE;
use idemgate_proxy::cli::{Cli, Command, Settings};
use idemgate_proxy::config::{Inputs, Loaded, load};
use idemgate_proxy::server::{Server, StartError, termination};

/// glibc malloc grows and trims its per-thread heaps under a proxy's allocation pattern (hyper
/// allocates a fresh read buffer per message) and spent about a fifth of each request's CPU on
/// it (sysmalloc, mprotect, page faults); mimalloc's thread-local free lists do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IDEMGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn load_settings(settings: &Settings) -> Result<Loaded, String> {
    let inputs = Inputs::from_process(settings.config.as_deref(), settings.flags())
        .map_err(|e| e.to_string())?;
    let loaded = load(&inputs).map_err(|e| e.to_string())?;
    idemgate_proxy::store::available(&loaded.config.store)?;
    Ok(loaded)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return exit(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("idemgate: cannot start the runtime: {e}");
            return exit(1);
        }
    };
    match cli.command {
        Command::CheckConfig(settings) => match load_settings(&settings) {
            Ok(loaded) => {
                print!("{}", loaded.config.to_toml());
                for w in &loaded.warnings {
                    eprintln!("warning: {w}");
                }
                eprintln!("configuration OK");
                exit(0)
            }
            Err(e) => {
                eprintln!("idemgate: configuration error:\n{e}");
                exit(EX_USAGE)
            }
        },
        Command::Serve(settings) => {
            init_logs();
            idemgate_proxy::server::raise_open_files_limit();
            let loaded = match load_settings(&settings) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("idemgate: configuration error:\n{e}");
                    return exit(EX_USAGE);
                }
            };
            runtime.block_on(async move {
                let server = match Server::bind(loaded.config).await {
                    Ok(s) => s,
                    Err(StartError::Config(e)) => {
                        eprintln!("idemgate: configuration error:\n{e}");
                        return exit(EX_USAGE);
                    }
                    Err(StartError::Runtime(e)) => {
                        tracing::error!("cannot start: {e}");
                        return exit(1);
                    }
                };
                server.log_startup(&loaded.warnings);
                match server.run(termination()).await {
                    Ok(()) => exit(0),
                    Err(e) => {
                        tracing::error!("{e}");
                        exit(1)
                    }
                }
            })
        }
        Command::Keys(args) => runtime.block_on(async move {
            match idemgate_proxy::keys::run(args).await {
                Ok(code) => exit(code),
                Err(e) => {
                    eprintln!("idemgate keys: {e}");
                    exit(1)
                }
            }
        }),
        Command::Demo(args) => runtime.block_on(async move {
            match idemgate_proxy::demo::run(args).await {
                Ok(()) => exit(0),
                Err(e) => {
                    eprintln!("idemgate demo: {e}");
                    exit(1)
                }
            }
        }),
    }
}
