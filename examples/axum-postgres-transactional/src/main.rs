//! `axum-postgres-transactional [ADDR]`: serves the example orders API.
//!
//! `DATABASE_URL` names the PostgreSQL database (required). The listen address is the first
//! argument, else `ORDERS_ADDR`, else `127.0.0.1:3000`. `RUST_LOG` sets the log filter
//! (default `info`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum_postgres_transactional::OrdersApi;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// sysexits' EX_USAGE: the command line or environment was wrong.
const EX_USAGE: u8 = 64;

fn config() -> Result<(SocketAddr, String), String> {
    let addr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("ORDERS_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let addr = addr
        .parse()
        .map_err(|e| format!("listen address {addr:?}: {e}"))?;
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set".to_owned())?;
    Ok((addr, url))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let (addr, url) = match config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("axum-postgres-transactional: {e}");
            eprintln!("usage: DATABASE_URL=postgres://… axum-postgres-transactional [ADDR]");
            return ExitCode::from(EX_USAGE);
        }
    };
    let api = match OrdersApi::connect(&url, Duration::from_secs(30)).await {
        Ok(api) => api,
        Err(e) => {
            eprintln!("axum-postgres-transactional: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("axum-postgres-transactional: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%addr, "orders API listening");
    let shutdown = async {
        // If the signal handler cannot be installed, run until killed.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match axum::serve(listener, api.router())
        .with_graceful_shutdown(shutdown)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("axum-postgres-transactional: {e}");
            ExitCode::FAILURE
        }
    }
}
