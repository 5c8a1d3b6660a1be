//! Helpers of the benchmark commands (tables, not assertions on time).

use std::time::Duration;

use crate::{free_port, wait_for};

/// Wait until something listens on a loopback port (30 s at most).
pub fn wait_port(port: u16) {
    wait_for(&format!("port {port} to open"), Duration::from_secs(30), || crate::port_open(port).then_some(()));
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Start `petrestore serve` with its state in `dir`, CONSOLE allowed, on a
/// free port, plus `extra` TOML (more sections); returns the child and port
/// once it listens.
pub fn start_daemon(dir: &std::path::Path, extra: &str) -> (std::process::Child, u16) {
    start_daemon_bin(&crate::bin("petrestore"), dir, extra)
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
