//! PostgreSQL-specific behaviour: outages, pool exhaustion, statement timeouts, racing
//! instances, LISTEN/NOTIFY across instances, the reaper, migrations, and the transactional
//! completion. Each test that stops or kills its server starts its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use idemgate::record::{Fingerprint, Outcome, Record, RecordId, ResponseHead, Token};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, LeaseExpiry, Release, Renewal, Store, StoreError,
};
use idemgate_store_postgres::{PostgresStore, PostgresStoreBuilder};
use idemgate_store_tests::servers::postgres::PostgresServer;
use tokio::time::Instant;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn new_id() -> RecordId {
    RecordId(rand_bytes())
}

fn rand_bytes() -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&Token::random().0);
    out[16..].copy_from_slice(&Token::random().0);
    out
}

fn req(id: RecordId, token: Token) -> AcquireRequest {
    AcquireRequest {
        id,
        fingerprint: Fingerprint([1; 32]),
        token,
        lease: Duration::from_secs(60),
        on_lease_expiry: LeaseExpiry::OutcomeUnknown,
        retention: Duration::from_secs(3600),
    }
}

fn outcome(n: u8) -> Outcome {
    Outcome::Response {
        head: ResponseHead {
            status: 201,
            headers: vec![("x-n".into(), Bytes::from(vec![n]))],
        },
        body: Bytes::from(vec![n; 100]),
    }
}

const TTL: Duration = Duration::from_secs(3600);

/// A store on `url` with its own table, short timeouts and no background reaper.
fn builder(url: &str) -> PostgresStoreBuilder {
    let table = format!("t_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    PostgresStore::builder(url)
        .channel(table.clone())
        .table(table)
        .acquire_timeout(Duration::from_millis(500))
        .statement_timeout(Duration::from_secs(1))
        .reaper_interval(None)
}

fn shared_db() -> String {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| PostgresServer::shared().create_unique_database("pgtests"))
        .clone()
}

async fn acquired(s: &PostgresStore, r: AcquireRequest) {
    match s.acquire(r).await {
        Ok(Acquire::Acquired { .. }) => {}
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// Every operation while the server is down fails within its bound (no panic, no hang), and
/// after a restart earlier outcomes are intact and the store works again without rebuilding.
async fn outage(kill: bool) {
    let mut pg = PostgresServer::start();
    let url = pg.create_database("outage");
    let s = builder(&url).connect().await.unwrap();
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, a)).await;
    assert_eq!(
        s.complete(&id, a, &outcome(1), TTL).await.unwrap(),
        Completion::Stored
    );
    let (live, b) = (new_id(), Token::random());
    acquired(&s, req(live, b)).await;

    if kill {
        pg.kill();
    } else {
        pg.stop();
    }

    // acquire_timeout 0.5 s + statement_timeout 1 s + margin: every call ends well within 3 s.
    let bound = Duration::from_secs(3);
    let t0 = Instant::now();
    let r = tokio::time::timeout(bound, s.acquire(req(new_id(), Token::random())))
        .await
        .expect("acquire hung while the database was down");
    assert!(
        matches!(
            r,
            Err(StoreError::Unavailable(_) | StoreError::Timeout { .. })
        ),
        "acquire during outage: {r:?}"
    );
    let r = tokio::time::timeout(bound, s.complete(&live, b, &outcome(2), TTL))
        .await
        .expect("complete hung while the database was down");
    assert!(
        r.as_ref().is_err_and(|e| e.is_retryable()),
        "complete during outage: {r:?}"
    );
    let r = tokio::time::timeout(bound, s.get(&id))
        .await
        .expect("get hung while the database was down");
    assert!(r.is_err(), "get during outage: {r:?}");
    let r = tokio::time::timeout(bound, s.readiness())
        .await
        .expect("readiness hung while the database was down");
    assert!(r.is_err(), "readiness during outage: {r:?}");
    eprintln!("outage calls took {:?}", t0.elapsed());

    pg.start_again();
    // The pool still holds connections to the old server: the first operations must get
    // through anyway (stale connections are retried on fresh ones).
    match s.get(&id).await.unwrap() {
        Some(Record::Completed(c)) => {
            assert_eq!(c.outcome, outcome(1), "the outcome survived the restart");
            assert_eq!(c.origin_token, a);
        }
        other => panic!("after restart: {other:?}"),
    }
    // The failed complete is retried with the same token, as the engine would.
    assert_eq!(
        s.complete(&live, b, &outcome(2), TTL).await.unwrap(),
        Completion::Stored
    );
    match s.acquire(req(live, Token::random())).await.unwrap() {
        Acquire::Completed(c) => assert_eq!(c.outcome, outcome(2)),
        other => panic!("replay after restart: {other:?}"),
    }
    acquired(&s, req(new_id(), Token::random())).await;
    s.readiness().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_mid_use_errors_in_time_and_recovers() {
    outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_use_errors_in_time_and_keeps_committed_outcomes() {
    outage(true).await;
}

/// Pooled connections that go dark (packets dropped both ways, as when a NAT or load
/// balancer forgets them: no FIN, no RST) cost bounded failures, not an outage: each
/// operation on one ends at its deadline and the connection is not used again, so the store
/// answers on new connections within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_gone_dark_are_replaced() {
    let mut pg = PostgresServer::start();
    let url = pg.create_database("dark");
    let s = builder(&url)
        .max_connections(3)
        .listen(false)
        .connect()
        .await
        .unwrap();
    // Open the whole pool: three operations at once.
    tokio::join!(
        acquired(&s, req(new_id(), Token::random())),
        acquired(&s, req(new_id(), Token::random())),
        acquired(&s, req(new_id(), Token::random())),
    );
    let hole = idemgate_store_tests::net::Blackhole::connections_to(pg.port());
    assert!(!hole.local_ports().is_empty(), "no connection to darken");

    let went_dark = Instant::now();
    let mut failed = 0;
    loop {
        match s.acquire(req(new_id(), Token::random())).await {
            Ok(Acquire::Acquired { .. }) => break,
            Ok(other) => panic!("a new id: {other:?}"),
            Err(e) => {
                failed += 1;
                assert!(
                    went_dark.elapsed() < Duration::from_secs(20),
                    "still failing {:?} after the pool's connections went dark: {e}",
                    went_dark.elapsed()
                );
            }
        }
    }
    assert!(failed > 0, "no operation met a dark connection");
    drop(hole);
    pg.stop();
}

/// A transaction on `pool` holding record `id`'s row of store `s` (`FOR UPDATE`): statements
/// changing it wait until it ends.
async fn lock_row(
    pool: &sqlx::PgPool,
    s: &PostgresStore,
    id: &RecordId,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE id = $1 FOR UPDATE",
        s.table()
    )))
    .bind(&id.0[..])
    .execute(&mut *tx)
    .await
    .unwrap();
    tx
}

/// With every connection of the store's taken (two statements waiting on a row that another
/// transaction holds), an operation waits `acquire_timeout` and fails with `Unavailable`; it
/// works again once a connection is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_a_bounded_wait_then_unavailable() {
    let s = builder(&shared_db())
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(300))
        .statement_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, a)).await;
    // `pool()` is not the connections the store's statements run on.
    let tx = lock_row(s.pool(), &s, &id).await;
    let blocked: Vec<_> = (0..2)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.renew(&id, a, Duration::from_secs(30)).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Other tests share the database: only statements on this store's table count.
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND strpos(query, $1) > 0",
        )
        .bind(s.table())
        .fetch_one(s.pool())
        .await
        .unwrap();
        if waiting >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the two statements never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t0 = Instant::now();
    let r = s.acquire(req(new_id(), Token::random())).await;
    let took = t0.elapsed();
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "waited {took:?}"
    );
    tx.commit().await.unwrap();
    for b in blocked {
        assert!(matches!(b.await.unwrap(), Ok(Renewal::Renewed { .. })));
    }
    acquired(&s, req(new_id(), Token::random())).await;
}

/// The server processes serving the store's own statements in database `db` (its LISTEN
/// connection is off in the tests that ask).
async fn store_backends(admin: &sqlx::PgPool, db: &str) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'idemgate' \
         ORDER BY pid",
    )
    .bind(db)
    .fetch_all(admin)
    .await
    .unwrap()
}

/// A caller that gives up mid-statement (its future dropped, as when a client goes away)
/// leaves the connection to be brought back to a known state in the background and reused:
/// closing it would cost a new server process per abandoned request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_abandoned_mid_way_leaves_its_connection_reusable() {
    let url = PostgresServer::shared().create_unique_database("abandon");
    let db = url.rsplit('/').next().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let s = builder(&url)
        .max_connections(1)
        .listen(false)
        .statement_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap();
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, a)).await;
    let before = store_backends(&admin, &db).await;
    assert_eq!(before.len(), 1, "{before:?}");

    let tx = lock_row(&admin, &s, &id).await;
    // Blocked on the row lock, then given up.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        s.renew(&id, a, Duration::from_secs(30)),
    )
    .await;
    assert!(gave_up.is_err(), "the renew was not blocked: {gave_up:?}");
    tx.commit().await.unwrap();

    // The one connection serves again (after its recovery, which the pool of one waits for),
    // and it is the same server process.
    acquired(&s, req(new_id(), Token::random())).await;
    assert_eq!(store_backends(&admin, &db).await, before);
}

/// A statement blocked on a row lock ends at `statement_timeout` with
/// `Timeout { maybe_applied: false }` (the server rolled it back), not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_is_a_typed_timeout() {
    let s = builder(&shared_db()).connect().await.unwrap();
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, a)).await;
    let tx = lock_row(s.pool(), &s, &id).await;
    let t0 = Instant::now();
    let r = s.complete(&id, a, &outcome(1), TTL).await;
    assert_eq!(
        r,
        Err(StoreError::Timeout {
            maybe_applied: false
        })
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        s.complete(&id, a, &outcome(1), TTL).await.unwrap(),
        Completion::Stored
    );
}

/// Two instances on one table, many concurrent attempts per key: each key is acquired exactly
/// once, and every other attempt sees it in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_racing_acquire_each_key_once() {
    let url = shared_db();
    let table = format!("race_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let (s1, s2) = tokio::join!(
        builder(&url)
            .table(table.clone())
            .max_connections(8)
            .connect(),
        builder(&url)
            .table(table.clone())
            .max_connections(8)
            .connect(),
    );
    let stores = [Arc::new(s1.unwrap()), Arc::new(s2.unwrap())];
    let keys: Vec<RecordId> = (0..20).map(|_| new_id()).collect();
    let mut tasks = Vec::new();
    for (k, id) in keys.iter().enumerate() {
        for attempt in 0..8 {
            let s = stores[(k + attempt) % 2].clone();
            let id = *id;
            tasks.push(tokio::spawn(async move {
                (id, s.acquire(req(id, Token::random())).await)
            }));
        }
    }
    let mut won = std::collections::HashMap::<RecordId, usize>::new();
    for t in tasks {
        let (id, r) = t.await.unwrap();
        match r.unwrap() {
            Acquire::Acquired { .. } => *won.entry(id).or_default() += 1,
            Acquire::InFlight { .. } => {}
            other => panic!("unexpected answer in a race: {other:?}"),
        }
    }
    for id in &keys {
        assert_eq!(won.get(id), Some(&1), "key {id} acquired once");
    }
}

/// Lapsed leases under racing instances: exactly one placeholder write wins and everybody
/// sees the same outcome-unknown record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_takeover_of_a_lapsed_lease_is_consistent() {
    let url = shared_db();
    let table = format!("lapse_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let s1 = Arc::new(builder(&url).table(table.clone()).connect().await.unwrap());
    let s2 = Arc::new(builder(&url).table(table).connect().await.unwrap());
    let (id, a) = (new_id(), Token::random());
    acquired(
        &s1,
        AcquireRequest {
            lease: Duration::from_millis(200),
            ..req(id, a)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = if i % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.push(tokio::spawn(async move {
            s.acquire(req(id, Token::random())).await
        }));
    }
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Acquire::Completed(c) => {
                assert!(c.outcome.is_outcome_unknown());
                assert_eq!(c.origin_token, a);
            }
            other => panic!("after lapse: {other:?}"),
        }
    }
    // The late holder's real outcome replaces the placeholder.
    assert_eq!(
        s2.complete(&id, a, &outcome(3), TTL).await.unwrap(),
        Completion::Stored
    );
    match s1.acquire(req(id, Token::random())).await.unwrap() {
        Acquire::Completed(c) => assert_eq!(c.outcome, outcome(3)),
        other => panic!("{other:?}"),
    }
}

async fn fires(w: &mut idemgate::store::Watch, what: &str) {
    tokio::time::timeout(Duration::from_secs(2), w.changed())
        .await
        .unwrap_or_else(|_| panic!("{what}: the watch did not fire"));
}

async fn silent(w: &mut idemgate::store::Watch, what: &str) {
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.changed())
            .await
            .is_err(),
        "{what}: the watch fired without a change"
    );
}

/// Two stores on one new table, each with its own LISTEN connection on the table's channel:
/// (waiter, worker, table name).
async fn two_instances(prefix: &str) -> (PostgresStore, PostgresStore, String) {
    let url = shared_db();
    let table = format!("{prefix}_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let connect = || {
        builder(&url)
            .table(table.clone())
            .channel(table.clone())
            .connect()
    };
    let waiter = connect().await.unwrap();
    let worker = connect().await.unwrap();
    (waiter, worker, table)
}

/// A waiter on one instance is woken by a completion or release on another: the NOTIFY goes
/// through PostgreSQL to the waiter's LISTEN connection (no local shortcut can do that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reaches_waiters_of_another_instance() {
    let (waiter, worker, _) = two_instances("notify").await;

    let (id, a) = (new_id(), Token::random());
    acquired(&worker, req(id, a)).await;
    let mut w = waiter.watch(&id, 10).await.unwrap().unwrap();
    silent(&mut w, "before any change").await;
    // A change to another key does not wake this waiter.
    let (other, b) = (new_id(), Token::random());
    acquired(&worker, req(other, b)).await;
    worker.release(&other, b).await.unwrap();
    silent(&mut w, "after another key changed").await;
    worker.complete(&id, a, &outcome(1), TTL).await.unwrap();
    fires(&mut w, "complete on the other instance").await;

    let (id2, c) = (new_id(), Token::random());
    acquired(&worker, req(id2, c)).await;
    let mut w2 = waiter.watch(&id2, 10).await.unwrap().unwrap();
    assert_eq!(worker.release(&id2, c).await.unwrap(), Release::Released);
    fires(&mut w2, "release on the other instance").await;
}

/// The LISTEN connection comes back after a restart, wakes every waiter then (notifications
/// sent while it was away are lost), and delivers new notifications afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_and_wakes_waiters_after_restart() {
    let mut pg = PostgresServer::start();
    let url = pg.create_database("listen");
    let waiter = builder(&url).connect().await.unwrap();
    let table = waiter.table().trim_matches('"').to_owned();
    let worker = builder(&url)
        .table(table.clone())
        .channel(table)
        .connect()
        .await
        .unwrap();
    let (id, a) = (new_id(), Token::random());
    acquired(&worker, req(id, a)).await;
    let mut w = waiter.watch(&id, 10).await.unwrap().unwrap();

    pg.stop();
    pg.start_again();
    // Woken at the loss and again at the reconnect: the waiter re-reads.
    fires(&mut w, "connection lost").await;
    // Give the listener time to re-LISTEN, then check that live notifications flow again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut delivered = false;
    while Instant::now() < deadline && !delivered {
        let (k, t) = (new_id(), Token::random());
        if worker.acquire(req(k, t)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut wk = waiter.watch(&k, 10).await.unwrap().unwrap();
        while tokio::time::timeout(Duration::from_millis(10), wk.changed())
            .await
            .is_ok()
        {}
        worker.complete(&k, t, &outcome(1), TTL).await.unwrap();
        delivered = tokio::time::timeout(Duration::from_secs(1), wk.changed())
            .await
            .is_ok();
    }
    assert!(delivered, "notifications flow again after the restart");
}

/// A TCP relay to PostgreSQL whose connections can be made to go silent: bytes stop flowing
/// both ways while both sockets stay open, as when a NAT or a load balancer drops a
/// connection without telling either end. Connections accepted after that relay normally.
struct SilentRelay {
    port: u16,
    silence: tokio::sync::watch::Sender<()>,
}

impl SilentRelay {
    async fn start(to_port: u16) -> SilentRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (silence, _) = tokio::sync::watch::channel(());
        let silenced = silence.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut silenced = silenced.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", to_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = silenced.changed() => {
                            // Holds both sockets open, relaying nothing, until the test ends.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        SilentRelay { port, silence }
    }

    /// Silences every connection relayed so far.
    fn silence(&self) {
        self.silence.send_replace(());
    }
}

/// A LISTEN connection that goes silent (no FIN, no RST: TCP would take many minutes to
/// notice) fails its check once quiet for the check interval and is replaced; every waiter is
/// woken then, long before its lease's end, and notifications flow on the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_listen_connection_is_found_by_its_check_and_replaced() {
    let url = shared_db();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let relay = SilentRelay::start(PostgresServer::shared().port()).await;
    let table = format!("silent_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let waiter = builder(&url)
        .table(table.clone())
        .channel(table.clone())
        .listen_url(format!("postgres://postgres@127.0.0.1:{}/{db}", relay.port))
        .listen_check_interval(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let worker = builder(&url)
        .table(table.clone())
        .channel(table)
        .connect()
        .await
        .unwrap();
    let notified = |(id, t): (RecordId, Token)| {
        let (waiter, worker) = (&waiter, &worker);
        async move {
            acquired(worker, req(id, t)).await;
            let mut w = waiter.watch(&id, 10).await.unwrap().unwrap();
            worker.complete(&id, t, &outcome(1), TTL).await.unwrap();
            fires(&mut w, "complete through the relay").await;
        }
    };
    notified((new_id(), Token::random())).await;
    // Quiet spells longer than the check interval pass while the connection answers.
    tokio::time::sleep(Duration::from_millis(700)).await;
    notified((new_id(), Token::random())).await;

    relay.silence();
    let (id, t) = (new_id(), Token::random());
    acquired(&worker, req(id, t)).await;
    let mut w = waiter.watch(&id, 10).await.unwrap().unwrap();
    worker.complete(&id, t, &outcome(2), TTL).await.unwrap();
    // The NOTIFY went into the silent connection; the failed check wakes the waiter instead
    // (interval 0.2 s + three 0.5 s acquire timeouts), well before the lease (60 s) ends.
    tokio::time::timeout(Duration::from_secs(5), w.changed())
        .await
        .expect("the waiter is woken once the silent connection fails its check");
    // Notifications flow again, on a new connection through the relay.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (k, t) = (new_id(), Token::random());
        acquired(&worker, req(k, t)).await;
        let mut wk = waiter.watch(&k, 10).await.unwrap().unwrap();
        // A wake before the change is the replacement's wake-up call to every waiter: the new
        // connection may not be listening yet, so try again.
        let spurious = tokio::time::timeout(Duration::from_millis(300), wk.changed())
            .await
            .is_ok();
        worker.complete(&k, t, &outcome(1), TTL).await.unwrap();
        if !spurious
            && tokio::time::timeout(Duration::from_secs(1), wk.changed())
                .await
                .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "notifications flow again after the replacement"
        );
    }
}

/// Expired rows are deleted in batches; the reaper lock lets one instance reap at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_deletes_in_batches_under_an_advisory_lock() {
    let url = shared_db();
    let table = format!("reap_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let s1 = builder(&url)
        .table(table.clone())
        .reaper_batch(3)
        .connect()
        .await
        .unwrap();
    let s2 = builder(&url)
        .table(table.clone())
        .reaper_batch(3)
        .connect()
        .await
        .unwrap();
    let mut expiring = Vec::new();
    for _ in 0..10 {
        let (id, t) = (new_id(), Token::random());
        acquired(&s1, req(id, t)).await;
        s1.complete(&id, t, &outcome(1), Duration::from_millis(100))
            .await
            .unwrap();
        expiring.push(id);
    }
    let (keep, t) = (new_id(), Token::random());
    acquired(&s1, req(keep, t)).await;
    s1.complete(&keep, t, &outcome(2), TTL).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;

    // While another session holds the reaper lock, a background-style run skips.
    let mut tx = s2.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(501809154, hashtext($1))")
        .bind(&table)
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        s1.reap_once().await.unwrap(),
        None,
        "lock held elsewhere: skip"
    );
    tx.rollback().await.unwrap();

    let (a, b) = tokio::join!(s1.purge_expired(), s2.purge_expired());
    assert_eq!(a.unwrap() + b.unwrap(), 10, "all expired rows, once");
    for id in &expiring {
        assert!(s1.get(id).await.unwrap().is_none());
    }
    assert!(matches!(
        s1.get(&keep).await.unwrap(),
        Some(Record::Completed(_))
    ));
}

/// Instances starting together on a new table all succeed (migrations under an advisory lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_startup_migrates_once() {
    let url = shared_db();
    let table = format!("mig_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let starts = (0..6).map(|_| builder(&url).table(table.clone()).connect());
    let stores = futures_join_all(starts).await;
    for s in &stores {
        assert!(s.is_ok(), "{s:?}");
    }
    let s = stores.into_iter().next().unwrap().unwrap();
    let v: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{table}_schema\""
    )))
    .fetch_one(s.pool())
    .await
    .unwrap();
    assert_eq!(v, 2, "each schema version recorded once");
}

/// The text of schema version 1, as released: tables made by earlier builds look like this.
const SCHEMA_V1: &str = "CREATE TABLE \"{t}\" ( \
       id bytea PRIMARY KEY, state smallint NOT NULL, fingerprint bytea NOT NULL, token bytea, \
       lease_expires_at timestamptz, holder bigint, origin_token bytea, outcome bytea, \
       outcome_unknown boolean NOT NULL DEFAULT false, expires_at timestamptz); \
     CREATE INDEX \"{t}_expires_at\" ON \"{t}\" (expires_at); \
     CREATE TABLE \"{t}_schema\" (version integer PRIMARY KEY, \
       applied_at timestamptz NOT NULL DEFAULT now()); \
     INSERT INTO \"{t}_schema\" (version) VALUES (1)";

/// A new table as the released version-1 DDL made it (empty), and a pool to reach it.
async fn version_1_table(url: &str) -> (String, sqlx::PgPool) {
    let table = format!("v1_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let admin = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(SCHEMA_V1.replace("{t}", &table)))
        .execute(&admin)
        .await
        .unwrap();
    (table, admin)
}

/// A table of schema version 1 is upgraded in place at connect, keeping its records; without
/// migrations, connecting to it is refused with a message that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_table_is_upgraded_and_keeps_its_records() {
    let url = shared_db();
    let (table, admin) = version_1_table(&url).await;
    // A record written the way a version-1 build wrote it: every column but `watched`.
    let (id, a) = (new_id(), Token::random());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{table}\" (id, state, fingerprint, origin_token, outcome, expires_at) \
         VALUES ($1, 2, $2, $3, $4, now() + interval '1 hour')"
    )))
    .bind(&id.0[..])
    .bind(&[1u8; 32][..])
    .bind(&a.0[..])
    .bind(outcome(7).encode())
    .execute(&admin)
    .await
    .unwrap();

    match builder(&url)
        .table(table.clone())
        .migrate(false)
        .connect()
        .await
    {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("schema version 1") && msg.contains("needs version 2"),
                "{msg}"
            );
        }
        Ok(_) => panic!("a version-1 table was used without its migration"),
    }

    let s = builder(&url).table(table.clone()).connect().await.unwrap();
    match s.acquire(req(id, Token::random())).await.unwrap() {
        Acquire::Completed(c) => assert_eq!(c.outcome, outcome(7)),
        other => panic!("the version-1 record is not replayed: {other:?}"),
    }
    let (fresh, b) = (new_id(), Token::random());
    acquired(&s, req(fresh, b)).await;
    assert_eq!(
        s.complete(&fresh, b, &outcome(8), TTL).await.unwrap(),
        Completion::Stored
    );
    // Upgraded once: a second connect (with or without migrations) finds version 2.
    builder(&url)
        .table(table.clone())
        .migrate(false)
        .connect()
        .await
        .unwrap();
}

/// A schema upgrade that must wait for a transaction using the table gives way every half
/// second instead of holding its place in the lock queue: meanwhile the table stays usable
/// (without the bound, a reader would queue behind the waiting `ALTER TABLE` until its
/// statement timeout), and the upgrade goes through once the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_upgrade_behind_a_long_transaction_does_not_block_the_table() {
    use sqlx::Connection as _;
    let url = shared_db();
    let (table, admin) = version_1_table(&url).await;
    // A transaction that uses the table and stays open, as a long request of the
    // transactional mode would.
    let mut long = admin.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{table}\""
    )))
    .execute(&mut *long)
    .await
    .unwrap();

    let upgrade = tokio::spawn({
        let (url, table) = (url.clone(), table.clone());
        // The production statement timeout: without the lock bound, the waiting upgrade would
        // hold the reader below up for up to that long.
        async move {
            builder(&url)
                .table(table)
                .statement_timeout(Duration::from_secs(5))
                .connect()
                .await
        }
    });
    // While the upgrade waits, another instance's statements on the table still run.
    let mut reader = sqlx::postgres::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("SET statement_timeout = '2s'")
        .execute(&mut reader)
        .await
        .unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{table}\""
        )))
        .execute(&mut reader)
        .await
        .expect("the table is usable while its upgrade waits");
    }
    assert!(
        !upgrade.is_finished(),
        "the upgrade did not wait for the transaction"
    );

    long.commit().await.unwrap();
    let s = tokio::time::timeout(Duration::from_secs(10), upgrade)
        .await
        .expect("the upgrade went through within 10 s of the transaction's end")
        .unwrap()
        .expect("connect after the upgrade");
    let (id, t) = (new_id(), Token::random());
    acquired(&s, req(id, t)).await;
    builder(&url)
        .table(table.clone())
        .migrate(false)
        .connect()
        .await
        .expect("the table is at this build's version");
}

async fn first_payload(raw: &mut sqlx::postgres::PgListener) -> String {
    tokio::time::timeout(Duration::from_secs(5), raw.recv())
        .await
        .expect("a notification within 5 s")
        .unwrap()
        .payload()
        .to_owned()
}

/// A change sends a NOTIFY only when a waiter marked the row: notifying transactions share
/// one lock across their WAL flush at commit, so a NOTIFY per `complete` would cost every
/// fresh request a flush of its own. Checked by a plain LISTEN connection on the store's
/// channel: PostgreSQL delivers notifications in commit order, so the first one it gets after
/// an unwatched and then a watched change must be the watched one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_changes_a_waiter_marked_are_notified() {
    let (waiter, worker, table) = two_instances("marked").await;
    let mut raw = sqlx::postgres::PgListener::connect(&shared_db())
        .await
        .unwrap();
    raw.listen(&table).await.unwrap();
    for change in ["complete", "release", "delete"] {
        let (quiet, q) = (new_id(), Token::random());
        let (marked, m) = (new_id(), Token::random());
        acquired(&worker, req(quiet, q)).await;
        acquired(&worker, req(marked, m)).await;
        let mut w = waiter.watch(&marked, 10).await.unwrap().unwrap();
        for (id, token) in [(quiet, q), (marked, m)] {
            match change {
                "complete" => {
                    worker.complete(&id, token, &outcome(1), TTL).await.unwrap();
                }
                "release" => {
                    worker.release(&id, token).await.unwrap();
                }
                _ => {
                    worker.delete(&id, true).await.unwrap();
                }
            }
        }
        assert_eq!(
            first_payload(&mut raw).await,
            marked.to_hex(),
            "{change}: the first notification is the marked row's"
        );
        fires(&mut w, change).await;
    }
}

async fn futures_join_all<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// `complete_in` commits with the application's transaction, or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_in_follows_the_application_transaction() {
    let s = builder(&shared_db()).connect().await.unwrap();
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, a)).await;

    let mut tx = s.pool().begin().await.unwrap();
    let r = s
        .complete_in(&mut tx, &id, a, &outcome(1), TTL)
        .await
        .unwrap();
    assert_eq!(r, Completion::Stored);
    tx.rollback().await.unwrap();
    assert!(
        matches!(s.get(&id).await.unwrap(), Some(Record::InFlight(f)) if f.token == a),
        "rolled back: still in flight"
    );

    let mut tx = s.pool().begin().await.unwrap();
    let other = Token::random();
    assert_eq!(
        s.complete_in(&mut tx, &id, other, &outcome(9), TTL)
            .await
            .unwrap(),
        Completion::Refused,
        "fenced inside a transaction too"
    );
    s.complete_in(&mut tx, &id, a, &outcome(1), TTL)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    match s.get(&id).await.unwrap() {
        Some(Record::Completed(c)) => assert_eq!(c.outcome, outcome(1)),
        other => panic!("{other:?}"),
    }
}

/// Rows written in a shape this build cannot read (unknown state) are `Corrupt` for every
/// token operation and never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_state_is_corrupt() {
    let s = builder(&shared_db()).connect().await.unwrap();
    let id = new_id();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (id, state, fingerprint, expires_at) \
         VALUES ($1, 7, $2, now() - interval '1 hour')",
        s.table()
    )))
    .bind(&id.0[..])
    .bind(&[1u8; 32][..])
    .execute(s.pool())
    .await
    .unwrap();
    let t = Token::random();
    assert!(matches!(
        s.acquire(req(id, t)).await,
        Err(StoreError::Corrupt(_))
    ));
    let re = AcquireRequest {
        on_lease_expiry: LeaseExpiry::ReExecute,
        ..req(id, t)
    };
    assert!(matches!(s.acquire(re).await, Err(StoreError::Corrupt(_))));
    assert!(matches!(
        s.complete(&id, t, &outcome(1), TTL).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(s.get(&id).await, Err(StoreError::Corrupt(_))));
}

/// Invalid table names are refused before touching the database.
#[tokio::test]
async fn invalid_table_name_is_a_config_error() {
    for bad in ["", "a;drop", "x\"y", "a.b.c", "1abc"] {
        let r = PostgresStore::builder("postgres://postgres@127.0.0.1:1/x")
            .table(bad)
            .connect()
            .await;
        assert!(
            matches!(r, Err(idemgate_store_postgres::BuildError::Config(_))),
            "{bad:?}: {r:?}"
        );
    }
}
