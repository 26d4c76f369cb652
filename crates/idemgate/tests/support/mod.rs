//! Shared pieces of the layer's integration tests: a real axum app behind the layer on a
//! loopback port, an HTTP client, and raw-TCP helpers for clients that misbehave.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Executions per `Idempotency-Key` value (and per path), as the handlers saw them.
#[derive(Clone, Default)]
pub struct Executions {
    by_key: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
}

impl Executions {
    fn record(&self, headers: &HeaderMap) {
        let key = headers
            .get("idempotency-key")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        *self.by_key.lock().unwrap().entry(key).or_default() += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
    }

    pub fn of(&self, key: &str) -> usize {
        self.by_key.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    pub fn keys(&self) -> usize {
        self.by_key.lock().unwrap().len()
    }

    pub fn max_per_key(&self) -> usize {
        self.by_key
            .lock()
            .unwrap()
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// A gzip of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub const FIDELITY_BODY: &[u8] = b"{\"id\":\"pay_1\",\"status\":\"succeeded\"}";

/// The test application: each route shows one behaviour of an upstream handler.
pub fn app(executions: Executions) -> Router {
    Router::new()
        .route(
            "/charge",
            post(|State(e): State<Executions>, headers: HeaderMap, body: Bytes| async move {
                e.record(&headers);
                let mut r = (StatusCode::CREATED, body).into_response();
                r.headers_mut()
                    .insert(header::LOCATION, HeaderValue::from_static("/charges/1"));
                r
            }),
        )
        .route(
            "/slow",
            post(|State(e): State<Executions>, headers: HeaderMap| async move {
                e.record(&headers);
                tokio::time::sleep(Duration::from_millis(400)).await;
                (StatusCode::CREATED, "slow done")
            }),
        )
        .route(
            "/status/{code}",
            post(
                |State(e): State<Executions>, Path(code): Path<u16>, headers: HeaderMap| async move {
                    e.record(&headers);
                    // The first execution answers `code`; later ones succeed.
                    let n = e.of(&key_of(&headers));
                    let status = if n == 1 {
                        StatusCode::from_u16(code).unwrap()
                    } else {
                        StatusCode::OK
                    };
                    (status, format!("execution {n}"))
                },
            ),
        )
        .route(
            "/panic",
            post(|State(e): State<Executions>, headers: HeaderMap| async move {
                e.record(&headers);
                if e.total() < usize::MAX {
                    panic!("handler bug");
                }
                "unreachable"
            }),
        )
        .route(
            "/hang",
            post(|State(e): State<Executions>, headers: HeaderMap| async move {
                e.record(&headers);
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }),
        )
        .route(
            "/stream/{len}",
            post(
                |State(e): State<Executions>, Path(len): Path<usize>, headers: HeaderMap| async move {
                    e.record(&headers);
                    streamed(len, false)
                },
            ),
        )
        .route(
            "/broken",
            post(|State(e): State<Executions>, headers: HeaderMap| async move {
                e.record(&headers);
                streamed(256 * 1024, true)
            }),
        )
        .route(
            "/fidelity",
            post(|State(e): State<Executions>, headers: HeaderMap| async move {
                e.record(&headers);
                let mut r = Response::new(Body::from(gzip(FIDELITY_BODY)));
                *r.status_mut() = StatusCode::CREATED;
                let h = r.headers_mut();
                h.insert(header::LOCATION, HeaderValue::from_static("/payments/pay_1"));
                h.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
                h.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
                h.append(header::LINK, HeaderValue::from_static("</a>; rel=\"first\""));
                h.append(header::LINK, HeaderValue::from_static("</b>; rel=\"second\""));
                h.insert("x-binary", HeaderValue::from_bytes(&[0x80, 0xfe, b'x']).unwrap());
                h.insert("x-request-token", HeaderValue::from_static("t0ps3cret"));
                h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
                r
            }),
        )
        .with_state(executions)
}

fn key_of(headers: &HeaderMap) -> String {
    headers
        .get("idempotency-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

/// A body of `len` bytes in 64 KiB frames, a little apart; with `fail`, an error after half.
fn streamed(len: usize, fail: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut sent = 0;
        while sent < len {
            if fail && sent >= len / 2 {
                let _ = tx.send(Err(std::io::Error::other("upstream broke"))).await;
                return;
            }
            let n = (len - sent).min(64 * 1024);
            let chunk = Bytes::from(vec![(sent / 65536) as u8; n]);
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
            sent += n;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// Serves `app` on a loopback port.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A response as a test sees it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// The problem `type` slug, if this is an idemgate problem.
    pub fn problem(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["type"]
            .as_str()?
            .strip_prefix(idemgate::problem::TYPE_PREFIX)
            .map(str::to_owned)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A pooled HTTP/1.1 client for one server.
#[derive(Clone)]
pub struct TestClient {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl TestClient {
    pub fn new(addr: SocketAddr) -> Self {
        TestClient {
            addr,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn post(&self, path: &str, key: Option<&str>, body: &'static [u8]) -> Answer {
        let mut headers = vec![];
        if let Some(k) = key {
            headers.push(("idempotency-key", k.to_owned()));
        }
        self.send("POST", path, &headers, Bytes::from_static(body))
            .await
    }

    /// Sends until the answer is not 409 (the first attempt still running), or `within` passes;
    /// returns the last answer.
    pub async fn send_until_settled(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        within: Duration,
    ) -> Answer {
        let started = tokio::time::Instant::now();
        loop {
            let a = self.send(method, path, headers, body.clone()).await;
            if a.status != 409 || started.elapsed() > within {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`TestClient::send_until_settled`] for a POST with an optional key.
    pub async fn post_until_settled(
        &self,
        path: &str,
        key: Option<&str>,
        body: &'static [u8],
        within: Duration,
    ) -> Answer {
        let headers: Vec<(&str, String)> = key
            .map(|k| ("idempotency-key", k.to_owned()))
            .into_iter()
            .collect();
        self.send_until_settled("POST", path, &headers, Bytes::from_static(body), within)
            .await
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Answer {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path));
        for (n, v) in headers {
            req = req.header(*n, v.as_str());
        }
        let req = req.body(Full::new(body)).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .expect("response within 20 s")
            .expect("response");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("whole body").to_bytes();
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }
}

/// Sends raw bytes on a fresh connection and returns the connection.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// Reads what the server sends until it closes or `limit` passes.
pub async fn read_until_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// Waits until `cond` holds, up to `limit`.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
