//! [`EmbeddedStore`]: the async face of the writer thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use idemgate::record::{Outcome, Record, RecordId, Token};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, Deletion, Release, Renewal, Resolution, Resolved, Store,
    StoreError, Watch, WatchHub,
};
use tokio::sync::oneshot;

use crate::builder::{EmbeddedStoreBuilder, OpenError, OpenReport};
use crate::reply::Reply;
use crate::writer::{Counters, Msg, OpKind, Output, Writer};

/// The embedded durable store (see the [crate docs](crate)). One per process and file.
///
/// Dropping it applies what was queued, closes the file and waits for the writer thread to end,
/// so the file can be opened again right after; [`close`](Self::close) does the same without
/// blocking an async worker.
pub struct EmbeddedStore {
    tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    hub: WatchHub,
    counters: Arc<Counters>,
    report: OpenReport,
    path: PathBuf,
    /// See [`EmbeddedStoreBuilder::batched_wakeups`].
    batched_wakeups: bool,
}

/// Counters of the writer, to observe group commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddedStats {
    /// Batches made durable, each by one synced frame of the write-ahead log.
    pub log_syncs: u64,
    /// Operations applied (including reads and refusals).
    pub operations: u64,
    /// Batches the writer took from its queue.
    pub batches: u64,
    /// Expired records purged since open.
    pub purged: u64,
    /// Checkpoints finished: durable commits of the changed records into the file.
    pub checkpoints: u64,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .field("epoch", &self.report.epoch)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path` with the default settings.
    pub fn open(path: impl Into<PathBuf>) -> Result<EmbeddedStore, OpenError> {
        EmbeddedStoreBuilder::new(path).open()
    }

    /// A builder for the store at `path`.
    pub fn builder(path: impl Into<PathBuf>) -> EmbeddedStoreBuilder {
        EmbeddedStoreBuilder::new(path)
    }

    pub(crate) fn start(
        writer: Writer,
        hub: WatchHub,
        counters: Arc<Counters>,
        report: OpenReport,
        path: PathBuf,
        batched_wakeups: bool,
    ) -> std::io::Result<EmbeddedStore> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("idemgate-embedded".into())
            .spawn(move || writer.run(rx))?;
        Ok(EmbeddedStore {
            tx,
            thread: Some(thread),
            hub,
            counters,
            report,
            path,
            batched_wakeups,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What happened at open (epoch, converted leases, repair, duration).
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The writer's counters. `log_syncs` far below `operations` under concurrency is group
    /// commit at work.
    pub fn stats(&self) -> EmbeddedStats {
        EmbeddedStats {
            log_syncs: self.counters.log_syncs.load(Ordering::Relaxed),
            operations: self.counters.operations.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
            purged: self.counters.purged.load(Ordering::Relaxed),
            checkpoints: self.counters.checkpoints.load(Ordering::Relaxed),
        }
    }

    /// Applies what was queued, closes the file (releasing its lock) and stops the writer.
    pub async fn close(self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).is_ok() {
            let _ = wait.await;
        }
        // Drop joins the thread, which has nothing left to do but return.
    }

    /// Writes `bytes` under `id` as they are, bypassing the record codec: fault injection for
    /// tests of the rule that an unreadable record is never treated as absent. Not for
    /// production use.
    #[doc(hidden)]
    pub async fn write_raw_for_tests(
        &self,
        id: &RecordId,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        match self.call(OpKind::RawPut { id: *id, bytes }).await? {
            Output::Pong => Ok(()),
            o => Err(unexpected(o)),
        }
    }

    /// Makes every later append to the write-ahead log fail: fault injection for tests of a
    /// batch the log cannot take. Not for production use.
    #[doc(hidden)]
    pub async fn break_log_for_tests(&self) -> Result<(), StoreError> {
        match self.call(OpKind::BreakLog).await? {
            Output::Pong => Ok(()),
            o => Err(unexpected(o)),
        }
    }

    /// Makes every checkpoint fail (`true`) or work again (`false`): fault injection for tests
    /// of a file that cannot be written while the log can. Not for production use.
    #[doc(hidden)]
    pub async fn fail_checkpoints_for_tests(&self, failing: bool) -> Result<(), StoreError> {
        match self.call(OpKind::FailCheckpoints(failing)).await? {
            Output::Pong => Ok(()),
            o => Err(unexpected(o)),
        }
    }

    async fn call(&self, op: OpKind) -> Result<Output, StoreError> {
        let (reply, answer) = Reply::channel(self.batched_wakeups);
        self.tx
            .send(Msg::Op(op, reply))
            .map_err(|_| StoreError::Unavailable("embedded store is closed".into()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("embedded store writer stopped before answering".into())
        })?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        let (done, _wait) = oneshot::channel();
        let _ = self.tx.send(Msg::Close(done));
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("embedded store writer thread panicked");
        }
    }
}

fn unexpected(o: Output) -> StoreError {
    StoreError::Unavailable(format!("embedded store: unexpected answer {o:?}"))
}

#[async_trait]
impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn acquire(&self, req: AcquireRequest) -> Result<Acquire, StoreError> {
        match self.call(OpKind::Acquire(req)).await? {
            Output::Acquire(a) => Ok(a),
            o => Err(unexpected(o)),
        }
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: Token,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        match self
            .call(OpKind::Renew {
                id: *id,
                token,
                lease,
            })
            .await?
        {
            Output::Renewal(r) => Ok(r),
            o => Err(unexpected(o)),
        }
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: Token,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let op = OpKind::Complete {
            id: *id,
            token,
            outcome: outcome.clone(),
            ttl,
        };
        match self.call(op).await? {
            Output::Completion(c) => Ok(c),
            o => Err(unexpected(o)),
        }
    }

    async fn release(&self, id: &RecordId, token: Token) -> Result<Release, StoreError> {
        match self.call(OpKind::Release { id: *id, token }).await? {
            Output::Release(r) => Ok(r),
            o => Err(unexpected(o)),
        }
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        match self.call(OpKind::Get { id: *id }).await? {
            Output::Record(r) => Ok(r),
            o => Err(unexpected(o)),
        }
    }

    async fn delete(&self, id: &RecordId, force: bool) -> Result<Deletion, StoreError> {
        match self.call(OpKind::Delete { id: *id, force }).await? {
            Output::Deletion(d) => Ok(d),
            o => Err(unexpected(o)),
        }
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution) -> Result<Resolved, StoreError> {
        match self
            .call(OpKind::Resolve {
                id: *id,
                resolution,
            })
            .await?
        {
            Output::Resolved(r) => Ok(r),
            o => Err(unexpected(o)),
        }
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        match self.call(OpKind::Purge).await? {
            Output::Purged(n) => Ok(n),
            o => Err(unexpected(o)),
        }
    }

    async fn watch(&self, id: &RecordId, max_waiters: usize) -> Result<Option<Watch>, StoreError> {
        Ok(self.hub.watch(id, max_waiters))
    }

    async fn readiness(&self) -> Result<(), StoreError> {
        match self.call(OpKind::Ping).await? {
            Output::Pong => Ok(()),
            o => Err(unexpected(o)),
        }
    }
}
