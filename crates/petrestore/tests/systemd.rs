//! The shipped unit, for real: `systemd/petrestore.service` with its
//! hardening unchanged, run by systemd (PID 1 of a private PID, mount and
//! UTS namespace) beside its journald. A drop-in only points `ExecStart` at
//! the built binary. The account comes from the shipped sysusers.d file via
//! `systemd-sysusers`, the state folder from StateDirectory=. A series goes
//! in over DICOM and the restored series comes out, restored with the
//! shipped model by ONNX Runtime (loaded under the system-call filter);
//! the log lands in journald with structured fields and without patient
//! data; `systemctl stop` ends it cleanly.
//!
//! Nothing leaks to the machine: inside the namespace /run, /var and /tmp
//! are fresh tmpfs mounts, /etc is an overlay whose changes live in /run, and
//! the unit folders hold only the journald units, the basic targets and
//! the unit under test (no tmpfiles cleaning, no getty, no timers). Needs
//! root, `unshare`/`nsenter` (util-linux), overlayfs and systemd: a missing
//! piece fails the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use testkit::*;

/// The units the private system needs: journald and the targets that the
/// unit's default dependencies name.
const UNITS: &[&str] = &[
    "basic.target",
    "local-fs-pre.target",
    "local-fs.target",
    "paths.target",
    "shutdown.target",
    "slices.target",
    "sockets.target",
    "sysinit.target",
    "timers.target",
    "umount.target",
    "systemd-journald.service",
    "systemd-journald.socket",
];

const BOOT: &str = r#"#!/bin/bash
set -euo pipefail
here=$1
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mkdir -p /run/ovl/up /run/ovl/work
mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/ovl/up,workdir=/run/ovl/work /etc
mount -t tmpfs tmpfs /etc/systemd/system
mount -t tmpfs tmpfs /usr/lib/systemd/system
cp "$here"/units/* /usr/lib/systemd/system/
mount -t tmpfs tmpfs /var
mkdir -p /var/tmp /var/lib /var/log
mount -t tmpfs tmpfs /tmp
mount -t proc proc /proc
exec env container=petrestore-test /usr/lib/systemd/systemd --system --unit=petrestore-test.target
"#;

/// systemd as PID 1 of its own namespaces; killed (with everything in it)
/// on drop.
struct PrivateSystem {
    unshare: Child,
    pid: u32,
}

impl PrivateSystem {
    fn boot(dir: &Path) -> PrivateSystem {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test starts systemd in private namespaces and needs root (bash .ci/run runs as root)"
        );
        for tool in ["unshare", "nsenter", "systemctl", "journalctl", "systemd-sysusers"] {
            require_tool(tool);
        }
        let systemd = Path::new("/usr/lib/systemd/systemd");
        assert!(systemd.exists(), "{} not found: install systemd (apt-get install systemd)", systemd.display());
        let units = dir.join("units");
        std::fs::create_dir_all(&units).unwrap();
        for u in UNITS {
            std::fs::copy(Path::new("/usr/lib/systemd/system").join(u), units.join(u)).unwrap_or_else(|e| panic!("copying unit {u}: {e}"));
        }
        std::fs::copy(repo().join("systemd/petrestore.service"), units.join("petrestore.service")).unwrap();
        std::fs::write(
            units.join("petrestore-test.target"),
            "[Unit]\nDescription=petrestore unit test system\nWants=systemd-journald.socket systemd-journald.service\n",
        )
        .unwrap();
        let boot = dir.join("boot.sh");
        std::fs::write(&boot, BOOT).unwrap();
        let unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--mount", "--uts", "--kill-child", "bash"])
            .arg(&boot)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("boot.log")).unwrap())
            .spawn()
            .unwrap();
        let parent = unshare.id();
        let pid = wait_for("systemd to start in the namespace", Duration::from_secs(20), || {
            let kids = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
            let pid: u32 = kids.split_whitespace().next()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "systemd").then_some(pid)
        });
        let sys = PrivateSystem { unshare, pid };
        let state = wait_for("the private system to finish starting", Duration::from_secs(60), || {
            let s = text(&sys.run(&["systemctl", "is-system-running"])).trim().to_string();
            matches!(s.as_str(), "running" | "degraded").then_some(s)
        });
        assert_eq!(state, "running", "units failed: {}", text(&sys.run(&["systemctl", "--failed", "--no-pager"])));
        sys
    }

    /// A command inside the private system's mount, PID and UTS namespaces.
    fn run(&self, args: &[&str]) -> Output {
        Command::new("nsenter").args(["-t", &self.pid.to_string(), "-m", "-p", "-u", "--"]).args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "{args:?} failed: {}", text(&o));
        text(&o)
    }

    fn show(&self, unit: &str, property: &str) -> String {
        self.ok(&["systemctl", "show", unit, "-p", property, "--value"]).trim().to_string()
    }
}

impl Drop for PrivateSystem {
    fn drop(&mut self) {
        // PID 1 of the namespace: killing it kills everything inside.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn require_tool(tool: &str) {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap();
    assert!(out.status.success(), "{tool} not found: install util-linux and systemd (bash .ci/run does)");
}

fn repo() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).canonicalize().unwrap()
}

#[test]
fn the_shipped_unit_runs_hardened_under_systemd_and_logs_to_journald() {
    // Not under /tmp: the private system has its own /tmp.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let sys = PrivateSystem::boot(&tmp.path().join("system"));

    // The account and folders exactly as the package ships them.
    let sysusers = repo().join("systemd/petrestore.sysusers");
    sys.ok(&["systemd-sysusers", sysusers.to_str().unwrap()]);
    let id = sys.ok(&["id", "petrestore"]);
    assert!(id.contains("(video)") && id.contains("(render)"), "the account is in the GPU groups the unit names: {id}");

    // The config at the unit's path, with the shipped model and engines.
    let dest = StoreScp::start(&tmp.path().join("dest"));
    let port = free_port();
    let bin = bin("petrestore");
    let config = format!(
        "[node]\nmin_free_mb = 16\n[dicom]\nlisten = \"127.0.0.1:{port}\"\nallowed_callers = [\"{CONSOLE}\"]\n\
         [series]\nquiet_timeout_s = 2\n[restore]\nengines = [\"ort\", \"tract\"]\nmodel = \"{}\"\nort_library = \"{}\"\n\
         ort_providers = [\"cpu\"]\n{}",
        repo().join("models/petrestore-unet25d").display(),
        ort_library().display(),
        destination("pacs", dest.port)
    );
    let staged = tmp.path().join("petrestore.toml");
    std::fs::write(&staged, config).unwrap();
    sys.ok(&["install", "-D", "-m", "0644", staged.to_str().unwrap(), "/etc/petrestore/petrestore.toml"]);
    // The only change to the unit: where the binary is.
    let dropin = tmp.path().join("binary.conf");
    std::fs::write(
        &dropin,
        format!(
            "[Service]\nExecStart=\nExecStart={0} serve --config /etc/petrestore/petrestore.toml\n\
             ExecReload=\nExecReload={0} reload --config /etc/petrestore/petrestore.toml\n",
            bin.display()
        ),
    )
    .unwrap();
    sys.ok(&["install", "-D", "-m", "0644", dropin.to_str().unwrap(), "/run/systemd/system/petrestore.service.d/binary.conf"]);
    sys.ok(&["systemctl", "daemon-reload"]);

    // Type=notify: `start` returns once the daemon sent READY=1.
    let started = sys.run(&["systemctl", "start", "petrestore"]);
    assert!(
        started.status.success(),
        "the hardened unit did not start: {}\n{}",
        text(&started),
        text(&sys.run(&["journalctl", "-u", "petrestore", "--no-pager", "-n", "60"]))
    );
    assert_eq!(sys.show("petrestore", "ActiveState"), "active");
    assert_eq!(sys.show("petrestore", "User"), "petrestore");

    // A series in, the restored series out to the destination.
    let s = clinical_series(&tmp.path().join("in"), 8, 64, 77);
    let o = storescu(port, CONSOLE, &s.files);
    assert!(o.status.success(), "storescu: {}", text(&o));
    let got = wait_for("the restored series at the destination", Duration::from_secs(180), || {
        let files = dest.files();
        (files.len() >= s.files.len()).then_some(files)
    });
    assert_eq!(got.len(), s.files.len());
    let dump = Command::new(require("dcmdump")).arg(&got[0]).output().unwrap();
    assert!(text(&dump).contains("DERIVED"), "the delivered series is marked derived");

    // journald: native entries (JOURNAL_STREAM was set, so not stdout lines)
    // with the job, the state and the calling AE as fields of their own.
    let job = job_id(&s);
    let entries = wait_for("the job's entries in the journal", Duration::from_secs(20), || {
        let out = sys.run(&["journalctl", "-u", "petrestore", "-o", "json", "--no-pager"]);
        let lines: Vec<serde_json::Value> =
            String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        lines.iter().any(|e| e["JOB"] == job.as_str() && e["STATE"] == "done").then_some(lines)
    });
    let native: Vec<_> = entries.iter().filter(|e| e["_TRANSPORT"] == "journal").collect();
    assert!(!native.is_empty(), "no native journald entries");
    assert!(native.iter().any(|e| e["CALLING"] == CONSOLE), "no entry carries CALLING={CONSOLE}");
    assert!(native.iter().all(|e| e["PRIORITY"].is_string()), "every entry has a priority");
    // The plain `journalctl -u petrestore` view carries the fields too.
    let plain = sys.ok(&["journalctl", "-u", "petrestore", "--no-pager"]);
    assert!(plain.contains(&format!("job finished job={job} state=done")), "{plain}");
    let all = entries.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    for phi in ["SIMULATED^PATIENT".to_string(), "SIM77".to_string()] {
        assert!(!all.contains(&phi), "patient data {phi:?} appears in the journal");
    }
    // ONNX Runtime loaded and ran under the system-call filter.
    assert!(native.iter().any(|e| e["PROVIDER"] == "cpu"), "no 'ONNX Runtime session ready' entry");
    let step = native.iter().find(|e| e["JOB"] == job.as_str() && e["ENGINE"].is_string()).expect("the restoration entry");
    assert!(step["ENGINE"].as_str().unwrap().starts_with("ort"), "restored with {}", step["ENGINE"]);

    // The exposure systemd itself computes for the running unit.
    let security = sys.ok(&["systemd-analyze", "security", "petrestore", "--no-pager"]);
    let overall = security.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_default().to_string();
    println!("{overall}");
    let score: f64 = overall.split_whitespace().find_map(|w| w.parse().ok()).expect("an exposure score");
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{security}");

    // `systemctl reload`: a reloadable change is applied; one that needs a
    // restart fails the reload, naming the key, and the daemon runs on.
    let with = |from: &str, to: &str| {
        let c = std::fs::read_to_string(&staged).unwrap().replace(from, to);
        std::fs::write(&staged, &c).unwrap();
        sys.ok(&["install", "-D", "-m", "0644", staged.to_str().unwrap(), "/etc/petrestore/petrestore.toml"]);
    };
    with("quiet_timeout_s = 2", "quiet_timeout_s = 3");
    sys.ok(&["systemctl", "reload", "petrestore"]);
    with("[dicom]\n", "[dicom]\nae_title = \"OTHER\"\n");
    let refused = sys.run(&["systemctl", "reload", "petrestore"]);
    assert!(!refused.status.success(), "a reload that needs a restart must fail");
    let log = sys.ok(&["journalctl", "-u", "petrestore", "--no-pager"]);
    assert!(log.contains("dicom.ae_title") && log.contains("need a restart"), "{log}");
    assert_eq!(sys.show("petrestore", "ActiveState"), "active");

    // A clean stop: SIGTERM, drain, exit 0, never restarted.
    sys.ok(&["systemctl", "stop", "petrestore"]);
    assert_eq!(sys.show("petrestore", "Result"), "success");
    assert_eq!(sys.show("petrestore", "NRestarts"), "0");
}
