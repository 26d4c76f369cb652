//! Hooks for metrics and logs (SPEC §9 `/metrics`).
//!
//! The layer reports what it did to an [`Observer`]; the proxy implements one that feeds
//! Prometheus counters and histograms. Every method has an empty default, so an observer
//! implements only what it records. The default observer, [`NoopObserver`], costs nothing.

use std::sync::Arc;
use std::time::Duration;

use crate::record::RecordId;

/// What the layer did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RequestOutcome {
    /// Not protected (method, route, no key, `passthrough` scope): passed through untouched.
    Passthrough,
    /// Refused before any store access (bad key, missing scope, body too large or stalled).
    Rejected,
    /// Executed for the first time, and the outcome stored.
    Executed,
    /// Executed, and the key released (release status, upstream not reached, error policy).
    Released,
    /// A stored outcome was replayed.
    Replayed,
    /// A concurrent duplicate got 409.
    Conflict,
    /// A concurrent duplicate waited and then got the first attempt's outcome.
    WaitedReplay,
    /// Same key, different request: 422.
    Mismatch,
    /// The store failed: 503 (or 500 for an unreadable record).
    StoreError,
    /// The store failed and `fail_open` let the request through unprotected.
    FailedOpen,
}

/// Store operations, for latency histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreOp {
    /// `acquire`
    Acquire,
    /// `renew`
    Renew,
    /// `complete`
    Complete,
    /// `release`
    Release,
}

impl StoreOp {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Acquire => "acquire",
            StoreOp::Renew => "renew",
            StoreOp::Complete => "complete",
            StoreOp::Release => "release",
        }
    }
}

/// Receives the layer's events. Implementations must be cheap: they run on the request path.
pub trait Observer: Send + Sync + 'static {
    /// Whether [`Observer::store_op`] wants latencies; when `false` (the default) the layer does
    /// not read the clock around store operations.
    fn wants_timings(&self) -> bool {
        false
    }
    /// A request finished its way through the layer.
    fn request(&self, outcome: RequestOutcome) {
        let _ = outcome;
    }
    /// A store operation finished (`ok = false` for an error).
    fn store_op(&self, op: StoreOp, elapsed: Duration, ok: bool) {
        let _ = (op, elapsed, ok);
    }
    /// An attempt started (+1) or finished (-1) executing.
    fn in_flight(&self, delta: i64) {
        let _ = delta;
    }
    /// The store refused a `complete` or `renew` because another attempt owns the record.
    fn fencing_refused(&self) {}
    /// An attempt hit `max_lease_hold` and was written off as outcome-unknown.
    fn lease_abandoned(&self) {}
    /// A record could not be decoded.
    fn unreadable_record(&self) {}
    /// A `complete`/`release` could not be retried (queue overflow or gave up).
    fn abandoned_finish(&self) {}
}

/// An observer that records nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopObserver;

impl Observer for NoopObserver {}

/// Tells the sender of one request what the layer did with it, for a per-request (access) log.
///
/// Insert one into a request's extensions; the layer takes it out before the inner service sees
/// the request and calls it once, with the outcome the [`Observer`] gets and the record's id
/// where there is a record. An executed request is reported when its attempt is done (outcome
/// stored or key released), which can be after the client's response has ended; an attempt
/// still running at a runtime shutdown may never be reported. Absent, it costs the layer one
/// extensions lookup.
///
/// ```
/// use idemgate::observe::{ReportOutcome, RequestOutcome};
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(ReportOutcome::new(|outcome, record_id| {
///     println!("{outcome:?} {}", record_id.map(|id| id.to_string()).unwrap_or_default());
/// }));
/// ```
#[derive(Clone)]
pub struct ReportOutcome(Arc<dyn Fn(RequestOutcome, Option<RecordId>) + Send + Sync>);

impl ReportOutcome {
    /// Calls `report` with the request's outcome.
    pub fn new(report: impl Fn(RequestOutcome, Option<RecordId>) + Send + Sync + 'static) -> Self {
        ReportOutcome(Arc::new(report))
    }

    pub(crate) fn report(self, outcome: RequestOutcome, record_id: Option<RecordId>) {
        (self.0)(outcome, record_id);
    }
}

impl std::fmt::Debug for ReportOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReportOutcome")
    }
}
