//! An HTTP/2 upstream over plain TCP (h2c, prior knowledge), built on the `h2` crate so a test
//! can make it fail a stream the way SPEC §6 tells apart: refused unprocessed (`REFUSED_STREAM`,
//! `GOAWAY` below the stream) or processed and then lost (reset, or `GOAWAY` above the stream
//! and the connection closed without an answer).
//!
//! Every stream it processes counts as an execution, and the answer (201, JSON) carries that
//! count, so a second execution shows in the body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use h2::server::SendResponse;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How the first stream (or connection) fails; everything after it is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H2Fault {
    /// Nothing fails.
    None,
    /// `RST_STREAM(REFUSED_STREAM)` on the first stream, before anything of it is processed.
    RefuseFirstStream,
    /// On the first connection, `GOAWAY(last_stream_id = 0, NO_ERROR)` before any stream is
    /// read: every stream the client opens on it is above the last one processed.
    GoAwayBeforeFirstStream,
    /// The first stream is processed, then a graceful `GOAWAY` (which covers it) and the
    /// connection closes without an answer.
    ProcessFirstThenGoAwayAndClose,
    /// The first stream is processed, then `RST_STREAM(INTERNAL_ERROR)`.
    ProcessFirstThenReset,
}

struct State {
    fault: H2Fault,
    connections: AtomicUsize,
    streams: AtomicUsize,
    executions: AtomicUsize,
}

/// A running h2c upstream; stops accepting on drop.
pub struct H2cUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl H2cUpstream {
    /// Starts on an OS-chosen loopback port.
    pub async fn start(fault: H2Fault) -> H2cUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind h2c upstream");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            fault,
            connections: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            executions: AtomicUsize::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, st.clone()));
            }
        });
        H2cUpstream { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Streams processed (the request read and acted on), whatever answer they got.
    pub fn executions(&self) -> usize {
        self.state.executions.load(Ordering::SeqCst)
    }

    /// Streams opened by the client that the upstream saw, processed or not.
    pub fn streams(&self) -> usize {
        self.state.streams.load(Ordering::SeqCst)
    }
}

impl Drop for H2cUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, state: Arc<State>) {
    let Ok(mut conn) = h2::server::handshake(stream).await else {
        return;
    };
    let first_connection = state.connections.fetch_add(1, Ordering::SeqCst) == 0;
    if first_connection && state.fault == H2Fault::GoAwayBeforeFirstStream {
        // Nothing has been read yet, so the GOAWAY's last stream id is 0.
        conn.abrupt_shutdown(Reason::NO_ERROR);
        while let Some(request) = conn.accept().await {
            if request.is_ok() {
                state.streams.fetch_add(1, Ordering::SeqCst);
            }
        }
        // Linger before closing, as servers do after a GOAWAY: closing a socket with the
        // client's frames unread resets it, and the reset can destroy the GOAWAY in the
        // client's receive buffer, leaving it only a broken connection (maybe sent).
        tokio::time::sleep(Duration::from_millis(500)).await;
        return;
    }
    while let Some(accepted) = conn.accept().await {
        let Ok((request, respond)) = accepted else {
            return;
        };
        let first_stream = state.streams.fetch_add(1, Ordering::SeqCst) == 0;
        match (first_stream, state.fault) {
            (true, H2Fault::RefuseFirstStream) => {
                let mut respond = respond;
                respond.send_reset(Reason::REFUSED_STREAM);
            }
            (true, H2Fault::ProcessFirstThenReset | H2Fault::ProcessFirstThenGoAwayAndClose) => {
                if !read_body_driving(&mut conn, request.into_body()).await {
                    return;
                }
                state.executions.fetch_add(1, Ordering::SeqCst);
                if state.fault == H2Fault::ProcessFirstThenReset {
                    let mut respond = respond;
                    respond.send_reset(Reason::INTERNAL_ERROR);
                    continue;
                }
                conn.graceful_shutdown();
                // Drive the connection long enough to send both GOAWAY frames (the second one
                // after a PING round trip), then drop it with the stream still open: the socket
                // closes and no RST_STREAM is sent for it.
                let _ = tokio::time::timeout(Duration::from_millis(300), conn.accept()).await;
                drop(conn);
                drop(respond);
                return;
            }
            _ => {
                let state = state.clone();
                tokio::spawn(async move {
                    read_body(request.into_body()).await;
                    let n = state.executions.fetch_add(1, Ordering::SeqCst) + 1;
                    answer(respond, n);
                });
            }
        }
    }
}

/// Reads a body while driving the connection that feeds it (this task owns the connection, and
/// a body's frames arrive only while it is polled). `false` when the connection ended first.
async fn read_body_driving(
    conn: &mut h2::server::Connection<TcpStream, Bytes>,
    body: h2::RecvStream,
) -> bool {
    let read = read_body(body);
    tokio::pin!(read);
    loop {
        tokio::select! {
            () = &mut read => return true,
            next = conn.accept() => match next {
                // The fault is on the first stream; a stream opened meanwhile is refused.
                Some(Ok((_, mut respond))) => respond.send_reset(Reason::REFUSED_STREAM),
                Some(Err(_)) | None => return false,
            },
        }
    }
}

async fn read_body(mut body: h2::RecvStream) {
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
    }
}

fn answer(mut respond: SendResponse<Bytes>, execution: usize) {
    let head = http::Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .body(())
        .expect("response head");
    if let Ok(mut send) = respond.send_response(head, false) {
        let body = format!("{{\"execution\":{execution}}}");
        let _ = send.send_data(Bytes::from(body), true);
    }
}
