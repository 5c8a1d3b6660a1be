//! The job record: one series, from its first instance to a terminal state.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (journal timestamps survive restarts,
/// unlike `Instant`).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Job id: 16 hex digits of SHA-256 of the Series Instance UID, so the same
/// series always maps to the same job, across restarts and re-sends.
pub fn job_id(series_uid: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(series_uid.as_bytes());
    h[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What a job does with its series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A PET series to restore.
    Pet,
    /// Another storage class of the study, forwarded unchanged.
    Passthrough,
}

/// Which series a delivery sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// The restored, derived series.
    Derived,
    /// The received series, unchanged.
    Original,
}

/// The terminal state a job takes once its deliveries are done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Outcome {
    Done,
    Failed { reason: String },
    Skipped { reason: String },
}

/// Where a job is. Every non-terminal state is resumed from the journal at
/// start (README.md "How it works": the journal is the truth).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Instances are arriving.
    Receiving,
    /// Complete (or timed out); waiting for the worker.
    Queued,
    /// The worker is restoring it (a crash here restarts restoration).
    Restoring,
    /// Sending `payload` to the destinations; `outcome` follows.
    Delivering {
        payload: Payload,
        outcome: Outcome,
    },
    Done,
    Failed {
        reason: String,
    },
    Skipped {
        reason: String,
    },
}

impl JobState {
    pub fn is_terminal(&self) -> bool {
        matches!(self, JobState::Done | JobState::Failed { .. } | JobState::Skipped { .. })
    }
    /// Short name for tables and logs.
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Receiving => "receiving",
            JobState::Queued => "queued",
            JobState::Restoring => "restoring",
            JobState::Delivering { .. } => "delivering",
            JobState::Done => "done",
            JobState::Failed { .. } => "failed",
            JobState::Skipped { .. } => "skipped",
        }
    }
}

impl From<Outcome> for JobState {
    fn from(o: Outcome) -> JobState {
        match o {
            Outcome::Done => JobState::Done,
            Outcome::Failed { reason } => JobState::Failed { reason },
            Outcome::Skipped { reason } => JobState::Skipped { reason },
        }
    }
}

/// Delivery progress to one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub destination: String,
    pub delivered: bool,
    pub attempts: u32,
    /// Not before this time (ms since epoch): the backoff, persisted.
    pub next_attempt_ms: u64,
    pub last_error: Option<String>,
    /// Sent, and the archive asked to commit (`commitment = true`
    /// destinations): delivered only when its report confirms every
    /// instance; `next_attempt_ms` is then the deadline for that report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commitment: Option<PendingCommitment>,
    /// The destination's AE title and address while the delivery is
    /// pending (`AE@host:port`): a reload that removes this destination's
    /// name and adds another with the same peer is a rename, and the
    /// delivery moves to the new name; any other removal fails the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// A storage commitment request waiting for the archive's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCommitment {
    pub transaction_uid: String,
    pub requested_ms: u64,
    /// Instances in the request, and their fingerprint
    /// ([`crate::dicom::commitment::digest`]), to check the report against.
    pub count: u32,
    pub digest: String,
}

/// One line of a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub what: String,
}

/// Kept history lines per job (bounded: a job record must stay small).
const MAX_HISTORY: usize = 64;

/// What a job records of its uncertainty series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UncertaintyRecord {
    pub summary: crate::restore::uncertainty::Summary,
    /// Written only when a destination asks for it (`uncertainty = true`).
    pub series_uid: Option<String>,
    pub count: u32,
}

/// The most slices one series may declare (Number of Slices) or index
/// (Image Index): far above any scanner's bed positions × slices, low
/// enough that completeness is a few kilobytes of bits. Ingest refuses an
/// instance beyond it.
pub const MAX_SLICES: u32 = 100_000;

/// Interrupted restorations of one job after which it is failed (and its
/// original forwarded) rather than started again.
pub const MAX_INTERRUPTED_RESTORES: u32 = 5;

/// Times a job's derived series may be found incomplete at delivery and
/// restored again before the job is failed (and its original forwarded).
pub const MAX_OUTPUT_REBUILDS: u32 = 3;

/// One series and its fate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub study_uid: String,
    pub series_uid: String,
    pub modality: Option<String>,
    pub calling_ae: String,
    /// Number of Slices (0054,0081), if the series carries it.
    pub expected_slices: Option<u32>,
    /// Instances stored (duplicates not counted).
    pub received: u32,
    /// Bit i set when Image Index i+1 has arrived.
    pub index_bits: Vec<u64>,
    pub first_received_ms: u64,
    pub last_received_ms: u64,
    pub state: JobState,
    pub deliveries: Vec<Delivery>,
    /// Engine that produced the derived series, and its model id.
    pub engine: Option<String>,
    pub model_id: Option<String>,
    pub output_series_uid: Option<String>,
    pub output_count: u32,
    /// Instances arrived while the job was past `Receiving`: run it again
    /// when the current run ends.
    pub rerun_requested: bool,
    /// Its files were removed by retention (the record stays).
    #[serde(default)]
    pub purged: bool,
    /// Made of multi-frame instances (completes by
    /// `series.multiframe_quiet_timeout_s`).
    #[serde(default)]
    pub multiframe: bool,
    /// Restoration attempts that found the disk full since the last one
    /// that did not; the job is not restored again before
    /// `restore_not_before_ms`.
    #[serde(default)]
    pub space_waits: u32,
    #[serde(default)]
    pub restore_not_before_ms: u64,
    /// Restorations of this job interrupted by a restart (found in
    /// `Restoring` at start) since one last ended: a series that crashes
    /// the process every time is failed after [`MAX_INTERRUPTED_RESTORES`]
    /// instead of crashing the box in a loop.
    #[serde(default)]
    pub interrupted_restores: u32,
    /// Times the derived series was found incomplete at delivery and made
    /// again (a folder that keeps losing files must not loop forever):
    /// after [`MAX_OUTPUT_REBUILDS`] the job fails.
    #[serde(default)]
    pub output_rebuilds: u32,
    /// The uncertainty of the restored series, when the model is
    /// calibrated for it: its one-line summary, its series and instances.
    #[serde(default)]
    pub uncertainty: Option<UncertaintyRecord>,
    /// Destinations whose pending delivery a reload removed (the
    /// destination taken out of the config, not renamed): the job cannot
    /// end `done` without them; it fails, naming them, once the others are
    /// delivered, and `jobs retry` sends it to the destinations then
    /// configured.
    #[serde(default)]
    pub dropped_deliveries: Vec<String>,
    pub history: Vec<Event>,
    pub updated_ms: u64,
}

impl Job {
    pub fn new(kind: JobKind, study_uid: &str, series_uid: &str, calling_ae: &str, now: u64) -> Job {
        Job {
            id: job_id(series_uid),
            kind,
            study_uid: study_uid.to_owned(),
            series_uid: series_uid.to_owned(),
            modality: None,
            calling_ae: calling_ae.to_owned(),
            expected_slices: None,
            received: 0,
            index_bits: Vec::new(),
            first_received_ms: now,
            last_received_ms: now,
            state: JobState::Receiving,
            deliveries: Vec::new(),
            engine: None,
            model_id: None,
            output_series_uid: None,
            output_count: 0,
            rerun_requested: false,
            purged: false,
            multiframe: false,
            space_waits: 0,
            restore_not_before_ms: 0,
            interrupted_restores: 0,
            output_rebuilds: 0,
            uncertainty: None,
            dropped_deliveries: Vec::new(),
            history: vec![Event { at_ms: now, what: "first instance received".into() }],
            updated_ms: now,
        }
    }

    /// Append a history line (oldest dropped beyond the bound).
    pub fn note(&mut self, what: impl Into<String>) {
        let now = now_ms();
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(1); // keep the first line: when it started
        }
        self.history.push(Event { at_ms: now, what: what.into() });
        self.updated_ms = now;
    }

    /// Move to `state`, with a history line.
    pub fn set_state(&mut self, state: JobState) {
        let line = match &state {
            JobState::Failed { reason } => format!("failed: {reason}"),
            JobState::Skipped { reason } => format!("skipped: {reason}"),
            JobState::Delivering { payload, .. } => format!("delivering {payload:?} series").to_lowercase(),
            s => s.name().to_string(),
        };
        self.state = state;
        self.note(line);
    }

    /// Record Image Index `i` (1-based).
    pub fn mark_index(&mut self, i: u32) {
        if i == 0 || i > MAX_SLICES {
            return;
        }
        let bit = (i - 1) as usize;
        if self.index_bits.len() <= bit / 64 {
            self.index_bits.resize(bit / 64 + 1, 0);
        }
        self.index_bits[bit / 64] |= 1u64 << (bit % 64);
    }

    fn has_index(&self, i: u32) -> bool {
        let bit = (i - 1) as usize;
        self.index_bits.get(bit / 64).is_some_and(|w| w & (1u64 << (bit % 64)) != 0)
    }

    /// Image indexes 1..=N that have not arrived (N = Number of Slices, at
    /// most [`MAX_SLICES`] of them listed: ingest refuses a larger N, and a
    /// journal written before it did must not make a list of billions).
    pub fn missing_indexes(&self) -> Option<Vec<u32>> {
        let n = self.expected_slices?.min(MAX_SLICES);
        Some((1..=n).filter(|i| !self.has_index(*i)).collect())
    }

    /// Complete when Number of Slices is known, at most [`MAX_SLICES`], and
    /// every index arrived. Counts bits; allocates nothing.
    pub fn is_complete(&self) -> bool {
        match self.expected_slices {
            Some(n) if (1..=MAX_SLICES).contains(&n) => (1..=n).all(|i| self.has_index(i)),
            _ => false,
        }
    }

    /// Fresh delivery plan for the given destinations.
    pub fn plan_deliveries(&mut self, destinations: &[String]) {
        self.deliveries.clear();
        self.dropped_deliveries.clear();
        for d in destinations {
            self.add_delivery(d);
        }
    }

    /// [`Job::plan_deliveries`] for configured destinations, each delivery
    /// with its peer (AE title and address), which tells a rename from a
    /// removal at a later reload.
    pub fn plan_deliveries_to(&mut self, destinations: &[crate::config::Destination]) {
        let names: Vec<String> = destinations.iter().map(|d| d.name.clone()).collect();
        self.plan_deliveries(&names);
        self.stamp_peers(destinations);
    }

    /// Record each pending delivery's peer as configured now.
    pub fn stamp_peers(&mut self, destinations: &[crate::config::Destination]) {
        for d in self.deliveries.iter_mut().filter(|d| !d.delivered) {
            if let Some(c) = destinations.iter().find(|c| c.name == d.destination) {
                d.peer = Some(peer_of(c));
            }
        }
    }

    /// One more destination for this job's payload, due now (a destination
    /// a reload had removed and configures again is owed nothing more).
    pub fn add_delivery(&mut self, destination: &str) {
        self.dropped_deliveries.retain(|d| d != destination);
        self.deliveries.push(Delivery {
            destination: destination.to_string(),
            delivered: false,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            commitment: None,
            peer: None,
        });
    }
}

/// A destination's peer as a pending delivery records it: `AE@address`.
pub fn peer_of(d: &crate::config::Destination) -> String {
    format!("{}@{}", d.ae_title, d.address)
}

/// A received instance as the journal knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    /// Relative to the spool root.
    pub path: std::path::PathBuf,
    pub transfer_syntax: String,
    pub image_index: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completeness_from_image_index() {
        let mut j = Job::new(JobKind::Pet, "1.2", "1.2.3", "CONSOLE", 0);
        assert!(!j.is_complete(), "unknown Number of Slices is never complete");
        j.expected_slices = Some(70);
        for i in 1..=70 {
            assert!(!j.is_complete());
            if i != 65 {
                j.mark_index(i);
            }
        }
        assert_eq!(j.missing_indexes().unwrap(), vec![65]);
        j.mark_index(65);
        assert!(j.is_complete());
    }

    #[test]
    fn absurd_number_of_slices_is_never_complete_and_lists_little() {
        // a journal written before ingest refused such values
        let mut j = Job::new(JobKind::Pet, "1.2", "1.2.3", "CONSOLE", 0);
        j.expected_slices = Some(u32::MAX);
        j.mark_index(1);
        assert!(!j.is_complete());
        assert_eq!(j.missing_indexes().unwrap().len(), MAX_SLICES as usize - 1);
        j.expected_slices = Some(0);
        assert!(!j.is_complete(), "zero slices is not a complete series");
    }

    #[test]
    fn job_id_is_stable() {
        assert_eq!(job_id("1.2.3"), job_id("1.2.3"));
        assert_eq!(job_id("1.2.3").len(), 16);
        assert_ne!(job_id("1.2.3"), job_id("1.2.4"));
    }

    #[test]
    fn history_is_bounded() {
        let mut j = Job::new(JobKind::Pet, "1.2", "1.2.3", "C", 0);
        for i in 0..500 {
            j.note(format!("line {i}"));
        }
        assert_eq!(j.history.len(), MAX_HISTORY);
        assert_eq!(j.history[0].what, "first instance received");
    }
}
