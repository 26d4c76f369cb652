//! Behaviour of the embedded store beyond the shared contract: group commit, the file lock,
//! epochs across restarts, capacity, background purge, arrival order.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idemgate::record::{Fingerprint, Outcome, Record, RecordId, ResponseHead, Token};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, LeaseExpiry, Release, Store, StoreError,
};
use idemgate_store_embedded::{EmbeddedStore, OpenError};

fn req(id: RecordId, fp: u8, token: Token) -> AcquireRequest {
    AcquireRequest {
        id,
        fingerprint: Fingerprint([fp; 32]),
        token,
        lease: Duration::from_secs(30),
        on_lease_expiry: LeaseExpiry::OutcomeUnknown,
        retention: Duration::from_secs(3600),
    }
}

fn id(n: u64) -> RecordId {
    RecordId::derive("test", b"embedded", &n.to_be_bytes())
}

/// Every record `ns` names reads back Completed with its own outcome.
async fn assert_completed(store: &EmbeddedStore, ns: impl IntoIterator<Item = u64>) {
    for n in ns {
        match store.get(&id(n)).await.unwrap() {
            Some(Record::Completed(c)) => assert_eq!(c.outcome, outcome(n), "record {n}"),
            other => panic!("record {n}: {other:?}"),
        }
    }
}

/// A fresh request for record `n`: acquired, then completed with its own outcome.
async fn acquire_and_complete(store: &EmbeddedStore, n: u64) {
    let t = Token::random();
    let a = store.acquire(req(id(n), 1, t)).await.unwrap();
    assert!(matches!(a, Acquire::Acquired { .. }), "{a:?}");
    let c = store
        .complete(&id(n), t, &outcome(n), Duration::from_secs(60))
        .await;
    assert_eq!(c.unwrap(), Completion::Stored);
}

fn outcome(n: u64) -> Outcome {
    Outcome::Response {
        head: ResponseHead {
            status: 201,
            headers: vec![("x-n".into(), Bytes::from(n.to_string()))],
        },
        body: Bytes::from(format!("body {n}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_commits() {
    const N: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        EmbeddedStore::builder(dir.path().join("s.redb"))
            .min_free_bytes(0)
            .open()
            .unwrap(),
    );
    let before = store.stats();
    let start = Arc::new(tokio::sync::Barrier::new(N as usize));
    let mut tasks = Vec::new();
    for n in 0..N {
        let (store, start) = (store.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            acquire_and_complete(&store, n).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = store.stats();
    let ops = after.operations - before.operations;
    let syncs = after.log_syncs - before.log_syncs;
    println!(
        "group commit: {ops} operations in {syncs} log syncs ({} batches)",
        after.batches - before.batches
    );
    assert_eq!(ops, 2 * N, "every operation was applied once");
    assert!(
        syncs * 4 <= ops,
        "concurrent operations must share syncs: {syncs} log syncs for {ops} operations"
    );
    // Every one of them is really there.
    assert_completed(&store, 0..N).await;
}

/// With batched wake-ups (as `idemgate serve` runs it), callers on current-thread runtimes,
/// two of them at once on their own threads as in the proxy, all get their answers: many per
/// batch, mixed between the runtimes, and while batches keep coming.
#[test]
fn batched_wakeups_answer_every_caller_on_every_runtime() {
    const PER_RUNTIME: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        EmbeddedStore::builder(dir.path().join("s.redb"))
            .min_free_bytes(0)
            .batched_wakeups(true)
            .open()
            .unwrap(),
    );
    let workers: Vec<_> = (0..2u64)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for n in w * PER_RUNTIME..(w + 1) * PER_RUNTIME {
                        let store = store.clone();
                        tasks.spawn(async move {
                            acquire_and_complete(&store, n).await;
                            let replay = store.acquire(req(id(n), 1, Token::random())).await;
                            assert!(matches!(replay, Ok(Acquire::Completed(_))), "{replay:?}");
                        });
                    }
                    // A lost wake-up would leave a caller waiting for ever: bound the wait.
                    tokio::time::timeout(Duration::from_secs(30), async {
                        while let Some(done) = tasks.join_next().await {
                            done.unwrap();
                        }
                    })
                    .await
                    .expect("every caller answered");
                });
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert!(
        store.stats().batches < 6 * PER_RUNTIME,
        "callers shared batches: {:?}",
        store.stats()
    );
}

/// A batch is kept only once its log frame is synced: when appending to the log fails, its
/// callers get an error and nothing of it is applied (never "failed" for a write that stays,
/// never "done" for one that is not durable), and reads and what was logged before still work.
#[tokio::test]
async fn a_batch_the_log_cannot_take_is_refused_and_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = EmbeddedStore::builder(&path)
        .min_free_bytes(0)
        .checkpoint_interval(Duration::from_secs(3600))
        .open()
        .unwrap();
    let t = Token::random();
    assert!(matches!(
        store.acquire(req(id(0), 1, t)).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    let (k, o) = (id(0), outcome(0));
    assert_eq!(
        store
            .complete(&k, t, &o, Duration::from_secs(60))
            .await
            .unwrap(),
        Completion::Stored
    );

    store.break_log_for_tests().await.unwrap();
    let refused = store.acquire(req(id(1), 1, Token::random())).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "an acquire the log could not take: {refused:?}"
    );
    assert_eq!(
        store.get(&id(1)).await.unwrap(),
        None,
        "and it left nothing"
    );
    assert_completed(&store, [0]).await;
    store.close().await;

    let store = EmbeddedStore::builder(&path)
        .min_free_bytes(0)
        .open()
        .unwrap();
    assert_eq!(
        store.open_report().replayed_batches,
        0,
        "the close checkpointed"
    );
    assert_completed(&store, [0]).await;
    assert_eq!(store.get(&id(1)).await.unwrap(), None);
}

#[tokio::test]
async fn operations_on_one_record_apply_in_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::builder(dir.path().join("s.redb"))
        .min_free_bytes(0)
        .open()
        .unwrap();
    for n in 0..20 {
        let t = Token::random();
        // `join!` polls in order, so the acquire is queued before the complete and the release;
        // they usually land in one batch, where only arrival order makes the complete see the
        // InFlight record (on an absent record it would store nothing).
        let ttl = Duration::from_secs(60);
        let (o, k) = (outcome(n), id(n));
        let (a, c, r) = tokio::join!(
            store.acquire(req(k, 1, t)),
            store.complete(&k, t, &o, ttl),
            store.release(&k, t),
        );
        assert!(matches!(a.unwrap(), Acquire::Acquired { .. }));
        assert_eq!(c.unwrap(), Completion::Stored);
        assert_eq!(
            r.unwrap(),
            Release::Refused,
            "release after complete is refused"
        );
        assert_completed(&store, [n]).await;
    }
}

#[tokio::test]
async fn a_second_open_of_the_file_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    match EmbeddedStore::open(&path) {
        Err(e @ OpenError::AlreadyOpen { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("already open"), "{msg}");
            assert!(msg.contains("Redis or PostgreSQL"), "{msg}");
        }
        other => panic!("second open: {other:?}"),
    }
    // Closing releases the lock at once.
    store.close().await;
    let again = EmbeddedStore::open(&path).unwrap();
    // So does dropping.
    drop(again);
    EmbeddedStore::open(&path).unwrap();
}

#[tokio::test]
async fn a_file_that_is_not_a_store_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.redb");
    std::fs::write(&path, vec![0x42u8; 64 * 1024]).unwrap();
    match EmbeddedStore::open(&path) {
        Err(OpenError::Incompatible { .. } | OpenError::Io { .. }) => {}
        other => panic!("opening garbage: {other:?}"),
    }
}

#[tokio::test]
async fn records_and_epochs_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let (done, live, lapsed) = (Token::random(), Token::random(), Token::random());
    let store = EmbeddedStore::open(&path).unwrap();
    let first_epoch = store.open_report().epoch;
    assert!(first_epoch >= 1);
    store.acquire(req(id(1), 1, done)).await.unwrap();
    store
        .complete(&id(1), done, &outcome(1), Duration::from_secs(60))
        .await
        .unwrap();
    store.acquire(req(id(2), 2, live)).await.unwrap();
    store.acquire(req(id(3), 3, lapsed)).await.unwrap();
    store.close().await;

    let store = EmbeddedStore::builder(&path)
        .lapsed_retention(Duration::from_secs(120))
        .open()
        .unwrap();
    let report = store.open_report().clone();
    assert_eq!(report.epoch, first_epoch + 1, "every open is a new epoch");
    assert_eq!(
        report.converted_leases, 2,
        "both in-flight records were converted"
    );
    assert!(!report.repaired, "a clean close needs no repair");
    match store.get(&id(1)).await.unwrap() {
        Some(Record::Completed(c)) => {
            assert_eq!((c.outcome, c.origin_token), (outcome(1), done));
        }
        other => panic!("completed record after restart: {other:?}"),
    }
    // Converted before any request arrived: `get` already shows the placeholder.
    match store.get(&id(2)).await.unwrap() {
        Some(Record::Completed(c)) => {
            assert!(c.outcome.is_outcome_unknown());
            assert_eq!(c.origin_token, live);
            let left = c
                .expires_at
                .saturating_since(idemgate::record::Timestamp::now());
            assert!(
                left > Duration::from_secs(100) && left <= Duration::from_secs(120),
                "{left:?}"
            );
        }
        other => panic!("in-flight record after restart: {other:?}"),
    }
    // A re-execute route still treats the converted lease as lapsed (absent), once.
    let t = Token::random();
    let re = AcquireRequest {
        on_lease_expiry: LeaseExpiry::ReExecute,
        ..req(id(3), 9, t)
    };
    assert!(matches!(
        store.acquire(re).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    assert!(
        matches!(
            store.acquire(req(id(3), 9, Token::random())).await.unwrap(),
            Acquire::InFlight { .. }
        ),
        "the new attempt holds the key"
    );
    // An outcome-unknown route replays the placeholder.
    match store.acquire(req(id(2), 2, Token::random())).await.unwrap() {
        Acquire::Completed(c) => assert!(c.outcome.is_outcome_unknown()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn below_min_free_disk_new_records_are_refused_and_old_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let (a, b) = (Token::random(), Token::random());
    let store = EmbeddedStore::builder(&path)
        .min_free_bytes(0)
        .open()
        .unwrap();
    store.acquire(req(id(1), 1, a)).await.unwrap();
    store
        .complete(&id(1), a, &outcome(1), Duration::from_secs(60))
        .await
        .unwrap();
    store.acquire(req(id(2), 1, b)).await.unwrap();
    store.close().await;

    // No filesystem has u64::MAX bytes free.
    let store = EmbeddedStore::builder(&path)
        .min_free_bytes(u64::MAX)
        .open()
        .unwrap();
    match store.acquire(req(id(3), 1, Token::random())).await {
        Err(StoreError::Full(reason)) => assert!(reason.contains("free"), "{reason}"),
        other => panic!("acquire of a new record on a full disk: {other:?}"),
    }
    assert_eq!(
        store.get(&id(3)).await.unwrap(),
        None,
        "a refused acquire writes nothing"
    );
    // Replays still work.
    match store.acquire(req(id(1), 1, Token::random())).await.unwrap() {
        Acquire::Completed(c) => assert_eq!(c.outcome, outcome(1)),
        other => panic!("{other:?}"),
    }
    // The converted lease's late outcome may still be stored; nothing was evicted.
    assert_eq!(
        store
            .complete(&id(2), b, &outcome(2), Duration::from_secs(60))
            .await
            .unwrap(),
        Completion::Stored
    );
}

#[tokio::test]
async fn background_purge_removes_expired_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::builder(dir.path().join("s.redb"))
        .min_free_bytes(0)
        .purge_interval(Duration::from_millis(50))
        .purge_batch(7)
        .open()
        .unwrap();
    for n in 0..30 {
        let t = Token::random();
        store.acquire(req(id(n), 1, t)).await.unwrap();
        let ttl = if n % 3 == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(300)
        };
        store.complete(&id(n), t, &outcome(n), ttl).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.stats().purged < 20 {
        assert!(
            Instant::now() < deadline,
            "background purge did not run: {:?}",
            store.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.stats().purged, 20, "only the expired records go");
    assert_eq!(
        store.purge_expired().await.unwrap(),
        0,
        "nothing left to purge"
    );
    for n in (0..30).step_by(3) {
        assert!(matches!(
            store.get(&id(n)).await.unwrap(),
            Some(Record::Completed(_))
        ));
    }
}

#[tokio::test]
async fn purge_on_demand_counts_what_it_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::builder(dir.path().join("s.redb"))
        .min_free_bytes(0)
        .purge_batch(4)
        .open()
        .unwrap();
    for n in 0..10 {
        let t = Token::random();
        store.acquire(req(id(n), 1, t)).await.unwrap();
        store
            .complete(&id(n), t, &outcome(n), Duration::from_millis(200))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.purge_expired().await.unwrap(), 10);
    assert_eq!(store.purge_expired().await.unwrap(), 0);
}

#[tokio::test]
async fn readiness_answers() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::builder(dir.path().join("s.redb"))
        .min_free_bytes(0)
        .open()
        .unwrap();
    store.readiness().await.unwrap();
    assert_eq!(store.kind(), "embedded");
}

/// What the model expects `get` to answer for one record.
#[derive(Clone, Debug, PartialEq)]
enum Expected {
    Absent,
    InFlight(Token),
    Completed(Outcome),
}

/// Random operations on a few records, many in flight at once (so batches mix them), with a
/// checkpoint after every batch and reopens in between: after each round every record reads
/// back exactly as a plain state machine says. This is what holds the in-memory overlay, the
/// running checkpoint and the file together: a record written to the file and changed again
/// must never leave its older version readable in the other table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_match_a_model_through_checkpoints_and_reopens() {
    const RECORDS: u64 = 24;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let open = || {
        EmbeddedStore::builder(&path)
            .min_free_bytes(0)
            .checkpoint_interval(Duration::ZERO)
            .open()
            .unwrap()
    };
    let mut store = Arc::new(open());
    let mut model = vec![Expected::Absent; RECORDS as usize];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut stores_checkpointed = 0;
    for round in 0..40 {
        // One operation per record at most, so that every operation's effect is known whatever
        // order the batch applies them in; all of them in flight together.
        let mut tasks = Vec::new();
        for n in 0..RECORDS {
            let store = store.clone();
            let (k, ttl) = (id(n), Duration::from_secs(3600));
            let expected = model[n as usize].clone();
            let pick = random(5);
            let t = Token::random();
            let next = match (&expected, pick) {
                (Expected::Absent, 0..=2) => Some(Expected::InFlight(t)),
                (Expected::InFlight(_), 0..=1) => {
                    Some(Expected::Completed(outcome(round * 100 + n)))
                }
                (Expected::InFlight(_), 2) => Some(Expected::Absent),
                (_, 3) => Some(Expected::Absent),
                _ => None,
            };
            let next = next.unwrap_or(expected.clone());
            model[n as usize] = next.clone();
            tasks.push(tokio::spawn(async move {
                match (&expected, &next) {
                    (Expected::Absent, Expected::InFlight(t)) => {
                        let a = store.acquire(req(k, 1, *t)).await.unwrap();
                        assert!(matches!(a, Acquire::Acquired { .. }), "{a:?}");
                    }
                    (Expected::InFlight(t), Expected::Completed(o)) => {
                        let c = store.complete(&k, *t, o, ttl).await.unwrap();
                        assert_eq!(c, Completion::Stored);
                    }
                    (Expected::InFlight(t), Expected::Absent) if pick == 2 => {
                        assert_eq!(store.release(&k, *t).await.unwrap(), Release::Released);
                    }
                    (Expected::Absent, Expected::Absent) => {}
                    (_, Expected::Absent) => {
                        let d = store.delete(&k, true).await.unwrap();
                        assert_eq!(d, idemgate::store::Deletion::Deleted);
                    }
                    (Expected::Completed(o), _) => {
                        // A replay: the same answer, nothing changes.
                        match store.acquire(req(k, 1, Token::random())).await.unwrap() {
                            Acquire::Completed(c) => assert_eq!(&c.outcome, o),
                            other => panic!("replay of record {n}: {other:?}"),
                        }
                    }
                    _ => {}
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for n in 0..RECORDS {
            let got = match store.get(&id(n)).await.unwrap() {
                None => Expected::Absent,
                Some(Record::InFlight(f)) => Expected::InFlight(f.token),
                Some(Record::Completed(c)) => Expected::Completed(c.outcome),
            };
            assert_eq!(got, model[n as usize], "record {n} after round {round}");
        }
        if round % 10 == 9 {
            // Checkpoints run on their own thread, so how many fit in ten rounds depends on the
            // machine's load; that at least one did (so records were read back from the file)
            // is waited for, not hoped for.
            let deadline = Instant::now() + Duration::from_secs(10);
            while store.stats().checkpoints == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if store.stats().checkpoints > 0 {
                stores_checkpointed += 1;
            }
            let Ok(s) = Arc::try_unwrap(store) else {
                panic!("every task has finished")
            };
            s.close().await;
            store = Arc::new(open());
            // A reopen is a new epoch: the records that were in flight are outcome-unknown.
            for m in model.iter_mut() {
                if matches!(m, Expected::InFlight(_)) {
                    *m = Expected::Completed(Outcome::outcome_unknown());
                }
            }
        }
    }
    assert_eq!(
        stores_checkpointed, 4,
        "every store between two reopens ran checkpoints"
    );
}

/// The file cannot be written (checkpoints fail) while the log can: writes go on, durable in
/// the log, until the log reaches its bound; then writes are refused (never a hang, never an
/// unbounded log) while reads keep working. Once checkpoints work again, writes do too. A
/// close that cannot checkpoint leaves the log, and the next open replays every acknowledged
/// write from it.
#[tokio::test]
async fn failing_checkpoints_bound_the_log_and_lose_nothing() {
    const LOG_BYTES: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let open = || {
        EmbeddedStore::builder(&path)
            .min_free_bytes(0)
            .checkpoint_interval(Duration::ZERO)
            .checkpoint_log_bytes(LOG_BYTES)
            .open()
            .unwrap()
    };
    let store = open();
    store.fail_checkpoints_for_tests(true).await.unwrap();
    let write = |n: u64| {
        let store = &store;
        async move {
            let t = Token::random();
            store.acquire(req(id(n), 1, t)).await?;
            let (k, o) = (id(n), outcome(n));
            store.complete(&k, t, &o, Duration::from_secs(3600)).await
        }
    };
    let mut acknowledged = Vec::new();
    let refused = loop {
        let n = acknowledged.len() as u64;
        assert!(n < 1000, "the log never filled: its bound is not enforced");
        match write(n).await {
            Ok(Completion::Stored) => acknowledged.push(n),
            Ok(other) => panic!("complete {n}: {other:?}"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&refused, StoreError::Unavailable(m) if m.contains("checkpoints are failing")),
        "{refused:?}"
    );
    // Each record's frame is ~150 bytes: the bound let dozens through, not thousands.
    assert!(acknowledged.len() > 10, "{} written", acknowledged.len());
    assert_completed(&store, acknowledged.iter().copied()).await;

    // Checkpoints work again: so do writes (the retry runs within a second).
    store.fail_checkpoints_for_tests(false).await.unwrap();
    let healed = Instant::now() + Duration::from_secs(10);
    let n = acknowledged.len() as u64 + 1000;
    loop {
        match write(n).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < healed, "writes still refused: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    acknowledged.push(n);

    // Broken again, then closed: the close cannot checkpoint; the reopen replays the log.
    store.fail_checkpoints_for_tests(true).await.unwrap();
    let last = n + 1;
    assert_eq!(write(last).await.unwrap(), Completion::Stored);
    acknowledged.push(last);
    store.close().await;
    let store = open();
    assert!(
        store.open_report().replayed_batches > 0,
        "{:?}",
        store.open_report()
    );
    assert_completed(&store, acknowledged).await;
}

/// An idle store still checkpoints what it logged, at the interval: the log to replay after a
/// crash and the records held in memory do not wait for the next request.
#[tokio::test]
async fn an_idle_store_checkpoints_at_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::builder(dir.path().join("s.redb"))
        .min_free_bytes(0)
        .checkpoint_interval(Duration::from_millis(100))
        .open()
        .unwrap();
    let t = Token::random();
    store.acquire(req(id(1), 1, t)).await.unwrap();
    let before = store.stats().checkpoints;
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().checkpoints == before {
        assert!(
            Instant::now() < deadline,
            "no checkpoint while idle: {:?}",
            store.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.stats().operations, 1, "no operation woke the writer");
}
