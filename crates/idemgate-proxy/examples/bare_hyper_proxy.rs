//! The floor under `idemgate serve`: a reverse proxy made of nothing but hyper's HTTP/1 server
//! and client connections, laid out like idemgate's workers (one single-threaded runtime per
//! CPU) and with the same allocator. No idempotency, no header rewriting, no timeouts, no
//! metrics, not even a pool: each client connection forwards over one upstream connection of
//! its own, opened on its first request. `scripts/bench-proxy` measures it beside nginx (row
//! "bare hyper proxy") to show what the HTTP stack alone costs before idemgate adds anything.
//!
//! ```sh
//! cargo run --release -p idemgate-proxy --example bare_hyper_proxy -- 127.0.0.1:9000 127.0.0.1:9001
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type ProxyBody = Either<Incoming, Empty<Bytes>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream] = &args[..] else {
        usage("expected two arguments")
    };
    let (Ok(listen), Ok(upstream)) = (listen.parse::<SocketAddr>(), upstream.parse::<SocketAddr>())
    else {
        usage("LISTEN and UPSTREAM are addresses like 127.0.0.1:9000")
    };
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let threads: Vec<_> = (0..workers)
        .map(|_| std::thread::spawn(move || worker(listen, upstream)))
        .collect();
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("bare_hyper_proxy: {e}");
                std::process::exit(1);
            }
            Err(_) => std::process::exit(1),
        }
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("bare_hyper_proxy: {problem}\nusage: bare_hyper_proxy LISTEN UPSTREAM");
    std::process::exit(64)
}

/// One thread: its own runtime and its own listening socket on the shared port
/// (`SO_REUSEPORT` spreads the connections over the threads).
fn worker(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let socket = match listen {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(listen)?;
        let listener = socket.listen(1024)?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                // hyper's server answers one request at a time per connection, so the slot is
                // never contended and the sender is idle again by the next request.
                let slot = Arc::new(Mutex::new(None::<SendRequest<Incoming>>));
                let service = hyper::service::service_fn(move |request| {
                    forward(upstream, slot.clone(), request)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn forward(
    upstream: SocketAddr,
    slot: Arc<Mutex<Option<SendRequest<Incoming>>>>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let kept = slot.lock().ok().and_then(|mut s| s.take());
    let sender = match kept {
        Some(sender) if !sender.is_closed() => Some(sender),
        _ => connect(upstream).await,
    };
    let Some(mut sender) = sender else {
        return Ok(bad_gateway());
    };
    if sender.ready().await.is_err() {
        return Ok(bad_gateway());
    }
    let response = sender.send_request(request).await;
    if let Ok(mut s) = slot.lock() {
        *s = Some(sender);
    }
    Ok(match response {
        Ok(response) => response.map(Either::Left),
        Err(_) => bad_gateway(),
    })
}

async fn connect(upstream: SocketAddr) -> Option<SendRequest<Incoming>> {
    let stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

fn bad_gateway() -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
