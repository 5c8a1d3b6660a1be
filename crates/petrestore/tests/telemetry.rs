//! Fleet telemetry against a real Mosquitto broker: retained status and the
//! last will, job events, commands, health, the offline buffer. Every payload
//! the daemon emits is validated against its JSON Schema.

use std::time::Duration;

use testkit::*;

const DEV: &str = "box1";

fn mqtt(port: u16, extra: &str) -> String {
    format!("[node]\ndevice_id = \"{DEV}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nhealth_interval_s = 0.5\n{extra}")
}

fn topic(t: &str) -> String {
    format!("petrestore/v1/{DEV}/{t}")
}

#[test]
fn retained_status_online_offline_on_stop_and_last_will_on_kill9() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "");
    let mut d = Daemon::start(&tmp.path().join("d"), &mqtt(broker.port, ""));
    let sub = Sub::start(broker.port, &topic("status"), &[]);
    let online = sub.wait_on("/status", "status online", Duration::from_secs(20), |v| v["state"] == "online");
    assert_schema("status", &online);
    assert_eq!(online["engine"], "gaussian");

    assert!(d.stop().success());
    let off = sub.wait_on("/status", "status offline after a clean stop", Duration::from_secs(10), |v| v["state"] == "offline");
    assert_schema("status", &off);
    // retained: a new subscriber sees offline
    let late = Sub::start(broker.port, &topic("status"), &[]);
    late.wait_on("/status", "retained offline", Duration::from_secs(10), |v| v["state"] == "offline");

    d.restart();
    sub.wait_on("/status", "online again", Duration::from_secs(20), |v| v["state"] == "online" && v["since_ms"] != off["since_ms"]);
    let before = sub.on("/status").len();
    d.kill9();
    let will = wait_for("the last will after kill -9", Duration::from_secs(30), || {
        sub.on("/status").into_iter().skip(before).find(|v| v["state"] == "offline")
    });
    assert_schema("status", &will);
}

/// A stop can take up to a minute (open associations, the running
/// restoration). From the stop request until the process exits, the fleet
/// (MQTT status and health) and the technologist (`petrestore status`)
/// see `stopping`, and commands that would change the state are refused;
/// `offline` follows once it has stopped.
#[test]
fn a_stop_in_progress_says_stopping_until_the_process_exits() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "");
    let sub = Sub::start(broker.port, &topic("#"), &[]);
    let mut d = Daemon::start(&tmp.path().join("d"), &mqtt(broker.port, ""));
    sub.wait_on("/status", "status online", Duration::from_secs(20), |v| v["state"] == "online");
    // an open association holds the stop (for up to 15 s)
    let mut assoc = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    assoc.write_all(&associate_rq()).unwrap();
    let mut ac = [0u8; 6];
    assoc.read_exact(&mut ac).unwrap();
    assert_eq!(ac[0], 0x02, "A-ASSOCIATE-AC");

    d.signal("TERM");
    let st = sub.wait_on("/status", "status stopping", Duration::from_secs(10), |v| v["state"] == "stopping");
    assert_schema("status", &st);
    let h = sub.wait_on("/health", "health stopping", Duration::from_secs(10), |v| v["state"] == "stopping");
    assert_schema("health", &h);
    let out = petrestore(&["status", "--state-dir", d.state_dir().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let local: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(local["state"], "stopping", "{local}");
    let out = mosquitto_pub(broker.port, &topic("cmd/resume"), r#"{"correlation_id": "late"}"#, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let r = sub.wait_on("/cmd/resume/reply", "the refusal", Duration::from_secs(10), |v| v["correlation_id"] == "late");
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().is_some_and(|e| e.contains("stopping")), "{r}");
    assert!(sub.on("/status").iter().all(|v| v["state"] != "offline"), "offline only once stopped");

    // the association ends; the stop completes
    drop(assoc);
    assert!(d.wait_exit(Duration::from_secs(30)).success());
    let states: Vec<_> = sub.on("/status").into_iter().map(|v| v["state"].as_str().unwrap().to_owned()).collect();
    let (stopping, offline) = (states.iter().position(|s| s == "stopping"), states.iter().rposition(|s| s == "offline"));
    assert!(stopping.is_some() && offline.is_some() && stopping < offline, "{states:?}");
}

#[test]
fn a_study_produces_the_full_sequence_of_job_events_and_health() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "");
    let sub = Sub::start(broker.port, &topic("#"), &[]);
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let d = Daemon::start(&tmp.path().join("d"), &format!("{}{}", mqtt(broker.port, ""), destination("pacs", dest.port)));
    sub.wait_on("/status", "online", Duration::from_secs(20), |v| v["state"] == "online");
    let src = series(&tmp.path().join("src"), 6, 32, 61);
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    let id = job_id(&src);
    d.wait_terminal(&id, Duration::from_secs(60));
    let events = wait_for("the done event", Duration::from_secs(10), || {
        let e = sub.on(&format!("/jobs/{id}"));
        e.iter().any(|v| v["state"] == "done").then_some(e)
    });
    let states: Vec<&str> = events.iter().map(|v| v["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["receiving", "queued", "restoring", "delivering", "done"]);
    for e in &events {
        assert_schema("job_event", e);
        assert!(e.get("series_uid").is_none(), "UIDs stay out of telemetry unless mqtt.include_uids");
    }
    assert_eq!(events[4]["engine"], "gaussian");
    assert_eq!(events[4]["received"], 6);
    let health = sub.wait_on("/health", "health with the finished job", Duration::from_secs(10), |v| v["jobs_finished"]["done"] == 1);
    assert_schema("health", &health);
    assert_eq!(health["state"], "online");
    assert_eq!(health["events_dropped"], 0);
    assert_eq!(health["ingest_backlog"], 0, "every acknowledged instance reached the spool and journal");
    let t = &health["throughput"];
    assert_eq!((t["window_s"].as_u64(), t["series_done"].as_u64(), t["slices_done"].as_u64()), (Some(3600), Some(1), Some(6)), "{t}");
    assert!(t["median_turnaround_s"].as_f64().is_some_and(|s| s > 0.0), "{t}");
}

#[test]
fn commands_pause_resume_drain_retry_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "");
    let sub = Sub::start(broker.port, &topic("#"), &[]);
    // a series missing a slice fails with policy "fail" (no destination)
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!("{}[series]\nquiet_timeout_s = 1\nincomplete_policy = \"fail\"\n", mqtt(broker.port, "")),
    );
    sub.wait_on("/status", "online", Duration::from_secs(20), |v| v["state"] == "online");
    let cmd = |name: &str, payload: &str| {
        let out = mosquitto_pub(broker.port, &topic(&format!("cmd/{name}")), payload, &[]);
        assert!(out.status.success(), "{}", text(&out));
    };
    let reply = |name: &str, corr: &str| {
        let r = sub.wait_on(&format!("/cmd/{name}/reply"), &format!("reply to {name} {corr}"), Duration::from_secs(10), |v| {
            v["correlation_id"] == corr
        });
        assert_schema("command_reply", &r);
        r
    };

    cmd("pause", r#"{"correlation_id": "p1"}"#);
    assert_eq!(reply("pause", "p1")["ok"], true);
    sub.wait_on("/status", "paused", Duration::from_secs(10), |v| v["state"] == "paused");
    let src = series(&tmp.path().join("src"), 4, 32, 63);
    assert!(storescu(d.port, CONSOLE, &src.files).status.success(), "ingest continues while paused");
    let id = job_id(&src);
    wait_for("the job queued", Duration::from_secs(10), || (d.job(&id).state == petrestore::journal::JobState::Queued).then_some(()));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.job(&id).state, petrestore::journal::JobState::Queued, "paused: no new restoration");
    // on site, `petrestore status` says why nothing is restored
    let local_state = || {
        let o = petrestore(&["status", "--config", d.config.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["state"].as_str().unwrap().to_string()
    };
    assert_eq!(local_state(), "paused");
    cmd("resume", r#"{"correlation_id": "r1"}"#);
    assert_eq!(reply("resume", "r1")["ok"], true);
    assert_eq!(d.wait_terminal(&id, Duration::from_secs(30)).state, petrestore::journal::JobState::Done);

    // retry a failed job
    let src2 = series(&tmp.path().join("src2"), 4, 32, 65);
    assert!(storescu(d.port, CONSOLE, &src2.files[..3]).status.success());
    let id2 = job_id(&src2);
    assert!(matches!(d.wait_terminal(&id2, Duration::from_secs(30)).state, petrestore::journal::JobState::Failed { .. }));
    cmd("retry", &format!(r#"{{"correlation_id": "t1", "job_id": "{id2}"}}"#));
    let r = reply("retry", "t1");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["state"], "queued");
    wait_for("a second failed event", Duration::from_secs(30), || {
        (sub.on(&format!("/jobs/{id2}")).iter().filter(|v| v["state"] == "failed").count() == 2).then_some(())
    });
    cmd("retry", r#"{"correlation_id": "t2"}"#);
    let r = reply("retry", "t2");
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("job_id"));

    // malformed and unknown
    cmd("pause", r#"{"correlation_id": "m1", "#);
    let r = sub.wait_on("/cmd/pause/reply", "malformed reply", Duration::from_secs(10), |v| v["ok"] == false);
    assert_schema("command_reply", &r);
    assert!(r["error"].as_str().unwrap().contains("malformed"), "{r}");
    cmd("selfdestruct", r#"{"correlation_id": "u1"}"#);
    let r = reply("selfdestruct", "u1");
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("unknown command"));
    // reload: a caller added to the allow-list applies at once; a key that
    // needs a restart is refused and named
    assert!(!echoscu(d.port, "WS", OUR_AE).status.success());
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        cfg.replace(&format!("allowed_callers = [\"{CONSOLE}\"]"), &format!("allowed_callers = [\"{CONSOLE}\", \"WS\"]")),
    )
    .unwrap();
    cmd("reload", r#"{"correlation_id": "l1"}"#);
    let r = reply("reload", "l1");
    assert_eq!(r["ok"], true, "{r}");
    assert!(echoscu(d.port, "WS", OUR_AE).status.success(), "reloaded allow-list applies to the next association");
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, cfg.replace(&format!("127.0.0.1:{}", d.port), "127.0.0.1:1")).unwrap();
    cmd("reload", r#"{"correlation_id": "l2"}"#);
    let r = reply("reload", "l2");
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("dicom.listen") && r["error"].as_str().unwrap().contains("restart"), "{r}");
    std::fs::write(&d.config, cfg).unwrap();

    // drain: new associations are rejected; status says so
    cmd("drain", r#"{"correlation_id": "d1"}"#);
    assert_eq!(reply("drain", "d1")["ok"], true);
    sub.wait_on("/status", "draining", Duration::from_secs(10), |v| v["state"] == "draining");
    let o = echoscu(d.port, CONSOLE, OUR_AE);
    assert!(!o.status.success(), "draining rejects new associations");
    // as transient, so the console sends its series again later
    assert!(text(&o).contains("Rejected Transient"), "{}", text(&o));
    assert_eq!(local_state(), "draining");
    // nothing received was deleted by any command
    assert_eq!(d.spool_files().len(), 7);
}

#[test]
fn a_retained_command_is_refused_not_run_at_every_connection() {
    // A drain or pause published with retain would be replayed by the broker
    // at every (re)connection of the daemon: it is answered with an error
    // and not run.
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(tmp.path(), "");
    let out = mosquitto_pub(broker.port, &topic("cmd/pause"), r#"{"correlation_id": "kept"}"#, &["-r"]);
    assert!(out.status.success(), "{}", text(&out));
    let sub = Sub::start(broker.port, &topic("#"), &[]);
    let d = Daemon::start(&tmp.path().join("d"), &mqtt(broker.port, ""));
    let r = sub.wait_on("/cmd/pause/reply", "the refusal", Duration::from_secs(20), |v| v["correlation_id"] == "kept");
    assert_schema("command_reply", &r);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("retained"), "{r}");
    // cleared as the reply says (an empty retained message, which the broker
    // also forwards to the daemon): not taken for a command either
    let out = mosquitto_pub(broker.port, &topic("cmd/pause"), "", &["-r"]);
    assert!(out.status.success(), "{}", text(&out));
    // not paused: a series is restored
    let src = series(&tmp.path().join("src"), 4, 32, 67);
    assert!(storescu(d.port, CONSOLE, &src.files).status.success());
    assert_eq!(d.wait_terminal(&job_id(&src), Duration::from_secs(30)).state, petrestore::journal::JobState::Done);
    assert!(sub.on("/status").iter().all(|v| v["state"] != "paused"), "{:?}", sub.on("/status"));
}

/// A broker whose ACL does not let the box subscribe to its command topic
/// refuses the subscription (SUBACK 0x80: Mosquitto's dynamic security
/// plugin, as a fleet's broker would run it). Nothing else would say so:
/// commands would go unanswered. The daemon logs it, health's last_error
/// says it, and the subscription is asked for again at every health tick,
/// so an ACL fixed on the live broker brings commands back.
#[test]
fn a_refused_command_subscription_is_reported_and_asked_for_again() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path().join("mosquitto_dynamic_security.so")))
        .chain([std::path::PathBuf::from("/usr/lib/mosquitto_dynamic_security.so")])
        .find(|p| p.exists())
        .expect("Mosquitto's dynamic security plugin (package mosquitto, /usr/lib/<arch>/mosquitto_dynamic_security.so)");
    // anonymous clients may do anything but subscribe to command topics;
    // they may also change the ACL ($CONTROL), as an administrator would
    let dynsec = tmp.path().join("dynsec.json");
    std::fs::write(
        &dynsec,
        r#"{"defaultACLAccess": {"publishClientSend": true, "publishClientReceive": true, "subscribe": true, "unsubscribe": true},
            "clients": [], "anonymousGroup": "anon", "groups": [{"groupname": "anon", "roles": [{"rolename": "box"}]}],
            "roles": [{"rolename": "box", "acls": [
                {"acltype": "subscribePattern", "topic": "petrestore/+/+/cmd/#", "priority": 0, "allow": false},
                {"acltype": "publishClientSend", "topic": "$CONTROL/dynamic-security/#", "priority": 0, "allow": true}]}]}"#,
    )
    .unwrap();
    let broker = Mosquitto::start(tmp.path(), &format!("plugin {}\nplugin_opt_config_file {}", plugin.display(), dynsec.display()));
    let health = Sub::start(broker.port, &topic("health"), &[]);
    let d = Daemon::start(&tmp.path().join("d"), &mqtt(broker.port, ""));
    let h = health.wait_on("/health", "health naming the refusal", Duration::from_secs(20), |v| {
        v["last_error"].as_str().is_some_and(|e| e.contains("refuses the command subscription"))
    });
    assert_schema("health", &h);
    d.wait_log("the broker refused the command subscription");

    // the ACL is fixed on the live broker; it disconnects the clients whose
    // role changed (the box, and this publisher before its PUBACK), and the
    // box subscribes again
    let fix = r#"{"commands": [{"command": "removeRoleACL", "rolename": "box", "acltype": "subscribePattern", "topic": "petrestore/+/+/cmd/#"}]}"#;
    mosquitto_pub(broker.port, "$CONTROL/dynamic-security/v1", fix, &[]);
    let fixed = std::fs::read_to_string(&dynsec).unwrap();
    assert!(!fixed.contains("subscribePattern"), "the broker took the fix: {fixed}");
    let sub = Sub::start(broker.port, &topic("#"), &[]);
    // commands are answered again (published until one is: the box may
    // still be reconnecting)
    let r = wait_for("a command answered", Duration::from_secs(30), || {
        let out = mosquitto_pub(broker.port, &topic("cmd/pause"), r#"{"correlation_id": "after-acl"}"#, &[]);
        assert!(out.status.success(), "{}", text(&out));
        std::thread::sleep(Duration::from_millis(500));
        sub.on("/cmd/pause/reply").into_iter().find(|v| v["correlation_id"] == "after-acl")
    });
    assert_eq!(r["ok"], true, "{r}");
    // and health stops naming it (only messages after the reply count)
    let seen = health.on("/health").len();
    wait_for("health without the refusal", Duration::from_secs(20), || {
        health.on("/health").into_iter().skip(seen).find(|v| !v["last_error"].as_str().is_some_and(|e| e.contains("command subscription")))
    });
}

#[test]
fn broker_down_leaves_the_pipeline_alone_and_buffered_events_arrive_with_the_drop_count() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    // The fleet's subscriber has a persistent session on a broker that keeps
    // sessions across restarts, so what the daemon sends on reconnect is
    // queued for it however the two reconnects race.
    let mq = tmp.path().join("mq");
    std::fs::create_dir_all(&mq).unwrap();
    let persist = format!("persistence true\npersistence_location {}/\n", mq.display());
    let mut broker = Mosquitto::start_on(&mq, port, &persist);
    let sub = Sub::start_persistent(port, &topic("#"), "fleet-sub");
    wait_for("the subscription", Duration::from_secs(30), || {
        mosquitto_pub(port, &topic("probe"), "{}", &[]);
        std::thread::sleep(Duration::from_millis(100));
        (!sub.on("/probe").is_empty()).then_some(())
    });
    drop(sub);
    broker.terminate();
    // no broker now; a buffer of 3 events
    let d = Daemon::start(&tmp.path().join("d"), &mqtt(port, "buffer = 3\n"));
    let a = series(&tmp.path().join("a"), 4, 32, 67);
    let b = series(&tmp.path().join("b"), 4, 32, 69);
    // One job after the other, so the 8 events come in a known order (b's
    // series could otherwise be queued while a is still restoring).
    for s in [&a, &b] {
        assert!(storescu(d.port, CONSOLE, &s.files).status.success());
        assert_eq!(d.wait_terminal(&job_id(s), Duration::from_secs(60)).state, petrestore::journal::JobState::Done);
    }
    // 2 jobs × (receiving, queued, restoring, done) = 8 events; 3 kept, 5 dropped
    let broker = Mosquitto::start_on(&mq, port, &persist);
    let sub = Sub::start_persistent(broker.port, &topic("#"), "fleet-sub");
    let health = sub.wait_on("/health", "health after reconnect", Duration::from_secs(60), |v| v["events_dropped"].as_u64().is_some());
    assert_schema("health", &health);
    assert_eq!(health["events_dropped"], 5, "{health}");
    let job_events = || -> Vec<String> {
        sub.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.contains("/jobs/"))
            .map(|(_, p)| serde_json::from_str::<serde_json::Value>(p).unwrap()["state"].as_str().unwrap().to_string())
            .collect()
    };
    wait_for("the buffered job events", Duration::from_secs(30), || (job_events().len() >= 3).then_some(()));
    std::thread::sleep(Duration::from_millis(500)); // nothing more may come
    let kept = job_events();
    assert_eq!(kept, ["queued", "restoring", "done"], "the newest 3 events, oldest dropped first");
    assert_eq!(sub.on("/status").last().unwrap()["state"], "online");
}

/// Job events handed to a connection that then dies without a word (the
/// broker frozen: no FIN, no acknowledgement) arrive once the box is
/// connected again. The MQTT client discards what the broker never
/// acknowledged when it opens its next (clean) session; the box takes
/// those messages back into its own buffer first.
#[test]
fn events_sent_into_a_connection_that_died_silently_arrive_after_reconnect() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mq = tmp.path().join("mq");
    std::fs::create_dir_all(&mq).unwrap();
    // the fleet subscriber's session is saved every second, so it outlives
    // the broker's kill below
    let persist = format!("persistence true\npersistence_location {}/\nautosave_interval 1\n", mq.display());
    let mut broker = Mosquitto::start_on(&mq, port, &persist);
    let sub = Sub::start_persistent(port, &topic("#"), "fleet-sub");
    let d = Daemon::start(&tmp.path().join("d"), &mqtt(port, "keep_alive_s = 5\n"));
    sub.wait_on("/status", "online", Duration::from_secs(20), |v| v["state"] == "online");
    drop(sub);
    std::thread::sleep(Duration::from_secs(3));
    broker.signal("STOP");
    let a = series(&tmp.path().join("a"), 4, 32, 71);
    assert!(storescu(d.port, CONSOLE, &a.files).status.success());
    let id = job_id(&a);
    assert_eq!(d.wait_terminal(&id, Duration::from_secs(60)).state, petrestore::journal::JobState::Done);
    // the box notices at its keep-alive: no answer to its ping
    wait_for("the box to notice the dead connection", Duration::from_secs(60), || d.log().contains("MQTT connection lost").then_some(()));
    // what the frozen broker had read is lost with it
    broker.stop();
    let _broker = Mosquitto::start_on(&mq, port, &persist);
    let sub = Sub::start_persistent(port, &topic("#"), "fleet-sub");
    let events = wait_for("the job's events after the reconnect", Duration::from_secs(60), || {
        let e = sub.on(&format!("/jobs/{id}"));
        e.iter().any(|v| v["state"] == "done").then_some(e)
    });
    let states: Vec<&str> = events.iter().map(|v| v["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["receiving", "queued", "restoring", "done"], "every event once, in order");
    let health = sub.wait_on("/health", "health after the reconnect", Duration::from_secs(30), |_| true);
    assert_eq!(health["events_dropped"], 0, "{health}");
}

/// Issue 19: no patient data leaves the box in logs or telemetry. A series
/// restored, a series refused for hostile content and a job failed at
/// delivery go through with a patient name, ID and birth date set; none of
/// them appears in the daemon's log (the journal of a systemd box) or in
/// any MQTT message, with the default `mqtt.include_uids = false`.
#[test]
fn no_patient_data_in_logs_or_telemetry() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let tmp = tempfile::tempdir().unwrap();
    let src = series(&tmp.path().join("src"), 6, 32, 61);
    let (name, id, birth) = ("PHITEST^JANE^Q", "PID-8675309", "19510403");
    let mut files = Vec::new();
    for (i, f) in src.files.iter().enumerate() {
        let mut o = dicom_object::open_file(f).unwrap();
        o.put(DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from(name)));
        o.put(DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from(id)));
        o.put(DataElement::new(tags::PATIENT_BIRTH_DATE, VR::DA, PrimitiveValue::from(birth)));
        if i == 5 {
            // a hostile last instance: pixel data cut short
            o.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(64u16)));
        }
        let out = tmp.path().join(format!("phi-{i}.dcm"));
        o.write_to_file(&out).unwrap();
        files.push(out);
    }
    let broker = Mosquitto::start(tmp.path(), "");
    let all = Sub::start(broker.port, "petrestore/v1/#", &[]);
    // a destination that is not there: delivery fails and is reported
    let d = Daemon::start(
        &tmp.path().join("d"),
        &format!(
            "[node]\ndevice_id = \"box1\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nhealth_interval_s = 0.5\n[egress]\nmax_attempts = 2\n{}",
            broker.port,
            destination("pacs", free_port())
        ),
    );
    let _ = storescu(d.port, CONSOLE, &files);
    let job = d.wait_terminal(&job_id(&src), Duration::from_secs(60));
    assert!(matches!(job.state, petrestore::journal::JobState::Failed { .. }), "{:#?}", job.history);
    wait_for("the failed job's event", Duration::from_secs(10), || {
        all.lines.lock().unwrap().iter().any(|(t, p)| t.contains("/jobs/") && p.contains("\"failed\"")).then_some(())
    });
    let log = d.log();
    assert!(log.contains("pixel data") || log.contains("Pixel"), "the hostile instance was refused with a reason:\n{log}");
    let mqtt: Vec<String> = all.lines.lock().unwrap().iter().map(|(t, p)| format!("{t} {p}")).collect();
    assert!(!mqtt.is_empty());
    for needle in ["PHITEST", "JANE", id, birth, "1951"] {
        assert!(!has(&log, needle), "{needle:?} in the daemon log:\n{log}");
        for m in &mqtt {
            assert!(!has(m, needle), "{needle:?} in an MQTT message: {m}");
        }
    }
}

/// Whether `needle` occurs in `hay`; a number only as a number of its own
/// (the birth year "1951" is not found inside a timestamp such as
/// 1796592619518).
fn has(hay: &str, needle: &str) -> bool {
    if !needle.bytes().all(|b| b.is_ascii_digit()) {
        return hay.contains(needle);
    }
    hay.match_indices(needle).any(|(at, _)| {
        let before = hay[..at].bytes().next_back();
        let after = hay[at + needle.len()..].bytes().next();
        !before.is_some_and(|b| b.is_ascii_digit()) && !after.is_some_and(|b| b.is_ascii_digit())
    })
}
