//! The connection pool for a plain-HTTP upstream: HTTP/1.1 keep-alive connections, each driven
//! by a task on the thread that opened it, reused last-in first-out.
//!
//! hyper-util's pooled client (still used for HTTPS, where ALPN may pick HTTP/2) spawns a task per
//! HTTP/1 request to put the connection back once its response body has been read, hashes a pool
//! key per request and races a checkout against a connect. Here the response body itself puts the
//! connection back when it ends ([`UpstreamBody`]), which takes a task spawn and a cross-task
//! wake-up off every request.
//!
//! What a failure means is kept exact for SPEC §6: a request hyper hands back unsent (the
//! connection closed while it waited in the queue) on a *reused* connection is sent again once on
//! a new connection; anything else after the connect is "maybe sent".

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use idemgate::layer::BoxError;

/// At most this many idle connections are kept; more are closed when their response ends.
const MAX_IDLE: usize = 1024;

/// Why a request through the pool failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made: the request was not sent.
    #[error("cannot connect to the upstream")]
    Connect(#[source] std::io::Error),
    /// The request was written, or may have been, and no response head came back.
    #[error(transparent)]
    Sent(hyper::Error),
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

struct Inner<B> {
    host: String,
    port: u16,
    idle_timeout: Duration,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<Idle<B>>>,
    sweeping: AtomicBool,
}

/// HTTP/1.1 connections to one `host:port`.
pub struct Http1Pool<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for Http1Pool<B> {
    fn clone(&self) -> Self {
        Http1Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<B> Http1Pool<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// A pool for `host:port`; idle connections close after `idle_timeout`.
    pub fn new(host: &str, port: u16, idle_timeout: Duration, connect_timeout: Duration) -> Self {
        // `[::1]` in a URL is `::1` to connect to.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Http1Pool {
            inner: Arc::new(Inner {
                host,
                port,
                idle_timeout,
                connect_timeout,
                idle: Mutex::new(VecDeque::new()),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) and returns the response head; its body
    /// puts the connection back into the pool when it ends.
    pub async fn send(&self, request: Request<B>) -> Result<Response<UpstreamBody<B>>, PoolError> {
        let mut request = request;
        if let Some(mut sender) = self.checkout().await {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.wrap(response, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written: the idle connection was closing. Once more on a new one.
                    Some(unsent) => request = unsent,
                    None => return Err(PoolError::Sent(e.into_error())),
                },
            }
        }
        let mut sender = self.connect().await?;
        match sender.try_send_request(request).await {
            Ok(response) => Ok(self.wrap(response, sender)),
            // On a new connection even an unsent request counts as maybe sent: the upstream
            // accepted the connection, and which of the two sides gave up first is a race.
            Err(e) => Err(PoolError::Sent(e.into_error())),
        }
    }

    fn wrap(
        &self,
        response: Response<Incoming>,
        sender: SendRequest<B>,
    ) -> Response<UpstreamBody<B>> {
        let (parts, body) = response.into_parts();
        let mut body = UpstreamBody {
            body,
            checkin: Some((sender, Arc::downgrade(&self.inner))),
        };
        if body.body.is_end_stream() {
            body.check_in();
        }
        Response::from_parts(parts, body)
    }

    /// The most recently used idle connection that is still open and ready.
    async fn checkout(&self) -> Option<SendRequest<B>> {
        loop {
            let idle = {
                let mut idle = lock(&self.inner.idle);
                idle.pop_back()
            }?;
            if idle.since.elapsed() >= self.inner.idle_timeout {
                // Everything below it is older still.
                lock(&self.inner.idle).clear();
                return None;
            }
            let mut sender = idle.sender;
            if sender.is_closed() {
                continue;
            }
            // Its last response has been read; the connection task may not have seen that yet.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<B>, PoolError> {
        let inner = &self.inner;
        let connecting = tokio::net::TcpStream::connect((inner.host.as_str(), inner.port));
        let stream = match tokio::time::timeout(inner.connect_timeout, connecting).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(PoolError::Connect(e)),
            Err(_) => {
                return Err(PoolError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", inner.connect_timeout),
                )));
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| PoolError::Connect(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        self.start_sweeper();
        Ok(sender)
    }

    /// Closes connections idle past the timeout even when no request comes to find them.
    fn start_sweeper(&self) {
        if self.inner.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.idle_timeout.max(Duration::from_millis(100)) / 2;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let mut idle = lock(&inner.idle);
                while idle.front().is_some_and(|c| {
                    c.since.elapsed() >= inner.idle_timeout || c.sender.is_closed()
                }) {
                    idle.pop_front();
                }
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The pool's state stays consistent whatever panicked while holding the lock.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An upstream response body. When it has been read to its end, its connection goes back to the
/// pool; dropped before that, the connection closes.
pub struct UpstreamBody<B> {
    body: Incoming,
    checkin: Option<(SendRequest<B>, Weak<Inner<B>>)>,
}

impl<B> std::fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.checkin.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> UpstreamBody<B> {
    /// A body from a connection the pool does not own (hyper-util's client).
    pub fn unpooled(body: Incoming) -> Self {
        UpstreamBody {
            body,
            checkin: None,
        }
    }

    fn check_in(&mut self) {
        let Some((sender, pool)) = self.checkin.take() else {
            return;
        };
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = lock(&pool.idle);
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push_back(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

impl<B: Unpin> Body for UpstreamBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.check_in(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.check_in(),
            // A body that failed leaves its connection unusable: dropping the sender closes it.
            Poll::Ready(Some(Err(_))) => this.checkin = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An upstream that answers `per_connection` requests on each connection, then closes it
    /// (without saying so), counting connections and requests.
    struct Upstream {
        port: u16,
        connections: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
    }

    async fn upstream(per_connection: usize) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    for _ in 0..per_connection {
                        let mut buf = vec![0u8; 4096];
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        let n = r.fetch_add(1, Ordering::SeqCst);
                        let body = format!("{n}");
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    // Give the client time to put the connection back as idle.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            }
        });
        Upstream {
            port,
            connections,
            requests,
        }
    }

    fn request() -> Request<Full<Bytes>> {
        Request::post("/x")
            .header("host", "up")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    async fn body(r: Response<UpstreamBody<Full<Bytes>>>) -> String {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    fn pool(port: u16, idle: Duration) -> Http1Pool<Full<Bytes>> {
        Http1Pool::new("127.0.0.1", port, idle, Duration::from_secs(2))
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_was_read() {
        let up = upstream(100).await;
        let pool = pool(up.port, Duration::from_secs(5));
        for n in 0..5 {
            let r = pool.send(request()).await.unwrap();
            assert_eq!(body(r).await, n.to_string());
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_does_not_return_its_connection() {
        let up = upstream(100).await;
        let pool = pool(up.port, Duration::from_secs(5));
        drop(pool.send(request()).await.unwrap());
        let r = pool.send(request()).await.unwrap();
        assert_eq!(body(r).await, "1");
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let up = upstream(100).await;
        let pool = pool(up.port, Duration::from_millis(200));
        body(pool.send(request()).await.unwrap()).await;
        assert_eq!(lock(&pool.inner.idle).len(), 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(lock(&pool.inner.idle).len(), 0, "the sweeper closed it");
        body(pool.send(request()).await.unwrap()).await;
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_reused_connection_the_upstream_closed_is_replaced_and_the_request_sent_once() {
        // One request per connection, then the upstream hangs up while the client holds it idle.
        let up = upstream(1).await;
        let pool = pool(up.port, Duration::from_secs(5));
        body(pool.send(request()).await.unwrap()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = pool.send(request()).await.unwrap();
        assert_eq!(body(r).await, "1");
        assert_eq!(
            up.requests.load(Ordering::SeqCst),
            2,
            "each request reached it once"
        );
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = pool(port, Duration::from_secs(1))
            .send(request())
            .await
            .unwrap_err();
        assert!(matches!(e, PoolError::Connect(_)), "{e}");
    }
}
