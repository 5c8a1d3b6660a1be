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
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Fold each series' texture descriptors into the graph on the CPU
    /// provider (`Folding`); false runs every pass on the package's graph
    /// as it is (the benchmarks' "before").
    pub fold_texture: bool,
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
    /// On the CPU provider, for a package with texture descriptors: the
    /// graphs with each series' texture folded into the biases.
    folding: Option<Folding>,
    _env: ort::environment::Environment,
    /// TensorRT builds its engines in half precision (`restore.tensorrt_fp16`):
    /// other pixels than fp32, so the label (and the derived UIDs) say so.
    fp16: bool,
    /// The provider in use and why the ones before it were skipped.
    pub providers: Vec<ProviderReport>,
}

fn unavailable(reason: impl ToString) -> EngineError {
    EngineError::Unavailable { engine: "ort".into(), reason: reason.to_string() }
}

/// The library names looked up by the dynamic loader when neither
/// `restore.ort_library` nor `ORT_DYLIB_PATH` names a file: the development
/// link first, then the SONAME, which is all a runtime package (a Yocto
/// image without `-dev` packages) installs.
pub const DEFAULT_LIBRARIES: [&str; 2] = ["libonnxruntime.so", "libonnxruntime.so.1"];

/// Resolve the library path the way the docs say (with no setting, the
/// first of [`DEFAULT_LIBRARIES`]; [`check_library`] and the engine try the
/// next one when it does not load).
pub fn library_path(opt: Option<&Path>) -> PathBuf {
    opt.map(Path::to_owned)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LIBRARIES[0]))
}

fn is_default(lib: &Path) -> bool {
    DEFAULT_LIBRARIES.iter().any(|n| lib == Path::new(n))
}

/// The TensorRT cache folder of one graph: `cache_dir/<first 16 hex digits
/// of the graph's SHA-256>`. ONNX Runtime names a cached engine by the
/// graph's structure and names, not its weights, and a TensorRT engine
/// carries the weights inside it: in one shared folder, a model with new
/// weights and the same structure would run the old engine. Each graph
/// (a new model, the graph cut to R) therefore gets its own folder.
pub fn graph_cache_dir(cache_dir: &Path, graph: &[u8]) -> PathBuf {
    use sha2::Digest;
    let h = sha2::Sha256::digest(graph);
    cache_dir.join(h[..8].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn dispatch(p: Provider, o: &OrtOptions, graph: &[u8]) -> ExecutionProviderDispatch {
    match p {
        Provider::TensorRt => {
            let dir = graph_cache_dir(&o.cache_dir, graph);
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot create the TensorRT cache folder; engines are built at every start");
            }
            trt(o, &dir)
        }
        Provider::Cuda => ep::CUDA::default().build().error_on_failure(),
        Provider::Cpu => ep::CPU::default().build().error_on_failure(),
    }
}

fn trt(o: &OrtOptions, dir: &Path) -> ExecutionProviderDispatch {
    ep::TensorRT::default()
        .with_fp16(o.tensorrt_fp16)
        .with_engine_cache(true)
        .with_engine_cache_path(dir.display().to_string())
        .with_timing_cache(true)
        .with_timing_cache_path(dir.display().to_string())
        .with_max_workspace_size(o.tensorrt_workspace_mb * 1024 * 1024)
        .build()
        .error_on_failure()
}

/// ONNX Runtime allows one library and one environment per process: both
/// are made once and shared by every engine built later (a config reload,
/// the tests).
static ENVIRONMENT: Mutex<Option<(PathBuf, ort::environment::Environment)>> = Mutex::new(None);

fn environment(lib: &Path) -> Result<ort::environment::Environment, EngineError> {
    let mut g = ENVIRONMENT.lock().map_err(|_| unavailable("ONNX Runtime environment lock poisoned"))?;
    if let Some((loaded, env)) = g.as_ref() {
        if loaded == lib || (is_default(loaded) && is_default(lib)) {
            return Ok(env.clone());
        }
        return Err(unavailable(format!(
            "ONNX Runtime is already loaded from {} in this process and cannot also load {}",
            loaded.display(),
            lib.display()
        )));
    }
    // with no setting, each default name in turn
    let candidates: Vec<PathBuf> =
        if lib == Path::new(DEFAULT_LIBRARIES[0]) { DEFAULT_LIBRARIES.iter().map(PathBuf::from).collect() } else { vec![lib.to_owned()] };
    let mut errors = Vec::new();
    for c in &candidates {
        match ort::init_from(c) {
            Ok(b) => {
                let env = b.with_name("petrestore").build().map_err(|e| unavailable(format!("cannot start ONNX Runtime: {e}")))?;
                *g = Some((c.clone(), env.clone()));
                return Ok(env);
            }
            Err(e) => errors.push(format!("{}: {e}", c.display())),
        }
    }
    Err(unavailable(format!("cannot load ONNX Runtime from {}; set restore.ort_library or ORT_DYLIB_PATH", errors.join("; nor from "))))
}

/// Can this process load ONNX Runtime from `lib` (found, loadable, an API
/// this build speaks)? Builds no session (a TensorRT engine build can take
/// minutes), so `check-config` can ask it.
pub fn check_library(lib: &Path) -> Result<(), EngineError> {
    environment(lib).map(|_| ())
}

/// The library the process loaded ONNX Runtime from, once it did.
pub fn loaded_library() -> Option<PathBuf> {
    ENVIRONMENT.lock().ok().and_then(|g| g.as_ref().map(|(p, _)| p.clone()))
}

impl OrtEngine {
    pub fn new(pkg: ModelPackage, o: &OrtOptions) -> Result<OrtEngine, EngineError> {
        let lib = library_path(o.library.as_deref());
        let env = environment(&lib)?;
        let threads = if o.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { o.threads };
        let mut reports = Vec::new();
        // the package's graph, read once, and (for a package with a σ head)
        // the same graph cut to R
        let graph = std::fs::read(&pkg.onnx_path).map_err(|e| unavailable(format!("{}: {e}", pkg.onnx_path.display())))?;
        let cut = pkg.io.variance.as_ref().map(|_| super::model::graph_cut(&graph, &pkg.io.output));
        let session = |p: Provider, bytes: &[u8]| make_session(&env, o, threads, p, bytes);
        for &p in &o.providers {
            let name = p.name();
            match session(p, &graph) {
                Ok(full) => {
                    tracing::info!(provider = %name, library = %lib.display(), "ONNX Runtime session ready");
                    reports.push(ProviderReport { provider: name.into(), ok: true, reason: None });
                    // Without it every run computes the head: slower, same results.
                    let restore_only = cut.as_ref().and_then(|cut| match cut.clone().and_then(|bytes| session(p, &bytes)) {
                        Ok(s) => Some(Mutex::new(s)),
                        Err(reason) => {
                            tracing::warn!(%reason, "cannot build the graph without the σ head; every run computes it");
                            None
                        }
                    });
                    let folding = (o.fold_texture && p == Provider::Cpu && !pkg.io.texture.is_empty())
                        .then(|| {
                            let cut = restore_only.as_ref().and(cut.as_ref()).and_then(|c| c.as_ref().ok()).cloned();
                            Folding::new(&pkg, graph.clone(), cut, env.clone(), o.clone(), threads)
                        })
                        .and_then(|f| {
                            f.map_err(|reason| tracing::warn!(%reason, "cannot fold the texture into the graph; every pass adds it")).ok()
                        });
                    if folding.is_some() {
                        tracing::info!("each series' texture descriptors are folded into the graph's biases (CPU provider)");
                    }
                    return Ok(OrtEngine {
                        pkg,
                        session: Mutex::new(full),
                        restore_only,
                        folding,
                        _env: env,
                        fp16: p == Provider::TensorRt && o.tensorrt_fp16,
                        providers: reports,
                    });
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

    /// Whether runs that need R alone skip the σ head (a second ONNX Runtime copy of
    /// the graph cut to R's output; packages with `io.variance`).
    pub fn skips_head_for_r_alone(&self) -> bool {
        self.restore_only.is_some()
    }

    /// Whether each series runs on a graph with its texture folded into the
    /// biases (CPU provider, textured package; [`model::graph_with_texture`]).
    pub fn folds_texture(&self) -> bool {
        self.folding.is_some()
    }

    /// The provider the session runs on.
    pub fn provider(&self) -> &str {
        self.providers.iter().find(|r| r.ok).map(|r| r.provider.as_str()).unwrap_or("none")
    }
}

fn make_session(env: &ort::environment::Environment, o: &OrtOptions, threads: usize, p: Provider, bytes: &[u8]) -> Result<Session, String> {
    Session::builder(env)
        .map_err(|e| e.to_string())?
        .with_no_environment_execution_providers()
        .map_err(|e| e.to_string())?
        .with_execution_providers([dispatch(p, o, bytes)])
        .map_err(|e| e.to_string())?
        .with_intra_threads(threads)
        .map_err(|e| e.to_string())?
        // spinning threads steal the other core on a 2-core box
        .with_intra_op_spinning(false)
        .map_err(|e| e.to_string())?
        .commit_from_memory(bytes)
        .map_err(|e| e.to_string())
}

/// Series whose folded graphs are kept (most recently used). The daemon
/// restores one study at a time and a series runs all its passes before
/// the next, so one is enough; more would each keep their own activation
/// memory in ONNX Runtime. Callers that interleave series stay correct and
/// pay a few milliseconds per switch.
const FOLDED_KEPT: usize = 1;

/// The texture folded into the graph, per series. A series' descriptors are
/// constant channels of every input (`neural::restore_volume`), so the
/// 1×1 convolutions that turn them into biases compute the same numbers on
/// every pass; folded once into the convolutions' own biases, ONNX Runtime
/// fuses each convolution with its ReLU again (BENCHMARKS.md, "The texture
/// folded into the graph"). Made on the first pass of a series (a few
/// milliseconds per graph); any input it cannot key (batch items with
/// different descriptors) runs on the package's graph as before.
struct Folding {
    graph: Vec<u8>,
    /// The graph cut to R, for packages with a σ head.
    cut: Option<Vec<u8>>,
    first: usize,
    count: usize,
    env: ort::environment::Environment,
    options: OrtOptions,
    threads: usize,
    /// Set when a series' graph could not be made: every later pass runs
    /// the package's graph rather than retry (and warn) on each.
    given_up: AtomicBool,
    kept: Mutex<Vec<Folded>>,
}

struct Folded {
    key: Vec<u32>,
    full: Session,
    restore_only: Option<Session>,
}

impl Folding {
    fn new(
        pkg: &ModelPackage,
        graph: Vec<u8>,
        cut: Option<Vec<u8>>,
        env: ort::environment::Environment,
        options: OrtOptions,
        threads: usize,
    ) -> Result<Folding, String> {
        let count = pkg.io.texture.len();
        // the graph must fold (any descriptors: the structure is what is checked)
        super::model::graph_with_texture(&graph, &vec![0.0; count])?;
        let first = pkg.input_channels() - count;
        Ok(Folding { graph, cut, first, count, env, options, threads, given_up: AtomicBool::new(false), kept: Mutex::new(Vec::new()) })
    }

    /// The descriptors of an input `[b, c, h, w]`, as bits; None unless every
    /// batch item has the same.
    fn key(&self, input: &[f32], [b, c, h, w]: [usize; 4]) -> Option<Vec<u32>> {
        let plane = h * w;
        if c != self.first + self.count || input.len() != b * c * plane || plane == 0 {
            return None;
        }
        let at = |i: usize, k: usize| input[(i * c + self.first + k) * plane].to_bits();
        let key: Vec<u32> = (0..self.count).map(|k| at(0, k)).collect();
        (1..b).all(|i| (0..self.count).all(|k| at(i, k) == key[k])).then_some(key)
    }

    fn make(&self, key: Vec<u32>) -> Result<Folded, String> {
        let t = std::time::Instant::now();
        let texture: Vec<f32> = key.iter().map(|b| f32::from_bits(*b)).collect();
        let make = |bytes: &[u8]| -> Result<Session, String> {
            let folded = super::model::graph_with_texture(bytes, &texture)?;
            make_session(&self.env, &self.options, self.threads, Provider::Cpu, &folded)
        };
        let full = make(&self.graph)?;
        let restore_only = self.cut.as_deref().map(make).transpose()?;
        tracing::debug!(?texture, ms = t.elapsed().as_secs_f64() * 1e3, "texture folded into the graph for a series");
        Ok(Folded { key, full, restore_only })
    }

    /// Run on the folded graph for this input's descriptors (R alone on the
    /// cut graph where there is one); None where the input cannot be keyed
    /// or the graph cannot be made (the caller runs the package's graph).
    fn run(
        &self,
        input_name: &str,
        input: &[f32],
        shape: [usize; 4],
        names: &[&str],
        r_alone: bool,
    ) -> Option<Result<Vec<Vec<f32>>, String>> {
        if self.given_up.load(Ordering::Relaxed) {
            return None;
        }
        let key = self.key(input, shape)?;
        let mut kept = self.kept.lock().ok()?;
        let mut folded = match kept.iter().position(|f| f.key == key) {
            Some(i) => kept.remove(i),
            None => match self.make(key) {
                Ok(f) => f,
                Err(reason) => {
                    tracing::warn!(%reason, "cannot fold a series' texture into the graph; running the package's graph from now on");
                    self.given_up.store(true, Ordering::Relaxed);
                    return None;
                }
            },
        };
        let session = match (r_alone, folded.restore_only.as_mut()) {
            (true, Some(s)) => s,
            _ => &mut folded.full,
        };
        let out = run_on(session, input_name, input, shape, names);
        kept.push(folded);
        if kept.len() > FOLDED_KEPT {
            kept.remove(0);
        }
        Some(out)
    }
}

/// One run of `session` on `[b, c, h, w]`, the named outputs in order.
fn run_session(
    session: &Mutex<Session>,
    input_name: &str,
    input: &[f32],
    shape: [usize; 4],
    names: &[&str],
) -> Result<Vec<Vec<f32>>, String> {
    let mut session = session.lock().map_err(|_| "session lock poisoned".to_string())?;
    run_on(&mut session, input_name, input, shape, names)
}

fn run_on(session: &mut Session, input_name: &str, input: &[f32], shape: [usize; 4], names: &[&str]) -> Result<Vec<Vec<f32>>, String> {
    let tensor = TensorRef::from_array_view((shape, input)).map_err(|e| e.to_string())?;
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
        let names = [self.pkg.io.output.as_str()];
        if let Some(out) = self.folding.as_ref().and_then(|f| f.run(&self.pkg.io.input, input, [b, c, h, w], &names, true)) {
            return Ok(out?.remove(0));
        }
        let session = self.restore_only.as_ref().unwrap_or(&self.session);
        let mut out = run_session(session, &self.pkg.io.input, input, [b, c, h, w], &[&self.pkg.io.output])?;
        Ok(out.remove(0))
    }
    fn infer_with_variance(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
        let mut names = vec![self.pkg.io.output.as_str()];
        names.extend(self.pkg.io.variance.as_deref());
        if let Some(out) = self.folding.as_ref().and_then(|f| f.run(&self.pkg.io.input, input, [b, c, h, w], &names, false)) {
            let mut out = out?.into_iter();
            let y = out.next().ok_or("no output")?;
            return Ok((y, out.next()));
        }
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
        if self.fp16 { format!("ort/{}-fp16", self.provider()) } else { format!("ort/{}", self.provider()) }
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

    #[test]
    fn each_graph_has_its_own_tensorrt_cache_folder() {
        let root = Path::new("/var/lib/petrestore/trt-cache");
        let a = graph_cache_dir(root, b"graph with weights a");
        assert_eq!(a, graph_cache_dir(root, b"graph with weights a"), "the same graph finds its engines again");
        assert_ne!(a, graph_cache_dir(root, b"graph with weights b"), "other weights, another folder");
        assert_eq!(a.parent(), Some(root));
        assert_eq!(a.file_name().unwrap().len(), 16);
    }
}
