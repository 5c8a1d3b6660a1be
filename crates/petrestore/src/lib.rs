//! petrestore: restores short-frame PET series so they read like 90 s ones.
//!
//! The module tree follows the data: [`ingest`] (DICOM SCP) → [`spool`] +
//! [`journal`] (durable record) → [`pipeline`] (scheduler and worker) →
//! [`restore`] (engines) → [`derive`] (the derived series) → [`egress`]
//! (C-STORE to destinations). [`app`] is the only place that wires them.
//! The DICOM building blocks ([`dicom`]) live in the `petdicom` crate, shared
//! with the simulator.

pub use petdicom as dicom;

pub mod app;
pub mod config;
pub mod control;
#[cfg(feature = "demo")]
pub mod demo;
pub mod derive;
pub mod egress;
pub mod eval;
pub mod figures;
pub mod ingest;
pub mod journal;
pub mod logging;
pub mod pem;
pub mod pipeline;
pub mod restore;
pub mod spool;
pub mod telemetry;
