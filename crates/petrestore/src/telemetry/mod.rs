//! Telemetry: what fleet managers see over MQTT, and the commands they may
//! send. Stages never wait for the broker: events go through a bounded
//! channel with `try_send` (a full channel drops the event and counts it),
//! and the connection task keeps a bounded offline buffer (oldest dropped
//! first, counted, reported in `health` after reconnect).
//!
//! Topics under `petrestore/v1/<device_id>/`: `status` (retained; the last
//! will sets it `offline`), `health` (periodic), `jobs/<job_id>` (QoS 1),
//! `cmd/<name>` → `cmd/<name>/reply`.

pub mod mqtt;
pub mod payload;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::journal::Job;
pub use payload::*;

/// A message for the broker, relative to the device prefix.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// The pipeline's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Telemetry {
    tx: Option<mpsc::Sender<Outgoing>>,
    device_id: String,
    include_uids: bool,
    /// Events dropped because the channel was full.
    pub dropped: Arc<AtomicU64>,
}

impl Telemetry {
    /// Telemetry off (no `[mqtt]` section): every call is a no-op.
    pub fn disabled() -> Telemetry {
        Telemetry { tx: None, device_id: String::new(), include_uids: false, dropped: Arc::new(AtomicU64::new(0)) }
    }

    pub fn new(tx: mpsc::Sender<Outgoing>, device_id: &str, include_uids: bool) -> Telemetry {
        Telemetry { tx: Some(tx), device_id: device_id.to_string(), include_uids, dropped: Arc::new(AtomicU64::new(0)) }
    }

    /// A job changed state.
    pub fn job_event(&self, job: &Job) {
        let Some(tx) = &self.tx else { return };
        let msg = JobEventMsg::from_job(&self.device_id, job, self.include_uids);
        let out =
            Outgoing { topic: format!("jobs/{}", job.id), payload: serde_json::to_vec(&msg).expect("payloads serialize"), retain: false };
        if tx.try_send(out).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
