//! Black-box tests of how the real binary treats client connections: `--client-timeout` closes
//! those that hold it up (idle, a request head that trickles in, a response nobody reads) and
//! never one whose request is still in progress; `--max-connections` keeps new ones waiting in
//! the listen backlog while the limit is reached, and closes idle ones to make room; a head the
//! HTTP parser refuses is counted when its connection closes; an HTTP/2 request body the client
//! cuts short with a reset is never taken as complete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::fault::{Fault, FaultUpstream};
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

/// Everything the proxy sends until it closes the connection, as text. Panics if it stays
/// open for 5 s.
async fn answer_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("the connection is still open after 5 s"))
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The value of one series (name and labels, as printed) on the admin API's `/metrics`.
async fn metric(proxy: &Proxy, series: &str) -> u64 {
    let metrics = support::Client::new(proxy.admin()).get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// The value of `idemgate_client_connections_closed_total{reason="…"}`.
async fn closed_for(proxy: &Proxy, reason: &str) -> u64 {
    metric(
        proxy,
        &format!("idemgate_client_connections_closed_total{{reason=\"{reason}\"}}"),
    )
    .await
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

/// A keep-alive POST without a key (passed through) on a raw connection.
const PLAIN_POST: &[u8] = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";

/// The same, answered by the upstream after 3 s.
const SLOW_POST: &[u8] =
    b"POST /orders HTTP/1.1\r\nHost: x\r\nx-test-delay-ms: 3000\r\nContent-Length: 2\r\n\r\n{}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_client_waits_while_every_connection_is_busy() {
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url())
        .args(["--max-connections", "2"])
        .start()
        .await;
    // Two clients take both places with requests in progress (the upstream takes 3 s).
    let mut first = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut second = TcpStream::connect(proxy.addr()).await.unwrap();
    for stream in [&mut first, &mut second] {
        stream.write_all(SLOW_POST).await.unwrap();
    }
    while up.total() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&proxy, "idemgate_client_connections").await, 2);
    assert_eq!(metric(&proxy, "idemgate_client_connections_limit").await, 2);

    // A third connects (the kernel's backlog takes it) and sends its request: it is not
    // served while both places are busy.
    let mut third = TcpStream::connect(proxy.addr()).await.unwrap();
    third.write_all(PLAIN_POST).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(1500), third.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the third connection was served past --max-connections 2: {early:?}"
    );
    assert_eq!(up.total(), 2, "the waiting request reached the upstream");
    assert!(
        proxy.log().contains("client connection limit reached"),
        "{}",
        proxy.log()
    );

    // The requests in progress are never cut to make room: both are answered.
    for stream in [&mut first, &mut second] {
        let head = read_response(stream).await;
        assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    }
    // Then a place frees up (a client leaves), and the third is served, its request intact.
    drop(first);
    let head = read_response(&mut third).await;
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    assert_eq!(up.total(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_an_idle_connection_is_closed_to_make_room() {
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url())
        .args(["--max-connections", "2", "--client-timeout", "60s"])
        .start()
        .await;
    // Two clients are served and then sit idle on their keep-alive connections, holding both
    // places; a client timeout of 60 s would keep them for a minute.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.write_all(PLAIN_POST).await.unwrap();
        let head = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 201"), "{head}");
        idle.push(stream);
    }
    let started = Instant::now();
    let mut third = TcpStream::connect(proxy.addr()).await.unwrap();
    third.write_all(PLAIN_POST).await.unwrap();
    let head = read_response(&mut third).await;
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "served only after {:?}: no idle connection was closed for it",
        started.elapsed()
    );
    // One of the idle two was closed for it, after at least a second of idleness.
    let mut closed = 0;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 1, "neither idle connection was closed");
    assert_eq!(closed_for(&proxy, "drained").await, closed);
    assert_eq!(closed_for(&proxy, "idle").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auto_connection_limit_follows_the_open_files_limit() {
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url()).start().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let soft: u64 = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no numeric open files limit in:\n{limits}"));
    assert_eq!(
        metric(&proxy, "idemgate_client_connections_limit").await,
        (soft - 100) / 2,
        "auto: two open files per connection after a reserve of 100 ({soft} open files)"
    );
    assert!(
        proxy
            .log()
            .contains(&format!("max_connections={}", (soft - 100) / 2)),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_the_connection_limit_finishes_the_busy_request_and_exits_0() {
    let up = Upstream::start().await;
    let mut proxy = Proxy::builder(up.url())
        .args(["--max-connections", "1", "--shutdown-grace", "5s"])
        .start()
        .await;
    let mut busy = TcpStream::connect(proxy.addr()).await.unwrap();
    busy.write_all(SLOW_POST).await.unwrap();
    while up.total() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A second client waits in the backlog while the accept loop waits for a place.
    let mut waiting = TcpStream::connect(proxy.addr()).await.unwrap();
    waiting.write_all(PLAIN_POST).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    proxy.sigterm();
    // The waiting client is turned away unserved when the listener closes at SIGTERM, while
    // the busy request (2.7 s to go) is still running: the accept loop's wait for a place
    // ends with the signal.
    let (read, _) = read_until_closed(&mut waiting, Duration::from_secs(10)).await;
    assert_eq!(read, 0, "the waiting client got an answer");
    let mut probe = [0u8; 1];
    assert!(
        matches!(busy.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the waiting client was turned away only after the busy request ended"
    );
    let head = read_response(&mut busy).await;
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no exit 10 s after SIGTERM; log:\n{}", proxy.log()));
    assert_eq!(status.code(), Some(0), "log:\n{}", proxy.log());
    assert_eq!(up.total(), 1, "the waiting request reached the upstream");
}

/// A request head the HTTP parser refuses (bytes that are not HTTP, a malformed target or
/// `Content-Length`, more header lines than it takes) never reaches idemgate's service or the
/// upstream; it is answered with a problem document (not the parser's own empty answer) and
/// the connection closed, and the close is what counts it, as `malformed`. A well-formed
/// request on a connection that then goes away is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_the_parser_refuses_gets_a_problem_and_is_counted_as_malformed() {
    let up = Upstream::start().await;
    let proxy = proxy(&up).await;
    assert_eq!(closed_for(&proxy, "malformed").await, 0);

    let mut lines = String::from("GET /orders HTTP/1.1\r\nHost: a\r\n");
    for i in 0..120 {
        lines.push_str(&format!("x-h{i}: 1\r\n"));
    }
    lines.push_str("\r\n");
    let refused: [(&[u8], u16, &str); 4] = [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed-request"),
        (lines.as_bytes(), 431, "request-head-too-large"),
        (
            b"POST /or ders HTTP/1.1\r\nHost: a\r\nIdempotency-Key: \"p-1\"\r\n\r\n",
            400,
            "malformed-request",
        ),
        (
            b"POST /orders HTTP/1.1\r\nHost: a\r\nIdempotency-Key: \"p-2\"\r\nContent-Length: 2x\r\n\r\n{}",
            400,
            "malformed-request",
        ),
    ];
    for (bytes, status, slug) in refused {
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let answer = answer_until_closed(&mut stream).await;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete head: {answer}"));
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        let fields: Vec<String> = head.lines().skip(1).map(str::to_ascii_lowercase).collect();
        for field in [
            "content-type: application/problem+json",
            "connection: close",
            &format!("content-length: {}", body.len()),
        ] {
            assert!(fields.iter().any(|f| f == field), "{field}: {answer}");
        }
        let problem: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert_eq!(problem["status"], status, "{answer}");
        assert_eq!(
            problem["type"],
            format!("https://idemgate.dev/problems/{slug}"),
            "{answer}"
        );
    }
    assert_eq!(up.total(), 0, "a refused head reached the upstream");

    // After an HTTP/1.0 keep-alive request, hyper answers a bad head in HTTP/1.0.
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"GET /orders HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let head = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.0 201"), "{head}");
    stream.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let answer = answer_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.0 400 "), "{answer}");
    assert!(
        answer.contains("https://idemgate.dev/problems/malformed-request"),
        "{answer}"
    );
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"GET /orders HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let head = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(5);
    while closed_for(&proxy, "malformed").await < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The well-formed connection's close has had time to be (wrongly) counted by now too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(closed_for(&proxy, "malformed").await, 5);
}

/// An upstream's own answer that looks like the parser's (an empty 400 to a client asking to
/// close, or to an HTTP/1.0 client) reaches the client as the upstream gave it, not rewritten
/// into a problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_empty_400_is_not_taken_for_a_parser_refusal() {
    let up = FaultUpstream::start(Fault::Answer(
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
    ))
    .await;
    let proxy = Proxy::builder(up.url()).start().await;
    for request in [
        &b"GET /orders HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"[..],
        b"GET /orders HTTP/1.0\r\n\r\n",
        b"POST /orders HTTP/1.1\r\nHost: a\r\nConnection: close\r\nIdempotency-Key: \"e-1\"\r\nContent-Length: 2\r\n\r\n{}",
    ] {
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.write_all(request).await.unwrap();
        let answer = answer_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1."), "{answer}");
        assert!(answer[8..].starts_with(" 400 "), "{answer}");
        assert!(answer.ends_with("\r\n\r\n"), "a body was added: {answer}");
        assert!(!answer.contains("problem+json"), "{answer}");
    }
    assert_eq!(up.requests(), 3);
}

/// Opens an HTTP/2 (prior knowledge) stream to the proxy, sends part of a POST body, then resets
/// the stream with `NO_ERROR`, which hyper's server reads as the end of the body.
async fn reset_mid_body(proxy: &Proxy, key: Option<&str>) {
    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut request = http::Request::post(format!("http://{}/orders", proxy.addr()))
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let (response, mut body) = h2.send_request(request.body(()).unwrap(), false).unwrap();
    body.send_data(bytes::Bytes::from_static(b"{\"amount\":"), false)
        .unwrap();
    // Let the proxy read the part before the reset arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    body.send_reset(h2::Reason::NO_ERROR);
    // The connection stays open meanwhile: closed, it would fail the body with an error of its
    // own, whatever hyper makes of the reset.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answered = tokio::time::timeout(Duration::from_secs(2), response).await;
    assert!(
        !matches!(answered, Ok(Ok(_))),
        "a reset request was answered: {answered:?}"
    );
    assert!(!driver.is_finished(), "the connection closed");
    drop(h2);
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_body_the_client_resets_is_never_taken_as_complete() {
    // Protected: the truncated body must not be executed, and the key stays free.
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url())
        .args(["--lease", "1s"])
        .start()
        .await;
    reset_mid_body(&proxy, Some("h2-reset-1")).await;
    assert_eq!(
        up.executions("h2-reset-1"),
        0,
        "a truncated body was executed"
    );
    let whole = support::Client::new(proxy.addr())
        .send(support::Req::post("/orders").key("h2-reset-1"))
        .await;
    assert_eq!(whole.status, 201, "{}", whole.summary());
    assert!(!whole.replayed(), "{}", whole.summary());
    assert_eq!(up.executions("h2-reset-1"), 1);

    // Streamed through unprotected: the upstream never reads a complete request (hyper's
    // client gives the request up when the dropped service future drops it; the held-back end
    // must not undo that).
    let fault = FaultUpstream::start(Fault::Answer(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ))
    .await;
    let proxy = Proxy::builder(fault.url()).start().await;
    reset_mid_body(&proxy, None).await;
    assert_eq!(
        fault.requests(),
        0,
        "a truncated body reached the upstream whole"
    );
}
