//! Restore: turn a received PET series into a volume in Bq/ml, check it
//! against the selection rules, and run an [`Engine`] on it.
//!
//! Engines are tried in configured order; an engine that fails to load or
//! run is logged with its reason and the next one is used (never silently).

pub mod gaussian;
pub mod select;
pub mod volume;

pub use volume::{SourceSlice, Volume};

/// A restoration failure: what failed and why (goes into the job record).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine {engine} cannot run: {reason}")]
    Unavailable { engine: String, reason: String },
    #[error("engine {engine} failed: {reason}")]
    Failed { engine: String, reason: String },
}

/// A restoration engine.
pub trait Engine: Send + Sync {
    /// Short name ("gaussian", "tract", "ort").
    fn name(&self) -> &str;
    /// Identity of what produces the pixels (model id and version, or the
    /// filter and its parameters). It salts the derived UIDs and is written
    /// into Derivation Description.
    fn model_id(&self) -> String;
    /// Can this engine run here (library present, model loads)?
    fn check(&self) -> Result<(), EngineError>;
    /// Restore a volume; the result has the same shape and units (Bq/ml).
    fn run(&self, input: &Volume) -> Result<Volume, EngineError>;
}

/// Build the configured engines, in order, skipping (and logging) those that
/// cannot run here. Errors only when none is left.
pub fn engines_from_settings(s: &crate::config::RestoreSettings) -> Result<Vec<std::sync::Arc<dyn Engine>>, String> {
    let mut out: Vec<std::sync::Arc<dyn Engine>> = Vec::new();
    let mut problems = Vec::new();
    for name in &s.engines {
        let engine: std::sync::Arc<dyn Engine> = match name.as_str() {
            "gaussian" => std::sync::Arc::new(gaussian::Gaussian::new(s.gaussian_fwhm_mm)),
            other => {
                problems.push(format!("{other}: not in this build"));
                continue;
            }
        };
        match engine.check() {
            Ok(()) => out.push(engine),
            Err(e) => {
                tracing::warn!(engine = %name, error = %e, "engine unavailable; trying the next one");
                problems.push(e.to_string());
            }
        }
    }
    if out.is_empty() {
        return Err(format!("no restoration engine can run: {}", problems.join("; ")));
    }
    Ok(out)
}

/// Run the first engine that succeeds; report each failure on the way.
pub fn run_engines(engines: &[std::sync::Arc<dyn Engine>], v: &Volume) -> Result<(Volume, std::sync::Arc<dyn Engine>), String> {
    let mut errors = Vec::new();
    for e in engines {
        match e.run(v) {
            Ok(out) => return Ok((out, e.clone())),
            Err(err) => {
                tracing::warn!(engine = e.name(), error = %err, "engine failed; falling back to the next one");
                errors.push(err.to_string());
            }
        }
    }
    Err(errors.join("; "))
}
