//! What the idempotency layer adds to a request, in process.
//!
//! `cargo bench -p idemgate --bench layer [-- --measurement-time 3]`
//!
//! The layer over the memory store, on its production path (the attempt runs in its own spawned
//! task with the lease heartbeat armed; lease 30 s, the default policy), wraps a trivial inner
//! service (`tower::service_fn` answering `201` with a fixed 40-byte JSON body, whatever the
//! request). The same inner service is measured bare. Cases, each at 1 KiB and 64 KiB request
//! bodies:
//!
//! - `fresh`: a new key every request (key check, scope, buffering, fingerprint, `acquire`, the
//!   spawned attempt, `complete`);
//! - `replay`: one key completed once, then replayed every request (key check, scope,
//!   buffering, fingerprint, `acquire` finding the record, building the replay).
//!
//! Each request is built the same way for the bare and the layered service (POST, JSON content
//! type, `Authorization`, `Idempotency-Key`), and each response body is read to the end, so the
//! difference is the layer's own cost. The timed loop runs inside a task on the multi-thread
//! runtime, like a connection task of a real server, so the attempt task the layer spawns lands
//! on the same worker instead of being woken across threads from criterion's `block_on` thread.
//!
//! Every sample gets a fresh store (made before its timer starts and dropped after it stops), so
//! a long run of `fresh` does not fill memory with millions of records.
//!
//! After criterion's own report, the bench prints the **added time per request** (layer minus
//! bare, from criterion's estimates) for each case next to its target.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use idemgate::IdempotencyLayer;
use idemgate::store::MemoryStore;
use tower::{Layer, Service, ServiceExt, service_fn};

const GROUP: &str = "layer";
const PARTS: &str = "layer-parts";
const RESPONSE: &[u8] = br#"{"id":"pay_000001","status":"succeeded"}"#;
const SIZES: [(usize, &str); 2] = [(1024, "1KiB"), (64 * 1024, "64KiB")];

/// Targets for the added time per request, in nanoseconds (1 KiB bodies only).
const TARGETS: [(&str, &str, f64); 2] = [("fresh", "1KiB", 2_000.0), ("replay", "1KiB", 1_000.0)];

type Fixed = Response<Full<Bytes>>;
type FixedFuture = std::future::Ready<Result<Fixed, Infallible>>;

/// The trivial inner service: a fixed response, whatever the request body type.
fn inner<B>() -> impl Service<Request<B>, Response = Fixed, Error = Infallible, Future = FixedFuture>
+ Clone
+ Send
+ 'static
where
    B: Send + 'static,
{
    service_fn(|_req: Request<B>| {
        let mut response = Response::new(Full::new(Bytes::from_static(RESPONSE)));
        *response.status_mut() = StatusCode::CREATED;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        std::future::ready(Ok(response))
    })
}

/// A JSON body of exactly `size` bytes.
fn body_of(size: usize) -> Bytes {
    let head = br#"{"amount":1000,"currency":"EUR","customer":"cus_42","memo":""#;
    let tail = br#""}"#;
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(head);
    body.resize(size - tail.len(), b'x');
    body.extend_from_slice(tail);
    Bytes::from(body)
}

fn request(body: &Bytes, key: HeaderValue) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static("/payments");
    let headers = request.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer sk_test_0123456789abcdef"),
    );
    headers.insert("idempotency-key", key);
    request
}

/// A new key for every call, in the sf-string spelling.
fn fresh_key() -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    HeaderValue::try_from(format!("\"bench-{n:016x}\""))
        .unwrap_or(HeaderValue::from_static("\"x\""))
}

const REPLAY_KEY: HeaderValue = HeaderValue::from_static("\"bench-replayed-key-0001\"");

/// Calls `service` once and reads the whole response body, as a server would before writing it.
async fn call_once<S, B>(service: S, request: Request<Full<Bytes>>) -> StatusCode
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    match service.oneshot(request).await {
        Ok(response) => {
            let status = response.status();
            match response.into_body().collect().await {
                Ok(collected) => {
                    std::hint::black_box(collected.to_bytes());
                }
                Err(e) => panic!("response body failed: {e:?}"),
            }
            status
        }
        Err(e) => panic!("service failed: {e:?}"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Fresh,
    Replay,
}

/// Times `iters` requests inside a task on the runtime (see the module docs), with a store made
/// for this sample.
async fn sample(case: Case, layered: bool, body: Bytes, iters: u64) -> Duration {
    let task = tokio::spawn(async move {
        let layer = IdempotencyLayer::new(Arc::new(MemoryStore::builder().build()));
        let service = layer.layer(inner());
        let bare = inner::<Full<Bytes>>();
        if case == Case::Replay && layered {
            let status = call_once(service.clone(), request(&body, REPLAY_KEY)).await;
            assert_eq!(
                status,
                StatusCode::CREATED,
                "the first request must execute"
            );
        }
        let started = Instant::now();
        for _ in 0..iters {
            let key = match case {
                Case::Fresh => fresh_key(),
                Case::Replay => REPLAY_KEY,
            };
            let status = if layered {
                call_once(service.clone(), request(&body, key)).await
            } else {
                call_once(bare.clone(), request(&body, key)).await
            };
            // A 503 (store full) or a 409 would time the wrong path: stop rather than report it.
            assert_eq!(
                status,
                StatusCode::CREATED,
                "unexpected answer while measuring"
            );
        }
        let elapsed = started.elapsed();
        // Dropped here, after the timer stopped.
        drop((layer, service));
        elapsed
    });
    match task.await {
        Ok(elapsed) => elapsed,
        Err(e) => panic!("benchmark task failed: {e}"),
    }
}

fn bench_layer(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group(GROUP);
    for (size, label) in SIZES {
        let body = body_of(size);
        group.throughput(criterion::Throughput::Elements(1));
        for (case, case_name) in [(Case::Fresh, "fresh"), (Case::Replay, "replay")] {
            for (layered, which) in [(false, "bare"), (true, "layer")] {
                let id = BenchmarkId::new(format!("{case_name}/{which}"), label);
                group.bench_with_input(id, &body, |b, body| {
                    let name = format!("{case_name}/{which}/{label}");
                    b.to_async(rt).iter_custom(|iters| {
                        measured(&name, iters);
                        sample(case, layered, body.clone(), iters)
                    });
                });
            }
        }
    }
    group.finish();
}

/// The pieces of the layer's hot path, one by one, so a missed target can be traced to its
/// cause. Same request as above (1 KiB body unless the id says otherwise).
fn bench_parts(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    use idemgate::fingerprint::{FingerprintOptions, fingerprint};
    use idemgate::key::{KeyRules, key_from_headers};
    use idemgate::record::{Fingerprint, Outcome, RecordId, ResponseHead, Timestamp, Token};
    use idemgate::scope::{AuthorizationScope, ScopeResolver};
    use idemgate::store::{AcquireRequest, LeaseExpiry, Store};
    use std::hint::black_box;

    let mut group = c.benchmark_group(PARTS);
    let (parts, _) = request(&body_of(1024), REPLAY_KEY).into_parts();
    let rules = KeyRules::default();
    group.bench_function("key_from_headers", |b| {
        b.iter(|| key_from_headers(black_box(&parts.headers), &rules))
    });
    let Ok(Some(key)) = key_from_headers(&parts.headers, &rules) else {
        panic!("the bench key must parse");
    };
    group.bench_function("scope_and_record_id", |b| {
        b.iter(|| match AuthorizationScope.resolve(black_box(&parts)) {
            Ok(Some(scope)) => scope.record_id(&key),
            _ => panic!("the bench request has a scope"),
        })
    });
    let options = FingerprintOptions::default();
    for (size, label) in SIZES {
        let body = body_of(size);
        group.bench_with_input(BenchmarkId::new("fingerprint", label), &body, |b, body| {
            b.iter(|| fingerprint(black_box(&parts), body, &options))
        });
    }
    group.bench_function("token_random", |b| b.iter(Token::random));
    group.bench_function("timestamp_now", |b| b.iter(Timestamp::now));

    // The store alone: what `fresh` costs it (acquire a new id, then complete it with the
    // bench's response), and what `replay` costs it (acquire of a completed id).
    let outcome = Outcome::Response {
        head: ResponseHead {
            status: 201,
            headers: vec![(
                "content-type".to_owned(),
                Bytes::from_static(b"application/json"),
            )],
        },
        body: Bytes::from_static(RESPONSE),
    };
    let acquire = |n: u64| {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&n.to_le_bytes());
        // The memory store shards by the first byte: spread the ids as SHA-256 ids are.
        id[0] = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8;
        AcquireRequest {
            id: RecordId(id),
            fingerprint: Fingerprint([7; 32]),
            token: Token([n as u8; 16]),
            lease: Duration::from_secs(30),
            on_lease_expiry: LeaseExpiry::OutcomeUnknown,
            retention: Duration::from_secs(86_400),
        }
    };
    group.bench_function("memory_acquire_complete", |b| {
        let outcome = outcome.clone();
        b.to_async(rt).iter_custom(move |iters| {
            let outcome = outcome.clone();
            async move {
                let store = MemoryStore::builder().build();
                let started = Instant::now();
                for n in 0..iters {
                    let req = acquire(n);
                    let answer = store.acquire(req).await;
                    black_box(&answer);
                    let done = store
                        .complete(&req.id, req.token, &outcome, Duration::from_secs(86_400))
                        .await;
                    black_box(&done);
                }
                let elapsed = started.elapsed();
                drop(store);
                elapsed
            }
        })
    });
    group.bench_function("memory_acquire_completed", |b| {
        let outcome = outcome.clone();
        b.to_async(rt).iter_custom(move |iters| {
            let outcome = outcome.clone();
            async move {
                let store = MemoryStore::builder().build();
                let req = acquire(1);
                let _ = store.acquire(req).await;
                let _ = store
                    .complete(&req.id, req.token, &outcome, Duration::from_secs(86_400))
                    .await;
                let replay = AcquireRequest {
                    token: Token([2; 16]),
                    ..req
                };
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(store.acquire(replay).await.is_ok());
                }
                started.elapsed()
            }
        })
    });

    // The attempt task's machinery without the layer: from a task on a worker, spawn a task
    // that answers through a oneshot (with and without an armed 10 s timer, as the lease
    // heartbeat arms one), and await the answer.
    for (armed, name) in [(false, "spawn_oneshot"), (true, "spawn_oneshot_timer")] {
        group.bench_function(name, |b| {
            b.to_async(rt).iter_custom(move |iters| async move {
                let task = tokio::spawn(async move {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let (tx, rx) = tokio::sync::oneshot::channel::<u64>();
                        tokio::spawn(async move {
                            if armed {
                                let heartbeat = tokio::time::sleep(Duration::from_secs(10));
                                // Polled first, so the timer is registered (and then
                                // deregistered when dropped), as when the handler awaits.
                                tokio::select! {
                                    biased;
                                    _ = heartbeat => {}
                                    _ = std::future::ready(()) => {}
                                }
                            }
                            let _ = tx.send(1);
                        });
                        black_box(rx.await.is_ok());
                    }
                    started.elapsed()
                });
                match task.await {
                    Ok(elapsed) => elapsed,
                    Err(e) => panic!("benchmark task failed: {e}"),
                }
            })
        });
    }
    group.finish();
}

/// The benchmarks this run measured (more than the single call of `--test` mode), so the
/// summary never reports estimates left over from an earlier run.
static MEASURED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn measured(name: &str, iters: u64) {
    let mut measured = MEASURED.lock().unwrap_or_else(PoisonError::into_inner);
    if iters > 1 && !measured.iter().any(|n| n == name) {
        measured.push(name.to_owned());
    }
}

fn was_measured(name: &str) -> bool {
    MEASURED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .any(|n| n == name)
}

/// Where criterion writes its results (its own rule: `CRITERION_HOME`, else
/// `$CARGO_TARGET_DIR/criterion`, else the workspace's `target/criterion`).
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    // `target/tmp` for benches; its parent is the target directory.
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .map_or(tmp.clone(), |t| t.to_path_buf())
        .join("criterion")
}

/// Criterion's per-iteration estimate (slope when it has one, else the mean), in ns.
fn estimate(function: &str, size: &str) -> Option<f64> {
    if !was_measured(&format!("{function}/{size}")) {
        return None;
    }
    let path = criterion_dir()
        .join(GROUP)
        .join(function.replace('/', "_"))
        .join(size)
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(&path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let point = |stat: &str| json.get(stat)?.get("point_estimate")?.as_f64();
    point("slope").or_else(|| point("mean"))
}

fn print_added() {
    println!("\nAdded time per request (layer minus bare; criterion's slope estimates):");
    println!(
        "{:<8} {:>6} {:>12} {:>12} {:>12} {:>10}  verdict",
        "case", "body", "bare", "layer", "added", "target"
    );
    for case in ["fresh", "replay"] {
        for (_, size) in SIZES {
            let bare = estimate(&format!("{case}/bare"), size);
            let layer = estimate(&format!("{case}/layer"), size);
            let target = TARGETS
                .iter()
                .find(|(c, s, _)| *c == case && *s == size)
                .map(|t| t.2);
            let (Some(bare), Some(layer)) = (bare, layer) else {
                println!("{case:<8} {size:>6}   (not measured in this run)");
                continue;
            };
            let added = layer - bare;
            let verdict = match target {
                Some(t) if added <= t => "meets target",
                Some(_) => "MISSES target",
                None => "-",
            };
            println!(
                "{case:<8} {size:>6} {:>12} {:>12} {:>12} {:>10}  {verdict}",
                micros(bare),
                micros(layer),
                micros(added),
                target.map_or("-".to_owned(), micros),
            );
        }
    }
}

fn micros(ns: f64) -> String {
    format!("{:.2} µs", ns / 1_000.0)
}

fn main() {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_layer(&mut c, &rt);
    bench_parts(&mut c, &rt);
    c.final_summary();
    print_added();
}
