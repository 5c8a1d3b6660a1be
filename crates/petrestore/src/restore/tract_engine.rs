//! The tract engine: pure Rust, always available, the embedded default.
//! The ONNX graph is parsed once; for every input shape (batch, height,
//! width) a shape-concretised, optimised plan is built once and reused
//! across slices and series. Parallelism is over batches: `threads` workers
//! each run whole batches through the shared plan single-threaded (tract's
//! own multithreaded matmul scaled poorly on these small convolutions:
//! 40 → 44 slices/s from 1 to 2 threads at 192², see BENCHMARKS.md).

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
    plans: Mutex<HashMap<(usize, usize, usize), Plan>>,
    workers: usize,
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
        Ok(TractEngine { pkg, model, plans: Mutex::new(HashMap::new()), workers })
    }

    fn plan(&self, b: usize, c: usize, h: usize, w: usize) -> TractResult<Plan> {
        if let Some(p) = self.plans.lock().expect("plan cache").get(&(b, h, w)) {
            return Ok(p.clone());
        }
        let plan = self
            .model
            .clone()
            .with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), tvec![b, c, h, w]))?
            .into_optimized()?
            .into_runnable()?;
        self.plans.lock().expect("plan cache").insert((b, h, w), plan.clone());
        Ok(plan)
    }
}

impl Backend for TractEngine {
    fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
        self.infer_with_variance(input, b, c, h, w).map(|(y, _)| y)
    }
    fn infer_with_variance(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
        let plan = self.plan(b, c, h, w).map_err(|e| format!("cannot prepare the model for {b}x{c}x{h}x{w}: {e:#}"))?;
        let tensor = Tensor::from_shape(&[b, c, h, w], input).map_err(|e| e.to_string())?;
        let out = plan.run(tvec!(tensor.into())).map_err(|e| format!("{e:#}"))?;
        let take = |k: usize| -> Result<Vec<f32>, String> {
            Ok(out[k].to_plain_array_view::<f32>().map_err(|e| e.to_string())?.iter().copied().collect())
        };
        // outputs in the graph's order: `io.output`, then `io.variance` (checked at load)
        Ok((take(0)?, if self.pkg.io.variance.is_some() && out.len() > 1 { Some(take(1)?) } else { None }))
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
