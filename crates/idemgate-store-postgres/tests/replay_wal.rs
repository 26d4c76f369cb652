//! `acquire` answers that need no write (a replay, a mismatch, a duplicate in flight, the
//! attempt's own retry) are pure reads: no transaction id, no WAL, so no WAL flush at commit.
//! And the races around that read (a row that appears or changes between the statement's
//! snapshot and its insert) still give `decide_acquire`'s answers.
//!
//! The WAL test runs on a server of its own, so no other test's writes move its WAL position.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use idemgate::record::{Fingerprint, Outcome, RecordId, ResponseHead, Token};
use idemgate::store::{Acquire, AcquireRequest, Completion, LeaseExpiry, Store};
use idemgate_store_postgres::{PostgresStore, PostgresStoreBuilder};
use idemgate_store_tests::servers::postgres::PostgresServer;
use sqlx::AssertSqlSafe;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn new_id() -> RecordId {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&Token::random().0);
    out[16..].copy_from_slice(&Token::random().0);
    RecordId(out)
}

const FP: Fingerprint = Fingerprint([1; 32]);
const OTHER_FP: Fingerprint = Fingerprint([2; 32]);
const TTL: Duration = Duration::from_secs(3600);

fn req(id: RecordId, token: Token, fingerprint: Fingerprint) -> AcquireRequest {
    AcquireRequest {
        id,
        fingerprint,
        token,
        lease: Duration::from_secs(60),
        on_lease_expiry: LeaseExpiry::OutcomeUnknown,
        retention: TTL,
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

fn builder(url: &str) -> PostgresStoreBuilder {
    let table = format!("wal_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    PostgresStore::builder(url)
        .channel(table.clone())
        .table(table)
        .acquire_timeout(Duration::from_millis(500))
        .statement_timeout(Duration::from_secs(2))
        .reaper_interval(None)
}

/// The server's WAL insert position and next transaction id.
async fn probe(s: &PostgresStore) -> (String, i64) {
    sqlx::query_as(
        "SELECT pg_current_wal_insert_lsn()::text, \
                pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
    )
    .fetch_one(s.pool())
    .await
    .unwrap()
}

/// WAL bytes written and transaction ids assigned since `before`.
async fn since(s: &PostgresStore, before: &(String, i64)) -> (i64, i64) {
    let (wal, xid): (i64, i64) = sqlx::query_as(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::pg_lsn)::bigint, \
                pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
    )
    .bind(&before.0)
    .fetch_one(s.pool())
    .await
    .unwrap();
    (wal, xid - before.1)
}

/// The row's `xmax`: set by anyone who locked or updated this version of the row.
async fn xmax(s: &PostgresStore, id: &RecordId) -> String {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT xmax::text FROM {} WHERE id = $1",
        s.table()
    )))
    .bind(&id.0[..])
    .fetch_one(s.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_that_need_no_write_write_no_wal() {
    let pg = PostgresServer::start();
    let s = builder(&pg.create_database("wal")).connect().await.unwrap();

    let (done, a) = (new_id(), Token::random());
    assert!(matches!(
        s.acquire(req(done, a, FP)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    assert_eq!(
        s.complete(&done, a, &outcome(1), TTL).await.unwrap(),
        Completion::Stored
    );
    let (busy, b) = (new_id(), Token::random());
    let Acquire::Acquired {
        lease_expires_at: lease,
    } = s.acquire(req(busy, b, FP)).await.unwrap()
    else {
        panic!("expected Acquired");
    };

    // The measuring method sees a write: a fresh acquire moves the WAL and takes an xid.
    let before = probe(&s).await;
    assert!(matches!(
        s.acquire(req(new_id(), Token::random(), FP)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    let (wal, xids) = since(&s, &before).await;
    assert!(
        wal > 0 && xids > 0,
        "a fresh acquire: {wal} WAL bytes, {xids} xids"
    );

    // Background work (a standby snapshot record, autovacuum) could move the WAL during a
    // round; it only ever adds, so one clean round of three is proof. The old statement wrote
    // a heap-lock record and a commit record on every one of these calls.
    const N: usize = 20;
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let before = probe(&s).await;
        for _ in 0..N {
            match s.acquire(req(done, Token::random(), FP)).await.unwrap() {
                Acquire::Completed(c) => assert_eq!(c.outcome, outcome(1)),
                other => panic!("replay: {other:?}"),
            }
            assert_eq!(
                s.acquire(req(done, Token::random(), OTHER_FP))
                    .await
                    .unwrap(),
                Acquire::Mismatch
            );
            assert_eq!(
                s.acquire(req(busy, Token::random(), FP)).await.unwrap(),
                Acquire::InFlight {
                    lease_expires_at: lease
                }
            );
            assert_eq!(
                s.acquire(req(busy, Token::random(), OTHER_FP))
                    .await
                    .unwrap(),
                Acquire::Mismatch
            );
            assert_eq!(
                s.acquire(req(busy, b, FP)).await.unwrap(),
                Acquire::Acquired {
                    lease_expires_at: lease
                },
                "the holder's own retry"
            );
        }
        let r = since(&s, &before).await;
        rounds.push(r);
        if r == (0, 0) {
            break;
        }
    }
    assert_eq!(
        rounds.last(),
        Some(&(0, 0)),
        "(WAL bytes, xids) per round of {} read-only acquires: {rounds:?}",
        N * 5
    );
    // Nobody locked the rows either.
    assert_eq!(xmax(&s, &done).await, "0", "completed row locked");
    assert_eq!(xmax(&s, &busy).await, "0", "in-flight row locked");
}

fn shared_db() -> String {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| PostgresServer::shared().create_unique_database("walrace"))
        .clone()
}

/// Runs `acquire` while another transaction holds an uncommitted change to the row (`change`,
/// with `$1` the id and `params` the rest, all `bytea`), committed only after the acquire has
/// started: the acquire's snapshot shows the row as it was and its insert meets the new version.
async fn acquire_across(
    s: &PostgresStore,
    change: &str,
    params: &[&[u8]],
    r: AcquireRequest,
) -> Acquire {
    let mut tx = s.pool().begin().await.unwrap();
    let mut q = sqlx::query(AssertSqlSafe(change.to_owned())).bind(r.id.0.to_vec());
    for p in params {
        q = q.bind(p.to_vec());
    }
    assert_eq!(q.execute(&mut *tx).await.unwrap().rows_affected(), 1);
    let s2 = s.clone();
    let task = tokio::spawn(async move { s2.acquire(r).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !task.is_finished(),
        "the acquire should wait for the other transaction"
    );
    tx.commit().await.unwrap();
    task.await.unwrap().unwrap()
}

/// A row that appears between the acquire's snapshot (absent) and its insert: the insert
/// meets it through ON CONFLICT, writes nothing, and the retry answers from the new row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_appears_after_the_snapshot_is_answered_from() {
    let s = builder(&shared_db())
        .max_connections(4)
        .connect()
        .await
        .unwrap();
    let insert_in_flight = format!(
        "INSERT INTO {} (id, state, fingerprint, token, lease_expires_at, holder, expires_at) \
         VALUES ($1, 1, $2, $3, now() + interval '1 minute', 7, now() + interval '1 hour')",
        s.table()
    );
    let insert_completed = format!(
        "INSERT INTO {} (id, state, fingerprint, origin_token, outcome, expires_at) \
         VALUES ($1, 2, $2, $3, $4, now() + interval '1 hour')",
        s.table()
    );

    // Another attempt's in-flight record.
    let (id, other) = (new_id(), Token::random());
    let a = acquire_across(
        &s,
        &insert_in_flight,
        &[&FP.0, &other.0],
        req(id, Token::random(), FP),
    )
    .await;
    assert!(matches!(a, Acquire::InFlight { .. }), "{a:?}");
    let id2 = new_id();
    let a = acquire_across(
        &s,
        &insert_in_flight,
        &[&OTHER_FP.0, &other.0],
        req(id2, Token::random(), FP),
    )
    .await;
    assert_eq!(a, Acquire::Mismatch);

    // A completed record: replayed, or a mismatch.
    let bytes = outcome(4).encode();
    let id3 = new_id();
    let a = acquire_across(
        &s,
        &insert_completed,
        &[&FP.0, &other.0, &bytes],
        req(id3, Token::random(), FP),
    )
    .await;
    match a {
        Acquire::Completed(c) => {
            assert_eq!(c.outcome, outcome(4));
            assert_eq!(c.origin_token, other);
        }
        other => panic!("{other:?}"),
    }
    let id4 = new_id();
    let a = acquire_across(
        &s,
        &insert_completed,
        &[&OTHER_FP.0, &other.0, &bytes],
        req(id4, Token::random(), FP),
    )
    .await;
    assert_eq!(a, Acquire::Mismatch);
}

/// A row whose snapshot version is due for a write (an expired outcome, a lapsed lease) but
/// which another transaction changes before the insert: ON CONFLICT judges the new version,
/// and the answer follows it (never a write over a live record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_changes_after_the_snapshot_is_answered_from() {
    let s = builder(&shared_db())
        .max_connections(4)
        .connect()
        .await
        .unwrap();
    let to_in_flight = format!(
        "UPDATE {} SET state = 1, token = $2, lease_expires_at = now() + interval '1 minute', \
           holder = 7, origin_token = NULL, outcome = NULL, outcome_unknown = false, \
           expires_at = now() + interval '1 hour' \
         WHERE id = $1",
        s.table()
    );
    let to_completed = format!(
        "UPDATE {} SET state = 2, token = NULL, lease_expires_at = NULL, holder = NULL, \
           origin_token = $2, outcome = $3, outcome_unknown = false, \
           expires_at = now() + interval '1 hour' \
         WHERE id = $1",
        s.table()
    );

    // An expired outcome that another attempt takes over (as its own acquire would).
    let (id, a) = (new_id(), Token::random());
    s.acquire(req(id, a, FP)).await.unwrap();
    s.complete(&id, a, &outcome(1), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let thief = Token::random();
    let r = acquire_across(&s, &to_in_flight, &[&thief.0], req(id, Token::random(), FP)).await;
    assert!(matches!(r, Acquire::InFlight { .. }), "{r:?}");

    // A lapsed lease whose holder completes at the last moment: its outcome is replayed, not
    // overwritten by a placeholder.
    let (id, a) = (new_id(), Token::random());
    s.acquire(AcquireRequest {
        lease: Duration::from_millis(100),
        ..req(id, a, FP)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bytes = outcome(5).encode();
    let r = acquire_across(
        &s,
        &to_completed,
        &[&a.0, &bytes],
        req(id, Token::random(), FP),
    )
    .await;
    match r {
        Acquire::Completed(c) => {
            assert_eq!(c.outcome, outcome(5));
            assert_eq!(c.origin_token, a);
        }
        other => panic!("{other:?}"),
    }
}
