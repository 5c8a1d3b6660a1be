//! DICOM TLS ingest against DCMTK's storescu/echoscu built with OpenSSL:
//! mutual TLS on a second listener, refusals for callers without a
//! certificate, with one from another CA, or speaking plain TCP, and the
//! plain listener still serving. Nothing is stored from a refused caller.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use testkit::*;

fn tls_storescu(dir: &Path, port: u16, client: Option<&str>, ca: &str, files: &[std::path::PathBuf]) -> Output {
    let mut c = Command::new(require("storescu"));
    match client {
        Some(cn) => c.args(["+tls", &format!("{cn}.key"), &format!("{cn}.pem")]),
        None => c.arg("+tla"),
    };
    c.args(["+cf", ca, "-aet", CONSOLE, "-aec", OUR_AE, "127.0.0.1", &port.to_string()]).args(files).current_dir(dir).output().unwrap()
}

/// A CA, server and "console" client certificates in `<tmp>/pki`, and a
/// daemon with `dicom_extra` in `[dicom]` and a mutual-TLS listener, once
/// that listener accepts. Returns the daemon, the PKI folder and the TLS port.
fn tls_daemon(tmp: &Path, dicom_extra: &str) -> (Daemon, std::path::PathBuf, u16) {
    let pki_dir = tmp.join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    pki(&pki_dir, &["console"]);
    let tls_port = free_port();
    let p = |f: &str| pki_dir.join(f).display().to_string();
    let extra = format!(
        "[dicom]\n{dicom_extra}[dicom.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    );
    let d = Daemon::start(&tmp.join("d"), &extra);
    wait_for("the TLS listener", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", tls_port)).ok());
    (d, pki_dir, tls_port)
}

#[test]
fn mutual_tls_stores_and_refuses_callers_without_a_trusted_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut d, pki_dir, tls_port) = tls_daemon(tmp.path(), "");
    // a second CA whose client certificate the node must not trust
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    pki(&other, &["console"]);

    let s = series(&tmp.path().join("s"), 4, 32, 71);
    let o = tls_storescu(&pki_dir, tls_port, Some("console"), "ca.pem", &s.files);
    assert!(o.status.success(), "TLS storescu with a trusted client certificate failed:\n{}", text(&o));
    assert_eq!(d.spool_files().len(), 4, "four instances spooled over TLS");

    let s2 = series(&tmp.path().join("s2"), 2, 32, 72);
    // no client certificate: the handshake fails, nothing stored
    let o = tls_storescu(&pki_dir, tls_port, None, "ca.pem", &s2.files);
    assert!(!o.status.success(), "anonymous TLS must be refused when client_ca is set:\n{}", text(&o));
    // a certificate from another CA: refused
    let o = tls_storescu(&other, tls_port, Some("console"), &pki_dir.join("ca.pem").display().to_string(), &s2.files);
    assert!(!o.status.success(), "a client certificate from an untrusted CA must be refused:\n{}", text(&o));
    // plain DICOM on the TLS port: refused
    let o = storescu(tls_port, CONSOLE, &s2.files);
    assert!(!o.status.success(), "plain TCP on the TLS port must fail:\n{}", text(&o));
    assert_eq!(d.spool_files().len(), 4, "nothing stored from refused callers");
    d.wait_log("TLS association refused");

    // the plain listener keeps serving, and the daemon still takes TLS
    let o = storescu(d.port, CONSOLE, &s2.files);
    assert!(o.status.success(), "{}", text(&o));
    let s3 = series(&tmp.path().join("s3"), 1, 32, 73);
    let o = tls_storescu(&pki_dir, tls_port, Some("console"), "ca.pem", &s3.files);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(d.spool_files().len(), 7);
    assert!(d.stop().success());
}

/// `dicom.max_associations` counts every association, plain and TLS
/// together: with one slot held by a plain association, a TLS caller
/// waits for it.
#[test]
fn the_association_limit_is_shared_by_the_plain_and_the_tls_listener() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, pki_dir, tls_port) = tls_daemon(tmp.path(), "max_associations = 1\n");
    // the only slot, held by an idle plain association
    let hold = dicom_ul::association::client::ClientAssociationOptions::new()
        .calling_ae_title(CONSOLE)
        .called_ae_title(OUR_AE)
        .with_presentation_context(petrestore::dicom::VERIFICATION, vec![petrestore::dicom::IMPLICIT_VR_LE])
        .establish(("127.0.0.1", d.port))
        .expect("association");
    let s = series(&tmp.path().join("s"), 2, 32, 74);
    let sending = std::thread::spawn({
        let (dir, files) = (pki_dir.clone(), s.files.clone());
        move || tls_storescu(&dir, tls_port, Some("console"), "ca.pem", &files)
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(d.spool_files().is_empty(), "the TLS association must wait for the slot the plain one holds");
    hold.release().unwrap();
    let o = sending.join().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(d.spool_files().len(), 2);
}

/// Connections to the TLS listener that never start a handshake (a port
/// scanner, a health check) hold no association slot: they wait for their
/// ClientHello outside the slots, so a console associates at once while
/// they are open, and ARTIM closes them.
#[test]
fn silent_connections_to_the_tls_listener_hold_no_association_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, pki_dir, tls_port) = tls_daemon(tmp.path(), "max_associations = 2\nmax_associations_per_peer = 8\nartim_timeout_s = 8\n");
    let silent: Vec<std::net::TcpStream> = (0..4).map(|_| std::net::TcpStream::connect(("127.0.0.1", tls_port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let s = series(&tmp.path().join("s"), 1, 32, 75);
    let t = std::time::Instant::now();
    let o = tls_storescu(&pki_dir, tls_port, Some("console"), "ca.pem", &s.files);
    assert!(o.status.success(), "{}", text(&o));
    // behind slot holders it would wait for their ARTIM (8 s)
    assert!(t.elapsed() < Duration::from_secs(5), "a TLS console waited {:?} behind silent connections", t.elapsed());
    assert_eq!(d.spool_files().len(), 1);
    drop(silent);
    // plain DICOM on the TLS port is closed at its first bytes
    assert!(!storescu(tls_port, CONSOLE, &s.files).status.success());
    d.wait_log("on the TLS listener are not a TLS ClientHello: closed");
    let _idle = std::net::TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    d.wait_log("no TLS ClientHello within the ARTIM timeout");
}

#[test]
fn bad_tls_files_stop_the_daemon_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[node]\nstate_dir = {:?}\n[dicom]\nlisten = \"127.0.0.1:{}\"\n[dicom.tls]\nlisten = \"127.0.0.1:{}\"\ncert = {:?}\nkey = {:?}\n",
            tmp.path().join("state"),
            free_port(),
            free_port(),
            junk,
            junk
        ),
    )
    .unwrap();
    let o = petrestore(&["serve", "--config", &cfg.display().to_string()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("dicom.tls.cert") && t.contains("junk.pem") && t.contains("no certificate"), "{t}");
    // the TLS port must differ from the plain one
    std::fs::write(&cfg, "[dicom]\nlisten = \"127.0.0.1:2762\"\n[dicom.tls]\nlisten = \"127.0.0.1:2762\"\ncert = \"a\"\nkey = \"b\"\n")
        .unwrap();
    let o = petrestore(&["check-config", &cfg.display().to_string()]);
    assert!(!o.status.success() && text(&o).contains("dicom.tls.listen"), "{}", text(&o));
}
