//! The journal checked against the evidence at every start, and repaired.
//!
//! sled is known to lose or garble records after abrupt stops, and a
//! damaged journal must never be trusted silently: a finished series that
//! comes back as "receiving 31/56" would be failed as incomplete and its
//! originals forwarded to a destination that already holds the restored
//! series; a series waiting for delivery could vanish. The evidence is
//! the fsynced spool (every acknowledged instance, after the arrival log's
//! replay) and the outcome log ([`super::outcomes`]: which jobs finished).
//!
//! [`check`] compares them: every spooled instance recorded, every recorded
//! instance's file present (unless retention removed it), every job the
//! outcome log says finished present and finished, and every record
//! readable. On any finding, [`repair`] keeps the damaged journal aside,
//! rebuilds it from the spool and puts every finished job back in its
//! terminal state from the outcome log; unfinished jobs are processed again
//! (derived UIDs are deterministic, so a destination gets the same UIDs).

use std::path::{Path, PathBuf};

use super::{Journal, JournalError, rebuild};

/// Whether the journal records the instance of a spool file
/// (`<study>/<series>/<sop>.dcm`).
pub fn spooled_file_recorded(journal: &Journal, root: &Path, file: &Path) -> bool {
    let Ok(rel) = file.strip_prefix(root) else { return false };
    let parts: Vec<_> = rel.iter().filter_map(|c| c.to_str()).collect();
    match parts[..] {
        [_, series, name] => name.strip_suffix(".dcm").is_some_and(|sop| journal.has_instance(series, sop).unwrap_or(false)),
        _ => false,
    }
}

/// What disagrees between the journal and the evidence (empty: healthy).
pub fn check(journal: &Journal, spool_root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let jobs = match journal.all_jobs() {
        Ok(j) => j,
        Err(e) => return vec![format!("jobs unreadable: {e}")],
    };
    let unrecorded = rebuild::spool_files(spool_root).iter().filter(|p| !spooled_file_recorded(journal, spool_root, p)).count();
    if unrecorded > 0 {
        problems.push(format!("{unrecorded} received instances in the spool are not in the journal"));
    }
    let mut missing = 0;
    for j in jobs.iter().filter(|j| !j.purged) {
        match journal.instances(&j.id) {
            Ok(records) => missing += records.iter().filter(|r| !spool_root.join(&r.path).is_file()).count(),
            Err(e) => problems.push(format!("instances of job {} unreadable: {e}", j.id)),
        }
    }
    if missing > 0 {
        problems.push(format!("{missing} instances in the journal have no file in the spool"));
    }
    match journal.outcomes().read() {
        Err(e) => problems.push(format!("outcome log unreadable: {e}")),
        Ok(log) => {
            let (mut lost, mut reopened) = (0, 0);
            for (id, e) in &log {
                let Some(state) = &e.state else { continue };
                match jobs.iter().find(|j| &j.id == id) {
                    None => lost += 1,
                    Some(j) if !j.state.is_terminal() => {
                        reopened += 1;
                        if reopened <= 3 {
                            problems.push(format!("job {id} finished ({}) but the journal says {}", state.name(), j.state.name()));
                        }
                    }
                    Some(_) => {}
                }
            }
            if lost > 0 {
                problems.push(format!("{lost} finished jobs of the outcome log are missing from the journal"));
            }
            if reopened > 3 {
                problems.push(format!("{} more finished jobs are unfinished in the journal", reopened - 3));
            }
        }
    }
    problems
}

/// What [`repair`] did.
#[derive(Debug)]
pub struct Repaired {
    /// Where the damaged journal was kept.
    pub damaged_copy: Option<PathBuf>,
    pub instances: usize,
    pub jobs: usize,
    /// Jobs put back in their terminal state from the outcome log.
    pub finished: usize,
}

/// Keep the journal in `journal_dir` aside, rebuild it from the spool and
/// restore finished jobs from the outcome log. The journal must be closed.
pub fn repair(journal_dir: &Path, spool_root: &Path) -> Result<Repaired, JournalError> {
    let r = rebuild::rebuild(journal_dir, spool_root)?;
    // the rebuild has just dropped its handle on the same folder: sled may
    // hold the lock a moment longer
    let journal = Journal::open_waiting(journal_dir, std::time::Duration::from_secs(5))?;
    let log = journal.outcomes().read().map_err(|e| JournalError::Sled(sled::Error::Io(e)))?;
    let mut finished = 0;
    for (id, e) in log {
        let Some(state) = e.state else { continue };
        let Some(job) = journal.get(&id)? else {
            // retention removed its files: nothing left to process
            continue;
        };
        if e.received.is_some_and(|n| job.received > n) {
            // instances arrived after it finished (acknowledged, in the
            // spool): it is processed again, as it would have been
            journal.update(&id, |j| {
                j.note(format!(
                    "finished ({}) with {} instances before the journal was repaired; {} are in the spool: processing again",
                    state.name(),
                    e.received.unwrap_or(0),
                    j.received
                ))
            })?;
            continue;
        }
        journal.update(&id, |j| {
            j.set_state(state.clone());
            j.note("finished state restored from the outcome log after the journal was repaired");
        })?;
        finished += 1;
    }
    journal.flush()?;
    Ok(Repaired { damaged_copy: r.old_journal, instances: r.instances, jobs: r.jobs, finished })
}
