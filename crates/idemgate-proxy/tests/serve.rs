//! Black-box tests of `idemgate serve` (SPEC §1, §3, §6, §7, §8): the real binary in front of
//! a real upstream, driven over loopback HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use http::Method;
use support::{
    Client, Fault, FaultUpstream, Proxy, Req, Upstream, assert_problem, closed_port, eventually,
    raw_exchange,
};

/// Flags every test uses: a short lease so nothing waits long on one.
const BASE: &[&str] = &["--lease", "1s"];

async fn proxy_for(upstream: &str, extra: &[&str]) -> (Proxy, Client) {
    let proxy = Proxy::builder(upstream)
        .args(BASE.iter().copied())
        .args(extra.iter().copied())
        .start()
        .await;
    let client = Client::new(proxy.addr());
    (proxy, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_request_is_replayed_with_replayed_header() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;

    let first = client.send(Req::post("/orders").key("replay-1")).await;
    assert_eq!(first.status, 201, "{}", first.summary());
    assert!(!first.replayed(), "a first execution is not a replay");
    assert_eq!(first.json()["execution"], 1);

    let retry = client.send(Req::post("/orders").key("replay-1")).await;
    assert_eq!(retry.status, 201, "{}", retry.summary());
    assert!(
        retry.replayed(),
        "retry lacks Idempotent-Replayed: true: {}",
        retry.summary()
    );
    assert_eq!(retry.body, first.body, "replayed body differs");
    assert_eq!(
        retry.header("x-upstream-serial"),
        first.header("x-upstream-serial")
    );
    assert_eq!(retry.header("content-type"), first.header("content-type"));
    assert_eq!(up.executions("replay-1"), 1);

    // The sf-string spelling of the same characters is the same key.
    let quoted = client.send(Req::post("/orders").key("\"replay-1\"")).await;
    assert!(quoted.replayed(), "{}", quoted.summary());
    assert_eq!(quoted.body, first.body);
    assert_eq!(up.executions("replay-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprotected_requests_pass_through() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;

    // GET is not protected: the key is ignored and every request executes.
    for _ in 0..2 {
        let r = client
            .send(Req::new(Method::GET, "/orders").key("get-key"))
            .await;
        assert_eq!(r.status, 201, "{}", r.summary());
        assert!(!r.replayed());
    }
    assert_eq!(up.executions("get-key"), 2);

    // POST without a key passes through unprotected when keys are not required.
    let before = up.total();
    for _ in 0..2 {
        let r = client.send(Req::post("/orders")).await;
        assert_eq!(r.status, 201, "{}", r.summary());
        assert!(!r.replayed());
    }
    assert_eq!(up.total(), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_statuses_re_execute_and_others_are_stored() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;

    for (i, status) in ["408", "425", "429", "503"].into_iter().enumerate() {
        let key = format!("release-{i}");
        let r = client
            .send(
                Req::post("/orders")
                    .key(&key)
                    .header("x-test-status", status),
            )
            .await;
        assert_eq!(r.status.to_string(), status, "{}", r.summary());
        // The same request again (the steering header is not part of the fingerprint).
        let again = client.send(Req::post("/orders").key(&key)).await;
        assert_eq!(again.status, 201, "after {status}: {}", again.summary());
        assert!(!again.replayed(), "after {status} the key must be released");
        assert_eq!(up.executions(&key), 2, "after {status}");
        let third = client.send(Req::post("/orders").key(&key)).await;
        assert!(third.replayed(), "{}", third.summary());
        assert_eq!(third.body, again.body);
        assert_eq!(up.executions(&key), 2);
    }

    // A 500 is an outcome like any other: stored and replayed, never re-executed.
    let r = client
        .send(
            Req::post("/orders")
                .key("stored-500")
                .header("x-test-status", "500"),
        )
        .await;
    assert_eq!(r.status, 500);
    let again = client.send(Req::post("/orders").key("stored-500")).await;
    assert_eq!(again.status, 500, "{}", again.summary());
    assert!(again.replayed());
    assert_eq!(again.body, r.body);
    assert_eq!(up.executions("stored-500"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_is_unreachable_and_the_retry_executes() {
    let port = closed_port();
    let (_proxy, client) = proxy_for(&format!("http://{port}"), &[]).await;

    let r = client.send(Req::post("/orders").key("refused-1")).await;
    assert_problem(&r, 502, "upstream-unreachable");

    // The upstream comes up on the same port: the retry is a fresh execution.
    let up = Upstream::start_on(port).await.expect("rebind the port");
    let retry = client.send(Req::post("/orders").key("refused-1")).await;
    assert_eq!(retry.status, 201, "{}", retry.summary());
    assert!(!retry.replayed());
    assert_eq!(up.executions("refused-1"), 1);
}

async fn ambiguous_failure_is_stored_as_outcome_unknown(fault: Fault) {
    let up = FaultUpstream::start(fault).await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;

    let first = client.send(Req::post("/orders").key("ambiguous-1")).await;
    assert_problem(&first, 502, "outcome-unknown");
    let connections = up.connections();
    let requests = up.requests();
    assert!(connections >= 1);

    let retry = client
        .send_until_settled(
            Req::post("/orders").key("ambiguous-1"),
            Duration::from_secs(3),
        )
        .await;
    assert_problem(&retry, 502, "outcome-unknown");
    assert!(retry.replayed(), "{}", retry.summary());
    assert_eq!(
        (up.connections(), up.requests()),
        (connections, requests),
        "the retry reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_before_reading_is_outcome_unknown() {
    ambiguous_failure_is_stored_as_outcome_unknown(Fault::CloseOnAccept).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_after_reading_is_outcome_unknown() {
    ambiguous_failure_is_stored_as_outcome_unknown(Fault::CloseAfterRequest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_release_lets_the_retry_execute() {
    let up = FaultUpstream::start(Fault::CloseAfterRequest).await;
    let (_proxy, client) = proxy_for(&up.url(), &["--ambiguous", "release"]).await;
    let first = client.send(Req::post("/orders").key("amb-release")).await;
    assert_eq!(first.status, 502, "{}", first.summary());
    let retry = client
        .send_until_settled(
            Req::post("/orders").key("amb-release"),
            Duration::from_secs(3),
        )
        .await;
    assert_eq!(retry.status, 502, "{}", retry.summary());
    assert!(
        !retry.replayed(),
        "ambiguous=release must not store: {}",
        retry.summary()
    );
    assert_eq!(up.requests(), 2, "the retry must reach the upstream again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_reset_mid_body_is_response_incomplete() {
    let up = FaultUpstream::start(Fault::HeadThenReset).await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;

    let first = client.send(Req::post("/orders").key("reset-1")).await;
    // The head was streamed to the first client; its body must not end as if complete.
    if first.status == 200 {
        assert!(
            first.body_error.is_some() && first.body.len() < 1000,
            "a truncated body reached the client as complete: {}",
            first.summary()
        );
    } else {
        assert_eq!(first.status, 502, "{}", first.summary());
    }

    let retry = client
        .send_until_settled(Req::post("/orders").key("reset-1"), Duration::from_secs(3))
        .await;
    assert_problem(&retry, 502, "response-incomplete");
    assert_eq!(retry.json()["original_status"], 200, "{}", retry.summary());
    assert!(retry.replayed());
    assert_eq!(up.requests(), 1, "the retry reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_framed_by_both_chunking_and_a_length_reaches_the_client_whole() {
    // RFC 9112 §6.3: the chunking frames this body (11 bytes); the stale `Content-Length: 3`
    // must not be passed on, or the first client gets 3 bytes while retries get 11.
    let up = FaultUpstream::start(Fault::Answer(
        b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\
          content-length: 3\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    ))
    .await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;

    let first = client.send(Req::post("/orders").key("te-cl-1")).await;
    assert_eq!(first.status, 201, "{}", first.summary());
    assert_eq!(&first.body[..], b"hello world", "{}", first.summary());
    assert!(first.body_error.is_none(), "{}", first.summary());
    assert_ne!(
        first.header("content-length"),
        Some("3"),
        "{}",
        first.summary()
    );

    let retry = client.send(Req::post("/orders").key("te-cl-1")).await;
    assert!(retry.replayed(), "{}", retry.summary());
    assert_eq!(retry.body, first.body);
    assert_eq!(up.requests(), 1);

    // Streamed through unprotected, the same.
    let passed = client.get("/orders").await;
    assert_eq!(passed.status, 201, "{}", passed.summary());
    assert_eq!(&passed.body[..], b"hello world", "{}", passed.summary());
    assert!(passed.body_error.is_none(), "{}", passed.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_answer_after_client_deadline_is_stored_for_the_retry() {
    let up = FaultUpstream::start(Fault::AnswerAfter(Duration::from_millis(1500))).await;
    let (_proxy, client) = proxy_for(
        &up.url(),
        &[
            "--upstream-timeout",
            "400ms",
            "--upstream-hard-timeout",
            "6s",
        ],
    )
    .await;

    let started = Instant::now();
    let first = client.send(Req::post("/orders").key("late-1")).await;
    let took = started.elapsed();
    assert_problem(&first, 504, "outcome-pending");
    assert!(
        took < Duration::from_millis(1400),
        "504 came after {took:?}"
    );

    let retry = client
        .send_until_settled(Req::post("/orders").key("late-1"), Duration::from_secs(5))
        .await;
    assert_eq!(retry.status, 200, "{}", retry.summary());
    assert_eq!(&retry.body[..], br#"{"late":true}"#);
    assert!(retry.replayed());
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_by_the_hard_timeout_is_outcome_unknown() {
    let up = FaultUpstream::start(Fault::AnswerAfter(Duration::from_secs(4))).await;
    let (_proxy, client) = proxy_for(
        &up.url(),
        &[
            "--upstream-timeout",
            "300ms",
            "--upstream-hard-timeout",
            "900ms",
        ],
    )
    .await;

    let first = client.send(Req::post("/orders").key("hard-1")).await;
    assert_problem(&first, 504, "outcome-pending");
    let retry = client
        .send_until_settled(Req::post("/orders").key("hard-1"), Duration::from_secs(3))
        .await;
    assert!(
        retry.status == 502 || retry.status == 504,
        "{}",
        retry.summary()
    );
    assert_eq!(
        retry.problem().as_deref(),
        Some("outcome-unknown"),
        "{}",
        retry.summary()
    );
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_over_the_limit_is_413_before_the_body_is_read() {
    let up = Upstream::start().await;
    let (proxy, client) = proxy_for(&up.url(), &["--max-request-body", "1KiB"]).await;

    // Only the head is sent; the answer must not wait for 5 MB nor send 100 Continue first.
    let head = "POST /orders HTTP/1.1\r\nhost: localhost\r\nidempotency-key: big-1\r\n\
                content-type: application/json\r\nexpect: 100-continue\r\n\
                content-length: 5000000\r\n\r\n";
    let answer = raw_exchange(
        proxy.addr(),
        head.as_bytes(),
        false,
        Some("request-too-large"),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "expected 413 before the body, got: {answer:?}"
    );
    assert!(answer.contains("request-too-large"), "{answer:?}");

    let r = client
        .send(Req::post("/orders").key("big-2").body(vec![b'x'; 2048]))
        .await;
    assert_problem(&r, 413, "request-too-large");
    let ok = client
        .send(Req::post("/orders").key("big-3").body(vec![b'x'; 1000]))
        .await;
    assert_eq!(ok.status, 201, "{}", ok.summary());
    assert_eq!(up.executions("big-1") + up.executions("big-2"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_are_400_before_anything_runs() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;

    for bad in ["\"unterminated", "a,b", "\"\""] {
        let r = client.send(Req::post("/orders").key(bad)).await;
        assert_eq!(r.status, 400, "key {bad:?}: {}", r.summary());
        let slug = r.problem().unwrap_or_default();
        assert!(
            slug == "key-malformed" || slug == "key-length",
            "key {bad:?}: {}",
            r.summary()
        );
    }
    let long = "k".repeat(256);
    let r = client.send(Req::post("/orders").key(&long)).await;
    assert_problem(&r, 400, "key-length");

    let r = client
        .send(Req::post("/orders").key("twice-1").key("twice-1"))
        .await;
    assert_problem(&r, 400, "key-repeated");
    let r = client
        .send(Req::post("/orders").key("twice-2").key("twice-3"))
        .await;
    assert_problem(&r, 400, "key-repeated");
    assert_eq!(up.total(), 0, "an invalid request reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_key_rejects_a_missing_key() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &["--require-key"]).await;
    let r = client.send(Req::post("/orders")).await;
    assert_problem(&r, 400, "key-missing");
    assert_eq!(up.total(), 0);
    // GET is not protected, so it needs no key.
    let r = client.get("/orders").await;
    assert_eq!(r.status, 201, "{}", r.summary());
    let r = client.send(Req::post("/orders").key("present")).await;
    assert_eq!(r.status, 201, "{}", r.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_keys_accept_sf_strings_only() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &["--strict-keys"]).await;
    let r = client.send(Req::post("/orders").key("bare-token")).await;
    assert_problem(&r, 400, "key-malformed");
    let r = client.send(Req::post("/orders").key("\"quoted\"")).await;
    assert_eq!(r.status, 201, "{}", r.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_gets_409_with_retry_after() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;
    let slow = Req::post("/orders")
        .key("dup-1")
        .header("x-test-delay-ms", "1200");
    let c = client.clone();
    let s = slow.clone();
    let first = tokio::spawn(async move { c.send(s).await });
    assert!(eventually(Duration::from_secs(5), || up.executions("dup-1") == 1).await);

    let dup = client.send(slow.clone()).await;
    assert_problem(&dup, 409, "request-in-flight");
    let after: u64 = dup
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("409 without a numeric Retry-After: {}", dup.summary()));
    assert!(after >= 1);

    let first = first.await.expect("first request task");
    assert_eq!(first.status, 201, "{}", first.summary());
    let replay = client.send(slow).await;
    assert!(replay.replayed(), "{}", replay.summary());
    assert_eq!(replay.body, first.body);
    assert_eq!(up.executions("dup-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_different_request_is_422_and_leaves_the_record() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;
    let first = client.send(Req::post("/orders").key("reuse-1")).await;
    assert_eq!(first.status, 201);

    let other_body = client
        .send(
            Req::post("/orders")
                .key("reuse-1")
                .body(&b"{\"amount\":999}"[..]),
        )
        .await;
    assert_problem(&other_body, 422, "key-reused");
    let other_path = client.send(Req::post("/refunds").key("reuse-1")).await;
    assert_problem(&other_path, 422, "key-reused");
    let original_again = client
        .send(
            Req::post("/orders")
                .key("reuse-1")
                .body(&b"{\"amount\":100}"[..]),
        )
        .await;
    assert!(original_again.replayed(), "{}", original_again.summary());
    assert_eq!(original_again.body, first.body);
    assert_eq!(up.executions("reuse-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_over_the_store_limit_is_410_on_retry() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &["--max-stored-response", "1KiB"]).await;
    let req = Req::post("/orders")
        .key("huge-1")
        .header("x-test-body-bytes", "4096")
        .header("x-test-stream", "8")
        .header("x-test-extra", "1");
    let first = client.send(req.clone()).await;
    assert_eq!(first.status, 201, "{}", first.summary());
    assert_eq!(
        first.body.len(),
        4096,
        "the first client gets the whole body"
    );
    assert!(first.body_error.is_none());

    let retry = client.send_until_settled(req, Duration::from_secs(3)).await;
    assert_problem(&retry, 410, "response-not-stored");
    let body = retry.json();
    assert_eq!(body["original_status"], 201, "{}", retry.summary());
    assert_eq!(body["location"], "/orders/42", "{}", retry.summary());
    assert_eq!(retry.header("location"), Some("/orders/42"));
    assert_eq!(retry.header("etag"), Some("\"v1\""));
    assert_eq!(up.executions("huge-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_request_body_is_never_forwarded() {
    let up = Upstream::start().await;
    let (proxy, client) = proxy_for(&up.url(), &[]).await;
    let head = "POST /orders HTTP/1.1\r\nhost: localhost\r\nidempotency-key: trunc-1\r\n\
                content-type: application/json\r\ncontent-length: 100\r\n\r\n0123456789";
    let _ = raw_exchange(
        proxy.addr(),
        head.as_bytes(),
        true,
        None,
        Duration::from_millis(700),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.total(), 0, "a truncated body was forwarded");

    // Nothing was acquired: a complete request with the same key (and another body) executes.
    let r = client.send(Req::post("/orders").key("trunc-1")).await;
    assert_eq!(r.status, 201, "{}", r.summary());
    assert!(!r.replayed());
    assert_eq!(up.executions("trunc-1"), 1);
}

/// An unprotected request streams through; when its own body fails on the way (malformed
/// chunking here), that is the client's error, not the upstream's: a 400 problem, counted as
/// `client_body_failed` rather than as an upstream that sent no response (which would have
/// told the client "outcome unknown, contact the operator" and flagged the upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_request_body_that_fails_is_the_clients_error() {
    let up = Upstream::start().await;
    let (proxy, _client) = proxy_for(&up.url(), &[]).await;
    support::assert_a_failing_streamed_body_is_a_400(proxy.addr()).await;

    let admin = Client::new(proxy.admin());
    let metrics = admin.get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    let count = |result: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "idemgate_upstream_duration_seconds_count{{result=\"{result}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {result} count:\n{text}"))
    };
    assert_eq!(count("client_body_failed"), 1, "{text}");
    assert_eq!(count("no_response"), 0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_keeps_header_order_and_drops_set_cookie() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;
    let req = Req::post("/orders")
        .key("headers-1")
        .header("x-test-extra", "1");
    let first = client.send(req.clone()).await;
    assert_eq!(first.status, 201);
    assert_eq!(
        first.all("set-cookie").len(),
        2,
        "the first client gets the cookies: {}",
        first.summary()
    );
    let links = vec![
        "</a>; rel=\"first\"".to_owned(),
        "</b>; rel=\"second\"".to_owned(),
        "</c>; rel=\"third\"".to_owned(),
    ];
    assert_eq!(first.all("link"), links);

    let replay = client.send(req).await;
    assert!(replay.replayed(), "{}", replay.summary());
    assert!(
        replay.all("set-cookie").is_empty(),
        "Set-Cookie was replayed: {}",
        replay.summary()
    );
    assert_eq!(replay.all("link"), links, "Link lines lost their order");
    assert_eq!(replay.header("location"), Some("/orders/42"));
    assert_eq!(replay.header("etag"), Some("\"v1\""));
    assert_eq!(replay.body, first.body);
    assert_eq!(up.executions("headers-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_body_is_replayed_encoded_or_decoded_by_accept_encoding() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;
    let req = Req::post("/orders")
        .key("gzip-1")
        .header("x-test-gzip", "1");
    let first = client
        .send(req.clone().header("accept-encoding", "gzip"))
        .await;
    assert_eq!(first.status, 201, "{}", first.summary());
    assert_eq!(first.header("content-encoding"), Some("gzip"));
    let plain = support::upstream::gunzip_bytes(&first.body);
    assert!(serde_json::from_slice::<serde_json::Value>(&plain).is_ok());

    let encoded = client
        .send(req.clone().header("accept-encoding", "gzip, br"))
        .await;
    assert!(encoded.replayed());
    assert_eq!(encoded.header("content-encoding"), Some("gzip"));
    assert_eq!(encoded.body, first.body, "gzip replay is not byte-for-byte");

    let identity = client.send(req).await;
    assert!(identity.replayed(), "{}", identity.summary());
    assert_eq!(
        identity.header("content-encoding"),
        None,
        "a client without Accept-Encoding got an encoded replay"
    );
    assert_eq!(&identity.body[..], &plain[..]);
    if let Some(len) = identity.header("content-length") {
        assert_eq!(len, plain.len().to_string());
    }
    assert_eq!(up.executions("gzip-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_and_delete_a_key() {
    let up = Upstream::start().await;
    let (proxy, client) = proxy_for(&up.url(), &[]).await;
    let admin = Client::new(proxy.admin());
    assert_eq!(admin.get("/healthz").await.status, 200);
    let ready = admin.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.summary());

    let first = client.send(Req::post("/orders").key("admin-1")).await;
    assert_eq!(first.status, 201);
    let metrics = admin.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        String::from_utf8_lossy(&metrics.body).contains("idemgate"),
        "metrics without idemgate series"
    );

    let id = support::anonymous_record_id("admin-1");
    let got = admin.get(&format!("/keys/{id}")).await;
    assert_eq!(got.status, 200, "{}", got.summary());
    let missing = admin.get(&format!("/keys/{}", "0".repeat(64))).await;
    assert_eq!(missing.status, 404, "{}", missing.summary());

    let deleted = admin
        .send(Req::new(Method::DELETE, &format!("/keys/{id}")))
        .await;
    assert!(
        deleted.status == 200 || deleted.status == 204,
        "{}",
        deleted.summary()
    );
    let again = client.send(Req::post("/orders").key("admin-1")).await;
    assert_eq!(again.status, 201);
    assert!(!again.replayed(), "a deleted key was replayed");
    assert_eq!(up.executions("admin-1"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_with_different_credentials_never_share_a_key() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &[]).await;
    let alice = || {
        Req::post("/orders")
            .key("shared-key")
            .header("authorization", "Bearer sk_alice")
    };
    let bob = || {
        Req::post("/orders")
            .key("shared-key")
            .header("authorization", "Bearer sk_bob")
    };
    let a1 = client.send(alice()).await;
    let b1 = client.send(bob()).await;
    assert!(!a1.replayed() && !b1.replayed(), "{}", b1.summary());
    assert_ne!(a1.body, b1.body);
    // Bob reusing his own key for another body is a mismatch within his scope only.
    let b2 = client.send(bob().body(&b"{\"amount\":5}"[..])).await;
    assert_problem(&b2, 422, "key-reused");
    let a2 = client.send(alice()).await;
    assert!(a2.replayed());
    assert_eq!(a2.body, a1.body, "alice got another caller's outcome");
    assert_eq!(up.executions("shared-key"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_scope_under_reject_is_400() {
    let up = Upstream::start().await;
    let (_proxy, client) = proxy_for(&up.url(), &["--on-missing-scope", "reject"]).await;
    let r = client.send(Req::post("/orders").key("noscope-1")).await;
    assert_problem(&r, 400, "scope-missing");
    assert_eq!(up.total(), 0);
    let r = client
        .send(
            Req::post("/orders")
                .key("noscope-1")
                .header("authorization", "Bearer sk_1"),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.summary());
}

/// An operator settles an outcome-unknown record with `idemgate keys resolve`; retries then
/// get the given response instead of the problem, still without executing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_shows_and_resolves_an_outcome_unknown_record() {
    let up = FaultUpstream::start(Fault::CloseAfterRequest).await;
    let (proxy, client) = proxy_for(&up.url(), &[]).await;
    let first = client.send(Req::post("/orders").key("settle-1")).await;
    assert_problem(&first, 502, "outcome-unknown");

    let admin = format!("http://{}", proxy.admin());
    let keys = move |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            support::run_idemgate(&args, &[], Duration::from_secs(10))
        })
    };
    let a = |v: &[&str]| -> Vec<String> {
        let mut out: Vec<String> = vec!["keys".into()];
        out.extend(v.iter().map(|s| s.to_string()));
        out.extend(["--admin".to_owned(), admin.clone()]);
        out
    };
    let shown = keys(a(&["show", "--key", "settle-1"])).await.expect("join");
    assert_eq!(shown.code, Some(0), "{shown:?}");
    assert!(
        shown.stdout.contains("outcome-unknown") || shown.stdout.contains("outcome_unknown"),
        "{shown:?}"
    );
    let missing = keys(a(&["show", "--key", "never-used"]))
        .await
        .expect("join");
    assert_eq!(missing.code, Some(3), "{missing:?}");

    let resolved = keys(a(&[
        "resolve",
        "--key",
        "settle-1",
        "--status",
        "201",
        "--body",
        "{\"settled\":true}",
        "--header",
        "content-type: application/json",
    ]))
    .await
    .expect("join");
    assert_eq!(resolved.code, Some(0), "{resolved:?}");

    let retry = client.send(Req::post("/orders").key("settle-1")).await;
    assert_eq!(retry.status, 201, "{}", retry.summary());
    assert_eq!(&retry.body[..], b"{\"settled\":true}");
    assert!(retry.replayed());
    assert_eq!(up.requests(), 1, "settling re-executed the request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_proto_and_host_pass_only_from_trusted_proxies() {
    let up = Upstream::start().await;
    // The test client connects from 127.0.0.1: a trusted proxy for one instance, not the other.
    let (_trusting, trusting) = proxy_for(&up.url(), &["--trusted-proxies", "127.0.0.0/8"]).await;
    let (_default, default) = proxy_for(&up.url(), &[]).await;
    let from_edge = |key: &str| {
        Req::post("/orders")
            .key(key)
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "shop.example")
            .header(
                "x-test-echo",
                "x-forwarded-proto,x-forwarded-host,x-forwarded-for",
            )
    };

    let r = trusting.send(from_edge("xf-1")).await;
    assert_eq!(r.status, 201, "{}", r.summary());
    let echo = &r.json()["echo"];
    assert_eq!(echo["x-forwarded-proto"], "https", "{echo}");
    assert_eq!(echo["x-forwarded-host"], "shop.example", "{echo}");
    assert_eq!(echo["x-forwarded-for"], "127.0.0.1", "{echo}");

    let r = default.send(from_edge("xf-2")).await;
    assert_eq!(r.status, 201, "{}", r.summary());
    let echo = &r.json()["echo"];
    assert_eq!(echo["x-forwarded-proto"], "http", "{echo}");
    assert_ne!(echo["x-forwarded-host"], "shop.example", "{echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_a_low_open_files_limit_to_the_hard_limit() {
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url()).soft_open_files(256).start().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open files line in:\n{limits}"));
    // "Max open files   <soft>   <hard>   files"
    let values: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    assert_ne!(
        values[1], "256",
        "the hard limit must be above the test's soft one: {line}"
    );
    assert_eq!(
        values[0], values[1],
        "soft limit not raised to the hard one: {line}"
    );
    assert!(
        proxy.log().contains("raised the open files limit"),
        "{}",
        proxy.log()
    );
    // And it serves.
    let client = Client::new(proxy.addr());
    let r = client.send(Req::post("/orders").key("nofile-1")).await;
    assert_eq!(r.status, 201, "{}", r.summary());
}
