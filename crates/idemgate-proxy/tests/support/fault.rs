//! A fault-injecting upstream on a raw TCP listener: each connection misbehaves in one chosen
//! way, so the proxy meets exactly the failure a test names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How every connection is treated.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Accept, then close at once without reading anything.
    CloseOnAccept,
    /// Read the whole request, then close without answering.
    CloseAfterRequest,
    /// Read the request, send a 200 head promising 1000 bytes and 100 of them, then reset.
    HeadThenReset,
    /// Read the request and answer 200 with a JSON body after the delay.
    AnswerAfter(Duration),
    /// Read each request and answer it with these bytes, as they are.
    Answer(&'static [u8]),
}

/// A loopback address nothing listens on (the port was bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A running fault upstream; stops accepting on drop.
pub struct FaultUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FaultUpstream {
    /// Starts on an OS-chosen loopback port.
    pub async fn start(fault: Fault) -> FaultUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(serve(stream, fault, r));
            }
        });
        FaultUpstream {
            addr,
            connections,
            requests,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Complete requests read so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FaultUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, fault: Fault, requests: Arc<AtomicUsize>) {
    if let Fault::CloseOnAccept = fault {
        drop(stream);
        return;
    }
    let mut buf = Vec::new();
    loop {
        if !read_request(&mut stream, &mut buf).await {
            return;
        }
        requests.fetch_add(1, Ordering::SeqCst);
        match fault {
            Fault::CloseOnAccept | Fault::CloseAfterRequest => return,
            Fault::HeadThenReset => {
                let mut out =
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\n"
                        .to_vec();
                out.extend(std::iter::repeat_n(b'p', 100));
                let _ = stream.write_all(&out).await;
                let _ = stream.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Zero linger makes close send RST instead of FIN.
                let _ = stream.set_zero_linger();
                drop(stream);
                return;
            }
            Fault::Answer(bytes) => {
                if stream.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Fault::AnswerAfter(delay) => {
                tokio::time::sleep(delay).await;
                let body = br#"{"late":true}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                if stream.write_all(head.as_bytes()).await.is_err()
                    || stream.write_all(body).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Reads one request (head plus a `Content-Length` or chunked body) into `buf`, keeping any
/// bytes of a pipelined next request. False on EOF or error before a whole request.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = complete_request_len(buf) {
            buf.drain(..end);
            return true;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn complete_request_len(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let mut content_length = 0usize;
    let mut chunked = false;
    for line in head.lines() {
        if let Some(v) = line.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = line.strip_prefix("transfer-encoding:") {
            chunked = v.contains("chunked");
        }
    }
    if chunked {
        let body = &buf[head_end..];
        let end = body.windows(5).position(|w| w == b"0\r\n\r\n")?;
        return Some(head_end + end + 5);
    }
    (buf.len() >= head_end + content_length).then_some(head_end + content_length)
}
