//! Black-box tests of `--client-timeout`: the real binary closes client connections that hold it
//! up (idle, a request head that trickles in, a response nobody reads) and never one whose
//! request is still in progress.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::{Proxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(1);

async fn proxy(up: &Upstream) -> Proxy {
    Proxy::builder(up.url())
        .args(["--lease", "1s", "--client-timeout", "1s"])
        .start()
        .await
}

/// Reads until the peer closes the connection (EOF or reset); returns the bytes read and when
/// it closed. Panics if it stays open for `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (usize, Instant) {
    let mut total = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (total, Instant::now()),
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the connection is still open after {within:?}"),
        }
    }
}

/// The value of `idemgate_client_connections_closed_total{reason="…"}` on the admin API.
async fn closed_for(proxy: &Proxy, reason: &str) -> u64 {
    let metrics = support::Client::new(proxy.admin()).get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let series = format!("idemgate_client_connections_closed_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// Reads one response with a `Content-Length` body; returns its head.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("a Content-Length");
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "closed inside the body: {head}");
                buf.extend_from_slice(&chunk[..n]);
            }
            return head;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
            .await
            .expect("a response within 30 s")
            .expect("read head");
        assert!(n > 0, "closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_timeout() {
    let up = Upstream::start().await;
    let proxy = proxy(&up).await;
    let opened = Instant::now();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let (read, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(read, 0, "an idle close sends nothing");
    let open_for = closed - opened;
    assert!(open_for >= TIMEOUT, "closed after only {open_for:?}");
    assert_eq!(closed_for(&proxy, "idle").await, 1);
    assert_eq!(closed_for(&proxy, "write_stalled").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_trickles_in_is_cut_off_and_never_forwarded() {
    let up = Upstream::start().await;
    let proxy = proxy(&up).await;
    let opened = Instant::now();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"POST /orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: trickle-1\r\n")
        .await
        .unwrap();
    // A header line every 200 ms keeps bytes moving: the head as a whole must still arrive
    // within the timeout.
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if stream.write_all(b"X-Pad: y\r\n").await.is_err() {
            break Instant::now();
        }
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Instant::now(),
            Ok(Ok(_)) => panic!("the proxy answered a request whose head never ended"),
            Err(_) => {}
        }
        assert!(
            opened.elapsed() < Duration::from_secs(10),
            "the trickling head kept the connection open for 10 s"
        );
    };
    assert!(
        closed - opened >= TIMEOUT,
        "closed after only {:?}",
        closed - opened
    );
    assert_eq!(
        up.total(),
        0,
        "nothing of the cut-off request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_timeout_is_answered_then_the_idle_connection_closes() {
    let up = Upstream::start().await;
    let proxy = proxy(&up).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    // The upstream takes 2.5 timeouts: the request is in progress all along.
    stream
        .write_all(
            b"POST /orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: long-1\r\n\
              x-test-delay-ms: 2500\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
    let head = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    let answered = Instant::now();
    // Kept alive: a second request on the same connection is served.
    stream
        .write_all(
            b"POST /orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: long-1\r\n\
              Content-Length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
    let head = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "{head}"
    );
    let replayed = Instant::now();
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        closed - replayed >= TIMEOUT,
        "idle for only {:?} before the close",
        closed - replayed
    );
    assert!(
        replayed - answered < TIMEOUT,
        "setup took too long to mean anything"
    );
    assert_eq!(up.executions("long-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_response_is_disconnected() {
    let up = Upstream::start().await;
    let proxy = proxy(&up).await;
    // A small receive window, so the proxy's writes block soon instead of filling a large
    // client buffer.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(proxy.addr()).await.unwrap();
    const BODY: usize = 32 * 1024 * 1024;
    stream
        .write_all(
            format!("GET /big HTTP/1.1\r\nHost: x\r\nx-test-body-bytes: {BODY}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut first))
        .await
        .expect("the response starts")
        .unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 201"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    // Read nothing for three timeouts, then take what the kernel buffered: the body is cut
    // short, because the proxy gave up on the stalled write and closed.
    tokio::time::sleep(3 * TIMEOUT).await;
    let (rest, _) = read_until_closed(&mut stream, Duration::from_secs(30)).await;
    assert!(
        n + rest < BODY,
        "the whole {BODY}-byte body arrived ({}), so no write ever stalled",
        n + rest
    );
    assert_eq!(closed_for(&proxy, "write_stalled").await, 1);
    // The proxy is still fine for everyone else.
    let client = support::Client::new(proxy.addr());
    let r = client
        .send(support::Req::post("/orders").key("after-stall"))
        .await;
    assert_eq!(r.status, 201, "{}", r.summary());
}

#[test]
fn a_client_timeout_below_100ms_is_a_configuration_error() {
    let run = support::run_idemgate(
        &[
            "check-config",
            "--upstream",
            "http://127.0.0.1:9",
            "--client-timeout",
            "10ms",
        ],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(64), "{}", run.stderr);
    assert!(
        run.stderr.contains("client-timeout 10ms is too short"),
        "{}",
        run.stderr
    );
}
