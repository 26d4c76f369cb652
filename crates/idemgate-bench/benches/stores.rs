//! Store benchmark: the store work of fresh requests (`acquire` of a new id + `complete` with a
//! ~200-byte outcome) and of replays (`acquire` of a completed id), per second, with p50/p99
//! latency, for every backend in one run:
//!
//! - `memory`: `idemgate::store::MemoryStore` (the yardstick; ratios are to it);
//! - `embedded`: `EmbeddedStore` (redb, fsync per group commit) in a temp dir under `target/`;
//! - `redis-aof-always`: a throwaway `redis-server`, `appendonly yes`, `appendfsync always`;
//! - `redis-no-persist`: a throwaway `redis-server` with no persistence at all (no AOF, no RDB);
//! - `postgres`: a throwaway PostgreSQL (`fsync = on`, `synchronous_commit = on`), the store's
//!   default pool of 10 connections.
//!
//! ```sh
//! nice -n 10 cargo bench -p idemgate-bench --bench stores
//! ```
//!
//! Environment (all optional): `IDEMGATE_BENCH_SECS` (measured seconds per cell, default 3),
//! `IDEMGATE_BENCH_WARMUP_SECS` (default 0.5), `IDEMGATE_BENCH_STORES` (comma-separated subset of
//! the names above), `IDEMGATE_BENCH_CONCURRENCY` (fresh cells, default `1,16,64`),
//! `IDEMGATE_BENCH_REPLAY_CONCURRENCY` (default 64), `IDEMGATE_BENCH_PG_POOL` (PostgreSQL pool
//! size, default the store's 10).
//!
//! Outside `cargo bench` (e.g. `cargo test --all-targets` runs bench targets without `--bench`)
//! it measures nothing and exits at once.

use std::any::Any;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemgate::store::{MemoryStore, Store};
use idemgate_bench::{CellResult, Keys, Timing, bench_outcome, fresh, replay};
use idemgate_store_embedded::EmbeddedStore;
use idemgate_store_postgres::PostgresStore;
use idemgate_store_redis::RedisStore;
use idemgate_store_tests::servers::postgres::PostgresServer;
use idemgate_store_tests::servers::redis::RedisServer;

/// The replay cell reads back at most this many of the ids the fresh cells completed: a working
/// set of recent keys, as retries are.
const REPLAY_KEYS: u64 = 10_000;

const ALL: [&str; 5] = [
    "memory",
    "embedded",
    "redis-aof-always",
    "redis-no-persist",
    "postgres",
];

struct Config {
    timing: Timing,
    stores: Vec<String>,
    concurrency: Vec<usize>,
    replay_concurrency: usize,
    pg_pool: Option<u32>,
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(None),
    }
}

fn secs(name: &str, default: f64) -> Result<Duration, String> {
    let s: f64 = env_parse(name)?.unwrap_or(default);
    Duration::try_from_secs_f64(s).map_err(|_| format!("{name}={s} is not a duration in seconds"))
}

impl Config {
    fn from_env() -> Result<Self, String> {
        let timing = Timing {
            warmup: secs("IDEMGATE_BENCH_WARMUP_SECS", 0.5)?,
            measure: secs("IDEMGATE_BENCH_SECS", 3.0)?,
        };
        let stores: Vec<String> = match std::env::var("IDEMGATE_BENCH_STORES") {
            Ok(v) => v
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            Err(_) => ALL.iter().map(|s| (*s).to_owned()).collect(),
        };
        if let Some(bad) = stores.iter().find(|s| !ALL.contains(&s.as_str())) {
            return Err(format!(
                "IDEMGATE_BENCH_STORES: unknown store {bad:?} (known: {})",
                ALL.join(", ")
            ));
        }
        let concurrency = match std::env::var("IDEMGATE_BENCH_CONCURRENCY") {
            Ok(v) => v
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    format!("IDEMGATE_BENCH_CONCURRENCY={v:?} is not a list of numbers")
                })?,
            Err(_) => vec![1, 16, 64],
        };
        Ok(Config {
            timing,
            stores,
            concurrency,
            replay_concurrency: env_parse("IDEMGATE_BENCH_REPLAY_CONCURRENCY")?.unwrap_or(64),
            pg_pool: env_parse("IDEMGATE_BENCH_PG_POOL")?,
        })
    }
}

/// One backend under test and whatever must outlive its store.
struct Backend {
    name: &'static str,
    /// What the configuration is, for the report.
    note: String,
    store: Arc<dyn Store>,
    /// The same store, typed, for its group-commit counters.
    embedded: Option<Arc<EmbeddedStore>>,
    // Dropped after the store (declaration order): servers, then their dirs.
    _server: Option<Box<dyn Any + Send>>,
    _dir: Option<tempfile::TempDir>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("setup thread failed: {e}"))
}

async fn setup(name: &str, cfg: &Config) -> Result<Backend, String> {
    match name {
        "memory" => Ok(Backend {
            name: "memory",
            // The bound is bookkeeping, not an allocation: high enough that a fast run never
            // reaches it (records are never expired during a run).
            note: "MemoryStore, capacity bound 8 GiB".into(),
            store: Arc::new(MemoryStore::builder().capacity_bytes(8 << 30).build()),
            embedded: None,
            _server: None,
            _dir: None,
        }),
        "embedded" => {
            // On the repository's own file system (target/tmp), not a tmpfs: fsync must cost
            // what it costs on a disk.
            let dir = tempfile::Builder::new()
                .prefix("idemgate-bench-embedded-")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .map_err(|e| format!("temp dir under {}: {e}", env!("CARGO_TARGET_TMPDIR")))?;
            let path = dir.path().join("idemgate.redb");
            let store = Arc::new(
                EmbeddedStore::builder(&path)
                    .open()
                    .map_err(|e| format!("open {}: {e}", path.display()))?,
            );
            Ok(Backend {
                name: "embedded",
                note: format!("EmbeddedStore defaults, file {}", path.display()),
                store: store.clone(),
                embedded: Some(store),
                _server: None,
                _dir: Some(dir),
            })
        }
        "redis-aof-always" | "redis-no-persist" => {
            let durable = name == "redis-aof-always";
            let server = blocking(move || {
                let b = RedisServer::builder().config("maxmemory-policy noeviction");
                if durable {
                    b.durable().start()
                } else {
                    b.config("appendonly no").start()
                }
            })
            .await?;
            let appendonly = server.cli(&["config", "get", "appendonly"]);
            let appendfsync = server.cli(&["config", "get", "appendfsync"]);
            let save = server.cli(&["config", "get", "save"]);
            let note = format!(
                "redis-server in {} ({}, {}, save {:?})",
                server.dir().display(),
                appendonly.split_whitespace().collect::<Vec<_>>().join(" "),
                appendfsync.split_whitespace().collect::<Vec<_>>().join(" "),
                save.lines().nth(1).unwrap_or_default().trim(),
            );
            let store = RedisStore::builder(server.url())
                .key_prefix("bench:")
                .connect()
                .await
                .map_err(|e| format!("connect to {}: {e}", server.url()))?;
            store
                .readiness()
                .await
                .map_err(|e| format!("redis readiness: {e}"))?;
            Ok(Backend {
                name: if durable {
                    "redis-aof-always"
                } else {
                    "redis-no-persist"
                },
                note,
                store: Arc::new(store),
                embedded: None,
                _server: Some(Box::new(server)),
                _dir: None,
            })
        }
        "postgres" => {
            let server = blocking(PostgresServer::start).await?;
            let (server, url, settings) = blocking(move || {
                let url = server.create_database("idemgate_bench");
                let settings = server.psql(
                    "idemgate_bench",
                    "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings \
                     WHERE name IN ('server_version', 'fsync', 'synchronous_commit', \
                                    'shared_buffers', 'wal_sync_method', 'commit_delay')",
                );
                (server, url, settings)
            })
            .await?;
            let mut builder = PostgresStore::builder(url.clone());
            if let Some(n) = cfg.pg_pool {
                builder = builder.max_connections(n);
            }
            let store = builder
                .connect()
                .await
                .map_err(|e| format!("connect to {url}: {e}"))?;
            Ok(Backend {
                name: "postgres",
                note: format!(
                    "PostgreSQL in {} (pool {}; {})",
                    server.dir().display(),
                    cfg.pg_pool.map_or("10 (default)".into(), |n| n.to_string()),
                    settings.trim()
                ),
                store: Arc::new(store),
                embedded: None,
                _server: Some(Box::new(server)),
                _dir: None,
            })
        }
        other => Err(format!("unknown store {other}")),
    }
}

struct Row {
    store: &'static str,
    workload: &'static str,
    concurrency: usize,
    result: CellResult,
    extra: String,
}

fn fmt_latency(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(1) => format!("{:.1} µs", d.as_secs_f64() * 1e6),
        Some(d) => format!("{:.2} ms", d.as_secs_f64() * 1e3),
    }
}

fn fmt_rate(r: f64) -> String {
    let n = r.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn fmt_ratio(rate: f64, memory: Option<f64>) -> String {
    match memory {
        Some(m) if m > 0.0 && rate > 0.0 => {
            let r = rate / m;
            if r >= 1.0 {
                format!("{r:.2}×")
            } else {
                format!("1/{:.0}", 1.0 / r)
            }
        }
        _ => "-".into(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

async fn bench_backend(backend: &Backend, cfg: &Config, rows: &mut Vec<Row>) {
    let keys = Arc::new(Keys::new());
    let counters = || backend.embedded.as_ref().map(|e| e.stats());
    let mut cells: Vec<(&'static str, usize)> =
        cfg.concurrency.iter().map(|&c| ("fresh", c)).collect();
    cells.push(("replay", cfg.replay_concurrency));
    for (workload, concurrency) in cells {
        let before = counters();
        let t = Instant::now();
        let result = if workload == "fresh" {
            fresh(
                Arc::clone(&backend.store),
                Arc::clone(&keys),
                concurrency,
                cfg.timing,
            )
            .await
        } else {
            let completed = keys.issued().min(REPLAY_KEYS);
            replay(
                Arc::clone(&backend.store),
                Arc::clone(&keys),
                completed,
                concurrency,
                cfg.timing,
            )
            .await
        };
        let extra = match (before, counters()) {
            (Some(b), Some(a)) if a.log_syncs > b.log_syncs => format!(
                "{:.1} ops/sync, {:.0} syncs/s",
                (a.operations - b.operations) as f64 / (a.log_syncs - b.log_syncs) as f64,
                (a.log_syncs - b.log_syncs) as f64 / t.elapsed().as_secs_f64()
            ),
            (Some(b), Some(a)) => format!("{} syncs", a.log_syncs - b.log_syncs),
            _ => String::new(),
        };
        eprintln!(
            "  {:<17} {:<6} c={:<3} {:>11}/s  p50 {:>9}  p99 {:>9}  errors {}{}  (load {})",
            backend.name,
            workload,
            concurrency,
            fmt_rate(result.rate()),
            fmt_latency(result.percentile(50.0)),
            fmt_latency(result.percentile(99.0)),
            result.errors,
            result
                .first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            loadavg(),
        );
        rows.push(Row {
            store: backend.name,
            workload,
            concurrency,
            result,
            extra,
        });
    }
}

fn print_table(rows: &[Row]) {
    let memory_rate = |workload: &str, c: usize| {
        rows.iter()
            .find(|r| r.store == "memory" && r.workload == workload && r.concurrency == c)
            .map(|r| r.result.rate())
    };
    println!();
    println!("| store | workload | concurrency | ops/s | vs memory | p50 | p99 | errors | notes |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let rate = r.result.rate();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.store,
            if r.workload == "fresh" {
                "fresh (acquire+complete)"
            } else {
                "replay (acquire)"
            },
            r.concurrency,
            fmt_rate(rate),
            fmt_ratio(rate, memory_rate(r.workload, r.concurrency)),
            fmt_latency(r.result.percentile(50.0)),
            fmt_latency(r.result.percentile(99.0)),
            r.result.errors,
            match &r.result.first_error {
                Some(e) if r.extra.is_empty() => format!("first error: {e}"),
                Some(e) => format!("{}; first error: {e}", r.extra),
                None => r.extra.clone(),
            }
        );
    }
}

async fn run(cfg: Config) -> ExitCode {
    let started = Instant::now();
    println!(
        "idemgate store benchmark: {} s measured (+{} s warm-up) per cell, fresh at concurrency \
         {:?}, replay at {}; outcome {} bytes encoded; {} CPUs; load average at start {}",
        cfg.timing.measure.as_secs_f64(),
        cfg.timing.warmup.as_secs_f64(),
        cfg.concurrency,
        cfg.replay_concurrency,
        bench_outcome().encode().len(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
    );
    let mut rows = Vec::new();
    let mut failed = false;
    for name in &cfg.stores {
        let backend = match setup(name, &cfg).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{name}: setup failed: {e}");
                failed = true;
                continue;
            }
        };
        eprintln!("{}: {}", backend.name, backend.note);
        bench_backend(&backend, &cfg, &mut rows).await;
        // Dropping the embedded store joins its writer thread and stopping a server waits for
        // it: keep both off the async workers.
        let _ = blocking(move || drop(backend)).await;
    }
    print_table(&rows);
    println!(
        "\ntotal {:.0} s; load average at end {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    if failed || rows.iter().any(|r| r.result.errors > 0) {
        eprintln!("some cells failed or saw errors (see above)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("stores: a benchmark; run it with `cargo bench -p idemgate-bench --bench stores`");
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stores: {e}");
            // EX_USAGE, as for any bad configuration.
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stores: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cfg))
}
