//! The store contract (SPEC §4) and the in-memory backend.
//!
//! # Contract
//!
//! Every [`Store`] operation is **atomic on one record** and **idempotent for its token**: a
//! caller makes one [`Token`] per attempt and, after a [`StoreError::Timeout`], repeats the
//! operation with the same token; the repeat answers as the first would have.
//!
//! | operation | effect |
//! |---|---|
//! | [`acquire`](Store::acquire) | absent, or Completed past `expires_at` → write InFlight(token) → [`Acquire::Acquired`]. InFlight(token) → `Acquired`. Live record with another fingerprint → [`Acquire::Mismatch`]. InFlight with a live lease → [`Acquire::InFlight`]. Completed → [`Acquire::Completed`]. InFlight whose lease lapsed → by [`LeaseExpiry`]: `OutcomeUnknown` replaces it atomically with Completed(outcome-unknown, `origin_token` = the old token) and answers as for that record (so `Mismatch` if the fingerprint differs); `ReExecute` treats it as absent |
//! | [`renew`](Store::renew) | extend InFlight(token); refused otherwise |
//! | [`complete`](Store::complete) | succeeds on InFlight(token), on Completed(outcome-unknown) whose `origin_token` is the token (the real outcome replaces the placeholder), on a Completed record this token already wrote, and on absent; refused otherwise (**fencing**) |
//! | [`release`](Store::release) | delete InFlight(token); `Released` when absent; refused for another token's record |
//!
//! A record that cannot be decoded is **never** treated as absent: every operation that meets
//! one returns [`StoreError::Corrupt`].
//!
//! Leases protect liveness, not correctness. Wall-clock stores (Redis, PostgreSQL) judge a lease
//! by the server's clock. Single-process stores ([`MemoryStore`], embedded) judge it by whether
//! the holder process is alive (its [`Holder`](crate::record::Holder) epoch); at start, records of an older epoch are
//! lapsed at once.
//!
//! Capacity: every store is bounded; when full, `acquire` returns [`StoreError::Full`] and live
//! records are never evicted early.
//!
//! Dropping a future returned by an operation leaves the record as the operation left it (it may
//! or may not have been applied): that is why operations are idempotent for their token.

mod memory;
mod watch;

pub use memory::{MemoryStore, MemoryStoreBuilder};
pub use watch::{Watch, WatchHub};

use std::time::Duration;

use async_trait::async_trait;

use crate::record::{Completed, Fingerprint, Outcome, Record, RecordId, Timestamp, Token};

/// What happens when `acquire` meets an in-flight record whose lease has lapsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LeaseExpiry {
    /// Replace it with an outcome-unknown problem (the default: at most once).
    #[default]
    OutcomeUnknown,
    /// Treat it as absent and run the request again (for upstreams that are idempotent
    /// themselves, and the PostgreSQL transactional mode).
    ReExecute,
}

/// Arguments of [`Store::acquire`].
#[derive(Clone, Copy, Debug)]
pub struct AcquireRequest {
    /// The record.
    pub id: RecordId,
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
    /// This attempt's token.
    pub token: Token,
    /// How long the lease lasts without renewal.
    pub lease: Duration,
    /// What a lapsed lease becomes.
    pub on_lease_expiry: LeaseExpiry,
    /// How long an outcome-unknown placeholder written by this call is kept (the route's TTL).
    pub retention: Duration,
}

/// The answer of [`Store::acquire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// This attempt holds the key; execute the request.
    Acquired {
        /// When the lease lapses unless renewed.
        lease_expires_at: Timestamp,
    },
    /// Another attempt holds the key.
    InFlight {
        /// When that attempt's lease lapses unless renewed.
        lease_expires_at: Timestamp,
    },
    /// The outcome of the first attempt, to replay.
    Completed(Box<Completed>),
    /// The key is live for a different request.
    Mismatch,
}

/// The answer of [`Store::renew`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// The lease was extended.
    Renewed {
        /// The new end of the lease.
        lease_expires_at: Timestamp,
    },
    /// The record is not InFlight with this token (lapsed, completed, released).
    Refused,
}

/// The answer of [`Store::complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The outcome is stored (or was already stored by this token).
    Stored,
    /// Fenced: another attempt owns the record.
    Refused,
}

/// The answer of [`Store::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The record is gone (or was already absent).
    Released,
    /// Another attempt owns the record; nothing was deleted.
    Refused,
}

/// The answer of [`Store::delete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deletion {
    /// The record was deleted.
    Deleted,
    /// There was no record.
    NotFound,
    /// The record is in flight and `force` was not given; nothing was deleted.
    InFlightNeedsForce,
}

/// How an operator settles an outcome-unknown record (SPEC §9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Delete it, so the next retry executes.
    Release,
    /// Replace it with this outcome, kept for `ttl`. The operator's answer is final: it gets
    /// a fresh `origin_token`, so the lapsed attempt's late `complete` is refused (fenced)
    /// instead of replacing an answer retries may already have had.
    Respond {
        /// The outcome retries will get.
        outcome: Outcome,
        /// Retention from now.
        ttl: Duration,
    },
}

/// The answer of [`Store::resolve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Done.
    Resolved,
    /// There was no record.
    NotFound,
    /// The record is not an outcome-unknown placeholder; nothing was changed.
    NotOutcomeUnknown,
}

/// Store failures, typed so the engine can act on them (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached; the operation was not applied.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// No answer in time. `maybe_applied` says whether the operation may have taken effect.
    #[error("store operation timed out (maybe applied: {maybe_applied})")]
    Timeout {
        /// Whether the operation may have been applied.
        maybe_applied: bool,
    },
    /// A record could not be decoded (version skew, lost key, garbage). Never treated as absent.
    #[error("record unreadable: {0}")]
    Corrupt(String),
    /// The store reached its capacity bound.
    #[error("store full: {0}")]
    Full(String),
}

impl StoreError {
    /// Whether repeating the same operation with the same token may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Timeout { .. }
        )
    }
}

impl From<crate::record::DecodeError> for StoreError {
    fn from(e: crate::record::DecodeError) -> Self {
        StoreError::Corrupt(e.0)
    }
}

/// The store contract. See the [module docs](self) for the rules every backend keeps; the
/// `idemgate-store-tests` crate checks them.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short name for logs and metrics (`memory`, `embedded`, `redis`, `postgres`).
    fn kind(&self) -> &'static str;

    /// Takes the key for an attempt, or says why not.
    async fn acquire(&self, req: AcquireRequest) -> Result<Acquire, StoreError>;

    /// Extends the lease of InFlight(token).
    async fn renew(
        &self,
        id: &RecordId,
        token: Token,
        lease: Duration,
    ) -> Result<Renewal, StoreError>;

    /// Stores the outcome of the attempt `token`, kept for `ttl` from now.
    async fn complete(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Completion, StoreError>;

    /// Deletes InFlight(token), so the next attempt executes.
    async fn release(&self, id: &RecordId, token: Token) -> Result<Release, StoreError>;

    /// Reads a record (operators; never used to decide an execution).
    async fn get(&self, id: &RecordId) -> Result<Option<Record>, StoreError>;

    /// Deletes a record; an in-flight one only with `force`.
    async fn delete(&self, id: &RecordId, force: bool) -> Result<Deletion, StoreError>;

    /// Settles an outcome-unknown record.
    async fn resolve(&self, id: &RecordId, resolution: Resolution) -> Result<Resolved, StoreError>;

    /// Deletes completed records past retention; returns how many.
    async fn purge_expired(&self) -> Result<u64, StoreError>;

    /// Subscribes to changes of `id` (completion, release, deletion) for wait mode (SPEC §7).
    /// The caller subscribes first, then re-reads with `acquire`, so no change is missed.
    /// `max_waiters` bounds the subscribers per key; past it, `None`.
    ///
    /// The default gives a subscription that never fires, so waiters fall back to re-checking
    /// at the lease's end.
    async fn watch(&self, id: &RecordId, max_waiters: usize) -> Result<Option<Watch>, StoreError> {
        let _ = (id, max_waiters);
        Ok(Some(Watch::never()))
    }

    /// Whether the store is reachable and safely configured (`/readyz`).
    async fn readiness(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// An `Arc` of a store is a store, so one store can serve several layers and the admin API.
#[async_trait]
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    async fn acquire(&self, req: AcquireRequest) -> Result<Acquire, StoreError> {
        (**self).acquire(req).await
    }
    async fn renew(
        &self,
        id: &RecordId,
        token: Token,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        (**self).renew(id, token, lease).await
    }
    async fn complete(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        (**self).complete(id, token, outcome, ttl).await
    }
    async fn release(&self, id: &RecordId, token: Token) -> Result<Release, StoreError> {
        (**self).release(id, token).await
    }
    async fn get(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        (**self).get(id).await
    }
    async fn delete(&self, id: &RecordId, force: bool) -> Result<Deletion, StoreError> {
        (**self).delete(id, force).await
    }
    async fn resolve(&self, id: &RecordId, resolution: Resolution) -> Result<Resolved, StoreError> {
        (**self).resolve(id, resolution).await
    }
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        (**self).purge_expired().await
    }
    async fn watch(&self, id: &RecordId, max_waiters: usize) -> Result<Option<Watch>, StoreError> {
        (**self).watch(id, max_waiters).await
    }
    async fn readiness(&self) -> Result<(), StoreError> {
        (**self).readiness().await
    }
}

/// Lapsed-lease handling shared by backends that evaluate `acquire` in Rust: given the current
/// record (if any), decides the answer and the record to write.
///
/// `lease_lapsed` says whether an InFlight record's lease has lapsed by the backend's own rule
/// (holder epoch or clock). Backends that evaluate server-side (Redis scripts, SQL) implement
/// the same table in their own language; the conformance suite holds them all to it.
pub fn decide_acquire(
    current: Option<Record>,
    req: &AcquireRequest,
    now: Timestamp,
    holder: crate::record::Holder,
    lease_lapsed: impl Fn(&crate::record::InFlight) -> bool,
) -> (Acquire, Option<Record>) {
    use crate::record::InFlight;
    let fresh = || {
        let lease_expires_at = now.after(req.lease);
        (
            Acquire::Acquired { lease_expires_at },
            Some(Record::InFlight(InFlight {
                fingerprint: req.fingerprint,
                token: req.token,
                lease_expires_at,
                holder,
            })),
        )
    };
    match current {
        None => fresh(),
        Some(Record::Completed(c)) if c.expires_at <= now => fresh(),
        Some(Record::Completed(c)) => {
            if c.fingerprint != req.fingerprint {
                (Acquire::Mismatch, None)
            } else {
                (Acquire::Completed(Box::new(c)), None)
            }
        }
        Some(Record::InFlight(f)) if f.token == req.token => (
            Acquire::Acquired {
                lease_expires_at: f.lease_expires_at,
            },
            None,
        ),
        Some(Record::InFlight(f)) if lease_lapsed(&f) => match req.on_lease_expiry {
            LeaseExpiry::ReExecute => fresh(),
            LeaseExpiry::OutcomeUnknown => {
                let placeholder = Completed {
                    fingerprint: f.fingerprint,
                    outcome: Outcome::outcome_unknown(),
                    expires_at: now.after(req.retention),
                    origin_token: f.token,
                };
                let answer = if placeholder.fingerprint != req.fingerprint {
                    Acquire::Mismatch
                } else {
                    Acquire::Completed(Box::new(placeholder.clone()))
                };
                (answer, Some(Record::Completed(placeholder)))
            }
        },
        Some(Record::InFlight(f)) if f.fingerprint != req.fingerprint => (Acquire::Mismatch, None),
        Some(Record::InFlight(f)) => (
            Acquire::InFlight {
                lease_expires_at: f.lease_expires_at,
            },
            None,
        ),
    }
}

/// `complete`'s fencing rule for backends that evaluate in Rust: whether `token` may write its
/// outcome over `current`. Absent, InFlight(token), and Completed records whose `origin_token` is
/// `token` (its own earlier write, or the outcome-unknown placeholder of its lapsed lease) accept
/// it; everything else is fenced.
pub fn may_complete(current: Option<&Record>, token: Token) -> bool {
    match current {
        None => true,
        Some(Record::InFlight(f)) => f.token == token,
        Some(Record::Completed(c)) => c.origin_token == token,
    }
}
