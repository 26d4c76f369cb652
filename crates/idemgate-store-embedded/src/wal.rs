//! The write-ahead log: what makes a batch durable between checkpoints.
//!
//! Why a log in front of redb: a durable redb commit costs two `fdatasync`s (quick repair makes
//! it two-phase), writes every B-tree page the batch dirtied (record ids are SHA-256 digests,
//! so that is one random page per record) and serialises the allocator state; in the proxy that
//! was ~40 µs of CPU per fresh request. So the writer keeps the records changed since the last
//! checkpoint in memory (see [`crate::writer`]) and makes each batch durable by appending the
//! new state of every record it changed to this log as one frame and calling `fdatasync` once:
//! one sequential write per batch. A background *checkpoint* writes those states into redb in
//! one durable commit, after which the frames it covers are never needed again.
//!
//! # Frames, generations and the two files
//!
//! A frame is `magic ‖ generation ‖ payload length ‖ CRC-32 ‖ payload`; the payload is a list of
//! [`LoggedState`]s. Frames of generation `g` go to file `g % 2` ([`wal_paths`]), from offset 0.
//! A checkpoint of generation `g` stores "the file holds everything logged before generation
//! `g + 1`" in the same durable transaction as the states; meanwhile the writer is already
//! logging generation `g + 1` to the other file. Generation `g + 2` reuses `g`'s file only after
//! that checkpoint is durable, so at most two generations are ever unapplied: an open whose file
//! names `g` replays the frames of `g` and then of `g + 1`, each from the start of its file, up
//! to the first frame that is not of that generation or fails its checksum (leftovers of older
//! generations, a torn last write): such frames were never acknowledged, because a batch is
//! answered only after its frame is synced.
//!
//! Replaying is idempotent: a logged state replaces whatever the file holds for its record.
//!
//! Overwriting a file in place rather than truncating it means that, once it has grown to its
//! working size, `fdatasync` flushes data blocks only (no file-size change to journal). A file
//! also grows ahead of its frames: a frame that would end past the file's end is written
//! together with zeros up to [`GROW_STEP`] beyond it, in the same write and sync, so the frames
//! after it land inside the file. On this machine's ext4 disk an appending `fdatasync` of a
//! 16 KiB frame took ~295 µs and an in-place one ~126 µs (`dd oflag=dsync`, with and without
//! `conv=notrunc`), while growing by 256 KiB in one synced write took ~0.8 ms: the same reason
//! PostgreSQL zero-fills its WAL segments. Zeros end a log like any non-frame bytes do.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Start of every frame.
const MAGIC: [u8; 4] = *b"IGWL";
/// magic, generation, payload length, CRC-32.
const HEADER_LEN: usize = 4 + 8 + 4 + 4;
/// How far past a frame's end a file is grown when the frame would end past it.
const GROW_STEP: u64 = 256 << 10;
/// The largest frame payload written. A batch whose records would take more (1024 operations
/// each storing a response near the 1 MiB default limit) is refused rather than half-logged.
const MAX_PAYLOAD: usize = 1 << 30;

/// The two log files of the database at `db`: its name with `-wal-0` and `-wal-1` appended.
pub(crate) fn wal_paths(db: &Path) -> [PathBuf; 2] {
    ["-wal-0", "-wal-1"].map(|suffix| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    })
}

/// The whole state of one record after a batch, as logged and as replayed: its stored bytes
/// (an encoded record, or bytes written by fault injection; `None`: absent) and its
/// lapsed-lease mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LoggedState<'a> {
    pub(crate) id: &'a [u8; 32],
    pub(crate) value: Option<&'a [u8]>,
    pub(crate) lapsed: Option<u64>,
}

const HAS_VALUE: u8 = 1;
const HAS_LAPSED: u8 = 2;

impl<'a> LoggedState<'a> {
    /// Appends the encoding: the id, a flags byte, then the value and the mark if present.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.id);
        let flags = if self.value.is_some() { HAS_VALUE } else { 0 }
            | if self.lapsed.is_some() { HAS_LAPSED } else { 0 };
        out.push(flags);
        if let Some(v) = self.value {
            // Record values are bounded by the stored-response limit, far below 4 GiB.
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        if let Some(epoch) = self.lapsed {
            out.extend_from_slice(&epoch.to_le_bytes());
        }
    }

    /// Decodes the next state of a payload and advances `input` past it.
    pub(crate) fn decode(input: &mut &'a [u8]) -> Result<LoggedState<'a>, String> {
        let id = take_array::<32>(input)?;
        let flags = *take_array::<1>(input)?;
        let flags = flags[0];
        if flags & !(HAS_VALUE | HAS_LAPSED) != 0 {
            return Err(format!("unknown state flags {flags:#04x}"));
        }
        let value = if flags & HAS_VALUE != 0 {
            Some(take_value(input)?)
        } else {
            None
        };
        let lapsed = if flags & HAS_LAPSED != 0 {
            Some(u64::from_le_bytes(*take_array::<8>(input)?))
        } else {
            None
        };
        Ok(LoggedState { id, value, lapsed })
    }
}

fn take_array<'a, const N: usize>(input: &mut &'a [u8]) -> Result<&'a [u8; N], String> {
    let (head, rest) = input
        .split_first_chunk::<N>()
        .ok_or_else(|| format!("state cut short (wanted {N} more bytes)"))?;
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
    files: [File; 2],
    paths: [PathBuf; 2],
    generation: u64,
    /// Bytes of this generation's frames, i.e. where the next frame goes in its file.
    len: u64,
    /// Each file's size as far as this log knows (what it found at open, or grew it to).
    sizes: [u64; 2],
    frame: Vec<u8>,
}

impl Wal {
    /// Opens (creating) the log files at `paths` for frames of `generation`. The database
    /// must already name `generation` durably, so that what the file of `generation` still
    /// holds of earlier generations is never replayed.
    pub(crate) fn open(paths: &[PathBuf; 2], generation: u64) -> io::Result<Wal> {
        let open = |path: &PathBuf| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        };
        let files = [open(&paths[0])?, open(&paths[1])?];
        let sizes = [files[0].metadata()?.len(), files[1].metadata()?.len()];
        Ok(Wal {
            files,
            paths: paths.clone(),
            generation,
            len: 0,
            sizes,
            frame: Vec::new(),
        })
    }

    /// The generation frames are written with.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes logged in this generation.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends one frame, whose payload `write_payload` writes, to this generation's file and
    /// syncs it. Only after this returns `Ok` is the batch durable. On error nothing counts as
    /// written: the next frame goes to the same place. The payload is encoded straight into the
    /// frame buffer behind room left for the header, so a batch is not copied on its way out.
    pub(crate) fn append_with(
        &mut self,
        write_payload: impl FnOnce(&mut Vec<u8>),
    ) -> io::Result<()> {
        self.frame.clear();
        self.frame.resize(HEADER_LEN, 0);
        write_payload(&mut self.frame);
        let (header, payload) = self.frame.split_at_mut(HEADER_LEN);
        if payload.len() > MAX_PAYLOAD {
            return Err(io::Error::other(format!(
                "a batch of {} bytes is larger than a log frame may be",
                payload.len()
            )));
        }
        header[..4].copy_from_slice(&MAGIC);
        header[4..12].copy_from_slice(&self.generation.to_le_bytes());
        header[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[16..].copy_from_slice(&checksum(self.generation, payload).to_le_bytes());
        let index = file_index(self.generation);
        let frame_len = self.frame.len();
        let end = self.len + frame_len as u64;
        let grown_to = (end > self.sizes[index]).then(|| end + GROW_STEP);
        if grown_to.is_some() {
            self.frame.resize(frame_len + GROW_STEP as usize, 0);
        }
        let file = &self.files[index];
        file.write_all_at(&self.frame, self.len)?;
        file.sync_data()?;
        self.len = end;
        if let Some(size) = grown_to {
            self.sizes[index] = size;
        }
        // A rare huge batch should not keep its buffer for the life of the store.
        if self.frame.capacity() > 4 << 20 {
            self.frame = Vec::new();
        }
        Ok(())
    }

    /// [`append_with`](Self::append_with) for a payload already encoded (tests).
    #[cfg(test)]
    pub(crate) fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        self.append_with(|frame| frame.extend_from_slice(payload))
    }

    /// Moves on to `generation` (the next one), written from the start of its file. The caller
    /// must know that the checkpoint of the generation that last used that file is durable.
    pub(crate) fn switch(&mut self, generation: u64) {
        self.generation = generation;
        self.len = 0;
    }

    /// Fault injection: both files are reopened read-only, so every later append fails.
    pub(crate) fn break_for_tests(&mut self) -> io::Result<()> {
        self.files = [File::open(&self.paths[0])?, File::open(&self.paths[1])?];
        Ok(())
    }
}

fn file_index(generation: u64) -> usize {
    (generation % 2) as usize
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

/// Reads the frames of `generation` from the start of its file among `paths` (none if the file
/// does not exist).
pub(crate) fn read_log(paths: &[PathBuf; 2], generation: u64) -> io::Result<LogContents> {
    let path = &paths[file_index(generation)];
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

    fn states() -> Vec<u8> {
        let mut payload = Vec::new();
        for state in [
            LoggedState {
                id: &[1; 32],
                value: Some(b"in flight"),
                lapsed: None,
            },
            LoggedState {
                id: &[2; 32],
                value: Some(b""),
                lapsed: Some(u64::MAX - 1),
            },
            LoggedState {
                id: &[3; 32],
                value: None,
                lapsed: None,
            },
            LoggedState {
                id: &[4; 32],
                value: None,
                lapsed: Some(7),
            },
        ] {
            state.encode(&mut payload);
        }
        payload
    }

    fn decode_all(mut payload: &[u8]) -> Result<Vec<LoggedState<'_>>, String> {
        let mut out = Vec::new();
        while !payload.is_empty() {
            out.push(LoggedState::decode(&mut payload)?);
        }
        Ok(out)
    }

    fn paths(dir: &Path) -> [PathBuf; 2] {
        wal_paths(&dir.join("x.db"))
    }

    #[test]
    fn every_state_decodes_to_what_was_encoded() {
        let payload = states();
        let decoded = decode_all(&payload).unwrap();
        assert_eq!(decoded.len(), 4);
        assert_eq!(decoded[0].value, Some(&b"in flight"[..]));
        assert_eq!(decoded[1].lapsed, Some(u64::MAX - 1));
        assert_eq!(decoded[1].value, Some(&b""[..]));
        assert_eq!(decoded[2].id, &[3; 32]);
        assert_eq!((decoded[2].value, decoded[2].lapsed), (None, None));
        assert_eq!((decoded[3].value, decoded[3].lapsed), (None, Some(7)));
    }

    #[test]
    fn a_cut_or_unknown_state_is_an_error_not_a_panic() {
        let payload = states();
        for cut in 1..payload.len() {
            // Every prefix either decodes to whole states or reports the cut.
            let _ = decode_all(&payload[..cut]);
        }
        assert!(decode_all(&payload[..40]).is_err());
        let mut bad_flags = [0u8; 33];
        bad_flags[32] = 0x80;
        assert!(decode_all(&bad_flags).unwrap_err().contains("flags"));
        assert!(decode_all(&[1]).is_err());
    }

    #[test]
    fn frames_of_the_wanted_generation_are_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        assert!(paths[0].ends_with("x.db-wal-0") && paths[1].ends_with("x.db-wal-1"));
        assert!(
            read_log(&paths, 1).unwrap().frames.is_empty(),
            "no file, no frames"
        );
        let mut wal = Wal::open(&paths, 7).unwrap();
        wal.append(b"first").unwrap();
        wal.append(&states()).unwrap();
        wal.append(b"").unwrap();
        let log = read_log(&paths, 7).unwrap();
        assert_eq!(log.frames, vec![b"first".to_vec(), states(), Vec::new()]);
        assert_eq!(log.bytes, wal.len());
        assert_eq!(log.damaged_tail, None);
        assert!(read_log(&paths, 6).unwrap().frames.is_empty());
        assert!(
            read_log(&paths, 5).unwrap().frames.is_empty(),
            "same file, other generation"
        );
    }

    #[test]
    fn a_file_grows_ahead_of_its_frames_so_most_syncs_are_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        let size = |i: usize| std::fs::metadata(&paths[i]).unwrap().len();
        let mut wal = Wal::open(&paths, 0).unwrap();
        wal.append(&[1; 100]).unwrap();
        let first = wal.len();
        assert_eq!(size(0), first + GROW_STEP, "grown past the first frame");
        let small = [2; 1000];
        while wal.len() + (HEADER_LEN + small.len()) as u64 <= size(0) {
            wal.append(&small).unwrap();
            assert_eq!(
                size(0),
                first + GROW_STEP,
                "frames inside the file keep its size"
            );
        }
        wal.append(&small).unwrap();
        assert_eq!(
            size(0),
            wal.len() + GROW_STEP,
            "the frame that passes the end grows it"
        );
        let log = read_log(&paths, 0).unwrap();
        assert_eq!(log.bytes, wal.len());
        assert_eq!(
            log.damaged_tail, None,
            "the zeros beyond the frames end the log"
        );

        // A log opened on grown files knows their sizes: no growth while frames fit.
        drop(wal);
        let before = size(0);
        let mut wal = Wal::open(&paths, 2).unwrap();
        wal.append(&small).unwrap();
        assert_eq!(size(0), before);
        assert_eq!(read_log(&paths, 2).unwrap().frames, vec![small.to_vec()]);
    }

    #[test]
    fn generations_alternate_files_and_never_replay_an_older_ones_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        let mut wal = Wal::open(&paths, 1).unwrap();
        for i in 0..10u8 {
            wal.append(&[i; 100]).unwrap();
        }
        wal.switch(2);
        wal.append(b"second").unwrap();
        // Generation 1 is still whole in the other file (its checkpoint may not be done).
        assert_eq!(read_log(&paths, 1).unwrap().frames.len(), 10);
        assert_eq!(
            read_log(&paths, 2).unwrap().frames,
            vec![b"second".to_vec()]
        );
        wal.switch(3);
        wal.append(b"third").unwrap();
        let log = read_log(&paths, 3).unwrap();
        assert_eq!(log.frames, vec![b"third".to_vec()]);
        assert_eq!(
            log.damaged_tail, None,
            "generation 1's frames end the log quietly"
        );
        assert!(
            read_log(&paths, 1).unwrap().frames.is_empty(),
            "overwritten"
        );
    }

    #[test]
    fn a_torn_or_damaged_last_frame_ends_the_log_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        let mut wal = Wal::open(&paths, 4).unwrap();
        wal.append(b"kept").unwrap();
        let kept = wal.len();
        wal.append(&[7; 64]).unwrap();
        let path = &paths[0];
        // The frames, without the zeros the file grew ahead by.
        let full = std::fs::read(path).unwrap()[..wal.len() as usize].to_vec();

        // Torn: the last frame's payload only partly reached the disk.
        std::fs::write(path, &full[..full.len() - 10]).unwrap();
        let log = read_log(&paths, 4).unwrap();
        assert_eq!(log.frames, vec![b"kept".to_vec()]);
        assert_eq!(log.bytes, kept);
        assert!(log.damaged_tail.unwrap().contains("file ends first"));

        // Damaged: a flipped byte in the last frame's payload.
        let mut flipped = full.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        std::fs::write(path, &flipped).unwrap();
        let log = read_log(&paths, 4).unwrap();
        assert_eq!(log.frames, vec![b"kept".to_vec()]);
        assert!(log.damaged_tail.unwrap().contains("checksum"));

        // A header cut short is the end of the log.
        std::fs::write(path, &full[..kept as usize + 5]).unwrap();
        let log = read_log(&paths, 4).unwrap();
        assert_eq!(log.frames, vec![b"kept".to_vec()]);
    }
}
