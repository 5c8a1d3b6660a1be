//! The tract engine: pure Rust, always available, the embedded default.
//! The ONNX graph is parsed once; for every input shape (batch, height,
//! width) a shape-concretised, optimised plan is built once and reused
//! across slices and series. Parallelism is over batches: `threads` workers
//! each run whole batches through the shared plan single-threaded (tract's
//! own multithreaded matmul scaled poorly on these small convolutions:
//! 40 → 44 slices/s from 1 to 2 threads at 192², see BENCHMARKS.md). For a
//! package with a σ head, runs that need R alone use the graph cut to R's
//! output (`model::graph_cut_to`), so they skip the head.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;

use super::model::ModelPackage;
use super::neural::{Backend, restore_volume, restore_volume_with_variance, smoke_test};
use super::{Engine, EngineError, Volume};

type Plan = Arc<TypedRunnableModel>;

pub struct TractEngine {
    pkg: ModelPackage,
    model: InferenceModel,
    /// For a package with a variance output: the graph cut to R's output,
    /// for the runs that need R alone (test-time augmentation's flipped
    /// passes), so they skip the σ head.
    restore_only: Option<InferenceModel>,
    /// Plans per (R alone, batch, height, width).
    plans: Mutex<HashMap<(bool, usize, usize, usize), Plan>>,
    workers: usize,
    /// Positions of `io.output` and `io.variance` among the graph's outputs,
    /// found by name (as ONNX Runtime finds them), never assumed.
    output_at: usize,
    variance_at: Option<usize>,
}

fn err(reason: impl ToString) -> EngineError {
    EngineError::Failed { engine: "tract".into(), reason: reason.to_string() }
}

impl TractEngine {
    /// Parse the model; `threads` = 0 means one per core.
    pub fn new(pkg: ModelPackage, threads: usize) -> Result<TractEngine, EngineError> {
        let model = tract_onnx::onnx().model_for_path(&pkg.onnx_path).map_err(|e| EngineError::Unavailable {
            engine: "tract".into(),
            reason: format!("cannot parse {}: {e:#}", pkg.onnx_path.display()),
        })?;
        let workers = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
        let names: Vec<String> =
            model.output_outlets().map_err(err)?.iter().map(|o| model.outlet_label(*o).unwrap_or_default().to_string()).collect();
        let at = |name: &str| {
            names.iter().position(|n| n == name).ok_or_else(|| EngineError::Unavailable {
                engine: "tract".into(),
                reason: format!("{} has no output {name:?} (model.toml [io]); its outputs are {names:?}", pkg.onnx_path.display()),
            })
        };
        let output_at = at(&pkg.io.output)?;
        let variance_at = pkg.io.variance.as_deref().map(at).transpose()?;
        // Without it every run computes the head: slower, same results.
        let restore_only = pkg.io.variance.as_ref().and_then(|_| {
            let cut = super::model::graph_cut_to(&pkg.onnx_path, &pkg.io.output)
                .and_then(|bytes| tract_onnx::onnx().model_for_read(&mut &bytes[..]).map_err(|e| format!("{e:#}")));
            cut.map_err(|reason| tracing::warn!(%reason, "cannot build the graph without the σ head; every run computes it")).ok()
        });
        Ok(TractEngine { pkg, model, restore_only, plans: Mutex::new(HashMap::new()), workers, output_at, variance_at })
    }

    /// Whether runs that need R alone skip the σ head (packages with `io.variance`).
    pub fn skips_head_for_r_alone(&self) -> bool {
        self.restore_only.is_some()
    }

    fn plan(&self, r_alone: bool, b: usize, c: usize, h: usize, w: usize) -> TractResult<Plan> {
        // one plan for both kinds of run where there is no cut graph
        let r_alone = r_alone && self.restore_only.is_some();
        let key = (r_alone, b, h, w);
        if let Some(p) = self.plans.lock().expect("plan cache").get(&key) {
            return Ok(p.clone());
        }
        let model = if r_alone { self.restore_only.as_ref().unwrap_or(&self.model) } else { &self.model };
        let plan = model
            .clone()
            .with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), tvec![b, c, h, w]))?
            .into_optimized()?
            .into_runnable()?;
        self.plans.lock().expect("plan cache").insert(key, plan.clone());
        Ok(plan)
    }
}

impl Backend for TractEngine {
    fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
        self.run_plan(true, input, [b, c, h, w]).map(|(y, _)| y)
    }
    fn infer_with_variance(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
        self.run_plan(false, input, [b, c, h, w])
    }
}

impl TractEngine {
    /// One run: R, and the variance where the plan has it (`r_alone` picks
    /// the graph without the σ head where there is one).
    fn run_plan(&self, r_alone: bool, input: &[f32], [b, c, h, w]: [usize; 4]) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
        let plan = self.plan(r_alone, b, c, h, w).map_err(|e| format!("cannot prepare the model for {b}x{c}x{h}x{w}: {e:#}"))?;
        let tensor = Tensor::from_shape(&[b, c, h, w], input).map_err(|e| e.to_string())?;
        let out = plan.run(tvec!(tensor.into())).map_err(|e| format!("{e:#}"))?;
        let take = |k: usize| -> Result<Vec<f32>, String> {
            Ok(out[k].to_plain_array_view::<f32>().map_err(|e| e.to_string())?.iter().copied().collect())
        };
        // the graph cut for R alone has R as its only output; the whole
        // graph has both, at the positions their names were found at load
        let single = out.len() == 1;
        let r = take(if single { 0 } else { self.output_at })?;
        Ok((r, if single { None } else { self.variance_at.map(take).transpose()? }))
    }
}

impl Engine for TractEngine {
    fn name(&self) -> &str {
        "tract"
    }
    fn notice(&self) -> Option<String> {
        self.pkg.notice()
    }
    fn model_id(&self) -> String {
        self.pkg.model_id()
    }
    fn tracers(&self) -> Option<Vec<String>> {
        Some(self.pkg.selection.tracers.clone())
    }
    fn frame_durations(&self) -> Option<[f64; 2]> {
        Some(self.pkg.selection.frame_durations_s)
    }
    fn pixel_mm(&self) -> Option<[f64; 2]> {
        self.pkg.selection.pixel_mm
    }
    fn context_slices(&self) -> Option<usize> {
        Some(self.pkg.io.context_slices)
    }
    fn uncertainty(&self) -> Option<super::uncertainty::Calibration> {
        self.pkg.uncertainty.clone()
    }
    fn check(&self) -> Result<(), EngineError> {
        smoke_test(self, &self.pkg).map_err(|reason| EngineError::Unavailable { engine: "tract".into(), reason })
    }
    fn run(&self, input: &Volume) -> Result<Volume, EngineError> {
        restore_volume(input, &self.pkg, self, self.workers).map_err(err)
    }
    fn run_with_variance(&self, input: &Volume) -> Result<(Volume, Option<Volume>), EngineError> {
        restore_volume_with_variance(input, &self.pkg, self, self.workers).map_err(err)
    }
}
