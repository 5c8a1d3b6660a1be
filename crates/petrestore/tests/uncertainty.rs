//! Issue 17: the uncertainty series beside a restored series, end to end:
//! DCMTK storescu → petrestore (tract, a calibrated model package) → two
//! DCMTK storescp destinations, one asking for the uncertainty series and
//! one not, and the job's one-line summary in the journal and over MQTT.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use petrestore::dicom::attrs::Attrs;
use petrestore::journal::JobState;
use testkit::*;

fn open(p: &std::path::Path) -> InMemDicomObject {
    dicom_object::open_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).into_inner()
}

/// The test package with an `[uncertainty]` table (its σ weights are not
/// fitted: the test model is untrained; the wiring is what is tested),
/// including the per-frame factor from the input's texture descriptors.
fn calibrated_test_model(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["model.onnx", "model.toml"] {
        std::fs::copy(test_model().join(f), out.join(f)).unwrap();
    }
    let mut toml = std::fs::read_to_string(out.join("model.toml")).unwrap();
    toml.push_str(
        "\n[uncertainty]\nwindow_mm = 10.0\ntexture_mm = 6.0\nclass_edges = [0.5, 1.5, 3.0]\nnoise = [1.5, 1.5, 1.5, 1.5]\ntexture = [1.0, 1.0, 1.0, 1.0]\n\
         descriptors = [\"noise_px\", \"axial_corr\"]\ndescriptor_coef = [0.5, 0.1, 0.2]\n",
    );
    std::fs::write(out.join("model.toml"), toml).unwrap();
    out
}

#[test]
fn a_destination_that_asks_gets_the_uncertainty_series_and_the_fleet_its_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let model = calibrated_test_model(tmp.path());
    let src = series(&tmp.path().join("src"), 8, 64, 91);
    let pacs = StoreScp::start(&tmp.path().join("pacs"));
    let console = StoreScp::start(&tmp.path().join("console"));
    let broker = Mosquitto::start(tmp.path(), "");
    let events = Sub::start(broker.port, "petrestore/v1/box1/jobs/#", &[]);
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!(
            "[node]\ndevice_id = \"box1\"\n[restore]\nengines = [\"tract\"]\nmodel = {model:?}\nthreads = 1\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n\
             [[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\naddress = \"127.0.0.1:{}\"\nuncertainty = true\n\
             [[destination]]\nname = \"console\"\nae_title = \"CONSOLE\"\naddress = \"127.0.0.1:{}\"\n",
            broker.port, pacs.port, console.port
        ),
    );
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(120));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);

    // the journal: the summary, the series, its count
    let u = job.uncertainty.clone().unwrap_or_else(|| panic!("no uncertainty in the job: {:#?}", job.history));
    assert_eq!(u.count, 8);
    assert!(u.summary.body_relative_sd_pct > 0.0 && u.summary.body_relative_sd_pct.is_finite(), "{u:?}");
    assert!((0.0..=100.0).contains(&u.summary.uncertain_share_pct), "{u:?}");
    assert!(job.history.iter().any(|e| e.what.starts_with("uncertainty: body σ")), "{:#?}", job.history);

    // the console: the restored series only; the PACS: both
    let on_console = console.wait_files(8, "8 instances on the console", Duration::from_secs(20));
    let on_pacs = pacs.wait_files(16, "16 instances on the PACS", Duration::from_secs(20));
    let restored_uid = job.output_series_uid.clone().unwrap();
    assert!(on_console.iter().all(|p| open(p).str_of(tags::SERIES_INSTANCE_UID).as_deref() == Some(restored_uid.as_str())));
    let mut by_series: BTreeMap<String, Vec<InMemDicomObject>> = BTreeMap::new();
    for p in &on_pacs {
        let o = open(p);
        by_series.entry(o.str_of(tags::SERIES_INSTANCE_UID).unwrap()).or_default().push(o);
    }
    assert_eq!(by_series.len(), 2, "restored and uncertainty series");
    let sigma_uid = u.series_uid.clone().unwrap();
    assert_ne!(sigma_uid, restored_uid);
    let sigma = &by_series[&sigma_uid];
    let restored = &by_series[&restored_uid];
    assert_eq!(sigma.len(), 8);
    let restored_sops: BTreeSet<String> = restored.iter().map(|o| o.str_of(tags::SOP_INSTANCE_UID).unwrap()).collect();
    let source_sops: BTreeSet<String> = src.files.iter().map(|p| open(p).str_of(tags::SOP_INSTANCE_UID).unwrap()).collect();
    let frame_of_reference = open(&src.files[0]).str_of(tags::FRAME_OF_REFERENCE_UID).unwrap();
    let mut sigma_sops = BTreeSet::new();
    for o in sigma {
        sigma_sops.insert(o.str_of(tags::SOP_INSTANCE_UID).unwrap());
        let it: Vec<String> = o.str_of(tags::IMAGE_TYPE).unwrap().split('\\').map(|s| s.trim().to_owned()).collect();
        // value 2 is PRIMARY by the PET IOD; value 3 says what it is
        assert_eq!(&it[..3], &["DERIVED", "PRIMARY", "UNCERTAINTY"], "{it:?}");
        let dd = o.str_of(tags::DERIVATION_DESCRIPTION).unwrap();
        assert!(dd.starts_with("NOT FOR DIAGNOSIS") && dd.contains("standard deviation"), "{dd}");
        assert!(o.str_of(tags::SERIES_DESCRIPTION).unwrap().ends_with("uncertainty 1SD NOT FOR DX"));
        assert!(o.str_of(tags::IMAGE_COMMENTS).unwrap().starts_with("NOT FOR DIAGNOSIS"));
        // twice the offset: offset + 1 is the next source series' restored number
        let source_number = open(&src.files[0]).i64_of(tags::SERIES_NUMBER).unwrap();
        assert_eq!(o.i64_of(tags::SERIES_NUMBER).unwrap(), source_number + 2000);
        // a window over σ, not the source's activity window
        let src0 = open(&src.files[0]);
        assert!(o.f64_of(tags::WINDOW_WIDTH).is_some_and(|w| w > 0.0), "a σ window");
        assert!(src0.get(tags::WINDOW_WIDTH).is_none() || o.f64_of(tags::WINDOW_WIDTH) != src0.f64_of(tags::WINDOW_WIDTH));
        assert_eq!(o.str_of(tags::FRAME_OF_REFERENCE_UID).unwrap(), frame_of_reference);
        // Source Image Sequence: the source instance and the restored one
        let refs: Vec<String> = o
            .get(tags::SOURCE_IMAGE_SEQUENCE)
            .and_then(|e| e.items())
            .unwrap()
            .iter()
            .map(|i| i.str_of(tags::REFERENCED_SOP_INSTANCE_UID).unwrap())
            .collect();
        assert_eq!(refs.len(), 2, "{refs:?}");
        assert!(source_sops.contains(&refs[0]) && restored_sops.contains(&refs[1]), "{refs:?}");
        // same position as the restored slice it describes
        let r = restored.iter().find(|r| r.str_of(tags::SOP_INSTANCE_UID).as_deref() == Some(refs[1].as_str())).unwrap();
        assert_eq!(o.str_of(tags::IMAGE_POSITION_PATIENT), r.str_of(tags::IMAGE_POSITION_PATIENT));
    }
    assert!(sigma_sops.is_disjoint(&restored_sops) && sigma_sops.is_disjoint(&source_sops));
    let errors = iod_errors(&on_pacs[0]);
    assert!(errors.is_empty(), "{errors:?}");
    for p in &on_pacs {
        let o = open(p);
        if o.str_of(tags::SERIES_INSTANCE_UID).as_deref() == Some(sigma_uid.as_str()) {
            let errors = iod_errors(p);
            assert!(errors.is_empty(), "uncertainty instance: {errors:?}");
            break;
        }
    }

    // the fleet: the job event carries the summary, in the schema
    let ev = events.wait_on(&format!("/jobs/{}", job.id), "the done event", Duration::from_secs(20), |v| v["state"] == "done");
    assert_schema("job_event", &ev);
    assert_eq!(ev["uncertainty"]["fraction"], 0.25, "{ev}");
    assert!(ev["uncertainty"]["body_relative_sd_pct"].as_f64().unwrap() > 0.0, "{ev}");
}

/// A destination asks for it, but the model is not calibrated: the
/// restored series goes out as always, no uncertainty series, no summary.
#[test]
fn without_a_calibrated_model_there_is_no_uncertainty_series() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 5, 64, 92);
    let pacs = StoreScp::start(&tmp.path().join("pacs"));
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!(
            "[restore]\nengines = [\"tract\"]\nmodel = {:?}\nthreads = 1\n[[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\naddress = \"127.0.0.1:{}\"\nuncertainty = true\n",
            test_model(),
            pacs.port
        ),
    );
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(120));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(job.uncertainty.is_none());
    assert_eq!(wait_for("5 instances", Duration::from_secs(20), || (pacs.files().len() == 5).then_some(5)), 5);
}

/// Enhanced PET in: the uncertainty series is one multi-frame instance
/// too, valid for dciodvfy, with the restored instance among its sources.
#[test]
fn enhanced_pet_gets_a_multi_frame_uncertainty_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let model = calibrated_test_model(tmp.path());
    let spec = petsim::SeriesSpec { slices: 12, matrix: 48, seed: 93, frame_duration_s: 30.0, ..Default::default() };
    let src = petsim::write_series_enhanced(&tmp.path().join("src"), &spec).unwrap();
    let pacs = StoreScp::start(&tmp.path().join("pacs"));
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!(
            "[series]\nmultiframe_quiet_timeout_s = 1\n[restore]\nengines = [\"tract\"]\nmodel = {model:?}\nthreads = 1\n\
             [[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\naddress = \"127.0.0.1:{}\"\nuncertainty = true\n",
            pacs.port
        ),
    );
    assert!(storescu_required(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(120));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    let got = pacs.wait_files(2, "2 instances", Duration::from_secs(20));
    let sigma_uid = job.uncertainty.as_ref().and_then(|u| u.series_uid.clone()).unwrap();
    let (sigma, restored): (Vec<_>, Vec<_>) =
        got.iter().partition(|p| open(p).str_of(tags::SERIES_INSTANCE_UID).as_deref() == Some(sigma_uid.as_str()));
    let (s, r) = (open(sigma[0]), open(restored[0]));
    assert_eq!(s.str_of(tags::NUMBER_OF_FRAMES).unwrap(), "12");
    assert_eq!(s.str_of(tags::CONTENT_QUALIFICATION).unwrap(), "RESEARCH");
    let shared = &s.element(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap()[0];
    // value 3 stays the Image Flavor; value 4, Derived Pixel Contrast, says what it is
    let values = |o: &InMemDicomObject, t| -> Vec<String> { o.str_of(t).unwrap().split('\\').map(|v| v.trim().to_owned()).collect() };
    assert_eq!(values(&s, tags::IMAGE_TYPE), ["DERIVED", "PRIMARY", "STATIC", "STD_DEVIATION"]);
    let frame_type = &shared.element(tags::PET_FRAME_TYPE_SEQUENCE).unwrap().items().unwrap()[0];
    assert_eq!(values(frame_type, tags::FRAME_TYPE), ["DERIVED", "PRIMARY", "STATIC", "STD_DEVIATION"]);
    assert_eq!(values(&r, tags::IMAGE_TYPE), ["DERIVED", "PRIMARY", "STATIC", "NONE"], "the restored series");
    let di = &shared.element(tags::DERIVATION_IMAGE_SEQUENCE).unwrap().items().unwrap()[0];
    assert!(di.str_of(tags::DERIVATION_DESCRIPTION).unwrap().starts_with("NOT FOR DIAGNOSIS"));
    let refs: Vec<String> = di
        .element(tags::SOURCE_IMAGE_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .map(|i| i.str_of(tags::REFERENCED_SOP_INSTANCE_UID).unwrap())
        .collect();
    assert_eq!(refs, vec![src.sop_uids[0].clone(), r.str_of(tags::SOP_INSTANCE_UID).unwrap()]);
    // Source Image Evidence lists every instance Source Image Sequence names:
    // the source in its series, the restored instance in the restored series
    let evidence = &s.element(tags::SOURCE_IMAGE_EVIDENCE_SEQUENCE).unwrap().items().unwrap()[0];
    let listed: Vec<(String, String)> = evidence
        .element(tags::REFERENCED_SERIES_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .flat_map(|series| {
            let uid = series.str_of(tags::SERIES_INSTANCE_UID).unwrap();
            series
                .element(tags::REFERENCED_SOP_SEQUENCE)
                .unwrap()
                .items()
                .unwrap()
                .iter()
                .map(move |i| (uid.clone(), i.str_of(tags::REFERENCED_SOP_INSTANCE_UID).unwrap()))
                .collect::<Vec<_>>()
        })
        .collect();
    let source_series = open(&src.files[0]).str_of(tags::SERIES_INSTANCE_UID).unwrap();
    assert_eq!(
        listed,
        vec![
            (source_series, src.sop_uids[0].clone()),
            (r.str_of(tags::SERIES_INSTANCE_UID).unwrap(), r.str_of(tags::SOP_INSTANCE_UID).unwrap())
        ]
    );
    // the functional groups Enhanced PET makes mandatory: a value mapping
    // on each frame's own slope, and a window over σ per frame
    let frames = s.element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap();
    for f in frames {
        let slope = f.element(tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE).unwrap().items().unwrap()[0].f64_of(tags::RESCALE_SLOPE).unwrap();
        let rw = &f.element(tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE).unwrap().items().unwrap()[0];
        assert_eq!(rw.f64_of(tags::REAL_WORLD_VALUE_SLOPE).unwrap(), slope);
        assert!(f.element(tags::FRAME_VOILUT_SEQUENCE).unwrap().items().unwrap()[0].f64_of(tags::WINDOW_WIDTH).unwrap() > 0.0);
    }
    let errors = iod_errors(sigma[0]);
    assert!(errors.is_empty(), "{errors:?}");
}

/// A site fits its own factor on σ from paired series: `petrestore eval
/// --site-uncertainty FILE` adds each pair (a short frame and the 90 s
/// frame) to the file, refuses a file fitted for another model and a
/// reference that is not 90 s without touching the file, and the daemon
/// scales σ by the file named in `restore.uncertainty_site`.
#[test]
fn a_site_fits_its_own_sigma_factor_from_paired_series_and_the_daemon_uses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = calibrated_test_model(tmp.path());
    let frame = |name: &str, seed: u64, t: f64| {
        let d = tmp.path().join(name);
        petsim::write_series(&d, &petsim::SeriesSpec { slices: 8, matrix: 64, seed, frame_duration_s: t, ..Default::default() }).unwrap();
        d
    };
    let (short, standard, sixty) = (frame("short", 93, 30.0), frame("standard", 93, 90.0), frame("sixty", 93, 60.0));
    let (short2, standard2) = (frame("short2", 95, 30.0), frame("standard2", 95, 90.0));
    let site = tmp.path().join("site.toml");
    let json = tmp.path().join("report.json");
    let p = |d: &std::path::Path| d.to_str().unwrap().to_owned();
    let eval_pair = |model: &std::path::Path, short: &std::path::Path, reference: &std::path::Path| {
        petrestore(&[
            "eval",
            "--input",
            &p(short),
            "--reference",
            &p(reference),
            "--model",
            &p(model),
            "--site-uncertainty",
            &p(&site),
            "--json",
            &p(&json),
        ])
    };
    let eval = |model: &std::path::Path, reference: &std::path::Path| eval_pair(model, &short, reference);
    let o = eval(&model, &standard);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Site calibration") && text(&o).contains("(1 pair)"), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["uncertainty"]["site"]["pairs"], 1, "{r}");
    let one = petrestore::restore::uncertainty::SiteCalibration::load(&site).unwrap();
    assert!(one.model.starts_with("petrestore-test-unet@"), "{}", one.model);
    // in sample, the fitted factor covers 68.3 % of the voxels it was fitted on
    assert!((one.coverage(1.0) - 68.27).abs() < 0.5, "{}", one.coverage(1.0));
    assert!(one.scale.iter().all(|s| *s > 0.0) && one.voxels.iter().sum::<u64>() > 1000, "{one:?}");

    assert!(r["uncertainty"]["site"]["before_this_pair"].is_null(), "{r}");

    // the same pair again is refused; a second pair accumulates, and is
    // first checked against the factor of the first (held out)
    let bytes = std::fs::read(&site).unwrap();
    let o = eval(&model, &standard);
    assert!(!o.status.success() && text(&o).contains("already holds this pair"), "{}", text(&o));
    assert_eq!(std::fs::read(&site).unwrap(), bytes);
    let o = eval_pair(&model, &short2, &standard2);
    assert!(o.status.success() && text(&o).contains("(2 pairs)") && text(&o).contains("(held out)"), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let held = r["uncertainty"]["site"]["before_this_pair"].as_array().unwrap();
    assert!(held.iter().all(|v| (0.0..=100.0).contains(&v.as_f64().unwrap())), "{r}");
    let two = petrestore::restore::uncertainty::SiteCalibration::load(&site).unwrap();
    assert_eq!(two.pairs.len(), 2);
    assert!(two.voxels.iter().sum::<u64>() > one.voxels.iter().sum::<u64>());
    // classes under 2,000 voxels take the pooled factor: near 68.3 %, not at it
    assert!((two.coverage(1.0) - 68.27).abs() < 5.0, "{}", two.coverage(1.0));
    let bytes = std::fs::read(&site).unwrap();

    // the file of another model, and a 60 s reference, are refused; the file stays as it was
    let shipped = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let o = eval(&shipped, &standard);
    assert!(!o.status.success() && text(&o).contains("was fitted for model") && text(&o).contains("fit a new file"), "{}", text(&o));
    let o = eval(&model, &sixty);
    assert!(!o.status.success() && text(&o).contains("give the 90 s frame"), "{}", text(&o));
    assert_eq!(std::fs::read(&site).unwrap(), bytes);

    // check-config says what the daemon will do with it, for each model
    let cfg = |m: &std::path::Path| {
        let f = tmp.path().join("check.toml");
        std::fs::write(
            &f,
            format!(
                "[node]\nstate_dir = {:?}\n[restore]\nengines = [\"tract\"]\nmodel = {m:?}\nuncertainty_site = {site:?}\n",
                tmp.path().join("s")
            ),
        )
        .unwrap();
        petrestore(&["check-config", &p(&f)])
    };
    let o = cfg(&model);
    assert!(o.status.success() && text(&o).contains("σ scaled by the site's calibration (2 pairs)"), "{}", text(&o));
    let o = cfg(&shipped);
    assert!(o.status.success() && text(&o).contains("would not be used: it was fitted for model"), "{}", text(&o));

    // the daemon scales σ by it: the same series with and without the file
    let src = series(&tmp.path().join("src"), 8, 64, 94);
    let body_sd = |name: &str, extra: &str| {
        let d =
            Daemon::start(&tmp.path().join(name), &format!("[restore]\nengines = [\"tract\"]\nmodel = {model:?}\nthreads = 1\n{extra}"));
        assert!(storescu(d.port, CONSOLE, &src.files).status.success());
        let job = d.wait_terminal(&job_id(&src), Duration::from_secs(120));
        assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
        (job.uncertainty.unwrap_or_else(|| panic!("{:#?}", job.history)).summary.body_relative_sd_pct, d.log())
    };
    let (plain, _) = body_sd("plain", "");
    let (scaled, log) = body_sd("scaled", &format!("uncertainty_site = {site:?}\n"));
    assert!(log.contains("σ scaled by the site's own calibration"), "{log}");
    // over body voxels (classes body, warm, hot) the ratio is a mean of their factors
    let (lo, hi) = two.scale[1..].iter().fold((f64::MAX, 0.0f64), |(a, b), s| (a.min(*s), b.max(*s)));
    let ratio = scaled / plain;
    assert!((ratio - 1.0).abs() > 0.01 && ratio > lo - 1e-3 && ratio < hi + 1e-3, "σ ratio {ratio}, factors {:?}", two.scale);
}
