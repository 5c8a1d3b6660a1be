//! Helpers shared by the benchmark commands.
#![allow(dead_code)]

use std::net::TcpListener;
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Start `petrestore serve` with its state in `dir`, CONSOLE allowed, on a
/// free port, plus `extra` TOML (more sections); returns the child and port
/// once it listens.
pub fn start_daemon(dir: &std::path::Path, extra: &str) -> (std::process::Child, u16) {
    start_daemon_bin(std::path::Path::new(env!("CARGO_BIN_EXE_petrestore")), dir, extra)
}

/// [`start_daemon`] with another build of petrestore (a baseline).
pub fn start_daemon_bin(bin: &std::path::Path, dir: &std::path::Path, extra: &str) -> (std::process::Child, u16) {
    use std::process::{Command, Stdio};
    let port = free_port();
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nstate_dir = {:?}\nmin_free_mb = 1\n[dicom]\nlisten = \"127.0.0.1:{port}\"\nallowed_callers = [\"CONSOLE\"]\n{extra}",
            dir.join("state")
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port);
    (child, port)
}
