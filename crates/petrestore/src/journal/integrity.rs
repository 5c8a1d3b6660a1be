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
//! instance's file present (unless retention removed or began to remove
//! it), every job the outcome log says finished present and finished
//! (unless retention removed it: a rebuild from the spool cannot know such
//! a job), the journal's trees agreeing (every recorded instance's job
//! present, every unfinished job in the active index and nothing else
//! there), and every record readable. On any finding, [`repair`] keeps the damaged journal aside,
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
    check_beside_log(journal, spool_root, &|_| false)
}

/// [`check`] while the arrival log still holds instances its replay could
/// not move yet (a full disk at start): a spool file of such an instance
/// (`in_log` of its path) may be there without its record, written before
/// a crash or by the failed replay, and is recorded when the replay goes
/// through. It is not damage.
pub fn check_beside_log(journal: &Journal, spool_root: &Path, in_log: &dyn Fn(&Path) -> bool) -> Vec<String> {
    let mut problems = Vec::new();
    let jobs = match journal.all_jobs() {
        Ok(j) => j,
        Err(e) => return vec![format!("jobs unreadable: {e}")],
    };
    let unrecorded = rebuild::spool_files(spool_root)
        .iter()
        .filter(|p| !spooled_file_recorded(journal, spool_root, p) && !p.strip_prefix(spool_root).is_ok_and(in_log))
        .count();
    if unrecorded > 0 {
        problems.push(format!("{unrecorded} received instances in the spool are not in the journal"));
    }
    let log = journal.outcomes().read();
    // the jobs retention began to remove: their files may be gone (a crash
    // during the purge), and a rebuild from the spool cannot know them
    let purging = |id: &str| log.as_ref().is_ok_and(|l| l.get(id).is_some_and(|e| e.purged));
    let mut missing = 0;
    for j in jobs.iter().filter(|j| !j.purged && !purging(&j.id)) {
        match journal.instances(&j.id) {
            Ok(records) => missing += records.iter().filter(|r| !spool_root.join(&r.path).is_file()).count(),
            Err(e) => problems.push(format!("instances of job {} unreadable: {e}", j.id)),
        }
    }
    if missing > 0 {
        problems.push(format!("{missing} instances in the journal have no file in the spool"));
    }
    match journal.index_problems() {
        Ok(p) => problems.extend(p),
        Err(e) => problems.push(format!("journal index unreadable: {e}")),
    }
    match log {
        Err(e) => problems.push(format!("outcome log unreadable: {e}")),
        Ok(log) => {
            let (mut lost, mut reopened) = (0, 0);
            for (id, e) in &log {
                let Some(state) = &e.state else { continue };
                match jobs.iter().find(|j| &j.id == id) {
                    // purged: nothing of it was left to rebuild from
                    None if e.purged => {}
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
    // the outcome log is read before the journal is set aside: a log that
    // cannot be read must not cost the finished states of every job
    super::outcomes::OutcomeLog::beside(journal_dir).read().map_err(|e| JournalError::Sled(sled::Error::Io(e)))?;
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
            // spool): it is processed again, as it would have been; the
            // log says so, or the next start would find it "finished"
            let job = journal.update(&id, |j| {
                j.note(format!(
                    "finished ({}) with {} instances before the journal was repaired; {} are in the spool: processing again",
                    state.name(),
                    e.received.unwrap_or(0),
                    j.received
                ))
            })?;
            journal.log_outcome(&job, None)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Arrival, JobState};

    fn arrival(sop: &str, index: u32) -> Arrival {
        crate::journal::tests::arrival("1.2.3", sop, index, 2)
    }

    /// An arrival whose file is written into the spool (not yet recorded).
    fn spooled(spool: &Path, sop: &str, index: u32) -> Arrival {
        let a = arrival(sop, index);
        let f = spool.join(&a.record.path);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"dcm").unwrap();
        a
    }

    #[test]
    fn a_crash_during_a_purge_is_not_damage_and_the_purge_is_finished_later() {
        let d = tempfile::tempdir().unwrap();
        let spool = d.path().join("spool");
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        for (i, sop) in ["1.2.3.1", "1.2.3.2"].into_iter().enumerate() {
            journal.record(&spooled(&spool, sop, i as u32 + 1)).unwrap();
        }
        let id = crate::journal::job_id("1.2.3");
        let job = journal.update(&id, |j| j.set_state(JobState::Done)).unwrap();
        assert!(check(&journal, &spool).is_empty());
        // the process dies after removing the first file, before the records go
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            journal
                .purge_job(&job, |records| {
                    std::fs::remove_file(spool.join(&records[0].path)).unwrap();
                    panic!("killed")
                })
                .unwrap()
        }));
        assert!(crashed.is_err());
        assert!(check(&journal, &spool).is_empty(), "{:?}", check(&journal, &spool));
        // the next pass finishes it
        let left = journal.get(&id).unwrap().unwrap();
        assert!(!left.purged);
        let done = journal
            .purge_job(&left, |records| {
                records.iter().for_each(|r| _ = std::fs::remove_file(spool.join(&r.path)));
                Ok(format!("{} records", records.len()))
            })
            .unwrap()
            .unwrap();
        assert!(done.purged && journal.instances(&id).unwrap().is_empty());
        assert!(check(&journal, &spool).is_empty());
    }

    #[test]
    fn a_purge_leaves_a_job_that_changed_alone() {
        let d = tempfile::tempdir().unwrap();
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        journal.record(&arrival("1.2.3.1", 1)).unwrap();
        let id = crate::journal::job_id("1.2.3");
        let seen = journal.update(&id, |j| j.set_state(JobState::Done)).unwrap();
        // an instance of the series arrives again after the list was made
        journal.record(&arrival("1.2.3.9", 2)).unwrap();
        let r = journal.purge_job(&seen, |_| panic!("must not remove anything")).unwrap();
        assert!(r.is_none());
        assert_eq!(journal.instances(&id).unwrap().len(), 2);
    }

    #[test]
    fn a_spool_file_whose_instance_waits_in_the_arrival_log_is_not_damage() {
        let d = tempfile::tempdir().unwrap();
        let spool = d.path().join("spool");
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        let a = spooled(&spool, "1.2.3.1", 1);
        // written, not recorded: damage, unless the log still holds it
        assert_eq!(check(&journal, &spool), ["1 received instances in the spool are not in the journal"]);
        assert!(check_beside_log(&journal, &spool, &|rel| rel == a.record.path).is_empty());
        assert_eq!(check_beside_log(&journal, &spool, &|_| false).len(), 1);
    }

    #[test]
    fn the_trees_disagreeing_with_each_other_is_damage() {
        let d = tempfile::tempdir().unwrap();
        let spool = d.path().join("spool");
        let journal = Journal::open(&d.path().join("journal")).unwrap();
        journal.record(&spooled(&spool, "1.2.3.1", 1)).unwrap();
        assert!(check(&journal, &spool).is_empty(), "{:?}", check(&journal, &spool));
        let id = crate::journal::job_id("1.2.3");
        // the receiving job lost from the active index: the scheduler would never see it
        let entry = journal.active.remove(id.as_bytes()).unwrap().unwrap();
        let p = check(&journal, &spool);
        assert!(p.iter().any(|p| p.contains("1 unfinished jobs are missing from the active index")), "{p:?}");
        journal.active.insert(id.as_bytes(), entry).unwrap();
        // the job record lost: its instances and its index entry belong to nothing
        journal.jobs.remove(id.as_bytes()).unwrap();
        let p = check(&journal, &spool);
        assert!(p.iter().any(|p| p.contains("instances of 1 series are recorded without their job")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("1 entries of the active index name no unfinished job")), "{p:?}");
    }

    /// A job that finished with two instances, a third acknowledged one
    /// found in the spool by a repair: processed again, and the next
    /// start's check agrees (the outcome log says it is no longer finished).
    #[test]
    fn a_job_a_repair_reopens_is_not_damage_at_the_next_start() {
        let d = tempfile::tempdir().unwrap();
        let (spool, jdir) = (d.path().join("spool"), d.path().join("journal"));
        let spec = petsim::SeriesSpec { slices: 3, matrix: 8, seed: 5, ..Default::default() };
        let src = petsim::write_series(&d.path().join("src"), &spec).unwrap();
        let place = |i: usize| -> std::path::PathBuf {
            let rel = std::path::PathBuf::from(format!("{}/{}/{}.dcm", src.study_uid, src.series_uid, src.sop_uids[i]));
            std::fs::create_dir_all(spool.join(&rel).parent().unwrap()).unwrap();
            std::fs::copy(&src.files[i], spool.join(&rel)).unwrap();
            rel
        };
        let id = crate::journal::job_id(&src.series_uid);
        {
            let journal = Journal::open(&jdir).unwrap();
            for i in 0..2 {
                let mut a = crate::journal::tests::arrival(&src.series_uid, &src.sop_uids[i], i as u32 + 1, 3);
                (a.study_uid, a.record.path) = (src.study_uid.clone(), place(i));
                journal.record(&a).unwrap();
            }
            journal.update(&id, |j| j.set_state(JobState::Done)).unwrap();
            journal.flush().unwrap();
        }
        place(2);
        let r = (0..100)
            .find_map(|_| {
                repair(&jdir, &spool).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                })
            })
            .expect("repaired");
        assert_eq!((r.instances, r.finished), (3, 0));
        let journal = Journal::open_waiting(&jdir, std::time::Duration::from_secs(5)).unwrap();
        assert!(!journal.get(&id).unwrap().unwrap().state.is_terminal());
        assert!(check(&journal, &spool).is_empty(), "{:?}", check(&journal, &spool));
    }
}
