//! MQTT over TLS with required client certificates, and the shipped ACL
//! example: a box publishes under its own prefix only.

use std::time::Duration;

use std::path::Path;

use testkit::*;

#[test]
fn tls_with_client_certificates_and_the_acl_confines_a_box_to_its_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    pki(&pki_dir, &["box1", "fleet"]);
    let p = |f: &str| pki_dir.join(f).display().to_string();
    let acl = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("config/mosquitto-acl.example");
    let broker = Mosquitto::start(
        tmp.path(),
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nacl_file {}\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key"),
            acl.display()
        ),
    );
    let fleet_tls = ["--cafile", &p("ca.pem"), "--cert", &p("fleet.pem"), "--key", &p("fleet.key")];
    let box1_tls = ["--cafile", &p("ca.pem"), "--cert", &p("box1.pem"), "--key", &p("box1.key")];
    let fleet_tls: Vec<&str> = fleet_tls.iter().map(|s| s.as_ref()).collect();
    let box1_tls: Vec<&str> = box1_tls.iter().map(|s| s.as_ref()).collect();
    let fleet = Sub::start(broker.port, "petrestore/v1/#", &fleet_tls);

    // the right client certificate: connected, status online
    let d = Daemon::start(
        &tmp.path().join("d1"),
        &format!(
            "[node]\ndevice_id = \"box1\"\n[mqtt]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            broker.port,
            p("ca.pem"),
            p("box1.pem"),
            p("box1.key")
        ),
    );
    let st = wait_for("box1 online over TLS", Duration::from_secs(30), || {
        fleet.on("box1/status").into_iter().find(|v| v["state"] == "online").or_else(|| {
            assert!(!d.log().contains("MQTT broker unreachable"), "box1 could not connect:\n{}", d.log());
            None
        })
    });
    assert_schema("status", &st);

    // no client certificate: the broker refuses the connection
    let d2 = Daemon::start(
        &tmp.path().join("d2"),
        &format!("[node]\ndevice_id = \"box2\"\n[mqtt]\nurl = \"mqtts://localhost:{}\"\nca_file = {:?}\n", broker.port, p("ca.pem")),
    );
    wait_for("box2's connection failure in its log", Duration::from_secs(20), || {
        d2.log().contains("MQTT broker unreachable").then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(fleet.on("box2/status").is_empty(), "box2 has no client certificate and must not get in");

    // ACL: box1's certificate may publish under its prefix, not under another box's
    assert!(mosquitto_pub(broker.port, "petrestore/v1/box1/probe", "{\"ok\":1}", &box1_tls).status.success());
    let _ = mosquitto_pub(broker.port, "petrestore/v1/box3/status", "{\"state\":\"online\"}", &box1_tls);
    fleet.wait_on("box1/probe", "box1's own-prefix publish", Duration::from_secs(10), |_| true);
    std::thread::sleep(Duration::from_millis(500));
    assert!(fleet.on("box3/status").is_empty(), "the ACL must stop box1 from publishing as box3");
    // and the fleet can command box1
    assert!(mosquitto_pub(broker.port, "petrestore/v1/box1/cmd/pause", "{\"correlation_id\":\"f1\"}", &fleet_tls).status.success());
    let r = fleet.wait_on("box1/cmd/pause/reply", "reply over TLS", Duration::from_secs(10), |v| v["correlation_id"] == "f1");
    assert_eq!(r["ok"], true);
    drop(d);
}
