//! Telemetry benchmark, side by side in one run:
//! 1. pipeline throughput (studies/min, gaussian engine) with telemetry off
//!    and on (a real Mosquitto on loopback, health every second), alternated;
//! 2. events/s the telemetry task sustains to the broker, counted by a
//!    subscriber (`mosquitto_sub -C N`).
//!
//! Run: `cargo bench --bench telemetry` (needs dcmtk and mosquitto).
//! `REPS=N` alternations (median), `STUDIES=N` studies per run.

use testkit::bench::*;
use testkit::free_port;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use petrestore::telemetry::{self, HealthMsg, StatusMsg};

fn mosquitto(dir: &std::path::Path) -> (Child, u16) {
    let port = free_port();
    let conf = dir.join("m.conf");
    std::fs::write(
        &conf,
        format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n"),
    )
    .unwrap();
    let c = Command::new("mosquitto").arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("mosquitto");
    wait_port(port);
    (c, port)
}

/// Seconds from the first study sent to the last job done.
fn pipeline_run(dir: &std::path::Path, studies: &[Vec<std::path::PathBuf>], mqtt_port: Option<u16>) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let mqtt = mqtt_port.map(|p| format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{p}\"\nhealth_interval_s = 1\n")).unwrap_or_default();
    let (mut d, port) = start_daemon(dir, &mqtt);
    let t = Instant::now();
    for files in studies {
        let out = Command::new("storescu")
            .args(["-aet", "CONSOLE", "-aec", "PETRESTORE", "127.0.0.1", &port.to_string()])
            .args(files)
            .env("TCP_NODELAY", "1")
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_petrestore"))
            .args(["jobs", "--state-dir", dir.join("state").to_str().unwrap(), "list", "--json"])
            .output()
            .unwrap();
        let jobs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if jobs.len() == studies.len() && jobs.iter().all(|j| j["state"]["state"] == "done") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(600));
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = t.elapsed().as_secs_f64();
    let _ = d.kill();
    let _ = d.wait();
    s
}

struct Quiet;
impl telemetry::mqtt::Control for Quiet {
    fn command(&self, _: &str, _: &telemetry::CommandMsg) -> Result<serde_json::Value, String> {
        Err("benchmark".into())
    }
    fn health(&self) -> HealthMsg {
        HealthMsg {
            schema_version: 1,
            device_id: "bench".into(),
            at_ms: 0,
            uptime_s: 0,
            state: "online".into(),
            queue_depth: 0,
            jobs: Default::default(),
            jobs_finished: Default::default(),
            disk_free_mb: None,
            engines: vec![],
            last_error: None,
            ingest_backlog: 0,
            events_dropped: 0,
            throughput: Default::default(),
        }
    }
    fn status(&self) -> StatusMsg {
        StatusMsg {
            schema_version: 1,
            state: "online".into(),
            version: "bench".into(),
            device_id: "bench".into(),
            model: None,
            engine: None,
            since_ms: 0,
        }
    }
}

fn main() {
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let n_studies: usize = std::env::var("STUDIES").ok().and_then(|s| s.parse().ok()).unwrap_or(24);
    let tmp = tempfile::tempdir().unwrap();
    let (mut broker, mqtt_port) = mosquitto(tmp.path());
    let studies: Vec<Vec<std::path::PathBuf>> = (0..n_studies)
        .map(|i| {
            let spec = petsim::SeriesSpec { slices: 48, matrix: 128, seed: 1000 + i as u64, ..Default::default() };
            petsim::write_series(&tmp.path().join(format!("study{i}")), &spec).unwrap().files
        })
        .collect();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..reps {
        off.push(pipeline_run(&tmp.path().join(format!("off{r}")), &studies, None));
        on.push(pipeline_run(&tmp.path().join(format!("on{r}")), &studies, Some(mqtt_port)));
    }
    let (off, on) = (median(off), median(on));
    println!("telemetry benchmark: {n_studies} studies of 48x128² (gaussian), {reps} alternations, medians");
    println!("{:<26} {:>10} {:>13}", "pipeline", "seconds", "studies/min");
    println!("{:<26} {:>10.2} {:>13.1}", "telemetry off", off, n_studies as f64 * 60.0 / off);
    println!("{:<26} {:>10.2} {:>13.1}", "telemetry on (Mosquitto)", on, n_studies as f64 * 60.0 / on);
    println!("overhead: {:+.1} %", 100.0 * (on / off - 1.0));

    // Events/s: push job-event-sized messages through the task as fast as
    // it takes them; a subscriber counts arrivals at the broker.
    let n: usize = std::env::var("EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-t", "petrestore/v1/bench/jobs/#", "-C", &n.to_string(), "-q", "1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let secs = rt.block_on(async {
        let mut s = petrestore::config::Settings::from_toml(&format!("[node]\ndevice_id = \"bench\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\nbuffer = 100000\n"), "bench").unwrap();
        let m = s.mqtt.take().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(telemetry::mqtt::run(m, "bench".into(), rx, Arc::new(AtomicU64::new(0)), Arc::new(Quiet), Default::default(), stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await; // connect
        let payload = br#"{"schema_version":1,"device_id":"bench","job_id":"0123456789abcdef","state":"restoring","reason":null,"kind":"pet","received":268,"expected":268,"engine":"gaussian","model":"gaussian-fwhm4.00mm","at_ms":1}"#.to_vec();
        let t = Instant::now();
        for i in 0..n {
            tx.send(telemetry::Outgoing { topic: format!("jobs/{:016x}", i), payload: payload.clone(), retain: false }).await.unwrap();
        }
        let t2 = tokio::task::spawn_blocking(move || {
            let _ = sub.wait();
        });
        t2.await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        stop.cancel();
        let _ = task.await;
        secs
    });
    println!("telemetry task: {n} job events (QoS 1) delivered to a subscriber in {secs:.2} s = {:.0} events/s", n as f64 / secs);
    let _ = broker.kill();
}
