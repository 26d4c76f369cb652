//! Many `idemgate serve` processes on one PostgreSQL database (SPEC §4 "PostgreSQL", §5, §7),
//! all real: the binary, a PostgreSQL server started here, and a counting upstream.
//!
//! - duplicates of 30 keys spread round-robin over three proxies (`--concurrent conflict`)
//!   execute each key once;
//! - with an upstream that takes three leases and one proxy SIGKILLed mid-call, no key ever
//!   executes twice: the survivors' keys replay, the dead proxy's keys become outcome-unknown
//!   once their lease lapses (by the database clock);
//! - `--store-pool-size` bounds the connections one proxy opens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idemgate_store_tests::servers::postgres::PostgresServer;
use support::held::logs;
use support::{Client, Proxy, Req, Resp, Upstream};

/// Short, so lapses happen within a test; renewed every 200 ms.
const LEASE: &str = "600ms";

/// For the storm, where no lease should lapse: its 300 concurrent calls on two shared cores can
/// hold up a 200 ms renewal long enough for a 600 ms lease to lapse, and a lapsed key is
/// rightly outcome-unknown, which is not what the storm is about.
const STORM_LEASE: &str = "5s";

/// A database of its own on the shared server.
fn database(prefix: &str) -> String {
    tokio::task::block_in_place(|| PostgresServer::shared().create_unique_database(prefix))
}

/// Starts `n` proxies on one store (concurrently: each takes a moment to come up; they race
/// the schema migration, which is advisory-locked).
async fn proxies(n: usize, upstream: &Upstream, store: &str, lease: &str) -> Vec<Proxy> {
    let starts = (0..n).map(|_| {
        Proxy::builder(upstream.url())
            .store(store)
            .args(["--lease", lease, "--concurrent", "conflict"])
            .start()
    });
    futures_util::future::join_all(starts).await
}

const KEYS: usize = 30;
const DUPLICATES: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_database_execute_each_key_once() {
    let store = database("proxystorm");
    let up = Upstream::start().await;
    let ps = proxies(3, &up, &store, STORM_LEASE).await;
    let cs: Vec<Client> = ps.iter().map(|p| Client::new(p.addr())).collect();
    let req = |k: usize| {
        Req::post("/orders")
            .key(&format!("pg-{k}"))
            .header("x-test-delay-ms", "300")
    };

    // Duplicate d of key k goes to proxy (k + d) % 3: every key meets every instance.
    let barrier = Arc::new(tokio::sync::Barrier::new(KEYS * DUPLICATES));
    let mut tasks = Vec::new();
    for d in 0..DUPLICATES {
        for k in 0..KEYS {
            let proxy = (k + d) % 3;
            let (c, b, r) = (cs[proxy].clone(), barrier.clone(), req(k));
            tasks.push(tokio::spawn(async move {
                b.wait().await;
                (k, proxy, c.send(r).await)
            }));
        }
    }
    let answers: Vec<(usize, usize, Resp)> = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("the storm finished within 60 s")
    .into_iter()
    .map(|t| t.expect("request task"))
    .collect();

    let counts = up.counts();
    for k in 0..KEYS {
        let n = counts.get(&format!("pg-{k}")).copied().unwrap_or(0);
        assert_eq!(n, 1, "pg-{k} executed {n} times; all: {counts:?}");
    }
    assert_eq!(up.total(), KEYS as u64);
    let mut originals: HashMap<usize, (usize, Resp)> = HashMap::new();
    let mut cross_instance_conflicts = 0;
    for (k, proxy, r) in &answers {
        if r.status == 201 && !r.replayed() {
            assert!(
                originals.insert(*k, (*proxy, r.clone())).is_none(),
                "pg-{k}: two unreplayed 201s"
            );
        }
    }
    assert_eq!(originals.len(), KEYS, "keys without an original 201");
    for (k, proxy, r) in &answers {
        match r.status {
            201 => assert_eq!(r.body, originals[k].1.body, "pg-{k} via proxy {proxy}"),
            409 => {
                assert_eq!(r.problem().as_deref(), Some("request-in-flight"));
                assert!(r.header("retry-after").is_some());
                if *proxy != originals[k].0 {
                    cross_instance_conflicts += 1;
                }
            }
            _ => panic!("pg-{k} via proxy {proxy}: {}\n{}", r.summary(), logs(&ps)),
        }
    }
    assert!(
        cross_instance_conflicts > 0,
        "no duplicate on another instance saw the key in flight"
    );
    // Afterwards every instance replays every key with the original body.
    for k in 0..KEYS {
        for (p, c) in cs.iter().enumerate() {
            let r = c.send(req(k)).await;
            assert_eq!(r.status, 201, "pg-{k} via proxy {p}: {}", r.summary());
            assert!(r.replayed());
            assert_eq!(r.body, originals[&k].1.body);
        }
    }
    assert_eq!(up.total(), KEYS as u64, "replays executed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_call_never_lets_a_key_execute_twice() {
    let store = database("proxykill");
    let up = Upstream::start().await;
    let mut ps = proxies(3, &up, &store, LEASE).await;
    support::held::holder_killed_mid_call(&up, &mut ps).await;
}

/// The server's connections to the database `store` names.
fn connections_to(store: &str) -> usize {
    let db = store.rsplit('/').next().expect("a database URL");
    let n = tokio::task::block_in_place(|| {
        PostgresServer::shared().psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
                 AND pid <> pg_backend_pid()"
            ),
        )
    });
    n.trim().parse().expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_pool_size_bounds_the_connections_a_proxy_opens() {
    const CALLS: usize = 64;
    let store = database("proxypool");
    let up = Upstream::start().await;
    let p = Proxy::builder(up.url())
        .store(&store)
        .args(["--store-pool-size", "2"])
        .start()
        .await;
    let c = Client::new(p.addr());

    // Every call's store operations at once: with the default pool (10) they open most of it.
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLS));
    let calls = (0..CALLS).map(|k| {
        let (c, b) = (c.clone(), barrier.clone());
        tokio::spawn(async move {
            b.wait().await;
            c.send(Req::post("/orders").key(&format!("pool-{k}"))).await
        })
    });
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("the calls finished within 30 s");
    for a in answers {
        let r = a.expect("the call's task");
        assert_eq!(r.status, 201, "{}", r.summary());
    }
    assert_eq!(up.total(), CALLS as u64, "each key executed once");
    // Pooled connections stay open while idle: the count is the most the pool ever held, and
    // one more for wait mode's LISTEN.
    let open = connections_to(&store);
    assert!(
        (1..=3).contains(&open),
        "{open} connections to the database with --store-pool-size 2"
    );
}
