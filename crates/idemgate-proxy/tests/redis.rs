//! Many `idemgate serve` processes on one Redis or one Redis Cluster (SPEC §4 "Redis", §5, §7),
//! all real: the binary, `redis-server` processes started here, and a counting upstream.
//!
//! - duplicates of 30 keys spread round-robin over three proxies execute each key once, in
//!   conflict mode and in wait mode (where a waiter on one instance is woken by the holder's
//!   completion on another, through pub/sub);
//! - a proxy killed while it holds keys never lets them execute twice: once the lease lapses,
//!   retries through the survivors get 502 outcome-unknown;
//! - Redis killed under load: 503 `store-unavailable` and nothing executed while it is down;
//!   after its restart (AOF `appendfsync always`) every outcome completed before the kill
//!   replays byte for byte;
//! - `/readyz` refuses an eviction policy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use idemgate_store_tests::servers::redis::{RedisCluster, RedisServer};
use support::held::{HELD, clients, held_req, logs, start_held_calls};
use support::{Client, Proxy, Req, Resp, Upstream, eventually};
use tokio::time::Instant;

/// Short, so lapses happen within a test; renewed every 200 ms.
const LEASE: &str = "600ms";

fn standalone() -> RedisServer {
    tokio::task::block_in_place(RedisServer::start)
}

fn cluster() -> RedisCluster {
    tokio::task::block_in_place(|| RedisCluster::start(3))
}

/// Starts `n` proxies on one store (concurrently: each takes a moment to come up).
async fn proxies(
    n: usize,
    upstream: &Upstream,
    store: &str,
    lease: &str,
    extra: &[&str],
) -> Vec<Proxy> {
    let starts = (0..n).map(|_| {
        Proxy::builder(upstream.url())
            .store(store)
            .args(["--lease", lease])
            .args(extra.iter().copied())
            .start()
    });
    futures_util::future::join_all(starts).await
}

// ---------------------------------------------------------------------------------------------
// 1 and 2: duplicate storms over three instances
// ---------------------------------------------------------------------------------------------

const KEYS: usize = 30;
const DUPLICATES: usize = 10;

/// One answer of a storm: which key, through which proxy.
struct Answer {
    key: usize,
    proxy: usize,
    resp: Resp,
}

fn storm_req(prefix: &str, k: usize) -> Req {
    Req::post("/orders")
        .key(&format!("{prefix}-{k}"))
        .header("x-test-delay-ms", "300")
}

/// All `KEYS × DUPLICATES` requests at once; duplicate `d` of key `k` goes to proxy
/// `(k + d) % 3`, so every key meets every instance.
async fn storm(clients: &[Client], prefix: &str) -> Vec<Answer> {
    let barrier = Arc::new(tokio::sync::Barrier::new(KEYS * DUPLICATES));
    let mut tasks = Vec::with_capacity(KEYS * DUPLICATES);
    for d in 0..DUPLICATES {
        for k in 0..KEYS {
            let proxy = (k + d) % clients.len();
            let client = clients[proxy].clone();
            let barrier = barrier.clone();
            let req = storm_req(prefix, k);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                Answer {
                    key: k,
                    proxy,
                    resp: client.send(req).await,
                }
            }));
        }
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("the storm finished within 60 s")
    .into_iter()
    .map(|t| t.expect("request task"))
    .collect()
}

/// Every key executed exactly once; per key exactly one unreplayed 201 and every 201 carries
/// its body. Returns, per key, the proxy that executed it and the original response.
fn assert_once(up: &Upstream, prefix: &str, answers: &[Answer]) -> HashMap<usize, (usize, Resp)> {
    let counts = up.counts();
    for k in 0..KEYS {
        let n = counts.get(&format!("{prefix}-{k}")).copied().unwrap_or(0);
        assert_eq!(n, 1, "{prefix}-{k} executed {n} times; all: {counts:?}");
    }
    assert_eq!(up.total(), KEYS as u64, "{counts:?}");
    let mut originals = HashMap::new();
    for a in answers
        .iter()
        .filter(|a| a.resp.status == 201 && !a.resp.replayed())
    {
        let before = originals.insert(a.key, (a.proxy, a.resp.clone()));
        assert!(before.is_none(), "key {}: two unreplayed 201s", a.key);
    }
    assert_eq!(originals.len(), KEYS, "keys without an original 201");
    for a in answers.iter().filter(|a| a.resp.status == 201) {
        assert_eq!(
            a.resp.body, originals[&a.key].1.body,
            "key {}: replay through proxy {} differs",
            a.key, a.proxy
        );
    }
    originals
}

/// After the storm, every instance replays every key with the original body.
async fn assert_every_instance_replays(
    clients: &[Client],
    prefix: &str,
    originals: &HashMap<usize, (usize, Resp)>,
) {
    for k in 0..KEYS {
        for (p, c) in clients.iter().enumerate() {
            let r = c.send(storm_req(prefix, k)).await;
            assert_eq!(r.status, 201, "key {k} via proxy {p}: {}", r.summary());
            assert!(r.replayed(), "key {k} via proxy {p}: {}", r.summary());
            assert_eq!(r.body, originals[&k].1.body, "key {k} via proxy {p}");
        }
    }
}

async fn storm_conflict_mode(store: &str) {
    let up = Upstream::start().await;
    // No lease should lapse here: a lapsed key is rightly outcome-unknown, which is not what
    // the storm is about, and its 300 concurrent calls on two shared cores can hold up a
    // renewal of the short test lease.
    let ps = proxies(3, &up, store, "5s", &["--concurrent", "conflict"]).await;
    let cs = clients(&ps);
    let answers = storm(&cs, "c").await;
    let originals = assert_once(&up, "c", &answers);
    let mut cross_instance_conflicts = 0;
    for a in &answers {
        match a.resp.status {
            201 => {}
            409 => {
                assert_eq!(
                    a.resp.problem().as_deref(),
                    Some("request-in-flight"),
                    "{}",
                    a.resp.summary()
                );
                assert!(
                    a.resp.header("retry-after").is_some(),
                    "{}",
                    a.resp.summary()
                );
                if a.proxy != originals[&a.key].0 {
                    cross_instance_conflicts += 1;
                }
            }
            _ => panic!(
                "key {} via proxy {}: {}\n{}",
                a.key,
                a.proxy,
                a.resp.summary(),
                logs(&ps)
            ),
        }
    }
    // Each key had duplicates on the two instances that did not execute it, all sent while
    // the 300 ms call ran: they can only have been refused through the shared store.
    assert!(
        cross_instance_conflicts > 0,
        "no duplicate on another instance saw the key in flight"
    );
    assert_every_instance_replays(&cs, "c", &originals).await;
    println!("conflict mode on {store}: {cross_instance_conflicts} cross-instance 409s");
}

async fn storm_wait_mode(store: &str) {
    let up = Upstream::start().await;
    // A 1 s lease, so a waiter that missed the notification would visibly sleep until the
    // lease re-check (at least 2/3 s after it read the record) — see `wake_latency`.
    let ps = proxies(
        3,
        &up,
        store,
        "1s",
        &["--concurrent", "wait", "--wait-max", "10s"],
    )
    .await;
    let cs = clients(&ps);
    let answers = storm(&cs, "w").await;
    for a in &answers {
        assert_eq!(
            a.resp.status,
            201,
            "wait mode, key {} via proxy {}: {}\n{}",
            a.key,
            a.proxy,
            a.resp.summary(),
            logs(&ps)
        );
    }
    let originals = assert_once(&up, "w", &answers);
    let cross = answers
        .iter()
        .filter(|a| a.resp.replayed() && a.proxy != originals[&a.key].0)
        .count();
    assert!(cross > 0, "no replay was served by another instance");
    assert_every_instance_replays(&cs, "w", &originals).await;

    let gaps = wake_latency(&up, &cs, &names("wake", 5)).await;
    let median = gaps[gaps.len() / 2];
    println!("wait mode on {store}: waiter answered {gaps:?} after the holder");
    assert!(
        median < Duration::from_millis(300),
        "waiters on other instances answered {gaps:?} after the holder: not woken by the \
         completion (pub/sub) but by the lease re-check\n{}",
        logs(&ps)
    );
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// For each key: the holder executes through proxy 0 (400 ms upstream call); once the call
/// runs, a duplicate through proxy 1 or 2 waits. Returns, sorted, how long after the holder's
/// response each waiter got its replay. Woken by the completion's notification that is a few
/// milliseconds; without it the waiter would sleep until its lease re-check, at least
/// 1 s × 2/3 after its read, i.e. more than 600 ms after the holder's answer.
async fn wake_latency(up: &Upstream, cs: &[Client], keys: &[String]) -> Vec<Duration> {
    let mut gaps = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let key = key.clone();
        let req = Req::post("/orders")
            .key(&key)
            .header("x-test-delay-ms", "400");
        let holder = {
            let (c, req) = (cs[0].clone(), req.clone());
            tokio::spawn(async move { (c.send(req).await, Instant::now()) })
        };
        assert!(
            eventually(Duration::from_secs(5), || up.executions(&key) == 1).await,
            "{key} never reached the upstream"
        );
        let waiter = {
            let (c, req) = (cs[1 + i % 2].clone(), req.clone());
            tokio::spawn(async move { (c.send(req).await, Instant::now()) })
        };
        let (h, h_at) = holder.await.expect("holder task");
        let (w, w_at) = waiter.await.expect("waiter task");
        assert_eq!(h.status, 201, "{}", h.summary());
        assert!(!h.replayed());
        assert_eq!(w.status, 201, "waiter of {key}: {}", w.summary());
        assert!(w.replayed(), "waiter of {key}: {}", w.summary());
        assert_eq!(w.body, h.body);
        assert_eq!(up.executions(&key), 1);
        gaps.push(w_at.saturating_duration_since(h_at));
    }
    gaps.sort();
    gaps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_standalone_conflict_mode_execute_each_key_once() {
    let redis = standalone();
    storm_conflict_mode(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_standalone_wait_mode_all_get_the_outcome_woken_across_instances() {
    let redis = standalone();
    storm_wait_mode(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_cluster_conflict_mode_execute_each_key_once() {
    let cluster = cluster();
    storm_conflict_mode(&cluster.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_cluster_wait_mode_all_get_the_outcome_woken_across_instances() {
    let cluster = cluster();
    storm_wait_mode(&cluster.url()).await;
}

// ---------------------------------------------------------------------------------------------
// 3: a holder killed mid-call
// ---------------------------------------------------------------------------------------------

async fn holder_killed_mid_call(store: &str) {
    let up = Upstream::start().await;
    let mut ps = proxies(3, &up, store, LEASE, &["--concurrent", "conflict"]).await;
    support::held::holder_killed_mid_call(&up, &mut ps).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_holder_killed_mid_call_never_executes_twice() {
    let redis = standalone();
    holder_killed_mid_call(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_holder_killed_mid_call_never_executes_twice() {
    let cluster = cluster();
    holder_killed_mid_call(&cluster.url()).await;
}

/// Wait mode: duplicates waiting on the survivors for keys whose holder died are woken when the
/// lease lapses and get outcome-unknown, never a second execution; the others get the replay.
async fn holder_killed_while_others_wait(store: &str) {
    let up = Upstream::start().await;
    let mut ps = proxies(
        3,
        &up,
        store,
        LEASE,
        &["--concurrent", "wait", "--wait-max", "10s"],
    )
    .await;
    let cs = clients(&ps);
    let originals = start_held_calls(&up, &cs).await;
    // Two waiters per key, one on each survivor.
    let waiters: Vec<_> = (0..HELD)
        .flat_map(|k| [(k, cs[1].clone()), (k, cs[2].clone())])
        .map(|(k, c)| tokio::spawn(async move { (k, c.send(held_req(k)).await) }))
        .collect();
    // Let them subscribe before the holder dies.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ps[0].kill9();
    let killed_at = Instant::now();
    for w in waiters {
        let (k, r) = w.await.expect("waiter task");
        if k % 3 == 0 {
            assert_eq!(
                r.status,
                502,
                "held-{k}, holder killed: {}\n{}",
                r.summary(),
                logs(&ps)
            );
            assert_eq!(r.problem().as_deref(), Some("outcome-unknown"));
        } else {
            assert_eq!(r.status, 201, "held-{k}: {}\n{}", r.summary(), logs(&ps));
            assert!(r.replayed());
        }
    }
    println!(
        "wait mode: every waiter answered {:?} after the kill",
        killed_at.elapsed()
    );
    for (k, original) in originals.into_iter().enumerate() {
        let original = original.await.expect("original task");
        assert_eq!(k % 3 == 0, original.is_err(), "held-{k}: {original:?}");
    }
    let counts = up.counts();
    for k in 0..HELD {
        assert_eq!(counts.get(&format!("held-{k}")), Some(&1), "{counts:?}");
    }
    assert_eq!(up.total(), HELD as u64, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_wait_mode_holder_killed_waiters_get_outcome_unknown() {
    let redis = standalone();
    holder_killed_while_others_wait(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wait_mode_holder_killed_waiters_get_outcome_unknown() {
    let cluster = cluster();
    holder_killed_while_others_wait(&cluster.url()).await;
}

/// Polls until a fresh key (the next of `keys`) gets 201 through every client (bounded).
async fn until_served(cs: &[Client], keys: &mut impl Iterator<Item = String>, within: Duration) {
    let deadline = Instant::now() + within;
    for (p, c) in cs.iter().enumerate() {
        loop {
            let key = keys.next().expect("keys enough");
            let r = c.send(Req::post("/orders").key(&key)).await;
            if r.status == 201 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "proxy {p} still answers {}",
                r.summary()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The pub/sub connections of every instance come back with Redis: after a restart, waiters
/// on other instances are again woken by the completion, not by the lease re-check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_wakes_across_instances_again_after_a_redis_restart() {
    let mut redis = tokio::task::block_in_place(|| RedisServer::builder().durable().start());
    let up = Upstream::start().await;
    let ps = proxies(
        3,
        &up,
        &redis.url(),
        "1s",
        &["--concurrent", "wait", "--wait-max", "10s"],
    )
    .await;
    let cs = clients(&ps);
    // Opens the subscribers of proxies 1 and 2 (where the waiters are).
    let gaps = wake_latency(&up, &cs, &names("before", 5)).await;
    assert!(
        gaps[gaps.len() / 2] < Duration::from_millis(300),
        "{gaps:?}"
    );
    tokio::task::block_in_place(|| redis.kill());
    let r = cs[1].send(Req::post("/orders").key("while-down")).await;
    assert_store_unavailable(&r, "while down");
    tokio::task::block_in_place(|| redis.restart());
    until_served(
        &cs,
        &mut (0..).map(|n| format!("after-{n}")),
        Duration::from_secs(15),
    )
    .await;

    let gaps = wake_latency(&up, &cs, &names("restarted", 5)).await;
    println!("after a Redis restart: waiters answered {gaps:?} after the holder");
    assert!(
        gaps[gaps.len() / 2] < Duration::from_millis(300),
        "after a Redis restart waiters answered {gaps:?} after the holder: pub/sub did not \
         come back\n{}",
        logs(&ps)
    );
    for (key, n) in up.counts() {
        assert_eq!(n, 1, "{key} executed {n} times");
    }
}

/// The Cluster hash slot of a key: CRC16 (XMODEM) of its hash tag, mod 16384.
fn slot(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag.as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Whether the record of `key` (anonymous scope) lives on `node`.
fn lives_on(node: &RedisServer, key: &str) -> bool {
    let nodes = node.cli(&["cluster", "nodes"]);
    let myself = nodes
        .lines()
        .find(|l| l.contains("myself"))
        .expect("CLUSTER NODES names this node");
    let s = slot(&support::anonymous_record_id(key));
    myself.split_whitespace().skip(8).any(|range| {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&s))
    })
}

/// Fresh keys `prefix-i` whose records live on `node`.
fn keys_on<'a>(node: &'a RedisServer, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    (0..)
        .map(move |i| format!("{prefix}-{i}"))
        .filter(move |k| lives_on(node, k))
}

/// The same on a Cluster whose node holding the awaited keys is killed and restarted: the
/// instances' sharded subscriptions to that node come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wait_mode_wakes_across_instances_again_after_a_node_restart() {
    let mut cluster = tokio::task::block_in_place(|| {
        RedisCluster::builder(3)
            .config("appendonly yes")
            .config("appendfsync always")
            .start()
    });
    // Our slot function agrees with the server's.
    let probe = format!("idemgate:{{{}}}", support::anonymous_record_id("probe"));
    let server_slot = cluster.nodes()[0].cli(&["cluster", "keyslot", &probe]);
    assert_eq!(
        server_slot.trim(),
        slot(&support::anonymous_record_id("probe")).to_string()
    );

    let up = Upstream::start().await;
    let ps = proxies(
        3,
        &up,
        &cluster.url(),
        "1s",
        &["--concurrent", "wait", "--wait-max", "10s"],
    )
    .await;
    let cs = clients(&ps);
    let before: Vec<String> = keys_on(&cluster.nodes()[0], "before").take(5).collect();
    let gaps = wake_latency(&up, &cs, &before).await;
    assert!(
        gaps[gaps.len() / 2] < Duration::from_millis(300),
        "{gaps:?}"
    );

    tokio::task::block_in_place(|| {
        cluster.nodes_mut()[0].kill();
        std::thread::sleep(Duration::from_millis(500));
        cluster.nodes_mut()[0].restart();
    });
    until_served(
        &cs,
        &mut keys_on(&cluster.nodes()[0], "after"),
        Duration::from_secs(20),
    )
    .await;

    let restarted: Vec<String> = keys_on(&cluster.nodes()[0], "restarted").take(5).collect();
    let gaps = wake_latency(&up, &cs, &restarted).await;
    println!("after a Cluster node restart: waiters answered {gaps:?} after the holder");
    assert!(
        gaps[gaps.len() / 2] < Duration::from_millis(300),
        "after a node restart waiters answered {gaps:?} after the holder: sharded pub/sub did \
         not come back\n{}",
        logs(&ps)
    );
    for (key, n) in up.counts() {
        assert_eq!(n, 1, "{key} executed {n} times");
    }
}

// ---------------------------------------------------------------------------------------------
// 4: Redis killed under load
// ---------------------------------------------------------------------------------------------

fn assert_store_unavailable(r: &Resp, what: &str) {
    assert_eq!(r.status, 503, "{what}: {}", r.summary());
    assert_eq!(
        r.problem().as_deref(),
        Some("store-unavailable"),
        "{what}: {}",
        r.summary()
    );
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no Retry-After: {}", r.summary()));
    assert!(retry_after >= 1, "{what}: {}", r.summary());
}

/// Fresh keys sent in a loop by a few tasks until `stop`.
fn start_load(
    client: &Client,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<(String, Resp)>>> {
    (0..4)
        .map(|t| {
            let (c, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                // Bounded: the test stops it far sooner.
                for n in 0..3000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let key = format!("load-{t}-{n}");
                    let r = c.send(Req::post("/orders").key(&key)).await;
                    out.push((key, r));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                out
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_closed_and_outcomes_survive_the_restart() {
    let mut redis = tokio::task::block_in_place(|| RedisServer::builder().durable().start());
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url())
        .store(redis.url())
        .args(["--lease", LEASE])
        .start()
        .await;
    let client = Client::new(proxy.addr());
    let before_req = |i: usize| {
        Req::post("/orders")
            .key(&format!("before-{i}"))
            .header("x-test-extra", "1")
    };

    let mut firsts = Vec::new();
    let mut replays_before = Vec::new();
    for i in 0..10 {
        let r = client.send(before_req(i)).await;
        assert_eq!(r.status, 201, "{}", r.summary());
        firsts.push(r);
    }
    for i in 0..10 {
        let r = client.send(before_req(i)).await;
        assert!(r.replayed(), "{}", r.summary());
        replays_before.push(r);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&client, &stop);
    let loaded_before_kill = eventually(Duration::from_secs(5), || up.total() >= 40).await;
    assert!(loaded_before_kill, "the load never got going");

    // Calls that outlive the outage (their lease lapses while Redis is away).
    let slow: Vec<_> = (0..3)
        .map(|i| {
            let c = client.clone();
            let req = Req::post("/orders")
                .key(&format!("slow-{i}"))
                .header("x-test-delay-ms", "2500");
            tokio::spawn(async move { c.send(req).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || {
            (0..3).all(|i| up.executions(&format!("slow-{i}")) == 1)
        })
        .await
    );

    tokio::task::block_in_place(|| redis.kill());

    // The proxy notices at its next store operation.
    let mut probe = 0;
    let noticed = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client
            .send(Req::post("/orders").key(&format!("probe-down-{probe}")))
            .await;
        probe += 1;
        if r.status == 503 {
            assert_store_unavailable(&r, "probe");
            break;
        }
        assert!(
            Instant::now() < noticed,
            "still {} 5 s after Redis died",
            r.summary()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Requests acquired just before the kill may still be on their way to the upstream; give
    // them a moment, then nothing may reach it until Redis is back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let executed_when_down = up.total();
    for i in 0..10 {
        let key = format!("down-{i}");
        let r = client.send(Req::post("/orders").key(&key)).await;
        assert_store_unavailable(&r, &key);
        assert_eq!(
            up.executions(&key),
            0,
            "{key} executed while Redis was down"
        );
        // A replay needs the store too: refused, never re-executed.
        let r = client.send(before_req(i)).await;
        assert_store_unavailable(&r, &format!("before-{i} while down"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.total(),
        executed_when_down,
        "the upstream executed requests while Redis was down: {:?}",
        up.counts()
    );

    let admin = Client::new(proxy.admin());
    let r = admin.get("/readyz").await;
    assert_eq!(r.status, 503, "readyz with Redis down: {}", r.summary());

    tokio::task::block_in_place(|| redis.restart());
    let resumed = Instant::now() + Duration::from_secs(15);
    let mut probe = 0;
    loop {
        let r = client
            .send(Req::post("/orders").key(&format!("probe-up-{probe}")))
            .await;
        probe += 1;
        if r.status == 201 {
            println!(
                "Redis answered PING; {} requests refused after that",
                probe - 1
            );
            break;
        }
        assert_store_unavailable(&r, "while Redis restarts");
        assert!(
            Instant::now() < resumed,
            "no service 15 s after Redis restarted:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let r = readyz_until(&admin, |s| s == 200).await;
    assert_eq!(r.status, 200, "readyz after the restart: {}", r.summary());

    stop.store(true, Ordering::SeqCst);
    let mut served = Vec::new();
    for (i, original) in slow.into_iter().enumerate() {
        let r = original.await.expect("slow task");
        // The client still gets the answer of a call that outlived the outage.
        assert_eq!(r.status, 201, "slow-{i}: {}", r.summary());
        assert!(!r.replayed());
        served.push((format!("slow-{i}"), r));
    }
    let mut refused = Vec::new();
    for task in load {
        for (key, r) in task.await.expect("load task") {
            match r.status {
                201 => {
                    assert!(!r.replayed(), "{key}: {}", r.summary());
                    assert_eq!(up.executions(&key), 1, "{key}");
                    served.push((key, r));
                }
                503 => {
                    assert_store_unavailable(&r, &key);
                    assert_eq!(up.executions(&key), 0, "{key} answered 503 but executed");
                    refused.push(key);
                }
                _ => panic!("{key} under a Redis crash: {}", r.summary()),
            }
        }
    }
    println!(
        "load: {} served, {} refused with 503",
        served.len(),
        refused.len()
    );
    assert!(!refused.is_empty(), "the load never met the outage");

    // Outcomes completed before the kill replay byte for byte.
    for i in 0..10 {
        let r = client.send(before_req(i)).await;
        let before = &replays_before[i];
        assert_eq!(r.status, firsts[i].status, "before-{i}: {}", r.summary());
        assert!(r.replayed(), "before-{i}: {}", r.summary());
        assert_eq!(r.body, firsts[i].body, "before-{i}: body changed");
        for name in [
            "content-type",
            "location",
            "etag",
            "x-upstream-serial",
            "link",
        ] {
            assert_eq!(r.all(name), before.all(name), "before-{i}: {name}");
        }
        assert_eq!(up.executions(&format!("before-{i}")), 1);
    }

    // Load requests answered 201 around the kill replay their response, once the proxy's
    // background retries of `complete` got through (a retry meeting the record before that
    // gets the outcome-unknown placeholder, which the late complete then replaces).
    let settle = Instant::now() + Duration::from_secs(15);
    for (key, first) in &served {
        loop {
            let r = client.send(Req::post("/orders").key(key)).await;
            if r.status == 201 {
                assert!(r.replayed(), "{key}: {}", r.summary());
                assert_eq!(r.body, first.body, "{key}: replay differs");
                break;
            }
            assert!(
                matches!(r.status, 409 | 502),
                "{key} after the restart: {}",
                r.summary()
            );
            assert!(
                Instant::now() < settle,
                "{key} still answers {} after the restart:\n{}",
                r.summary(),
                proxy.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Refused requests were never executed: a retry runs them once, or, if Redis kept an
    // acquire whose answer was lost, reports the outcome as unknown. Never twice.
    let never_run: Vec<String> = refused
        .into_iter()
        .chain((0..10).map(|i| format!("down-{i}")))
        .collect();
    for key in &never_run {
        let r = client
            .send_until_settled(Req::post("/orders").key(key), Duration::from_secs(5))
            .await;
        match r.status {
            201 => assert_eq!(up.executions(key), 1, "{key}"),
            502 => {
                assert_eq!(r.problem().as_deref(), Some("outcome-unknown"), "{key}");
                assert_eq!(up.executions(key), 0, "{key}");
            }
            _ => panic!("{key} retried after the restart: {}", r.summary()),
        }
    }
    for (key, n) in up.counts() {
        assert!(n <= 1, "{key} executed {n} times");
    }
}

// ---------------------------------------------------------------------------------------------
// 5: readiness and the eviction policy
// ---------------------------------------------------------------------------------------------

async fn readyz(admin: &Client) -> Resp {
    admin.get("/readyz").await
}

/// Polls `/readyz` until `want(status)` (bounded); returns the last answer.
async fn readyz_until(admin: &Client, want: impl Fn(u16) -> bool) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = readyz(admin).await;
        if want(r.status) || Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_on_an_eviction_policy_and_passes_on_noeviction() {
    let redis = tokio::task::block_in_place(|| {
        RedisServer::builder()
            .config("maxmemory-policy volatile-lru")
            .start()
    });
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url()).store(redis.url()).start().await;
    let admin = Client::new(proxy.admin());

    let r = readyz(&admin).await;
    assert_ne!(r.status, 200, "{}", r.summary());
    assert_eq!(r.status, 503, "{}", r.summary());
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.contains("maxmemory-policy") && body.contains("volatile-lru"),
        "{body}"
    );

    redis.cli(&["config", "set", "maxmemory-policy", "noeviction"]);
    let r = readyz_until(&admin, |s| s == 200).await;
    assert_eq!(r.status, 200, "with noeviction: {}", r.summary());

    redis.cli(&["config", "set", "maxmemory-policy", "allkeys-lru"]);
    let r = readyz_until(&admin, |s| s != 200).await;
    assert_eq!(r.status, 503, "with allkeys-lru: {}", r.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_on_cluster_fails_when_any_master_may_evict() {
    let cluster = cluster();
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url()).store(cluster.url()).start().await;
    let admin = Client::new(proxy.admin());

    let r = readyz_until(&admin, |s| s == 200).await;
    assert_eq!(r.status, 200, "noeviction everywhere: {}", r.summary());

    // One master of three.
    cluster.nodes()[2].cli(&["config", "set", "maxmemory-policy", "volatile-lru"]);
    let r = readyz_until(&admin, |s| s != 200).await;
    assert_eq!(r.status, 503, "one master on volatile-lru: {}", r.summary());
    assert!(
        String::from_utf8_lossy(&r.body).contains("volatile-lru"),
        "{}",
        r.summary()
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown writes off what did not finish within the grace period (SPEC §5)
// ---------------------------------------------------------------------------------------------

/// SIGTERM while a request hangs past `--shutdown-grace`: the proxy exits, and the key reads
/// outcome-unknown at once from another instance (the lease is 30 s: without the write-off the
/// retry would get 409 until the lease lapsed), and nothing executes twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_writes_off_requests_still_running_after_the_grace_period() {
    let redis = standalone();
    let up = Upstream::start().await;
    let mut ps = proxies(2, &up, &redis.url(), "30s", &["--shutdown-grace", "300ms"]).await;
    let cs = clients(&ps);
    let req = Req::post("/orders")
        .key("hung-at-shutdown")
        .header("x-test-delay-ms", "5000");
    let first = {
        let (c, req) = (cs[0].clone(), req.clone());
        tokio::spawn(async move { c.try_send(req).await })
    };
    assert!(
        eventually(Duration::from_secs(5), || up.executions("hung-at-shutdown")
            == 1)
        .await,
        "the request never reached the upstream"
    );
    ps[0].sigterm();
    let status = ps[0].wait_exit(Duration::from_secs(5)).await;
    assert!(
        status.is_some(),
        "the proxy exits after its grace period\n{}",
        logs(&ps)
    );
    let _ = first.await;
    let retry = cs[1].send(req.clone()).await;
    assert_eq!(
        retry.problem().as_deref(),
        Some("outcome-unknown"),
        "{}\n{}",
        retry.summary(),
        logs(&ps)
    );
    assert_eq!(up.executions("hung-at-shutdown"), 1);
}
