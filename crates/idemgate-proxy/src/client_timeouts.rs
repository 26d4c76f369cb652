//! How long idemgate waits on a client connection (`--client-timeout`).
//!
//! Two waits are bounded, so that clients that stall (or a slowloris attack) cannot hold
//! connections and their buffers forever:
//!
//! - **No request in progress**: from the accept, or from the end of the previous response,
//!   until a request head has been read completely. This covers keep-alive idle time and a head
//!   that trickles in. The connection is then closed: nothing was executed for it, since a
//!   request counts as in progress from the moment its head is dispatched.
//! - **A response write that makes no progress** (the client stopped reading it): the write
//!   fails, and the connection closes. The outcome is idemgate's either way: it is stored
//!   regardless of what the client reads.
//!
//! The same watchdog closes idle connections early when `--max-connections` holds new clients
//! back (a drain, see [`close_when_idle`]).
//!
//! Neither wait costs a timer per request: the idle watchdog is one sleep per connection that
//! wakes at most once per timeout and reads, when it does, what the requests left behind (a
//! counter and a timestamp); the write deadline is armed only when a write would block.
//! (hyper's own `header_read_timeout` arms a boxed sleep for every request head: +2.2 %
//! instructions per request on `scripts/bench-proxy-instructions`.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use crate::metrics::{ClientClose, Metrics};

/// What the requests of one client connection leave for its idle watchdog.
#[derive(Debug)]
pub struct Activity {
    /// Requests dispatched whose response has not ended (or been dropped).
    in_progress: AtomicUsize,
    /// When the last of them ended, in milliseconds since `opened`.
    idle_since_ms: AtomicU64,
    opened: Instant,
}

impl Activity {
    /// The activity of a connection accepted now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_progress: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            opened: Instant::now(),
        })
    }

    /// Marks a request in progress until the returned guard is dropped; the guard goes with the
    /// request's future and then with its response body.
    pub fn begin(self: &Arc<Self>) -> InProgress {
        self.in_progress.fetch_add(1, Ordering::Relaxed);
        InProgress(self.clone())
    }

    /// When the connection became idle, or `None` while a request is in progress.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_progress.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = self.idle_since_ms.load(Ordering::Relaxed);
        Some(self.opened + Duration::from_millis(ms))
    }
}

/// A request in progress on its connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let activity = &self.0;
        // Rounded up, so the connection never closes early.
        let ms = u64::try_from(activity.opened.elapsed().as_millis() + 1).unwrap_or(u64::MAX);
        activity.idle_since_ms.fetch_max(ms, Ordering::Relaxed);
        activity.in_progress.fetch_sub(1, Ordering::Release);
    }
}

/// How long a connection must have been idle for a drain to close it: a keep-alive client
/// between two quick requests is left alone, a connection that never sends one is not.
pub const DRAIN_MIN_IDLE: Duration = Duration::from_secs(1);

/// Watches the task serving a client connection, and aborts it (which closes the connection)
/// once no request has been in progress on it for `timeout`, or, when `drain` signals (the
/// connection limit holds new clients back), once it has been idle for [`DRAIN_MIN_IDLE`].
///
/// The watchdog is a task of its own, woken only by its timer, a drain and the connection's
/// end, so a request costs the connection task no extra poll. It must run on the connection
/// task's thread (the proxy's workers are single-threaded runtimes): then the connection task
/// cannot dispatch a request between the watchdog finding it idle and aborting it.
pub fn close_when_idle(
    connection: JoinHandle<()>,
    activity: Arc<Activity>,
    timeout: Duration,
    mut drain: tokio::sync::watch::Receiver<()>,
    metrics: Option<Arc<Metrics>>,
) {
    // Only drains signalled from now on concern this connection.
    drain.mark_unchanged();
    tokio::spawn(async move {
        let mut connection = connection;
        let idle = idle(&activity, timeout);
        tokio::pin!(idle);
        // No more drains once the accept loop is gone.
        let mut drains = true;
        let reason = loop {
            tokio::select! {
                _ = &mut connection => return,
                () = &mut idle => break ClientClose::Idle,
                signalled = drain.changed(), if drains => {
                    if signalled.is_err() {
                        drains = false;
                    } else if activity
                        .idle_since()
                        .is_some_and(|since| since.elapsed() >= DRAIN_MIN_IDLE)
                    {
                        break ClientClose::Drained;
                    }
                }
            }
        };
        connection.abort();
        if let Some(m) = &metrics {
            m.client_connection_closed(reason);
        }
        tracing::debug!(?reason, "idle client connection closed");
    });
}

/// Resolves once the connection has had no request in progress for `timeout`.
pub async fn idle(activity: &Activity, timeout: Duration) {
    let sleep = tokio::time::sleep(timeout);
    tokio::pin!(sleep);
    loop {
        sleep.as_mut().await;
        let now = Instant::now();
        let next = match activity.idle_since() {
            // Busy: looked at again a timeout from now. A request that ends before then leaves
            // its end time, so the connection still gets a whole timeout of idleness after it.
            None => now + timeout,
            Some(since) => since + timeout,
        };
        if next <= now {
            return;
        }
        sleep.as_mut().reset(next);
    }
}

/// A client stream whose writes fail once one has waited `timeout` without progress.
pub struct WriteDeadline<S> {
    stream: S,
    timeout: Duration,
    /// Armed while a write waits; kept (disarmed) between stalls so a connection allocates it
    /// at most once.
    stall: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// Counts the stall once, however often the failed write is polled again.
    metrics: Option<Arc<Metrics>>,
}

impl<S> WriteDeadline<S> {
    /// `stream` with writes bounded by `timeout`; a stall is counted in `metrics`.
    pub fn new(stream: S, timeout: Duration, metrics: Option<Arc<Metrics>>) -> Self {
        WriteDeadline {
            stream,
            timeout,
            stall: None,
            armed: false,
            metrics,
        }
    }

    /// Turns a write's `Pending` into a timeout error once it has lasted `timeout`.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let stall = match &mut self.stall {
            Some(stall) => {
                if !self.armed {
                    stall.as_mut().reset(Instant::now() + self.timeout);
                }
                stall
            }
            None => self
                .stall
                .insert(Box::pin(tokio::time::sleep(self.timeout))),
        };
        self.armed = true;
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if let Some(m) = self.metrics.take() {
                    m.client_connection_closed(ClientClose::WriteStalled);
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client read nothing of its response within --client-timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn written<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => self.pending(cx),
            ready => {
                self.armed = false;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.written(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_the_last_request_to_end_then_a_full_timeout() {
        let timeout = Duration::from_secs(10);
        let activity = Activity::new();
        let start = Instant::now();
        let request = activity.begin();
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move { idle(&activity, timeout).await }
        });
        // In progress through two timeouts: still open.
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!watchdog.is_finished());
        drop(request);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            !watchdog.is_finished(),
            "closed before a full timeout of idleness"
        );
        let closed_at = {
            watchdog.await.unwrap_or_default();
            Instant::now()
        };
        let idle_for = closed_at - (start + Duration::from_secs(25));
        assert!(
            idle_for >= timeout && idle_for <= timeout + Duration::from_millis(10),
            "{idle_for:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_sends_a_request_closes_after_the_timeout() {
        let activity = Activity::new();
        let start = Instant::now();
        idle(&activity, Duration::from_secs(3)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_requests_keep_it_busy_until_the_last_ends() {
        let timeout = Duration::from_secs(5);
        let activity = Activity::new();
        let a = activity.begin();
        let b = activity.begin();
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move { idle(&activity, timeout).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(a);
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert!(!watchdog.is_finished(), "one request was still in progress");
        drop(b);
        tokio::time::sleep(Duration::from_millis(4_900)).await;
        assert!(!watchdog.is_finished());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(watchdog.is_finished());
    }

    /// A writer whose peer never reads: every write is pending.
    struct Stalled;

    impl AsyncRead for Stalled {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Stalled {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_never_cut_off() {
        use tokio::io::AsyncWriteExt;
        // A 16-byte pipe drained 16 bytes every 3 s: each write waits 3 s, below the 4 s
        // deadline, while the whole write takes far longer than 4 s.
        let (near, mut far) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            let mut chunk = [0u8; 16];
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                match far.read(&mut chunk).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let mut stream = WriteDeadline::new(near, Duration::from_secs(4), None);
        let start = Instant::now();
        let message = [7u8; 160];
        stream
            .write_all(&message)
            .await
            .map_err(|e| e.kind())
            .unwrap_or_else(|k| {
                panic!("a write making progress every 3 s failed: {k:?}");
            });
        assert!(start.elapsed() >= Duration::from_secs(24));
        drop(stream);
        assert_eq!(reader.await.unwrap_or_default(), message.to_vec());
    }

    #[tokio::test(start_paused = true)]
    async fn close_when_idle_aborts_an_idle_connection_and_spares_a_busy_one() {
        let timeout = Duration::from_secs(2);
        let idle_activity = Activity::new();
        let idle_conn = tokio::spawn(std::future::pending::<()>());
        let idle_abort = idle_conn.abort_handle();
        let (_drain, drains) = tokio::sync::watch::channel(());
        close_when_idle(idle_conn, idle_activity, timeout, drains.clone(), None);
        let busy_activity = Activity::new();
        let request = busy_activity.begin();
        let busy_conn = tokio::spawn(std::future::pending::<()>());
        let busy_abort = busy_conn.abort_handle();
        close_when_idle(busy_conn, busy_activity, timeout, drains, None);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            idle_abort.is_finished(),
            "the idle connection was not closed"
        );
        assert!(
            !busy_abort.is_finished(),
            "a connection with a request in progress was closed"
        );
        drop(request);
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        assert!(busy_abort.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_closes_only_connections_idle_for_a_while() {
        let timeout = Duration::from_secs(60);
        let (drain, drains) = tokio::sync::watch::channel(());
        let watch = |activity: &Arc<Activity>| {
            let conn = tokio::spawn(std::future::pending::<()>());
            let abort = conn.abort_handle();
            close_when_idle(conn, activity.clone(), timeout, drains.clone(), None);
            abort
        };
        let long_idle = watch(&Activity::new());
        let busy_activity = Activity::new();
        let request = busy_activity.begin();
        let busy = watch(&busy_activity);
        tokio::time::sleep(DRAIN_MIN_IDLE + Duration::from_millis(100)).await;
        // Idle since now: too recently for a drain.
        let recent_activity = Activity::new();
        let recent = watch(&recent_activity);
        drop(recent_activity.begin());
        tokio::task::yield_now().await;

        drain.send_replace(());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(long_idle.is_finished(), "a long-idle connection survived");
        assert!(
            !busy.is_finished(),
            "a connection with a request in progress was drained"
        );
        assert!(
            !recent.is_finished(),
            "a connection idle for only a moment was drained"
        );

        // A later drain finds the busy one done and idle long enough.
        drop(request);
        tokio::time::sleep(DRAIN_MIN_IDLE + Duration::from_millis(100)).await;
        drain.send_replace(());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(busy.is_finished());
        assert!(recent.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_timeout() {
        use tokio::io::AsyncWriteExt;
        let mut stream = WriteDeadline::new(Stalled, Duration::from_secs(4), None);
        let start = Instant::now();
        let err = stream.write_all(b"HTTP/1.1 200 OK\r\n").await.err();
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }
}
