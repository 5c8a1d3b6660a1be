//! The spool: received instances as files, `spool/<study>/<series>/<sop>.dcm`,
//! and in front of them the arrival log ([`arrivals`], `spool/arrivals/`).
//!
//! An instance is acknowledged once it is durable in the arrival log
//! (README.md "How it works", durable before acknowledged: the log record
//! is both the fsynced instance and its journal entry). The materializer
//! (`ingest::materialize`) then writes the file
//! through a temporary and a rename ([`write_unsynced`]), fsyncs file and
//! folder, and only then records it in the journal; a file in the spool
//! without a journal record is a leftover of a crash whose record is still
//! in the log. [`write_durable`] (temporary, fsync, link or rename, folder
//! fsync) serves the other writers, such as the demo's receiver. Leftover
//! temporaries from a crash were never acknowledged and are removed at start.

pub mod arrivals;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dicom::uid::valid_uid;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);
const TMP_PREFIX: &str = ".tmp-";

/// Result of a durable write.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// The file is new and durable.
    Created,
    /// A file of that name already existed; nothing was changed.
    Existed,
}

/// fsync a directory so a new entry in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir)?.sync_all()
}

/// Create `dir` and any missing parents, fsyncing each parent whose entries
/// changed.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    // `Path::new("out").parent()` is `""`: the current folder.
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Create the folder of `path` (durably) and a new temporary file in it
/// holding `parts`, not synced. On error the temporary is already removed.
fn write_temporary(path: &Path, parts: &[&[u8]]) -> io::Result<(PathBuf, File)> {
    let dir = path.parent().ok_or_else(|| io::Error::other("path has no parent folder"))?;
    create_dir_durable(dir)?;
    let tmp = dir.join(format!("{TMP_PREFIX}{}-{}", std::process::id(), TMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    for p in parts {
        if let Err(e) = f.write_all(p) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    }
    Ok((tmp, f))
}

/// Write `parts` to `path` durably. With `replace == false` an existing file
/// is left untouched and [`Written::Existed`] returned.
pub fn write_durable(path: &Path, parts: &[&[u8]], replace: bool) -> io::Result<Written> {
    let (tmp, f) = write_temporary(path, parts)?;
    let dir = path.parent().expect("write_temporary checked the parent");
    let result = (|| {
        f.sync_all()?;
        drop(f);
        let outcome = if replace {
            fs::rename(&tmp, path)?;
            Written::Created
        } else {
            match fs::hard_link(&tmp, path) {
                Ok(()) => Written::Created,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Written::Existed,
                Err(e) => return Err(e),
            }
        };
        sync_dir(dir)?;
        Ok(outcome)
    })();
    // The temporary is gone after a rename; after a link (or a failure) it
    // must be removed. Its removal needs no fsync: it was never acknowledged.
    let _ = fs::remove_file(&tmp);
    result
}

/// Write `parts` to `path` through a temporary and a rename, without
/// syncing: the caller fsyncs the returned file and the folder before it
/// relies on them (the materializer does so for a whole batch at once). An
/// existing file of that name is replaced.
pub fn write_unsynced(path: &Path, parts: &[&[u8]]) -> io::Result<File> {
    let (tmp, f) = write_temporary(path, parts)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(f)
}

/// Free bytes available to us on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Room promised on the spool's filesystem for output not written yet: the
/// derived series (and uncertainty series) of received PET series that are
/// not restored yet, by series. Ingest counts it as used before it takes an
/// instance (`ingest::store`), so a disk that took a series also has room
/// for what the daemon will write for it; the worker releases a series'
/// share when its restoration step ends, written or not.
#[derive(Debug, Default)]
pub struct Reservations {
    by_series: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Reservations {
    pub fn add(&self, series_uid: &str, bytes: u64) {
        let mut m = self.by_series.lock().expect("reservations");
        let e = m.entry(series_uid.to_owned()).or_default();
        *e = e.saturating_add(bytes);
    }

    /// Drop a series' share; returns it.
    pub fn release(&self, series_uid: &str) -> u64 {
        self.by_series.lock().expect("reservations").remove(series_uid).unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.by_series.lock().expect("reservations").values().fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// The spool folder of one daemon.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    reserved: std::sync::Arc<Reservations>,
}

impl Spool {
    pub fn new(root: PathBuf) -> io::Result<Spool> {
        create_dir_durable(&root)?;
        Ok(Spool { root, reserved: Default::default() })
    }

    /// Room promised for output not written yet (shared by every clone).
    pub fn reservations(&self) -> &Reservations {
        &self.reserved
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of an instance relative to the spool root. All three UIDs must be
    /// valid (checked again here: a UID never becomes a path unvalidated).
    pub fn relative_path(study: &str, series: &str, sop: &str) -> Option<PathBuf> {
        (valid_uid(study) && valid_uid(series) && valid_uid(sop)).then(|| Path::new(study).join(series).join(format!("{sop}.dcm")))
    }

    pub fn absolute(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// Remove temporaries left by a crash (never acknowledged). Returns how many.
    pub fn remove_stale_temporaries(&self) -> io::Result<usize> {
        fn walk(dir: &Path, n: &mut usize) -> io::Result<()> {
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let p = entry.path();
                if entry.file_type()?.is_dir() {
                    walk(&p, n)?;
                } else if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    fs::remove_file(&p)?;
                    *n += 1;
                }
            }
            Ok(())
        }
        let mut n = 0;
        walk(&self.root, &mut n)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_write_never_overwrites_without_replace() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/c.dcm");
        assert_eq!(write_durable(&p, &[b"one"], false).unwrap(), Written::Created);
        assert_eq!(write_durable(&p, &[b"two"], false).unwrap(), Written::Existed);
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(write_durable(&p, &[b"th", b"ree"], true).unwrap(), Written::Created);
        assert_eq!(fs::read(&p).unwrap(), b"three");
        // no temporaries left behind
        assert_eq!(fs::read_dir(d.path().join("a/b")).unwrap().count(), 1);
    }

    #[test]
    fn hostile_uids_never_become_paths() {
        assert!(Spool::relative_path("1.2", "../x", "1.3").is_none());
        assert!(Spool::relative_path("1.2", "1.3", "/etc/passwd").is_none());
        assert!(Spool::relative_path("1.2", "1.3", "1.4").is_some());
    }

    #[test]
    fn stale_temporaries_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let s = Spool::new(d.path().join("spool")).unwrap();
        fs::create_dir_all(s.root().join("1/2")).unwrap();
        fs::write(s.root().join("1/2/.tmp-1-1"), b"x").unwrap();
        fs::write(s.root().join("1/2/3.dcm"), b"x").unwrap();
        assert_eq!(s.remove_stale_temporaries().unwrap(), 1);
        assert!(s.root().join("1/2/3.dcm").exists());
    }

    #[test]
    fn free_space_is_reported() {
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
    }
}
