//! Engine benchmark: slices/s and whole-study latency of ONNX Runtime (CPU
//! execution provider) and tract on the same model, at 1 and 2 threads, for
//! a 268-slice study at 192² and 400², plus peak RSS of the whole offline
//! restore (`petrestore restore`, one process per configuration).
//!
//! Run: `cargo bench --bench engines` (needs the ONNX Runtime library:
//! ORT_DYLIB_PATH or the `.venv` that `.ci/run` makes). `MODEL=DIR` picks
//! another model package; `REPS=N` repetitions (median); `MATRICES=192` and
//! `THREADS=2` (comma lists) run part of the table (`THREADS=none`: only
//! the uncertainty rows). `FILTER=1` times only the 3D Gaussian filter that
//! the lesion guard, σ and the fallback engine use, row-wise against the
//! line-wise reference, alternating (no model, no ONNX Runtime needed).
//! `MODELS=DIR1,DIR2,…` compares model packages side by side: per engine
//! and thread count, each repetition runs every model once in turn on the
//! same volume, so all see the same machine; it prints each model's median
//! engine time and the median of its per-repetition ratio to the first
//! (`ENGINES=ort` or `tract` runs one engine; `ort-unfolded` is ONNX
//! Runtime without folding each series' texture into the graph).

use testkit::bench::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use petrestore::config::Settings;
use petrestore::restore::{self, volume};

fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return p.into();
    }
    let base = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(".venv/lib");
    for py in std::fs::read_dir(&base).expect("no ORT_DYLIB_PATH and no .venv (run .ci/run)").flatten() {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        for f in std::fs::read_dir(&capi).into_iter().flatten().flatten() {
            if f.file_name().to_string_lossy().starts_with("libonnxruntime.so.") {
                return f.path();
            }
        }
    }
    panic!("libonnxruntime not found");
}

/// Run a command and return (seconds, peak RSS in MiB) of that child alone.
fn timed_child(mut cmd: Command) -> (f64, f64) {
    let t = Instant::now();
    let child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(rc, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child failed");
    std::mem::forget(child);
    (t.elapsed().as_secs_f64(), ru.ru_maxrss as f64 / 1024.0)
}

/// The Gaussian filter, row-wise (shipped) against line-wise (reference),
/// on one thread, at the guard's two scales and two series lengths.
fn filter_table(reps: usize) {
    println!("3D Gaussian filter, 192² at 3.65 mm, 3.27 mm slices, one thread, {reps} alternating repetitions, medians (ms)");
    println!("{:<8} {:>7} {:>11} {:>10} {:>7}", "slices", "FWHM mm", "line-wise", "row-wise", "ratio");
    let mut seed = 11u64;
    for nz in [48usize, 268] {
        let n = 192;
        let data: Vec<f32> = (0..n * n * nz)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) as f32 / (1u64 << 31) as f32) * 5000.0
            })
            .collect();
        let v = restore::Volume { nx: n, ny: n, nz, spacing: [3.65, 3.65, 3.27], data, frame_duration_s: Some(30.0) };
        for fwhm in [5.0, 15.0] {
            let (mut old, mut new) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                let t = Instant::now();
                let a = restore::gaussian::filter_by_lines(&v, fwhm);
                old.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                let b = restore::gaussian::filter(&v, fwhm);
                new.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()), "the two filters differ");
            }
            let (o, w) = (median(old), median(new));
            println!("{:<8} {:>7} {:>11.1} {:>10.1} {:>7.2}", nz, fwhm, o, w, w / o);
        }
    }
}

/// MATRICES=192 / THREADS=2 (comma lists) run a part of the table.
fn list(var: &str, all: &[usize]) -> Vec<usize> {
    std::env::var(var).ok().map_or(all.to_vec(), |v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
}

/// PROVIDERS=tensorrt,cuda,cpu on a GPU machine (scripts/gpu-check.sh).
fn providers() -> Vec<String> {
    std::env::var("PROVIDERS").unwrap_or_else(|_| "cpu".into()).split(',').map(str::to_string).collect()
}

fn engine_for(
    engine: &str,
    model: &Path,
    lib: &Path,
    providers: &[String],
    threads: usize,
    state: &Path,
) -> std::sync::Arc<dyn restore::Engine> {
    if engine == "ort-unfolded" {
        // ONNX Runtime on the package's graph as it is, without folding each
        // series' texture into the biases: the "before" of that change
        let o = restore::ort_engine::OrtOptions {
            library: Some(lib.to_owned()),
            providers: providers.iter().map(|p| petrestore::config::Provider::parse(p).expect("PROVIDERS")).collect(),
            tensorrt_fp16: false,
            tensorrt_workspace_mb: 0,
            cache_dir: state.join("trt-cache"),
            threads,
            fold_texture: false,
        };
        let pkg = restore::model::ModelPackage::load(model).unwrap();
        return std::sync::Arc::new(restore::ort_engine::OrtEngine::new(pkg, &o).unwrap());
    }
    let mut s = Settings::defaults();
    s.restore.engines = vec![petrestore::config::EngineKind::parse(engine).expect("an engine name")];
    s.restore.model = model.to_owned();
    s.restore.ort_library = Some(lib.to_owned());
    s.restore.ort_providers =
        providers.iter().map(|p| petrestore::config::Provider::parse(p).expect("PROVIDERS: tensorrt, cuda or cpu")).collect();
    s.restore.threads = threads;
    s.node.state_dir = state.to_owned();
    restore::engines_from_settings(&s).unwrap().engines[0].clone()
}

/// Engine time of several model packages on the same volume, alternating
/// within each repetition (MODELS=…).
fn paired_table(models: &[PathBuf], reps: usize) {
    let lib = ort_library();
    let providers = providers();
    let tmp = tempfile::tempdir().unwrap();
    println!("paired engine benchmark: 268 slices, {reps} repetitions, models alternating within each, medians");
    for (i, m) in models.iter().enumerate() {
        let pkg = restore::model::ModelPackage::load(m).unwrap();
        println!("  model {i}: {} ({})", pkg.model_id(), m.display());
    }
    println!("{:<7} {:<10} {:>7} {:>6} {:>12} {:>16}", "matrix", "engine", "threads", "model", "engine s", "÷ model 0 (med)");
    for matrix in list("MATRICES", &[192]) {
        // 600 mm across, no finer than 2 mm pixels (the shipped model's range)
        let spec = petsim::SeriesSpec { slices: 268, matrix, seed: 5, fov_mm: (2.0 * matrix as f64).max(600.0), ..Default::default() };
        let dir = tmp.path().join(format!("s{matrix}"));
        let src = petsim::write_series(&dir, &spec).unwrap();
        let mut v = volume::load(&src.files).unwrap().volume;
        v.frame_duration_s = Some(spec.frame_duration_s);
        for threads in list("THREADS", &[2]) {
            let which = std::env::var("ENGINES").unwrap_or_else(|_| "ort,tract".into());
            for engine in which.split(',').map(str::trim) {
                let engines: Vec<_> = models.iter().map(|m| engine_for(engine, m, &lib, &providers, threads, tmp.path())).collect();
                let label = match engine {
                    "ort-unfolded" => format!("{}, unfolded", engines[0].label()),
                    _ => engines[0].label(),
                };
                for e in &engines {
                    let _ = e.run(&v).unwrap(); // warm-up: plans, allocations
                }
                let mut times = vec![Vec::new(); models.len()];
                for _ in 0..reps {
                    for (k, e) in engines.iter().enumerate() {
                        let t = Instant::now();
                        e.run(&v).unwrap();
                        times[k].push(t.elapsed().as_secs_f64());
                    }
                }
                for (k, t) in times.iter().enumerate() {
                    let ratio = median(t.iter().zip(&times[0]).map(|(a, b)| a / b).collect());
                    println!(
                        "{:<7} {:<10} {:>7} {:>6} {:>12.2} {:>16.3}",
                        format!("{matrix}²"),
                        label,
                        threads,
                        k,
                        median(t.clone()),
                        ratio
                    );
                }
            }
        }
    }
}

fn main() {
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    if std::env::var_os("FILTER").is_some() {
        return filter_table(reps);
    }
    if let Ok(models) = std::env::var("MODELS") {
        let models: Vec<PathBuf> = models.split(',').map(PathBuf::from).collect();
        assert!(models.len() >= 2, "MODELS needs two or more package folders, comma-separated");
        return paired_table(&models, reps);
    }
    let model = std::env::var_os("MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/test-unet"));
    let lib = ort_library();
    // PROVIDERS=tensorrt,cuda,cpu on a GPU machine (scripts/gpu-check.sh).
    let providers = providers();
    let tmp = tempfile::tempdir().unwrap();
    let pkg = restore::model::ModelPackage::load(&model).unwrap();
    println!("engine benchmark: model {} ({}), 268 slices, {reps} repetitions, medians", pkg.model_id(), model.display());
    println!(
        "{:<7} {:<10} {:>7} {:>10} {:>12} {:>13} {:>13} {:>9}",
        "matrix", "engine", "threads", "slices/s", "engine s", "restore cmd s", "peak RSS MiB", "vs ort"
    );
    for matrix in list("MATRICES", &[192, 400]) {
        // 600 mm across, no finer than 2 mm pixels (the shipped model's range)
        let spec = petsim::SeriesSpec { slices: 268, matrix, seed: 5, fov_mm: (2.0 * matrix as f64).max(600.0), ..Default::default() };
        let dir = tmp.path().join(format!("s{matrix}"));
        let src = petsim::write_series(&dir, &spec).unwrap();
        let mut v = volume::load(&src.files).unwrap().volume;
        // what the worker's selection step fills in (a duration-conditioned model needs it)
        v.frame_duration_s = Some(spec.frame_duration_s);
        for threads in list("THREADS", &[1, 2]) {
            let mut ort_time = None;
            for engine in ["ort", "tract"] {
                let eng = engine_for(engine, &model, &lib, &providers, threads, tmp.path());
                let label = eng.label();
                let _ = eng.run(&v).unwrap(); // warm-up: plans, allocations
                let times: Vec<f64> = (0..reps)
                    .map(|_| {
                        let t = Instant::now();
                        eng.run(&v).unwrap();
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                let t = median(times);
                // the whole offline restore in its own process: DICOM in and out + peak RSS
                let cfg = tmp.path().join(format!("c-{engine}-{threads}.toml"));
                std::fs::write(
                    &cfg,
                    format!(
                        "[restore]\nengines = [\"{engine}\"]\nmodel = {model:?}\nort_library = {lib:?}\nort_providers = {providers:?}\nthreads = {threads}\n"
                    ),
                )
                .unwrap();
                let out = tmp.path().join(format!("o-{matrix}-{engine}-{threads}"));
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_petrestore"));
                cmd.args(["restore", "--config"]).arg(&cfg).arg("--input").arg(&dir).arg("--output").arg(&out);
                let (cmd_s, rss) = timed_child(cmd);
                let ratio = match ort_time {
                    None => {
                        ort_time = Some(t);
                        "1.00".to_string()
                    }
                    Some(o) => format!("{:.2}", t / o),
                };
                println!(
                    "{:<7} {:<10} {:>7} {:>10.1} {:>12.2} {:>13.2} {:>13.0} {:>9}",
                    format!("{matrix}²"),
                    label,
                    threads,
                    268.0 / t,
                    t,
                    cmd_s,
                    rss,
                    ratio
                );
            }
        }
        // the uncertainty σ after the engine (one thread; any engine's output),
        // with class weights only and with the per-frame descriptor factor,
        // alternating so both see the same machine
        let plain = restore::uncertainty::Calibration {
            window_mm: restore::uncertainty::DEFAULT_WINDOW_MM,
            texture_mm: restore::uncertainty::DEFAULT_TEXTURE_MM,
            class_edges: restore::uncertainty::DEFAULT_CLASS_EDGES.to_vec(),
            noise: vec![1.0; 4],
            texture: vec![1.0; 4],
            fitted_on: String::new(),
            descriptors: Vec::new(),
            descriptor_coef: Vec::new(),
            head: Vec::new(),
            site_scale: Vec::new(),
        };
        let described = restore::uncertainty::Calibration {
            descriptors: restore::texture::KNOWN.iter().map(|s| s.to_string()).collect(),
            descriptor_coef: vec![1.8, -1.0, 2.0, 0.2],
            ..plain.clone()
        };
        let r = restore::gaussian::filter(&v, 6.0);
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (k, cal) in [&plain, &described].into_iter().enumerate() {
                let t = Instant::now();
                cal.sigma(&v, &r, None).unwrap();
                times[k].push(t.elapsed().as_secs_f64());
            }
        }
        for (label, t) in ["σ (uncert.)", "σ + descr."].into_iter().zip(times) {
            let m = median(t);
            println!("{:<7} {:<10} {:>7} {:>10.1} {:>12.2}", format!("{matrix}²"), label, 1, 268.0 / m, m);
        }
    }
}
