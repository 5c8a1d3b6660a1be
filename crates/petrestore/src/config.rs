//! Configuration in two stages: `Raw*` structs only parse the TOML (with
//! `deny_unknown_fields`, so a typo is an error, not a silently ignored key);
//! [`Settings`] is the validated form the rest of the code uses.
//!
//! The annotated default file `config/petrestore.toml` is embedded in the
//! binary: it is what `print-default-config` prints and what every missing
//! key falls back to, so the documentation and the defaults cannot drift.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dicom::uid::valid_ae_title;

/// The annotated default configuration, as shipped in `config/`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/petrestore.toml");

/// Longest `restore.series_description_suffix`: with the uncertainty
/// series' own label it leaves room for the source's description in the
/// 64 characters of Series Description.
pub const MAX_SUFFIX_CHARS: usize = 24;
/// Largest `restore.series_number_offset`: twice it (the uncertainty
/// series) stays below Series Number's wrap at 100000.
pub const MAX_SERIES_NUMBER_OFFSET: u32 = 49_999;
/// Bounds of `restore.max_voxels`: one 256² slice, and 2³² voxels (about
/// 80 GB while restoring).
pub const MIN_MAX_VOXELS: u64 = 65_536;
pub const MAX_MAX_VOXELS: u64 = 1 << 32;
/// The seconds `series.quiet_timeout_s` and
/// `series.multiframe_quiet_timeout_s` may take, both ends included.
const QUIET_S: std::ops::RangeInclusive<f64> = 1.0..=86_400.0;

/// A configuration problem: which key, what was wrong, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Could not read the file at all.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// TOML syntax error or wrong type or unknown key.
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    /// A value that parses but makes no sense.
    #[error("config key `{key}`: {problem}; {fix}")]
    Invalid { key: &'static str, problem: String, fix: String },
    /// More than one problem: all of them, one per line.
    #[error("{} problems:\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ConfigError>),
}

fn invalid(key: &'static str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.into(), fix: fix.into() }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    dicom: RawDicom,
    #[serde(default)]
    series: RawSeries,
    #[serde(default)]
    restore: RawRestore,
    #[serde(default)]
    egress: RawEgress,
    #[serde(default)]
    destination: Vec<RawDestination>,
    /// Absent: telemetry off.
    mqtt: Option<RawMqtt>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    url: String,
    client_id: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    health_interval_s: Option<f64>,
    buffer: Option<usize>,
    include_uids: Option<bool>,
    keep_alive_s: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNode {
    device_id: Option<String>,
    state_dir: Option<PathBuf>,
    min_free_mb: Option<u64>,
    retention_hours: Option<f64>,
    failed_retention_hours: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDicom {
    listen: Option<String>,
    ae_title: Option<String>,
    allowed_callers: Option<Vec<String>>,
    max_associations: Option<usize>,
    max_associations_per_peer: Option<usize>,
    artim_timeout_s: Option<u64>,
    max_pdu_length: Option<u32>,
    max_buffered_mb: Option<usize>,
    idle_timeout_s: Option<u64>,
    non_pet: Option<String>,
    tls: Option<RawDicomTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDicomTls {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSeries {
    quiet_timeout_s: Option<f64>,
    multiframe_quiet_timeout_s: Option<f64>,
    incomplete_policy: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestore {
    engines: Option<Vec<String>>,
    model: Option<PathBuf>,
    gaussian_fwhm_mm: Option<f64>,
    min_frame_duration_s: Option<f64>,
    max_frame_duration_s: Option<f64>,
    units: Option<Vec<String>>,
    max_matrix: Option<u32>,
    max_voxels: Option<u64>,
    time_limit_s: Option<f64>,
    forward_original_on_failure: Option<bool>,
    forward_skipped: Option<bool>,
    series_description_suffix: Option<String>,
    series_number_offset: Option<u32>,
    threads: Option<usize>,
    ort_library: Option<String>,
    ort_providers: Option<Vec<String>>,
    tensorrt_fp16: Option<bool>,
    tensorrt_workspace_mb: Option<usize>,
    assume_frame_duration_s: Option<f64>,
    assume_units: Option<String>,
    assume_tracer: Option<String>,
    uncertainty_site: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    max_attempts: Option<u32>,
    backoff_initial_s: Option<f64>,
    backoff_max_s: Option<f64>,
    timeout_s: Option<f64>,
    calling_ae_title: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    name: String,
    ae_title: String,
    address: String,
    #[serde(default)]
    uncertainty: bool,
    #[serde(default)]
    commitment: bool,
    commitment_timeout_s: Option<f64>,
}

/// What to do with non-PET storage classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NonPetPolicy {
    Refuse,
    Passthrough,
}

/// What to do with a series still incomplete at the quiet timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum IncompletePolicy {
    Process,
    Fail,
}

/// One calling AE allowed to send to us, optionally pinned to a host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AllowedCaller {
    pub ae_title: String,
    pub host: Option<IpAddr>,
}

/// A DICOM destination for derived (and forwarded) series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Destination {
    pub name: String,
    pub ae_title: String,
    pub address: String,
    /// Also send the uncertainty series (when the model makes one).
    pub uncertainty: bool,
    /// Storage commitment (`commitment = true`): after sending, ask the
    /// archive to commit, and count the series delivered only when its
    /// report confirms every instance, within this time
    /// (`commitment_timeout_s`, default 300 s) or the series is sent again.
    pub commitment: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeSettings {
    pub device_id: String,
    pub state_dir: PathBuf,
    #[serde(rename = "min_free_mb")]
    pub min_free_bytes: u64,
    /// Finished (done, skipped) jobs' files are removed after this; `None`: keep.
    #[serde(rename = "retention_hours")]
    pub retention: Option<Duration>,
    /// Failed jobs' files are removed after this; `None`: keep.
    #[serde(rename = "failed_retention_hours")]
    pub failed_retention: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DicomSettings {
    pub listen: SocketAddr,
    pub ae_title: String,
    pub allowed_callers: Vec<AllowedCaller>,
    pub max_associations: usize,
    /// Open connections from one IP address.
    pub max_associations_per_peer: usize,
    /// ARTIM: time for the A-ASSOCIATE-RQ after connect, and for a free slot.
    #[serde(rename = "artim_timeout_s")]
    pub artim_timeout: Duration,
    pub max_pdu_length: u32,
    /// Data sets being received, all associations together (MiB).
    pub max_buffered_mb: usize,
    #[serde(rename = "idle_timeout_s")]
    pub idle_timeout: Duration,
    pub non_pet: NonPetPolicy,
    /// A second listener that speaks DICOM over TLS only.
    pub tls: Option<DicomTls>,
}

/// `[dicom.tls]`: DICOM TLS (PS3.15 B.1, typically port 2762).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DicomTls {
    pub listen: SocketAddr,
    /// PEM certificate chain of this node.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates: when set, callers must present a certificate
    /// signed by one of them (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesSettings {
    #[serde(rename = "quiet_timeout_s")]
    pub quiet_timeout: Duration,
    /// For series of multi-frame instances (no Image Index to count).
    #[serde(rename = "multiframe_quiet_timeout_s")]
    pub multiframe_quiet_timeout: Duration,
    pub incomplete_policy: IncompletePolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestoreSettings {
    pub engines: Vec<EngineKind>,
    pub model: PathBuf,
    pub gaussian_fwhm_mm: f64,
    pub min_frame_duration_s: f64,
    pub max_frame_duration_s: f64,
    pub units: Vec<String>,
    pub max_matrix: u32,
    /// Largest series restored, in voxels (memory); larger ones are skipped.
    pub max_voxels: u64,
    /// Longest a restoration may run before the daemon exits to end it
    /// (`time_limit_s`).
    pub time_limit: Duration,
    pub forward_original_on_failure: bool,
    pub forward_skipped: bool,
    pub series_description_suffix: String,
    pub series_number_offset: u32,
    /// CPU threads for the neural engines; 0 = one per core.
    pub threads: usize,
    /// libonnxruntime path; `None`: ORT_DYLIB_PATH, else the loader's search.
    pub ort_library: Option<PathBuf>,
    pub ort_providers: Vec<Provider>,
    pub tensorrt_fp16: bool,
    pub tensorrt_workspace_mb: usize,
    /// For series without Actual Frame Duration: what to assume (said in the
    /// job history and Derivation Description), `None`: skip such series.
    pub assume_frame_duration_s: Option<f64>,
    /// For series without Units, likewise.
    pub assume_units: Option<String>,
    /// For series without Radiopharmaceutical, likewise (checked against
    /// the model's tracers like a recorded one).
    pub assume_tracer: Option<String>,
    /// The site's σ calibration file (`petrestore eval --site-uncertainty`).
    pub uncertainty_site: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EgressSettings {
    pub max_attempts: u32,
    #[serde(rename = "backoff_initial_s")]
    pub backoff_initial: Duration,
    #[serde(rename = "backoff_max_s")]
    pub backoff_max: Duration,
    /// Longest wait for a destination to answer or to take bytes (an
    /// instance may take this plus one second per MiB).
    #[serde(rename = "timeout_s")]
    pub timeout: Duration,
    pub calling_ae_title: String,
}

/// TLS files for the broker connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MqttTls {
    pub ca_file: PathBuf,
    /// Client certificate and key (PEM), for brokers that require them.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// `[mqtt]`: fleet telemetry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub tls: Option<MqttTls>,
    pub client_id: String,
    pub health_interval: Duration,
    /// Events kept while the broker is unreachable (oldest dropped first).
    pub buffer: usize,
    /// Put Study/Series Instance UIDs into job events (off: job ids only).
    pub include_uids: bool,
    pub keep_alive: Duration,
}

/// Validated configuration: what the daemon runs on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub node: NodeSettings,
    pub dicom: DicomSettings,
    pub series: SeriesSettings,
    pub restore: RestoreSettings,
    pub egress: EgressSettings,
    #[serde(rename = "destination")]
    pub destinations: Vec<Destination>,
    pub mqtt: Option<MqttSettings>,
    /// The file these settings came from (for `reload`); `None`: built-in.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Settings that can be replaced while the daemon runs (`reload`): readers
/// take a snapshot with [`LiveSettings::get`].
#[derive(Debug)]
pub struct LiveSettings(std::sync::RwLock<std::sync::Arc<Settings>>);

impl LiveSettings {
    pub fn new(s: Settings) -> LiveSettings {
        LiveSettings(std::sync::RwLock::new(std::sync::Arc::new(s)))
    }
    pub fn get(&self) -> std::sync::Arc<Settings> {
        self.0.read().expect("settings lock").clone()
    }

    /// Re-read the config file and apply it if only keys that can change at
    /// run time differ. Returns the sections that changed; errors name the
    /// keys that need a restart.
    pub fn reload(&self) -> Result<Vec<&'static str>, String> {
        let old = self.get();
        let Some(path) = old.source.clone() else {
            return Err("the daemon runs on built-in defaults (no --config): nothing to reload".into());
        };
        let new = Settings::load(&path).map_err(|e| e.to_string())?;
        let (restart, changed) = differences(&old, &new);
        if !restart.is_empty() {
            return Err(format!("not applied: {} changed and need a restart (systemctl restart petrestore)", restart.join(", ")));
        }
        *self.0.write().expect("settings lock") = std::sync::Arc::new(new);
        Ok(changed)
    }
}

/// The keys of each section that `reload` applies while the daemon runs
/// ("*": every key of the section). Every other key, and every key added
/// later unless it is listed here, needs a restart: the listeners, the
/// engines and the broker connection are built from them at start.
pub const RELOADABLE: &[(&str, &[&str])] = &[
    ("node", &["min_free_mb", "retention_hours", "failed_retention_hours"]),
    ("dicom", &["allowed_callers"]),
    ("series", &["*"]),
    (
        "restore",
        &[
            "min_frame_duration_s",
            "max_frame_duration_s",
            "units",
            "max_matrix",
            "max_voxels",
            "time_limit_s",
            "forward_original_on_failure",
            "forward_skipped",
            "series_description_suffix",
            "series_number_offset",
            "assume_frame_duration_s",
            "assume_units",
            "assume_tracer",
        ],
    ),
    ("egress", &["*"]),
    ("destination", &["*"]),
    ("mqtt", &[]),
];

/// What differs between two settings: the keys that need a restart
/// (`section.key`), and the sections whose reloadable keys changed.
fn differences(old: &Settings, new: &Settings) -> (Vec<String>, Vec<&'static str>) {
    let (a, b) = (serde_json::to_value(old).expect("settings serialize"), serde_json::to_value(new).expect("settings serialize"));
    let (mut restart, mut changed) = (Vec::new(), Vec::new());
    for (section, reloadable) in RELOADABLE {
        let (x, y) = (&a[section], &b[section]);
        if x == y {
            continue;
        }
        let all = reloadable.contains(&"*");
        match (x.as_object(), y.as_object()) {
            (Some(xo), Some(yo)) => {
                let mut keys: Vec<&String> = xo.keys().chain(yo.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys.into_iter().filter(|k| xo.get(*k) != yo.get(*k)) {
                    if all || reloadable.contains(&k.as_str()) {
                        if !changed.contains(section) {
                            changed.push(*section);
                        }
                    } else {
                        restart.push(format!("{section}.{k}"));
                    }
                }
            }
            _ if all => changed.push(*section),
            _ => restart.push(section.to_string()),
        }
    }
    (restart, changed)
}

/// A restoration engine (`restore.engines`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// ONNX Runtime with the model package (TensorRT, CUDA or CPU).
    Ort,
    /// tract, pure Rust, CPU, with the model package.
    Tract,
    /// A Gaussian filter: no model; the fallback of last resort.
    Gaussian,
}

impl EngineKind {
    pub const ALL: [EngineKind; 3] = [EngineKind::Ort, EngineKind::Tract, EngineKind::Gaussian];

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Ort => "ort",
            EngineKind::Tract => "tract",
            EngineKind::Gaussian => "gaussian",
        }
    }

    /// The names this build knows, in order.
    pub fn names() -> Vec<&'static str> {
        EngineKind::ALL.map(EngineKind::name).to_vec()
    }

    pub fn parse(s: &str) -> Option<EngineKind> {
        EngineKind::ALL.into_iter().find(|e| e.name() == s)
    }

    /// Runs the model package (and so needs one).
    pub fn needs_model(self) -> bool {
        matches!(self, EngineKind::Ort | EngineKind::Tract)
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An ONNX Runtime execution provider (`restore.ort_providers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    TensorRt,
    Cuda,
    Cpu,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::TensorRt, Provider::Cuda, Provider::Cpu];

    pub fn name(self) -> &'static str {
        match self {
            Provider::TensorRt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }

    /// The names this build knows, in order.
    pub fn names() -> Vec<&'static str> {
        Provider::ALL.map(Provider::name).to_vec()
    }

    pub fn parse(s: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| p.name() == s)
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the model package installs (`restore.model`'s default).
pub const DEFAULT_MODEL_DIR: &str = "/usr/share/petrestore/models/petrestore-unet25d";

impl Settings {
    /// The built-in defaults (the embedded annotated file).
    pub fn defaults() -> Settings {
        Settings::from_toml(DEFAULT_CONFIG, "built-in default").expect("embedded default config is valid")
    }

    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut s = Settings::from_toml(&text, &path.display().to_string())?;
        s.source = Some(path.to_owned());
        Ok(s)
    }

    /// Parse and validate TOML text; missing keys take the embedded defaults.
    pub fn from_toml(text: &str, origin: &str) -> Result<Settings, ConfigError> {
        let parse = |t: &str, o: &str| -> Result<RawConfig, ConfigError> {
            toml::from_str(t).map_err(|e| ConfigError::Parse { origin: o.to_owned(), message: e.to_string() })
        };
        let user = parse(text, origin)?;
        let def = if text == DEFAULT_CONFIG { None } else { Some(parse(DEFAULT_CONFIG, "built-in default")?) };
        merge_and_validate(user, def)
    }
}

macro_rules! pick {
    ($user:expr, $def:expr, $sec:ident . $key:ident) => {
        match $user.$sec.$key.take() {
            Some(v) => v,
            None => $def.as_mut().and_then(|d| d.$sec.$key.take()).expect(concat!(
                "default config has ",
                stringify!($sec),
                ".",
                stringify!($key)
            )),
        }
    };
}

/// Merge the user's file over the defaults and check every value, one
/// section at a time; every problem found is reported (one error, or
/// [`ConfigError::Many`]).
fn merge_and_validate(mut u: RawConfig, mut d: Option<RawConfig>) -> Result<Settings, ConfigError> {
    let mut errs: Vec<ConfigError> = Vec::new();
    let (u, d, e) = (&mut u, &mut d, &mut errs);
    let node = node_settings(u, d, e);
    let dicom = dicom_settings(u, d, e);
    let series = series_settings(u, d, e);
    let restore = restore_settings(u, d, e);
    let egress = egress_settings(u, d, e);
    let destinations = destinations(u, e);
    // a destination that is this node: its derived series would come back
    // (and be skipped as made by petrestore), never reach an archive
    for x in &destinations {
        let port = x.address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
        if x.ae_title.trim() == dicom.ae_title.trim() && port == Some(dicom.listen.port()) {
            e.push(invalid(
                "destination.ae_title",
                format!(
                    "destination {:?} is {} at port {}: this node itself (dicom.ae_title, dicom.listen)",
                    x.name,
                    x.ae_title,
                    dicom.listen.port()
                ),
                "name the console's or the archive's AE title and address",
            ));
        }
    }
    let mqtt = match u.mqtt.take().map(|m| mqtt_settings(m, &node.device_id)) {
        None => None,
        Some(Ok(m)) => Some(m),
        Some(Err(x)) => {
            e.push(x);
            None
        }
    };
    match errs.len() {
        0 => {}
        1 => return Err(errs.remove(0)),
        _ => return Err(ConfigError::Many(errs)),
    }
    Ok(Settings { source: None, mqtt, node, dicom, series, restore, egress, destinations })
}

/// An AE title with spaces at an end: DICOM pads and trims them, so the
/// peer sees another title than the one compared here (storage commitment
/// reports from `"PACS "` would never match).
fn edge_spaces(key: &'static str, ae: &str) -> Option<ConfigError> {
    (ae.trim() != ae)
        .then(|| invalid(key, format!("{ae:?} has spaces at an end (DICOM pads and trims them)"), format!("write {:?}", ae.trim())))
}

/// `[node]`.
fn node_settings(u: &mut RawConfig, d: &mut Option<RawConfig>, errs: &mut Vec<ConfigError>) -> NodeSettings {
    let device_id: String = pick!(u, d, node.device_id);
    if device_id.is_empty() || !device_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        errs.push(invalid(
            "node.device_id",
            format!("{device_id:?} is not a valid device id"),
            "use letters, digits, '-' and '_' only (it becomes an MQTT topic segment)",
        ));
    }
    let state_dir: PathBuf = pick!(u, d, node.state_dir);
    if state_dir.as_os_str().is_empty() {
        errs.push(invalid("node.state_dir", "empty", "name the folder for the spool and the journal, e.g. \"/var/lib/petrestore\""));
    } else if let Some(e) = relative("node.state_dir", &state_dir) {
        errs.push(e);
    }
    let min_free_mb: u64 = pick!(u, d, node.min_free_mb);
    let mut hours = |key: &'static str, h: f64| -> Option<Duration> {
        if !(0.0..=MAX_RETENTION_HOURS).contains(&h) {
            errs.push(invalid(
                key,
                format!("{h} is not a number of hours from 0 to {MAX_RETENTION_HOURS}"),
                "use 0 (keep forever) or a positive number of hours up to ten years",
            ));
            return None;
        }
        (h > 0.0).then(|| Duration::from_secs_f64(h * 3600.0))
    };
    let retention = hours("node.retention_hours", pick!(u, d, node.retention_hours));
    let failed_retention = hours("node.failed_retention_hours", pick!(u, d, node.failed_retention_hours));

    NodeSettings { device_id, state_dir, min_free_bytes: min_free_mb.saturating_mul(1024 * 1024), retention, failed_retention }
}

/// `[dicom]` and `[dicom.tls]`.
fn dicom_settings(u: &mut RawConfig, d: &mut Option<RawConfig>, errs: &mut Vec<ConfigError>) -> DicomSettings {
    let listen_s: String = pick!(u, d, dicom.listen);
    let listen: SocketAddr = listen_s.parse().unwrap_or_else(|_| {
        errs.push(invalid("dicom.listen", format!("{listen_s:?} is not an address"), "write IP:PORT, e.g. \"0.0.0.0:11112\""));
        SocketAddr::from(([0, 0, 0, 0], 0))
    });
    if listen_s.parse::<SocketAddr>().is_ok_and(|a| a.port() == 0) {
        errs.push(invalid(
            "dicom.listen",
            format!("{listen_s:?} has port 0 (any free port: no console could find it)"),
            "give the port consoles send to, e.g. 11112",
        ));
    }
    let ae_title: String = pick!(u, d, dicom.ae_title);
    if !valid_ae_title(&ae_title) {
        errs.push(invalid(
            "dicom.ae_title",
            format!("{ae_title:?} is not a valid AE title"),
            "use 1 to 16 printable ASCII characters without backslash",
        ));
    } else if let Some(e) = edge_spaces("dicom.ae_title", &ae_title) {
        errs.push(e);
    }
    let callers_raw: Vec<String> = pick!(u, d, dicom.allowed_callers);
    let mut allowed_callers = Vec::new();
    for c in callers_raw {
        let (ae, host) = match c.split_once('@') {
            Some((ae, host)) => {
                let ip: Option<IpAddr> = host.parse().ok();
                if ip.is_none() {
                    errs.push(invalid(
                        "dicom.allowed_callers",
                        format!("{c:?}: {host:?} is not an IP address"),
                        "write \"AE\" or \"AE@IP\", e.g. \"CONSOLE@10.1.2.3\"",
                    ));
                }
                (ae.to_owned(), ip)
            }
            None => (c.clone(), None),
        };
        if !valid_ae_title(&ae) {
            errs.push(invalid(
                "dicom.allowed_callers",
                format!("{ae:?} is not a valid AE title"),
                "use 1 to 16 printable ASCII characters",
            ));
        } else if ae.trim() != ae {
            errs.push(invalid(
                "dicom.allowed_callers",
                format!("{ae:?} has spaces at an end, which a calling AE title never matches (DICOM pads and trims them)"),
                format!("write {:?}", ae.trim()),
            ));
        }
        allowed_callers.push(AllowedCaller { ae_title: ae, host });
    }
    let max_associations: usize = pick!(u, d, dicom.max_associations);
    if max_associations == 0 {
        errs.push(invalid("dicom.max_associations", "0 would refuse every sender", "set 1 or more (default 8)"));
    } else if max_associations > 4096 {
        errs.push(invalid("dicom.max_associations", format!("{max_associations} is out of range"), "use 1 to 4096 (default 8)"));
    }
    let max_buffered_mb: usize = pick!(u, d, dicom.max_buffered_mb);
    if !(1..=65_536).contains(&max_buffered_mb) {
        errs.push(invalid(
            "dicom.max_buffered_mb",
            format!("{max_buffered_mb} is out of range"),
            "use MiB from 1 to 65536 (default 2048); it must hold the largest instance a console sends",
        ));
    }
    let max_pdu_length: u32 = pick!(u, d, dicom.max_pdu_length);
    // The association request is read against this maximum too (PS3.8
    // limits only P-DATA, but a request longer than what we announce is
    // refused before it is parsed): 32 KiB holds any realistic one (128
    // contexts with 8 transfer syntaxes each, about 31 KB).
    if !(32_768..=4_194_304).contains(&max_pdu_length) {
        errs.push(invalid(
            "dicom.max_pdu_length",
            format!("{max_pdu_length} is outside 32768..=4194304"),
            "use bytes from 32768 to 4194304 (default 65536): an association request longer than this is refused too",
        ));
    }
    let idle_timeout_s: u64 = pick!(u, d, dicom.idle_timeout_s);
    if !(1..=86_400).contains(&idle_timeout_s) {
        errs.push(invalid("dicom.idle_timeout_s", format!("{idle_timeout_s} is out of range"), "use seconds from 1 to 86400 (default 60)"));
    }
    let per_peer: usize = pick!(u, d, dicom.max_associations_per_peer);
    if per_peer == 0 {
        errs.push(invalid("dicom.max_associations_per_peer", "0 would refuse every sender", "set 1 or more (default 4)"));
    }
    let artim_s: u64 = pick!(u, d, dicom.artim_timeout_s);
    if !(1..=300).contains(&artim_s) {
        errs.push(invalid("dicom.artim_timeout_s", format!("{artim_s} is out of range"), "use seconds from 1 to 300 (default 10)"));
    }
    let tls = match u.dicom.tls.take() {
        None => None,
        Some(t) => {
            let tls_listen: SocketAddr = t.listen.parse().unwrap_or_else(|_| {
                errs.push(invalid("dicom.tls.listen", format!("{:?} is not an address", t.listen), "write IP:PORT, e.g. \"0.0.0.0:2762\""));
                SocketAddr::from(([0, 0, 0, 0], 0))
            });
            let overlaps = tls_listen.port() == listen.port()
                && (tls_listen.ip() == listen.ip() || tls_listen.ip().is_unspecified() || listen.ip().is_unspecified());
            if overlaps && listen.port() != 0 {
                errs.push(invalid(
                    "dicom.tls.listen",
                    format!("{tls_listen} takes the port of dicom.listen ({listen})"),
                    "give the TLS listener its own port (2762 is DICOM's TLS port)",
                ));
            }
            if tls_listen.port() == 0 && t.listen.parse::<SocketAddr>().is_ok() {
                errs.push(invalid(
                    "dicom.tls.listen",
                    format!("{:?} has port 0 (any free port: no console could find it)", t.listen),
                    "give the port consoles send to over TLS, e.g. 2762",
                ));
            }
            for (key, file) in
                [("dicom.tls.cert", Some(&t.cert)), ("dicom.tls.key", Some(&t.key)), ("dicom.tls.client_ca", t.client_ca.as_ref())]
            {
                if let Some(f) = file {
                    if let Some(e) = relative(key, f) {
                        errs.push(e);
                    } else if !f.is_file() {
                        errs.push(invalid(key, format!("{} is not a readable file", f.display()), "name the PEM file (an absolute path)"));
                    }
                }
            }
            Some(DicomTls { listen: tls_listen, cert: t.cert, key: t.key, client_ca: t.client_ca })
        }
    };
    let non_pet_s: String = pick!(u, d, dicom.non_pet);
    let non_pet = match non_pet_s.as_str() {
        "refuse" => NonPetPolicy::Refuse,
        "passthrough" => NonPetPolicy::Passthrough,
        other => {
            errs.push(invalid("dicom.non_pet", format!("{other:?} is not a policy"), "use \"refuse\" or \"passthrough\""));
            NonPetPolicy::Refuse
        }
    };

    DicomSettings {
        listen,
        ae_title,
        allowed_callers,
        max_associations,
        max_associations_per_peer: per_peer,
        artim_timeout: Duration::from_secs(artim_s),
        max_pdu_length,
        max_buffered_mb,
        idle_timeout: Duration::from_secs(idle_timeout_s.clamp(1, 86_400)),
        non_pet,
        tls,
    }
}

/// `[series]`.
fn series_settings(u: &mut RawConfig, d: &mut Option<RawConfig>, errs: &mut Vec<ConfigError>) -> SeriesSettings {
    let quiet: f64 = pick!(u, d, series.quiet_timeout_s);
    // below a second a pause between two slices would end a series
    if !QUIET_S.contains(&quiet) {
        errs.push(invalid("series.quiet_timeout_s", format!("{quiet} is out of range"), "use seconds from 1 to 86400 (default 30)"));
    }
    let mf_quiet: f64 = pick!(u, d, series.multiframe_quiet_timeout_s);
    if !QUIET_S.contains(&mf_quiet) {
        errs.push(invalid("series.multiframe_quiet_timeout_s", format!("{mf_quiet} is out of range"), "use seconds from 1 to 86400"));
    }
    let pol: String = pick!(u, d, series.incomplete_policy);
    let incomplete_policy = match pol.as_str() {
        "process" => IncompletePolicy::Process,
        "fail" => IncompletePolicy::Fail,
        other => {
            errs.push(invalid("series.incomplete_policy", format!("{other:?} is not a policy"), "use \"process\" or \"fail\""));
            IncompletePolicy::Process
        }
    };

    // a refused value still needs a duration to build from (the error is reported)
    let seconds = |v: f64| Duration::from_secs_f64(if QUIET_S.contains(&v) { v } else { 1.0 });
    SeriesSettings { quiet_timeout: seconds(quiet), multiframe_quiet_timeout: seconds(mf_quiet), incomplete_policy }
}

/// `[restore]`.
fn restore_settings(u: &mut RawConfig, d: &mut Option<RawConfig>, errs: &mut Vec<ConfigError>) -> RestoreSettings {
    let engines: Vec<String> = pick!(u, d, restore.engines);
    if engines.is_empty() {
        errs.push(invalid("restore.engines", "the list is empty", "name at least one engine, e.g. [\"gaussian\"]"));
    }
    let engines: Vec<EngineKind> = engines
        .iter()
        .filter_map(|e| {
            let k = EngineKind::parse(e);
            if k.is_none() {
                errs.push(invalid(
                    "restore.engines",
                    format!("unknown engine {e:?}"),
                    format!("this build has: {}", EngineKind::names().join(", ")),
                ));
            }
            k
        })
        .collect();
    let fwhm: f64 = pick!(u, d, restore.gaussian_fwhm_mm);
    if !(fwhm > 0.0 && fwhm <= 30.0) {
        errs.push(invalid("restore.gaussian_fwhm_mm", format!("{fwhm} is out of range"), "use mm in (0, 30]"));
    }
    let min_fd: f64 = pick!(u, d, restore.min_frame_duration_s);
    let max_fd: f64 = pick!(u, d, restore.max_frame_duration_s);
    if !(min_fd >= 0.0 && max_fd >= min_fd) {
        errs.push(invalid(
            "restore.min_frame_duration_s",
            format!("range [{min_fd}, {max_fd}] is empty"),
            "make min_frame_duration_s <= max_frame_duration_s",
        ));
    }
    let providers: Vec<String> = pick!(u, d, restore.ort_providers);
    let parsed: Vec<Provider> = providers.iter().filter_map(|p| Provider::parse(p)).collect();
    if providers.is_empty() || parsed.len() != providers.len() {
        errs.push(invalid(
            "restore.ort_providers",
            format!("{providers:?} is not a list of known providers"),
            format!("use some of {:?}, in order of preference, e.g. [\"tensorrt\", \"cuda\", \"cpu\"]", Provider::names()),
        ));
    }
    let ort_library: String = pick!(u, d, restore.ort_library);
    // a bare file name is the loader's search; a path must be absolute
    if ort_library.contains('/')
        && let Some(e) = relative("restore.ort_library", Path::new(&ort_library))
    {
        errs.push(e);
    }
    let model: PathBuf = pick!(u, d, restore.model);
    if let Some(e) = relative("restore.model", &model) {
        errs.push(e);
    }
    let suffix: String = pick!(u, d, restore.series_description_suffix);
    if suffix.chars().count() > MAX_SUFFIX_CHARS || !suffix.chars().all(|c| (' '..='~').contains(&c) && c != '\\') {
        errs.push(invalid(
            "restore.series_description_suffix",
            format!("{suffix:?} is not {MAX_SUFFIX_CHARS} printable ASCII characters at most without a backslash"),
            "shorten it: Series Description holds 64 characters (LO), the uncertainty series adds its own label, and a \\ would split it into two values",
        ));
    }
    let offset: u32 = pick!(u, d, restore.series_number_offset);
    if !(1..=MAX_SERIES_NUMBER_OFFSET).contains(&offset) {
        errs.push(invalid(
            "restore.series_number_offset",
            format!("{offset} is outside 1..={MAX_SERIES_NUMBER_OFFSET}"),
            "use e.g. 1000: the restored series gets the source's Series Number + offset and the uncertainty series + twice the offset, \
             so 0 would reuse the source's number",
        ));
    }
    let max_voxels: u64 = pick!(u, d, restore.max_voxels);
    if !(MIN_MAX_VOXELS..=MAX_MAX_VOXELS).contains(&max_voxels) {
        errs.push(invalid(
            "restore.max_voxels",
            format!("{max_voxels} is outside {MIN_MAX_VOXELS}..={MAX_MAX_VOXELS}"),
            "use the default 96000000 (a 400x400 series of 600 slices, about 3 GB while restoring), \
             or less on a box with little memory: 20-32 bytes per voxel",
        ));
    }
    RestoreSettings {
        engines,
        model,
        gaussian_fwhm_mm: fwhm,
        min_frame_duration_s: min_fd,
        max_frame_duration_s: max_fd,
        units: {
            let units: Vec<String> = pick!(u, d, restore.units);
            if units.is_empty() {
                errs.push(invalid("restore.units", "[] would skip every series", "list the accepted Units, e.g. [\"BQML\"]"));
            }
            units
        },
        max_matrix: {
            let m: u32 = pick!(u, d, restore.max_matrix);
            if m < 32 {
                errs.push(invalid("restore.max_matrix", format!("{m} would skip every series"), "use 32 or more (default 512)"));
            }
            m
        },
        max_voxels,
        time_limit: {
            let t: f64 = pick!(u, d, restore.time_limit_s);
            if (10.0..=86400.0).contains(&t) {
                Duration::from_secs_f64(t)
            } else {
                errs.push(invalid("restore.time_limit_s", format!("{t} is out of range"), "use seconds from 10 to 86400 (default 3600)"));
                Duration::from_secs(3600)
            }
        },
        forward_original_on_failure: pick!(u, d, restore.forward_original_on_failure),
        forward_skipped: pick!(u, d, restore.forward_skipped),
        series_description_suffix: suffix,
        series_number_offset: offset,
        threads: pick!(u, d, restore.threads),
        ort_library: (!ort_library.is_empty()).then(|| PathBuf::from(ort_library)),
        ort_providers: parsed,
        tensorrt_fp16: pick!(u, d, restore.tensorrt_fp16),
        tensorrt_workspace_mb: pick!(u, d, restore.tensorrt_workspace_mb),
        assume_frame_duration_s: {
            let v: f64 = pick!(u, d, restore.assume_frame_duration_s);
            if !(0.0..=3600.0).contains(&v) {
                errs.push(invalid(
                    "restore.assume_frame_duration_s",
                    format!("{v} is not a frame duration"),
                    "use 0 (assume nothing: such series are skipped) or the seconds the scanner acquired per bed",
                ));
            }
            Some(v).filter(|v| *v > 0.0 && *v <= 3600.0)
        },
        // both end up in the derived series' text, in the source's
        // character set: printable ASCII encodes in every one
        assume_units: ascii_setting(errs, "restore.assume_units", pick!(u, d, restore.assume_units)),
        assume_tracer: ascii_setting(errs, "restore.assume_tracer", pick!(u, d, restore.assume_tracer)),
        uncertainty_site: site_calibration(errs, pick!(u, d, restore.uncertainty_site)),
    }
}

/// `restore.uncertainty_site`: `None` when empty; a file that must exist
/// (a mistyped name would silently leave the site's calibration out).
fn site_calibration(errs: &mut Vec<ConfigError>, v: String) -> Option<PathBuf> {
    const KEY: &str = "restore.uncertainty_site";
    let path = Some(PathBuf::from(v)).filter(|p| !p.as_os_str().is_empty())?;
    if let Some(e) = relative(KEY, &path) {
        errs.push(e);
    } else if !path.is_file() {
        errs.push(invalid(
            KEY,
            format!("{} is not a readable file", path.display()),
            "name the file `petrestore eval --site-uncertainty FILE` wrote, or \"\" for the model's own calibration",
        ));
    }
    Some(path)
}

/// The error for a path setting that is not absolute: the daemon runs from
/// `/` under systemd, and `petrestore status` or `jobs` run from a shell
/// would resolve it against another folder.
fn relative(key: &'static str, path: &Path) -> Option<ConfigError> {
    path.is_relative().then(|| {
        invalid(
            key,
            format!("{} is a relative path", path.display()),
            "give an absolute path (the daemon and the commands run from different folders)",
        )
    })
}

/// Whether a text may be written into derived series' text elements:
/// printable ASCII (it encodes in every character set a source may
/// declare), no backslash (a value separator), up to 64 characters.
pub fn printable_ascii(v: &str) -> bool {
    v.len() <= 64 && v.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
}

/// An optional text setting written into derived series: `None` when
/// empty; refused unless [`printable_ascii`].
fn ascii_setting(errs: &mut Vec<ConfigError>, key: &'static str, v: String) -> Option<String> {
    if !printable_ascii(&v) {
        errs.push(invalid(
            key,
            format!("{v:?} is not printable ASCII of up to 64 characters"),
            "write it in ASCII, e.g. \"Fluorodeoxyglucose\"",
        ));
    }
    Some(v).filter(|v| !v.is_empty())
}

/// `[egress]`.
/// The longest wait between two delivery attempts a config may ask for (one day).
const MAX_BACKOFF_S: f64 = 86_400.0;
/// The longest `egress.timeout_s` (one hour).
const MAX_EGRESS_TIMEOUT_S: f64 = 3_600.0;
/// The longest retention a config may ask for (ten years), beyond which it
/// means "forever" anyway and `0` says so.
const MAX_RETENTION_HOURS: f64 = 87_600.0;

fn egress_settings(u: &mut RawConfig, d: &mut Option<RawConfig>, errs: &mut Vec<ConfigError>) -> EgressSettings {
    let max_attempts: u32 = pick!(u, d, egress.max_attempts);
    if max_attempts == 0 {
        errs.push(invalid("egress.max_attempts", "0 attempts would never deliver", "set 1 or more"));
    }
    let b0: f64 = pick!(u, d, egress.backoff_initial_s);
    let bmax: f64 = pick!(u, d, egress.backoff_max_s);
    let backoff_ok = b0 > 0.0 && bmax >= b0 && bmax <= MAX_BACKOFF_S;
    if !backoff_ok {
        errs.push(invalid(
            "egress.backoff_initial_s",
            format!("backoff {b0}..{bmax} s"),
            format!("use 0 < initial <= max <= {MAX_BACKOFF_S} s (egress.backoff_max_s)"),
        ));
    }
    let timeout: f64 = pick!(u, d, egress.timeout_s);
    let timeout_ok = (1.0..=MAX_EGRESS_TIMEOUT_S).contains(&timeout);
    if !timeout_ok {
        errs.push(invalid(
            "egress.timeout_s",
            format!("{timeout} s"),
            format!("use 1 to {MAX_EGRESS_TIMEOUT_S} s: how long a destination may take to answer or to take bytes"),
        ));
    }
    let calling: String = pick!(u, d, egress.calling_ae_title);
    if !valid_ae_title(&calling) {
        errs.push(invalid("egress.calling_ae_title", format!("{calling:?} is not a valid AE title"), "use 1 to 16 characters"));
    } else if let Some(e) = edge_spaces("egress.calling_ae_title", &calling) {
        errs.push(e);
    }

    let (b0, bmax) = if backoff_ok { (b0, bmax) } else { (1.0, 1.0) };
    EgressSettings {
        max_attempts,
        backoff_initial: Duration::from_secs_f64(b0),
        backoff_max: Duration::from_secs_f64(bmax),
        timeout: Duration::from_secs_f64(if timeout_ok { timeout } else { 60.0 }),
        calling_ae_title: calling,
    }
}

/// `[[destination]]` (no defaults: none unless the file names some).
fn destinations(u: &mut RawConfig, errs: &mut Vec<ConfigError>) -> Vec<Destination> {
    let mut destinations = Vec::new();
    for (i, dst) in std::mem::take(&mut u.destination).into_iter().enumerate() {
        if dst.name.is_empty() || destinations.iter().any(|x: &Destination| x.name == dst.name) {
            errs.push(invalid(
                "destination.name",
                format!("destination #{} has an empty or repeated name {:?}", i + 1, dst.name),
                "give every [[destination]] a unique name",
            ));
        }
        if !valid_ae_title(&dst.ae_title) {
            errs.push(invalid(
                "destination.ae_title",
                format!("destination {:?}: {:?} is not a valid AE title", dst.name, dst.ae_title),
                "use 1 to 16 characters",
            ));
        } else if let Some(e) = edge_spaces("destination.ae_title", &dst.ae_title) {
            errs.push(e);
        }
        if dst.address.rsplit_once(':').and_then(|(h, p)| p.parse::<u16>().ok().filter(|p| *p != 0 && valid_host(h))).is_none() {
            errs.push(invalid(
                "destination.address",
                format!("destination {:?}: {:?} is not a host and a port", dst.name, dst.address),
                "write HOST:PORT with an IP address or a host name, e.g. \"10.1.2.3:104\" or \"pacs.example:104\" (no scheme, no spaces)",
            ));
        }
        if let Some(twin) =
            destinations.iter().find(|x: &&Destination| x.ae_title.trim() == dst.ae_title.trim() && x.address == dst.address)
        {
            errs.push(invalid(
                "destination.address",
                format!(
                    "destinations {:?} and {:?} are both {} at {}: every series would be sent there twice",
                    twin.name,
                    dst.name,
                    dst.ae_title.trim(),
                    dst.address
                ),
                "keep one [[destination]] per archive or console",
            ));
        }
        let timeout = dst.commitment_timeout_s.unwrap_or(300.0);
        if !(1.0..=86_400.0).contains(&timeout) || (dst.commitment_timeout_s.is_some() && !dst.commitment) {
            errs.push(invalid(
                "destination.commitment_timeout_s",
                format!("destination {:?}: commitment_timeout_s = {timeout} (commitment = {})", dst.name, dst.commitment),
                "use 1 to 86400 seconds, together with commitment = true",
            ));
        }
        destinations.push(Destination {
            name: dst.name,
            ae_title: dst.ae_title,
            address: dst.address,
            uncertainty: dst.uncertainty,
            commitment: dst.commitment.then(|| Duration::from_secs_f64(timeout)),
        });
    }

    destinations
}

/// An IP address (IPv6 in brackets, with or without a zone: `[fe80::1%2]`)
/// or a host name as the system's resolver takes it: labels of letters,
/// digits, '-' and '_' (names sites really use), an optional final dot.
/// What it refuses is what cannot be a host: a scheme, a space, a path.
fn valid_host(h: &str) -> bool {
    if let Some(v6) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let addr = v6.split_once('%').map_or(v6, |(a, zone)| if zone.is_empty() { "" } else { a });
        return addr.parse::<std::net::Ipv6Addr>().is_ok();
    }
    let name = h.strip_suffix('.').unwrap_or(h);
    h.parse::<std::net::Ipv4Addr>().is_ok()
        || (name.len() <= 253
            && name.split('.').all(|l| {
                (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') && !l.starts_with('-')
            }))
}

fn mqtt_settings(m: RawMqtt, device_id: &str) -> Result<MqttSettings, ConfigError> {
    let (tls, rest) = if let Some(r) = m.url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = m.url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(invalid("mqtt.url", format!("{:?} is not an MQTT URL", m.url), "write mqtt://HOST:PORT or mqtts://HOST:PORT (TLS)"));
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.trim_end_matches('/').parse::<u16>().ok()),
        None => (rest.trim_end_matches('/').to_string(), Some(if tls { 8883 } else { 1883 })),
    };
    let Some(port) = port.filter(|p| *p != 0 && !host.is_empty()) else {
        return Err(invalid("mqtt.url", format!("{:?} has no valid host and port", m.url), "write mqtt://HOST:PORT"));
    };
    let tls = match (tls, m.ca_file, m.cert_file, m.key_file) {
        (false, None, None, None) => None,
        (false, ..) => {
            return Err(invalid("mqtt.ca_file", "TLS files given for a plain mqtt:// URL", "use an mqtts:// URL or remove the TLS files"));
        }
        (true, None, ..) => {
            return Err(invalid("mqtt.ca_file", "an mqtts:// URL needs the broker's CA certificate", "set mqtt.ca_file to a PEM file"));
        }
        (true, Some(ca), Some(cert), Some(key)) => Some(MqttTls { ca_file: ca, client: Some((cert, key)) }),
        (true, Some(ca), None, None) => Some(MqttTls { ca_file: ca, client: None }),
        (true, Some(_), _, _) => {
            return Err(invalid(
                "mqtt.cert_file",
                "a client certificate needs its key and vice versa",
                "set both mqtt.cert_file and mqtt.key_file, or neither",
            ));
        }
    };
    if let Some(t) = &tls {
        for (key, f) in std::iter::once(("mqtt.ca_file", &t.ca_file))
            .chain(t.client.iter().flat_map(|(c, k)| [("mqtt.cert_file", c), ("mqtt.key_file", k)]))
        {
            if let Some(e) = relative(key, f) {
                return Err(e);
            }
            if !f.is_file() {
                return Err(invalid(key, format!("{} does not exist", f.display()), "point it at a readable PEM file"));
            }
        }
    }
    let hi = m.health_interval_s.unwrap_or(30.0);
    if !(0.1..=3600.0).contains(&hi) {
        return Err(invalid("mqtt.health_interval_s", format!("{hi} is out of range"), "use seconds in [0.1, 3600]"));
    }
    let keep_alive_s = m.keep_alive_s.unwrap_or(15);
    if !(5..=3600).contains(&keep_alive_s) {
        return Err(invalid("mqtt.keep_alive_s", format!("{keep_alive_s} is out of range"), "use seconds from 5 to 3600 (default 15)"));
    }
    let buffer = m.buffer.unwrap_or(1000);
    if buffer == 0 {
        return Err(invalid("mqtt.buffer", "0 would drop every event while the broker is away", "set 1 or more (default 1000)"));
    }
    Ok(MqttSettings {
        host,
        port,
        tls,
        client_id: m.client_id.unwrap_or_else(|| device_id.to_string()),
        health_interval: Duration::from_secs_f64(hi),
        buffer,
        include_uids: m.include_uids.unwrap_or(false),
        keep_alive: Duration::from_secs(keep_alive_s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_knows_every_section_and_refuses_restart_only_keys() {
        let base = Settings::defaults();
        // every section of the settings is declared in RELOADABLE
        let v = serde_json::to_value(&base).unwrap();
        for k in v.as_object().unwrap().keys() {
            assert!(RELOADABLE.iter().any(|(s, _)| s == k), "section {k} is missing from RELOADABLE");
        }
        let with = |toml: &str| Settings::from_toml(toml, "t").unwrap();
        assert_eq!(differences(&base, &base), (vec![], vec![]));
        let (restart, changed) = differences(&base, &with("[dicom]\nallowed_callers = [\"CONSOLE\", \"WS\"]\n"));
        assert_eq!((restart.len(), changed), (0, vec!["dicom"]));
        let (restart, _) = differences(&base, &with("[dicom]\nlisten = \"127.0.0.1:1\"\nartim_timeout_s = 3\n"));
        assert_eq!(restart, ["dicom.artim_timeout_s", "dicom.listen"]);
        let (restart, changed) = differences(&base, &with("[restore]\nmax_matrix = 128\n[series]\nquiet_timeout_s = 5\n"));
        assert_eq!((restart.len(), changed), (0, vec!["series", "restore"]));
        let (restart, _) = differences(&base, &with("[restore]\nmodel = \"/elsewhere\"\n[node]\ndevice_id = \"x\"\n"));
        assert_eq!(restart, ["node.device_id", "restore.model"]);
        let (restart, _) = differences(&base, &with("[mqtt]\nurl = \"mqtt://127.0.0.1:1884\"\n"));
        assert_eq!(restart, ["mqtt"]);
        let (restart, changed) =
            differences(&base, &with("[[destination]]\nname = \"pacs\"\nae_title = \"PACS\"\naddress = \"127.0.0.1:104\"\n"));
        assert_eq!((restart.len(), changed), (0, vec!["destination"]));
    }

    #[test]
    fn mqtt_section_is_validated() {
        let s = Settings::from_toml("[mqtt]\nurl = \"mqtt://127.0.0.1:1884\"\n", "t").unwrap();
        let m = s.mqtt.unwrap();
        assert_eq!((m.host.as_str(), m.port, m.tls.is_none()), ("127.0.0.1", 1884, true));
        assert_eq!(m.client_id, "petrestore-01");
        assert!(Settings::defaults().mqtt.is_none(), "absent section = telemetry off");
        let e = Settings::from_toml("[mqtt]\nurl = \"http://x\"\n", "t").unwrap_err().to_string();
        assert!(e.contains("mqtt.url"), "{e}");
        let e = Settings::from_toml("[mqtt]\nurl = \"mqtts://broker:8883\"\n", "t").unwrap_err().to_string();
        assert!(e.contains("mqtt.ca_file"), "{e}");
    }

    #[test]
    fn annotated_default_parses() {
        let s = Settings::defaults();
        assert_eq!(s.dicom.ae_title, "PETRESTORE");
        assert_eq!(s.dicom.listen.port(), 11112);
        assert_eq!(s.restore.engines, EngineKind::ALL);
        assert_eq!(s.restore.ort_providers, Provider::ALL);
        assert_eq!(s.restore.model, std::path::Path::new(DEFAULT_MODEL_DIR), "the path the package installs to");
        assert!(s.destinations.is_empty());
        // a failed job was never delivered: its received instances stay until
        // the operator re-sends it, unless the site sets a retention for them
        assert_eq!(s.node.failed_retention, None);
        assert_eq!(s.node.retention, Some(Duration::from_secs(168 * 3600)));
    }

    #[test]
    fn storage_commitment_is_per_destination() {
        let d = "[[destination]]\nname = \"a\"\nae_title = \"A\"\naddress = \"10.0.0.1:104\"\n";
        let s = Settings::from_toml(&format!("{d}commitment = true\n"), "t").unwrap();
        assert_eq!(s.destinations[0].commitment, Some(Duration::from_secs(300)));
        let s = Settings::from_toml(&format!("{d}commitment = true\ncommitment_timeout_s = 30\n"), "t").unwrap();
        assert_eq!(s.destinations[0].commitment, Some(Duration::from_secs(30)));
        assert_eq!(Settings::from_toml(d, "t").unwrap().destinations[0].commitment, None);
        let e = Settings::from_toml(&format!("{d}commitment_timeout_s = 30\n"), "t").unwrap_err().to_string();
        assert!(e.contains("commitment_timeout_s") && e.contains("commitment = true"), "{e}");
        let e = Settings::from_toml(&format!("{d}commitment = true\ncommitment_timeout_s = 0\n"), "t").unwrap_err().to_string();
        assert!(e.contains("1 to 86400"), "{e}");
    }

    #[test]
    fn missing_keys_take_defaults() {
        let s = Settings::from_toml("[dicom]\nae_title = \"X\"\n", "t").unwrap();
        assert_eq!(s.dicom.ae_title, "X");
        assert_eq!(s.dicom.max_associations, 8);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Settings::from_toml("[dicom]\nae_titel = \"X\"\n", "t").unwrap_err().to_string();
        assert!(e.contains("ae_titel"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_fix() {
        let e = Settings::from_toml("[dicom]\nlisten = \"nowhere\"\n", "t").unwrap_err().to_string();
        assert!(e.contains("dicom.listen") && e.contains("IP:PORT"), "{e}");
        let e = Settings::from_toml("[restore]\nengines = [\"magic\"]\n", "t").unwrap_err().to_string();
        assert!(e.contains("restore.engines") && e.contains("tract"), "{e}");
        let e = Settings::from_toml("[restore]\nort_providers = [\"opencl\"]\n", "t").unwrap_err().to_string();
        assert!(e.contains("restore.ort_providers") && e.contains("tensorrt"), "{e}");
        let e = Settings::from_toml("[dicom]\nallowed_callers = [\"A@host\"]\n", "t").unwrap_err().to_string();
        assert!(e.contains("allowed_callers"), "{e}");
        // values too large for a duration are refused, not a panic
        let e = Settings::from_toml("[node]\nfailed_retention_hours = 1e20\n", "t").unwrap_err().to_string();
        assert!(e.contains("node.failed_retention_hours") && e.contains("ten years"), "{e}");
        let e = Settings::from_toml("[egress]\nbackoff_max_s = inf\n", "t").unwrap_err().to_string();
        assert!(e.contains("egress.backoff_initial_s") && e.contains("86400"), "{e}");
        let e = Settings::from_toml("[egress]\nbackoff_max_s = 1e20\n", "t").unwrap_err().to_string();
        assert!(e.contains("egress.backoff_initial_s"), "{e}");
        let bad_values: [(&str, &str); 40] = [
            ("[node]\nstate_dir = \"petrestore-state\"\n", "node.state_dir"),
            ("[dicom.tls]\nlisten = \"0.0.0.0:2762\"\ncert = \"tls/node.pem\"\nkey = \"/k.pem\"\n", "tls/node.pem is a relative path"),
            ("[mqtt]\nurl = \"mqtts://127.0.0.1:8883\"\nca_file = \"ca.pem\"\n", "ca.pem is a relative path"),
            ("[restore]\nuncertainty_site = \"site.toml\"\n", "site.toml is a relative path"),
            ("[restore]\nmodel = \"models/petrestore-unet25d\"\n", "models/petrestore-unet25d is a relative path"),
            ("[restore]\nort_library = \"lib/libonnxruntime.so\"\n", "lib/libonnxruntime.so is a relative path"),
            ("[restore]\nuncertainty_site = \"/nonexistent/site-sigma.tom\"\n", "--site-uncertainty"),
            ("[[destination]]\nname = \"a\"\nae_title = \"A\"\naddress = \"dicom://10.0.0.1:104\"\n", "destination.address"),
            ("[[destination]]\nname = \"a\"\nae_title = \"A\"\naddress = \"10.0.0.1 :104\"\n", "destination.address"),
            (
                "[[destination]]\nname = \"a\"\nae_title = \"A\"\naddress = \"10.0.0.1:104\"\n\
                 [[destination]]\nname = \"b\"\nae_title = \"A\"\naddress = \"10.0.0.1:104\"\n",
                "sent there twice",
            ),
            ("[restore]\nmax_voxels = 0\n", "restore.max_voxels"),
            ("[restore]\ntime_limit_s = 5\n", "restore.time_limit_s"),
            ("[restore]\nmax_voxels = 5000000000\n", "restore.max_voxels"),
            ("[restore]\nseries_number_offset = 0\n", "restore.series_number_offset"),
            ("[restore]\nseries_number_offset = 60000\n", "restore.series_number_offset"),
            ("[restore]\nseries_description_suffix = \" a\\\\b\"\n", "restore.series_description_suffix"),
            (
                "[restore]\nseries_description_suffix = \" [a very long label of a site that will not fit]\"\n",
                "restore.series_description_suffix",
            ),
            ("[dicom]\nlisten = \"0.0.0.0:0\"\n", "dicom.listen"),
            ("[dicom]\nidle_timeout_s = 0\n", "dicom.idle_timeout_s"),
            ("[dicom]\nallowed_callers = [\"CONSOLE \"]\n", "write \"CONSOLE\""),
            ("[restore]\nassume_frame_duration_s = -30\n", "restore.assume_frame_duration_s"),
            ("[node]\nstate_dir = \"\"\n", "node.state_dir"),
            ("[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nkeep_alive_s = 2\n", "mqtt.keep_alive_s"),
            ("[mqtt]\nurl = \"mqtt://127.0.0.1:0\"\n", "mqtt.url"),
            ("[[destination]]\nname = \"a\"\nae_title = \"A\"\naddress = \"10.0.0.1:0\"\n", "destination.address"),
            ("[[destination]]\nname = \"a\"\nae_title = \"A\"\naddress = \":104\"\n", "destination.address"),
            ("[[destination]]\nname = \"a\"\nae_title = \"PACS \"\naddress = \"10.0.0.1:104\"\n", "write \"PACS\""),
            ("[egress]\ncalling_ae_title = \" PETRESTORE\"\n", "egress.calling_ae_title"),
            ("[dicom]\nae_title = \"NODE \"\n", "dicom.ae_title"),
            ("[[destination]]\nname = \"me\"\nae_title = \"PETRESTORE\"\naddress = \"127.0.0.1:11112\"\n", "this node itself"),
            ("[dicom.tls]\nlisten = \"0.0.0.0:0\"\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n", "dicom.tls.cert"),
            ("[dicom.tls]\nlisten = \"0.0.0.0:0\"\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n", "dicom.tls.key"),
            ("[dicom.tls]\nlisten = \"0.0.0.0:0\"\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n", "has port 0"),
            (
                "[dicom.tls]\nlisten = \"127.0.0.1:11112\"\ncert = \"/etc/hostname\"\nkey = \"/etc/hostname\"\n",
                "takes the port of dicom.listen",
            ),
            ("[series]\nquiet_timeout_s = 0.001\n", "series.quiet_timeout_s"),
            ("[series]\nmultiframe_quiet_timeout_s = 0.5\n", "series.multiframe_quiet_timeout_s"),
            ("[dicom]\nmax_associations = 4611686018427387904\n", "dicom.max_associations"),
            ("[restore]\nunits = []\n", "restore.units"),
            ("[restore]\nmax_matrix = 0\n", "restore.max_matrix"),
            ("[restore]\nassume_tracer = \"FDG – fluorodeoxyglucose\"\n", "restore.assume_tracer"),
        ];
        for (toml, named) in bad_values {
            let e = Settings::from_toml(toml, "t").unwrap_err().to_string();
            assert!(e.contains(named), "{toml}: {e}");
        }
        for bad in ["-1", "nan", "1e300"] {
            let e = Settings::from_toml(&format!("[series]\nquiet_timeout_s = {bad}\n"), "t").unwrap_err().to_string();
            assert!(e.contains("series.quiet_timeout_s"), "{bad}: {e}");
        }
        // the documented range's ends are in it, and mean what they say
        for key in ["quiet_timeout_s", "multiframe_quiet_timeout_s"] {
            for ok in [1, 86400] {
                let s = Settings::from_toml(&format!("[series]\n{key} = {ok}\n"), "t").unwrap_or_else(|e| panic!("{key} = {ok}: {e}"));
                let got = if key == "quiet_timeout_s" { s.series.quiet_timeout } else { s.series.multiframe_quiet_timeout };
                assert_eq!(got, Duration::from_secs(ok), "{key} = {ok}");
            }
        }
    }

    #[test]
    fn destination_addresses_take_ip_addresses_and_host_names() {
        for ok in [
            "10.1.2.3:104",
            "[::1]:104",
            "[fe80::1%2]:104",
            "pacs:104",
            "pacs-2.radiology.example:11112",
            "pacs_01.local:104",
            "pacs.example.:104",
        ] {
            let toml = format!("[[destination]]\nname = \"a\"\nae_title = \"A\"\naddress = \"{ok}\"\n");
            Settings::from_toml(&toml, "t").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in
            ["-pacs:104", "pa cs:104", "[10.1.2.3]:104", "pacs..x:104", "::1:104", "dicom://pacs:104", "pacs/x:104", "[fe80::1%]:104"]
        {
            assert!(!valid_host(bad.rsplit_once(':').unwrap().0), "{bad}");
        }
    }

    #[test]
    fn caller_with_host() {
        let s = Settings::from_toml("[dicom]\nallowed_callers = [\"CONSOLE@127.0.0.1\", \"WS\"]\n", "t").unwrap();
        assert_eq!(s.dicom.allowed_callers[0].host, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(s.dicom.allowed_callers[1].host, None);
    }
}
