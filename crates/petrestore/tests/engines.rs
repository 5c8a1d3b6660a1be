//! Restoration engines against the real things: the ONNX Runtime shared
//! library (CPU execution provider) and tract on the same model and volume,
//! the explicit provider fallback, and every way a model or library can be
//! wrong.

use std::path::Path;
use std::time::Duration;

use dicom_dictionary_std::tags;
use petrestore::config::Settings;
use petrestore::dicom::attrs::Attrs;
use petrestore::journal::JobState;
use petrestore::restore::{self, Engine, model::ModelPackage, volume};
use testkit::*;

fn settings_with(engines: &[&str], model: &Path, library: &Path) -> Settings {
    let mut s = Settings::defaults();
    s.restore.engines = engines.iter().map(|e| petrestore::config::EngineKind::parse(e).expect("an engine name")).collect();
    s.restore.model = model.to_owned();
    s.restore.ort_library = Some(library.to_owned());
    s.restore.threads = 1;
    s.node.state_dir = std::env::temp_dir();
    s
}

#[test]
fn ort_cpu_and_tract_agree_on_the_same_model_and_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 12, 96, 51);
    let v = volume::load(&src.files).unwrap().volume;
    let mut s = settings_with(&["ort", "tract"], &test_model(), &ort_library());
    // scripts/gpu-check.sh runs this test through the GPU providers
    // (PETRESTORE_ORT_PROVIDERS=cuda or tensorrt); CI uses the CPU one.
    let providers = std::env::var("PETRESTORE_ORT_PROVIDERS").unwrap_or_else(|_| "cpu".into());
    s.restore.ort_providers = providers.split(',').map(|p| petrestore::config::Provider::parse(p).expect("a provider name")).collect();
    let e = restore::engines_from_settings(&s).unwrap();
    assert_eq!(e.engines.iter().map(|e| e.name().to_string()).collect::<Vec<_>>(), ["ort", "tract"], "{:?}", e.reports);
    assert_eq!(e.engines[0].label(), format!("ort/{}", s.restore.ort_providers[0]), "{:?}", e.reports);
    let t = std::time::Instant::now();
    let a = e.engines[0].run(&v).unwrap();
    let ta = t.elapsed();
    let t = std::time::Instant::now();
    let b = e.engines[1].run(&v).unwrap();
    println!("{}: {ta:?}, tract: {:?} for 12 slices of 96x96", e.engines[0].label(), t.elapsed());
    let scale = v.data.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let max_abs = a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    // Tolerance: 1e-5 of the volume's range (float32 summation order differs).
    assert!(max_abs <= 1e-5 * scale, "max |ort - tract| = {max_abs} (range {scale})");
    let max_rel =
        a.data.iter().zip(&b.data).filter(|(x, _)| x.abs() > 0.01 * scale).map(|(x, y)| ((x - y) / x).abs()).fold(0.0f32, f32::max);
    assert!(max_rel <= 1e-4, "max relative difference {max_rel}");
    // And the test model is near-identity: restoration keeps activity in place.
    let mean = |d: &[f32]| d.iter().map(|x| *x as f64).sum::<f64>() / d.len() as f64;
    assert!((mean(&a.data) / mean(&v.data) - 1.0).abs() < 0.02);
    // The uncertainty is computed from each engine's output: the same σ
    // (issue 17), to the tolerance of the outputs themselves.
    let cal = restore::uncertainty::Calibration {
        window_mm: 10.0,
        texture_mm: 6.0,
        class_edges: restore::uncertainty::DEFAULT_CLASS_EDGES.to_vec(),
        noise: vec![1.5; 4],
        texture: vec![1.0; 4],
        fitted_on: String::new(),
        descriptors: Vec::new(),
        descriptor_coef: Vec::new(),
        head: Vec::new(),
        site_scale: Vec::new(),
    };
    let mut input = v.clone();
    input.frame_duration_s = Some(30.0);
    let (sa, sb) = (cal.sigma(&input, &a, None).unwrap(), cal.sigma(&input, &b, None).unwrap());
    let top = sa.data.iter().fold(0.0f32, |m, x| m.max(*x));
    assert!(top > 0.0);
    let max_abs = sa.data.iter().zip(&sb.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(max_abs <= 1e-3 * top, "max |σ ort - σ tract| = {max_abs} (σ up to {top})");
}

#[test]
fn tensorrt_and_cuda_requested_without_a_gpu_fall_back_visibly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 8, 64, 53);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!(
            "[restore]\nengines = [\"ort\", \"tract\"]\nmodel = {:?}\nort_library = {:?}\nort_providers = [\"tensorrt\", \"cuda\", \"cpu\"]\nthreads = 1\n{}",
            test_model(),
            ort_library(),
            destination("pacs", dest.port)
        ),
    );
    let st = petrestore(&["status", "--state-dir", d.state_dir().to_str().unwrap()]);
    assert!(st.status.success(), "{}", text(&st));
    let status: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let ort = &status["engines"][0];
    assert_eq!(ort["engine"], "ort");
    assert_eq!(ort["ok"], true);
    assert_eq!(ort["detail"], "provider cpu");
    let providers = ort["providers"].as_array().unwrap();
    assert_eq!(providers[0]["provider"], "tensorrt");
    assert_eq!(providers[0]["ok"], false);
    assert!(providers[0]["reason"].as_str().unwrap().to_lowercase().contains("tensorrt"), "{providers:?}");
    assert_eq!(providers[1]["provider"], "cuda");
    assert_eq!(providers[1]["ok"], false);
    assert_eq!(providers[2]["provider"], "cpu");
    assert_eq!(providers[2]["ok"], true);
    assert!(d.log().contains("execution provider unavailable; trying the next one"), "{}", d.log());

    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert_eq!(job.engine.as_deref(), Some("ort/cpu"));
    let got = dest.wait_files(8, "8 instances", Duration::from_secs(10));
    let o = dicom_object::open_file(&got[0]).unwrap().into_inner();
    let dd = o.str_of(tags::DERIVATION_DESCRIPTION).unwrap();
    assert!(dd.contains("ort/cpu") && dd.contains("petrestore-test-unet@0.1.0") && dd.contains("TEST MODEL"), "{dd}");

    // the result matches what tract computes from the same input
    let tract = restore::tract_engine::TractEngine::new(ModelPackage::load(&test_model()).unwrap(), 1).unwrap();
    let input = volume::load(&src.files).unwrap();
    let expected = tract.run(&input.volume).unwrap();
    let output = volume::load(&got).unwrap();
    for z in 0..8 {
        let slope = output.slices[z].dataset.f64_of(tags::RESCALE_SLOPE).unwrap();
        let err = output.volume.slice(z).iter().zip(expected.slice(z)).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        assert!(err <= slope * 0.5 + 1e-4 * slope * 32767.0, "slice {z}: {err} vs slope {slope}");
    }
}

#[test]
fn wrong_library_path_falls_back_to_tract_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 6, 64, 57);
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!(
            "[restore]\nengines = [\"ort\", \"tract\"]\nmodel = {:?}\nort_library = \"/nonexistent/libonnxruntime.so.1\"\nthreads = 1\n",
            test_model()
        ),
    );
    let st = petrestore(&["status", "--state-dir", d.state_dir().to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(status["engines"][0]["engine"], "ort");
    assert_eq!(status["engines"][0]["ok"], false);
    let why = status["engines"][0]["detail"].as_str().unwrap();
    assert!(why.contains("cannot load ONNX Runtime from /nonexistent/libonnxruntime.so.1") && why.contains("ORT_DYLIB_PATH"), "{why}");
    assert_eq!(status["engines"][1]["engine"], "tract");
    assert_eq!(status["engines"][1]["ok"], true);
    assert!(d.log().contains("engine unavailable; trying the next one"));
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    assert_eq!((job.state, job.engine.as_deref()), (JobState::Done, Some("tract")));
}

#[test]
fn corrupt_or_missing_model_refuses_to_start_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("model");
    std::fs::create_dir_all(&pkg).unwrap();
    for f in ["model.toml", "model.onnx"] {
        std::fs::copy(test_model().join(f), pkg.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(pkg.join("model.onnx")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(pkg.join("model.onnx"), bytes).unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nstate_dir = {:?}\n[dicom]\nlisten = \"127.0.0.1:{}\"\n[restore]\nengines = [\"tract\"]\nmodel = {pkg:?}\n",
            tmp.path().join("state"),
            free_port()
        ),
    )
    .unwrap();
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_petrestore")).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(t.contains(&pkg.join("model.onnx").display().to_string()) && t.contains("sha256") && t.contains("reinstall"), "{t}");

    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace(pkg.to_str().unwrap(), "/nonexistent/pkg")).unwrap();
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_petrestore")).args(["serve", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("/nonexistent/pkg") && text(&out).contains("restore.model"), "{}", text(&out));
}

#[test]
fn an_output_the_package_names_but_the_network_lacks_is_refused_by_name() {
    // Both engines find R and σ² by the names in model.toml [io], never by
    // position: a name the graph does not have makes the engine unavailable.
    let tmp = tempfile::tempdir().unwrap();
    let shipped = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let pkg = tmp.path().join("model");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::copy(shipped.join("model.onnx"), pkg.join("model.onnx")).unwrap();
    let t = std::fs::read_to_string(shipped.join("model.toml")).unwrap();
    assert!(t.contains("variance = \"variance\""), "the shipped package names its σ² output");
    std::fs::write(pkg.join("model.toml"), t.replacen("variance = \"variance\"", "variance = \"sigma_squared\"", 1)).unwrap();
    let s = settings_with(&["tract"], &pkg, &ort_library());
    let Err(e) = restore::engines_from_settings(&s) else { panic!("tract ran a package whose output name is not in its graph") };
    assert!(e.contains("has no output \"sigma_squared\"") && e.contains("\"variance\""), "{e}");
}

#[test]
fn model_package_that_does_not_match_its_network_is_refused() {
    // The package says 3 context slices; the network takes 5: neither model
    // engine can run it, and the Gaussian does not take the model's place.
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("model");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::copy(test_model().join("model.onnx"), pkg.join("model.onnx")).unwrap();
    let t = std::fs::read_to_string(test_model().join("model.toml")).unwrap().replace("context_slices = 5", "context_slices = 3");
    std::fs::write(pkg.join("model.toml"), t).unwrap();
    let s = settings_with(&["ort", "tract", "gaussian"], &pkg, &ort_library());
    let Err(e) = restore::engines_from_settings(&s) else { panic!("engines built from a package no engine can run") };
    assert!(e.contains("ort: ") && e.contains("tract: ") && e.matches("does not run").count() == 2, "{e}");
    assert!(e.contains("the Gaussian does not stand in for the model"), "{e}");
}

#[test]
fn engine_failing_on_a_series_falls_back_to_the_model_only_then_forwards_the_original() {
    // An odd matrix cannot pass the test model's pool/upsample (it pads
    // nothing): ONNX Runtime fails on it at run time, tract takes over and
    // fails too. The Gaussian is not run in the model's place (its output
    // is not the model's restoration): the job fails, saying why, and the
    // original series goes on unchanged.
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 6, 33, 55);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!(
            "[node]\nretention_hours = 0.0005\n[restore]\nengines = [\"ort\", \"tract\", \"gaussian\"]\nmodel = {:?}\nort_library = {:?}\nort_providers = [\"cpu\"]\nthreads = 1\n{}",
            test_model(),
            ort_library(),
            destination("pacs", dest.port)
        ),
    );
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    let JobState::Failed { reason } = &job.state else { panic!("{:?}", job.state) };
    assert!(
        reason.contains("engine ort failed")
            && reason.contains("engine tract failed")
            && reason.contains("engine gaussian not run in place of the model"),
        "{reason}"
    );
    assert_eq!(job.engine, None, "no engine restored it");
    let got: std::collections::BTreeSet<String> =
        dest.files().iter().map(|p| dicom_object::open_file(p).unwrap().into_inner().str_of(tags::SOP_INSTANCE_UID).unwrap()).collect();
    assert_eq!(got, src.sop_uids.iter().cloned().collect(), "the original series, unchanged UIDs");
    // the original was delivered: the delivered jobs' retention (2 s here) applies
    let id = job_id(&src);
    wait_for("retention of the forwarded original", Duration::from_secs(40), || d.job(&id).purged.then_some(()));
    assert!(d.spool_files().is_empty(), "{:?}", d.spool_files());
}

#[test]
fn the_committed_test_model_is_what_its_generator_makes() {
    let tmp = tempfile::tempdir().unwrap();
    let script = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/tools/make_test_model.py");
    let out = std::process::Command::new(python()).arg(&script).arg(tmp.path()).output().unwrap();
    assert!(out.status.success(), "the generator needs numpy and onnx (bash .ci/run installs them): {}", text(&out));
    for f in ["model.onnx", "model.toml"] {
        let made = std::fs::read(tmp.path().join(f)).unwrap();
        let shipped = std::fs::read(test_model().join(f)).unwrap();
        if f == "model.toml" {
            // the made-by line names the output folder; compare the rest
            let strip =
                |b: &[u8]| String::from_utf8_lossy(b).lines().filter(|l| !l.starts_with("# Made by")).collect::<Vec<_>>().join("\n");
            assert_eq!(strip(&made), strip(&shipped), "{f} differs");
        } else {
            assert!(
                made == shipped,
                "{f} differs from what the generator makes: regenerate with python3 models/tools/make_test_model.py models/test-unet"
            );
        }
    }
}
