//! Egress: deliver a job's payload (derived or original series) to every
//! configured destination, with per-destination retries and exponential
//! backoff. Attempts, errors and the next attempt time live in the journal,
//! so a restart resumes exactly where delivery stood.

pub mod scu;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Destination, EgressSettings};
use crate::journal::{Job, JobState, Journal, JournalError, Outcome, Payload, now_ms};
use crate::spool::Spool;

/// Wait before attempt `attempts + 1`, after `attempts` failures:
/// initial · 2^(attempts−1), capped.
pub fn backoff(attempts: u32, s: &EgressSettings) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    s.backoff_initial.saturating_mul(1u32 << exp).min(s.backoff_max)
}

/// Folder holding a job's derived instances.
pub fn output_dir(state_dir: &Path, job_id: &str) -> PathBuf {
    state_dir.join("output").join(job_id)
}

/// The files a payload consists of, in a stable order.
pub fn payload_files(journal: &Journal, spool: &Spool, state_dir: &Path, job: &Job, payload: Payload) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = match payload {
        Payload::Original => journal.instances(&job.id).map_err(|e| e.to_string())?.into_iter().map(|r| spool.absolute(&r.path)).collect(),
        Payload::Derived => {
            let dir = output_dir(state_dir, &job.id);
            let rd = std::fs::read_dir(&dir).map_err(|e| format!("derived series folder {}: {e}", dir.display()))?;
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "dcm")).collect()
        }
    };
    files.sort();
    if payload == Payload::Derived && files.len() as u32 != job.output_count {
        return Err(format!("derived series has {} files, the journal expects {}", files.len(), job.output_count));
    }
    Ok(files)
}

/// The job's uncertainty series files (empty when it has none), checked
/// against the count the journal recorded.
pub fn uncertainty_files(state_dir: &Path, job: &Job) -> Result<Vec<PathBuf>, String> {
    let expected = job.uncertainty.as_ref().map_or(0, |u| u.count);
    if expected == 0 {
        return Ok(Vec::new());
    }
    let dir = output_dir(state_dir, &job.id).join(crate::pipeline::worker::UNCERTAINTY_DIR);
    let rd = std::fs::read_dir(&dir).map_err(|e| format!("uncertainty series folder {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "dcm")).collect();
    files.sort();
    if files.len() as u32 != expected {
        return Err(format!("uncertainty series has {} files, the journal expects {expected}", files.len()));
    }
    Ok(files)
}

/// Decide what a job in `Delivering` becomes: still delivering, its outcome
/// (or `Queued` again when a rerun was requested), or failed when a
/// destination ran out of attempts.
pub fn settle(job: &mut Job, max_attempts: u32) {
    let JobState::Delivering { outcome, .. } = &job.state else { return };
    let outcome = outcome.clone();
    if let Some(d) = job.deliveries.iter().find(|d| !d.delivered && d.attempts >= max_attempts) {
        let base = match &outcome {
            Outcome::Done => String::new(),
            Outcome::Failed { reason } | Outcome::Skipped { reason } => format!("{reason}; "),
        };
        let reason = format!(
            "{base}delivery to {} gave up after {} attempts: {}",
            d.destination,
            d.attempts,
            d.last_error.clone().unwrap_or_default()
        );
        job.set_state(JobState::Failed { reason });
        return;
    }
    if job.deliveries.iter().all(|d| d.delivered) {
        if job.rerun_requested {
            job.rerun_requested = false;
            job.set_state(JobState::Queued);
            job.note("re-running: instances arrived while the series was being processed");
        } else {
            job.set_state(outcome.into());
        }
    }
}

/// Earliest time (ms) a pending delivery of this job is due, if any.
pub fn next_due_ms(job: &Job) -> Option<u64> {
    job.deliveries.iter().filter(|d| !d.delivered).map(|d| d.next_attempt_ms).min()
}

/// Journal work from an async task: every update fsyncs, so the runtime is
/// told to move its other tasks off this worker thread meanwhile.
fn on_disk<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Attempt every due delivery of a job once, then settle it. Needs the
/// multi-thread runtime (the daemon's).
pub async fn deliver_due(
    journal: &Journal,
    spool: &Spool,
    state_dir: &Path,
    settings: &EgressSettings,
    destinations: &[Destination],
    job_id: &str,
    cancel: &CancellationToken,
) -> Result<(), JournalError> {
    let Some(job) = on_disk(|| journal.get(job_id))? else { return Ok(()) };
    let JobState::Delivering { payload, .. } = job.state.clone() else { return Ok(()) };
    let files = match payload_files(journal, spool, state_dir, &job, payload)
        .and_then(|f| Ok((f, if payload == Payload::Derived { uncertainty_files(state_dir, &job)? } else { Vec::new() })))
    {
        Ok(f) => f,
        Err(e) if payload == Payload::Derived => {
            // The derived series is damaged (e.g. a crash mid-write): make it again.
            on_disk(|| {
                journal.update(job_id, |j| {
                    j.note(format!("derived series incomplete ({e}): restoring again"));
                    j.set_state(JobState::Queued);
                })
            })?;
            return Ok(());
        }
        Err(e) => {
            on_disk(|| {
                journal.update(job_id, |j| j.set_state(JobState::Failed { reason: format!("cannot read the received series: {e}") }))
            })?;
            return Ok(());
        }
    };
    let now = now_ms();
    for (i, d) in job.deliveries.iter().enumerate() {
        if d.delivered || d.next_attempt_ms > now || d.attempts >= settings.max_attempts {
            continue;
        }
        let result = match destinations.iter().find(|x| x.name == d.destination) {
            None => Err(format!("destination {:?} is no longer configured", d.destination)),
            Some(dst) => {
                // the uncertainty series goes only where it is asked for
                let files: Vec<PathBuf> = if dst.uncertainty { files.0.iter().chain(&files.1).cloned().collect() } else { files.0.clone() };
                let peer = scu::Peer {
                    address: dst.address.clone(),
                    called_ae: dst.ae_title.clone(),
                    calling_ae: settings.calling_ae_title.clone(),
                };
                tracing::info!(job = job_id, destination = %dst.name, files = files.len(), attempt = d.attempts + 1, "sending");
                match scu::send_files(&peer, &files, cancel).await {
                    Ok(n) => Ok(n),
                    Err(scu::SendError::Cancelled) => return Ok(()), // not an attempt; resumes after restart
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        on_disk(|| {
            journal.update(job_id, |j| {
                let Some(dd) = j.deliveries.get_mut(i) else { return };
                dd.attempts += 1;
                match &result {
                    Ok(n) => {
                        dd.delivered = true;
                        dd.last_error = None;
                        let line = format!("delivered {n} instances to {} (attempt {})", dd.destination, dd.attempts);
                        j.note(line);
                    }
                    Err(e) => {
                        let wait = backoff(dd.attempts, settings);
                        dd.last_error = Some(e.clone());
                        dd.next_attempt_ms = now_ms() + wait.as_millis() as u64;
                        let line =
                            format!("delivery to {} failed (attempt {}): {e}; next try in {:.0?}", dd.destination, dd.attempts, wait);
                        j.note(line);
                    }
                }
            })
        })?;
        match &result {
            Ok(_) => tracing::info!(job = job_id, destination = %d.destination, "delivered"),
            Err(e) => tracing::warn!(job = job_id, destination = %d.destination, error = %e, "delivery failed"),
        }
    }
    let job = on_disk(|| journal.update(job_id, |j| settle(j, settings.max_attempts)))?;
    if job.state.is_terminal() {
        tracing::info!(job = job_id, state = job.state.name(), "job finished");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::JobKind;

    fn settings() -> EgressSettings {
        EgressSettings {
            max_attempts: 3,
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(10),
            calling_ae_title: "X".into(),
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = settings();
        let w: Vec<u64> = (1..=5).map(|a| backoff(a, &s).as_secs()).collect();
        assert_eq!(w, vec![2, 4, 8, 10, 10]);
    }

    #[test]
    fn settle_takes_outcome_or_fails_after_max_attempts() {
        let mut j = Job::new(JobKind::Pet, "1", "1.2", "C", 0);
        j.plan_deliveries(&["a".into(), "b".into()]);
        j.state = JobState::Delivering { payload: Payload::Derived, outcome: Outcome::Done };
        j.deliveries[0].delivered = true;
        settle(&mut j, 3);
        assert!(matches!(j.state, JobState::Delivering { .. }), "b still pending");
        j.deliveries[1].delivered = true;
        settle(&mut j, 3);
        assert_eq!(j.state, JobState::Done);

        let mut j = Job::new(JobKind::Pet, "1", "1.3", "C", 0);
        j.plan_deliveries(&["a".into()]);
        j.state = JobState::Delivering { payload: Payload::Original, outcome: Outcome::Failed { reason: "engine broke".into() } };
        j.deliveries[0].attempts = 3;
        j.deliveries[0].last_error = Some("refused".into());
        settle(&mut j, 3);
        let JobState::Failed { reason } = &j.state else { panic!("{:?}", j.state) };
        assert!(reason.contains("engine broke") && reason.contains("gave up after 3 attempts") && reason.contains("refused"), "{reason}");
    }

    #[test]
    fn rerun_requested_requeues() {
        let mut j = Job::new(JobKind::Pet, "1", "1.4", "C", 0);
        j.plan_deliveries(&[]);
        j.rerun_requested = true;
        j.state = JobState::Delivering { payload: Payload::Derived, outcome: Outcome::Done };
        settle(&mut j, 3);
        assert_eq!(j.state, JobState::Queued);
        assert!(!j.rerun_requested);
    }
}
