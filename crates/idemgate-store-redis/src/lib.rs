//! The Redis backend of idemgate's store contract, for standalone Redis and Redis Cluster.
//!
//! ```no_run
//! # async fn demo() -> Result<(), idemgate::store::StoreError> {
//! use std::time::Duration;
//! use idemgate::store::Store;
//! use idemgate_store_redis::RedisStore;
//!
//! let store = RedisStore::builder("redis://127.0.0.1:6380/")
//!     .timeout(Duration::from_secs(1))
//!     .connect()
//!     .await?;
//! store.readiness().await?; // fails unless maxmemory-policy is noeviction
//! # Ok(()) }
//! ```
//!
//! Specs: `redis://[user:pass@]host:port[/db]`, `rediss://…` (TLS with rustls), and
//! `redis+cluster://h:p,h:p,…` (`rediss+cluster://` for TLS) for Cluster, where any reachable
//! seed node is enough.
//!
//! # How records are kept
//!
//! A record is **one key**, `idemgate:{<hex record_id>}`, holding a hash (state, fingerprint,
//! token, lease end, holder, outcome bytes, expiry). The `{…}` hash tag puts everything about a
//! record in one Cluster slot. Each of `acquire`, `renew`, `complete` and `release` is **one Lua
//! script call** (`EVALSHA`), so a fresh request costs two round trips (acquire + complete) and a
//! replay one. The scripts implement the contract table of [`idemgate::store`] server-side:
//!
//! - **Leases are judged by the server's clock** (`TIME` inside the script), never by the
//!   clients' clocks: instances with skewed clocks still agree on who holds a key.
//! - **The key's Redis TTL is the retention.** A completed record expires `ttl` after it was
//!   written; an in-flight record gets lease + retention, so a dead holder's key is still there
//!   to become an *outcome-unknown* placeholder when a retry meets it.
//! - **Anything in the slot that is not a valid record** (another type, missing fields, an
//!   unknown format version) makes the operation fail with [`StoreError::Corrupt`]: it is never
//!   taken as absent, so the request is not executed.
//! - A timeout after a write was sent is [`StoreError::Timeout`] with `maybe_applied: true`;
//!   the engine repeats the operation with the same token, which the scripts answer as the first
//!   call would have. A refused connection is [`StoreError::Unavailable`]; Redis' `OOM` answer
//!   is [`StoreError::Full`]. Every operation is bounded by the store's timeout (default 1 s).
//! - `purge_expired` returns 0: Redis expires keys by itself.
//! - Connections (standalone): one multiplexed connection per calling thread, up to the CPU
//!   count + 1 (at most 16), opened on first use, so a proxy worker thread's commands are
//!   driven on its own runtime. Cluster: one cluster connection.
//! - A connection that goes dark (a NAT or load balancer forgot it, the host vanished: no
//!   FIN, no RST) is given up by the kernel after
//!   [`dead_connection_timeout`](RedisStoreBuilder::dead_connection_timeout) (default 10 s) of
//!   unacknowledged data or unanswered keep-alive probes, and redis-rs reconnects; without
//!   that bound every command on it would time out for ~15 minutes. The probes, sent after as
//!   long without traffic, also keep middleboxes from dropping idle connections.
//! - `complete` on an absent key answers `Stored` without writing: the call carries no
//!   fingerprint to build a record from (the key was released, deleted by an operator, or
//!   expired after its holder was gone for longer than lease + retention).
//! - `release` deletes only `InFlight(token)`; an outcome-unknown placeholder is kept even for
//!   the token whose lease lapsed, since a duplicate may already have been told the outcome is
//!   unknown.
//!
//! Wait mode (SPEC §7): the scripts publish on the record's key name whenever it is completed,
//! released, deleted, resolved or replaced by a placeholder (`SPUBLISH`, sharded pub/sub, on
//! Cluster, so a message stays on its record's shard). Each store has **one** subscriber
//! connection (RESP3) that subscribes to a record's channel when a waiter appears, confirms the
//! subscription before [`watch`](idemgate::store::Store::watch) returns, and after a reconnect
//! (a dark connection included, found by its keep-alive probes) subscribes again and wakes
//! every waiter to re-read its record.
//!
//! # Deploying on Redis
//!
//! **`maxmemory-policy noeviction`.** Any eviction policy lets Redis delete a live record under
//! memory pressure: an in-flight key evicted means a concurrent retry executes the request a
//! second time; a completed key evicted means a later retry does. With `noeviction` Redis answers
//! writes with `OOM` instead; idemgate turns that into 503 `store-full` and keeps every record.
//! [`readiness`](idemgate::store::Store::readiness) (`/readyz`) fails unless the policy is
//! `noeviction` on every master; [`RedisStoreBuilder::allow_eviction`] overrides that for those
//! who accept the risk. If your Redis user may not run `CONFIG GET`, readiness says so.
//! Size `maxmemory` for your request rate × retention × stored-response size.
//!
//! **Persistence: AOF.** Without persistence a restart forgets every record, and retries of
//! requests that already took effect execute again. Use `appendonly yes` with
//! `appendfsync always` to make each acknowledged acquire and complete survive a crash of Redis
//! or its machine, at the cost of an fsync per write (group-committed by Redis). With
//! `appendfsync everysec` (Redis' default for AOF) a crash loses up to about **one second** of
//! writes: requests acquired or completed in that second can execute again on retry. RDB
//! snapshots alone lose everything since the last snapshot.
//!
//! **Clocks: run NTP.** Leases are judged by the Redis server's clock, so client clock skew does
//! not matter, but a Redis server whose clock jumps forward lapses leases early (turning live
//! attempts into outcome-unknown placeholders); after a failover the new primary's clock takes
//! over, so keep every Redis node's clock in sync. Keep leases (default 30 s) far above any
//! expected jump.
//!
//! **Replication and failover.** Redis replication is asynchronous: a primary acknowledges a
//! write before any replica has it. If the primary dies and a replica is promoted (Sentinel or
//! Cluster failover), writes of the last moments can be lost; a lost acquire lets a concurrent
//! duplicate execute, and a lost complete makes a later retry meet the in-flight record, see its
//! lease lapse and get outcome-unknown (or, if the acquire was lost as well, execute again).
//! [`RedisStoreBuilder::wait_replicas`] sends `WAIT n timeout` in the same round trip as each
//! write: the operation succeeds only once `n` replicas acknowledged it, and otherwise returns
//! `Timeout { maybe_applied: true }` (the request is refused with 503 rather than executed on a
//! record that might vanish). `WAIT` narrows the loss window to writes a promoted replica had not
//! received, and Redis may still promote a replica that missed them: it is not a consensus
//! protocol. For stronger guarantees use the PostgreSQL store with synchronous replication.
//!
//! **Cluster.** Each record lives in the slot of its hash tag; resharding moves records with
//! their slots (the client follows `MOVED`/`ASK`). Pub/sub for wait mode uses sharded channels,
//! which Redis 7.0 or newer provides; on Cluster, Redis 7 is required.

mod conn;
mod scripts;
mod store;
mod subscriber;

pub use store::{DEFAULT_TIMEOUT, RedisStore, RedisStoreBuilder};

#[doc(no_inline)]
pub use idemgate::store::StoreError;
