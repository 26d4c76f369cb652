//! An HTTP/1.1 client for the tests: hyper-util's pooled client for well-formed requests, and a
//! raw TCP exchange for malformed or truncated ones.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any single test request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A request to build.
#[derive(Clone, Debug)]
pub struct Req {
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Req {
    /// A POST to `path` with a small JSON body.
    pub fn post(path: &str) -> Req {
        Req {
            method: Method::POST,
            path: path.to_owned(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(br#"{"amount":100}"#),
        }
    }

    /// A request with any method and an empty body.
    pub fn new(method: Method, path: &str) -> Req {
        Req {
            method,
            path: path.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Adds an `Idempotency-Key` field line (bare token spelling as given).
    pub fn key(self, key: &str) -> Req {
        self.header("idempotency-key", key)
    }

    /// Adds a header line (repeated names are kept as separate lines).
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = body.into();
        self
    }
}

/// A response read to its end (or to the point the body failed).
#[derive(Clone, Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers, in the order received per name.
    pub headers: HeaderMap,
    /// Body bytes received.
    pub body: Bytes,
    /// Set when the body failed before its end.
    pub body_error: Option<String>,
}

impl Resp {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The problem slug (the `type` URI after the idemgate prefix), if this is an idemgate problem.
    pub fn problem(&self) -> Option<String> {
        let ct = self.header("content-type")?;
        if !ct.starts_with("application/problem+json") {
            return None;
        }
        self.json()["type"]
            .as_str()?
            .strip_prefix(super::PROBLEM_PREFIX)
            .map(str::to_owned)
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of a header, in order.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// Whether `Idempotent-Replayed: true` is present.
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// A one-line summary for assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "{} {:?} {}{}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body[..self.body.len().min(400)]),
            self.body_error
                .as_ref()
                .map(|e| format!(" (body error: {e})"))
                .unwrap_or_default()
        )
    }
}

/// A pooled HTTP/1.1 client aimed at one address.
#[derive(Clone)]
pub struct Client {
    base: SocketAddr,
    inner: HyperClient<HttpConnector, Full<Bytes>>,
}

impl Client {
    /// A client for `http://<base>`.
    pub fn new(base: SocketAddr) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let inner = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(5))
            .build(connector);
        Client { base, inner }
    }

    /// An HTTP/2 (prior knowledge, cleartext) client for `http://<base>`.
    #[allow(dead_code)]
    pub fn new_h2(base: SocketAddr) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let inner = HyperClient::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Client { base, inner }
    }

    /// Sends `req`; panics on transport errors before a response head or after 30 s.
    pub async fn send(&self, req: Req) -> Resp {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.try_send(req.clone())).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("request {req:?} failed: {e}"),
            Err(_) => panic!("request {req:?} took longer than {REQUEST_TIMEOUT:?}"),
        }
    }

    /// Sends `req`; a transport error before the head is returned as `Err`.
    pub async fn try_send(&self, req: Req) -> Result<Resp, String> {
        let uri = format!("http://{}{}", self.base, req.path);
        let mut builder = Request::builder().method(req.method.clone()).uri(uri);
        if let Some(h) = builder.headers_mut() {
            for (n, v) in &req.headers {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).map_err(|e| e.to_string())?,
                    HeaderValue::from_str(v).map_err(|e| e.to_string())?,
                );
            }
        }
        let request = builder
            .body(Full::new(req.body.clone()))
            .map_err(|e| e.to_string())?;
        let response = self.inner.request(request).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            msg
        })?;
        let (parts, mut body) = response.into_parts();
        let mut buf = BytesMut::new();
        let mut body_error = None;
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    body_error = Some(e.to_string());
                    break;
                }
            }
        }
        Ok(Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: buf.freeze(),
            body_error,
        })
    }

    /// Sends `req` until the answer is not a 409 (a duplicate of an attempt still in flight),
    /// for up to `within`. Returns the last answer.
    pub async fn send_until_settled(&self, req: Req, within: Duration) -> Resp {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = self.send(req.clone()).await;
            if r.status != 409 || tokio::time::Instant::now() >= deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` on this client's address.
    pub async fn get(&self, path: &str) -> Resp {
        self.send(Req::new(Method::GET, path)).await
    }
}

/// Writes `bytes` to a fresh connection (then half-closes it when `close_write`), and reads
/// whatever comes back until EOF, until the text read contains `until`, or `read_for` passes.
pub async fn raw_exchange(
    addr: SocketAddr,
    bytes: &[u8],
    close_write: bool,
    until: Option<&str>,
    read_for: Duration,
) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    if close_write {
        let _ = stream.shutdown().await;
    }
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + read_for;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&chunk[..n]);
                if until.is_some_and(|u| String::from_utf8_lossy(&out).contains(u)) {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends an unprotected POST (no key) whose chunked body turns malformed after its first
/// chunk, so it fails while it streams to the upstream, and checks that the answer is the
/// client's error: 400 `request-body-incomplete`.
pub async fn assert_a_failing_streamed_body_is_a_400(addr: SocketAddr) {
    let request = "POST /orders HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                   transfer-encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n\r\n";
    let answer = raw_exchange(
        addr,
        request.as_bytes(),
        false,
        Some("}"),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("https://idemgate.dev/problems/request-body-incomplete"),
        "{answer}"
    );
}
