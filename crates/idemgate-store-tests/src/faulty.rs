//! [`FaultyStore`]: wraps any [`Store`] and injects the failures a networked store produces —
//! failing before an operation is applied, failing after it was applied (the answer is lost), and
//! delays — deterministically, by script or by seeded probability.
//!
//! ```
//! # async fn demo() {
//! use idemgate::store::{MemoryStore, Store, StoreError};
//! use idemgate_store_tests::{Fault, FaultyStore, Op};
//!
//! let store = FaultyStore::new(MemoryStore::new());
//! store.script(Op::Get, [Fault::UnavailableBefore]);
//! let id = idemgate::record::RecordId([0; 32]);
//! assert!(matches!(store.get(&id).await, Err(StoreError::Unavailable(_))));
//! assert_eq!(store.get(&id).await, Ok(None)); // the script is used up
//! # }
//! ```

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idemgate::record::{Outcome, Record, RecordId, Token};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, Deletion, Release, Renewal, Resolution, Resolved, Store,
    StoreError, Watch,
};

use crate::Harness;

/// The kinds of store operation a fault can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Store::acquire`].
    Acquire,
    /// [`Store::renew`].
    Renew,
    /// [`Store::complete`].
    Complete,
    /// [`Store::release`].
    Release,
    /// [`Store::get`].
    Get,
    /// [`Store::delete`].
    Delete,
    /// [`Store::resolve`].
    Resolve,
    /// [`Store::purge_expired`].
    PurgeExpired,
    /// [`Store::watch`].
    Watch,
    /// [`Store::readiness`].
    Readiness,
}

impl Op {
    /// Every operation kind.
    pub const ALL: [Op; 10] = [
        Op::Acquire,
        Op::Renew,
        Op::Complete,
        Op::Release,
        Op::Get,
        Op::Delete,
        Op::Resolve,
        Op::PurgeExpired,
        Op::Watch,
        Op::Readiness,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

const OPS: usize = Op::ALL.len();

/// What happens to one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No fault: the inner store answers.
    Pass,
    /// `StoreError::Unavailable` without calling the inner store (not applied).
    UnavailableBefore,
    /// `StoreError::Timeout { maybe_applied: false }` without calling the inner store.
    TimeoutBefore,
    /// The inner store applies the operation; its answer is discarded and the caller gets
    /// `StoreError::Timeout { maybe_applied: true }`.
    TimeoutAfter,
    /// Sleep, then let the inner store answer.
    Delay(Duration),
    /// Let the inner store apply the operation, then sleep before answering (a slow reply to a
    /// request that already took effect: the caller may give up while it is applied).
    DelayAfter(Duration),
}

/// Per-call probabilities of each fault for one operation kind (the rest passes). Delays are
/// uniform in `[0, max_delay]`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RandomFaults {
    /// Probability of [`Fault::UnavailableBefore`].
    pub unavailable_before: f64,
    /// Probability of [`Fault::TimeoutBefore`].
    pub timeout_before: f64,
    /// Probability of [`Fault::TimeoutAfter`].
    pub timeout_after: f64,
    /// Probability of [`Fault::Delay`].
    pub delay: f64,
    /// The longest injected delay.
    pub max_delay: Duration,
}

impl RandomFaults {
    /// Only delays, with probability `p`, up to `max_delay`: answers stay those of the inner store.
    pub fn delays_only(p: f64, max_delay: Duration) -> Self {
        RandomFaults {
            delay: p,
            max_delay,
            ..RandomFaults::default()
        }
    }
}

/// How many faults of each kind were injected into one operation kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Calls answered `Unavailable` without reaching the inner store.
    pub unavailable_before: u64,
    /// Calls answered `Timeout { maybe_applied: false }` without reaching the inner store.
    pub timeout_before: u64,
    /// Calls applied whose answer was replaced by `Timeout { maybe_applied: true }`.
    pub timeout_after: u64,
    /// Calls delayed, then answered by the inner store.
    pub delayed: u64,
}

struct State {
    // Scripted faults take precedence over random ones, one per call, in order.
    scripts: [VecDeque<Fault>; OPS],
    random: [Option<RandomFaults>; OPS],
    rng: SplitMix64,
    counts: [FaultCounts; OPS],
}

/// A store wrapper that injects faults. See the [module docs](self).
///
/// With nothing configured (or after [`set_enabled(false)`](FaultyStore::set_enabled)) it passes
/// every call through unchanged.
pub struct FaultyStore<S> {
    inner: S,
    enabled: AtomicBool,
    state: Mutex<State>,
}

impl<S: Store> FaultyStore<S> {
    /// Wraps `inner`, injecting nothing yet; the random source is seeded with 0.
    pub fn new(inner: S) -> Self {
        Self::with_seed(inner, 0)
    }

    /// Wraps `inner` with the random source seeded by `seed`, so a run can be repeated exactly
    /// (given the same order of calls).
    pub fn with_seed(inner: S, seed: u64) -> Self {
        FaultyStore {
            inner,
            enabled: AtomicBool::new(true),
            state: Mutex::new(State {
                scripts: Default::default(),
                random: [None; OPS],
                rng: SplitMix64(seed),
                counts: [FaultCounts::default(); OPS],
            }),
        }
    }

    /// Appends faults for the next calls of `op`, one per call, before any random fault.
    pub fn script(&self, op: Op, faults: impl IntoIterator<Item = Fault>) {
        self.state().scripts[op.index()].extend(faults);
    }

    /// Injects faults into calls of `op` at random, with these probabilities (replacing earlier
    /// ones for `op`); `None` stops random faults for `op`.
    pub fn random(&self, op: Op, faults: Option<RandomFaults>) {
        self.state().random[op.index()] = faults;
    }

    /// [`random`](Self::random) for every operation kind.
    pub fn random_all(&self, faults: Option<RandomFaults>) {
        let mut st = self.state();
        for r in st.random.iter_mut() {
            *r = faults;
        }
    }

    /// Turns all injection on or off. Off, every call passes through and scripts are not used up.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Faults injected so far into `op`.
    pub fn injected(&self, op: Op) -> FaultCounts {
        self.state().counts[op.index()]
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwraps the store.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single field write, so a poisoned lock holds consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_fault(&self, op: Op) -> Fault {
        if !self.enabled.load(Ordering::SeqCst) {
            return Fault::Pass;
        }
        let mut st = self.state();
        let i = op.index();
        let fault = match st.scripts[i].pop_front() {
            Some(f) => f,
            None => match st.random[i] {
                None => Fault::Pass,
                Some(p) => {
                    let x = st.rng.unit();
                    let weights = [
                        p.unavailable_before,
                        p.timeout_before,
                        p.timeout_after,
                        p.delay,
                    ];
                    let mut edge = 0.0;
                    let pick = weights.iter().position(|w| {
                        edge += w;
                        x < edge
                    });
                    match pick {
                        Some(0) => Fault::UnavailableBefore,
                        Some(1) => Fault::TimeoutBefore,
                        Some(2) => Fault::TimeoutAfter,
                        Some(_) => {
                            let us = p.max_delay.as_micros() as f64 * st.rng.unit();
                            Fault::Delay(Duration::from_micros(us as u64))
                        }
                        None => Fault::Pass,
                    }
                }
            },
        };
        let c = &mut st.counts[i];
        match fault {
            Fault::Pass => {}
            Fault::UnavailableBefore => c.unavailable_before += 1,
            Fault::TimeoutBefore => c.timeout_before += 1,
            Fault::TimeoutAfter => c.timeout_after += 1,
            Fault::Delay(_) | Fault::DelayAfter(_) => c.delayed += 1,
        }
        fault
    }

    async fn run<T, F>(&self, op: Op, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        // `call` is lazy: not polling it means the inner store never sees the operation.
        match self.next_fault(op) {
            Fault::Pass => call.await,
            Fault::UnavailableBefore => Err(StoreError::Unavailable(format!(
                "injected fault: {op:?} failed before applying"
            ))),
            Fault::TimeoutBefore => Err(StoreError::Timeout {
                maybe_applied: false,
            }),
            Fault::TimeoutAfter => {
                let _discarded = call.await;
                Err(StoreError::Timeout {
                    maybe_applied: true,
                })
            }
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                call.await
            }
            Fault::DelayAfter(d) => {
                let answer = call.await;
                tokio::time::sleep(d).await;
                answer
            }
        }
    }
}

#[async_trait]
impl<S: Store> Store for FaultyStore<S> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Acquire, StoreError> {
        self.run(Op::Acquire, self.inner.acquire(req)).await
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: Token,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        self.run(Op::Renew, self.inner.renew(id, token, lease))
            .await
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        self.run(Op::Complete, self.inner.complete(id, token, outcome, ttl))
            .await
    }

    async fn release(&self, id: &RecordId, token: Token) -> Result<Release, StoreError> {
        self.run(Op::Release, self.inner.release(id, token)).await
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        self.run(Op::Get, self.inner.get(id)).await
    }

    async fn delete(&self, id: &RecordId, force: bool) -> Result<Deletion, StoreError> {
        self.run(Op::Delete, self.inner.delete(id, force)).await
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution) -> Result<Resolved, StoreError> {
        self.run(Op::Resolve, self.inner.resolve(id, resolution))
            .await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.run(Op::PurgeExpired, self.inner.purge_expired()).await
    }

    async fn watch(&self, id: &RecordId, max_waiters: usize) -> Result<Option<Watch>, StoreError> {
        self.run(Op::Watch, self.inner.watch(id, max_waiters)).await
    }

    async fn readiness(&self) -> Result<(), StoreError> {
        self.run(Op::Readiness, self.inner.readiness()).await
    }
}

/// SplitMix64: a tiny generator whose sequence is fixed forever, so a seed reproduces a run
/// regardless of `rand`'s version (whose generators may change between releases).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

type Configure<S> = dyn Fn(&FaultyStore<S>) + Send + Sync;

/// Runs another backend's harness through [`FaultyStore`]: every store it hands out is wrapped
/// and configured by the given function (with its own seed, derived from the harness seed).
pub struct FaultyHarness<H: Harness> {
    inner: H,
    seed: u64,
    stores: AtomicU64,
    configure: Box<Configure<H::Store>>,
}

impl<H: Harness> FaultyHarness<H> {
    /// Wraps `inner`; `configure` sets up the faults of each store handed out.
    pub fn new(
        inner: H,
        seed: u64,
        configure: impl Fn(&FaultyStore<H::Store>) + Send + Sync + 'static,
    ) -> Self {
        FaultyHarness {
            inner,
            seed,
            stores: AtomicU64::new(0),
            configure: Box::new(configure),
        }
    }

    /// Delays only (every operation, with probability 1/2, up to `max_delay`): the answers stay
    /// the inner store's, so the whole conformance suite must still pass.
    pub fn delays(inner: H, seed: u64, max_delay: Duration) -> Self {
        Self::new(inner, seed, move |s| {
            s.random_all(Some(RandomFaults::delays_only(0.5, max_delay)));
        })
    }

    fn wrap(&self, store: H::Store) -> FaultyStore<H::Store> {
        let n = self.stores.fetch_add(1, Ordering::Relaxed);
        let s = FaultyStore::with_seed(store, self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        (self.configure)(&s);
        s
    }
}

#[async_trait]
impl<H: Harness> Harness for FaultyHarness<H> {
    type Store = FaultyStore<H::Store>;

    async fn fresh(&self) -> Self::Store {
        self.wrap(self.inner.fresh().await)
    }

    async fn lapse_leases(&self, store: Self::Store, lease: Duration) -> Self::Store {
        self.wrap(self.inner.lapse_leases(store.into_inner(), lease).await)
    }

    async fn corrupt(&self, store: &Self::Store, id: &RecordId) {
        self.inner.corrupt(store.inner(), id).await
    }

    async fn tiny(&self) -> Self::Store {
        self.wrap(self.inner.tiny().await)
    }

    fn lease(&self) -> Duration {
        self.inner.lease()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use idemgate::record::Fingerprint;
    use idemgate::store::{LeaseExpiry, MemoryStore};

    fn req(id: RecordId, token: Token) -> AcquireRequest {
        AcquireRequest {
            id,
            fingerprint: Fingerprint([1; 32]),
            token,
            lease: Duration::from_secs(30),
            on_lease_expiry: LeaseExpiry::OutcomeUnknown,
            retention: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn fail_before_does_not_apply() {
        let s = FaultyStore::new(MemoryStore::new());
        let (id, t) = (RecordId([1; 32]), Token::random());
        s.script(
            Op::Acquire,
            [Fault::UnavailableBefore, Fault::TimeoutBefore],
        );
        assert!(matches!(
            s.acquire(req(id, t)).await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(
            s.acquire(req(id, t)).await,
            Err(StoreError::Timeout {
                maybe_applied: false
            })
        );
        assert_eq!(s.inner().get(&id).await, Ok(None), "nothing was applied");
        assert!(matches!(
            s.acquire(req(id, t)).await,
            Ok(Acquire::Acquired { .. })
        ));
        let c = s.injected(Op::Acquire);
        assert_eq!((c.unavailable_before, c.timeout_before), (1, 1));
    }

    #[tokio::test]
    async fn fail_after_applies_and_loses_the_answer() {
        let s = FaultyStore::new(MemoryStore::new());
        let (id, t) = (RecordId([2; 32]), Token::random());
        s.script(Op::Acquire, [Fault::TimeoutAfter]);
        assert_eq!(
            s.acquire(req(id, t)).await,
            Err(StoreError::Timeout {
                maybe_applied: true
            })
        );
        match s.inner().get(&id).await {
            Ok(Some(Record::InFlight(f))) => assert_eq!(f.token, t, "it was applied"),
            other => panic!("expected the acquire applied, got {other:?}"),
        }
        // The retry with the same token gets the answer the first would have had.
        assert!(matches!(
            s.acquire(req(id, t)).await,
            Ok(Acquire::Acquired { .. })
        ));
    }

    #[tokio::test]
    async fn delay_sleeps_then_applies() {
        let s = FaultyStore::new(MemoryStore::new());
        let (id, t) = (RecordId([3; 32]), Token::random());
        s.script(Op::Acquire, [Fault::Delay(Duration::from_millis(150))]);
        let start = tokio::time::Instant::now();
        assert!(matches!(
            s.acquire(req(id, t)).await,
            Ok(Acquire::Acquired { .. })
        ));
        assert!(start.elapsed() >= Duration::from_millis(150));
        assert!(matches!(
            s.inner().get(&id).await,
            Ok(Some(Record::InFlight(_)))
        ));
        assert_eq!(s.injected(Op::Acquire).delayed, 1);
    }

    #[tokio::test]
    async fn disabled_passes_and_keeps_the_script() {
        let s = FaultyStore::new(MemoryStore::new());
        let id = RecordId([4; 32]);
        s.script(Op::Get, [Fault::UnavailableBefore]);
        s.random(
            Op::Get,
            Some(RandomFaults {
                unavailable_before: 1.0,
                ..RandomFaults::default()
            }),
        );
        s.set_enabled(false);
        for _ in 0..10 {
            assert_eq!(s.get(&id).await, Ok(None));
        }
        s.set_enabled(true);
        assert!(s.get(&id).await.is_err(), "script still there");
        assert!(s.get(&id).await.is_err(), "then random faults at p = 1");
        s.random(Op::Get, None);
        assert_eq!(s.get(&id).await, Ok(None));
    }

    async fn random_run(seed: u64) -> Vec<bool> {
        let s = FaultyStore::with_seed(MemoryStore::new(), seed);
        s.random(
            Op::Get,
            Some(RandomFaults {
                timeout_before: 0.3,
                ..RandomFaults::default()
            }),
        );
        let mut out = Vec::new();
        for _ in 0..200 {
            out.push(s.get(&RecordId([5; 32])).await.is_err());
        }
        out
    }

    #[tokio::test]
    async fn random_faults_are_seeded_and_near_their_rate() {
        let a = random_run(7).await;
        assert_eq!(a, random_run(7).await, "same seed, same faults");
        assert_ne!(a, random_run(8).await, "another seed, other faults");
        let failed = a.iter().filter(|f| **f).count();
        assert!(
            (30..=90).contains(&failed),
            "about 30% of 200 failed, got {failed}"
        );
    }

    #[tokio::test]
    async fn other_ops_are_not_affected() {
        let s = FaultyStore::new(MemoryStore::new());
        let (id, t) = (RecordId([6; 32]), Token::random());
        s.script(Op::Complete, [Fault::UnavailableBefore]);
        assert!(matches!(
            s.acquire(req(id, t)).await,
            Ok(Acquire::Acquired { .. })
        ));
        assert!(
            s.complete(&id, t, &Outcome::outcome_unknown(), Duration::from_secs(5))
                .await
                .is_err()
        );
        assert_eq!(
            s.complete(&id, t, &Outcome::outcome_unknown(), Duration::from_secs(5))
                .await,
            Ok(Completion::Stored)
        );
    }
}
