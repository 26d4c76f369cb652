//! `axum-payments [ADDR]`: serves the example payments API.
//!
//! The listen address is the first argument, else `PAYMENTS_ADDR`, else `127.0.0.1:3000`.
//! `PAYMENTS_CHARGE_DELAY_MS` sets how long a charge takes (default 1000). `RUST_LOG` sets the
//! log filter (default `info`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum_payments::{DEFAULT_CHARGE_DELAY, PaymentsApi, serve};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// sysexits' EX_USAGE: the command line or environment was wrong.
const EX_USAGE: u8 = 64;

fn config() -> Result<(SocketAddr, Duration), String> {
    let addr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("PAYMENTS_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let addr = addr
        .parse()
        .map_err(|e| format!("listen address {addr:?}: {e}"))?;
    let delay = match std::env::var("PAYMENTS_CHARGE_DELAY_MS") {
        Ok(ms) => Duration::from_millis(
            ms.parse()
                .map_err(|e| format!("PAYMENTS_CHARGE_DELAY_MS {ms:?}: {e}"))?,
        ),
        Err(_) => DEFAULT_CHARGE_DELAY,
    };
    Ok((addr, delay))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let (addr, delay) = match config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("axum-payments: {e}");
            eprintln!("usage: axum-payments [ADDR]   (or PAYMENTS_ADDR=ADDR)");
            return ExitCode::from(EX_USAGE);
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("axum-payments: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%addr, charge_delay = ?delay, "payments API listening");
    let shutdown = async {
        // If the signal handler cannot be installed, run until killed.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("shutting down; letting in-flight payments finish");
    };
    match serve(listener, PaymentsApi::new(delay).router(), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("axum-payments: {e}");
            ExitCode::FAILURE
        }
    }
}
