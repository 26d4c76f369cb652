//! Many `idemgate serve` processes on one PostgreSQL database (SPEC §4 "PostgreSQL", §5, §7),
//! all real: the binary, a PostgreSQL server started here, and a counting upstream.
//!
//! - duplicates of 30 keys spread round-robin over three proxies (`--concurrent conflict`)
//!   execute each key once;
//! - with an upstream that takes three leases and one proxy SIGKILLed mid-call, no key ever
//!   executes twice: the survivors' keys replay, the dead proxy's keys become outcome-unknown
//!   once their lease lapses (by the database clock).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idemgate_store_tests::servers::postgres::PostgresServer;
use support::{Client, Proxy, Req, Resp, Upstream, eventually};
use tokio::time::Instant;

/// Short, so lapses happen within a test; renewed every 200 ms.
const LEASE: &str = "600ms";

/// A database of its own on the shared server.
fn database(prefix: &str) -> String {
    tokio::task::block_in_place(|| PostgresServer::shared().create_unique_database(prefix))
}

/// Starts `n` proxies on one store (concurrently: each takes a moment to come up; they race
/// the schema migration, which is advisory-locked).
async fn proxies(n: usize, upstream: &Upstream, store: &str) -> Vec<Proxy> {
    let starts = (0..n).map(|_| {
        Proxy::builder(upstream.url())
            .store(store)
            .args(["--lease", LEASE, "--concurrent", "conflict"])
            .start()
    });
    futures_util::future::join_all(starts).await
}

fn logs(proxies: &[Proxy]) -> String {
    proxies
        .iter()
        .enumerate()
        .map(|(i, p)| format!("--- proxy {i} ---\n{}", p.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

const KEYS: usize = 30;
const DUPLICATES: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_database_execute_each_key_once() {
    let store = database("proxystorm");
    let up = Upstream::start().await;
    let ps = proxies(3, &up, &store).await;
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

/// Keys held by the proxy that dies are the multiples of 3.
const HELD: usize = 12;

fn held_req(k: usize) -> Req {
    // Three leases long: the lease must be renewed twice before the answer.
    Req::post("/orders")
        .key(&format!("held-{k}"))
        .header("x-test-delay-ms", "1800")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_call_never_lets_a_key_execute_twice() {
    let store = database("proxykill");
    let up = Upstream::start().await;
    let mut ps = proxies(3, &up, &store).await;
    let cs: Vec<Client> = ps.iter().map(|p| Client::new(p.addr())).collect();

    // Key k is executed through proxy k % 3.
    let originals: Vec<_> = (0..HELD)
        .map(|k| {
            let c = cs[k % 3].clone();
            tokio::spawn(async move { c.try_send(held_req(k)).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || {
            (0..HELD).all(|k| up.executions(&format!("held-{k}")) == 1)
        })
        .await,
        "not every key reached the upstream: {:?}",
        up.counts()
    );
    // Duplicates through every instance while the calls run: all refused.
    let dups = futures_util::future::join_all((0..HELD).flat_map(|k| {
        cs.iter()
            .cloned()
            .map(move |c| async move { (k, c.send(held_req(k)).await) })
    }))
    .await;
    for (k, r) in &dups {
        assert_eq!(r.status, 409, "held-{k} while in flight: {}", r.summary());
    }

    ps[0].kill9();
    let killed_at = Instant::now();

    // Retries through the survivors, as clients would: 409 until settled.
    let retries = futures_util::future::join_all((0..HELD).map(|k| {
        let c = cs[1 + k % 2].clone();
        async move {
            let r = c
                .send_until_settled(held_req(k), Duration::from_secs(8))
                .await;
            (k, r, killed_at.elapsed())
        }
    }))
    .await;
    let mut first_answers = HashMap::new();
    for (k, r, after) in retries {
        if k % 3 == 0 {
            assert_eq!(
                r.status,
                502,
                "held-{k}, holder killed: {}\n{}",
                r.summary(),
                logs(&ps)
            );
            assert_eq!(r.problem().as_deref(), Some("outcome-unknown"));
            println!("held-{k}: outcome-unknown {after:?} after the kill");
        } else {
            assert_eq!(r.status, 201, "held-{k}: {}\n{}", r.summary(), logs(&ps));
            assert!(r.replayed());
        }
        first_answers.insert(k, r);
    }
    for (k, original) in originals.into_iter().enumerate() {
        let original = original.await.expect("original task");
        if k % 3 == 0 {
            assert!(original.is_err(), "held-{k} answered by a killed proxy");
        } else {
            let original = original.unwrap_or_else(|e| panic!("held-{k}: {e}"));
            assert_eq!(original.status, 201, "{}", original.summary());
            assert!(!original.replayed());
            assert_eq!(original.body, first_answers[&k].body, "held-{k}");
        }
    }
    // Settled for good: the same answer again through both survivors, and still one
    // execution per key.
    for k in 0..HELD {
        for c in &cs[1..] {
            let r = c.send(held_req(k)).await;
            assert_eq!(r.status, first_answers[&k].status, "held-{k}");
            assert_eq!(r.body, first_answers[&k].body, "held-{k}");
        }
        assert_eq!(up.executions(&format!("held-{k}")), 1, "held-{k}");
    }
    assert_eq!(up.total(), HELD as u64);
}
