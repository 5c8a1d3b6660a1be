//! The pipeline scheduler: reads the journal's active jobs and moves each
//! one step: a quiet series to the queue, a queued series to the worker (a
//! study at a time), a delivering series to egress when its backoff allows.
//! Wake-ups come from ingest and finished tasks, with a periodic tick as the
//! fallback; the journal is the only source of truth, so after a crash the
//! first pass picks up every unfinished job.

pub mod retention;
pub mod worker;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::egress;
use crate::journal::{JobKind, JobState, Journal, JournalError, Outcome, Payload, now_ms};
use crate::spool::Spool;

/// Scheduler state shared with its tasks.
pub struct Pipeline {
    pub worker: Arc<worker::WorkerCtx>,
    pub wake: Arc<Notify>,
    /// Jobs with a task in flight (restoration or delivery).
    busy: Mutex<HashSet<String>>,
    /// A study at a time per engine: one restoration in flight.
    restore_slot: Arc<Semaphore>,
    /// Associations per destination (egress).
    gates: egress::DestinationGates,
    /// Operator pause (MQTT `pause`): no new restoration is started; ingest
    /// and deliveries go on.
    pub paused: std::sync::atomic::AtomicBool,
    /// When the scheduler last finished a pass ([`monotonic_ms`]): the
    /// systemd watchdog is pinged only while this stays recent.
    pub last_pass_ms: Arc<std::sync::atomic::AtomicU64>,
    /// The journal's wall-clock waits (a series' quiet time, a wait for
    /// disk space), timed on the monotonic clock from when this process
    /// first saw them.
    waits: Mutex<Waits>,
    /// The restoration running, and since when.
    running: Mutex<Option<(String, std::time::Instant)>>,
    /// A journal write failed on its storage ([`JournalError::is_storage_io`])
    /// in a pass, a restoration or a delivery: sled refuses every write
    /// from then on, so it stays set; no restoration or delivery starts
    /// (a delivery sent but not recorded would be sent again in a loop),
    /// and the daemon restarts once the disk has room ([`crate::app`]).
    pub journal_io: Arc<std::sync::atomic::AtomicBool>,
    /// Ingest, set once it is started: while a series has acknowledged
    /// instances waiting for the spool (a stall, a start-up replay on a
    /// full disk), its quiet time does not end: its missing slices are
    /// among them. Other series go on.
    pub ingest: std::sync::OnceLock<Arc<crate::ingest::materialize::Materializer>>,
}

impl Pipeline {
    pub fn new(worker: worker::WorkerCtx, wake: Arc<Notify>) -> Arc<Pipeline> {
        Arc::new(Pipeline {
            worker: Arc::new(worker),
            wake,
            busy: Mutex::new(HashSet::new()),
            restore_slot: Arc::new(Semaphore::new(1)),
            gates: egress::DestinationGates::default(),
            paused: std::sync::atomic::AtomicBool::new(false),
            last_pass_ms: Arc::new(std::sync::atomic::AtomicU64::new(monotonic_ms())),
            waits: Mutex::new(Waits::default()),
            running: Mutex::new(None),
            journal_io: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            ingest: std::sync::OnceLock::new(),
        })
    }

    fn settings(&self) -> Arc<Settings> {
        self.worker.settings.get()
    }
    fn journal(&self) -> &Journal {
        &self.worker.journal
    }
    fn spool(&self) -> &Spool {
        &self.worker.spool
    }

    /// Crash recovery: a job found in `Restoring` at start was interrupted.
    pub fn recover(&self) -> Result<usize, JournalError> {
        let mut n = 0;
        let s = self.settings();
        let copies = 1 + u64::from(s.destinations.iter().any(|d| d.uncertainty));
        for job in self.journal().active_jobs()? {
            if job.state == JobState::Restoring {
                self.journal().update(&job.id, |j| {
                    j.interrupted_restores = j.interrupted_restores.saturating_add(1);
                    let (n, max) = (j.interrupted_restores, crate::journal::job::MAX_INTERRUPTED_RESTORES);
                    j.note(if n < max {
                        format!("restoration was interrupted (restart; {n} of {max} allowed in a row): restoring again")
                    } else {
                        format!("restoration was interrupted (restart) {n} times in a row: not restored again, the job fails")
                    });
                    j.set_state(JobState::Queued);
                })?;
            }
            // the room ingest holds for the derived series of what is not restored yet
            if job.kind == JobKind::Pet && matches!(job.state, JobState::Receiving | JobState::Queued | JobState::Restoring) {
                let spool = &self.worker.spool;
                let bytes: u64 = self
                    .journal()
                    .instances(&job.id)?
                    .iter()
                    .filter_map(|r| std::fs::metadata(spool.absolute(&r.path)).ok())
                    .map(|m| m.len())
                    .sum();
                spool.reservations().add(&job.series_uid, bytes * copies);
            }
            n += 1;
        }
        Ok(n)
    }

    /// Run until `shutdown`; tasks are spawned on `tracker` so the caller
    /// can wait for them.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, tracker: TaskTracker) {
        let mut last_purge = std::time::Instant::now() - Duration::from_secs(3600);
        loop {
            // Retention: at most every 10 s, off the async threads.
            if last_purge.elapsed() >= Duration::from_secs(10) {
                last_purge = std::time::Instant::now();
                let w = self.worker.clone();
                match tokio::task::spawn_blocking(move || retention::purge(&w.settings.get(), &w.journal, &w.spool)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "retention pass failed"),
                    Err(e) => tracing::error!(error = %e, "retention task panicked"),
                }
            }
            // the pass reads and updates the journal (fsync): off the async workers
            let result = tokio::task::block_in_place(|| self.pass(&shutdown, &tracker));
            if result.as_ref().is_err_and(JournalError::is_storage_io) {
                self.journal_io.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if let Err(e) = result {
                tracing::error!(error = %e, "scheduler pass failed; retrying");
            }
            self.last_pass_ms.store(monotonic_ms(), std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        tracing::info!("scheduler stopped; waiting for running tasks");
    }

    fn pass(self: &Arc<Self>, shutdown: &CancellationToken, tracker: &TaskTracker) -> Result<(), JournalError> {
        let now = now_ms();
        let settings = self.settings();
        let series = &settings.series;
        self.end_a_hung_restoration(settings.restore.time_limit);
        if self.journal_io.load(std::sync::atomic::Ordering::Relaxed) {
            // nothing that writes the journal starts until the restart
            return Ok(());
        }
        let jobs = self.journal().active_jobs()?;
        self.waits.lock().expect("waits lock").keep(jobs.iter().map(|j| j.id.as_str()));
        let waiting = self.ingest.get().map(|m| m.waiting_series()).unwrap_or_default();
        for job in jobs {
            if self.busy.lock().expect("busy lock").contains(&job.id) {
                continue;
            }
            let waited = |what: &'static str, until_ms: u64, cap: Duration| {
                self.waits.lock().expect("waits lock").over(&job.id, what, until_ms, cap, now, monotonic_ms())
            };
            match &job.state {
                JobState::Receiving
                    if !waiting.contains(&job.series_uid) && {
                        let quiet = if job.multiframe { series.multiframe_quiet_timeout } else { series.quiet_timeout };
                        waited("quiet", job.last_received_ms.saturating_add(quiet.as_millis() as u64), quiet)
                    } =>
                {
                    self.quiet_timeout(&job)?;
                    self.wake.notify_one();
                }
                JobState::Queued | JobState::Restoring => {
                    if self.paused.load(std::sync::atomic::Ordering::Relaxed)
                        || !waited("space", job.restore_not_before_ms, worker::SPACE_RETRY_MAX)
                    {
                        continue;
                    }
                    let Ok(permit) = self.restore_slot.clone().try_acquire_owned() else { continue };
                    self.busy.lock().expect("busy lock").insert(job.id.clone());
                    let me = self.clone();
                    let id = job.id.clone();
                    tracker.spawn(async move {
                        let w = me.worker.clone();
                        let id2 = id.clone();
                        *me.running.lock().expect("running lock") = Some((id.clone(), std::time::Instant::now()));
                        let r = tokio::task::spawn_blocking(move || worker::restore_job(&w, &id2)).await;
                        *me.running.lock().expect("running lock") = None;
                        match r {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                if e.is_storage_io() {
                                    me.journal_io.store(true, std::sync::atomic::Ordering::Relaxed);
                                }
                                tracing::error!(job = %id, error = %e, "journal error during restoration")
                            }
                            Err(e) => tracing::error!(job = %id, error = %e, "restoration task panicked"),
                        }
                        drop(permit);
                        me.busy.lock().expect("busy lock").remove(&id);
                        me.wake.notify_one();
                    });
                }
                JobState::Delivering { .. } if egress::job_due(&job, now, settings.egress.backoff_max, settings.egress.max_attempts) => {
                    self.busy.lock().expect("busy lock").insert(job.id.clone());
                    let me = self.clone();
                    let id = job.id.clone();
                    let cancel = shutdown.clone();
                    tracker.spawn(async move {
                        let s = me.settings();
                        if let Err(e) = egress::deliver_due(
                            me.journal(),
                            me.spool(),
                            &s.node.state_dir,
                            &s.egress,
                            &s.destinations,
                            &me.gates,
                            &id,
                            &cancel,
                        )
                        .await
                        {
                            if e.is_storage_io() {
                                me.journal_io.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                            tracing::error!(job = %id, error = %e, "journal error during delivery");
                        }
                        me.busy.lock().expect("busy lock").remove(&id);
                        me.wake.notify_one();
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A restoration cannot be interrupted: one running past
    /// `restore.time_limit_s` (an engine that never returns: a GPU or
    /// driver hang) would hold the only restoration slot for ever. Its job
    /// is told why, and the process exits (status 70) for systemd to
    /// restart it: the job then counts an interrupted restoration, and
    /// after [`crate::journal::job::MAX_INTERRUPTED_RESTORES`] in a row it
    /// fails and its original is forwarded. Everything acknowledged is in
    /// the arrival log or the spool already.
    fn end_a_hung_restoration(&self, limit: Duration) {
        let Some((id, since)) = self.running.lock().expect("running lock").clone() else { return };
        let ran = since.elapsed();
        if ran <= limit {
            return;
        }
        let why = format!(
            "restoration has run {:.0} s, past restore.time_limit_s ({:.0} s): the daemon exits to end it and restarts",
            ran.as_secs_f64(),
            limit.as_secs_f64()
        );
        tracing::error!(job = %id, "{why}");
        // best effort: a hang may come with failing storage, and the exit
        // must happen either way
        if let Err(e) = self.journal().update(&id, |j| j.note(why.clone())).and_then(|_| self.journal().flush()) {
            tracing::error!(job = %id, error = %e, "the reason could not be written to the job's history");
        }
        // _exit: no atexit handlers, which could wait on the hung engine's
        // driver (the journal is flushed; acknowledged instances are in the
        // arrival log or the spool)
        // SAFETY: ends the process; touches no memory of ours.
        unsafe { libc::_exit(70) }
    }

    /// No instance for `quiet_timeout`: decide, per policy, what the series becomes.
    fn quiet_timeout(&self, job: &crate::journal::Job) -> Result<(), JournalError> {
        let destinations = self.settings().destinations.clone();
        self.journal().update(&job.id, |j| {
            let s = &self.settings().series;
            j.note(format!("no instance for {:?}", if j.multiframe { s.multiframe_quiet_timeout } else { s.quiet_timeout }));
            match j.kind {
                // The worker applies series.incomplete_policy and the geometry checks.
                JobKind::Pet => j.set_state(JobState::Queued),
                JobKind::Passthrough => {
                    let reason = format!("not PET ({}): passed through unchanged", j.modality.clone().unwrap_or_default());
                    if destinations.is_empty() {
                        j.set_state(JobState::Skipped { reason });
                    } else {
                        j.plan_deliveries_to(&destinations);
                        j.set_state(JobState::Delivering { payload: Payload::Original, outcome: Outcome::Skipped { reason } });
                    }
                }
            }
        })?;
        if job.kind == JobKind::Passthrough {
            // never restored: no room is held for outputs (instances of a
            // PET class under this series reserved some)
            self.worker.spool.reservations().release(&job.series_uid);
        }
        Ok(())
    }

    /// Operator retry (see [`retry_job`]), waking the scheduler.
    pub fn retry(&self, id: &str) -> Result<crate::journal::Job, String> {
        let destinations: Vec<String> = self.settings().destinations.iter().map(|d| d.name.clone()).collect();
        let job = retry_job(self.journal(), &destinations, id)?;
        self.wake.notify_one();
        Ok(job)
    }
}

/// Operator retry of a finished job: restore (PET) or forward (pass-through)
/// again. Derived UIDs are deterministic, so the result carries the same UIDs
/// as before. Works on the journal alone, so it also works with the daemon
/// stopped (the job then runs at the next start).
pub fn retry_job(journal: &Journal, destinations: &[String], id: &str) -> Result<crate::journal::Job, String> {
    // not while retention removes files (it checks the job is still the
    // finished one it listed only under this hold)
    let _hold = journal.hold_retention();
    let job =
        journal.get(id).map_err(|e| e.to_string())?.ok_or_else(|| format!("no job {id}; `petrestore jobs list` shows the known jobs"))?;
    if !job.state.is_terminal() {
        return Err(format!("job {id} is {}; only finished jobs can be retried", job.state.name()));
    }
    // a purge cut short by a stop says so in the outcome log only; the
    // next start finishes it
    let purging = journal.outcomes().read().map_err(|e| format!("cannot read the outcome log: {e}"))?.get(id).is_some_and(|e| e.purged);
    if job.purged || purging {
        return Err(format!("job {id} cannot be retried: retention removed its instances; send the series again"));
    }
    journal
        .update(id, |j| {
            j.note("retry requested by operator");
            j.rerun_requested = false;
            j.interrupted_restores = 0;
            j.output_rebuilds = 0;
            match j.kind {
                JobKind::Pet => j.set_state(JobState::Queued),
                JobKind::Passthrough => {
                    j.plan_deliveries(destinations);
                    j.set_state(JobState::Delivering {
                        payload: Payload::Original,
                        outcome: Outcome::Skipped { reason: "not PET: passed through unchanged".into() },
                    });
                }
            }
        })
        .map_err(|e| e.to_string())
}

/// Milliseconds on the monotonic clock since this process first asked: a
/// jump of the wall clock (a box without a battery-backed clock setting it
/// at boot, an NTP step) does not move it.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// Waits the journal holds as wall-clock times, timed on the monotonic
/// clock. The first time this process sees a wait (or sees it change), it
/// takes what is left by the wall clock then, at most `cap`, and counts
/// that down monotonically: a wall clock stepped forward does not end a
/// series' quiet time at once (processing it incomplete mid-transfer), and
/// one stepped back does not hold it for the hours it went back.
#[derive(Default)]
struct Waits {
    /// (job, what) → (the wall-clock time waited for, the monotonic ms it ends)
    by_job: std::collections::HashMap<(String, &'static str), (u64, u64)>,
}

impl Waits {
    /// Whether the wait for `until_ms` (wall clock) is over; `now_ms` and
    /// `mono_ms` are the two clocks now.
    fn over(&mut self, job: &str, what: &'static str, until_ms: u64, cap: Duration, now_ms: u64, mono_ms: u64) -> bool {
        let left = until_ms.saturating_sub(now_ms).min(cap.as_millis() as u64);
        let e = self.by_job.entry((job.to_owned(), what)).or_insert((until_ms, mono_ms + left));
        if e.0 != until_ms {
            *e = (until_ms, mono_ms + left);
        }
        mono_ms >= e.1
    }

    /// Forget the waits of jobs no longer active.
    fn keep<'a>(&mut self, active: impl Iterator<Item = &'a str>) {
        let active: HashSet<&str> = active.collect();
        self.by_job.retain(|(job, _), _| active.contains(job.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_wall_clock_stepped_forward_does_not_end_a_wait() {
        let mut w = Waits::default();
        // a series' last instance at wall 1,000,000: quiet for 60 s
        assert!(!w.over("j", "quiet", 1_060_000, MIN, 1_000_000, 5_000));
        // the wall clock jumps a day ahead 10 s later: still quiet
        assert!(!w.over("j", "quiet", 1_060_000, MIN, 1_000_000 + 86_400_000, 15_000));
        // 60 s after it was first seen, on the monotonic clock
        assert!(w.over("j", "quiet", 1_060_000, MIN, 1_000_000 + 86_400_000, 65_000));
    }

    #[test]
    fn a_wall_clock_stepped_back_holds_a_wait_no_longer_than_its_cap() {
        let mut w = Waits::default();
        // first seen after the clock went back a day: what is left is capped
        assert!(!w.over("j", "space", 1_000_000 + 86_400_000, MIN, 1_000_000, 0));
        assert!(!w.over("j", "space", 1_000_000 + 86_400_000, MIN, 1_000_000, 59_999));
        assert!(w.over("j", "space", 1_000_000 + 86_400_000, MIN, 1_000_000, 60_000));
        // a new time written (a new instance): counted again from then
        assert!(!w.over("j", "space", 2_000_000, MIN, 1_990_000, 61_000));
        assert!(w.over("j", "space", 2_000_000, MIN, 1_990_000, 71_000));
        // nothing to wait for
        assert!(w.over("k", "space", 0, MIN, 1_990_000, 71_000));
        w.keep(["k"].into_iter());
        assert_eq!(w.by_job.len(), 1);
    }

    #[test]
    fn a_delivery_time_beyond_the_longest_wait_is_due() {
        let cap = Duration::from_secs(300);
        assert!(egress::is_due(1_000, 1_000, cap));
        assert!(!egress::is_due(1_001, 1_000, cap));
        assert!(!egress::is_due(301_000, 1_000, cap));
        assert!(egress::is_due(301_001, 1_000, cap), "written before the clock went back");
        // a commitment wait keeps its own deadline (a reload may shorten the
        // timeout since): due when it passes, or when the request is dated
        // after now
        let mut d = crate::journal::Delivery {
            destination: "a".into(),
            delivered: false,
            attempts: 1,
            next_attempt_ms: 10_000_000,
            last_error: None,
            commitment: Some(crate::journal::PendingCommitment {
                transaction_uid: "2.25.1".into(),
                requested_ms: 1_000,
                count: 1,
                digest: String::new(),
            }),
            peer: None,
        };
        assert!(!egress::delivery_due(&d, 2_000, cap), "an hour's commitment wait is not cut by a 300 s backoff cap");
        assert!(egress::delivery_due(&d, 10_000_000, cap));
        d.commitment.as_mut().unwrap().requested_ms = 5_000;
        assert!(egress::delivery_due(&d, 2_000, cap), "requested after now: the clock went back");
    }
}
