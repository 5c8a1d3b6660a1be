//! The DICOM SCP against hostile and unexpected input: access control,
//! malformed and truncated data sets, bad UIDs, wrong SOP classes, a full
//! disk. Every case gets a clear status or rejection, nothing half-written
//! stays behind, and the daemon keeps serving the next association.

use std::io::Write;
use std::time::Duration;

use petrestore::dicom::dimse::status;
use petrestore::dicom::{EXPLICIT_VR_LE, PET_IMAGE_STORAGE};
use petrestore::egress::scu::{self, Peer, SendError};
use testkit::*;

fn peer(port: u16) -> Peer {
    Peer {
        address: format!("127.0.0.1:{port}"),
        called_ae: OUR_AE.into(),
        calling_ae: CONSOLE.into(),
        timeout: petrestore::egress::scu::DEFAULT_TIMEOUT,
    }
}

fn rt() -> tokio::runtime::Runtime {
    // dicom-ul's P-DATA writer needs the multi-threaded runtime
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// The data set bytes (after the Part 10 header) of a file we made.
fn dataset_of(path: &std::path::Path) -> Vec<u8> {
    let obj = dicom_object::open_file(path).unwrap();
    petrestore::dicom::part10::dataset_bytes(&obj, EXPLICIT_VR_LE).unwrap()
}

fn assert_still_serving(d: &Daemon) {
    let out = echoscu(d.port, CONSOLE, OUR_AE);
    assert!(out.status.success(), "daemon stopped serving: {}\nlog:\n{}", text(&out), d.log());
}

#[test]
fn echo_and_association_access_control() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), "");
    let ok = echoscu(d.port, CONSOLE, OUR_AE);
    assert!(ok.status.success(), "{}", text(&ok));

    let stranger = echoscu(d.port, "STRANGER", OUR_AE);
    assert!(!stranger.status.success());
    assert!(text(&stranger).contains("Calling AE Title Not Recognized"), "{}", text(&stranger));

    let wrong_called = echoscu(d.port, CONSOLE, "SOMEONE");
    assert!(!wrong_called.status.success());
    assert!(text(&wrong_called).contains("Called AE Title Not Recognized"), "{}", text(&wrong_called));
    assert_still_serving(&d);
}

#[test]
fn caller_pinned_to_another_host_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), "[dicom]\nallowed_callers = [\"CONSOLE@10.9.9.9\", \"WS@127.0.0.1\"]\n");
    assert!(!echoscu(d.port, CONSOLE, OUR_AE).status.success(), "CONSOLE is only allowed from 10.9.9.9");
    assert!(echoscu(d.port, "WS", OUR_AE).status.success());
}

#[test]
fn malformed_truncated_and_hostile_datasets_get_failure_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 3, 32, 31);
    let d = Daemon::start(&tmp.path().join("d"), "");
    let p = peer(d.port);
    let good = dataset_of(&src.files[0]);
    let sop = &src.sop_uids[0];
    let rt = rt();

    // garbage bytes
    let (st, comment) = rt.block_on(scu::send_raw(&p, PET_IMAGE_STORAGE, "1.2.3", EXPLICIT_VR_LE, b"\x08\x00\x16\x00garbage")).unwrap();
    assert_eq!(st, status::CANNOT_UNDERSTAND, "{comment:?}");
    assert_still_serving(&d);

    // truncated in the middle of Pixel Data
    let (st, comment) = rt.block_on(scu::send_raw(&p, PET_IMAGE_STORAGE, sop, EXPLICIT_VR_LE, &good[..good.len() - 700])).unwrap();
    assert_eq!(st, status::CANNOT_UNDERSTAND, "{comment:?}");
    assert_still_serving(&d);

    // the command's SOP instance differs from the data set's
    let (st, comment) = rt.block_on(scu::send_raw(&p, PET_IMAGE_STORAGE, "1.2.3.4", EXPLICIT_VR_LE, &good)).unwrap();
    assert_eq!(st, status::DATASET_MISMATCH, "{comment:?}");
    assert!(comment.unwrap().contains("SOP Instance UID"));

    // a path-traversal Series Instance UID
    let mut obj = dicom_object::open_file(&src.files[1]).unwrap().into_inner();
    obj.put(dicom_core::DataElement::new(
        dicom_dictionary_std::tags::SERIES_INSTANCE_UID,
        dicom_core::VR::UI,
        dicom_core::PrimitiveValue::from("../../x"),
    ));
    let bad = petrestore::dicom::part10::dataset_bytes(&obj, EXPLICIT_VR_LE).unwrap();
    let (st, comment) = rt.block_on(scu::send_raw(&p, PET_IMAGE_STORAGE, &src.sop_uids[1], EXPLICIT_VR_LE, &bad)).unwrap();
    assert_eq!(st, status::CANNOT_UNDERSTAND);
    assert!(comment.unwrap().contains("Series Instance UID"));
    assert!(!d.state_dir().join("x").exists() && !tmp.path().join("x").exists());

    // a Number of Slices no series has (which would make the journal wait
    // for, and list, four billion slices), and a zero Image Index
    for (tag, vr, value) in [
        (dicom_dictionary_std::tags::NUMBER_OF_SLICES, dicom_core::VR::US, dicom_core::PrimitiveValue::from(0u16)),
        (dicom_dictionary_std::tags::NUMBER_OF_SLICES, dicom_core::VR::UL, dicom_core::PrimitiveValue::from(u32::MAX)),
        (dicom_dictionary_std::tags::IMAGE_INDEX, dicom_core::VR::US, dicom_core::PrimitiveValue::from(0u16)),
    ] {
        let mut obj = dicom_object::open_file(&src.files[2]).unwrap().into_inner();
        obj.put(dicom_core::DataElement::new(tag, vr, value));
        let bad = petrestore::dicom::part10::dataset_bytes(&obj, EXPLICIT_VR_LE).unwrap();
        let (st, comment) = rt.block_on(scu::send_raw(&p, PET_IMAGE_STORAGE, &src.sop_uids[2], EXPLICIT_VR_LE, &bad)).unwrap();
        assert_eq!(st, status::CANNOT_UNDERSTAND, "{tag}: {comment:?}");
        let comment = comment.unwrap();
        assert!(comment.contains("outside 1..=100000"), "{comment}");
        assert_still_serving(&d);
    }

    // nothing of the above was stored
    assert!(d.spool_files().is_empty(), "{:?}", d.spool_files());
    assert!(d.jobs().is_empty());

    // a well-formed instance still goes through
    let (st, _) = rt.block_on(scu::send_raw(&p, PET_IMAGE_STORAGE, sop, EXPLICIT_VR_LE, &good)).unwrap();
    assert_eq!(st, status::SUCCESS);
    assert_eq!(d.spool_files().len(), 1);
}

#[test]
fn not_a_dicom_peer_at_all_does_not_stop_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), "");
    for junk in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0x01, 0x00, 0xff, 0xff, 0xff, 0xff, 0, 0][..], &[0x04; 3][..]] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let _ = s.write_all(junk);
        let _ = std::io::Read::read(&mut s, &mut [0u8; 64]);
    }
    assert_still_serving(&d);
}

#[test]
fn other_storage_classes_are_refused_or_passed_through_per_config() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 1, 32, 33);
    let ct_class = "1.2.840.10008.5.1.4.1.1.2";
    let mut obj = dicom_object::open_file(&src.files[0]).unwrap().into_inner();
    obj.put(dicom_core::DataElement::new(
        dicom_dictionary_std::tags::SOP_CLASS_UID,
        dicom_core::VR::UI,
        dicom_core::PrimitiveValue::from(ct_class),
    ));
    obj.put(dicom_core::DataElement::new(dicom_dictionary_std::tags::MODALITY, dicom_core::VR::CS, dicom_core::PrimitiveValue::from("CT")));
    let ct = petrestore::dicom::part10::dataset_bytes(&obj, EXPLICIT_VR_LE).unwrap();
    let rt = rt();

    let refuse = Daemon::start(&tmp.path().join("refuse"), "");
    let r = rt.block_on(scu::send_raw(&peer(refuse.port), ct_class, &src.sop_uids[0], EXPLICIT_VR_LE, &ct));
    let refused = match &r {
        Err(SendError::NoContext { .. }) => true,
        Err(SendError::Associate { reason, .. }) => reason.contains("no presentation contexts accepted"),
        _ => false,
    };
    assert!(refused, "CT must not be negotiated with non_pet = \"refuse\": {r:?}");
    assert_still_serving(&refuse);

    let dest = StoreScp::start(&tmp.path().join("dest"));
    let pass = Daemon::start(
        &tmp.path().join("pass"),
        &format!("[dicom]\nnon_pet = \"passthrough\"\n[series]\nquiet_timeout_s = 1\n{}", destination("pacs", dest.port)),
    );
    let (st, _) = rt.block_on(scu::send_raw(&peer(pass.port), ct_class, &src.sop_uids[0], EXPLICIT_VR_LE, &ct)).unwrap();
    assert_eq!(st, status::SUCCESS);
    let job = pass.wait_terminal(&job_id(&src), Duration::from_secs(30));
    let petrestore::journal::JobState::Skipped { reason } = &job.state else { panic!("{:?}", job.state) };
    assert!(reason.contains("not PET"), "{reason}");
    assert_eq!(dest.files().len(), 1, "passed through unchanged");
}

#[test]
fn low_disk_answers_out_of_resources_and_keeps_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 2, 32, 35);
    // a watermark no disk can meet
    let d = Daemon::start(&tmp.path().join("d"), "[node]\nmin_free_mb = 1000000000\n");
    let (st, comment) = rt()
        .block_on(scu::send_raw(&peer(d.port), PET_IMAGE_STORAGE, &src.sop_uids[0], EXPLICIT_VR_LE, &dataset_of(&src.files[0])))
        .unwrap();
    assert_eq!(st, status::OUT_OF_RESOURCES);
    assert!(comment.unwrap().contains("disk nearly full"));
    assert!(d.spool_files().is_empty());
    // storescu reports the failure too
    let out = storescu(d.port, CONSOLE, &src.files);
    assert!(text(&out).contains("Refused: OutOfResources"), "{}", text(&out));
    assert_still_serving(&d);
    // node.min_free_mb is reloadable: ingest takes the new watermark
    let cfg = std::fs::read_to_string(&d.config).unwrap().replace("min_free_mb = 1000000000", "min_free_mb = 1");
    std::fs::write(&d.config, cfg).unwrap();
    d.signal("HUP");
    d.wait_log("SIGHUP: configuration reloaded");
    let out = storescu(d.port, CONSOLE, &src.files);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(d.spool_files().len(), 2);
}

#[test]
fn an_instance_sent_again_with_other_content_is_refused_and_the_first_kept() {
    // A console that corrects a patient's name and sends the series again
    // under the same UIDs: the copy stored first may be restored or
    // delivered already, so the new one is refused (0x0110, the attribute
    // named), not answered Success and dropped. The same instance again is
    // a duplicate and acknowledged.
    use dicom_core::{DataElement, PrimitiveValue, VR};
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 2, 32, 41);
    let d = Daemon::start(&tmp.path().join("d"), "");
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    wait_for("both instances in the journal", Duration::from_secs(20), || (d.job(&id).received == 2).then_some(()));
    let send =
        |dataset: &[u8]| rt().block_on(scu::send_raw(&peer(d.port), PET_IMAGE_STORAGE, &src.sop_uids[0], EXPLICIT_VR_LE, dataset)).unwrap();
    let mut corrected = dicom_object::open_file(&src.files[0]).unwrap();
    corrected.put(DataElement::new(dicom_dictionary_std::tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Corrected^Name")));
    let (st, comment) = send(&petrestore::dicom::part10::dataset_bytes(&corrected, EXPLICIT_VR_LE).unwrap());
    assert_eq!(st, status::PROCESSING_FAILURE);
    assert!(comment.as_deref().unwrap_or_default().contains("Patient's Name differs"), "{comment:?}");
    let (st, _) = send(&dataset_of(&src.files[0]));
    assert_eq!(st, status::SUCCESS, "the same instance again is a duplicate");
    assert_eq!(d.spool_files().len(), 2);
    assert_eq!(d.job(&id).received, 2);
    let kept = d.spool_files().into_iter().map(|p| dicom_object::open_file(p).unwrap()).find(|o| {
        o.element(dicom_dictionary_std::tags::SOP_INSTANCE_UID).unwrap().to_str().unwrap().trim_end_matches('\0') == src.sop_uids[0]
    });
    let (kept, name) =
        kept.map(|o| (o.clone(), o.element(dicom_dictionary_std::tags::PATIENT_NAME).unwrap().to_str().unwrap().to_string())).unwrap();
    assert!(!name.contains("Corrected"), "the first copy is kept: {name}");
    // its file gone while its record stays (a removal that a failed unlink
    // holds up): a copy sent now would be dropped, so it is refused for later
    let path = d
        .spool_files()
        .into_iter()
        .find(|p| {
            dicom_object::open_file(p)
                .is_ok_and(|o| o.meta().media_storage_sop_instance_uid() == kept.meta().media_storage_sop_instance_uid())
        })
        .unwrap();
    std::fs::remove_file(path).unwrap();
    let (st, comment) = send(&dataset_of(&src.files[0]));
    assert_eq!(st, status::OUT_OF_RESOURCES);
    assert!(comment.as_deref().unwrap_or_default().contains("send it again later"), "{comment:?}");
}

/// A real association (C-ECHO context) held open by the test.
fn hold_association(port: u16) -> dicom_ul::association::ClientAssociation<std::net::TcpStream> {
    associate(port, petrestore::dicom::VERIFICATION, petrestore::dicom::IMPLICIT_VR_LE)
}

/// A real association with one presentation context.
fn associate(port: u16, abstract_syntax: &str, ts: &str) -> dicom_ul::association::ClientAssociation<std::net::TcpStream> {
    dicom_ul::association::client::ClientAssociationOptions::new()
        .calling_ae_title(CONSOLE)
        .called_ae_title(OUR_AE)
        .with_presentation_context(abstract_syntax, vec![ts])
        .establish(("127.0.0.1", port))
        .expect("association")
}

#[test]
fn a_pdu_longer_than_announced_is_aborted_at_its_header() {
    // An established association whose next PDU declares 4 GiB: refused
    // from its 6-byte header, before any of the body is buffered, and the
    // log names the lengths (a server that waited for the body would log
    // an idle timeout instead, a minute later).
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"), "");
    let mut assoc = hold_association(d.port);
    let s = assoc.inner_stream();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(&[0x04, 0x00, 0xFF, 0xFF, 0xFF, 0xFF]).unwrap();
    s.write_all(&[0u8; 4096]).unwrap();
    let mut reply = [0u8; 10];
    let n = std::io::Read::read(s, &mut reply).unwrap_or(0);
    assert!(n == 0 || reply[0] == 0x07, "expected an A-ABORT or a closed connection, got {:?}", &reply[..n]);
    wait_for("the refusal in the log", Duration::from_secs(10), || d.log().contains("too large").then_some(()));
    assert!(d.log().contains("4294967295"), "{}", d.log());
    assert_still_serving(&d);
}

#[test]
fn a_command_in_the_middle_of_a_data_set_aborts_the_association() {
    // PS3.7: one message at a time per presentation context. A new command
    // while the previous one's data set is unfinished is refused with an
    // A-ABORT, never joined onto the bytes already received.
    use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"), "");
    let mut assoc = hold_association(d.port);
    let pcid = assoc.presentation_contexts()[0].id;
    let pdv = |value_type, is_last, data: Vec<u8>| Pdu::PData {
        data: vec![PDataValue { presentation_context_id: pcid, value_type, is_last, data }],
    };
    let store = petrestore::dicom::dimse::store_request(1, PET_IMAGE_STORAGE, "1.2.3.4");
    assoc.send(&pdv(PDataValueType::Command, true, store)).unwrap();
    assoc.send(&pdv(PDataValueType::Data, false, vec![0u8; 512])).unwrap();
    assoc.send(&pdv(PDataValueType::Command, true, petrestore::dicom::dimse::echo_request(2))).unwrap();
    wait_for("the abort in the log", Duration::from_secs(10), || {
        d.log().contains("before the data set of the one before ended (512 bytes of it received)").then_some(())
    });
    assert!(d.spool_files().is_empty());
    assert_still_serving(&d);
}

#[test]
fn a_store_on_a_context_of_another_sop_class_is_refused() {
    // An allowed caller negotiates PET and sends a CT C-STORE on that
    // context: refused with 0x0122 (dicom.non_pet = "refuse" never
    // negotiates CT, and a context must not smuggle it in), nothing kept.
    use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 1, 32, 39);
    let d = Daemon::start(&tmp.path().join("d"), "[dicom]\nnon_pet = \"refuse\"\n");
    let mut assoc = associate(d.port, PET_IMAGE_STORAGE, EXPLICIT_VR_LE);
    let pcid = assoc.presentation_contexts()[0].id;
    let pdv = |value_type, data: Vec<u8>| Pdu::PData {
        data: vec![PDataValue { presentation_context_id: pcid, value_type, is_last: true, data }],
    };
    let ct_image_storage = "1.2.840.10008.5.1.4.1.1.2";
    let store = petrestore::dicom::dimse::store_request(1, ct_image_storage, &src.sop_uids[0]);
    assoc.send(&pdv(PDataValueType::Command, store)).unwrap();
    assoc.send(&pdv(PDataValueType::Data, dataset_of(&src.files[0]))).unwrap();
    let Pdu::PData { data } = assoc.receive().unwrap() else { panic!("no response") };
    let rsp = petrestore::dicom::dimse::Command::parse(&data[0].data).unwrap();
    assert_eq!(rsp.status, Some(status::SOP_CLASS_NOT_SUPPORTED), "{rsp:?}");
    let _ = assoc.release();
    assert!(d.spool_files().is_empty());
    assert!(d.log().contains("its SOP Class differs from its presentation context's"), "{}", d.log());
    assert_still_serving(&d);
}

#[test]
fn max_associations_queues_excess_connections_instead_of_failing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 4, 32, 37);
    let d = Daemon::start(&tmp.path().join("d"), "[dicom]\nmax_associations = 1\n");
    // hold the only slot with an idle association
    let hold = hold_association(d.port);
    let started = std::thread::spawn({
        let files = src.files.clone();
        let port = d.port;
        move || storescu(port, CONSOLE, &files)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.spool_files().is_empty(), "the second association must wait for the slot");
    hold.release().unwrap();
    let out = started.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(d.spool_files().len(), 4);
}

/// Issue 15: SIGTERM with an association open mid-series. The stop aborts
/// the association once its drain budget is spent (it does not wait for
/// the sender forever), nothing acknowledged is lost, and the next start
/// finishes the series.
#[test]
fn sigterm_with_an_association_open_mid_series_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 8, 32, 71);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    // a long quiet timeout: the first part is never processed on its own
    // (it would be delivered as a partial series under UIDs of its own)
    let mut d = Daemon::start(&tmp.path().join("d"), &format!("[series]\nquiet_timeout_s = 600\n{}", destination("pacs", dest.port)));
    assert!(storescu(d.port, CONSOLE, &src.files[..5]).status.success());
    // a console that opened an association and went quiet mid-series
    let mut hold = hold_association(d.port);
    let status = d.stop();
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(d.log().contains("aborting them") && d.log().contains("aborted at shutdown"), "{}", d.log());
    // the quiet console was told: its next receive sees the A-ABORT (or a closed socket)
    match hold.receive() {
        Ok(dicom_ul::pdu::Pdu::AbortRQ { .. }) | Err(_) => {}
        other => panic!("the quiet console got {other:?}, not an A-ABORT"),
    }
    d.restart();
    assert_eq!(d.job(&job_id(&src)).received, 5, "the acknowledged instances survived the stop");
    assert!(storescu(d.port, CONSOLE, &src.files[5..]).status.success());
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    assert_eq!(job.state, petrestore::journal::JobState::Done, "{:#?}", job.history);
    assert_eq!(wait_for("8 derived instances", Duration::from_secs(10), || (dest.files().len() == 8).then_some(8)), 8);
}

/// Issue 18: garbage, silence and one greedy host cannot hold the door.
#[test]
fn garbage_and_silent_connections_hold_no_association_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"), "[dicom]\nmax_associations = 2\nmax_associations_per_peer = 8\nartim_timeout_s = 2\n");
    // 8 connections that send 100 bytes of an invalid PDU type and stay
    // open: each gets A-ABORT at once and is closed
    let garbage: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
            s.write_all(&[0x55; 100]).unwrap();
            s
        })
        .collect();
    for mut s in garbage {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut back = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut back);
        assert_eq!(&back[..], &[0x07, 0, 0, 0, 0, 4, 0, 0, 2, 1], "A-ABORT (unrecognized PDU)");
    }
    // connections that send nothing do not take the slots: a console
    // associates at once while they are open, and ARTIM closes them
    let mut silent: Vec<std::net::TcpStream> = (0..4).map(|_| std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap()).collect();
    let t = std::time::Instant::now();
    assert_still_serving(&d);
    assert!(t.elapsed() < Duration::from_secs(2), "echo waited {:?} behind silent connections", t.elapsed());
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut back = Vec::new();
        let _ = std::io::Read::read_to_end(s, &mut back);
        assert!(back.is_empty(), "closed without a word: {back:?}");
    }
    d.wait_log("no A-ASSOCIATE-RQ within the ARTIM timeout");
    d.wait_log("not A-ASSOCIATE-RQ (0x01): A-ABORT sent");
}

#[test]
fn one_address_cannot_take_every_slot_and_a_busy_node_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"), "[dicom]\nmax_associations = 1\nmax_associations_per_peer = 2\nartim_timeout_s = 1\n");
    let hold = hold_association(d.port);
    // the second connection from this address waits for the slot: after
    // ARTIM it is rejected as transient (local limit exceeded)
    let out = echoscu(d.port, CONSOLE, OUR_AE);
    assert!(!out.status.success(), "{}", text(&out));
    d.wait_log("A-ASSOCIATE-RJ (transient, local limit exceeded)");
    // a third one at the same time is beyond the per-address cap: closed at once
    let _second = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut third = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut back = Vec::new();
    let t = std::time::Instant::now();
    let _ = std::io::Read::read_to_end(&mut third, &mut back);
    assert!(t.elapsed() < Duration::from_secs(1) && back.is_empty(), "closed at once");
    d.wait_log("dicom.max_associations_per_peer");
    hold.release().unwrap();
    drop(_second);
    assert_still_serving(&d);
}

#[test]
fn sighup_reloads_the_allow_list_and_refuses_restart_only_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), "");
    assert!(!echoscu(d.port, "WS", OUR_AE).status.success());
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, cfg.replace("allowed_callers = [\"CONSOLE\"]", "allowed_callers = [\"CONSOLE\", \"WS\"]")).unwrap();
    d.signal("HUP");
    wait_for("the reloaded allow-list", Duration::from_secs(10), || echoscu(d.port, "WS", OUR_AE).status.success().then_some(()));
    d.wait_log("SIGHUP: configuration reloaded");
    std::fs::write(&d.config, cfg.replace("ae_title = \"PETRESTORE\"", "ae_title = \"OTHER\"")).unwrap();
    d.signal("HUP");
    wait_for("the refusal in the log", Duration::from_secs(10), || d.log().contains("configuration not reloaded").then_some(()));
    assert!(d.log().contains("dicom.ae_title"), "{}", d.log());
    assert!(echoscu(d.port, CONSOLE, OUR_AE).status.success(), "still serving on the old AE title");
}

#[test]
fn data_beyond_the_memory_budget_aborts_that_sender_only() {
    // A 1 MiB budget for data sets in flight: an Enhanced PET instance of
    // 1.5 MiB aborts its association; small instances still go through, and
    // nothing of the aborted one is stored.
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("d"), "[dicom]\nmax_buffered_mb = 1\n");
    let spec = petsim::SeriesSpec { slices: 20, matrix: 192, seed: 91, frame_duration_s: 30.0, ..Default::default() };
    let big = petsim::write_series_enhanced(&tmp.path().join("big"), &spec).unwrap();
    assert!(std::fs::metadata(&big.files[0]).unwrap().len() > 1 << 20);
    let out = storescu_required(d.port, CONSOLE, &big.files);
    assert!(!out.status.success() || text(&out).contains("E: "), "the oversized data set must not be accepted: {}", text(&out));
    wait_for("the abort in the log", Duration::from_secs(10), || d.log().contains("dicom.max_buffered_mb (1 MiB)").then_some(()));
    assert_still_serving(&d);
    let small = series(&tmp.path().join("small"), 4, 32, 92);
    let out = storescu(d.port, CONSOLE, &small.files);
    assert!(out.status.success() && !text(&out).contains("E: "), "{}", text(&out));
    let stored = d.spool_files();
    assert_eq!(stored.len(), 4, "only the small series is stored: {stored:?}");
}
