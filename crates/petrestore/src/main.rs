//! The `petrestore` command line. Each subcommand parses its arguments,
//! loads the configuration and calls into the library; errors are printed
//! for people (what was wrong, where, what to do) with a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use petrestore::config::{DEFAULT_CONFIG, Settings};
#[cfg(feature = "demo")]
use petrestore::demo;
use petrestore::{app, control, eval, journal, pipeline, restore};

#[derive(Parser)]
#[command(name = "petrestore", version, about = "Restore short-frame PET series so they read and quantify like 90 s acquisitions")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (DICOM SCP, journal, worker, egress).
    Serve {
        /// Configuration file; the built-in defaults when omitted.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Restore one series folder offline, with the same code as the daemon.
    Restore {
        /// The series folder to restore (one series, any file names).
        #[arg(long)]
        input: PathBuf,
        /// A new or empty folder for the derived series.
        #[arg(long)]
        output: PathBuf,
        /// Engine to use (overrides restore.engines).
        #[arg(long)]
        engine: Option<String>,
        /// Model package folder (overrides restore.model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Frame duration in seconds, for a series without Actual Frame
        /// Duration (0018,1242); stated in the output's Derivation Description.
        #[arg(long)]
        frame_duration: Option<f64>,
        /// Units (e.g. BQML), for a series without Units (0054,1001).
        #[arg(long)]
        units: Option<String>,
        /// Tracer (e.g. Fluorodeoxyglucose), for a series without
        /// Radiopharmaceutical (0018,0031); checked against the model's tracers.
        #[arg(long)]
        tracer: Option<String>,
        /// libonnxruntime.so for --engine ort (overrides restore.ort_library
        /// and ORT_DYLIB_PATH).
        #[arg(long)]
        ort_library: Option<PathBuf>,
        /// Also write the uncertainty series (per voxel 1 SD of the
        /// difference to a 90 s acquisition) into OUTPUT/uncertainty; needs
        /// a model package with an [uncertainty] calibration.
        #[arg(long)]
        uncertainty: bool,
        /// Configuration file; the built-in defaults when omitted.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// What the running daemon is doing: engines and providers in use (and why
    /// others are not), active jobs per state.
    Status {
        /// Configuration file (default: $PETRESTORE_CONFIG, else
        /// /etc/petrestore/petrestore.toml when present, else the built-in
        /// defaults, these two only without --state-dir, which overrides
        /// node.state_dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (instead of reading it from the configuration).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The whole loop on loopback, no setup: a simulated patient's 30 s
    /// series sent to a daemon, restored with the shipped model, measured
    /// against the 90 s reference and the truth (table and pictures).
    #[cfg(feature = "demo")]
    Demo {
        /// Where the study, the restored series and the pictures go (default
        /// demo-out; a folder of an earlier demo run is emptied first).
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Slices of the simulated slab.
        #[arg(long, default_value_t = 40)]
        slices: usize,
        /// Matrix, at least 80 (128: 600 mm across at 4.69 mm pixels; 80:
        /// 400 mm at 5 mm; larger ones go no finer than 2 mm).
        #[arg(long, default_value_t = 128)]
        matrix: usize,
        /// ort, tract or gaussian (default: ort when its library is found, else tract).
        #[arg(long)]
        engine: Option<String>,
        /// Model package (default: the installed one, else the source tree's).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Site acceptance on paired series: restore a short-frame series and
    /// compare it with the standard-frame series it is nested in (seed
    /// metric vs the reference with its ceiling, body mean agreement), side
    /// by side with the raw input and the Gaussian baseline.
    Eval(SiteEvalArgs),
    /// Journal maintenance (with the daemon stopped).
    Journal {
        /// Configuration file (default: $PETRESTORE_CONFIG, else
        /// /etc/petrestore/petrestore.toml when present, else the built-in
        /// defaults, these two only without --state-dir, which overrides
        /// node.state_dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (instead of reading it from the configuration).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(subcommand)]
        action: JournalAction,
    },
    /// Make the running daemon read its configuration file again and say
    /// what changed, or why nothing was applied (non-zero exit): what
    /// `systemctl reload petrestore` runs.
    Reload {
        /// Configuration file, to find the daemon (its node.state_dir):
        /// it must be the file the daemon reads, which a reload cannot
        /// switch (default: $PETRESTORE_CONFIG, else
        /// /etc/petrestore/petrestore.toml when present, else the built-in
        /// defaults, these two only without --state-dir, which overrides
        /// node.state_dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (instead of reading it from the configuration).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Validate a configuration file.
    CheckConfig { file: PathBuf },
    /// Print the annotated default configuration.
    PrintDefaultConfig,
    /// Read and steer the job journal (works while the daemon runs).
    Jobs {
        /// Configuration file (default: $PETRESTORE_CONFIG, else
        /// /etc/petrestore/petrestore.toml when present, else the built-in
        /// defaults, these two only without --state-dir, which overrides
        /// node.state_dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (instead of reading it from --config).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(subcommand)]
        action: JobsAction,
    },
}

#[derive(Subcommand)]
enum JournalAction {
    /// Move the journal aside and rebuild it from the spool (the received
    /// instances): a PET series with all its slices comes back queued, the
    /// others receiving; the next start puts finished jobs back from the
    /// outcome log. Refused while any process holds the journal open.
    Rebuild,
}

#[derive(Subcommand)]
enum JobsAction {
    /// One line per job, most recent first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything the journal knows about one job (JSON).
    Show { id: String },
    /// Process a finished (failed, skipped or done) job again.
    Retry { id: String },
}

fn load_settings(config: Option<&PathBuf>) -> Result<Settings> {
    Ok(match config {
        Some(p) => Settings::load(p)?,
        None => Settings::defaults(),
    })
}

/// The configuration file the installed daemon runs with (its unit's
/// `--config`).
const INSTALLED_CONFIG: &str = "/etc/petrestore/petrestore.toml";

/// Settings for the commands that act on a daemon's state (`status`,
/// `jobs`, `journal`): `--config`; else, without `--state-dir`,
/// `$PETRESTORE_CONFIG` or the installed daemon's file when there is one,
/// so they find the daemon's own `node.state_dir`; else the defaults.
/// Returns the settings and the state folder: `--state-dir`, else the
/// settings' `node.state_dir`.
fn operator_settings(config: Option<&PathBuf>, state_dir: Option<PathBuf>) -> Result<(Settings, PathBuf)> {
    let settings = operator_settings_file(config, state_dir.is_some())?;
    let state_dir = state_dir.unwrap_or_else(|| settings.node.state_dir.clone());
    Ok((settings, state_dir))
}

fn operator_settings_file(config: Option<&PathBuf>, state_dir_given: bool) -> Result<Settings> {
    if config.is_some() || state_dir_given {
        return load_settings(config);
    }
    let file = std::env::var_os("PETRESTORE_CONFIG").map(PathBuf::from).or_else(|| {
        let p = PathBuf::from(INSTALLED_CONFIG);
        p.is_file().then_some(p)
    });
    load_settings(file.as_ref()).with_context(|| {
        format!(
            "{} (read because neither --config nor --state-dir was given): fix it, or reach the state without it: \
             --state-dir DIR",
            file.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
        )
    })
}

/// `default` is the filter when RUST_LOG is not set.
fn init_logging(default: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Under systemd (stderr is the journal stream) log native journal
    // entries with structured fields; otherwise text on stderr.
    let journald = petrestore::logging::stderr_is_journal().then(petrestore::logging::Journald::connect).and_then(Result::ok);
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(j) => registry.with(j).init(),
        // colour only for a person at a terminal, not in files and pipes
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}

fn print_jobs_table(jobs: &[journal::Job]) {
    println!("{:<16}  {:<11}  {:>5}  {:<11}  {:<20}  detail", "JOB", "STATE", "N", "KIND", "ENGINE");
    for j in jobs {
        let detail = match &j.state {
            journal::JobState::Failed { reason } | journal::JobState::Skipped { reason } => reason.clone(),
            _ => j.history.last().map(|e| e.what.clone()).unwrap_or_default(),
        };
        let n = match j.expected_slices {
            Some(e) => format!("{}/{e}", j.received),
            None => j.received.to_string(),
        };
        println!(
            "{:<16}  {:<11}  {:>5}  {:<11}  {:<20}  {}",
            j.id,
            j.state.name(),
            n,
            format!("{:?}", j.kind).to_lowercase(),
            j.model_id.clone().unwrap_or_else(|| "-".into()),
            detail
        );
    }
}

async fn jobs(config: Option<PathBuf>, state_dir: Option<PathBuf>, action: JobsAction) -> Result<()> {
    let (settings, state_dir) = operator_settings(config.as_ref(), state_dir)?;
    let req = match &action {
        JobsAction::List { .. } => control::Request::List,
        JobsAction::Show { id } => control::Request::Show { id: id.clone() },
        JobsAction::Retry { id } => control::Request::Retry { id: id.clone() },
    };
    let jobs = match control::request(&state_dir, &req).await.map_err(anyhow::Error::msg)? {
        Some(r) if r.ok => r.jobs,
        Some(r) => bail!("{}", r.error.unwrap_or_default()),
        None => {
            // No daemon: read the journal directly (sled's lock keeps us
            // from doing so while one runs).
            ensure_state_dir_owner(&state_dir, "jobs")?;
            // a folder no daemon ever used: say so rather than create an
            // empty journal there and list nothing
            if !state_dir.join("journal").is_dir() {
                bail!(
                    "no daemon is running on {} and no journal is there: a daemon keeps its journal in the node.state_dir \
                     of its configuration; pass it with --config FILE (default {INSTALLED_CONFIG}) or --state-dir DIR",
                    state_dir.display()
                );
            }
            let mut s = settings.clone();
            s.node.state_dir = state_dir.clone();
            let j = app::open_journal(&s)?;
            match &req {
                control::Request::List | control::Request::Status | control::Request::Reload { .. } => j.all_jobs()?,
                control::Request::Show { id } => {
                    vec![j.get(id)?.with_context(|| format!("no job {id}; `petrestore jobs list` shows the known jobs"))?]
                }
                control::Request::Retry { id } => {
                    let dests: Vec<String> = s.destinations.iter().map(|d| d.name.clone()).collect();
                    let job = pipeline::retry_job(&j, &dests, id).map_err(anyhow::Error::msg)?;
                    eprintln!("the daemon is not running: job {id} will run at its next start");
                    vec![job]
                }
            }
        }
    };
    match action {
        JobsAction::List { json: false } | JobsAction::Retry { .. } => print_jobs_table(&jobs),
        JobsAction::List { json: true } => println!("{}", serde_json::to_string_pretty(&jobs)?),
        JobsAction::Show { .. } => println!("{}", serde_json::to_string_pretty(&jobs[0])?),
    }
    Ok(())
}

async fn status(config: Option<PathBuf>, state_dir: Option<PathBuf>) -> Result<()> {
    let (_, state_dir) = operator_settings(config.as_ref(), state_dir)?;
    match control::request(&state_dir, &control::Request::Status).await.map_err(anyhow::Error::msg)? {
        Some(r) if r.ok => {
            println!("{}", serde_json::to_string_pretty(&r.status)?);
            Ok(())
        }
        Some(r) => bail!("{}", r.error.unwrap_or_default()),
        None => bail!(
            "no daemon is running on {} (no control socket): start it (systemctl start petrestore, or `petrestore serve`); \
             a daemon with another node.state_dir is found with --config FILE or --state-dir DIR",
            state_dir.display()
        ),
    }
}

async fn reload(config: Option<PathBuf>, state_dir: Option<PathBuf>) -> Result<()> {
    let (_, state_dir) = operator_settings(config.as_ref(), state_dir)?;
    // the daemon refuses a file other than its own: it cannot switch files
    let config = config.map(|c| std::path::absolute(&c).unwrap_or(c));
    match control::request(&state_dir, &control::Request::Reload { config }).await.map_err(anyhow::Error::msg)? {
        Some(r) if r.ok && r.changed.is_empty() => println!("configuration read again: nothing changed"),
        Some(r) if r.ok => println!("configuration reloaded; changed: {}", r.changed.join(", ")),
        Some(r) => bail!("the daemon kept its configuration: {}", r.error.unwrap_or_default()),
        None => bail!("no daemon is running on {} (no control socket): nothing to reload", state_dir.display()),
    }
    Ok(())
}

struct RestoreArgs {
    input: PathBuf,
    output: PathBuf,
    engine: Option<String>,
    model: Option<PathBuf>,
    frame_duration: Option<f64>,
    units: Option<String>,
    tracer: Option<String>,
    ort_library: Option<PathBuf>,
    uncertainty: bool,
    config: Option<PathBuf>,
}

fn offline_restore(a: RestoreArgs) -> Result<()> {
    let RestoreArgs { input, output, engine, model, frame_duration, units, tracer, ort_library, uncertainty, config } = a;
    let mut settings = load_settings(config.as_ref())?;
    if let Some(fd) = frame_duration {
        if !(fd > 0.0 && fd < 3600.0) {
            bail!("--frame-duration {fd}: give the frame duration in seconds, e.g. 30");
        }
        settings.restore.assume_frame_duration_s = Some(fd);
    }
    // written into the derived series as the config's assume_units and
    // assume_tracer are, so checked as they are; "" assumes nothing
    for (flag, v, slot) in
        [("--units", units, &mut settings.restore.assume_units), ("--tracer", tracer, &mut settings.restore.assume_tracer)]
    {
        if let Some(v) = v {
            if !petrestore::config::printable_ascii(&v) {
                bail!("{flag} {v:?}: write it in printable ASCII, up to 64 characters and no backslash, e.g. BQML or Fluorodeoxyglucose");
            }
            *slot = Some(v).filter(|v| !v.is_empty());
        }
    }
    if let Some(m) = model {
        settings.restore.model = m;
    }
    if let Some(l) = ort_library {
        if !l.is_file() {
            bail!("--ort-library {}: no such file (libonnxruntime.so, e.g. from the onnxruntime Python wheel)", l.display());
        }
        settings.restore.ort_library = Some(l);
    }
    if let Some(e) = engine {
        let Some(k) = petrestore::config::EngineKind::parse(&e) else {
            bail!("unknown engine {e:?}: this build has {}", petrestore::config::EngineKind::names().join(", "));
        };
        settings.restore.engines = vec![k];
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&input)
        .with_context(|| format!("cannot read --input {}", input.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("--input {} holds no files: point it at one series folder", input.display());
    }
    let engines = restore::engines_from_settings(&settings).map_err(anyhow::Error::msg)?;
    for r in engines.reports.iter().filter(|r| !r.ok) {
        eprintln!("petrestore: engine {} unavailable: {}", r.engine, r.detail);
    }
    let restored = pipeline::worker::restore_paths_with(&settings, &engines.engines, &paths, uncertainty, false)?;
    if uncertainty && restored.uncertainty.is_none() {
        bail!(
            "--uncertainty: engine {} ({}) has no uncertainty calibration: use a model package with an [uncertainty] table (petlab calibrate)",
            restored.engine,
            restored.model_id
        );
    }
    if output.exists() && std::fs::read_dir(&output)?.next().is_some() {
        bail!("--output {} is not empty: choose an empty or new folder", output.display());
    }
    for f in &restored.fallbacks {
        eprintln!("petrestore: engine fallback: {f}");
    }
    for a in &restored.assumed {
        eprintln!("petrestore: {a}");
    }
    let (engine, model, slices) = (restored.engine.clone(), restored.model_id.clone(), restored.slices);
    let (summary, sigma) = match restored.uncertainty {
        Some(u) => (Some(u.summary), u.instances),
        None => (None, Vec::new()),
    };
    let (n, ns) = pipeline::worker::write_outputs(&output, restored.instances, sigma, 0)?;
    println!("restored {} with {engine} ({model}) into {}", pipeline::worker::slice_count(slices, n as usize), output.display());
    if let Some(sum) = summary {
        println!("{sum}");
    }
    if ns > 0 {
        println!("uncertainty series ({ns} instances, not for diagnosis) in {}", output.join(pipeline::worker::UNCERTAINTY_DIR).display());
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let rt = || tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime");
    match cli.command {
        Command::Serve { config } => {
            let settings = load_settings(config.as_ref())?;
            ensure_state_dir_owner(&settings.node.state_dir, "serve")?;
            let rt = rt()?;
            let r = rt.block_on(app::serve(settings));
            // Dropping the runtime would wait for a restoration still running
            // on the blocking pool (it cannot be interrupted) past systemd's
            // stop timeout; its job is back in the queue (app::Daemon::stop).
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            r
        }
        Command::Restore { input, output, engine, model, frame_duration, units, tracer, ort_library, uncertainty, config } => {
            offline_restore(RestoreArgs { input, output, engine, model, frame_duration, units, tracer, ort_library, uncertainty, config })
        }
        Command::Status { config, state_dir } => rt()?.block_on(status(config, state_dir)),
        Command::Reload { config, state_dir } => rt()?.block_on(reload(config, state_dir)),
        #[cfg(feature = "demo")]
        Command::Demo { workdir, slices, matrix, engine, model } => {
            if !(8..=400).contains(&slices) || !(32..=400).contains(&matrix) {
                bail!("--slices must be 8..=400 and --matrix 32..=400");
            }
            rt()?.block_on(demo::run(demo::DemoOptions { workdir, slices, matrix, engine, model }))
        }
        Command::Eval(a) => site_eval(a),
        Command::CheckConfig { file } => check_config(&file),
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Jobs { config, state_dir, action } => rt()?.block_on(jobs(config, state_dir, action)),
        Command::Journal { config, state_dir, action: JournalAction::Rebuild } => journal_rebuild(config, state_dir),
    }
}

/// `petrestore eval`'s arguments.
#[derive(clap::Args)]
struct SiteEvalArgs {
    /// The short-frame series folder (e.g. 30 s rebinned from list mode).
    #[arg(long)]
    input: PathBuf,
    /// The standard-frame series it is nested in (same grid).
    #[arg(long)]
    reference: PathBuf,
    /// Gaussian FWHM (mm) for the baseline row (default: restore.gaussian_fwhm_mm).
    #[arg(long)]
    gaussian_fwhm: Option<f64>,
    /// Model package to evaluate (none: baselines only).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Engine for the model: tract or ort.
    #[arg(long, default_value = "tract")]
    engine: String,
    /// libonnxruntime.so for --engine ort (default: ORT_DYLIB_PATH).
    #[arg(long)]
    ort_library: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the report's Markdown here too.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Engine threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write pictures here: coronal MIP and the hottest axial slice,
    /// input | Gaussian | model | reference on one scale.
    #[arg(long)]
    figures: Option<PathBuf>,
    /// Add this pair to the site's σ calibration file (created if
    /// absent; --reference must be the 90 s frame, --model a package
    /// with [uncertainty]); name the file in restore.uncertainty_site.
    #[arg(long, requires = "model")]
    site_uncertainty: Option<PathBuf>,
}

/// `petrestore eval`: site acceptance on a short and a standard series.
fn site_eval(a: SiteEvalArgs) -> Result<()> {
    let SiteEvalArgs { input, reference, gaussian_fwhm, model, engine, ort_library, json, markdown, threads, figures, site_uncertainty } =
        a;
    let engine = match model {
        None => None,
        Some(dir) => Some(eval::engine(&dir, &engine, ort_library, threads)?),
    };
    let fwhm = gaussian_fwhm.unwrap_or_else(|| Settings::defaults().restore.gaussian_fwhm_mm);
    let report = eval::run_series_with_figures(&input, &reference, engine, fwhm, figures.as_deref(), site_uncertainty.as_deref())
        .map_err(anyhow::Error::msg)?;
    let md = eval::series_markdown(&report);
    println!("{md}");
    if let Some(p) = json {
        std::fs::write(&p, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(p) = markdown {
        std::fs::write(&p, &md).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

/// `petrestore check-config FILE`: the file, the model package and the
/// engines the daemon would run, without starting anything.
fn check_config(file: &std::path::Path) -> Result<()> {
    // every problem of the file at once (ConfigError::Many)
    let s = Settings::load(file)?;
    // The model package and the ONNX Runtime library are part of the
    // configuration: check what the daemon would load, without
    // building a session (a TensorRT build can take minutes).
    let mut problems: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    use petrestore::config::EngineKind;
    let neural: Vec<&EngineKind> = s.restore.engines.iter().filter(|e| e.needs_model()).collect();
    let mut model = None;
    if !neural.is_empty() {
        if !s.restore.model.join("model.toml").is_file() {
            if s.restore.model == std::path::Path::new(petrestore::config::DEFAULT_MODEL_DIR) {
                notes.push(format!(
                    "no model package installed at {}: only the engines without a model ({}) would run",
                    s.restore.model.display(),
                    s.restore.engines.iter().filter(|e| !e.needs_model()).map(|e| e.name()).collect::<Vec<_>>().join(", ")
                ));
            } else {
                problems.push(format!(
                    "restore.model {} holds no model.toml: point it at a model package folder (model.toml + model.onnx)",
                    s.restore.model.display()
                ));
            }
        } else {
            match restore::model::ModelPackage::load(&s.restore.model) {
                Ok(p) => model = Some(p),
                Err(e) => problems.push(format!("restore.model: {e}")),
            }
        }
    }
    let mut runnable: Vec<String> = Vec::new();
    for e in &s.restore.engines {
        match e {
            EngineKind::Ort if model.is_some() => {
                let lib = restore::ort_engine::library_path(s.restore.ort_library.as_deref());
                match restore::ort_engine::check_library(&lib) {
                    Ok(()) => runnable.push(format!("ort ({})", restore::ort_engine::loaded_library().unwrap_or(lib).display())),
                    Err(err) => notes.push(format!("engine ort cannot run here: {err}; the daemon would use the next model engine")),
                }
            }
            // parsed as the daemon parses it (outputs found by name), not run
            EngineKind::Tract if let Some(p) = &model => match restore::tract_engine::TractEngine::new(p.clone(), 1) {
                Ok(_) => runnable.push("tract".into()),
                Err(err) => notes.push(format!("engine tract cannot run here: {err}")),
            },
            EngineKind::Gaussian => runnable.push(format!("gaussian ({} mm)", s.restore.gaussian_fwhm_mm)),
            _ => {}
        }
    }
    if runnable.is_empty() && problems.is_empty() {
        problems.push("no configured engine could run: check restore.engines, restore.model and restore.ort_library".into());
    } else if model.is_some() && problems.is_empty() && !runnable.iter().any(|r| !r.starts_with("gaussian")) {
        problems.push(
            "the model package loads, but no engine here can run it (see the notes): the Gaussian does not stand in for \
             the model; fix the engine, or set restore.engines = [\"gaussian\"] to run the Gaussian alone on purpose"
                .into(),
        );
    }
    if let Some(m) = &s.mqtt {
        if s.node.device_id == Settings::defaults().node.device_id {
            notes.push(format!(
                "node.device_id is the shipped default ({}): give every box its own; it names the box's MQTT topics and \
                 client id, and two boxes with one id take each other's broker connection in turn",
                s.node.device_id
            ));
        }
        if let Some(Err(e)) = m.tls.as_ref().map(petrestore::telemetry::mqtt::tls_files) {
            problems.push(e);
        }
    }
    // the certificate and key as the listener loads them: the daemon would
    // not start with files it cannot use
    if let Some(Err(e)) = s.dicom.tls.as_ref().map(petrestore::ingest::tls_config) {
        problems.push(e);
    }
    for n in &notes {
        eprintln!("petrestore: note: {n}");
    }
    if !problems.is_empty() {
        bail!("{}: {}", file.display(), problems.join("\n  "));
    }
    let wants_uncertainty = s.destinations.iter().filter(|d| d.uncertainty).count();
    let mut site_line = String::new();
    if let (Some(p), Some(path)) = (&model, &s.restore.uncertainty_site) {
        match restore::with_site_uncertainty(&mut p.clone(), path) {
            Ok(pairs) => site_line = format!(", σ scaled by the site's calibration ({pairs} pair{})", if pairs == 1 { "" } else { "s" }),
            Err(e) => eprintln!("petrestore: note: restore.uncertainty_site {} would not be used: {e}", path.display()),
        }
    }
    let model_line = match &model {
        Some(p) => format!(", model {}{}{site_line}", p.model_id(), if p.uncertainty.is_some() { " (uncertainty calibrated)" } else { "" }),
        None => String::new(),
    };
    if wants_uncertainty > 0 && model.as_ref().is_none_or(|p| p.uncertainty.is_none()) {
        eprintln!(
            "petrestore: note: {wants_uncertainty} destination(s) ask for the uncertainty series, but the model package has no [uncertainty] calibration: none will be made"
        );
    }
    println!(
        "{}: OK (AE {} on {}, {} allowed caller(s), {} destination(s), engines that would run: {}{model_line})",
        file.display(),
        s.dicom.ae_title,
        s.dicom.listen,
        s.dicom.allowed_callers.len(),
        s.destinations.len(),
        runnable.join(", ")
    );
    Ok(())
}

/// Refuse to write the state folder as another user than its owner: run as
/// root on a box whose daemon runs as `petrestore`, a journal rebuild, an
/// offline retry or `serve` would leave files the daemon cannot open, and
/// it would restart in a loop. A folder that does not exist yet is ours.
fn ensure_state_dir_owner(state_dir: &std::path::Path, command: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(state_dir) else { return Ok(()) };
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    let me = unsafe { libc::geteuid() };
    if m.uid() == me {
        return Ok(());
    }
    let owner = user_name(m.uid()).unwrap_or_else(|| m.uid().to_string());
    bail!(
        "{} belongs to user {owner}, not to the user running this (uid {me}): `petrestore {command}` would leave files there \
         the daemon cannot open. Run it as {owner}, e.g. `runuser -u {owner} -- petrestore {command}`",
        state_dir.display()
    )
}

/// The name of a user id, from the password database.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_owned())
    })
}

/// `petrestore journal rebuild`: a new journal from the spool (daemon stopped).
fn journal_rebuild(config: Option<PathBuf>, state_dir: Option<PathBuf>) -> Result<()> {
    let (_, state_dir) = operator_settings(config.as_ref(), state_dir)?;
    if std::os::unix::net::UnixStream::connect(control::socket_path(&state_dir)).is_ok() {
        bail!("a daemon is running on {}: stop it first (systemctl stop petrestore)", state_dir.display());
    }
    ensure_state_dir_owner(&state_dir, "journal rebuild")?;
    let r = petrestore::journal::rebuild::rebuild(&state_dir.join("journal"), &state_dir.join("spool")).map_err(|e| match e {
        petrestore::journal::JournalError::Locked { path } => anyhow::anyhow!(
            "the journal at {path} is open in another process (a daemon starting, running or stopping): \
             stop it first (systemctl stop petrestore) and wait until it has exited; nothing was changed"
        ),
        e => anyhow::anyhow!("rebuild failed: {e}"),
    })?;
    if let Some(old) = &r.old_journal {
        println!("old journal moved to {}", old.display());
    }
    println!("rebuilt the journal: {} instances in {} jobs", r.instances, r.jobs);
    for u in &r.unreadable {
        eprintln!("petrestore: not DICOM or unreadable, left in place: {}", u.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    // dicom-rs errors capture a backtrace whenever RUST_BACKTRACE=1 is set
    // (snafu), and reading every data set ends in such an error at its end:
    // ~50 µs per instance for nothing. Library backtraces stay off unless
    // asked for explicitly; panics still honour RUST_BACKTRACE.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: first statement of main, before any thread exists.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = Cli::parse();
    // The demo speaks in steps and progress bars; the daemon inside it
    // logs warnings only unless RUST_LOG asks for more.
    #[cfg(feature = "demo")]
    let quiet = matches!(cli.command, Command::Demo { .. });
    #[cfg(not(feature = "demo"))]
    let quiet = false;
    init_logging(if quiet { "warn,ort=error" } else { "info,ort=warn,sled=warn" });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("petrestore: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
