//! The write-ahead log: what makes a batch durable between checkpoints.
//!
//! Why a log in front of redb: a durable redb commit costs two `fdatasync`s (quick repair makes
//! it two-phase), writes every B-tree page the batch dirtied (record ids are SHA-256 digests,
//! so that is one random page per record) and serialises the allocator state. Measured in the
//! proxy, that was ~40 µs of CPU per fresh request on top of the same work with a non-durable
//! commit. So the writer commits most batches to redb *without* durability and makes them
//! durable by appending the batch's table changes to this file as one frame and calling
//! `fdatasync` once: one sequential write per batch. Every so often (a *checkpoint*) a batch
//! is committed to redb with immediate durability instead, which makes everything before it
//! durable in the file itself, and the log starts over.
//!
//! # Frames and generations
//!
//! The log is a sequence of frames, each `magic ‖ generation ‖ payload length ‖ CRC-32 ‖
//! payload`. The payload is the batch's [`RedoOp`]s in the order they were applied. Each
//! checkpoint stores a new *generation* number in the database, in the same transaction; after
//! it the log is rewritten from offset 0 with that generation. Opening the store replays, from
//! offset 0, the frames that carry the generation the database names and stops at the first
//! frame that does not (an older generation's leftovers, a torn last write, zeros): those were
//! never acknowledged, because a batch is answered only after its frame is synced.
//!
//! Replaying is idempotent: every operation sets or removes one key outright, so applying the
//! log to a database that already holds some of it (redb persists non-durable commits when a
//! database is dropped) ends in the same state.
//!
//! Overwriting the file in place rather than truncating it means that, once the file has grown
//! to its working size, `fdatasync` flushes data blocks only (no file-size change to journal).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Start of every frame.
const MAGIC: [u8; 4] = *b"IGWL";
/// magic, generation, payload length, CRC-32.
const HEADER_LEN: usize = 4 + 8 + 4 + 4;
/// A frame claiming a larger payload is damage, not a batch (a batch of the default 1024
/// operations with records at the stored-response limit stays far below).
const MAX_PAYLOAD: usize = 1 << 30;

/// The log file that belongs to the database at `db`: the same name with `-wal` appended.
pub(crate) fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// One change to one table, as logged and as replayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RedoOp<'a> {
    PutRecord(&'a [u8; 32], &'a [u8]),
    RemoveRecord(&'a [u8; 32]),
    PutInflight(&'a [u8; 32], &'a [u8]),
    RemoveInflight(&'a [u8; 32]),
    PutExpiry(&'a [u8; 40]),
    RemoveExpiry(&'a [u8; 40]),
    PutLapsed(&'a [u8; 32], u64),
    RemoveLapsed(&'a [u8; 32]),
}

impl<'a> RedoOp<'a> {
    /// Appends the operation's encoding: a tag byte, the key, then the value if it has one.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            RedoOp::PutRecord(k, v) => encode_put(out, 1, k, v),
            RedoOp::PutInflight(k, v) => encode_put(out, 3, k, v),
            RedoOp::RemoveRecord(k) => {
                out.push(2);
                out.extend_from_slice(k);
            }
            RedoOp::RemoveInflight(k) => {
                out.push(4);
                out.extend_from_slice(k);
            }
            RedoOp::PutExpiry(k) => {
                out.push(5);
                out.extend_from_slice(k);
            }
            RedoOp::RemoveExpiry(k) => {
                out.push(6);
                out.extend_from_slice(k);
            }
            RedoOp::PutLapsed(k, epoch) => {
                out.push(7);
                out.extend_from_slice(k);
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            RedoOp::RemoveLapsed(k) => {
                out.push(8);
                out.extend_from_slice(k);
            }
        }
    }

    /// Decodes the next operation of a payload and advances `input` past it.
    pub(crate) fn decode(input: &mut &'a [u8]) -> Result<RedoOp<'a>, String> {
        let (&tag, rest) = input.split_first().ok_or("empty operation")?;
        *input = rest;
        Ok(match tag {
            1 => RedoOp::PutRecord(take_array(input)?, take_value(input)?),
            2 => RedoOp::RemoveRecord(take_array(input)?),
            3 => RedoOp::PutInflight(take_array(input)?, take_value(input)?),
            4 => RedoOp::RemoveInflight(take_array(input)?),
            5 => RedoOp::PutExpiry(take_array(input)?),
            6 => RedoOp::RemoveExpiry(take_array(input)?),
            7 => {
                let k = take_array(input)?;
                RedoOp::PutLapsed(k, u64::from_le_bytes(*take_array::<8>(input)?))
            }
            8 => RedoOp::RemoveLapsed(take_array(input)?),
            other => return Err(format!("unknown operation tag {other}")),
        })
    }
}

fn encode_put(out: &mut Vec<u8>, tag: u8, key: &[u8; 32], value: &[u8]) {
    out.push(tag);
    out.extend_from_slice(key);
    // Record values are bounded by the stored-response limit, far below 4 GiB.
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

fn take_array<'a, const N: usize>(input: &mut &'a [u8]) -> Result<&'a [u8; N], String> {
    let (head, rest) = input
        .split_first_chunk::<N>()
        .ok_or_else(|| format!("operation cut short (wanted {N} bytes)"))?;
    *input = rest;
    Ok(head)
}

fn take_value<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = u32::from_le_bytes(*take_array::<4>(input)?) as usize;
    if input.len() < len {
        return Err(format!("value cut short (wanted {len} bytes)"));
    }
    let (value, rest) = input.split_at(len);
    *input = rest;
    Ok(value)
}

fn checksum(generation: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The log, open for appending frames of one generation.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    generation: u64,
    /// Bytes of this generation's frames, i.e. where the next frame goes.
    len: u64,
    frame: Vec<u8>,
}

impl Wal {
    /// Opens (creating) the log at `path` for frames of `generation`, written from offset 0.
    /// The database must already name `generation` durably, so that what the file still holds
    /// of earlier generations is never replayed.
    pub(crate) fn open(path: &Path, generation: u64) -> io::Result<Wal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Wal {
            file,
            path: path.to_owned(),
            generation,
            len: 0,
            frame: Vec::new(),
        })
    }

    /// The generation frames are written with.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes logged since the last checkpoint.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends one frame holding `payload` and syncs it. Only after this returns `Ok` is the
    /// batch durable. On error the log's tail is unknown: the caller must checkpoint (and
    /// [`restart`](Self::restart)) before appending again.
    pub(crate) fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(io::Error::other(format!(
                "a batch of {} bytes is larger than a log frame may be",
                payload.len()
            )));
        }
        self.frame.clear();
        self.frame.extend_from_slice(&MAGIC);
        self.frame.extend_from_slice(&self.generation.to_le_bytes());
        self.frame
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.frame
            .extend_from_slice(&checksum(self.generation, payload).to_le_bytes());
        self.frame.extend_from_slice(payload);
        self.file.write_all_at(&self.frame, self.len)?;
        self.file.sync_data()?;
        self.len += self.frame.len() as u64;
        // A rare huge batch should not keep its buffer for the life of the store.
        if self.frame.capacity() > 4 << 20 {
            self.frame = Vec::new();
        }
        Ok(())
    }

    /// Fault injection: the file is reopened read-only, so every later append fails.
    pub(crate) fn break_for_tests(&mut self) -> io::Result<()> {
        self.file = File::open(&self.path)?;
        Ok(())
    }

    /// Starts the log over for `generation`, which a durable commit has just stored.
    pub(crate) fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.len = 0;
    }
}

/// What [`read_log`] found.
#[derive(Debug, Default)]
pub(crate) struct LogContents {
    /// The payloads of the frames of the wanted generation, in order.
    pub(crate) frames: Vec<Vec<u8>>,
    /// Bytes those frames take.
    pub(crate) bytes: u64,
    /// Why reading stopped before the end of the file, when what stopped it looks like a frame
    /// of the wanted generation that is damaged rather than the end of the log.
    pub(crate) damaged_tail: Option<String>,
}

/// Reads the frames of `generation` from the start of the log at `path` (none if the file does
/// not exist).
pub(crate) fn read_log(path: &Path, generation: u64) -> io::Result<LogContents> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LogContents::default()),
        Err(e) => return Err(e),
    }
    let mut out = LogContents::default();
    let mut at = 0usize;
    while let Some(header) = bytes.get(at..at + HEADER_LEN) {
        let (magic, rest) = header.split_at(4);
        let (gen_bytes, rest) = rest.split_at(8);
        let (len_bytes, crc_bytes) = rest.split_at(4);
        let frame_generation = u64::from_le_bytes(gen_bytes.try_into().unwrap_or_default());
        if magic != MAGIC || frame_generation != generation {
            break;
        }
        let len = u32::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(crc_bytes.try_into().unwrap_or_default());
        let Some(payload) = bytes.get(at + HEADER_LEN..at + HEADER_LEN + len) else {
            out.damaged_tail = Some(format!(
                "frame at byte {at} claims {len} bytes, the file ends first"
            ));
            break;
        };
        if checksum(generation, payload) != crc {
            out.damaged_tail = Some(format!("frame at byte {at} fails its checksum"));
            break;
        }
        out.frames.push(payload.to_vec());
        at += HEADER_LEN + len;
    }
    out.bytes = at as u64;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn ops() -> Vec<u8> {
        let mut payload = Vec::new();
        for op in [
            RedoOp::PutInflight(&[1; 32], b"in flight"),
            RedoOp::PutRecord(&[2; 32], b""),
            RedoOp::RemoveInflight(&[1; 32]),
            RedoOp::PutExpiry(&[3; 40]),
            RedoOp::RemoveExpiry(&[3; 40]),
            RedoOp::PutLapsed(&[4; 32], u64::MAX - 1),
            RedoOp::RemoveLapsed(&[4; 32]),
            RedoOp::RemoveRecord(&[2; 32]),
        ] {
            op.encode(&mut payload);
        }
        payload
    }

    fn decode_all(mut payload: &[u8]) -> Result<Vec<RedoOp<'_>>, String> {
        let mut out = Vec::new();
        while !payload.is_empty() {
            out.push(RedoOp::decode(&mut payload)?);
        }
        Ok(out)
    }

    #[test]
    fn every_operation_decodes_to_what_was_encoded() {
        let payload = ops();
        let decoded = decode_all(&payload).unwrap();
        assert_eq!(decoded.len(), 8);
        assert_eq!(decoded[0], RedoOp::PutInflight(&[1; 32], b"in flight"));
        assert_eq!(decoded[1], RedoOp::PutRecord(&[2; 32], b""));
        assert_eq!(decoded[5], RedoOp::PutLapsed(&[4; 32], u64::MAX - 1));
        assert_eq!(decoded[7], RedoOp::RemoveRecord(&[2; 32]));
    }

    #[test]
    fn a_cut_or_unknown_operation_is_an_error_not_a_panic() {
        let payload = ops();
        for cut in 1..payload.len() {
            // Every prefix either decodes to whole operations or reports the cut.
            let _ = decode_all(&payload[..cut]);
        }
        assert!(decode_all(&payload[..40]).is_err());
        assert!(decode_all(&[9, 0, 0]).is_err());
        assert!(decode_all(&[1]).is_err());
    }

    #[test]
    fn frames_of_the_wanted_generation_are_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = wal_path(&dir.path().join("x.db"));
        assert!(path.ends_with("x.db-wal"));
        assert!(
            read_log(&path, 1).unwrap().frames.is_empty(),
            "no file, no frames"
        );
        let mut wal = Wal::open(&path, 7).unwrap();
        wal.append(b"first").unwrap();
        wal.append(&ops()).unwrap();
        wal.append(b"").unwrap();
        let log = read_log(&path, 7).unwrap();
        assert_eq!(log.frames, vec![b"first".to_vec(), ops(), Vec::new()]);
        assert_eq!(log.bytes, wal.len());
        assert_eq!(log.damaged_tail, None);
        assert!(read_log(&path, 6).unwrap().frames.is_empty());
    }

    #[test]
    fn a_new_generation_never_replays_what_an_older_one_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db-wal");
        let mut wal = Wal::open(&path, 1).unwrap();
        for i in 0..10u8 {
            wal.append(&[i; 100]).unwrap();
        }
        wal.restart(2);
        wal.append(b"after the checkpoint").unwrap();
        let log = read_log(&path, 2).unwrap();
        assert_eq!(log.frames, vec![b"after the checkpoint".to_vec()]);
        assert_eq!(
            log.damaged_tail, None,
            "generation 1's frames end the log quietly"
        );
        // Reopening for a third generation starts at 0 too.
        let mut wal = Wal::open(&path, 3).unwrap();
        assert!(read_log(&path, 3).unwrap().frames.is_empty());
        wal.append(b"third").unwrap();
        assert_eq!(read_log(&path, 3).unwrap().frames, vec![b"third".to_vec()]);
    }

    #[test]
    fn a_torn_or_damaged_last_frame_ends_the_log_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db-wal");
        let mut wal = Wal::open(&path, 4).unwrap();
        wal.append(b"kept").unwrap();
        let kept = wal.len();
        wal.append(&[7; 64]).unwrap();
        let full = std::fs::read(&path).unwrap();

        // Torn: the last frame's payload only partly reached the disk.
        std::fs::write(&path, &full[..full.len() - 10]).unwrap();
        let log = read_log(&path, 4).unwrap();
        assert_eq!(log.frames, vec![b"kept".to_vec()]);
        assert_eq!(log.bytes, kept);
        assert!(log.damaged_tail.unwrap().contains("file ends first"));

        // Damaged: a flipped byte in the last frame's payload.
        let mut flipped = full.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        let log = read_log(&path, 4).unwrap();
        assert_eq!(log.frames, vec![b"kept".to_vec()]);
        assert!(log.damaged_tail.unwrap().contains("checksum"));

        // A header cut short is the end of the log.
        std::fs::write(&path, &full[..kept as usize + 5]).unwrap();
        let log = read_log(&path, 4).unwrap();
        assert_eq!(log.frames, vec![b"kept".to_vec()]);
    }
}
