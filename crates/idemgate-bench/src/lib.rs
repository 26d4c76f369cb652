//! The measuring part of idemgate's store benchmark (`benches/stores.rs`, run with
//! `cargo bench -p idemgate-bench --bench stores`; see `docs/BENCHMARKS.md`).
//!
//! A *cell* runs one workload at one concurrency against one store: `concurrency` tokio tasks
//! share the store and each loops until the cell's end.
//!
//! - [`fresh`]: the store work of a first request, `acquire` of a new id then `complete` with
//!   [`bench_outcome`]. One sample is the pair.
//! - [`replay`]: the store work of a retry, `acquire` of an id completed earlier (answered
//!   `Completed`). One sample is that one `acquire`.
//!
//! Throughput counts the samples that *finished* inside the measured window (after the
//! warm-up), divided by the window: steady-state completions per second, without the bias of
//! counting or dropping the operations still in flight at either edge. Latencies are those same
//! samples. A store error or an answer other than the expected one is counted as an error, never
//! as a sample.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idemgate::record::{Fingerprint, Outcome, RecordId, ResponseHead, Token};
use idemgate::store::{Acquire, AcquireRequest, Completion, LeaseExpiry, Store};

/// The lease every attempt takes: long enough that nothing lapses during a run.
const LEASE: Duration = Duration::from_secs(30);
/// Retention of completed records: the default route TTL, so nothing expires during a run.
const RETENTION: Duration = Duration::from_secs(86_400);

/// How long each cell runs.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Run but not measured first: connection pools fill, caches and files warm up.
    pub warmup: Duration,
    /// The measured window.
    pub measure: Duration,
}

/// The outcome every fresh request stores: a `201` with a JSON body, about 200 bytes in
/// [`Outcome::encode`]'s format (the size of a typical payment-API answer).
pub fn bench_outcome() -> Outcome {
    let body = br#"{"id":"pay_8f3a1c2e","object":"payment","amount":4200,"currency":"eur","status":"succeeded","customer":"cus_91b2","created":1795000000}"#;
    Outcome::Response {
        head: ResponseHead {
            status: 201,
            headers: vec![
                (
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ),
                (
                    "location".into(),
                    Bytes::from_static(b"/v1/payments/pay_8f3a1c2e"),
                ),
            ],
        },
        body: Bytes::from_static(body),
    }
}

/// The fingerprint every request of a run carries (a replay must match its first attempt).
pub const FINGERPRINT: Fingerprint = Fingerprint([0x5a; 32]);

/// Record ids for one store: the `n`-th id of a run is a fixed function of a per-run nonce and
/// `n`, so the replay workload can find again the ids the fresh cells completed.
#[derive(Debug)]
pub struct Keys {
    nonce: u64,
    next: AtomicU64,
}

impl Keys {
    /// Ids no earlier run used (a random nonce).
    pub fn new() -> Self {
        let t = Token::random().0;
        let mut nonce = [0u8; 8];
        nonce.copy_from_slice(&t[..8]);
        Keys {
            nonce: u64::from_le_bytes(nonce),
            next: AtomicU64::new(0),
        }
    }

    /// A new id, never handed out before by this `Keys`.
    pub fn fresh(&self) -> RecordId {
        self.nth(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// How many ids [`fresh`](Self::fresh) has handed out.
    pub fn issued(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// The `n`-th id. Real ids are SHA-256 digests, spread uniformly over the key space (which
    /// matters to B-trees: sequential keys would always append at the right edge); a splitmix64
    /// expansion of `nonce + n` looks the same to a store and costs a few ns instead of a
    /// SHA-256.
    pub fn nth(&self, n: u64) -> RecordId {
        let mut state = self.nonce ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut id = [0u8; 32];
        for chunk in id.chunks_exact_mut(8) {
            chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
        }
        RecordId(id)
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new()
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What one cell measured.
#[derive(Debug, Clone, Default)]
pub struct CellResult {
    /// Samples finished inside the measured window.
    pub samples: u64,
    /// The measured window.
    pub window: Duration,
    /// Errors and unexpected answers, over the whole cell (warm-up included).
    pub errors: u64,
    /// The first error, for the report.
    pub first_error: Option<String>,
    /// Latency of each sample in nanoseconds, sorted.
    latencies_ns: Vec<u64>,
}

impl CellResult {
    /// Samples per second.
    pub fn rate(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.samples as f64 / secs
        } else {
            0.0
        }
    }

    /// The `p`-th percentile latency (`p` in 0..=100, nearest rank), `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.latencies_ns.is_empty() {
            return None;
        }
        let n = self.latencies_ns.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        let i = rank.clamp(1, n) - 1;
        Some(Duration::from_nanos(self.latencies_ns[i]))
    }

    fn merge(mut parts: Vec<TaskResult>, window: Duration) -> Self {
        let mut latencies_ns: Vec<u64> =
            Vec::with_capacity(parts.iter().map(|p| p.lat.len()).sum());
        let mut errors = 0;
        let mut first_error = None;
        for p in &mut parts {
            latencies_ns.append(&mut p.lat);
            errors += p.errors;
            if first_error.is_none() {
                first_error = p.first_error.take();
            }
        }
        latencies_ns.sort_unstable();
        CellResult {
            samples: latencies_ns.len() as u64,
            window,
            errors,
            first_error,
            latencies_ns,
        }
    }
}

#[derive(Default)]
struct TaskResult {
    lat: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl TaskResult {
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

fn acquire_request(id: RecordId) -> AcquireRequest {
    AcquireRequest {
        id,
        fingerprint: FINGERPRINT,
        token: Token::next(),
        lease: LEASE,
        on_lease_expiry: LeaseExpiry::OutcomeUnknown,
        retention: RETENTION,
    }
}

/// Runs `concurrency` tasks, each calling `op` until the cell ends, and merges what they saw.
/// `op(task, iteration)` does one sample's store work and says whether it got the expected
/// answer.
async fn run_cell<F, Fut>(concurrency: usize, timing: Timing, op: F) -> CellResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now() + timing.warmup;
    let end = start + timing.measure;
    let mut handles = Vec::with_capacity(concurrency);
    for task in 0..concurrency.max(1) {
        let op = Arc::clone(&op);
        handles.push(tokio::spawn(async move {
            let mut r = TaskResult::default();
            let mut i = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let outcome = op(task, i).await;
                let t1 = Instant::now();
                i += 1;
                match outcome {
                    Ok(()) if t1 >= start && t1 <= end => {
                        r.lat
                            .push(u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX));
                    }
                    Ok(()) => {}
                    Err(e) => r.error(e),
                }
                // A store whose futures are always ready (memory) would otherwise keep this
                // task on its worker for the whole cell and starve the others: yield, as a
                // server's connection task does between requests, outside the timed part.
                tokio::task::yield_now().await;
            }
            r
        }));
    }
    let mut parts = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(r) => parts.push(r),
            Err(e) => {
                let mut r = TaskResult::default();
                r.error(format!("bench task failed: {e}"));
                parts.push(r);
            }
        }
    }
    CellResult::merge(parts, timing.measure)
}

/// Fresh-request store work: `acquire` of a new id (expects `Acquired`), then `complete` with
/// [`bench_outcome`] (expects `Stored`).
pub async fn fresh(
    store: Arc<dyn Store>,
    keys: Arc<Keys>,
    concurrency: usize,
    timing: Timing,
) -> CellResult {
    let outcome = Arc::new(bench_outcome());
    run_cell(concurrency, timing, move |_, _| {
        let store = Arc::clone(&store);
        let keys = Arc::clone(&keys);
        let outcome = Arc::clone(&outcome);
        async move {
            let req = acquire_request(keys.fresh());
            match store.acquire(req).await {
                Ok(Acquire::Acquired { .. }) => {}
                Ok(other) => return Err(format!("acquire of a new id answered {other:?}")),
                Err(e) => return Err(format!("acquire: {e}")),
            }
            match store
                .complete(&req.id, req.token, &outcome, RETENTION)
                .await
            {
                Ok(Completion::Stored) => Ok(()),
                Ok(other) => Err(format!("complete answered {other:?}")),
                Err(e) => Err(format!("complete: {e}")),
            }
        }
    })
    .await
}

/// Replay store work: `acquire` (with a new token, as a retry makes) of one of the first
/// `completed` ids of `keys`, which earlier [`fresh`] cells completed; expects `Completed`.
/// Each task walks its own pseudo-random sequence over those ids.
pub async fn replay(
    store: Arc<dyn Store>,
    keys: Arc<Keys>,
    completed: u64,
    concurrency: usize,
    timing: Timing,
) -> CellResult {
    let completed = completed.max(1);
    run_cell(concurrency, timing, move |task, i| {
        let store = Arc::clone(&store);
        let mut state = (task as u64) << 32 | i;
        let n = splitmix64(&mut state) % completed;
        let req = acquire_request(keys.nth(n));
        async move {
            match store.acquire(req).await {
                Ok(Acquire::Completed(c))
                    if matches!(&c.outcome, Outcome::Response { head, .. } if head.status == 201) =>
                {
                    Ok(())
                }
                Ok(other) => Err(format!("acquire of a completed id answered {other:?}")),
                Err(e) => Err(format!("acquire: {e}")),
            }
        }
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn outcome_is_about_200_bytes() {
        let n = bench_outcome().encode().len();
        assert!((180..=240).contains(&n), "encoded outcome is {n} bytes");
    }

    #[test]
    fn ids_are_distinct_and_reproducible() {
        let keys = Keys::new();
        let a = keys.fresh();
        let b = keys.fresh();
        assert_ne!(a, b);
        assert_eq!(keys.nth(0), a);
        assert_eq!(keys.nth(1), b);
        assert_eq!(keys.issued(), 2);
        assert_ne!(Keys::new().nth(0), a, "another run has other ids");
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let r = CellResult {
            samples: 100,
            window: Duration::from_secs(2),
            latencies_ns: (1..=100).collect(),
            ..CellResult::default()
        };
        assert_eq!(r.percentile(50.0), Some(Duration::from_nanos(50)));
        assert_eq!(r.percentile(99.0), Some(Duration::from_nanos(99)));
        assert_eq!(r.percentile(100.0), Some(Duration::from_nanos(100)));
        assert_eq!(r.rate(), 50.0);
        assert_eq!(CellResult::default().percentile(50.0), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cells_count_pairs_and_replays_on_the_memory_store() {
        let store: Arc<dyn Store> = Arc::new(idemgate::store::MemoryStore::new());
        let keys = Arc::new(Keys::new());
        let timing = Timing {
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(100),
        };
        let f = fresh(Arc::clone(&store), Arc::clone(&keys), 4, timing).await;
        assert_eq!(f.errors, 0, "{:?}", f.first_error);
        assert!(f.samples > 0);
        assert!(keys.issued() >= f.samples);
        let r = replay(store, Arc::clone(&keys), keys.issued(), 4, timing).await;
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert!(r.samples > 0);
        // An id nobody completed is not a replay: the cell must report it.
        let empty: Arc<dyn Store> = Arc::new(idemgate::store::MemoryStore::new());
        let bad = replay(empty, Arc::new(Keys::new()), 10, 1, timing).await;
        assert!(bad.errors > 0 && bad.samples == 0);
    }
}
