//! Records as the writer sees them: the ones changed since the last checkpoint, kept in memory,
//! in front of the file's state as of that checkpoint.
//!
//! Why: writing every batch into redb's B-tree (a random leaf per record, since ids are SHA-256
//! digests) was most of the writer's work, and a checkpoint that wrote a second's worth of them
//! held up every batch behind it. The writer now changes only [`Overlay`]s and the write-ahead
//! log; a record acquired and completed between two checkpoints reaches the B-tree once, as its
//! final state, written by the checkpoint thread while the writer goes on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use idemgate::record::{Record, RecordId};
use redb::{Database, ReadOnlyTable, ReadableDatabase};

use crate::tables::{EXPIRY, INFLIGHT, LAPSED, RECORDS, Stored, decode, expiry_key, read_record};
use crate::wal::LoggedState;

/// What a record holds.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Record(Record),
    /// Bytes written by fault injection, kept as written; they are decoded when read.
    Raw(Arc<[u8]>),
}

/// The whole state of one record: its value (`None`: absent) and its lapsed-lease mark (the
/// epoch of the open that made it an outcome-unknown placeholder).
#[derive(Clone, Debug, Default)]
pub(crate) struct State {
    pub(crate) value: Option<Value>,
    pub(crate) lapsed: Option<u64>,
    /// Known: the file holds nothing of this record where the checkpoint writing this state
    /// will find it, so the checkpoint need not look for an old version to replace. Most
    /// records are new: this spares the checkpoint four B-tree lookups for each.
    pub(crate) new_to_file: bool,
}

impl State {
    /// The state a log entry describes.
    pub(crate) fn from_logged(logged: &LoggedState<'_>) -> State {
        State {
            value: logged.value.map(|bytes| match Record::decode(bytes) {
                Ok(r) => Value::Record(r),
                Err(_) => Value::Raw(Arc::from(bytes)),
            }),
            lapsed: logged.lapsed,
            new_to_file: false,
        }
    }

    fn is_nothing(&self) -> bool {
        self.value.is_none() && self.lapsed.is_none()
    }

    /// Appends this state's log entry for `id`.
    pub(crate) fn encode_logged(&self, id: &RecordId, out: &mut Vec<u8>) {
        let encoded;
        let value = match &self.value {
            None => None,
            Some(Value::Record(r)) => {
                encoded = r.encode();
                Some(encoded.as_slice())
            }
            Some(Value::Raw(bytes)) => Some(&bytes[..]),
        };
        LoggedState {
            id: &id.0,
            value,
            lapsed: self.lapsed,
        }
        .encode(out);
    }

    /// The record, as every operation judges it (unreadable bytes are never absent).
    pub(crate) fn stored(&self) -> Stored {
        match &self.value {
            None => Stored::Absent,
            Some(Value::Record(r)) => Stored::Record(r.clone()),
            Some(Value::Raw(bytes)) => decode(bytes),
        }
    }
}

/// Records changed since a checkpoint: id → its state now. Ids are SHA-256 digests, so a fast
/// unkeyed hash spreads them as well as SipHash does.
pub(crate) type Overlay = HashMap<RecordId, State, foldhash::fast::RandomState>;

/// The file's records as of the last checkpoint, read without blocking the checkpoint thread's
/// write transaction (redb readers never wait for the writer).
pub(crate) struct Snapshot {
    records: ReadOnlyTable<&'static [u8; 32], &'static [u8]>,
    inflight: ReadOnlyTable<&'static [u8; 32], &'static [u8]>,
    lapsed: ReadOnlyTable<&'static [u8; 32], u64>,
    expiry: ReadOnlyTable<&'static [u8; 40], ()>,
}

impl Snapshot {
    /// A snapshot of the latest commit.
    pub(crate) fn take(db: &Database) -> Result<Snapshot, redb::Error> {
        let txn = db.begin_read()?;
        Ok(Snapshot {
            records: txn.open_table(RECORDS)?,
            inflight: txn.open_table(INFLIGHT)?,
            lapsed: txn.open_table(LAPSED)?,
            expiry: txn.open_table(EXPIRY)?,
        })
    }

    /// Up to `limit` expiry-index keys due at or before `now`, after `after` (exclusive).
    pub(crate) fn expired_keys(
        &self,
        after: Option<&[u8; 40]>,
        now: idemgate::record::Timestamp,
        limit: usize,
    ) -> Result<Vec<[u8; 40]>, redb::StorageError> {
        let upper = expiry_key(now, &RecordId([0xff; 32]));
        let range = match after {
            Some(a) => self.expiry.range::<&[u8; 40]>(a..=&upper)?,
            None => self.expiry.range::<&[u8; 40]>(..=&upper)?,
        };
        range
            .map(|e| e.map(|(k, _)| *k.value()))
            .filter(|k| !matches!((k, after), (Ok(k), Some(a)) if k == a))
            .take(limit)
            .collect()
    }
}

/// One batch's view: its own changes, over the records changed since the last checkpoint
/// (and those a running checkpoint is writing), over the snapshot.
pub(crate) struct View<'a> {
    staged: Overlay,
    overlay: &'a Overlay,
    frozen: Option<&'a Overlay>,
    snapshot: &'a Snapshot,
    /// Ids read from the snapshot in this batch that the file holds nothing of.
    absent_from_file: HashSet<RecordId, foldhash::fast::RandomState>,
}

impl<'a> View<'a> {
    /// A view for a batch that changes about `changes` records: its table is made that size
    /// at once rather than grown by doubling, one rehash after another.
    pub(crate) fn new(
        overlay: &'a Overlay,
        frozen: Option<&'a Overlay>,
        snapshot: &'a Snapshot,
        changes: usize,
    ) -> View<'a> {
        View {
            staged: Overlay::with_capacity_and_hasher(changes, Default::default()),
            overlay,
            frozen,
            snapshot,
            absent_from_file: HashSet::default(),
        }
    }

    /// The batch's changes.
    pub(crate) fn into_staged(self) -> Overlay {
        self.staged
    }

    /// The records changed since the last checkpoint and those it is writing.
    pub(crate) fn changed_records(&self) -> impl Iterator<Item = (&RecordId, &State)> {
        self.overlay.iter().chain(self.frozen.into_iter().flatten())
    }

    /// The snapshot.
    pub(crate) fn snapshot(&self) -> &Snapshot {
        self.snapshot
    }

    /// Whether the checkpoint that writes a new state of `id` will find nothing of it in the
    /// file (`false` when not known).
    fn new_to_file(&self, id: &RecordId) -> bool {
        if let Some(state) = self.staged.get(id).or_else(|| self.overlay.get(id)) {
            return state.new_to_file;
        }
        if let Some(state) = self.frozen.and_then(|f| f.get(id)) {
            // The running checkpoint leaves exactly this in the file.
            return state.is_nothing();
        }
        self.absent_from_file.contains(id)
    }

    fn stage(&mut self, id: &RecordId, value: Option<Value>, lapsed: Option<u64>) {
        let new_to_file = self.new_to_file(id);
        self.staged.insert(
            *id,
            State {
                value,
                lapsed,
                new_to_file,
            },
        );
    }

    fn changed(&self, id: &RecordId) -> Option<&State> {
        self.staged
            .get(id)
            .or_else(|| self.overlay.get(id))
            .or_else(|| self.frozen.and_then(|f| f.get(id)))
    }

    /// The record under `id` now.
    pub(crate) fn read(&mut self, id: &RecordId) -> Result<Stored, redb::StorageError> {
        if let Some(state) = self.changed(id) {
            return Ok(state.stored());
        }
        let stored = read_record(&self.snapshot.records, &self.snapshot.inflight, id)?;
        if matches!(stored, Stored::Absent) && self.snapshot.lapsed.get(&id.0)?.is_none() {
            self.absent_from_file.insert(*id);
        }
        Ok(stored)
    }

    /// Whether `id` carries a lapsed-lease mark now.
    pub(crate) fn is_lapsed(&self, id: &RecordId) -> Result<bool, redb::StorageError> {
        match self.changed(id) {
            Some(state) => Ok(state.lapsed.is_some()),
            None => Ok(self.snapshot.lapsed.get(&id.0)?.is_some()),
        }
    }

    /// Replaces the record under `id` with `new` (any lapsed mark goes with the old one).
    pub(crate) fn put(&mut self, id: &RecordId, new: Record) {
        self.stage(id, Some(Value::Record(new)), None);
    }

    /// Deletes the record under `id`.
    pub(crate) fn remove(&mut self, id: &RecordId) {
        self.stage(id, None, None);
    }

    /// Writes `bytes` under `id` as they are (fault injection), keeping its lapsed mark.
    pub(crate) fn put_raw(
        &mut self,
        id: &RecordId,
        bytes: &[u8],
    ) -> Result<(), redb::StorageError> {
        let lapsed = match self.changed(id) {
            Some(state) => state.lapsed,
            None => self.snapshot.lapsed.get(&id.0)?.map(|v| v.value()),
        };
        self.stage(id, Some(Value::Raw(Arc::from(bytes))), lapsed);
        Ok(())
    }
}
