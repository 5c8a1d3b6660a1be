//! The `petrestore` command line. Each subcommand parses its arguments,
//! loads the configuration and calls into the library; errors are printed
//! for people (what was wrong, where, what to do) with a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use petrestore::config::{DEFAULT_CONFIG, Settings};
use petrestore::{app, control, demo, eval, journal, pipeline, restore, sim};

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
        #[arg(long)]
        input: PathBuf,
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
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// What the running daemon is doing: engines and providers in use (and why
    /// others are not), active jobs per state.
    Status {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The whole loop on loopback with a synthetic study: no broker, no GPU, no setup.
    Demo {
        /// Keep everything in this folder (default: a new temporary folder).
        #[arg(long)]
        workdir: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        slices: usize,
        #[arg(long, default_value_t = 128)]
        matrix: usize,
        /// Frame duration per bed, seconds.
        #[arg(long, default_value_t = 30.0)]
        frame_duration: f64,
    },
    /// Write a synthetic PET series (one file per slice) into a folder.
    Simulate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 48)]
        slices: usize,
        #[arg(long, default_value_t = 128)]
        matrix: usize,
        #[arg(long, default_value_t = 30.0)]
        frame_duration: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Physical simulation: projection, Poisson counts, nested 30/60/90 s
        /// frames and OSEM; writes PT30/, PT60/, PT90/, truth.npy, lesions.json.
        #[arg(long)]
        physics: bool,
        /// With --physics: "torso" (organs and lesions), "nema" (NEMA NU 2
        /// IEC body phantom, spheres 10–37 mm at 4:1, sphere plane 69 mm in),
        /// or "ellipse" / "lobulated": a random patient of that phantom
        /// family with random lesions (--seed picks the patient).
        #[arg(long, default_value = "torso")]
        phantom: String,
        /// With --physics: in-plane Gaussian post-filter after OSEM, FWHM mm (0: none).
        #[arg(long, default_value_t = 0.0)]
        post_filter: f64,
        /// Without --physics: one multi-frame Enhanced PET Image instance
        /// (one frame per slice) instead of one file per slice.
        #[arg(long)]
        enhanced: bool,
        /// Without --physics: one Legacy Converted Enhanced PET instance
        /// (what a PACS makes of a classic series).
        #[arg(long, conflicts_with = "enhanced")]
        legacy: bool,
    },
    /// Simulate a training or evaluation dataset (compact .npy studies with
    /// nested 30/60/90 s frames, noise-free reconstruction, truth, lesions).
    /// Splits: train = ellipse family seeds 0–9999, val = ellipse
    /// 10000–10999, test = lobulated family and NEMA from seed 20000.
    /// Studies already present are kept (a run can be resumed).
    Dataset {
        #[arg(long)]
        out: PathBuf,
        /// train, val or test.
        #[arg(long)]
        split: String,
        /// Patient studies to make.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Skip this many seeds of the split first (to extend a dataset).
        #[arg(long, default_value_t = 0)]
        skip: u64,
        /// NEMA studies (test split only; each a new noise realisation).
        #[arg(long, default_value_t = 0)]
        nema: u64,
        #[arg(long, default_value_t = 16)]
        slices: usize,
        #[arg(long, default_value_t = 128)]
        matrix: usize,
        /// In-plane Gaussian post-filter after OSEM, FWHM mm (0: none; the
        /// shipped model was trained without).
        #[arg(long, default_value_t = 0.0)]
        post_filter: f64,
    },
    /// Measure restoration quality on simulated studies with known truth
    /// (DESIGN.md "Quality"): seed metric vs PET90 with its ceiling, NRMSE
    /// and SSIM vs truth, NEMA contrast recovery and background variability,
    /// lesion SUV bias; raw frames, the Gaussian baseline, the model and the
    /// oracle (a perfect denoiser: the reachable bound) side by side. Prints
    /// Markdown tables and the goals met or missed.
    Eval {
        /// Studies from `petrestore dataset` (use the test split for reports).
        #[arg(long, conflicts_with_all = ["input", "reference"])]
        dataset: Option<PathBuf>,
        /// Site acceptance on real data: a short-frame series folder ...
        #[arg(long, requires = "reference")]
        input: Option<PathBuf>,
        /// ... and the standard-frame series it is nested in (same grid).
        #[arg(long, requires = "input")]
        reference: Option<PathBuf>,
        /// Validation studies: the Gaussian FWHM is chosen on them.
        #[arg(long)]
        val: Option<PathBuf>,
        /// Fixed Gaussian FWHM (mm) instead of choosing it on --val.
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
        /// Write the full report (summary and per-study records) as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the report's Markdown here too.
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Write every restored volume as .npy (for the Python cross-check).
        #[arg(long)]
        dump: Option<PathBuf>,
        /// Engine threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Journal maintenance (with the daemon stopped).
    Journal {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(subcommand)]
        action: JournalAction,
    },
    /// Validate a configuration file.
    CheckConfig { file: PathBuf },
    /// Print the annotated default configuration.
    PrintDefaultConfig,
    /// Read and steer the job journal (works while the daemon runs).
    Jobs {
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
    /// instances); jobs come back as receiving and are processed again.
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

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn,sled=warn"));
    // Under systemd (JOURNAL_STREAM set) log to journald; otherwise stderr.
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(j) => registry.with(j).init(),
        None => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init(),
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
    let settings = load_settings(config.as_ref())?;
    let state_dir = state_dir.unwrap_or_else(|| settings.node.state_dir.clone());
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
            let mut s = settings.clone();
            s.node.state_dir = state_dir.clone();
            let j = app::open_journal(&s)?;
            match &req {
                control::Request::List | control::Request::Status => j.all_jobs()?,
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
    let settings = load_settings(config.as_ref())?;
    let state_dir = state_dir.unwrap_or_else(|| settings.node.state_dir.clone());
    match control::request(&state_dir, &control::Request::Status).await.map_err(anyhow::Error::msg)? {
        Some(r) if r.ok => {
            println!("{}", serde_json::to_string_pretty(&r.status)?);
            Ok(())
        }
        Some(r) => bail!("{}", r.error.unwrap_or_default()),
        None => bail!("no daemon is running on {} (no control socket); start it with `petrestore serve`", state_dir.display()),
    }
}

struct RestoreArgs {
    input: PathBuf,
    output: PathBuf,
    engine: Option<String>,
    model: Option<PathBuf>,
    frame_duration: Option<f64>,
    units: Option<String>,
    tracer: Option<String>,
    config: Option<PathBuf>,
}

fn offline_restore(a: RestoreArgs) -> Result<()> {
    let RestoreArgs { input, output, engine, model, frame_duration, units, tracer, config } = a;
    let mut settings = load_settings(config.as_ref())?;
    if let Some(fd) = frame_duration {
        if !(fd > 0.0 && fd < 3600.0) {
            bail!("--frame-duration {fd}: give the frame duration in seconds, e.g. 30");
        }
        settings.restore.assume_frame_duration_s = Some(fd);
    }
    if let Some(u) = units {
        settings.restore.assume_units = Some(u);
    }
    if let Some(t) = tracer {
        settings.restore.assume_tracer = Some(t);
    }
    if let Some(m) = model {
        settings.restore.model = m;
    }
    if let Some(e) = engine {
        if !petrestore::config::KNOWN_ENGINES.contains(&e.as_str()) {
            bail!("unknown engine {e:?}: this build has {}", petrestore::config::KNOWN_ENGINES.join(", "));
        }
        settings.restore.engines = vec![e];
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
    let restored = match pipeline::worker::restore_paths(&settings, &engines.engines, &paths) {
        Ok(r) => r,
        Err(pipeline::worker::Ending::Skipped(r)) => bail!("series not restored (selection rules): {r}"),
        Err(pipeline::worker::Ending::Failed(r)) | Err(pipeline::worker::Ending::Restored { engine: r, .. }) => {
            bail!("restoration failed: {r}")
        }
    };
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
    let n = pipeline::worker::write_instances(&output, restored.instances).map_err(anyhow::Error::msg)?;
    println!("restored {} with {engine} ({model}) into {}", pipeline::worker::slice_count(slices, n as usize), output.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let rt = || tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime");
    match cli.command {
        Command::Serve { config } => {
            let settings = load_settings(config.as_ref())?;
            rt()?.block_on(app::serve(settings))
        }
        Command::Restore { input, output, engine, model, frame_duration, units, tracer, config } => {
            offline_restore(RestoreArgs { input, output, engine, model, frame_duration, units, tracer, config })
        }
        Command::Status { config, state_dir } => rt()?.block_on(status(config, state_dir)),
        Command::Demo { workdir, slices, matrix, frame_duration } => {
            if !(4..=1000).contains(&slices) || !(16..=512).contains(&matrix) {
                bail!("--slices must be 4..=1000 and --matrix 16..=512");
            }
            let spec = sim::SeriesSpec { slices, matrix, frame_duration_s: frame_duration, ..Default::default() };
            rt()?.block_on(demo::run(demo::DemoOptions { workdir, spec }))
        }
        Command::Simulate { out, slices, matrix, frame_duration, seed, physics: true, phantom, post_filter, enhanced, legacy } => {
            let phantom = match phantom.as_str() {
                "torso" => sim::Phantom::Torso,
                "nema" => sim::Phantom::Nema,
                f if sim::patient::Family::parse(f).is_some() => sim::Phantom::Patient { family: sim::patient::Family::parse(f).expect("checked"), seed },
                other => bail!("--phantom {other:?}: use torso, nema, ellipse or lobulated (a random patient of that family; --seed picks it)"),
            };
            let spec = sim::SeriesSpec { slices, matrix, frame_duration_s: frame_duration, seed, ..Default::default() };
            let t = std::time::Instant::now();
            if !(0.0..=30.0).contains(&post_filter) {
                bail!("--post-filter {post_filter}: give a FWHM in mm from 0 (none) to 30");
            }
            if enhanced || legacy {
                bail!("--enhanced and --legacy are for the simple image model; --physics writes classic PET series (one file per slice)");
            }
            let sc = sim::physics::Scanner { post_filter_fwhm_mm: post_filter, ..Default::default() };
            let st = sim::write_study_physical(&out, &spec, &sc, phantom)
                .with_context(|| format!("cannot write into {}", out.display()))?;
            for (d, s) in &st.series {
                println!("wrote {} slices of {d} s (series {}) into {}", s.files.len(), s.series_uid, out.join(format!("PT{d}")).display());
            }
            println!("truth: {}, lesions: {} ({:.1} s)", st.truth.display(), st.lesions.display(), t.elapsed().as_secs_f64());
            Ok(())
        }
        Command::Simulate { out, slices, matrix, frame_duration, seed, physics: false, enhanced, legacy, .. } => {
            let spec = sim::SeriesSpec { slices, matrix, frame_duration_s: frame_duration, seed, ..Default::default() };
            let write = match (enhanced, legacy) {
                (true, _) => sim::write_series_enhanced,
                (_, true) => sim::write_series_legacy,
                _ => sim::write_series,
            };
            let s = write(&out, &spec).with_context(|| format!("cannot write into {}", out.display()))?;
            if enhanced || legacy {
                let kind = if legacy { "Legacy Converted Enhanced PET" } else { "Enhanced PET" };
                println!("wrote {slices} slices as one {kind} instance of series {} into {}", s.series_uid, s.files[0].display());
            } else {
                println!("wrote {} slices of series {} into {}", s.files.len(), s.series_uid, out.display());
            }
            Ok(())
        }
        Command::Dataset { out, split, count, skip, nema, slices, matrix, post_filter } => {
            use sim::dataset::{Geometry, Source, Split, write_study};
            use sim::patient::Family;
            let split = Split::parse(&split).with_context(|| format!("--split {split:?}: use train, val or test"))?;
            if !(1..=512).contains(&slices) || !(32..=512).contains(&matrix) {
                bail!("--slices must be 1..=512 and --matrix 32..=512");
            }
            if nema > 0 && split != Split::Test {
                bail!("--nema studies belong to the test split only (NEMA is never trained on)");
            }
            let (family, base) = match split {
                Split::Train => (Family::Ellipse, 0),
                Split::Validation => (Family::Ellipse, 10_000),
                Split::Test => (Family::Lobulated, 20_000),
            };
            let g = Geometry { slices, matrix, ..Geometry::default() };
            if !(0.0..=30.0).contains(&post_filter) {
                bail!("--post-filter {post_filter}: give a FWHM in mm from 0 (none) to 30");
            }
            let sc = sim::physics::Scanner { post_filter_fwhm_mm: post_filter, ..Default::default() };
            let mut jobs: Vec<(Source, u64)> = (base + skip..base + skip + count).map(|s| (Source::Patient(family), s)).collect();
            jobs.extend((20_000 + skip..20_000 + skip + nema).map(|s| (Source::Nema, s)));
            let t = std::time::Instant::now();
            let mut made = 0;
            for (source, seed) in jobs {
                let npy = out.join(format!("{}-{seed:05}.npy", source.name()));
                if npy.exists() && out.join(format!("{}-{seed:05}.json", source.name())).exists() {
                    continue;
                }
                write_study(&out, source, seed, &g, &sc).with_context(|| format!("cannot write into {}", out.display()))?;
                made += 1;
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{made} studies of {slices}x{matrix}x{matrix} written into {} in {secs:.1} s ({:.0} slices/h)",
                out.display(),
                made as f64 * slices as f64 / secs.max(1e-9) * 3600.0
            );
            Ok(())
        }
        Command::Eval { dataset, input, reference, val, gaussian_fwhm, model, engine, ort_library, json, markdown, dump, threads } => {
            let engine: Option<std::sync::Arc<dyn restore::Engine>> = match model {
                None => None,
                Some(dir) => {
                    let pkg = restore::model::ModelPackage::load(&dir)?;
                    let e: std::sync::Arc<dyn restore::Engine> = match engine.as_str() {
                        "tract" => std::sync::Arc::new(restore::tract_engine::TractEngine::new(pkg, threads)?),
                        "ort" => {
                            let o = restore::ort_engine::OrtOptions {
                                library: ort_library,
                                providers: vec!["cpu".into()],
                                tensorrt_fp16: false,
                                tensorrt_workspace_mb: 0,
                                cache_dir: std::env::temp_dir(),
                                threads,
                            };
                            std::sync::Arc::new(restore::ort_engine::OrtEngine::new(pkg, &o)?)
                        }
                        other => bail!("--engine {other:?}: use tract or ort"),
                    };
                    e.check()?;
                    Some(e)
                }
            };
            let t = std::time::Instant::now();
            if let (Some(input), Some(reference)) = (input, reference) {
                let fwhm = gaussian_fwhm.unwrap_or_else(|| Settings::defaults().restore.gaussian_fwhm_mm);
                let report = eval::run_series(&input, &reference, engine, fwhm).map_err(anyhow::Error::msg)?;
                let md = eval::series_markdown(&report);
                println!("{md}");
                if let Some(p) = json {
                    std::fs::write(&p, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", p.display()))?;
                }
                if let Some(p) = markdown {
                    std::fs::write(&p, &md).with_context(|| format!("cannot write {}", p.display()))?;
                }
                return Ok(());
            }
            let Some(dataset) = dataset else {
                bail!("say what to evaluate: --dataset DIR (simulated studies with truth) or --input DIR --reference DIR (paired series)");
            };
            let report = eval::run(&eval::EvalOptions { dataset, val, gaussian_fwhm, engine, dump }).map_err(anyhow::Error::msg)?;
            let md = eval::markdown(&report);
            println!("{md}");
            let goals = eval::goals(&report);
            if !goals.is_empty() {
                println!("### Goals (issue 4), model on this dataset\n");
                for (g, ok) in &goals {
                    println!("- [{}] {g}", if *ok { "x" } else { " " });
                }
            }
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", p.display()))?;
            }
            if let Some(p) = markdown {
                std::fs::write(&p, &md).with_context(|| format!("cannot write {}", p.display()))?;
            }
            eprintln!("evaluated in {:.1} s", t.elapsed().as_secs_f64());
            Ok(())
        }
        Command::CheckConfig { file } => {
            let s = Settings::load(&file)?;
            println!(
                "{}: OK (AE {} on {}, {} allowed caller(s), {} destination(s), engines {:?})",
                file.display(),
                s.dicom.ae_title,
                s.dicom.listen,
                s.dicom.allowed_callers.len(),
                s.destinations.len(),
                s.restore.engines
            );
            Ok(())
        }
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Jobs { config, state_dir, action } => rt()?.block_on(jobs(config, state_dir, action)),
        Command::Journal { config, state_dir, action: JournalAction::Rebuild } => {
            let settings = load_settings(config.as_ref())?;
            let state_dir = state_dir.unwrap_or_else(|| settings.node.state_dir.clone());
            if std::os::unix::net::UnixStream::connect(control::socket_path(&state_dir)).is_ok() {
                bail!("a daemon is running on {}: stop it first (systemctl stop petrestore)", state_dir.display());
            }
            let r = petrestore::journal::rebuild::rebuild(&state_dir.join("journal"), &state_dir.join("spool"))
                .map_err(|e| anyhow::anyhow!("rebuild failed: {e}"))?;
            if let Some(old) = &r.old_journal {
                println!("old journal moved to {}", old.display());
            }
            println!("rebuilt the journal: {} instances in {} jobs", r.instances, r.jobs);
            for u in &r.unreadable {
                eprintln!("petrestore: not DICOM or unreadable, left in place: {}", u.display());
            }
            Ok(())
        }
    }
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
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("petrestore: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
