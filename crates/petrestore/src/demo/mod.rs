//! `petrestore demo`: the whole loop on loopback with no setup, and what it
//! did to the images. A patient study is simulated physically (a held-out
//! phantom with lesions; attenuated projection, Poisson counts, nested 30 s
//! and 90 s frames, OSEM), the 30 s series is sent as a console would to a
//! daemon on a free port, restored there with the shipped model (ONNX
//! Runtime when its library is found, else tract) and forwarded to a
//! built-in receiving node standing in for PACS. Then the demo measures the
//! received series against the 90 s reference and the truth, prints a
//! table, and draws the pictures.

mod measure;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AllowedCaller, Destination, Settings};
use crate::egress::scu;
use crate::figures;
use crate::ingest::{self, ScpConfig, store::FolderSink};
use crate::restore::{Volume, volume};
use petsim::SeriesSpec;
use petsim::patient::{Family, Patient};

/// The simulated patient: a seed of the lobulated family, which the model
/// never saw in training (its test family).
const PATIENT_SEED: u64 = 20_003;
/// SUV = Bq/ml × body weight / injected dose (the simulator's 75 kg, 370 MBq).
const SUV_PER_BQML: f64 = 75_000.0 / 370.0e6;
/// Marks a folder as the demo's own, so a second run may empty it.
const MARKER: &str = ".petrestore-demo";

/// Demo knobs (all have defaults).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where to put everything (default `demo-out` in the working folder).
    pub workdir: Option<PathBuf>,
    pub slices: usize,
    pub matrix: usize,
    /// `ort`, `tract` or `gaussian`; default: ort when its library is found, else tract.
    pub engine: Option<String>,
    /// The model package (default: the installed one, else the source tree's).
    pub model: Option<PathBuf>,
}

/// The shipped model package: installed, or in the source tree the binary
/// was built in, or under the working folder.
fn find_model() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from(crate::config::DEFAULT_MODEL_DIR)];
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/petrestore → the source tree
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(root.join("models/petrestore-unet25d"));
        }
    }
    candidates.push(PathBuf::from("models/petrestore-unet25d"));
    candidates.into_iter().find(|p| p.join("model.toml").is_file())
}

/// An ONNX Runtime library: ORT_DYLIB_PATH, else the Python wheel in the
/// source tree's `.venv` (as the README installs it).
fn find_ort_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let mut roots = vec![PathBuf::from(".")];
    if let Some(root) = std::env::current_exe().ok().and_then(|e| e.parent()?.parent()?.parent().map(Path::to_path_buf)) {
        roots.push(root);
    }
    for root in roots {
        let Ok(pys) = std::fs::read_dir(root.join(".venv/lib")) else { continue };
        for py in pys.flatten() {
            let capi = py.path().join("site-packages/onnxruntime/capi");
            let Ok(files) = std::fs::read_dir(&capi) else { continue };
            for f in files.flatten() {
                if f.file_name().to_string_lossy().starts_with("libonnxruntime.so.") {
                    return Some(f.path());
                }
            }
        }
    }
    None
}

/// The working folder: new, empty, or the demo's own from an earlier run.
fn prepare(work: &Path) -> Result<()> {
    if work.exists() && std::fs::read_dir(work)?.next().is_some() {
        if !work.join(MARKER).exists() {
            bail!("{} is not empty and not a demo folder: give --workdir an empty or new folder", work.display());
        }
        std::fs::remove_dir_all(work).with_context(|| format!("cannot empty {}", work.display()))?;
    }
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    std::fs::write(work.join(MARKER), "made by petrestore demo; the next run empties this folder\n")?;
    Ok(())
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    v.sort();
    Ok(v)
}

/// Files grouped by their Series Instance UID (unreadable files left out).
fn series_files(files: &[PathBuf]) -> std::collections::BTreeMap<String, Vec<PathBuf>> {
    let mut out: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
    for f in files {
        let Ok(obj) = dicom_object::OpenFileOptions::new().read_until(dicom_dictionary_std::tags::PIXEL_DATA).open_file(f) else {
            continue;
        };
        let uid = obj
            .element(dicom_dictionary_std::tags::SERIES_INSTANCE_UID)
            .ok()
            .and_then(|e| e.to_str().ok().map(|s| s.trim_end_matches('\0').trim().to_string()));
        if let Some(uid) = uid {
            out.entry(uid).or_default().push(f.clone());
        }
    }
    out
}

fn step(n: usize, what: &str, t: Instant) {
    println!("  {n}. {what} ({:.1} s)", t.elapsed().as_secs_f64());
}

/// A progress bar on the terminal (stderr); invisible when stderr is not a
/// terminal, so logs and tests see only the step lines.
fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template("     {msg:<12} [{bar:32}] {pos:>3}/{len:3} {elapsed:>4}")
        .expect("literal template")
        .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}

/// A spinner for a stage without a count (simulation, restoration).
fn spinner(what: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("     {spinner} {msg} {elapsed}").expect("literal template"));
    pb.set_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// The demo patient's field of view for `matrix`: 600 mm across at 128²
/// (4.69 mm pixels), never less than the 400 mm the widest body needs,
/// with pixels within 2.0-5.0 mm (inside the 2.0-5.3 mm the model was
/// trained on, so it restores them).
fn demo_fov_mm(matrix: usize) -> Result<f64> {
    let fov = (600.0 / matrix as f64).clamp(2.0, 5.0) * matrix as f64;
    if fov < 400.0 {
        anyhow::bail!("--matrix {matrix}: the body needs 400 mm across at pixels of at most 5 mm: use --matrix 80 or more");
    }
    Ok(fov)
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let work = opts.workdir.clone().unwrap_or_else(|| PathBuf::from("demo-out"));
    prepare(&work)?;
    let t_all = Instant::now();
    println!("petrestore demo: working in {}", work.display());

    // The engine and the model package.
    let ort = find_ort_library();
    let engine = match opts.engine.as_deref() {
        Some(e @ ("ort" | "tract" | "gaussian")) => e.to_string(),
        Some(other) => bail!("--engine {other:?}: use ort, tract or gaussian"),
        None if ort.is_some() => "ort".into(),
        None => "tract".into(),
    };
    if engine == "ort" && ort.is_none() {
        bail!(
            "--engine ort: no ONNX Runtime library found; set ORT_DYLIB_PATH to libonnxruntime.so (README: `.venv/bin/pip install onnxruntime`)"
        );
    }
    let model = match (&opts.model, engine.as_str()) {
        (Some(m), _) => Some(m.clone()),
        (None, "gaussian") => None,
        (None, _) => Some(find_model().context(
            "the shipped model package was not found (installed or in the source tree): give --model DIR, or --engine gaussian",
        )?),
    };

    // 1. A patient study, simulated physically: nested 30 s and 90 s frames.
    let t = Instant::now();
    let spec = SeriesSpec {
        slices: opts.slices,
        matrix: opts.matrix,
        frame_duration_s: 30.0,
        seed: PATIENT_SEED,
        fov_mm: demo_fov_mm(opts.matrix)?,
        slice_thickness_mm: 3.27,
    };
    let span = (spec.slices - 1) as f64 * spec.slice_thickness_mm;
    let z0 = Patient::generate(Family::Lobulated, PATIENT_SEED, 0.0, 1.0).liver_z() - span / 2.0;
    let phantom = petsim::Phantom::Patient { family: Family::Lobulated, seed: PATIENT_SEED };
    let scanner = petsim::physics::Scanner::default();
    let study_dir = work.join("study");
    let pb = bar(spec.slices as u64, "simulate");
    let sim = {
        let (d, s, sc, p) = (study_dir.clone(), spec.clone(), scanner.clone(), pb.clone());
        // The 60 s frame is not shown: reconstruct only 30 s and 90 s.
        tokio::task::spawn_blocking(move || {
            petsim::write_study_physical_frames(&d, &s, &sc, phantom, z0, &[30.0, 90.0], &|n| p.set_position(n as u64))
        })
        .await?
        .context("simulating the study")?
    };
    pb.finish_and_clear();
    step(
        1,
        &format!(
            "simulated a patient: {} slices of {}² at {:.2} mm, OSEM {}×{}, nested 30 s and 90 s frames",
            spec.slices,
            spec.matrix,
            spec.fov_mm / spec.matrix as f64,
            scanner.iterations,
            scanner.subsets
        ),
        t,
    );
    let short = sim.series.iter().find(|(d, _)| *d == 30.0).map(|(_, s)| s.clone()).context("30 s series")?;
    let long = sim.series.iter().find(|(d, _)| *d == 90.0).map(|(_, s)| s.clone()).context("90 s series")?;

    // 2. The receiving node (PACS) and the daemon.
    let received = work.join("pacs");
    std::fs::create_dir_all(&received)?;
    let pacs_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let pacs_addr = pacs_listener.local_addr()?;
    let stop_pacs = CancellationToken::new();
    let pacs = tokio::spawn(ingest::serve(
        pacs_listener,
        Arc::new(ScpConfig {
            ae_title: "DEMO-PACS".into(),
            allowed_callers: None,
            abstract_syntaxes: crate::dicom::PET_STORAGE_CLASSES.iter().map(|s| s.to_string()).collect(),
            max_associations: 4,
            max_associations_per_peer: 4,
            artim_timeout: Duration::from_secs(10),
            max_pdu_length: 65536,
            max_buffered_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(30),
            draining: Default::default(),
            close: stop_pacs.clone(),
            live: None,
            shared: Default::default(),
        }),
        Arc::new(FolderSink { dir: received.clone() }),
        stop_pacs.clone(),
        TaskTracker::new(),
    ));
    let mut settings = Settings::defaults();
    settings.node.state_dir = work.join("state");
    settings.node.min_free_bytes = 64 * 1024 * 1024;
    settings.dicom.listen = "127.0.0.1:0".parse().expect("literal address");
    settings.dicom.allowed_callers = vec![AllowedCaller { ae_title: "DEMO-CONSOLE".into(), host: None }];
    settings.series.quiet_timeout = Duration::from_secs(10);
    // a calibrated model's σ series goes to the receiving node too: the demo
    // shows the σ the daemon wrote, not one recomputed here
    let calibrated =
        model.as_ref().and_then(|m| crate::restore::model::ModelPackage::load(m).ok()).is_some_and(|p| p.uncertainty.is_some());
    settings.destinations = vec![Destination {
        name: "demo-pacs".into(),
        ae_title: "DEMO-PACS".into(),
        address: pacs_addr.to_string(),
        uncertainty: calibrated,
        commitment: None,
    }];
    settings.restore.engines = vec![crate::config::EngineKind::parse(&engine).expect("checked above")];
    settings.restore.ort_library = ort.clone();
    settings.restore.ort_providers = vec![crate::config::Provider::Cpu];
    if let Some(m) = &model {
        settings.restore.model = m.clone();
    }
    let t = Instant::now();
    let daemon = crate::app::start(settings.clone()).await?;
    let with = match &model {
        Some(m) => format!("engine {engine}, model {}", m.display()),
        None => "engine gaussian (the classical baseline, no model)".into(),
    };
    step(2, &format!("started the daemon on {} ({with}); receiving node DEMO-PACS on {pacs_addr}", daemon.dicom_addr), t);

    // 3. Send the 30 s series as the console does; wait for the restored one.
    let t = Instant::now();
    let peer = scu::Peer {
        address: daemon.dicom_addr.to_string(),
        called_ae: settings.dicom.ae_title.clone(),
        calling_ae: "DEMO-CONSOLE".into(),
        timeout: scu::DEFAULT_TIMEOUT,
    };
    let pb = bar(short.files.len() as u64, "send");
    let sent = scu::send_files_observed(&peer, &short.files, &CancellationToken::new(), |n| pb.set_position(n as u64))
        .await
        .context("sending the study to the daemon")?
        .refs
        .len();
    pb.finish_and_clear();
    step(3, &format!("sent the {sent} slices of the 30 s series as console DEMO-CONSOLE"), t);
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    let job_id = crate::journal::job_id(&short.series_uid);
    let mut last = String::new();
    // Restoration has no count (a spinner); delivery is counted at the
    // receiving node, file by file.
    let mut pb = spinner("restore");
    let job = loop {
        let job = daemon.journal().get(&job_id)?;
        if let Some(j) = &job {
            let now = j.state.name().to_string();
            if now != last {
                pb.suspend(|| println!("     job {job_id}: {now} ({:.1} s)", t.elapsed().as_secs_f64()));
                if now == "delivering" {
                    pb.finish_and_clear();
                    pb = bar(u64::from(j.output_count), "deliver");
                } else if !j.state.is_terminal() {
                    pb.set_message(now.clone());
                }
                last = now;
            }
            if last == "delivering" {
                let arrived = std::fs::read_dir(&received).map(|d| d.count() as u64).unwrap_or(0);
                pb.set_position(arrived.min(u64::from(j.output_count)));
            }
        }
        if let Some(j) = job.filter(|j| j.state.is_terminal()) {
            let arrived = std::fs::read_dir(&received).map(|d| d.count() as u64).unwrap_or(0);
            pb.set_position(arrived.min(u64::from(j.output_count)));
            break j;
        }
        if Instant::now() > deadline {
            bail!("the restored series did not arrive within 10 minutes; run again with RUST_LOG=info for the daemon's log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    pb.finish_and_clear();
    daemon.stop().await?;
    stop_pacs.cancel();
    let _ = pacs.await;
    if job.state != crate::journal::JobState::Done {
        bail!("job ended as {:?}", job.state);
    }
    let engine_used = job.engine.clone().unwrap_or_else(|| engine.clone());
    step(4, &format!("restored with {engine_used} and delivered to DEMO-PACS"), t);

    // 4. Measure and draw.
    let load = |files: &[PathBuf]| volume::load(files).map_err(anyhow::Error::from);
    let input = load(&short.files)?.volume;
    let by_series = series_files(&files_in(&received)?);
    let restored_uid = job.output_series_uid.clone().context("the job names no restored series")?;
    let restored = load(by_series.get(&restored_uid).map(Vec::as_slice).unwrap_or_default())?.volume;
    let sigma_series = match job.uncertainty.as_ref().and_then(|u| u.series_uid.as_ref()) {
        Some(uid) => Some(load(by_series.get(uid).map(Vec::as_slice).unwrap_or_default())?.volume),
        None => None,
    };
    let pet90 = load(&long.files)?.volume;
    let truth = truth_volume(&sim.truth, &pet90)?;
    let patient = Patient::generate(Family::Lobulated, PATIENT_SEED, z0, z0 + span);
    let geo = Geometry { fov: spec.fov_mm, px: spec.fov_mm / spec.matrix as f64, dz: spec.slice_thickness_mm, z0, nz: spec.slices };
    let liver = liver_voxels(&patient, &truth, &geo);
    let mut lesions: Vec<measure::Lesion> = patient
        .lesions
        .iter()
        .filter(|l| l.diameter_mm >= 10.0 && l.z_mm >= z0 && l.z_mm <= z0 + span)
        .map(|l| measure::Lesion { centre: geo.voxel(l.x_mm, l.y_mm, l.z_mm), diameter_mm: l.diameter_mm })
        .collect();
    lesions.sort_by(|a, b| b.diameter_mm.total_cmp(&a.diameter_mm));
    lesions.truncate(4);
    let report = measure::measure([&input, &restored, &pet90, &truth], &liver, &lesions, SUV_PER_BQML, 30.0);
    println!();
    print!("{}", report.table(30.0, &engine_used));

    let figures = work.join("figures");
    std::fs::create_dir_all(&figures)?;
    let vols = [&input, &restored, &pet90, &truth];
    // A clinical display window: SUV 0 to 5, or to the 90 s image's
    // maximum when that is lower.
    let top = pet90.data.iter().copied().fold(1e-6f32, f32::max).min((5.0 / SUV_PER_BQML) as f32);
    let mm = geo.px.min(spec.slice_thickness_mm);
    let zoom = (512 / spec.matrix).clamp(1, 4);
    let mut mips: Vec<figures::Image> = vols.iter().map(|v| figures::coronal_mip(v, mm)).collect();
    figures::crop_to_body(&mut mips, 4);
    figures::panels(&mips, top, zoom).write(&figures.join("coronal-mip.png"))?;
    let mut drawn = vec!["coronal-mip.png: coronal maximum intensity projections".to_string()];
    if let Some(l) = lesions.first() {
        let z = l.centre[0].round().clamp(0.0, (spec.slices - 1) as f64) as usize;
        let mut slices: Vec<figures::Image> = vols.iter().map(|v| figures::axial(v, z, geo.px)).collect();
        figures::crop_to_body(&mut slices, 4);
        figures::panels(&slices, top, zoom).write(&figures.join("axial-lesion.png"))?;
        let row = l.centre[1].round().clamp(0.0, (spec.matrix - 1) as f64) as usize;
        let c = l.centre[2].round() as i64;
        let half = ((l.diameter_mm * 2.0) / geo.px).ceil() as i64;
        let cols: Vec<usize> = ((c - half).max(0)..=(c + half).min(spec.matrix as i64 - 1)).map(|x| x as usize).collect();
        let curves: Vec<Vec<f32>> = vols.iter().map(|v| cols.iter().map(|x| v.data[(z * v.ny + row) * v.nx + x]).collect()).collect();
        let peak = curves.iter().flatten().copied().fold(0.0f32, f32::max) * 1.05;
        figures::profile_plot(&curves, peak, &figures.join("lesion-profile.png"))?;
        drawn.push(format!("axial-lesion.png: the axial slice through the {:.0} mm lesion", l.diameter_mm));
        drawn.push(format!(
            "lesion-profile.png: a line through that lesion, 0 to SUV {:.1}; {}",
            peak as f64 * SUV_PER_BQML,
            figures::CURVES
                .iter()
                .zip(["30 s input", "restored", "90 s", "truth"])
                .map(|((_, c), n)| format!("{n} {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // The uncertainty: the σ series the daemon wrote beside the restored
    // one (the model package's calibration), checked against the 90 s image
    // the demo has.
    let mut uncertainty_line = None;
    if let Some(sigma) = sigma_series {
        let body_t = crate::restore::uncertainty::body_mean(&restored) * 0.5;
        let body: Vec<usize> = (0..restored.data.len()).filter(|i| restored.data[*i] > body_t).collect();
        let within = body.iter().filter(|i| (pet90.data[**i] - restored.data[**i]).abs() <= sigma.data[**i]).count();
        let liver_sd = liver.iter().map(|i| sigma.data[*i] as f64).sum::<f64>() / liver.len().max(1) as f64;
        let liver_r = liver.iter().map(|i| restored.data[*i] as f64).sum::<f64>() / liver.len().max(1) as f64;
        uncertainty_line = Some(format!(
            "  uncertainty (1 SD of the difference to a 90 s scan, per voxel): liver σ {:.2} SUV ({:.1} % of the restored value); \
             the 90 s image lies within restored ± σ in {:.1} % of body voxels (68.3 % if σ is right)",
            liver_sd * SUV_PER_BQML,
            100.0 * liver_sd / liver_r.max(f64::MIN_POSITIVE),
            100.0 * within as f64 / body.len().max(1) as f64
        ));
        if let Some(l) = lesions.first() {
            let z = l.centre[0].round().clamp(0.0, (spec.slices - 1) as f64) as usize;
            let mut pair = vec![figures::axial(&sigma, z, geo.px), figures::axial(&truth, z, geo.px)];
            figures::crop_to_body(&mut pair, 4);
            let mut body_sigma: Vec<f32> = body.iter().map(|i| sigma.data[*i]).collect();
            body_sigma.sort_by(f32::total_cmp);
            let sigma_top = body_sigma.get(body_sigma.len().saturating_sub(1) * 99 / 100).copied().unwrap_or(1.0).max(1e-6);
            figures::panels(&pair[..1], sigma_top, zoom).write(&figures.join("axial-uncertainty.png"))?;
            drawn.push(format!(
                "axial-uncertainty.png: σ on the same slice (inverted grey, white = 0, black = SUV {:.2} and above; not for diagnosis)",
                sigma_top as f64 * SUV_PER_BQML
            ));
        }
    }
    if let Some(u) = &uncertainty_line {
        println!();
        println!("{u}");
    }
    println!();
    println!(
        "  pictures in {} (panels in the order 30 s input, restored, 90 s, truth: left to right, or top to bottom for the coronal view; \
         inverted grey, white = SUV 0, black = SUV {:.1} and above; colour bar at the right):",
        figures.display(),
        top as f64 * SUV_PER_BQML
    );
    for d in drawn {
        println!("    {d}");
    }
    // The daemon's working state (journal, spool) is of no further use.
    let _ = std::fs::remove_dir_all(&settings.node.state_dir);
    println!();
    println!("  DICOM: the 30 s input and the 90 s reference in {}, the restored series in {}", study_dir.display(), received.display());
    println!("  (open them in any DICOM viewer, e.g. Weasis or 3D Slicer; `dcmdump FILE` shows the derived series' labels)");
    println!("  The daemon's own log (warnings only here): `RUST_LOG=info petrestore demo`.");
    println!(
        "  {:.1} s in all. The model is a research model trained on simulated data only; outputs say so in their Derivation Description.",
        t_all.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Voxel geometry of the simulated slab.
struct Geometry {
    fov: f64,
    px: f64,
    dz: f64,
    /// Patient z (mm) of the slab's first slice.
    z0: f64,
    nz: usize,
}

impl Geometry {
    /// Volume coordinates (slice, row, column) of a patient point. The
    /// simulator writes the slab's first slice at the top (highest Image
    /// Position z), so it is the volume's last slice.
    fn voxel(&self, x: f64, y: f64, z: f64) -> [f64; 3] {
        let k = (z - self.z0) / self.dz;
        [(self.nz - 1) as f64 - k, (y + self.fov / 2.0) / self.px - 0.5, (x + self.fov / 2.0) / self.px - 0.5]
    }
    /// Patient point of a voxel centre.
    fn point(&self, z: usize, row: usize, col: usize) -> (f64, f64, f64) {
        let k = (self.nz - 1 - z) as f64;
        ((col as f64 + 0.5) * self.px - self.fov / 2.0, (row as f64 + 0.5) * self.px - self.fov / 2.0, self.z0 + k * self.dz)
    }
}

/// The truth (`truth.npy`, written in the simulator's slice order) in
/// volume order, checked against the 90 s image's shape.
fn truth_volume(path: &Path, like: &Volume) -> Result<Volume> {
    let (shape, data) = petsim::dataset::read_npy_f32(path).with_context(|| format!("cannot read {}", path.display()))?;
    if shape != [like.nz, like.ny, like.nx] {
        bail!("{}: shape {shape:?} does not match the series {}x{}x{}", path.display(), like.nz, like.ny, like.nx);
    }
    let plane = like.nx * like.ny;
    let mut v = like.clone_shape();
    v.data = data.chunks(plane).rev().flatten().copied().collect();
    Ok(v)
}

/// Uniform liver: inside the liver, at least 15 mm from every lesion, and
/// whose six neighbours have the same true activity (away from edges).
fn liver_voxels(p: &Patient, truth: &Volume, g: &Geometry) -> Vec<usize> {
    let Some(liver) = p.regions.iter().find(|r| r.name == "liver") else { return Vec::new() };
    let (nx, ny, nz) = (truth.nx, truth.ny, truth.nz);
    let mut out = Vec::new();
    for z in 1..nz.saturating_sub(1) {
        for y in 1..ny - 1 {
            for x in 1..nx - 1 {
                let (px, py, pz) = g.point(z, y, x);
                if !liver.shape.inside(px, py, pz) {
                    continue;
                }
                if p.lesions
                    .iter()
                    .any(|l| ((px - l.x_mm).powi(2) + (py - l.y_mm).powi(2) + (pz - l.z_mm).powi(2)).sqrt() < l.diameter_mm / 2.0 + 15.0)
                {
                    continue;
                }
                let i = (z * ny + y) * nx + x;
                let t = truth.data[i];
                let same =
                    [i - 1, i + 1, i - nx, i + nx, i - nx * ny, i + nx * ny].iter().all(|j| (truth.data[*j] - t).abs() <= 1e-3 * t.abs());
                if same {
                    out.push(i);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_patient_fits_and_its_pixels_are_ones_the_model_restores() {
        for (m, fov) in [(80, 400.0), (128, 600.0), (256, 600.0), (400, 800.0)] {
            assert_eq!(super::demo_fov_mm(m).unwrap(), fov, "matrix {m}");
        }
        let e = super::demo_fov_mm(64).unwrap_err().to_string();
        assert!(e.contains("--matrix 80 or more"), "{e}");
    }
}
