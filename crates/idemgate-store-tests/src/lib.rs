//! The store conformance suite every idemgate backend runs unchanged, a fault-injecting store
//! wrapper ([`FaultyStore`]), throwaway database servers for tests ([`servers`]), and
//! connections made to go dark ([`net::Blackhole`]).
//!
//! # Running the suite against a backend
//!
//! A backend implements [`Harness`] (how to make a fresh store, how to make its leases lapse,
//! how to corrupt a record slot, how to make a tiny store) and invokes
//! [`conformance_tests!`] once in an integration-test file. The macro expands to one `#[test]`
//! per case, each on its own multi-threaded tokio runtime (two workers), so every case is
//! reported by name and the cases run in parallel.
//!
//! ```ignore
//! // crates/idemgate-store-foo/tests/conformance.rs
//! use std::time::Duration;
//! use idemgate::record::RecordId;
//! use idemgate_store_tests::{Harness, async_trait};
//!
//! struct FooHarness { /* e.g. the address of a server started once per test binary */ }
//!
//! #[async_trait]
//! impl Harness for FooHarness {
//!     type Store = FooStore;
//!     async fn fresh(&self) -> FooStore { /* a store in its own namespace */ }
//!     async fn lapse_leases(&self, store: FooStore, lease: Duration) -> FooStore {
//!         tokio::time::sleep(lease + Duration::from_millis(50)).await;
//!         store
//!     }
//!     async fn corrupt(&self, store: &FooStore, id: &RecordId) { /* write garbage */ }
//!     async fn tiny(&self) -> FooStore { /* capacity of a few KiB */ }
//!     fn lease(&self) -> Duration { Duration::from_millis(300) }
//! }
//!
//! async fn foo_harness() -> FooHarness { /* start or reuse a server */ }
//!
//! // The expression is evaluated inside each (async) test, so it may `.await`; it may give a
//! // harness by value, as `Arc<H>`, or as `&'static H`.
//! idemgate_store_tests::conformance_tests!(foo_harness().await);
//! ```
//!
//! The suite uses the tokio runtime the macro builds; the calling crate needs no tokio features
//! of its own for it.
//!
//! # Timing
//!
//! Cases that need a lapsed lease call [`Harness::lapse_leases`]; everything else acquires with
//! a long lease ([`LONG_LEASE`]) so a slow machine never turns a live lease into a lapsed one.
//! Retention cases use a 1 s TTL. Each case takes at most a few seconds.

pub mod faulty;
pub mod net;
pub mod servers;
pub mod suite;

pub use async_trait::async_trait;
pub use faulty::{Fault, FaultyHarness, FaultyStore, Op, RandomFaults};

use std::sync::Arc;
use std::time::Duration;

use idemgate::record::RecordId;

/// The lease the suite gives attempts that must stay live for the whole case.
pub const LONG_LEASE: Duration = Duration::from_secs(60);

/// What a backend provides so the suite can exercise it.
#[async_trait::async_trait]
pub trait Harness: Send + Sync + 'static {
    /// The store under test.
    type Store: idemgate::store::Store;

    /// A fresh, empty store (its own namespace/database/file), normal capacity.
    async fn fresh(&self) -> Self::Store;

    /// Makes every lease held so far lapse and returns the store to keep using. Wall-clock stores
    /// sleep just past `lease`; single-process stores simulate the holder process's death (memory:
    /// `lapse_all_leases`; embedded: close and reopen the file).
    async fn lapse_leases(&self, store: Self::Store, lease: Duration) -> Self::Store;

    /// Writes bytes that are not a valid record into the slot of `id` (bypassing the codec).
    async fn corrupt(&self, store: &Self::Store, id: &RecordId);

    /// A fresh store whose capacity is tiny (e.g. a few KiB), to provoke `StoreError::Full`.
    async fn tiny(&self) -> Self::Store;

    /// The lease the suite uses (short for clock-judged stores, e.g. 300 ms; any for epoch stores).
    fn lease(&self) -> Duration;
}

// A harness shared by every test of a binary (a server started once) is naturally held as
// `Arc<H>` or `&'static H`; these let the macro take either without the backend writing glue.
#[async_trait::async_trait]
impl<H: Harness> Harness for Arc<H> {
    type Store = H::Store;
    async fn fresh(&self) -> Self::Store {
        (**self).fresh().await
    }
    async fn lapse_leases(&self, store: Self::Store, lease: Duration) -> Self::Store {
        (**self).lapse_leases(store, lease).await
    }
    async fn corrupt(&self, store: &Self::Store, id: &RecordId) {
        (**self).corrupt(store, id).await
    }
    async fn tiny(&self) -> Self::Store {
        (**self).tiny().await
    }
    fn lease(&self) -> Duration {
        (**self).lease()
    }
}

#[async_trait::async_trait]
impl<H: Harness> Harness for &'static H {
    type Store = H::Store;
    async fn fresh(&self) -> Self::Store {
        (**self).fresh().await
    }
    async fn lapse_leases(&self, store: Self::Store, lease: Duration) -> Self::Store {
        (**self).lapse_leases(store, lease).await
    }
    async fn corrupt(&self, store: &Self::Store, id: &RecordId) {
        (**self).corrupt(store, id).await
    }
    async fn tiny(&self) -> Self::Store {
        (**self).tiny().await
    }
    fn lease(&self) -> Duration {
        (**self).lease()
    }
}

/// Support for [`conformance_tests!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use tokio;

    /// Runs one case on a fresh multi-threaded runtime with two workers, like
    /// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`, without requiring the
    /// calling crate to enable tokio's `macros` and `rt-multi-thread` features.
    pub fn run<F: std::future::Future<Output = ()>>(case: F) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build();
        match rt {
            Ok(rt) => rt.block_on(case),
            Err(e) => panic!("cannot build the tokio runtime for a conformance case: {e}"),
        }
    }
}

/// Expands to one test per conformance case, each building the harness with the given
/// expression (evaluated inside the async test, so it may `.await`) and running the case.
///
/// See the [crate docs](crate) for an example; the cases are the functions of [`suite`].
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@cases ($harness)
            acquire_fresh_is_acquired,
            acquire_same_token_is_idempotent,
            acquire_other_token_sees_in_flight,
            acquire_in_flight_other_fingerprint_is_mismatch,
            complete_then_acquire_replays_exact_outcome,
            every_outcome_kind_round_trips,
            completed_other_fingerprint_is_mismatch,
            complete_on_absent_is_stored,
            complete_by_other_token_is_fenced,
            acquire_repeated_is_idempotent,
            renew_repeated_is_idempotent,
            complete_repeated_is_idempotent,
            release_repeated_is_idempotent,
            renew_by_holder_extends_lease,
            renew_by_other_token_or_absent_is_refused,
            release_by_holder_frees_the_key,
            release_absent_is_released,
            release_by_other_token_is_refused,
            lapsed_lease_becomes_outcome_unknown,
            lapsed_lease_other_fingerprint_is_mismatch,
            late_complete_upgrades_placeholder,
            complete_by_other_token_on_placeholder_is_refused,
            renew_after_lapse_is_refused,
            release_after_lapse_keeps_placeholder,
            re_execute_hands_lapsed_lease_to_new_token,
            completion_ttl_expiry_frees_the_key,
            purge_expired_removes_only_expired,
            get_reads_records,
            delete_needs_force_for_in_flight,
            resolve_release_and_respond,
            resolve_only_on_outcome_unknown,
            racing_acquires_have_one_winner,
            binary_body_round_trips,
            one_mib_body_round_trips,
            corrupt_record_is_never_absent,
            tiny_store_is_full_and_keeps_records,
            watch_fires_on_complete,
            watch_fires_on_release,
            watch_is_bounded_per_key,
        );
    };
    (@cases ($harness:expr) $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::__private::run(async {
                    let harness = $harness;
                    $crate::suite::$case(&harness).await;
                });
            }
        )*
    };
}
