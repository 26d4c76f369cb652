//! [`PostgresStore`]: the store contract on one PostgreSQL table.

use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use idemgate::record::{
    Completed, Fingerprint, Holder, InFlight, Outcome, Record, RecordId, Timestamp, Token,
};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, Deletion, LeaseExpiry, Release, Renewal, Resolution,
    Resolved, Store, StoreError, Watch, WatchHub,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, Postgres, Row as _};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conns::{Checked, StatementConns};
use crate::listener;
use crate::sql::{
    LOCK_MIGRATE, MIGRATIONS, STATE_COMPLETED, STATE_IN_FLIGHT, Statements, TableName,
};

type PgQuery = sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>;

/// How often `acquire` runs its statement again when a concurrent writer changed the row between
/// the statement's snapshot and its write (each run sees a newer snapshot, so this converges at
/// once in practice).
const ACQUIRE_RACE_RETRIES: u32 = 8;

/// Why a [`PostgresStoreBuilder`] could not build a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting is invalid (e.g. the table name).
    #[error("invalid PostgreSQL store configuration: {0}")]
    Config(String),
    /// The database could not be reached or prepared.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The answer of [`PostgresStore::settle_in`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Exactly one row changed: the outcome commits (or rolls back) with the transaction.
    Settled,
    /// The record is not InFlight(token) any more: roll the transaction back.
    LeaseLost,
}

/// The origin token of an outcome settled inside the application's transaction: derived from
/// the attempt's token so the attempt's own later `complete` is fenced off (see
/// [`PostgresStore::settle_in`]).
pub fn settled_origin(token: Token) -> Token {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(&token.0) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm only satisfies the type.
        Err(_) => return Token([0; 16]),
    };
    mac.update(b"idemgate/tx-settled/v1");
    let digest = mac.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    Token(out)
}

/// Configures and connects a [`PostgresStore`].
///
/// ```no_run
/// # async fn f() -> Result<(), idemgate_store_postgres::BuildError> {
/// use std::time::Duration;
/// let store = idemgate_store_postgres::PostgresStore::builder("postgres://app@db/app")
///     .table("idemgate_records")
///     .max_connections(16)
///     .statement_timeout(Duration::from_secs(2))
///     .max_rows(Some(10_000_000))
///     .connect()
///     .await?;
/// # let _ = store; Ok(()) }
/// ```
#[must_use]
#[derive(Clone, Debug)]
pub struct PostgresStoreBuilder {
    url: String,
    pool: Option<PgPool>,
    listen_url: Option<String>,
    table: String,
    channel: String,
    max_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Duration,
    server_side_timeout: bool,
    statement_cache_capacity: Option<usize>,
    max_rows: Option<u64>,
    capacity_check_interval: Duration,
    reaper_interval: Option<Duration>,
    reaper_batch: u32,
    listen: bool,
    listen_check_interval: Duration,
    migrate: bool,
    holder: Option<Holder>,
}

impl PostgresStoreBuilder {
    fn new(url: String, pool: Option<PgPool>) -> Self {
        PostgresStoreBuilder {
            url,
            pool,
            listen_url: None,
            table: "idemgate_records".into(),
            channel: "idemgate".into(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(5),
            server_side_timeout: true,
            statement_cache_capacity: None,
            max_rows: None,
            capacity_check_interval: Duration::from_secs(5),
            reaper_interval: Some(Duration::from_secs(60)),
            reaper_batch: 1000,
            listen: true,
            listen_check_interval: Duration::from_secs(30),
            migrate: true,
            holder: None,
        }
    }

    /// The table (`name` or `schema.name`; letters, digits, `_`). Default `idemgate_records`.
    /// Its schema-version table is `<name>_schema`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The LISTEN/NOTIFY channel for wait mode. Default `idemgate`.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// A separate URL for the one LISTEN connection, e.g. straight to PostgreSQL when `url`
    /// goes through a transaction-pooling PgBouncer (which cannot carry LISTEN).
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen_url = Some(url.into());
        self
    }

    /// Whether to run the LISTEN connection (wait mode). Default on. Off: [`Store::watch`]
    /// returns subscriptions that never fire and waiters re-check at the lease's end.
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = on;
        self
    }

    /// How long the LISTEN connection may go without traffic before a `SELECT 1` checks it.
    /// Default 30 s. A check not answered within three `acquire_timeout`s counts as the
    /// connection lost: it is replaced and every waiter re-reads its record. This finds a
    /// connection that died silently (a network partition, a NAT or load balancer dropping
    /// it), and keeps such middleboxes from dropping it for being idle.
    pub fn listen_check_interval(mut self, d: Duration) -> Self {
        self.listen_check_interval = d.max(Duration::from_millis(10));
        self
    }

    /// Most connections the store's statements use at once (ignored with
    /// [`PostgresStore::builder_with_pool`]), and the size of [`PostgresStore::pool`].
    /// Default 10.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long an operation waits for a pooled connection (or a new one) before failing with
    /// [`StoreError::Unavailable`]. Default 1 s.
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }

    /// The server-side `statement_timeout` of the store's connections, and (plus a margin) the
    /// client-side deadline of each operation. Default 5 s.
    pub fn statement_timeout(mut self, d: Duration) -> Self {
        self.statement_timeout = d;
        self
    }

    /// Whether to send `statement_timeout` as a startup option on each connection. Default on.
    /// Turn off behind a PgBouncer that rejects startup options, and set the timeout on the
    /// role instead (`ALTER ROLE … SET statement_timeout = '5s'`); the client-side deadline
    /// applies either way.
    pub fn server_side_timeout(mut self, on: bool) -> Self {
        self.server_side_timeout = on;
        self
    }

    /// The prepared-statement cache per connection (sqlx's default when unset). `Some(0)` for
    /// a PgBouncer older than 1.21 in transaction mode, which cannot keep named statements.
    pub fn statement_cache_capacity(mut self, n: Option<usize>) -> Self {
        self.statement_cache_capacity = n;
        self
    }

    /// The capacity bound: when the table holds this many rows (live or awaiting the reaper),
    /// `acquire` refuses to write new records with [`StoreError::Full`]; replays and in-flight
    /// answers still work and live records are never evicted. Counted (up to the bound, so a
    /// check costs O(bound)) every [`capacity_check_interval`](Self::capacity_check_interval)
    /// and after each reaper run, so the table may overshoot by what is acquired within one
    /// interval. Bytes are bounded by rows × the route's stored-response limit. At the bound,
    /// `acquire` writes nothing at all: a key that would need a write (new, expired, or a
    /// lapsed lease to turn into its placeholder) is `Full` until the reaper frees rows.
    ///
    /// A row count and not the table's size on disk, because PostgreSQL does not give space
    /// back to the file system after deletes (only VACUUM FULL does): a size bound, once
    /// reached, would never clear. Default `None`: bounded only by the database's disk (a full
    /// disk, SQLSTATE 53100, is reported as `Full`).
    pub fn max_rows(mut self, rows: Option<u64>) -> Self {
        self.max_rows = rows;
        self
    }

    /// How often the rows are counted for [`max_rows`](Self::max_rows). Default 5 s.
    pub fn capacity_check_interval(mut self, d: Duration) -> Self {
        self.capacity_check_interval = d;
        self
    }

    /// How often the background reaper deletes expired records; `None` disables it (call
    /// [`Store::purge_expired`] yourself). Default 60 s.
    pub fn reaper_interval(mut self, d: Option<Duration>) -> Self {
        self.reaper_interval = d;
        self
    }

    /// Rows deleted per reaper statement (each batch is its own short transaction). Default 1000.
    pub fn reaper_batch(mut self, n: u32) -> Self {
        self.reaper_batch = n.max(1);
        self
    }

    /// Whether to create or upgrade the table at connect (under an advisory lock, so instances
    /// starting together are safe). Default on. Off, `connect` checks that the table is at this
    /// build's schema version and fails with [`BuildError::Config`] if not.
    pub fn migrate(mut self, on: bool) -> Self {
        self.migrate = on;
        self
    }

    /// The holder written into in-flight rows (informational: leases are judged by the
    /// database clock). Default: derived from the process id and start time.
    pub fn holder(mut self, holder: Holder) -> Self {
        self.holder = Some(holder);
        self
    }

    /// Connects, migrates, starts the listener and background tasks. Must run inside a Tokio
    /// runtime.
    pub async fn connect(self) -> Result<PostgresStore, BuildError> {
        let table = TableName::parse(&self.table)
            .ok_or_else(|| BuildError::Config(format!("invalid table name {:?}", self.table)))?;
        if self.channel.is_empty() || self.channel.len() > 63 {
            return Err(BuildError::Config(format!(
                "invalid channel name {:?}",
                self.channel
            )));
        }
        let mut own = None;
        let pool = match &self.pool {
            Some(p) => p.clone(),
            None => {
                let opts = self.connect_options(&self.url)?;
                own = Some(StatementConns::new(
                    opts.clone(),
                    self.max_connections,
                    self.acquire_timeout,
                ));
                // For `pool()` only (an application's transactions): the store's own
                // statements run on `own`. Lazy, so it opens nothing unless used.
                PgPoolOptions::new()
                    .max_connections(self.max_connections)
                    .acquire_timeout(self.acquire_timeout)
                    // A ping per checkout would add a round trip to every borrowing; a stale
                    // connection fails fast instead.
                    .test_before_acquire(false)
                    .idle_timeout(Some(Duration::from_secs(60)))
                    .connect_lazy_with(opts)
            }
        };
        let sql = Statements::new(&table);
        let op_timeout = self.acquire_timeout + self.statement_timeout + Duration::from_millis(500);
        let holder = self.holder.unwrap_or_else(default_holder);
        let inner = Arc::new(Inner {
            pool,
            own,
            table,
            sql,
            channel: self.channel.clone(),
            hub: WatchHub::new(),
            watching: self.listen,
            holder,
            placeholder: Outcome::outcome_unknown().encode(),
            full: AtomicBool::new(false),
            max_rows: self.max_rows,
            op_timeout,
            reaper_batch: i64::from(self.reaper_batch),
            tasks: Mutex::new(Vec::new()),
        });

        if self.migrate {
            inner.migrate().await?;
        } else {
            inner.check_schema_version().await?;
        }
        inner.check_capacity().await?;

        let mut tasks = Vec::new();
        if self.listen {
            let listen_opts = match &self.listen_url {
                Some(u) => self.connect_options(u)?,
                None => (*inner.pool.connect_options()).clone(),
            };
            // Listening is established before `connect` returns, so a waiter that subscribes
            // and then re-reads can never miss a change made after its re-read.
            let l = listener::start(
                listen_opts,
                self.acquire_timeout,
                self.listen_check_interval,
                inner.channel.clone(),
                inner.hub.clone(),
            )
            .await?;
            tasks.push(l);
        }
        if let Some(every) = self.reaper_interval {
            tasks.push(tokio::spawn(reaper(Arc::downgrade(&inner), every)));
        }
        if self.max_rows.is_some() {
            tasks.push(tokio::spawn(capacity_watch(
                Arc::downgrade(&inner),
                self.capacity_check_interval,
            )));
        }
        *lock(&inner.tasks) = tasks;
        Ok(PostgresStore { inner })
    }

    fn connect_options(&self, url: &str) -> Result<PgConnectOptions, BuildError> {
        let mut opts = PgConnectOptions::from_str(url)
            .map_err(|e| BuildError::Config(format!("invalid PostgreSQL URL: {e}")))?;
        if opts.get_application_name().is_none() {
            opts = opts.application_name("idemgate");
        }
        if self.server_side_timeout {
            let ms = self.statement_timeout.as_millis().max(1);
            // Only statement_timeout: the store's own statements are single autocommit
            // statements, and an application borrowing `pool()` for its transactions should
            // not find an idle-in-transaction limit it did not ask for.
            opts = opts.options([("statement_timeout", ms.to_string())]);
        }
        if let Some(n) = self.statement_cache_capacity {
            opts = opts.statement_cache_capacity(n);
        }
        Ok(opts)
    }
}

/// The PostgreSQL backend of the store contract (SPEC §4).
///
/// One table keyed by record id; every operation is one statement judged by the database's
/// clock. Cloning is cheap and shares the pool, the listener and the background tasks, which
/// stop when the last clone is dropped. See the [crate docs](crate) for the schema, capacity,
/// failure behaviour and PgBouncer.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table.display())
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: PgPool,
    /// The connections for the store's own statements when it made its pool itself (see
    /// `conns.rs`); `None` with [`PostgresStore::builder_with_pool`], whose pool serves them.
    own: Option<Arc<StatementConns>>,
    table: TableName,
    sql: Statements,
    /// NOTIFY channel written by `complete`/`release`/`delete`/`resolve`.
    channel: String,
    /// Wakes this process's waiters; fed by the one LISTEN connection.
    hub: WatchHub,
    watching: bool,
    holder: Holder,
    /// `Outcome::outcome_unknown().encode()`, bound into `acquire` for lapsed leases.
    placeholder: Vec<u8>,
    /// Set by the capacity check when the table is over `max_rows`.
    full: AtomicBool,
    max_rows: Option<u64>,
    /// Client-side bound on one operation (pool wait + statement + margin): never a hang.
    op_timeout: Duration,
    reaper_batch: i64,
    /// Listener, reaper and capacity tasks; they hold only a `Weak` to us and are aborted when
    /// we drop.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl PostgresStore {
    /// A builder for a store on `url` (`postgres://user:pass@host:port/db?sslmode=…`).
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(url.into(), None)
    }

    /// A builder for a store on an existing pool (e.g. the application's, for the transactional
    /// mode). Pool size and timeouts are the pool's; set `statement_timeout` on it yourself.
    pub fn builder_with_pool(pool: PgPool) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(String::new(), Some(pool))
    }

    /// Connects with the defaults.
    pub async fn connect(url: impl Into<String>) -> Result<Self, BuildError> {
        Self::builder(url).connect().await
    }

    /// A sqlx pool on the store's database, for an application's own transactions (e.g. the
    /// transactional mode). With [`builder`](Self::builder) the store's statements do not use
    /// it (see the crate docs' failure behaviour); with
    /// [`builder_with_pool`](Self::builder_with_pool) it is the pool given, which they use.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The quoted, qualified table name, for SQL an application writes against the records
    /// table (e.g. in its own transaction).
    pub fn table(&self) -> String {
        self.inner.table.quoted()
    }

    /// Completes the attempt `token` on a connection the caller controls, typically inside the
    /// application's own transaction (`&mut *tx`), so the outcome commits atomically with the
    /// application's writes (the transactional exactly-once mode).
    ///
    /// Same statement, fencing and answer as [`Store::complete`]; the NOTIFY it sends (when a
    /// waiter marked the row) is delivered when the transaction commits. The row stays locked
    /// until then: a concurrent `acquire` that sees the record in flight with a live lease
    /// answers `InFlight` at once (it only reads), but one that finds the lease lapsed tries to
    /// write and waits for the commit (bounded by its `statement_timeout`), then answers from
    /// the committed row. Not
    /// retried: a connection error is returned and the caller's transaction is lost anyway.
    pub async fn complete_in(
        &self,
        conn: &mut PgConnection,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let q = self.inner.complete_query(id, token, outcome, ttl);
        let row = q.fetch_optional(conn).await.map_err(|e| map_err(e, true))?;
        let row = row.ok_or_else(|| StoreError::Corrupt("complete returned no row".into()))?;
        match self.inner.complete_answer(&row, token)? {
            Some(c) => Ok(c),
            // Read committed: the row changed between snapshot and write. The caller can run
            // it again in the same transaction; say so through a retryable error.
            None => Err(StoreError::Unavailable(
                "the record changed during complete; run it again".into(),
            )),
        }
    }

    /// The transactional mode's fenced completion, on a connection the caller controls (inside
    /// the application's transaction): stores `outcome` only if the record is still
    /// InFlight(`token`), and says [`Settlement::LeaseLost`] otherwise (the lease lapsed and
    /// another attempt took the key, an operator deleted it, or the attempt was already written
    /// off). Stricter than [`complete_in`](Self::complete_in), which also accepts an absent
    /// record and its own outcome-unknown placeholder: with the application's writes in the
    /// same transaction, anything but exactly one changed row must roll back.
    ///
    /// The stored outcome's origin token is derived from `token`, not `token` itself, so that
    /// no later [`Store::complete`] with the attempt's token can overwrite an outcome that
    /// committed with the application's writes. The row stays locked until the transaction
    /// ends (a waiter marking it waits for that too); the NOTIFY, sent when a waiter marked the
    /// row, is delivered at commit. See [`crate::transactional`] for the whole
    /// protocol.
    pub async fn settle_in(
        &self,
        conn: &mut PgConnection,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Settlement, StoreError> {
        self.settle_raw(conn, id, token, outcome, ttl)
            .await
            .map_err(|e| map_err(e, true))
    }

    /// [`settle_in`](Self::settle_in) with the driver's error, so the transactional adapter can
    /// tell a lost connection from a failed transaction.
    pub(crate) async fn settle_raw(
        &self,
        conn: &mut PgConnection,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Settlement, sqlx::Error> {
        let s = &self.inner;
        let row = Inner::q(&s.sql.settle)
            .bind(&id.0[..])
            .bind(&token.0[..])
            .bind(outcome.encode())
            .bind(ms_i64(ttl))
            .bind(s.channel.as_str())
            .bind(id.to_hex())
            .bind(&settled_origin(token).0[..])
            .fetch_one(conn)
            .await?;
        let changed: i64 = row.try_get("changed")?;
        Ok(if changed == 1 {
            Settlement::Settled
        } else {
            Settlement::LeaseLost
        })
    }

    /// The hub that wakes this process's waiters (exposed for tests and metrics).
    pub fn watch_hub(&self) -> &WatchHub {
        &self.inner.hub
    }

    /// Runs the reaper once without waiting for the advisory lock: returns `None` when another
    /// instance holds it (the background task's behaviour), else how many rows were deleted.
    pub async fn reap_once(&self) -> Result<Option<u64>, StoreError> {
        self.inner.purge(false).await
    }

    /// Counts the rows now (up to the bound) and updates the capacity flag (normally done every
    /// `capacity_check_interval`). Returns the count; 0 without a bound.
    pub async fn check_capacity(&self) -> Result<u64, StoreError> {
        self.inner.check_capacity().await
    }
}

impl Inner {
    fn q(sql: &Arc<str>) -> PgQuery {
        sqlx::query(AssertSqlSafe(sql.clone()))
    }

    /// A connection for one of the store's statements: from its own connections, or from the
    /// pool it was given.
    async fn conn(&self) -> Result<StoreConn, sqlx::Error> {
        Ok(match &self.own {
            Some(own) => StoreConn::Own(own.acquire().await?),
            None => StoreConn::Pooled(self.pool.acquire().await?),
        })
    }

    fn max_connections(&self) -> u32 {
        match &self.own {
            Some(own) => own.max(),
            None => self.pool.options().get_max_connections(),
        }
    }

    /// Runs one statement with bounded waits. Connection-level failures (a pooled connection
    /// that died with a restarted server) are retried on another connection within the same
    /// deadline: every token operation is idempotent, so a repeat answers as the first would.
    async fn fetch(&self, make: impl Fn() -> PgQuery) -> Result<Option<PgRow>, StoreError> {
        let deadline = Instant::now() + self.op_timeout;
        // One timer for every attempt's waits: they share the deadline.
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        let max_attempts = self.max_connections() + 2;
        let mut maybe_applied = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failed = match before(expiry.as_mut(), self.conn()).await {
                None => None,
                Some(Err(e)) => Some((e, false)),
                Some(Ok(mut conn)) => {
                    let statement = async { make().fetch_optional(conn.get()?).await };
                    match before(expiry.as_mut(), statement).await {
                        None => {
                            // No answer in time: the connection may have gone dark (a NAT or
                            // load balancer forgot it: no FIN, no RST). It is closed now,
                            // never pooled again (see `StoreConn::discard`).
                            conn.discard();
                            None
                        }
                        Some(Ok(row)) => {
                            conn.done();
                            return Ok(row);
                        }
                        Some(Err(e)) => {
                            conn.end_with_error(&e);
                            Some((e, true))
                        }
                    }
                }
            };
            match failed {
                None => {
                    return Err(StoreError::Timeout {
                        maybe_applied: true,
                    });
                }
                Some((e, sent)) => {
                    maybe_applied |= sent && !is_rolled_back(&e);
                    if is_connection_error(&e)
                        && attempt < max_attempts
                        && Instant::now() < deadline
                    {
                        tracing::debug!(error = %e, attempt, "postgres store: retrying on another connection");
                        continue;
                    }
                    let err = map_err(e, sent);
                    return Err(match err {
                        StoreError::Unavailable(_) if maybe_applied => StoreError::Timeout {
                            maybe_applied: true,
                        },
                        other => other,
                    });
                }
            }
        }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut attempt = 1;
        loop {
            match self.migrate_once().await {
                Err(MigrateError::Locked) if attempt < MIGRATION_ATTEMPTS => {
                    tracing::info!(
                        table = %self.table.display(),
                        attempt,
                        "postgres store: the table is in use by other transactions; trying its \
                         schema upgrade again shortly"
                    );
                    attempt += 1;
                    tokio::time::sleep(MIGRATION_RETRY_PAUSE).await;
                }
                Err(MigrateError::Locked) => {
                    return Err(StoreError::Unavailable(format!(
                        "the schema upgrade of table {} to version {} could not lock the table \
                         in {MIGRATION_ATTEMPTS} tries (each waiting {} ms): other transactions \
                         kept using it; end them (see pg_stat_activity) or start again once \
                         they are done",
                        self.table.display(),
                        MIGRATIONS.len(),
                        MIGRATION_LOCK_TIMEOUT.as_millis()
                    )));
                }
                Err(MigrateError::Store(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// One try at [`migrate`](Self::migrate), in one transaction.
    async fn migrate_once(&self) -> Result<(), MigrateError> {
        let t = self.table.quoted();
        let versions = self.table.quoted_with("_schema");
        let run = async {
            let mut conn = self.conn().await?;
            let mut tx = conn.get()?.begin().await?;
            // Serialises instances that start together: CREATE … IF NOT EXISTS alone can still
            // fail with a unique violation in the catalog when two run at once.
            sqlx::query(AssertSqlSafe(format!(
                "SELECT pg_advisory_xact_lock({LOCK_MIGRATE}, hashtext($1))"
            )))
            .bind(self.table.display())
            .execute(&mut *tx)
            .await?;
            // Set after the advisory lock, for which instances starting together wait in turn.
            sqlx::raw_sql(AssertSqlSafe(format!(
                "SET LOCAL lock_timeout = '{}ms'",
                MIGRATION_LOCK_TIMEOUT.as_millis()
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE IF NOT EXISTS {versions} (version integer PRIMARY KEY, \
                 applied_at timestamptz NOT NULL DEFAULT now())"
            )))
            .execute(&mut *tx)
            .await?;
            let current: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT max(version) FROM {versions}"
            )))
            .fetch_one(&mut *tx)
            .await?;
            let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
            if current > MIGRATIONS.len() {
                return Ok::<_, sqlx::Error>(Some(current));
            }
            for (i, m) in MIGRATIONS.iter().enumerate().skip(current) {
                let ddl = m.replace("{t}", &t).replace("{idx}", self.table.bare());
                sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {versions} (version) VALUES ($1)"
                )))
                .bind(i32::try_from(i + 1).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            conn.done();
            Ok(None)
        };
        match tokio::time::timeout(self.op_timeout * 4, run).await {
            Err(_) => Err(MigrateError::Store(StoreError::Timeout {
                maybe_applied: true,
            })),
            Ok(Err(e)) if is_lock_timeout(&e) => Err(MigrateError::Locked),
            Ok(Err(e)) => Err(MigrateError::Store(map_err(e, true))),
            Ok(Ok(Some(newer))) => Err(MigrateError::Store(StoreError::Corrupt(format!(
                "table {} has schema version {newer}, newer than this build ({}) knows",
                self.table.display(),
                MIGRATIONS.len()
            )))),
            Ok(Ok(None)) => Ok(()),
        }
    }

    /// Without migrations, the table must already be at this build's schema version: the
    /// statements use every column of it.
    async fn check_schema_version(&self) -> Result<(), BuildError> {
        let versions = self.table.quoted_with("_schema");
        let read = async {
            let mut conn = self.conn().await?;
            let version = sqlx::query_scalar::<_, Option<i32>>(AssertSqlSafe(format!(
                "SELECT max(version) FROM {versions}"
            )))
            .fetch_one(conn.get()?)
            .await;
            match &version {
                Ok(_) => conn.done(),
                // No such table is an answer too.
                Err(e) => conn.end_with_error(e),
            }
            version
        };
        let found = match tokio::time::timeout(self.op_timeout, read).await {
            Err(_) => {
                return Err(BuildError::Store(StoreError::Timeout {
                    maybe_applied: false,
                }));
            }
            // 42P01: no version table; the schema was never migrated.
            Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("42P01") => None,
            Ok(Err(e)) => return Err(BuildError::Store(map_err(e, false))),
            Ok(Ok(v)) => v,
        };
        let wanted = MIGRATIONS.len();
        match found.and_then(|v| usize::try_from(v).ok()) {
            Some(v) if v == wanted => Ok(()),
            found => Err(BuildError::Config(format!(
                "table {} is at schema version {}, this build needs version {wanted}; connect \
                 once with migrations on (the default) to upgrade it",
                self.table.display(),
                found.map_or_else(|| "none".to_owned(), |v| v.to_string()),
            ))),
        }
    }

    async fn check_capacity(&self) -> Result<u64, StoreError> {
        let Some(max) = self.max_rows else {
            return Ok(0);
        };
        let row = self
            .fetch(|| Self::q(&self.sql.count_capped).bind(i64::try_from(max).unwrap_or(i64::MAX)))
            .await?
            .ok_or_else(|| StoreError::Unavailable("count query returned no row".into()))?;
        let size: i64 = row.try_get(0).map_err(|e| map_err(e, false))?;
        let size = u64::try_from(size).unwrap_or(0);
        let full = size >= max;
        if full != self.full.swap(full, Ordering::Relaxed) {
            if full {
                tracing::warn!(size, max, table = %self.table.display(), "postgres store is full (max_rows): new keys are refused until the reaper frees space");
            } else {
                tracing::info!(size, max, "postgres store has room again");
            }
        }
        Ok(size)
    }

    /// Deletes expired rows in batches. `wait` takes the reaper lock blocking (an explicit
    /// purge); otherwise gives up at once when another instance holds it (`None`).
    async fn purge(&self, wait: bool) -> Result<Option<u64>, StoreError> {
        let sql = if wait {
            &self.sql.purge_batch_wait
        } else {
            &self.sql.purge_batch_try
        };
        let key = self.table.display();
        let mut total = 0u64;
        // Bounded: a table that keeps expiring faster than we delete is finished next run.
        for _ in 0..10_000 {
            let row = self
                .fetch(|| Self::q(sql).bind(key.as_str()).bind(self.reaper_batch))
                .await?
                .ok_or_else(|| StoreError::Unavailable("reaper returned no row".into()))?;
            let got: bool = row.try_get("got").map_err(|e| map_err(e, true))?;
            let deleted: i64 = row.try_get("deleted").map_err(|e| map_err(e, true))?;
            if !got {
                return Ok(if total == 0 { None } else { Some(total) });
            }
            total += u64::try_from(deleted).unwrap_or(0);
            if deleted < self.reaper_batch {
                break;
            }
        }
        Ok(Some(total))
    }

    fn complete_query(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> PgQuery {
        Self::q(&self.sql.complete)
            .bind(&id.0[..])
            .bind(&token.0[..])
            .bind(outcome.encode())
            .bind(ms_i64(ttl))
            .bind(outcome.is_outcome_unknown())
            .bind(self.channel.as_str())
            .bind(id.to_hex())
    }

    /// `Some(answer)`, or `None` when the row changed between snapshot and write (run again).
    fn complete_answer(&self, row: &PgRow, token: Token) -> Result<Option<Completion>, StoreError> {
        let changed: i64 = row.try_get("changed").map_err(|e| map_err(e, true))?;
        if changed > 0 {
            return Ok(Some(Completion::Stored));
        }
        let cur = RowFields::read(row)?;
        Ok(match cur.record()? {
            None => Some(Completion::Stored),
            Some(r) if idemgate::store::may_complete(Some(&r), token) => None,
            Some(_) => Some(Completion::Refused),
        })
    }

    /// Runs a change statement whose row carries `changed` and the snapshot record; `decide`
    /// maps (changed, snapshot) to an answer or `None` for "raced, run again".
    async fn change<T>(
        &self,
        make: impl Fn() -> PgQuery,
        decide: impl Fn(bool, Option<Record>) -> Option<T>,
    ) -> Result<T, StoreError> {
        for _ in 0..ACQUIRE_RACE_RETRIES {
            let row = self
                .fetch(&make)
                .await?
                .ok_or_else(|| StoreError::Corrupt("statement returned no row".into()))?;
            let changed: i64 = row.try_get("changed").map_err(|e| map_err(e, true))?;
            let cur = if changed > 0 {
                // The snapshot may be unreadable, but the change was applied; do not fail it.
                RowFields::read(&row)?.record().ok().flatten()
            } else {
                RowFields::read(&row)?.record()?
            };
            if let Some(answer) = decide(changed > 0, cur) {
                return Ok(answer);
            }
        }
        Err(StoreError::Unavailable(
            "the record kept changing concurrently; try again".into(),
        ))
    }

    fn notify_local(&self, id: &RecordId) {
        // The NOTIFY reaches this process too, through the listener; waking local waiters now
        // saves them that round trip and covers a listener that is reconnecting.
        self.hub.notify(id);
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Acquire, StoreError> {
        let s = &self.inner;
        let lapse_to_unknown = matches!(req.on_lease_expiry, LeaseExpiry::OutcomeUnknown);
        let holder = i64::from_ne_bytes(s.holder.0.to_ne_bytes());
        for _ in 0..ACQUIRE_RACE_RETRIES {
            let allow_insert = !s.full.load(Ordering::Relaxed);
            let row = s
                .fetch(|| {
                    Inner::q(&s.sql.acquire)
                        .bind(&req.id.0[..])
                        .bind(&req.fingerprint.0[..])
                        .bind(&req.token.0[..])
                        .bind(ms_i64(req.lease))
                        .bind(holder)
                        .bind(lapse_to_unknown)
                        .bind(&s.placeholder[..])
                        .bind(ms_i64(req.retention))
                        .bind(allow_insert)
                })
                .await?;
            let answer = match row {
                None => None,
                Some(row) => {
                    let written: bool = row.try_get("written").map_err(|e| map_err(e, true))?;
                    let f = RowFields::read(&row)?;
                    if written {
                        Some(written_answer(&f, &req)?)
                    } else {
                        read_answer(&f, &req)?
                    }
                }
            };
            match answer {
                Some(a) => return Ok(a),
                // A write was due but did not happen: either the capacity bound stopped it, or
                // the row changed between the snapshot and the write.
                None if !allow_insert => {
                    return Err(StoreError::Full(format!(
                        "table {} holds max_rows records",
                        s.table.display()
                    )));
                }
                None => continue,
            }
        }
        Err(StoreError::Unavailable(
            "acquire kept racing with concurrent writers; try again".into(),
        ))
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: Token,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        let s = &self.inner;
        for _ in 0..ACQUIRE_RACE_RETRIES {
            let row = s
                .fetch(|| {
                    Inner::q(&s.sql.renew)
                        .bind(&id.0[..])
                        .bind(&token.0[..])
                        .bind(ms_i64(lease))
                })
                .await?
                .ok_or_else(|| StoreError::Corrupt("renew returned no row".into()))?;
            let renewed: Option<i64> = row.try_get("renewed_ms").map_err(|e| map_err(e, true))?;
            if let Some(ms) = renewed {
                return Ok(Renewal::Renewed {
                    lease_expires_at: ts(ms),
                });
            }
            match RowFields::read(&row)?.record()? {
                Some(Record::InFlight(f)) if f.token == token => continue,
                _ => return Ok(Renewal::Refused),
            }
        }
        Err(StoreError::Unavailable(
            "renew kept racing with concurrent writers; try again".into(),
        ))
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let s = &self.inner;
        for _ in 0..ACQUIRE_RACE_RETRIES {
            let row = s
                .fetch(|| s.complete_query(id, token, outcome, ttl))
                .await?
                .ok_or_else(|| StoreError::Corrupt("complete returned no row".into()))?;
            if let Some(answer) = s.complete_answer(&row, token)? {
                if answer == Completion::Stored {
                    s.notify_local(id);
                }
                return Ok(answer);
            }
        }
        Err(StoreError::Unavailable(
            "complete kept racing with concurrent writers; try again".into(),
        ))
    }

    async fn release(&self, id: &RecordId, token: Token) -> Result<Release, StoreError> {
        let s = &self.inner;
        let answer = s
            .change(
                || {
                    Inner::q(&s.sql.release)
                        .bind(&id.0[..])
                        .bind(&token.0[..])
                        .bind(s.channel.as_str())
                        .bind(id.to_hex())
                },
                |changed, cur| match (changed, cur) {
                    (true, _) | (false, None) => Some(Release::Released),
                    // Deletion missed a row the snapshot says was ours: it changed; run again.
                    (false, Some(Record::InFlight(f))) if f.token == token => None,
                    (false, Some(_)) => Some(Release::Refused),
                },
            )
            .await?;
        if answer == Release::Released {
            s.notify_local(id);
        }
        Ok(answer)
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        let s = &self.inner;
        match s.fetch(|| Inner::q(&s.sql.get).bind(&id.0[..])).await? {
            None => Ok(None),
            Some(row) => RowFields::read(&row)?.record(),
        }
    }

    async fn delete(&self, id: &RecordId, force: bool) -> Result<Deletion, StoreError> {
        let s = &self.inner;
        // Works on rows of any state, readable or not, so it never decodes the record.
        for _ in 0..ACQUIRE_RACE_RETRIES {
            let row = s
                .fetch(|| {
                    Inner::q(&s.sql.delete)
                        .bind(&id.0[..])
                        .bind(force)
                        .bind(s.channel.as_str())
                        .bind(id.to_hex())
                })
                .await?
                .ok_or_else(|| StoreError::Corrupt("delete returned no row".into()))?;
            let changed: i64 = row.try_get("changed").map_err(|e| map_err(e, true))?;
            if changed > 0 {
                s.notify_local(id);
                return Ok(Deletion::Deleted);
            }
            let state: Option<i16> = row.try_get("state").map_err(|e| map_err(e, true))?;
            match state {
                None => return Ok(Deletion::NotFound),
                Some(STATE_IN_FLIGHT) if !force => return Ok(Deletion::InFlightNeedsForce),
                // The snapshot had a row the delete did not find: it changed under us.
                Some(_) => continue,
            }
        }
        Err(StoreError::Unavailable(
            "delete kept racing with concurrent writers; try again".into(),
        ))
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution) -> Result<Resolved, StoreError> {
        let s = &self.inner;
        let decide = |changed: bool, cur: Option<Record>| match (changed, cur) {
            (true, _) => Some(Resolved::Resolved),
            (false, None) => Some(Resolved::NotFound),
            (false, Some(Record::Completed(c))) if c.outcome.is_outcome_unknown() => None,
            (false, Some(_)) => Some(Resolved::NotOutcomeUnknown),
        };
        let answer = match &resolution {
            Resolution::Release => {
                s.change(
                    || {
                        Inner::q(&s.sql.resolve_release)
                            .bind(&id.0[..])
                            .bind(s.channel.as_str())
                            .bind(id.to_hex())
                    },
                    decide,
                )
                .await?
            }
            Resolution::Respond { outcome, ttl } => {
                let bytes = outcome.encode();
                let origin = Token::random();
                s.change(
                    || {
                        Inner::q(&s.sql.resolve_respond)
                            .bind(&id.0[..])
                            .bind(s.channel.as_str())
                            .bind(id.to_hex())
                            .bind(&bytes[..])
                            .bind(outcome.is_outcome_unknown())
                            .bind(ms_i64(*ttl))
                            .bind(&origin.0[..])
                    },
                    decide,
                )
                .await?
            }
        };
        if answer == Resolved::Resolved {
            tracing::info!(record_id = %id, ?resolution, "postgres store: outcome-unknown record resolved");
            s.notify_local(id);
        }
        Ok(answer)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let n = self.inner.purge(true).await?.unwrap_or(0);
        if self.inner.max_rows.is_some() && n > 0 {
            let _ = self.inner.check_capacity().await;
        }
        Ok(n)
    }

    async fn watch(&self, id: &RecordId, max_waiters: usize) -> Result<Option<Watch>, StoreError> {
        if !self.inner.watching {
            return Ok(Some(Watch::never()));
        }
        // The listener has been LISTENing since construction (and re-reads are forced after a
        // reconnect with `notify_all`). Subscribed here first, then the row is marked, so that
        // the change statement that ends it sends a NOTIFY (see `sql.rs`); the caller re-reads
        // after this returns, so a change made before the mark is what it finds.
        let Some(watch) = self.inner.hub.watch(id, max_waiters) else {
            return Ok(None);
        };
        let s = &self.inner;
        s.fetch(|| Inner::q(&s.sql.mark_watched).bind(&id.0[..]))
            .await?;
        Ok(Some(watch))
    }

    async fn readiness(&self) -> Result<(), StoreError> {
        let s = &self.inner;
        s.fetch(|| Inner::q(&s.sql.get).bind(&[0u8; 32][..]))
            .await
            .map(|_| ())
    }
}

/// The answer when `acquire` wrote the row it returns.
fn written_answer(f: &RowFields, req: &AcquireRequest) -> Result<Acquire, StoreError> {
    match f.record()? {
        Some(Record::InFlight(r)) => Ok(Acquire::Acquired {
            lease_expires_at: r.lease_expires_at,
        }),
        Some(Record::Completed(c)) => Ok(if c.fingerprint == req.fingerprint {
            Acquire::Completed(Box::new(c))
        } else {
            Acquire::Mismatch
        }),
        None => Err(StoreError::Corrupt("acquire wrote no record".into())),
    }
}

/// The answer from the snapshot row when `acquire` wrote nothing: the read-only rows of
/// `decide_acquire`'s table, or `None` when that table says a write was due (a race, or the
/// capacity bound).
fn read_answer(f: &RowFields, req: &AcquireRequest) -> Result<Option<Acquire>, StoreError> {
    let expired = f.expired.unwrap_or(false);
    let lapsed = f.lapsed.unwrap_or(false);
    Ok(match f.record()? {
        None => None,
        Some(Record::Completed(_)) if expired => None,
        Some(Record::Completed(c)) if c.fingerprint != req.fingerprint => Some(Acquire::Mismatch),
        Some(Record::Completed(c)) => Some(Acquire::Completed(Box::new(c))),
        Some(Record::InFlight(r)) if r.token == req.token => Some(Acquire::Acquired {
            lease_expires_at: r.lease_expires_at,
        }),
        Some(Record::InFlight(_)) if lapsed => None,
        Some(Record::InFlight(r)) if r.fingerprint != req.fingerprint => Some(Acquire::Mismatch),
        Some(Record::InFlight(r)) => Some(Acquire::InFlight {
            lease_expires_at: r.lease_expires_at,
        }),
    })
}

/// The record columns of a statement's row (see `sql::row_cols`); all NULL when absent.
pub(crate) struct RowFields {
    state: Option<i16>,
    fingerprint: Option<Vec<u8>>,
    token: Option<Vec<u8>>,
    lease_ms: Option<i64>,
    holder: Option<i64>,
    origin_token: Option<Vec<u8>>,
    outcome: Option<Vec<u8>>,
    expires_ms: Option<i64>,
    expired: Option<bool>,
    lapsed: Option<bool>,
}

impl RowFields {
    fn read(row: &PgRow) -> Result<Self, StoreError> {
        let get = |e: sqlx::Error| StoreError::Corrupt(format!("unexpected row shape: {e}"));
        Ok(RowFields {
            state: row.try_get("state").map_err(get)?,
            fingerprint: row.try_get("fingerprint").map_err(get)?,
            token: row.try_get("token").map_err(get)?,
            lease_ms: row.try_get("lease_ms").map_err(get)?,
            holder: row.try_get("holder").map_err(get)?,
            origin_token: row.try_get("origin_token").map_err(get)?,
            outcome: row.try_get("outcome").map_err(get)?,
            expires_ms: row.try_get("expires_ms").map_err(get)?,
            expired: row.try_get("expired").map_err(get)?,
            lapsed: row.try_get("lapsed").map_err(get)?,
        })
    }

    /// The record, `None` when there is no row, `Corrupt` when the row is not one this build
    /// can read (never treated as absent).
    fn record(&self) -> Result<Option<Record>, StoreError> {
        let Some(state) = self.state else {
            return Ok(None);
        };
        let corrupt = |what: &str| StoreError::Corrupt(format!("postgres record: {what}"));
        let fingerprint = Fingerprint(
            arr(self.fingerprint.as_deref()).ok_or_else(|| corrupt("bad fingerprint"))?,
        );
        match state {
            STATE_IN_FLIGHT => Ok(Some(Record::InFlight(InFlight {
                fingerprint,
                token: Token(arr(self.token.as_deref()).ok_or_else(|| corrupt("bad token"))?),
                lease_expires_at: ts(self.lease_ms.ok_or_else(|| corrupt("no lease"))?),
                holder: Holder(u64::from_ne_bytes(
                    self.holder
                        .ok_or_else(|| corrupt("no holder"))?
                        .to_ne_bytes(),
                )),
            }))),
            STATE_COMPLETED => {
                let bytes = self
                    .outcome
                    .as_deref()
                    .ok_or_else(|| corrupt("no outcome"))?;
                Ok(Some(Record::Completed(Completed {
                    fingerprint,
                    outcome: Outcome::decode(bytes)?,
                    expires_at: ts(self.expires_ms.ok_or_else(|| corrupt("no expiry"))?),
                    origin_token: Token(
                        arr(self.origin_token.as_deref())
                            .ok_or_else(|| corrupt("bad origin token"))?,
                    ),
                })))
            }
            other => Err(corrupt(&format!("unknown state {other}"))),
        }
    }
}

fn arr<const N: usize>(b: Option<&[u8]>) -> Option<[u8; N]> {
    b.and_then(|b| b.try_into().ok())
}

fn ts(ms: i64) -> Timestamp {
    Timestamp(u64::try_from(ms).unwrap_or(0))
}

fn ms_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn default_holder() -> Holder {
    let t = Timestamp::now().0;
    Holder((u64::from(std::process::id()) << 40) ^ t)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only a Vec of task handles; a poisoned lock leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// A failure of the connection itself (as opposed to the statement): worth retrying on another.
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => sqlstate(e).is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_str(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Errors after which the server has rolled the statement back.
fn is_rolled_back(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(_))
}

/// A connection checked out for the store's own work.
enum StoreConn {
    Own(Checked),
    Pooled(PoolConnection<Postgres>),
}

impl StoreConn {
    fn get(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        match self {
            StoreConn::Own(c) => c.conn(),
            StoreConn::Pooled(c) => Ok(c),
        }
    }

    /// After an answer: the connection is ready for the next statement.
    fn done(self) {
        match self {
            StoreConn::Own(c) => c.give_back(),
            // sqlx's pool tests it (a ping) before pooling it again.
            StoreConn::Pooled(c) => drop(c),
        }
    }

    /// After a statement failed: an error from the server leaves the connection ready for
    /// the next one; a lost connection is discarded.
    fn end_with_error(self, e: &sqlx::Error) {
        if is_connection_error(e) {
            self.discard();
        } else {
            self.done();
        }
    }

    /// After a lost connection or no answer in time: closed now, never reused. A pooled one
    /// is detached first: back in sqlx's pool it would be tested with a ping that has no
    /// bound, holding its place in the pool for as long as the kernel retransmits (~15
    /// minutes) if it went dark.
    fn discard(self) {
        match self {
            StoreConn::Own(c) => c.discard(),
            StoreConn::Pooled(c) => drop(c.detach()),
        }
    }
}

/// `work`'s output, or `None` once `expiry` has passed.
async fn before<F: std::future::Future>(
    expiry: std::pin::Pin<&mut tokio::time::Sleep>,
    work: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = work => Some(out),
        () = expiry => None,
    }
}

/// How long a schema change waits for its table lock before it gives way and tries again.
/// `ALTER TABLE` needs the table to itself: while it waits for transactions using the table
/// (a long one of the transactional mode, say), every later statement on the table queues
/// behind it, so other instances' requests stall for as long as it waits.
const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_millis(500);

/// The pause between two tries of a schema change, in which the queued statements run.
const MIGRATION_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How many times a schema change tries to lock its table before `connect` gives up.
const MIGRATION_ATTEMPTS: u32 = 10;

/// Why one try of the schema migration failed.
enum MigrateError {
    /// The table's lock was not granted within [`MIGRATION_LOCK_TIMEOUT`]: worth another try.
    Locked,
    Store(StoreError),
}

/// The server gave up waiting for a lock (`lock_timeout`, SQLSTATE 55P03).
fn is_lock_timeout(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "55P03")
}

/// Maps a driver error to the store's typed errors. `sent` says whether the statement may have
/// reached the server.
pub(crate) fn map_err(e: sqlx::Error, sent: bool) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut => StoreError::Unavailable(
            "no database connection within acquire_timeout (pool exhausted or database \
             unreachable)"
                .into(),
        ),
        sqlx::Error::PoolClosed => StoreError::Unavailable("connection pool closed".into()),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                // statement_timeout / lock_timeout: the server cancelled and rolled back.
                "57014" | "55P03" => StoreError::Timeout {
                    maybe_applied: false,
                },
                "53100" => StoreError::Full(format!("database disk full: {}", db.message())),
                _ => StoreError::Unavailable(format!("database error {code}: {}", db.message())),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => {
            if sent {
                StoreError::Timeout {
                    maybe_applied: true,
                }
            } else {
                StoreError::Unavailable(e.to_string())
            }
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. } => {
            StoreError::Corrupt(format!("unexpected database row: {e}"))
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

async fn reaper(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; skip it so startup does not compete with traffic.
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        match inner.purge(false).await {
            Ok(Some(n)) if n > 0 => {
                tracing::debug!(
                    deleted = n,
                    "postgres store: reaper deleted expired records"
                );
                if inner.max_rows.is_some() {
                    let _ = inner.check_capacity().await;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "postgres store: reaper run failed"),
        }
    }
}

async fn capacity_watch(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.check_capacity().await {
            tracing::debug!(error = %e, "postgres store: capacity check failed");
        }
    }
}
