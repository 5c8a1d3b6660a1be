//! Ingest benchmark: a whole-body-sized PET series (268 slices, 192² and
//! 400²) sent over loopback by DCMTK `storescu`, received side by side by
//! DCMTK `storescp` (writes to disk, no fsync) and by `petrestore serve`
//! (every instance appended to the arrival log and fdatasynced before it is
//! acknowledged). The two alternate in order from one repetition to the next,
//! and the ratio is the median of the per-repetition ratios, so drift of a
//! shared machine's disk hits both alike.
//!
//! `BASELINE_BIN=/path/to/older/petrestore` adds that build as a third
//! receiver (before/after in one run; it must keep its spool files within
//! 20 s of the last acknowledgement, as every build so far does).
//!
//! Run: `cargo bench --bench ingest` (REPS=9 by default). Prints a table of
//! medians; record it in BENCHMARKS.md with the machine.

use testkit::bench::*;
use testkit::free_port;

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
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(9);
    let tmp = tempfile::tempdir().unwrap();
    println!("ingest benchmark: 268 slices over loopback, DCMTK storescu -> receiver, {reps} repetitions (order alternating), medians");
    println!("{:<8} {:<34} {:>9} {:>10} {:>8} {:>8} {:>12}", "matrix", "receiver", "seconds", "inst/s", "MB/s", "ratio", "spooled +ms");
    for matrix in [192usize, 400] {
        let spec = petsim::SeriesSpec { slices: 268, matrix, seed: 99, ..Default::default() };
        let src = petsim::write_series(&tmp.path().join(format!("src{matrix}")), &spec).unwrap();
        let bytes: u64 = src.files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
        // DCMTK storescp, writing to disk as it does by default (no fsync).
        let run_dcmtk = |rep: usize| -> f64 {
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
            let t = storescu(port, "PETRESTORE", &src.files).as_secs_f64();
            kill(scp);
            assert_eq!(count_files(&out), 268);
            t
        };
        // petrestore: every instance appended to the arrival log and
        // fdatasynced before success; spool files and journal follow.
        let ours_bin = PathBuf::from(env!("CARGO_BIN_EXE_petrestore"));
        let baseline = std::env::var_os("BASELINE_BIN").map(PathBuf::from);
        let run_bin = |bin: &Path, tag: &str, rep: usize| -> (f64, f64) {
            let ours_bin = ours_bin.as_path();
            let dir = tmp.path().join(format!("{tag}{matrix}-{rep}"));
            std::fs::create_dir_all(&dir).unwrap();
            let (d, port) = start_daemon_bin(bin, &dir, "[series]\nquiet_timeout_s = 3600\n");
            {
                // A node that has been up for a moment: its spare arrival log
                // segments are written (once per node, in the background).
                // Builds without spares (before the arrival log) go on after 5 s.
                let arrivals = dir.join("state/spool/arrivals");
                let t = Instant::now();
                let spares = || {
                    std::fs::read_dir(&arrivals)
                        .map(|rd| rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("spare-")).count())
                        .unwrap_or(0)
                };
                let wait = if bin == ours_bin { 30 } else { 5 };
                while spares() < 2 && t.elapsed() < Duration::from_secs(wait) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                assert!(bin != ours_bin || spares() == 2, "spare segments never appeared");
            }
            let t = storescu(port, "PETRESTORE", &src.files).as_secs_f64();
            // Acknowledged means durable in the arrival log; how long after
            // the last acknowledgement the spool files are all there is
            // reported beside (the sender has moved on by then).
            let spool = dir.join("state/spool");
            let after = Instant::now();
            let spooled = || count_files(&spool) - count_files(&spool.join("arrivals"));
            while spooled() < 268 && after.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let lag = after.elapsed().as_secs_f64() * 1e3;
            kill(d);
            assert_eq!(spooled(), 268);
            (t, lag)
        };
        let (mut dcmtk, mut ours, mut lags, mut ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut base, mut base_lags, mut base_ratios) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps {
            let (a, (b, lag)) = if rep % 2 == 0 {
                let a = run_dcmtk(rep);
                (a, run_bin(&ours_bin, "pr", rep))
            } else {
                let b = run_bin(&ours_bin, "pr", rep);
                (run_dcmtk(rep), b)
            };
            dcmtk.push(a);
            ours.push(b);
            lags.push(lag);
            ratios.push(a / b);
            if let Some(bin) = &baseline {
                let (c, lag) = run_bin(bin, "base", rep);
                base.push(c);
                base_lags.push(lag);
                base_ratios.push(a / c);
            }
        }
        let (md, mo, ml, mr) = (median(dcmtk), median(ours), median(lags), median(ratios));
        let mb = bytes as f64 / 1e6;
        println!(
            "{:<8} {:<34} {:>9.3} {:>10.0} {:>8.1} {:>8} {:>12}",
            format!("{matrix}²"),
            "DCMTK storescp (no fsync)",
            md,
            268.0 / md,
            mb / md,
            "1.00",
            "-"
        );
        println!(
            "{:<8} {:<34} {:>9.3} {:>10.0} {:>8.1} {:>8.2} {:>12.0}",
            format!("{matrix}²"),
            "petrestore (fdatasync per instance)",
            mo,
            268.0 / mo,
            mb / mo,
            mr,
            ml
        );
        if baseline.is_some() {
            let (mb_, ml_, mr_) = (median(base), median(base_lags), median(base_ratios));
            println!(
                "{:<8} {:<34} {:>9.3} {:>10.0} {:>8.1} {:>8.2} {:>12.0}",
                format!("{matrix}²"),
                "baseline (BASELINE_BIN)",
                mb_,
                268.0 / mb_,
                mb / mb_,
                mr_,
                ml_
            );
        }
    }
    println!("ratio: median of the per-repetition ratios DCMTK time / petrestore time (> 1: petrestore faster)");
}
