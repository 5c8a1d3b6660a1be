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
    /// online | draining | paused | offline
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
