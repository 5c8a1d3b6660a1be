//! The ONNX Runtime engine, loaded at run time from a libonnxruntime shared
//! library (ort's `load-dynamic`: nothing is downloaded at build time). On
//! the Jetson the execution providers are tried in configured order —
//! TensorRT (FP16, engine cache under the state directory so the first-start
//! build is paid once), CUDA, CPU — each registered on its own with
//! `error_on_failure`, so a provider that cannot load is logged with its
//! reason and the next one is tried: the fallback is explicit, never ort's
//! silent default.

use crate::config::Provider;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::Session;
use ort::value::TensorRef;

use super::model::ModelPackage;
use super::neural::{Backend, restore_volume, restore_volume_with_variance, smoke_test};
use super::{Engine, EngineError, Volume};

/// ONNX Runtime settings (from `[restore]`).
#[derive(Debug, Clone)]
pub struct OrtOptions {
    /// Path of libonnxruntime; `None`: `ORT_DYLIB_PATH`, else `libonnxruntime.so`.
    pub library: Option<PathBuf>,
    /// Execution providers in order of preference.
    pub providers: Vec<Provider>,
    pub tensorrt_fp16: bool,
    pub tensorrt_workspace_mb: usize,
    /// TensorRT engine cache folder.
    pub cache_dir: PathBuf,
    /// Intra-op threads; 0 = one per core.
    pub threads: usize,
}

/// What happened to each provider when the session was made.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProviderReport {
    pub provider: String,
    pub ok: bool,
    pub reason: Option<String>,
}

pub struct OrtEngine {
    pkg: ModelPackage,
    session: Mutex<Session>,
    /// For a package with a variance output: the same graph cut to R's
    /// output, for the runs that need R alone (test-time augmentation's
    /// flipped passes). ONNX Runtime computes every node of a graph whatever
    /// outputs a run asks for, so only a graph without the head skips it.
    restore_only: Option<Mutex<Session>>,
    _env: ort::environment::Environment,
    /// The provider in use and why the ones before it were skipped.
    pub providers: Vec<ProviderReport>,
}

fn unavailable(reason: impl ToString) -> EngineError {
    EngineError::Unavailable { engine: "ort".into(), reason: reason.to_string() }
}

/// Resolve the library path the way the docs say.
pub fn library_path(opt: Option<&Path>) -> PathBuf {
    opt.map(Path::to_owned)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
}

fn dispatch(p: Provider, o: &OrtOptions) -> ExecutionProviderDispatch {
    match p {
        Provider::TensorRt => ep::TensorRT::default()
            .with_fp16(o.tensorrt_fp16)
            .with_engine_cache(true)
            .with_engine_cache_path(o.cache_dir.display().to_string())
            .with_timing_cache(true)
            .with_timing_cache_path(o.cache_dir.display().to_string())
            .with_max_workspace_size(o.tensorrt_workspace_mb * 1024 * 1024)
            .build()
            .error_on_failure(),
        Provider::Cuda => ep::CUDA::default().build().error_on_failure(),
        Provider::Cpu => ep::CPU::default().build().error_on_failure(),
    }
}

/// ONNX Runtime allows one library and one environment per process: both
/// are made once and shared by every engine built later (a config reload,
/// the tests).
static ENVIRONMENT: Mutex<Option<(PathBuf, ort::environment::Environment)>> = Mutex::new(None);

fn environment(lib: &Path) -> Result<ort::environment::Environment, EngineError> {
    let mut g = ENVIRONMENT.lock().map_err(|_| unavailable("ONNX Runtime environment lock poisoned"))?;
    if let Some((loaded, env)) = g.as_ref() {
        if loaded == lib {
            return Ok(env.clone());
        }
        return Err(unavailable(format!(
            "ONNX Runtime is already loaded from {} in this process and cannot also load {}",
            loaded.display(),
            lib.display()
        )));
    }
    let env = ort::init_from(lib)
        .map_err(|e| {
            unavailable(format!("cannot load ONNX Runtime from {}: {e}; set restore.ort_library or ORT_DYLIB_PATH", lib.display()))
        })?
        .with_name("petrestore")
        .build()
        .map_err(|e| unavailable(format!("cannot start ONNX Runtime: {e}")))?;
    *g = Some((lib.to_owned(), env.clone()));
    Ok(env)
}

/// Can this process load ONNX Runtime from `lib` (found, loadable, an API
/// this build speaks)? Builds no session (a TensorRT engine build can take
/// minutes), so `check-config` can ask it.
pub fn check_library(lib: &Path) -> Result<(), EngineError> {
    environment(lib).map(|_| ())
}

impl OrtEngine {
    pub fn new(pkg: ModelPackage, o: &OrtOptions) -> Result<OrtEngine, EngineError> {
        let lib = library_path(o.library.as_deref());
        let env = environment(&lib)?;
        if o.providers.contains(&Provider::TensorRt) {
            let _ = std::fs::create_dir_all(&o.cache_dir);
        }
        let threads = if o.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { o.threads };
        let mut reports = Vec::new();
        let session = |p: Provider, model: Option<&[u8]>| -> Result<Session, String> {
            let mut builder = Session::builder(&env)
                .map_err(|e| e.to_string())?
                .with_no_environment_execution_providers()
                .map_err(|e| e.to_string())?
                .with_execution_providers([dispatch(p, o)])
                .map_err(|e| e.to_string())?
                .with_intra_threads(threads)
                .map_err(|e| e.to_string())?
                // spinning threads steal the other core on a 2-core box
                .with_intra_op_spinning(false)
                .map_err(|e| e.to_string())?;
            match model {
                Some(bytes) => builder.commit_from_memory(bytes),
                None => builder.commit_from_file(&pkg.onnx_path),
            }
            .map_err(|e| e.to_string())
        };
        for &p in &o.providers {
            let name = p.name();
            match session(p, None) {
                Ok(full) => {
                    tracing::info!(provider = %name, library = %lib.display(), "ONNX Runtime session ready");
                    reports.push(ProviderReport { provider: name.into(), ok: true, reason: None });
                    // Without it every run computes the head: slower, same results.
                    let restore_only = pkg.io.variance.as_ref().and_then(|_| {
                        match graph_cut_to(&pkg.onnx_path, &pkg.io.output).and_then(|bytes| session(p, Some(&bytes))) {
                            Ok(s) => Some(Mutex::new(s)),
                            Err(reason) => {
                                tracing::warn!(%reason, "cannot build the graph without the σ head; every run computes it");
                                None
                            }
                        }
                    });
                    return Ok(OrtEngine { pkg, session: Mutex::new(full), restore_only, _env: env, providers: reports });
                }
                Err(reason) => {
                    tracing::warn!(provider = %name, %reason, "execution provider unavailable; trying the next one");
                    reports.push(ProviderReport { provider: name.into(), ok: false, reason: Some(reason) });
                }
            }
        }
        let why: Vec<String> = reports.iter().map(|r| format!("{}: {}", r.provider, r.reason.clone().unwrap_or_default())).collect();
        Err(unavailable(format!("no execution provider could run the model ({})", why.join("; "))))
    }

    /// Whether runs that need R alone skip the σ head (a second session of
    /// the graph cut to R's output; packages with `io.variance`).
    pub fn skips_head_for_r_alone(&self) -> bool {
        self.restore_only.is_some()
    }

    /// The provider the session runs on.
    pub fn provider(&self) -> &str {
        self.providers.iter().find(|r| r.ok).map(|r| r.provider.as_str()).unwrap_or("none")
    }
}

/// The ONNX graph in `path` cut to what `output` needs: the nodes that do
/// not lead to it, their initialisers and every other graph output removed.
/// Refused for graphs with subgraphs (If, Loop), whose outer references a
/// cut could break.
pub fn graph_cut_to(path: &Path, output: &str) -> Result<Vec<u8>, String> {
    use prost::Message;
    use std::collections::HashSet;
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut model = tract_onnx::pb::ModelProto::decode(&bytes[..]).map_err(|e| format!("{}: {e}", path.display()))?;
    let graph = model.graph.as_mut().ok_or_else(|| format!("{}: no graph", path.display()))?;
    if !graph.output.iter().any(|o| o.name == output) {
        return Err(format!("{}: no output {output:?}", path.display()));
    }
    let mut needed: HashSet<String> = HashSet::from([output.to_string()]);
    let mut keep = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            if node.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
                return Err(format!("{}: node {:?} has a subgraph", path.display(), node.name));
            }
            keep[i] = true;
            needed.extend(node.input.iter().filter(|n| !n.is_empty()).cloned());
        }
    }
    let mut k = keep.into_iter();
    graph.node.retain(|_| k.next().unwrap_or(false));
    graph.output.retain(|o| o.name == output);
    graph.initializer.retain(|t| needed.contains(&t.name));
    graph.value_info.retain(|v| needed.contains(&v.name));
    Ok(model.encode_to_vec())
}

/// One run of `session` on `[b, c, h, w]`, the named outputs in order.
fn run_session(
    session: &Mutex<Session>,
    input_name: &str,
    input: &[f32],
    shape: [usize; 4],
    names: &[&str],
) -> Result<Vec<Vec<f32>>, String> {
    let tensor = TensorRef::from_array_view((shape, input)).map_err(|e| e.to_string())?;
    let mut session = session.lock().map_err(|_| "session lock poisoned".to_string())?;
    let outputs = session.run(ort::inputs![input_name => tensor]).map_err(|e| e.to_string())?;
    names
        .iter()
        .map(|name| {
            let out = outputs.get(name).ok_or_else(|| format!("model has no output {name:?}"))?;
            Ok(out.try_extract_tensor::<f32>().map_err(|e| e.to_string())?.1.to_vec())
        })
        .collect()
}

impl Backend for OrtEngine {
    fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
        let session = self.restore_only.as_ref().unwrap_or(&self.session);
        let mut out = run_session(session, &self.pkg.io.input, input, [b, c, h, w], &[&self.pkg.io.output])?;
        Ok(out.remove(0))
    }
    fn infer_with_variance(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
        let mut names = vec![self.pkg.io.output.as_str()];
        names.extend(self.pkg.io.variance.as_deref());
        let mut out = run_session(&self.session, &self.pkg.io.input, input, [b, c, h, w], &names)?.into_iter();
        let y = out.next().ok_or("no output")?;
        Ok((y, out.next()))
    }
}

impl Engine for OrtEngine {
    fn name(&self) -> &str {
        "ort"
    }
    fn label(&self) -> String {
        format!("ort/{}", self.provider())
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
        smoke_test(self, &self.pkg).map_err(unavailable)
    }
    fn run(&self, input: &Volume) -> Result<Volume, EngineError> {
        // one session, ONNX Runtime parallelises inside each call
        restore_volume(input, &self.pkg, self, 1).map_err(|reason| EngineError::Failed { engine: "ort".into(), reason })
    }
    fn run_with_variance(&self, input: &Volume) -> Result<(Volume, Option<Volume>), EngineError> {
        restore_volume_with_variance(input, &self.pkg, self, 1).map_err(|reason| EngineError::Failed { engine: "ort".into(), reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    /// The shipped package: a restoration output and a σ head's variance.
    fn shipped() -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d/model.onnx")
    }

    fn run(model: InferenceModel, x: &Tensor) -> TVec<TValue> {
        let s = x.shape().to_vec();
        model
            .with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), tvec![s[0], s[1], s[2], s[3]]))
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(tvec!(x.clone().into()))
            .unwrap()
    }

    #[test]
    fn the_graph_cut_to_the_output_computes_it_without_the_head() {
        use prost::Message;
        let full_bytes = std::fs::read(shipped()).unwrap();
        let full = tract_onnx::pb::ModelProto::decode(&full_bytes[..]).unwrap().graph.unwrap();
        assert_eq!(full.output.len(), 2, "the shipped graph has R and the variance");
        let cut_bytes = graph_cut_to(&shipped(), "output").unwrap();
        let cut = tract_onnx::pb::ModelProto::decode(&cut_bytes[..]).unwrap().graph.unwrap();
        assert_eq!(cut.output.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["output"]);
        assert!(cut.node.len() < full.node.len() && cut.initializer.len() < full.initializer.len());
        assert!(!cut.node.iter().any(|n| n.output.iter().any(|o| o == "variance")));
        // every input a kept node reads is made by a kept node, an initialiser or the graph input
        let made: std::collections::HashSet<&str> = cut
            .node
            .iter()
            .flat_map(|n| n.output.iter())
            .chain(cut.initializer.iter().map(|t| &t.name))
            .chain(cut.input.iter().map(|i| &i.name))
            .map(String::as_str)
            .collect();
        for n in &cut.node {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                assert!(made.contains(i.as_str()), "node {:?} reads {i:?}, which the cut graph does not make", n.name);
            }
        }
        // the same R, bit for bit, from the cut graph
        let (c, h, w) = (9, 32, 32);
        let data: Vec<f32> = (0..c * h * w).map(|k| 0.5 + ((k * 7919) % 101) as f32 / 101.0).collect();
        let x = Tensor::from_shape(&[1, c, h, w], &data).unwrap();
        let a = run(tract_onnx::onnx().model_for_read(&mut &full_bytes[..]).unwrap(), &x);
        let b = run(tract_onnx::onnx().model_for_read(&mut &cut_bytes[..]).unwrap(), &x);
        assert_eq!(b.len(), 1);
        assert_eq!(a[0].to_plain_array_view::<f32>().unwrap(), b[0].to_plain_array_view::<f32>().unwrap());
        // an output the graph does not have is refused
        let err = graph_cut_to(&shipped(), "restored").unwrap_err();
        assert!(err.contains("no output \"restored\""), "{err}");
    }
}
