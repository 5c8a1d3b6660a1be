//! The command line as an operator meets it: config checking, offline
//! restore, jobs while the daemon runs, the demo, a clean SIGTERM stop.

use std::time::Duration;

use petrestore::journal::JobState;
use testkit::*;

#[test]
fn print_default_config_round_trips_through_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = petrestore(&["print-default-config"]);
    assert!(out.status.success());
    let f = tmp.path().join("c.toml");
    std::fs::write(&f, &out.stdout).unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("OK"));
}

#[test]
fn check_config_names_the_key_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.toml");
    for (toml, key, fix) in [
        ("[dicom]\nlisten = \"11112\"\n", "dicom.listen", "IP:PORT"),
        ("[dicom]\nmax_associations = 0\n", "dicom.max_associations", "set 1 or more"),
        ("[restore]\nengines = [\"quantum\"]\n", "restore.engines", "this build has"),
        ("[[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\naddress = \"10.0.0.1\"\n", "destination.address", "HOST:PORT"),
        ("[dicom]\nae_titel = \"X\"\n", "ae_titel", "unknown field"),
    ] {
        std::fs::write(&f, toml).unwrap();
        let out = petrestore(&["check-config", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let t = text(&out);
        assert!(t.contains(key) && t.contains(fix), "{toml}: {t}");
    }
    let out = petrestore(&["check-config", "/nonexistent/petrestore.toml"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("cannot read config file /nonexistent/petrestore.toml"));
}

/// check-config loads the TLS files as the daemon does: a file that exists
/// but holds no certificate or key fails here, not at the daemon's start
/// (where systemd would restart it in a loop); paths must be absolute.
#[test]
fn check_config_parses_the_tls_files_as_the_daemon_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir, &["box"]);
    std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
    let f = dir.join("c.toml");
    let check = |toml: String| {
        std::fs::write(&f, format!("[restore]\nengines = [\"gaussian\"]\n{toml}")).unwrap();
        petrestore(&["check-config", f.to_str().unwrap()])
    };
    let p = |name: &str| dir.join(name);
    let dicom = |cert: &str, key: &str| format!("[dicom.tls]\nlisten = \"127.0.0.1:2762\"\ncert = {:?}\nkey = {:?}\n", p(cert), p(key));
    let mqtt = |ca: &str| format!("[node]\ndevice_id = \"ward3\"\n[mqtt]\nurl = \"mqtts://127.0.0.1:8883\"\nca_file = {:?}\n", p(ca));
    let out = check(dicom("server.pem", "server.key"));
    assert!(out.status.success(), "{}", text(&out));
    let out = check(dicom("junk.pem", "server.key"));
    assert!(!out.status.success() && text(&out).contains("dicom.tls.cert") && text(&out).contains("no certificate"), "{}", text(&out));
    let out = check(dicom("server.pem", "junk.pem"));
    assert!(!out.status.success() && text(&out).contains("dicom.tls.key") && text(&out).contains("no private key"), "{}", text(&out));
    let out = check(mqtt("ca.pem"));
    assert!(out.status.success(), "{}", text(&out));
    let out = check(mqtt("junk.pem"));
    assert!(!out.status.success() && text(&out).contains("mqtt.ca_file") && text(&out).contains("no certificate"), "{}", text(&out));
    let out = check("[dicom.tls]\nlisten = \"127.0.0.1:2762\"\ncert = \"server.pem\"\nkey = \"server.key\"\n".into());
    assert!(!out.status.success() && text(&out).contains("server.pem is a relative path"), "{}", text(&out));
}

/// A box that reports to a fleet with the shipped device_id would share
/// its topics and MQTT client id with every other such box: check-config
/// says so (a note: the file is valid).
#[test]
fn check_config_notes_a_shipped_device_id_with_mqtt() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.toml");
    let mqtt = "[restore]\nengines = [\"gaussian\"]\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n";
    std::fs::write(&f, mqtt).unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("node.device_id is the shipped default (petrestore-01)"), "{}", text(&out));
    std::fs::write(&f, format!("[node]\ndevice_id = \"ward3-pet\"\n{mqtt}")).unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert!(out.status.success() && !text(&out).contains("device_id"), "{}", text(&out));
}

/// Issue 20: a file with several mistakes gets all of them in one run.
#[test]
fn check_config_reports_every_problem_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.toml");
    std::fs::write(
        &f,
        "[dicom]\nlisten = \"11112\"\nmax_associations = 0\nnon_pet = \"keep\"\n[restore]\nengines = [\"quantum\"]\n\
         [[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\naddress = \"10.0.0.1\"\n",
    )
    .unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(t.contains("5 problems"), "{t}");
    for key in ["dicom.listen", "dicom.max_associations", "dicom.non_pet", "restore.engines", "destination.address"] {
        assert!(t.contains(&format!("`{key}`")), "{key} missing: {t}");
    }
}

/// The ONNX Runtime library and the model package are checked the way the
/// daemon would load them: a missing library is a note (the daemon falls
/// back to the next engine), a corrupt model an error.
#[test]
fn check_config_loads_the_ort_library_and_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.toml");
    let cfg = |lib: &std::path::Path, model: &std::path::Path| {
        format!("[restore]\nengines = [\"ort\", \"tract\"]\nmodel = {model:?}\nort_library = {lib:?}\n")
    };
    std::fs::write(&f, cfg(&ort_library(), &test_model())).unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("engines that would run: ort (") && text(&out).contains("tract, model petrestore-test-unet@"),
        "{}",
        text(&out)
    );

    std::fs::write(&f, cfg(std::path::Path::new("/nonexistent/libonnxruntime.so.1"), &test_model())).unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("engine ort cannot run here") && t.contains("/nonexistent/libonnxruntime.so.1") && t.contains("would run: tract"),
        "{t}"
    );

    // a model whose ONNX file is not the one model.toml describes
    let bad = tmp.path().join("bad-model");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(test_model().join("model.toml"), bad.join("model.toml")).unwrap();
    std::fs::write(bad.join("model.onnx"), b"not the model").unwrap();
    std::fs::write(&f, cfg(&ort_library(), &bad)).unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("sha256") && text(&out).contains("reinstall the model package"), "{}", text(&out));
}

#[test]
fn check_config_checks_the_model_package_it_names() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.toml");
    // a folder that is not there: an error naming the key
    std::fs::write(&f, "[restore]\nengines = [\"tract\"]\nmodel = \"/nonexistent/model\"\n").unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("restore.model /nonexistent/model holds no model.toml"), "{}", text(&out));
    // the installed default path, not installed here: OK, with what would run
    std::fs::write(&f, "").unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no model package installed") && text(&out).contains("only the engines without a model (gaussian)"),
        "{}",
        text(&out)
    );
    // a real package: OK
    let model = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    std::fs::write(&f, format!("[restore]\nmodel = {:?}\nort_library = {:?}\n", model.display().to_string(), ort_library())).unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert!(out.status.success() && !text(&out).contains("note:"), "{}", text(&out));
}

#[test]
fn the_gaussian_never_stands_in_for_a_model_no_engine_can_run() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("in"), 6, 32, 42);
    let model = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let f = tmp.path().join("c.toml");
    std::fs::write(
        &f,
        format!(
            "[restore]\nengines = [\"ort\", \"gaussian\"]\nmodel = {:?}\nort_library = \"/nonexistent/libonnxruntime.so.1\"\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let out = petrestore(&["check-config", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("the Gaussian does not stand in for the model"), "{}", text(&out));
    let out_dir = tmp.path().join("out");
    let out = petrestore(&[
        "restore",
        "--input",
        tmp.path().join("in").to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--config",
        f.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no engine can run it") && text(&out).contains("/nonexistent/libonnxruntime.so.1"), "{}", text(&out));
    assert!(files_under(&out_dir).is_empty(), "nothing written");
    drop(src);
}

#[test]
fn offline_restore_uses_the_worker_code() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("in"), 6, 32, 41);
    let out_dir = tmp.path().join("out");
    let out = petrestore(&[
        "restore",
        "--input",
        tmp.path().join("in").to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--engine",
        "gaussian",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("restored 6 slices with gaussian"));
    assert_eq!(files_under(&out_dir).len(), 6);
    let derived = petrestore::restore::volume::load(&files_under(&out_dir)).unwrap();
    let source = petrestore::restore::volume::load(&src.files).unwrap();
    assert_eq!(derived.volume.nz, source.volume.nz);
    // the complete series gets the UIDs the daemon gives it; four of its six
    // slices (other pixels: the context and normalisation are volume-wide)
    // get others, as the daemon gives a series processed without all of them
    use dicom_dictionary_std::tags;
    use petrestore::dicom::attrs::Attrs;
    let series_uid = |dir: &std::path::Path| {
        dicom_object::open_file(&files_under(dir)[0]).unwrap().into_inner().str_of(tags::SERIES_INSTANCE_UID).unwrap()
    };
    let complete = petrestore::dicom::uid::derived_uid(&src.series_uid, &complete_salt("gaussian-fwhm4.00mm", "gaussian"));
    assert_eq!(series_uid(&out_dir), complete);
    let part = tmp.path().join("part");
    std::fs::create_dir_all(&part).unwrap();
    for f in &src.files[..4] {
        std::fs::copy(f, part.join(f.file_name().unwrap())).unwrap();
    }
    let part_out = tmp.path().join("part-out");
    let i = part.to_str().unwrap();
    let out = petrestore(&["restore", "--input", i, "--output", part_out.to_str().unwrap(), "--engine", "gaussian"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(series_uid(&part_out), complete, "four slices of six must not take the complete series' UIDs");

    // refuses to mix into a non-empty folder, and unknown engines
    let again = petrestore(&["restore", "--input", tmp.path().join("in").to_str().unwrap(), "--output", out_dir.to_str().unwrap()]);
    assert!(!again.status.success() && text(&again).contains("not empty"), "{}", text(&again));
    let bad = petrestore(&["restore", "--input", tmp.path().join("in").to_str().unwrap(), "--output", "/tmp/x", "--engine", "magic"]);
    assert!(!bad.status.success() && text(&bad).contains("unknown engine"), "{}", text(&bad));
    // a 90 s series is outside the selection rules: said so, not restored
    let spec = petsim::SeriesSpec { slices: 4, matrix: 32, frame_duration_s: 90.0, seed: 43, ..Default::default() };
    petsim::write_series(&tmp.path().join("in90"), &spec).unwrap();
    let skip = petrestore(&[
        "restore",
        "--input",
        tmp.path().join("in90").to_str().unwrap(),
        "--output",
        tmp.path().join("o90").to_str().unwrap(),
    ]);
    assert!(!skip.status.success() && text(&skip).contains("Actual Frame Duration is 90.0 s"), "{}", text(&skip));
}

#[test]
fn jobs_commands_work_while_the_daemon_runs_and_after_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 4, 32, 45);
    let mut d = Daemon::start(&tmp.path().join("d"), "");
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    let job = d.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "no destinations: done after restoration");
    let state = d.state_dir();
    let list = petrestore(&["jobs", "--state-dir", state.to_str().unwrap(), "list"]);
    assert!(list.status.success() && text(&list).contains(&id) && text(&list).contains("done"), "{}", text(&list));
    let show = petrestore(&["jobs", "--state-dir", state.to_str().unwrap(), "show", &id]);
    assert!(show.status.success() && text(&show).contains(&src.series_uid));
    let missing = petrestore(&["jobs", "--state-dir", state.to_str().unwrap(), "show", "0000000000000000"]);
    assert!(!missing.status.success() && text(&missing).contains("no job"));
    // without --config or --state-dir, the daemon's own file is read
    // ($PETRESTORE_CONFIG here; /etc/petrestore/petrestore.toml on a box)
    let with_env = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_petrestore"))
            .args(args)
            .env("PETRESTORE_CONFIG", &d.config)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let r = petrestore(&["reload", "--config", d.config.to_str().unwrap()]);
    assert!(r.status.success() && text(&r).contains("nothing changed"), "{}", text(&r));
    // another file with the same state directory: not what the daemon reads
    let other = tmp.path().join("other.toml");
    std::fs::copy(&d.config, &other).unwrap();
    let r = petrestore(&["reload", "--config", other.to_str().unwrap()]);
    assert!(!r.status.success() && text(&r).contains(&format!("the daemon reads {}", d.config.display())), "{}", text(&r));
    let list = with_env(&["jobs", "list"]);
    assert!(list.status.success() && text(&list).contains(&id), "{}", text(&list));
    assert!(with_env(&["status"]).status.success());
    // a folder no daemon used: refused, and no empty journal made there
    let nowhere = tmp.path().join("nowhere");
    let list = petrestore(&["jobs", "--state-dir", nowhere.to_str().unwrap(), "list"]);
    assert!(!list.status.success() && text(&list).contains("--config FILE"), "{}", text(&list));
    assert!(!nowhere.exists(), "nothing created");
    let status = petrestore(&["status", "--state-dir", nowhere.to_str().unwrap()]);
    assert!(!status.status.success() && text(&status).contains("--state-dir DIR"), "{}", text(&status));

    // SIGTERM: a clean stop, then the journal is readable without the daemon
    let st = d.stop();
    assert!(st.success(), "clean exit on SIGTERM: {st}\n{}", d.log());
    assert!(d.log().contains("petrestore stopped"));
    let list = petrestore(&["jobs", "--state-dir", state.to_str().unwrap(), "list"]);
    assert!(list.status.success() && text(&list).contains(&id), "{}", text(&list));
    let retry = petrestore(&["jobs", "--state-dir", state.to_str().unwrap(), "retry", &id]);
    assert!(retry.status.success(), "{}", text(&retry));
    assert!(text(&retry).contains("next start"));
    d.restart();
    let job = d.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done);
    assert!(job.history.iter().any(|e| e.what.contains("retry requested")));
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"), "");
    let cfg = d.config.to_str().unwrap().to_owned();
    // same config, other port
    let text2 = std::fs::read_to_string(&cfg).unwrap().replace(&format!("127.0.0.1:{}", d.port), &format!("127.0.0.1:{}", free_port()));
    let cfg2 = tmp.path().join("c2.toml");
    std::fs::write(&cfg2, text2).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_petrestore"))
        .args(["serve", "--config", cfg2.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_for("the second daemon to exit", Duration::from_secs(30), || child.try_wait().unwrap());
    assert!(!st.success());
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("another petrestore process"), "{err}");
}

/// The first-run demo: a simulated patient restored with the shipped model
/// through the real daemon, the table and the pictures (issue 20).
#[test]
fn demo_restores_with_the_shipped_model_and_draws_the_result() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("demo");
    let run = || petrestore(&["demo", "--workdir", work.to_str().unwrap(), "--slices", "12", "--matrix", "80", "--engine", "tract"]);
    let out = run();
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("restored with tract") && t.contains("petrestore-unet25d"), "{t}");
    // the receiving node gets the restored series and, the model being calibrated, the σ series beside it
    let pacs = files_under(&work.join("pacs"));
    assert_eq!(pacs.len(), 24);
    let sigma_files = pacs
        .iter()
        .filter(|f| {
            let obj = dicom_object::open_file(f).unwrap();
            obj.element(dicom_dictionary_std::tags::SERIES_DESCRIPTION)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end()
                .ends_with("uncertainty 1SD NOT FOR DX")
        })
        .count();
    assert_eq!(sigma_files, 12, "12 restored and 12 σ instances");
    // the table: restoration lowers the liver noise and keeps its mean
    let row = |name: &str| -> Vec<f64> {
        let line = t.lines().find(|l| l.trim_start().starts_with(name)).unwrap_or_else(|| panic!("no {name:?} row:\n{t}"));
        line[line.find(|c: char| c.is_ascii_digit()).unwrap()..].split_whitespace().filter_map(|v| v.parse().ok()).collect()
    };
    let (mean, noise) = (row("liver SUVmean"), row("liver noise"));
    assert!(noise[1] < noise[0], "restored noise {} not below the input's {}", noise[1], noise[0]);
    assert!((mean[1] / mean[0] - 1.0).abs() < 0.03, "liver mean moved: {mean:?}");
    assert!(t.contains("seed metric") && t.contains("66.7 %"), "{t}");
    // the demo's seed metric is the one site acceptance measures on the
    // same series (`petrestore eval`, the demo's 30 s and 90 s folders)
    let demo_seed: f64 = {
        let line = t.lines().find(|l| l.contains("seed metric (MSE")).unwrap();
        let after = &line[line.find("):").unwrap() + 2..];
        after.split_whitespace().next().unwrap().parse().unwrap()
    };
    let model = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let study = work.join("study");
    let e = petrestore(&[
        "eval",
        "--input",
        study.join("PT30").to_str().unwrap(),
        "--reference",
        study.join("PT90").to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--engine",
        "tract",
    ]);
    assert!(e.status.success(), "{}", text(&e));
    let eval_seed: f64 = {
        let et = text(&e);
        let row = et.lines().find(|l| l.starts_with("| model ")).unwrap_or_else(|| panic!("{et}")).to_string();
        row.split('|').nth(2).unwrap().trim().parse().unwrap()
    };
    assert!((demo_seed - eval_seed).abs() <= 0.3, "demo says {demo_seed} %, eval says {eval_seed} %");
    // the shipped model is calibrated: σ, its check against the 90 s image, and its picture
    assert!(t.contains("uncertainty (1 SD") && t.contains("68.3 % if σ is right"), "{t}");
    // site acceptance checks σ against the reference the same way
    let within = |text: &str, marker: &str| -> f64 {
        let at = text.find(marker).unwrap_or_else(|| panic!("no {marker:?} in:\n{text}")) + marker.len();
        text[at..].split_whitespace().next().unwrap().trim_end_matches('%').parse().unwrap()
    };
    let demo_cov = within(&t, "lies within restored ± σ in ");
    let eval_cov = within(&text(&e), "lies within restored ± σ in ");
    assert!((demo_cov - eval_cov).abs() <= 1.0, "σ coverage: demo {demo_cov} %, eval {eval_cov} %");
    assert!(text(&e).contains("within ± 1.96 σ in"), "{}", text(&e));
    for png in ["coronal-mip.png", "axial-lesion.png", "lesion-profile.png", "axial-uncertainty.png"] {
        let b = std::fs::read(work.join("figures").join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }
    assert!(!work.join("state").exists(), "the daemon's working state is removed");
    // a second run reuses its own folder; a foreign folder is refused
    assert!(run().status.success());
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine").unwrap();
    let o = petrestore(&["demo", "--workdir", foreign.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("not a demo folder"), "{}", text(&o));
    assert!(foreign.join("keep.txt").exists());
}

#[test]
fn offline_restore_takes_relative_folders() {
    // As an operator types it, from inside a working folder.
    let tmp = tempfile::tempdir().unwrap();
    series(&tmp.path().join("in"), 4, 32, 45);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_petrestore"))
        .args(["restore", "--input", "in", "--output", "out", "--engine", "gaussian"])
        .current_dir(tmp.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(files_under(&tmp.path().join("out")).len(), 4);
}

#[test]
fn simulated_and_derived_pet_pass_the_iod_validator() {
    // dicom3tools' dciodvfy checks every module of the PET Image IOD: the
    // simulator must produce what a scanner sends, and the derived series
    // must stay a valid PET image (DERIVED, Source Image Sequence, ...).
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("in"), 4, 32, 46);
    let out_dir = tmp.path().join("out");
    let out = petrestore(&[
        "restore",
        "--input",
        tmp.path().join("in").to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--engine",
        "gaussian",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for f in [&src.files[0], &files_under(&out_dir)[0]] {
        let errors = iod_errors(f);
        assert!(errors.is_empty(), "{}: {errors:#?}", f.display());
    }
}

#[test]
fn series_missing_frame_duration_and_units_is_explained_and_can_be_supplied() {
    use dicom_dictionary_std::tags;
    use petrestore::dicom::attrs::Attrs;
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("orig"), 5, 32, 47);
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    for (i, f) in src.files.iter().enumerate() {
        let mut obj = dicom_object::open_file(f).unwrap();
        obj.remove_element(tags::ACTUAL_FRAME_DURATION);
        obj.remove_element(tags::UNITS);
        obj.write_to_file(input.join(format!("{i}.dcm"))).unwrap();
    }
    let out = petrestore(&["restore", "--input", input.to_str().unwrap(), "--output", tmp.path().join("o1").to_str().unwrap()]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("Units (0054,1001) missing") && t.contains("--units"), "{t}");
    // what would be written into the derived series is checked as the config's settings are
    for (flag, bad) in [("--units", "BQ\\ML"), ("--tracer", "FDG – x")] {
        let out =
            petrestore(&["restore", "--input", input.to_str().unwrap(), "--output", tmp.path().join("o0").to_str().unwrap(), flag, bad]);
        assert!(!out.status.success() && text(&out).contains(flag) && text(&out).contains("printable ASCII"), "{}", text(&out));
    }

    let out = petrestore(&[
        "restore",
        "--input",
        input.to_str().unwrap(),
        "--output",
        tmp.path().join("o2").to_str().unwrap(),
        "--units",
        "BQML",
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("Actual Frame Duration (0018,1242) missing") && t.contains("--frame-duration"), "{t}");

    let o3 = tmp.path().join("o3");
    let out = petrestore(&[
        "restore",
        "--input",
        input.to_str().unwrap(),
        "--output",
        o3.to_str().unwrap(),
        "--units",
        "BQML",
        "--frame-duration",
        "30",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("assumed 30 s"), "{}", text(&out));
    let derived = dicom_object::open_file(&files_under(&o3)[0]).unwrap().into_inner();
    let dd = derived.str_of(tags::DERIVATION_DESCRIPTION).unwrap();
    assert!(dd.contains("assumed 30 s") && dd.contains("assumed BQML"), "{dd}");
    assert!(derived.str_of(tags::ACTUAL_FRAME_DURATION).is_none(), "the output must not gain a frame duration the scanner did not record");
    // another assumed duration gives other pixels, so other UIDs; the same
    // assumption again gives the same UIDs
    let series_uid = |frame_duration: &str, out: &str| {
        let o = tmp.path().join(out);
        let i = input.to_str().unwrap();
        let args = ["restore", "--input", i, "--output", o.to_str().unwrap(), "--units", "BQML", "--frame-duration", frame_duration];
        let run = petrestore(&args);
        assert!(run.status.success(), "{}", text(&run));
        dicom_object::open_file(&files_under(&o)[0]).unwrap().into_inner().str_of(tags::SERIES_INSTANCE_UID).unwrap()
    };
    let first = derived.str_of(tags::SERIES_INSTANCE_UID).unwrap();
    assert_ne!(series_uid("60", "o4"), first, "a corrected frame duration must not reuse the series' UIDs");
    assert_eq!(series_uid("30", "o5"), first);
}

#[test]
fn a_model_restores_only_its_tracers() {
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("orig"), 5, 32, 49);
    let input = tmp.path().join("psma");
    std::fs::create_dir_all(&input).unwrap();
    for (i, f) in src.files.iter().enumerate() {
        let mut obj = dicom_object::open_file(f).unwrap();
        let mut item = obj.element(tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE).unwrap().items().unwrap()[0].clone();
        item.put(DataElement::new(tags::RADIOPHARMACEUTICAL, VR::LO, PrimitiveValue::from("Ga-68 PSMA-11")));
        item.remove_element(tags::RADIOPHARMACEUTICAL_CODE_SEQUENCE);
        obj.put(DataElement::new(tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE, VR::SQ, DataSetSequence::from(vec![item])));
        obj.write_to_file(input.join(format!("{i}.dcm"))).unwrap();
    }
    let model = test_model();
    let run = |engine: &str, out: &str| {
        petrestore(&[
            "restore",
            "--input",
            input.to_str().unwrap(),
            "--output",
            tmp.path().join(out).to_str().unwrap(),
            "--engine",
            engine,
            "--model",
            model.to_str().unwrap(),
        ])
    };
    // The model (trained for FDG) refuses a PSMA series, and says why.
    let out = run("tract", "o1");
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("selection rules") && t.contains("\"Ga-68 PSMA-11\" is not one the model was trained for (Fluorodeoxyglucose)"),
        "{t}"
    );
    assert!(!tmp.path().join("o1").exists() || files_under(&tmp.path().join("o1")).is_empty());
    // The classical filter has no model and no tracer rule.
    let out = run("gaussian", "o2");
    assert!(out.status.success(), "{}", text(&out));
    // The unchanged FDG series passes the same model.
    let out = petrestore(&[
        "restore",
        "--input",
        tmp.path().join("orig").to_str().unwrap(),
        "--output",
        tmp.path().join("o3").to_str().unwrap(),
        "--engine",
        "tract",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn enhanced_and_legacy_converted_pet_restore_offline_and_stay_valid() {
    use dicom_dictionary_std::tags;
    use petrestore::dicom::attrs::Attrs;
    let tmp = tempfile::tempdir().unwrap();
    let spec = petsim::SeriesSpec { slices: 6, matrix: 32, seed: 51, frame_duration_s: 30.0, ..Default::default() };
    let enhanced = petsim::write_series_enhanced(&tmp.path().join("enh"), &spec).unwrap();
    let legacy = petsim::write_series_legacy(&tmp.path().join("leg"), &spec).unwrap();
    for (name, src, class) in [
        ("enh", &enhanced, petrestore::dicom::ENHANCED_PET_IMAGE_STORAGE),
        ("leg", &legacy, petrestore::dicom::LEGACY_ENHANCED_PET_IMAGE_STORAGE),
    ] {
        // The neural engine (tracer and duration read from the functional
        // groups / converted attributes) and the Gaussian both take it.
        for engine in ["tract", "gaussian"] {
            let out_dir = tmp.path().join(format!("{name}-{engine}"));
            let out = petrestore(&[
                "restore",
                "--input",
                src.files[0].parent().unwrap().to_str().unwrap(),
                "--output",
                out_dir.to_str().unwrap(),
                "--engine",
                engine,
                "--model",
                test_model().to_str().unwrap(),
            ]);
            assert!(out.status.success(), "{name} {engine}: {}", text(&out));
            assert!(text(&out).contains("restored 6 slices in 1 multi-frame instance"), "{}", text(&out));
            let files = files_under(&out_dir);
            assert_eq!(files.len(), 1);
            let errors = iod_errors(&files[0]);
            assert!(errors.is_empty(), "{name} {engine}: {errors:#?}");
            let o = dicom_object::open_file(&files[0]).unwrap().into_inner();
            assert_eq!(o.str_of(tags::SOP_CLASS_UID).as_deref(), Some(class));
            // the test model's output is marked as research content; the filter's keeps the source's
            let cq = if engine == "tract" { "RESEARCH" } else { "PRODUCT" };
            assert_eq!(o.str_of(tags::CONTENT_QUALIFICATION).as_deref(), Some(cq), "{name} {engine}");
            let loaded = petrestore::restore::volume::load(&files).unwrap();
            assert_eq!(loaded.volume.nz, 6);
            // a 30 s frame stays 30 s wherever the source recorded it
            assert_eq!(petrestore::dicom::frames::frame_duration_ms(&o, Some(0)), Some(30000.0), "{name}");
        }
        let errors = iod_errors(&src.files[0]);
        assert!(errors.is_empty(), "{name} source: {errors:#?}");
    }
    // Site acceptance on Enhanced PET pairs: durations come from the frames.
    let spec90 = petsim::SeriesSpec { frame_duration_s: 90.0, ..spec };
    petsim::write_series_enhanced(&tmp.path().join("enh90"), &spec90).unwrap();
    let json = tmp.path().join("site.json");
    let out = petrestore(&[
        "eval",
        "--input",
        tmp.path().join("enh").to_str().unwrap(),
        "--reference",
        tmp.path().join("enh90").to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!((r["input_duration_s"].as_f64(), r["reference_duration_s"].as_f64()), (Some(30.0), Some(90.0)), "{r}");
}

/// The systemd notify protocol, spoken to a real datagram socket as systemd
/// listens on it: READY=1 once the listener is bound, WATCHDOG=1 at half
/// the interval while every stage is alive, STOPPING=1 at SIGTERM.
#[test]
fn systemd_notify_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let port = free_port();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("[node]\nstate_dir = {:?}\nmin_free_mb = 1\n[dicom]\nlisten = \"127.0.0.1:{port}\"\n", tmp.path().join("state")),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_petrestore"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // While the engines are built (minutes for a first TensorRT build) the
    // start says so; a reload asked for meanwhile (SIGHUP, whose default
    // action would end the process) waits for the daemon to be up.
    let first = next();
    assert!(first.starts_with("STATUS=building the restoration engines"), "{first}");
    assert!(std::process::Command::new("kill").arg("-HUP").arg(child.id().to_string()).status().unwrap().success());
    let mut before_ready = vec![first];
    loop {
        let m = next();
        if m.starts_with("READY=1\n") {
            assert!(m.contains("STATUS=ready"), "{m}");
            break;
        }
        assert!(m.starts_with("STATUS=") || m.starts_with("EXTEND_TIMEOUT_USEC="), "{m}");
        before_ready.push(m);
    }
    assert_eq!(before_ready.last().map(String::as_str), Some("STATUS=starting\n"), "{before_ready:?}");
    assert!(child.try_wait().unwrap().is_none(), "alive after a SIGHUP during the start");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "READY only after the listener is bound");
    for _ in 0..3 {
        assert_eq!(next(), "WATCHDOG=1\n");
    }
    // reloads more often than the pings (every 50 ms against 200 ms, as a
    // fleet agent pushing configuration might) do not hold the pings back
    let pid = child.id().to_string();
    let hups = std::thread::spawn(move || {
        for _ in 0..30 {
            assert!(std::process::Command::new("kill").arg("-HUP").arg(&pid).status().unwrap().success());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    sock.set_read_timeout(Some(std::time::Duration::from_millis(100))).unwrap();
    let (mut during, mut b) = (Vec::new(), [0u8; 256]);
    while !hups.is_finished() {
        if let Ok(n) = sock.recv(&mut b) {
            during.push(String::from_utf8_lossy(&b[..n]).into_owned());
        }
    }
    hups.join().unwrap();
    assert!(during.iter().filter(|m| *m == "WATCHDOG=1\n").count() >= 3, "pings while reloading: {during:?}");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    assert!(std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
    let stopping = (0..10).map(|_| next()).find(|m| m.starts_with("STOPPING"));
    assert_eq!(
        stopping.as_deref(),
        Some("STOPPING=1\nSTATUS=stopping: finishing open associations and the running restoration\n"),
        "systemctl status says why the stop takes time"
    );
    assert!(child.wait().unwrap().success());
}

/// Issue 17: `restore --uncertainty` writes the uncertainty series beside
/// the restored one with a calibrated model, and names the fix without one.
#[test]
fn offline_restore_writes_the_uncertainty_series_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    clinical_series(&tmp.path().join("in"), 8, 64, 47);
    let model = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let out_dir = tmp.path().join("out");
    let args = |out: &std::path::Path, engine: &str| {
        petrestore(&[
            "restore",
            "--input",
            tmp.path().join("in").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--engine",
            engine,
            "--model",
            model.to_str().unwrap(),
            "--uncertainty",
        ])
    };
    let o = args(&out_dir, "tract");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("uncertainty: body σ") && text(&o).contains("not for diagnosis"), "{}", text(&o));
    let sigma = files_under(&out_dir.join("uncertainty"));
    assert_eq!(sigma.len(), 8);
    assert_eq!(files_under(&out_dir).len(), 16);
    let o = dicom_object::open_file(&sigma[0]).unwrap();
    let dd = o.element(dicom_dictionary_std::tags::DERIVATION_DESCRIPTION).unwrap().to_str().unwrap().to_string();
    assert!(dd.starts_with("NOT FOR DIAGNOSIS"), "{dd}");
    // the Gaussian filter has no calibration: said so, with the fix
    let g = args(&tmp.path().join("outg"), "gaussian");
    assert!(
        !g.status.success() && text(&g).contains("no uncertainty calibration") && text(&g).contains("petlab calibrate"),
        "{}",
        text(&g)
    );
}

#[test]
fn a_frame_outside_the_models_durations_is_skipped_not_filtered() {
    // The model package says which frame durations (and pixel sizes) it was trained for;
    // restore.min/max_frame_duration_s may be wider. A frame inside the
    // config's window and outside the model's must not fall through to the
    // next engine (the Gaussian): it is skipped, with the model's range named.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.toml", "model.onnx"] {
        std::fs::copy(test_model().join(f), model.join(f)).unwrap();
    }
    let toml = std::fs::read_to_string(model.join("model.toml")).unwrap();
    assert!(toml.contains("frame_durations_s = [20.0, 75.0]"), "the test model's range changed: {toml}");
    std::fs::write(
        model.join("model.toml"),
        toml.replace("frame_durations_s = [20.0, 75.0]", "frame_durations_s = [27.0, 66.0]\npixel_mm = [2.0, 5.3]"),
    )
    .unwrap();
    let config = tmp.path().join("petrestore.toml");
    std::fs::write(
        &config,
        format!(
            "[restore]\nengines = [\"tract\", \"gaussian\"]\nmodel = {:?}\nmin_frame_duration_s = 20.0\nmax_frame_duration_s = 75.0\n",
            model.display()
        ),
    )
    .unwrap();
    let run_at = |secs: f64, pixel_mm: f64, out: &str| {
        let dir = tmp.path().join(format!("in{secs}-{pixel_mm}"));
        let spec =
            petsim::SeriesSpec { slices: 5, matrix: 32, seed: 7, frame_duration_s: secs, fov_mm: 32.0 * pixel_mm, ..Default::default() };
        petsim::write_series(&dir, &spec).unwrap();
        let o = tmp.path().join(out);
        let r = petrestore(&[
            "restore",
            "--input",
            dir.to_str().unwrap(),
            "--output",
            o.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        (r, o)
    };
    let run = |secs: f64, out: &str| run_at(secs, 4.0, out);
    let (r, o) = run(70.0, "o70");
    let t = text(&r);
    assert!(!r.status.success(), "a 70 s frame was restored: {t}");
    assert!(t.contains("70.0 s, outside the 27–66 s the model was trained for"), "{t}");
    assert!(!o.exists() || files_under(&o).is_empty(), "nothing is written for a skipped series");
    // inside the model's range the same configuration restores with the model
    let (r, o) = run(30.0, "o30");
    assert!(r.status.success(), "{}", text(&r));
    assert!(text(&r).contains("with tract"), "{}", text(&r));
    assert!(!files_under(&o).is_empty());
    // so do its pixel sizes: 1.6 mm pixels (finer than any it was trained
    // on) are skipped, not restored and not handed to the Gaussian
    let (r, o) = run_at(30.0, 1.6, "o30-fine");
    let t = text(&r);
    assert!(!r.status.success(), "1.6 mm pixels were restored: {t}");
    assert!(t.contains("Pixel Spacing 1.60 mm is outside the 2–5.3 mm the model was trained on"), "{t}");
    assert!(!o.exists() || files_under(&o).is_empty(), "nothing is written for a skipped series");
    // and enough slices for its five-slice context: four are skipped
    let dir = tmp.path().join("in-four");
    let spec = petsim::SeriesSpec { slices: 4, matrix: 32, seed: 7, fov_mm: 128.0, ..Default::default() };
    petsim::write_series(&dir, &spec).unwrap();
    let o = tmp.path().join("o-four");
    let r =
        petrestore(&["restore", "--input", dir.to_str().unwrap(), "--output", o.to_str().unwrap(), "--config", config.to_str().unwrap()]);
    let t = text(&r);
    assert!(!r.status.success(), "four slices were restored: {t}");
    assert!(t.contains("the series has 4 slices; the model reads 5 neighbouring slices"), "{t}");
    assert!(!o.exists() || files_under(&o).is_empty(), "nothing is written for a skipped series");
}

/// A runtime-only ONNX Runtime install (a Yocto image without `-dev`
/// packages) has the SONAME `libonnxruntime.so.1` and no
/// `libonnxruntime.so` link: with no `restore.ort_library` the daemon finds
/// it through the dynamic loader's search path.
#[test]
fn onnx_runtime_is_found_by_its_soname_without_a_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::os::unix::fs::symlink(ort_library(), lib.join("libonnxruntime.so.1")).unwrap();
    let model = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let cfg = tmp.path().join("petrestore.toml");
    std::fs::write(
        &cfg,
        format!("[node]\nstate_dir = {:?}\n[restore]\nengines = [\"ort\", \"tract\"]\nmodel = {model:?}\n", tmp.path().join("state")),
    )
    .unwrap();
    let run = |ld: &std::path::Path| {
        std::process::Command::new(bin("petrestore"))
            .args(["check-config", cfg.to_str().unwrap()])
            .env_remove("ORT_DYLIB_PATH")
            .env("LD_LIBRARY_PATH", ld)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = run(&lib);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ort (libonnxruntime.so.1)"), "{}", text(&out));
    // neither name anywhere: both are named, and the next engine is used
    let out = run(tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("cannot load ONNX Runtime from libonnxruntime.so:") && t.contains("nor from libonnxruntime.so.1:"), "{t}");
}

/// Run as another user than the state folder's owner (root, on a box whose
/// daemon runs as `petrestore`), the commands that write the journal
/// refuse and say how to run them, instead of leaving files the daemon
/// cannot open.
#[test]
fn commands_that_write_the_state_refuse_another_users_folder() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let state = if me == 0 {
        let d = tmp.path().join("state");
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        d
    } else {
        // a folder of another user that any user can name
        std::path::PathBuf::from("/")
    };
    assert_ne!(std::fs::metadata(&state).unwrap().uid(), me);
    for args in
        [vec!["journal", "--state-dir", state.to_str().unwrap(), "rebuild"], vec!["jobs", "--state-dir", state.to_str().unwrap(), "list"]]
    {
        let out = petrestore(&args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("runuser -u") && text(&out).contains("the daemon cannot open"), "{args:?}: {}", text(&out));
    }
    assert!(std::fs::read_dir(&state).unwrap().next().is_none() || me != 0, "nothing written");
}

/// The box's ONNX Runtime may be older than the one CI installs (Jetson
/// layers ship 1.21–1.24): the oldest release this build accepts restores
/// the same series to the same pixels as the newest, with the shipped model.
#[test]
fn the_oldest_onnx_runtime_accepted_restores_like_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = petsim::SeriesSpec { slices: 6, matrix: 128, seed: 47, ..Default::default() };
    petsim::write_series(&tmp.path().join("in"), &spec).unwrap();
    let model = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let run = |lib: &std::path::Path, out: &str| {
        let o = petrestore(&[
            "restore",
            "--input",
            tmp.path().join("in").to_str().unwrap(),
            "--output",
            tmp.path().join(out).to_str().unwrap(),
            "--engine",
            "ort",
            "--model",
            model.to_str().unwrap(),
            "--ort-library",
            lib.to_str().unwrap(),
        ]);
        assert!(o.status.success() && text(&o).contains("restored 6 slices with ort"), "{}: {}", lib.display(), text(&o));
        petrestore::restore::volume::load(&files_under(&tmp.path().join(out))).unwrap().volume
    };
    let (old, new) = (run(&ort_oldest_library(), "old"), run(&ort_library(), "new"));
    let scale = new.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = old.data.iter().zip(&new.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(scale > 0.0 && worst <= 1e-4 * scale, "largest difference {worst} of {scale}");
}
