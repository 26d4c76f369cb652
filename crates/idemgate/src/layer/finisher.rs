//! Retries `complete` and `release` that failed after the upstream answered (SPEC §5).
//!
//! The client already has its response; the store must still learn the outcome, or the key
//! would stay in flight until its lease lapses (and then read as outcome-unknown). Each failed
//! operation is retried with the same token, which the store contract makes safe, with
//! exponential backoff until it succeeds, is fenced, or gives up. The number of pending retries
//! is bounded: past the bound, the operation is dropped, logged with its `record_id` and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::observe::Observer;
use crate::record::{Outcome, RecordId, Token};
use crate::store::{Completion, Release, Store, StoreError};

/// What still has to reach the store.
#[derive(Clone, Debug)]
pub(crate) enum FinishOp {
    Complete {
        outcome: Outcome,
        ttl: Duration,
    },
    Release,
    /// The inner service settled the record itself.
    Nothing,
}

/// Bounded background retries of finishing operations.
pub(crate) struct Finisher {
    pending: AtomicUsize,
    capacity: usize,
    give_up_after: Duration,
}

impl Finisher {
    pub(crate) fn new(capacity: usize, give_up_after: Duration) -> Self {
        Finisher {
            pending: AtomicUsize::new(0),
            capacity,
            give_up_after,
        }
    }

    /// How many retries are pending.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Queues the release of a key that may have been acquired by an attempt that never ran.
    /// These may use only half of the queue, so a store brownout full of them cannot crowd out
    /// the completes of requests that did run.
    pub(crate) fn enqueue_speculative(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        observer: Arc<dyn Observer>,
        id: RecordId,
        token: Token,
    ) -> bool {
        if self.pending() >= self.capacity / 2 {
            tracing::error!(record_id = %id, "finish queue half full: a possibly acquired key is not released and stays in flight until its lease lapses");
            observer.abandoned_finish();
            return false;
        }
        self.enqueue(store, observer, id, token, FinishOp::Release)
    }

    /// Queues `op` for background retries; `false` (logged and counted) when the queue is full.
    pub(crate) fn enqueue(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        observer: Arc<dyn Observer>,
        id: RecordId,
        token: Token,
        op: FinishOp,
    ) -> bool {
        let taken = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            tracing::error!(record_id = %id, ?op, "finish queue full: outcome not stored; the key will read as in flight until its lease lapses");
            observer.abandoned_finish();
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(record_id = %id, "no tokio runtime to retry a finishing store operation");
            observer.abandoned_finish();
            return false;
        };
        let this = self.clone();
        runtime.spawn(async move {
            this.retry(store, observer, id, token, op).await;
            this.pending.fetch_sub(1, Ordering::AcqRel);
        });
        true
    }

    async fn retry(
        &self,
        store: Arc<dyn Store>,
        observer: Arc<dyn Observer>,
        id: RecordId,
        token: Token,
        op: FinishOp,
    ) {
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            tokio::time::sleep(backoff).await;
            match apply(store.as_ref(), &id, token, &op).await {
                Ok(true) => return,
                Ok(false) => {
                    observer.fencing_refused();
                    tracing::warn!(record_id = %id, "finishing operation fenced: another attempt owns the record");
                    return;
                }
                Err(e) if started.elapsed() >= self.give_up_after => {
                    observer.abandoned_finish();
                    tracing::error!(record_id = %id, error = %e, "gave up storing the outcome");
                    return;
                }
                Err(e) => {
                    tracing::debug!(record_id = %id, error = %e, "finishing operation failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Applies `op` once: `Ok(true)` done, `Ok(false)` fenced.
pub(crate) async fn apply(
    store: &dyn Store,
    id: &RecordId,
    token: Token,
    op: &FinishOp,
) -> Result<bool, StoreError> {
    match op {
        FinishOp::Complete { outcome, ttl } => Ok(matches!(
            store.complete(id, token, outcome, *ttl).await?,
            Completion::Stored
        )),
        FinishOp::Release => Ok(matches!(store.release(id, token).await?, Release::Released)),
        FinishOp::Nothing => Ok(true),
    }
}
