//! `petrestore eval`: site acceptance on paired series (docs/QUALITY.md "Site acceptance").
//!
//! A site reconstructs one acquisition twice from the same list-mode data: a
//! short frame and the standard 90 s frame it is nested in. [`run_series`]
//! restores the short one and measures it against the standard one: the
//! seed metric (MSE and 1−SSIM improvement vs the reference) with the
//! ceiling that nesting implies, and the body mean agreement (does
//! restoration move quantitation). The raw input and the Gaussian baseline
//! are measured side by side. [`metrics`] holds the measures, shared with
//! the simulation-based evaluation of the lab crate.

pub mod metrics;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::bail;

use crate::restore::{Engine, Volume, gaussian};
use metrics::*;

/// The engine `eval` measures a model package with: `tract` or `ort` (CPU
/// provider, so results do not depend on the GPU), checked before use.
pub fn engine(model: &Path, engine: &str, ort_library: Option<PathBuf>, threads: usize) -> anyhow::Result<Arc<dyn Engine>> {
    let pkg = crate::restore::model::ModelPackage::load(model)?;
    let e: Arc<dyn Engine> = match engine {
        "tract" => Arc::new(crate::restore::tract_engine::TractEngine::new(pkg, threads)?),
        "ort" => {
            let o = crate::restore::ort_engine::OrtOptions {
                library: ort_library,
                providers: vec![crate::config::Provider::Cpu],
                tensorrt_fp16: false,
                tensorrt_workspace_mb: 0,
                cache_dir: std::env::temp_dir(),
                threads,
                fold_texture: true,
            };
            Arc::new(crate::restore::ort_engine::OrtEngine::new(pkg, &o)?)
        }
        other => bail!("--engine {other:?}: use tract or ort"),
    };
    e.check()?;
    Ok(e)
}

/// Why a site acceptance run could not measure the pair.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{}: {source}", path.display())]
    Folder { path: PathBuf, source: std::io::Error },
    #[error("{} holds no files: point it at one series folder", .0.display())]
    Empty(PathBuf),
    #[error("{flag} {}: {source}", path.display())]
    Load { flag: &'static str, path: PathBuf, source: crate::restore::volume::VolumeError },
    #[error(
        "the series do not match voxel for voxel: input {} at {:?} mm, reference {} at {:?} mm (reconstruct both on the same grid)",
        shape(.input.0),
        .input.1,
        shape(.reference.0),
        .reference.1
    )]
    Grid { input: ([usize; 3], [f64; 3]), reference: ([usize; 3], [f64; 3]) },
    #[error("{0}")]
    NoDuration(String),
    #[error("--input ({input:.0} s) must be the shorter frame and --reference ({reference:.0} s) the longer one")]
    Order { input: f64, reference: f64 },
    #[error(transparent)]
    Engine(#[from] crate::restore::EngineError),
    #[error("cannot write the figures into {}: {source}", dir.display())]
    Figures { dir: PathBuf, source: std::io::Error },
    #[error("uncertainty: {0}")]
    Uncertainty(#[from] crate::restore::uncertainty::UncertaintyError),
    #[error("--site-uncertainty: {0}")]
    Site(String),
}

fn shape(s: [usize; 3]) -> String {
    format!("{}x{}x{}", s[0], s[1], s[2])
}

/// One method's row of a site acceptance report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SeriesRow {
    /// "input", "gaussian" or "model ID (engine)".
    pub method: String,
    /// Seed metric: MSE improvement vs the reference, % of the input's.
    pub seed_mse: f64,
    /// The same for 1 − SSIM.
    pub seed_dssim: f64,
    /// Body mean against the reference's, %.
    pub body_mean_vs_reference_pct: f64,
}

/// The model's σ checked against the reference (when the package has one).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SeriesUncertainty {
    pub body_voxels: usize,
    /// Share of body voxels where the reference lies within R ± σ (68.3 % if σ is right).
    pub within_1_sigma_pct: f64,
    /// Within R ± 1.96 σ (95 %).
    pub within_1_96_sigma_pct: f64,
    /// Body-mean σ ÷ R, %.
    pub body_sigma_relative_pct: f64,
    /// The site calibration this pair was added to (`--site-uncertainty`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteFit>,
}

/// What `--site-uncertainty` fitted: the site's factor on σ per class after
/// this pair, and the coverage with it on this pair's body voxels.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SiteFit {
    pub file: String,
    pub pairs: usize,
    pub scale: Vec<f64>,
    pub within_1_sigma_pct: f64,
    pub within_1_96_sigma_pct: f64,
    /// Coverage (R ± σ, R ± 1.96 σ, %) on this pair with the file's factor
    /// from the earlier pairs only: the held-out check; `None` for the first pair.
    pub before_this_pair: Option<[f64; 2]>,
}

/// What [`run_series`] measured; `--json` writes it as is, [`series_markdown`] formats it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SeriesReport {
    pub input: String,
    pub reference: String,
    pub input_duration_s: f64,
    pub reference_duration_s: f64,
    /// Ceiling of the seed MSE metric if the frames are nested, %.
    pub ceiling_if_nested: f64,
    pub gaussian_fwhm_mm: f64,
    pub rows: Vec<SeriesRow>,
    pub uncertainty: Option<SeriesUncertainty>,
}

/// Site acceptance on real paired series: a short frame (`input`) and the
/// standard frame it is nested in (`reference`, e.g. 30 s and 90 s rebinned
/// from the same list-mode data). Without truth only the seed metric (vs
/// the reference) and the quantitative agreement can be measured; the
/// ceiling assumes nesting.
pub fn run_series(input: &Path, reference: &Path, engine: Option<Arc<dyn Engine>>, fwhm_mm: f64) -> Result<SeriesReport, EvalError> {
    run_series_with_figures(input, reference, engine, fwhm_mm, None, None)
}

/// [`run_series`], and with `figures` the pictures of the comparison in
/// that folder: a coronal MIP and the axial slice where the reference is
/// hottest, input | each method | reference on one scale. With
/// `site_uncertainty` the pair is added to that site calibration file
/// (created if absent; see [`crate::restore::uncertainty::SiteCalibration`]).
pub fn run_series_with_figures(
    input: &Path,
    reference: &Path,
    engine: Option<Arc<dyn Engine>>,
    fwhm_mm: f64,
    figures: Option<&Path>,
    site_uncertainty: Option<&Path>,
) -> Result<SeriesReport, EvalError> {
    let files = |d: &Path| -> Result<Vec<PathBuf>, EvalError> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|source| EvalError::Folder { path: d.to_owned(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        if v.is_empty() {
            return Err(EvalError::Empty(d.to_owned()));
        }
        Ok(v)
    };
    let a = crate::restore::volume::load(&files(input)?).map_err(|source| EvalError::Load {
        flag: "--input",
        path: input.to_owned(),
        source,
    })?;
    let b = crate::restore::volume::load(&files(reference)?).map_err(|source| EvalError::Load {
        flag: "--reference",
        path: reference.to_owned(),
        source,
    })?;
    let (va, vb) = (&a.volume, &b.volume);
    if (va.nx, va.ny, va.nz) != (vb.nx, vb.ny, vb.nz) || va.spacing.iter().zip(vb.spacing).any(|(x, y)| (x - y).abs() > 1e-3) {
        return Err(EvalError::Grid { input: ([va.nx, va.ny, va.nz], va.spacing), reference: ([vb.nx, vb.ny, vb.nz], vb.spacing) });
    }
    let duration = |l: &crate::restore::volume::LoadedSeries, what: &str| -> Result<f64, EvalError> {
        let s = &l.slices[0];
        crate::dicom::frames::frame_duration_ms(&s.dataset, s.frame).map(|ms| ms / 1000.0).ok_or_else(|| {
            EvalError::NoDuration(match s.frame {
                None => format!("{what} has no Actual Frame Duration (0018,1242)"),
                Some(_) => format!("{what} has no Frame Acquisition Duration (0018,9220) in its Frame Content (0020,9111)"),
            })
        })
    };
    let (d_in, d_ref) = (duration(&a, "--input")?, duration(&b, "--reference")?);
    if d_in >= d_ref {
        return Err(EvalError::Order { input: d_in, reference: d_ref });
    }
    // The site file, checked before the engine runs: a wrong pair or file
    // costs nothing. `None` when there is none yet.
    let label = format!("{} ({d_in:.0} s) vs {} ({d_ref:.0} s)", input.display(), reference.display());
    let mut site_before = None;
    if let Some(f) = site_uncertainty {
        let (Some(e), Some(cal)) = (engine.as_ref(), engine.as_ref().and_then(|e| e.uncertainty())) else {
            return Err(EvalError::Site(format!(
                "{} cannot be fitted without a model whose package has an [uncertainty] calibration: give --model DIR",
                f.display()
            )));
        };
        if (d_ref - 90.0).abs() > 1.0 {
            return Err(EvalError::Site(format!(
                "σ predicts the 90 s image; the reference is {d_ref:.0} s: give the 90 s frame as --reference"
            )));
        }
        if f.exists() {
            let s = crate::restore::uncertainty::SiteCalibration::load(f).map_err(EvalError::Site)?;
            s.check(&e.model_id(), &cal).map_err(|e| EvalError::Site(format!("{}: {e}", f.display())))?;
            if s.pairs.contains(&label) {
                return Err(EvalError::Site(format!("{} already holds this pair ({label}): each pair is added once", f.display())));
            }
            site_before = Some(s);
        }
    }
    let mut input_vol = va.clone();
    input_vol.frame_duration_s = Some(d_in);
    let range = vb.data.iter().copied().fold(0.0f32, f32::max) as f64;
    let body_mean = |v: &Volume| {
        let t = range as f32 * 0.05;
        let (s, n) = vb.data.iter().zip(&v.data).filter(|(r, _)| **r > t).fold((0.0f64, 0usize), |(s, n), (_, x)| (s + *x as f64, n + 1));
        s / n.max(1) as f64
    };
    let (mse_short, dssim_short) = (mse(&va.data, &vb.data), 1.0 - ssim(va, vb, range));
    let mut rows = vec![SeriesRow {
        method: "input".into(),
        seed_mse: 0.0,
        seed_dssim: 0.0,
        body_mean_vs_reference_pct: 100.0 * (body_mean(va) / body_mean(vb) - 1.0),
    }];
    let mut outs = vec![("gaussian".to_string(), gaussian::filter(&input_vol, fwhm_mm))];
    let mut variance = None;
    if let Some(e) = &engine {
        let (r, var) = e.run_with_variance(&input_vol)?;
        variance = var;
        outs.push((format!("model {} ({})", e.model_id(), e.label()), r));
    }
    if let Some(dir) = figures {
        draw(dir, &input_vol, &outs, vb).map_err(|source| EvalError::Figures { dir: dir.to_owned(), source })?;
    }
    for (name, v) in &outs {
        rows.push(SeriesRow {
            method: name.clone(),
            seed_mse: improvement(mse(&v.data, &vb.data), mse_short),
            seed_dssim: improvement(1.0 - ssim(v, vb, range), dssim_short),
            body_mean_vs_reference_pct: 100.0 * (body_mean(v) / body_mean(vb) - 1.0),
        });
    }
    // The model's uncertainty (σ: 1 SD of a 90 s scan minus the restored
    // image), checked against the reference where the package has one.
    let mut uncertainty = None;
    if let (Some(e), Some((_, restored))) = (&engine, outs.get(1))
        && let Some(cal) = e.uncertainty()
    {
        let sigma = cal.sigma(&input_vol, restored, variance.as_ref())?;
        let t = crate::restore::uncertainty::body_mean(restored) * 0.5;
        let body: Vec<usize> = (0..restored.data.len()).filter(|&i| restored.data[i] > t).collect();
        let n = body.len().max(1) as f64;
        let within =
            |z: f32| body.iter().filter(|&&i| (vb.data[i] - restored.data[i]).abs() <= z * sigma.data[i]).count() as f64 / n * 100.0;
        let (ss, sr) = body.iter().fold((0.0f64, 0.0f64), |(a, b), &i| (a + sigma.data[i] as f64, b + restored.data[i] as f64));
        let mut site = None;
        if let Some(f) = site_uncertainty {
            let class = crate::restore::uncertainty::classes(restored, &cal.class_edges);
            let within_scaled = |z: f32, scale: &[f64]| {
                body.iter()
                    .filter(|&&i| (vb.data[i] - restored.data[i]).abs() <= z * sigma.data[i] * scale[class[i] as usize] as f32)
                    .count() as f64
                    / n
                    * 100.0
            };
            // the file's factor before this pair: a held-out check of it
            let held_out = site_before.as_ref().map(|s| [within_scaled(1.0, &s.scale), within_scaled(1.96, &s.scale)]);
            let mut cal_site = site_before.take().unwrap_or_else(|| crate::restore::uncertainty::SiteCalibration::new(&e.model_id(), &cal));
            cal_site.add(&cal, restored, &sigma, vb, &label);
            cal_site.save(f).map_err(EvalError::Site)?;
            site = Some(SiteFit {
                file: f.display().to_string(),
                pairs: cal_site.pairs.len(),
                within_1_sigma_pct: within_scaled(1.0, &cal_site.scale),
                within_1_96_sigma_pct: within_scaled(1.96, &cal_site.scale),
                before_this_pair: held_out,
                scale: cal_site.scale.clone(),
            });
        }
        uncertainty = Some(SeriesUncertainty {
            body_voxels: body.len(),
            within_1_sigma_pct: within(1.0),
            within_1_96_sigma_pct: within(1.96),
            body_sigma_relative_pct: 100.0 * ss / sr.max(f64::MIN_POSITIVE),
            site,
        });
    }
    Ok(SeriesReport {
        input: input.display().to_string(),
        reference: reference.display().to_string(),
        input_duration_s: d_in,
        reference_duration_s: d_ref,
        ceiling_if_nested: 100.0 * (1.0 - d_in / d_ref),
        gaussian_fwhm_mm: fwhm_mm,
        rows,
        uncertainty,
    })
}

/// [`run_series`]'s report as Markdown.
pub fn series_markdown(r: &SeriesReport) -> String {
    let mut o = format!(
        "Input {} ({} s) vs reference {} ({} s). Ceiling of the seed MSE metric if the frames are nested: {:.1} %.\n\n| method | seed MSE % | seed 1−SSIM % | body mean vs reference % |\n|---|---|---|---|\n",
        r.input, r.input_duration_s, r.reference, r.reference_duration_s, r.ceiling_if_nested
    );
    for row in &r.rows {
        o.push_str(&format!("| {} | {:.1} | {:.1} | {:+.2} |\n", row.method, row.seed_mse, row.seed_dssim, row.body_mean_vs_reference_pct));
    }
    if let Some(u) = &r.uncertainty {
        let d_ref = r.reference_duration_s;
        o.push_str(&format!(
            "\nUncertainty (σ, 1 SD of a 90 s scan minus the restored image; body σ {:.1} % of the restored value): the reference \
             lies within restored ± σ in {:.1} % of {} body voxels (68.3 % if σ is right) and within ± 1.96 σ in {:.1} % (95 %).{}\n",
            u.body_sigma_relative_pct,
            u.within_1_sigma_pct,
            u.body_voxels,
            u.within_1_96_sigma_pct,
            if (d_ref - 90.0).abs() > 1.0 {
                format!(" The reference is {d_ref:.0} s, not 90 s: its own noise differs from the 90 s scan σ predicts, so expect coverage to differ.")
            } else {
                String::new()
            }
        ));
        if let Some(f) = &u.site {
            let scale: Vec<String> = f.scale.iter().map(|s| format!("{s:.3}")).collect();
            let held_out = match f.before_this_pair {
                Some([a, b]) => format!(" Before this pair was added, the file's factor covered it (held out) in {a:.1} % / {b:.1} %."),
                None => String::new(),
            };
            o.push_str(&format!(
                "\nSite calibration {} ({} pair{}): factor on σ per intensity class ({}) = [{}]; with it the reference lies within \
                 restored ± σ in {:.1} % and within ± 1.96 σ in {:.1} % of this pair's body voxels (in sample).{held_out} Name the \
                 file in restore.uncertainty_site to use it.\n",
                f.file,
                f.pairs,
                if f.pairs == 1 { "" } else { "s" },
                crate::restore::uncertainty::CLASS_NAMES.join(", "),
                scale.join(", "),
                f.within_1_sigma_pct,
                f.within_1_96_sigma_pct
            ));
        }
    }
    o
}

/// The pictures of [`run_series_with_figures`]; the scale is 0 to the
/// reference's 99.99th percentile (Bq/ml).
fn draw(dir: &Path, input: &Volume, outs: &[(String, Volume)], reference: &Volume) -> std::io::Result<()> {
    use crate::figures;
    std::fs::create_dir_all(dir)?;
    let mut vols: Vec<&Volume> = vec![input];
    vols.extend(outs.iter().map(|(_, v)| v));
    vols.push(reference);
    let mut sorted: Vec<f32> = reference.data.iter().copied().step_by(3).collect();
    sorted.sort_by(f32::total_cmp);
    let top = sorted.get((sorted.len().saturating_sub(1) as f64 * 0.9999) as usize).copied().unwrap_or(1.0).max(1e-6);
    let mm = reference.spacing[0].min(reference.spacing[2]);
    let zoom = (512 / reference.nx.max(1)).clamp(1, 4);
    let mips: Vec<figures::Image> = vols.iter().map(|v| figures::coronal_mip(v, mm)).collect();
    figures::panels(&mips, top, zoom).write(&dir.join("coronal-mip.png"))?;
    let plane = reference.nx * reference.ny;
    let hottest = reference.data.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i / plane.max(1)).unwrap_or(0);
    let slices: Vec<figures::Image> = vols.iter().map(|v| figures::axial(v, hottest, reference.spacing[0])).collect();
    figures::panels(&slices, top, zoom).write(&dir.join("axial-hottest.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_typed_report_is_what_json_and_markdown_show() {
        let mut r = SeriesReport {
            input: "short".into(),
            reference: "standard".into(),
            input_duration_s: 30.0,
            reference_duration_s: 90.0,
            ceiling_if_nested: 66.7,
            gaussian_fwhm_mm: 6.0,
            rows: vec![SeriesRow { method: "input".into(), seed_mse: 0.0, seed_dssim: 0.0, body_mean_vs_reference_pct: 0.4 }],
            uncertainty: Some(SeriesUncertainty {
                body_voxels: 1000,
                within_1_sigma_pct: 70.1,
                within_1_96_sigma_pct: 95.2,
                body_sigma_relative_pct: 8.8,
                site: None,
            }),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!((v["rows"][0]["method"].as_str(), v["uncertainty"]["body_voxels"].as_u64()), (Some("input"), Some(1000)));
        let md = series_markdown(&r);
        assert!(md.contains("| input | 0.0 | 0.0 | +0.40 |") && md.contains("within restored ± σ in 70.1 % of 1000 body voxels"), "{md}");
        assert!(!md.contains("not 90 s"));
        r.reference_duration_s = 60.0;
        r.uncertainty.as_mut().unwrap().body_voxels = 5;
        assert!(series_markdown(&r).contains("The reference is 60 s, not 90 s"));
        r.uncertainty = None;
        assert!(serde_json::to_value(&r).unwrap()["uncertainty"].is_null(), "no σ: null, as before");
        assert!(!series_markdown(&r).contains("Uncertainty"));
    }
}
