//! The `petlab` command line: the laboratory around the appliance. It
//! simulates studies with the physical simulator of `petsim`, writes
//! training and evaluation datasets, and measures a model package on them
//! against the development goals. None of this ships on the box; the
//! appliance binary (`petrestore`) carries only site acceptance on paired
//! series (`petrestore eval --input --reference`).

mod eval;
mod grid;
mod uncertainty;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "petlab", version, about = "Simulate PET studies, build datasets and evaluate petrestore model packages")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a synthetic PET series (one file per slice) into a folder.
    Simulate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 48)]
        slices: usize,
        #[arg(long, default_value_t = 128)]
        matrix: usize,
        /// Field of view across, mm (pixel size = this ÷ --matrix; the
        /// shipped model restores 2.0–5.3 mm pixels only).
        #[arg(long, default_value_t = 600.0)]
        fov_mm: f64,
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
        /// or "ellipse" / "lobulated" / "textured": a random patient of that phantom
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
    /// 10000–10999 (or, with --family textured, the textured family from
    /// seed 30000) and NEMA noise realisations from seed 12000, test =
    /// lobulated family and NEMA from seed 20000.
    /// Studies already present are kept (a run can be resumed).
    Dataset {
        #[arg(long)]
        out: PathBuf,
        /// train, val or test.
        #[arg(long)]
        split: String,
        /// With --split val: the phantom family, "ellipse" (the training's
        /// anatomy, other patients) or "textured" (anatomy neither training
        /// nor test uses: superellipse organs with uneven uptake).
        #[arg(long, default_value = "ellipse")]
        family: String,
        /// Patient studies to make.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Skip this many seeds of the split first (to extend a dataset).
        #[arg(long, default_value_t = 0)]
        skip: u64,
        /// NEMA studies (val or test split; each a new noise realisation, the validation's from seeds of its own).
        #[arg(long, default_value_t = 0)]
        nema: u64,
        #[arg(long, default_value_t = 16)]
        slices: usize,
        #[arg(long, default_value_t = 128)]
        matrix: usize,
        /// In-plane Gaussian post-filter after OSEM, FWHM mm (0: none; the
        /// 1.x models were trained without).
        #[arg(long, default_value_t = 0.0)]
        post_filter: f64,
        /// Draw a clinical reconstruction setting per study from its seed
        /// (matrix, pixel size, slice thickness, 3D PSF, OSEM, resolution
        /// modelling, 3D post-filter, count level, scatter, randoms);
        /// --matrix and --post-filter are then ignored.
        #[arg(long, conflicts_with = "site")]
        randomize: bool,
        /// With --randomize: only the unfiltered stratum (the same draw per
        /// seed, then no post-filter and no resolution modelling).
        #[arg(long, requires = "randomize")]
        unfiltered: bool,
        /// A cell of the site matrix (its fixed setting), or "all": one
        /// sub-folder per cell, each with its own phantom seeds; or one of
        /// the out-of-range settings (x1-lowcount, x2-osem6x24).
        #[arg(long)]
        site: Option<String>,
    },
    /// Fit the model's uncertainty calibration (per-voxel σ of PET90 − R) on
    /// the validation grid and, with --write, store it in the package's
    /// model.toml (`[uncertainty]`; the ONNX file and its checksum are not
    /// touched). Prints the fitted scales and the 95 % coverage they give.
    /// A package whose σ comes from its σ head (`uncertainty.head`) is
    /// calibrated on the head's variance: per class a weight on it, and
    /// with --descriptors the per-frame factor on top.
    Calibrate {
        /// The validation grid (`petlab dataset --split val --site all`).
        #[arg(long)]
        grid: PathBuf,
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "tract")]
        engine: String,
        #[arg(long)]
        ort_library: Option<PathBuf>,
        /// FWHM (mm) of the window the residual's power is averaged over.
        #[arg(long, default_value_t = petrestore::restore::uncertainty::DEFAULT_WINDOW_MM)]
        window_mm: f64,
        /// FWHM (mm) of the smoothing R's texture is measured against.
        #[arg(long, default_value_t = petrestore::restore::uncertainty::DEFAULT_TEXTURE_MM)]
        texture_mm: f64,
        /// Also scale σ² per frame by the input's texture descriptors
        /// (noise_px, noise_2px, axial_corr): one set of class weights
        /// cannot serve every reconstruction.
        #[arg(long)]
        descriptors: bool,
        /// First measure, leaving one cell out at a time, how the
        /// calibration (with and without descriptors) covers a cell it was
        /// not fitted on; prints a table.
        #[arg(long)]
        cross_validate: bool,
        /// Write the calibration into MODEL/model.toml.
        #[arg(long)]
        write: bool,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Judge a candidate model against a baseline by the shipping rule
    /// (EVAL.md): both are `petlab eval --grid VALGRID --json` reports of the
    /// validation grid. Prints the rule as a table; exits 0 when the
    /// candidate passes every line, 1 when it does not.
    Compare {
        #[arg(long)]
        baseline: PathBuf,
        #[arg(long)]
        candidate: PathBuf,
    },
    /// Measure restoration quality on simulated studies with known truth:
    /// seed metric vs PET90 with its ceiling, NRMSE and SSIM vs truth, NEMA
    /// contrast recovery and background variability, lesion SUV bias; raw
    /// frames, the Gaussian baseline, the model and the oracle (a perfect
    /// denoiser: the reachable bound) side by side. Prints Markdown tables
    /// and the development goals met or missed.
    Eval {
        /// Studies from `petlab dataset` (use the test split for reports).
        #[arg(long, required_unless_present = "grid", conflicts_with = "grid")]
        dataset: Option<PathBuf>,
        /// A site matrix grid (`petlab dataset --site all`): every cell
        /// evaluated, goals per cell and on the worst cell; needs --val-grid.
        #[arg(long, requires = "val_grid")]
        grid: Option<PathBuf>,
        /// The validation grid: each cell's Gaussian FWHM is chosen on it.
        #[arg(long)]
        val_grid: Option<PathBuf>,
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
        /// Write the uncertainty's reliability diagram (observed vs nominal
        /// coverage, per cell with --grid) as PNG into this folder.
        #[arg(long)]
        reliability: Option<PathBuf>,
        /// Engine threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// With --grid: σ also scaled by a site calibration per cell, fitted
        /// on the validation cell's own studies (30 and 60 s frames against
        /// PET90) as `petrestore eval --site-uncertainty` fits it at a site.
        #[arg(long, requires = "grid")]
        site_uncertainty: bool,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Simulate { out, slices, matrix, fov_mm, frame_duration, seed, physics: true, phantom, post_filter, enhanced, legacy } => {
            let phantom = match phantom.as_str() {
                "torso" => petsim::Phantom::Torso,
                "nema" => petsim::Phantom::Nema,
                f if petsim::patient::Family::parse(f).is_some() => {
                    petsim::Phantom::Patient { family: petsim::patient::Family::parse(f).expect("checked"), seed }
                }
                other => {
                    bail!(
                        "--phantom {other:?}: use torso, nema, ellipse, lobulated or textured (a random patient of that family; --seed picks it)"
                    )
                }
            };
            if !(50.0..=1000.0).contains(&fov_mm) {
                bail!("--fov-mm {fov_mm}: give a field of view from 50 to 1000 mm");
            }
            let spec = petsim::SeriesSpec { slices, matrix, frame_duration_s: frame_duration, seed, fov_mm, ..Default::default() };
            let t = std::time::Instant::now();
            if !(0.0..=30.0).contains(&post_filter) {
                bail!("--post-filter {post_filter}: give a FWHM in mm from 0 (none) to 30");
            }
            if enhanced || legacy {
                bail!("--enhanced and --legacy are for the simple image model; --physics writes classic PET series (one file per slice)");
            }
            let sc = petsim::physics::Scanner { post_filter_fwhm_mm: post_filter, ..Default::default() };
            let st =
                petsim::write_study_physical(&out, &spec, &sc, phantom).with_context(|| format!("cannot write into {}", out.display()))?;
            for (d, s) in &st.series {
                println!("wrote {} slices of {d} s (series {}) into {}", s.files.len(), s.series_uid, out.join(format!("PT{d}")).display());
            }
            println!("truth: {}, lesions: {} ({:.1} s)", st.truth.display(), st.lesions.display(), t.elapsed().as_secs_f64());
            Ok(())
        }
        Command::Simulate { out, slices, matrix, fov_mm, frame_duration, seed, physics: false, enhanced, legacy, .. } => {
            if !(50.0..=1000.0).contains(&fov_mm) {
                bail!("--fov-mm {fov_mm}: give a field of view from 50 to 1000 mm");
            }
            let spec = petsim::SeriesSpec { slices, matrix, frame_duration_s: frame_duration, seed, fov_mm, ..Default::default() };
            let write = match (enhanced, legacy) {
                (true, _) => petsim::write_series_enhanced,
                (_, true) => petsim::write_series_legacy,
                _ => petsim::write_series,
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
        Command::Dataset { out, split, family, count, skip, nema, slices, matrix, post_filter, randomize, unfiltered, site } => {
            use petsim::dataset::{Geometry, Source, Split, write_study_with};
            use petsim::patient::Family;
            use petsim::sites::{SITE_MATRIX, Setting};
            let split = Split::parse(&split).with_context(|| format!("--split {split:?}: use train, val or test"))?;
            if !(1..=512).contains(&slices) || !(32..=512).contains(&matrix) {
                bail!("--slices must be 1..=512 and --matrix 32..=512");
            }
            if nema > 0 && split == Split::Train {
                bail!("--nema studies belong to the val or test split (NEMA is never trained on)");
            }
            if !(0.0..=30.0).contains(&post_filter) {
                bail!("--post-filter {post_filter}: give a FWHM in mm from 0 (none) to 30");
            }
            let (family, base) = match (split, family.as_str()) {
                (Split::Train, "ellipse") => (Family::Ellipse, 0),
                (Split::Validation, "ellipse") => (Family::Ellipse, 10_000),
                (Split::Validation, "textured") => (Family::Textured, 30_000),
                (Split::Test, "ellipse") => (Family::Lobulated, 20_000),
                (Split::Validation, other) => bail!("--family {other:?}: use ellipse or textured"),
                (_, other) => bail!("--family {other:?} is for --split val only (train is ellipse, test lobulated)"),
            };
            let fixed = Setting {
                name: "fixed".into(),
                geometry: Geometry { slices, matrix, ..Geometry::default() },
                scanner: petsim::physics::Scanner { post_filter_fwhm_mm: post_filter, ..Default::default() },
                counts_90s: None,
            };
            // NEMA noise realisations: validation 12_000.., test 20_000.. (cells 100 apart after)
            let nema_base = if split == Split::Validation { 12_000 } else { 20_000 };
            // (folder, setting per seed, first patient seed, first NEMA seed)
            type Pick = Box<dyn Fn(u64) -> Setting>;
            let mut plans: Vec<(PathBuf, Pick, u64, u64)> = Vec::new();
            match site.as_deref() {
                None if randomize && unfiltered => {
                    plans.push((out.clone(), Box::new(move |seed| Setting::random_unfiltered(seed, slices)), base, nema_base))
                }
                None if randomize => plans.push((out.clone(), Box::new(move |seed| Setting::random(seed, slices)), base, nema_base)),
                None => plans.push((out.clone(), Box::new(move |_| fixed.clone()), base, nema_base)),
                Some(name) => {
                    // out-of-range cells come after the matrix: their own seeds
                    let cells: Vec<_> = SITE_MATRIX
                        .iter()
                        .chain(petsim::sites::OUT_OF_RANGE.iter())
                        .enumerate()
                        .filter(|(i, c)| (name == "all" && *i < SITE_MATRIX.len()) || c.name == name)
                        .collect();
                    if cells.is_empty() {
                        let names: Vec<_> = SITE_MATRIX.iter().chain(petsim::sites::OUT_OF_RANGE.iter()).map(|c| c.name).collect();
                        bail!("--site {name:?}: use all or one of {}", names.join(", "));
                    }
                    if split == Split::Train {
                        bail!("--site makes evaluation grids (val or test); train with --randomize");
                    }
                    for (i, c) in cells {
                        // each cell its own phantoms: seeds 100 apart, after the plain split's
                        let first = base + 100 * (i as u64 + 1);
                        let folder = if name == "all" { out.join(c.name) } else { out.clone() };
                        let cell = *c;
                        let cell_nema = match split {
                            Split::Validation => 12_100 + 100 * i as u64,
                            _ => 21_000 + 100 * i as u64,
                        };
                        plans.push((folder, Box::new(move |_| cell.setting(slices)), first, cell_nema));
                    }
                }
            }
            let t = std::time::Instant::now();
            let (mut made, mut voxels) = (0u64, 0f64);
            for (folder, pick, first, first_nema) in &plans {
                let mut jobs: Vec<(Source, u64)> = (first + skip..first + skip + count).map(|s| (Source::Patient(family), s)).collect();
                jobs.extend((first_nema + skip..first_nema + skip + nema).map(|s| (Source::Nema, s)));
                for (source, seed) in jobs {
                    let npy = folder.join(format!("{}-{seed:05}.npy", source.name()));
                    if npy.exists() && folder.join(format!("{}-{seed:05}.json", source.name())).exists() {
                        continue;
                    }
                    let setting = pick(seed);
                    write_study_with(folder, source, seed, &setting).with_context(|| format!("cannot write into {}", folder.display()))?;
                    made += 1;
                    voxels += (setting.geometry.slices * setting.geometry.matrix * setting.geometry.matrix) as f64;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            println!("{made} studies ({:.1} M voxels per frame) written into {} in {secs:.1} s", voxels / 1e6, out.display());
            Ok(())
        }
        Command::Compare { baseline, candidate } => {
            let read = |p: &PathBuf| -> Result<serde_json::Value> {
                let b = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                serde_json::from_slice(&b).with_context(|| format!("{} is not JSON", p.display()))
            };
            let lines = grid::rule(&read(&baseline)?, &read(&candidate)?).map_err(anyhow::Error::msg)?;
            print!("{}", grid::rule_markdown(&lines));
            if !lines.iter().all(|l| l.pass) {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Calibrate { grid, model, engine, ort_library, window_mm, texture_mm, descriptors, cross_validate, write, threads } => {
            // a package whose σ comes from its σ head is calibrated on the head's variance
            let current = petrestore::restore::model::ModelPackage::load(&model)?.uncertainty;
            let head = current.as_ref().is_some_and(|u| u.uses_variance());
            let e = petrestore::eval::engine(&model, &engine, ort_library, threads)?;
            let frames = uncertainty::frames(&grid, e.as_ref(), window_mm, texture_mm, head).map_err(anyhow::Error::msg)?;
            if cross_validate {
                let current = current.as_ref().filter(|_| head);
                println!("{}", uncertainty::cross_validate(&frames, window_mm, texture_mm, current).map_err(anyhow::Error::msg)?);
            }
            let (cal, report) = uncertainty::fit(&grid, &frames, window_mm, texture_mm, descriptors).map_err(anyhow::Error::msg)?;
            if head {
                println!("| class (R ÷ body mean) | voxels | weight on the σ head's variance | 95 % coverage with it |\n|---|---|---|---|");
            } else {
                println!(
                    "| class (R ÷ body mean) | voxels | noise weight | texture weight | 95 % coverage with them |\n|---|---|---|---|---|"
                );
            }
            for (k, row) in report["classes"].as_array().into_iter().flatten().enumerate() {
                let weights = if head {
                    format!("{:.3}", cal.head[k])
                } else {
                    format!("{:.3} | {:.3}", row["noise"].as_f64().unwrap_or(f64::NAN), row["texture"].as_f64().unwrap_or(f64::NAN))
                };
                println!(
                    "| {} | {} | {weights} | {:.1} % |",
                    row["class"].as_str().unwrap_or("?"),
                    row["voxels"],
                    row["cov95_after"].as_f64().unwrap_or(f64::NAN)
                );
            }
            if !cal.descriptors.is_empty() {
                println!("\nper-frame factor on σ²: exp({:?} · [1, {}])", cal.descriptor_coef, cal.descriptors.join(", "));
            }
            if write {
                let path = model.join("model.toml");
                let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
                std::fs::write(&path, uncertainty::with_calibration(&text, &cal))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                petrestore::restore::model::ModelPackage::load(&model)?;
                println!("\nwritten into {}", path.display());
            }
            Ok(())
        }
        Command::Eval {
            dataset,
            grid,
            val_grid,
            val,
            gaussian_fwhm,
            model,
            engine,
            ort_library,
            json,
            markdown,
            dump,
            reliability,
            threads,
            site_uncertainty,
        } => {
            let engine = match model {
                None => None,
                Some(dir) => Some(petrestore::eval::engine(&dir, &engine, ort_library, threads)?),
            };
            let t = std::time::Instant::now();
            if let (Some(grid), Some(val_grid)) = (grid, val_grid) {
                let report = grid::run_grid(&grid, &val_grid, engine, site_uncertainty).map_err(anyhow::Error::msg)?;
                if let Some(dir) = &reliability {
                    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
                    for (name, cell) in report["cells"].as_object().into_iter().flatten() {
                        let png = dir.join(format!("reliability-{name}.png"));
                        if uncertainty::reliability_png(&cell["summary"], &png)? {
                            eprintln!("wrote {}", png.display());
                        }
                    }
                }
                let md = grid::grid_markdown(&report);
                println!("{md}");
                if let Some(p) = json {
                    std::fs::write(&p, serde_json::to_vec_pretty(&report)?).with_context(|| format!("cannot write {}", p.display()))?;
                }
                if let Some(p) = markdown {
                    std::fs::write(&p, &md).with_context(|| format!("cannot write {}", p.display()))?;
                }
                eprintln!("evaluated in {:.1} s", t.elapsed().as_secs_f64());
                return Ok(());
            }
            let dataset = dataset.context("--dataset DIR or --grid DIR --val-grid DIR")?;
            let report = eval::run(&eval::EvalOptions { dataset, val, gaussian_fwhm, engine, dump, site_scale: None })
                .map_err(anyhow::Error::msg)?;
            if let Some(dir) = &reliability {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
                let png = dir.join("reliability.png");
                if uncertainty::reliability_png(&report["summary"], &png)? {
                    eprintln!("wrote {}", png.display());
                }
            }
            let md = eval::markdown(&report);
            println!("{md}");
            let goals = eval::goals(&report);
            if !goals.is_empty() {
                println!("### Development goals, model on this dataset\n");
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
    }
}

fn main() -> ExitCode {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: first statement of main, before any thread exists.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("petlab: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
