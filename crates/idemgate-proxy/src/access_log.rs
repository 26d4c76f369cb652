//! `--access-log`: one line per request on standard output, written once the client's response
//! has ended (or was cut off) **and** the layer has said what it did with the request.
//!
//! The two happen in either order: a streamed response ends only after its outcome is stored,
//! but a client that got its 504 at `--upstream-timeout` is done long before the attempt behind
//! it. Whichever comes second sends the line; an entry dropped with one of them missing (an
//! attempt still running at shutdown) sends what it knows.
//!
//! Lines are not written on the request path: a request hands a small record to a bounded
//! queue, and a thread of the log's own formats and writes them in batches every
//! [`FLUSH_EVERY`]. Through `tracing` each line cost a fifth of a request's CPU (formatting and
//! one `write` per line, on the worker's thread). When standard output stops taking lines and
//! the queue is full, further lines are dropped and counted
//! (`idemgate_access_log_lines_dropped_total`) rather than holding up requests.
//!
//! A head the HTTP parser refused gets a line too, with `-` for the method and path it could
//! not read ([`AccessLog::refused_head`]).
//!
//! A line names the record by its id, never by the `Idempotency-Key` or the caller's
//! credentials (SPEC §2), and carries the path without its query string, which can hold secrets.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use http::{Method, StatusCode, request::Parts};
use idemgate::observe::{ReportOutcome, RequestOutcome};
use idemgate::record::RecordId;

use crate::metrics::{Metrics, outcome_label};

/// How often the writer thread writes what has queued up.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Lines queued before new ones are dropped: three flushes' worth at 50 000 requests a second.
/// The queue is allocated whole at start (~200 bytes a line, ~3 MiB).
pub const QUEUE_LINES: usize = 16_384;

/// The access log: a bounded queue and the thread that writes it out.
pub struct AccessLog {
    queue: SyncSender<AccessRecord>,
    stop: Arc<AtomicBool>,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: Option<Arc<Metrics>>,
}

impl AccessLog {
    /// Lines to standard output.
    pub fn to_stdout(metrics: Option<Arc<Metrics>>) -> std::io::Result<Arc<AccessLog>> {
        AccessLog::start(Box::new(std::io::stdout()), QUEUE_LINES, metrics)
    }

    /// Lines to `out`, at most `queue` of them waiting.
    pub fn start(
        out: Box<dyn Write + Send>,
        queue: usize,
        metrics: Option<Arc<Metrics>>,
    ) -> std::io::Result<Arc<AccessLog>> {
        let (tx, rx) = sync_channel(queue);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let writer = std::thread::Builder::new()
            .name("idemgate-access-log".into())
            .spawn(move || write_batches(rx, out, &stopping))?;
        Ok(Arc::new(AccessLog {
            queue: tx,
            stop,
            writer: Mutex::new(Some(writer)),
            metrics,
        }))
    }

    fn submit(&self, record: AccessRecord) {
        match self.queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                if let Some(m) = &self.metrics {
                    m.access_log_line_dropped();
                }
            }
        }
    }

    /// The line of a request head the HTTP parser refused, answered with `status` and a
    /// problem of `body_bytes` (no method, path or record is known; see
    /// [`crate::parser_refusals`]).
    pub fn refused_head(&self, client: SocketAddr, status: u16, body_bytes: u64) {
        self.submit(AccessRecord {
            at: SystemTime::now(),
            client,
            method: None,
            path: "-".into(),
            status: Some(status),
            outcome: outcome_label(RequestOutcome::Rejected),
            record_id: None,
            body_bytes,
            response: "complete",
            elapsed: Duration::ZERO,
        });
    }

    /// Writes what is queued and stops the writer; waits for it at most `within` (standard
    /// output may be blocked). Lines sent after this are dropped.
    pub async fn close(&self, within: Duration) {
        self.stop.store(true, Ordering::Release);
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(writer) = writer else { return };
        writer.thread().unpark();
        let deadline = Instant::now() + within;
        while !writer.is_finished() {
            if Instant::now() >= deadline {
                tracing::warn!("the access log's output is blocked; its last lines may be lost");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = writer.join();
    }
}

/// The writer thread: every [`FLUSH_EVERY`] (or when told to stop), formats what queued up and
/// writes it in one go.
fn write_batches(queue: Receiver<AccessRecord>, mut out: Box<dyn Write + Send>, stop: &AtomicBool) {
    let mut batch = String::with_capacity(64 * 1024);
    loop {
        // Read before draining, so a stop seen here comes after every line sent before it.
        let stopping = stop.load(Ordering::Acquire);
        let disconnected = loop {
            match queue.try_recv() {
                Ok(record) => record.format(&mut batch),
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if !batch.is_empty() {
            // A failed write loses this batch; the next one is tried again.
            let _ = out.write_all(batch.as_bytes()).and_then(|()| out.flush());
            batch.clear();
        }
        if stopping || disconnected {
            return;
        }
        std::thread::park_timeout(FLUSH_EVERY);
    }
}

/// What a line says, handed to the writer thread.
struct AccessRecord {
    at: SystemTime,
    client: SocketAddr,
    /// `None`: the request's head could not be parsed.
    method: Option<Method>,
    path: Box<str>,
    /// `None`: no response head went out.
    status: Option<u16>,
    outcome: &'static str,
    record_id: Option<RecordId>,
    body_bytes: u64,
    response: &'static str,
    elapsed: Duration,
}

impl AccessRecord {
    fn format(&self, out: &mut String) {
        let _ = write!(
            out,
            "{} client={} method={} path={} status=",
            humantime::format_rfc3339_millis(self.at),
            self.client,
            self.method.as_ref().map_or("-", Method::as_str),
            self.path
        );
        match self.status {
            Some(status) => {
                let _ = write!(out, "{status}");
            }
            None => out.push('-'),
        }
        let _ = write!(out, " outcome={} record_id=", self.outcome);
        let mut hex = [0u8; 64];
        match &self.record_id {
            Some(id) if hex::encode_to_slice(id.0, &mut hex).is_ok() => {
                out.push_str(std::str::from_utf8(&hex).unwrap_or("-"));
            }
            _ => out.push('-'),
        }
        let micros = self.elapsed.as_micros();
        let _ = writeln!(
            out,
            " body_bytes={} response={} duration_ms={}.{:03}",
            self.body_bytes,
            self.response,
            micros / 1000,
            micros % 1000
        );
    }
}

/// One request's line, filled in as its parts become known.
pub struct AccessEntry {
    log: Arc<AccessLog>,
    at: SystemTime,
    started: Instant,
    client: SocketAddr,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Moved into the line when it is sent (once).
    method: Method,
    path: Box<str>,
    outcome: Option<(RequestOutcome, Option<RecordId>)>,
    status: Option<StatusCode>,
    response: Option<ResponseEnd>,
    sent: bool,
}

/// How the client's response ended.
#[derive(Clone, Copy)]
struct ResponseEnd {
    body_bytes: u64,
    /// The body was sent to its end (not cut off by an error or the client leaving).
    complete: bool,
    elapsed: Duration,
}

impl AccessEntry {
    /// The entry of a request arriving now from `client`; the returned [`ReportOutcome`] goes
    /// into the request's extensions for the layer.
    pub fn start(
        log: &Arc<AccessLog>,
        parts: &Parts,
        client: SocketAddr,
    ) -> (Arc<AccessEntry>, ReportOutcome) {
        let entry = Arc::new(AccessEntry {
            log: log.clone(),
            at: SystemTime::now(),
            started: Instant::now(),
            client,
            state: Mutex::new(State {
                method: parts.method.clone(),
                path: parts.uri.path().into(),
                ..State::default()
            }),
        });
        let reported = entry.clone();
        let report = ReportOutcome::new(move |outcome, record_id| {
            reported.outcome(outcome, record_id);
        });
        (entry, report)
    }

    /// What became of the request: told by the layer through the [`ReportOutcome`], or by the
    /// proxy itself when it answered before the layer saw the request.
    pub fn outcome(&self, outcome: RequestOutcome, record_id: Option<RecordId>) {
        self.update(|s| s.outcome = Some((outcome, record_id)));
    }

    /// The response head's status.
    pub fn status(&self, status: StatusCode) {
        self.update(|s| s.status = Some(status));
    }

    /// The client's response body ended (`complete`: sent to its end) or was dropped.
    pub(crate) fn response_ended(&self, body_bytes: u64, complete: bool) {
        let end = ResponseEnd {
            body_bytes,
            complete,
            elapsed: self.started.elapsed(),
        };
        self.update(|s| s.response = Some(end));
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        // A panic elsewhere while the lock was held leaves nothing half-written worth losing
        // the line over.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut state);
        if !state.sent && state.outcome.is_some() && state.response.is_some() {
            state.sent = true;
            self.send(&mut state);
        }
    }

    fn send(&self, state: &mut State) {
        let (body_bytes, response, elapsed) = match state.response {
            Some(end) => (
                end.body_bytes,
                if end.complete { "complete" } else { "cut-off" },
                end.elapsed,
            ),
            None => (0, "unfinished", self.started.elapsed()),
        };
        self.log.submit(AccessRecord {
            at: self.at,
            client: self.client,
            method: Some(std::mem::take(&mut state.method)),
            path: std::mem::take(&mut state.path),
            status: state.status.map(|s| s.as_u16()),
            outcome: state
                .outcome
                .map_or("unreported", |(o, _)| outcome_label(o)),
            record_id: state.outcome.and_then(|(_, id)| id),
            body_bytes,
            response,
            elapsed,
        });
    }
}

impl Drop for AccessEntry {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.sent {
            self.send(&mut state);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Barrier;
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn lines_start_with_an_rfc3339_utc_timestamp_with_milliseconds() {
        let line = |secs: u64, millis: u64| {
            let mut r = record(1);
            r.at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
            let mut out = String::new();
            r.format(&mut out);
            out.split_once(' ').map(|(at, _)| at.to_owned()).unwrap()
        };
        assert_eq!(line(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(line(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(line(1_795_934_113, 923), "2026-11-29T06:35:13.923Z");
    }

    fn record(n: u64) -> AccessRecord {
        AccessRecord {
            at: UNIX_EPOCH,
            client: "127.0.0.1:4000".parse().unwrap(),
            method: Some(Method::POST),
            path: "/orders".into(),
            status: Some(201),
            outcome: "executed",
            record_id: (n == 0).then_some(RecordId([0xab; 32])),
            body_bytes: n,
            response: "complete",
            elapsed: Duration::from_micros(1_234),
        }
    }

    /// Output that waits at `gate` before its first write, and keeps what it is given.
    struct GatedOutput {
        gate: Option<Arc<Barrier>>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for GatedOutput {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(gate) = self.gate.take() {
                gate.wait();
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_blocked_output_drops_and_counts_lines_instead_of_holding_up_requests() {
        let gate = Arc::new(Barrier::new(2));
        let written = Arc::new(Mutex::new(Vec::new()));
        let out = GatedOutput {
            gate: Some(gate.clone()),
            written: written.clone(),
        };
        let metrics = Arc::new(Metrics::new());
        let log = AccessLog::start(Box::new(out), 4, Some(metrics.clone())).unwrap();
        log.submit(record(0));
        let mut submitted = 1;
        // The writer takes what is queued and blocks writing it; the queue then fills up.
        let blocked = Instant::now();
        while !metrics
            .render()
            .contains("access_log_lines_dropped_total 1")
        {
            assert!(
                blocked.elapsed() < Duration::from_secs(10),
                "nothing dropped"
            );
            log.submit(record(1));
            submitted += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        gate.wait();
        log.close(Duration::from_secs(10)).await;
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            submitted - 1,
            "every line but the one dropped is written, whole: {lines:?}"
        );
        assert_eq!(
            lines[0],
            "1970-01-01T00:00:00.000Z client=127.0.0.1:4000 method=POST path=/orders status=201 \
             outcome=executed record_id=abababababababababababababababababababababababababababababababab \
             body_bytes=0 response=complete duration_ms=1.234"
        );
        // Lines sent after close are dropped and counted too.
        log.submit(record(2));
        assert!(
            metrics
                .render()
                .contains("access_log_lines_dropped_total 2")
        );
    }
}
