//! A small real HTTP upstream (hyper, HTTP/1.1) that counts executions per `Idempotency-Key`.
//!
//! The request headers steer each answer, so one upstream serves every test:
//!
//! | header | effect |
//! |---|---|
//! | `x-test-delay-ms: N` | answer after N ms (the execution is counted on arrival) |
//! | `x-test-status: N` | answer with status N (default 201) |
//! | `x-test-body-bytes: N` | a body of N bytes instead of the JSON summary |
//! | `x-test-extra: 1` | adds two `Set-Cookie`, three `Link` (in order), `Location`, `ETag` |
//! | `x-test-gzip: 1` | gzip the body, `Content-Encoding: gzip`, `Vary: Accept-Encoding` |
//! | `x-test-stream: N` | send the body in N chunks, 20 ms apart |
//! | `x-test-echo: a,b` | the JSON gains `"echo": {"a": …, "b": …}`: those request headers as received |
//!
//! The default body is JSON naming the key, the per-key execution number and a global serial,
//! so a second execution is visible in the body, not only in the counters.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Default)]
struct State {
    per_key: Mutex<HashMap<String, usize>>,
    total: AtomicU64,
    serial: AtomicU64,
}

/// A running upstream; stops accepting on drop.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts on an OS-chosen loopback port.
    pub async fn start() -> Upstream {
        Self::start_on("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind upstream")
    }

    /// Starts on `addr` (e.g. a port the test reserved earlier).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(st.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Upstream { addr, state, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests carrying this `Idempotency-Key` value arrived.
    pub fn executions(&self, key: &str) -> usize {
        self.state
            .per_key
            .lock()
            .map(|m| m.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Every key's count.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.state
            .per_key
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// All requests, with or without a key.
    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn num(req: &Request<Incoming>, name: &str) -> Option<u64> {
    header(req, name).and_then(|v| v.trim().parse().ok())
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let key = header(&req, "idempotency-key").map(str::to_owned);
    let delay = num(&req, "x-test-delay-ms").unwrap_or(0);
    let status = num(&req, "x-test-status")
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CREATED);
    let body_bytes = num(&req, "x-test-body-bytes");
    let extra = header(&req, "x-test-extra").is_some();
    let gzip = header(&req, "x-test-gzip").is_some();
    let chunks = num(&req, "x-test-stream").unwrap_or(0);
    let echo: serde_json::Map<String, serde_json::Value> = header(&req, "x-test-echo")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| (name.to_owned(), header(&req, name).into()))
        .collect();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    // The execution counts once the whole request arrived, as a real handler would act.
    let request_body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let n = match &key {
        Some(k) => {
            let mut m = state.per_key.lock().expect("lock");
            let e = m.entry(k.clone()).or_insert(0);
            *e += 1;
            *e
        }
        None => 0,
    };
    state.total.fetch_add(1, Ordering::SeqCst);
    let serial = state.serial.fetch_add(1, Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    let plain: Vec<u8> = match body_bytes {
        Some(len) => (0..len).map(|i| b'a' + (i % 26) as u8).collect(),
        None => serde_json::json!({
            "key": key,
            "execution": n,
            "serial": serial,
            "method": method,
            "path": path,
            "request_body_len": request_body.len(),
            "echo": echo,
        })
        .to_string()
        .into_bytes(),
    };
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream-serial", serial.to_string());
    if extra {
        builder = builder
            .header("set-cookie", "session=abc; Path=/")
            .header("set-cookie", "tracking=xyz; Path=/")
            .header("link", "</a>; rel=\"first\"")
            .header("link", "</b>; rel=\"second\"")
            .header("link", "</c>; rel=\"third\"")
            .header("location", "/orders/42")
            .header("etag", "\"v1\"");
    }
    let payload = if gzip {
        builder = builder
            .header("content-encoding", "gzip")
            .header("vary", "accept-encoding");
        gzip_bytes(&plain)
    } else {
        plain
    };
    let body: Body = if chunks > 0 {
        let payload = Bytes::from(payload);
        let size = payload.len().div_ceil(chunks as usize).max(1);
        let parts: Vec<Bytes> = payload.chunks(size).map(Bytes::copy_from_slice).collect();
        let stream = futures_util::stream::unfold(parts.into_iter(), |mut it| async move {
            let next = it.next()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((Ok::<_, Infallible>(Frame::data(next)), it))
        });
        BodyExt::boxed(StreamBody::new(stream))
    } else {
        BodyExt::boxed(Full::new(Bytes::from(payload)))
    };
    Ok(builder.body(body).unwrap_or_else(|_| {
        let mut r = Response::new(BodyExt::boxed(Full::new(Bytes::from_static(b"bad"))));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    }))
}

/// Gzip-compresses `data`.
pub fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

/// Gunzips `data`.
pub fn gunzip_bytes(data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}
