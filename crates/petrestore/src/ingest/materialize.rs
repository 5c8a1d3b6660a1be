//! The materializer: turns acknowledged records of the arrival log
//! (`spool::arrivals`) into spool files and journal entries, in batches.
//!
//! Order within a batch, so that the journal never names a file that could
//! be lost: (1) write every instance file through a temporary and a rename,
//! (2) fsync the files and their folders, (3) record the arrivals in sled and
//! flush, (4) tell the log the records are settled (it deletes a segment once
//! all of its records are). A crash at any point leaves the records in the
//! log, and [`replay`] at the next start does the same steps again; an
//! instance the journal already has is skipped, so nothing is stored twice.
//!
//! A batch is what arrives until the senders pause (see [`QUIET`]), so the
//! file work runs between series rather than against the acknowledgements.
//!
//! If a batch fails (disk or journal error) the materializer stops working:
//! ingest then answers 0xA700 and the records stay in the log for the next
//! start.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::store::Signature;
use crate::journal::{Arrival, Journal, Recorded};
use crate::spool::arrivals::{self, ArrivalLog, Encoded};
use crate::spool::{self, Spool};

/// A batch is gathered while records keep coming and is materialized once
/// none has come for this long: creating and fsyncing spool files while a
/// sender streams a series competes with the one fdatasync its every
/// acknowledgement waits for (measured: ~13 % of ingest time, BENCHMARKS.md).
/// The acknowledged records are durable in the log meanwhile.
const QUIET: Duration = Duration::from_millis(30);
/// ... but no longer than this after its first record (senders that never
/// pause, several consoles at once).
const MAX_DEFER: Duration = Duration::from_secs(1);
/// Batch limits (count and bytes: the batch is held in memory). One log
/// segment's worth of bytes: a batch settles a whole segment, which is then
/// recycled as a spare before the log needs a new one (appending to a fresh
/// file costs twice as much per fdatasync as overwriting a spare).
const MAX_BATCH: usize = 1024;
const MAX_BATCH_BYTES: usize = arrivals::ROTATE_BYTES as usize;
/// Records waiting for the materializer; beyond this, ingest waits (bounded
/// memory: README.md "How it works").
const QUEUE: usize = 64;
/// ... and bytes held for it (queued and in the batch being written):
/// beyond this, ingest waits too. One instance larger than this is taken
/// when nothing else is held, so a large Enhanced PET object still passes,
/// one at a time, instead of 64 of them at once.
const QUEUE_BYTES: u64 = 64 << 20;
/// After this long without records the active segment is closed and deleted.
const IDLE: Duration = Duration::from_secs(1);

/// No instance for this long: spare log segments that still hold records
/// are zeroed ([`ArrivalLog::scrub_spares`]).
const SCRUB_IDLE: Duration = Duration::from_secs(60);
/// First wait before a failed move is tried again; it doubles up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(15);

/// One acknowledged record on its way into the spool.
pub struct Item {
    pub segment: u64,
    pub arrival: Arrival,
    pub encoded: Encoded,
}

impl Item {
    fn file(&self) -> &[u8] {
        &self.encoded.bytes[self.encoded.file.clone()]
    }
}

// One message per acknowledged instance: the item moves through the
// channel by value (264 bytes) instead of costing an allocation each.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Item(Item),
    Stop,
}

/// Key of an instance in the in-flight set.
pub fn instance_key(series_uid: &str, sop_uid: &str) -> String {
    format!("{series_uid}/{sop_uid}")
}

/// What one batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Instances newly recorded in the journal.
    pub recorded: usize,
    /// Instances the journal already had (a replay, or a duplicate sent
    /// while the first copy was still in the log).
    pub already: usize,
    /// Records whose UIDs cannot make a spool path (cannot happen for
    /// records written by ingest, which validates them; a damaged log can).
    pub invalid: usize,
    /// Some series became complete.
    pub completed: bool,
}

/// Why received instances could not be moved from the arrival log into
/// the spool and the journal (they stay in the log either way).
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    #[error("journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("fsync of {what} failed: {source}")]
    Sync { what: String, source: std::io::Error },
    #[error("cannot read the arrival log at {}: {source}", path.display())]
    Log { path: PathBuf, source: std::io::Error },
    #[error("cannot remove or set aside {}: {source}", path.display())]
    Remove { path: PathBuf, source: std::io::Error },
    #[error("the materializer has stopped")]
    Stopped,
}

impl MaterializeError {
    /// The cause, first and short: it becomes the Error Comment (64
    /// characters) of the instances refused meanwhile.
    pub fn short_reason(&self) -> &'static str {
        let io = match self {
            MaterializeError::Journal(_) => return "journal write failed",
            MaterializeError::Write { source, .. }
            | MaterializeError::Sync { source, .. }
            | MaterializeError::Log { source, .. }
            | MaterializeError::Remove { source, .. } => source,
            MaterializeError::Stopped => return "stopping",
        };
        if io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28) { "disk full" } else { "spool write failed" }
    }

    /// The journal's storage failed a write: sled refuses writes until it
    /// is reopened (a restart).
    pub fn is_journal_io(&self) -> bool {
        matches!(self, MaterializeError::Journal(j) if j.is_storage_io())
    }
}

/// Steps (1)–(3) of the module doc for one batch.
pub fn materialize(spool: &Spool, journal: &Journal, entries: &[(&Arrival, &[u8])]) -> Result<Batch, MaterializeError> {
    // retention may not remove a job's files between our writing a file
    // (perhaps at the path of a purged instance of the same series) and
    // recording it
    let _hold = journal.hold_retention();
    let mut out = Batch::default();
    let mut files = Vec::new();
    let mut dirs = BTreeSet::<PathBuf>::new();
    let mut todo = Vec::new();
    let mut seen = HashSet::new();
    for (a, bytes) in entries {
        let sop = &a.record.sop_instance_uid;
        let already = match journal.has_instance(&a.series_uid, sop) {
            Ok(already) => already,
            Err(e) => {
                remove_unrecorded(spool, &todo);
                return Err(e.into());
            }
        };
        if already || !seen.insert(instance_key(&a.series_uid, sop)) {
            out.already += 1;
            continue;
        }
        // The path is made again from the UIDs (validated there), never taken
        // from the log as written.
        let Some(rel) = Spool::relative_path(&a.study_uid, &a.series_uid, sop) else {
            tracing::error!(sop = %sop, "arrival log record with invalid UIDs skipped");
            out.invalid += 1;
            continue;
        };
        let abs = spool.absolute(&rel);
        let f = match spool::write_unsynced(&abs, &[bytes]) {
            Ok(f) => f,
            Err(source) => {
                remove_unrecorded(spool, &todo);
                return Err(MaterializeError::Write { path: abs, source });
            }
        };
        files.push(f);
        if let Some(d) = abs.parent() {
            dirs.insert(d.to_owned());
        }
        let mut a = (*a).clone();
        a.record.path = rel;
        todo.push(a);
    }
    // A failure before an instance is recorded removes its spool file
    // again (its copy stays in the arrival log): the spool never holds an
    // instance the journal lacks, which the start-up check would take for
    // damage, and a full disk gets the room back.
    let mut recorded = 0;
    let result = (|| -> Result<(), MaterializeError> {
        for f in &files {
            f.sync_all().map_err(|source| MaterializeError::Sync { what: "a spool file".into(), source })?;
        }
        for d in &dirs {
            spool::sync_dir(d).map_err(|source| MaterializeError::Sync { what: d.display().to_string(), source })?;
        }
        for a in &todo {
            match journal.record(a)? {
                Recorded::New { complete, .. } => {
                    out.recorded += 1;
                    out.completed |= complete;
                }
                Recorded::Duplicate { .. } => out.already += 1,
            }
            recorded += 1;
        }
        Ok(())
    })();
    if let Err(e) = result {
        remove_unrecorded(spool, &todo[recorded..]);
        return Err(e);
    }
    journal.flush()?;
    Ok(out)
}

/// Remove the spool files written for these instances (not recorded in
/// the journal; their copies are in the arrival log).
fn remove_unrecorded(spool: &Spool, arrivals: &[Arrival]) {
    for a in arrivals {
        let path = spool.absolute(&a.record.path);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a spool file whose instance was not recorded");
        }
    }
}

/// What claiming an instance for the arrival log found ([`Materializer::claim`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Not on its way: this sender's copy goes into the log.
    New,
    /// Another copy is being written into the log and not acknowledged
    /// yet (it may still fail): this one can be neither a duplicate nor a
    /// conflict; the sender is asked to send again.
    Pending,
    /// A copy with the same content is in the log: a duplicate.
    Same,
    /// A copy with other content is in the log: the named attribute (or
    /// the pixels) differs.
    Different(&'static str),
}

/// An instance on its way into the spool.
struct InFlight {
    /// What its content says (`None` for items submitted without a claim).
    sig: Option<Box<Signature>>,
    /// Its record is in the arrival log (durable): set by `submit`.
    appended: bool,
}

struct Shared {
    /// Instances claimed for the arrival log or in it, not yet in the
    /// spool and the journal.
    in_flight: Mutex<HashMap<String, InFlight>>,
    /// Bytes of acknowledged instances not yet written into the spool.
    bytes: std::sync::atomic::AtomicU64,
    failed: Mutex<Option<String>>,
    /// The last batch failed because the journal's storage failed a write.
    journal_io: std::sync::atomic::AtomicBool,
    /// Series of the start-up replay still to do.
    replay_series: Mutex<HashSet<String>>,
    /// Set when the thread has ended; with `room`, wakes submitters that
    /// wait for bytes to be written.
    ended: Mutex<bool>,
    room: std::sync::Condvar,
    /// [`QUEUE_BYTES`], smaller in tests.
    max_bytes: u64,
}

impl Shared {
    /// Bytes were written (or the thread ended): let waiting submitters look again.
    fn wake_submitters(&self) {
        let _g = self.ended.lock().unwrap();
        self.room.notify_all();
    }
}

/// The background thread and its queue.
pub struct Materializer {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Materializer {
    pub fn start(log: Arc<ArrivalLog>, spool: Spool, journal: Journal, wake: Arc<Notify>) -> std::io::Result<Materializer> {
        Self::start_bounded(log, spool, journal, wake, QUEUE_BYTES, None)
    }

    /// Start with the start-up replay still to do: the start could not
    /// move the arrival log's leftover records into the spool (a full
    /// disk). New instances are refused with `pending.reason` until the
    /// replay, retried with backoff, has gone through; then
    /// `pending.then` runs and ingest resumes.
    pub fn start_after_replay(
        log: Arc<ArrivalLog>,
        spool: Spool,
        journal: Journal,
        wake: Arc<Notify>,
        pending: PendingReplay,
    ) -> std::io::Result<Materializer> {
        Self::start_bounded(log, spool, journal, wake, QUEUE_BYTES, Some(pending))
    }

    fn start_bounded(
        log: Arc<ArrivalLog>,
        spool: Spool,
        journal: Journal,
        wake: Arc<Notify>,
        max_bytes: u64,
        pending: Option<PendingReplay>,
    ) -> std::io::Result<Materializer> {
        let (tx, rx) = sync_channel(QUEUE);
        let shared = Arc::new(Shared {
            in_flight: Mutex::new(HashMap::new()),
            bytes: Default::default(),
            failed: Mutex::new(pending.as_ref().map(|p| p.reason.to_string())),
            journal_io: std::sync::atomic::AtomicBool::new(pending.as_ref().is_some_and(|p| p.journal_io)),
            replay_series: Mutex::new(pending.as_ref().map(|p| p.series.clone()).unwrap_or_default()),
            ended: Mutex::new(false),
            room: std::sync::Condvar::new(),
            max_bytes,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("materializer".into()).spawn(move || {
            // however the thread ends (a panic too), waiting submitters are told
            struct Ended(Arc<Shared>);
            impl Drop for Ended {
                fn drop(&mut self) {
                    *self.0.ended.lock().unwrap_or_else(|p| p.into_inner()) = true;
                    self.0.room.notify_all();
                }
            }
            let _ended = Ended(s.clone());
            let mut early = Vec::new();
            if let Some(p) = pending {
                if !replay_until_done(&rx, &mut early, &log, &spool, &journal, &wake, &s) {
                    return;
                }
                (p.then)();
            }
            run(rx, early, &log, &spool, &journal, &wake, &s);
        })?;
        Ok(Materializer { tx, shared, thread: Mutex::new(Some(thread)) })
    }

    /// Whether this instance is in the log but not yet in the journal.
    pub fn in_flight(&self, series_uid: &str, sop_uid: &str) -> bool {
        self.shared.in_flight.lock().unwrap().contains_key(&instance_key(series_uid, sop_uid))
    }

    /// Mark an instance as on its way before its copy goes into the arrival
    /// log, in one step with the check: of two associations sending the
    /// same SOP Instance UID at once, one claims it and the other compares
    /// with it. Unclaim ([`Materializer::unclaim`]) when the copy is not
    /// appended after all.
    pub fn claim(&self, series_uid: &str, sop_uid: &str, sig: Signature) -> Claim {
        use std::collections::hash_map::Entry;
        match self.shared.in_flight.lock().unwrap().entry(instance_key(series_uid, sop_uid)) {
            Entry::Vacant(v) => {
                v.insert(InFlight { sig: Some(Box::new(sig)), appended: false });
                Claim::New
            }
            Entry::Occupied(o) if !o.get().appended => Claim::Pending,
            Entry::Occupied(o) => match o.get().sig.as_deref().and_then(|first| first.first_difference(&sig)) {
                Some(what) => Claim::Different(what),
                None => Claim::Same,
            },
        }
    }

    pub fn unclaim(&self, series_uid: &str, sop_uid: &str) {
        self.shared.in_flight.lock().unwrap().remove(&instance_key(series_uid, sop_uid));
    }

    /// Series with acknowledged instances not yet in the journal (on
    /// their way, or in a start-up replay still to do): the scheduler does
    /// not end their quiet time meanwhile.
    pub fn waiting_series(&self) -> HashSet<String> {
        let mut series = self.shared.replay_series.lock().unwrap().clone();
        for key in self.shared.in_flight.lock().unwrap().keys() {
            if let Some((s, _)) = key.split_once('/') {
                series.insert(s.to_owned());
            }
        }
        series
    }

    /// Acknowledged instances not yet in the spool and the journal.
    pub fn backlog(&self) -> usize {
        self.shared.in_flight.lock().unwrap().len()
    }

    /// Bytes of acknowledged instances not yet written into the spool (room
    /// ingest keeps for them).
    pub fn backlog_bytes(&self) -> u64 {
        self.shared.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether its thread is still running.
    pub fn alive(&self) -> bool {
        self.thread.lock().unwrap().as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Whether the move into the spool fails because the journal refuses
    /// writes after a storage error (sled keeps refusing until reopened).
    pub fn journal_unwritable(&self) -> bool {
        self.shared.journal_io.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the materializer stopped working, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().unwrap().clone()
    }

    /// Hand over an acknowledged record. Waits while the queue is full, in
    /// records or in bytes.
    pub fn submit(&self, item: Item) -> Result<(), MaterializeError> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = item.file().len() as u64;
        // its record is in the log now: a copy sent again is compared with it
        self.shared
            .in_flight
            .lock()
            .unwrap()
            .entry(instance_key(&item.arrival.series_uid, &item.arrival.record.sop_instance_uid))
            .or_insert(InFlight { sig: None, appended: true })
            .appended = true;
        {
            let s = &self.shared;
            let mut ended = s.ended.lock().unwrap();
            loop {
                if *ended {
                    return Err(MaterializeError::Stopped);
                }
                let held = s.bytes.load(Relaxed);
                if held == 0 || held.saturating_add(n) <= s.max_bytes {
                    break;
                }
                ended = s.room.wait(ended).unwrap();
            }
            // counted under the lock: two waiters cannot both take the last room
            s.bytes.fetch_add(n, Relaxed);
        }
        self.tx.send(Msg::Item(item)).map_err(|_| MaterializeError::Stopped)
    }

    /// Finish the queued records and stop (graceful shutdown).
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

/// The start-up replay the start could not finish, and what follows it.
pub struct PendingReplay {
    /// Why it could not finish: new instances are refused with it meanwhile.
    pub reason: &'static str,
    /// It failed on the journal's storage (sled refuses writes until reopened).
    pub journal_io: bool,
    /// Series UIDs of the instances in the log ([`Materializer::waiting_series`]).
    pub series: HashSet<String>,
    /// Runs once the replay has gone through (before ingest resumes).
    pub then: Box<dyn FnOnce() + Send>,
}

/// Retry [`replay`] with backoff until it goes through (true) or the
/// materializer is stopped first (false: the records stay in the log for
/// the next start). Items handed over meanwhile (none are: ingest refuses
/// while `failed` is set) are kept in `early` for the main loop.
fn replay_until_done(
    rx: &Receiver<Msg>,
    early: &mut Vec<Item>,
    log: &ArrivalLog,
    spool: &Spool,
    journal: &Journal,
    wake: &Notify,
    shared: &Shared,
) -> bool {
    let mut wait = RETRY_FIRST;
    loop {
        match rx.recv_timeout(wait) {
            Ok(Msg::Item(i)) => {
                early.push(i);
                continue;
            }
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
            Err(RecvTimeoutError::Timeout) => {}
        }
        match replay(log, spool, journal) {
            Ok(r) => {
                shared.journal_io.store(false, std::sync::atomic::Ordering::Relaxed);
                shared.failed.lock().unwrap().take();
                shared.replay_series.lock().unwrap().clear();
                r.log("arrival log replayed: the spool takes instances again: ingest resumed");
                if r.batch.completed {
                    wake.notify_one();
                }
                return true;
            }
            Err(e) => {
                let journal_io = e.is_journal_io();
                shared.journal_io.store(journal_io, std::sync::atomic::Ordering::Relaxed);
                *shared.failed.lock().unwrap() = Some(e.short_reason().to_string());
                tracing::warn!(error = %e, retry_in = ?wait, "the arrival log's records still cannot be moved into the spool; \
                    they are safe in the log; new instances are refused meanwhile");
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

fn run(rx: Receiver<Msg>, early: Vec<Item>, log: &ArrivalLog, spool: &Spool, journal: &Journal, wake: &Notify, shared: &Shared) {
    let mut stop = false;
    let mut last_item = Instant::now();
    let mut early = std::collections::VecDeque::from(early);
    while !stop {
        let next = match early.pop_front() {
            Some(i) => Ok(Msg::Item(i)),
            None => rx.recv_timeout(IDLE),
        };
        let first = match next {
            Ok(Msg::Item(i)) => i,
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                log.retire_idle();
                // between studies, not between two series of one: zeroing
                // competes with the next acknowledgements for the disk
                if last_item.elapsed() >= SCRUB_IDLE
                    && let Err(e) = log.scrub_spares()
                {
                    tracing::warn!(error = %e, "cannot zero a spare arrival log segment; it is removed");
                }
                continue;
            }
        };
        last_item = Instant::now();
        let deadline = Instant::now() + MAX_DEFER;
        let mut bytes = first.encoded.bytes.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let left = deadline.saturating_duration_since(Instant::now()).min(QUIET);
            if left.is_zero() {
                break;
            }
            let next = match early.pop_front() {
                Some(i) => Ok(Msg::Item(i)),
                None => rx.recv_timeout(left),
            };
            match next {
                Ok(Msg::Item(i)) => {
                    bytes += i.encoded.bytes.len();
                    batch.push(i);
                }
                Ok(Msg::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // Move the batch into the spool and the journal. A failure (a full
        // disk, a journal error) pauses ingest (new instances get 0xA700
        // with the reason) and the batch is retried with backoff until it
        // goes through: when space comes back, ingest resumes by itself.
        // The records stay in the arrival log meanwhile, so a stop or a
        // crash loses nothing either: the next start replays them.
        let mut wait = RETRY_FIRST;
        loop {
            let entries: Vec<(&Arrival, &[u8])> = batch.iter().map(|i| (&i.arrival, i.file())).collect();
            match materialize(spool, journal, &entries) {
                Ok(b) => {
                    shared.journal_io.store(false, std::sync::atomic::Ordering::Relaxed);
                    if shared.failed.lock().unwrap().take().is_some() {
                        tracing::info!(instances = batch.len(), "the spool takes instances again: ingest resumed");
                    }
                    {
                        let mut f = shared.in_flight.lock().unwrap();
                        for i in &batch {
                            f.remove(&instance_key(&i.arrival.series_uid, &i.arrival.record.sop_instance_uid));
                        }
                    }
                    let written: u64 = batch.iter().map(|i| i.file().len() as u64).sum();
                    shared.bytes.fetch_sub(written, std::sync::atomic::Ordering::Relaxed);
                    shared.wake_submitters();
                    let mut per_segment = BTreeMap::<u64, u64>::new();
                    for i in &batch {
                        *per_segment.entry(i.segment).or_default() += 1;
                    }
                    for (seg, n) in per_segment {
                        log.done(seg, n);
                    }
                    if b.completed {
                        wake.notify_one();
                    }
                    break;
                }
                Err(e) => {
                    let journal_io = e.is_journal_io();
                    shared.journal_io.store(journal_io, std::sync::atomic::Ordering::Relaxed);
                    let reason = e.short_reason().to_string();
                    let first = shared.failed.lock().unwrap().replace(reason.clone()).is_none();
                    if first {
                        tracing::error!(error = %e, "cannot move received instances from the arrival log into the spool; \
                            they are safe in the log; new instances are refused ({reason}) and the move is retried");
                    } else {
                        tracing::warn!(error = %e, retry_in = ?wait, "spool still refuses the received instances");
                    }
                    if stop {
                        // left in the arrival log: the next start replays them
                        return;
                    }
                    match rx.recv_timeout(wait) {
                        Ok(Msg::Item(i)) => batch.push(i),
                        Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        Err(RecvTimeoutError::Timeout) => {}
                    }
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }
    if shared.failed.lock().unwrap().is_none() {
        log.retire_idle();
    }
}

/// What [`replay`] found.
#[derive(Debug, Default)]
pub struct Replayed {
    pub segments: usize,
    pub records: usize,
    pub batch: Batch,
    /// Damaged segments, kept as `*.damaged` for inspection.
    pub damaged: Vec<PathBuf>,
}

impl Replayed {
    /// Say what the replay did.
    pub fn log(&self, what: &str) {
        tracing::info!(
            segments = self.segments,
            records = self.records,
            recorded = self.batch.recorded,
            already = self.batch.already,
            "{what}"
        );
    }
}

/// Record every instance of the log's leftover segments (a crash left
/// them) that the journal does not have yet, then delete the segments.
/// Runs at start, before ingest is open.
pub fn replay(log: &ArrivalLog, spool: &Spool, journal: &Journal) -> Result<Replayed, MaterializeError> {
    let mut r = Replayed::default();
    for seg in log.leftover_segments().map_err(|source| MaterializeError::Log { path: log.dir().to_owned(), source })? {
        let mut pending: Vec<arrivals::Record> = Vec::new();
        let mut bytes = 0usize;
        let flush = |pending: &mut Vec<arrivals::Record>, r: &mut Replayed| -> Result<(), MaterializeError> {
            let entries: Vec<(&Arrival, &[u8])> = pending.iter().map(|p| (&p.arrival, &p.file[..])).collect();
            let b = materialize(spool, journal, &entries)?;
            r.records += pending.len();
            r.batch.recorded += b.recorded;
            r.batch.already += b.already;
            r.batch.invalid += b.invalid;
            r.batch.completed |= b.completed;
            pending.clear();
            Ok(())
        };
        let mut failure = None;
        let tail = arrivals::read_segment(&seg, |rec| {
            bytes += rec.file.len();
            pending.push(rec);
            if pending.len() >= MAX_BATCH || bytes >= MAX_BATCH_BYTES {
                bytes = 0;
                if let Err(e) = flush(&mut pending, &mut r) {
                    let text = e.to_string();
                    failure = Some(e);
                    return Err(std::io::Error::other(text));
                }
            }
            Ok(())
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let tail = tail.map_err(|source| MaterializeError::Log { path: seg.clone(), source })?;
        flush(&mut pending, &mut r)?;
        r.segments += 1;
        if tail.damaged {
            let aside = seg.with_extension("damaged");
            tracing::error!(segment = %seg.display(), kept = %aside.display(), reason = ?tail.damage, skipped_bytes = tail.skipped_bytes,
                "arrival log segment is damaged: bytes between good records are not a record; every good record, \
                 before and after the damage, is recorded; the file is kept for inspection");
            std::fs::rename(&seg, &aside).map_err(|source| MaterializeError::Remove { path: seg.clone(), source })?;
            r.damaged.push(seg);
        } else {
            if let Some(why) = &tail.stopped {
                tracing::debug!(segment = %seg.display(), why, "end of the segment's records");
            }
            remove(&seg)?;
        }
    }
    Ok(r)
}

/// The spool paths (relative to its root) of the instances in the log's
/// leftover segments, read without moving them.
pub fn logged_paths(log: &ArrivalLog) -> std::io::Result<HashSet<PathBuf>> {
    let mut paths = HashSet::new();
    for seg in log.leftover_segments()? {
        arrivals::read_segment(&seg, |rec| {
            let a = &rec.arrival;
            if let Some(rel) = Spool::relative_path(&a.study_uid, &a.series_uid, &a.record.sop_instance_uid) {
                paths.insert(rel);
            }
            Ok(())
        })?;
    }
    Ok(paths)
}

fn remove(p: &Path) -> Result<(), MaterializeError> {
    std::fs::remove_file(p).map_err(|source| MaterializeError::Remove { path: p.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn arrival(sop: &str) -> Arrival {
        let mut a = crate::spool::arrivals::tests::arrival(sop);
        // what a damaged or hostile log might say: never used as a path
        a.record.path = "../../etc/passwd".into();
        a.record.image_index = sop.rsplit('.').next().and_then(|s| s.parse().ok());
        a
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect();
        v.sort();
        v
    }

    fn enc(i: u32) -> Encoded {
        arrivals::encode(&arrival(&format!("1.2.3.4.5.{i}")), &[format!("file {i}").as_bytes()])
    }

    #[test]
    fn the_refusal_reason_comes_from_the_error_kind() {
        let write = |source| MaterializeError::Write { path: "/spool/x.dcm".into(), source };
        assert_eq!(write(std::io::Error::from_raw_os_error(28)).short_reason(), "disk full");
        assert_eq!(write(std::io::Error::from(std::io::ErrorKind::StorageFull)).short_reason(), "disk full");
        assert_eq!(write(std::io::Error::from(std::io::ErrorKind::PermissionDenied)).short_reason(), "spool write failed");
        let sync = MaterializeError::Sync { what: "a spool file".into(), source: std::io::Error::from_raw_os_error(28) };
        assert_eq!(sync.short_reason(), "disk full");
        assert!(sync.to_string().starts_with("fsync of a spool file failed"), "{sync}");
    }

    #[test]
    fn a_batch_that_fails_leaves_no_spool_file_the_journal_lacks() {
        let d = tempfile::tempdir().unwrap();
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        let spool = Spool::new(d.path().join("spool")).unwrap();
        let (a, b) = (arrival("1.2.3.4.5.1"), arrival("1.2.3.4.5.2"));
        // the second file cannot be written: a folder stands at its path
        let path = |a: &Arrival| spool.absolute(&Spool::relative_path(&a.study_uid, &a.series_uid, &a.record.sop_instance_uid).unwrap());
        std::fs::create_dir_all(path(&b)).unwrap();
        let err = materialize(&spool, &journal, &[(&a, b"first"), (&b, b"second")]).unwrap_err();
        assert!(matches!(err, MaterializeError::Write { .. }), "{err}");
        assert!(!path(&a).exists(), "the first file, written before the failure, is removed again");
        assert!(!journal.has_instance(&a.series_uid, "1.2.3.4.5.1").unwrap());
        assert!(crate::journal::integrity::check(&journal, spool.root()).is_empty());
        // once the obstacle is gone the same batch goes through
        std::fs::remove_dir(path(&b)).unwrap();
        let done = materialize(&spool, &journal, &[(&a, b"first"), (&b, b"second")]).unwrap();
        assert_eq!(done.recorded, 2);
        assert_eq!(std::fs::read(path(&a)).unwrap(), b"first");
    }

    #[test]
    fn replay_records_what_the_journal_lacks_and_handles_torn_and_damaged_segments() {
        let d = tempfile::tempdir().unwrap();
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        let spool = Spool::new(d.path().join("spool")).unwrap();
        let dir = spool.root().join("arrivals");
        // A crashed process: three acknowledged records, the first of which
        // already reached the journal; then a torn fourth record.
        {
            let log = ArrivalLog::open(&dir).unwrap();
            for i in 1..=3 {
                log.append(&mut enc(i).bytes).unwrap();
            }
        }
        let mut a1 = arrival("1.2.3.4.5.1");
        a1.record.path = "1.2.3/1.2.3.4/1.2.3.4.5.1.dcm".into();
        assert!(matches!(journal.record(&a1).unwrap(), Recorded::New { .. }));
        let seg1 = segments(&dir)[0].clone();
        let on_disk = std::fs::read(&seg1).unwrap();
        let mut torn = enc(9);
        torn.bytes[8..16].copy_from_slice(&on_disk[8..16]); // this segment's nonce
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg1).unwrap();
        f.write_all(&torn.bytes[..torn.bytes.len() / 2]).unwrap();
        // A second crashed process: three records, a bit flipped in the
        // second, so the third (acknowledged) one sits behind damage.
        {
            let log = ArrivalLog::open(&dir).unwrap();
            for i in [7, 8, 6] {
                log.append(&mut enc(i).bytes).unwrap();
            }
        }
        let seg2 = segments(&dir)[1].clone();
        let mut bytes = std::fs::read(&seg2).unwrap();
        bytes[enc(7).bytes.len() + 40] ^= 0x10;
        std::fs::write(&seg2, &bytes).unwrap();

        let log = ArrivalLog::open(&dir).unwrap();
        let r = replay(&log, &spool, &journal).unwrap();
        assert_eq!((r.segments, r.records), (2, 5));
        assert_eq!(r.batch, Batch { recorded: 4, already: 1, invalid: 0, completed: true });
        assert!(!seg1.exists(), "a torn tail is an unacknowledged write: the segment is done");
        assert_eq!(r.damaged, vec![seg2.clone()]);
        assert!(!seg2.exists() && seg2.with_extension("damaged").exists(), "damage is kept for inspection");
        let file = |i: u32| spool.root().join(format!("1.2.3/1.2.3.4/1.2.3.4.5.{i}.dcm"));
        assert!(!file(1).exists(), "already journaled: not written again");
        assert_eq!(std::fs::read(file(2)).unwrap(), b"file 2");
        assert_eq!(std::fs::read(file(7)).unwrap(), b"file 7");
        // the acknowledged record behind the damage is not lost
        assert_eq!(std::fs::read(file(6)).unwrap(), b"file 6");
        assert!(!file(8).exists() && !file(9).exists());
        let j = journal.get(&crate::journal::job_id("1.2.3.4")).unwrap().unwrap();
        assert_eq!(j.received, 5);
        // Idempotent: a second replay finds nothing to do.
        let r = replay(&ArrivalLog::open(&dir).unwrap(), &spool, &journal).unwrap();
        assert_eq!(r.segments, 0);
    }

    #[test]
    fn the_materializer_moves_records_into_the_spool_and_deletes_idle_segments() {
        let d = tempfile::tempdir().unwrap();
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        let spool = Spool::new(d.path().join("spool")).unwrap();
        let log = Arc::new(ArrivalLog::open(&spool.root().join("arrivals")).unwrap());
        let wake = Arc::new(Notify::new());
        let m = Materializer::start(log.clone(), spool.clone(), journal.clone(), wake).unwrap();
        for i in 1..=3 {
            let a = arrival(&format!("1.2.3.4.5.{i}"));
            let mut encoded = arrivals::encode(&a, &[b"x"]);
            let segment = log.append(&mut encoded.bytes).unwrap();
            m.submit(Item { segment, arrival: a, encoded }).unwrap();
            assert!(
                m.in_flight("1.2.3.4", &format!("1.2.3.4.5.{i}")) || journal.has_instance("1.2.3.4", &format!("1.2.3.4.5.{i}")).unwrap()
            );
        }
        m.stop();
        assert_eq!(log.unsettled(), 0);
        assert!(!m.in_flight("1.2.3.4", "1.2.3.4.5.1"));
        assert_eq!(journal.get(&crate::journal::job_id("1.2.3.4")).unwrap().unwrap().received, 3);
        assert!(log.leftover_segments().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(log.dir()).unwrap().count(), 0, "the idle segment is gone");
        assert!(m.failure().is_none());
    }
    #[test]
    fn ingest_waits_while_the_bytes_held_for_the_spool_are_at_their_bound() {
        let d = tempfile::tempdir().unwrap();
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        let spool = Spool::new(d.path().join("spool")).unwrap();
        let log = Arc::new(ArrivalLog::open(&spool.root().join("arrivals")).unwrap());
        let m = Materializer::start_bounded(log.clone(), spool, journal.clone(), Arc::new(Notify::new()), 1000, None).unwrap();
        let item = |i: u32| {
            let a = arrival(&format!("1.2.3.4.5.{i}"));
            let mut encoded = arrivals::encode(&a, &[&[7u8; 600]]);
            let segment = log.append(&mut encoded.bytes).unwrap();
            Item { segment, arrival: a, encoded }
        };
        // 600 bytes held of 1000: the next 600 wait until the first are
        // written, which takes at least QUIET (the batch waits for more)
        m.submit(item(1)).unwrap();
        assert!(m.backlog_bytes() >= 600);
        m.submit(item(2)).unwrap();
        assert!(!m.in_flight("1.2.3.4", "1.2.3.4.5.1"), "the second was taken before the first was written");
        assert!(journal.has_instance("1.2.3.4", "1.2.3.4.5.1").unwrap());
        // one instance larger than the bound passes when nothing else is held
        let a = arrival("1.2.3.4.5.3");
        let mut encoded = arrivals::encode(&a, &[&[7u8; 5000]]);
        let segment = log.append(&mut encoded.bytes).unwrap();
        m.submit(Item { segment, arrival: a, encoded }).unwrap();
        m.stop();
        assert_eq!(journal.get(&crate::journal::job_id("1.2.3.4")).unwrap().unwrap().received, 3);
        assert_eq!(m.backlog_bytes(), 0);
        // after the thread has ended a submitter is told so, not left waiting
        assert!(matches!(m.submit(item(4)), Err(MaterializeError::Stopped)));
    }

    #[test]
    fn a_claim_answers_a_second_copy_only_once_the_first_is_in_the_log() {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        use dicom_dictionary_std::tags;
        let d = tempfile::tempdir().unwrap();
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        let spool = Spool::new(d.path().join("spool")).unwrap();
        let log = Arc::new(ArrivalLog::open(&spool.root().join("arrivals")).unwrap());
        // the series' spool folder blocked by a file: the record stays in
        // flight, in the log
        std::fs::create_dir_all(spool.root().join("1.2.3")).unwrap();
        std::fs::write(spool.root().join("1.2.3/1.2.3.4"), b"not a folder").unwrap();
        let m = Materializer::start_bounded(log.clone(), spool, journal, Arc::new(Notify::new()), 1 << 20, None).unwrap();
        let sig = |name: &str| {
            let mut o = dicom_object::InMemDicomObject::new_empty();
            o.put(DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from(name)));
            o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(vec![1, 2, 3].into())));
            Signature::of(&o)
        };
        let sop = "1.2.3.4.5.9";
        assert_eq!(m.claim("1.2.3.4", sop, sig("A^B")), Claim::New);
        // the first copy is not durable yet: it may still fail
        assert_eq!(m.claim("1.2.3.4", sop, sig("A^B")), Claim::Pending);
        // given up (its append failed): the next copy claims it
        m.unclaim("1.2.3.4", sop);
        assert_eq!(m.claim("1.2.3.4", sop, sig("A^B")), Claim::New);
        // in the log now
        let a = arrival(sop);
        let mut encoded = arrivals::encode(&a, &[&[7u8; 60]]);
        let segment = log.append(&mut encoded.bytes).unwrap();
        m.submit(Item { segment, arrival: a, encoded }).unwrap();
        assert_eq!(m.claim("1.2.3.4", sop, sig("A^B")), Claim::Same);
        assert_eq!(m.claim("1.2.3.4", sop, sig("C^D")), Claim::Different("Patient's Name"));
        m.stop();
    }
}
