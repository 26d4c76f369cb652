//! SPEC §7 under load: 100 concurrent duplicates of each of 50 keys through the real binary
//! execute exactly 50 times, in conflict mode and in wait mode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::{Client, Proxy, Req, Resp, Upstream};

const KEYS: usize = 50;
const DUPLICATES: usize = 100;

async fn storm(extra: &[&str]) -> (Upstream, HashMap<usize, Vec<Resp>>) {
    let up = Upstream::start().await;
    let proxy = Proxy::builder(up.url())
        .args(["--lease", "1s"])
        .args(extra.iter().copied())
        .start()
        .await;
    let client = Client::new(proxy.addr());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(KEYS * DUPLICATES));
    let mut tasks = Vec::with_capacity(KEYS * DUPLICATES);
    // Interleaved so every key's duplicates are spread over the whole storm.
    for _ in 0..DUPLICATES {
        for k in 0..KEYS {
            let client = client.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let r = client
                    .send(
                        Req::post("/orders")
                            .key(&format!("storm-{k}"))
                            .header("x-test-delay-ms", "300"),
                    )
                    .await;
                (k, r)
            }));
        }
    }
    let mut by_key: HashMap<usize, Vec<Resp>> = HashMap::new();
    let all = tokio::time::timeout(
        Duration::from_secs(90),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("the storm finished within 90 s");
    for joined in all {
        let (k, r) = joined.expect("request task");
        by_key.entry(k).or_default().push(r);
    }
    drop(proxy);
    (up, by_key)
}

fn assert_exactly_once(up: &Upstream, by_key: &HashMap<usize, Vec<Resp>>) {
    let counts = up.counts();
    assert_eq!(
        counts.len(),
        KEYS,
        "keys that reached the upstream: {counts:?}"
    );
    for (key, n) in &counts {
        assert_eq!(*n, 1, "{key} executed {n} times");
    }
    assert_eq!(up.total(), KEYS as u64);
    for (k, responses) in by_key {
        assert_eq!(responses.len(), DUPLICATES);
        let originals: Vec<&Resp> = responses
            .iter()
            .filter(|r| r.status == 201 && !r.replayed())
            .collect();
        assert_eq!(
            originals.len(),
            1,
            "key {k}: {} unreplayed 201s",
            originals.len()
        );
        for r in responses.iter().filter(|r| r.status == 201) {
            assert_eq!(r.body, originals[0].body, "key {k}: replay differs");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_conflict_mode_executes_each_key_once() {
    let (up, by_key) = storm(&["--concurrent", "conflict"]).await;
    assert_exactly_once(&up, &by_key);
    let mut conflicts = 0;
    for responses in by_key.values() {
        for r in responses {
            match r.status {
                201 => {}
                409 => {
                    conflicts += 1;
                    assert_eq!(r.problem().as_deref(), Some("request-in-flight"));
                    assert!(r.header("retry-after").is_some(), "{}", r.summary());
                }
                _ => panic!("unexpected answer: {}", r.summary()),
            }
        }
    }
    assert!(conflicts > 0, "no duplicate overlapped its original");
    println!(
        "conflict mode: {conflicts} of {} duplicates got 409",
        KEYS * DUPLICATES
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_wait_mode_executes_each_key_once_and_all_get_the_outcome() {
    let (up, by_key) = storm(&["--concurrent", "wait", "--wait-max", "20s"]).await;
    assert_exactly_once(&up, &by_key);
    for responses in by_key.values() {
        for r in responses {
            assert_eq!(r.status, 201, "wait mode answered {}", r.summary());
        }
    }
}
