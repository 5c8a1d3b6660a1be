//! Retention: the disk of a box beside a scanner must not fill up. A job
//! that ended done or skipped has been delivered or forwarded; after
//! `node.retention_hours` its spooled instances and derived series are
//! removed, and so are those of a failed job whose original was forwarded
//! to every destination. A failed job that was not delivered keeps its files
//! until the operator re-sends it, unless the site sets
//! `node.failed_retention_hours` (default 0, keep). The job record stays, marked purged. Nothing of a job
//! that has not ended is touched.

use std::path::Path;
use std::time::Duration;

use crate::config::Settings;
use crate::egress::output_dir;
use crate::journal::{JobState, Journal, JournalError, now_ms};
use crate::spool::Spool;

/// Remove the files of every job past its retention. Returns how many jobs.
pub fn purge(settings: &Settings, journal: &Journal, spool: &Spool) -> Result<usize, JournalError> {
    let now = now_ms();
    let mut purged = 0;
    for job in journal.purgeable()? {
        // A failed job whose original went to every destination (restoration
        // failed, the original forwarded) was delivered; one whose delivery
        // gave up, or that had nothing to send, was not.
        // A destination a reload removed before delivery counts as not
        // delivered (the job failed naming it).
        let delivered = !job.deliveries.is_empty() && job.deliveries.iter().all(|d| d.delivered) && job.dropped_deliveries.is_empty();
        let keep = match job.state {
            JobState::Failed { .. } if !delivered => settings.node.failed_retention,
            _ => settings.node.retention,
        };
        let Some(keep) = keep else { continue };
        if now.saturating_sub(job.updated_ms) < keep.as_millis() as u64 {
            continue;
        }
        // The outcome log first (a repair then knows the job was being
        // purged), then the files, then the records. A crash in between
        // leaves records pointing at removed files of a finished job: the
        // start-up check accepts that for a job the log says was being
        // purged, and the next pass removes what is left.
        let out = output_dir(&settings.node.state_dir, &job.id);
        let age = Duration::from_millis(now.saturating_sub(job.updated_ms));
        let mut removed = 0usize;
        let done = journal.purge_job(&job, |records| {
            removed = remove_files(records, spool, &out)?;
            Ok(format!(
                "retention: removed {removed} received instances and the derived series ({:.1} h after the job ended)",
                age.as_secs_f64() / 3600.0
            ))
        })?;
        if done.is_none() {
            // an instance reopened it, or it changed since the list was made
            continue;
        }
        tracing::info!(job = %job.id, removed, "retention: job files removed");
        purged += 1;
    }
    Ok(purged)
}

/// Remove a job's spooled instances (and the folders left empty) and its
/// derived series. Returns how many instances were removed, or, when a
/// file could not be removed (one already gone counts as removed), a note
/// naming it: the job keeps its records and the next pass tries again.
fn remove_files(records: &[crate::journal::InstanceRecord], spool: &Spool, out: &Path) -> Result<usize, String> {
    let mut removed = 0usize;
    let mut dirs = Vec::new();
    let mut failed: Option<(std::path::PathBuf, std::io::Error)> = None;
    let mut failures = 0usize;
    for r in records {
        let p = spool.absolute(&r.path);
        match std::fs::remove_file(&p) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                failures += 1;
                failed.get_or_insert((p.clone(), e));
            }
        }
        if let Some(d) = p.parent()
            && !dirs.iter().any(|x: &std::path::PathBuf| x == d)
        {
            dirs.push(d.to_owned());
        }
    }
    for d in dirs {
        remove_empty_up_to(&d, spool.root());
    }
    if let Some((p, e)) = failed {
        tracing::warn!(file = %p.display(), error = %e, failures, "retention: cannot remove received instances; trying again at the next pass");
        return Err(format!(
            "retention: cannot remove {failures} received instances ({}: {e}); trying again at the next pass",
            p.display()
        ));
    }
    let _ = std::fs::remove_dir_all(out);
    Ok(removed)
}

/// At start, before ingest opens: finish the purges a stop or crash cut
/// short (the outcome log says the purge began, the job is not marked
/// purged). Until then the journal still holds records of removed files,
/// and an instance of the series sent again would be taken for one already
/// stored. Returns how many purges were finished.
pub fn finish_interrupted(settings: &Settings, journal: &Journal, spool: &Spool) -> Result<usize, JournalError> {
    let log = journal.outcomes().read().map_err(|e| JournalError::Sled(sled::Error::Io(e)))?;
    let mut n = 0;
    for (id, e) in log.iter().filter(|(_, e)| e.purged) {
        let Some(job) = journal.get(id)? else { continue };
        if job.purged || !job.state.is_terminal() {
            continue;
        }
        let out = output_dir(&settings.node.state_dir, &job.id);
        let done = journal.purge_job(&job, |records| {
            let removed = remove_files(records, spool, &out)?;
            Ok(format!("retention: finished a purge cut short by a stop ({removed} more received instances removed)"))
        })?;
        if done.is_some() {
            tracing::info!(job = %id, began_ms = e.at_ms, "retention: a purge cut short by a stop is finished");
            n += 1;
        }
    }
    Ok(n)
}

/// Remove `dir` and its parents while they are empty, stopping at `root`.
fn remove_empty_up_to(dir: &Path, root: &Path) {
    let mut d = dir.to_owned();
    while d.starts_with(root) && d != root {
        if std::fs::remove_dir(&d).is_err() {
            break;
        }
        match d.parent() {
            Some(p) => d = p.to_owned(),
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Arrival, Recorded};

    fn arrival(sop: &str, index: u32) -> Arrival {
        crate::journal::tests::arrival("1.2.3", sop, index, 2)
    }

    /// A stop in the middle of a purge: the next start finishes it before
    /// ingest opens, so the series sent again is stored and processed anew
    /// instead of being taken for the instances already removed.
    #[test]
    fn a_purge_cut_short_is_finished_at_start_and_the_series_can_come_again() {
        let d = tempfile::tempdir().unwrap();
        let settings = Settings::from_toml(&format!("[node]\nstate_dir = {:?}\n", d.path()), "t").unwrap();
        let spool = Spool::new(d.path().join("spool")).unwrap();
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        for (i, sop) in ["1.2.3.1", "1.2.3.2"].into_iter().enumerate() {
            let a = arrival(sop, i as u32 + 1);
            let f = spool.absolute(&a.record.path);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, b"dcm").unwrap();
            journal.record(&a).unwrap();
        }
        let id = crate::journal::job_id("1.2.3");
        let job = journal.update(&id, |j| j.set_state(JobState::Done)).unwrap();
        let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            journal.purge_job(&job, |records| {
                std::fs::remove_file(spool.absolute(&records[0].path)).unwrap();
                panic!("stopped");
            })
        }));
        assert!(cut.is_err());
        assert_eq!(finish_interrupted(&settings, &journal, &spool).unwrap(), 1);
        let job = journal.get(&id).unwrap().unwrap();
        assert!(job.purged && journal.instances(&id).unwrap().is_empty(), "{:#?}", job.history);
        assert!(!spool.absolute(std::path::Path::new("1.2/1.2.3/1.2.3.2.dcm")).exists());
        // the series again: new instances, the job reopened
        assert!(matches!(journal.record(&arrival("1.2.3.1", 1)).unwrap(), Recorded::New { .. }));
        let again = journal.get(&id).unwrap().unwrap();
        assert!(!again.state.is_terminal() && !again.purged);
        assert_eq!(finish_interrupted(&settings, &journal, &spool).unwrap(), 0, "nothing left to finish");
    }

    /// A file that cannot be removed: the job keeps its records (its files
    /// are neither orphaned in the spool nor forgotten) and is not marked
    /// purged; once it can be removed, the next pass finishes.
    #[test]
    fn a_job_failed_for_a_removed_destination_is_kept_as_undelivered() {
        let d = tempfile::tempdir().unwrap();
        // retention 1 ms, failed retention off: only a delivered job goes
        let settings = Settings::from_toml(&format!("[node]\nstate_dir = {:?}\nretention_hours = 0.0000003\n", d.path()), "t").unwrap();
        let spool = Spool::new(d.path().join("spool")).unwrap();
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        let a = arrival("1.2.3.1", 1);
        let f = spool.absolute(&a.record.path);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"dcm").unwrap();
        journal.record(&a).unwrap();
        let id = crate::journal::job_id("1.2.3");
        journal
            .update(&id, |j| {
                j.plan_deliveries(&["pacs".into()]);
                j.deliveries[0].delivered = true;
                j.dropped_deliveries = vec!["archive".into()];
                j.set_state(JobState::Failed { reason: "not delivered to archive".into() });
            })
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(purge(&settings, &journal, &spool).unwrap(), 0);
        assert!(f.exists() && !journal.get(&id).unwrap().unwrap().purged);
    }

    #[test]
    fn a_file_that_cannot_be_removed_keeps_the_job_and_its_records() {
        let d = tempfile::tempdir().unwrap();
        let spool = Spool::new(d.path().join("spool")).unwrap();
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        let (a, b) = (arrival("1.2.3.1", 1), arrival("1.2.3.2", 2));
        let (fa, fb) = (spool.absolute(&a.record.path), spool.absolute(&b.record.path));
        std::fs::create_dir_all(fa.parent().unwrap()).unwrap();
        std::fs::write(&fa, b"dcm").unwrap();
        // unlink fails on a folder, even for root
        std::fs::create_dir_all(fb.join("x")).unwrap();
        journal.record(&a).unwrap();
        journal.record(&b).unwrap();
        let id = crate::journal::job_id("1.2.3");
        let job = journal.update(&id, |j| j.set_state(JobState::Done)).unwrap();
        let out = d.path().join("out");
        assert!(journal.purge_job(&job, |r| remove_files(r, &spool, &out).map(|n| n.to_string())).unwrap().is_none());
        let kept = journal.get(&id).unwrap().unwrap();
        assert!(!kept.purged && journal.instances(&id).unwrap().len() == 2);
        assert!(kept.history.last().unwrap().what.contains("cannot remove 1 received instances"), "{:#?}", kept.history);
        assert_eq!(kept.updated_ms, job.updated_ms, "retention's clock is not restarted: the next pass tries again");
        assert!(!fa.exists(), "what could be removed is gone");
        // the same failure again adds no second note
        assert!(journal.purge_job(&kept, |r| remove_files(r, &spool, &out).map(|n| n.to_string())).unwrap().is_none());
        let again = journal.get(&id).unwrap().unwrap();
        assert_eq!(again.history.len(), kept.history.len());
        std::fs::remove_dir_all(&fb).unwrap();
        let done = journal.purge_job(&again, |r| remove_files(r, &spool, &out).map(|n| n.to_string())).unwrap().expect("purged");
        assert!(done.purged && journal.instances(&id).unwrap().is_empty());
    }
}
