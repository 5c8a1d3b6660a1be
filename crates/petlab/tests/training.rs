//! The model's whole path, small: simulate splits → train a few steps (JAX)
//! → export to ONNX (JAX vs ONNX Runtime parity inside) → tract and ONNX
//! Runtime in Rust against the exported parity outputs → `petlab eval`
//! → the Python evaluator cross-checks every metric. Plus the shipped model
//! package: parity on both engines and use through `restore`.
//!
//! CI runs only this smoke path; full training and evaluation are the
//! recipe in models/train/README.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use petrestore::restore::model::ModelPackage;
use petrestore::restore::neural::Backend;
use petrestore::restore::ort_engine::{OrtEngine, OrtOptions};
use petrestore::restore::tract_engine::TractEngine;
use petsim::dataset::read_npy_f32;
use testkit::*;

fn train_dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/train")
}

fn py(args: &[&str]) -> std::process::Output {
    let o = Command::new(python()).args(args).current_dir(train_dir()).output().unwrap();
    assert!(o.status.success(), "python {args:?} failed:\n{}", text(&o));
    o
}

fn ok(args: &[&str]) -> String {
    let o = petrestore(args);
    assert!(o.status.success(), "petrestore {args:?} failed:\n{}", text(&o));
    text(&o)
}

fn lab(args: &[&str]) -> String {
    let o = petlab(args);
    assert!(o.status.success(), "petlab {args:?} failed:\n{}", text(&o));
    text(&o)
}

/// Run a package's network on its parity input with tract and ONNX Runtime
/// and compare with the trainer's output.
fn assert_parity(pkg_dir: &Path) {
    let pkg = ModelPackage::load(pkg_dir).unwrap();
    let (shape, input) = read_npy_f32(&pkg_dir.join("parity/input.npy")).unwrap();
    let (_, expected) = read_npy_f32(&pkg_dir.join("parity/expected.npy")).unwrap();
    let [b, c, h, w] = [shape[0], shape[1], shape[2], shape[3]];
    assert_eq!(c, pkg.input_channels());
    let span = expected.iter().copied().fold(f32::MIN, f32::max) - expected.iter().copied().fold(f32::MAX, f32::min);
    let tract = TractEngine::new(pkg.clone(), 1).unwrap();
    let o = OrtOptions {
        library: Some(ort_library()),
        providers: vec![petrestore::config::Provider::Cpu],
        tensorrt_fp16: false,
        tensorrt_workspace_mb: 0,
        cache_dir: std::env::temp_dir(),
        threads: 1,
        fold_texture: true,
    };
    let variance = pkg.io.variance.is_some();
    let pkg_texture = pkg.io.texture.clone();
    let expected_var = variance.then(|| read_npy_f32(&pkg_dir.join("parity/expected_variance.npy")).unwrap().1);
    let ort = OrtEngine::new(pkg, &o).unwrap();
    assert_eq!(ort.skips_head_for_r_alone(), variance, "ONNX Runtime runs R alone on a graph without the σ head");
    assert_eq!(tract.skips_head_for_r_alone(), variance, "tract runs R alone on a graph without the σ head");
    let textured = !pkg_texture.is_empty();
    assert_eq!(ort.folds_texture(), textured, "ONNX Runtime's CPU provider folds a textured package's descriptors into the graph");
    if textured {
        // one series at a time (the parity input's batch items have different
        // descriptors, which runs on the package's graph): the graph folded
        // for each item's descriptors gives the trainer's R and variance
        let (plane, n) = (h * w, c * h * w);
        for i in 0..b {
            let item = &input[i * n..(i + 1) * n];
            let want = &expected[i * plane..(i + 1) * plane];
            let (y, var) = ort.infer_with_variance(item, 1, c, h, w).unwrap();
            let worst = y.iter().zip(want).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-4 * span, "ort, folded, item {i}, differs from the trainer by {worst} (range {span})");
            let plain = ort.infer(item, 1, c, h, w).unwrap();
            let worst = plain.iter().zip(want).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-4 * span, "ort, folded, R alone, item {i}, differs from the trainer by {worst} (range {span})");
            if let (Some(var), Some(all)) = (var, &expected_var) {
                let worst = var.iter().zip(&all[i * plane..(i + 1) * plane]).map(|(a, e)| ((a - e) / e).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 1e-4, "ort, folded, item {i}: variance differs from the trainer by {worst} (relative)");
            }
        }
    }
    for (name, backend) in [("tract", &tract as &dyn Backend), ("ort", &ort as &dyn Backend)] {
        let (y, var) = backend.infer_with_variance(&input, b, c, h, w).unwrap();
        assert_eq!(y.len(), expected.len());
        let worst = y.iter().zip(&expected).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-4 * span, "{name} differs from the trainer by {worst} (range {span})");
        // R alone (test-time augmentation's flipped passes; ONNX Runtime runs
        // them on the graph cut to R's output): the same values
        let plain = backend.infer(&input, b, c, h, w).unwrap();
        let worst = plain.iter().zip(&expected).map(|(a, e)| (a - e).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-4 * span, "{name}, R alone, differs from the trainer by {worst} (range {span})");
        // the σ head's output, where the package has one: the same from both engines and the trainer
        assert_eq!(var.is_some(), variance, "{name}: variance output present {}, package names one {variance}", var.is_some());
        if let (Some(var), Some(want)) = (var, &expected_var) {
            assert_eq!(var.len(), want.len());
            let worst = var.iter().zip(want).map(|(a, e)| ((a - e) / e).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-4, "{name}: variance differs from the trainer by {worst} (relative)");
        }
    }
}

/// The engines measure a series' texture as the trainer does: the same
/// three numbers from Rust and from petrain.data on the same frames.
#[test]
fn texture_descriptors_are_the_trainers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |s: &str| tmp.path().join(s).display().to_string();
    lab(&["dataset", "--out", &d("val"), "--split", "val", "--count", "1", "--slices", "6", "--matrix", "96", "--post-filter", "5"]);
    let npy = std::fs::read_dir(tmp.path().join("val"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "npy"))
        .unwrap();
    let (shape, all) = read_npy_f32(&npy).unwrap();
    let [s, n] = [shape[1], shape[2]];
    let script = format!(
        "import json, numpy as np\nfrom petrain import data\na = np.load({:?})\n\
         print(json.dumps([data.texture(a[i]).tolist() + [data.body_scale(a[i])] for i in range(3)]))",
        npy.display().to_string()
    );
    let trainer: Vec<Vec<f64>> = serde_json::from_str(text(&py(&["-c", &script])).trim()).unwrap();
    let names: Vec<String> = petrestore::restore::texture::KNOWN.iter().map(|s| s.to_string()).collect();
    for (plane, want) in trainer.iter().enumerate() {
        let data = all[plane * s * n * n..(plane + 1) * s * n * n].to_vec();
        let v = petrestore::restore::Volume { nx: n, ny: n, nz: s, spacing: [4.0, 4.0, 3.0], data, frame_duration_s: Some(30.0) };
        let scale = petrestore::restore::neural::body_scale(&v, 0.05).unwrap();
        assert!((scale as f64 / want[3] - 1.0).abs() < 1e-5, "plane {plane}: body mean {scale} vs the trainer's {}", want[3]);
        let got = petrestore::restore::texture::describe(&v, &names, 0.05, scale).unwrap();
        for (k, name) in names.iter().enumerate() {
            assert!((got[k] as f64 - want[k]).abs() < 1e-4, "plane {plane} {name}: engines {} vs trainer {}", got[k], want[k]);
        }
    }
}

#[test]
fn smoke_train_export_parity_eval_and_cross_check() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |s: &str| tmp.path().join(s).display().to_string();
    // tiny splits: 64² matrices, few slices
    lab(&["dataset", "--out", &d("train"), "--split", "train", "--count", "2", "--slices", "6", "--matrix", "64"]);
    lab(&["dataset", "--out", &d("val"), "--split", "val", "--count", "1", "--slices", "6", "--matrix", "64"]);
    lab(&["dataset", "--out", &d("test"), "--split", "test", "--count", "1", "--nema", "1", "--slices", "6", "--matrix", "64"]);
    // the trainer refuses test studies as validation data
    let o = Command::new(python())
        .args(["-m", "petrain.train", "--train", &d("train"), "--val", &d("test"), "--out", &d("bad"), "--steps", "1"])
        .current_dir(train_dir())
        .output()
        .unwrap();
    assert!(!o.status.success() && text(&o).contains("not validation"), "{}", text(&o));
    // a run cut off at step 2 and resumed from its checkpoint ends exactly where an uninterrupted run does
    let run5 = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "-m",
            "petrain.train",
            "--train",
            &d("train"),
            "--val",
            &d("val"),
            "--out",
            out,
            "--steps",
            "4",
            "--batch",
            "4",
            "--patch",
            "32",
            "--levels",
            "4",
            "--eval-every",
            "2",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        text(&py(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    assert!(run5(&d("run5"), &[]).contains("done: 4 steps"));
    assert!(run5(&d("cut"), &["--stop-after", "2"]).contains("stopped at step 2 of 4"));
    let bad = Command::new(python())
        .args([
            "-m",
            "petrain.train",
            "--train",
            &d("train"),
            "--val",
            &d("val"),
            "--out",
            &d("cut"),
            "--steps",
            "4",
            "--batch",
            "8",
            "--patch",
            "32",
            "--levels",
            "4",
            "--resume",
        ])
        .current_dir(train_dir())
        .output()
        .unwrap();
    assert!(!bad.status.success() && text(&bad).contains("--batch is 8, the checkpoint's run used 4"), "{}", text(&bad));
    assert!(run5(&d("cut"), &["--resume"]).contains("resumed at step 2 of 4"));
    let val_losses = |run: &str| -> Vec<f64> {
        let log: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join(run).join("train_log.json")).unwrap()).unwrap();
        log["history"].as_array().unwrap().iter().map(|h| h["loss"].as_f64().unwrap()).collect()
    };
    assert_eq!(val_losses("cut"), val_losses("run5"));
    assert_eq!(val_losses("run5").len(), 2);
    // a 4-level network (the shipped one has 3), warm-started with a wider slice context (5 → 7): the trainer
    // checks that the widened network computes the same function before it trains; the package then carries
    // 7 slices and a padding to multiples of 8 through export, both engines and eval
    let out = py(&[
        "-m",
        "petrain.train",
        "--train",
        &d("train"),
        "--val",
        &d("val"),
        "--out",
        &d("run"),
        "--steps",
        "6",
        "--batch",
        "4",
        "--patch",
        "32",
        "--eval-every",
        "3",
        "--context",
        "7",
        "--levels",
        "4",
        "--init",
        &d("run5/params.npz"),
        "--texture",
        "--select",
        "seed_mse",
        "--lowfreq-weight",
        "2",
        "--lowfreq-fwhm",
        "3",
    ]);
    for want in ["context widened from 5 to 7 slices (output unchanged", "texture inputs added", "done: 6 steps", "by seed_mse"] {
        assert!(text(&out).contains(want), "{want:?} missing:\n{}", text(&out));
    }
    // where the run falls short of the perfect denoiser: the regions' shares add up to the gap
    let gap = text(&py(&["-m", "petrain.gap", "--params", &d("run/params.npz"), "--dataset", &d("val"), "--tta", "4"]));
    for dur in ["30 s", "60 s"] {
        let head = gap.lines().find(|l| l.starts_with(&format!("{dur}: seed MSE metric model"))).unwrap_or_else(|| panic!("{gap}"));
        let total: f64 =
            head.split("gap ").nth(1).and_then(|t| t.split(' ').next()).and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{head}"));
        let block: Vec<&str> = gap.lines().skip_while(|l| *l != head).skip(2).take(5).collect();
        let parts: f64 =
            block.iter().map(|l| l.split_whitespace().nth(2).and_then(|v| v.parse::<f64>().ok()).unwrap_or_else(|| panic!("{gap}"))).sum();
        assert!((parts - total).abs() < 0.05, "regions {parts} vs gap {total}:\n{gap}");
    }
    let o = Command::new(python())
        .args(["-m", "petrain.gap", "--params", &d("run/params.npz"), "--dataset", &d("test")])
        .current_dir(train_dir())
        .output()
        .unwrap();
    assert!(!o.status.success() && text(&o).contains("holds test studies"), "{}", text(&o));
    let out = py(&["-m", "petrain.export", "--params", &d("run/params.npz"), "--out", &d("pkg"), "--train-log", &d("run/train_log.json")]);
    assert!(text(&out).contains("parity JAX vs ONNX Runtime"), "{}", text(&out));
    assert_parity(&tmp.path().join("pkg"));
    let pkg = ModelPackage::load(&tmp.path().join("pkg")).unwrap();
    assert_eq!(pkg.io.condition.as_deref(), Some("frame_duration_over_90"));
    assert_eq!(pkg.io.texture, ["noise_px", "noise_2px", "axial_corr"]);
    assert_eq!((pkg.io.context_slices, pkg.input_channels(), pkg.io.pad_multiple), (7, 11, 8));
    assert_eq!(pkg.provenance["train_steps"].as_integer(), Some(6));
    assert!(pkg.io.variance.is_none() && pkg.uncertainty.is_none());

    // a σ head for that network (petrain.sigma: a few likelihood steps, then the
    // coverage table on a one-cell grid), exported as the graph's second output:
    // both engines give the trainer's variance, and from_onnx rebuilds both networks
    let cell = tmp.path().join("grid/c1");
    std::fs::create_dir_all(&cell).unwrap();
    for e in std::fs::read_dir(tmp.path().join("val")).unwrap() {
        let e = e.unwrap().path();
        std::os::unix::fs::symlink(&e, cell.join(e.file_name().unwrap())).unwrap();
    }
    let sig = text(&py(&[
        "-m",
        "petrain.sigma",
        "--params",
        &d("run/params.npz"),
        "--train",
        &d("train"),
        "--grid",
        &d("grid"),
        "--out",
        &d("sig"),
        "--steps",
        "3",
        "--batch",
        "2",
        "--patch",
        "32",
        "--per-study",
    ]));
    assert!(sig.contains("| c1 | 30 s |") && sig.contains("worst body distance from 68.27"), "{sig}");
    // --per-study: one row per study and frame, then the count within ±3 points
    assert!(sig.contains("mean e² ÷ mean σ²") && sig.contains("studies within ±3 points of 68.27 %"), "{sig}");
    // and the sampling spread of one study's coverage, from the halves of its slices
    assert!(sig.contains("halves of one study (first and second half of its slices) differ by"), "{sig}");
    assert!(sig.contains("over 2 study frames: sampling SD of one study's body coverage ≈"), "{sig}");
    let o = Command::new(python())
        .args(["-m", "petrain.sigma", "--params", &d("run/params.npz"), "--train", &d("test"), "--grid", &d("grid"), "--out", &d("bad")])
        .current_dir(train_dir())
        .output()
        .unwrap();
    assert!(!o.status.success() && text(&o).contains("never trained on"), "{}", text(&o));
    let out = py(&[
        "-m",
        "petrain.export",
        "--params",
        &d("run/params.npz"),
        "--sigma-head",
        &d("sig/sigma_params.npz"),
        "--guard",
        "5",
        "1.25",
        "--guard",
        "15",
        "2",
        "0.7",
        "--out",
        &d("pkg-sigma"),
    ]);
    assert!(text(&out).contains("parity of the variance output"), "{}", text(&out));
    assert_parity(&tmp.path().join("pkg-sigma"));
    let with_head = ModelPackage::load(&tmp.path().join("pkg-sigma")).unwrap();
    // --guard given twice: two scales, in the order given, the second with its noise power
    let scales: Vec<(f64, f64, f64)> = with_head.guard.iter().map(|g| (g.fwhm_mm, g.z, g.power)).collect();
    assert_eq!(scales, [(5.0, 1.25, 1.0), (15.0, 2.0, 0.7)]);
    assert_eq!(with_head.io.variance.as_deref(), Some("variance"));
    assert!(with_head.uncertainty.as_ref().is_some_and(|u| u.uses_variance()));
    let round = text(&py(&["-m", "petrain.from_onnx", "--package", &d("pkg-sigma"), "--out", &d("rebuilt/params.npz")]));
    assert!(round.contains("byte-identical") && round.contains("sigma_params.npz"), "{round}");

    let report = lab(&[
        "eval",
        "--dataset",
        &d("test"),
        "--val",
        &d("val"),
        "--model",
        &d("pkg"),
        "--json",
        &d("eval.json"),
        "--dump",
        &d("dump"),
        "--threads",
        "1",
    ]);
    for want in ["Seed metric vs PET90", "NEMA NU 2", "Lesions", "raw PET90", "goals"] {
        assert!(report.contains(want), "eval report lacks {want:?}:\n{report}");
    }
    let out = py(&["-m", "petrain.evaluate", "--dataset", &d("test"), "--report", &d("eval.json"), "--dump", &d("dump")]);
    assert!(text(&out).contains("cross-check OK"), "{}", text(&out));
    // the oracle row (a perfect denoiser in the model's output form) sits at
    // the nested-frame ceiling: the dataset's clean90 plane and its nested
    // frames are what the model is trained and judged on (the cross-check
    // above recomputed its records in Python too)
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(d("eval.json")).unwrap()).unwrap();
    let seed = |k: &str| r["summary"][k].as_f64().unwrap_or_else(|| panic!("{k} missing from the eval summary"));
    let ceiling = petrestore::eval::metrics::improvement_ceiling;
    assert!(
        (seed("seed_mse_30_oracle") - ceiling(30.0)).abs() < 3.0 && (seed("seed_mse_60_oracle") - ceiling(60.0)).abs() < 4.0,
        "{report}"
    );
    assert!(report.contains("oracle (perfect denoiser) 30 s"), "{report}");
    // eval refuses test studies as the validation split used for choices
    let o = petlab(&["eval", "--dataset", &d("test"), "--val", &d("test")]);
    assert!(!o.status.success() && text(&o).contains("not test ones"), "{}", text(&o));
}

/// The main run's schedule length a GPU script's probe chose, checked to lie
/// within the MIN_STEPS..MAX_STEPS (4..6) the dry runs give.
fn schedule_steps(log: &str) -> usize {
    let steps: usize = log.split("main run schedule ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!((4..=6).contains(&steps), "the probe sets the schedule length within its bounds: {log}");
    steps
}

/// The GPU scripts size their schedule with `petrain.schedule` from a probe's
/// validation history: the rate between the first and last validations, the
/// start-up measured or given, the starting weights' entry left out, and the
/// shortest schedule when the probe left nothing.
#[test]
fn schedule_fits_the_probes_rate_into_the_time_left() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("checkpoint.json");
    // 100 steps in 6 s after a first validation at 30 s (100 steps): 16.7 steps/s,
    // start-up 30 − 6 + 15 = 39 s; 300 s leave 261 s: 16.7 × 261 × 0.85 = 3697 → 3000
    std::fs::write(&ck, r#"{"history": [{"step": 0, "minutes": 0}, {"step": 100, "minutes": 0.5}, {"step": 200, "minutes": 0.6}]}"#)
        .unwrap();
    let c = ck.to_str().unwrap();
    let steps = |extra: &[&str]| -> usize {
        let mut args = vec!["-m", "petrain.schedule", c, "--seconds", "300", "--min", "500", "--max", "100000"];
        args.extend_from_slice(extra);
        text(&py(&args)).trim().parse().unwrap()
    };
    assert_eq!(steps(&[]), 3000);
    // a fixed 60 s start-up, 0.8 of the rate, rounded to 500: 16.7 × 240 × 0.8 = 3200 → 3000
    assert_eq!(steps(&["--startup", "60", "--factor", "0.8", "--round", "500"]), 3000);
    assert_eq!(steps(&["--round", "100"]), 3600);
    assert_eq!(steps(&["--max", "2000"]), 2000);
    std::fs::remove_file(&ck).unwrap();
    assert_eq!(steps(&[]), 500, "no probe timing: the shortest schedule");
}

/// `petrain.soup` writes the element-wise mean of networks' weights in the
/// trainer's format and refuses networks that are not one graph.
#[test]
fn soup_averages_weights_and_refuses_other_networks() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let make = format!(
        "import numpy as np\n\
         np.savez('{a}', width=np.array(8), **{{'c1.w': np.full((3, 3, 2, 8), 1.0, np.float32), 'c1.b': np.zeros(8, np.float32)}})\n\
         np.savez('{b}', width=np.array(8), **{{'c1.w': np.full((3, 3, 2, 8), 4.0, np.float32), 'c1.b': np.ones(8, np.float32)}})\n\
         np.savez('{c}', width=np.array(8), **{{'c1.w': np.full((3, 3, 2, 4), 4.0, np.float32), 'c1.b': np.ones(4, np.float32)}})\n",
        a = d("a.npz"),
        b = d("b.npz"),
        c = d("c.npz")
    );
    py(&["-c", &make]);
    let out = text(&py(&["-m", "petrain.soup", "--out", &d("soup/params.npz"), &d("a.npz"), &d("b.npz")]));
    assert!(out.contains("the mean of 2 networks"), "{out}");
    let check = format!(
        "import sys; sys.path.insert(0, '.')\n\
         from petrain import train\n\
         p, w = train.load_params('{s}')\n\
         assert w == 8 and float(p['c1']['w'].min()) == 2.5 == float(p['c1']['w'].max()), p\n\
         assert float(p['c1']['b'].mean()) == 0.5 and p['c1']['w'].dtype.name == 'float32'\n",
        s = d("soup/params.npz")
    );
    py(&["-c", &check]);
    let o = Command::new(python())
        .args(["-m", "petrain.soup", "--out", &d("bad.npz"), &d("a.npz"), &d("c.npz")])
        .current_dir(train_dir())
        .output()
        .unwrap();
    assert!(!o.status.success() && text(&o).contains("c1.b is (4,)"), "{}", text(&o));
    assert!(!dir.path().join("bad.npz").exists());
}

/// `petrain.lesion_intervals` pools the per-lesion records of a `petlab eval`
/// report: coverage of R̄ ± σ̄ and the factor on σ̄ that would make it nominal.
#[test]
fn lesion_intervals_pool_the_reports_lesions() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    // ten lesions ≥ 10 mm at 30 s with |R̄ − PET̄90| ÷ σ̄ = 0.1 … 1.0, one of 8 mm (left out),
    // and a record without σ (the Gaussian's)
    let z: Vec<String> = (1..=10).map(|i| format!("[{}, {}]", 10 + 2 * i, i as f64 / 10.0)).collect();
    let json = format!(
        r#"{{"cells": {{"c1": {{"records": [
            {{"method": "model", "duration_s": 30.0, "uncertainty": {{"lesion_means": [{}, [8.0, 5.0]]}}}},
            {{"method": "gaussian", "duration_s": 30.0}}]}}}}}}"#,
        z.join(", ")
    );
    std::fs::write(&report, json).unwrap();
    let out = text(&py(&["-m", "petrain.lesion_intervals", report.to_str().unwrap()]));
    // all ten within σ̄ and 1.96 σ̄; the 68.27 % quantile of 0.1 … 1.0 is 0.71
    assert!(out.contains("| 30 s | 10 | 100.0 / 100.0 | 0.71 / 0.49 |"), "{out}");
    let fitted = text(&py(&["-m", "petrain.lesion_intervals", report.to_str().unwrap(), "--fit", report.to_str().unwrap()]));
    assert!(fitted.contains("fitted on") && fitted.contains("volume form"), "{fitted}");
}

/// What a GPU script leaves in `out` (and its `subdirs`) comes back only as at
/// most 8 plain files with plain names, two folders deep; `want` must be there.
fn assert_files_back(out: &Path, subdirs: &[&str], want: &[&str]) {
    let mut files = Vec::new();
    for dir in std::iter::once(out.to_path_buf()).chain(subdirs.iter().map(|d| out.join(d))) {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                files.push(e.path().strip_prefix(out).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    assert!(files.len() <= 8, "at most 8 files come back: {files:?}");
    assert!(files.iter().all(|f| f.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))), "{files:?}");
    for w in want {
        assert!(files.iter().any(|f| f == w), "{w} missing from {files:?}");
    }
}

/// The one-call GPU script (models/train/device_train.sh), dry-run on the CPU
/// with tiny sizes: it simulates, trains, fine-tunes, and leaves in $OUT what
/// the device tool brings back (at most 8 plain files, two folders deep,
/// plain names).
#[test]
fn device_training_script_dry_run_leaves_weights_the_device_tool_brings_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let script = train_dir().join("device_train.sh");
    let o = Command::new("bash")
        .arg(&script)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env("OUT", &out)
        .env("B", bin("petlab"))
        .env("PY", python())
        .env("DATA", tmp.path().join("data"))
        .envs([("STUDIES", "3"), ("SIMS", "2"), ("VAL", "1"), ("SIM_ARGS", "--slices 6 --matrix 64")])
        // STEPS=auto: a probe times the steps, the schedule is what fits TRAIN_S, held
        // between MIN_STEPS and MAX_STEPS; the wall-time caps are far above what these
        // few steps need, so a loaded machine (a compile taking a minute) cannot cut them
        .envs([("PROBE", "6"), ("PROBE_S", "900"), ("MIN_STEPS", "4"), ("MAX_STEPS", "6"), ("TRAIN_S", "900")])
        .envs([("EVAL_EVERY", "3"), ("FT_STEPS", "3"), ("FT_S", "900")])
        .output()
        .unwrap();
    assert!(o.status.success(), "device_train.sh failed:\n{}", text(&o));
    let log = text(&o);
    assert!(log.contains("simulated 3 training and 1 validation studies"), "{log}");
    schedule_steps(&log);
    assert_files_back(&out, &["run", "ft"], &["log.txt", "run/params.npz", "run/train_log.json", "ft/params.npz", "ft/train_log.json"]);
    // the fine-tune started from the main run's weights and kept its shape
    py(&[
        "-m",
        "petrain.export",
        "--params",
        &out.join("ft/params.npz").display().to_string(),
        "--out",
        &tmp.path().join("pkg").display().to_string(),
    ]);
    assert_parity(&tmp.path().join("pkg"));
}

/// The across-reconstruction GPU script (models/train/device_robust.sh),
/// dry-run on the CPU with tiny sizes: it rebuilds the shipped package's
/// weights, fine-tunes them (the starting weights are the first candidate),
/// averages it with the starting weights (SOUP=1), trains that network's σ
/// head, and leaves in $OUT at most 8 plain files, two folders deep, with
/// plain names; the averaged candidate exports with its head and runs the
/// same on tract and ONNX Runtime.
#[test]
fn robust_device_script_dry_run_leaves_a_network_and_its_sigma_head() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = Command::new("bash")
        .arg(train_dir().join("device_robust.sh"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env("OUT", &out)
        .env("B", bin("petlab"))
        .env("PY", python())
        .env("DATA", tmp.path().join("data"))
        // no randomized study fits in one second; two small reference studies and
        // the 1.x cell's validation study are the data
        .envs([("SIM_S", "1"), ("SIMS", "1"), ("PER", "1"), ("MIN_RAND", "0"), ("REF", "2"), ("REF_ARGS", "--matrix 64")])
        .envs([("SITES", "c1-ref128"), ("PROBE", "6"), ("PROBE_S", "900"), ("MIN_STEPS", "4"), ("MAX_STEPS", "6")])
        // time caps far above what these steps need: a loaded machine cannot cut them
        .envs([("TOTAL_S", "4000"), ("SIG_STEPS", "3"), ("SIG_S", "900"), ("SOUP", "1"), ("LOWFREQ", "1")])
        .output()
        .unwrap();
    let log = text(&o);
    assert!(o.status.success(), "device_robust.sh failed:\n{log}");
    assert!(log.contains("randomized studies: 0 in 1 s"), "{log}");
    assert!(log.contains("weights rebuilt") && log.contains("(the starting weights)"), "{log}");
    let steps = schedule_steps(&log);
    assert!(log.contains("wrote") && log.contains("the mean of 2 networks"), "{log}");
    assert!(log.contains("σ head (for soup/params.npz) rc 0"), "{log}");
    assert_files_back(
        &out,
        &["run", "sig", "soup"],
        &["log.txt", "sim.txt", "run/params.npz", "run/train_log.json", "soup/params.npz", "sig/sigma_params.npz", "sig/coverage.json"],
    );
    assert!(!out.join("run/checkpoint.json").exists(), "a finished run's history is train_log.json alone");
    // the history starts with the starting weights, then the fine-tune's steps
    let tlog: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("run/train_log.json")).unwrap()).unwrap();
    let hist = tlog["history"].as_array().unwrap();
    assert_eq!(hist[0]["step"].as_u64(), Some(0), "{tlog}");
    assert_eq!(hist.last().unwrap()["step"].as_u64(), Some(steps as u64), "{tlog}");
    py(&[
        "-m",
        "petrain.export",
        "--params",
        &out.join("soup/params.npz").display().to_string(),
        "--sigma-head",
        &out.join("sig/sigma_params.npz").display().to_string(),
        "--out",
        &tmp.path().join("pkg").display().to_string(),
    ]);
    assert_parity(&tmp.path().join("pkg"));
}

/// The shipped model package.
fn shipped() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d")
}

#[test]
fn shipped_model_runs_the_same_on_tract_and_onnx_runtime_as_in_training() {
    assert_parity(&shipped());
}

#[test]
fn restore_uses_the_shipped_model_for_30_s_and_refuses_72_s_by_name() {
    // 4 mm pixels: inside the 2.0-5.3 mm the shipped model restores
    let tmp = tempfile::tempdir().unwrap();
    let model = shipped().display().to_string();
    let short = petsim::write_series(
        &tmp.path().join("in30"),
        &petsim::SeriesSpec { slices: 8, matrix: 64, frame_duration_s: 30.0, fov_mm: 256.0, ..Default::default() },
    )
    .unwrap();
    let out30 = tmp.path().join("out30");
    let o = petrestore(&[
        "restore",
        "--input",
        &short.files[0].parent().unwrap().display().to_string(),
        "--output",
        &out30.display().to_string(),
        "--engine",
        "tract",
        "--model",
        &model,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let files = files_under(&out30);
    assert_eq!(files.len(), 8);
    let obj = dicom_object::open_file(&files[0]).unwrap();
    let desc = obj.element(dicom_dictionary_std::tags::DERIVATION_DESCRIPTION).unwrap().to_str().unwrap().to_string();
    assert!(desc.contains("petrestore-unet25d") && desc.contains("simulated data only"), "{desc}");

    let long = petsim::write_series(
        &tmp.path().join("in72"),
        &petsim::SeriesSpec { slices: 8, matrix: 64, frame_duration_s: 72.0, seed: 2, fov_mm: 256.0, ..Default::default() },
    )
    .unwrap();
    let o = petrestore(&[
        "restore",
        "--input",
        &long.files[0].parent().unwrap().display().to_string(),
        "--output",
        &tmp.path().join("out72").display().to_string(),
        "--engine",
        "tract",
        "--model",
        &model,
    ]);
    assert!(!o.status.success(), "a 72 s series must not be restored by a 30/60 s model");
    assert!(text(&o).contains("72.0 s, outside the 27–66 s the model was trained for"), "{}", text(&o));
}

#[test]
fn site_acceptance_eval_on_paired_series_reports_model_and_gaussian() {
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("study");
    lab(&["simulate", "--physics", "--out", &study.display().to_string(), "--slices", "8", "--matrix", "128", "--seed", "7"]);
    let json = tmp.path().join("r.json");
    let out = ok(&[
        "eval",
        "--input",
        &study.join("PT30").display().to_string(),
        "--reference",
        &study.join("PT90").display().to_string(),
        "--model",
        &shipped().display().to_string(),
        "--json",
        &json.display().to_string(),
        "--figures",
        &tmp.path().join("figures").display().to_string(),
    ]);
    assert!(out.contains("Ceiling of the seed MSE metric if the frames are nested: 66.7 %"), "{out}");
    // the pictures of the comparison: input | Gaussian | model | reference
    for png in ["coronal-mip.png", "axial-hottest.png"] {
        let b = std::fs::read(tmp.path().join("figures").join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = r["rows"].as_array().unwrap();
    let seed =
        |prefix: &str| rows.iter().find(|x| x["method"].as_str().unwrap().starts_with(prefix)).unwrap()["seed_mse"].as_f64().unwrap();
    let bias = |prefix: &str| {
        rows.iter().find(|x| x["method"].as_str().unwrap().starts_with(prefix)).unwrap()["body_mean_vs_reference_pct"].as_f64().unwrap()
    };
    // the trained model must beat the classical baseline on a physical study
    // and keep the quantitative level (body mean) of the reference
    assert!(seed("model") > seed("gaussian") && seed("model") > 30.0, "{out}");
    assert!(bias("model").abs() < 2.0, "{out}");
    // wrong order and mismatched grids are refused with what to do
    let o = petrestore(&[
        "eval",
        "--input",
        &study.join("PT90").display().to_string(),
        "--reference",
        &study.join("PT30").display().to_string(),
    ]);
    assert!(!o.status.success() && text(&o).contains("must be the shorter frame"), "{}", text(&o));
    let other = tmp.path().join("other");
    lab(&["simulate", "--physics", "--out", &other.display().to_string(), "--slices", "8", "--matrix", "64"]);
    let o = petrestore(&[
        "eval",
        "--input",
        &other.join("PT30").display().to_string(),
        "--reference",
        &study.join("PT90").display().to_string(),
    ]);
    assert!(!o.status.success() && text(&o).contains("do not match voxel for voxel"), "{}", text(&o));
}
