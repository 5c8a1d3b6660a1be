//! Storage commitment against a real archive (Orthanc): a destination with
//! `commitment = true` counts as delivered only when the archive's
//! N-EVENT-REPORT confirms every instance sent; one whose report never
//! comes is sent again after `commitment_timeout_s` and, when attempts run
//! out, fails the job with the reason, keeping the received series.

use std::time::Duration;

use testkit::*;

#[test]
fn delivery_counts_only_what_the_archive_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    // Reports to us: the archive knows this node's AE title and port.
    let archive = Orthanc::start(&tmp.path().join("archive"), "ARCHIVE", &[("petrestore", OUR_AE, port)]);
    // Takes the request but reports to a port where nobody listens.
    let silent = Orthanc::start(&tmp.path().join("silent"), "SILENT", &[("petrestore", OUR_AE, free_port())]);
    let extra = format!(
        "[egress]\nmax_attempts = 2\n\
         [[destination]]\nname = \"archive\"\nae_title = \"ARCHIVE\"\naddress = \"127.0.0.1:{}\"\ncommitment = true\ncommitment_timeout_s = 60\n\
         [[destination]]\nname = \"silent\"\nae_title = \"SILENT\"\naddress = \"127.0.0.1:{}\"\ncommitment = true\ncommitment_timeout_s = 3\n",
        archive.port, silent.port
    );
    let d = Daemon::start_on(&tmp.path().join("node"), port, &extra);
    let s = series(&tmp.path().join("in"), 8, 32, 41);
    let o = storescu(port, CONSOLE, &s.files);
    assert!(o.status.success(), "{}", text(&o));
    let id = job_id(&s);

    // The archive stored the series and confirmed it by its report.
    let job = d.wait_job(&id, "the archive's commitment", Duration::from_secs(120), |j| {
        j.deliveries.iter().any(|x| x.destination == "archive" && x.delivered)
    });
    assert_eq!(archive.stored(), 8, "the archive holds the restored series");
    let history: Vec<&str> = job.history.iter().map(|e| e.what.as_str()).collect();
    assert!(history.iter().any(|h| h.contains("storage commitment requested")), "{history:#?}");
    assert!(history.iter().any(|h| h.starts_with("storage commitment confirmed by archive: 8 instances")), "{history:#?}");
    assert!(!job.state.is_terminal(), "the silent archive has not committed: {:?}", job.state);

    // The silent one stored it too, but never said so: sent again once, then
    // the job fails with the reason; nothing received is removed.
    let job = d.wait_terminal(&id, Duration::from_secs(120));
    let petrestore::journal::JobState::Failed { reason } = &job.state else { panic!("{:?}", job.state) };
    assert!(reason.contains("no storage commitment report from silent"), "{reason}");
    let silent_delivery = job.deliveries.iter().find(|x| x.destination == "silent").unwrap();
    assert_eq!((silent_delivery.delivered, silent_delivery.attempts), (false, 2));
    assert!(job.history.iter().any(|e| e.what.contains("sending again")), "{:#?}", job.history);
    assert!(silent.stored() >= 8, "the silent archive received the series ({} files)", silent.stored());
    assert_eq!(d.spool_files().len(), 8, "the received series stays in the spool");
    assert!(d.log().contains("storage commitment confirmed"), "{}", d.log());
}

/// Drained for maintenance (the fleet's `drain`), the box refuses new
/// associations but still lets an archive in to report storage
/// commitment: the job running finishes with the report instead of
/// waiting out `commitment_timeout_s` and sending the series again.
#[test]
fn a_drained_box_still_takes_the_archives_commitment_report() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = Mosquitto::start(tmp.path(), "");
    let archive = Orthanc::start(&tmp.path().join("archive"), "ARCHIVE", &[("petrestore", OUR_AE, port)]);
    // first at a port where nothing listens: the series waits, retried
    let dest = |p: u16| {
        format!(
            "[[destination]]\nname = \"archive\"\nae_title = \"ARCHIVE\"\naddress = \"127.0.0.1:{p}\"\ncommitment = true\ncommitment_timeout_s = 120\n"
        )
    };
    let head = format!("[node]\ndevice_id = \"box1\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n[egress]\nmax_attempts = 100\n", broker.port);
    let d = Daemon::start_on(&tmp.path().join("node"), port, &format!("{head}{}", dest(free_port())));
    let s = series(&tmp.path().join("in"), 8, 32, 43);
    assert!(storescu(port, CONSOLE, &s.files).status.success());
    let id = job_id(&s);
    d.wait_job(&id, "a failed attempt", Duration::from_secs(60), |j| j.deliveries.iter().any(|x| x.attempts >= 1));

    let sub = Sub::start(broker.port, "petrestore/v1/box1/#", &[]);
    sub.wait_on("/status", "online", Duration::from_secs(20), |v| v["state"] == "online");
    let out = mosquitto_pub(broker.port, "petrestore/v1/box1/cmd/drain", r#"{"correlation_id": "d1"}"#, &[]);
    assert!(out.status.success(), "{}", text(&out));
    sub.wait_on("/status", "draining", Duration::from_secs(10), |v| v["state"] == "draining");
    let refused = storescu(port, CONSOLE, &s.files[..1]);
    assert!(!refused.status.success(), "a console is refused while draining");
    // the archive's AE title is let in (to report); a C-STORE from it is
    // answered out of resources, to be sent again later
    let o = text(&storescu(port, "ARCHIVE", &s.files[..1]));
    assert!(o.contains("Out of Resources") || o.contains("OutOfResources"), "{o}");

    // the archive's address corrected: the series goes out, and its report
    // comes in on the archive's own association
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let (kept, _) = cfg.split_once("[[destination]]").unwrap();
    std::fs::write(&d.config, format!("{kept}{}", dest(archive.port))).unwrap();
    d.signal("HUP");
    let job = d.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(job.state, petrestore::journal::JobState::Done, "{:#?}", job.history);
    assert!(job.history.iter().any(|e| e.what.starts_with("storage commitment confirmed by archive: 8 instances")), "{:#?}", job.history);
    assert_eq!(archive.stored(), 8);
}
