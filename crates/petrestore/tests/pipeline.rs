//! End to end: DCMTK storescu → petrestore → DCMTK storescp, checking every
//! rule of README.md "Pointing a scanner console at it" on what the destination received.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use petrestore::dicom::attrs::Attrs;
use petrestore::journal::JobState;
use petrestore::restore::{gaussian, volume};
use testkit::*;

fn open(p: &std::path::Path) -> InMemDicomObject {
    dicom_object::open_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).into_inner()
}

fn strs(o: &InMemDicomObject, t: dicom_core::Tag) -> Vec<String> {
    o.element(t).unwrap().to_str().unwrap().split('\\').map(|s| s.trim().to_string()).collect()
}

#[test]
fn derived_series_follows_every_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 24, 64, 7);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let d = Daemon::start(&tmp.path().join("d"), &format!("[restore]\ngaussian_fwhm_mm = 6.0\n{}", destination("pacs", dest.port)));

    let out = storescu(d.port, CONSOLE, &src.files);
    assert!(out.status.success(), "storescu failed: {}", text(&out));
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert_eq!(job.engine.as_deref(), Some("gaussian"));
    let received = dest.wait_files(24, "24 instances at the destination", Duration::from_secs(10));

    let sources: BTreeMap<String, InMemDicomObject> =
        src.files.iter().map(|p| open(p)).map(|o| (o.str_of(tags::SOP_INSTANCE_UID).unwrap(), o)).collect();
    let model = "gaussian-fwhm6.00mm";
    let salt = testkit::complete_salt(model, "gaussian");
    let expected_series = petrestore::dicom::uid::derived_uid(&src.series_uid, &salt);
    assert_eq!(job.output_series_uid.as_deref(), Some(expected_series.as_str()));
    let mut sop_uids = BTreeSet::new();
    for p in &received {
        let o = open(p);
        let sop = o.str_of(tags::SOP_INSTANCE_UID).unwrap();
        assert!(sop.starts_with("2.25.") && petrestore::dicom::uid::valid_uid(&sop));
        assert!(sop_uids.insert(sop.clone()), "duplicate SOP Instance UID {sop}");
        assert_eq!(o.str_of(tags::SERIES_INSTANCE_UID).unwrap(), expected_series);
        assert_ne!(o.str_of(tags::SERIES_INSTANCE_UID).unwrap(), src.series_uid);
        assert_eq!(o.str_of(tags::STUDY_INSTANCE_UID).unwrap(), src.study_uid, "same study");
        assert_eq!(&strs(&o, tags::IMAGE_TYPE)[..2], ["DERIVED", "PRIMARY"]);
        let dd = o.str_of(tags::DERIVATION_DESCRIPTION).unwrap();
        assert!(dd.contains("gaussian") && dd.contains(model), "{dd}");

        // Source Image Sequence → exactly one source slice, purpose 121322
        let sis = o.element(tags::SOURCE_IMAGE_SEQUENCE).unwrap().items().unwrap();
        assert_eq!(sis.len(), 1);
        let src_sop = sis[0].str_of(tags::REFERENCED_SOP_INSTANCE_UID).unwrap();
        assert_eq!(sis[0].str_of(tags::REFERENCED_SOP_CLASS_UID).unwrap(), petrestore::dicom::PET_IMAGE_STORAGE);
        let purpose = sis[0].element(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE).unwrap().items().unwrap();
        assert_eq!(purpose[0].str_of(tags::CODE_VALUE).unwrap(), "121322");
        assert_eq!(purpose[0].str_of(tags::CODING_SCHEME_DESIGNATOR).unwrap(), "DCM");
        let s = sources.get(&src_sop).unwrap_or_else(|| panic!("source {src_sop} unknown"));
        assert_eq!(sop, petrestore::dicom::uid::derived_uid(&src_sop, &salt), "deterministic UID");

        let ce = o.element(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE).unwrap().items().unwrap();
        let ours = ce.last().unwrap();
        assert_eq!(ours.str_of(tags::MANUFACTURER).unwrap(), "petrestore");
        assert_eq!(ours.str_of(tags::SOFTWARE_VERSIONS).unwrap(), env!("CARGO_PKG_VERSION"));
        let ep = ours.element(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE).unwrap().items().unwrap();
        assert_eq!(ep[0].str_of(tags::CODE_VALUE).unwrap(), "109103");

        assert_eq!(o.str_of(tags::SERIES_DESCRIPTION).unwrap(), format!("{} [petrestore]", s.str_of(tags::SERIES_DESCRIPTION).unwrap()));
        assert_eq!(o.i64_of(tags::SERIES_NUMBER).unwrap(), s.i64_of(tags::SERIES_NUMBER).unwrap() + 1000);

        // copied unchanged: timing, quantitation, geometry, patient
        for t in [
            tags::SERIES_DATE,
            tags::SERIES_TIME,
            tags::ACQUISITION_DATE,
            tags::ACQUISITION_TIME,
            tags::ACTUAL_FRAME_DURATION,
            tags::FRAME_REFERENCE_TIME,
            tags::DECAY_CORRECTION,
            tags::UNITS,
            tags::PATIENT_WEIGHT,
            tags::PATIENT_ID,
            tags::IMAGE_POSITION_PATIENT,
            tags::IMAGE_ORIENTATION_PATIENT,
            tags::PIXEL_SPACING,
            tags::SLICE_THICKNESS,
            tags::FRAME_OF_REFERENCE_UID,
            tags::IMAGE_INDEX,
            tags::NUMBER_OF_SLICES,
        ] {
            assert_eq!(o.str_of(t), s.str_of(t), "{t} must be copied unchanged");
        }
        assert_eq!(o.str_of(tags::ACTUAL_FRAME_DURATION).unwrap(), "30000", "a 30 s frame is never relabelled");
        let rp = |x: &InMemDicomObject| {
            let it = &x.element(tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE).unwrap().items().unwrap()[0];
            [tags::RADIOPHARMACEUTICAL, tags::RADIOPHARMACEUTICAL_START_TIME, tags::RADIONUCLIDE_TOTAL_DOSE, tags::RADIONUCLIDE_HALF_LIFE]
                .map(|t| it.str_of(t))
        };
        assert_eq!(rp(&o), rp(s));
        assert_eq!(o.str_of(tags::RESCALE_INTERCEPT).unwrap(), "0");
        assert_eq!(o.u16_of(tags::BITS_ALLOCATED), Some(16));
    }
    assert_eq!(sop_uids.len(), 24);

    // Pixel values are the filter's output within rounding of each slice's slope.
    let input = volume::load(&src.files).unwrap();
    let expected = gaussian::filter(&input.volume, 6.0);
    let output = volume::load(&received).unwrap();
    assert_eq!(output.slices.len(), 24);
    let mut slopes = BTreeSet::new();
    for z in 0..24 {
        let slope = output.slices[z].dataset.f64_of(tags::RESCALE_SLOPE).unwrap();
        slopes.insert(slope.to_bits());
        let got = output.volume.slice(z);
        let want = expected.slice(z);
        let max_err = got.iter().zip(want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        assert!(max_err <= slope * 0.5 + 1e-3 * slope.max(1.0), "slice {z}: max error {max_err} > slope/2 {}", slope / 2.0);
        // full range used, nothing clipped
        let max_abs = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
        assert!(max_abs / slope > 32000.0 && max_abs / slope <= 32767.0, "slice {z} uses {}", max_abs / slope);
    }
    assert!(slopes.len() > 1, "per-slice slopes expected");

    // The restored series sent back (a router that returns derived series,
    // a destination that is this node) is not restored a second time.
    assert!(storescu(d.port, CONSOLE, &received).status.success());
    let again = d.wait_terminal(&petrestore::journal::job_id(&expected_series), Duration::from_secs(60));
    let JobState::Skipped { reason } = &again.state else { panic!("{:?}", again.state) };
    assert!(reason.contains("made by petrestore") && reason.contains("denoise it twice"), "{reason}");
}

#[test]
fn same_series_twice_is_stored_once_and_retry_gives_identical_uids() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 12, 32, 11);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let d = Daemon::start(&tmp.path().join("d"), &destination("pacs", dest.port));

    for _ in 0..2 {
        let out = storescu(d.port, CONSOLE, &src.files);
        assert!(out.status.success(), "{}", text(&out));
    }
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.received, 12, "duplicates are not counted");
    assert_eq!(d.spool_files().len(), 12, "stored once: {:?}", d.spool_files());
    let first: BTreeSet<String> = dest
        .wait_files(12, "12 instances", Duration::from_secs(10))
        .iter()
        .map(|p| dicom_object::open_file(p).unwrap().into_inner().str_of(tags::SOP_INSTANCE_UID).unwrap())
        .collect();
    for f in dest.files() {
        std::fs::remove_file(f).unwrap();
    }

    let out = petrestore(&["jobs", "--state-dir", d.state_dir().to_str().unwrap(), "retry", &job.id]);
    assert!(out.status.success(), "{}", text(&out));
    let second: BTreeSet<String> = dest
        .wait_files(12, "12 instances again", Duration::from_secs(60))
        .iter()
        .map(|p| dicom_object::open_file(p).unwrap().into_inner().str_of(tags::SOP_INSTANCE_UID).unwrap())
        .collect();
    assert_eq!(first, second, "reprocessing yields the same UIDs");
    let job = d.wait_terminal(&job.id, Duration::from_secs(30));
    assert!(job.history.iter().any(|e| e.what.contains("retry requested")));
}

#[test]
fn destination_down_is_retried_with_backoff_until_it_comes_up() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 8, 32, 13);
    let dest_port = free_port();
    let d = Daemon::start(&tmp.path().join("d"), &format!("[egress]\nmax_attempts = 50\n{}", destination("pacs", dest_port)));
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    let job = wait_for("two failed attempts", Duration::from_secs(60), || {
        let j = d.job(&id);
        (j.deliveries.first().is_some_and(|x| x.attempts >= 3)).then_some(j)
    });
    assert!(matches!(job.state, JobState::Delivering { .. }), "{:?}", job.state);
    let waits: Vec<&str> = job.history.iter().filter(|e| e.what.contains("next try in")).map(|e| e.what.as_str()).collect();
    assert!(waits[0].contains("500ms") && waits[1].contains("1s") && waits[2].contains("2s"), "exponential backoff: {waits:#?}");
    assert!(job.deliveries[0].last_error.as_deref().unwrap_or("").contains("association"), "{:?}", job.deliveries[0].last_error);

    let dest = StoreScp::start_on(&tmp.path().join("dest"), dest_port);
    let job = d.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done);
    assert_eq!(dest.files().len(), 8);
}

#[test]
fn a_destination_renamed_by_reload_gets_the_pending_series_and_the_old_name_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 8, 32, 14);
    let (down_port, kept_port) = (free_port(), free_port());
    let kept = StoreScp::start_on(&tmp.path().join("kept"), kept_port);
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!("[egress]\nmax_attempts = 20\n{}{}", destination("pacs", kept_port), destination("old", down_port)),
    );
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    wait_for("a failed attempt to the destination that is down", Duration::from_secs(60), || {
        let j = d.job(&id);
        (j.deliveries.iter().any(|x| x.destination == "old" && x.attempts >= 1)
            && j.deliveries.iter().any(|x| x.destination == "pacs" && x.delivered))
        .then_some(())
    });
    // the operator gives the same peer (AE title and address) a new name
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let (head, _) = cfg.split_once("[[destination]]\nname = \"old\"").expect("the old destination in the config");
    std::fs::write(&d.config, format!("{head}{}", destination("new", down_port))).unwrap();
    d.signal("HUP");
    wait_for("the delivery under its new name", Duration::from_secs(60), || {
        d.job(&id).deliveries.iter().any(|x| x.destination == "new").then_some(())
    });
    let renamed = StoreScp::start_on(&tmp.path().join("renamed"), down_port);
    let job = d.wait_terminal(&id, Duration::from_secs(90));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(
        job.history.iter().any(|e| e.what.contains("old is now named new (same AE title and address): sent there")),
        "{:#?}",
        job.history
    );
    let names: Vec<&str> = job.deliveries.iter().filter(|x| x.delivered).map(|x| x.destination.as_str()).collect();
    assert_eq!(names, ["pacs", "new"], "{:?}", job.deliveries);
    assert_eq!(kept.files().len(), 8);
    assert_eq!(renamed.files().len(), 8, "the renamed destination gets the pending series");
}

#[test]
fn a_destination_removed_by_reload_fails_its_waiting_series_instead_of_finishing_them() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 8, 32, 15);
    let (down_port, kept_port) = (free_port(), free_port());
    let kept = StoreScp::start_on(&tmp.path().join("kept"), kept_port);
    let mut d = Daemon::start(
        &tmp.path().join("d"),
        &format!("[egress]\nmax_attempts = 20\n{}{}", destination("pacs", kept_port), destination("archive", down_port)),
    );
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    wait_for("a failed attempt to the archive that is down", Duration::from_secs(60), || {
        let j = d.job(&id);
        j.deliveries.iter().any(|x| x.destination == "archive" && x.attempts >= 1).then_some(())
    });
    // the operator takes the archive out of the config while it is down,
    // and adds another peer in the same edit: not a rename
    let ws = StoreScp::start(&tmp.path().join("ws"));
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let (head, _) = cfg.split_once("[[destination]]\nname = \"archive\"").expect("the archive in the config");
    std::fs::write(&d.config, format!("{head}{}", destination("workstation", ws.port))).unwrap();
    d.signal("HUP");
    let job = d.wait_terminal(&id, Duration::from_secs(60));
    let JobState::Failed { reason } = &job.state else { panic!("{:?}\n{:#?}", job.state, job.history) };
    assert!(reason.contains("not delivered to archive: removed from the configuration") && reason.contains("jobs retry"), "{reason}");
    assert!(
        job.history
            .iter()
            .any(|e| e.what.contains("not sent to archive: no longer configured; the job fails without it; also sent to workstation")),
        "{:#?}",
        job.history
    );
    assert_eq!(kept.files().len(), 8, "the destination still configured got it");
    assert_eq!(ws.files().len(), 8, "the destination added got it");
    assert_eq!(d.spool_files().len(), 8, "a failed job that was not delivered keeps its instances");
    // retried, it goes to the destinations configured now and is done
    assert!(d.stop().success());
    let r = petrestore(&["jobs", "--config", d.config.to_str().unwrap(), "retry", &id]);
    assert!(r.status.success(), "{}", text(&r));
    d.restart();
    let job = d.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(job.dropped_deliveries.is_empty());
}

#[test]
fn skipped_series_is_forwarded_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = petsim::SeriesSpec { slices: 6, matrix: 32, frame_duration_s: 90.0, seed: 17, ..Default::default() };
    let src = petsim::write_series(&tmp.path().join("src"), &spec).unwrap();
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let d = Daemon::start(&tmp.path().join("d"), &destination("pacs", dest.port));
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    let JobState::Skipped { reason } = &job.state else { panic!("{:?}", job.state) };
    assert!(reason.contains("Actual Frame Duration is 90.0 s"), "{reason}");
    let got: BTreeSet<String> =
        dest.files().iter().map(|p| dicom_object::open_file(p).unwrap().into_inner().str_of(tags::SOP_INSTANCE_UID).unwrap()).collect();
    assert_eq!(got, src.sop_uids.iter().cloned().collect(), "the original series, unchanged UIDs");
}

#[test]
fn series_larger_than_max_voxels_is_skipped_and_forwarded_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    // 64 x 64 x 20 = 81,920 voxels against a bound of 65,536
    let spec = petsim::SeriesSpec { slices: 20, matrix: 64, seed: 23, ..Default::default() };
    let src = petsim::write_series(&tmp.path().join("src"), &spec).unwrap();
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let d = Daemon::start(&tmp.path().join("d"), &format!("[restore]\nmax_voxels = 65536\n{}", destination("pacs", dest.port)));
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    let JobState::Skipped { reason } = &job.state else { panic!("{:?}", job.state) };
    assert!(reason.contains("more than 65536 voxels") && reason.contains("restore.max_voxels"), "{reason}");
    let got: BTreeSet<String> =
        dest.files().iter().map(|p| dicom_object::open_file(p).unwrap().into_inner().str_of(tags::SOP_INSTANCE_UID).unwrap()).collect();
    assert_eq!(got, src.sop_uids.iter().cloned().collect(), "the original series, unchanged UIDs");
}

#[test]
fn retention_removes_files_of_delivered_jobs_and_keeps_the_record() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 5, 32, 19);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    // ~2 s retention
    let d = Daemon::start(&tmp.path().join("d"), &format!("[node]\nretention_hours = 0.0005\n{}", destination("pacs", dest.port)));
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    assert_eq!(d.wait_terminal(&id, Duration::from_secs(60)).state, JobState::Done);
    assert_eq!(d.spool_files().len(), 5, "kept until the job is done and delivered");
    let job = wait_for("retention", Duration::from_secs(40), || {
        let j = d.job(&id);
        j.purged.then_some(j)
    });
    assert!(d.spool_files().is_empty(), "{:?}", d.spool_files());
    assert!(!d.state_dir().join("output").join(&id).exists());
    assert_eq!(dest.files().len(), 5, "delivered before removal");
    assert!(job.history.iter().any(|e| e.what.contains("retention: removed 5")), "{:#?}", job.history);
    let retry = petrestore(&["jobs", "--state-dir", d.state_dir().to_str().unwrap(), "retry", &id]);
    assert!(!retry.status.success() && text(&retry).contains("retention removed"), "{}", text(&retry));
    // the same series sent again is stored and processed anew
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = wait_for("the job done again", Duration::from_secs(60), || {
        let j = d.job(&id);
        (j.state == JobState::Done && !j.purged && j.history.iter().filter(|e| e.what == "done").count() == 2).then_some(j)
    });
    // counted anew: the first five were removed with the job's files
    assert_eq!(job.received, 5);
}

#[test]
fn a_failed_job_keeps_its_instances_until_it_is_delivered() {
    // Delivery gives up (one attempt, nobody listening): the job fails. Its
    // received instances were never delivered, so retention (2 s here for
    // delivered jobs) leaves them while retention passes run; re-sent once
    // the destination is up, the job is done, and then they go.
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 5, 32, 23);
    let dest_port = free_port();
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!("[node]\nretention_hours = 0.0005\n[egress]\nmax_attempts = 1\n{}", destination("pacs", dest_port)),
    );
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    let job = d.wait_terminal(&id, Duration::from_secs(60));
    assert!(matches!(job.state, JobState::Failed { .. }), "{:?}", job.state);
    // retention runs every 10 s: at least one pass falls in these 13 s, past the 2 s
    std::thread::sleep(Duration::from_secs(13));
    let job = d.job(&id);
    assert!(!job.purged && d.spool_files().len() == 5, "a failed job's instances were removed: {:?}", d.spool_files());
    let dest = StoreScp::start_on(&tmp.path().join("dest"), dest_port);
    let out = petrestore(&["jobs", "--state-dir", d.state_dir().to_str().unwrap(), "retry", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(d.wait_terminal(&id, Duration::from_secs(60)).state, JobState::Done);
    assert_eq!(dest.files().len(), 5);
    wait_for("retention after delivery", Duration::from_secs(40), || d.job(&id).purged.then_some(()));
    assert!(d.spool_files().is_empty(), "{:?}", d.spool_files());
}

fn group(o: &InMemDicomObject, per_frame: Option<usize>, macro_seq: dicom_core::Tag) -> &InMemDicomObject {
    let fg = match per_frame {
        None => &o.element(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap()[0],
        Some(f) => &o.element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap()[f],
    };
    &fg.element(macro_seq).unwrap_or_else(|_| panic!("{macro_seq} missing")).items().unwrap()[0]
}

#[test]
fn enhanced_pet_is_restored_into_a_derived_enhanced_instance() {
    // One multi-frame Enhanced PET instance (no Number of Slices / Image
    // Index: complete by the quiet timeout) in, one derived multi-frame
    // instance out, valid for dciodvfy.
    let tmp = tempfile::tempdir().unwrap();
    let spec = petsim::SeriesSpec { slices: 20, matrix: 48, seed: 17, frame_duration_s: 30.0, ..Default::default() };
    let src = petsim::write_series_enhanced(&tmp.path().join("src"), &spec).unwrap();
    assert_eq!(src.files.len(), 1);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    // The multi-frame quiet timeout (1 s), not the classic one (120 s),
    // completes the series.
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!(
            "[series]\nquiet_timeout_s = 120\nmultiframe_quiet_timeout_s = 1\n[restore]\ngaussian_fwhm_mm = 6.0\n{}",
            destination("pacs", dest.port)
        ),
    );
    let out = storescu_required(d.port, CONSOLE, &src.files);
    assert!(out.status.success() && !text(&out).contains("E: "), "storescu failed: {}", text(&out));
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(job.multiframe);
    assert!(job.history.iter().any(|h| format!("{h:?}").contains("no instance for 1s")), "{:#?}", job.history);
    assert!(job.history.iter().any(|h| format!("{h:?}").contains("20 slices in 1 multi-frame instance")), "{:#?}", job.history);
    let received = dest.wait_files(1, "1 instance at the destination", Duration::from_secs(10));

    let s = open(&src.files[0]);
    let o = open(&received[0]);
    let model = "gaussian-fwhm6.00mm";
    // a multi-frame series is never known complete by index: its UIDs name the instances read
    let salt = petrestore::derive::restored_salt(model, &petrestore::derive::inputs_id("gaussian", Some(&src.sop_uids[..]), &[]));
    assert_eq!(o.str_of(tags::SOP_CLASS_UID).unwrap(), petrestore::dicom::ENHANCED_PET_IMAGE_STORAGE);
    assert_eq!(o.str_of(tags::SOP_INSTANCE_UID).unwrap(), petrestore::dicom::uid::derived_uid(&src.sop_uids[0], &salt));
    assert_eq!(o.str_of(tags::SERIES_INSTANCE_UID).unwrap(), petrestore::dicom::uid::derived_uid(&src.series_uid, &salt));
    assert_eq!(o.str_of(tags::STUDY_INSTANCE_UID).unwrap(), src.study_uid);
    assert_eq!(o.str_of(tags::NUMBER_OF_FRAMES).unwrap(), "20");
    assert_eq!(&strs(&o, tags::IMAGE_TYPE)[..2], ["DERIVED", "PRIMARY"]);
    assert_eq!(&strs(group(&o, None, tags::PET_FRAME_TYPE_SEQUENCE), tags::FRAME_TYPE)[..2], ["DERIVED", "PRIMARY"]);
    let di = group(&o, None, tags::DERIVATION_IMAGE_SEQUENCE);
    let dd = di.str_of(tags::DERIVATION_DESCRIPTION).unwrap();
    assert!(dd.contains("gaussian") && dd.contains(model), "{dd}");
    let sis = &di.element(tags::SOURCE_IMAGE_SEQUENCE).unwrap().items().unwrap()[0];
    assert_eq!(sis.str_of(tags::REFERENCED_SOP_INSTANCE_UID).unwrap(), src.sop_uids[0]);
    assert_eq!(sis.str_of(tags::REFERENCED_SOP_CLASS_UID).unwrap(), petrestore::dicom::ENHANCED_PET_IMAGE_STORAGE);
    let ce = o.element(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE).unwrap().items().unwrap();
    assert_eq!(ce.last().unwrap().str_of(tags::MANUFACTURER).unwrap(), "petrestore");
    assert_eq!(o.str_of(tags::SERIES_DESCRIPTION).unwrap(), format!("{} [petrestore]", s.str_of(tags::SERIES_DESCRIPTION).unwrap()));
    // Timing, quantitation and geometry per frame unchanged: a 30 s frame stays 30 s.
    for f in 0..20 {
        for (m, t) in [
            (tags::FRAME_CONTENT_SEQUENCE, tags::FRAME_ACQUISITION_DURATION),
            (tags::FRAME_CONTENT_SEQUENCE, tags::FRAME_REFERENCE_DATE_TIME),
            (tags::FRAME_CONTENT_SEQUENCE, tags::DIMENSION_INDEX_VALUES),
            (tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT),
            (tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tags::RESCALE_TYPE),
        ] {
            assert_eq!(group(&o, Some(f), m).str_of(t), group(&s, Some(f), m).str_of(t), "frame {f}: {t}");
        }
        assert_eq!(group(&o, Some(f), tags::FRAME_CONTENT_SEQUENCE).f64_of(tags::FRAME_ACQUISITION_DURATION), Some(30000.0));
    }
    for t in [
        tags::DECAY_CORRECTED,
        tags::DECAY_CORRECTION_DATE_TIME,
        tags::PATIENT_WEIGHT,
        tags::FRAME_OF_REFERENCE_UID,
        tags::ACQUISITION_DATE_TIME,
    ] {
        assert_eq!(o.str_of(t), s.str_of(t), "{t} must be copied unchanged");
    }

    // Pixel values are the filter's output within rounding of each frame's slope.
    let input = volume::load(&src.files).unwrap();
    let expected = gaussian::filter(&input.volume, 6.0);
    let output = volume::load(&received).unwrap();
    assert_eq!(output.volume.nz, 20);
    let mut slopes = BTreeSet::new();
    for z in 0..20 {
        let slope = group(&o, output.slices[z].frame, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE).f64_of(tags::RESCALE_SLOPE).unwrap();
        slopes.insert(slope.to_bits());
        let max_err = output.volume.slice(z).iter().zip(expected.slice(z)).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        assert!(max_err <= slope * 0.5 + 1e-3 * slope.max(1.0), "slice {z}: max error {max_err} > slope/2");
    }
    assert!(slopes.len() > 1, "per-frame slopes expected");

    for f in [&src.files[0], &received[0]] {
        let errors = iod_errors(f);
        assert!(errors.is_empty(), "{}: {errors:#?}", f.display());
    }
}

#[test]
fn several_consoles_at_once_each_series_restored_once() {
    // Three senders at the same time, one of them sending a series that a
    // second sender is also sending: the materializer's batches mix series
    // and copies, every instance is stored once, every series is restored
    // and delivered once.
    let tmp = tempfile::tempdir().unwrap();
    let a = series(&tmp.path().join("a"), 30, 32, 81);
    let b = series(&tmp.path().join("b"), 30, 32, 82);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let d = Daemon::start(&tmp.path().join("d"), &format!("[restore]\ngaussian_fwhm_mm = 6.0\n{}", destination("pacs", dest.port)));
    let senders: Vec<_> = [a.files.clone(), b.files.clone(), a.files.iter().rev().cloned().collect::<Vec<_>>()]
        .into_iter()
        .map(|files| {
            let port = d.port;
            std::thread::spawn(move || storescu(port, CONSOLE, &files))
        })
        .collect();
    for s in senders {
        let out = s.join().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    for s in [&a, &b] {
        let job = d.wait_terminal(&job_id(s), Duration::from_secs(60));
        assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
        assert_eq!(job.received, 30, "each instance stored once");
    }
    assert_eq!(d.spool_files().len(), 60);
    let received = wait_for("60 derived instances at the destination", Duration::from_secs(20), || {
        let f = dest.files();
        (f.len() >= 60).then_some(f)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(dest.files().len(), 60, "nothing delivered twice");
    let sops: BTreeSet<String> = received.iter().map(|p| open(p).str_of(tags::SOP_INSTANCE_UID).unwrap()).collect();
    assert_eq!(sops.len(), 60);
}
