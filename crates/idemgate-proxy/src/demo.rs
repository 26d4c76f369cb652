//! `idemgate demo`: a flaky mobile client retries one payment 42 times in 10 seconds, losing
//! most responses; straight to a payments API and, side by side, through idemgate in front of
//! another. Everything runs in this process on free loopback ports, with a temporary embedded
//! store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::routing::post;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::cli::DemoArgs;
use crate::config::{Inputs, load};
use crate::server::Server;

/// How long the payments API takes to charge: the flaky client gives up on some attempts
/// sooner, so their responses are lost after the charge was made.
const CHARGE_TIME: Duration = Duration::from_millis(120);

#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    created: u32,
    replays: u32,
    conflicts: u32,
    lost: u32,
    other: u32,
}

async fn start_payments() -> Result<(std::net::SocketAddr, Arc<AtomicU64>), String> {
    let charges = Arc::new(AtomicU64::new(0));
    let counter = charges.clone();
    let app = axum::Router::new().route(
        "/v1/charges",
        post(move || {
            let counter = counter.clone();
            async move {
                // The side effect happens first; the response comes later and may be lost.
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(CHARGE_TIME).await;
                (
                    http::StatusCode::CREATED,
                    [("content-type", "application/json")],
                    format!("{{\"id\":\"ch_{n}\",\"amount\":4200}}"),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, charges))
}

/// The flaky client: `attempts` tries of one payment spread over `over`; most give up before
/// the answer arrives (dropping the connection), the last few wait for it.
async fn flaky_client(target: std::net::SocketAddr, attempts: u32, over: Duration) -> Tally {
    let mut tally = Tally::default();
    let gap = over / attempts.max(1);
    let start = tokio::time::Instant::now();
    for i in 0..attempts {
        // On a fixed schedule, so the attempts span `over` however long each one waited.
        tokio::time::sleep_until(start + gap * i).await;
        let patient = i + 4 >= attempts || i % 4 == 3;
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = Request::post(format!("http://{target}/v1/charges"))
            .header("idempotency-key", "\"pay_order_42\"")
            .header("authorization", "Bearer sk_demo_alice")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                b"{\"amount\":4200,\"currency\":\"eur\"}",
            )));
        let Ok(req) = req else {
            tally.other += 1;
            continue;
        };
        let wait = if patient {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(30)
        };
        match tokio::time::timeout(wait, client.request(req)).await {
            Err(_) => tally.lost += 1,
            Ok(Err(_)) => tally.other += 1,
            Ok(Ok(resp)) => {
                let replayed = resp.headers().contains_key("idempotent-replayed");
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                match status.as_u16() {
                    201 if replayed => tally.replays += 1,
                    201 => tally.created += 1,
                    409 => tally.conflicts += 1,
                    _ => tally.other += 1,
                }
            }
        }
    }
    tally
}

/// Runs the demo and prints the table.
pub async fn run(args: DemoArgs) -> Result<(), String> {
    let over = crate::units::parse_duration(&args.over)?;
    if over > Duration::from_secs(10) {
        return Err("--over is at most 10s (the demo stays under 15 seconds)".into());
    }
    let attempts = args.attempts.clamp(1, 500);
    println!(
        "A mobile client on a bad network sends one payment {attempts} times in {} \
         (most responses are lost: the client gives up before the answer arrives).\n\
         It runs twice side by side: straight to a payments API, and through idemgate in front \
         of another one.\n",
        crate::units::format_duration(over)
    );

    let (direct_addr, direct_charges) = start_payments().await?;
    let (api_addr, proxied_charges) = start_payments().await?;
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let store = format!("file:{}", dir.path().join("idemgate.db").display());
    let inputs = Inputs {
        file: None,
        env: Default::default(),
        flags: vec![
            ("upstream", format!("http://{api_addr}")),
            ("listen", "127.0.0.1:0".into()),
            ("admin-listen", "off".into()),
            ("store", store),
            ("shutdown-grace", "2s".into()),
        ],
    };
    let loaded = load(&inputs).map_err(|e| e.to_string())?;
    let server = Server::bind(loaded.config)
        .await
        .map_err(|e| e.to_string())?;
    let proxy_addr = server.addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    // The two runs are independent (separate APIs, separate counters), so they share the clock.
    let (direct, proxied) = tokio::join!(
        flaky_client(direct_addr, attempts, over),
        flaky_client(proxy_addr, attempts, over),
    );
    // Charges still in progress when the last attempt gave up are counted too.
    tokio::time::sleep(CHARGE_TIME * 2).await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(3), serving).await;

    let row = |name: &str, charges: u64, t: Tally| {
        println!(
            "{name:<22} {charges:>8} {:>8} {:>8} {:>10} {:>6}",
            t.replays, t.conflicts, t.lost, t.created
        );
    };
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>10} {:>6}",
        "", "charges", "replays", "409s", "lost resp", "201s"
    );
    row(
        "straight to the API",
        direct_charges.load(Ordering::SeqCst),
        direct,
    );
    row(
        "through idemgate",
        proxied_charges.load(Ordering::SeqCst),
        proxied,
    );
    println!(
        "\nThrough idemgate the customer is charged once; every retry that gets an answer gets \
         the first charge's response (Idempotent-Replayed: true), or 409 while it is still in \
         progress."
    );
    Ok(())
}
