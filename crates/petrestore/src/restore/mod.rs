//! Restore: turn a received PET series into a volume in Bq/ml, check it
//! against the selection rules, and run an [`Engine`] on it.
//!
//! Engines are tried in configured order; an engine that fails to load or
//! run is logged with its reason and the next one is used (never silently).

pub mod gaussian;
pub mod guard;
pub mod model;
pub mod neural;
pub mod ort_engine;
pub mod select;
pub mod texture;
pub mod tract_engine;
pub mod uncertainty;
pub mod volume;

pub use volume::{SourceSlice, Volume};

use crate::config::EngineKind;

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
    /// [`Engine::run`], and the network's variance output (Bq²/ml²) where
    /// its package has one (`io.variance`), from the same run.
    fn run_with_variance(&self, input: &Volume) -> Result<(Volume, Option<Volume>), EngineError> {
        Ok((self.run(input)?, None))
    }
    /// What produced the pixels, for Derivation Description and the job
    /// record (e.g. "ort/cuda").
    fn label(&self) -> String {
        self.name().to_owned()
    }
    /// A warning that must travel with the output (a test model).
    fn notice(&self) -> Option<String> {
        None
    }
    /// The tracers a model was trained for (`[selection] tracers` of its
    /// package); `None`: the engine has no model and takes any tracer.
    fn tracers(&self) -> Option<Vec<String>> {
        None
    }
    /// The frame durations a model was trained for (`[selection]
    /// frame_durations_s` of its package, seconds); `None`: no model.
    fn frame_durations(&self) -> Option<[f64; 2]> {
        None
    }
    /// The in-plane pixel spacings a model was trained on (`[selection]
    /// pixel_mm` of its package, mm); `None`: any.
    fn pixel_mm(&self) -> Option<[f64; 2]> {
        None
    }
    /// Slices a model reads for each one it restores (`io.context_slices`
    /// of its package): the fewest a series must have; `None`: any.
    fn context_slices(&self) -> Option<usize> {
        None
    }
    /// The calibration that gives this engine's output its per-voxel σ
    /// (see [`uncertainty`]); `None`: no uncertainty series.
    fn uncertainty(&self) -> Option<uncertainty::Calibration> {
        None
    }
}

/// Written into Derivation Description when a test package is used.
pub const TEST_MODEL_NOTICE: &str = "TEST MODEL with untrained weights: not for clinical use.";
/// Written into Derivation Description for a model trained on simulated data only.
pub const RESEARCH_MODEL_NOTICE: &str = "Research model trained on simulated data only: not validated on patients.";

/// How an engine fared at start (shown by `petrestore status`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineReport {
    pub engine: String,
    pub ok: bool,
    /// Provider in use (ort), model id, or why it cannot run.
    pub detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ort_engine::ProviderReport>,
}

/// The engines that can run here, in configured order, and a report per
/// configured engine.
pub struct Engines {
    pub engines: Vec<std::sync::Arc<dyn Engine>>,
    pub reports: Vec<EngineReport>,
}

/// Build the configured engines in order. A model package that is missing,
/// corrupt or mismatched is an error (the daemon must not start on it); an
/// engine that cannot load here (no ONNX Runtime library, no GPU provider)
/// is logged with its reason and skipped. Errors when no engine is left.
pub fn engines_from_settings(s: &crate::config::Settings) -> Result<Engines, String> {
    let r = &s.restore;
    let needs_model = r.engines.iter().any(|e| e.needs_model());
    // The installed default path without a package: a box (or a build) that
    // ships no model. Only the engines without a model run, and it is said.
    // A package named anywhere else must exist: a typo must not silently
    // turn restoration into a Gaussian filter.
    let no_installed_model = needs_model && r.model == std::path::Path::new(crate::config::DEFAULT_MODEL_DIR) && !r.model.exists();
    let mut out = Engines { engines: Vec::new(), reports: Vec::new() };
    if no_installed_model {
        let reason = format!(
            "no model package installed at {}: install it (package petrestore) or set restore.model (petrestore restore: --model DIR)",
            r.model.display()
        );
        tracing::warn!("{reason}; restoring with the engines that need no model only");
        for name in r.engines.iter().filter(|e| e.needs_model()) {
            out.reports.push(EngineReport { engine: name.to_string(), ok: false, detail: reason.clone(), providers: vec![] });
        }
    }
    let mut pkg =
        if needs_model && !no_installed_model { Some(model::ModelPackage::load(&r.model).map_err(|e| e.to_string())?) } else { None };
    if let (Some(p), Some(path)) = (pkg.as_mut(), &r.uncertainty_site) {
        match with_site_uncertainty(p, path) {
            Ok(pairs) => tracing::info!(file = %path.display(), pairs, "σ scaled by the site's own calibration (restore.uncertainty_site)"),
            Err(e) => tracing::warn!(file = %path.display(), "restore.uncertainty_site not used, σ from the model's calibration only: {e}"),
        }
    }
    if let Some(p) = pkg.as_ref().filter(|p| p.is_test_model()) {
        tracing::warn!(model = %p.model_id(), "restore.model is a TEST model (untrained weights): not for clinical use");
    }
    let mut model_engine_ok = false;
    for name in r.engines.iter().filter(|e| !(no_installed_model && e.needs_model())) {
        let built: Result<std::sync::Arc<dyn Engine>, EngineError> = match name {
            EngineKind::Gaussian => Ok(std::sync::Arc::new(gaussian::Gaussian::new(r.gaussian_fwhm_mm))),
            EngineKind::Tract => tract_engine::TractEngine::new(pkg.clone().expect("loaded above"), r.threads)
                .map(|e| std::sync::Arc::new(e) as std::sync::Arc<dyn Engine>),
            EngineKind::Ort => {
                let o = ort_engine::OrtOptions {
                    library: r.ort_library.clone(),
                    providers: r.ort_providers.clone(),
                    tensorrt_fp16: r.tensorrt_fp16,
                    tensorrt_workspace_mb: r.tensorrt_workspace_mb,
                    cache_dir: s.node.state_dir.join("trt-cache"),
                    threads: r.threads,
                    fold_texture: true,
                };
                match ort_engine::OrtEngine::new(pkg.clone().expect("loaded above"), &o) {
                    Ok(e) => {
                        out.reports.push(EngineReport {
                            engine: "ort".into(),
                            ok: true,
                            detail: format!("provider {}", e.provider()),
                            providers: e.providers.clone(),
                        });
                        match e.check() {
                            Ok(()) => {
                                out.engines.push(std::sync::Arc::new(e));
                                model_engine_ok = true;
                            }
                            Err(err) => {
                                let last = out.reports.last_mut().expect("pushed above");
                                last.ok = false;
                                last.detail = err.to_string();
                                tracing::warn!(engine = "ort", error = %err, "engine unavailable; trying the next one");
                            }
                        }
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match built.and_then(|e| e.check().map(|()| e)) {
            Ok(e) => {
                out.reports.push(EngineReport { engine: name.to_string(), ok: true, detail: e.model_id(), providers: vec![] });
                out.engines.push(e);
                model_engine_ok |= name.needs_model();
            }
            Err(err) => {
                tracing::warn!(engine = %name, error = %err, "engine unavailable; trying the next one");
                out.reports.push(EngineReport { engine: name.to_string(), ok: false, detail: err.to_string(), providers: vec![] });
            }
        }
    }
    if out.engines.is_empty() {
        let why: Vec<String> = out.reports.iter().map(|r| r.detail.clone()).collect();
        return Err(format!("no restoration engine can run: {}", why.join("; ")));
    }
    // A model package loaded but no engine can run it: the Gaussian must not
    // stand in for the model (it moves lesion SUVs by 5-17 %; run_engines
    // refuses the same substitution at run time), and without a model
    // engine the model's tracer and duration rules would not apply either.
    if let Some(p) = pkg.as_ref().filter(|_| !model_engine_ok) {
        let why: Vec<String> = out.reports.iter().filter(|r| !r.ok).map(|r| format!("{}: {}", r.engine, r.detail)).collect();
        return Err(format!(
            "the model package {} loaded, but no engine can run it ({}); the Gaussian does not stand in for the model: \
             fix the engine named, or set restore.engines = [\"gaussian\"] to run the Gaussian alone on purpose",
            p.model_id(),
            why.join("; ")
        ));
    }
    Ok(out)
}

/// Scale the package's σ by a site calibration file; returns its number of
/// pairs. A file that does not fit (unreadable, damaged, fitted for another
/// model, or a package without `[uncertainty]`) is an error the caller
/// reports and leaves out: σ is a reading aid, never a reason not to
/// restore, and a model update must not take the box down.
pub fn with_site_uncertainty(p: &mut model::ModelPackage, path: &std::path::Path) -> Result<usize, String> {
    let id = p.model_id();
    let cal = p.uncertainty.as_mut().ok_or("the model package has no [uncertainty] calibration to scale")?;
    let site = uncertainty::SiteCalibration::load(path)?;
    site.check(&id, cal)?;
    cal.site_scale = site.scale;
    Ok(site.pairs.len())
}

/// What [`run_engines`] returns: the restored volume, the network's
/// variance output where the engine gave one, the engine that made them,
/// and the failures of the engines tried before it.
pub type EngineRun = (Volume, Option<Volume>, std::sync::Arc<dyn Engine>, Vec<String>);

/// Run the first engine that succeeds; report each failure on the way
/// (the failures are returned with the result so the job records them).
/// Once an engine with a model has failed on the volume, engines without
/// one (the Gaussian) are not run in its place: their output is not the
/// model's restoration (the Gaussian moves lesion SUVs), so the series
/// fails and the original is forwarded (`restore.forward_original_on_failure`).
pub fn run_engines(engines: &[std::sync::Arc<dyn Engine>], v: &Volume) -> Result<EngineRun, String> {
    let mut errors = Vec::new();
    let mut model_failed = false;
    for e in engines {
        let has_model = e.tracers().is_some();
        if model_failed && !has_model {
            tracing::warn!(engine = e.name(), "not run in place of the model's engines");
            errors.push(format!("engine {} not run in place of the model (it has none)", e.name()));
            continue;
        }
        match e.run_with_variance(v) {
            // never derived from: an engine's NaN or infinity would be
            // written as 0 (or a Rescale Slope of "inf")
            Ok((out, var)) if out.data.iter().chain(var.iter().flat_map(|v| v.data.iter())).any(|x| !x.is_finite()) => {
                tracing::warn!(engine = e.name(), "engine returned non-finite values; falling back to the next one");
                errors.push(format!("engine {} returned non-finite values", e.name()));
                model_failed |= has_model;
            }
            Ok((out, var)) => return Ok((out, var, e.clone(), errors)),
            Err(err) => {
                tracing::warn!(engine = e.name(), error = %err, "engine failed; falling back to the next one");
                errors.push(err.to_string());
                model_failed |= has_model;
            }
        }
    }
    Err(errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_MODEL_DIR, Settings};

    /// An engine whose output has a NaN in it.
    struct Broken;
    impl Engine for Broken {
        fn name(&self) -> &str {
            "broken"
        }
        fn model_id(&self) -> String {
            "broken".into()
        }
        fn check(&self) -> Result<(), EngineError> {
            Ok(())
        }
        fn run(&self, input: &Volume) -> Result<Volume, EngineError> {
            let mut v = input.clone();
            v.data[3] = f32::NAN;
            Ok(v)
        }
    }

    #[test]
    fn an_engine_output_with_a_nan_is_never_used() {
        let v = Volume { nx: 8, ny: 8, nz: 4, spacing: [4.0, 4.0, 4.0], data: vec![1.0; 256], frame_duration_s: Some(30.0) };
        let gauss: std::sync::Arc<dyn Engine> = std::sync::Arc::new(gaussian::Gaussian::new(6.0));
        let (out, _, e, errors) = run_engines(&[std::sync::Arc::new(Broken), gauss], &v).unwrap();
        assert_eq!(e.name(), "gaussian");
        assert!(out.data.iter().all(|x| x.is_finite()));
        assert_eq!(errors, ["engine broken returned non-finite values"]);
        let only = run_engines(&[std::sync::Arc::new(Broken)], &v).map(|_| ()).unwrap_err();
        assert!(only.contains("non-finite"), "{only}");
    }

    #[test]
    fn without_an_installed_model_the_defaults_restore_with_gaussian_and_say_so() {
        assert!(
            !std::path::Path::new(DEFAULT_MODEL_DIR).exists(),
            "this test needs a machine without the installed package at {DEFAULT_MODEL_DIR}"
        );
        let s = Settings::defaults();
        let e = engines_from_settings(&s).unwrap();
        assert_eq!(e.engines.iter().map(|e| e.name()).collect::<Vec<_>>(), ["gaussian"]);
        let down: Vec<_> = e.reports.iter().filter(|r| !r.ok).collect();
        assert_eq!(down.iter().map(|r| r.engine.as_str()).collect::<Vec<_>>(), ["ort", "tract"]);
        assert!(down[0].detail.contains("no model package installed") && down[0].detail.contains("--model"), "{}", down[0].detail);
        // a package named anywhere else must exist
        let mut s = Settings::defaults();
        s.restore.model = "/nonexistent/petrestore-model".into();
        let err = engines_from_settings(&s).err().expect("refused");
        assert!(err.contains("/nonexistent/petrestore-model"), "{err}");
        // only neural engines and nothing installed: nothing can run, and it says why
        let mut s = Settings::defaults();
        s.restore.engines = vec![crate::config::EngineKind::Tract];
        let err = engines_from_settings(&s).err().expect("refused");
        assert!(err.contains("no model package installed"), "{err}");
    }
}
