//! Crash recovery (README.md "How it works": the journal is the truth): kill -9 at every stage, restart,
//! and the job completes with nothing lost and no duplicate UIDs.

use std::collections::BTreeSet;
use std::time::Duration;

use dicom_dictionary_std::tags;
use petrestore::dicom::attrs::Attrs;
use petrestore::journal::JobState;
use testkit::*;

fn sop_uids(files: &[std::path::PathBuf]) -> BTreeSet<String> {
    files.iter().map(|p| dicom_object::open_file(p).unwrap().into_inner().str_of(tags::SOP_INSTANCE_UID).unwrap()).collect()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// The salt of a complete series' derived UIDs (its model and engine).
fn salt(job: &petrestore::journal::Job) -> String {
    testkit::complete_salt(job.model_id.as_deref().unwrap(), job.engine.as_deref().unwrap())
}

fn series_uids(files: &[std::path::PathBuf]) -> BTreeSet<String> {
    files.iter().map(|p| dicom_object::open_file(p).unwrap().into_inner().str_of(tags::SERIES_INSTANCE_UID).unwrap()).collect()
}

#[test]
fn kill9_mid_series_then_the_rest_gives_one_complete_series() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 20, 32, 21);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    // a long quiet timeout: the series must complete by Image Index, not time out
    let mut d = Daemon::start(&tmp.path().join("d"), &format!("[series]\nquiet_timeout_s = 600\n{}", destination("pacs", dest.port)));
    assert!(storescu(d.port, CONSOLE, &src.files[..12]).status.success());
    d.kill9();
    d.restart();
    let job = d.job(&job_id(&src));
    assert_eq!((job.received, &job.state), (12, &JobState::Receiving), "acknowledged instances survived kill -9");
    assert!(storescu(d.port, CONSOLE, &src.files[12..]).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done);
    let got = dest.wait_files(20, "20 instances", Duration::from_secs(10));
    assert_eq!(sop_uids(&got).len(), 20);
    assert_eq!(series_uids(&got).len(), 1);
}

#[test]
fn kill9_during_restoration_resumes_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    // big enough that restoration takes a noticeable time
    let src = series(&tmp.path().join("src"), 200, 192, 23);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let mut d = Daemon::start(&tmp.path().join("d"), &format!("[restore]\ngaussian_fwhm_mm = 12.0\n{}", destination("pacs", dest.port)));
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    wait_for("the job to be restoring", Duration::from_secs(30), || (d.job(&id).state == JobState::Restoring).then_some(()));
    d.kill9();
    d.restart();
    let job = d.wait_terminal(&id, Duration::from_secs(120));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(job.history.iter().any(|e| e.what.contains("interrupted")), "{:#?}", job.history);
    let got = dest.wait_files(200, "200 instances", Duration::from_secs(20));
    assert_eq!(sop_uids(&got).len(), 200);
    assert_eq!(series_uids(&got).len(), 1);
}

#[test]
fn a_series_whose_restoration_dies_every_time_is_failed_and_forwarded() {
    // The process dies inside the same job's restoration at every start (as
    // a series that crashes an engine would make it): after five
    // interrupted restorations the job is failed with the reason, its
    // original forwarded, and the daemon goes on instead of crashing in a loop.
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 200, 192, 29);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let mut d = Daemon::start(&tmp.path().join("d"), &format!("[restore]\ngaussian_fwhm_mm = 12.0\n{}", destination("pacs", dest.port)));
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    for _ in 0..5 {
        wait_for("the job to be restoring", Duration::from_secs(60), || (d.job(&id).state == JobState::Restoring).then_some(()));
        d.kill9();
        d.restart();
    }
    let job = d.wait_terminal(&id, Duration::from_secs(60));
    match &job.state {
        JobState::Failed { reason } => assert!(reason.contains("interrupted by 5 restarts"), "{reason}"),
        s => panic!("expected failed, got {s:?}: {:#?}", job.history),
    }
    assert!(job.history.iter().any(|e| e.what.contains("5 times in a row: not restored again")), "{:#?}", job.history);
    let got = dest.wait_files(200, "the 200 originals", Duration::from_secs(30));
    assert_eq!(sop_uids(&got), src.sop_uids.iter().cloned().collect(), "the originals, unchanged UIDs");
    assert!(echoscu(d.port, CONSOLE, OUR_AE).status.success(), "the daemon still serves");
}

#[test]
fn a_stop_during_a_long_restoration_exits_and_requeues_it_as_a_stop() {
    // A restoration cannot be interrupted. At a stop the daemon waits for it
    // a while, then puts its job back in the queue (a stop, not a crash: it
    // does not count toward the interrupted-restoration limit) and exits
    // without waiting for it; the next start restores the series.
    let tmp = tempfile::tempdir().unwrap();
    let model = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let src = series(&tmp.path().join("src"), 120, 192, 39);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let mut d = Daemon::start(
        &tmp.path().join("d"),
        &format!("[restore]\nengines = [\"tract\"]\nmodel = {model:?}\nthreads = 1\n{}", destination("pacs", dest.port)),
    );
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    wait_for("the job to be restoring", Duration::from_secs(60), || (d.job(&id).state == JobState::Restoring).then_some(()));
    let status = d.stop();
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(d.log().contains("it resumes at the next start"), "{}", d.log());
    // the whole stop ran before the process ended without the engine
    assert!(d.log().contains("petrestore stopped"), "{}", d.log());
    d.restart();
    let job = d.wait_terminal(&id, Duration::from_secs(300));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(job.history.iter().any(|e| e.what.contains("the daemon stopped during restoration")), "{:#?}", job.history);
    assert!(!job.history.iter().any(|e| e.what.contains("interrupted")), "a stop is not a crash: {:#?}", job.history);
    assert_eq!(wait_for("120 instances", Duration::from_secs(30), || (dest.files().len() == 120).then_some(120)), 120);
}

#[test]
fn a_restoration_past_its_time_limit_ends_the_process_and_counts_as_interrupted() {
    // An engine that never returns (a GPU hang) would hold the only
    // restoration slot for ever. Past restore.time_limit_s the daemon says
    // so in the job's history and exits (status 70) for systemd to restart
    // it; the job counts an interrupted restoration and is restored at the
    // next start. A slow restoration (tract, one thread) stands in for the
    // hang.
    let tmp = tempfile::tempdir().unwrap();
    let model = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d");
    let src = series(&tmp.path().join("src"), 120, 192, 47);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let restore = format!("[restore]\nengines = [\"tract\"]\nmodel = {model:?}\nthreads = 1\n");
    let mut d = Daemon::start(&tmp.path().join("d"), &format!("{restore}time_limit_s = 10\n{}", destination("pacs", dest.port)));
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    wait_for("the job to be restoring", Duration::from_secs(60), || (d.job(&id).state == JobState::Restoring).then_some(()));
    let st = d.wait_exit(Duration::from_secs(120));
    assert_eq!(st.code(), Some(70), "{}", d.log());
    assert!(d.log().contains("past restore.time_limit_s (10 s): the daemon exits to end it"), "{}", d.log());
    // restarted (as systemd would) with room to finish
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, cfg.replace("time_limit_s = 10\n", "time_limit_s = 3600\n")).unwrap();
    d.restart();
    let job = d.wait_terminal(&id, Duration::from_secs(300));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(job.history.iter().any(|e| e.what.contains("past restore.time_limit_s")), "{:#?}", job.history);
    assert!(job.history.iter().any(|e| e.what.contains("interrupted")), "counted as interrupted: {:#?}", job.history);
}

#[test]
fn kill9_during_egress_delivers_after_restart_without_new_uids() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 10, 32, 25);
    let dest_port = free_port();
    let mut d = Daemon::start(&tmp.path().join("d"), &destination("pacs", dest_port));
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    // destination down: the job sits in Delivering with a failed attempt
    wait_for("a failed delivery attempt", Duration::from_secs(60), || {
        let j = d.job(&id);
        (matches!(j.state, JobState::Delivering { .. }) && j.deliveries[0].attempts >= 1).then_some(())
    });
    let before = d.job(&id);
    d.kill9();
    let dest = StoreScp::start_on(&tmp.path().join("dest"), dest_port);
    d.restart();
    let job = d.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done);
    assert_eq!(job.output_series_uid, before.output_series_uid, "same derived series after restart");
    let got = dest.wait_files(10, "10 instances", Duration::from_secs(10));
    let expected: BTreeSet<String> = src.sop_uids.iter().map(|s| petrestore::dicom::uid::derived_uid(s, &salt(&job))).collect();
    assert_eq!(sop_uids(&got), expected);
}

#[test]
fn incomplete_series_at_quiet_timeout_follows_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 10, 32, 27);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    // a gap in the middle: geometry inconsistent → fails, original forwarded
    let mut files = src.files.clone();
    files.remove(4);
    let d = Daemon::start(&tmp.path().join("d"), &format!("[series]\nquiet_timeout_s = 1\n{}", destination("pacs", dest.port)));
    assert!(storescu(d.port, CONSOLE, &files).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    let JobState::Failed { reason } = &job.state else { panic!("{:?}", job.state) };
    assert!(reason.contains("uneven slice spacing"), "{reason}");
    assert_eq!(dest.files().len(), 9, "the original series is forwarded so the technologist is not left waiting");

    // a contiguous part (the last slice missing) is processed
    let src2 = series(&tmp.path().join("src2"), 10, 32, 29);
    assert!(storescu(d.port, CONSOLE, &src2.files[..9]).status.success());
    let job = d.wait_terminal(&job_id(&src2), Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(job.history.iter().any(|e| e.what.contains("no instance for")));
    assert_eq!(job.output_count, 9);
}

#[test]
fn a_purged_job_does_not_make_every_later_start_repair_the_journal() {
    // A rebuild from the spool cannot know a job whose files retention
    // removed: after one repair, that job must not be taken for damage again
    // at every start (each would keep another copy of the journal and
    // reopen unfinished work).
    let tmp = tempfile::tempdir().unwrap();
    let a = series(&tmp.path().join("a"), 4, 32, 33);
    let b = series(&tmp.path().join("b"), 4, 32, 34);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let mut d = Daemon::start(
        &tmp.path().join("d"),
        &format!("[node]\nretention_hours = 0.0005\n[series]\nquiet_timeout_s = 600\n{}", destination("pacs", dest.port)),
    );
    // a: done, delivered and purged; b: half received
    assert!(storescu(d.port, CONSOLE, &a.files).status.success());
    wait_for("a purged", Duration::from_secs(60), || d.job(&job_id(&a)).purged.then_some(()));
    assert!(storescu(d.port, CONSOLE, &b.files[..2]).status.success());
    assert_eq!(d.spool_files().len(), 2);
    d.kill9();
    // the journal is lost: the start repairs it from the spool (b)
    std::fs::remove_dir_all(d.state_dir().join("journal")).unwrap();
    d.restart();
    let repairs = |d: &Daemon| d.log().matches("journal repaired").count();
    let copies = |d: &Daemon| files_under(&d.state_dir()).iter().filter(|p| p.to_string_lossy().contains("journal.replaced-")).count();
    assert_eq!(repairs(&d), 1, "{}", d.log());
    let kept = copies(&d);
    // two more starts: the journal agrees with the evidence
    for _ in 0..2 {
        assert!(d.stop().success());
        d.restart();
        assert!(echoscu(d.port, CONSOLE, OUR_AE).status.success());
    }
    assert_eq!(repairs(&d), 1, "repaired again: {}", d.log());
    assert_eq!(copies(&d), kept, "no new copy of the journal");
    // b goes on
    assert!(storescu(d.port, CONSOLE, &b.files[2..]).status.success());
    assert_eq!(d.wait_terminal(&job_id(&b), Duration::from_secs(60)).state, JobState::Done);
}

#[test]
fn lost_journal_is_rebuilt_from_the_spool_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 6, 32, 31);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    // long quiet timeout: the first run only receives
    let mut d = Daemon::start(&tmp.path().join("d"), &format!("[series]\nquiet_timeout_s = 600\n{}", destination("pacs", dest.port)));
    assert!(storescu(d.port, CONSOLE, &src.files[..4]).status.success());
    // in the spool files (not only in the arrival log, which a start would replay)
    assert_eq!(d.spool_files().len(), 4);
    d.kill9();
    // the journal is lost (disk repair, sled corruption...): the start sees
    // a journal that does not know the spool, repairs it and says so
    std::fs::remove_dir_all(d.state_dir().join("journal")).unwrap();
    d.restart();
    assert!(d.log().contains("4 received instances in the spool are not in the journal"), "{}", d.log());
    assert!(d.log().contains("journal repaired"), "{}", d.log());
    let job = d.job(&job_id(&src));
    assert_eq!((job.received, &job.state), (4, &JobState::Receiving));
    assert!(storescu(d.port, CONSOLE, &src.files[4..]).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(job.history.iter().any(|e| e.what.contains("rebuilt from the spool")));
    let got = dest.wait_files(6, "6 instances", Duration::from_secs(10));
    assert_eq!(sop_uids(&got).len(), 6);
    // `journal rebuild` by hand still works on a stopped daemon
    assert!(d.stop().success());
    let r = petrestore(&["journal", "--config", d.config.to_str().unwrap(), "rebuild"]);
    assert!(r.status.success() && text(&r).contains("6 instances in 1 jobs"), "{}", text(&r));
    // ... and refuses, changing nothing, while a process holds the journal
    // open without a control socket (a daemon starting or stopping): here
    // util-linux's flock(1) takes the lock sled takes
    let db = d.state_dir().join("journal/db");
    let mut holder = std::process::Command::new("flock")
        .args(["--exclusive", db.to_str().unwrap(), "sleep", "60"])
        .spawn()
        .expect("flock(1) from util-linux must be installed");
    wait_for("flock to hold the journal", Duration::from_secs(10), || {
        let f = std::fs::File::open(&db).unwrap();
        match f.try_lock() {
            Ok(()) => None,
            Err(_) => Some(()),
        }
    });
    let before: BTreeSet<_> = std::fs::read_dir(d.state_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    let r = petrestore(&["journal", "--config", d.config.to_str().unwrap(), "rebuild"]);
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(!r.status.success() && text(&r).contains("stop it first"), "{}", text(&r));
    let after: BTreeSet<_> = std::fs::read_dir(d.state_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after, "nothing moved aside");
}

/// Issue 18: damage in the middle or the end of the journal is found at
/// start and repaired: a finished series stays finished (never restored
/// again, its originals never forwarded), a series waiting for delivery is
/// delivered.
#[test]
fn a_damaged_journal_is_repaired_and_finished_series_stay_finished() {
    for damage in ["stale", "truncate", "overwrite"] {
        let tmp = tempfile::tempdir().unwrap();
        let a = series(&tmp.path().join("a"), 8, 32, 61);
        let b = series(&tmp.path().join("b"), 6, 32, 62);
        let dest_port = free_port();
        let dest = StoreScp::start_on(&tmp.path().join("dest"), dest_port);
        // a long quiet timeout: a's first half is never processed on its own
        let extra = format!(
            "[series]\nquiet_timeout_s = 600\n[egress]\nbackoff_initial_s = 0.2\nbackoff_max_s = 0.5\nmax_attempts = 1000\n{}",
            destination("pacs", dest_port)
        );
        let mut d = Daemon::start(&tmp.path().join("d"), &extra);
        // a: half received; a copy of the journal from then is kept (a
        // journal that rolls back behaves like it)
        assert!(storescu(d.port, CONSOLE, &a.files[..4]).status.success());
        assert!(d.stop().success());
        let snapshot = tmp.path().join("journal-then");
        copy_dir(&d.state_dir().join("journal"), &snapshot);
        d.restart();
        // a: finished and delivered
        assert!(storescu(d.port, CONSOLE, &a.files[4..]).status.success());
        assert_eq!(d.wait_terminal(&job_id(&a), Duration::from_secs(60)).state, JobState::Done);
        let delivered_a = sop_uids(&dest.files());
        assert_eq!(delivered_a.len(), 8);
        // b: restored, waiting for its destination
        drop(dest);
        assert!(storescu(d.port, CONSOLE, &b.files).status.success());
        wait_for("b to wait for delivery", Duration::from_secs(60), || (d.job(&job_id(&b)).state.name() == "delivering").then_some(()));
        d.kill9();

        // damage the journal
        let db = d.state_dir().join("journal/db");
        let len = std::fs::metadata(&db).unwrap().len();
        match damage {
            "stale" => {
                std::fs::remove_dir_all(d.state_dir().join("journal")).unwrap();
                copy_dir(&snapshot, &d.state_dir().join("journal"));
            }
            "truncate" => std::fs::OpenOptions::new().write(true).open(&db).unwrap().set_len(len / 2).unwrap(),
            _ => {
                use std::io::{Seek, Write};
                let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
                f.seek(std::io::SeekFrom::Start(len / 3)).unwrap();
                f.write_all(&vec![0xA5; (64 * 1024).min(len as usize / 3)]).unwrap();
            }
        }
        // the destination is back (a new folder: what arrives from now on)
        let dest = StoreScp::start_on(&tmp.path().join("dest2"), dest_port);
        d.restart();
        // sled may recover a consistent earlier state by itself (then the
        // arrival log fills the gap); a journal behind the evidence is repaired
        let repaired = d.log().contains("journal repaired");
        if damage == "stale" {
            assert!(repaired && d.log().contains("finished (done) but the journal says"), "{}", d.log());
        }
        if repaired {
            assert!(files_under(&d.state_dir()).iter().any(|p| p.to_string_lossy().contains("journal.replaced-")), "damaged copy kept");
        }
        let job_b = d.wait_terminal(&job_id(&b), Duration::from_secs(60));
        assert_eq!(job_b.state, JobState::Done, "{damage}: {:#?}", job_b.history);
        let job_a = d.job(&job_id(&a));
        assert_eq!(job_a.state, JobState::Done, "{damage}: {:#?}", job_a.history);
        if repaired {
            assert!(job_a.history.iter().any(|e| e.what.contains("restored from the outcome log")), "{damage}: {:#?}", job_a.history);
        }
        // nothing of a was sent again, and never its originals
        std::thread::sleep(Duration::from_secs(1));
        let got = sop_uids(&dest.files());
        let a_sources: BTreeSet<String> = sop_uids(&a.files);
        assert!(got.is_disjoint(&a_sources), "{damage}: originals of a finished series were forwarded");
        assert!(got.is_disjoint(&delivered_a), "{damage}: a was delivered again");
        assert_eq!(got.len(), 6, "{damage}: b's derived series, once");
    }
}

/// storescu's verbose output: the files answered Success, and those refused.
fn store_responses(out: &str) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let (mut ok, mut refused, mut file) = (Vec::new(), Vec::new(), None);
    for line in out.lines() {
        if let Some(f) = line.strip_prefix("I: Sending file: ") {
            file = Some(std::path::PathBuf::from(f.trim()));
        } else if let Some(r) = line.strip_prefix("I: Received Store Response (") {
            let f = file.take().expect("a response follows a file");
            if r.starts_with("Success") { ok.push(f) } else { refused.push(f) }
        }
    }
    (ok, refused)
}

#[test]
fn a_spool_failure_refuses_new_instances_and_resumes_by_itself_when_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = series(&tmp.path().join("a"), 4, 32, 41);
    let b = series(&tmp.path().join("b"), 2, 32, 42);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let broker = Mosquitto::start(tmp.path(), "");
    let health = Sub::start(broker.port, "petrestore/v1/box1/health", &[]);
    let mqtt = format!("[node]\ndevice_id = \"box1\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nhealth_interval_s = 0.5\n", broker.port);
    let d = Daemon::start(&tmp.path().join("d"), &format!("{mqtt}{}", destination("pacs", dest.port)));
    // A file where series a's spool folder must go: moving a's instances
    // from the arrival log into the spool fails.
    let study = d.state_dir().join("spool").join(&a.study_uid);
    std::fs::create_dir_all(&study).unwrap();
    let blocker = study.join(&a.series_uid);
    std::fs::write(&blocker, b"not a folder").unwrap();

    // Acknowledged: durable in the arrival log. Moving it into the spool fails.
    let out = text(&storescu(d.port, CONSOLE, &a.files[..1]));
    assert_eq!(store_responses(&out), (a.files[..1].to_vec(), vec![]), "{out}");
    wait_for("the materializer to report the failure", Duration::from_secs(20), || {
        d.log().contains("cannot move received instances").then_some(())
    });
    // The instance on its way, sent again: the same copy is a duplicate
    // (acknowledged); a copy with other content under its UID is refused,
    // naming what differs, and the first copy is the one kept.
    let out = text(&storescu(d.port, CONSOLE, &a.files[..1]));
    assert_eq!(store_responses(&out), (a.files[..1].to_vec(), vec![]), "{out}");
    let corrected = tmp.path().join("corrected.dcm");
    let mut o = dicom_object::open_file(&a.files[0]).unwrap();
    o.put(dicom_core::DataElement::new(tags::PATIENT_NAME, dicom_core::VR::PN, dicom_core::PrimitiveValue::from("Corrected^Name")));
    o.write_to_file(&corrected).unwrap();
    let out = text(&storescu(d.port, CONSOLE, std::slice::from_ref(&corrected)));
    assert_eq!(store_responses(&out), (vec![], vec![corrected]), "{out}");
    d.wait_log("Patient's Name differs from the copy stored under this UID");
    // The rest of a arrives while ingest is paused: refused, nothing kept;
    // the console sends them again later, as after any failure status.
    let out = text(&storescu(d.port, CONSOLE, &a.files[1..]));
    let (acked, refused) = store_responses(&out);
    assert!(acked.is_empty() && refused == a.files[1..], "{out}");
    assert!(out.contains("Refused: OutOfResources"), "{out}");
    // Meanwhile new instances are refused with Out of Resources, the
    // reason first in the Error Comment.
    let out = storescu(d.port, CONSOLE, &b.files);
    assert!(text(&out).contains("Refused: OutOfResources"), "{}", text(&out));
    d.wait_log("spool write failed");
    // The fleet manager sees it: last_error and the backlog of instances
    // acknowledged but only in the arrival log.
    let h = health.wait_on("/health", "health reporting the pause", Duration::from_secs(20), |v| {
        v["last_error"].as_str().is_some_and(|e| e.contains("ingest paused"))
    });
    assert_schema("health", &h);
    assert_eq!(h["ingest_backlog"], 1, "{h}");
    // and so does the technologist at the box
    let st = petrestore(&["status", "--state-dir", d.state_dir().to_str().unwrap()]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&st)));
    assert_eq!(st["ingest_backlog"], 1, "{st}");
    assert!(st["ingest_stalled"].as_str().is_some_and(|s| s.contains("spool write failed")), "{st}");

    // The fault goes away: the retried move goes through, ingest resumes,
    // everything acknowledged is restored and delivered, without a restart.
    std::fs::remove_file(&blocker).unwrap();
    wait_for("ingest to resume", Duration::from_secs(30), || d.log().contains("ingest resumed").then_some(()));
    let again = text(&storescu(d.port, CONSOLE, &refused));
    assert_eq!(store_responses(&again), (refused.clone(), vec![]), "refused instances taken once ingest resumed: {again}");
    let job = d.wait_terminal(&job_id(&a), Duration::from_secs(60));
    assert_eq!((job.received, &job.state), (4, &JobState::Done), "{:#?}", job.history);
    let got = dest.wait_files(4, "4 derived instances", Duration::from_secs(10));
    assert_eq!(series_uids(&got).len(), 1);
    for f in &got {
        let name = dicom_object::open_file(f).unwrap().element(tags::PATIENT_NAME).unwrap().to_str().unwrap().to_string();
        assert!(!name.contains("Corrected"), "restored from the first copy: {name}");
    }
    // and b, refused before, is taken now
    assert!(storescu(d.port, CONSOLE, &b.files).status.success());
    assert_eq!(d.wait_terminal(&job_id(&b), Duration::from_secs(60)).state, JobState::Done);
}

/// A daemon whose state directory is a real small filesystem (a 96 MiB
/// tmpfs), a destination, and a 32-slice 256² series to send it (4 MiB as
/// received, 4 MiB again as derived). Fields drop in order: the daemon
/// stops before its filesystem is unmounted.
struct SmallDisk {
    d: Daemon,
    fs: Tmpfs,
    dest: StoreScp,
    src: petsim::SeriesFiles,
    _tmp: tempfile::TempDir,
}

impl SmallDisk {
    fn start(seed: u64, config: &str) -> SmallDisk {
        let tmp = tempfile::tempdir().unwrap();
        let src = series(&tmp.path().join("src"), 32, 256, seed);
        let dest = StoreScp::start(&tmp.path().join("dest"));
        let dir = tmp.path().join("d");
        let fs = Tmpfs::mount(&dir.join("state"), 96);
        let d = Daemon::start(&dir, &format!("{config}{}", destination("pacs", dest.port)));
        SmallDisk { d, fs, dest, src, _tmp: tmp }
    }

    /// `n` instances at the destination, all derived: none of the originals
    /// was forwarded in their place.
    fn assert_derived_delivered(&self, n: usize) -> Vec<std::path::PathBuf> {
        let got = self.dest.wait_files(n, &format!("{n} derived instances"), Duration::from_secs(20));
        assert!(sop_uids(&got).is_disjoint(&sop_uids(&self.src.files)), "the destination got derived instances, not originals");
        got
    }
}

/// Issue 18: a disk that another writer fills between ingest and
/// restoration. The derived series does not fit with node.min_free_mb kept
/// free: the job waits for
/// space (its originals are not forwarded in its place), and once space
/// returns it is restored and delivered without a restart. The filesystem is
/// a real small one (tmpfs), filled for real.
#[test]
fn a_full_disk_delays_restoration_and_never_forwards_originals_instead() {
    let rig = SmallDisk::start(81, "[node]\nmin_free_mb = 1\n[series]\nquiet_timeout_s = 3\n");
    let SmallDisk { d, fs, dest, src, .. } = &rig;
    // the last slice never comes: the series is restored as it is at the
    // quiet timeout (incomplete_policy "process")
    assert!(storescu(d.port, CONSOLE, &src.files[..31]).status.success());
    let id = job_id(src);
    d.wait_job(&id, "31 instances in the spool", Duration::from_secs(10), |j| j.received == 31);
    // meanwhile another writer fills the disk, past the room ingest held
    // for the derived copy: 1.5 MiB left, the derived copy needs ~4 + 1
    let filler = fs.fill_leaving(1024 * 1024 + 512 * 1024);
    let waiting = d.wait_job(&id, "the job to wait for disk space", Duration::from_secs(60), |j| j.space_waits > 0);
    assert_eq!(waiting.received, 31);
    assert!(waiting.history.iter().any(|e| e.what.starts_with("waiting for disk space: disk full")), "{:#?}", waiting.history);
    d.wait_log("the job waits for disk space");
    // a few more attempts while the disk stays full: still waiting, nothing sent
    d.wait_job(&id, "a second attempt", Duration::from_secs(20), |j| j.space_waits > 1);
    let j = d.job(&id);
    assert!(matches!(j.state, JobState::Queued | JobState::Restoring), "{:?}\n{:#?}", j.state, j.history);
    assert!(dest.files().is_empty(), "nothing is forwarded while the job waits for space");

    std::fs::remove_file(&filler).unwrap();
    let job = d.wait_terminal(&id, Duration::from_secs(120));
    assert_eq!(job.state, JobState::Done, "{:#?}", job.history);
    assert!(job.history.iter().any(|e| e.what.starts_with("disk space available again")), "{:#?}", job.history);
    let got = rig.assert_derived_delivered(31);
    assert_eq!(series_uids(&got).len(), 1);
}

/// Issue 18: the watermark counts what the daemon will write for what it
/// took. A series waiting to be restored holds room for its derived copy,
/// so a second series is taken only while both derived copies still fit:
/// the rest of it is refused (0xA700, "held for output") instead of filling
/// the disk, the first series is restored without waiting for space, and no
/// write ever meets a full disk. Real small filesystem (tmpfs), filled for
/// real. (Without the hold every slice of b is taken, 5 MiB free against
/// 4 MiB + the 1 MiB reserve, and a then waits for space.)
#[test]
fn the_watermark_holds_room_for_the_derived_series() {
    let tmp = tempfile::tempdir().unwrap();
    // 128 KiB per slice as received, as much again as derived
    let a = series(&tmp.path().join("a"), 16, 256, 84);
    let b = series(&tmp.path().join("b"), 32, 256, 85);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let dir = tmp.path().join("d");
    let fs = Tmpfs::mount(&dir.join("state"), 96);
    let d = Daemon::start(&dir, &format!("[node]\nmin_free_mb = 1\n[series]\nquiet_timeout_s = 5\n{}", destination("pacs", dest.port)));
    let filler = fs.fill_leaving(7 * 1024 * 1024);
    // a, all but its last slice: restored as it is at the quiet timeout
    assert!(storescu(d.port, CONSOLE, &a.files[..15]).status.success());
    // b meanwhile: part of it is taken, the rest refused
    let out = storescu(d.port, CONSOLE, &b.files);
    let (taken, refused) = store_responses(&text(&out));
    assert!(!refused.is_empty() && !taken.is_empty(), "part of b is refused, part taken: {}", text(&out));
    assert_eq!(taken.len() + refused.len(), 32, "every instance answered: {}", text(&out));
    assert!(text(&out).contains("Refused: OutOfResources"), "{}", text(&out));
    d.wait_log("held for output");
    // a is restored without waiting for space: its room was kept
    let job = d.wait_terminal(&job_id(&a), Duration::from_secs(60));
    assert_eq!((job.state, job.received, job.space_waits), (JobState::Done, 15, 0), "{:#?}", job.history);
    assert!(!job.history.iter().any(|e| e.what.contains("disk space")), "{:#?}", job.history);
    // space returns; the console sends b again and all of it goes through
    std::fs::remove_file(&filler).unwrap();
    assert!(storescu(d.port, CONSOLE, &b.files).status.success());
    let job =
        d.wait_job(&job_id(&b), "b restored with every slice", Duration::from_secs(60), |j| j.state == JobState::Done && j.received == 32);
    assert_eq!(job.space_waits, 0, "{:#?}", job.history);
    wait_for("47 derived instances", Duration::from_secs(20), || (dest.files().len() >= 47).then_some(()));
    let log = d.log();
    assert!(!log.contains("No space left on device"), "no write met a full disk:\n{log}");
    drop(d);
}

/// Issue 18: a real "No space left on device" in the materializer (no
/// reserve configured, so nothing stops the disk from filling). What was
/// acknowledged stays in the arrival log, new instances get Out of
/// Resources with the reason first, and when space returns the materializer
/// catches up and ingest resumes by itself: the series is restored and
/// delivered without a restart.
#[test]
fn enospc_in_the_spool_recovers_by_itself_when_space_returns() {
    let rig = SmallDisk::start(82, "[node]\nmin_free_mb = 0\n[series]\nquiet_timeout_s = 2\n");
    let SmallDisk { d, fs, src, .. } = &rig;
    // room for about a quarter of the series in the spool
    let filler = fs.fill_leaving(1024 * 1024);
    let first = storescu(d.port, CONSOLE, &src.files[..16]);
    d.wait_log("No space left on device");
    let out = text(&storescu(d.port, CONSOLE, &src.files[16..]));
    let (_, refused) = store_responses(&out);
    assert!(!refused.is_empty(), "{out}");
    assert!(out.contains("Refused: OutOfResources"), "{out}");
    d.wait_log("disk full (");
    let (acknowledged, _) = store_responses(&text(&first));
    assert!(!acknowledged.is_empty(), "{}", text(&first));
    std::fs::remove_file(&filler).unwrap();
    d.wait_log("ingest resumed");
    // the console sends again what was refused (and what it is unsure of)
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_job(&job_id(src), "the series restored and delivered", Duration::from_secs(120), |j| j.state.is_terminal());
    assert_eq!((job.received, &job.state), (32, &JobState::Done), "{:#?}", job.history);
    rig.assert_derived_delivered(32);
}

/// A restart on a full disk: instances acknowledged into the arrival log
/// whose move into the spool met a full disk, then a crash, then a start
/// with the disk still full. The daemon starts anyway (a daemon that
/// cannot start is restarted by systemd in a loop, and nothing is
/// restored, delivered or reported meanwhile), says why new instances are
/// refused, and moves the logged instances into the spool when there is
/// room, without another restart. Real small filesystem (tmpfs).
#[test]
fn a_restart_on_a_full_disk_starts_and_replays_the_log_when_space_returns() {
    let mut rig = SmallDisk::start(86, "[node]\nmin_free_mb = 0\n[series]\nquiet_timeout_s = 2\n");
    let SmallDisk { d, fs, src, .. } = &mut rig;
    // the first slices reach the spool; then the disk fills
    assert!(storescu(d.port, CONSOLE, &src.files[..4]).status.success());
    d.wait_job(&job_id(src), "4 instances in the spool", Duration::from_secs(10), |j| j.received == 4);
    let filler = fs.fill_leaving(1024 * 1024);
    let first = storescu(d.port, CONSOLE, &src.files[4..16]);
    let (acknowledged, _) = store_responses(&text(&first));
    assert!(!acknowledged.is_empty(), "{}", text(&first));
    d.wait_log("No space left on device");
    // the acknowledged instances are only in the arrival log; a crash
    d.kill9();
    d.restart();
    d.wait_log("cannot replay the arrival log");
    // the slices in the log are not lost from view: the series' quiet time
    // (2 s) does not end while they wait, so it is not processed without them
    std::thread::sleep(Duration::from_secs(5));
    let job = d.job(&job_id(src));
    assert_eq!((job.state.clone(), job.received), (JobState::Receiving, 4), "{:#?}", job.history);
    // the box says why it refuses, and refuses with that reason
    let st = petrestore(&["status", "--state-dir", d.state_dir().to_str().unwrap()]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&st)));
    assert!(st["ingest_stalled"].as_str().is_some_and(|s| s.contains("disk full")), "{st}");
    let out = text(&storescu(d.port, CONSOLE, &src.files[16..]));
    let (taken, refused) = store_responses(&out);
    assert!(taken.is_empty() && !refused.is_empty(), "{out}");
    assert!(out.contains("Refused: OutOfResources"), "{out}");
    assert!(!d.log().contains("arrival log replayed"), "{}", d.log());
    // nothing the start found was taken for damage
    assert!(!d.log().contains("repairing it"), "{}", d.log());

    std::fs::remove_file(&filler).unwrap();
    d.wait_log("arrival log replayed: the spool takes instances again");
    let job = d.job(&job_id(src));
    assert!(
        job.received as usize >= acknowledged.len(),
        "every acknowledged instance recorded: {} of {}",
        job.received,
        acknowledged.len()
    );
    // the console sends again what was refused; every slice is restored
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let job = d.wait_job(&job_id(src), "the series restored and delivered", Duration::from_secs(120), |j| j.state.is_terminal());
    assert_eq!((job.received, &job.state), (32, &JobState::Done), "{:#?}", job.history);
    rig.assert_derived_delivered(32);
}

/// Issue 18, found by the torture harness: a finished series that gets more
/// instances (the console resends the whole series after the part it sent
/// first was processed as incomplete) is processed again, also when the
/// daemon crashes right then and the journal has to be repaired. Before the
/// fix the repair put the job back to "done" from the outcome log and the
/// new instances were never restored or delivered. Two crashes: one with
/// the journal intact, one with the journal lost.
#[test]
fn a_series_reopened_by_new_instances_is_finished_after_a_crash_and_a_repair() {
    for lose_journal in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let src = series(&tmp.path().join("src"), 16, 32, 83);
        let dest = StoreScp::start(&tmp.path().join("dest"));
        let mut d = Daemon::start(
            &tmp.path().join("d"),
            &format!("[series]\nquiet_timeout_s = 1\nincomplete_policy = \"process\"\n{}", destination("pacs", dest.port)),
        );
        // the first part, processed as incomplete at the quiet timeout and delivered
        assert!(storescu(d.port, CONSOLE, &src.files[..11]).status.success());
        let first = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
        assert_eq!((first.state, first.received), (JobState::Done, 11), "{:#?}", first.history);
        wait_for("11 derived instances", Duration::from_secs(10), || (dest.files().len() == 11).then_some(()));
        // the console sends the whole series again; the daemon dies at once
        assert!(storescu(d.port, CONSOLE, &src.files).status.success());
        d.kill9();
        if lose_journal {
            std::fs::remove_dir_all(d.state_dir().join("journal")).unwrap();
        }
        d.restart();
        let job = d.wait_job(&job_id(&src), "the reopened series finished", Duration::from_secs(60), |j| {
            j.state.is_terminal() && j.received == 16
        });
        assert_eq!(job.state, JobState::Done, "journal lost: {lose_journal}: {:#?}", job.history);
        // the complete series under its own UIDs; the partial one sent
        // before keeps its own (different pixels never share a UID) and
        // says it has 11 slices
        let complete: BTreeSet<String> = src.sop_uids.iter().map(|s| petrestore::dicom::uid::derived_uid(s, &salt(&job))).collect();
        let got = wait_for("the 16 instances of the complete series", Duration::from_secs(20), || {
            let f = dest.files();
            complete.is_subset(&sop_uids(&f)).then_some(f)
        });
        assert_eq!(series_uids(&got).len(), 2, "journal lost: {lose_journal}");
        let partial: Vec<_> = got
            .iter()
            .map(|p| dicom_object::open_file(p).unwrap().into_inner())
            .filter(|o| !complete.contains(&o.str_of(tags::SOP_INSTANCE_UID).unwrap()))
            .collect();
        assert_eq!(partial.len(), 11, "journal lost: {lose_journal}");
        assert!(partial.iter().all(|o| o.i64_of(tags::NUMBER_OF_SLICES) == Some(11)));
    }
}
