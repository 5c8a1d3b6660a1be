//! The outcome log: a small append-only file beside the journal
//! (`<state_dir>/outcomes.log`) with one line per job that reached a
//! terminal state (done, failed, skipped) or left one (a retry), each line
//! flushed to disk (`fdatasync`) before the journal moves on.
//!
//! It exists for the one thing a rebuild from the spool cannot know: which
//! series were already finished and delivered. After journal damage the
//! journal is rebuilt from the spool (the fsynced received instances) and
//! these lines put every finished job back in its terminal state, so a
//! finished series is never restored again nor its originals forwarded to a
//! destination that already holds the restored series.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::JobState;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub job_id: String,
    pub series_uid: String,
    /// The terminal state reached, or `None` when the job left its terminal
    /// state (retried).
    pub state: Option<JobState>,
    pub at_ms: u64,
    /// Instances the job held then: a repair restores the finished state
    /// only if the spool holds no more than that.
    #[serde(default)]
    pub received: Option<u32>,
    /// Retention is removing (or removed) the finished job's files: written
    /// before the first file goes. A rebuild from the spool cannot know such
    /// a job, and its records may point at files already gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub purged: bool,
}

/// Whether a non-empty file does not end with a newline.
fn ends_torn(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// The open log (appends are serialized and synced).
pub struct OutcomeLog {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl OutcomeLog {
    /// The log of the journal in `journal_dir` (`<state_dir>/journal`).
    pub fn beside(journal_dir: &Path) -> OutcomeLog {
        let path = journal_dir.parent().unwrap_or(Path::new(".")).join("outcomes.log");
        OutcomeLog { path, file: Mutex::new(None) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one entry and make it durable.
    pub fn append(&self, e: &Entry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.file.lock().expect("outcome log lock");
        if guard.is_none() {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).read(true).open(&self.path)?;
            // a crash inside an append leaves a torn last line: the first
            // append of this run starts on a line of its own, or it would
            // be glued to the fragment and lost with it
            if ends_torn(&mut f)? {
                f.write_all(b"\n")?;
            }
            *guard = Some(f);
        }
        let f = guard.as_mut().expect("opened above");
        f.write_all(&line)?;
        f.sync_data()
    }

    /// The last entry of every job. A torn last line (a crash while
    /// appending, never acted on) and unreadable lines are skipped.
    pub fn read(&self) -> std::io::Result<BTreeMap<String, Entry>> {
        let mut out = BTreeMap::new();
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for line in std::io::BufReader::new(f).lines() {
            let Ok(line) = line else { continue };
            if let Ok(e) = serde_json::from_str::<Entry>(&line) {
                out.insert(e.job_id.clone(), e);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_entry_of_each_job_wins_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = OutcomeLog::beside(&dir.path().join("journal"));
        let e = |id: &str, state: Option<JobState>| Entry {
            job_id: id.into(),
            series_uid: format!("1.2.{id}"),
            state,
            at_ms: 1,
            received: Some(3),
            purged: false,
        };
        log.append(&e("a", Some(JobState::Done))).unwrap();
        log.append(&e("b", Some(JobState::Failed { reason: "x".into() }))).unwrap();
        log.append(&e("a", None)).unwrap();
        std::fs::OpenOptions::new().append(true).open(log.path()).unwrap().write_all(b"{\"job_id\":\"c\",\"ser").unwrap();
        let r = log.read().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r["a"].state, None, "retried after it was done");
        assert_eq!(r["b"].state, Some(JobState::Failed { reason: "x".into() }));
        // the next run's first append is not glued to the torn line
        let next = OutcomeLog::beside(&dir.path().join("journal"));
        next.append(&e("b", None)).unwrap();
        next.append(&e("d", Some(JobState::Done))).unwrap();
        let r = next.read().unwrap();
        assert_eq!(r["b"].state, None, "the retry after the torn line is read");
        assert_eq!(r["d"].state, Some(JobState::Done));
        assert_eq!(r.len(), 3);
    }
}
