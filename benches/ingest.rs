//! Ingest benchmark: a whole-body-sized PET series (268 slices, 192² and
//! 400²) sent over loopback by DCMTK `storescu`, received side by side by
//! DCMTK `storescp` (writes to disk, no fsync) and by `petrestore serve`
//! (fsync of every instance + journal flush before acknowledging).
//!
//! Run: `cargo bench --bench ingest` (REPS=5 by default). Prints a table of
//! medians; record it in BENCHMARKS.md with the machine.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};



fn count_files(d: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                n += count_files(&e.path());
            } else if !e.file_name().to_string_lossy().starts_with('.') {
                n += 1;
            }
        }
    }
    n
}

fn storescu(port: u16, called: &str, files: &[PathBuf]) -> Duration {
    let t = Instant::now();
    let out = Command::new("storescu")
        .args(["-aet", "CONSOLE", "-aec", called, "127.0.0.1", &port.to_string()])
        .args(files)
        .env("TCP_NODELAY", "1")
        .output()
        .expect("storescu (apt-get install dcmtk)");
    let d = t.elapsed();
    assert!(out.status.success(), "storescu failed: {}", String::from_utf8_lossy(&out.stderr));
    d
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}


fn main() {
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let tmp = tempfile::tempdir().unwrap();
    println!("ingest benchmark: 268 slices over loopback, DCMTK storescu -> receiver, {reps} repetitions, medians");
    println!("{:<8} {:<28} {:>9} {:>10} {:>8} {:>8}", "matrix", "receiver", "seconds", "inst/s", "MB/s", "ratio");
    for matrix in [192usize, 400] {
        let spec = petrestore::sim::SeriesSpec { slices: 268, matrix, seed: 99, ..Default::default() };
        let src = petrestore::sim::write_series(&tmp.path().join(format!("src{matrix}")), &spec).unwrap();
        let bytes: u64 = src.files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
        let (mut dcmtk, mut ours) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            // DCMTK storescp, writing to disk as it does by default (no fsync).
            let out = tmp.path().join(format!("scp{matrix}-{rep}"));
            std::fs::create_dir_all(&out).unwrap();
            let port = free_port();
            let scp = Command::new("storescp")
                .args(["-aet", "PETRESTORE", "-od"])
                .arg(&out)
                .arg(port.to_string())
                .env("TCP_NODELAY", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("storescp (apt-get install dcmtk)");
            wait_port(port);
            dcmtk.push(storescu(port, "PETRESTORE", &src.files).as_secs_f64());
            kill(scp);
            assert_eq!(count_files(&out), 268);

            // petrestore: fsync per instance + journal flush before success.
            let dir = tmp.path().join(format!("pr{matrix}-{rep}"));
            std::fs::create_dir_all(&dir).unwrap();
            let (d, port) = start_daemon(&dir, "[series]\nquiet_timeout_s = 3600\n");
            ours.push(storescu(port, "PETRESTORE", &src.files).as_secs_f64());
            kill(d);
            assert_eq!(count_files(&dir.join("state/spool")), 268);
        }
        let (md, mo) = (median(dcmtk), median(ours));
        let mb = bytes as f64 / 1e6;
        println!("{:<8} {:<28} {:>9.3} {:>10.0} {:>8.1} {:>8}", format!("{matrix}²"), "DCMTK storescp (no fsync)", md, 268.0 / md, mb / md, "1.00");
        println!("{:<8} {:<28} {:>9.3} {:>10.0} {:>8.1} {:>8.2}", format!("{matrix}²"), "petrestore (fsync+journal)", mo, 268.0 / mo, mb / mo, md / mo);
    }
}
