//! The file's tables and the few record-level helpers every operation shares.

use idemgate::record::{Holder, InFlight, Record, RecordId, Timestamp};
use idemgate::store::StoreError;
use redb::{ReadableTable, Table, TableDefinition};

use crate::state::{State, Value};

/// `record_id → Record::encode()` of every record that is not in flight (Completed, and bytes
/// written by fault injection). Values are whole encoded records, so a value that does not
/// decode is reported as [`StoreError::Corrupt`], never as absent.
///
/// A record lives in exactly one of this table and [`INFLIGHT`]. The split is for the disk:
/// record ids are SHA-256 digests, so every write to this large table lands on its own random
/// leaf page, and each page is an I/O of the commit's fsync. Writing the InFlight record of an
/// `acquire` into the small [`INFLIGHT`] table instead (where one batch's acquires share a
/// page or two) halves the random page writes of a fresh request.
pub(crate) const RECORDS: TableDefinition<'static, &[u8; 32], &[u8]> =
    TableDefinition::new("records");

/// `expires_at (u64 big-endian) ‖ record_id → ()`, one entry per Completed record, so purging
/// is a range scan from the start up to `now` instead of a walk over every record. Big-endian
/// makes byte order the numeric order.
pub(crate) const EXPIRY: TableDefinition<'static, &[u8; 40], ()> = TableDefinition::new("expiry");

/// `record_id → Record::encode()` of every InFlight record: small (only what is executing now),
/// so the writes of a batch share its few pages, and the pass that turns the leases of a dead
/// process into outcome-unknown at open costs time in proportion to the records that were in
/// flight, not to every record kept for replay.
pub(crate) const INFLIGHT: TableDefinition<'static, &[u8; 32], &[u8]> =
    TableDefinition::new("inflight_records");

/// `record_id → epoch of the open that converted it`: the outcome-unknown placeholders that the
/// open made from the leases of a dead process. The route's `on_lease_expiry` was not known
/// then, so an `acquire` with [`LeaseExpiry::ReExecute`](idemgate::store::LeaseExpiry) still
/// treats such a placeholder as the lapsed lease it stands for. Any later write of the record
/// drops its entry.
pub(crate) const LAPSED: TableDefinition<'static, &[u8; 32], u64> = TableDefinition::new("lapsed");

/// Small named counters: the instance epoch and the schema version.
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

/// Key of the instance epoch in [`META`].
pub(crate) const META_EPOCH: &str = "epoch";
/// Key of the schema version in [`META`].
pub(crate) const META_SCHEMA: &str = "schema";
/// Key in [`META`] of the first write-ahead log generation this state does not hold (see
/// [`crate::wal`]): an open replays that generation and the next. Absent in a new file: 0.
pub(crate) const META_WAL_GENERATION: &str = "wal_generation";
/// The table layout this build writes. Version 1 kept InFlight records in [`RECORDS`] with an
/// `inflight` index beside them; its files are refused (nothing was released with it).
/// Version 3 is version 2 plus the write-ahead log: a build that knows nothing of the log must
/// not open a file whose latest batches are only in it.
pub(crate) const SCHEMA_VERSION: u64 = 3;
/// The version opened and upgraded in place: the same tables, no log yet.
pub(crate) const SCHEMA_VERSION_BEFORE_WAL: u64 = 2;

/// The expiry-index key of a Completed record.
pub(crate) fn expiry_key(expires_at: Timestamp, id: &RecordId) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&expires_at.0.to_be_bytes());
    k[8..].copy_from_slice(&id.0);
    k
}

/// Splits an expiry-index key.
pub(crate) fn split_expiry_key(k: &[u8; 40]) -> (Timestamp, RecordId) {
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&k[..8]);
    let mut id = [0u8; 32];
    id.copy_from_slice(&k[8..]);
    (Timestamp(u64::from_be_bytes(ts)), RecordId(id))
}

/// What is stored under an id: nothing, a record, or bytes this build cannot read.
pub(crate) enum Stored {
    Absent,
    Record(Record),
    Unreadable(String),
}

impl Stored {
    /// The record, or `Corrupt` for unreadable bytes: the rule for every decision.
    pub(crate) fn readable(self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        match self {
            Stored::Absent => Ok(None),
            Stored::Record(r) => Ok(Some(r)),
            Stored::Unreadable(e) => Err(StoreError::Corrupt(format!("record {id}: {e}"))),
        }
    }
}

/// Reads the record under `id` from readable tables of [`RECORDS`] and [`INFLIGHT`] (the
/// small table first).
pub(crate) fn read_record(
    records: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    inflight: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    id: &RecordId,
) -> Result<Stored, redb::StorageError> {
    let value = match inflight.get(&id.0)? {
        Some(v) => Some(v),
        None => records.get(&id.0)?,
    };
    Ok(match value {
        None => Stored::Absent,
        Some(v) => decode(v.value()),
    })
}

/// The stored form of a record's bytes: the record, or why they are unreadable.
pub(crate) fn decode(bytes: &[u8]) -> Stored {
    match Record::decode(bytes) {
        Ok(r) => Stored::Record(r),
        Err(e) => Stored::Unreadable(e.0),
    }
}

/// The tables a record write touches, opened once per write transaction: the checkpoint's,
/// the open's replay of the log and its lapse pass.
pub(crate) struct WriteTables<'txn> {
    records: Table<'txn, &'static [u8; 32], &'static [u8]>,
    expiry: Table<'txn, &'static [u8; 40], ()>,
    inflight: Table<'txn, &'static [u8; 32], &'static [u8]>,
    lapsed: Table<'txn, &'static [u8; 32], u64>,
}

impl<'txn> WriteTables<'txn> {
    /// Opens (creating when new) the tables in `txn`.
    pub(crate) fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(WriteTables {
            records: txn.open_table(RECORDS)?,
            expiry: txn.open_table(EXPIRY)?,
            inflight: txn.open_table(INFLIGHT)?,
            lapsed: txn.open_table(LAPSED)?,
        })
    }

    /// Up to `limit` in-flight records whose holder is not `epoch`; unreadable ones are left
    /// out (they stay and answer `Corrupt`).
    pub(crate) fn inflight_not_held_by(
        &self,
        epoch: Holder,
        limit: usize,
    ) -> Result<Vec<(RecordId, InFlight)>, redb::StorageError> {
        self.inflight
            .iter()?
            .filter_map(|e| match e {
                Ok((k, v)) => match Record::decode(v.value()) {
                    Ok(Record::InFlight(f)) if f.holder != epoch => {
                        Some(Ok((RecordId(*k.value()), f)))
                    }
                    _ => None,
                },
                Err(e) => Some(Err(e)),
            })
            .take(limit)
            .collect()
    }

    /// Makes the file hold `state` for `id`, whatever it held: an InFlight record goes to
    /// [`INFLIGHT`], anything else to [`RECORDS`] (a Completed record with its [`EXPIRY`]
    /// entry), and nothing of `id` stays in the other table or under the old expiry.
    pub(crate) fn set_state(
        &mut self,
        id: &RecordId,
        state: &State,
    ) -> Result<(), redb::StorageError> {
        if !state.new_to_file {
            self.clear_for(id, state)?;
        }
        self.insert_new(id, state)
    }

    /// Removes whatever of `id` the file holds that writing `state` would not overwrite: the
    /// old Completed record's expiry entry, the record in the table `state` does not go to,
    /// and a lapsed mark `state` does not carry.
    fn clear_for(&mut self, id: &RecordId, state: &State) -> Result<(), redb::StorageError> {
        if let Stored::Record(Record::Completed(c)) =
            read_record(&self.records, &self.inflight, id)?
        {
            self.expiry.remove(&expiry_key(c.expires_at, id))?;
        }
        let to_inflight = matches!(state.value, Some(Value::Record(Record::InFlight(_))));
        if state.value.is_none() || to_inflight {
            self.records.remove(&id.0)?;
        }
        if !to_inflight {
            self.inflight.remove(&id.0)?;
        }
        if state.lapsed.is_none() {
            self.lapsed.remove(&id.0)?;
        }
        Ok(())
    }

    /// Writes `state` as if the file held nothing of `id` (what [`set_state`](Self::set_state)
    /// does once the old version is cleared away).
    fn insert_new(&mut self, id: &RecordId, state: &State) -> Result<(), redb::StorageError> {
        match &state.value {
            None => {}
            Some(Value::Record(r @ Record::InFlight(_))) => {
                self.inflight.insert(&id.0, r.encode().as_slice())?;
            }
            Some(Value::Record(r @ Record::Completed(c))) => {
                self.records.insert(&id.0, r.encode().as_slice())?;
                self.expiry.insert(&expiry_key(c.expires_at, id), ())?;
            }
            Some(Value::Raw(bytes)) => {
                self.records.insert(&id.0, &bytes[..])?;
            }
        }
        if let Some(epoch) = state.lapsed {
            self.lapsed.insert(&id.0, epoch)?;
        }
        Ok(())
    }
}
