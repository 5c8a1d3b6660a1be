//! The site matrix from the command line: randomized training studies,
//! evaluation grids per cell, and `petlab eval --grid` reading goals per
//! cell and on the worst cell, with the shipped model.

use std::path::Path;

use testkit::*;

fn lab(args: &[&str]) -> String {
    let o = petlab(args);
    assert!(o.status.success(), "petlab {args:?} failed:\n{}", text(&o));
    text(&o)
}

#[test]
fn randomized_training_studies_record_their_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("train").display().to_string();
    lab(&["dataset", "--out", &d, "--split", "train", "--randomize", "--count", "2", "--skip", "40", "--slices", "4"]);
    let metas: Vec<serde_json::Value> = (40..42)
        .map(|s| serde_json::from_slice(&std::fs::read(Path::new(&d).join(format!("ellipse-{s:05}.json"))).unwrap()).unwrap())
        .collect();
    for m in &metas {
        assert_eq!(m["setting"], "random");
        assert!(m["scanner"]["post_filter_3d"].as_bool().unwrap());
        let px = m["pixel_mm"].as_f64().unwrap();
        assert!((1.8..5.5).contains(&px), "{px}");
    }
    assert_ne!(
        metas[0]["matrix"].to_string() + &metas[0]["scanner"].to_string(),
        metas[1]["matrix"].to_string() + &metas[1]["scanner"].to_string()
    );
    // the unfiltered stratum: the same draw per seed, without filter or PSF
    let u = tmp.path().join("unfiltered").display().to_string();
    lab(&["dataset", "--out", &u, "--split", "train", "--randomize", "--unfiltered", "--count", "1", "--skip", "40", "--slices", "4"]);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(Path::new(&u).join("ellipse-00040.json")).unwrap()).unwrap();
    assert_eq!(m["setting"], "random-unfiltered");
    assert_eq!(m["scanner"]["post_filter_fwhm_mm"].as_f64(), Some(0.0));
    assert_eq!(m["scanner"]["resolution_modelling"].as_bool(), Some(false));
    assert_eq!((&m["matrix"], &m["counts_90s_per_liver_slice"]), (&metas[0]["matrix"], &metas[0]["counts_90s_per_liver_slice"]));
    let o = petlab(&["dataset", "--out", &u, "--split", "train", "--unfiltered"]);
    assert!(!o.status.success() && text(&o).contains("--randomize"), "{}", text(&o));
    // a site cell is an evaluation setting: never a training set
    let o = petlab(&["dataset", "--out", &d, "--split", "train", "--site", "all"]);
    assert!(!o.status.success() && text(&o).contains("train with --randomize"), "{}", text(&o));
    let o = petlab(&["dataset", "--out", &d, "--split", "val", "--site", "c9"]);
    assert!(!o.status.success() && text(&o).contains("c1-ref128"), "{}", text(&o));
    // NEMA noise realisations for validation have seeds of their own, never the test's
    let v = tmp.path().join("valnema");
    let vs = v.display().to_string();
    lab(&["dataset", "--out", &vs, "--split", "val", "--site", "c6-144-nopsf", "--count", "0", "--nema", "2", "--slices", "2"]);
    let made: Vec<String> = std::fs::read_dir(&v).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for want in ["nema-12600.npy", "nema-12601.npy"] {
        assert!(made.iter().any(|f| f == want), "{want} not in {made:?}");
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(v.join("nema-12600.json")).unwrap()).unwrap();
    assert_eq!(m["split"], "validation");
    let o = petlab(&["dataset", "--out", &d, "--split", "train", "--count", "0", "--nema", "1"]);
    assert!(!o.status.success() && text(&o).contains("val or test split"), "{}", text(&o));
}

#[test]
fn grid_eval_reports_every_cell_and_the_worst_with_the_shipped_model() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).display().to_string();
    // one cell, tiny: 4 slices of the 1.x reconstruction (128²)
    lab(&["dataset", "--out", &p("val/c1-ref128"), "--split", "val", "--site", "c1-ref128", "--count", "1", "--slices", "4"]);
    lab(&[
        "dataset",
        "--out",
        &p("test/c1-ref128"),
        "--split",
        "test",
        "--site",
        "c1-ref128",
        "--count",
        "1",
        "--nema",
        "1",
        "--slices",
        "4",
    ]);
    let package = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let m = package.display().to_string();
    let out = lab(&["eval", "--grid", &p("test"), "--val-grid", &p("val"), "--model", &m, "--json", &p("grid.json"), "--threads", "1"]);
    for want in ["c1-ref128", "**worst cell**", "### model", "### oracle", "mean over cells"] {
        assert!(out.contains(want), "grid report lacks {want:?}:\n{out}");
    }
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(p("grid.json")).unwrap()).unwrap();
    let s = &r["cells"]["c1-ref128"]["summary"];
    // the model beats the raw frame on its own reconstruction, the oracle bounds it
    let (model, oracle) = (s["seed_mse_30_model"].as_f64().unwrap(), s["seed_mse_30_oracle"].as_f64().unwrap());
    assert!(model > 20.0 && model < oracle + 1.0, "{model} vs oracle {oracle}");
    // σ's sharpness against PET90's conditional SD: in the table, and no
    // narrower than half of what even a perfect denoiser could claim
    let sharp = s["unc_body_sharpness_30_model"].as_f64().unwrap();
    assert!(sharp.is_finite() && sharp > 0.5, "σ ÷ conditional SD {sharp}");
    assert!(out.contains("PET90's conditional SD"), "{out}");
    // σ with a site calibration per cell, fitted on the validation cell: on
    // that same cell (in sample) the body coverage of R ± σ comes to 68.3 %
    let body68 = |r: &serde_json::Value| {
        let s = &r["cells"]["c1-ref128"]["summary"];
        (s["unc_cov68_body_30_model"].as_f64().unwrap() + s["unc_cov68_body_60_model"].as_f64().unwrap()) / 2.0
    };
    lab(&["eval", "--grid", &p("val"), "--val-grid", &p("val"), "--model", &m, "--json", &p("plain.json"), "--threads", "1"]);
    let out = lab(&[
        "eval",
        "--grid",
        &p("val"),
        "--val-grid",
        &p("val"),
        "--model",
        &m,
        "--json",
        &p("site.json"),
        "--threads",
        "1",
        "--site-uncertainty",
    ]);
    assert!(out.contains("σ scaled per cell by a site calibration fitted on the validation cell"), "{out}");
    let read = |f: &str| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p(f)).unwrap()).unwrap() };
    let (plain, site) = (read("plain.json"), read("site.json"));
    let scale = site["cells"]["c1-ref128"]["site_uncertainty_scale"].as_array().unwrap();
    assert!(scale.len() == 4 && scale.iter().all(|v| v.as_f64().unwrap() > 0.0), "{scale:?}");
    assert!(plain["cells"]["c1-ref128"]["site_uncertainty_scale"].is_null());
    assert!((body68(&site) - 68.3).abs() < 3.0, "with the site factor {} (without {})", body68(&site), body68(&plain));
    assert!((body68(&site) - body68(&plain)).abs() > 0.5, "the factor changed nothing: {} vs {}", body68(&site), body68(&plain));
    // without a model there is nothing to scale: said, not ignored
    let o = petlab(&["eval", "--grid", &p("val"), "--val-grid", &p("val"), "--site-uncertainty"]);
    assert!(!o.status.success() && text(&o).contains("--site-uncertainty needs --model"), "{}", text(&o));
    // a grid without a validation cell is refused with the command to make it
    std::fs::create_dir_all(p("val2")).unwrap();
    let o = petlab(&["eval", "--grid", &p("test"), "--val-grid", &p("val2")]);
    assert!(!o.status.success() && text(&o).contains("--site all"), "{}", text(&o));
}

#[test]
fn the_uncertainty_calibration_is_cross_validated_by_cell_and_written_with_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).display().to_string();
    for cell in ["c1-ref128", "c6-144-nopsf"] {
        lab(&["dataset", "--out", &p(&format!("val/{cell}")), "--split", "val", "--site", cell, "--count", "1", "--slices", "4"]);
    }
    let shipped = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.onnx", "model.toml"] {
        std::fs::copy(shipped.join(f), model.join(f)).unwrap();
    }
    let m = model.display().to_string();
    // the shipped σ comes from its σ head: the calibration is fitted on the head's variance, each cell left out
    // beside the package's own table, and written as head weights with the frame factor
    let out = lab(&["calibrate", "--grid", &p("val"), "--model", &m, "--cross-validate", "--descriptors", "--write", "--threads", "1"]);
    for want in ["| c1-ref128 |", "| c6-144-nopsf |", "the package's own", "weight on the σ head's variance", "per-frame factor on σ²"] {
        assert!(out.contains(want), "calibrate output lacks {want:?}:\n{out}");
    }
    let head = petrestore::restore::model::ModelPackage::load(&model).unwrap().uncertainty.unwrap();
    assert!(head.uses_variance() && head.head.len() == head.class_edges.len() + 1, "{head:?}");
    assert!(head.noise.iter().chain(&head.texture).all(|w| *w == 0.0), "{head:?}");
    assert_eq!((head.descriptors.len(), head.descriptor_coef.len()), (3, 4));
    assert!(head.fitted_on.contains("σ head"), "{}", head.fitted_on);
    assert_ne!(head.head, vec![1.0; head.head.len()], "the head weights were fitted");
    std::fs::copy(shipped.join("model.toml"), model.join("model.toml")).unwrap();
    // the same network without its head's table and output name: the analytic calibration is written into it
    let text_toml = std::fs::read_to_string(model.join("model.toml")).unwrap();
    let without: String = text_toml
        .split("\n[uncertainty]")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("variance ="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(model.join("model.toml"), without).unwrap();
    let out = lab(&["calibrate", "--grid", &p("val"), "--model", &m, "--cross-validate", "--descriptors", "--write", "--threads", "1"]);
    // one row per cell left out, both forms side by side, and the worst line
    for cell in [
        "| c1-ref128 |",
        "| c6-144-nopsf |",
        "with descriptors",
        "worst body distance from nominal",
        "per-frame factor on σ²",
        "noise weight",
    ] {
        assert!(out.contains(cell), "calibrate output lacks {cell:?}:\n{out}");
    }
    let toml: toml::Table = toml::from_str(&std::fs::read_to_string(model.join("model.toml")).unwrap()).unwrap();
    let u = &toml["uncertainty"];
    assert_eq!(u["descriptors"].as_array().unwrap().len(), 3, "{u}");
    assert_eq!(u["descriptor_coef"].as_array().unwrap().len(), 4, "{u}");
    assert!(u["fitted_on"].as_str().unwrap().contains("--descriptors"), "{u}");
    // the product loads the package with its descriptors
    let back = petrestore::restore::model::ModelPackage::load(&model).unwrap();
    assert_eq!(back.uncertainty.as_ref().map(|c| c.descriptors.len()), Some(3));
    // a test-split study in the grid is refused
    lab(&["dataset", "--out", &p("val/c8-highcount"), "--split", "test", "--site", "c8-highcount", "--count", "1", "--slices", "4"]);
    let o = petlab(&["calibrate", "--grid", &p("val"), "--model", &m, "--threads", "1"]);
    assert!(!o.status.success() && text(&o).contains("never on the test split"), "{}", text(&o));
}
