//! Opening the configured store, and the wrapper that remembers which records this process
//! holds, so that shutdown can write the unfinished ones as outcome-unknown (SPEC §5).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idemgate::record::{Outcome, Record, RecordId, StoredProblemKind, Timestamp, Token};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, Deletion, Release, Renewal, Resolution, Resolved, Store,
    StoreError, Watch,
};

use crate::config::StoreSpec;
use crate::metrics::Metrics;

/// Whether this build can open the store a spec names (checked with the rest of the config, so
/// an unavailable backend is a configuration error, exit 64).
pub fn available(spec: &StoreSpec) -> Result<(), String> {
    match spec {
        StoreSpec::Memory => Ok(()),
        StoreSpec::File(_) if !cfg!(feature = "embedded") => Err(
            "the embedded (file:) store is not available in this build (feature `embedded`)".into(),
        ),
        StoreSpec::Redis(_) if !cfg!(feature = "redis") => {
            Err("the Redis store is not available in this build (feature `redis`)".into())
        }
        StoreSpec::Postgres(_) if !cfg!(feature = "postgres") => Err(POSTGRES_MISSING.into()),
        _ => Ok(()),
    }
}

const POSTGRES_MISSING: &str =
    "the PostgreSQL store is not available in this build (feature `postgres`)";

/// Opens the store a spec names; `pool_size` is the PostgreSQL store's (`None`: its default;
/// other stores take none).
pub async fn open(spec: &StoreSpec, pool_size: Option<u32>) -> Result<Arc<dyn Store>, String> {
    match spec {
        StoreSpec::Memory => open_memory(),
        StoreSpec::File(path) => open_file(path).await,
        StoreSpec::Redis(url) => open_redis(url).await,
        StoreSpec::Postgres(url) => open_postgres(url, pool_size).await,
    }
}

fn open_memory() -> Result<Arc<dyn Store>, String> {
    Ok(Arc::new(idemgate::store::MemoryStore::builder().build()))
}

#[cfg(feature = "embedded")]
async fn open_file(path: &std::path::Path) -> Result<Arc<dyn Store>, String> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    // Every store call in the proxy is awaited by a task of its worker's runtime.
    let builder =
        idemgate_store_embedded::EmbeddedStore::builder(path.to_owned()).batched_wakeups(true);
    let store = tokio::task::spawn_blocking(move || builder.open())
        .await
        .map_err(|e| format!("opening the embedded store failed: {e}"))?
        .map_err(|e| e.to_string())?;
    let report = store.open_report();
    tracing::info!(
        path = %path.display(),
        epoch = report.epoch,
        converted_leases = report.converted_leases,
        repaired = report.repaired,
        took_ms = report.duration.as_millis() as u64,
        "embedded store open"
    );
    if report.converted_leases > 0 {
        tracing::warn!(
            count = report.converted_leases,
            "requests in flight when the previous process stopped are now outcome-unknown"
        );
    }
    Ok(Arc::new(store))
}

#[cfg(not(feature = "embedded"))]
async fn open_file(_path: &std::path::Path) -> Result<Arc<dyn Store>, String> {
    Err("the embedded (file:) store is not available in this build (feature `embedded`)".into())
}

#[cfg(feature = "redis")]
async fn open_redis(url: &str) -> Result<Arc<dyn Store>, String> {
    let store = idemgate_store_redis::RedisStore::builder(url)
        .connect()
        .await
        .map_err(|e| format!("redis store {}: {e}", crate::config::redact(url)))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "redis"))]
async fn open_redis(_url: &str) -> Result<Arc<dyn Store>, String> {
    Err("the Redis store is not available in this build (feature `redis`)".into())
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str, pool_size: Option<u32>) -> Result<Arc<dyn Store>, String> {
    let mut builder = idemgate_store_postgres::PostgresStore::builder(url);
    if let Some(size) = pool_size {
        builder = builder.max_connections(size);
    }
    let store = builder
        .connect()
        .await
        .map_err(|e| format!("postgres store {}: {e}", crate::config::redact(url)))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str, _pool_size: Option<u32>) -> Result<Arc<dyn Store>, String> {
    Err(POSTGRES_MISSING.into())
}

/// A store wrapper that remembers the records this process acquired and has not finished.
///
/// At shutdown, once the grace period is over, [`Tracked::write_off`] completes each with the
/// outcome-unknown problem under its own token: a retry then gets 502 outcome-unknown at once
/// instead of waiting for the lease to lapse, and the attempt, if it still finishes in the last
/// moments, replaces the placeholder with its real outcome (its token wrote it).
pub struct Tracked {
    /// Called as `inner.as_ref()`: `Arc<dyn Store>` implements `Store` too (forwarding), and
    /// going through it boxes one more future per operation.
    inner: Arc<dyn Store>,
    /// (record, token) → the retention an outcome-unknown placeholder gets, sharded by record
    /// id: every fresh request inserts and removes an entry, and one lock for all of them was
    /// a point where every worker thread met every other.
    held: [Mutex<HeldShard>; HELD_SHARDS],
    metrics: Option<Arc<Metrics>>,
}

/// foldhash rather than SipHash: ids are SHA-256 digests, and this map is touched twice per
/// fresh request.
type HeldShard = HashMap<(RecordId, Token), Duration, foldhash::fast::RandomState>;

/// Shards of [`Tracked`]'s held set: a power of two well above the worker thread count.
const HELD_SHARDS: usize = 32;

impl Tracked {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, metrics: Option<Arc<Metrics>>) -> Self {
        Tracked {
            inner,
            held: std::array::from_fn(|_| Mutex::new(HeldShard::default())),
            metrics,
        }
    }

    fn shard(&self, id: &RecordId) -> std::sync::MutexGuard<'_, HeldShard> {
        // Record ids are SHA-256 digests, so their first byte spreads them evenly.
        lock(&self.held[usize::from(id.0[0]) % HELD_SHARDS])
    }

    /// How many acquired records are unfinished.
    pub fn unfinished(&self) -> usize {
        self.held.iter().map(|s| lock(s).len()).sum()
    }

    /// Completes every unfinished record as outcome-unknown; returns how many were written.
    pub async fn write_off(&self) -> usize {
        let held: Vec<((RecordId, Token), Duration)> = self
            .held
            .iter()
            .flat_map(|s| lock(s).drain().collect::<Vec<_>>())
            .collect();
        let mut written = 0;
        for ((id, token), ttl) in held {
            let outcome = Outcome::Problem {
                kind: StoredProblemKind::OutcomeUnknown,
                status: 502,
            };
            match self
                .inner
                .as_ref()
                .complete(&id, token, &outcome, ttl)
                .await
            {
                Ok(Completion::Stored) => {
                    written += 1;
                    tracing::warn!(record_id = %id, "shutdown: unfinished request recorded as outcome-unknown");
                }
                Ok(Completion::Refused) => {
                    tracing::warn!(record_id = %id, "shutdown: record already owned by another attempt");
                }
                Err(e) => tracing::error!(
                    record_id = %id,
                    error = %e,
                    "shutdown: could not record outcome-unknown; the lease rules will"
                ),
            }
        }
        written
    }
}

fn lock(shard: &Mutex<HeldShard>) -> std::sync::MutexGuard<'_, HeldShard> {
    // A panic while holding this lock cannot leave the map inconsistent (single inserts and
    // removes), so a poisoned lock is still usable.
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Store for Tracked {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Acquire, StoreError> {
        let answer = self.inner.as_ref().acquire(req).await?;
        match &answer {
            Acquire::Acquired { .. } => {
                self.shard(&req.id)
                    .insert((req.id, req.token), req.retention);
            }
            Acquire::Completed(c) if c.outcome.is_outcome_unknown() => {
                // A placeholder written by this very call expires a full retention from now;
                // an older one has less left.
                let fresh = Timestamp::now()
                    .after(req.retention)
                    .0
                    .saturating_sub(c.expires_at.0)
                    < 2_000;
                if fresh
                    && c.origin_token != req.token
                    && let Some(m) = &self.metrics
                {
                    m.lease_takeover();
                }
            }
            _ => {}
        }
        Ok(answer)
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: Token,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        self.inner.as_ref().renew(id, token, lease).await
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let r = self
            .inner
            .as_ref()
            .complete(id, token, outcome, ttl)
            .await?;
        self.shard(id).remove(&(*id, token));
        Ok(r)
    }

    async fn release(&self, id: &RecordId, token: Token) -> Result<Release, StoreError> {
        let r = self.inner.as_ref().release(id, token).await?;
        self.shard(id).remove(&(*id, token));
        Ok(r)
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        self.inner.as_ref().get(id).await
    }

    async fn delete(&self, id: &RecordId, force: bool) -> Result<Deletion, StoreError> {
        self.inner.as_ref().delete(id, force).await
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution) -> Result<Resolved, StoreError> {
        self.inner.as_ref().resolve(id, resolution).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.inner.as_ref().purge_expired().await
    }

    async fn watch(&self, id: &RecordId, max_waiters: usize) -> Result<Option<Watch>, StoreError> {
        self.inner.as_ref().watch(id, max_waiters).await
    }

    async fn readiness(&self) -> Result<(), StoreError> {
        self.inner.as_ref().readiness().await
    }
}
