//! Black-box tests of `--access-log`: one line per request on standard output, written once the
//! client's response has ended and the layer has said what it did, naming the record by id and
//! never by key, credentials or query string.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::Method;
use support::{Client, Proxy, Req, Upstream, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The fields of every access line the proxy printed so far, in order, its timestamp as `at`.
fn access_lines(proxy: &Proxy) -> Vec<HashMap<String, String>> {
    proxy
        .log()
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(at, rest)| at.ends_with('Z') && rest.starts_with("client="))
        .map(|(at, fields)| {
            let mut line: HashMap<String, String> = fields
                .split(' ')
                .filter_map(|field| field.split_once('='))
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect();
            line.insert("at".to_owned(), at.to_owned());
            line
        })
        .collect()
}

fn record_id(key: &str) -> String {
    support::anonymous_record_id(key)
}

async fn logging_proxy(upstream: &Upstream, extra: &[&str]) -> (Proxy, Client) {
    let proxy = Proxy::builder(upstream.url())
        .args(["--lease", "1s", "--access-log"])
        .args(extra.iter().copied())
        .start()
        .await;
    let client = Client::new(proxy.addr());
    (proxy, client)
}

/// Waits for the `n`th access line (1-based) and returns them all.
async fn wait_for_lines(proxy: &Proxy, n: usize) -> Vec<HashMap<String, String>> {
    assert!(
        eventually(Duration::from_secs(10), || access_lines(proxy).len() >= n).await,
        "expected {n} access lines; log:\n{}",
        proxy.log()
    );
    access_lines(proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_gets_one_line_saying_what_idemgate_did() {
    let up = Upstream::start().await;
    let (proxy, client) = logging_proxy(&up, &[]).await;

    let first = client
        .send(
            Req::post("/orders?card=4242424242424242")
                .key("log-1")
                .header("authorization", "Bearer secret-token-value"),
        )
        .await;
    assert_eq!(first.status, 201, "{}", first.summary());
    let replay = client.send(Req::post("/orders").key("log-2")).await;
    assert_eq!(replay.status, 201);
    let replay = client.send(Req::post("/orders").key("log-2")).await;
    assert!(replay.replayed(), "{}", replay.summary());
    let mismatch = client
        .send(Req::post("/orders").key("log-2").body("another body"))
        .await;
    assert_eq!(mismatch.status, 422, "{}", mismatch.summary());
    let get = client.send(Req::new(Method::GET, "/orders/7")).await;
    assert_eq!(get.status, 201);
    let too_long = "k".repeat(1000);
    let rejected = client.send(Req::post("/orders").key(&too_long)).await;
    assert_eq!(rejected.status, 400, "{}", rejected.summary());
    let released = client
        .send(
            Req::post("/orders")
                .key("log-3")
                .header("x-test-status", "503"),
        )
        .await;
    assert_eq!(released.status, 503, "{}", released.summary());

    let lines = wait_for_lines(&proxy, 7).await;
    assert_eq!(lines.len(), 7, "one line per request: {lines:?}");
    let expect = [
        // Scoped by its Authorization header, so not the anonymous id: checked below.
        (
            "POST",
            "/orders",
            "201",
            "executed",
            lines[0]["record_id"].clone(),
        ),
        ("POST", "/orders", "201", "executed", record_id("log-2")),
        ("POST", "/orders", "201", "replayed", record_id("log-2")),
        ("POST", "/orders", "422", "mismatch", record_id("log-2")),
        ("GET", "/orders/7", "201", "passthrough", "-".to_owned()),
        ("POST", "/orders", "400", "rejected", "-".to_owned()),
        ("POST", "/orders", "503", "released", record_id("log-3")),
    ];
    for (line, (method, path, status, outcome, id)) in lines.iter().zip(expect) {
        assert_eq!(line["method"], method, "{line:?}");
        assert_eq!(
            line["path"], path,
            "the query string is never logged: {line:?}"
        );
        assert_eq!(line["status"], status, "{line:?}");
        assert_eq!(line["outcome"], outcome, "{line:?}");
        assert_eq!(line["record_id"], id, "{line:?}");
        assert_eq!(line["response"], "complete", "{line:?}");
        assert!(line["client"].starts_with("127.0.0.1:"), "{line:?}");
        assert!(line["duration_ms"].parse::<f64>().is_ok(), "{line:?}");
        let at = line["at"].as_bytes();
        assert!(
            at.len() == 24 && at.starts_with(b"20") && at[10] == b'T' && at[19] == b'.',
            "an RFC 3339 UTC timestamp with milliseconds: {line:?}"
        );
    }
    let scoped_id = &lines[0]["record_id"];
    assert!(
        scoped_id.len() == 64 && scoped_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{scoped_id}"
    );
    assert_ne!(*scoped_id, record_id("log-1"), "scoped by its credentials");
    assert_eq!(lines[0]["body_bytes"], first.body.len().to_string());
    assert_eq!(lines[2]["body_bytes"], replay.body.len().to_string());
    let log = proxy.log();
    for secret in ["log-1", "4242424242424242", "secret-token-value", &too_long] {
        assert!(!log.contains(secret), "{secret} was logged:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_is_logged_beside_the_attempt_it_ran_into() {
    let up = Upstream::start().await;
    let (proxy, client) = logging_proxy(&up, &[]).await;
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .send(
                    Req::post("/orders")
                        .key("log-busy")
                        .header("x-test-delay-ms", "600"),
                )
                .await
        })
    };
    assert!(eventually(Duration::from_secs(5), || up.executions("log-busy") == 1).await);
    let duplicate = client.send(Req::post("/orders").key("log-busy")).await;
    assert_eq!(duplicate.status, 409, "{}", duplicate.summary());
    assert_eq!(slow.await.unwrap().status, 201);

    let lines = wait_for_lines(&proxy, 2).await;
    let outcomes: Vec<&str> = lines.iter().map(|l| l["outcome"].as_str()).collect();
    assert_eq!(outcomes, ["conflict", "executed"], "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l["record_id"] == record_id("log-busy"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_answered_at_its_deadline_is_logged_once_the_attempt_is_done() {
    let up = Upstream::start().await;
    let (proxy, client) = logging_proxy(&up, &["--upstream-timeout", "300ms"]).await;
    let started = Instant::now();
    let pending = client
        .send(
            Req::post("/orders")
                .key("log-late")
                .header("x-test-delay-ms", "1500"),
        )
        .await;
    assert_eq!(pending.status, 504, "{}", pending.summary());
    assert!(started.elapsed() < Duration::from_millis(1200));
    // The client is done; the upstream still works on the request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if started.elapsed() < Duration::from_millis(1400) {
        assert!(
            access_lines(&proxy).is_empty(),
            "logged before the outcome was known:\n{}",
            proxy.log()
        );
    }

    let lines = wait_for_lines(&proxy, 1).await;
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let line = &lines[0];
    assert_eq!(line["status"], "504", "what the client got: {line:?}");
    assert_eq!(line["outcome"], "executed", "what idemgate did: {line:?}");
    assert_eq!(line["record_id"], record_id("log-late"));
    let ms: f64 = line["duration_ms"].parse().unwrap();
    assert!(
        ms < 1200.0,
        "the duration is the client's, until its response ended: {line:?}"
    );
    let retry = client.send(Req::post("/orders").key("log-late")).await;
    assert!(retry.replayed(), "{}", retry.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_client_walked_away_from_is_logged_as_cut_off() {
    let up = Upstream::start().await;
    let (proxy, _client) = logging_proxy(&up, &[]).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(
            b"POST /orders HTTP/1.1\r\nhost: test\r\nidempotency-key: log-gone\r\n\
              x-test-body-bytes: 2000000\r\nx-test-stream: 50\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = stream.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 201"), "{:?}", &head[..n]);
    drop(stream);

    let lines = wait_for_lines(&proxy, 1).await;
    let line = &lines[0];
    assert_eq!(line["response"], "cut-off", "{line:?}");
    assert_eq!(line["outcome"], "executed", "{line:?}");
    let sent: u64 = line["body_bytes"].parse().unwrap();
    assert!(sent < 2_000_000, "{line:?}");
    assert_eq!(up.executions("log-gone"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_access_lines_without_the_flag() {
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url()).start().await;
    let client = Client::new(proxy.addr());
    let r = client.send(Req::post("/orders").key("quiet")).await;
    assert_eq!(r.status, 201);
    let r = client.send(Req::post("/orders").key("quiet")).await;
    assert!(r.replayed());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        access_lines(&proxy).is_empty(),
        "access lines without --access-log:\n{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_still_queued_at_shutdown_are_written_before_exit() {
    let up = Upstream::start().await;
    let (mut proxy, client) = logging_proxy(&up, &[]).await;
    for key in ["bye-1", "bye-2", "bye-3"] {
        let r = client.send(Req::post("/orders").key(key)).await;
        assert_eq!(r.status, 201, "{}", r.summary());
    }
    // At once: the writer flushes every 100 ms, so these lines are most likely still queued.
    proxy.sigterm();
    let status = proxy.wait_exit(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    // The child is gone; its output pipes may take a moment to be read to their end.
    let lines = wait_for_lines(&proxy, 3).await;
    let ids: Vec<&str> = lines.iter().map(|l| l["record_id"].as_str()).collect();
    assert_eq!(
        ids,
        [record_id("bye-1"), record_id("bye-2"), record_id("bye-3")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_before_the_response_head_is_logged_when_its_attempt_is_done() {
    let up = Upstream::start().await;
    let (proxy, _client) = logging_proxy(&up, &[]).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(
            b"POST /orders HTTP/1.1\r\nhost: test\r\nidempotency-key: log-early\r\n\
              x-test-delay-ms: 500\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || up.executions("log-early") == 1).await);
    drop(stream);

    let lines = wait_for_lines(&proxy, 1).await;
    let line = &lines[0];
    assert_eq!(line["response"], "unfinished", "{line:?}");
    assert_eq!(line["status"], "-", "no response head went out: {line:?}");
    assert_eq!(line["outcome"], "executed", "the attempt went on: {line:?}");
    assert_eq!(line["record_id"], record_id("log-early"));
}

/// A head over idemgate's limits (header fields too large, a target too long) is
/// refused with a problem, never reaches the upstream, and is counted and logged as rejected
/// like every other refused request; a large head under the limits goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_limits_gets_a_problem_and_is_logged() {
    use idemgate_proxy::request_head::{MAX_HEADER_BYTES, MAX_TARGET_BYTES};
    let up = Upstream::start().await;
    let (proxy, client) = logging_proxy(&up, &[]).await;

    let big_cookie = "c".repeat(MAX_HEADER_BYTES + 1);
    let r = client
        .send(
            Req::post("/orders")
                .key("head-1")
                .header("cookie", &big_cookie),
        )
        .await;
    support::assert_problem(&r, 431, "request-head-too-large");

    // Many fields that are small alone count together.
    let mut many = Req::new(Method::GET, "/orders");
    for i in 0..MAX_HEADER_BYTES / 1000 + 1 {
        many = many.header(&format!("x-h{i}"), &"v".repeat(1000));
    }
    support::assert_problem(&client.send(many).await, 431, "request-head-too-large");

    let long = format!("/orders/{}", "a".repeat(MAX_TARGET_BYTES));
    let r = client.send(Req::new(Method::GET, &long)).await;
    support::assert_problem(&r, 414, "uri-too-long");
    assert_eq!(up.total(), 0, "a refused head reached the upstream");

    // Under the limits, a large head is forwarded (and executed once, as always).
    let cookie = "c".repeat(MAX_HEADER_BYTES / 2);
    let r = client
        .send(Req::post("/orders").key("head-2").header("cookie", &cookie))
        .await;
    assert_eq!(r.status, 201, "{}", r.summary());
    assert_eq!(up.executions("head-2"), 1);

    // The same limits over HTTP/2: hyper's own limit there (16 KiB) no longer comes first.
    let h2 = Client::new_h2(proxy.addr());
    let r = h2
        .send(Req::post("/orders").key("head-3").header("cookie", &cookie))
        .await;
    assert_eq!(r.status, 201, "{}", r.summary());
    let r = h2
        .send(
            Req::post("/orders")
                .key("head-4")
                .header("cookie", &big_cookie),
        )
        .await;
    support::assert_problem(&r, 431, "request-head-too-large");
    assert_eq!(up.executions("head-4"), 0);

    let lines = wait_for_lines(&proxy, 4).await;
    let refused: Vec<(&str, &str)> = lines[..3]
        .iter()
        .map(|l| (l["status"].as_str(), l["outcome"].as_str()))
        .collect();
    assert_eq!(
        refused,
        [
            ("431", "rejected"),
            ("431", "rejected"),
            ("414", "rejected")
        ]
    );
    assert_eq!(lines[3]["outcome"], "executed");

    let metrics = Client::new(proxy.admin()).get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("idemgate_requests_total{outcome=\"rejected\"} 4")),
        "four rejected requests counted:\n{text}"
    );
}

/// A head the HTTP parser refuses is counted and logged like every other refused request,
/// though no method or path is known for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_the_parser_refuses_is_logged_and_counted_as_rejected() {
    let up = Upstream::start().await;
    let (proxy, _client) = logging_proxy(&up, &[]).await;
    let answer = support::raw_exchange(
        proxy.addr(),
        b"NOT HTTP AT ALL\r\n\r\n",
        false,
        None,
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let body_bytes = answer.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());

    let lines = wait_for_lines(&proxy, 1).await;
    let line = &lines[0];
    assert_eq!(line["method"], "-", "{line:?}");
    assert_eq!(line["path"], "-", "{line:?}");
    assert_eq!(line["status"], "400", "{line:?}");
    assert_eq!(line["outcome"], "rejected", "{line:?}");
    assert_eq!(line["record_id"], "-", "{line:?}");
    assert_eq!(line["body_bytes"], body_bytes.to_string(), "{line:?}");
    assert_eq!(
        line["client"].split(':').next(),
        Some("127.0.0.1"),
        "{line:?}"
    );

    let metrics = Client::new(proxy.admin()).get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("idemgate_requests_total{outcome=\"rejected\"} 1")),
        "one rejected request counted:\n{text}"
    );
    assert_eq!(up.total(), 0);
}
