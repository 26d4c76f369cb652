//! Black-box tests of the upstream's HTTP/2 and TLS failure classes (SPEC §6) through the real
//! binary: `--upstream-protocol http2` in front of an h2c upstream that fails a stream each way
//! the SPEC tells apart, and an `https://` upstream that does not speak TLS.
//!
//! Unprocessed (`REFUSED_STREAM`, `GOAWAY` below the stream, no TLS) must release the key, so the
//! retry runs; processed and then lost (a reset, or a `GOAWAY` that covers the stream followed
//! by the connection closing) must be outcome-unknown, so the retry never runs it twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{Client, H2Fault, H2cUpstream, Proxy, Req, assert_problem};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

async fn proxy_for(upstream: &str) -> (Proxy, Client) {
    let proxy = Proxy::builder(upstream)
        .args(["--lease", "1s", "--upstream-protocol", "http2"])
        .start()
        .await;
    let client = Client::new(proxy.addr());
    (proxy, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upstream_executes_a_key_once_and_retries_replay() {
    let up = H2cUpstream::start(H2Fault::None).await;
    let (_proxy, client) = proxy_for(&up.url()).await;
    let first = client.send(Req::post("/orders").key("h2c-1")).await;
    assert_eq!(first.status, 201, "{}", first.summary());
    assert_eq!(first.json()["execution"], 1);
    for _ in 0..3 {
        let retry = client.send(Req::post("/orders").key("h2c-1")).await;
        assert_eq!(retry.status, 201, "{}", retry.summary());
        assert!(retry.replayed(), "{}", retry.summary());
        assert_eq!(retry.json()["execution"], 1);
    }
    // Unprotected traffic goes over HTTP/2 too.
    let plain = client.send(Req::post("/orders")).await;
    assert_eq!(plain.status, 201, "{}", plain.summary());
    assert_eq!(up.executions(), 2);
}

/// The first attempt fails unprocessed: 502 `upstream-unreachable`, the key is released, and
/// the retry is the one execution.
async fn unprocessed_is_released(fault: H2Fault) {
    let up = H2cUpstream::start(fault).await;
    let (_proxy, client) = proxy_for(&up.url()).await;
    let first = client.send(Req::post("/orders").key("unprocessed-1")).await;
    assert_problem(&first, 502, "upstream-unreachable");
    assert_eq!(up.executions(), 0);
    let retry = client.send(Req::post("/orders").key("unprocessed-1")).await;
    assert_eq!(retry.status, 201, "{}", retry.summary());
    assert!(!retry.replayed(), "the retry is the first execution");
    assert_eq!(retry.json()["execution"], 1);
    assert_eq!(up.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_stream_releases_the_key() {
    unprocessed_is_released(H2Fault::RefuseFirstStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_below_the_stream_releases_the_key() {
    unprocessed_is_released(H2Fault::GoAwayBeforeFirstStream).await;
}

/// The first attempt was processed and its answer lost: 502 `outcome-unknown`, stored, and no
/// retry ever runs it again.
async fn processed_then_lost_is_outcome_unknown(fault: H2Fault) {
    let up = H2cUpstream::start(fault).await;
    let (_proxy, client) = proxy_for(&up.url()).await;
    let first = client.send(Req::post("/orders").key("lost-1")).await;
    assert_problem(&first, 502, "outcome-unknown");
    assert_eq!(up.executions(), 1);
    for _ in 0..3 {
        let retry = client
            .send_until_settled(Req::post("/orders").key("lost-1"), Duration::from_secs(3))
            .await;
        assert_problem(&retry, 502, "outcome-unknown");
        assert!(retry.replayed(), "{}", retry.summary());
    }
    assert_eq!(up.executions(), 1, "a processed request ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_after_processing_is_outcome_unknown() {
    processed_then_lost_is_outcome_unknown(H2Fault::ProcessFirstThenReset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_covering_the_stream_then_close_is_outcome_unknown() {
    processed_then_lost_is_outcome_unknown(H2Fault::ProcessFirstThenGoAwayAndClose).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_that_does_not_speak_tls_is_unreachable_and_releases_the_key() {
    // A plain HTTP server on the port an https:// URL names: the TLS handshake fails, so
    // nothing of the request was sent.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let proxy = Proxy::builder(format!("https://{addr}"))
        .args(["--lease", "1s"])
        .start()
        .await;
    let client = Client::new(proxy.addr());
    for _ in 0..2 {
        // Released each time: the retry is tried again, not answered from a stored outcome.
        let r = client.send(Req::post("/orders").key("tls-1")).await;
        assert_problem(&r, 502, "upstream-unreachable");
        assert!(!r.replayed(), "{}", r.summary());
    }
    server.abort();
}

/// An unprotected request whose own body fails while it streams to an HTTP/2 upstream is the
/// client's error (400), not an upstream that sent no response (502 outcome-unknown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_request_body_that_fails_is_the_clients_error() {
    let up = H2cUpstream::start(H2Fault::None).await;
    let (proxy, _client) = proxy_for(&up.url()).await;
    support::assert_a_failing_streamed_body_is_a_400(proxy.addr()).await;
}
