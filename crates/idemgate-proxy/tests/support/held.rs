//! Helpers for several proxies sharing one network store, and the scenario both network stores
//! must pass: the proxy holding keys is killed mid-call, and no key ever executes twice.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::{Client, Proxy, Req, Resp, Upstream, eventually};

/// Clients of each proxy, in order.
pub fn clients(proxies: &[Proxy]) -> Vec<Client> {
    proxies.iter().map(|p| Client::new(p.addr())).collect()
}

/// Every proxy's log, for assertion messages.
pub fn logs(proxies: &[Proxy]) -> String {
    proxies
        .iter()
        .enumerate()
        .map(|(i, p)| format!("--- proxy {i} ---\n{}", p.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Keys in the scenario; the ones held by the proxy that dies are the multiples of 3.
pub const HELD: usize = 12;

/// Key `k`'s request: three leases long (of the tests' 600 ms), so the lease must be renewed
/// twice before the answer.
pub fn held_req(k: usize) -> Req {
    Req::post("/orders")
        .key(&format!("held-{k}"))
        .header("x-test-delay-ms", "1800")
}

/// Sends key `k` through client `k % 3` and returns once every key has reached `up`; the tasks
/// answer the original callers.
pub async fn start_held_calls(
    up: &Upstream,
    cs: &[Client],
) -> Vec<tokio::task::JoinHandle<Result<Resp, String>>> {
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
    originals
}

/// Three proxies `ps` on one store in conflict mode, in front of the fresh upstream `up`: key
/// `k` is executed through proxy `k % 3`; while the calls run, duplicates through every proxy
/// get 409; proxy 0 is SIGKILLed; retries through the survivors get outcome-unknown for its
/// keys and the real outcome for the others; every key executed exactly once.
pub async fn holder_killed_mid_call(up: &Upstream, ps: &mut [Proxy]) {
    assert_eq!(ps.len(), 3);
    let cs = clients(ps);

    let originals = start_held_calls(up, &cs).await;

    // Duplicates of every key through every instance while the calls run: all refused.
    let dups = (0..HELD).flat_map(|k| cs.iter().map(move |c| (k, c.clone())));
    let dups = futures_util::future::join_all(
        dups.map(|(k, c)| async move { (k, c.send(held_req(k)).await) }),
    )
    .await;
    for (k, r) in &dups {
        assert_eq!(r.status, 409, "held-{k} while in flight: {}", r.summary());
        assert_eq!(r.problem().as_deref(), Some("request-in-flight"));
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
                logs(ps)
            );
            assert_eq!(r.problem().as_deref(), Some("outcome-unknown"));
            println!("held-{k}: outcome-unknown {after:?} after the kill");
        } else {
            assert_eq!(r.status, 201, "held-{k}: {}\n{}", r.summary(), logs(ps));
            assert!(r.replayed());
        }
        first_answers.insert(k, r);
    }
    for (k, original) in originals.into_iter().enumerate() {
        let original = original.await.expect("original task");
        if k % 3 == 0 {
            assert!(
                original.is_err(),
                "held-{k} answered by a killed proxy: {original:?}"
            );
        } else {
            let original = original.unwrap_or_else(|e| panic!("held-{k}: {e}"));
            assert_eq!(original.status, 201, "{}", original.summary());
            assert!(!original.replayed());
            assert_eq!(original.body, first_answers[&k].body, "held-{k}");
        }
    }

    // Every upstream call has ended now (the killed proxy's too: same 1.8 s, started
    // earlier), and the answers are settled: the same again through both survivors.
    for k in 0..HELD {
        for c in &cs[1..] {
            let r = c.send(held_req(k)).await;
            let first = &first_answers[&k];
            assert_eq!(r.status, first.status, "held-{k}: {}", r.summary());
            assert_eq!(r.body, first.body, "held-{k}: {}", r.summary());
        }
    }
    let counts = up.counts();
    for k in 0..HELD {
        assert_eq!(counts.get(&format!("held-{k}")), Some(&1), "{counts:?}");
    }
    assert_eq!(up.total(), HELD as u64, "{counts:?}");
}
