//! Rebuild the journal from the spool. The spool files are the primary
//! record (each was fsynced before it was acknowledged); sled is known to
//! break after some abrupt stops (DEPENDENCIES.md). `petrestore journal
//! rebuild` moves the old journal aside and records every spooled instance
//! again; the jobs come back as `receiving` and are processed after the quiet
//! timeout. Derived UIDs are deterministic, so a destination that already has
//! the derived series receives the same UIDs again, not a second series.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;

use super::{Arrival, InstanceRecord, JobKind, Journal, JournalError, Recorded};
use crate::dicom::PET_STORAGE_CLASSES;
use crate::dicom::attrs::Attrs;

/// What a rebuild found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    pub instances: usize,
    pub jobs: usize,
    /// Files that could not be read as DICOM (left in place, listed).
    pub unreadable: Vec<PathBuf>,
    /// Where the old journal was moved, if there was one.
    pub old_journal: Option<PathBuf>,
}

/// Every `.dcm` file under the spool (temporaries excluded).
pub fn spool_files(spool: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "dcm") && !e.file_name().to_string_lossy().starts_with('.') {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(spool, &mut out);
    out.sort();
    out
}

/// How long [`rebuild`] waits for the journal's lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The journal's `db` file, locked as sled locks it (`flock`, exclusive),
/// or [`JournalError::Locked`] if a process has the journal open. `None`
/// when there is no `db` (no journal, or one damaged past its files).
fn lock_db(journal_dir: &Path) -> Result<Option<std::fs::File>, JournalError> {
    let db = journal_dir.join("db");
    let f = match std::fs::OpenOptions::new().read(true).write(true).open(&db) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(JournalError::Sled(sled::Error::Io(e))),
    };
    // sled lets go of the lock from a background thread a moment after its
    // last handle is dropped (a repair right after the start-up check):
    // wait a little before calling it another process's.
    let t = std::time::Instant::now();
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(Some(f)),
            Err(std::fs::TryLockError::WouldBlock) if t.elapsed() < LOCK_WAIT => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(std::fs::TryLockError::WouldBlock) => return Err(JournalError::Locked { path: journal_dir.display().to_string() }),
            Err(std::fs::TryLockError::Error(e)) => return Err(JournalError::Sled(sled::Error::Io(e))),
        }
    }
}

/// Move `journal_dir` aside and record every spooled instance in a new one.
pub fn rebuild(journal_dir: &Path, spool: &Path) -> Result<Rebuilt, JournalError> {
    let mut r = Rebuilt::default();
    // sled holds an exclusive lock on `db` while a process has the journal
    // open, from a daemon's first start-up step to its last stop step
    // (its control socket answers only in between): take that lock, and
    // hold it across the move, so a starting or stopping daemon's journal
    // is never moved from under it.
    let _held = lock_db(journal_dir)?;
    if journal_dir.exists() {
        let aside = journal_dir.with_extension(format!("replaced-{}", super::now_ms()));
        std::fs::rename(journal_dir, &aside).map_err(|e| JournalError::Sled(sled::Error::Io(e)))?;
        r.old_journal = Some(aside);
    }
    let journal = Journal::open(journal_dir)?;
    let mut jobs = std::collections::BTreeSet::new();
    for p in spool_files(spool) {
        let Ok(file) = dicom_object::OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(&p) else {
            r.unreadable.push(p);
            continue;
        };
        let meta = file.meta().clone();
        let obj = file.into_inner();
        let (Some(study), Some(series), Some(sop)) =
            (obj.str_of(tags::STUDY_INSTANCE_UID), obj.str_of(tags::SERIES_INSTANCE_UID), obj.str_of(tags::SOP_INSTANCE_UID))
        else {
            r.unreadable.push(p);
            continue;
        };
        let Ok(rel) = p.strip_prefix(spool) else { continue };
        let sop_class = meta.media_storage_sop_class_uid().trim_end_matches('\0').to_string();
        let arrival = Arrival {
            kind: if PET_STORAGE_CLASSES.contains(&sop_class.as_str()) { JobKind::Pet } else { JobKind::Passthrough },
            study_uid: study,
            series_uid: series.clone(),
            modality: obj.str_of(tags::MODALITY),
            calling_ae: meta.source_application_entity_title().unwrap_or("").trim_end_matches(['\0', ' ']).to_string(),
            number_of_slices: obj.i64_of(tags::NUMBER_OF_SLICES).and_then(|n| u32::try_from(n).ok()),
            multiframe: PET_STORAGE_CLASSES.contains(&sop_class.as_str()) && crate::dicom::frames::is_multiframe(&obj),
            record: InstanceRecord {
                sop_instance_uid: sop,
                sop_class_uid: sop_class,
                path: rel.to_owned(),
                transfer_syntax: meta.transfer_syntax().trim_end_matches('\0').to_string(),
                image_index: obj.i64_of(tags::IMAGE_INDEX).and_then(|n| u32::try_from(n).ok()),
            },
        };
        if let Recorded::New { job_id, .. } = journal.record(&arrival)? {
            jobs.insert(job_id);
            r.instances += 1;
        }
    }
    for id in &jobs {
        journal.update(id, |j| j.note("journal rebuilt from the spool"))?;
    }
    journal.flush()?;
    r.jobs = jobs.len();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_a_process_has_open_is_not_moved() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("journal");
        let spool = d.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let open = Journal::open(&dir).unwrap();
        assert!(matches!(rebuild(&dir, &spool), Err(JournalError::Locked { .. })));
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "nothing moved aside: {names:?}");
        drop(open);
        let r = rebuild(&dir, &spool).unwrap();
        assert!(r.old_journal.is_some_and(|p| p.exists()));
        assert!(dir.join("db").exists());
    }
}
