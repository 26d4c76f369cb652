//! The transactional exactly-once mode end to end: axum over real TCP, the idempotency layer on
//! a `PostgresStore` (lease pool), `TransactionalLayer` on the application's pool, and a real
//! PostgreSQL. A fault-injecting TCP proxy between the application's pool and PostgreSQL cuts
//! the connection at the four points of the protocol; a stopped server gives 503s and runs
//! nothing.
//!
//! The invariant checked throughout: an `orders` row exists for a key exactly when its record
//! is completed with the 201 response (never one without the other), and no key ever has two.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemgate::IdempotencyLayer;
use idemgate::policy::{MethodPolicy, Policy};
use idemgate::record::{Outcome, Record, RecordId, Token};
use idemgate::store::{Acquire, AcquireRequest, LeaseExpiry, Release, Store};
use idemgate_store_postgres::PostgresStore;
use idemgate_store_postgres::transactional::{Transactional, TxHandle, downstream_key};
use idemgate_store_tests::servers::postgres::PostgresServer;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn record_id(key: &str) -> RecordId {
    // No Authorization header: the layer's default scope is anonymous.
    RecordId::derive("anonymous", b"", key.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// The application under test.

#[derive(Clone)]
struct AppState {
    store: PostgresStore,
    executions: Arc<AtomicUsize>,
}

/// Creates an order inside the request's transaction. Headers steer it:
/// `x-test-status` answers with that status, `x-test-panic` panics after the insert,
/// `x-test-steal` makes the lease lapse and another attempt take the key before answering,
/// `x-test-delay-ms` sleeps after the insert.
async fn create_order(
    State(st): State<AppState>,
    mut tx: TxHandle,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    st.executions.fetch_add(1, Ordering::SeqCst);
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let key = h("idempotency-key").unwrap_or("").to_owned();
    let downstream = tx.downstream_key("payments").unwrap_or_default();
    // Not a cached statement, so its text is in every Parse message (the fault proxy looks
    // for it).
    let inserted: Result<i64, sqlx::Error> = sqlx::query_scalar(
        "INSERT INTO orders (idem_key, downstream_key, body) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(&key)
    .bind(&downstream)
    .bind(String::from_utf8_lossy(&body).into_owned())
    .persistent(false)
    .fetch_one(&mut *tx)
    .await;
    let order_id = match inserted {
        Ok(id) => id,
        Err(e) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("db error: {e}")).into_response();
        }
    };
    if let Some(ms) = h("x-test-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if h("x-test-panic").is_some() {
        panic!("handler panicked after its insert (test)");
    }
    if h("x-test-steal").is_some() {
        let info = *tx.attempt().expect("protected request");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
            st.store.table()
        )))
        .bind(&info.record_id.0[..])
        .execute(st.store.pool())
        .await
        .unwrap();
        // The thief is a retry of the same request (same fingerprint).
        let fingerprint = match st.store.get(&info.record_id).await.unwrap() {
            Some(Record::InFlight(f)) => f.fingerprint,
            other => panic!("expected our in-flight record, got {other:?}"),
        };
        let thief = st
            .store
            .acquire(AcquireRequest {
                id: info.record_id,
                fingerprint,
                token: Token(*b"thief-token-0000"),
                lease: Duration::from_secs(60),
                on_lease_expiry: LeaseExpiry::ReExecute,
                retention: Duration::from_secs(60),
            })
            .await
            .unwrap();
        assert!(matches!(thief, Acquire::Acquired { .. }), "{thief:?}");
    }
    let status = h("x-test-status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CREATED);
    (
        status,
        [("content-type", "application/json")],
        serde_json::json!({ "order_id": order_id, "key": key }).to_string(),
    )
        .into_response()
}

struct App {
    addr: SocketAddr,
    store: PostgresStore,
    /// Direct to PostgreSQL (never through the fault proxy), for the test's own checks.
    direct: PgPool,
    executions: Arc<AtomicUsize>,
    client: HyperClient<HttpConnector, Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The application on database `url`, its pool on `app_url` (the same database, possibly
/// through the fault proxy).
async fn start_app(url: &str, app_url: &str, lease: Duration) -> App {
    let direct = PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .unwrap();
    let table = unique("records");
    // The lease pool: small, the store's own, straight to PostgreSQL.
    let store = PostgresStore::builder(url)
        .table(table.clone())
        .channel(table)
        .max_connections(3)
        .acquire_timeout(Duration::from_millis(500))
        .statement_timeout(Duration::from_secs(1))
        .reaper_interval(None)
        .connect()
        .await
        .unwrap();
    let app_pool = PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(app_url)
        .unwrap();
    let tx = Transactional::new(app_pool, store.clone())
        .policy(Policy {
            lease,
            ..Policy::default()
        })
        .finish_timeout(Duration::from_secs(2));
    let executions = Arc::new(AtomicUsize::new(0));
    let state = AppState {
        store: store.clone(),
        executions: executions.clone(),
    };
    let router = Router::new()
        .route("/orders", post(create_order).layer(tx.layer()))
        .with_state(state)
        .layer(
            IdempotencyLayer::builder(Arc::new(store.clone()))
                .policy(MethodPolicy::new(tx.layer_policy()))
                .build(),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    App {
        addr,
        store,
        direct,
        executions,
        client: HyperClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
        task,
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    fn problem(&self) -> String {
        self.json()["type"]
            .as_str()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_owned()
    }
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
}

impl App {
    async fn post(&self, key: Option<&str>, headers: &[(&str, &str)]) -> Resp {
        let mut b = axum::http::Request::post(format!("http://{}/orders", self.addr))
            .header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let req = b
            .body(Full::new(Bytes::from_static(br#"{"amount":100}"#)))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .expect("request took longer than 20 s")
            .expect("transport error");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    /// Retries while the answer is 409 in-flight (a lease that must lapse first), bounded.
    async fn post_until_settled(&self, key: &str, within: Duration) -> Resp {
        let deadline = Instant::now() + within;
        loop {
            let r = self.post(Some(key), &[]).await;
            if r.status != 409 || Instant::now() >= deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn orders(&self, key: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE idem_key = $1")
            .bind(key)
            .fetch_one(&self.direct)
            .await
            .unwrap()
    }

    /// The invariant: a business row exactly when the record holds the 201 outcome.
    async fn assert_consistent(&self, key: &str, when: &str) -> (i64, Option<Record>) {
        let orders = self.orders(key).await;
        let record = self.store.get(&record_id(key)).await.unwrap();
        let completed_201 = matches!(
            &record,
            Some(Record::Completed(c)) if matches!(&c.outcome, Outcome::Response { head, .. } if head.status == 201)
        );
        assert!(orders <= 1, "{when}: key {key} has {orders} orders");
        assert_eq!(
            orders == 1,
            completed_201,
            "{when}: key {key}: {orders} orders but record {record:?}"
        );
        (orders, record)
    }
}

/// A fresh database on `pg` with the `orders` table (created once, before any test races on
/// it).
fn orders_db(pg: &PostgresServer, prefix: &str) -> String {
    let url = pg.create_unique_database(prefix);
    let db = url.rsplit('/').next().unwrap_or_default().to_owned();
    pg.psql(
        &db,
        "CREATE TABLE orders (id bigserial PRIMARY KEY, idem_key text NOT NULL, \
         downstream_key text NOT NULL, body text NOT NULL)",
    );
    url
}

fn shared_db() -> String {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| orders_db(PostgresServer::shared(), "txtests"))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// The protocol's rows.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_row_and_outcome_commit_together_and_replay() {
    let url = shared_db();
    let app = start_app(&url, &url, Duration::from_secs(1)).await;
    let key = unique("replay");
    let first = app.post(Some(&key), &[]).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert!(!first.replayed());
    let (orders, record) = app.assert_consistent(&key, "after the first attempt").await;
    assert_eq!(orders, 1);
    // The record was settled inside T: its origin token is the settled one, not an attempt's.
    let Some(Record::Completed(c)) = record else {
        panic!("not completed")
    };
    assert_ne!(c.origin_token, Token([0; 16]));

    let retry = app.post(Some(&key), &[]).await;
    assert_eq!(retry.status, 201);
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body, "the replay is the first response");
    assert_eq!(app.orders(&key).await, 1);
    assert_eq!(app.executions.load(Ordering::SeqCst), 1);

    // The handler's downstream key is derived from the record id, the same for every attempt.
    let stored: String =
        sqlx::query_scalar("SELECT downstream_key FROM orders WHERE idem_key = $1")
            .bind(&key)
            .fetch_one(&app.direct)
            .await
            .unwrap();
    let info = idemgate::AttemptInfo {
        record_id: record_id(&key),
        token: Token::random(),
        ttl: Duration::from_secs(1),
    };
    assert_eq!(stored, downstream_key(&info, "payments"));

    // Unprotected (no key): runs in T and commits; nothing is stored.
    let plain = app.post(None, &[]).await;
    assert_eq!(plain.status, 201);
    assert_eq!(app.orders("").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_in_flight_gets_409_without_waiting_on_a_lock() {
    let url = shared_db();
    let app = Arc::new(start_app(&url, &url, Duration::from_secs(1)).await);
    let key = unique("dup");
    let a = app.clone();
    let k = key.clone();
    let first = tokio::spawn(async move { a.post(Some(&k), &[("x-test-delay-ms", "800")]).await });
    tokio::time::sleep(Duration::from_millis(250)).await;
    let t0 = Instant::now();
    let dup = app.post(Some(&key), &[]).await;
    assert_eq!(dup.status, 409, "{dup:?}");
    assert_eq!(dup.problem(), "request-in-flight");
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "the duplicate waited {:?}",
        t0.elapsed()
    );
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(app.post(Some(&key), &[]).await.status, 201);
    assert_eq!(app.orders(&key).await, 1);
    assert_eq!(app.executions.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lost_before_commit_rolls_back_with_409() {
    let url = shared_db();
    let app = start_app(&url, &url, Duration::from_secs(1)).await;
    let key = unique("stolen");
    let r = app.post(Some(&key), &[("x-test-steal", "1")]).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.problem(), "lease-lost");
    assert_eq!(
        app.orders(&key).await,
        0,
        "no business row after lease-lost"
    );
    // The thief holds the key; the layer did not complete or release it.
    let id = record_id(&key);
    match app.store.get(&id).await.unwrap() {
        Some(Record::InFlight(f)) => assert_eq!(f.token, Token(*b"thief-token-0000")),
        other => panic!("expected the thief's in-flight record, got {other:?}"),
    }
    let busy = app.post(Some(&key), &[]).await;
    assert_eq!(busy.status, 409);
    assert_eq!(busy.problem(), "request-in-flight");
    // The thief gives up: the key runs again, once.
    assert_eq!(
        app.store
            .release(&id, Token(*b"thief-token-0000"))
            .await
            .unwrap(),
        Release::Released
    );
    let again = app.post(Some(&key), &[]).await;
    assert_eq!(again.status, 201, "{again:?}");
    app.assert_consistent(&key, "after the retry").await;
    assert_eq!(app.orders(&key).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_status_rolls_back_and_the_retry_executes() {
    let url = shared_db();
    let app = start_app(&url, &url, Duration::from_secs(1)).await;
    let key = unique("release");
    let r = app.post(Some(&key), &[("x-test-status", "503")]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.json()["order_id"].is_number(), "the handler's own answer");
    assert_eq!(app.orders(&key).await, 0, "rolled back");
    assert_eq!(
        app.store.get(&record_id(&key)).await.unwrap(),
        None,
        "released"
    );
    let again = app.post(Some(&key), &[]).await;
    assert_eq!(again.status, 201, "{again:?}");
    assert!(!again.replayed());
    assert_eq!(app.orders(&key).await, 1);
    assert_eq!(app.executions.load(Ordering::SeqCst), 2);

    // Any other status commits, 4xx included.
    let key = unique("commit422");
    let r = app.post(Some(&key), &[("x-test-status", "422")]).await;
    assert_eq!(r.status, 422);
    assert_eq!(app.orders(&key).await, 1);
    let replay = app.post(Some(&key), &[]).await;
    assert_eq!(replay.status, 422);
    assert!(replay.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_rolls_back_and_leaks_no_connection() {
    let url = shared_db();
    let app = start_app(&url, &url, Duration::from_secs(1)).await;
    let key = unique("panic");
    let r = app.post(Some(&key), &[("x-test-panic", "1")]).await;
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.problem(), "handler-failed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.orders(&key).await,
        0,
        "the panicked insert never commits"
    );
    // The layer's default on_error stores handler-failed: retries get it, nothing runs again.
    let retry = app.post(Some(&key), &[]).await;
    assert_eq!(retry.status, 500);
    assert!(retry.replayed());
    assert_eq!(app.orders(&key).await, 0);
    // More requests than the app pool has connections: none was left behind in a transaction.
    for i in 0..5 {
        let k = format!("{key}-after-{i}");
        let r = app.post(Some(&k), &[]).await;
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(app.orders(&k).await, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// A fault-injecting PostgreSQL proxy.

/// Where to cut the connection that first sends a client message containing `pattern`.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Close it instead of forwarding that message.
    Before(&'static [u8]),
    /// Forward it, let the server finish that statement (CommandComplete, ReadyForQuery), then
    /// close it instead of forwarding the next client message.
    AfterCompletion(&'static [u8]),
    /// Forward it, let the server execute it, and close it before its reply reaches the client.
    SwallowReply(&'static [u8]),
}

impl Cut {
    fn pattern(self) -> &'static [u8] {
        match self {
            Cut::Before(p) | Cut::AfterCompletion(p) | Cut::SwallowReply(p) => p,
        }
    }
}

#[derive(Default)]
struct ConnFault {
    /// `AfterCompletion` armed on this connection: 0 no, 1 armed, 2 saw CommandComplete, 3 cut
    /// at the next client message.
    after: AtomicUsize,
    swallow: std::sync::atomic::AtomicBool,
}

/// A loopback TCP proxy in front of PostgreSQL that speaks just enough of the wire protocol
/// (message type + length framing) to cut one connection at a chosen point.
struct PgFaultProxy {
    port: u16,
    rule: Arc<Mutex<Option<Cut>>>,
    fired: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PgFaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgFaultProxy {
    async fn start(upstream_port: u16) -> PgFaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let rule: Arc<Mutex<Option<Cut>>> = Arc::new(Mutex::new(None));
        let fired = Arc::new(AtomicUsize::new(0));
        let (r, f) = (rule.clone(), fired.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (r, f) = (r.clone(), f.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        pipe(client, server, r, f).await;
                    }
                });
            }
        });
        PgFaultProxy {
            port,
            rule,
            fired,
            task,
        }
    }

    fn arm(&self, cut: Cut) {
        *self.rule.lock().unwrap() = Some(cut);
    }

    fn fired(&self) -> usize {
        self.fired.load(Ordering::SeqCst)
    }
}

async fn read_msg(r: &mut (impl AsyncReadExt + Unpin), typed: bool) -> Option<Vec<u8>> {
    let mut head = vec![0u8; if typed { 5 } else { 4 }];
    r.read_exact(&mut head).await.ok()?;
    let len_at = usize::from(typed);
    let len = u32::from_be_bytes(head[len_at..len_at + 4].try_into().ok()?) as usize;
    let mut msg = head;
    let start = msg.len();
    msg.resize(start + len.checked_sub(4)?, 0);
    r.read_exact(&mut msg[start..]).await.ok()?;
    Some(msg)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    rule: Arc<Mutex<Option<Cut>>>,
    fired: Arc<AtomicUsize>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let state = Arc::new(ConnFault::default());
    let (cut_tx, mut cut_rx1) = tokio::sync::watch::channel(false);
    let mut cut_rx2 = cut_tx.subscribe();
    let cut_tx = Arc::new(cut_tx);

    let st = state.clone();
    let cut = cut_tx.clone();
    let upstream = async move {
        // The startup message has no type byte (sslmode=disable: no SSLRequest first).
        let Some(startup) = read_msg(&mut cr, false).await else {
            return;
        };
        if sw.write_all(&startup).await.is_err() {
            return;
        }
        loop {
            let msg = tokio::select! {
                m = read_msg(&mut cr, true) => m,
                _ = cut_rx1.changed() => None,
            };
            let Some(msg) = msg else { return };
            if st.after.load(Ordering::SeqCst) == 3 {
                fired.fetch_add(1, Ordering::SeqCst);
                let _ = cut.send(true);
                return;
            }
            let mine = {
                let mut r = rule.lock().unwrap();
                match *r {
                    Some(c) if contains(&msg, c.pattern()) => r.take(),
                    _ => None,
                }
            };
            match mine {
                Some(Cut::Before(_)) => {
                    fired.fetch_add(1, Ordering::SeqCst);
                    let _ = cut.send(true);
                    return;
                }
                Some(Cut::AfterCompletion(_)) => st.after.store(1, Ordering::SeqCst),
                Some(Cut::SwallowReply(_)) => {
                    fired.fetch_add(1, Ordering::SeqCst);
                    st.swallow.store(true, Ordering::SeqCst);
                }
                None => {}
            }
            if sw.write_all(&msg).await.is_err() {
                return;
            }
        }
    };
    let st = state;
    let cut = cut_tx.clone();
    let downstream = async move {
        loop {
            let msg = tokio::select! {
                m = read_msg(&mut sr, true) => m,
                _ = cut_rx2.changed() => None,
            };
            let Some(msg) = msg else { return };
            let kind = msg[0];
            if st.swallow.load(Ordering::SeqCst) {
                if kind == b'Z' {
                    // The server executed it; the client never hears.
                    let _ = cut.send(true);
                    return;
                }
                continue;
            }
            match (st.after.load(Ordering::SeqCst), kind) {
                (1, b'C') => st.after.store(2, Ordering::SeqCst),
                (2, b'Z') => st.after.store(3, Ordering::SeqCst),
                _ => {}
            }
            if cw.write_all(&msg).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending ends both: every half is dropped, both sockets close, and the
    // server rolls back whatever transaction the connection had open.
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

/// One cut, then the retry; the invariant holds after each.
async fn cut_at(cut: Cut, expect_problem: &str, committed: bool) {
    let pg = PostgresServer::shared();
    let url = shared_db();
    let proxy = PgFaultProxy::start(pg.port()).await;
    let db = url.rsplit('/').next().unwrap();
    let proxied = format!(
        "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
        proxy.port
    );
    let lease = Duration::from_millis(600);
    let app = start_app(&url, &proxied, lease).await;
    // Warm the pool through the proxy, so the cut hits a request's own statements.
    let warm = unique("warm");
    assert_eq!(app.post(Some(&warm), &[]).await.status, 201);

    let key = unique("cut");
    proxy.arm(cut);
    let r = app.post(Some(&key), &[]).await;
    assert_eq!(proxy.fired(), 1, "{cut:?} fired");
    assert_eq!(r.problem(), expect_problem, "{cut:?}: {r:?}");
    let (orders, _) = app.assert_consistent(&key, &format!("after {cut:?}")).await;
    assert_eq!(
        orders,
        i64::from(committed),
        "{cut:?}: orders after the cut"
    );

    // The retry: replays what committed, or runs again (after the lease lapsed, when the
    // commit's result was unknown) exactly once.
    let retry = app.post_until_settled(&key, lease * 6).await;
    assert_eq!(retry.status, 201, "{cut:?}: retry {retry:?}");
    assert_eq!(retry.replayed(), committed, "{cut:?}: {retry:?}");
    let (orders, _) = app
        .assert_consistent(&key, &format!("after the retry of {cut:?}"))
        .await;
    assert_eq!(orders, 1);
    let executions = app.executions.load(Ordering::SeqCst);
    // warm-up + the cut attempt + the re-execution (unless it had committed).
    assert_eq!(executions, if committed { 2 } else { 3 }, "{cut:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_before_the_business_write() {
    cut_at(
        Cut::Before(b"INSERT INTO orders"),
        "store-unavailable",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_after_the_business_write() {
    cut_at(
        Cut::AfterCompletion(b"INSERT INTO orders"),
        "store-unavailable",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_after_complete_before_commit() {
    // The fenced UPDATE ran inside T; COMMIT never reaches the server. The client cannot tell
    // this from a lost acknowledgement: 503 outcome-unknown, and the key runs again once the
    // lease lapses.
    cut_at(Cut::Before(b"COMMIT"), "outcome-unknown", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_after_commit_before_its_acknowledgement() {
    cut_at(Cut::SwallowReply(b"COMMIT"), "outcome-unknown", true).await;
}

// ---------------------------------------------------------------------------------------------
// The database stops under load.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_stopped_under_load_gives_503s_and_resumes_with_outcomes_intact() {
    let mut pg = PostgresServer::start();
    let url = orders_db(&pg, "txoutage");
    let lease = Duration::from_millis(600);
    let app = Arc::new(start_app(&url, &url, lease).await);

    let before: Vec<String> = (0..5).map(|i| format!("before-{i}")).collect();
    let mut bodies = Vec::new();
    for k in &before {
        let r = app.post(Some(k), &[]).await;
        assert_eq!(r.status, 201);
        bodies.push(r.body);
    }

    // Load across the stop: 4 workers, each sending fresh keys until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..4 {
        let (app, stop, sent) = (app.clone(), stop.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..400 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let k = format!("load-{w}-{i}");
                let r = app.post(Some(&k), &[]).await;
                sent.lock().unwrap().push((k, r.status));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }

    // Down: every request is a 503, and nothing runs.
    let ran = app.executions.load(Ordering::SeqCst);
    for i in 0..5 {
        let r = app.post(Some(&format!("down-{i}")), &[]).await;
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.problem(), "store-unavailable");
    }
    assert_eq!(
        app.executions.load(Ordering::SeqCst),
        ran,
        "nothing executed while down"
    );
    let statuses: Vec<u16> = sent.lock().unwrap().iter().map(|(_, s)| *s).collect();
    assert!(
        statuses.contains(&201),
        "load ran before the stop: {statuses:?}"
    );
    assert!(statuses.contains(&503), "load saw the outage: {statuses:?}");
    assert!(
        statuses.iter().all(|s| [201, 409, 500, 503].contains(s)),
        "201, or a problem (503 unavailable or unknown, 500 rolled back, 409 lease lost): {statuses:?}"
    );

    let mut pg = pg;
    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .unwrap();

    // Resumes: the first success within a bounded time.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.post(Some("resume"), &[]).await;
        if r.status == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "did not resume: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Earlier outcomes are intact.
    for (k, body) in before.iter().zip(&bodies) {
        let r = app.post(Some(k), &[]).await;
        assert_eq!(r.status, 201);
        assert!(r.replayed());
        assert_eq!(&r.body, body);
        assert_eq!(app.orders(k).await, 1);
    }
    // Every key of the load and of the outage ends with exactly one order and its outcome.
    let mut keys: Vec<String> = sent
        .lock()
        .unwrap()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    keys.extend((0..5).map(|i| format!("down-{i}")));
    for k in &keys {
        app.assert_consistent(k, "after the restart, before the retry")
            .await;
        let r = app.post_until_settled(k, lease * 8).await;
        assert_eq!(r.status, 201, "{k}: {r:?}");
        let (orders, _) = app.assert_consistent(k, "after the retry").await;
        assert_eq!(orders, 1, "{k}");
    }
    drop(app);
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}
