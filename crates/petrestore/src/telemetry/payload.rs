//! MQTT payloads. Every one carries `schema_version`; the JSON Schema of
//! each is in `config/schemas/`, and the tests validate what the daemon
//! actually publishes against them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::journal::{Job, JobState};

pub const SCHEMA_VERSION: u32 = 1;

/// `status` (retained): is the box there, and what runs on it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusMsg {
    pub schema_version: u32,
    /// online | draining | paused | stopping | offline
    pub state: String,
    pub version: String,
    pub device_id: String,
    pub model: Option<String>,
    pub engine: Option<String>,
    /// ms since the Unix epoch when this state began
    pub since_ms: u64,
}

/// `health` (periodic).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthMsg {
    pub schema_version: u32,
    pub device_id: String,
    pub at_ms: u64,
    pub uptime_s: u64,
    pub state: String,
    /// Jobs waiting for the worker.
    pub queue_depth: usize,
    /// Non-terminal jobs per state.
    pub jobs: BTreeMap<String, usize>,
    pub jobs_finished: BTreeMap<String, u64>,
    pub disk_free_mb: Option<u64>,
    /// Acknowledged instances still only in the arrival log (normally 0 or
    /// a batch in flight; growing means the spool or journal is stuck).
    pub ingest_backlog: usize,
    pub engines: Vec<EngineHealth>,
    pub last_error: Option<String>,
    /// Telemetry events dropped since start (channel full or offline buffer overflow).
    pub events_dropped: u64,
    /// Series restored and delivered in the last hour.
    pub throughput: Throughput,
}

/// What the box delivered in the last [`Throughput::WINDOW_S`] seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Throughput {
    pub window_s: u64,
    /// Jobs that reached `done` in the window.
    pub series_done: u64,
    /// Their received slices (instances, or frames of multi-frame ones).
    pub slices_done: u64,
    /// Median time from a series' last received instance to its job being
    /// done (restored and delivered), seconds; null without a done job.
    pub median_turnaround_s: Option<f64>,
}

impl Throughput {
    pub const WINDOW_S: u64 = 3600;

    /// From `(done at ms, slices, turnaround ms)` of finished jobs, those
    /// done within the window before `now_ms`.
    pub fn of(done: &[(u64, u32, u64)], now_ms: u64) -> Throughput {
        let recent: Vec<&(u64, u32, u64)> = done.iter().filter(|(at, ..)| now_ms.saturating_sub(*at) <= Self::WINDOW_S * 1000).collect();
        let mut turn: Vec<u64> = recent.iter().map(|(.., t)| *t).collect();
        turn.sort_unstable();
        let median_turnaround_s = match turn.len() {
            0 => None,
            n if n % 2 == 1 => Some(turn[n / 2] as f64 / 1000.0),
            n => Some((turn[n / 2 - 1] + turn[n / 2]) as f64 / 2000.0),
        };
        Throughput {
            window_s: Self::WINDOW_S,
            series_done: recent.len() as u64,
            slices_done: recent.iter().map(|(_, s, _)| *s as u64).sum(),
            median_turnaround_s,
        }
    }
}

#[cfg(test)]
mod throughput_tests {
    use super::Throughput;

    #[test]
    fn counts_the_last_hour_and_takes_the_median() {
        let now = 10_000_000;
        let done = [(now - 4_000_000, 9, 1_000), (now - 3_000, 40, 20_000), (now - 2_000, 10, 6_000), (now, 5, 8_000)];
        let t = Throughput::of(&done, now);
        assert_eq!((t.window_s, t.series_done, t.slices_done), (3600, 3, 55), "the job done 4,000 s ago is outside the hour");
        assert_eq!(t.median_turnaround_s, Some(8.0));
        assert_eq!(Throughput::of(&done[1..3], now).median_turnaround_s, Some(13.0));
        assert_eq!(Throughput::of(&[], now), Throughput { window_s: 3600, ..Default::default() });
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EngineHealth {
    pub engine: String,
    pub ok: bool,
    pub detail: String,
}

/// `jobs/<job_id>`: one lifecycle event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobEventMsg {
    pub schema_version: u32,
    pub device_id: String,
    pub job_id: String,
    /// receiving | queued | restoring | delivering | done | failed | skipped
    pub state: String,
    pub reason: Option<String>,
    pub kind: String,
    pub received: u32,
    pub expected: Option<u32>,
    pub engine: Option<String>,
    pub model: Option<String>,
    pub at_ms: u64,
    /// The restored series' uncertainty, when the model is calibrated for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertainty: Option<crate::restore::uncertainty::Summary>,
    /// Only with `mqtt.include_uids = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series_uid: Option<String>,
}

impl JobEventMsg {
    pub fn from_job(device_id: &str, job: &Job, include_uids: bool) -> JobEventMsg {
        let reason = match &job.state {
            JobState::Failed { reason } | JobState::Skipped { reason } => Some(reason.clone()),
            _ => None,
        };
        JobEventMsg {
            schema_version: SCHEMA_VERSION,
            device_id: device_id.to_string(),
            job_id: job.id.clone(),
            state: job.state.name().to_string(),
            reason,
            kind: format!("{:?}", job.kind).to_lowercase(),
            received: job.received,
            expected: job.expected_slices,
            engine: job.engine.clone(),
            model: job.model_id.clone(),
            at_ms: job.updated_ms,
            uncertainty: job.uncertainty.as_ref().map(|u| u.summary),
            study_uid: include_uids.then(|| job.study_uid.clone()),
            series_uid: include_uids.then(|| job.series_uid.clone()),
        }
    }
}

/// A command's payload on `cmd/<name>`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CommandMsg {
    pub correlation_id: Option<String>,
    pub job_id: Option<String>,
}

/// The answer on `cmd/<name>/reply`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplyMsg {
    pub schema_version: u32,
    pub device_id: String,
    pub command: String,
    pub correlation_id: Option<String>,
    pub ok: bool,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
}
