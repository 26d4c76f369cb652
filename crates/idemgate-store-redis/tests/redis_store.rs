//! RedisStore against real `redis-server`s started by the tests (standalone and Cluster).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use idemgate::record::{Fingerprint, Outcome, Record, RecordId, ResponseHead, Token};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, Deletion, LeaseExpiry, Release, Renewal, Resolution,
    Resolved, Store, StoreError,
};
use idemgate_store_redis::RedisStore;
use idemgate_store_tests::servers::redis::{RedisCluster, RedisServer};

fn server() -> &'static RedisServer {
    static S: OnceLock<RedisServer> = OnceLock::new();
    S.get_or_init(|| {
        RedisServer::builder()
            .config("maxmemory-policy noeviction")
            .start()
    })
}

fn cluster() -> &'static RedisCluster {
    static C: OnceLock<RedisCluster> = OnceLock::new();
    C.get_or_init(|| RedisCluster::start(3))
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn prefix() -> String {
    format!(
        "t{}-{}:idemgate:",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn store_at(url: &str) -> RedisStore {
    RedisStore::builder(url)
        .key_prefix(prefix())
        .connect()
        .await
        .expect("connect")
}

fn id(n: u8) -> RecordId {
    RecordId([n; 32])
}

fn req(id: RecordId, fp: u8, token: Token, lease: Duration) -> AcquireRequest {
    AcquireRequest {
        id,
        fingerprint: Fingerprint([fp; 32]),
        token,
        lease,
        on_lease_expiry: LeaseExpiry::OutcomeUnknown,
        retention: Duration::from_secs(60),
    }
}

fn response(body: &'static [u8]) -> Outcome {
    Outcome::Response {
        head: ResponseHead {
            status: 201,
            headers: vec![
                ("location".into(), Bytes::from_static(b"/p/1")),
                ("x-bin".into(), Bytes::from_static(&[0xff, 0, 0x80])),
            ],
        },
        body: Bytes::from_static(body),
    }
}

const LEASE: Duration = Duration::from_millis(800);
const TTL: Duration = Duration::from_secs(60);

async fn table(store: &RedisStore) {
    let a = Token::random();
    let b = Token::random();
    let k = id(1);
    let first = store.acquire(req(k, 1, a, LEASE)).await.unwrap();
    let Acquire::Acquired { lease_expires_at } = first else {
        panic!("fresh acquire: {first:?}")
    };
    // Same token again (a retry after a timeout) → Acquired with the same lease.
    assert_eq!(
        store.acquire(req(k, 1, a, LEASE)).await.unwrap(),
        Acquire::Acquired { lease_expires_at }
    );
    assert_eq!(
        store.acquire(req(k, 1, b, LEASE)).await.unwrap(),
        Acquire::InFlight { lease_expires_at }
    );
    assert_eq!(
        store.acquire(req(k, 2, b, LEASE)).await.unwrap(),
        Acquire::Mismatch
    );
    assert!(matches!(
        store.get(&k).await.unwrap(),
        Some(Record::InFlight(f)) if f.token == a
    ));
    let renewed = store.renew(&k, a, LEASE).await.unwrap();
    assert!(matches!(renewed, Renewal::Renewed { lease_expires_at: l } if l >= lease_expires_at));
    assert_eq!(store.renew(&k, b, LEASE).await.unwrap(), Renewal::Refused);
    assert_eq!(store.release(&k, b).await.unwrap(), Release::Refused);
    assert_eq!(
        store.complete(&k, b, &response(b"x"), TTL).await.unwrap(),
        Completion::Refused
    );
    let outcome = response(b"\x00body\xff");
    assert_eq!(
        store.complete(&k, a, &outcome, TTL).await.unwrap(),
        Completion::Stored
    );
    // Idempotent for its token.
    assert_eq!(
        store.complete(&k, a, &outcome, TTL).await.unwrap(),
        Completion::Stored
    );
    match store.acquire(req(k, 1, b, LEASE)).await.unwrap() {
        Acquire::Completed(c) => {
            assert_eq!(c.outcome, outcome);
            assert_eq!(c.origin_token, a);
        }
        other => panic!("replay: {other:?}"),
    }
    assert_eq!(
        store.acquire(req(k, 2, b, LEASE)).await.unwrap(),
        Acquire::Mismatch
    );
    assert_eq!(store.renew(&k, a, LEASE).await.unwrap(), Renewal::Refused);
    assert_eq!(store.release(&k, a).await.unwrap(), Release::Refused);
    assert_eq!(store.delete(&k, false).await.unwrap(), Deletion::Deleted);
    assert_eq!(store.delete(&k, false).await.unwrap(), Deletion::NotFound);
    assert_eq!(store.get(&k).await.unwrap(), None);

    // Release: gone, next attempt executes.
    let k = id(2);
    assert!(matches!(
        store.acquire(req(k, 1, a, LEASE)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    assert_eq!(
        store.delete(&k, false).await.unwrap(),
        Deletion::InFlightNeedsForce
    );
    assert_eq!(store.release(&k, a).await.unwrap(), Release::Released);
    assert_eq!(store.release(&k, a).await.unwrap(), Release::Released);
    assert!(matches!(
        store.acquire(req(k, 1, b, LEASE)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    assert_eq!(store.delete(&k, true).await.unwrap(), Deletion::Deleted);
}

async fn lapsed(store: &RedisStore) {
    let a = Token::random();
    let b = Token::random();
    let lease = Duration::from_millis(150);
    let k = id(3);
    assert!(matches!(
        store.acquire(req(k, 1, a, lease)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another fingerprint meets the lapsed lease: placeholder written, answer Mismatch.
    assert_eq!(
        store.acquire(req(k, 2, b, lease)).await.unwrap(),
        Acquire::Mismatch
    );
    match store.acquire(req(k, 1, b, lease)).await.unwrap() {
        Acquire::Completed(c) => {
            assert!(c.outcome.is_outcome_unknown());
            assert_eq!(c.origin_token, a);
        }
        other => panic!("placeholder: {other:?}"),
    }
    // The late holder's real outcome replaces the placeholder.
    let outcome = response(b"late");
    assert_eq!(
        store.complete(&k, a, &outcome, TTL).await.unwrap(),
        Completion::Stored
    );
    assert!(matches!(
        store.acquire(req(k, 1, b, lease)).await.unwrap(),
        Acquire::Completed(c) if c.outcome == outcome
    ));
    assert_eq!(
        store.resolve(&k, Resolution::Release).await.unwrap(),
        Resolved::NotOutcomeUnknown
    );

    // Re-execute mode treats the lapsed lease as absent.
    let k = id(4);
    assert!(matches!(
        store.acquire(req(k, 1, a, lease)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut r = req(k, 1, b, lease);
    r.on_lease_expiry = LeaseExpiry::ReExecute;
    assert!(matches!(
        store.acquire(r).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    assert_eq!(
        store
            .complete(&k, a, &response(b"fenced"), TTL)
            .await
            .unwrap(),
        Completion::Refused
    );

    // Operator resolution of a placeholder.
    let k = id(5);
    store.acquire(req(k, 1, a, lease)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.acquire(req(k, 1, b, lease)).await.unwrap();
    let settled = response(b"settled");
    assert_eq!(
        store
            .resolve(
                &k,
                Resolution::Respond {
                    outcome: settled.clone(),
                    ttl: TTL
                }
            )
            .await
            .unwrap(),
        Resolved::Resolved
    );
    assert!(matches!(
        store.get(&k).await.unwrap(),
        Some(Record::Completed(c)) if c.outcome == settled
    ));
    assert_eq!(
        store.resolve(&id(99), Resolution::Release).await.unwrap(),
        Resolved::NotFound
    );
}

#[tokio::test]
async fn contract_table_standalone() {
    let store = store_at(&server().url()).await;
    table(&store).await;
    lapsed(&store).await;
}

#[tokio::test]
async fn contract_table_cluster() {
    let store = store_at(&cluster().url()).await;
    table(&store).await;
    lapsed(&store).await;
    store.readiness().await.unwrap();
}

#[tokio::test]
async fn garbage_in_the_slot_is_corrupt_never_acquired() {
    let srv = server();
    let store = store_at(&srv.url()).await;
    let k = id(7);
    let key = store.key(&k);
    let t = Token::random();
    srv.cli(&["set", &key, "garbage"]);
    for _ in 0..2 {
        let got = store.acquire(req(k, 1, t, LEASE)).await;
        assert!(matches!(got, Err(StoreError::Corrupt(_))), "{got:?}");
    }
    assert!(matches!(store.get(&k).await, Err(StoreError::Corrupt(_))));
    assert!(matches!(
        store.complete(&k, t, &response(b"x"), TTL).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.delete(&k, false).await,
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(store.delete(&k, true).await.unwrap(), Deletion::Deleted);

    // A hash of a future format version.
    srv.cli(&["hset", &key, "v", "9", "s", "c", "x", "1"]);
    assert!(matches!(
        store.acquire(req(k, 1, t, LEASE)).await,
        Err(StoreError::Corrupt(_))
    ));
    srv.cli(&["del", &key]);
    // A valid-looking completed record whose outcome bytes are garbage.
    let fp = "a".repeat(32);
    let tok = "b".repeat(16);
    let far = "99999999999999";
    srv.cli(&[
        "hset", &key, "v", "1", "s", "c", "fp", &fp, "tok", &tok, "x", far, "o", "zz",
    ]);
    let mut r = req(k, b'a', t, LEASE);
    r.fingerprint = Fingerprint([b'a'; 32]);
    assert!(matches!(
        store.acquire(r).await,
        Err(StoreError::Corrupt(_))
    ));
}

fn evals(srv: &RedisServer) -> u64 {
    let stats = srv.cli(&["info", "commandstats"]);
    stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split(['=', ','])
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// Calls of commands that are neither run by the scripts nor by these tests' `redis-cli`: the
/// client's own top-level commands besides EVAL/EVALSHA (commandstats also counts the commands a
/// script runs, which cost no round trip).
fn other_commands(srv: &RedisServer) -> u64 {
    const INSIDE_SCRIPTS_OR_CLI: &[&str] = &[
        "evalsha",
        "eval",
        "type",
        "hset",
        "hdel",
        "hmget",
        "time",
        "pexpire",
        "publish",
        "del",
        "exists",
        "info",
        "config|resetstat",
    ];
    let stats = srv.cli(&["info", "commandstats"]);
    stats
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter(|l| {
            let name = l.split(':').next().unwrap_or_default();
            !INSIDE_SCRIPTS_OR_CLI.contains(&name)
        })
        .filter_map(|l| {
            l.split(['=', ','])
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

#[tokio::test]
async fn round_trips_fresh_two_replay_one() {
    // A server of its own, so other tests' commands do not count.
    let srv = RedisServer::builder()
        .config("maxmemory-policy noeviction")
        .start();
    let store = store_at(&srv.url()).await;
    // Warm the script cache (the first call of each script after a start is an EVAL).
    let warm = Token::random();
    store.acquire(req(id(20), 1, warm, LEASE)).await.unwrap();
    store
        .complete(&id(20), warm, &response(b"w"), TTL)
        .await
        .unwrap();

    srv.cli(&["config", "resetstat"]);
    let t = Token::random();
    assert!(matches!(
        store.acquire(req(id(21), 1, t, LEASE)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    store
        .complete(&id(21), t, &response(b"ok"), TTL)
        .await
        .unwrap();
    assert_eq!(evals(&srv), 2, "a fresh request is two script calls");
    assert_eq!(other_commands(&srv), 0, "and nothing else");

    srv.cli(&["config", "resetstat"]);
    assert!(matches!(
        store
            .acquire(req(id(21), 1, Token::random(), LEASE))
            .await
            .unwrap(),
        Acquire::Completed(_)
    ));
    assert_eq!(evals(&srv), 1, "a replay is one script call");
    assert_eq!(other_commands(&srv), 0);
}

#[tokio::test]
async fn kill_and_restart_keeps_completed_outcomes() {
    let mut srv = RedisServer::builder()
        .durable()
        .config("maxmemory-policy noeviction")
        .start();
    let store = RedisStore::builder(srv.url())
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let t = Token::random();
    let outcome = response(b"\x01\x02 precious \xfe");
    store.acquire(req(id(30), 1, t, LEASE)).await.unwrap();
    store.complete(&id(30), t, &outcome, TTL).await.unwrap();
    let before = match store.get(&id(30)).await.unwrap() {
        Some(Record::Completed(c)) => c,
        other => panic!("{other:?}"),
    };

    srv.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let got = store.acquire(req(id(31), 1, Token::random(), LEASE)).await;
        assert!(
            matches!(
                got,
                Err(StoreError::Unavailable(_) | StoreError::Timeout { .. })
            ),
            "{got:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "bounded by the timeout"
        );
        let got = store.get(&id(30)).await;
        assert!(got.is_err(), "{got:?}");
    }

    srv.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        match store.get(&id(30)).await {
            Ok(Some(Record::Completed(c))) => break c,
            Ok(other) => panic!("after restart: {other:?}"),
            Err(e) => {
                assert!(Instant::now() < deadline, "store did not come back: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(after.outcome.encode(), before.outcome.encode());
    assert_eq!(after, before);
    assert!(matches!(
        store.acquire(req(id(30), 1, Token::random(), LEASE)).await.unwrap(),
        Acquire::Completed(c) if c.outcome == outcome
    ));
}

#[tokio::test]
async fn readiness_requires_noeviction() {
    let store = store_at(&server().url()).await;
    store.readiness().await.unwrap();

    let lru = RedisServer::builder()
        .config("maxmemory-policy volatile-lru")
        .start();
    let store = store_at(&lru.url()).await;
    let err = store.readiness().await.unwrap_err();
    assert!(err.to_string().contains("volatile-lru"), "{err}");
    let allowed = RedisStore::builder(lru.url())
        .allow_eviction(true)
        .connect()
        .await
        .unwrap();
    allowed.readiness().await.unwrap();
}

#[tokio::test]
async fn out_of_memory_is_full() {
    let srv = RedisServer::builder()
        .config("maxmemory 2mb")
        .config("maxmemory-policy noeviction")
        .start();
    let store = store_at(&srv.url()).await;
    let big = Outcome::Response {
        head: ResponseHead::default(),
        body: Bytes::from(vec![7u8; 64 * 1024]),
    };
    let mut full = None;
    for n in 0..200u32 {
        let mut raw = [0u8; 32];
        raw[..4].copy_from_slice(&n.to_be_bytes());
        let t = Token::random();
        let k = RecordId(raw);
        match store.acquire(req(k, 1, t, LEASE)).await {
            Ok(Acquire::Acquired { .. }) => {}
            Err(e) => {
                full = Some(e);
                break;
            }
            Ok(other) => panic!("{other:?}"),
        }
        match store.complete(&k, t, &big, TTL).await {
            Ok(_) => {}
            Err(e) => {
                assert!(matches!(e, StoreError::Full(_)), "{e:?}");
            }
        }
    }
    assert!(
        matches!(full, Some(StoreError::Full(_))),
        "acquire never reported Full: {full:?}"
    );
}

async fn watch_wakes(store: &RedisStore) {
    let k = id(40);
    let a = Token::random();
    store.acquire(req(k, 1, a, LEASE)).await.unwrap();
    let mut w = store.watch(&k, 10).await.unwrap().expect("a watch");
    let waiter = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(3), w.changed())
            .await
            .is_ok()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    store
        .complete(&k, a, &response(b"done"), TTL)
        .await
        .unwrap();
    assert!(waiter.await.unwrap(), "completion did not wake the waiter");

    // Release wakes too.
    let k = id(41);
    store.acquire(req(k, 1, a, LEASE)).await.unwrap();
    let mut w = store.watch(&k, 10).await.unwrap().expect("a watch");
    store.release(&k, a).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(3), w.changed())
            .await
            .is_ok(),
        "release did not wake the waiter"
    );
    drop(w);
    // Bounded per key.
    let _one = store.watch(&k, 1).await.unwrap().expect("first");
    assert!(store.watch(&k, 1).await.unwrap().is_none());
}

#[tokio::test]
async fn watch_standalone() {
    let store = store_at(&server().url()).await;
    watch_wakes(&store).await;
}

#[tokio::test]
async fn watch_cluster() {
    let store = store_at(&cluster().url()).await;
    watch_wakes(&store).await;
}

#[tokio::test]
async fn watch_across_instances() {
    // Two stores (two "processes") on one Redis: a completion by one wakes the other's waiter.
    let url = server().url();
    let p = prefix();
    let a = RedisStore::builder(&url)
        .key_prefix(&p)
        .connect()
        .await
        .unwrap();
    let b = RedisStore::builder(&url)
        .key_prefix(&p)
        .connect()
        .await
        .unwrap();
    let k = id(42);
    let t = Token::random();
    a.acquire(req(k, 1, t, LEASE)).await.unwrap();
    let mut w = b.watch(&k, 10).await.unwrap().expect("a watch");
    a.complete(&k, t, &response(b"x"), TTL).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(3), w.changed())
            .await
            .is_ok()
    );
    assert!(matches!(
        b.acquire(req(k, 1, Token::random(), LEASE)).await.unwrap(),
        Acquire::Completed(_)
    ));
}

#[tokio::test]
async fn concurrent_acquires_one_winner() {
    let store = store_at(&server().url()).await;
    let k = id(50);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.acquire(req(k, 1, Token::random(), LEASE)).await.unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Acquire::Acquired { .. }) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn bad_spec_and_unreachable_server_are_unavailable() {
    assert!(matches!(
        RedisStore::connect("http://x").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        RedisStore::builder(server().url())
            .key_prefix("{app}:")
            .connect()
            .await,
        Err(StoreError::Unavailable(_))
    ));
    // A port nobody listens on (bound and released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let got = RedisStore::connect(format!("redis://127.0.0.1:{port}/")).await;
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn wait_replicas_missing_acks_is_maybe_applied_timeout() {
    let primary = RedisServer::start();
    // No replica: WAIT 1 cannot be satisfied.
    let store = RedisStore::builder(primary.url())
        .wait_replicas(1, Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let got = store.acquire(req(id(60), 1, Token::random(), LEASE)).await;
    assert_eq!(
        got,
        Err(StoreError::Timeout {
            maybe_applied: true
        })
    );

    // With a replica attached, the same write is acknowledged.
    let replica = RedisServer::builder()
        .config(format!("replicaof 127.0.0.1 {}", primary.port()))
        .start();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !replica
        .cli(&["info", "replication"])
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "replica did not sync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A WAIT bound a loaded machine meets (the first one failed fast on purpose).
    let store = RedisStore::builder(primary.url())
        .wait_replicas(1, Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let t = Token::random();
    assert!(matches!(
        store.acquire(req(id(61), 1, t, LEASE)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    assert_eq!(
        store
            .complete(&id(61), t, &response(b"r"), TTL)
            .await
            .unwrap(),
        Completion::Stored
    );
    // Replays write nothing, so they never wait on replicas.
    assert!(matches!(
        store
            .acquire(req(id(61), 1, Token::random(), LEASE))
            .await
            .unwrap(),
        Acquire::Completed(_)
    ));
    let key = store.key(&id(61));
    assert_eq!(
        replica.cli(&["hget", &key, "s"]).trim(),
        "c",
        "the replica has it"
    );
}

#[tokio::test]
async fn a_hung_server_times_out_within_the_bound() {
    let srv = RedisServer::start();
    let store = RedisStore::builder(srv.url())
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    srv.cli(&["client", "pause", "1500", "all"]);
    let started = Instant::now();
    let got = store.acquire(req(id(70), 1, Token::random(), LEASE)).await;
    assert_eq!(
        got,
        Err(StoreError::Timeout {
            maybe_applied: true
        })
    );
    assert!(started.elapsed() < Duration::from_millis(900));
    let got = store.get(&id(70)).await;
    assert_eq!(
        got,
        Err(StoreError::Timeout {
            maybe_applied: false
        })
    );
    // After the pause the store works again, and the retried acquire with a fresh token sees
    // whatever the timed-out one did.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.acquire(req(id(71), 1, Token::random(), LEASE)).await {
            Ok(Acquire::Acquired { .. }) => break,
            other => {
                assert!(Instant::now() < deadline, "did not recover: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn waiters_are_woken_after_the_subscriber_reconnects() {
    let mut srv = RedisServer::builder().durable().start();
    let store = RedisStore::builder(srv.url())
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let k = id(80);
    let a = Token::random();
    store
        .acquire(req(k, 1, a, Duration::from_secs(30)))
        .await
        .unwrap();
    let mut w = store.watch(&k, 10).await.unwrap().expect("a watch");
    srv.kill();
    srv.restart();
    // The resubscription wakes every waiter to re-read (a change may have been missed).
    assert!(
        tokio::time::timeout(Duration::from_secs(8), w.changed())
            .await
            .is_ok(),
        "no wake-up after reconnect"
    );
    // And the subscription is live again: a completion wakes the waiter.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.complete(&k, a, &response(b"after"), TTL).await {
            Ok(Completion::Stored) => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "complete after restart: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(3), w.changed())
            .await
            .is_ok(),
        "completion after reconnect did not wake the waiter"
    );
}

/// The first `watch` after an outage subscribes, instead of failing with the error of the
/// subscriber connection's last (failed) reconnect: that failure gave the first duplicate after
/// every Redis restart a 409 instead of a wait.
#[tokio::test]
async fn the_first_watch_after_a_restart_subscribes() {
    let mut srv = RedisServer::builder().durable().start();
    let store = RedisStore::builder(srv.url())
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    // Opens the subscriber connection; nobody waits any more when Redis goes away.
    drop(store.watch(&id(81), 10).await.unwrap().expect("a watch"));
    srv.kill();
    // Long enough for the subscriber connection's reconnect attempts to fail.
    tokio::time::sleep(Duration::from_millis(500)).await;
    srv.restart();
    let first = store.watch(&id(82), 10).await;
    assert!(
        matches!(first, Ok(Some(_))),
        "first watch after the restart: {:?}",
        first.as_ref().map(Option::is_some)
    );
    // And the subscription is live: a release of the key wakes the waiter.
    let mut w = first.unwrap().unwrap();
    let t = Token::random();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.acquire(req(id(82), 1, t, LEASE)).await {
            Ok(Acquire::Acquired { .. }) => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "acquire after restart: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    store.release(&id(82), t).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(3), w.changed())
            .await
            .is_ok(),
        "release after the restart did not wake the waiter"
    );
}

/// A store dropped while Redis is down leaves no task behind, even while a waiter it handed out
/// is still held: before, the subscriber's resync task held the subscriber and retried for as
/// long as Redis stayed down.
#[tokio::test]
async fn a_store_dropped_during_an_outage_leaves_no_task_behind() {
    let runtime = tokio::runtime::Handle::current().metrics();
    let before = runtime.num_alive_tasks();
    let mut srv = RedisServer::builder().durable().start();
    let store = RedisStore::builder(srv.url())
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let w = store.watch(&id(83), 10).await.unwrap().expect("a watch");
    srv.kill();
    // Let the subscriber see the disconnection and start resyncing against the dead port.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(store);
    // The sweep task notices at its next tick (5 s); an attempt under way ends at its timeout.
    let deadline = Instant::now() + Duration::from_secs(8);
    while runtime.num_alive_tasks() > before {
        assert!(
            Instant::now() < deadline,
            "{} tasks still alive for a dropped store",
            runtime.num_alive_tasks() - before
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(w);
}

#[tokio::test]
async fn rediss_uses_rustls_and_fails_cleanly_on_a_plain_server() {
    // The TLS handshake against a plain-text server fails: an error, not a panic about a missing
    // crypto provider (rustls is built with ring only).
    let srv = server();
    let got = RedisStore::builder(format!("rediss://127.0.0.1:{}/", srv.port()))
        .timeout(Duration::from_millis(500))
        .connect()
        .await;
    assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
}

#[tokio::test]
async fn cluster_node_killed_and_restarted() {
    let mut c = RedisCluster::builder(3)
        .config("appendonly yes")
        .config("appendfsync always")
        .start();
    let store = RedisStore::builder(c.url())
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let ids: Vec<RecordId> = (100..112).map(id).collect();
    for k in &ids {
        let t = Token::random();
        store.acquire(req(*k, 1, t, LEASE)).await.unwrap();
        store.complete(k, t, &response(b"kept"), TTL).await.unwrap();
    }
    c.nodes_mut()[0].kill();
    let mut failed = 0;
    for k in &ids {
        let started = Instant::now();
        match store.acquire(req(*k, 1, Token::random(), LEASE)).await {
            Ok(Acquire::Completed(_)) => {}
            Err(StoreError::Unavailable(_) | StoreError::Timeout { .. }) => failed += 1,
            other => panic!("with a node down: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_millis(1500), "bounded");
    }
    assert!(failed > 0, "some of 12 ids live on the killed node");
    c.nodes_mut()[0].restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    for k in &ids {
        loop {
            match store.acquire(req(*k, 1, Token::random(), LEASE)).await {
                Ok(Acquire::Completed(done)) => {
                    assert_eq!(done.outcome, response(b"kept"));
                    break;
                }
                other => {
                    assert!(Instant::now() < deadline, "no recovery: {other:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A Cluster node's connection gone dark (no FIN, no RST) is given up within the
/// dead-connection timeout and replaced, as a standalone server's is: the keys on that node
/// answer again in seconds, the other nodes' keys answer throughout, and no record is lost.
#[tokio::test]
async fn a_cluster_node_connection_gone_dark_is_replaced() {
    let c = RedisCluster::start(3);
    let store = darkening_store(&c.url()).await;
    let ids: Vec<RecordId> = (120..132).map(id).collect();
    for k in &ids {
        let t = Token::random();
        store.acquire(req(*k, 1, t, LEASE)).await.unwrap();
        store.complete(k, t, &response(b"kept"), TTL).await.unwrap();
    }
    let hole = idemgate_store_tests::net::Blackhole::connections_to(c.ports()[0]);
    assert!(!hole.local_ports().is_empty(), "no connection to darken");

    let went_dark = Instant::now();
    let mut failed = 0;
    let mut ever_failed = std::collections::HashSet::new();
    let mut pending = ids.clone();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for k in pending {
            match store.acquire(req(k, 1, Token::random(), LEASE)).await {
                Ok(Acquire::Completed(done)) => assert_eq!(done.outcome, response(b"kept")),
                Ok(other) => panic!("a completed record answered {other:?}"),
                Err(e) => {
                    failed += 1;
                    ever_failed.insert(k);
                    assert!(
                        went_dark.elapsed() < Duration::from_secs(15),
                        "still failing {:?} after the connection went dark: {e}",
                        went_dark.elapsed()
                    );
                    still.push(k);
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(failed > 0, "no operation met the dark connection");
    assert!(
        ever_failed.len() < ids.len(),
        "the other nodes' keys failed too: {} of {}",
        ever_failed.len(),
        ids.len()
    );
    drop(hole);
}

#[tokio::test]
async fn readiness_checks_every_cluster_master() {
    let c = RedisCluster::start(3);
    let store = store_at(&c.url()).await;
    store.readiness().await.unwrap();
    c.nodes()[2].cli(&["config", "set", "maxmemory-policy", "allkeys-lru"]);
    let err = store.readiness().await.unwrap_err();
    assert!(err.to_string().contains("allkeys-lru"), "{err}");
}

#[tokio::test]
async fn readiness_explains_a_missing_config_permission() {
    let srv = RedisServer::start();
    let out = srv.cli(&[
        "acl", "setuser", "app", "on", ">pw", "~*", "&*", "+@all", "-config",
    ]);
    assert!(out.contains("OK"), "{out}");
    let store = RedisStore::connect(format!("redis://app:pw@127.0.0.1:{}/", srv.port()))
        .await
        .unwrap();
    // The user can work with records...
    let t = Token::random();
    assert!(matches!(
        store.acquire(req(id(90), 1, t, LEASE)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    // ...but readiness cannot verify the eviction policy, and says why.
    let err = store.readiness().await.unwrap_err();
    assert!(
        err.to_string().contains("CONFIG GET is not permitted"),
        "{err}"
    );
}

/// A store for the dark-connection tests: operations time out after 300 ms, a connection
/// gone dark is given up after 2 s.
async fn darkening_store(url: &str) -> RedisStore {
    RedisStore::builder(url)
        .key_prefix(prefix())
        .timeout(Duration::from_millis(300))
        .dead_connection_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect")
}

/// A connection that goes dark (its packets dropped both ways, as when a NAT or load balancer
/// forgets it: no FIN, no RST) is given up within the dead-connection timeout and replaced,
/// so the store answers again in seconds instead of after the kernel's retransmissions give
/// up (~15 minutes). On the current-thread runtime every operation uses one connection, the
/// one made dark.
#[tokio::test]
async fn a_connection_gone_dark_is_replaced() {
    let srv = RedisServer::builder()
        .config("maxmemory-policy noeviction")
        .start();
    let store = darkening_store(&srv.url()).await;
    let t = Token::random();
    assert!(matches!(
        store
            .acquire(req(id(1), 1, t, Duration::from_secs(30)))
            .await
            .unwrap(),
        Acquire::Acquired { .. }
    ));
    let hole = idemgate_store_tests::net::Blackhole::connections_to(srv.port());
    assert!(!hole.local_ports().is_empty(), "no connection to darken");

    let went_dark = Instant::now();
    let mut failed = 0;
    let answered = loop {
        match store
            .acquire(req(id(2), 1, Token::random(), Duration::from_secs(30)))
            .await
        {
            Ok(a) => break a,
            Err(e) => {
                failed += 1;
                assert!(
                    went_dark.elapsed() < Duration::from_secs(15),
                    "still failing {:?} after the connection went dark: {e}",
                    went_dark.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(matches!(answered, Acquire::Acquired { .. }), "{answered:?}");
    assert!(failed > 0, "no operation met the dark connection");
    // The record from before is intact.
    assert!(matches!(
        store.get(&id(1)).await.unwrap(),
        Some(Record::InFlight(_))
    ));
    drop(hole);
}

/// The wait-mode subscriber's connection gone dark while idle is found by keep-alive probes
/// and replaced; the resubscription wakes the waiter (the change published meanwhile is lost
/// with the dark connection) long before its lease's end.
#[tokio::test]
async fn a_subscriber_connection_gone_dark_is_replaced_and_wakes_waiters() {
    let srv = RedisServer::builder()
        .config("maxmemory-policy noeviction")
        .start();
    let p = prefix();
    let connect = || {
        RedisStore::builder(srv.url())
            .key_prefix(&p)
            .timeout(Duration::from_millis(300))
            .dead_connection_timeout(Duration::from_secs(2))
            .connect()
    };
    let waiter = connect().await.unwrap();
    let (k, t) = (id(60), Token::random());
    assert!(matches!(
        waiter
            .acquire(req(k, 1, t, Duration::from_secs(60)))
            .await
            .unwrap(),
        Acquire::Acquired { .. }
    ));
    let mut w = waiter.watch(&k, 10).await.unwrap().expect("a watch");
    let hole = idemgate_store_tests::net::Blackhole::connections_to(srv.port());
    // Another instance, on connections made after the blackhole, completes the record.
    let worker = connect().await.unwrap();
    assert_eq!(
        worker.complete(&k, t, &response(b"x"), TTL).await.unwrap(),
        Completion::Stored
    );
    tokio::time::timeout(Duration::from_secs(10), w.changed())
        .await
        .expect("the waiter is woken once its dark connection is replaced");
    drop(hole);
}
