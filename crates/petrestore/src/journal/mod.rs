//! The journal (sled): the truth about every received instance and every job.
//!
//! Three trees: `instances` (`<job>/<sop uid>` → [`InstanceRecord`]), `jobs`
//! (`<job>` → [`Job`]) and `active` (ids of non-terminal jobs, so the
//! scheduler never scans finished history). An arrival updates all three in
//! one transaction; callers flush before acknowledging anything. Channels
//! elsewhere only wake workers: after a crash, [`Journal::active_jobs`] is
//! where every unfinished job is found again.

pub mod integrity;
pub mod job;
pub mod outcomes;
pub mod rebuild;

use std::path::Path;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

pub use job::{Delivery, InstanceRecord, Job, JobKind, JobState, Outcome, Payload, PendingCommitment, UncertaintyRecord, job_id, now_ms};

/// Journal failures. Any of them turns a C-STORE into 0xA700.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("journal record {key} is unreadable ({message}); the spool still holds the instances")]
    Corrupt { key: String, message: String },
    #[error("job {0} not found in the journal; `petrestore jobs list` shows the known jobs")]
    NoSuchJob(String),
    #[error("journal at {path} is locked by another process (is `petrestore serve` running?)")]
    Locked { path: String },
}

impl JournalError {
    /// The storage under the journal failed a write (a full disk, an I/O
    /// error). sled then refuses every later write until the journal is
    /// opened again, i.e. until the process restarts.
    pub fn is_storage_io(&self) -> bool {
        matches!(self, JournalError::Sled(sled::Error::Io(_)))
    }
}

/// A newly received instance, as ingest saw it. Serialized into the arrival
/// log (`spool::arrivals`) before it is acknowledged.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Arrival {
    pub kind: JobKind,
    pub study_uid: String,
    pub series_uid: String,
    pub modality: Option<String>,
    pub calling_ae: String,
    pub number_of_slices: Option<u32>,
    /// A multi-frame (Enhanced or Legacy Converted Enhanced PET) instance:
    /// it carries no Image Index, so its series completes by a quiet timeout.
    #[serde(default)]
    pub multiframe: bool,
    pub record: InstanceRecord,
}

/// What recording an arrival did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The SOP Instance UID was already stored: nothing changed.
    Duplicate { job_id: String },
    /// Stored; `complete` when this instance completed the series.
    New { job_id: String, complete: bool },
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, JournalError> {
    serde_json::from_slice(v).map_err(|e| JournalError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), message: e.to_string() })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("journal records always serialize")
}

/// Apply an arrival to a job record; returns true when it completed the series.
fn apply_arrival(job: &mut Job, a: &Arrival, now: u64) -> bool {
    if job.purged && job.state.is_terminal() {
        // retention removed its instances: what arrives now is the series
        // sent again, counted from nothing (else its first instance would
        // look like a complete series)
        job.received = 0;
        job.index_bits.clear();
        job.expected_slices = None;
        job.multiframe = false;
        job.deliveries.clear();
        job.note("instance arrived after retention removed the job's files: the series is received anew");
    }
    job.received += 1;
    job.last_received_ms = now;
    if job.modality.is_none() {
        job.modality = a.modality.clone();
    }
    if job.expected_slices.is_none() {
        job.expected_slices = a.number_of_slices;
    }
    job.multiframe |= a.multiframe;
    if let Some(i) = a.record.image_index {
        job.mark_index(i);
    }
    match &job.state {
        JobState::Receiving => {
            if job.kind == JobKind::Pet && job.is_complete() {
                job.set_state(JobState::Queued);
                job.note(format!("series complete: {} instances", job.received));
                return true;
            }
        }
        JobState::Queued => {}
        JobState::Restoring | JobState::Delivering { .. } => {
            if !job.rerun_requested {
                job.rerun_requested = true;
                job.note("instance arrived during processing: the series will be processed again");
            }
        }
        JobState::Done | JobState::Failed { .. } | JobState::Skipped { .. } => {
            job.purged = false;
            job.set_state(JobState::Receiving);
            job.note("instance arrived after the job ended: receiving again");
            if job.kind == JobKind::Pet && job.is_complete() {
                job.set_state(JobState::Queued);
                return true;
            }
        }
    }
    false
}

/// Called after a job's state changed (telemetry's job events).
pub type Observer = Box<dyn Fn(&Job) + Send + Sync>;

/// The open journal of one daemon (cheap to clone).
#[derive(Clone)]
pub struct Journal {
    db: sled::Db,
    jobs: sled::Tree,
    instances: sled::Tree,
    active: sled::Tree,
    observer: std::sync::Arc<std::sync::OnceLock<Observer>>,
    /// Terminal states, also outside sled ([`outcomes`]).
    outcomes: std::sync::Arc<outcomes::OutcomeLog>,
    /// Held by the materializer from writing a batch's files to recording
    /// them ([`Journal::hold_retention`]) and by [`Journal::purge_job`]:
    /// retention and an arrival for the same job never interleave (a series
    /// sent again reuses its instances' paths).
    purge_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Journal {
    /// [`Journal::open`], waiting up to `wait` while the folder is locked:
    /// for a journal this process has just dropped, whose lock sled
    /// releases from its background thread a moment after the last handle.
    pub fn open_waiting(dir: &Path, wait: std::time::Duration) -> Result<Journal, JournalError> {
        let t = std::time::Instant::now();
        loop {
            match Journal::open(dir) {
                Err(JournalError::Locked { .. }) if t.elapsed() < wait => std::thread::sleep(std::time::Duration::from_millis(50)),
                r => return r,
            }
        }
    }

    /// Open (or create) the journal in `dir`.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        let db = sled::Config::new()
            .path(dir)
            // sled's memory use is several times its cache (sled#1309): keep it small.
            .cache_capacity(16 * 1024 * 1024)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => {
                    JournalError::Locked { path: dir.display().to_string() }
                }
                e => JournalError::Sled(e),
            })?;
        Ok(Journal {
            observer: Default::default(),
            outcomes: std::sync::Arc::new(outcomes::OutcomeLog::beside(dir)),
            purge_lock: std::sync::Arc::new(std::sync::Mutex::new(())),
            jobs: db.open_tree("jobs")?,
            instances: db.open_tree("instances")?,
            active: db.open_tree("active")?,
            db,
        })
    }

    /// Be told of every job state change (set once, by `app.rs`).
    pub fn set_observer(&self, f: Observer) {
        let _ = self.observer.set(f);
    }

    fn notify(&self, job: &Job) {
        if let Some(f) = self.observer.get() {
            f(job);
        }
    }

    /// Make everything recorded so far durable.
    pub fn flush(&self) -> Result<(), JournalError> {
        self.db.flush()?;
        Ok(())
    }

    /// The record of an instance, if recorded.
    pub fn instance(&self, series_uid: &str, sop_uid: &str) -> Result<Option<InstanceRecord>, JournalError> {
        let key = format!("{}/{sop_uid}", job_id(series_uid));
        self.instances.get(key.as_bytes())?.map(|v| decode(key.as_bytes(), &v)).transpose()
    }

    /// Is this instance already recorded?
    pub fn has_instance(&self, series_uid: &str, sop_uid: &str) -> Result<bool, JournalError> {
        Ok(self.instances.contains_key(format!("{}/{sop_uid}", job_id(series_uid)))?)
    }

    /// Record an arrival atomically (instance, job, active index). Not yet
    /// durable: call [`Journal::flush`] before acknowledging.
    pub fn record(&self, a: &Arrival) -> Result<Recorded, JournalError> {
        let id = job_id(&a.series_uid);
        let ikey = format!("{id}/{}", a.record.sop_instance_uid);
        let now = now_ms();
        // A new instance reopens a finished job (it is processed again): the
        // outcome log says so first, as `update` does for a retry. Otherwise
        // a repair after a crash would put the job back to finished and the
        // new instances would never be restored or delivered.
        if self.instances.get(ikey.as_bytes())?.is_none()
            && let Some(pre) = self.get(&id)?.filter(|j| j.state.is_terminal())
        {
            self.log_outcome(&pre, None)?;
        }
        let r = (&self.instances, &self.jobs, &self.active).transaction(|(ti, tj, ta)| {
            if ti.get(ikey.as_bytes())?.is_some() {
                return Ok((Recorded::Duplicate { job_id: id.clone() }, None));
            }
            let (mut job, before) = match tj.get(id.as_bytes())? {
                Some(v) => {
                    let j = decode::<Job>(id.as_bytes(), &v).map_err(ConflictableTransactionError::Abort)?;
                    let before = Some(j.state.name());
                    (j, before)
                }
                None => (Job::new(a.kind, &a.study_uid, &a.series_uid, &a.calling_ae, now), None),
            };
            let complete = apply_arrival(&mut job, a, now);
            ti.insert(ikey.as_bytes(), encode(&a.record))?;
            tj.insert(id.as_bytes(), encode(&job))?;
            ta.insert(id.as_bytes(), &[])?;
            let changed = (before != Some(job.state.name())).then_some(job);
            Ok((Recorded::New { job_id: id.clone(), complete }, changed))
        });
        let (recorded, changed) = r.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => JournalError::Sled(e),
        })?;
        if let Some(job) = changed {
            self.notify(&job);
        }
        Ok(recorded)
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, JournalError> {
        match self.jobs.get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// The outcome log beside the journal.
    pub fn outcomes(&self) -> &outcomes::OutcomeLog {
        &self.outcomes
    }

    fn log_outcome(&self, job: &Job, state: Option<JobState>) -> Result<(), JournalError> {
        self.append_outcome(job, state, false)
    }

    fn append_outcome(&self, job: &Job, state: Option<JobState>, purged: bool) -> Result<(), JournalError> {
        let e = outcomes::Entry {
            job_id: job.id.clone(),
            series_uid: job.series_uid.clone(),
            state,
            at_ms: now_ms(),
            received: Some(job.received),
            purged,
        };
        self.outcomes.append(&e).map_err(|e| JournalError::Sled(sled::Error::Io(e)))
    }

    /// Keep retention out while the returned guard lives: taken before an
    /// arrival's file is written, dropped once it is recorded.
    pub fn hold_retention(&self) -> std::sync::MutexGuard<'_, ()> {
        self.purge_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Retention of one finished job, with arrivals held off meanwhile (an
    /// instance recorded for the job in between would reopen it while its
    /// files are being removed): `remove` runs only if the job is still the
    /// one `seen` (terminal, not purged, not updated since), after the
    /// outcome log says the purge began; then the instance records are
    /// forgotten and the job marked purged with the note `remove` returns.
    /// `Ok(None)` when the job changed and was left alone, or when `remove`
    /// could not remove every file (`Err(note)`: the records stay, so the
    /// files are neither orphaned nor forgotten, and the next pass tries
    /// again).
    pub fn purge_job(
        &self,
        seen: &Job,
        remove: impl FnOnce(&[InstanceRecord]) -> Result<String, String>,
    ) -> Result<Option<Job>, JournalError> {
        let _hold = self.hold_retention();
        let Some(now) = self.get(&seen.id)? else { return Ok(None) };
        if !now.state.is_terminal() || now.purged || now.updated_ms != seen.updated_ms {
            return Ok(None);
        }
        self.append_outcome(&now, Some(now.state.clone()), true)?;
        let note = match remove(&self.instances(&now.id)?) {
            Ok(note) => note,
            Err(note) => {
                // retention's clock (the time the job ended) keeps running:
                // the next pass tries again
                if now.history.last().is_none_or(|e| e.what != note) {
                    self.update_timed(&now.id, |j| j.note(note.clone()), false)?;
                }
                return Ok(None);
            }
        };
        // One transaction: a crash between forgetting the records and
        // marking the job purged would leave a finished job with its
        // counters and no instances, which a series sent again would reopen
        // as complete from its first instance.
        let id = now.id.as_str();
        let keys = self.instances.scan_prefix(format!("{id}/").as_bytes()).keys().collect::<Result<Vec<_>, _>>()?;
        // (`Abort(None)`: the job changed meanwhile, e.g. `jobs retry`: its
        // records are kept)
        let r = (&self.jobs, &self.instances).transaction(|(tj, ti)| {
            let Some(v) = tj.get(id.as_bytes())? else {
                return Err(ConflictableTransactionError::Abort(Some(JournalError::NoSuchJob(id.to_owned()))));
            };
            let mut job: Job = decode(id.as_bytes(), &v).map_err(|e| ConflictableTransactionError::Abort(Some(e)))?;
            if !job.state.is_terminal() || job.purged || job.updated_ms != now.updated_ms {
                return Err(ConflictableTransactionError::Abort(None));
            }
            for k in &keys {
                ti.remove(k)?;
            }
            job.purged = true;
            job.note(note.clone());
            job.updated_ms = now_ms();
            tj.insert(id.as_bytes(), encode(&job))?;
            Ok(job)
        });
        let job = match r {
            Ok(job) => job,
            Err(TransactionError::Abort(None)) => return Ok(None),
            Err(TransactionError::Abort(Some(e))) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(JournalError::Sled(e)),
        };
        self.flush()?;
        Ok(Some(job))
    }

    /// Read-modify-write a job and keep the active index in step. `f` may
    /// run more than once (transaction retry): it must only edit the job.
    ///
    /// The outcome log follows the journal: a job that leaves a terminal
    /// state (a retry) is logged before the journal changes, one that
    /// reaches a terminal state after the journal is flushed. So the log is
    /// never ahead of a healthy journal.
    pub fn update(&self, id: &str, f: impl Fn(&mut Job)) -> Result<Job, JournalError> {
        self.update_timed(id, f, true)
    }

    /// [`Journal::update`]; with `touch` false the job keeps its
    /// `updated_ms` (a note that must not restart retention's clock).
    fn update_timed(&self, id: &str, f: impl Fn(&mut Job), touch: bool) -> Result<Job, JournalError> {
        if let Some(pre) = self.get(id)?.filter(|j| j.state.is_terminal()) {
            let mut next = pre.clone();
            f(&mut next);
            if !next.state.is_terminal() {
                self.log_outcome(&pre, None)?;
            }
        }
        let r = (&self.jobs, &self.active).transaction(|(tj, ta)| {
            let Some(v) = tj.get(id.as_bytes())? else {
                return Err(ConflictableTransactionError::Abort(JournalError::NoSuchJob(id.to_owned())));
            };
            let mut job: Job = decode(id.as_bytes(), &v).map_err(ConflictableTransactionError::Abort)?;
            let before = job.state.clone();
            let kept = job.updated_ms;
            f(&mut job);
            job.updated_ms = if touch { now_ms() } else { kept };
            tj.insert(id.as_bytes(), encode(&job))?;
            if job.state.is_terminal() {
                ta.remove(id.as_bytes())?;
            } else {
                ta.insert(id.as_bytes(), &[])?;
            }
            Ok((job, before))
        });
        let (job, before) = r.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => JournalError::Sled(e),
        })?;
        self.flush()?;
        if job.state.is_terminal() && !before.is_terminal() {
            self.log_outcome(&job, Some(job.state.clone()))?;
        }
        if before != job.state {
            self.notify(&job);
        }
        Ok(job)
    }

    /// What disagrees between the journal's own trees (for the start-up
    /// check): instance records of no job, unfinished jobs missing from the
    /// active index (the scheduler would never see them), and index
    /// entries of no job or of a finished one.
    pub(crate) fn index_problems(&self) -> Result<Vec<String>, JournalError> {
        let mut problems = Vec::new();
        let mut owners = std::collections::BTreeSet::new();
        for k in self.instances.iter().keys() {
            let k = k?;
            let id = k.split(|&b| b == b'/').next().unwrap_or_default();
            if owners.last().is_none_or(|l: &Vec<u8>| l.as_slice() != id) {
                owners.insert(id.to_vec());
            }
        }
        let orphans = owners.iter().filter(|id| !self.jobs.contains_key(id).unwrap_or(false)).count();
        if orphans > 0 {
            problems.push(format!("instances of {orphans} series are recorded without their job"));
        }
        let mut unlisted = 0;
        for kv in self.jobs.iter() {
            let (k, v) = kv?;
            let job: Job = decode(&k, &v)?;
            if !job.state.is_terminal() && !self.active.contains_key(&k)? {
                unlisted += 1;
            }
        }
        if unlisted > 0 {
            problems.push(format!("{unlisted} unfinished jobs are missing from the active index"));
        }
        let mut stale = 0;
        for k in self.active.iter().keys() {
            let k = k?;
            let finished = match self.jobs.get(&k)? {
                Some(v) => decode::<Job>(&k, &v)?.state.is_terminal(),
                None => true,
            };
            stale += usize::from(finished);
        }
        if stale > 0 {
            problems.push(format!("{stale} entries of the active index name no unfinished job"));
        }
        Ok(problems)
    }

    /// Every job not in a terminal state.
    pub fn active_jobs(&self) -> Result<Vec<Job>, JournalError> {
        let mut out = Vec::new();
        for k in self.active.iter().keys() {
            let k = k?;
            if let Some(v) = self.jobs.get(&k)? {
                out.push(decode(&k, &v)?);
            }
        }
        Ok(out)
    }

    /// Is the journal empty (a new or lost one)?
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.instances.is_empty()
    }

    /// All jobs, most recently updated first.
    pub fn all_jobs(&self) -> Result<Vec<Job>, JournalError> {
        let mut out: Vec<Job> = Vec::new();
        for kv in self.jobs.iter() {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        out.sort_by_key(|j| std::cmp::Reverse(j.updated_ms));
        Ok(out)
    }

    /// Terminal jobs whose files are still on disk, oldest first (for
    /// retention).
    pub fn purgeable(&self) -> Result<Vec<Job>, JournalError> {
        let mut out: Vec<Job> = Vec::new();
        for kv in self.jobs.iter() {
            let (k, v) = kv?;
            let j: Job = decode(&k, &v)?;
            if j.state.is_terminal() && !j.purged {
                out.push(j);
            }
        }
        out.sort_by_key(|j| j.updated_ms);
        Ok(out)
    }

    /// The instances of a job.
    pub fn instances(&self, job_id: &str) -> Result<Vec<InstanceRecord>, JournalError> {
        let mut out = Vec::new();
        for kv in self.instances.scan_prefix(format!("{job_id}/").as_bytes()) {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A PET arrival of series `series` (study 1.2), for the journal's and
    /// retention's unit tests.
    pub(crate) fn arrival(series: &str, sop: &str, index: u32, n: u32) -> Arrival {
        Arrival {
            kind: JobKind::Pet,
            study_uid: "1.2".into(),
            series_uid: series.into(),
            modality: Some("PT".into()),
            calling_ae: "CONSOLE".into(),
            number_of_slices: Some(n),
            multiframe: false,
            record: InstanceRecord {
                sop_instance_uid: sop.into(),
                sop_class_uid: crate::dicom::PET_IMAGE_STORAGE.into(),
                path: format!("1.2/{series}/{sop}.dcm").into(),
                transfer_syntax: crate::dicom::EXPLICIT_VR_LE.into(),
                image_index: Some(index),
            },
        }
    }

    #[test]
    fn arrivals_complete_a_series_and_duplicates_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let id = job_id("1.2.3");
        assert_eq!(j.record(&arrival("1.2.3", "9.1", 1, 2)).unwrap(), Recorded::New { job_id: id.clone(), complete: false });
        assert_eq!(j.record(&arrival("1.2.3", "9.1", 1, 2)).unwrap(), Recorded::Duplicate { job_id: id.clone() });
        assert_eq!(j.record(&arrival("1.2.3", "9.2", 2, 2)).unwrap(), Recorded::New { job_id: id.clone(), complete: true });
        let job = j.get(&id).unwrap().unwrap();
        assert_eq!((job.received, job.state.clone()), (2, JobState::Queued));
        assert_eq!(j.instances(&id).unwrap().len(), 2);
        assert_eq!(j.active_jobs().unwrap().len(), 1);
        j.update(&id, |job| job.set_state(JobState::Done)).unwrap();
        assert!(j.active_jobs().unwrap().is_empty());
        // a late instance reopens a finished job; still complete, so it is queued again
        j.record(&arrival("1.2.3", "9.3", 3, 2)).unwrap();
        let job = j.get(&id).unwrap().unwrap();
        assert_eq!(job.state, JobState::Queued);
        assert!(job.history.iter().any(|e| e.what.contains("receiving again")));
    }

    #[test]
    fn a_series_sent_again_after_retention_is_counted_from_nothing() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let id = job_id("1.2.6");
        j.record(&arrival("1.2.6", "9.1", 1, 2)).unwrap();
        j.record(&arrival("1.2.6", "9.2", 2, 2)).unwrap();
        let done = j.update(&id, |job| job.set_state(JobState::Done)).unwrap();
        let purged = j.purge_job(&done, |_| Ok("removed".into())).unwrap().expect("purged");
        // the records forgotten and the job marked in one step
        assert!(purged.purged && j.instances(&id).unwrap().is_empty());
        assert_eq!(j.get(&id).unwrap().unwrap().history.last().unwrap().what, "removed");
        // its first instance again: one of two, not a complete series
        assert_eq!(j.record(&arrival("1.2.6", "9.1", 1, 2)).unwrap(), Recorded::New { job_id: id.clone(), complete: false });
        let job = j.get(&id).unwrap().unwrap();
        assert_eq!((job.state.clone(), job.received, job.purged), (JobState::Receiving, 1, false));
        assert_eq!(job.missing_indexes(), Some(vec![2]));
        assert_eq!(j.record(&arrival("1.2.6", "9.2", 2, 2)).unwrap(), Recorded::New { job_id: id.clone(), complete: true });
    }

    #[test]
    fn survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(d.path()).unwrap();
            j.record(&arrival("1.2.4", "9.1", 1, 3)).unwrap();
            j.flush().unwrap();
        }
        // sled releases its file lock from a background thread after the
        // last handle drops; in-process reopen (never done by the daemon,
        // which restarts as a new process) may have to wait for it.
        let j = (0..100)
            .find_map(|_| {
                Journal::open(d.path()).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                })
            })
            .expect("journal reopens");
        assert_eq!(j.active_jobs().unwrap()[0].received, 1);
    }

    #[test]
    fn instance_during_processing_requests_a_rerun() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        j.record(&arrival("1.2.5", "9.1", 1, 1)).unwrap();
        let id = job_id("1.2.5");
        j.update(&id, |job| job.set_state(JobState::Restoring)).unwrap();
        j.record(&arrival("1.2.5", "9.2", 1, 1)).unwrap();
        assert!(j.get(&id).unwrap().unwrap().rerun_requested);
    }
}
