//! The transactional exactly-once mode: the handler's database writes and the stored outcome
//! commit in **one** PostgreSQL transaction, or neither does.
//!
//! # The protocol
//!
//! 1. The [`IdempotencyLayer`](idemgate::IdempotencyLayer), with a [`PostgresStore`] as its
//!    store, acquires the key as usual: `acquire` commits on its own, on the store's small
//!    **lease pool** (also used by `renew`), so a concurrent duplicate sees the in-flight record
//!    and gets 409 instead of waiting on a lock.
//! 2. [`TransactionalLayer`] (inside the idempotency layer) begins a transaction T on the
//!    **application's** pool and hands it to the handler as a [`TxHandle`].
//! 3. When the handler has answered, inside T: `UPDATE … SET completed … WHERE id = $1 AND
//!    token = $2 AND in_flight` ([`PostgresStore::settle_in`]). Unless exactly one row changed,
//!    T rolls back and the client gets **409 `lease-lost`**: the lease lapsed and another
//!    attempt owns the key, so this attempt's writes must not land.
//! 4. `COMMIT`. The business writes and the stored outcome become visible together. If the
//!    result of `COMMIT` is unknown (the connection was lost after it was sent), the client
//!    gets **503 `outcome-unknown`** and the record is left alone: either T committed (the
//!    record is complete and retries replay it) or it did not, and then the record stays in
//!    flight until its lease lapses, after which the key runs again: the route must use
//!    [`LeaseExpiry::ReExecute`] (set by [`Transactional::policy`]), which is safe here and
//!    only here because an attempt that did not commit left nothing behind.
//! 5. A status in the policy's `release_statuses` rolls T back and releases the key (the
//!    response carries [`OutcomeHint::NotSent`]); every other status commits.
//!
//! Every response of a protected request that went through steps 3–4 carries
//! [`OutcomeHint::Settled`], so the idempotency layer neither completes nor releases the record
//! itself. A transaction that certainly did not commit (lost before `COMMIT`, or refused by the
//! server) rolls back and releases the key with [`OutcomeHint::NotSent`], so the retry runs at
//! once.
//!
//! | what happened | T | record | client gets | a retry |
//! |---|---|---|---|---|
//! | handler answered, status not a release status | committed | completed with the response | the response | replays it |
//! | status in `release_statuses` | rolled back | released | the response | runs again |
//! | handler panicked | rolled back (connection closed) | the layer's `on_error` (handler-failed, or released) | 500 `handler-failed` | as `on_error` says |
//! | lease lost before the fenced `UPDATE` | rolled back | untouched (another attempt's) | 409 `lease-lost` | sees the other attempt |
//! | a statement of T failed (T aborted), or `COMMIT` refused (deferred constraint, serialization failure) | rolled back | released | 500 `handler-failed` (rolled back) | runs again |
//! | connection lost before `COMMIT` was sent | rolled back by the server | released | 503 `store-unavailable` | runs again |
//! | connection lost after `COMMIT` was sent | unknown | completed, or in flight until the lease lapses | 503 `outcome-unknown` + `Retry-After` (the lease) | replays, or runs again after the lease |
//! | response body failed before it ended | rolled back | released | 500 `handler-failed` | runs again |
//! | body over `max_stored_response` | committed | completed without the body | the whole response | 410 `response-not-stored` |
//!
//! A request without [`AttemptInfo`] (not protected: a GET, or no key) also runs in T, which
//! commits by the same status rule; a commit whose result is unknown gives 503
//! `outcome-unknown` (without hints).
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{Router, Json, routing::post, http::StatusCode};
//! use idemgate::{IdempotencyLayer, policy::{MethodPolicy, Policy}};
//! use idemgate_store_postgres::{PostgresStore, transactional::{Transactional, TxHandle}};
//!
//! async fn create(mut tx: TxHandle, Json(order): Json<serde_json::Value>) -> (StatusCode, String) {
//!     let id: i64 = sqlx::query_scalar("INSERT INTO orders (body) VALUES ($1) RETURNING id")
//!         .bind(order.to_string())
//!         .fetch_one(&mut *tx)
//!         .await
//!         .unwrap_or(0);
//!     (StatusCode::CREATED, id.to_string())
//! }
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let app_pool = sqlx::PgPool::connect("postgres://app@db/app").await?;
//! // The lease pool: the store's own, small.
//! let store = PostgresStore::builder("postgres://app@db/app").max_connections(4).connect().await?;
//! let tx = Transactional::new(app_pool, store.clone()).policy(Policy::default());
//! let app: Router = Router::new()
//!     .route("/orders", post(create).layer(tx.layer()))
//!     .layer(
//!         IdempotencyLayer::builder(Arc::new(store))
//!             .policy(MethodPolicy::new(tx.layer_policy()))
//!             .build(),
//!     );
//! # let _ = app; Ok(()) }
//! ```
//!
//! # Limits
//!
//! - **Effects outside this database are not covered.** An email sent, a charge made through
//!   another API, a message published: they happen when the handler runs, whether or not T
//!   commits, and a re-executed key does them again. Give such calls a stable idempotency key
//!   of their own with [`downstream_key`] (derived from the record id, the same for every
//!   attempt of the key), or write them to an outbox table inside T.
//! - The business tables and the records table must be in the **same database** (one
//!   transaction), reachable from the application's pool.
//! - **PgBouncer**: in transaction pooling mode T is one server connection for its whole
//!   life, so this works; session state set inside the handler does not outlive T. The
//!   store's LISTEN connection needs a direct (or session-pooled) URL, see the
//!   [crate docs](crate#pgbouncer).
//! - Between the fenced `UPDATE` and `COMMIT` the record's row is locked. A duplicate that
//!   arrives in that window while the lease is live gets 409 at once (the record is still in
//!   flight in its snapshot) without waiting; once the lease has lapsed it waits for the commit
//!   (a few milliseconds) and then replays.
//! - Response bodies are collected before `COMMIT`; a body larger than `max_stored_response`
//!   commits as "not stored" (retries get 410) and streams to the first client after the
//!   commit.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_core::body::Body;
use axum_core::extract::FromRequestParts;
use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt as _;
use idemgate::policy::Policy;
use idemgate::problem::{Problem, ProblemKind};
use idemgate::record::{Outcome, ResponseHead};
use idemgate::store::LeaseExpiry;
use idemgate::{AttemptInfo, OutcomeHint};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::store::{PostgresStore, Settlement, is_connection_error};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A stable idempotency key for a call this request makes to another system (a payment API, a
/// mail service), derived from the record id: every attempt of the same `Idempotency-Key`
/// (a re-execution after a rollback included) gets the same value, and different `label`s give
/// unrelated values. 64 hex digits of HMAC-SHA-256 keyed by the record id; the client's raw key
/// cannot be recovered from it.
///
/// ```
/// use idemgate::AttemptInfo;
/// use idemgate::record::{RecordId, Token};
/// use idemgate_store_postgres::transactional::downstream_key;
/// let id = RecordId::derive("anonymous", b"", b"order-42");
/// let a = AttemptInfo { record_id: id, token: Token::random(), ttl: std::time::Duration::from_secs(60) };
/// let b = AttemptInfo { token: Token::random(), ..a };
/// assert_eq!(downstream_key(&a, "stripe"), downstream_key(&b, "stripe"));
/// assert_ne!(downstream_key(&a, "stripe"), downstream_key(&a, "mailer"));
/// assert_eq!(downstream_key(&a, "stripe").len(), 64);
/// ```
pub fn downstream_key(attempt: &AttemptInfo, label: &str) -> String {
    use hmac::{KeyInit as _, Mac as _};
    match hmac::Hmac::<sha2::Sha256>::new_from_slice(&attempt.record_id.0) {
        Ok(mut mac) => {
            mac.update(b"idemgate/downstream/v1\0");
            mac.update(label.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        // HMAC accepts keys of any length; this arm only satisfies the type.
        Err(_) => String::new(),
    }
}

/// The transactional mode's configuration: the application's pool (where T runs), the store
/// (the lease pool and the records table) and the route's policy.
#[derive(Clone)]
pub struct Transactional {
    shared: Arc<Shared>,
}

struct Shared {
    app_pool: PgPool,
    store: PostgresStore,
    /// Release statuses, the stored-response limit, header rules and the lease (for
    /// `Retry-After`); `on_lease_expiry` is always `ReExecute`.
    policy: Policy,
    /// Bound on BEGIN, the fenced UPDATE, COMMIT and ROLLBACK each.
    finish_timeout: Duration,
}

impl std::fmt::Debug for Transactional {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactional")
            .field("store", &self.shared.store)
            .field("finish_timeout", &self.shared.finish_timeout)
            .finish_non_exhaustive()
    }
}

impl Transactional {
    /// Transactions on `app_pool`; records (and leases) through `store`, whose own pool should
    /// be small and separate. The policy is [`Policy::default`] with
    /// [`LeaseExpiry::ReExecute`] until [`policy`](Self::policy) sets another.
    pub fn new(app_pool: PgPool, store: PostgresStore) -> Self {
        let policy = Policy {
            on_lease_expiry: LeaseExpiry::ReExecute,
            ..Policy::default()
        };
        Transactional {
            shared: Arc::new(Shared {
                app_pool,
                store,
                policy,
                finish_timeout: Duration::from_secs(5),
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Arc::try_unwrap(self.shared).unwrap_or_else(|a| Shared {
            app_pool: a.app_pool.clone(),
            store: a.store.clone(),
            policy: a.policy.clone(),
            finish_timeout: a.finish_timeout,
        });
        f(&mut shared);
        Transactional {
            shared: Arc::new(shared),
        }
    }

    /// The route's policy: its `release_statuses`, `max_stored_response`, header rules and
    /// `lease` decide what T does with a response. `on_lease_expiry` is forced to
    /// [`LeaseExpiry::ReExecute`] (step 4 of the protocol). Give the idempotency layer the same
    /// policy, [`layer_policy`](Self::layer_policy).
    #[must_use]
    pub fn policy(self, policy: Policy) -> Self {
        self.with(|s| {
            s.policy = Policy {
                on_lease_expiry: LeaseExpiry::ReExecute,
                ..policy
            }
        })
    }

    /// The bound on each of BEGIN, the fenced UPDATE, COMMIT and ROLLBACK (default 5 s). Past
    /// it the connection is closed: before COMMIT that rolls T back; during COMMIT the result
    /// is unknown (503 `outcome-unknown`).
    #[must_use]
    pub fn finish_timeout(self, d: Duration) -> Self {
        self.with(|s| s.finish_timeout = d)
    }

    /// The policy to give the [`IdempotencyLayer`](idemgate::IdempotencyLayer) for the routes
    /// this mode serves (the one set with [`policy`](Self::policy), with `ReExecute`).
    pub fn layer_policy(&self) -> Policy {
        self.shared.policy.clone()
    }

    /// The application's pool.
    pub fn app_pool(&self) -> &PgPool {
        &self.shared.app_pool
    }

    /// The store.
    pub fn store(&self) -> &PostgresStore {
        &self.shared.store
    }

    /// The tower layer to put on the route's handler, *inside* the idempotency layer.
    pub fn layer(&self) -> TransactionalLayer {
        TransactionalLayer {
            shared: self.shared.clone(),
        }
    }
}

/// Runs each request in a transaction on the application's pool and settles the idempotency
/// record inside it. See the [module docs](self).
#[derive(Clone)]
pub struct TransactionalLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TransactionalLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalLayer").finish_non_exhaustive()
    }
}

impl<S> tower_layer::Layer<S> for TransactionalLayer {
    type Service = TransactionalService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TransactionalService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`TransactionalLayer`].
#[derive(Clone)]
pub struct TransactionalService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for TransactionalService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalService")
            .finish_non_exhaustive()
    }
}

impl<S> TransactionalService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, consuming the wrapper.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqB, ResB> tower_service::Service<Request<ReqB>> for TransactionalService<S>
where
    S: tower_service::Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The ready service goes into the future; the clone stays for the next poll_ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(run(self.shared.clone(), inner, request))
    }
}

/// The request's transaction, for the handler: derefs to the [`PgConnection`] T runs on, so
/// `query.execute(&mut *tx)` runs inside T. Committing and rolling back belong to the
/// [`TransactionalLayer`]; the handler only answers.
///
/// Extract it at most once per request, and do not keep it past the handler's answer (a handle
/// still held then makes the layer roll T back).
pub struct TxHandle {
    guard: OwnedMappedMutexGuard<Option<TxConn>, TxConn>,
    attempt: Option<AttemptInfo>,
}

impl std::fmt::Debug for TxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxHandle")
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl TxHandle {
    /// Takes the request's transaction out of its extensions (for services that are not axum
    /// handlers). `None` when the request did not come through a [`TransactionalLayer`] or the
    /// handle was already taken.
    pub fn from_extensions(extensions: &http::Extensions) -> Option<TxHandle> {
        let slot = extensions.get::<TxSlot>()?;
        let guard = slot.0.clone().try_lock_owned().ok()?;
        let guard = OwnedMutexGuard::try_map(guard, Option::as_mut).ok()?;
        Some(TxHandle {
            guard,
            attempt: extensions.get::<AttemptInfo>().copied(),
        })
    }

    /// The idempotency attempt this request runs under (`None` when it is not protected).
    pub fn attempt(&self) -> Option<&AttemptInfo> {
        self.attempt.as_ref()
    }

    /// [`downstream_key`] for this request's record, `None` when it is not protected.
    pub fn downstream_key(&self, label: &str) -> Option<String> {
        self.attempt.as_ref().map(|a| downstream_key(a, label))
    }
}

impl Deref for TxHandle {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.guard.conn
    }
}

impl DerefMut for TxHandle {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.guard.conn
    }
}

impl<St: Send + Sync> FromRequestParts<St> for TxHandle {
    type Rejection = Response<Body>;

    async fn from_request_parts(parts: &mut Parts, _state: &St) -> Result<Self, Self::Rejection> {
        TxHandle::from_extensions(&parts.extensions).ok_or_else(|| {
            tracing::error!(
                "TxHandle extracted without a TransactionalLayer on the route, or twice"
            );
            Problem::new(ProblemKind::HandlerFailed)
                .with_detail("The server is misconfigured; nothing was executed.")
                .into_response()
        })
    }
}

/// The request extension through which the handler borrows T.
#[derive(Clone)]
struct TxSlot(Arc<Mutex<Option<TxConn>>>);

/// A pooled connection with a transaction open on it. Dropped while open (a handler panic, a
/// lost connection, a timeout), it closes the connection instead of returning it to the pool,
/// so the server rolls T back and no pooled connection is ever left inside a transaction.
struct TxConn {
    conn: PoolConnection<Postgres>,
    open: bool,
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

enum TxError {
    /// The server answered with an error: T is rolled back (or will be, at ROLLBACK).
    Refused(sqlx::Error),
    /// The connection failed or the statement timed out: the server's state is unknown.
    Lost(String),
}

impl std::fmt::Display for TxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxError::Refused(e) => write!(f, "refused by the database: {e}"),
            TxError::Lost(e) => write!(f, "connection lost: {e}"),
        }
    }
}

fn classify(e: sqlx::Error) -> TxError {
    if is_connection_error(&e) {
        TxError::Lost(e.to_string())
    } else {
        TxError::Refused(e)
    }
}

impl TxConn {
    async fn begin(pool: &PgPool, bound: Duration) -> Result<TxConn, String> {
        let conn = pool.acquire().await.map_err(|e| e.to_string())?;
        // Marked open before BEGIN is sent: a BEGIN that times out closes the connection.
        let mut tx = TxConn { conn, open: true };
        match tx.simple("BEGIN", bound).await {
            Ok(()) => Ok(tx),
            Err(e) => Err(e.to_string()),
        }
    }

    /// One simple-protocol statement (BEGIN, COMMIT, ROLLBACK), bounded.
    async fn simple(&mut self, sql: &'static str, bound: Duration) -> Result<(), TxError> {
        match tokio::time::timeout(bound, sqlx::raw_sql(sql).execute(&mut *self.conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(classify(e)),
            Err(_) => Err(TxError::Lost(format!("{sql} timed out after {bound:?}"))),
        }
    }

    /// Rolls back; on any failure the connection is closed instead, which rolls back too.
    async fn rollback(mut self, bound: Duration) {
        if self.simple("ROLLBACK", bound).await.is_ok() {
            self.open = false;
        }
    }

    /// COMMIT: `Ok` committed, `Refused` rolled back by the server, `Lost` unknown.
    async fn commit(mut self, bound: Duration) -> Result<(), TxError> {
        let r = self.simple("COMMIT", bound).await;
        if r.is_ok() {
            self.open = false;
        }
        r
    }
}

fn hinted(mut response: Response<Body>, hint: Option<OutcomeHint>) -> Response<Body> {
    if let Some(h) = hint {
        response.extensions_mut().insert(h);
    }
    response
}

/// What the handler's answer becomes when its transaction did not commit.
fn rolled_back_problem() -> Problem {
    Problem::new(ProblemKind::HandlerFailed).with_detail(
        "The request's database transaction failed and was rolled back; nothing was committed. \
         Retry with the same key.",
    )
}

fn lost_before_commit_problem() -> Problem {
    Problem::new(ProblemKind::StoreUnavailable)
        .with_detail(
            "The database connection was lost before the request committed; nothing was \
             committed. Retry with the same key.",
        )
        .with_retry_after(Duration::from_secs(1))
}

async fn run<S, ReqB, ResB>(
    shared: Arc<Shared>,
    mut inner: S,
    mut request: Request<ReqB>,
) -> Result<Response<Body>, S::Error>
where
    S: tower_service::Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let attempt = request.extensions().get::<AttemptInfo>().copied();
    let protected = attempt.map(|_| ());
    let conn = match TxConn::begin(&shared.app_pool, shared.finish_timeout).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "transactional: cannot begin a transaction; request not executed");
            let p = Problem::new(ProblemKind::StoreUnavailable)
                .with_detail("The database cannot be reached; nothing was executed. Retry with the same key.")
                .with_retry_after(Duration::from_secs(1));
            return Ok(hinted(
                p.into_response(),
                protected.map(|_| OutcomeHint::NotSent),
            ));
        }
    };
    let slot = Arc::new(Mutex::new(Some(conn)));
    request.extensions_mut().insert(TxSlot(slot.clone()));
    // A panic or an error here drops `slot` (and with it T, which closes its connection).
    let response = inner.call(request).await?;
    let conn = match slot.try_lock() {
        Ok(mut guard) => guard.take(),
        Err(_) => None,
    };
    let Some(conn) = conn else {
        // The handler kept its TxHandle (e.g. moved into a spawned task): T can never be
        // committed by anyone, and closes when that handle drops.
        tracing::error!(
            "transactional: the handler kept its TxHandle past its answer; rolled back"
        );
        return Ok(hinted(
            rolled_back_problem().into_response(),
            protected.map(|_| OutcomeHint::NotSent),
        ));
    };
    Ok(finish(&shared, attempt, conn, response).await)
}

async fn finish<ResB>(
    shared: &Shared,
    attempt: Option<AttemptInfo>,
    mut conn: TxConn,
    response: Response<ResB>,
) -> Response<Body>
where
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let policy = &shared.policy;
    let bound = shared.finish_timeout;
    let hint = |h: OutcomeHint| attempt.map(|_| h);
    let record = attempt.map(|a| a.record_id.to_hex()).unwrap_or_default();

    // Step 5: "not processed, try again" rolls back and releases the key.
    if response.extensions().get::<OutcomeHint>() == Some(&OutcomeHint::NotSent)
        || policy.release_statuses.contains(&response.status())
    {
        conn.rollback(bound).await;
        return hinted(response.map(Body::new), hint(OutcomeHint::NotSent));
    }

    let (parts, body) = response.into_parts();
    let (stored_body, client_body) = match collect(body, policy.max_stored_response).await {
        Collected::Whole(bytes) => (Some(bytes.clone()), Body::from(bytes)),
        Collected::TooLarge(prefix, rest) => (
            None,
            Body::new(Prefixed {
                prefix: Some(prefix),
                rest,
            }),
        ),
        Collected::Failed(e) => {
            tracing::warn!(record_id = %record, error = %e, "transactional: response body failed; rolled back");
            conn.rollback(bound).await;
            return hinted(
                rolled_back_problem().into_response(),
                hint(OutcomeHint::NotSent),
            );
        }
    };

    match attempt {
        Some(info) => {
            // Step 3: the fenced completion, inside T.
            let head = storable_head(parts.status, &parts.headers, policy);
            let outcome = match stored_body {
                Some(body) => Outcome::Response { head, body },
                None => Outcome::BodyNotStored { head },
            };
            let settled = tokio::time::timeout(
                bound,
                shared.store.settle_raw(
                    &mut conn.conn,
                    &info.record_id,
                    info.token,
                    &outcome,
                    info.ttl,
                ),
            )
            .await;
            match settled {
                Ok(Ok(Settlement::Settled)) => {}
                Ok(Ok(Settlement::LeaseLost)) => {
                    tracing::warn!(record_id = %record, "transactional: lease lost before commit; rolled back");
                    conn.rollback(bound).await;
                    return hinted(
                        Problem::new(ProblemKind::LeaseLost).into_response(),
                        hint(OutcomeHint::Settled),
                    );
                }
                Ok(Err(e)) if !is_connection_error(&e) => {
                    tracing::warn!(record_id = %record, error = %e, "transactional: transaction failed; rolled back");
                    conn.rollback(bound).await;
                    return hinted(
                        rolled_back_problem().into_response(),
                        hint(OutcomeHint::NotSent),
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(record_id = %record, error = %e, "transactional: connection lost before commit; nothing committed");
                    drop(conn);
                    return hinted(
                        lost_before_commit_problem().into_response(),
                        hint(OutcomeHint::NotSent),
                    );
                }
                Err(_) => {
                    tracing::warn!(record_id = %record, "transactional: settling timed out; connection closed, nothing committed");
                    drop(conn);
                    return hinted(
                        lost_before_commit_problem().into_response(),
                        hint(OutcomeHint::NotSent),
                    );
                }
            }
        }
        None => {
            // PostgreSQL answers COMMIT of an aborted transaction with success (and rolls
            // back): ask first, so a failed statement is not reported as committed.
            let probe =
                tokio::time::timeout(bound, sqlx::raw_sql("SELECT 1").execute(&mut *conn.conn))
                    .await;
            match probe {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if !is_connection_error(&e) => {
                    conn.rollback(bound).await;
                    return rolled_back_problem().into_response();
                }
                _ => {
                    drop(conn);
                    return lost_before_commit_problem().into_response();
                }
            }
        }
    }

    // Step 4.
    match conn.commit(bound).await {
        Ok(()) => hinted(
            Response::from_parts(parts, client_body),
            hint(OutcomeHint::Settled),
        ),
        Err(TxError::Refused(e)) => {
            tracing::warn!(record_id = %record, error = %e, "transactional: COMMIT refused; rolled back");
            hinted(
                rolled_back_problem().into_response(),
                hint(OutcomeHint::NotSent),
            )
        }
        Err(e @ TxError::Lost(_)) => {
            tracing::error!(record_id = %record, error = %e, "transactional: COMMIT result unknown");
            let p = Problem::new(ProblemKind::OutcomeUnknown)
                .with_status(StatusCode::SERVICE_UNAVAILABLE)
                .with_detail(
                    "The database connection was lost while the request committed; it may or \
                     may not have taken effect. Retry with the same key after the indicated \
                     delay: you get its outcome if it committed, or it runs again if it did not.",
                )
                .with_retry_after(policy.lease);
            hinted(p.into_response(), hint(OutcomeHint::Settled))
        }
    }
}

enum Collected<B> {
    Whole(Bytes),
    TooLarge(Bytes, Pin<Box<B>>),
    Failed(BoxError),
}

/// Reads the body up to `limit` bytes: all of it, or the part read so far and the rest.
async fn collect<B>(body: B, limit: usize) -> Collected<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Collected::Whole(buf.freeze()),
            Some(Err(e)) => return Collected::Failed(e.into()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() > limit {
                        return Collected::TooLarge(buf.freeze(), body);
                    }
                }
            }
        }
    }
}

/// The bytes read before the limit, then the rest of the handler's body.
struct Prefixed<B> {
    prefix: Option<Bytes>,
    rest: Pin<Box<B>>,
}

impl<B> http_body::Body for Prefixed<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match self.rest.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The storable part of a response head: the layer's own rules, so both store the same.
fn storable_head(status: StatusCode, headers: &HeaderMap, policy: &Policy) -> ResponseHead {
    idemgate::layer::storable_head(status, headers, policy)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stored_head_drops_what_spec_6_says() {
        let mut h = HeaderMap::new();
        h.append("content-type", "application/json".parse().unwrap());
        h.append("set-cookie", "a=b".parse().unwrap());
        h.append("date", "now".parse().unwrap());
        h.append("x-api-token", "t".parse().unwrap());
        h.append("connection", "x-hop".parse().unwrap());
        h.append("x-hop", "1".parse().unwrap());
        h.append("link", "</a>".parse().unwrap());
        h.append("link", "</b>".parse().unwrap());
        let head = storable_head(StatusCode::CREATED, &h, &Policy::default());
        let names: Vec<&str> = head.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "link", "link"]);
        assert_eq!(head.headers[2].1, "</b>");
    }

    #[tokio::test]
    async fn collect_stops_at_the_limit_and_keeps_the_rest() {
        let body = http_body_util::Full::new(Bytes::from(vec![7u8; 100]));
        match collect(body, 10).await {
            Collected::TooLarge(prefix, rest) => {
                let mut whole = prefix.to_vec();
                let tail = Prefixed { prefix: None, rest }.collect().await.unwrap();
                whole.extend_from_slice(&tail.to_bytes());
                assert_eq!(whole, vec![7u8; 100]);
            }
            _ => panic!("expected TooLarge"),
        }
        let body = http_body_util::Full::new(Bytes::from_static(b"abc"));
        assert!(matches!(collect(body, 10).await, Collected::Whole(b) if b == "abc"));
    }
}
