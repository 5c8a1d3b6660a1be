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
        let delivered = !job.deliveries.is_empty() && job.deliveries.iter().all(|d| d.delivered);
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
            let mut dirs = Vec::new();
            for r in records {
                let p = spool.absolute(&r.path);
                if std::fs::remove_file(&p).is_ok() {
                    removed += 1;
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
            let _ = std::fs::remove_dir_all(&out);
            format!(
                "retention: removed {removed} received instances and the derived series ({:.1} h after the job ended)",
                age.as_secs_f64() / 3600.0
            )
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
