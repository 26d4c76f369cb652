//! Prometheus metrics (`/metrics`), fed by an [`Observer`] the layer reports to, by the
//! forwarder (upstream latency) and by the store wrapper (lease takeovers).

use std::time::Duration;

use idemgate::observe::{Observer, RequestOutcome, StoreOp};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// How an upstream call ended (a label of the upstream histogram).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamResult {
    /// A response head came back.
    Response,
    /// The request was not sent.
    Unreachable,
    /// Sent, no head.
    NoResponse,
    /// No head in time.
    Timeout,
    /// The client's request body failed while it was being sent (a request streamed through).
    ClientBodyFailed,
}

/// Why idemgate closed a client connection (`--client-timeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientClose {
    /// No request in progress for the timeout (idle keep-alive, or a head still arriving).
    Idle,
    /// A response write made no progress for the timeout.
    WriteStalled,
    /// Idle while `--max-connections` held new clients back: closed to make room.
    Drained,
    /// The client sent a request head the HTTP parser refused (hyper answered it 400, 414 or
    /// 431 itself and closed the connection): bytes that are not HTTP, or a head past the
    /// parser's own limits. No request reached idemgate, so no request series counts it.
    Malformed,
}

/// Every metric idemgate exports.
///
/// The labelled series a request touches are created once, here, and kept as handles: a
/// `Family::get_or_create` per event would hash the labels and take the family's lock on every
/// request (four times for a fresh key).
pub struct Metrics {
    registry: Registry,
    /// Indexed by [`outcome_index`].
    requests: [Counter; OUTCOMES.len()],
    /// Indexed by [`op_index`], then ok (0) / error (1).
    store_ops: [[Histogram; 2]; OPS.len()],
    /// Indexed by [`UpstreamResult`] order.
    upstream: [Histogram; UPSTREAM_RESULTS.len()],
    in_flight: Gauge,
    fencing_refused: Counter,
    lease_abandoned: Counter,
    lease_takeovers: Counter,
    unreadable: Counter,
    abandoned_finishes: Counter,
    admin_mutations: Family<Labels1, Counter>,
    /// Indexed by [`ClientClose`] order.
    client_closes: [Counter; 4],
    client_connections: Gauge,
    client_connections_limit: Gauge,
    access_log_dropped: Counter,
}

/// The `outcome` label values of `idemgate_requests_total`, in [`outcome_index`] order.
const OUTCOMES: [&str; 11] = [
    "passthrough",
    "rejected",
    "executed",
    "released",
    "replayed",
    "conflict",
    "waited_replay",
    "mismatch",
    "store_error",
    "failed_open",
    "other",
];

/// The store operations, in [`op_index`] order.
const OPS: [StoreOp; 4] = [
    StoreOp::Acquire,
    StoreOp::Renew,
    StoreOp::Complete,
    StoreOp::Release,
];

/// The `result` label values of the upstream histogram, in [`UpstreamResult`] order.
const UPSTREAM_RESULTS: [&str; 5] = [
    "response",
    "unreachable",
    "no_response",
    "timeout",
    "client_body_failed",
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `idemgate_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("idemgate");
        let requests_family = Family::<Labels1, Counter>::default();
        registry.register(
            "requests",
            "Requests by what idemgate did with them (executed, replayed, conflict, mismatch, ...)",
            requests_family.clone(),
        );
        let requests =
            OUTCOMES.map(|label| requests_family.get_or_create(&[("outcome", label)]).clone());
        let store_ops_family: HistogramFamily<Labels2> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "store_operation_duration_seconds",
            "Latency of store operations, by operation and result",
            store_ops_family.clone(),
        );
        let store_ops = OPS.map(|op| {
            ["ok", "error"].map(|result| {
                store_ops_family
                    .get_or_create(&[("op", op.as_str()), ("result", result)])
                    .clone()
            })
        });
        let upstream_family: HistogramFamily<Labels1> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "upstream_duration_seconds",
            "Time until the upstream's response head (or failure), by result",
            upstream_family.clone(),
        );
        let upstream = UPSTREAM_RESULTS
            .map(|label| upstream_family.get_or_create(&[("result", label)]).clone());
        let in_flight = Gauge::default();
        registry.register(
            "in_flight",
            "Attempts executing upstream right now",
            in_flight.clone(),
        );
        let fencing_refused = Counter::default();
        registry.register(
            "fencing_refusals",
            "complete/renew/release refused because another attempt owns the record",
            fencing_refused.clone(),
        );
        let lease_abandoned = Counter::default();
        registry.register(
            "leases_abandoned",
            "Attempts written off as outcome-unknown after max_lease_hold",
            lease_abandoned.clone(),
        );
        let lease_takeovers = Counter::default();
        registry.register(
            "lease_takeovers",
            "Acquires that found a lapsed lease and turned it into outcome-unknown",
            lease_takeovers.clone(),
        );
        let unreadable = Counter::default();
        registry.register(
            "unreadable_records",
            "Records that could not be decoded (request not executed)",
            unreadable.clone(),
        );
        let abandoned_finishes = Counter::default();
        registry.register(
            "abandoned_completes",
            "Outcomes that could not be stored after retries (queue overflow or gave up)",
            abandoned_finishes.clone(),
        );
        let admin_mutations = Family::<Labels1, Counter>::default();
        registry.register(
            "admin_mutations",
            "Admin API changes to records, by action",
            admin_mutations.clone(),
        );
        let client_closes_family = Family::<Labels1, Counter>::default();
        registry.register(
            "client_connections_closed",
            "Client connections idemgate closed, by reason (idle, write_stalled: --client-timeout; drained: idle while --max-connections held new clients back; malformed: a request head the HTTP parser refused)",
            client_closes_family.clone(),
        );
        let client_closes = ["idle", "write_stalled", "drained", "malformed"].map(|reason| {
            client_closes_family
                .get_or_create(&[("reason", reason)])
                .clone()
        });
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open now",
            client_connections.clone(),
        );
        let client_connections_limit = Gauge::default();
        registry.register(
            "client_connections_limit",
            "Most client connections served at once (--max-connections); more wait in the listen backlog",
            client_connections_limit.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_lines_dropped",
            "Access log lines dropped because standard output did not take them in time (--access-log)",
            access_log_dropped.clone(),
        );
        Metrics {
            registry,
            access_log_dropped,
            client_closes,
            client_connections,
            client_connections_limit,
            requests,
            store_ops,
            upstream,
            in_flight,
            fencing_refused,
            lease_abandoned,
            lease_takeovers,
            unreadable,
            abandoned_finishes,
            admin_mutations,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// idemgate closed a client connection.
    pub fn client_connection_closed(&self, reason: ClientClose) {
        let i = match reason {
            ClientClose::Idle => 0,
            ClientClose::WriteStalled => 1,
            ClientClose::Drained => 2,
            ClientClose::Malformed => 3,
        };
        self.client_closes[i].inc();
    }

    /// An access log line was dropped.
    pub fn access_log_line_dropped(&self) {
        self.access_log_dropped.inc();
    }

    /// A client connection was accepted (`+1`) or closed (`-1`).
    pub fn client_connections_changed(&self, by: i64) {
        self.client_connections.inc_by(by);
    }

    /// The limit on client connections in force.
    pub fn set_client_connections_limit(&self, limit: usize) {
        self.client_connections_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// Attempts executing now.
    pub fn in_flight_now(&self) -> i64 {
        self.in_flight.get()
    }

    /// An upstream call ended.
    pub fn upstream(&self, result: UpstreamResult, elapsed: Duration) {
        let i = match result {
            UpstreamResult::Response => 0,
            UpstreamResult::Unreachable => 1,
            UpstreamResult::NoResponse => 2,
            UpstreamResult::Timeout => 3,
            UpstreamResult::ClientBodyFailed => 4,
        };
        self.upstream[i].observe(elapsed.as_secs_f64());
    }

    /// An acquire turned a lapsed lease into outcome-unknown.
    pub fn lease_takeover(&self) {
        self.lease_takeovers.inc();
    }

    /// An admin API change.
    pub fn admin_mutation(&self, action: &'static str) {
        self.admin_mutations
            .get_or_create(&[("action", action)])
            .inc();
    }
}

/// An outcome's name, as in the `outcome` label of `idemgate_requests_total`.
pub fn outcome_label(o: RequestOutcome) -> &'static str {
    OUTCOMES[outcome_index(o)]
}

/// The position of an outcome's label in [`OUTCOMES`].
fn outcome_index(o: RequestOutcome) -> usize {
    match o {
        RequestOutcome::Passthrough => 0,
        RequestOutcome::Rejected => 1,
        RequestOutcome::Executed => 2,
        RequestOutcome::Released => 3,
        RequestOutcome::Replayed => 4,
        RequestOutcome::Conflict => 5,
        RequestOutcome::WaitedReplay => 6,
        RequestOutcome::Mismatch => 7,
        RequestOutcome::StoreError => 8,
        RequestOutcome::FailedOpen => 9,
        _ => 10,
    }
}

/// The position of an operation in [`OPS`].
fn op_index(op: StoreOp) -> usize {
    match op {
        StoreOp::Acquire => 0,
        StoreOp::Renew => 1,
        StoreOp::Complete => 2,
        StoreOp::Release => 3,
    }
}

impl Observer for Metrics {
    /// The store latency histogram needs the layer to time its store operations.
    fn wants_timings(&self) -> bool {
        true
    }

    fn request(&self, outcome: RequestOutcome) {
        self.requests[outcome_index(outcome)].inc();
    }

    fn store_op(&self, op: StoreOp, elapsed: Duration, ok: bool) {
        self.store_ops[op_index(op)][usize::from(!ok)].observe(elapsed.as_secs_f64());
    }

    fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    fn fencing_refused(&self) {
        self.fencing_refused.inc();
    }

    fn lease_abandoned(&self) {
        self.lease_abandoned.inc();
    }

    fn unreadable_record(&self) {
        self.unreadable.inc();
    }

    fn abandoned_finish(&self) {
        self.abandoned_finishes.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::new();
        m.request(RequestOutcome::Replayed);
        m.request(RequestOutcome::Replayed);
        m.store_op(StoreOp::Acquire, Duration::from_millis(3), true);
        m.upstream(UpstreamResult::Response, Duration::from_millis(20));
        m.in_flight(1);
        m.fencing_refused();
        let text = m.render();
        assert!(
            text.contains("idemgate_requests_total{outcome=\"replayed\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("idemgate_store_operation_duration_seconds_bucket{"),
            "{text}"
        );
        assert!(
            text.contains("idemgate_upstream_duration_seconds_count{result=\"response\"} 1"),
            "{text}"
        );
        assert!(text.contains("idemgate_in_flight 1"), "{text}");
        assert!(text.contains("idemgate_fencing_refusals_total 1"), "{text}");
        for name in [
            "leases_abandoned_total",
            "lease_takeovers_total",
            "unreadable_records_total",
            "abandoned_completes_total",
        ] {
            assert!(
                text.contains(&format!("idemgate_{name} 0")),
                "{name}: {text}"
            );
        }
        assert_eq!(m.in_flight_now(), 1);
    }
}
