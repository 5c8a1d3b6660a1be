//! Egress: deliver a job's payload (derived or original series) to every
//! configured destination, with per-destination retries and exponential
//! backoff. Attempts, errors and the next attempt time live in the journal,
//! so a restart resumes exactly where delivery stood.

pub mod scu;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use tokio_util::sync::CancellationToken;

use crate::config::{Destination, EgressSettings};
use crate::dicom::commitment::{self, Report};
use crate::journal::{Job, JobState, Journal, JournalError, Outcome, Payload, PendingCommitment, now_ms};
use crate::spool::Spool;

/// Wait before attempt `attempts + 1`, after `attempts` failures:
/// initial · 2^(attempts−1), capped.
pub fn backoff(attempts: u32, s: &EgressSettings) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    s.backoff_initial.saturating_mul(1u32 << exp).min(s.backoff_max)
}

/// Associations open to one destination at a time. When an archive comes
/// back after an outage every waiting job is due at once, and archives limit
/// the associations a caller may hold: beyond that each refusal would cost
/// a job an attempt.
pub const ASSOCIATIONS_PER_DESTINATION: usize = 2;

/// One gate per destination name, shared by every delivery task.
#[derive(Default)]
pub struct DestinationGates(Mutex<HashMap<String, Arc<Semaphore>>>);

impl DestinationGates {
    fn gate(&self, destination: &str) -> Arc<Semaphore> {
        let mut m = self.0.lock().expect("gates lock");
        m.entry(destination.to_string()).or_insert_with(|| Arc::new(Semaphore::new(ASSOCIATIONS_PER_DESTINATION))).clone()
    }
}

/// Folder holding a job's derived instances.
pub fn output_dir(state_dir: &Path, job_id: &str) -> PathBuf {
    state_dir.join("output").join(job_id)
}

/// Why a job's payload cannot be listed.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{what} series folder {}: {source}", dir.display())]
    Folder { what: &'static str, dir: PathBuf, source: std::io::Error },
    #[error("{what} series has {found} files, the journal expects {expected}")]
    Count { what: &'static str, found: usize, expected: u32 },
}

/// The files a payload consists of, in a stable order.
pub fn payload_files(
    journal: &Journal,
    spool: &Spool,
    state_dir: &Path,
    job: &Job,
    payload: Payload,
) -> Result<Vec<PathBuf>, PayloadError> {
    let mut files: Vec<PathBuf> = match payload {
        Payload::Original => journal.instances(&job.id)?.into_iter().map(|r| spool.absolute(&r.path)).collect(),
        Payload::Derived => {
            let dir = output_dir(state_dir, &job.id);
            let rd = std::fs::read_dir(&dir).map_err(|source| PayloadError::Folder { what: "derived", dir: dir.clone(), source })?;
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "dcm")).collect()
        }
    };
    files.sort();
    if payload == Payload::Derived && files.len() as u32 != job.output_count {
        return Err(PayloadError::Count { what: "derived", found: files.len(), expected: job.output_count });
    }
    Ok(files)
}

/// The job's uncertainty series files (empty when it has none), checked
/// against the count the journal recorded.
pub fn uncertainty_files(state_dir: &Path, job: &Job) -> Result<Vec<PathBuf>, PayloadError> {
    let expected = job.uncertainty.as_ref().map_or(0, |u| u.count);
    if expected == 0 {
        return Ok(Vec::new());
    }
    let dir = output_dir(state_dir, &job.id).join(crate::pipeline::worker::UNCERTAINTY_DIR);
    let rd = std::fs::read_dir(&dir).map_err(|source| PayloadError::Folder { what: "uncertainty", dir: dir.clone(), source })?;
    let mut files: Vec<PathBuf> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "dcm")).collect();
    files.sort();
    if files.len() as u32 != expected {
        return Err(PayloadError::Count { what: "uncertainty", found: files.len(), expected });
    }
    Ok(files)
}

/// Whether a delivery ran out of attempts. One waiting for its commitment
/// report has not failed yet.
fn gave_up(d: &crate::journal::Delivery, max_attempts: u32) -> bool {
    !d.delivered && d.commitment.is_none() && d.attempts >= max_attempts
}

/// Decide what a job in `Delivering` becomes: still delivering, its outcome
/// (or `Queued` again when a rerun was requested), or failed when a
/// destination ran out of attempts and no other is still being tried (an
/// archive whose commitment report is due, a destination with attempts
/// left: failing the job then would drop what they still deliver).
pub fn settle(job: &mut Job, max_attempts: u32) {
    let JobState::Delivering { outcome, .. } = &job.state else { return };
    let outcome = outcome.clone();
    let exhausted: Vec<&crate::journal::Delivery> = job.deliveries.iter().filter(|d| gave_up(d, max_attempts)).collect();
    let trying = job.deliveries.iter().any(|d| !d.delivered && !gave_up(d, max_attempts));
    if !exhausted.is_empty() && !trying {
        let base = match &outcome {
            Outcome::Done => String::new(),
            Outcome::Failed { reason } | Outcome::Skipped { reason } => format!("{reason}; "),
        };
        let gave: Vec<String> = exhausted
            .iter()
            .map(|d| {
                format!("delivery to {} gave up after {} attempts: {}", d.destination, d.attempts, d.last_error.as_deref().unwrap_or(""))
            })
            .collect();
        let reason = format!("{base}{}", gave.join("; "));
        if job.rerun_requested {
            // instances arrived meanwhile: the series (with them) is done
            // again, with fresh attempts, rather than failed without them
            job.note(format!("{reason}; not failed: instances arrived meanwhile"));
            rerun(job, outcome);
        } else {
            job.set_state(JobState::Failed { reason });
        }
        return;
    }
    if job.deliveries.iter().all(|d| d.delivered) {
        job.output_rebuilds = 0;
        if !job.dropped_deliveries.is_empty() && !job.rerun_requested {
            let base = match &outcome {
                Outcome::Done => String::new(),
                Outcome::Failed { reason } | Outcome::Skipped { reason } => format!("{reason}; "),
            };
            let reason = format!(
                "{base}not delivered to {}: removed from the configuration before delivery; \
                 `petrestore jobs retry {}` sends it to the destinations configured then",
                job.dropped_deliveries.join(", "),
                job.id
            );
            job.set_state(JobState::Failed { reason });
            return;
        }
        if job.rerun_requested {
            rerun(job, outcome);
        } else {
            job.set_state(outcome.into());
        }
    }
}

/// Instances arrived while the job was being processed: a PET series is
/// restored again; a series passed through is forwarded again, whole, to
/// the same destinations.
fn rerun(job: &mut Job, outcome: Outcome) {
    job.rerun_requested = false;
    match job.kind {
        crate::journal::JobKind::Pet => job.set_state(JobState::Queued),
        crate::journal::JobKind::Passthrough => {
            let names: Vec<String> = job.deliveries.iter().map(|d| d.destination.clone()).collect();
            job.plan_deliveries(&names);
            job.set_state(JobState::Delivering { payload: Payload::Original, outcome });
        }
    }
    job.note("re-running: instances arrived while the series was being processed");
}

/// Whether a delivery waiting until `at_ms` (wall clock) is due at `now_ms`.
/// No backoff is longer than `cap` (`egress.backoff_max_s`): a time further
/// ahead means the wall clock was stepped back since it was written (a box
/// without a battery-backed clock, set at boot), and the delivery is due
/// rather than held for the hours the clock went back.
pub fn is_due(at_ms: u64, now_ms: u64, cap: Duration) -> bool {
    at_ms <= now_ms || at_ms > now_ms.saturating_add(cap.as_millis() as u64)
}

/// Whether a pending delivery is due: its backoff over ([`is_due`]), or,
/// waiting for a storage commitment report, its deadline passed or the
/// request dated after now (the clock stepped back). The deadline is the
/// one written with the request, whatever a reload changed since.
pub fn delivery_due(d: &crate::journal::Delivery, now_ms: u64, backoff_max: Duration) -> bool {
    match &d.commitment {
        Some(p) => d.next_attempt_ms <= now_ms || p.requested_ms > now_ms,
        None => is_due(d.next_attempt_ms, now_ms, backoff_max),
    }
}

/// Whether the scheduler should run [`deliver_due`] for this job: a pending
/// delivery is due, or none is pending (the job is settled there); a
/// delivery that ran out of attempts is not pending.
pub fn job_due(job: &Job, now_ms: u64, backoff_max: Duration, max_attempts: u32) -> bool {
    // a delivery that gave up waits for the others, not for its own time
    let mut pending = job.deliveries.iter().filter(|d| !d.delivered && !gave_up(d, max_attempts)).peekable();
    pending.peek().is_none() || pending.any(|d| delivery_due(d, now_ms, backoff_max))
}

/// Journal work from an async task: every update fsyncs, so the runtime is
/// told to move its other tasks off this worker thread meanwhile.
fn on_disk<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// The history line for instances a destination stored with a warning
/// status (it may have coerced or dropped attributes, the derived markings
/// among them): counted as delivered (PS3.4), but said.
fn warning_line(destination: &str, warnings: &[String], more: usize) -> Option<String> {
    if warnings.is_empty() {
        return None;
    }
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    Some(format!("{destination} stored instances with a warning status (check what it changed): {}{more}", warnings.join("; ")))
}

/// What one delivery attempt achieved.
enum Sent {
    /// Sent and acknowledged instance by instance: delivered.
    Delivered(usize),
    /// Sent; the archive took the commitment request and will report.
    AwaitingCommitment(PendingCommitment, Duration),
}

/// A Transaction UID for one commitment request: unique per job,
/// destination, attempt and moment.
fn transaction_uid(job_id: &str, destination: &str, attempt: u32) -> String {
    crate::dicom::uid::derived_uid(job_id, &format!("commitment/{destination}/{attempt}/{}", now_ms()))
}

/// What a storage commitment report changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportEffect {
    /// Every instance committed: the delivery is done.
    Committed { job: String, destination: String },
    /// The archive did not commit everything sent: the series goes again.
    NotCommitted { job: String, destination: String, reason: String },
    /// No pending request has this transaction (already settled, or from
    /// another sender); acknowledged and otherwise ignored.
    Unknown,
}

/// Apply an archive's N-EVENT-REPORT: find the delivery waiting for this
/// transaction (it must come from that destination's AE title), check the
/// committed instances against what was sent, and mark it delivered, or
/// schedule a resend.
pub fn apply_commitment_report(
    journal: &Journal,
    report: &Report,
    calling_ae: &str,
    destinations: &[Destination],
    settings: &EgressSettings,
) -> Result<ReportEffect, JournalError> {
    for job in journal.active_jobs()? {
        let Some(i) =
            job.deliveries.iter().position(|d| d.commitment.as_ref().is_some_and(|p| p.transaction_uid == report.transaction_uid))
        else {
            continue;
        };
        let d = &job.deliveries[i];
        let p = d.commitment.clone().expect("found by its commitment");
        // the peer the request went to, as the delivery recorded it: a
        // reload that renamed the destination meanwhile does not make its
        // report a stranger's (a delivery planned before peers were kept
        // is checked against the configuration)
        let from_there = match d.peer.as_deref().and_then(|p| p.rsplit_once('@')) {
            Some((ae, _)) => ae.trim() == calling_ae.trim(),
            None => destinations.iter().any(|x| x.name == d.destination && x.ae_title.trim() == calling_ae.trim()),
        };
        if !from_there {
            tracing::warn!(job = %job.id, destination = %d.destination, calling = calling_ae,
                "storage commitment report from another AE title than the one the request went to: ignored");
            return Ok(ReportEffect::Unknown);
        }
        let reason = if let Some((first, why)) = report.failed.first() {
            Some(format!(
                "{} did not commit {} of {} instances (e.g. {}: failure reason 0x{why:04X})",
                d.destination,
                report.failed.len(),
                p.count,
                first.instance
            ))
        } else if report.committed.len() as u32 != p.count || commitment::digest(&report.committed) != p.digest {
            Some(format!(
                "{}'s commitment report names {} instances that differ from the {} sent",
                d.destination,
                report.committed.len(),
                p.count
            ))
        } else {
            None
        };
        let destination = d.destination.clone();
        let updated = journal.update(&job.id, |j| {
            let Some(dd) = j.deliveries.get_mut(i) else { return };
            if dd.commitment.as_ref().map(|c| c.transaction_uid.as_str()) != Some(report.transaction_uid.as_str()) {
                return; // settled meanwhile
            }
            dd.commitment = None;
            let line = match &reason {
                None => {
                    dd.delivered = true;
                    dd.last_error = None;
                    format!("storage commitment confirmed by {}: {} instances", dd.destination, p.count)
                }
                Some(r) => {
                    dd.last_error = Some(r.clone());
                    dd.next_attempt_ms = now_ms() + backoff(dd.attempts, settings).as_millis() as u64;
                    format!("{r}: sending again")
                }
            };
            j.note(line);
            // New instances waiting: the delivery task settles (and re-runs)
            // the job; it may be sending to another destination of it now,
            // and re-planning under it would lose the new instances there.
            if !j.rerun_requested {
                settle(j, settings.max_attempts);
            }
        })?;
        if updated.state.is_terminal() {
            tracing::info!(job = %job.id, state = updated.state.name(), "job finished");
        }
        return Ok(match reason {
            None => ReportEffect::Committed { job: job.id, destination },
            Some(reason) => ReportEffect::NotCommitted { job: job.id, destination, reason },
        });
    }
    Ok(ReportEffect::Unknown)
}

/// Attempt every due delivery of a job once, then settle it. Needs the
/// multi-thread runtime (the daemon's).
pub async fn deliver_due(
    journal: &Journal,
    spool: &Spool,
    state_dir: &Path,
    settings: &EgressSettings,
    destinations: &[Destination],
    gates: &DestinationGates,
    job_id: &str,
    cancel: &CancellationToken,
) -> Result<(), JournalError> {
    let Some(mut job) = on_disk(|| journal.get(job_id))? else { return Ok(()) };
    let JobState::Delivering { payload, .. } = job.state.clone() else { return Ok(()) };
    // The plan follows the config (a reload). A destination configured
    // since is added. A pending delivery to a destination no longer
    // configured moves to a new name only when the new destination is the
    // same peer (AE title and address: a rename); otherwise (its peer
    // unknown included, as for a delivery planned before peers were kept)
    // it is remembered, and the job fails, naming it, once the others are
    // delivered, instead of ending done (delivered) without it. Each
    // pending delivery carries its peer, from its plan and stamped again
    // here. The history says which.
    let peers: HashMap<&str, String> = destinations.iter().map(|d| (d.name.as_str(), crate::journal::job::peer_of(d))).collect();
    let gone = |j: &Job| -> Vec<(String, Option<String>)> {
        j.deliveries
            .iter()
            .filter(|d| !d.delivered && !peers.contains_key(d.destination.as_str()))
            .map(|d| (d.destination.clone(), d.peer.clone()))
            .collect()
    };
    let added = |j: &Job| -> Vec<String> {
        destinations.iter().filter(|d| !j.deliveries.iter().any(|x| x.destination == d.name)).map(|d| d.name.clone()).collect()
    };
    let unstamped = |j: &Job| {
        j.deliveries.iter().any(|d| !d.delivered && peers.get(d.destination.as_str()).is_some_and(|p| d.peer.as_deref() != Some(p)))
    };
    if !gone(&job).is_empty() || !added(&job).is_empty() || unstamped(&job) {
        job = on_disk(|| {
            journal.update(job_id, |j| {
                let (gone, added) = (gone(j), added(j));
                j.deliveries.retain(|d| d.delivered || peers.contains_key(d.destination.as_str()));
                for name in &added {
                    j.add_delivery(name);
                }
                j.stamp_peers(destinations);
                let mut line = Vec::new();
                let mut renamed_to = Vec::new();
                let mut removed = Vec::new();
                for (name, was) in &gone {
                    match added.iter().find(|a| was.is_some() && peers.get(a.as_str()) == was.as_ref()) {
                        Some(to) => {
                            renamed_to.push(to.clone());
                            line.push(format!("{name} is now named {to} (same AE title and address): sent there"));
                        }
                        None => removed.push(name.clone()),
                    }
                }
                if !removed.is_empty() {
                    j.dropped_deliveries.extend(removed.iter().cloned());
                    line.push(format!("not sent to {}: no longer configured; the job fails without it", removed.join(", ")));
                }
                let fresh: Vec<&String> = added.iter().filter(|a| !renamed_to.contains(a)).collect();
                if !fresh.is_empty() {
                    line.push(format!(
                        "also sent to {}: configured since",
                        fresh.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ));
                }
                if !line.is_empty() {
                    j.note(line.join("; "));
                }
                settle(j, settings.max_attempts);
            })
        })?;
        tracing::info!(job = job_id, "deliveries follow the reloaded destinations");
        if !matches!(job.state, JobState::Delivering { .. }) {
            return Ok(());
        }
    }
    let files = match payload_files(journal, spool, state_dir, &job, payload)
        .and_then(|f| Ok((f, if payload == Payload::Derived { uncertainty_files(state_dir, &job)? } else { Vec::new() })))
    {
        Ok(f) => f,
        Err(e) if payload == Payload::Derived => {
            // The derived series is damaged (e.g. a crash mid-write): make it
            // again (the worker fails the job if this keeps happening).
            on_disk(|| {
                journal.update(job_id, |j| {
                    j.output_rebuilds = j.output_rebuilds.saturating_add(1);
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
        if d.delivered || !delivery_due(d, now, settings.backoff_max) {
            continue;
        }
        let dst = destinations.iter().find(|x| x.name == d.destination);
        // Wait for the destination's gate (not an attempt) before anything
        // about this delivery is decided: the wait can last minutes while
        // other jobs send, and a commitment report that comes meanwhile
        // must find its request still pending.
        let _permit = match dst {
            Some(dst) if d.attempts < settings.max_attempts => {
                let gate = gates.gate(&dst.name);
                Some(tokio::select! {
                    p = gate.acquire_owned() => p.expect("gates are never closed"),
                    _ = cancel.cancelled() => return Ok(()),
                })
            }
            _ => None,
        };
        // A storage commitment request past its deadline: the archive never
        // answered. The attempt counts as failed; send again while attempts
        // remain.
        if let Some(p) = &d.commitment {
            let waited = now.saturating_sub(p.requested_ms) / 1000;
            let e = format!("no storage commitment report from {} within {waited} s (transaction {})", d.destination, p.transaction_uid);
            let again = d.attempts < settings.max_attempts;
            // the report may have come since the job was read: then it
            // stands, and nothing is sent again
            let answered = std::cell::Cell::new(false);
            on_disk(|| {
                journal.update(job_id, |j| {
                    let dd = j
                        .deliveries
                        .get_mut(i)
                        .filter(|dd| !dd.delivered && dd.commitment.as_ref().is_some_and(|c| c.transaction_uid == p.transaction_uid));
                    answered.set(dd.is_none());
                    if let Some(dd) = dd {
                        dd.commitment = None;
                        dd.last_error = Some(e.clone());
                        j.note(if again { format!("{e}: sending again") } else { e.clone() });
                    }
                })
            })?;
            if answered.get() {
                continue;
            }
            tracing::warn!(job = job_id, destination = %d.destination, "{e}");
        }
        if d.attempts >= settings.max_attempts {
            continue;
        }
        // Act on the delivery as the journal has it now, after the wait:
        // a report, a retry or a reload that changed it meanwhile stands,
        // and nothing is sent on the old reading.
        let fresh = on_disk(|| journal.get(job_id))?;
        let unchanged = fresh
            .as_ref()
            .and_then(|j| j.deliveries.get(i))
            .is_some_and(|c| c.destination == d.destination && !c.delivered && c.commitment.is_none() && c.attempts == d.attempts);
        if !unchanged {
            continue;
        }
        // acknowledged with warning statuses: said in the history
        let mut warned: Option<String> = None;
        let result: Result<Sent, String> = match dst {
            None => Err(format!("destination {:?} is no longer configured", d.destination)),
            Some(dst) => {
                // the uncertainty series goes only where it is asked for
                let files: Vec<PathBuf> = if dst.uncertainty { files.0.iter().chain(&files.1).cloned().collect() } else { files.0.clone() };
                let peer = scu::Peer {
                    address: dst.address.clone(),
                    called_ae: dst.ae_title.clone(),
                    calling_ae: settings.calling_ae_title.clone(),
                    timeout: settings.timeout,
                };
                tracing::info!(job = job_id, destination = %dst.name, files = files.len(), attempt = d.attempts + 1, "sending");
                match scu::send_files_observed(&peer, &files, cancel, |_| {}).await {
                    Ok(scu::Transfer { refs, warnings, more_warnings }) => match dst.commitment {
                        None => {
                            warned = warning_line(&dst.name, &warnings, more_warnings);
                            Ok(Sent::Delivered(refs.len()))
                        }
                        Some(timeout) => {
                            warned = warning_line(&dst.name, &warnings, more_warnings);
                            let p = PendingCommitment {
                                transaction_uid: transaction_uid(job_id, &dst.name, d.attempts + 1),
                                requested_ms: now_ms(),
                                count: refs.len() as u32,
                                digest: commitment::digest(&refs),
                            };
                            // Recorded before asking: the report may arrive
                            // before the request's own response.
                            on_disk(|| {
                                journal.update(job_id, |j| {
                                    if let Some(dd) = j.deliveries.get_mut(i) {
                                        dd.commitment = Some(p.clone());
                                        dd.next_attempt_ms = p.requested_ms + timeout.as_millis() as u64;
                                    }
                                })
                            })?;
                            // A stop does not wait for the archive's answer
                            // (up to three timeouts); the request may not have
                            // reached it, so the delivery is not left waiting
                            // for a report: sent and asked again after the
                            // restart (same UIDs), unless the report came.
                            let asked = tokio::select! {
                                r = scu::request_commitment(&peer, &p.transaction_uid, &refs) => Some(r),
                                _ = cancel.cancelled() => None,
                            };
                            match asked {
                                None => {
                                    on_disk(|| {
                                        journal.update(job_id, |j| {
                                            let Some(dd) = j.deliveries.get_mut(i) else { return };
                                            if !dd.delivered
                                                && dd.commitment.as_ref().is_some_and(|c| c.transaction_uid == p.transaction_uid)
                                            {
                                                dd.commitment = None;
                                                dd.next_attempt_ms = 0;
                                            }
                                        })
                                    })?;
                                    return Ok(());
                                }
                                Some(Ok(())) => Ok(Sent::AwaitingCommitment(p, timeout)),
                                Some(Err(e)) => {
                                    Err(format!("sent {} instances, but the storage commitment request failed: {e}", refs.len()))
                                }
                            }
                        }
                    },
                    Err(scu::SendError::Cancelled) => return Ok(()), // not an attempt; resumes after restart
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        on_disk(|| {
            journal.update(job_id, |j| {
                if let Some(w) = &warned {
                    j.note(w.clone());
                }
                let Some(dd) = j.deliveries.get_mut(i) else { return };
                dd.attempts += 1;
                match &result {
                    Ok(Sent::Delivered(n)) => {
                        dd.delivered = true;
                        dd.last_error = None;
                        let line = format!("delivered {n} instances to {} (attempt {})", dd.destination, dd.attempts);
                        j.note(line);
                    }
                    Ok(Sent::AwaitingCommitment(p, timeout)) => {
                        // (the commitment and its deadline are recorded
                        // already; the report may even have settled it, and
                        // a failed report's reason and resend time stand)
                        if dd.commitment.as_ref().is_none_or(|c| c.transaction_uid != p.transaction_uid) {
                            let line = format!(
                                "sent {} instances to {} (attempt {}); storage commitment requested (transaction {}): \
                                 its report came before the request's answer",
                                p.count, dd.destination, dd.attempts, p.transaction_uid
                            );
                            j.note(line);
                            return;
                        }
                        dd.last_error = None;
                        let line = format!(
                            "sent {} instances to {} (attempt {}); storage commitment requested (transaction {}), waiting up to {:.0?}",
                            p.count, dd.destination, dd.attempts, p.transaction_uid, timeout
                        );
                        j.note(line);
                    }
                    Err(e) => {
                        let wait = backoff(dd.attempts, settings);
                        dd.commitment = None;
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
            Ok(Sent::Delivered(_)) => tracing::info!(job = job_id, destination = %d.destination, "delivered"),
            Ok(Sent::AwaitingCommitment(p, _)) => {
                tracing::info!(job = job_id, destination = %d.destination, transaction = %p.transaction_uid, "sent; storage commitment requested")
            }
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

    #[test]
    fn warnings_are_one_history_line_naming_the_destination() {
        assert_eq!(warning_line("pacs", &[], 0), None);
        let w = vec!["0xB000 on 1.2.3: Units coerced".to_string(), "0xB006 on 1.2.4".to_string()];
        let line = warning_line("pacs", &w, 5).unwrap();
        assert_eq!(
            line,
            "pacs stored instances with a warning status (check what it changed): 0xB000 on 1.2.3: Units coerced; 0xB006 on 1.2.4 and 5 more"
        );
    }
    use crate::journal::JobKind;

    fn settings() -> EgressSettings {
        EgressSettings {
            max_attempts: 3,
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(10),
            timeout: scu::DEFAULT_TIMEOUT,
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
    fn a_removed_destination_fails_the_job_unless_it_is_configured_again() {
        let delivered = |j: &mut Job| j.deliveries.iter_mut().for_each(|d| d.delivered = true);
        let mut j = Job::new(JobKind::Pet, "1", "1.6", "C", 0);
        j.plan_deliveries(&["pacs".into()]);
        j.dropped_deliveries = vec!["archive".into()];
        j.state = JobState::Delivering { payload: Payload::Derived, outcome: Outcome::Done };
        delivered(&mut j);
        settle(&mut j, 3);
        let JobState::Failed { reason } = &j.state else { panic!("{:?}", j.state) };
        assert!(reason.contains("not delivered to archive"), "{reason}");
        // removed, then configured again and delivered: done
        let mut j = Job::new(JobKind::Pet, "1", "1.7", "C", 0);
        j.plan_deliveries(&["pacs".into()]);
        j.dropped_deliveries = vec!["archive".into()];
        j.add_delivery("archive");
        j.state = JobState::Delivering { payload: Payload::Derived, outcome: Outcome::Done };
        delivered(&mut j);
        settle(&mut j, 3);
        assert_eq!(j.state, JobState::Done);
    }

    #[test]
    fn settle_reruns_instead_of_failing_when_instances_arrived() {
        // a PET job whose destination gave up while instances arrived: restored again
        let mut j = Job::new(JobKind::Pet, "1", "1.4", "C", 0);
        j.plan_deliveries(&["a".into()]);
        j.state = JobState::Delivering { payload: Payload::Derived, outcome: Outcome::Done };
        j.deliveries[0].attempts = 3;
        j.rerun_requested = true;
        settle(&mut j, 3);
        assert_eq!(j.state, JobState::Queued);
        assert!(!j.rerun_requested);
        assert!(j.history.iter().any(|e| e.what.contains("gave up after 3 attempts") && e.what.contains("not failed")), "{:?}", j.history);

        // a series passed through is forwarded again, never queued for restoration
        let mut j = Job::new(JobKind::Passthrough, "1", "1.5", "C", 0);
        j.plan_deliveries(&["a".into(), "b".into()]);
        let skipped = Outcome::Skipped { reason: "not PET (CT): passed through unchanged".into() };
        j.state = JobState::Delivering { payload: Payload::Original, outcome: skipped.clone() };
        j.deliveries.iter_mut().for_each(|d| {
            d.delivered = true;
            d.attempts = 1;
        });
        j.rerun_requested = true;
        settle(&mut j, 3);
        assert_eq!(j.state, JobState::Delivering { payload: Payload::Original, outcome: skipped });
        assert!(j.deliveries.iter().all(|d| !d.delivered && d.attempts == 0), "{:?}", j.deliveries);
        assert_eq!(j.deliveries.iter().map(|d| d.destination.as_str()).collect::<Vec<_>>(), ["a", "b"]);
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

    /// A console that gave up does not fail the job while the archive's
    /// commitment report, or another destination's attempts, are still to
    /// come: the job fails when they are settled, naming every destination
    /// that gave up.
    #[test]
    fn a_destination_that_gave_up_waits_for_the_others() {
        let mut j = Job::new(JobKind::Pet, "1", "1.4", "C", 0);
        j.plan_deliveries(&["console".into(), "archive".into(), "pacs".into()]);
        j.state = JobState::Delivering { payload: Payload::Derived, outcome: Outcome::Done };
        j.deliveries[0].attempts = 3;
        j.deliveries[0].last_error = Some("connection refused".into());
        j.deliveries[1].attempts = 1;
        j.deliveries[1].commitment = Some(crate::journal::PendingCommitment {
            transaction_uid: "2.25.1".into(),
            requested_ms: 1_000,
            count: 2,
            digest: String::new(),
        });
        j.deliveries[1].next_attempt_ms = 301_000;
        j.deliveries[2].attempts = 2;
        j.deliveries[2].next_attempt_ms = 50_000;
        settle(&mut j, 3);
        assert!(matches!(j.state, JobState::Delivering { .. }), "{:?}", j.state);
        // the scheduler does not run the job for the delivery that gave up
        assert!(!job_due(&j, 2_000, Duration::from_secs(300), 3));
        assert!(job_due(&j, 50_000, Duration::from_secs(300), 3), "pacs' next attempt");
        j.deliveries[1].commitment = None;
        j.deliveries[1].delivered = true;
        settle(&mut j, 3);
        assert!(matches!(j.state, JobState::Delivering { .. }), "pacs has an attempt left");
        j.deliveries[2].attempts = 3;
        j.deliveries[2].last_error = Some("timeout".into());
        settle(&mut j, 3);
        let JobState::Failed { reason } = &j.state else { panic!("{:?}", j.state) };
        assert!(reason.contains("console gave up") && reason.contains("pacs gave up") && !reason.contains("archive"), "{reason}");
    }

    fn destination(name: &str, ae: &str) -> Destination {
        Destination {
            name: name.into(),
            ae_title: ae.into(),
            address: "127.0.0.1:104".into(),
            uncertainty: false,
            commitment: Some(Duration::from_secs(60)),
        }
    }

    /// A journal with one job delivering to "pacs", waiting for the report of
    /// transaction 2.25.7 on two instances.
    fn waiting() -> (tempfile::TempDir, Journal, String, Vec<commitment::SopRef>) {
        use crate::journal::{Arrival, InstanceRecord};
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let arrival = Arrival {
            kind: JobKind::Pet,
            study_uid: "1.2".into(),
            series_uid: "1.2.3".into(),
            modality: Some("PT".into()),
            calling_ae: "CONSOLE".into(),
            number_of_slices: Some(1),
            multiframe: false,
            record: InstanceRecord {
                sop_instance_uid: "1.2.3.1".into(),
                sop_class_uid: crate::dicom::PET_IMAGE_STORAGE.into(),
                path: "1.2/1.2.3/1.2.3.1.dcm".into(),
                transfer_syntax: crate::dicom::EXPLICIT_VR_LE.into(),
                image_index: Some(1),
            },
        };
        let crate::journal::Recorded::New { job_id: id, .. } = journal.record(&arrival).unwrap() else { panic!("a new instance") };
        let refs: Vec<commitment::SopRef> =
            (1..=2).map(|i| commitment::SopRef { class: crate::dicom::PET_IMAGE_STORAGE.into(), instance: format!("2.25.{i}") }).collect();
        let digest = commitment::digest(&refs);
        journal
            .update(&id, |j| {
                j.plan_deliveries(&["pacs".into()]);
                j.state = JobState::Delivering { payload: Payload::Derived, outcome: Outcome::Done };
                j.deliveries[0].attempts = 1;
                j.deliveries[0].commitment =
                    Some(PendingCommitment { transaction_uid: "2.25.7".into(), requested_ms: now_ms(), count: 2, digest: digest.clone() });
            })
            .unwrap();
        (dir, journal, id, refs)
    }

    /// A delivery task that waited minutes for a destination's gate (the
    /// console's, or the archive's own) acts on the journal as it is then:
    /// the archive's commitment report that came meanwhile stands
    /// (delivered), and the series is not sent to the archive again on the
    /// old reading that its wait was over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_that_comes_while_the_task_waits_for_a_gate_stands() {
        for held_gate in ["console", "pacs"] {
            a_report_that_comes_while_waiting_for(held_gate).await;
        }
    }

    async fn a_report_that_comes_while_waiting_for(held_gate: &str) {
        let (dir, journal, id, refs) = waiting();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let console = Destination { address: closed.clone(), commitment: None, ..destination("console", "CONSOLE") };
        let pacs = Destination { address: closed, ..destination("pacs", "PACS") };
        journal
            .update(&id, |j| {
                j.plan_deliveries_to(&[console.clone(), pacs.clone()]);
                j.state = JobState::Delivering { payload: Payload::Original, outcome: Outcome::Done };
                // the archive's report is overdue
                let p =
                    PendingCommitment { transaction_uid: "2.25.7".into(), requested_ms: 1, count: 2, digest: commitment::digest(&refs) };
                let d = j.deliveries.iter_mut().find(|d| d.destination == "pacs").unwrap();
                (d.attempts, d.commitment, d.next_attempt_ms) = (1, Some(p), 2);
            })
            .unwrap();
        let gates = Arc::new(DestinationGates::default());
        let held = gates.gate(held_gate).acquire_many_owned(ASSOCIATIONS_PER_DESTINATION as u32).await.unwrap();
        let spool = Spool::new(dir.path().join("spool")).unwrap();
        let destinations = [console, pacs];
        let task = {
            let (journal, gates, id, state) = (journal.clone(), gates.clone(), id.clone(), dir.path().to_owned());
            let destinations = destinations.clone();
            tokio::spawn(async move {
                deliver_due(&journal, &spool, &state, &settings(), &destinations, &gates, &id, &CancellationToken::new()).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "the task waits for the {held_gate}'s gate");
        // meanwhile the archive reports: everything committed
        let full = Report { transaction_uid: "2.25.7".into(), committed: refs.clone(), failed: vec![] };
        let effect = apply_commitment_report(&journal, &full, "PACS", &destinations, &settings()).unwrap();
        assert!(matches!(effect, ReportEffect::Committed { .. }), "{held_gate}: {effect:?}");
        drop(held);
        task.await.unwrap().unwrap();
        let j = journal.get(&id).unwrap().unwrap();
        let pacs = j.deliveries.iter().find(|d| d.destination == "pacs").unwrap();
        assert!(pacs.delivered && pacs.commitment.is_none() && pacs.last_error.is_none() && pacs.attempts == 1, "{held_gate}: {pacs:?}");
        assert!(!j.history.iter().any(|e| e.what.contains("no storage commitment report")), "{:#?}", j.history);
        let console = j.deliveries.iter().find(|d| d.destination == "console").unwrap();
        assert_eq!(console.attempts, 1, "the console was tried: {console:?}");
    }

    /// A stop while the archive has not answered the commitment request
    /// (it may never have received it): the delivery is not left waiting
    /// up to commitment_timeout_s for a report after the restart; it is
    /// due at once (sent and asked again, same UIDs), and the stop does
    /// not wait for the archive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_during_the_commitment_request_leaves_no_wait_for_a_report() {
        let (dir, journal, id, _) = waiting();
        let pacs =
            Destination { address: scu::tests::archive_that_stalls_on_commitment().await.to_string(), ..destination("pacs", "PACS") };
        journal
            .update(&id, |j| {
                j.plan_deliveries_to(std::slice::from_ref(&pacs));
                j.state = JobState::Delivering { payload: Payload::Original, outcome: Outcome::Done };
            })
            .unwrap();
        let spool = Spool::new(dir.path().join("spool")).unwrap();
        let received = spool.absolute(Path::new("1.2/1.2.3/1.2.3.1.dcm"));
        std::fs::create_dir_all(received.parent().unwrap()).unwrap();
        std::fs::copy(scu::tests::big_instance(dir.path(), 64), &received).unwrap();
        let cancel = CancellationToken::new();
        let task = {
            let (journal, id, state, cancel) = (journal.clone(), id.clone(), dir.path().to_owned(), cancel.clone());
            tokio::spawn(async move {
                let gates = DestinationGates::default();
                deliver_due(&journal, &spool, &state, &settings(), &[pacs], &gates, &id, &cancel).await
            })
        };
        // the series is stored and the request out: recorded as pending
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while journal.get(&id).unwrap().unwrap().deliveries[0].commitment.is_none() {
            assert!(std::time::Instant::now() < deadline, "no commitment request recorded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!task.is_finished(), "the archive has not answered");
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("the stop does not wait for the archive").unwrap().unwrap();
        let d = &journal.get(&id).unwrap().unwrap().deliveries[0];
        assert!(d.commitment.is_none() && !d.delivered && d.next_attempt_ms == 0, "{d:?}");
    }

    /// The archive renamed by a reload while its report is due (same AE
    /// title and address, a new name): its report is its own, checked
    /// against the peer the request went to.
    #[test]
    fn a_report_after_the_destination_was_renamed_is_taken() {
        let (_d, journal, id, refs) = waiting();
        journal.update(&id, |j| j.deliveries[0].peer = Some("PACS@127.0.0.1:104".into())).unwrap();
        let renamed = [destination("archive", "PACS")];
        let full = Report { transaction_uid: "2.25.7".into(), committed: refs.clone(), failed: vec![] };
        assert_eq!(apply_commitment_report(&journal, &full, "OTHER", &renamed, &settings()).unwrap(), ReportEffect::Unknown);
        let effect = apply_commitment_report(&journal, &full, "PACS", &renamed, &settings()).unwrap();
        assert!(matches!(effect, ReportEffect::Committed { .. }), "{effect:?}");
        assert_eq!(journal.get(&id).unwrap().unwrap().state, JobState::Done);
    }

    #[test]
    fn a_full_report_from_the_destination_completes_the_job() {
        let (_d, journal, id, refs) = waiting();
        let dst = [destination("pacs", "PACS")];
        let stranger = Report { transaction_uid: "2.25.7".into(), committed: refs.clone(), failed: vec![] };
        assert_eq!(apply_commitment_report(&journal, &stranger, "OTHER", &dst, &settings()).unwrap(), ReportEffect::Unknown);
        let unknown = Report { transaction_uid: "2.25.8".into(), committed: refs.clone(), failed: vec![] };
        assert_eq!(apply_commitment_report(&journal, &unknown, "PACS", &dst, &settings()).unwrap(), ReportEffect::Unknown);
        assert!(journal.get(&id).unwrap().unwrap().deliveries[0].commitment.is_some(), "nothing changed so far");
        let mut reversed = refs.clone();
        reversed.reverse();
        let full = Report { transaction_uid: "2.25.7".into(), committed: reversed, failed: vec![] };
        let effect = apply_commitment_report(&journal, &full, "PACS", &dst, &settings()).unwrap();
        assert!(matches!(effect, ReportEffect::Committed { .. }), "{effect:?}");
        let j = journal.get(&id).unwrap().unwrap();
        assert_eq!(j.state, JobState::Done);
        assert!(j.deliveries[0].delivered && j.deliveries[0].commitment.is_none());
    }

    #[test]
    fn a_partial_or_failed_report_sends_again() {
        let dst = [destination("pacs", "PACS")];
        for bad in ["fewer", "other", "failed"] {
            let (_d, journal, id, refs) = waiting();
            let report = match bad {
                "fewer" => Report { transaction_uid: "2.25.7".into(), committed: refs[..1].to_vec(), failed: vec![] },
                "other" => Report {
                    transaction_uid: "2.25.7".into(),
                    committed: vec![refs[0].clone(), commitment::SopRef { class: refs[1].class.clone(), instance: "2.25.99".into() }],
                    failed: vec![],
                },
                _ => Report { transaction_uid: "2.25.7".into(), committed: refs[..1].to_vec(), failed: vec![(refs[1].clone(), 0x0110)] },
            };
            let effect = apply_commitment_report(&journal, &report, "PACS", &dst, &settings()).unwrap();
            assert!(matches!(effect, ReportEffect::NotCommitted { .. }), "{bad}: {effect:?}");
            let j = journal.get(&id).unwrap().unwrap();
            let d = &j.deliveries[0];
            assert!(!d.delivered && d.commitment.is_none() && d.last_error.is_some(), "{bad}: {d:?}");
            assert!(matches!(j.state, JobState::Delivering { .. }), "{bad}: still delivering, to be sent again");
            assert!(j.history.last().unwrap().what.ends_with("sending again"), "{bad}");
        }
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
