//! The PostgreSQL backend of idemgate's store contract (SPEC §4).
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use idemgate_store_postgres::PostgresStore;
//! let store = PostgresStore::connect("postgres://idemgate@db.internal/app").await?;
//! # let _ = store; Ok(()) }
//! ```
//!
//! # Design
//!
//! - **One table** (default `idemgate_records`) keyed by the record id (`bytea`), with columns
//!   `state` (1 in flight, 2 completed), `fingerprint`, `token`, `lease_expires_at`, `holder`,
//!   `origin_token`, `outcome` ([`Outcome::encode`](idemgate::record::Outcome::encode) bytes),
//!   `outcome_unknown`, `expires_at` (indexed) and `watched` (see [wait mode](#wait-mode)). The
//!   schema is created or upgraded at connect under an advisory lock, so several instances may
//!   start at once; its version is kept in `<table>_schema`, and with
//!   [`migrate(false)`](PostgresStoreBuilder::migrate) `connect` refuses a table at another
//!   version. An upgrade that must wait for transactions using the table (`ALTER TABLE` needs
//!   it to itself, and every later statement on it queues behind the waiting `ALTER`) waits at
//!   most 0.5 s at a time (`lock_timeout`) and tries again after a 0.5 s pause, ten times,
//!   before `connect` fails saying so: running instances stall for half a second at most.
//!   No database is needed to build: statements are plain `sqlx::query`.
//! - **One statement per operation**, judged by the database clock (`statement_timestamp()`):
//!   `acquire` is one `INSERT … ON CONFLICT … DO UPDATE … WHERE …` that also reads the snapshot
//!   row, implementing `decide_acquire`'s table (a lapsed lease becomes the outcome-unknown
//!   placeholder, or a fresh attempt under `re-execute`; a Completed record past `expires_at`
//!   is replaced). A replay, a mismatch or an in-flight duplicate is answered from the snapshot
//!   without running the insert: no row lock, no WAL, no fsync. When a concurrent writer changes the row between the statement's snapshot
//!   and its write, the statement returns no answer and is run again (bounded). `renew`,
//!   `complete` (fenced as `may_complete`) and `release` are one statement each.
//! - Every operation is idempotent for its token; connection failures (e.g. pooled
//!   connections to a restarted server) are retried on another connection within the
//!   operation's deadline.
//! - A row that cannot be decoded (unknown state, bad lengths, outcome bytes of an unknown
//!   format) is [`StoreError::Corrupt`](idemgate::store::StoreError::Corrupt), never absent and
//!   never `Acquired`. Statements check in SQL what they can (state, lengths, the outcome's
//!   format-version byte) and never overwrite a row that fails; only a forced `delete` clears
//!   it. (An outcome with a valid version byte but a garbled body can still be replaced by the
//!   `complete` of its own origin token; every read of it is `Corrupt`.)
//! - `complete` on an absent record answers `Stored` and writes nothing: the key is owned by
//!   nobody and the statement has no fingerprint to write a record with.
//!
//! # Retention and the reaper
//!
//! Completed rows are kept until `expires_at`. In-flight rows also carry an `expires_at`:
//! the lease end plus the route's retention, moved along by `renew`. A row past `expires_at`
//! is deleted by the reaper: expired outcomes, and in-flight rows whose holder died and that
//! no retry turned into an outcome-unknown placeholder within the retention window.
//!
//! The reaper runs every 60 s (configurable) in each instance, deleting batches of 1000 rows
//! (`… ORDER BY expires_at LIMIT n FOR UPDATE SKIP LOCKED`), each batch one short transaction
//! under `pg_try_advisory_xact_lock`, so one instance reaps at a time and the others skip.
//! [`Store::purge_expired`](idemgate::store::Store::purge_expired) waits for the lock instead.
//!
//! # Wait mode
//!
//! A waiter marks the record's row (`watched`: one `UPDATE` when
//! [`Store::watch`](idemgate::store::Store::watch) is called on an in-flight record), and
//! `complete`, `release`, `delete` and `resolve` of a marked row send
//! `pg_notify('idemgate', <hex id>)` in the same statement (delivered at commit). Rows nobody
//! waits for are changed without a NOTIFY, and that matters for throughput: PostgreSQL
//! serialises the commits of notifying transactions, WAL flush included, so a NOTIFY per
//! `complete` would give every fresh request a flush of its own instead of a shared one (in
//! the transactional mode, the application's transaction too). Each store has **one** LISTEN
//! connection, opened before `connect` returns, feeding an in-process
//! [`WatchHub`](idemgate::store::WatchHub); waiters hold no connection. After the LISTEN
//! connection is lost and re-established every waiter is woken to re-read its record.
//! A LISTEN connection that has been quiet for
//! [`listen_check_interval`](PostgresStoreBuilder::listen_check_interval) (default 30 s) runs
//! `SELECT 1`; one that does not answer within three `acquire_timeout`s is treated as lost.
//! That finds a connection that died without the socket noticing (a silent network
//! partition, a NAT or load balancer that dropped it), which would otherwise deliver nothing
//! and leave waiters to re-check at their lease's end, and its traffic keeps such middleboxes
//! from counting it idle (their idle timeouts are commonly 4–6 minutes).
//!
//! # Failure behaviour
//!
//! - Waiting for a pooled connection is bounded (`acquire_timeout`, default 1 s) →
//!   `Unavailable`. Each connection has a server-side `statement_timeout` (default 5 s) →
//!   `Timeout { maybe_applied: false }` (the server rolled back), and each operation a
//!   client-side deadline of `acquire_timeout + statement_timeout + 0.5 s` →
//!   `Timeout { maybe_applied: true }`. A connection lost after the statement was sent is
//!   `Timeout { maybe_applied: true }`. Nothing hangs.
//! - **Connections.** A store made with [`builder`](PostgresStore::builder) runs its
//!   statements on connections of its own, up to
//!   [`max_connections`](PostgresStoreBuilder::max_connections): a connection whose statement
//!   was answered is reused at once. (sqlx's pool tests every connection given back with a
//!   ping, a second round trip per statement: 13–38 % of the proxy's PostgreSQL throughput.)
//!   [`pool()`](PostgresStore::pool) is a separate sqlx pool of the same size for an
//!   application's own transactions; it opens connections only when used. A store made with
//!   [`builder_with_pool`](PostgresStore::builder_with_pool) runs on the pool it was given.
//! - A connection whose statement met the client-side deadline is closed, never reused: it may
//!   have gone dark (a NAT or load balancer forgot it: no FIN, no RST), and waiting for it
//!   (as sqlx's pool does for a connection given back, with no bound) would hold its place for
//!   as long as the kernel retransmits (~15 minutes). So connections that all went dark cost
//!   a few timed-out operations, then the store works on new ones. A connection whose caller
//!   gave up mid-statement is made ready again in the background (a ping bounded at 5 s) and
//!   reused, so clients that go away do not cost a server process each.
//! - Capacity: optional [`max_rows`](PostgresStoreBuilder::max_rows), counted every 5 s (up
//!   to the bound): at it, `acquire` answers replays and in-flight duplicates as usual but
//!   refuses new keys with `Full`. A row count rather than a size on disk, because PostgreSQL
//!   does not shrink a table's files after deletes, so a size bound would never clear. A
//!   database whose disk is full (SQLSTATE 53100) is `Full` too. Live records are never
//!   evicted.
//!
//! # Transactional mode (exactly once for the database's own writes)
//!
//! With [`transactional`], a handler's writes and the stored outcome commit in **one**
//! transaction on the application's pool: both land, or neither does. The idempotency layer
//! acquires the key on the store's own small lease pool (duplicates get 409 at once); a
//! [`TransactionalLayer`](transactional::TransactionalLayer) begins T, gives it to the handler as
//! a [`TxHandle`](transactional::TxHandle), then runs the fenced completion
//! ([`PostgresStore::settle_in`]: `… WHERE id = $1 AND token = $2 AND in_flight`) and
//! `COMMIT`s. Zero rows changed → rollback and 409 `lease-lost`; a `COMMIT` whose result is
//! unknown → 503 `outcome-unknown`, and the key runs again once its lease lapses (the route
//! uses `on_lease_expiry = re-execute`, safe only here because an uncommitted attempt left
//! nothing behind); a release status → rollback and release. See the module for the whole
//! table of outcomes and the example in `examples/axum-postgres-transactional`.
//!
//! Effects outside the database (a charge through another API, an email) are **not**
//! covered: a re-executed key repeats them. Give them
//! [`downstream_key`](transactional::downstream_key)s (stable per record) or an outbox table.
//!
//! The lower-level [`PostgresStore::complete_in`] runs the ordinary completion statement on a
//! connection the caller owns; [`PostgresStore::table`] names the table for SQL of one's own.
//!
//! # PgBouncer
//!
//! - **Session pooling** works as a direct connection.
//! - **Transaction pooling** breaks what is session-scoped: `LISTEN` (notifications go to
//!   whichever server connection ran it) and session advisory locks (this store only uses
//!   transaction-scoped ones, `pg_advisory_xact_lock`, which work). Deploy with:
//!   - [`listen_url`](PostgresStoreBuilder::listen_url) pointing straight at PostgreSQL (or a
//!     session-pooling PgBouncer port) for the one LISTEN connection per instance, or
//!     [`listen(false)`](PostgresStoreBuilder::listen) to give up wake-ups (waiters then
//!     re-check at the lease's end);
//!   - PgBouncer ≥ 1.21 with `max_prepared_statements` > 0, or
//!     [`statement_cache_capacity(Some(0))`](PostgresStoreBuilder::statement_cache_capacity);
//!   - either `ignore_startup_parameters = options` in PgBouncer with
//!     [`server_side_timeout(false)`](PostgresStoreBuilder::server_side_timeout) and
//!     `ALTER ROLE … SET statement_timeout` on the server, or a PgBouncer that forwards
//!     `options`;
//!   - migrations run in one transaction under a transaction-scoped advisory lock, so they
//!     work through transaction pooling as well.
//! - **Statement pooling** cannot run the migrations' transaction: run one instance (or a
//!   migration job) directly against PostgreSQL first and set
//!   [`migrate(false)`](PostgresStoreBuilder::migrate) behind it.

mod conns;
mod listener;
mod sql;
mod store;
pub mod transactional;

pub use store::{BuildError, PostgresStore, PostgresStoreBuilder, Settlement, settled_origin};
