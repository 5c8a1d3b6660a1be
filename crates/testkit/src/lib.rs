//! One harness for the end-to-end tests and the benchmark commands: the
//! real `petrestore` (and `petlab`) binaries, real DCMTK peers, a real
//! Mosquitto, a real ONNX Runtime library, loopback sockets. A missing peer
//! fails the test loudly (never a skip).

pub mod bench;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use petrestore::journal::Job;

pub const CONSOLE: &str = "CONSOLE";
pub const OUR_AE: &str = "PETRESTORE";
pub const DEST_AE: &str = "DESTSCP";

/// Fail loudly when a real peer is missing.
pub fn require(tool: &str) -> PathBuf {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap();
    assert!(
        out.status.success(),
        "{tool} not found: these tests need real DICOM peers; install DCMTK (apt-get install dcmtk) or run `bash .ci/run`"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A free loopback port never handed out before in this process: tests of
/// one binary run in parallel, and a port one test chose and released (e.g.
/// a destination that is "down" until the test starts it) must not be given
/// to another test meanwhile.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A binary of this workspace (`petrestore`, `petlab`), built by cargo for
/// the test or bench being run: it sits next to the `deps/` folder that holds
/// the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the workspace first (`cargo test --release --workspace` builds every binary)",
        path.display()
    );
    path
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A `petrestore serve` process with its own state dir and config.
pub struct Daemon {
    pub dir: PathBuf,
    pub port: u16,
    pub config: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Write a config (test defaults + `extra` TOML appended) and start.
    pub fn start(dir: &Path, extra: &str) -> Daemon {
        let port = free_port();
        Self::start_on(dir, port, extra)
    }

    pub fn start_on(dir: &Path, port: u16, extra: &str) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("petrestore.toml");
        let state = dir.join("state");
        let defaults: [(&str, Vec<String>); 4] = [
            ("node", vec![format!("state_dir = {state:?}"), "min_free_mb = 1".into()]),
            (
                "dicom",
                vec![
                    format!("listen = \"127.0.0.1:{port}\""),
                    format!("ae_title = \"{OUR_AE}\""),
                    format!("allowed_callers = [\"{CONSOLE}\"]"),
                ],
            ),
            ("series", vec!["quiet_timeout_s = 3".into()]),
            ("egress", vec!["backoff_initial_s = 0.5".into(), "backoff_max_s = 2".into()]),
        ];
        let mut text = String::new();
        for (name, lines) in defaults {
            let user = section(extra, name);
            text.push_str(&format!("[{name}]\n"));
            for l in lines {
                let key = l.split('=').next().unwrap().trim();
                if !user.lines().any(|u| u.split('=').next().map(str::trim) == Some(key)) {
                    text.push_str(&l);
                    text.push('\n');
                }
            }
            text.push_str(&user);
        }
        text.push_str(&rest(extra));
        std::fs::write(&config, text).unwrap();
        let mut d = Daemon { dir: dir.to_owned(), port, config, child: None };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).unwrap();
        let child = Command::new(bin("petrestore"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn petrestore serve");
        self.child = Some(child);
        let port = self.port;
        wait_for("the daemon to listen", Duration::from_secs(30), || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("daemon exited early with {st}; log:\n{}", self.log());
            }
            port_open(port).then_some(())
        });
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Waits until job `id` satisfies `f`; on timeout prints the job and the log.
    pub fn wait_job(&self, id: &str, what: &str, timeout: Duration, f: impl Fn(&Job) -> bool) -> Job {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.jobs().into_iter().find(|j| j.id == id);
            if let Some(j) = j.filter(|j| f(j)) {
                return j;
            }
            if Instant::now() > deadline {
                let j = self.jobs().into_iter().find(|j| j.id == id);
                panic!("timed out after {timeout:?} waiting for {what}: job {j:#?}\nlog:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the log holds `needle`. A peer sees a reply before the
    /// daemon logs it, so a check right after a peer action must wait.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "{needle:?} not in the log within 10 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: a crash or power cut.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe_kill(c.id(), "TERM");
        c.wait().unwrap()
    }

    /// Wait for the daemon to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let st = wait_for("the daemon to exit", timeout, || c.try_wait().unwrap());
        self.child = None;
        st
    }

    /// Send a signal (e.g. "HUP") to the running daemon.
    pub fn signal(&self, sig: &str) {
        unsafe_kill(self.child.as_ref().expect("running").id(), sig);
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        self.spawn();
    }

    /// `petrestore jobs list --json` through the control socket.
    pub fn jobs(&self) -> Vec<Job> {
        let out = petrestore(&["jobs", "--state-dir", self.state_dir().to_str().unwrap(), "list", "--json"]);
        assert!(out.status.success(), "jobs list failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The job, waiting a little for it to appear: an acknowledged instance
    /// reaches the journal through the arrival log within milliseconds.
    pub fn job(&self, id: &str) -> Job {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(j) = self.jobs().into_iter().find(|j| j.id == id) {
                return j;
            }
            assert!(Instant::now() < deadline, "no job {id}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the job reaches a terminal state.
    pub fn wait_terminal(&self, id: &str, timeout: Duration) -> Job {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(j) = self.jobs().into_iter().find(|j| j.id == id) {
                if j.state.is_terminal() {
                    return j;
                }
                assert!(
                    Instant::now() < deadline,
                    "job {id} still {:?} after {timeout:?}; history {:#?}\nlog:\n{}",
                    j.state,
                    j.history,
                    self.log()
                );
            }
            assert!(Instant::now() < deadline, "job {id} never appeared; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The instance files in the spool, once the running daemon has moved
    /// every acknowledged instance out of its arrival log (the log's last
    /// segment is deleted after ~1 s without arrivals).
    pub fn spool_files(&self) -> Vec<PathBuf> {
        let spool = self.state_dir().join("spool");
        let arrivals = spool.join("arrivals");
        wait_for("the arrival log to settle", Duration::from_secs(20), || {
            files_under(&arrivals).iter().all(|p| p.extension().is_none_or(|x| x != "log")).then_some(())
        });
        files_under(&spool).into_iter().filter(|p| !p.starts_with(&arrivals)).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    assert!(st.success());
}

/// Lines of `extra` under `[name]` (the harness merges them into its own sections).
fn section(extra: &str, name: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == format!("[{name}]");
            continue;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Everything in `extra` outside the merged sections.
fn rest(extra: &str) -> String {
    let mut out = String::new();
    let mut keep = true;
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            keep = !matches!(t, "[node]" | "[dicom]" | "[series]" | "[egress]");
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The IOD validator of dicom3tools (`dciodvfy`, Debian package
/// `dicom3tools`): its `Error` lines for one file. Fails loudly when the
/// validator is missing.
pub fn iod_errors(file: &Path) -> Vec<String> {
    let out = Command::new("sh").arg("-c").arg("command -v dciodvfy").output().unwrap();
    assert!(out.status.success(), "dciodvfy not found: the conformance tests need it; apt-get install dicom3tools or run `bash .ci/run`");
    let out = Command::new("dciodvfy").arg(file).output().unwrap();
    let all = text(&out);
    assert!(!all.trim().is_empty(), "dciodvfy said nothing about {}", file.display());
    all.lines().filter(|l| l.starts_with("Error")).map(str::to_owned).collect()
}

pub fn petrestore(args: &[&str]) -> Output {
    Command::new(bin("petrestore")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

/// Run the laboratory binary (`petlab simulate|dataset|eval --dataset`).
pub fn petlab(args: &[&str]) -> Output {
    Command::new(bin("petlab")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

/// DCMTK storescp writing every instance into `dir`.
pub struct StoreScp {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

impl StoreScp {
    pub fn start(dir: &Path) -> StoreScp {
        Self::start_on(dir, free_port())
    }
    pub fn start_on(dir: &Path, port: u16) -> StoreScp {
        Self::start_with(dir, port, &[])
    }
    /// With extra storescp options, e.g. `+uf` (a new file per received
    /// instance, so an instance sent twice is seen twice).
    pub fn start_with(dir: &Path, port: u16, extra: &[&str]) -> StoreScp {
        let bin = require("storescp");
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(bin)
            .args(extra)
            .args(["-aet", DEST_AE, "-od"])
            .arg(dir)
            .arg(port.to_string())
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("storescp to listen", Duration::from_secs(10), || port_open(port).then_some(()));
        StoreScp { port, dir: dir.to_owned(), child }
    }
    pub fn files(&self) -> Vec<PathBuf> {
        files_under(&self.dir)
    }
    /// The received files once there are exactly `n` of them (`what` names
    /// them in the timeout's message).
    pub fn wait_files(&self, n: usize, what: &str, timeout: Duration) -> Vec<PathBuf> {
        wait_for(what, timeout, || {
            let f = self.files();
            (f.len() == n).then_some(f)
        })
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The TOML of one destination.
pub fn destination(name: &str, port: u16) -> String {
    format!("[[destination]]\nname = \"{name}\"\nae_title = \"{DEST_AE}\"\naddress = \"127.0.0.1:{port}\"\n")
}

/// DCMTK storescu as the console.
/// [`storescu`] proposing only the SOP classes of `files` (`-R`):
/// storescu's default proposal list lacks Enhanced PET.
pub fn storescu_required(port: u16, calling: &str, files: &[PathBuf]) -> Output {
    let bin = require("storescu");
    Command::new(bin)
        .args(["-v", "-R", "-aet", calling, "-aec", OUR_AE, "-nh", "127.0.0.1", &port.to_string()])
        .args(files)
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap()
}

pub fn storescu(port: u16, calling: &str, files: &[PathBuf]) -> Output {
    let bin = require("storescu");
    Command::new(bin)
        .args(["-v", "-aet", calling, "-aec", OUR_AE, "-nh", "127.0.0.1", &port.to_string()])
        .args(files)
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap()
}

pub fn echoscu(port: u16, calling: &str, called: &str) -> Output {
    let bin = require("echoscu");
    Command::new(bin).args(["-aet", calling, "-aec", called, "127.0.0.1", &port.to_string()]).output().unwrap()
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    walk(dir, &mut out);
    out.sort();
    out
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A synthetic series into `dir`.
pub fn series(dir: &Path, slices: usize, matrix: usize, seed: u64) -> petsim::SeriesFiles {
    let spec = petsim::SeriesSpec { slices, matrix, seed, frame_duration_s: 30.0, ..Default::default() };
    petsim::write_series(dir, &spec).unwrap()
}

/// [`series`] at 4 mm pixels (a field of view of `matrix` × 4 mm), inside
/// the pixel sizes the shipped model was trained on (2.0–5.3 mm): for tests
/// that restore with it.
pub fn clinical_series(dir: &Path, slices: usize, matrix: usize, seed: u64) -> petsim::SeriesFiles {
    let spec = petsim::SeriesSpec { slices, matrix, seed, frame_duration_s: 30.0, fov_mm: matrix as f64 * 4.0, ..Default::default() };
    petsim::write_series(dir, &spec).unwrap()
}

/// The salt of the derived UIDs of a series restored complete (every
/// slice, single-frame): its model and engine (`derive::restored_salt`).
pub fn complete_salt(model: &str, engine: &str) -> String {
    petrestore::derive::restored_salt(model, &petrestore::derive::inputs_id::<&str>(engine, None, &[]))
}

pub fn job_id(s: &petsim::SeriesFiles) -> String {
    petrestore::journal::job_id(&s.series_uid)
}

/// The real ONNX Runtime library: `ORT_DYLIB_PATH`, else the one `.ci/run`
/// installs into `.venv`. Missing: the test fails, saying how to get it.
pub fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "ORT_DYLIB_PATH={} does not exist", p.display());
        return p;
    }
    let venv_lib = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(".venv/lib");
    if let Ok(rd) = std::fs::read_dir(&venv_lib) {
        for py in rd.flatten() {
            let capi = py.path().join("site-packages/onnxruntime/capi");
            if let Ok(files) = std::fs::read_dir(&capi) {
                for f in files.flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.starts_with("libonnxruntime.so.") {
                        return f.path();
                    }
                }
            }
        }
    }
    panic!(
        "ONNX Runtime library not found: set ORT_DYLIB_PATH or run `python3 -m venv .venv && .venv/bin/pip install onnxruntime==1.31.1` (bash .ci/run does it)"
    );
}

/// The oldest ONNX Runtime release this build accepts (the `api-20`
/// feature of `ort`: 1.20), which `.ci/run` unpacks from its PyPI wheel
/// into `.ort-oldest/`, so the box's older runtimes are tested, not assumed.
pub const ORT_OLDEST: &str = "1.20.1";

pub fn ort_oldest_library() -> PathBuf {
    let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(format!(".ort-oldest/libonnxruntime.so.{ORT_OLDEST}"));
    assert!(
        p.exists(),
        "{} not found: bash .ci/run unpacks it from the onnxruntime=={ORT_OLDEST} wheel (pip download onnxruntime=={ORT_OLDEST} --no-deps, \
         then onnxruntime/capi/libonnxruntime.so.{ORT_OLDEST} from the wheel into .ort-oldest/)",
        p.display()
    );
    p
}

/// The test model package shipped in the repository.
pub fn test_model() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/test-unet")
}

/// Python with numpy and onnx (the venv `.ci/run` makes, else python3).
pub fn python() -> PathBuf {
    let venv = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(".venv/bin/python");
    if venv.exists() { venv } else { PathBuf::from("python3") }
}

/// A real Mosquitto broker on a free loopback port.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
}

impl Mosquitto {
    /// `extra`: more mosquitto.conf lines for the listener (TLS, ACL).
    pub fn start(dir: &Path, extra: &str) -> Mosquitto {
        Self::start_on(dir, free_port(), extra)
    }
    pub fn start_on(dir: &Path, port: u16, extra: &str) -> Mosquitto {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("mosquitto not found: apt-get install mosquitto mosquitto-clients (bash .ci/run does it)"));
        std::fs::create_dir_all(dir).unwrap();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let anon = if extra.contains("require_certificate") { "" } else { "allow_anonymous true\n" };
        // `user root`: as root (CI), mosquitto would otherwise drop to the
        // mosquitto user, which cannot read the test's private temp files.
        std::fs::write(&conf, format!("user root\nlistener {port} 127.0.0.1\n{anon}persistence false\nlog_dest stderr\n{extra}\n"))
            .unwrap();
        let log = std::fs::File::create(dir.join(format!("mosquitto-{port}.log"))).unwrap();
        let mut child = Command::new(bin).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let log_path = dir.join(format!("mosquitto-{port}.log"));
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("mosquitto exited with {st}: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
            }
            port_open(port).then_some(())
        });
        Mosquitto { port, child }
    }
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Freeze (`STOP`) or thaw (`CONT`) the broker: its connections stay
    /// open and nothing on them is answered, as on a link that died
    /// without a word.
    pub fn signal(&self, sig: &str) {
        assert!(Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap().success());
    }
    /// Stop gracefully (SIGTERM): with persistence on, sessions are saved.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An A-ASSOCIATE-RQ (PS3.8 9.3.2) from CONSOLE to PETRESTORE proposing
/// Verification in Implicit VR Little Endian.
pub fn associate_rq() -> Vec<u8> {
    fn item(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind, 0];
        v.extend((body.len() as u16).to_be_bytes());
        v.extend(body);
        v
    }
    let ae = |s: &str| format!("{s:<16}").into_bytes();
    let mut body = vec![0, 1, 0, 0];
    body.extend(ae(OUR_AE));
    body.extend(ae(CONSOLE));
    body.extend([0u8; 32]);
    body.extend(item(0x10, b"1.2.840.10008.3.1.1.1"));
    let mut pc = vec![1, 0, 0, 0];
    pc.extend(item(0x30, petrestore::dicom::VERIFICATION.as_bytes()));
    pc.extend(item(0x40, petrestore::dicom::IMPLICIT_VR_LE.as_bytes()));
    body.extend(item(0x20, &pc));
    body.extend(item(0x50, &item(0x51, &16384u32.to_be_bytes())));
    let mut pdu = vec![0x01, 0];
    pdu.extend((body.len() as u32).to_be_bytes());
    pdu.extend(body);
    pdu
}

/// `mosquitto_sub` collecting (topic, payload) lines.
pub struct Sub {
    child: Child,
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Sub {
    pub fn start(port: u16, topic: &str, tls_args: &[&str]) -> Sub {
        Self::start_with(port, topic, tls_args)
    }

    /// A subscriber with a persistent session (`-c -i id`): the broker
    /// queues QoS 1 messages for it while it is away.
    pub fn start_persistent(port: u16, topic: &str, id: &str) -> Sub {
        Self::start_with(port, topic, &["-c", "-i", id])
    }

    fn start_with(port: u16, topic: &str, extra_args: &[&str]) -> Sub {
        let bin = require("mosquitto_sub");
        let mut child = Command::new(bin)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-q", "1", "-F", "%t\t%p"])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some((t, p)) = line.split_once('\t') {
                    l2.lock().unwrap().push((t.to_string(), p.to_string()));
                }
            }
        });
        Sub { child, lines }
    }

    /// Payloads (as JSON) published on topics ending with `suffix`.
    pub fn on(&self, suffix: &str) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.ends_with(suffix))
            .map(|(_, p)| serde_json::from_str(p).unwrap_or_else(|e| panic!("not JSON on {suffix}: {p}: {e}")))
            .collect()
    }

    pub fn wait_on(&self, suffix: &str, what: &str, timeout: Duration, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_for(what, timeout, || self.on(suffix).into_iter().find(|v| f(v)))
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn mosquitto_pub(port: u16, topic: &str, payload: &str, tls_args: &[&str]) -> Output {
    Command::new(require("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-m", payload, "-q", "1"])
        .args(tls_args)
        .output()
        .unwrap()
}

/// Validate a payload against one of `config/schemas/*.schema.json`.
pub fn assert_schema(name: &str, v: &serde_json::Value) {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("config/schemas").join(format!("{name}.schema.json"));
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Err(e) = validator.validate(v) {
        panic!("payload does not match {name}.schema.json: {e}\n{v:#}");
    }
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
}

/// A CA, a server certificate for localhost/127.0.0.1, and client
/// certificates for the given CNs.
pub fn pki(dir: &Path, clients: &[&str]) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=petrestore-test-ca",
        ],
    );
    // v3 certificates throughout: rustls (webpki) refuses v1 ones.
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    for cn in clients {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{cn}.key"),
                "-out",
                &format!("{cn}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{cn}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{cn}.pem"),
                "-days",
                "2",
                "-extfile",
                "client.ext",
            ],
        );
    }
}

/// A small filesystem of its own (tmpfs of `mib` MiB mounted on `dir`), so a
/// test can fill a disk for real: writes fail with ENOSPC as on a full box.
/// Mounting needs root (CAP_SYS_ADMIN), as the CI machine has; without it the
/// test fails with that reason. Unmounted when dropped.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0755"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {mib} MiB tmpfs on {} failed (the disk-full tests need root: CAP_SYS_ADMIN): {}",
            dir.display(),
            text(&out)
        );
        Tmpfs { dir: dir.to_owned() }
    }

    /// Fill the filesystem with one file until `leave` bytes stay free;
    /// returns the file (remove it to give the space back). A daemon may be
    /// writing to the same filesystem meanwhile (its journal grows): free
    /// space is measured again for every chunk, a write that meets a full
    /// disk ends the filling, and the file is cut back until `leave` bytes
    /// are free again.
    pub fn fill_leaving(&self, leave: u64) -> PathBuf {
        let free = petrestore::spool::free_bytes(&self.dir).unwrap();
        assert!(free > leave, "only {free} bytes free, cannot leave {leave}");
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 1 << 16];
        loop {
            let free = petrestore::spool::free_bytes(&self.dir).unwrap();
            if free <= leave {
                break;
            }
            let n = (free - leave).min(chunk.len() as u64) as usize;
            match std::io::Write::write_all(&mut f, &chunk[..n]) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let free = petrestore::spool::free_bytes(&self.dir).unwrap();
        if free < leave {
            let len = f.metadata().unwrap().len();
            f.set_len(len.saturating_sub(leave - free)).unwrap();
        }
        f.sync_all().unwrap();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A real Orthanc archive (Debian's `orthanc` package) on loopback, with its
/// own storage and index in `dir`. `modalities`: (name, AE title, port) of
/// the nodes it knows, i.e. where it sends storage commitment reports.
pub struct Orthanc {
    pub port: u16,
    pub ae_title: String,
    pub dir: PathBuf,
    child: Child,
}

impl Orthanc {
    pub fn start(dir: &Path, ae_title: &str, modalities: &[(&str, &str, u16)]) -> Orthanc {
        let bin = PathBuf::from("/usr/sbin/Orthanc");
        assert!(
            bin.exists(),
            "Orthanc not found: these tests need a real archive; install it (apt-get install orthanc) or run `bash .ci/run`"
        );
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mods: serde_json::Map<String, serde_json::Value> = modalities
            .iter()
            .map(|(name, aet, p)| (name.to_string(), serde_json::json!({"AET": aet, "Host": "127.0.0.1", "Port": p})))
            .collect();
        let config = serde_json::json!({
            "Name": format!("petrestore-test-{ae_title}"),
            "StorageDirectory": dir.join("storage"),
            "IndexDirectory": dir.join("index"),
            "DicomAet": ae_title,
            "DicomPort": port,
            "HttpServerEnabled": false,
            "HttpPort": free_port(),
            "RemoteAccessAllowed": false,
            "DicomAlwaysAllowStore": true,
            "DicomCheckCalledAet": false,
            "DicomCheckModalityHost": false,
            "DicomModalities": mods,
            "Plugins": [],
            "StorageCommitmentReportsSize": 100,
        });
        let path = dir.join("orthanc.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let log = std::fs::File::create(dir.join("orthanc.log")).unwrap();
        let child = Command::new(bin).arg(&path).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let mut o = Orthanc { port, ae_title: ae_title.to_string(), dir: dir.to_owned(), child };
        wait_for("Orthanc to listen", Duration::from_secs(30), || {
            if let Ok(Some(st)) = o.child.try_wait() {
                panic!("Orthanc exited with {st}: {}", std::fs::read_to_string(dir.join("orthanc.log")).unwrap_or_default());
            }
            port_open(port).then_some(())
        });
        o
    }

    /// Instances Orthanc stored (files under its storage folder).
    pub fn stored(&self) -> usize {
        files_under(&self.dir.join("storage")).len()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("orthanc.log")).unwrap_or_default()
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
