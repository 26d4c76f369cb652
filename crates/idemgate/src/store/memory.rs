//! The in-memory store ([`MemoryStore`]).

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Acquire, AcquireRequest, Completion, Deletion, Release, Renewal, Resolution, Resolved, Store,
    StoreError, Watch, WatchHub, decide_acquire,
};
use crate::record::{
    Completed, Fingerprint, Holder, InFlight, Outcome, Record, RecordId, Timestamp, Token,
};

const SHARDS: usize = 64;

/// Bytes charged per record on top of its outcome: the map slot (id and record) plus the
/// hash-table control bytes and allocator slack, rounded up.
const RECORD_OVERHEAD: usize = std::mem::size_of::<(RecordId, Entry)>() + 16;

/// Default capacity bound: 256 MiB.
const DEFAULT_CAPACITY: usize = 256 << 20;
/// Default period of the background expiry task.
const DEFAULT_EXPIRY_INTERVAL: Duration = Duration::from_secs(10);
/// When full, purge expired records to make room at most this often, so a store that stays full
/// does not scan every record on every rejected request.
const PURGE_ON_FULL_EVERY_MS: u64 = 1000;

/// What a slot holds.
#[derive(Debug)]
enum Entry {
    InFlight(InFlight),
    Completed(StoredCompleted),
    /// A slot this store cannot read. It never arises by itself in memory; tests put it there
    /// ([`MemoryStore::insert_unreadable`]) to check that unreadable records are never treated as
    /// absent, as durable stores must with version skew or a lost key.
    Unreadable,
}

/// A completed record with its outcome kept encoded ([`Outcome::encode`]): one allocation the
/// size of the response, where the decoded form takes one per header name and value plus the
/// header list and the body. Measured through the proxy (300 000 fresh records of a small JSON
/// response with five headers): ~410 bytes of RSS per record, against ~660 decoded. A replay
/// decodes it: ~3 % more instructions than cloning the decoded form.
#[derive(Debug)]
struct StoredCompleted {
    fingerprint: Fingerprint,
    origin_token: Token,
    expires_at: Timestamp,
    outcome_unknown: bool,
    outcome: Box<[u8]>,
}

impl Entry {
    /// A completed record's entry, its outcome encoded.
    fn completed(
        fingerprint: Fingerprint,
        origin_token: Token,
        expires_at: Timestamp,
        outcome: &Outcome,
    ) -> Entry {
        Entry::Completed(StoredCompleted {
            fingerprint,
            origin_token,
            expires_at,
            outcome_unknown: outcome.is_outcome_unknown(),
            outcome: outcome.encode().into_boxed_slice(),
        })
    }

    fn new(record: Record) -> Entry {
        match record {
            Record::InFlight(f) => Entry::InFlight(f),
            Record::Completed(c) => {
                Entry::completed(c.fingerprint, c.origin_token, c.expires_at, &c.outcome)
            }
        }
    }

    /// The record, decoded; an entry that does not decode is `Corrupt`, never absent.
    fn record(&self, id: &RecordId) -> Result<Record, StoreError> {
        match self {
            Entry::InFlight(f) => Ok(Record::InFlight(f.clone())),
            Entry::Completed(c) => Ok(Record::Completed(Completed {
                fingerprint: c.fingerprint,
                outcome: Outcome::decode(&c.outcome).map_err(|_| corrupt(id))?,
                expires_at: c.expires_at,
                origin_token: c.origin_token,
            })),
            Entry::Unreadable => Err(corrupt(id)),
        }
    }
}

fn entry_size(e: &Entry) -> usize {
    match e {
        Entry::InFlight(_) | Entry::Unreadable => RECORD_OVERHEAD,
        Entry::Completed(c) => RECORD_OVERHEAD + c.outcome.len(),
    }
}

/// Configures a [`MemoryStore`].
#[derive(Clone, Debug)]
#[must_use]
pub struct MemoryStoreBuilder {
    capacity_bytes: usize,
    expiry_interval: Duration,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder {
            capacity_bytes: DEFAULT_CAPACITY,
            expiry_interval: DEFAULT_EXPIRY_INTERVAL,
        }
    }
}

impl MemoryStoreBuilder {
    /// The bound on stored bytes (default 256 MiB); past it, new records get
    /// [`StoreError::Full`].
    pub fn capacity_bytes(mut self, bytes: usize) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// How often the background task purges expired records (default 10 s; at least 1 ms).
    pub fn expiry_interval(mut self, every: Duration) -> Self {
        self.expiry_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Builds the store.
    ///
    /// Called inside a tokio runtime, this starts the background expiry task on it. Called
    /// outside one, the task starts lazily on the first `acquire` made inside a tokio runtime.
    /// The task holds only a weak reference and stops when the last clone of the store is
    /// dropped.
    pub fn build(self) -> MemoryStore {
        let inner = Arc::new(Inner {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            used: AtomicUsize::new(0),
            capacity: self.capacity_bytes,
            // Random so that epochs of distinct stores never coincide.
            epoch: AtomicU64::new(rand::random()),
            hub: WatchHub::new(),
            expiry_interval: self.expiry_interval,
            expiry_started: AtomicBool::new(false),
            expiry_task: Mutex::new(None),
            last_purge_on_full: AtomicU64::new(0),
        });
        start_expiry(&inner);
        MemoryStore { inner }
    }
}

/// The in-memory [`Store`]: for tests, single-process services, and as the reference backend.
///
/// - **Sharded**: 64 shards, each a `std::sync::Mutex<HashMap>`, picked by a byte of the
///   record id (itself a SHA-256, so evenly spread). No lock is global and none is held across
///   an `.await`; every operation is a short critical section on one shard, which is what makes
///   each operation atomic on its record.
/// - **Bounded**: every record costs [`MemoryStore::RECORD_OVERHEAD`] bytes plus its
///   outcome's encoded length ([`Outcome::encode`], the form a completed record is kept in). An `acquire` that would create a record, a `complete` or a
///   `resolve` that would go past the bound fails with [`StoreError::Full`]; live records are
///   never evicted, but expired ones are purged first to make room.
/// - **Expiry**: a background task purges expired completed records every `expiry_interval`
///   (default 10 s). Expired records are never served in the meantime: `acquire` treats them as
///   absent.
/// - **Leases are judged by holder liveness**: the store has an instance epoch ([`Holder`]); every
///   in-flight record carries the epoch that wrote it, and its lease has lapsed iff that epoch is
///   no longer current. In one process the holder is alive as long as the store is, so a lease
///   lapses only through [`MemoryStore::lapse_all_leases`] (which simulates the holder process's
///   death); `lease_expires_at` is informational.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use idemgate::record::{Fingerprint, RecordId, Token};
/// use idemgate::store::{Acquire, AcquireRequest, LeaseExpiry, MemoryStore, Store};
///
/// let store = MemoryStore::builder().capacity_bytes(64 << 20).build();
/// let req = AcquireRequest {
///     id: RecordId([1; 32]),
///     fingerprint: Fingerprint([2; 32]),
///     token: Token::random(),
///     lease: Duration::from_secs(30),
///     on_lease_expiry: LeaseExpiry::OutcomeUnknown,
///     retention: Duration::from_secs(86_400),
/// };
/// assert!(matches!(store.acquire(req).await, Ok(Acquire::Acquired { .. })));
/// # }
/// ```
///
/// Cheap to clone: clones share the same records.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("used_bytes", &self.used_bytes())
            .field("capacity_bytes", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

/// One shard's records. Ids are SHA-256 digests already, so the map needs no keyed SipHash
/// over them; foldhash (with a random per-map seed) is a fraction of its cost.
type Shard = HashMap<RecordId, Entry, RandomState>;

struct Inner {
    // The records. Sharded by the first byte of the id so concurrent requests on different keys
    // rarely contend; std Mutex because critical sections are short and never span an await.
    shards: Box<[Mutex<Shard>]>,
    // Bytes charged for all records, updated under the shard lock of the record that changes,
    // so the sum always matches the records present.
    used: AtomicUsize,
    capacity: usize,
    // The current holder epoch: in-flight records of any other epoch have lapsed.
    epoch: AtomicU64,
    hub: WatchHub,
    expiry_interval: Duration,
    expiry_started: AtomicBool,
    // Lets dropping the store stop the expiry task at once instead of at its next tick.
    expiry_task: Mutex<Option<tokio::task::AbortHandle>>,
    last_purge_on_full: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.expiry_task).take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its map and the byte count consistent before anything that
    // could panic, so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn start_expiry(inner: &Arc<Inner>) {
    if inner.expiry_started.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime yet: the next acquire made inside one starts the task.
        inner.expiry_started.store(false, Ordering::Release);
        return;
    };
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let every = inner.expiry_interval;
    let task = runtime.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            // Upgrade only for the purge itself, so the task never keeps the store alive.
            let Some(inner) = weak.upgrade() else { break };
            inner.purge(Timestamp::now());
        }
    });
    *lock(&inner.expiry_task) = Some(task.abort_handle());
}

/// Whether an operation finished or needs room the store does not have.
enum Attempt<T> {
    Done(T),
    NoRoom,
}

fn corrupt(id: &RecordId) -> StoreError {
    StoreError::Corrupt(format!("record {id} is unreadable"))
}

fn read(entry: Option<&Entry>, id: &RecordId) -> Result<Option<Record>, StoreError> {
    entry.map(|e| e.record(id)).transpose()
}

impl Inner {
    fn shard(&self, id: &RecordId) -> MutexGuard<'_, Shard> {
        lock(&self.shards[id.0[0] as usize % SHARDS])
    }

    fn holder(&self) -> Holder {
        Holder(self.epoch.load(Ordering::Acquire))
    }

    /// Charges the change of one record from `old` to `new` bytes. Growth past the capacity is
    /// refused when `enforce` (nothing is charged then).
    fn charge(&self, old: usize, new: usize, enforce: bool) -> bool {
        if new <= old {
            self.used.fetch_sub(old - new, Ordering::Relaxed);
            return true;
        }
        let grow = new - old;
        if !enforce {
            self.used.fetch_add(grow, Ordering::Relaxed);
            return true;
        }
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(grow).filter(|n| *n <= self.capacity)
            })
            .is_ok()
    }

    /// Removes completed records past retention; returns how many.
    fn purge(&self, now: Timestamp) -> u64 {
        let mut purged = 0;
        for shard in self.shards.iter() {
            let mut map = lock(shard);
            let mut freed = 0;
            map.retain(|_, e| match e {
                Entry::Completed(c) if c.expires_at <= now => {
                    freed += entry_size(e);
                    purged += 1;
                    false
                }
                _ => true,
            });
            self.used.fetch_sub(freed, Ordering::Relaxed);
        }
        purged
    }

    /// Runs `op`; if it found no room, purges expired records (at most once a second) and runs
    /// it again; still no room → `Full`.
    fn with_room<T>(
        &self,
        mut op: impl FnMut(Timestamp) -> Result<Attempt<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let now = Timestamp::now();
        if let Attempt::Done(v) = op(now)? {
            return Ok(v);
        }
        let last = self.last_purge_on_full.load(Ordering::Relaxed);
        let may_purge = now.0.saturating_sub(last) >= PURGE_ON_FULL_EVERY_MS
            && self
                .last_purge_on_full
                .compare_exchange(last, now.0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        let retried = if may_purge && self.purge(now) > 0 {
            op(Timestamp::now())?
        } else {
            Attempt::NoRoom
        };
        if let Attempt::Done(v) = retried {
            return Ok(v);
        }
        Err(StoreError::Full(format!(
            "memory store holds {} of {} bytes",
            self.used.load(Ordering::Relaxed),
            self.capacity
        )))
    }

    fn acquire(
        &self,
        req: &AcquireRequest,
        now: Timestamp,
    ) -> Result<Attempt<(Acquire, bool)>, StoreError> {
        let holder = self.holder();
        let mut shard = self.shard(&req.id);
        let current = shard.get(&req.id);
        let old = current.map_or(0, entry_size);
        let current = read(current, &req.id)?;
        let (answer, write) = decide_acquire(current, req, now, holder, |f| f.holder != holder);
        let Some(record) = write else {
            return Ok(Attempt::Done((answer, false)));
        };
        // A new lease creates (or takes over) a record and is bounded; a placeholder replaces a
        // lapsed lease in place and must never fail, or the lapsed lease could not be settled.
        let converts = matches!(record, Record::Completed(_));
        let entry = Entry::new(record);
        if !self.charge(old, entry_size(&entry), !converts) {
            return Ok(Attempt::NoRoom);
        }
        shard.insert(req.id, entry);
        Ok(Attempt::Done((answer, converts)))
    }

    fn complete(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<Attempt<Completion>, StoreError> {
        let mut shard = self.shard(id);
        let (fingerprint, old) = match shard.get(id) {
            Some(Entry::Unreadable) => return Err(corrupt(id)),
            // Nothing to fence and no fingerprint to write a record under: the record was
            // released, deleted or expired meanwhile, and the key is free for the next attempt.
            None => return Ok(Attempt::Done(Completion::Stored)),
            // The fencing of `may_complete`, read off the entry without decoding its outcome.
            Some(e @ Entry::InFlight(f)) if f.token == token => (f.fingerprint, entry_size(e)),
            Some(e @ Entry::Completed(c)) if c.origin_token == token => {
                (c.fingerprint, entry_size(e))
            }
            Some(_) => return Ok(Attempt::Done(Completion::Refused)),
        };
        let entry = Entry::completed(fingerprint, token, now.after(ttl), outcome);
        if !self.charge(old, entry_size(&entry), true) {
            return Ok(Attempt::NoRoom);
        }
        shard.insert(*id, entry);
        Ok(Attempt::Done(Completion::Stored))
    }

    fn resolve(
        &self,
        id: &RecordId,
        resolution: &Resolution,
        now: Timestamp,
    ) -> Result<Attempt<Resolved>, StoreError> {
        let mut shard = self.shard(id);
        let (fingerprint, old) = match shard.get(id) {
            None => return Ok(Attempt::Done(Resolved::NotFound)),
            Some(Entry::Unreadable) => return Err(corrupt(id)),
            Some(e @ Entry::Completed(c)) if c.outcome_unknown => (c.fingerprint, entry_size(e)),
            Some(_) => return Ok(Attempt::Done(Resolved::NotOutcomeUnknown)),
        };
        match resolution {
            Resolution::Release => {
                shard.remove(id);
                self.charge(old, 0, false);
            }
            Resolution::Respond { outcome, ttl } => {
                // The operator's answer is final: a fresh origin fences out the lapsed holder's
                // late `complete`, which would otherwise replace it.
                let entry =
                    Entry::completed(fingerprint, Token::random(), now.after(*ttl), outcome);
                if !self.charge(old, entry_size(&entry), true) {
                    return Ok(Attempt::NoRoom);
                }
                shard.insert(*id, entry);
            }
        }
        Ok(Attempt::Done(Resolved::Resolved))
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// Bytes charged per record on top of its outcome's encoded length ([`Outcome::encode`]).
    pub const RECORD_OVERHEAD: usize = RECORD_OVERHEAD;

    /// A store with the default settings (256 MiB, expiry every 10 s). See
    /// [`MemoryStoreBuilder::build`] for when the expiry task starts.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures a store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// Starts a new holder epoch, as if the process holding the leases had died: every record
    /// in flight so far is judged lapsed by the next `acquire` that meets it (which settles it by
    /// its [`LeaseExpiry`](super::LeaseExpiry)), and its holder can no longer `renew` it.
    /// Records acquired afterwards belong to the new epoch.
    ///
    /// Used by tests (the conformance harness) and by an application that knows its in-flight
    /// work was abandoned.
    pub fn lapse_all_leases(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Puts an unreadable entry into `id`'s slot (replacing any record), as version skew or a lost
    /// encryption key leaves in a durable store. For tests: every operation that meets it must
    /// return [`StoreError::Corrupt`], never treat it as absent.
    pub fn insert_unreadable(&self, id: &RecordId) {
        let mut shard = self.inner.shard(id);
        let old = shard.get(id).map_or(0, entry_size);
        self.inner.charge(old, RECORD_OVERHEAD, false);
        shard.insert(*id, Entry::Unreadable);
    }

    /// Bytes currently charged against the capacity.
    pub fn used_bytes(&self) -> usize {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// The capacity bound in bytes.
    pub fn capacity_bytes(&self) -> usize {
        self.inner.capacity
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Acquire, StoreError> {
        if !self.inner.expiry_started.load(Ordering::Relaxed) {
            start_expiry(&self.inner);
        }
        let (answer, converted) = self.inner.with_room(|now| self.inner.acquire(&req, now))?;
        if converted {
            self.inner.hub.notify(&req.id);
        }
        Ok(answer)
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: Token,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        let holder = self.inner.holder();
        let mut shard = self.inner.shard(id);
        match shard.get_mut(id) {
            Some(Entry::Unreadable) => Err(corrupt(id)),
            // A lease of a past epoch has lapsed: its holder is gone, renewing cannot revive it.
            Some(Entry::InFlight(f)) if f.token == token && f.holder == holder => {
                f.lease_expires_at = Timestamp::now().after(lease);
                Ok(Renewal::Renewed {
                    lease_expires_at: f.lease_expires_at,
                })
            }
            _ => Ok(Renewal::Refused),
        }
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let done = self
            .inner
            .with_room(|now| self.inner.complete(id, token, outcome, ttl, now))?;
        if done == Completion::Stored {
            self.inner.hub.notify(id);
        }
        Ok(done)
    }

    async fn release(&self, id: &RecordId, token: Token) -> Result<Release, StoreError> {
        let released = {
            let mut shard = self.inner.shard(id);
            match shard.get(id) {
                None => return Ok(Release::Released),
                Some(Entry::Unreadable) => return Err(corrupt(id)),
                Some(e @ Entry::InFlight(f)) if f.token == token => {
                    let size = entry_size(e);
                    shard.remove(id);
                    self.inner.charge(size, 0, false);
                    Release::Released
                }
                // Another attempt's lease, or a completed record (including the placeholder of
                // this token's own lapsed lease, which duplicates may already have replayed).
                Some(Entry::InFlight(_) | Entry::Completed(_)) => Release::Refused,
            }
        };
        if released == Release::Released {
            self.inner.hub.notify(id);
        }
        Ok(released)
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        read(self.inner.shard(id).get(id), id)
    }

    async fn delete(&self, id: &RecordId, force: bool) -> Result<Deletion, StoreError> {
        {
            let mut shard = self.inner.shard(id);
            let size = match shard.get(id) {
                None => return Ok(Deletion::NotFound),
                // Unreadable may be in flight: only a forced delete may clear it.
                Some(Entry::Unreadable) if !force => return Err(corrupt(id)),
                Some(Entry::InFlight(_)) if !force => {
                    return Ok(Deletion::InFlightNeedsForce);
                }
                Some(e) => entry_size(e),
            };
            shard.remove(id);
            self.inner.charge(size, 0, false);
        }
        self.inner.hub.notify(id);
        Ok(Deletion::Deleted)
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution) -> Result<Resolved, StoreError> {
        let done = self
            .inner
            .with_room(|now| self.inner.resolve(id, &resolution, now))?;
        if done == Resolved::Resolved {
            self.inner.hub.notify(id);
        }
        Ok(done)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        Ok(self.inner.purge(Timestamp::now()))
    }

    async fn watch(&self, id: &RecordId, max_waiters: usize) -> Result<Option<Watch>, StoreError> {
        Ok(self.inner.hub.watch(id, max_waiters))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::record::{Fingerprint, ResponseHead};
    use crate::store::LeaseExpiry;
    use bytes::Bytes;

    fn req(id: u8, token: Token) -> AcquireRequest {
        AcquireRequest {
            id: RecordId([id; 32]),
            fingerprint: Fingerprint([1; 32]),
            token,
            lease: Duration::from_secs(30),
            on_lease_expiry: LeaseExpiry::OutcomeUnknown,
            retention: Duration::from_secs(60),
        }
    }

    fn response(body: usize) -> Outcome {
        Outcome::Response {
            head: ResponseHead {
                status: 200,
                headers: vec![("x".into(), Bytes::from_static(b"y"))],
            },
            body: Bytes::from(vec![7; body]),
        }
    }

    const TTL: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn capacity_accounting_follows_every_change() {
        let s = MemoryStore::new();
        let t = Token::random();
        let id = RecordId([1; 32]);
        assert_eq!(s.used_bytes(), 0);
        s.acquire(req(1, t)).await.unwrap();
        assert_eq!(s.used_bytes(), RECORD_OVERHEAD);
        let small = response(100);
        s.complete(&id, t, &small, TTL).await.unwrap();
        assert_eq!(s.used_bytes(), RECORD_OVERHEAD + small.encode().len());
        // The same token completing again with a bigger outcome replaces, not adds.
        let big = response(5000);
        s.complete(&id, t, &big, TTL).await.unwrap();
        assert_eq!(s.used_bytes(), RECORD_OVERHEAD + big.encode().len());
        assert_eq!(s.delete(&id, false).await, Ok(Deletion::Deleted));
        assert_eq!(s.used_bytes(), 0);

        // Release frees; a lapsed lease's placeholder, then its late complete, are re-charged.
        s.acquire(req(2, t)).await.unwrap();
        s.release(&RecordId([2; 32]), t).await.unwrap();
        assert_eq!(s.used_bytes(), 0);
        s.acquire(req(3, t)).await.unwrap();
        s.lapse_all_leases();
        let other = s.acquire(req(3, Token::random())).await.unwrap();
        assert!(matches!(other, Acquire::Completed(_)));
        let placeholder = RECORD_OVERHEAD + Outcome::outcome_unknown().encode().len();
        assert_eq!(s.used_bytes(), placeholder);
        s.complete(&RecordId([3; 32]), t, &small, TTL)
            .await
            .unwrap();
        assert_eq!(s.used_bytes(), RECORD_OVERHEAD + small.encode().len());
        assert_eq!(
            s.resolve(&RecordId([3; 32]), Resolution::Release).await,
            Ok(Resolved::NotOutcomeUnknown)
        );
        s.delete(&RecordId([3; 32]), false).await.unwrap();
        assert_eq!(s.used_bytes(), 0);
    }

    #[tokio::test]
    async fn expired_records_are_freed_by_purge() {
        let s = MemoryStore::new();
        for id in 1..=3u8 {
            let t = Token::random();
            s.acquire(req(id, t)).await.unwrap();
            let ttl = if id == 3 { TTL } else { Duration::ZERO };
            s.complete(&RecordId([id; 32]), t, &response(10), ttl)
                .await
                .unwrap();
        }
        assert_eq!(s.purge_expired().await, Ok(2));
        assert_eq!(
            s.used_bytes(),
            RECORD_OVERHEAD + response(10).encode().len()
        );
        assert_eq!(s.purge_expired().await, Ok(0));
    }

    #[tokio::test]
    async fn full_refuses_new_records_keeps_live_ones_and_purges_expired_for_room() {
        let one = RECORD_OVERHEAD + response(1000).encode().len();
        let s = MemoryStore::builder().capacity_bytes(2 * one).build();
        let (a, b) = (Token::random(), Token::random());
        s.acquire(req(1, a)).await.unwrap();
        s.complete(&RecordId([1; 32]), a, &response(1000), Duration::ZERO)
            .await
            .unwrap();
        s.acquire(req(2, b)).await.unwrap();
        s.complete(&RecordId([2; 32]), b, &response(1000), TTL)
            .await
            .unwrap();
        assert_eq!(s.used_bytes(), 2 * one);
        // Full, but record 1 has expired: it is purged to make room for record 3.
        let c = Token::random();
        assert!(matches!(
            s.acquire(req(3, c)).await,
            Ok(Acquire::Acquired { .. })
        ));
        assert_eq!(s.get(&RecordId([1; 32])).await, Ok(None));
        // A bigger outcome for record 3 does not fit next to live record 2, never evicted.
        assert!(matches!(
            s.complete(&RecordId([3; 32]), c, &response(2000), TTL)
                .await,
            Err(StoreError::Full(_))
        ));
        assert!(matches!(
            s.get(&RecordId([2; 32])).await,
            Ok(Some(Record::Completed(_)))
        ));
        assert!(matches!(
            s.get(&RecordId([3; 32])).await,
            Ok(Some(Record::InFlight(_)))
        ));
        assert_eq!(s.used_bytes(), one + RECORD_OVERHEAD);
    }

    #[tokio::test]
    async fn background_expiry_purges_and_stops_with_the_store() {
        let s = MemoryStore::builder()
            .expiry_interval(Duration::from_millis(20))
            .build();
        let t = Token::random();
        s.acquire(req(1, t)).await.unwrap();
        s.complete(&RecordId([1; 32]), t, &response(10), Duration::ZERO)
            .await
            .unwrap();
        let task = lock(&s.inner.expiry_task)
            .clone()
            .expect("expiry task started");
        let mut freed = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if s.used_bytes() == 0 {
                freed = true;
                break;
            }
        }
        assert!(freed, "the expiry task purged the expired record");
        let weak = Arc::downgrade(&s.inner);
        drop(s);
        assert!(
            weak.upgrade().is_none(),
            "the task does not keep the store alive"
        );
        for _ in 0..100 {
            if task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(task.is_finished(), "the expiry task stopped with the store");
    }

    #[test]
    fn built_outside_a_runtime_starts_expiry_on_first_acquire() {
        let s = MemoryStore::new();
        assert!(lock(&s.inner.expiry_task).is_none());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            s.acquire(req(1, Token::random())).await.unwrap();
        });
        assert!(lock(&s.inner.expiry_task).is_some());
    }

    async fn fires(w: &mut Watch) -> bool {
        tokio::time::timeout(Duration::from_secs(1), w.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn watchers_wake_on_conversion_resolve_and_delete() {
        let s = MemoryStore::new();
        let (a, id) = (Token::random(), RecordId([1; 32]));
        s.acquire(req(1, a)).await.unwrap();
        let mut w = s.watch(&id, 10).await.unwrap().unwrap();
        s.lapse_all_leases();
        s.acquire(req(1, Token::random())).await.unwrap();
        assert!(
            fires(&mut w).await,
            "a lapsed lease turned placeholder wakes waiters"
        );
        let respond = Resolution::Respond {
            outcome: response(3),
            ttl: TTL,
        };
        assert_eq!(s.resolve(&id, respond).await, Ok(Resolved::Resolved));
        assert!(fires(&mut w).await, "resolve wakes waiters");
        assert_eq!(s.delete(&id, false).await, Ok(Deletion::Deleted));
        assert!(fires(&mut w).await, "delete wakes waiters");
    }

    #[tokio::test]
    async fn operator_answer_fences_the_lapsed_holder() {
        let s = MemoryStore::new();
        let (a, id) = (Token::random(), RecordId([1; 32]));
        s.acquire(req(1, a)).await.unwrap();
        s.lapse_all_leases();
        s.acquire(req(1, Token::random())).await.unwrap();
        let respond = Resolution::Respond {
            outcome: response(3),
            ttl: TTL,
        };
        assert_eq!(s.resolve(&id, respond).await, Ok(Resolved::Resolved));
        assert_eq!(
            s.complete(&id, a, &response(9), TTL).await,
            Ok(Completion::Refused)
        );
    }

    #[tokio::test]
    async fn lapsed_epoch_cannot_renew_but_new_epoch_can() {
        let s = MemoryStore::new();
        let (a, b) = (Token::random(), Token::random());
        s.acquire(req(1, a)).await.unwrap();
        s.lapse_all_leases();
        let id = RecordId([1; 32]);
        assert_eq!(
            s.renew(&id, a, Duration::from_secs(1)).await,
            Ok(Renewal::Refused)
        );
        s.acquire(req(2, b)).await.unwrap();
        assert!(matches!(
            s.renew(&RecordId([2; 32]), b, Duration::from_secs(1)).await,
            Ok(Renewal::Renewed { .. })
        ));
    }
}
