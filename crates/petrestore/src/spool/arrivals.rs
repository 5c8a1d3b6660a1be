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
//! "PRARRV02"  nonce: u64  meta_len: u32  file_len: u64  meta (JSON Arrival)  file (Part 10)  crc32: u32
//! ```
//!
//! The CRC covers the lengths, meta and file. `nonce` is a random number
//! drawn when the segment is created and also written in its file name
//! (`<id>-<nonce>.log`): a record belongs to the segment only if it carries
//! the segment's nonce.
//!
//! Why the nonce: an `fdatasync` after appending to a file must also commit
//! the file's new size (a filesystem journal commit), about twice the cost
//! of overwriting blocks that already exist. So segments are written into
//! files whose blocks already exist: a zero-filled spare made in the
//! background, or a settled segment recycled as a spare (as PostgreSQL does
//! with WAL segments). After the last record comes old content (zeros, or
//! records of the file's earlier life with another nonce); reading stops at
//! the first place that is not a good record with this segment's nonce.
//!
//! A record is acknowledged only after it was written whole and synced, so
//! a bad record is the unacknowledged tail of a crash, unless a good record
//! of this segment follows it somewhere: that is damage, and replay keeps the
//! segment for inspection.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::journal::Arrival;

const MAGIC: &[u8; 8] = b"PRARRV02";
const HEAD: usize = 8 + 8 + 4 + 8;
/// Spare (pre-written) segment files kept ready.
const SPARES: usize = 2;
/// A segment is closed and a new one started beyond this size.
pub const ROTATE_BYTES: u64 = 16 << 20;
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
/// The segment's nonce is filled in by [`ArrivalLog::append`].
pub fn encode(arrival: &Arrival, file_parts: &[&[u8]]) -> Encoded {
    let meta = serde_json::to_vec(arrival).expect("an Arrival always serializes");
    let file_len: usize = file_parts.iter().map(|p| p.len()).sum();
    let mut bytes = Vec::with_capacity(HEAD + meta.len() + file_len + 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(file_len as u64).to_le_bytes());
    bytes.extend_from_slice(&meta);
    let start = bytes.len();
    for p in file_parts {
        bytes.extend_from_slice(p);
    }
    let end = bytes.len();
    let crc = crc32fast::hash(&bytes[16..]);
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
    /// Why reading stopped before the end of the file: `None` at the end of
    /// the file. Old content of a recycled or zero-filled file, and a torn,
    /// never-acknowledged last record, all stop reading without damage.
    pub stopped: Option<String>,
    /// Bad bytes lay between good records of this segment: reading went on
    /// at the next good record (each record carries the segment's nonce and
    /// its own checksum), so acknowledged records behind damage are read
    /// too. The file should be kept for inspection.
    pub damaged: bool,
    /// Why the first damaged stretch was not a record.
    pub damage: Option<String>,
    /// Bytes skipped over damaged stretches.
    pub skipped_bytes: u64,
}

/// The nonce in a segment file name `<id>-<nonce>.log`.
fn nonce_of(path: &Path) -> Option<(u64, u64)> {
    let stem = path.file_stem()?.to_str()?;
    let (id, nonce) = stem.split_once('-')?;
    Some((id.parse().ok()?, u64::from_str_radix(nonce, 16).ok()?))
}

/// Try to decode one record at the start of `r` (at most `avail` bytes).
/// `Ok(None)` with a reason when there is no good record of `nonce` there.
fn decode_one(r: &mut impl Read, avail: u64, nonce: u64) -> io::Result<Result<(Record, u64), String>> {
    if avail < (HEAD + 4) as u64 {
        return Ok(Err(format!("{avail} bytes too short for a record")));
    }
    let mut head = [0u8; HEAD];
    r.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Ok(Err("no record marker".into()));
    }
    if u64::from_le_bytes(head[8..16].try_into().unwrap()) != nonce {
        return Ok(Err("a record of the file's earlier life".into()));
    }
    let meta_len = u32::from_le_bytes(head[16..20].try_into().unwrap());
    let file_len = u64::from_le_bytes(head[20..28].try_into().unwrap());
    if meta_len > MAX_META || file_len > MAX_FILE {
        return Ok(Err(format!("implausible lengths {meta_len}/{file_len}")));
    }
    let len = HEAD as u64 + meta_len as u64 + file_len + 4;
    if avail < len {
        return Ok(Err(format!("record of {len} bytes cut short at {avail} bytes")));
    }
    let mut meta = vec![0u8; meta_len as usize];
    r.read_exact(&mut meta)?;
    let mut file = vec![0u8; file_len as usize];
    r.read_exact(&mut file)?;
    let mut crc = [0u8; 4];
    r.read_exact(&mut crc)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head[16..]);
    h.update(&meta);
    h.update(&file);
    if h.finalize() != u32::from_le_bytes(crc) {
        return Ok(Err("checksum mismatch".into()));
    }
    match serde_json::from_slice(&meta) {
        Ok(arrival) => Ok(Ok((Record { arrival, file }, len))),
        Err(e) => Ok(Err(format!("unreadable arrival: {e}"))),
    }
}

/// Read every good record of a segment, in order, calling `each`. A
/// place without a record ends the segment, unless a good record of the
/// segment follows somewhere after it: then that stretch is damage, it is
/// skipped, and reading goes on there (see [`Tail`]).
pub fn read_segment(path: &Path, mut each: impl FnMut(Record) -> io::Result<()>) -> io::Result<Tail> {
    let (_, nonce) = nonce_of(path).ok_or_else(|| io::Error::other(format!("{} is not a segment name", path.display())))?;
    let mut f = File::open(path)?;
    let total = f.metadata()?.len();
    let mut pos = 0u64;
    let mut tail = Tail::default();
    loop {
        if pos == total {
            return Ok(tail);
        }
        f.seek(SeekFrom::Start(pos))?;
        let mut r = BufReader::with_capacity(1 << 20, &f);
        match decode_one(&mut r, total - pos, nonce)? {
            Ok((rec, len)) => {
                each(rec)?;
                pos += len;
            }
            Err(reason) => match good_record_after(&f, pos + 1, total, nonce)? {
                Some(next) => {
                    tail.damaged = true;
                    tail.damage.get_or_insert(reason);
                    tail.skipped_bytes += next - pos;
                    pos = next;
                }
                None => {
                    tail.stopped = Some(reason);
                    return Ok(tail);
                }
            },
        }
    }
}

/// Where the first good record of `nonce` in `[from, total)` starts.
fn good_record_after(f: &File, from: u64, total: u64, nonce: u64) -> io::Result<Option<u64>> {
    let mut pattern = MAGIC.to_vec();
    pattern.extend_from_slice(&nonce.to_le_bytes());
    let mut buf = vec![0u8; 4 << 20];
    let mut at = from;
    while at < total {
        let n = f.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        for i in 0..n.saturating_sub(pattern.len() - 1) {
            if buf[i..].starts_with(&pattern) {
                let start = at + i as u64;
                let mut r = BufReader::new(f.try_clone()?);
                r.seek(SeekFrom::Start(start))?;
                if decode_one(&mut r, total - start, nonce)?.is_ok() {
                    return Ok(Some(start));
                }
            }
        }
        // Overlap so a pattern across the boundary is not missed.
        at += (n.saturating_sub(pattern.len() - 1)).max(1) as u64;
    }
    Ok(None)
}

fn random_nonce() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a valid buffer of 8 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 {
        return u64::from_le_bytes(b);
    }
    // getrandom cannot fail on Linux ≥ 3.17 with a valid buffer; should it,
    // time and pid still make a unique value in practice.
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 40)
}

#[derive(Debug, Default)]
struct Counts {
    appended: u64,
    done: u64,
    sealed: bool,
    /// A sync failed: never recycled (its pages are not trusted).
    broken: bool,
}

struct Active {
    id: u64,
    nonce: u64,
    file: Arc<File>,
    /// Held around each flush of this segment and the check before it: a
    /// failed flush is reported to one caller only, so the next one must
    /// see that it failed before trusting its own.
    flush: Arc<Mutex<()>>,
    /// Where the next record goes.
    pos: u64,
    /// A sync failed: this segment takes no more records.
    broken: bool,
}

#[derive(Default)]
struct State {
    active: Option<Active>,
    counts: BTreeMap<u64, Counts>,
    /// Names of this log's segments (id → path).
    paths: BTreeMap<u64, PathBuf>,
    next_id: u64,
    /// Ready spare files (pre-written, `spare-<n>`).
    spares: Vec<PathBuf>,
    /// Spares that still hold the records of the segment they were (or
    /// that a previous run left): zeroed when ingest is idle
    /// ([`ArrivalLog::scrub_spares`]), so received instances do not
    /// outlive retention in them.
    dirty: Vec<PathBuf>,
    next_spare: u64,
}

/// The append side of the log, shared by every association.
pub struct ArrivalLog {
    dir: PathBuf,
    state: Mutex<State>,
}

impl ArrivalLog {
    /// Open (creating) the log folder. Segments already there are left for
    /// [`ArrivalLog::leftover_segments`]; new ones get higher ids. Spare
    /// files already there are used; missing ones are made by
    /// [`ArrivalLog::prepare_spares`].
    pub fn open(dir: &Path) -> io::Result<ArrivalLog> {
        super::create_dir_durable(dir)?;
        let next_id = list_segments(dir)?.last().map_or(1, |(id, _)| id + 1);
        let mut spares = Vec::new();
        let mut next_spare = 0;
        for e in fs::read_dir(dir)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some(n) = name.strip_prefix("spare-").and_then(|n| n.parse::<u64>().ok()) {
                spares.push(p.clone());
                next_spare = next_spare.max(n + 1);
            } else if name.starts_with(".spare-") {
                let _ = fs::remove_file(&p); // unfinished: made again
            }
        }
        let dirty = spares.clone();
        Ok(ArrivalLog { dir: dir.to_owned(), state: Mutex::new(State { next_id, spares, dirty, next_spare, ..Default::default() }) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Zero-fill spare segment files until [`SPARES`] are ready (run on a
    /// background thread at start: 16 MiB of writing each, once per node,
    /// since settled segments are recycled as spares afterwards).
    /// Nothing is written while the file system has less than `keep_free`
    /// bytes free beyond them: on a nearly full disk the space goes to
    /// received instances, not to spares.
    pub fn prepare_spares(&self, keep_free: u64) -> io::Result<usize> {
        let mut made = 0;
        loop {
            if crate::spool::free_bytes(&self.dir)? < keep_free.saturating_add(ROTATE_BYTES) {
                return Ok(made);
            }
            let n = {
                let mut st = self.state.lock().unwrap();
                if st.spares.len() >= SPARES {
                    return Ok(made);
                }
                st.next_spare += 1;
                st.next_spare - 1
            };
            let tmp = self.dir.join(format!(".spare-{n}"));
            let write = || -> io::Result<()> {
                let f = File::create(&tmp)?;
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..ROTATE_BYTES >> 20 {
                    (&f).write_all(&zeros)?;
                }
                f.sync_all()
            };
            if let Err(e) = write() {
                // a half-written spare would hold its space until the next start
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            let spare = self.dir.join(format!("spare-{n}"));
            fs::rename(&tmp, &spare)?;
            self.state.lock().unwrap().spares.push(spare);
            made += 1;
        }
    }

    /// Segments on disk that this process did not write (a crash left them):
    /// to be replayed before serving.
    pub fn leftover_segments(&self) -> io::Result<Vec<PathBuf>> {
        let st = self.state.lock().unwrap();
        Ok(list_segments(&self.dir)?.into_iter().filter(|(id, _)| !st.paths.contains_key(id)).map(|(_, p)| p).collect())
    }

    /// Start a new segment in a spare file if one is ready, else in a new
    /// file; its name is durable before any record in it is acknowledged.
    fn open_segment(&self, st: &mut State) -> io::Result<()> {
        let id = st.next_id;
        st.next_id += 1;
        let nonce = random_nonce();
        let path = self.dir.join(format!("{id:012}-{nonce:016x}.{SUFFIX}"));
        let file = match st.spares.pop() {
            Some(spare) => {
                st.dirty.retain(|d| *d != spare);
                fs::rename(&spare, &path)?;
                OpenOptions::new().write(true).open(&path)?
            }
            None => OpenOptions::new().write(true).create_new(true).open(&path)?,
        };
        if let Err(e) = super::sync_dir(&self.dir) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        st.counts.insert(id, Counts::default());
        st.paths.insert(id, path);
        st.active = Some(Active { id, nonce, file: Arc::new(file), flush: Arc::default(), pos: 0, broken: false });
        Ok(())
    }

    /// Append one encoded record and make it durable. Returns the segment
    /// id, to be passed to [`ArrivalLog::done`] once the record has been
    /// materialized. On error nothing was acknowledged; the next record is
    /// written over whatever part of this one reached the file.
    pub fn append(&self, rec: &mut [u8]) -> io::Result<u64> {
        let (file, id, flush) = {
            let mut st = self.state.lock().unwrap();
            if st.active.as_ref().is_some_and(|a| a.broken || (a.pos > 0 && a.pos + rec.len() as u64 > ROTATE_BYTES)) {
                self.seal(&mut st);
            }
            if st.active.is_none() {
                self.open_segment(&mut st)?;
            }
            let a = st.active.as_mut().expect("opened above");
            rec[8..16].copy_from_slice(&a.nonce.to_le_bytes());
            a.file.write_all_at(rec, a.pos)?;
            a.pos += rec.len() as u64;
            let (id, file, flush) = (a.id, a.file.clone(), a.flush.clone());
            st.counts.get_mut(&id).expect("active has counts").appended += 1;
            (file, id, flush)
        };
        let _flush = flush.lock().unwrap_or_else(|e| e.into_inner());
        // A flush of this segment that failed after this record was written
        // may have dropped its page too, though this flush would succeed:
        // it is not acknowledged either.
        let failed_before = self.state.lock().unwrap().counts.get(&id).is_some_and(|c| c.broken);
        let flushed =
            if failed_before { Err(io::Error::other("an earlier flush of this arrival log segment failed")) } else { file.sync_data() };
        if let Err(e) = flushed {
            // After a failed fsync the kernel may have dropped the pages:
            // this segment is not trusted with more records. The record was
            // not acknowledged; count it as settled so the segment can go.
            let mut st = self.state.lock().unwrap();
            if let Some(a) = st.active.as_mut().filter(|a| a.id == id) {
                a.broken = true;
            }
            if let Some(c) = st.counts.get_mut(&id) {
                c.broken = true;
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
            c.broken |= a.broken;
            if c.done >= c.appended {
                let recycle = !c.broken;
                self.retire(st, a.id, recycle);
            }
        }
    }

    /// A settled, sealed segment: recycle its file as a spare (its blocks
    /// are written, which makes later syncs cheap) or delete it. A lost
    /// rename or deletion only means a replay that finds everything already
    /// recorded: no folder fsync needed.
    fn retire(&self, st: &mut State, id: u64, recycle: bool) {
        st.counts.remove(&id);
        let Some(path) = st.paths.remove(&id) else { return };
        // a segment a large record grew beyond the size is not kept as one
        let full = fs::metadata(&path).is_ok_and(|m| m.len() == ROTATE_BYTES);
        if recycle && full && st.spares.len() < SPARES {
            let spare = self.dir.join(format!("spare-{}", st.next_spare));
            st.next_spare += 1;
            if fs::rename(&path, &spare).is_ok() {
                st.spares.push(spare.clone());
                st.dirty.push(spare);
                return;
            }
        }
        let _ = fs::remove_file(&path);
    }

    /// `n` records of segment `id` are materialized (durable in the spool
    /// and the journal). A closed segment whose records are all settled is
    /// retired.
    pub fn done(&self, id: u64, n: u64) {
        let mut st = self.state.lock().unwrap();
        let Some(c) = st.counts.get_mut(&id) else { return };
        c.done += n;
        if c.sealed && c.done >= c.appended {
            let recycle = !c.broken;
            self.retire(&mut st, id, recycle);
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

    /// Zero the spares that still hold old records (see `State::dirty`);
    /// each is out of use while it is written. Returns how many. Run when
    /// ingest is idle. A spare that cannot be zeroed is removed.
    pub fn scrub_spares(&self) -> io::Result<usize> {
        let mut n = 0;
        loop {
            let spare = {
                let mut st = self.state.lock().unwrap();
                let Some(p) = st.dirty.pop() else { return Ok(n) };
                st.spares.retain(|s| *s != p);
                p
            };
            let zero = || -> io::Result<()> {
                let f = OpenOptions::new().write(true).open(&spare)?;
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..ROTATE_BYTES >> 20 {
                    (&f).write_all(&zeros)?;
                }
                f.set_len(ROTATE_BYTES)?;
                f.sync_all()
            };
            if let Err(e) = zero() {
                let _ = fs::remove_file(&spare);
                return Err(e);
            }
            self.state.lock().unwrap().spares.push(spare);
            n += 1;
        }
    }

    /// Records appended but not yet materialized (for status and tests).
    pub fn unsettled(&self) -> u64 {
        self.state.lock().unwrap().counts.values().map(|c| c.appended - c.done.min(c.appended)).sum()
    }

    /// Spare files ready (for tests and benchmarks).
    pub fn spares(&self) -> usize {
        self.state.lock().unwrap().spares.len()
    }
}

/// Segment files `<id>-<nonce>.log` in `dir`, by id.
fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == SUFFIX)
            && let Some((id, _)) = nonce_of(&p)
        {
            out.push((id, p));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::journal::{InstanceRecord, JobKind};

    /// An arrival of series 1.2.3.4 (3 slices) for tests.
    pub(crate) fn arrival(sop: &str) -> Arrival {
        Arrival {
            kind: JobKind::Pet,
            study_uid: "1.2.3".into(),
            series_uid: "1.2.3.4".into(),
            modality: Some("PT".into()),
            calling_ae: "CONSOLE".into(),
            number_of_slices: Some(3),
            multiframe: false,
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

    fn append(log: &ArrivalLog, sop: &str, data: &[u8]) -> u64 {
        log.append(&mut encode(&arrival(sop), &[b"head", data]).bytes).unwrap()
    }

    fn path(log: &ArrivalLog, id: u64) -> PathBuf {
        log.state.lock().unwrap().paths[&id].clone()
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_not_damage() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        let e1 = encode(&arrival("1.1"), &[b"head", b"data one"]);
        assert_eq!(&e1.bytes[e1.file.clone()], b"headdata one");
        let id = append(&log, "1.1", b"data one");
        assert_eq!(append(&log, "1.2", b"data two!"), id);
        let p = path(&log, id);
        let (recs, tail) = read_all(&p);
        assert_eq!(tail, Tail::default());
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].arrival, arrival("1.1"));
        assert_eq!(recs[1].file, b"headdata two!");

        // A crash in the middle of a third (never acknowledged) record.
        let mut e3 = encode(&arrival("1.3"), &[b"head", b"third"]);
        e3.bytes[8..16].copy_from_slice(&nonce_of(&p).unwrap().1.to_le_bytes());
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&e3.bytes[..e3.bytes.len() - 3]).unwrap();
        let (recs, tail) = read_all(&p);
        assert_eq!(recs.len(), 2);
        assert!(tail.stopped.unwrap().contains("cut short"));
        assert!(!tail.damaged);
    }

    /// A failed flush is reported to one caller only: a record written to
    /// the same segment before the failure was seen is not acknowledged
    /// by the next flush's success (here the failure is recorded between
    /// that record's write and its flush, as another appender would).
    #[test]
    fn a_record_in_a_segment_whose_flush_failed_is_not_acknowledged() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        let id = append(&log, "1.1", b"abc");
        {
            let mut st = log.state.lock().unwrap();
            st.counts.get_mut(&id).unwrap().broken = true;
        }
        let e = log.append(&mut encode(&arrival("1.2"), &[b"head", b"def"]).bytes).unwrap_err();
        assert!(e.to_string().contains("an earlier flush of this arrival log segment failed"), "{e}");
        // the segment takes no more records: the next goes to a new one
        let next = append(&log, "1.3", b"ghi");
        assert_ne!(next, id);
    }

    #[test]
    fn a_flipped_bit_before_a_good_record_is_damage() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        let id = append(&log, "1.1", b"abc");
        append(&log, "1.2", b"def");
        let p = path(&log, id);
        let mut bytes = fs::read(&p).unwrap();
        bytes[HEAD + 5] ^= 1; // inside the first record's meta
        fs::write(&p, &bytes).unwrap();
        let (recs, tail) = read_all(&p);
        assert_eq!(recs.len(), 1, "the second, acknowledged record behind the damage is read");
        assert_eq!(recs[0].arrival, arrival("1.2"));
        assert_eq!(tail.damage.as_deref(), Some("checksum mismatch"));
        assert!(tail.damaged && tail.skipped_bytes > 0 && tail.stopped.is_none(), "{tail:?}");
    }

    #[test]
    fn recycled_and_zero_filled_files_end_at_the_last_record_of_this_segment() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        // a disk without room beyond what must stay free gets no spare
        assert_eq!(log.prepare_spares(u64::MAX).unwrap(), 0);
        assert_eq!(log.spares(), 0);
        assert!(fs::read_dir(d.path()).unwrap().next().is_none(), "nothing written");
        assert_eq!(log.prepare_spares(0).unwrap(), SPARES);
        assert_eq!(log.spares(), SPARES);
        // The first segment goes into a zero-filled spare.
        let id = append(&log, "1.1", b"one");
        let p = path(&log, id);
        assert_eq!(fs::metadata(&p).unwrap().len(), ROTATE_BYTES, "written into the spare, not appended");
        let (recs, tail) = read_all(&p);
        assert_eq!((recs.len(), tail.stopped.as_deref(), tail.damaged), (1, Some("no record marker"), false));
        // Settled and idle: recycled as a spare, with its old record in it.
        log.done(id, 1);
        log.retire_idle();
        assert!(!p.exists());
        assert_eq!(log.spares(), SPARES);
        let spare = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|s| fs::read(s).unwrap().windows(3).any(|w| w == b"one"))
            .expect("a spare still holds the record");
        // zeroed once ingest is idle: the instance does not outlive retention there
        assert_eq!(log.scrub_spares().unwrap(), 1);
        assert_eq!(log.scrub_spares().unwrap(), 0, "only spares holding records are zeroed");
        let bytes = fs::read(&spare).unwrap();
        assert!(bytes.len() as u64 == ROTATE_BYTES && bytes.iter().all(|&b| b == 0));
        assert_eq!(log.spares(), SPARES);
        // The next segments reuse spare files: the old record (another nonce)
        // is not read as one of theirs.
        let mut ids = vec![];
        for i in 0..3 {
            let id = append(&log, &format!("2.{i}"), b"a longer record than before");
            ids.push(id);
            log.done(id, 1);
            log.retire_idle();
        }
        let id = append(&log, "3.1", b"x");
        let p = path(&log, id);
        let (recs, tail) = read_all(&p);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].arrival, arrival("3.1"));
        assert!(!tail.damaged, "{tail:?}");
    }

    #[test]
    fn settled_segments_go_and_leftovers_are_found() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        let id = append(&log, "1.1", b"x");
        append(&log, "1.2", b"y");
        assert_eq!(log.unsettled(), 2);
        let p = path(&log, id);
        log.retire_idle(); // not idle: two records unsettled
        assert!(p.exists());
        log.done(id, 2);
        assert!(p.exists(), "the active segment stays until idle");
        log.retire_idle();
        assert!(!p.exists(), "a small new file is deleted, not kept as a spare");
        assert_eq!(log.unsettled(), 0);

        // A segment written by an earlier process is a leftover for replay;
        // new appends go to a new segment after it.
        let id2 = append(&log, "1.3", b"z");
        let p2 = path(&log, id2);
        drop(log);
        let log = ArrivalLog::open(d.path()).unwrap();
        assert_eq!(log.leftover_segments().unwrap(), vec![p2.clone()]);
        let id3 = append(&log, "1.4", b"w");
        assert!(id3 > id2);
        assert_eq!(log.leftover_segments().unwrap(), vec![p2]);
    }

    #[test]
    fn a_full_segment_rotates_and_goes_when_settled() {
        let d = tempfile::tempdir().unwrap();
        let log = ArrivalLog::open(d.path()).unwrap();
        let big = vec![7u8; (ROTATE_BYTES / 2 + 1) as usize];
        let a = append(&log, "1.1", &big);
        let pa = path(&log, a);
        let b = append(&log, "1.2", &big);
        let c = append(&log, "1.3", b"small");
        assert_ne!(a, b, "the segment rotated before passing {ROTATE_BYTES} bytes");
        assert_eq!(b, c);
        log.done(a, 1);
        assert!(!pa.exists(), "a sealed, settled segment goes at once");
        assert_eq!(log.spares(), 0, "a segment below the spare size is not recycled");
    }
}
