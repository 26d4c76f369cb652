//! `--access-log`: one line per request, at target [`TARGET`], written once the client's
//! response has ended (or was cut off) **and** the layer has said what it did with the request.
//!
//! The two happen in either order: a streamed response ends only after its outcome is stored,
//! but a client that got its 504 at `--upstream-timeout` is done long before the attempt behind
//! it. Whichever comes second writes the line; an entry dropped with one of them missing (an
//! attempt still running at shutdown) writes what it knows.
//!
//! The line names the record by its id, never by the `Idempotency-Key` or the caller's
//! credentials (SPEC §2), and carries the path without its query string, which can hold secrets.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode, request::Parts};
use http_body::{Body, Frame, SizeHint};
use idemgate::observe::{ReportOutcome, RequestOutcome};
use idemgate::record::RecordId;

use crate::metrics::outcome_label;

/// The tracing target of access lines (e.g. `IDEMGATE_LOG=warn,idemgate::access=info`).
pub const TARGET: &str = "idemgate::access";

/// One request's line, filled in as its parts become known.
pub struct AccessEntry {
    started: Instant,
    client: SocketAddr,
    method: Method,
    path: Box<str>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    outcome: Option<(RequestOutcome, Option<RecordId>)>,
    status: Option<StatusCode>,
    response: Option<ResponseEnd>,
    written: bool,
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
    pub fn start(parts: &Parts, client: SocketAddr) -> (Arc<AccessEntry>, ReportOutcome) {
        let entry = Arc::new(AccessEntry {
            started: Instant::now(),
            client,
            method: parts.method.clone(),
            path: parts.uri.path().into(),
            state: Mutex::new(State::default()),
        });
        let reported = entry.clone();
        let report = ReportOutcome::new(move |outcome, record_id| {
            reported.update(|s| s.outcome = Some((outcome, record_id)));
        });
        (entry, report)
    }

    /// The response head's status.
    pub fn status(&self, status: StatusCode) {
        self.update(|s| s.status = Some(status));
    }

    fn response_ended(&self, body_bytes: u64, complete: bool) {
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
        if !state.written && state.outcome.is_some() && state.response.is_some() {
            state.written = true;
            self.write(&state);
        }
    }

    fn write(&self, state: &State) {
        let outcome = state
            .outcome
            .map_or("unreported", |(o, _)| outcome_label(o));
        let record_id = state
            .outcome
            .and_then(|(_, id)| id)
            .map_or_else(|| "-".to_owned(), |id| id.to_string());
        let status = state.status.map_or(0, |s| s.as_u16());
        let (body_bytes, response, elapsed) = match state.response {
            Some(end) => (
                end.body_bytes,
                if end.complete { "complete" } else { "cut-off" },
                end.elapsed,
            ),
            None => (0, "unfinished", self.started.elapsed()),
        };
        tracing::info!(
            target: TARGET,
            client = %self.client,
            method = %self.method,
            path = %self.path,
            status,
            outcome = %outcome,
            record_id = %record_id,
            body_bytes,
            response = %response,
            duration_ms = %format_args!("{:.3}", elapsed.as_secs_f64() * 1000.0),
        );
    }
}

impl Drop for AccessEntry {
    fn drop(&mut self) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.written {
            self.write(&state);
        }
    }
}

/// A client response body that tells its [`AccessEntry`] how it ended; without an entry
/// (`--access-log` off) it only passes frames on.
pub struct LoggedBody<B: Body> {
    body: B,
    entry: Option<Arc<AccessEntry>>,
    body_bytes: u64,
    ended: bool,
}

impl<B: Body> LoggedBody<B> {
    /// `body`, reported to `entry` when it ends or is dropped.
    pub fn new(body: B, entry: Option<Arc<AccessEntry>>) -> Self {
        LoggedBody {
            body,
            entry,
            body_bytes: 0,
            ended: false,
        }
    }
}

impl<B> Body for LoggedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if self.entry.is_some() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    self.body_bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                Poll::Ready(None) => self.ended = true,
                _ => {}
            }
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

impl<B: Body> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            // hyper stops polling a body that says it is at its end, so that counts too.
            let complete = self.ended || self.body.is_end_stream();
            entry.response_ended(self.body_bytes, complete);
        }
    }
}
