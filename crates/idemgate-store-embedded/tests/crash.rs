//! Crash safety: a child process (this test binary again, running the ignored
//! `child_process_entry` with an env var naming its job) writes through the store and is killed
//! with SIGKILL; the parent reopens the file and checks what the child was told.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idemgate::record::{Fingerprint, Outcome, Record, RecordId, ResponseHead, Token};
use idemgate::store::{Acquire, AcquireRequest, Completion, LeaseExpiry, Store};
use idemgate_store_embedded::EmbeddedStore;

const CHILD_ENV: &str = "IDEMGATE_EMBEDDED_TEST_CHILD";
/// The child store's checkpoint interval in milliseconds (the builder's default when unset).
const CHECKPOINT_ENV: &str = "IDEMGATE_EMBEDDED_TEST_CHECKPOINT_MS";

/// The store the child writes through.
fn child_store(path: &Path) -> EmbeddedStore {
    let mut builder = EmbeddedStore::builder(path).min_free_bytes(0);
    if let Some(ms) = std::env::var(CHECKPOINT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.checkpoint_interval(Duration::from_millis(ms));
    }
    builder.open().unwrap()
}

fn id(n: u64) -> RecordId {
    RecordId::derive("crash", b"child", &n.to_be_bytes())
}

fn token(n: u64) -> Token {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&n.to_be_bytes());
    t[8..].copy_from_slice(&(!n).to_be_bytes());
    Token(t)
}

fn fingerprint(n: u64) -> Fingerprint {
    Fingerprint([(n % 251) as u8; 32])
}

fn outcome(n: u64) -> Outcome {
    Outcome::Response {
        head: ResponseHead {
            status: 200 + (n % 7) as u16,
            headers: vec![
                ("x-n".into(), Bytes::from(n.to_string())),
                ("x-bin".into(), Bytes::from(vec![0xff, (n % 256) as u8, 0])),
            ],
        },
        body: Bytes::from(format!("the outcome of request {n}").repeat(1 + (n % 5) as usize)),
    }
}

fn req(n: u64) -> AcquireRequest {
    AcquireRequest {
        id: id(n),
        fingerprint: fingerprint(n),
        token: token(n),
        lease: Duration::from_secs(30),
        on_lease_expiry: LeaseExpiry::OutcomeUnknown,
        retention: Duration::from_secs(3600),
    }
}

/// Every 7th request is left in flight on purpose, so the kill always finds some.
fn held(n: u64) -> bool {
    n % 7 == 3
}

// ---------------------------------------------------------------------------------------------
// the child

#[test]
#[ignore = "entry point of the child process the crash tests start; not a test by itself"]
fn child_process_entry() {
    let job = std::env::var(CHILD_ENV).expect("child mode needs its job in the environment");
    let (kind, path) = job.split_once(':').expect("job is kind:path");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // libtest has printed "test child_process_entry ... " without a newline: end that line so
    // every report line starts with its tag.
    println!();
    match kind {
        "stream" => rt.block_on(child_stream(Path::new(path))),
        "bulk" => rt.block_on(child_bulk(Path::new(path))),
        other => panic!("unknown child job {other}"),
    }
}

/// Acquires and completes without end (bounded in count and time), reporting each answer the
/// store gave on stdout: `HELD n` (acquired, left in flight), `ACQ n` (acquired), `DONE n`
/// (complete answered Stored).
async fn child_stream(path: &Path) {
    let store = Arc::new(child_store(path));
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (store, next) = (store.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= 200_000 {
                    break;
                }
                match store.acquire(req(n)).await.unwrap() {
                    Acquire::Acquired { .. } => {}
                    other => panic!("child acquire {n}: {other:?}"),
                }
                if held(n) {
                    println!("HELD {n}");
                    continue;
                }
                println!("ACQ {n}");
                let (k, o) = (id(n), outcome(n));
                let c = store
                    .complete(&k, token(n), &o, Duration::from_secs(3600))
                    .await;
                assert_eq!(c.unwrap(), Completion::Stored);
                println!("DONE {n}");
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    println!("FINISHED");
}

/// Fills the store with `bulk()` completed records and `BULK_HELD` in-flight ones, says `READY`,
/// and waits to be killed.
async fn child_bulk(path: &Path) {
    let store = Arc::new(child_store(path));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..512 {
        let (store, next) = (store.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= bulk() + BULK_HELD {
                    break;
                }
                assert!(matches!(
                    store.acquire(req(n)).await.unwrap(),
                    Acquire::Acquired { .. }
                ));
                if n < bulk() {
                    let (k, o) = (id(n), outcome(n));
                    let c = store
                        .complete(&k, token(n), &o, Duration::from_secs(3600))
                        .await;
                    assert_eq!(c.unwrap(), Completion::Stored);
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    println!("READY {:?}", store.stats());
    tokio::time::sleep(Duration::from_secs(120)).await;
}

// ---------------------------------------------------------------------------------------------
// the parent

/// Completed records in the open-time test: 30 000 by default so the suite stays quick;
/// `IDEMGATE_TEST_OPEN_RECORDS=200000` reproduces the figure in docs/BENCHMARKS.md.
fn bulk() -> u64 {
    std::env::var("IDEMGATE_TEST_OPEN_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000)
}
const BULK_HELD: u64 = 1_000;

struct ChildRun {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn start_child(kind: &str, path: &Path, checkpoint_ms: Option<u64>) -> ChildRun {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_entry",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{kind}:{}", path.display()))
        .envs(checkpoint_ms.map(|ms| (CHECKPOINT_ENV, ms.to_string())))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    ChildRun { child, lines }
}

/// Checkpoints every 20 ms: the kill lands among checkpoints and log frames of many
/// generations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_records_survive_sigkill_and_in_flight_ones_become_outcome_unknown() {
    let report = crash_and_reopen(Some(20)).await;
    assert!(
        report.epoch >= 2,
        "the file was opened before, by the child: {report:?}"
    );
}

/// No checkpoint after the child's open: every batch it was answered for is durable only in
/// the write-ahead log, so this is the log's replay alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_only_the_write_ahead_log_holds_survives_sigkill() {
    let report = crash_and_reopen(Some(3_600_000)).await;
    assert!(
        report.replayed_batches > 0,
        "the reopen replayed the log: {report:?}"
    );
}

/// Runs the streaming child until it reports a few hundred completions, kills it with SIGKILL,
/// reopens the file and checks every claim the child printed.
async fn crash_and_reopen(checkpoint_ms: Option<u64>) -> idemgate_store_embedded::OpenReport {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let mut run = start_child("stream", &path, checkpoint_ms);

    // Let it run until it has been told about a few hundred completions, then kill -9.
    let mut acquired = BTreeSet::new();
    let mut done = BTreeSet::new();
    let mut held_ids = BTreeSet::new();
    let mut parse = |line: &str| {
        let mut parts = line.split(' ');
        let (Some(tag), Some(n)) = (
            parts.next(),
            parts.next().and_then(|n| n.parse::<u64>().ok()),
        ) else {
            return;
        };
        match tag {
            "ACQ" => {
                acquired.insert(n);
            }
            "DONE" => {
                done.insert(n);
            }
            "HELD" => {
                held_ids.insert(n);
            }
            _ => {}
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen_done = 0;
    while seen_done < 600 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = run
            .lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the child stalled after {seen_done} completions"));
        assert!(
            line != "FINISHED",
            "the child finished before it was killed"
        );
        if line.starts_with("DONE ") {
            seen_done += 1;
        }
        parse(&line);
    }
    run.child.kill().unwrap(); // SIGKILL
    let status = run.child.wait().unwrap();
    assert!(!status.success(), "the child was killed: {status:?}");
    // What it printed before dying is still in the pipe: every line is a claim to check.
    while let Ok(line) = run.lines.recv_timeout(Duration::from_secs(5)) {
        parse(&line);
    }

    let started = Instant::now();
    let store = EmbeddedStore::builder(&path)
        .min_free_bytes(0)
        .open()
        .unwrap();
    let report = store.open_report().clone();
    println!(
        "reopen after SIGKILL: {:?} (open report {:?}); the child had reported {} completed, {} acquired, {} held",
        started.elapsed(),
        report,
        done.len(),
        acquired.len(),
        held_ids.len()
    );

    let mut real_outcomes_of_unreported = 0;
    let mut placeholders = 0u64;
    for &n in &done {
        match store.get(&id(n)).await.unwrap() {
            Some(Record::Completed(c)) => {
                assert_eq!(
                    c.outcome,
                    outcome(n),
                    "record {n}: the completed outcome, byte for byte"
                );
                assert_eq!(c.fingerprint, fingerprint(n), "record {n}: fingerprint");
                assert_eq!(c.origin_token, token(n), "record {n}: origin token");
            }
            other => panic!("record {n} was reported completed, after the crash it is {other:?}"),
        }
    }
    for &n in acquired.iter().chain(&held_ids) {
        if done.contains(&n) {
            continue;
        }
        match store.get(&id(n)).await.unwrap() {
            Some(Record::Completed(c)) if c.outcome.is_outcome_unknown() => {
                assert_eq!(
                    c.origin_token,
                    token(n),
                    "record {n}: placeholder keeps the token"
                );
                assert_eq!(c.fingerprint, fingerprint(n), "record {n}: fingerprint");
                placeholders += 1;
            }
            // Its complete became durable, but the child died before printing DONE.
            Some(Record::Completed(c)) if !held(n) && c.outcome == outcome(n) => {
                real_outcomes_of_unreported += 1;
            }
            other => panic!("record {n} was in flight at the crash, after it is {other:?}"),
        }
    }
    assert!(
        !held_ids.is_empty(),
        "some records were in flight at the kill"
    );
    assert!(
        report.converted_leases >= placeholders,
        "every placeholder was made at open: {report:?}, {placeholders} placeholders"
    );
    println!(
        "{placeholders} in-flight records became outcome-unknown; {real_outcomes_of_unreported} completed without the child reporting it"
    );
    // A retry of a record that was in flight gets outcome-unknown at once.
    let n = *held_ids.iter().next().unwrap();
    let retry = AcquireRequest {
        token: Token::random(),
        ..req(n)
    };
    match store.acquire(retry).await.unwrap() {
        Acquire::Completed(c) => assert!(c.outcome.is_outcome_unknown()),
        other => panic!("retry of an in-flight record after the crash: {other:?}"),
    }
    store.close().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_time_after_sigkill_with_200k_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bulk.redb");
    let filled = Instant::now();
    let mut run = start_child("bulk", &path, None);
    let deadline = Instant::now() + Duration::from_secs(500);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = run
            .lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the bulk child did not get ready in time"));
        if line.contains("READY") {
            println!(
                "child filled {} + {BULK_HELD} records in {:?}: {line}",
                bulk(),
                filled.elapsed()
            );
            break;
        }
    }
    run.child.kill().unwrap(); // SIGKILL
    run.child.wait().unwrap();
    let size = std::fs::metadata(&path).unwrap().len();

    let started = Instant::now();
    let store = EmbeddedStore::builder(&path)
        .min_free_bytes(0)
        .open()
        .unwrap();
    let unclean = started.elapsed();
    let report = store.open_report().clone();
    println!(
        "OPEN TIME after SIGKILL, {} completed + {BULK_HELD} in-flight records, file {} MiB: {unclean:?} ({report:?})",
        bulk(),
        size / (1024 * 1024)
    );
    assert_eq!(
        report.converted_leases, BULK_HELD,
        "every in-flight record was converted"
    );
    let mut counts = BTreeMap::new();
    for n in (0..bulk() + BULK_HELD).step_by(997) {
        let kind = match store.get(&id(n)).await.unwrap() {
            Some(Record::Completed(c)) if n < bulk() => {
                assert_eq!(c.outcome, outcome(n));
                "completed"
            }
            Some(Record::Completed(c)) if c.outcome.is_outcome_unknown() => "outcome-unknown",
            other => panic!("record {n}: {other:?}"),
        };
        *counts.entry(kind).or_insert(0) += 1;
    }
    println!("sampled records after reopen: {counts:?}");
    store.close().await;

    let started = Instant::now();
    let store = EmbeddedStore::builder(&path)
        .min_free_bytes(0)
        .open()
        .unwrap();
    println!(
        "open time after a clean close, same file: {:?}",
        started.elapsed()
    );
    assert_eq!(store.open_report().converted_leases, 0);
}
