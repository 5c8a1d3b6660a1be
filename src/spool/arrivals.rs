//! The arrival log: the spool's write-ahead log.
//!
//! Creating one new, durable file per instance costs a file fsync and a
//! folder fsync, and the journal a flush of its own: three disk flushes
//! before every acknowledgement (BENCHMARKS.md "Ingest"). Instead, ingest
//! appends each received instance (its journal [`Arrival`] and the complete
//! Part 10 file) as one record to an append-only segment,
//! `spool/arrivals/<id>.log`, and `fdatasync`s it: one flush, then success.
//! The record is the instance's journal entry in write-ahead form.
//!
//! A background materializer (`ingest::materialize`) then writes the
//! instance files into the spool, fsyncs them, and only after that records
//! them in sled and flushes. A segment is deleted once every record in it
//! has been materialized that way. After a crash, startup replays the
//! segments that are left (records already in the journal are skipped), so
//! an acknowledged instance is never lost and never stored twice.
//!
//! Record layout (little endian):
//!
//! ```text
//! "PRARRV01"  meta_len: u32  file_len: u64  meta (JSON Arrival)  file (Part 10)  crc32: u32
//! ```
//!
//! The CRC covers everything after the magic. A record is acknowledged only
//! after it was written whole and synced, so a short or failing record can
//! only be the unacknowledged tail of a crash; it is ignored (and reported).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::journal::Arrival;

const MAGIC: &[u8; 8] = b"PRARRV01";
const HEAD: usize = 8 + 4 + 8;
/// A segment is closed and a new one started beyond this size.
pub const ROTATE_BYTES: u64 = 64 << 20;
/// Sanity limits for reading: the Arrival is small; the file is bounded by
/// ingest's largest data set (1 GiB) plus its header.
const MAX_META: u32 = 1 << 20;
const MAX_FILE: u64 = (1 << 30) + (1 << 20);
const SUFFIX: &str = "log";

/// One record, encoded and ready to append.
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// Where the Part 10 file lies in `bytes`.
    pub file: Range<usize>,
}

/// Encode an arrival and its Part 10 file (given in parts: header, data set).
pub fn encode(arrival: &Arrival, file_parts: &[&[u8]]) -> Encoded {
    let meta = serde_json::to_vec(arrival).expect("an Arrival always serializes");
    let file_len: usize = file_parts.iter().map(|p| p.len()).sum();
    let mut bytes = Vec::with_capacity(HEAD + meta.len() + file_len + 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(file_len as u64).to_le_bytes());
    bytes.extend_from_slice(&meta);
    let start = bytes.len();
    for p in file_parts {
        bytes.extend_from_slice(p);
    }
    let end = bytes.len();
    let crc = crc32fast::hash(&bytes[MAGIC.len()..]);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Encoded { bytes, file: start..end }
}

/// A record read back from a segment.
#[derive(Debug)]
pub struct Record {
    pub arrival: Arrival,
    pub file: Vec<u8>,
}

/// How a segment ended.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tail {
    /// Bytes after the last good record (an unacknowledged torn write, or
    /// damage); 0 for a clean segment.
    pub ignored_bytes: u64,
    /// What was wrong with them.
    pub reason: Option<String>,
}

/// Read every good record of a segment, in order, calling `each`; stops at
/// the first bad one (see [`Tail`]).
pub fn read_segment(path: &Path, mut each: impl FnMut(Record) -> io::Result<()>) -> io::Result<Tail> {
    let f = File::open(path)?;
    let total = f.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut pos = 0u64;
    loop {
        if pos == total {
            return Ok(Tail::default());
        }
        let bad = |reason: String| Ok(Tail { ignored_bytes: total - pos, reason: Some(reason) });
        if total - pos < (HEAD + 4) as u64 {
            return bad(format!("{} bytes too short for a record", total - pos));
        }
        let mut head = [0u8; HEAD];
        r.read_exact(&mut head)?;
        if &head[..8] != MAGIC {
            return bad("no record marker".into());
        }
        let meta_len = u32::from_le_bytes(head[8..12].try_into().unwrap());
        let file_len = u64::from_le_bytes(head[12..20].try_into().unwrap());
        if meta_len > MAX_META || file_len > MAX_FILE {
            return bad(format!("implausible lengths {meta_len}/{file_len}"));
        }
        let len = HEAD as u64 + meta_len as u64 + file_len + 4;
        if total - pos < len {
            return bad(format!("record of {len} bytes cut short at {} bytes", total - pos));
        }
        let mut meta = vec![0u8; meta_len as usize];
        r.read_exact(&mut meta)?;
        let mut file = vec![0u8; file_len as usize];
        r.read_exact(&mut file)?;
        let mut crc = [0u8; 4];
        r.read_exact(&mut crc)?;
        let mut h = crc32fast::Hasher::new();
        h.update(&head[8..]);
        h.update(&meta);
        h.update(&file);
        if h.finalize() != u32::from_le_bytes(crc) {
            return bad("checksum mismatch".into());
        }
        let arrival: Arrival = match serde_json::from_slice(&meta) {
            Ok(a) => a,
            Err(e) => return bad(format!("unreadable arrival: {e}")),
        };
        each(Record { arrival, file })?;
        pos += len;
    }
}

#[derive(Debug, Default)]
struct Counts {
    appended: u64,
    done: u64,
    sealed: bool,
}

struct Active {
    id: u64,
    file: Arc<File>,
    len: u64,
    /// A write or sync failed: this segment takes no more records.
    broken: bool,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    counts: BTreeMap<u64, Counts>,
    next_id: u64,
}

/// The append side of the log, shared by every association.
pub struct ArrivalLog {
    dir: PathBuf,
    state: Mutex<State>,
}

impl ArrivalLog {
    /// Open (creating) the log folder. Segments already there are left for
    /// [`ArrivalLog::leftover_segments`]; new ones get higher ids.
    pub fn open(dir: &Path) -> io::Result<ArrivalLog> {
        super::create_dir_durable(dir)?;
        let next_id = list_segments(dir)?.last().map_or(1, |(id, _)| id + 1);
        Ok(ArrivalLog { dir: dir.to_owned(), state: Mutex::new(State { next_id, ..Default::default() }) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Segments on disk that this process did not write (a crash left them):
    /// to be replayed before serving.
    pub fn leftover_segments(&self) -> io::Result<Vec<PathBuf>> {
        let st = self.state.lock().unwrap();
        Ok(list_segments(&self.dir)?.into_iter().filter(|(id, _)| !st.counts.contains_key(id)).map(|(_, p)| p).collect())
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:012}.{SUFFIX}"))
    }

    /// Append one encoded record and make it durable. Returns the segment
    /// id, to be passed to [`ArrivalLog::done`] once the record has been
    /// materialized. On error nothing was acknowledged and the log stays
    /// well-formed (a partial write is cut off again).
    pub fn append(&self, rec: &[u8]) -> io::Result<u64> {
        let (file, id) = {
            let mut st = self.state.lock().unwrap();
            if st.active.as_ref().is_some_and(|a| a.broken || a.len >= ROTATE_BYTES) {
                self.seal(&mut st);
            }
            if st.active.is_none() {
                let id = st.next_id;
                st.next_id += 1;
                let path = self.path(id);
                let file = OpenOptions::new().append(true).create_new(true).open(&path)?;
                // The new name must survive a power cut before any record
                // in it is acknowledged.
                if let Err(e) = super::sync_dir(&self.dir) {
                    let _ = fs::remove_file(&path);
                    return Err(e);
                }
                st.counts.insert(id, Counts::default());
                st.active = Some(Active { id, file: Arc::new(file), len: 0, broken: false });
            }
            let a = st.active.as_mut().expect("opened above");
            if let Err(e) = (&*a.file).write_all(rec) {
                // Cut the partial record off; if even that fails, no record
                // goes after it.
                if a.file.set_len(a.len).is_err() {
                    a.broken = true;
                }
                return Err(e);
            }
            a.len += rec.len() as u64;
            let (id, file) = (a.id, a.file.clone());
            st.counts.get_mut(&id).expect("active has counts").appended += 1;
            (file, id)
        };
        if let Err(e) = file.sync_data() {
            // After a failed fsync the kernel may have dropped the pages:
            // this segment is not trusted with more records. The record was
            // not acknowledged; count it as settled so the segment can go.
            let mut st = self.state.lock().unwrap();
            if let Some(a) = st.active.as_mut().filter(|a| a.id == id) {
                a.broken = true;
            }
            drop(st);
            self.done(id, 1);
            return Err(e);
        }
        Ok(id)
    }

    fn seal(&self, st: &mut State) {
        if let Some(a) = st.active.take() {
            let c = st.counts.get_mut(&a.id).expect("active has counts");
            c.sealed = true;
            if c.done >= c.appended {
                st.counts.remove(&a.id);
                let _ = fs::remove_file(self.path(a.id));
            }
        }
    }

    /// `n` records of segment `id` are materialized (durable in the spool
    /// and the journal). A closed segment whose records are all settled is
    /// deleted.
    pub fn done(&self, id: u64, n: u64) {
        let mut st = self.state.lock().unwrap();
        let Some(c) = st.counts.get_mut(&id) else { return };
        c.done += n;
        if c.sealed && c.done >= c.appended {
            st.counts.remove(&id);
            // A lost deletion only means a replay that finds everything
            // already recorded: no folder fsync needed.
            let _ = fs::remove_file(self.path(id));
        }
    }

    /// Close the active segment if every record in it is settled (called
    /// when ingest has been idle for a while), so the log does not grow.
    pub fn retire_idle(&self) {
        let mut st = self.state.lock().unwrap();
        let idle = st.active.as_ref().is_some_and(|a| st.counts.get(&a.id).is_some_and(|c| c.done >= c.appended));
        if idle {
            self.seal(&mut st);
        }
    }

    /// Records appended but not yet materialized (for status and tests).
    pub fn unsettled(&self) -> u64 {
        self.state.lock().unwrap().counts.values().map(|c| c.appended - c.done.min(c.appended)).sum()
    }
}

/// Segment files in `dir`, by id.
fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == SUFFIX)
            && let Some(id) = p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok())
        {
            out.push((id, p));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{InstanceRecord, JobKind};

    fn arrival(sop: &str) -> Arrival {
        Arrival {
            kind: JobKind::Pet,
            study_uid: "1.2.3".into(),
            series_uid: "1.2.3.4".into(),
            modality: Some("PT".into()),
            calling_ae: "CONSOLE".into(),
            number_of_slices: Some(3),
            record: InstanceRecord {
                sop_instance_uid: sop.into(),
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.128".into(),
                path: format!("1.2.3/1.2.3.4/{sop}.dcm").into(),
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
                image_index: Some(1),
            },
        }
    }

    fn read_all(p: &Path) -> (Vec<Record>, Tail) {
        let mut v = Vec::new();
        let t = read_segment(p, |r| {
            v.push(r);
            Ok(())
        })
        .unwrap();
        (v, t)
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        let e1 = encode(&arrival("1.1"), &[b"head", b"data one"]);
        let e2 = encode(&arrival("1.2"), &[b"head", b"data two!"]);
        assert_eq!(&e1.bytes[e1.file.clone()], b"headdata one");
        let id = log.append(&e1.bytes).unwrap();
        assert_eq!(log.append(&e2.bytes).unwrap(), id);
        let path = log.path(id);
        let (recs, tail) = read_all(&path);
        assert_eq!(tail, Tail::default());
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].arrival, arrival("1.1"));
        assert_eq!(recs[1].file, b"headdata two!");

        // A crash in the middle of a third (never acknowledged) record.
        let e3 = encode(&arrival("1.3"), &[b"head", b"third"]);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&e3.bytes[..e3.bytes.len() - 3]).unwrap();
        let (recs, tail) = read_all(&path);
        assert_eq!(recs.len(), 2);
        assert_eq!(tail.ignored_bytes, (e3.bytes.len() - 3) as u64);
        assert!(tail.reason.unwrap().contains("cut short"));
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        let id = log.append(&encode(&arrival("1.1"), &[b"abc"]).bytes).unwrap();
        let path = log.path(id);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let (recs, tail) = read_all(&path);
        assert!(recs.is_empty());
        assert_eq!(tail.reason.as_deref(), Some("checksum mismatch"));
        assert_eq!(tail.ignored_bytes, n as u64);
    }

    #[test]
    fn settled_segments_are_deleted_and_leftovers_are_found() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        let id = log.append(&encode(&arrival("1.1"), &[b"x"]).bytes).unwrap();
        log.append(&encode(&arrival("1.2"), &[b"y"]).bytes).unwrap();
        assert_eq!(log.unsettled(), 2);
        log.retire_idle(); // not idle: two records unsettled
        assert!(log.path(id).exists());
        log.done(id, 2);
        assert!(log.path(id).exists(), "the active segment stays until idle");
        log.retire_idle();
        assert!(!log.path(id).exists());
        assert_eq!(log.unsettled(), 0);

        // A segment written by an earlier process is a leftover for replay;
        // new appends go to a new segment after it.
        let id2 = log.append(&encode(&arrival("1.3"), &[b"z"]).bytes).unwrap();
        drop(log);
        let log = ArrivalLog::open(d.path()).unwrap();
        assert_eq!(log.leftover_segments().unwrap(), vec![log.path(id2)]);
        let id3 = log.append(&encode(&arrival("1.4"), &[b"w"]).bytes).unwrap();
        assert!(id3 > id2);
        assert_eq!(log.leftover_segments().unwrap(), vec![log.path(id2)]);
    }

    #[test]
    fn a_full_segment_rotates_and_is_deleted_when_settled() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        let big = vec![7u8; (ROTATE_BYTES / 2 + 1) as usize];
        let a = log.append(&encode(&arrival("1.1"), &[&big]).bytes).unwrap();
        let b = log.append(&encode(&arrival("1.2"), &[&big]).bytes).unwrap();
        let c = log.append(&encode(&arrival("1.3"), &[b"small"]).bytes).unwrap();
        assert_eq!(a, b);
        assert_ne!(b, c, "the segment rotated past {ROTATE_BYTES} bytes");
        log.done(a, 2);
        assert!(!log.path(a).exists(), "a sealed, settled segment is deleted at once");
        assert!(log.path(c).exists());
    }
}
