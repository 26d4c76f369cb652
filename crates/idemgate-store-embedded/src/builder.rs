//! Opening the store: configuration, the epoch bump, and the lapse pass that runs before the
//! first request is served.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use idemgate::record::{Completed, Holder, Outcome, Record, RecordId, Timestamp};
use idemgate::store::WatchHub;
use redb::{Database, DatabaseError, Durability, ReadableTable};

use crate::capacity::Capacity;
use crate::checkpoint::Checkpointer;
use crate::state::{Overlay, Snapshot, State, Value};
use crate::store::EmbeddedStore;
use crate::tables::{
    META, META_EPOCH, META_SCHEMA, META_WAL_GENERATION, SCHEMA_VERSION, SCHEMA_VERSION_BEFORE_WAL,
    WriteTables,
};
use crate::wal::{self, LoggedState, Wal};
use crate::writer::{Counters, Rules, Writer, WriterConfig};

/// Why [`EmbeddedStore::open`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another store (in this process or another) has the file open. The embedded store serves
    /// one process; use the Redis or PostgreSQL store for more than one instance.
    #[error(
        "embedded store {path:?} is already open (locked by another process, or by another store \
         in this one); the embedded store serves a single process: use the Redis or PostgreSQL \
         store to run more than one instance"
    )]
    AlreadyOpen {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a database this build can use (another program's file, a newer layout,
    /// damage that repair could not fix).
    #[error("embedded store {path:?} is unusable: {detail}")]
    Incompatible {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Reading or writing the file failed.
    #[error("embedded store {path:?}: {detail}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// What happened while the store was opened, for startup logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// This process's instance epoch (the holder of every lease it writes).
    pub epoch: u64,
    /// In-flight records of earlier epochs that became outcome-unknown.
    pub converted_leases: u64,
    /// Whether redb had to repair the file (it was not closed cleanly and quick repair did not
    /// apply).
    pub repaired: bool,
    /// Batches replayed from the write-ahead log: those made durable after the last checkpoint
    /// of a process that did not close the store (0 after a clean close).
    pub replayed_batches: u64,
    /// How long opening took, from the call to ready to serve.
    pub duration: Duration,
}

/// Configures and opens an [`EmbeddedStore`].
#[derive(Clone, Debug)]
#[must_use]
pub struct EmbeddedStoreBuilder {
    path: PathBuf,
    lapsed_retention: Duration,
    min_free_bytes: u64,
    max_file_bytes: Option<u64>,
    max_batch: usize,
    purge_interval: Duration,
    purge_batch: usize,
    cache_bytes: usize,
    quick_repair: bool,
    checkpoint_interval: Duration,
    checkpoint_log_bytes: u64,
    batched_wakeups: bool,
}

/// Records converted per transaction by the lapse pass at open.
const CONVERT_CHUNK: usize = 4096;

impl EmbeddedStoreBuilder {
    /// A builder for the file at `path` (created, with its parent folders, if missing).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EmbeddedStoreBuilder {
            path: path.into(),
            lapsed_retention: Duration::from_secs(24 * 3600),
            min_free_bytes: 256 * 1024 * 1024,
            max_file_bytes: None,
            max_batch: 1024,
            purge_interval: Duration::from_secs(30),
            purge_batch: 1000,
            cache_bytes: 64 * 1024 * 1024,
            quick_repair: true,
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_log_bytes: 16 * 1024 * 1024,
            batched_wakeups: false,
        }
    }

    /// How long the outcome-unknown placeholder of a lease whose process died is kept (default
    /// 24 h, the default route TTL). The route's own TTL is not known at open.
    pub fn lapsed_retention(mut self, d: Duration) -> Self {
        self.lapsed_retention = d;
        self
    }

    /// `acquire` of a new record answers `Full` while the file's filesystem has less than this
    /// available (default 256 MiB; 0 turns the check off). Checked about once a second.
    pub fn min_free_bytes(mut self, bytes: u64) -> Self {
        self.min_free_bytes = bytes;
        self
    }

    /// `acquire` of a new record answers `Full` while the file is at least this large (default:
    /// no limit). The file does not shrink when records are purged; freed pages are reused.
    pub fn max_file_bytes(mut self, bytes: Option<u64>) -> Self {
        self.max_file_bytes = bytes;
        self
    }

    /// The most operations one group commit applies (default 1024; at least 1).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// How often the background purge of expired records runs (default 30 s; at least 10 ms).
    pub fn purge_interval(mut self, d: Duration) -> Self {
        self.purge_interval = d.max(Duration::from_millis(10));
        self
    }

    /// Records purged per transaction (default 1000; at least 1), so a large backlog never
    /// holds up requests for long.
    pub fn purge_batch(mut self, n: usize) -> Self {
        self.purge_batch = n.max(1);
        self
    }

    /// redb's page cache (default 64 MiB).
    pub fn cache_bytes(mut self, bytes: usize) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// Whether commits record the allocator state so that an open after a crash skips the full
    /// repair scan (default on). Off makes commits a little cheaper and a crash-restart slower
    /// in proportion to the file size.
    pub fn quick_repair(mut self, on: bool) -> Self {
        self.quick_repair = on;
        self
    }

    /// How often the records changed since the last checkpoint are written into the file
    /// (default 1 s). Between checkpoints a batch costs one sequential log write and one
    /// `fdatasync`; a checkpoint, on its own thread, writes the final state of each changed
    /// record into redb's B-tree in one durable commit. Longer means fewer B-tree writes for
    /// records that change twice (acquire, then complete) and more in memory and in the log to
    /// replay after a crash.
    pub fn checkpoint_interval(mut self, d: Duration) -> Self {
        self.checkpoint_interval = d;
        self
    }

    /// The log size that starts a checkpoint whatever the interval (default 16 MiB). While a
    /// checkpoint runs, the writer waits for it once the log reaches twice this, which bounds
    /// the memory the changed records take and what an open after a crash replays.
    pub fn checkpoint_log_bytes(mut self, bytes: u64) -> Self {
        self.checkpoint_log_bytes = bytes;
        self
    }

    /// Answers callers on a current-thread tokio runtime with one wake-up of that runtime per
    /// batch instead of one per operation (default off). Each such runtime gets a small task
    /// that hands the answers to its callers. Turn it on only when every call is awaited by a
    /// task of its runtime: a call awaited by another executor nested inside a runtime thread
    /// (`futures::executor::block_on` within a tokio task) would wait for that task, which its
    /// own thread blocks, for ever. `idemgate serve` turns it on (measured there: ~5 % more
    /// fresh requests per second, ~5 % less CPU per request).
    pub fn batched_wakeups(mut self, on: bool) -> Self {
        self.batched_wakeups = on;
        self
    }

    /// The file this builder opens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the file, takes a new instance epoch, turns the leases of earlier epochs into
    /// outcome-unknown records and starts the writer thread.
    ///
    /// This blocks (file I/O, possibly repair): in async code call it at startup or from
    /// `spawn_blocking`.
    pub fn open(self) -> Result<EmbeddedStore, OpenError> {
        let started = Instant::now();
        let path = self.path.clone();
        let io = |detail: String| OpenError::Io {
            path: path.clone(),
            detail,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io(format!("creating {parent:?}: {e}")))?;
        }

        let repaired = Arc::new(AtomicBool::new(false));
        let flag = repaired.clone();
        let db = redb::Builder::new()
            .set_cache_size(self.cache_bytes)
            .set_repair_callback(move |_| flag.store(true, Ordering::Relaxed))
            .create(&path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => OpenError::AlreadyOpen { path: path.clone() },
                DatabaseError::Storage(redb::StorageError::Io(e)) => io(e.to_string()),
                other => OpenError::Incompatible {
                    path: path.clone(),
                    detail: other.to_string(),
                },
            })?;

        let wal_paths = wal::wal_paths(&path);
        let (epoch, generation, replayed_batches) = self.begin_epoch(&db, &wal_paths)?;
        let converted = self.convert_lapsed(&db, epoch)?;
        let wal = Wal::open(&wal_paths, generation)
            .map_err(|e| io(format!("opening the write-ahead log {wal_paths:?}: {e}")))?;
        let db = Arc::new(db);
        let snapshot = Snapshot::take(&db).map_err(|e| self.redb_error(e))?;
        let checkpointer = Checkpointer::spawn(db.clone(), self.quick_repair)
            .map_err(|e| io(format!("starting the checkpoint thread: {e}")))?;

        let counters = Arc::new(Counters::default());
        let hub = WatchHub::new();
        let report = OpenReport {
            epoch: epoch.0,
            converted_leases: converted,
            repaired: repaired.load(Ordering::Relaxed),
            replayed_batches,
            duration: started.elapsed(),
        };
        if converted > 0 {
            tracing::warn!(
                path = %path.display(),
                converted,
                "embedded store: requests that were in flight when the previous process stopped are now outcome-unknown"
            );
        }
        tracing::info!(
            path = %path.display(),
            epoch = report.epoch,
            repaired = report.repaired,
            replayed_batches,
            open_ms = report.duration.as_millis() as u64,
            "embedded store open (serves this process only: use Redis or PostgreSQL for more than one instance)"
        );
        let writer = Writer {
            db,
            rules: Rules {
                epoch,
                capacity: Capacity::new(path.clone(), self.min_free_bytes, self.max_file_bytes),
            },
            hub: hub.clone(),
            counters: counters.clone(),
            config: WriterConfig {
                max_batch: self.max_batch,
                purge_interval: self.purge_interval,
                purge_batch: self.purge_batch,
                checkpoint_interval: self.checkpoint_interval,
                checkpoint_log_bytes: self.checkpoint_log_bytes,
            },
            wal,
            snapshot,
            overlay: Overlay::default(),
            frozen: None,
            checkpointer,
            overlay_since: Instant::now(),
            snapshot_due: false,
        };
        EmbeddedStore::start(
            writer,
            hub,
            counters,
            report,
            path.clone(),
            self.batched_wakeups,
        )
        .map_err(|e| io(format!("starting the writer thread: {e}")))
    }

    /// In one durable transaction: checks the table layout (creating the tables of a new file),
    /// replays the write-ahead log onto the last checkpoint (the two generations it may hold,
    /// see [`crate::wal`]), names the log's next generation and increments the instance epoch.
    /// Returns the epoch, that generation, and the batches replayed.
    fn begin_epoch(
        &self,
        db: &Database,
        wal_paths: &[PathBuf; 2],
    ) -> Result<(Holder, u64, u64), OpenError> {
        let fail = |e: redb::Error| self.redb_error(e);
        let mut txn = db.begin_write().map_err(|e| fail(e.into()))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.incompatible(e.to_string()))?;
        txn.set_quick_repair(self.quick_repair);
        let (epoch, generation, replayed) = {
            let mut meta = txn.open_table(META).map_err(|e| fail(e.into()))?;
            // Creating the record tables here means read transactions never meet a missing table.
            let mut tables = WriteTables::open(&txn).map_err(|e| fail(e.into()))?;
            let get = |key: &str| -> Result<Option<u64>, OpenError> {
                Ok(meta
                    .get(key)
                    .map_err(|e| fail(e.into()))?
                    .map(|v| v.value()))
            };
            match get(META_SCHEMA)? {
                None | Some(SCHEMA_VERSION_BEFORE_WAL) => {}
                Some(SCHEMA_VERSION) => {}
                Some(v) => {
                    return Err(self.incompatible(format!(
                        "table layout version {v}, this build uses {SCHEMA_VERSION}"
                    )));
                }
            }
            let previous = get(META_EPOCH)?.unwrap_or(0);
            let generation = get(META_WAL_GENERATION)?.unwrap_or(0);

            let mut replayed = 0u64;
            for generation in [generation, generation + 1] {
                let log = wal::read_log(wal_paths, generation).map_err(|e| OpenError::Io {
                    path: wal_paths[0].clone(),
                    detail: format!("reading the write-ahead log: {e}"),
                })?;
                if !log.frames.is_empty() {
                    tracing::info!(
                        generation,
                        frames = log.frames.len(),
                        bytes = log.bytes,
                        "embedded store: replaying the write-ahead log"
                    );
                }
                if let Some(why) = &log.damaged_tail {
                    // Expected after a crash mid-append (that batch was never answered);
                    // anything else is damage the log cannot undo.
                    tracing::warn!(
                        generation,
                        why,
                        "embedded store: the write-ahead log ends in an incomplete frame; replaying the frames before it"
                    );
                }
                for (n, frame) in log.frames.iter().enumerate() {
                    let mut rest = frame.as_slice();
                    while !rest.is_empty() {
                        let logged = LoggedState::decode(&mut rest).map_err(|e| {
                            self.incompatible(format!(
                                "write-ahead log {wal_paths:?}, generation {generation}, frame {n}: {e}"
                            ))
                        })?;
                        tables
                            .set_state(&RecordId(*logged.id), &State::from_logged(&logged))
                            .map_err(|e| fail(e.into()))?;
                    }
                }
                replayed += log.frames.len() as u64;
            }
            drop(tables);

            meta.insert(META_SCHEMA, SCHEMA_VERSION)
                .map_err(|e| fail(e.into()))?;
            // Both replayed generations are in the file now; the other file may still hold
            // frames of the second, so the writer starts on the one after it.
            meta.insert(META_WAL_GENERATION, generation + 2)
                .map_err(|e| fail(e.into()))?;
            // Epoch 0 is never live (placeholders made at open stand for it).
            let epoch = previous.wrapping_add(1).max(1);
            meta.insert(META_EPOCH, epoch).map_err(|e| fail(e.into()))?;
            (epoch, generation + 2, replayed)
        };
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok((Holder(epoch), generation, replayed))
    }

    /// Turns every InFlight record of an earlier epoch into Completed(outcome-unknown), in
    /// chunks, through the in-flight table (so the cost follows the number of records that were
    /// in flight, not the file size).
    fn convert_lapsed(&self, db: &Database, epoch: Holder) -> Result<u64, OpenError> {
        let fail = |e: redb::Error| self.redb_error(e);
        let mut converted = 0u64;
        loop {
            let now = Timestamp::now();
            let mut txn = db.begin_write().map_err(|e| fail(e.into()))?;
            txn.set_quick_repair(self.quick_repair);
            let mut done = 0usize;
            {
                let mut t = WriteTables::open(&txn).map_err(|e| fail(e.into()))?;
                // In-flight records of other epochs; an unreadable one stays as it is (it
                // answers `Corrupt`) and is not counted, so the loop ends.
                let held = t
                    .inflight_not_held_by(epoch, CONVERT_CHUNK)
                    .map_err(|e| fail(e.into()))?;
                for (id, f) in held {
                    done += 1;
                    let new = Record::Completed(Completed {
                        fingerprint: f.fingerprint,
                        outcome: Outcome::outcome_unknown(),
                        expires_at: now.after(self.lapsed_retention),
                        origin_token: f.token,
                    });
                    let state = State {
                        value: Some(Value::Record(new)),
                        lapsed: Some(epoch.0),
                        new_to_file: false,
                    };
                    t.set_state(&id, &state).map_err(|e| fail(e.into()))?;
                    converted += 1;
                }
            }
            if done == 0 {
                txn.abort().map_err(|e| fail(e.into()))?;
                return Ok(converted);
            }
            txn.commit().map_err(|e| fail(e.into()))?;
            if done < CONVERT_CHUNK {
                return Ok(converted);
            }
        }
    }

    fn incompatible(&self, detail: String) -> OpenError {
        OpenError::Incompatible {
            path: self.path.clone(),
            detail,
        }
    }

    fn redb_error(&self, e: redb::Error) -> OpenError {
        match e {
            redb::Error::Io(e) => OpenError::Io {
                path: self.path.clone(),
                detail: e.to_string(),
            },
            other => self.incompatible(other.to_string()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use redb::ReadableDatabase;

    fn completed(n: u8) -> Record {
        use idemgate::record::{Fingerprint, Token};
        Record::Completed(Completed {
            fingerprint: Fingerprint([n; 32]),
            outcome: Outcome::outcome_unknown(),
            expires_at: Timestamp::now().after(Duration::from_secs(3600)),
            origin_token: Token::random(),
        })
    }

    fn frame(states: &[(RecordId, State)]) -> Vec<u8> {
        let mut payload = Vec::new();
        for (id, state) in states {
            state.encode_logged(id, &mut payload);
        }
        payload
    }

    fn file_generation(path: &Path) -> u64 {
        let db = Database::open(path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        meta.get(META_WAL_GENERATION).unwrap().unwrap().value()
    }

    /// A crash while a checkpoint runs leaves two generations unapplied: the one being
    /// checkpointed and the one logged meanwhile. The open replays both, in order, and nothing of
    /// an older generation left in either file.
    #[test]
    fn an_open_replays_both_unapplied_generations_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(
            EmbeddedStore::builder(&path)
                .min_free_bytes(0)
                .open()
                .unwrap(),
        );
        let g = file_generation(&path);
        let (a, b, c, stale) = (
            RecordId([1; 32]),
            RecordId([2; 32]),
            RecordId([3; 32]),
            RecordId([4; 32]),
        );
        let put = |n: u8| State {
            value: Some(Value::Record(completed(n))),
            lapsed: None,
            new_to_file: false,
        };
        let paths = wal::wal_paths(&path);
        let mut log = Wal::open(&paths, g - 1).unwrap();
        // Left over from before the last checkpoint: must not come back.
        log.append(&frame(&[(stale, put(9))])).unwrap();
        log.switch(g);
        log.append(&frame(&[(a, put(1)), (b, put(1))])).unwrap();
        log.append(&frame(&[(c, put(1))])).unwrap();
        log.switch(g + 1);
        log.append(&frame(&[(a, put(2)), (c, State::default())]))
            .unwrap();
        drop(log);

        let store = EmbeddedStore::builder(&path)
            .min_free_bytes(0)
            .open()
            .unwrap();
        assert_eq!(store.open_report().replayed_batches, 3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let fingerprint = |id: &RecordId| {
            rt.block_on(idemgate::store::Store::get(&store, id))
                .unwrap()
                .map(|r| r.fingerprint().0[0])
        };
        assert_eq!(fingerprint(&a), Some(2), "the later generation wins");
        assert_eq!(fingerprint(&b), Some(1));
        assert_eq!(fingerprint(&c), None, "removed in the later generation");
        assert_eq!(
            fingerprint(&stale),
            None,
            "an older generation is never replayed"
        );
        drop(store);
        assert!(
            file_generation(&path) >= g + 2,
            "the writer moved past both"
        );
    }

    /// A log frame that passes its checksum but does not decode is damage the store cannot
    /// interpret: the open fails with a clear error instead of guessing or panicking.
    #[test]
    fn an_undecodable_log_frame_fails_the_open_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(
            EmbeddedStore::builder(&path)
                .min_free_bytes(0)
                .open()
                .unwrap(),
        );
        let generation = file_generation(&path);
        let mut log = Wal::open(&wal::wal_paths(&path), generation).unwrap();
        log.append(&[9, 9, 9]).unwrap();
        drop(log);

        match EmbeddedStore::builder(&path).min_free_bytes(0).open() {
            Err(OpenError::Incompatible { detail, .. }) => {
                assert!(detail.contains("write-ahead log"), "{detail}");
                assert!(detail.contains("cut short"), "{detail}");
            }
            other => panic!("opening with a damaged log: {other:?}"),
        }
    }
}
