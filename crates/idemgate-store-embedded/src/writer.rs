//! The writer thread: the only owner of the database, applying operations in group commits.
//!
//! Why a thread and not a task: redb is synchronous and a commit blocks on fsync, so the writer
//! must not sit on an async worker. Why one writer: redb allows one write transaction at a time
//! anyway; funnelling every operation through one queue lets the writer put everything that
//! arrived during the previous fsync into the next transaction (group commit), and makes
//! "operations on one record apply in arrival order" hold by construction.
//!
//! A batch is made durable in one of two ways (see [`crate::wal`]): usually by a non-durable
//! redb commit followed by one synced frame in the write-ahead log; when a checkpoint is due, by
//! a durable redb commit, after which the log starts over. Either way every caller is answered
//! only once its batch is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use idemgate::record::{Completed, Holder, InFlight, Outcome, Record, RecordId, Timestamp, Token};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, Deletion, LeaseExpiry, Release, Renewal, Resolution,
    Resolved, StoreError, WatchHub, decide_acquire, may_complete,
};
use redb::{Database, Durability, ReadableDatabase};
use tokio::sync::oneshot;

use crate::capacity::Capacity;
use crate::tables::{
    INFLIGHT, META, META_WAL_GENERATION, RECORDS, Stored, WriteTables, read_record,
    split_expiry_key,
};
use crate::wal::{RedoOp, Wal};

/// One operation of the [`Store`](idemgate::store::Store) contract, as queued to the writer.
pub(crate) enum OpKind {
    Acquire(AcquireRequest),
    Renew {
        id: RecordId,
        token: Token,
        lease: Duration,
    },
    Complete {
        id: RecordId,
        token: Token,
        outcome: Outcome,
        ttl: Duration,
    },
    Release {
        id: RecordId,
        token: Token,
    },
    Get {
        id: RecordId,
    },
    Delete {
        id: RecordId,
        force: bool,
    },
    Resolve {
        id: RecordId,
        resolution: Resolution,
    },
    Purge,
    Ping,
    /// Fault injection for tests: every later append to the write-ahead log fails.
    BreakLog,
    /// Fault injection for tests: bytes written under `id` without the codec.
    RawPut {
        id: RecordId,
        bytes: Vec<u8>,
    },
}

/// The answer of an operation; the caller's method knows which variant to expect.
#[derive(Debug)]
pub(crate) enum Output {
    Acquire(Acquire),
    Renewal(Renewal),
    Completion(Completion),
    Release(Release),
    Record(Option<Record>),
    Deletion(Deletion),
    Resolved(Resolved),
    Purged(u64),
    Pong,
}

pub(crate) type Reply = oneshot::Sender<Result<Output, StoreError>>;

/// What callers send to the writer.
pub(crate) enum Msg {
    Op(OpKind, Reply),
    /// Apply what was queued before, close the database (releasing the file lock), then answer.
    Close(oneshot::Sender<()>),
}

/// Counters shared with [`EmbeddedStore::stats`](crate::EmbeddedStore::stats).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) transactions: AtomicU64,
    pub(crate) operations: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) purged: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
}

/// Tunables the builder hands over.
pub(crate) struct WriterConfig {
    pub(crate) max_batch: usize,
    pub(crate) purge_interval: Duration,
    pub(crate) purge_batch: usize,
    pub(crate) quick_repair: bool,
    pub(crate) checkpoint_interval: Duration,
    pub(crate) checkpoint_log_bytes: u64,
}

pub(crate) struct Writer {
    pub(crate) db: Database,
    /// This process's instance epoch: the holder of every lease it writes. A lease of any other
    /// epoch belongs to a process that is gone.
    pub(crate) epoch: Holder,
    pub(crate) hub: WatchHub,
    pub(crate) capacity: Capacity,
    pub(crate) counters: Arc<Counters>,
    pub(crate) config: WriterConfig,
    pub(crate) wal: Wal,
    pub(crate) last_checkpoint: Instant,
    /// False after an append to the log failed: its tail is unknown, so every batch commits
    /// durably until a checkpoint has started the log over.
    pub(crate) wal_usable: bool,
}

/// The effect of one operation inside a batch.
struct Applied {
    answer: Result<Output, StoreError>,
    /// Whether it changed the file (a batch with no write is aborted, costing no fsync).
    wrote: bool,
    /// A record whose waiters to wake once the batch is durable.
    notify: Option<RecordId>,
}

impl Applied {
    fn read(answer: Result<Output, StoreError>) -> Self {
        Applied {
            answer,
            wrote: false,
            notify: None,
        }
    }
    fn wrote(answer: Output, notify: Option<RecordId>) -> Self {
        Applied {
            answer: Ok(answer),
            wrote: true,
            notify,
        }
    }
}

/// An on-demand or periodic purge in progress. It runs one bounded batch per loop turn so that
/// purging a large backlog never stalls requests for long.
#[derive(Default)]
struct PurgeRun {
    /// Callers of `purge_expired`, each with the count deleted since it asked.
    waiters: Vec<(Reply, u64)>,
}

/// Maps any redb error to the store's typed errors: a full disk is `Full`, the rest
/// `Unavailable`.
pub(crate) fn store_err(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    if let redb::Error::Io(io) = &e
        && io.kind() == std::io::ErrorKind::StorageFull
    {
        return StoreError::Full(format!("disk full: {io}"));
    }
    StoreError::Unavailable(format!("embedded store: {e}"))
}

fn closed() -> StoreError {
    StoreError::Unavailable("embedded store is closed".into())
}

impl Writer {
    /// The writer loop; returns when the store is closed or dropped.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        let mut next_purge = Instant::now() + self.config.purge_interval;
        let mut purge: Option<PurgeRun> = None;
        loop {
            // With a purge in progress, only take what is already queued, then purge a batch;
            // otherwise sleep until an operation arrives or the next periodic purge is due.
            let first = if purge.is_some() {
                match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                let wait = next_purge.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };

            let mut batch: Vec<(OpKind, Reply)> = Vec::new();
            let mut close = None;
            let mut next = first;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Close(done) => {
                        close = Some(done);
                        break;
                    }
                    Msg::Op(OpKind::Purge, reply) => {
                        purge
                            .get_or_insert_with(PurgeRun::default)
                            .waiters
                            .push((reply, 0));
                    }
                    Msg::Op(OpKind::Ping, reply) => {
                        let _ = reply.send(Ok(Output::Pong));
                    }
                    Msg::Op(OpKind::BreakLog, reply) => {
                        let answer = self.wal.break_for_tests().map(|()| Output::Pong);
                        let _ = reply.send(answer.map_err(store_err));
                    }
                    Msg::Op(op, reply) => batch.push((op, reply)),
                }
                if batch.len() < self.config.max_batch {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.apply_batch(batch);
            }
            if let Some(done) = close {
                if let Some(run) = purge.take() {
                    for (reply, _) in run.waiters {
                        let _ = reply.send(Err(closed()));
                    }
                }
                // The next open then has no log to replay.
                if let Err(e) = self.checkpoint() {
                    tracing::warn!(error = %e, "embedded store: the checkpoint at close failed; the next open replays the log");
                }
                drop(self.db);
                let _ = done.send(());
                return;
            }

            if Instant::now() >= next_purge {
                purge.get_or_insert_with(PurgeRun::default);
                next_purge = Instant::now() + self.config.purge_interval;
            }
            if let Some(run) = purge.as_mut() {
                match self.purge_step() {
                    Ok((deleted, more)) => {
                        for (_, n) in run.waiters.iter_mut() {
                            *n += deleted;
                        }
                        if !more && let Some(run) = purge.take() {
                            for (reply, n) in run.waiters {
                                let _ = reply.send(Ok(Output::Purged(n)));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded store: purging expired records failed");
                        if let Some(run) = purge.take() {
                            for (reply, _) in run.waiters {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            }
        }
        if let Some(run) = purge.take() {
            for (reply, _) in run.waiters {
                let _ = reply.send(Err(closed()));
            }
        }
    }

    /// Applies a batch in one transaction and answers every caller. If the batch fails as a
    /// whole (a storage error, not a per-record answer such as `Corrupt`), nothing of it was
    /// applied; each operation is then retried alone so that one bad operation cannot fail its
    /// neighbours.
    fn apply_batch(&mut self, batch: Vec<(OpKind, Reply)>) {
        let n = batch.len() as u64;
        match self.try_batch(&batch) {
            Ok(answers) => {
                for ((_, reply), answer) in batch.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
            }
            Err(e) if batch.len() == 1 => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, ops = n, "embedded store: batch failed, applying its operations one by one");
                for op in batch {
                    let answer = match self.try_batch(std::slice::from_ref(&op)) {
                        Ok(mut answers) => answers.pop().unwrap_or_else(|| Err(closed())),
                        Err(e) => Err(e),
                    };
                    let _ = op.1.send(answer);
                }
            }
        }
    }

    fn try_batch(
        &mut self,
        batch: &[(OpKind, Reply)],
    ) -> Result<Vec<Result<Output, StoreError>>, StoreError> {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        if batch.iter().all(|(op, _)| matches!(op, OpKind::Get { .. })) {
            return self.read_batch(batch);
        }
        let durable = self.checkpoint_due();
        let mut txn = self.db.begin_write().map_err(store_err)?;
        let mut answers = Vec::with_capacity(batch.len());
        let mut notify = Vec::new();
        let mut wrote = false;
        let redo = {
            let mut tables = WriteTables::open(&txn).map_err(store_err)?;
            for (op, _) in batch {
                let applied = self.apply(&mut tables, op).map_err(store_err)?;
                wrote |= applied.wrote;
                notify.extend(applied.notify);
                answers.push(applied.answer);
            }
            tables.take_redo()
        };
        self.counters
            .operations
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if !wrote {
            txn.abort().map_err(store_err)?;
            return Ok(answers);
        }
        if durable {
            self.commit_durable(txn)?;
        } else {
            txn.set_durability(Durability::None)
                .map_err(|e| StoreError::Unavailable(format!("embedded store: {e}")))?;
            txn.commit().map_err(store_err)?;
            self.counters.transactions.fetch_add(1, Ordering::Relaxed);
            // The batch is applied but not yet durable. From here on an error must not make
            // `apply_batch` apply its operations again: they are in the database.
            if let Err(e) = self.log(&redo) {
                tracing::error!(error = %e, "embedded store: the batch is applied but could not be made durable");
                return Ok(answers.into_iter().map(|_| Err(e.clone())).collect());
            }
        }
        // Only now is the change durable, so only now may a waiter see it.
        for id in &notify {
            self.hub.notify(id);
        }
        Ok(answers)
    }

    /// Whether the next batch should be a checkpoint (a durable redb commit).
    fn checkpoint_due(&self) -> bool {
        !self.wal_usable
            || self.wal.len() >= self.config.checkpoint_log_bytes
            || self.last_checkpoint.elapsed() >= self.config.checkpoint_interval
    }

    /// Makes the batch just committed without durability durable through the log; if the log
    /// fails, through a checkpoint instead.
    fn log(&mut self, redo: &[u8]) -> Result<(), StoreError> {
        if redo.is_empty() {
            return Ok(());
        }
        self.wal.append(redo).or_else(|e| {
            tracing::warn!(error = %e, "embedded store: appending to the write-ahead log failed; checkpointing instead");
            self.wal_usable = false;
            self.checkpoint()
        })
    }

    /// A durable commit with nothing else in it: everything committed before becomes durable in
    /// the file and the log starts over.
    pub(crate) fn checkpoint(&mut self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(store_err)?;
        self.commit_durable(txn)
    }

    /// Commits `txn` with immediate durability as a checkpoint: it names the log's next
    /// generation, so the frames written so far are never replayed on top of it.
    fn commit_durable(&mut self, mut txn: redb::WriteTransaction) -> Result<(), StoreError> {
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Unavailable(format!("embedded store: {e}")))?;
        txn.set_quick_repair(self.config.quick_repair);
        let generation = self.wal.generation() + 1;
        txn.open_table(META)
            .and_then(|mut meta| {
                meta.insert(META_WAL_GENERATION, generation)?;
                Ok(())
            })
            .map_err(store_err)?;
        txn.commit().map_err(store_err)?;
        self.wal.restart(generation);
        self.wal_usable = true;
        self.last_checkpoint = Instant::now();
        self.counters.transactions.fetch_add(1, Ordering::Relaxed);
        self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn read_batch(
        &mut self,
        batch: &[(OpKind, Reply)],
    ) -> Result<Vec<Result<Output, StoreError>>, StoreError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let records = txn.open_table(RECORDS).map_err(store_err)?;
        let inflight = txn.open_table(INFLIGHT).map_err(store_err)?;
        let now = Timestamp::now();
        let mut answers = Vec::with_capacity(batch.len());
        for (op, _) in batch {
            if let OpKind::Get { id } = op {
                let stored = read_record(&records, &inflight, id).map_err(store_err)?;
                answers.push(stored.readable(id).map(|r| Output::Record(live(r, now))));
            }
        }
        self.counters
            .operations
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(answers)
    }

    fn apply(&mut self, t: &mut WriteTables<'_>, op: &OpKind) -> Result<Applied, redb::Error> {
        let now = Timestamp::now();
        Ok(match op {
            OpKind::Acquire(req) => {
                let current = match t.read(&req.id)?.readable(&req.id) {
                    Ok(c) => c,
                    Err(e) => return Ok(Applied::read(Err(e))),
                };
                let epoch = self.epoch;
                let current = self.as_lapsed_lease(t, req, current)?;
                let (answer, write) =
                    decide_acquire(current.clone(), req, now, epoch, |f| f.holder != epoch);
                match write {
                    None => Applied::read(Ok(Output::Acquire(answer))),
                    Some(new) => {
                        // A new InFlight is a new attempt and takes space: that is what the
                        // capacity bound refuses. A lapse conversion replaces a record in place.
                        if matches!(new, Record::InFlight(_))
                            && let Some(reason) = self.capacity.full()
                        {
                            return Ok(Applied::read(Err(StoreError::Full(reason))));
                        }
                        t.put(&req.id, current.as_ref(), &new)?;
                        let notify = matches!(new, Record::Completed(_)).then_some(req.id);
                        Applied::wrote(Output::Acquire(answer), notify)
                    }
                }
            }
            OpKind::Renew { id, token, lease } => {
                let current = match t.read(id)?.readable(id) {
                    Ok(c) => c,
                    Err(e) => return Ok(Applied::read(Err(e))),
                };
                match current {
                    Some(Record::InFlight(mut f))
                        if f.token == *token && f.holder == self.epoch =>
                    {
                        let old = Record::InFlight(f.clone());
                        f.lease_expires_at = now.after(*lease);
                        let lease_expires_at = f.lease_expires_at;
                        t.put(id, Some(&old), &Record::InFlight(f))?;
                        Applied::wrote(Output::Renewal(Renewal::Renewed { lease_expires_at }), None)
                    }
                    _ => Applied::read(Ok(Output::Renewal(Renewal::Refused))),
                }
            }
            OpKind::Complete {
                id,
                token,
                outcome,
                ttl,
            } => {
                let current = match t.read(id)?.readable(id) {
                    Ok(c) => c,
                    Err(e) => return Ok(Applied::read(Err(e))),
                };
                if !may_complete(current.as_ref(), *token) {
                    return Ok(Applied::read(Ok(Output::Completion(Completion::Refused))));
                }
                match current {
                    // Nothing to complete (released, deleted or purged meanwhile): a Completed
                    // record needs the request's fingerprint, which `complete` does not carry,
                    // so the outcome is accepted and not kept.
                    None => Applied::read(Ok(Output::Completion(Completion::Stored))),
                    Some(old) => {
                        let new = Record::Completed(Completed {
                            fingerprint: old.fingerprint(),
                            outcome: outcome.clone(),
                            expires_at: now.after(*ttl),
                            origin_token: *token,
                        });
                        t.put(id, Some(&old), &new)?;
                        Applied::wrote(Output::Completion(Completion::Stored), Some(*id))
                    }
                }
            }
            OpKind::Release { id, token } => {
                let current = match t.read(id)?.readable(id) {
                    Ok(c) => c,
                    Err(e) => return Ok(Applied::read(Err(e))),
                };
                match live(current, now) {
                    None => Applied::read(Ok(Output::Release(Release::Released))),
                    Some(old @ Record::InFlight(_)) if inflight_token(&old) == Some(*token) => {
                        t.remove(id, Some(&old))?;
                        Applied::wrote(Output::Release(Release::Released), Some(*id))
                    }
                    Some(_) => Applied::read(Ok(Output::Release(Release::Refused))),
                }
            }
            OpKind::Get { id } => Applied::read(
                t.read(id)?
                    .readable(id)
                    .map(|r| Output::Record(live(r, now))),
            ),
            OpKind::Delete { id, force } => match t.read(id)? {
                Stored::Absent => Applied::read(Ok(Output::Deletion(Deletion::NotFound))),
                // An operator's way out of an unreadable record; without `force` it is refused
                // like everything else that meets one.
                Stored::Unreadable(e) if *force => {
                    tracing::warn!(record_id = %id, error = %e, "embedded store: deleting an unreadable record");
                    t.remove(id, None)?;
                    Applied::wrote(Output::Deletion(Deletion::Deleted), Some(*id))
                }
                Stored::Unreadable(e) => {
                    Applied::read(Err(StoreError::Corrupt(format!("record {id}: {e}"))))
                }
                Stored::Record(r) => {
                    if is_expired(&r, now) {
                        t.remove(id, Some(&r))?;
                        Applied::wrote(Output::Deletion(Deletion::NotFound), Some(*id))
                    } else if matches!(r, Record::InFlight(_)) && !*force {
                        Applied::read(Ok(Output::Deletion(Deletion::InFlightNeedsForce)))
                    } else {
                        t.remove(id, Some(&r))?;
                        Applied::wrote(Output::Deletion(Deletion::Deleted), Some(*id))
                    }
                }
            },
            OpKind::Resolve { id, resolution } => {
                let current = match t.read(id)?.readable(id) {
                    Ok(c) => c,
                    Err(e) => return Ok(Applied::read(Err(e))),
                };
                match live(current, now) {
                    None => Applied::read(Ok(Output::Resolved(Resolved::NotFound))),
                    Some(Record::Completed(c)) if c.outcome.is_outcome_unknown() => {
                        let old = Record::Completed(c.clone());
                        match resolution {
                            Resolution::Release => t.remove(id, Some(&old))?,
                            Resolution::Respond { outcome, ttl } => {
                                // The origin token stays: should the original attempt still
                                // complete, its real outcome beats the operator's settlement.
                                let new = Record::Completed(Completed {
                                    fingerprint: c.fingerprint,
                                    outcome: outcome.clone(),
                                    expires_at: now.after(*ttl),
                                    origin_token: c.origin_token,
                                });
                                t.put(id, Some(&old), &new)?;
                            }
                        }
                        Applied::wrote(Output::Resolved(Resolved::Resolved), Some(*id))
                    }
                    Some(_) => Applied::read(Ok(Output::Resolved(Resolved::NotOutcomeUnknown))),
                }
            }
            // Handled by the loop before batching; answered here only for completeness.
            OpKind::Purge => Applied::read(Ok(Output::Purged(0))),
            OpKind::Ping | OpKind::BreakLog => Applied::read(Ok(Output::Pong)),
            OpKind::RawPut { id, bytes } => {
                t.apply(RedoOp::PutRecord(&id.0, bytes))?;
                t.apply(RedoOp::RemoveInflight(&id.0))?;
                Applied::wrote(Output::Pong, Some(*id))
            }
        })
    }

    /// For a `ReExecute` acquire, an outcome-unknown placeholder that the open made from a dead
    /// process's lease is that lapsed lease again: the open could not know the route's choice,
    /// and `ReExecute` treats a lapsed lease as absent (even for another fingerprint).
    fn as_lapsed_lease(
        &self,
        t: &WriteTables<'_>,
        req: &AcquireRequest,
        current: Option<Record>,
    ) -> Result<Option<Record>, redb::Error> {
        if req.on_lease_expiry != LeaseExpiry::ReExecute {
            return Ok(current);
        }
        Ok(match current {
            Some(Record::Completed(c))
                if c.outcome.is_outcome_unknown() && t.is_lapsed(&req.id)? =>
            {
                Some(Record::InFlight(InFlight {
                    fingerprint: c.fingerprint,
                    token: c.origin_token,
                    lease_expires_at: Timestamp(0),
                    // Epoch 0 is never a live one: epochs start at 1.
                    holder: Holder(0),
                }))
            }
            other => other,
        })
    }

    /// Deletes up to `purge_batch` Completed records past retention in one transaction, found
    /// through the expiry index. Returns how many were deleted and whether more may remain.
    fn purge_step(&mut self) -> Result<(u64, bool), StoreError> {
        let now = Timestamp::now();
        let limit = self.config.purge_batch;
        let txn = self.db.begin_write().map_err(store_err)?;
        let mut deleted = Vec::new();
        let scanned;
        {
            let mut t = WriteTables::open(&txn).map_err(store_err)?;
            let keys = t.expired_keys(now, limit).map_err(store_err)?;
            scanned = keys.len();
            for key in keys {
                let (expires_at, id) = split_expiry_key(&key);
                t.apply(RedoOp::RemoveExpiry(&key)).map_err(store_err)?;
                // The index may hold an entry the record no longer matches (an unreadable
                // record was force-deleted); only a Completed record with exactly this expiry is
                // the one the entry stands for.
                if let Stored::Record(Record::Completed(c)) = t.read(&id).map_err(store_err)?
                    && c.expires_at == expires_at
                    && c.expires_at <= now
                {
                    t.apply(RedoOp::RemoveRecord(&id.0)).map_err(store_err)?;
                    t.apply(RedoOp::RemoveLapsed(&id.0)).map_err(store_err)?;
                    deleted.push(id);
                }
            }
        }
        if scanned == 0 {
            txn.abort().map_err(store_err)?;
            return Ok((0, false));
        }
        // A purge is rare and may be large: it commits as a checkpoint rather than through the
        // log.
        self.commit_durable(txn)?;
        self.counters
            .purged
            .fetch_add(deleted.len() as u64, Ordering::Relaxed);
        for id in &deleted {
            self.hub.notify(id);
        }
        Ok((deleted.len() as u64, scanned == limit))
    }
}

fn is_expired(r: &Record, now: Timestamp) -> bool {
    matches!(r, Record::Completed(c) if c.expires_at <= now)
}

/// A Completed record past retention is absent for every purpose but purging.
fn live(r: Option<Record>, now: Timestamp) -> Option<Record> {
    r.filter(|r| !is_expired(r, now))
}

fn inflight_token(r: &Record) -> Option<Token> {
    match r {
        Record::InFlight(f) => Some(f.token),
        Record::Completed(_) => None,
    }
}
