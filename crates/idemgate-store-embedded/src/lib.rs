//! The embedded durable store: idemgate's records in one local [redb] file.
//!
//! This is the proxy's default store (SPEC §4). It keeps the [`Store`] contract of
//! `idemgate::store` with three properties of its own:
//!
//! - **Durable before answering.** `acquire`, `complete` and every other write return only
//!   once durable (`fdatasync`): the new state of every record a batch changed is appended to
//!   a write-ahead log beside the file (`<file>-wal-0` and `-wal-1`) as one frame and synced,
//!   and only then kept and answered. The records changed since the last *checkpoint* stay in
//!   memory in front of the file; about every [`EmbeddedStoreBuilder::checkpoint_interval`]
//!   (default 1 s) a checkpoint thread writes them into the file in one durable redb commit
//!   while the writer goes on, and an open replays what the log holds beyond the last one. A
//!   record acquired and completed between two checkpoints reaches the B-tree once.
//! - **Group commit.** One writer thread applies every operation. Callers hand it operations
//!   over a channel; it applies everything that queued up while the previous batch was syncing
//!   as ONE batch (one log frame, one sync), then answers each caller. Concurrent requests
//!   therefore share syncs, and operations on one record apply in arrival order.
//!   [`EmbeddedStore::stats`] counts both.
//! - **Leases judged by process liveness.** Every open increments an *instance epoch* kept in
//!   the file; an in-flight record carries the epoch that wrote it. A lease is lapsed iff its
//!   epoch is not the current one, never by the wall clock. Before an open returns, every
//!   in-flight record of an older epoch (its holder died, e.g. by `kill -9`) becomes
//!   outcome-unknown, so retries get their answer at once after a restart.
//!
//! Restart after a crash is bounded: checkpoints record redb's allocator state ("quick repair"),
//! so an open after `kill -9` does not walk the whole file, and the log it replays is what
//! was written since the last finished checkpoint: about a checkpoint interval's writes, at
//! most four times [`EmbeddedStoreBuilder::checkpoint_log_bytes`] (two generations, each cut
//! off at twice that size while a checkpoint runs).
//! If appending to the log fails, the batch is not applied and its callers get `Unavailable`
//! (`Full` on a full disk). A failed checkpoint is retried every second while its records stay
//! in the log; should checkpoints keep failing, writes are refused (`Unavailable`) once the log
//! reaches four times [`EmbeddedStoreBuilder::checkpoint_log_bytes`], and reads go on.
//!
//! Keep the file and its `-wal-*` companions together: copying or moving one without the others
//! loses what the log holds.

//! # One process only
//!
//! The file is locked while a store has it open; a second open (in this or another process)
//! fails with [`OpenError::AlreadyOpen`]. The embedded store serves **one** idemgate process: to
//! run more than one instance (replicas, several proxies behind a load balancer), use the Redis
//! or PostgreSQL store, which judge leases by a shared clock.
//!
//! # Capacity
//!
//! `acquire` of a new record answers [`StoreError::Full`] while the file's filesystem has less
//! than [`EmbeddedStoreBuilder::min_free_bytes`] available (checked about once a second, not per
//! request), or the file is larger than [`EmbeddedStoreBuilder::max_file_bytes`]. Live records are
//! never evicted; completed records are purged in the background once past retention.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use idemgate::record::{Fingerprint, Outcome, RecordId, Token};
//! use idemgate::store::{Acquire, AcquireRequest, Completion, LeaseExpiry, Store};
//! use idemgate_store_embedded::EmbeddedStore;
//!
//! let dir = tempfile::tempdir()?;
//! let store = EmbeddedStore::builder(dir.path().join("idemgate.redb"))
//!     .min_free_bytes(0)
//!     .open()?;
//! let req = AcquireRequest {
//!     id: RecordId::derive("authorization", b"Bearer sk_1", b"order-1"),
//!     fingerprint: Fingerprint([1; 32]),
//!     token: Token::random(),
//!     lease: Duration::from_secs(30),
//!     on_lease_expiry: LeaseExpiry::OutcomeUnknown,
//!     retention: Duration::from_secs(86_400),
//! };
//! assert!(matches!(store.acquire(req).await?, Acquire::Acquired { .. }));
//! let done = store
//!     .complete(&req.id, req.token, &Outcome::outcome_unknown(), Duration::from_secs(60))
//!     .await?;
//! assert_eq!(done, Completion::Stored);
//! store.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! [`Store`]: idemgate::store::Store
//! [`StoreError::Full`]: idemgate::store::StoreError::Full

mod builder;
mod capacity;
mod checkpoint;
mod reply;
mod state;
mod store;
mod tables;
mod wal;
mod writer;

pub use builder::{EmbeddedStoreBuilder, OpenError, OpenReport};
pub use store::{EmbeddedStats, EmbeddedStore};
