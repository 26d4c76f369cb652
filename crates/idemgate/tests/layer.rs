//! The tower layer over real TCP with axum: every SPEC §5–§8 behaviour that applies in-process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use idemgate::policy::{Concurrency, OnError, Policy, PolicyResolver};
use idemgate::scope::MissingScope;
use idemgate::store::{MemoryStore, Store};
use idemgate::{IdempotencyLayer, OutcomeHint};
use idemgate_store_tests::faulty::{Fault, FaultyStore, Op, RandomFaults};
use support::*;

/// Test policies: short leases, and per-path tweaks.
fn policy_for(base: Policy) -> impl PolicyResolver {
    let base = Arc::new(Policy {
        lease: Duration::from_millis(600),
        request_body_timeout: Duration::from_millis(500),
        ..base
    });
    let hang = Arc::new(Policy {
        max_lease_hold: Duration::from_secs(1),
        ..(*base).clone()
    });
    let stream = Arc::new(Policy {
        max_stored_response: 8 * 1024 * 1024,
        ..(*base).clone()
    });
    move |parts: &http::request::Parts| {
        if parts.method != Method::POST && parts.method != Method::PATCH {
            return None;
        }
        Some(match parts.uri.path() {
            "/hang" => hang.clone(),
            p if p.starts_with("/stream/5") => stream.clone(),
            _ => base.clone(),
        })
    }
}

struct Setup {
    client: TestClient,
    executions: Executions,
    addr: std::net::SocketAddr,
}

async fn setup_with(store: Arc<dyn Store>, base: Policy) -> Setup {
    let executions = Executions::default();
    let layer = IdempotencyLayer::builder(store)
        .policy(policy_for(base))
        .build();
    let addr = serve(app(executions.clone()).layer(layer)).await;
    Setup {
        client: TestClient::new(addr),
        executions,
        addr,
    }
}

async fn setup(base: Policy) -> Setup {
    setup_with(Arc::new(MemoryStore::builder().build()), base).await
}

#[tokio::test]
async fn a_retry_gets_the_first_outcome_and_the_handler_runs_once() {
    let s = setup(Policy::default()).await;
    let first = s.client.post("/charge", Some("\"k1\""), b"amount=10").await;
    assert_eq!(first.status, 201);
    assert!(!first.replayed());
    for _ in 0..3 {
        let retry = s.client.post("/charge", Some("\"k1\""), b"amount=10").await;
        assert_eq!(retry.status, 201);
        assert!(retry.replayed());
        assert_eq!(retry.body, first.body);
        assert_eq!(retry.headers["location"], "/charges/1");
    }
    // The bare-token spelling is the same key.
    let bare = s.client.post("/charge", Some("k1"), b"amount=10").await;
    assert!(bare.replayed());
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn unprotected_requests_pass_through_untouched() {
    let s = setup(Policy::default()).await;
    // No key: not protected.
    s.client.post("/charge", None, b"a").await;
    s.client.post("/charge", None, b"a").await;
    assert_eq!(s.executions.total(), 2);
    // Other methods ignore the header.
    let get = s
        .client
        .send(
            "GET",
            "/charge",
            &[("idempotency-key", "\"g\"".into())],
            Bytes::new(),
        )
        .await;
    assert_eq!(get.status, 405, "GET reached the router untouched");
}

#[tokio::test]
async fn bad_keys_are_refused_before_the_store_is_touched() {
    // Every store operation fails: a 503 would show the store was asked.
    let faulty = FaultyStore::new(MemoryStore::builder().build());
    for op in Op::ALL {
        faulty.script(op, std::iter::repeat_n(Fault::UnavailableBefore, 100));
    }
    let s = setup_with(Arc::new(faulty), Policy::default()).await;
    let long = format!("\"{}\"", "x".repeat(256));
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("idempotency-key", "\"unterminated".into())],
            "key-malformed",
        ),
        (vec![("idempotency-key", "\"\"".into())], "key-length"),
        (vec![("idempotency-key", long)], "key-length"),
        (
            vec![
                ("idempotency-key", "\"a\"".into()),
                ("idempotency-key", "\"b\"".into()),
            ],
            "key-repeated",
        ),
    ];
    for (headers, slug) in cases {
        let a = s
            .client
            .send("POST", "/charge", &headers, Bytes::from_static(b"x"))
            .await;
        assert_eq!(a.status, 400, "{slug}");
        assert_eq!(a.problem().as_deref(), Some(slug));
        assert_eq!(a.headers["content-type"], "application/problem+json");
    }
    assert_eq!(s.executions.total(), 0);
}

#[tokio::test]
async fn a_route_that_requires_a_key_refuses_requests_without_one() {
    let s = setup(Policy {
        require_key: true,
        ..Policy::default()
    })
    .await;
    let a = s.client.post("/charge", None, b"x").await;
    assert_eq!(a.status, 400);
    assert_eq!(a.problem().as_deref(), Some("key-missing"));
    assert_eq!(s.executions.total(), 0);
}

#[tokio::test]
async fn callers_never_share_records() {
    let s = setup(Policy::default()).await;
    let as_caller = |auth: &'static str| {
        let c = s.client.clone();
        async move {
            c.send(
                "POST",
                "/charge",
                &[
                    ("idempotency-key", "\"same\"".into()),
                    ("authorization", auth.into()),
                ],
                Bytes::from_static(b"x"),
            )
            .await
        }
    };
    assert!(!as_caller("Bearer alice").await.replayed());
    assert!(!as_caller("Bearer bob").await.replayed());
    assert!(as_caller("Bearer alice").await.replayed());
    // The anonymous scope is a third one.
    assert!(
        !s.client
            .post("/charge", Some("\"same\""), b"x")
            .await
            .replayed()
    );
    assert_eq!(s.executions.total(), 3);
}

#[tokio::test]
async fn missing_scope_can_be_rejected() {
    let s = setup(Policy {
        on_missing_scope: MissingScope::Reject,
        ..Policy::default()
    })
    .await;
    let a = s.client.post("/charge", Some("\"k\""), b"x").await;
    assert_eq!(a.status, 400);
    assert_eq!(a.problem().as_deref(), Some("scope-missing"));
    assert_eq!(s.executions.total(), 0);
}

#[tokio::test]
async fn same_key_for_a_different_request_is_422_and_leaves_the_record() {
    let s = setup(Policy::default()).await;
    s.client.post("/charge", Some("\"m\""), b"amount=10").await;
    let other_body = s.client.post("/charge", Some("\"m\""), b"amount=99").await;
    assert_eq!(other_body.status, 422);
    assert_eq!(other_body.problem().as_deref(), Some("key-reused"));
    let other_path = s.client.post("/slow", Some("\"m\""), b"amount=10").await;
    assert_eq!(other_path.status, 422);
    let original = s.client.post("/charge", Some("\"m\""), b"amount=10").await;
    assert!(original.replayed());
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn a_concurrent_duplicate_gets_409_with_retry_after() {
    // A 30 s lease (the default) is renewed every 10 s: that is when to retry.
    let executions = Executions::default();
    let layer = IdempotencyLayer::new(Arc::new(MemoryStore::builder().build()));
    let addr = serve(app(executions.clone()).layer(layer)).await;
    let s = Setup {
        client: TestClient::new(addr),
        executions,
        addr,
    };
    let c = s.client.clone();
    let first = tokio::spawn(async move { c.post("/slow", Some("\"c\""), b"x").await });
    assert!(eventually(Duration::from_secs(2), || s.executions.total() == 1).await);
    let dup = s.client.post("/slow", Some("\"c\""), b"x").await;
    assert_eq!(dup.status, 409);
    assert_eq!(dup.problem().as_deref(), Some("request-in-flight"));
    let after: u64 = dup.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((9..=10).contains(&after), "Retry-After {after}");
    assert_eq!(first.await.unwrap().status, 201);
    assert!(s.client.post("/slow", Some("\"c\""), b"x").await.replayed());
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn release_statuses_are_not_stored() {
    let s = setup(Policy::default()).await;
    for code in [408u16, 425, 429, 503] {
        let key = format!("\"r{code}\"");
        let path = format!("/status/{code}");
        let headers = [("idempotency-key", key.clone())];
        let first = s.client.send("POST", &path, &headers, Bytes::new()).await;
        assert_eq!(first.status, code);
        let retry = s.client.send("POST", &path, &headers, Bytes::new()).await;
        assert_eq!(retry.status, 200, "released, so the retry executes");
        assert!(!retry.replayed());
        let third = s.client.send("POST", &path, &headers, Bytes::new()).await;
        assert!(third.replayed());
        assert_eq!(s.executions.of(&key), 2);
    }
    // Other statuses, errors included, are outcomes.
    let headers = [("idempotency-key", "\"r500\"".to_owned())];
    s.client
        .send("POST", "/status/500", &headers, Bytes::new())
        .await;
    let retry = s
        .client
        .send("POST", "/status/500", &headers, Bytes::new())
        .await;
    assert_eq!(retry.status, 500);
    assert!(retry.replayed());
}

#[tokio::test]
async fn a_panicking_handler_leaves_a_stored_problem_and_never_runs_twice() {
    let s = setup(Policy::default()).await;
    let first = s.client.post("/panic", Some("\"p\""), b"x").await;
    assert_eq!(first.status, 500);
    assert_eq!(first.problem().as_deref(), Some("handler-failed"));
    let retry = s.client.post("/panic", Some("\"p\""), b"x").await;
    assert_eq!(retry.status, 500);
    assert_eq!(retry.problem().as_deref(), Some("handler-failed"));
    assert!(retry.replayed());
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn on_error_release_lets_the_retry_execute() {
    let s = setup(Policy {
        on_error: OnError::Release,
        ..Policy::default()
    })
    .await;
    assert_eq!(
        s.client.post("/panic", Some("\"p\""), b"x").await.status,
        500
    );
    let retry = s.client.post("/panic", Some("\"p\""), b"x").await;
    assert!(!retry.replayed());
    assert_eq!(s.executions.total(), 2);
}

#[tokio::test]
async fn a_request_carrying_report_outcome_is_told_what_the_layer_did() {
    use idemgate::observe::{ReportOutcome, RequestOutcome};
    use idemgate::record::RecordId;
    use tower::ServiceExt;
    let inner = tower::service_fn(
        |req: http::Request<idemgate::layer::RequestBody<http_body_util::Full<Bytes>>>| async move {
            assert!(
                req.extensions().get::<ReportOutcome>().is_none(),
                "the inner service never sees the report"
            );
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                Bytes::from_static(b"done"),
            )))
        },
    );
    let layer = IdempotencyLayer::new(Arc::new(MemoryStore::builder().build()));
    let svc = tower::Layer::layer(&layer, inner);
    let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
    let send = |method: Method, key: Option<&str>| {
        let mut req = http::Request::builder().method(method).uri("/x");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let mut req = req
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let reports = reports.clone();
        req.extensions_mut()
            .insert(ReportOutcome::new(move |outcome, id| {
                reports.lock().unwrap().push((outcome, id));
            }));
        svc.clone().oneshot(req)
    };
    assert_eq!(
        send(Method::POST, Some("\"r\"")).await.unwrap().status(),
        200
    );
    assert_eq!(
        send(Method::POST, Some("\"r\"")).await.unwrap().status(),
        200
    );
    assert_eq!(send(Method::GET, None).await.unwrap().status(), 200);
    assert_eq!(
        send(Method::POST, Some("\"unterminated"))
            .await
            .unwrap()
            .status(),
        400
    );
    let id = RecordId::derive("anonymous", b"", b"r");
    assert_eq!(
        *reports.lock().unwrap(),
        [
            (RequestOutcome::Executed, Some(id)),
            (RequestOutcome::Replayed, Some(id)),
            (RequestOutcome::Passthrough, None),
            (RequestOutcome::Rejected, None),
        ]
    );
}

#[tokio::test]
async fn an_inner_service_error_is_a_stored_handler_failed() {
    use tower::ServiceExt;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = tower::service_fn(
        move |_req: http::Request<idemgate::layer::RequestBody<http_body_util::Full<Bytes>>>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                Err::<http::Response<http_body_util::Full<Bytes>>, _>(std::io::Error::other(
                    "db down",
                ))
            }
        },
    );
    let layer = IdempotencyLayer::new(Arc::new(MemoryStore::builder().build()));
    let svc = tower::Layer::layer(&layer, inner);
    let req = || {
        http::Request::post("/x")
            .header("idempotency-key", "\"e\"")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap()
    };
    let first = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(first.status(), 500);
    assert_eq!(
        first.extensions().get::<idemgate::problem::ProblemKind>(),
        Some(&idemgate::problem::ProblemKind::HandlerFailed)
    );
    let retry = svc.oneshot(req()).await.unwrap();
    assert_eq!(retry.status(), 500);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_hung_handler_becomes_outcome_unknown_at_max_lease_hold() {
    let s = setup(Policy::default()).await;
    let c = s.client.clone();
    let first = tokio::spawn(async move { c.post("/hang", Some("\"h\""), b"x").await });
    assert!(eventually(Duration::from_secs(2), || s.executions.total() == 1).await);
    let started = tokio::time::Instant::now();
    let answer = s
        .client
        .post_until_settled("/hang", Some("\"h\""), b"x", Duration::from_secs(3))
        .await;
    assert!(
        started.elapsed() <= Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(answer.problem().as_deref(), Some("outcome-unknown"));
    assert!(answer.replayed());
    // The first client is not left waiting for a handler that hangs.
    let first = tokio::time::timeout(Duration::from_secs(2), first)
        .await
        .expect("the first client is answered at max_lease_hold")
        .unwrap();
    assert_eq!(first.status, 504);
    assert_eq!(first.problem().as_deref(), Some("outcome-unknown"));
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn a_response_too_large_to_store_is_410_for_retries_and_whole_for_the_first_client() {
    let s = setup(Policy {
        max_stored_response: 100 * 1024,
        ..Policy::default()
    })
    .await;
    let first = s.client.post("/stream/300000", Some("\"big\""), b"x").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body.len(), 300_000);
    let retry = s.client.post("/stream/300000", Some("\"big\""), b"x").await;
    assert_eq!(retry.status, 410);
    assert_eq!(retry.problem().as_deref(), Some("response-not-stored"));
    assert_eq!(retry.json()["original_status"], 200);
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn a_body_that_fails_midway_is_never_replayed_as_complete() {
    let s = setup(Policy::default()).await;
    let addr = s.addr;
    // The first client sees the stream break; the client library reports an error.
    let first = tokio::spawn(async move {
        let req = http::Request::post(format!("http://{addr}/broken"))
            .header("idempotency-key", "\"b\"")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
        let r = client.request(req).await;
        match r {
            Ok(r) => http_body_util::BodyExt::collect(r.into_body())
                .await
                .is_err(),
            Err(_) => true,
        }
    });
    assert!(first.await.unwrap(), "the first client saw the body fail");
    let retry = s.client.post("/broken", Some("\"b\""), b"").await;
    assert_eq!(retry.status, 502);
    assert_eq!(retry.problem().as_deref(), Some("response-incomplete"));
    assert_eq!(retry.json()["original_status"], 200);
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn request_bodies_over_the_limit_are_413_and_never_executed() {
    let s = setup(Policy {
        max_request_body: 1000,
        ..Policy::default()
    })
    .await;
    // Declared too large: refused before the body is read (no 100 Continue).
    let mut conn = raw(
        s.addr,
        b"POST /charge HTTP/1.1\r\nhost: x\r\nidempotency-key: \"l\"\r\ncontent-length: 5000\r\nexpect: 100-continue\r\n\r\n",
    )
    .await;
    let (bytes, _) = read_until_close(&mut conn, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    // Chunked, crossing the limit: 413 and the connection closes.
    let mut conn = raw(
        s.addr,
        b"POST /charge HTTP/1.1\r\nhost: x\r\nidempotency-key: \"l2\"\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await;
    use tokio::io::AsyncWriteExt;
    for _ in 0..3 {
        let _ = conn.write_all(b"200\r\n").await;
        let _ = conn.write_all(&[b'a'; 512]).await;
        let _ = conn.write_all(b"\r\n").await;
    }
    let (bytes, closed) = read_until_close(&mut conn, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(closed, "the connection is closed after a 413 mid-body");
    assert_eq!(s.executions.total(), 0);
}

#[tokio::test]
async fn a_stalled_body_is_408_and_a_truncated_one_is_never_processed() {
    let s = setup(Policy::default()).await;
    let mut conn = raw(
        s.addr,
        b"POST /charge HTTP/1.1\r\nhost: x\r\nidempotency-key: \"s\"\r\ncontent-length: 10\r\n\r\nabc",
    )
    .await;
    let (bytes, _) = read_until_close(&mut conn, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request-body-timeout"), "{text}");

    let conn = raw(
        s.addr,
        b"POST /charge HTTP/1.1\r\nhost: x\r\nidempotency-key: \"t\"\r\ncontent-length: 100\r\n\r\n0123456789",
    )
    .await;
    drop(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.executions.total(), 0);
    // Nothing was acquired either: the complete request executes now.
    let full = s
        .client
        .send(
            "POST",
            "/charge",
            &[("idempotency-key", "\"t\"".into())],
            Bytes::from(vec![b'0'; 100]),
        )
        .await;
    assert_eq!(full.status, 201);
    assert!(!full.replayed());
}

#[tokio::test]
async fn the_work_finishes_when_the_client_vanishes_before_the_head() {
    let s = setup(Policy::default()).await;
    let conn = raw(
        s.addr,
        b"POST /slow HTTP/1.1\r\nhost: x\r\nidempotency-key: \"v\"\r\ncontent-length: 1\r\n\r\nx",
    )
    .await;
    assert!(eventually(Duration::from_secs(2), || s.executions.total() == 1).await);
    drop(conn);
    // The handler still finishes and its outcome is stored.
    let retry = s
        .client
        .post_until_settled("/slow", Some("\"v\""), b"x", Duration::from_secs(5))
        .await;
    assert_eq!(retry.status, 201);
    assert!(retry.replayed());
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn the_work_finishes_when_the_client_vanishes_during_a_5_mib_body() {
    let s = setup(Policy::default()).await;
    let len = 5 * 1024 * 1024;
    let path = format!("/stream/{len}");
    let mut conn = raw(
        s.addr,
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nidempotency-key: \"d\"\r\ncontent-length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let mut buf = vec![0u8; 200_000];
    let mut got = 0;
    while got < 200_000 {
        use tokio::io::AsyncReadExt;
        let n = conn.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    drop(conn);
    let headers = [("idempotency-key", "\"d\"".to_owned())];
    let retry = s
        .client
        .send_until_settled(
            "POST",
            &path,
            &headers,
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(retry.status, 200);
    assert!(retry.replayed());
    assert_eq!(retry.body.len(), len);
    assert_eq!(retry.body[len - 1], ((len - 1) / 65536) as u8);
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn replays_are_faithful() {
    let s = setup(Policy::default()).await;
    let key = ("idempotency-key", "\"f\"".to_owned());
    let gz = ("accept-encoding", "gzip".to_owned());
    let first = s
        .client
        .send(
            "POST",
            "/fidelity",
            &[key.clone(), gz.clone()],
            Bytes::new(),
        )
        .await;
    assert_eq!(first.status, 201);
    assert_eq!(first.headers.get_all("set-cookie").iter().count(), 2);

    let with_gzip = s
        .client
        .send("POST", "/fidelity", &[key.clone(), gz], Bytes::new())
        .await;
    let without = s
        .client
        .send(
            "POST",
            "/fidelity",
            std::slice::from_ref(&key),
            Bytes::new(),
        )
        .await;
    let identity_only = s
        .client
        .send(
            "POST",
            "/fidelity",
            &[key, ("accept-encoding", "identity".into())],
            Bytes::new(),
        )
        .await;
    for r in [&with_gzip, &without, &identity_only] {
        assert!(r.replayed());
        assert_eq!(r.status, 201);
        assert_eq!(r.headers["location"], "/payments/pay_1");
        assert_eq!(
            r.headers.get_all("set-cookie").iter().count(),
            0,
            "Set-Cookie never stored"
        );
        assert!(
            r.headers.get("x-request-token").is_none(),
            "*token* never stored"
        );
        assert!(
            r.headers.get("date").is_some(),
            "a fresh Date from the server, not a stored one"
        );
        let links: Vec<_> = r
            .headers
            .get_all("link")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(links, ["</a>; rel=\"first\"", "</b>; rel=\"second\""]);
        assert_eq!(r.headers["x-binary"].as_bytes(), &[0x80, 0xfe, b'x']);
        assert_eq!(r.headers["vary"], "Accept-Encoding");
    }
    assert_eq!(with_gzip.headers["content-encoding"], "gzip");
    assert_eq!(with_gzip.body, first.body);
    for r in [&without, &identity_only] {
        assert!(r.headers.get("content-encoding").is_none());
        assert_eq!(&r.body[..], FIDELITY_BODY);
    }
    assert_eq!(s.executions.total(), 1);
}

async fn duplicates(concurrency: Concurrency) {
    let s = setup(Policy {
        concurrency,
        ..Policy::default()
    })
    .await;
    let mut tasks = Vec::new();
    for k in 0..20 {
        for _ in 0..100 {
            let c = s.client.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("\"dup-{k}\"");
                c.send(
                    "POST",
                    "/slow",
                    &[("idempotency-key", key)],
                    Bytes::from_static(b"x"),
                )
                .await
            }));
        }
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap().status).or_insert(0) += 1;
    }
    assert_eq!(s.executions.total(), 20, "{statuses:?}");
    assert_eq!(s.executions.keys(), 20);
    assert_eq!(s.executions.max_per_key(), 1);
    match concurrency {
        Concurrency::Conflict => {
            assert!(statuses.get(&409).copied().unwrap_or(0) > 0, "{statuses:?}");
            assert_eq!(statuses.keys().copied().collect::<Vec<_>>(), vec![201, 409]);
        }
        Concurrency::Wait { .. } => {
            assert_eq!(statuses.get(&201), Some(&2000), "{statuses:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_duplicates_of_twenty_keys_execute_twenty_times_in_conflict_mode() {
    duplicates(Concurrency::Conflict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_duplicates_of_twenty_keys_execute_twenty_times_in_wait_mode() {
    duplicates(Concurrency::Wait {
        max: Duration::from_secs(10),
    })
    .await;
}

#[tokio::test]
async fn wait_mode_past_max_waiters_gets_409() {
    let s = setup(Policy {
        concurrency: Concurrency::Wait {
            max: Duration::from_secs(5),
        },
        max_waiters_per_key: 1,
        ..Policy::default()
    })
    .await;
    let c = s.client.clone();
    let first = tokio::spawn(async move { c.post("/slow", Some("\"w\""), b"x").await });
    assert!(eventually(Duration::from_secs(2), || s.executions.total() == 1).await);
    let c = s.client.clone();
    let waiter = tokio::spawn(async move { c.post("/slow", Some("\"w\""), b"x").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let over = s.client.post("/slow", Some("\"w\""), b"x").await;
    assert_eq!(over.status, 409);
    assert_eq!(first.await.unwrap().status, 201);
    let waited = waiter.await.unwrap();
    assert_eq!(waited.status, 201);
    assert!(waited.replayed());
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn store_failures_are_503_and_nothing_executes() {
    let faulty = FaultyStore::new(MemoryStore::builder().build());
    faulty.script(
        Op::Acquire,
        std::iter::repeat_n(Fault::UnavailableBefore, 6),
    );
    let s = setup_with(Arc::new(faulty), Policy::default()).await;
    for _ in 0..2 {
        let a = s.client.post("/charge", Some("\"u\""), b"x").await;
        assert_eq!(a.status, 503);
        assert_eq!(a.problem().as_deref(), Some("store-unavailable"));
        assert!(a.headers.contains_key("retry-after"));
    }
    assert_eq!(s.executions.total(), 0);
    // The store is back: the request executes.
    assert_eq!(
        s.client.post("/charge", Some("\"u\""), b"x").await.status,
        201
    );
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn fail_open_executes_when_the_store_is_down() {
    let faulty = FaultyStore::new(MemoryStore::builder().build());
    faulty.script(
        Op::Acquire,
        std::iter::repeat_n(Fault::UnavailableBefore, 3),
    );
    let s = setup_with(
        Arc::new(faulty),
        Policy {
            fail_open: true,
            ..Policy::default()
        },
    )
    .await;
    assert_eq!(
        s.client.post("/charge", Some("\"o\""), b"x").await.status,
        201
    );
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn a_full_store_is_503_store_full() {
    let store = MemoryStore::builder().capacity_bytes(4096).build();
    let s = setup_with(Arc::new(store), Policy::default()).await;
    let mut full = None;
    for i in 0..200 {
        let key = format!("\"full-{i}\"");
        let a = s
            .client
            .send(
                "POST",
                "/charge",
                &[("idempotency-key", key)],
                Bytes::from(vec![b'x'; 512]),
            )
            .await;
        if a.status == 503 {
            full = Some((i, a));
            break;
        }
    }
    let (i, a) = full.expect("the store fills up");
    assert_eq!(a.problem().as_deref(), Some("store-full"));
    assert_eq!(
        s.executions.total(),
        i,
        "the refused request did not execute"
    );
    // Stored records are still replayed.
    let replay = s
        .client
        .send(
            "POST",
            "/charge",
            &[("idempotency-key", "\"full-0\"".into())],
            Bytes::from(vec![b'x'; 512]),
        )
        .await;
    assert!(replay.replayed());
}

#[tokio::test]
async fn the_client_deadline_is_504_pending_and_the_late_outcome_is_kept() {
    let s = setup(Policy {
        client_deadline: Some(Duration::from_millis(100)),
        ..Policy::default()
    })
    .await;
    let first = s.client.post("/slow", Some("\"late\""), b"x").await;
    assert_eq!(first.status, 504);
    assert_eq!(first.problem().as_deref(), Some("outcome-pending"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = s.client.post("/slow", Some("\"late\""), b"x").await;
    assert_eq!(retry.status, 201);
    assert!(retry.replayed());
    assert_eq!(s.executions.total(), 1);
}

#[tokio::test]
async fn outcome_hints_from_a_forwarding_service() {
    use idemgate::policy::{Ambiguous, MethodPolicy};
    use tower::ServiceExt;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let make = |ambiguous: Ambiguous| {
        let counter = calls.clone();
        let inner = tower::service_fn(
            move |req: http::Request<idemgate::layer::RequestBody<http_body_util::Full<Bytes>>>| {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let hint = match req.uri().path() {
                    "/not-sent" => OutcomeHint::NotSent,
                    _ => OutcomeHint::NoResponse,
                };
                async move {
                    let mut r =
                        http::Response::new(http_body_util::Full::new(Bytes::from_static(b"{}")));
                    *r.status_mut() = StatusCode::BAD_GATEWAY;
                    r.extensions_mut().insert(hint);
                    Ok::<_, std::convert::Infallible>(r)
                }
            },
        );
        let layer = IdempotencyLayer::builder(Arc::new(MemoryStore::builder().build()))
            .policy(MethodPolicy::new(Policy {
                ambiguous,
                ..Policy::default()
            }))
            .build();
        tower::Layer::layer(&layer, inner)
    };
    let req = |path: &str| {
        http::Request::post(path)
            .header("idempotency-key", "\"hint\"")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    let count = || calls.load(std::sync::atomic::Ordering::SeqCst);

    // Not sent: released, the retry executes.
    let svc = make(Ambiguous::Store);
    svc.clone().oneshot(req("/not-sent")).await.unwrap();
    svc.clone().oneshot(req("/not-sent")).await.unwrap();
    assert_eq!(count(), 2);
    // Sent without an answer: outcome-unknown is stored.
    let svc = make(Ambiguous::Store);
    svc.clone().oneshot(req("/no-response")).await.unwrap();
    let retry = svc.clone().oneshot(req("/no-response")).await.unwrap();
    assert_eq!(count(), 3);
    assert_eq!(retry.status(), 502);
    assert_eq!(
        retry.extensions().get::<idemgate::problem::ProblemKind>(),
        Some(&idemgate::problem::ProblemKind::OutcomeUnknown)
    );
    // ... unless the route says the upstream is idempotent itself.
    let svc = make(Ambiguous::Release);
    svc.clone().oneshot(req("/no-response")).await.unwrap();
    svc.clone().oneshot(req("/no-response")).await.unwrap();
    assert_eq!(count(), 5);
}

/// A response body that arrives as one slice of a bigger buffer (as hyper hands out slices of
/// its 8 KiB read buffer) is stored as its own copy: the record must not keep the whole buffer
/// alive for its TTL.
#[tokio::test]
async fn a_stored_body_does_not_pin_the_buffer_it_was_read_from() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let buffer = Bytes::from(vec![b'x'; 8 * 1024]);
    let inner = {
        let buffer = buffer.clone();
        tower::service_fn(
            move |_req: http::Request<
                idemgate::layer::RequestBody<http_body_util::Full<Bytes>>,
            >| {
                let slice = buffer.slice(100..160);
                async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(slice),
                    ))
                }
            },
        )
    };
    let store = Arc::new(MemoryStore::builder().build());
    let layer = IdempotencyLayer::builder(store.clone())
        .policy(idemgate::policy::MethodPolicy::new(Policy::default()))
        .build();
    let svc = tower::Layer::layer(&layer, inner);
    let req = || {
        http::Request::post("/charge")
            .header("idempotency-key", "\"pin\"")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    let first = svc.clone().oneshot(req()).await.unwrap();
    let body = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 60);
    drop(body);
    let retry = svc.clone().oneshot(req()).await.unwrap();
    assert!(retry.headers().contains_key("idempotent-replayed"));
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        &buffer[100..160]
    );
    // The store (and its record) lives on; the service's own handle on the buffer goes.
    drop(svc);
    drop(layer);
    assert!(store.used_bytes() > 0, "the record is still stored");
    assert!(
        eventually(Duration::from_secs(2), || buffer.is_unique()).await,
        "the stored record still references the 8 KiB buffer"
    );
}

/// The engine under a store that fails before and after applying, and delays: whatever the
/// faults, no key ever executes twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_executes_twice_under_store_faults() {
    let faulty = FaultyStore::with_seed(MemoryStore::builder().build(), 7);
    faulty.random_all(Some(RandomFaults {
        unavailable_before: 0.1,
        timeout_before: 0.05,
        timeout_after: 0.1,
        delay: 0.2,
        max_delay: Duration::from_millis(20),
    }));
    let faulty = Arc::new(faulty);
    let s = setup_with(faulty.clone(), Policy::default()).await;
    let mut tasks = Vec::new();
    for k in 0..40 {
        for _ in 0..5 {
            let c = s.client.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("\"fault-{k}\"");
                let mut statuses = Vec::new();
                for _ in 0..6 {
                    let a = c
                        .send(
                            "POST",
                            "/charge",
                            &[("idempotency-key", key.clone())],
                            Bytes::from_static(b"x"),
                        )
                        .await;
                    statuses.push(a.status);
                    if a.status == 201 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                statuses
            }));
        }
    }
    let mut answered = 0;
    for t in tasks {
        let statuses = t.await.unwrap();
        for s in &statuses {
            assert!(
                [201, 409, 503].contains(s),
                "unexpected status {s}: {statuses:?}"
            );
        }
        answered += usize::from(statuses.contains(&201));
    }
    assert!(s.executions.max_per_key() <= 1, "a key executed twice");
    assert!(answered > 0);
    assert!(
        faulty.injected(Op::Acquire).timeout_after > 0,
        "faults were injected"
    );
    // The store heals: no key is stuck. Every key reaches its outcome, executed at most once.
    faulty.set_enabled(false);
    for k in 0..40 {
        let key = format!("\"fault-{k}\"");
        let started = tokio::time::Instant::now();
        let a = loop {
            let a = s
                .client
                .send(
                    "POST",
                    "/charge",
                    &[("idempotency-key", key.clone())],
                    Bytes::from_static(b"x"),
                )
                .await;
            if a.status == 201 || started.elapsed() > Duration::from_secs(3) {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(a.status, 201, "key {k} is stuck: {:?}", a.problem());
    }
    assert_eq!(s.executions.max_per_key(), 1);
    assert_eq!(s.executions.keys(), 40);
}

/// An acquire that may have landed and then failed on later tries leaves nothing stuck.
#[tokio::test]
async fn a_maybe_applied_acquire_that_then_fails_is_released() {
    let faulty = FaultyStore::new(MemoryStore::builder().build());
    faulty.script(
        Op::Acquire,
        [
            Fault::TimeoutAfter,
            Fault::UnavailableBefore,
            Fault::UnavailableBefore,
        ],
    );
    let s = setup_with(Arc::new(faulty), Policy::default()).await;
    let a = s.client.post("/charge", Some("\"ma\""), b"x").await;
    assert_eq!(a.status, 503);
    let retry = s
        .client
        .post_until_settled("/charge", Some("\"ma\""), b"x", Duration::from_secs(3))
        .await;
    assert_eq!(retry.status, 201, "{:?}", retry.problem());
    assert!(!retry.replayed());
    assert_eq!(s.executions.total(), 1);
}

/// A request future dropped while its acquire is in progress leaves nothing stuck.
#[tokio::test]
async fn a_request_dropped_mid_acquire_leaves_the_key_free() {
    use tower::ServiceExt;
    let faulty = FaultyStore::new(MemoryStore::builder().build());
    // The acquire lands at once; its answer comes 200 ms later, after the caller gave up.
    faulty.script(Op::Acquire, [Fault::DelayAfter(Duration::from_millis(200))]);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = tower::service_fn(
        move |_req: http::Request<idemgate::layer::RequestBody<http_body_util::Full<Bytes>>>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"ok"),
                )))
            }
        },
    );
    let svc = tower::Layer::layer(&IdempotencyLayer::new(Arc::new(faulty)), inner);
    let req = || {
        http::Request::post("/x")
            .header("idempotency-key", "\"drop\"")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap()
    };
    let dropped = tokio::time::timeout(Duration::from_millis(20), svc.clone().oneshot(req())).await;
    assert!(
        dropped.is_err(),
        "the first request was dropped mid-acquire"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = tokio::time::Instant::now();
    let retry = loop {
        let r = svc.clone().oneshot(req()).await.unwrap();
        if r.status() != 409 || started.elapsed() > Duration::from_secs(3) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(retry.status(), 200);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// `Service::call` itself panicking (before it returns a future) is a stored handler-failed.
#[tokio::test]
async fn a_panic_inside_call_is_a_stored_handler_failed() {
    use tower::ServiceExt;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = tower::service_fn(
        move |_req: http::Request<idemgate::layer::RequestBody<http_body_util::Full<Bytes>>>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if counter.load(std::sync::atomic::Ordering::SeqCst) < usize::MAX {
                panic!("synchronous bug in call");
            }
            async {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    Bytes::new(),
                )))
            }
        },
    );
    let svc = tower::Layer::layer(
        &IdempotencyLayer::new(Arc::new(MemoryStore::builder().build())),
        inner,
    );
    let req = || {
        http::Request::post("/x")
            .header("idempotency-key", "\"sync-panic\"")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap()
    };
    let first = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(first.status(), 500);
    let retry = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(retry.status(), 500);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A write-off at max_lease_hold that fails is never stored after the real outcome.
#[tokio::test]
async fn a_failed_write_off_never_replaces_the_real_outcome() {
    use idemgate::policy::MethodPolicy;
    use tower::ServiceExt;
    let faulty = FaultyStore::new(MemoryStore::builder().build());
    // Every try of the write-off at 200 ms fails; the real outcome at 500 ms is stored.
    faulty.script(
        Op::Complete,
        [
            Fault::UnavailableBefore,
            Fault::UnavailableBefore,
            Fault::UnavailableBefore,
        ],
    );
    let inner = tower::service_fn(
        |_req: http::Request<idemgate::layer::RequestBody<http_body_util::Full<Bytes>>>| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut r = http::Response::new(http_body_util::Full::new(Bytes::from_static(b"real")));
            *r.status_mut() = StatusCode::CREATED;
            Ok::<_, std::convert::Infallible>(r)
        },
    );
    let layer = IdempotencyLayer::builder(Arc::new(faulty))
        .policy(MethodPolicy::new(Policy {
            max_lease_hold: Duration::from_millis(200),
            ..Policy::default()
        }))
        .build();
    let svc = tower::Layer::layer(&layer, inner);
    let req = || {
        http::Request::post("/x")
            .header("idempotency-key", "\"late-real\"")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap()
    };
    let _ = svc.clone().oneshot(req()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retry = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
}

/// A store error while a duplicate waits is a 409, never an execution, even with fail_open.
#[tokio::test]
async fn a_store_error_while_waiting_never_executes_the_duplicate() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::builder().build()));
    let s = setup_with(
        faulty.clone(),
        Policy {
            concurrency: Concurrency::Wait {
                max: Duration::from_secs(5),
            },
            fail_open: true,
            ..Policy::default()
        },
    )
    .await;
    let c = s.client.clone();
    let first = tokio::spawn(async move { c.post("/slow", Some("\"wf\""), b"x").await });
    assert!(eventually(Duration::from_secs(2), || s.executions.total() == 1).await);
    faulty.script(Op::Watch, std::iter::repeat_n(Fault::UnavailableBefore, 10));
    let dup = s.client.post("/slow", Some("\"wf\""), b"x").await;
    assert_eq!(dup.status, 409);
    assert_eq!(first.await.unwrap().status, 201);
    assert_eq!(s.executions.total(), 1);
}
