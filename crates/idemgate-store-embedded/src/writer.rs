//! The writer thread: the only owner of the database, applying operations in group commits.
//!
//! Why a thread and not a task: every batch waits for an `fdatasync`, so the writer must not sit
//! on an async worker. Why one writer: funnelling every operation through one queue lets the
//! writer put everything that arrived during the previous sync into the next batch (group
//! commit), and makes "operations on one record apply in arrival order" hold by construction.
//!
//! A batch is applied to an in-memory [`Overlay`] of the records changed since the last
//! checkpoint (see [`crate::state`]) and made durable by one synced frame in the write-ahead log
//! (see [`crate::wal`]); only then are its callers answered and its changes kept. About once a
//! second the overlay is handed, frozen, to the checkpoint thread, which writes it into the
//! file in one durable redb commit while the writer goes on with a new overlay.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use idemgate::record::{Completed, Holder, InFlight, Outcome, Record, RecordId, Timestamp, Token};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, Deletion, LeaseExpiry, Release, Renewal, Resolution,
    Resolved, StoreError, WatchHub, decide_acquire, may_complete,
};
use redb::Database;
use tokio::sync::oneshot;

use crate::capacity::Capacity;
use crate::checkpoint::Checkpointer;
use crate::reply::{Delivery, Reply};
use crate::state::{Overlay, Snapshot, Value, View};
use crate::tables::{Stored, split_expiry_key};
use crate::wal::Wal;

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
    /// Fault injection for tests: checkpoints fail while this is true.
    FailCheckpoints(bool),
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

/// What callers send to the writer.
pub(crate) enum Msg {
    Op(OpKind, Reply),
    /// Apply what was queued before, close the database (releasing the file lock), then answer.
    Close(oneshot::Sender<()>),
}

/// Counters shared with [`EmbeddedStore::stats`](crate::EmbeddedStore::stats).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) log_syncs: AtomicU64,
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
    pub(crate) checkpoint_interval: Duration,
    pub(crate) checkpoint_log_bytes: u64,
}

/// The writer's judgement of operations: whose leases are live, and whether there is room.
pub(crate) struct Rules {
    /// This process's instance epoch: the holder of every lease it writes. A lease of any other
    /// epoch belongs to a process that is gone.
    pub(crate) epoch: Holder,
    pub(crate) capacity: Capacity,
}

pub(crate) struct Writer {
    pub(crate) db: Arc<Database>,
    pub(crate) rules: Rules,
    pub(crate) hub: WatchHub,
    pub(crate) counters: Arc<Counters>,
    pub(crate) config: WriterConfig,
    pub(crate) wal: Wal,
    /// The file as of the last finished checkpoint.
    pub(crate) snapshot: Snapshot,
    /// Records changed since the running checkpoint (or the last one) began.
    pub(crate) overlay: Overlay,
    /// Records the running checkpoint is writing; `None` when none runs.
    pub(crate) frozen: Option<Arc<Overlay>>,
    pub(crate) checkpointer: Checkpointer,
    /// When the overlay last started empty.
    pub(crate) overlay_since: Instant,
    /// The running checkpoint has finished but the snapshot could not be refreshed yet.
    pub(crate) snapshot_due: bool,
}

/// The effect of one operation inside a batch (its change, if any, is in the batch's view).
struct Applied {
    answer: Result<Output, StoreError>,
    /// A record whose waiters to wake once the batch is durable.
    notify: Option<RecordId>,
}

impl Applied {
    fn read(answer: Result<Output, StoreError>) -> Self {
        Applied {
            answer,
            notify: None,
        }
    }
    fn wrote(answer: Output, notify: Option<RecordId>) -> Self {
        Applied {
            answer: Ok(answer),
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
    /// Whether this run has looked at the records changed since the last checkpoint.
    changed_scanned: bool,
    /// The last expiry-index key this run has looked at: entries the snapshot still lists for
    /// records purged or changed since are passed over, not looked at again.
    cursor: Option<[u8; 40]>,
}

/// How often an idle writer looks whether the running checkpoint has finished.
const CHECKPOINT_POLL: Duration = Duration::from_millis(20);

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
            self.poll_checkpoint();
            // With a purge in progress, only take what is already queued, then purge a batch;
            // otherwise sleep until an operation arrives or there is work of its own: the next
            // periodic purge, a checkpoint falling due, a running one to collect.
            let first = if purge.is_some() {
                match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                let wait = self
                    .next_own_work(next_purge)
                    .saturating_duration_since(Instant::now());
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
                        reply.send(Ok(Output::Pong));
                    }
                    Msg::Op(OpKind::FailCheckpoints(failing), reply) => {
                        self.checkpointer.fail_for_tests(failing);
                        reply.send(Ok(Output::Pong));
                    }
                    Msg::Op(OpKind::BreakLog, reply) => {
                        let answer = self.wal.break_for_tests().map(|()| Output::Pong);
                        reply.send(answer.map_err(store_err));
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
                        reply.send(Err(closed()));
                    }
                }
                self.close();
                // The database (and its file lock) goes before the caller hears "closed".
                drop(self);
                let _ = done.send(());
                return;
            }

            if Instant::now() >= next_purge {
                purge.get_or_insert_with(PurgeRun::default);
                next_purge = Instant::now() + self.config.purge_interval;
            }
            if let Some(run) = purge.as_mut() {
                match self.purge_step(run) {
                    Ok((deleted, more)) => {
                        for (_, n) in run.waiters.iter_mut() {
                            *n += deleted;
                        }
                        if !more && let Some(run) = purge.take() {
                            for (reply, n) in run.waiters {
                                reply.send(Ok(Output::Purged(n)));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded store: purging expired records failed");
                        if let Some(run) = purge.take() {
                            for (reply, _) in run.waiters {
                                reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            }
            self.maybe_checkpoint();
        }
        if let Some(run) = purge.take() {
            for (reply, _) in run.waiters {
                reply.send(Err(closed()));
            }
        }
        self.close();
    }

    /// Applies a batch and answers every caller. If reading fails while the batch is applied
    /// (a storage error, not a per-record answer such as `Corrupt`), nothing of it was kept;
    /// each operation is then retried alone so that one bad operation cannot fail its
    /// neighbours.
    fn apply_batch(&mut self, batch: Vec<(OpKind, Reply)>) {
        let n = batch.len() as u64;
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        match self.try_batch(&batch) {
            Ok(answers) => {
                let mut delivery = Delivery::default();
                for ((_, reply), answer) in batch.into_iter().zip(answers) {
                    delivery.add(reply, answer);
                }
            }
            Err(e) if batch.len() == 1 => {
                for (_, reply) in batch {
                    reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, ops = n, "embedded store: batch failed, applying its operations one by one");
                for op in batch {
                    let answer = match self.try_batch(std::slice::from_ref(&op)) {
                        Ok(mut answers) => answers.pop().unwrap_or_else(|| Err(closed())),
                        Err(e) => Err(e),
                    };
                    op.1.send(answer);
                }
            }
        }
    }

    fn try_batch(
        &mut self,
        batch: &[(OpKind, Reply)],
    ) -> Result<Vec<Result<Output, StoreError>>, StoreError> {
        let mut view = View::new(
            &self.overlay,
            self.frozen.as_deref(),
            &self.snapshot,
            batch.len(),
        );
        let mut answers = Vec::with_capacity(batch.len());
        let mut notify = Vec::new();
        for (op, _) in batch {
            let applied = apply(&mut self.rules, &mut view, op).map_err(store_err)?;
            notify.extend(applied.notify);
            answers.push(applied.answer);
        }
        let staged = view.into_staged();
        self.counters
            .operations
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.make_durable(staged) {
            // Nothing of the batch was kept: every caller gets the error.
            return Ok(answers.into_iter().map(|_| Err(e.clone())).collect());
        }
        // Only now is the change durable, so only now may a waiter see it.
        for id in &notify {
            self.hub.notify(id);
        }
        Ok(answers)
    }

    /// Logs the new states and syncs the log; only then are they kept.
    fn make_durable(&mut self, staged: Overlay) -> Result<(), StoreError> {
        if staged.is_empty() {
            return Ok(());
        }
        if self.frozen.is_some()
            && self.wal.len() >= self.config.checkpoint_log_bytes.saturating_mul(4)
        {
            return Err(StoreError::Unavailable(
                "embedded store: checkpoints are failing and the write-ahead log is full; \
                 writes are refused until a checkpoint succeeds"
                    .into(),
            ));
        }
        let logged = self.wal.append_with(|frame| {
            for (id, state) in &staged {
                state.encode_logged(id, frame);
            }
        });
        if let Err(e) = logged {
            tracing::error!(error = %e, "embedded store: appending to the write-ahead log failed; the batch is not applied");
            return Err(store_err(e));
        }
        self.counters.log_syncs.fetch_add(1, Ordering::Relaxed);
        if self.overlay.is_empty() {
            self.overlay_since = Instant::now();
        }
        self.overlay.extend(staged);
        Ok(())
    }

    /// Takes the result of a finished checkpoint: its records are in the file now.
    fn poll_checkpoint(&mut self) {
        if self.frozen.is_none() {
            return;
        }
        if !self.snapshot_due {
            // Far ahead of a running checkpoint, wait for it rather than let the overlay and the
            // log grow without bound. (A failed one is not waited for: `make_durable` refuses
            // writes past a harder bound instead, so a broken file never hangs callers.)
            let wait = self.checkpointer.is_running()
                && self.wal.len() >= self.config.checkpoint_log_bytes.saturating_mul(2);
            match self.checkpointer.finished(wait) {
                None => return,
                Some(Ok(())) => self.snapshot_due = true,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "embedded store: a checkpoint failed; it is tried again shortly, and its records stay in the log meanwhile");
                    if let Some(frozen) = &self.frozen {
                        self.checkpointer
                            .retry_later(frozen.clone(), self.wal.generation());
                    }
                    return;
                }
            }
        }
        match Snapshot::take(&self.db) {
            Ok(snapshot) => {
                self.snapshot = snapshot;
                self.frozen = None;
                self.snapshot_due = false;
                self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            // The frozen records stay in front of the old snapshot; tried again next turn.
            Err(e) => {
                tracing::warn!(error = %e, "embedded store: reading the file after a checkpoint failed");
            }
        }
    }

    /// When the loop has something to do without a new operation.
    fn next_own_work(&self, next_purge: Instant) -> Instant {
        let checkpoint = if self.frozen.is_some() {
            // Collect the running checkpoint soon after it ends, so its memory goes.
            Some(Instant::now() + CHECKPOINT_POLL)
        } else if !self.overlay.is_empty() {
            Some(self.overlay_since + self.config.checkpoint_interval)
        } else {
            None
        };
        checkpoint.map_or(next_purge, |at| at.min(next_purge))
    }

    /// Starts a checkpoint of the overlay when one is due and none runs.
    fn maybe_checkpoint(&mut self) {
        if self.frozen.is_some() || self.overlay.is_empty() {
            return;
        }
        if self.wal.len() < self.config.checkpoint_log_bytes
            && self.overlay_since.elapsed() < self.config.checkpoint_interval
        {
            return;
        }
        // The next interval likely changes about as many records: its overlay starts that
        // size instead of growing there by doubling (each step a new table, every entry moved,
        // fresh pages faulted in).
        let next_overlay =
            Overlay::with_capacity_and_hasher(self.overlay.len(), Default::default());
        let frozen = Arc::new(std::mem::replace(&mut self.overlay, next_overlay));
        // From here on batches are logged to the next generation; the checkpoint records that
        // the file holds everything before it.
        let next = self.wal.generation() + 1;
        self.wal.switch(next);
        self.checkpointer.start(frozen.clone(), next);
        self.frozen = Some(frozen);
    }

    /// Writes everything to the file (waiting for a running checkpoint first), so the next
    /// open has no log to replay.
    fn close(&mut self) {
        if self.frozen.is_some()
            && !self.snapshot_due
            && let Some(Err(e)) = self.checkpointer.finished(true)
        {
            tracing::warn!(error = %e, "embedded store: the checkpoint at close failed; the next open replays the log");
            self.checkpointer.stop();
            return;
        }
        self.frozen = None;
        let overlay = std::mem::take(&mut self.overlay);
        if !overlay.is_empty() {
            let next = self.wal.generation() + 1;
            match self.checkpointer.write_now(&self.db, &overlay, next) {
                Ok(()) => {
                    self.wal.switch(next);
                    self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "embedded store: the checkpoint at close failed; the next open replays the log");
                }
            }
        }
        self.checkpointer.stop();
    }

    /// Deletes up to `purge_batch` Completed records past retention: first those changed since
    /// the last checkpoint, then those the file's expiry index lists, from where the previous
    /// step of this run stopped. Returns how many were deleted and whether more may remain.
    fn purge_step(&mut self, run: &mut PurgeRun) -> Result<(u64, bool), StoreError> {
        let now = Timestamp::now();
        let limit = self.config.purge_batch;
        let mut view = View::new(&self.overlay, self.frozen.as_deref(), &self.snapshot, 0);
        let mut deleted = Vec::new();
        if !run.changed_scanned {
            run.changed_scanned = true;
            let expired: Vec<RecordId> = view
                .changed_records()
                .filter(|(_, s)| matches!(&s.value, Some(Value::Record(r)) if is_expired(r, now)))
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                if let Stored::Record(r) = view.read(&id).map_err(store_err)?
                    && is_expired(&r, now)
                {
                    view.remove(&id);
                    deleted.push(id);
                }
            }
        }
        let keys = view
            .snapshot()
            .expired_keys(run.cursor.as_ref(), now, limit)
            .map_err(store_err)?;
        for key in &keys {
            let (expires_at, id) = split_expiry_key(key);
            // The index may hold an entry the record no longer matches (changed since the
            // checkpoint, or an unreadable record force-deleted); only a Completed record with
            // exactly this expiry is the one the entry stands for.
            if let Stored::Record(Record::Completed(c)) = view.read(&id).map_err(store_err)?
                && c.expires_at == expires_at
                && c.expires_at <= now
            {
                view.remove(&id);
                deleted.push(id);
            }
        }
        run.cursor = keys.last().copied().or(run.cursor);
        let staged = view.into_staged();
        self.make_durable(staged)?;
        self.counters
            .purged
            .fetch_add(deleted.len() as u64, Ordering::Relaxed);
        for id in &deleted {
            self.hub.notify(id);
        }
        Ok((deleted.len() as u64, keys.len() == limit))
    }
}

/// Applies one operation to the batch's view.
fn apply(rules: &mut Rules, v: &mut View<'_>, op: &OpKind) -> Result<Applied, redb::Error> {
    let now = Timestamp::now();
    Ok(match op {
        OpKind::Acquire(req) => {
            let current = match v.read(&req.id)?.readable(&req.id) {
                Ok(c) => c,
                Err(e) => return Ok(Applied::read(Err(e))),
            };
            let epoch = rules.epoch;
            let current = as_lapsed_lease(v, req, current)?;
            let (answer, write) = decide_acquire(current, req, now, epoch, |f| f.holder != epoch);
            match write {
                None => Applied::read(Ok(Output::Acquire(answer))),
                Some(new) => {
                    // A new InFlight is a new attempt and takes space: that is what the
                    // capacity bound refuses. A lapse conversion replaces a record in place.
                    if matches!(new, Record::InFlight(_))
                        && let Some(reason) = rules.capacity.full()
                    {
                        return Ok(Applied::read(Err(StoreError::Full(reason))));
                    }
                    let notify = matches!(new, Record::Completed(_)).then_some(req.id);
                    v.put(&req.id, new);
                    Applied::wrote(Output::Acquire(answer), notify)
                }
            }
        }
        OpKind::Renew { id, token, lease } => {
            let current = match v.read(id)?.readable(id) {
                Ok(c) => c,
                Err(e) => return Ok(Applied::read(Err(e))),
            };
            match current {
                Some(Record::InFlight(mut f)) if f.token == *token && f.holder == rules.epoch => {
                    f.lease_expires_at = now.after(*lease);
                    let lease_expires_at = f.lease_expires_at;
                    v.put(id, Record::InFlight(f));
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
            let current = match v.read(id)?.readable(id) {
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
                    v.put(id, new);
                    Applied::wrote(Output::Completion(Completion::Stored), Some(*id))
                }
            }
        }
        OpKind::Release { id, token } => {
            let current = match v.read(id)?.readable(id) {
                Ok(c) => c,
                Err(e) => return Ok(Applied::read(Err(e))),
            };
            match live(current, now) {
                None => Applied::read(Ok(Output::Release(Release::Released))),
                Some(old @ Record::InFlight(_)) if inflight_token(&old) == Some(*token) => {
                    v.remove(id);
                    Applied::wrote(Output::Release(Release::Released), Some(*id))
                }
                Some(_) => Applied::read(Ok(Output::Release(Release::Refused))),
            }
        }
        OpKind::Get { id } => Applied::read(
            v.read(id)?
                .readable(id)
                .map(|r| Output::Record(live(r, now))),
        ),
        OpKind::Delete { id, force } => match v.read(id)? {
            Stored::Absent => Applied::read(Ok(Output::Deletion(Deletion::NotFound))),
            // An operator's way out of an unreadable record; without `force` it is refused
            // like everything else that meets one.
            Stored::Unreadable(e) if *force => {
                tracing::warn!(record_id = %id, error = %e, "embedded store: deleting an unreadable record");
                v.remove(id);
                Applied::wrote(Output::Deletion(Deletion::Deleted), Some(*id))
            }
            Stored::Unreadable(e) => {
                Applied::read(Err(StoreError::Corrupt(format!("record {id}: {e}"))))
            }
            Stored::Record(r) => {
                if is_expired(&r, now) {
                    v.remove(id);
                    Applied::wrote(Output::Deletion(Deletion::NotFound), Some(*id))
                } else if matches!(r, Record::InFlight(_)) && !*force {
                    Applied::read(Ok(Output::Deletion(Deletion::InFlightNeedsForce)))
                } else {
                    v.remove(id);
                    Applied::wrote(Output::Deletion(Deletion::Deleted), Some(*id))
                }
            }
        },
        OpKind::Resolve { id, resolution } => {
            let current = match v.read(id)?.readable(id) {
                Ok(c) => c,
                Err(e) => return Ok(Applied::read(Err(e))),
            };
            match live(current, now) {
                None => Applied::read(Ok(Output::Resolved(Resolved::NotFound))),
                Some(Record::Completed(c)) if c.outcome.is_outcome_unknown() => {
                    match resolution {
                        Resolution::Release => v.remove(id),
                        Resolution::Respond { outcome, ttl } => {
                            // The operator's answer is final (retries may already have
                            // it): a fresh origin fences out the lapsed holder's late
                            // `complete`, which would otherwise replace it.
                            let new = Record::Completed(Completed {
                                fingerprint: c.fingerprint,
                                outcome: outcome.clone(),
                                expires_at: now.after(*ttl),
                                origin_token: Token::random(),
                            });
                            v.put(id, new);
                        }
                    }
                    Applied::wrote(Output::Resolved(Resolved::Resolved), Some(*id))
                }
                Some(_) => Applied::read(Ok(Output::Resolved(Resolved::NotOutcomeUnknown))),
            }
        }
        // Handled by the loop before batching; answered here only for completeness.
        OpKind::Purge => Applied::read(Ok(Output::Purged(0))),
        OpKind::Ping | OpKind::BreakLog | OpKind::FailCheckpoints(_) => {
            Applied::read(Ok(Output::Pong))
        }
        OpKind::RawPut { id, bytes } => {
            v.put_raw(id, bytes)?;
            Applied::wrote(Output::Pong, Some(*id))
        }
    })
}

/// For a `ReExecute` acquire, an outcome-unknown placeholder that the open made from a dead
/// process's lease is that lapsed lease again: the open could not know the route's choice,
/// and `ReExecute` treats a lapsed lease as absent (even for another fingerprint).
fn as_lapsed_lease(
    v: &View<'_>,
    req: &AcquireRequest,
    current: Option<Record>,
) -> Result<Option<Record>, redb::Error> {
    if req.on_lease_expiry != LeaseExpiry::ReExecute {
        return Ok(current);
    }
    Ok(match current {
        Some(Record::Completed(c)) if c.outcome.is_outcome_unknown() && v.is_lapsed(&req.id)? => {
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
