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
}

/// Every metric idemgate exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels1, Counter>,
    store_ops: HistogramFamily<Labels2>,
    upstream: HistogramFamily<Labels1>,
    in_flight: Gauge,
    fencing_refused: Counter,
    lease_abandoned: Counter,
    lease_takeovers: Counter,
    unreadable: Counter,
    abandoned_finishes: Counter,
    admin_mutations: Family<Labels1, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `idemgate_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("idemgate");
        let requests = Family::<Labels1, Counter>::default();
        registry.register(
            "requests",
            "Requests by what idemgate did with them (executed, replayed, conflict, mismatch, ...)",
            requests.clone(),
        );
        let store_ops: HistogramFamily<Labels2> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "store_operation_duration_seconds",
            "Latency of store operations, by operation and result",
            store_ops.clone(),
        );
        let upstream: HistogramFamily<Labels1> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "upstream_duration_seconds",
            "Time until the upstream's response head (or failure), by result",
            upstream.clone(),
        );
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
        Metrics {
            registry,
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

    /// Attempts executing now.
    pub fn in_flight_now(&self) -> i64 {
        self.in_flight.get()
    }

    /// An upstream call ended.
    pub fn upstream(&self, result: UpstreamResult, elapsed: Duration) {
        let label = match result {
            UpstreamResult::Response => "response",
            UpstreamResult::Unreachable => "unreachable",
            UpstreamResult::NoResponse => "no_response",
            UpstreamResult::Timeout => "timeout",
        };
        self.upstream
            .get_or_create(&[("result", label)])
            .observe(elapsed.as_secs_f64());
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

fn outcome_label(o: RequestOutcome) -> &'static str {
    match o {
        RequestOutcome::Passthrough => "passthrough",
        RequestOutcome::Rejected => "rejected",
        RequestOutcome::Executed => "executed",
        RequestOutcome::Released => "released",
        RequestOutcome::Replayed => "replayed",
        RequestOutcome::Conflict => "conflict",
        RequestOutcome::WaitedReplay => "waited_replay",
        RequestOutcome::Mismatch => "mismatch",
        RequestOutcome::StoreError => "store_error",
        RequestOutcome::FailedOpen => "failed_open",
        _ => "other",
    }
}

impl Observer for Metrics {
    fn wants_timings(&self) -> bool {
        true
    }

    fn request(&self, outcome: RequestOutcome) {
        self.requests
            .get_or_create(&[("outcome", outcome_label(outcome))])
            .inc();
    }

    fn store_op(&self, op: StoreOp, elapsed: Duration, ok: bool) {
        self.store_ops
            .get_or_create(&[
                ("op", op.as_str()),
                ("result", if ok { "ok" } else { "error" }),
            ])
            .observe(elapsed.as_secs_f64());
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
