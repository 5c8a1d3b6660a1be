//! The restored image's σ on simulated studies, where PET90 is known:
//! fitting its calibration (`petlab calibrate`, on the validation grid) and
//! measuring its coverage (`petlab eval`): does PET90 fall within R ± σ
//! (68 %) and R ± 1.96 σ (95 %) as often as it should, per tissue and per
//! lesion (SUVmean intervals).

use std::collections::BTreeMap;
use std::path::Path;

use petrestore::eval::metrics::sphere_voxels;
use petrestore::restore::uncertainty::{self as unc, Calibration};
use petrestore::restore::{Engine, Volume};
use serde_json::{Value, json};

use crate::eval::{PET90, Study, TRUTH};

/// Tissues coverage is reported for, from the truth: lesions (their
/// spheres), hot organs (≥ 2.5 × the body mean, e.g. bladder, kidneys,
/// heart, brain), lungs (inside the body below 0.5 × the body mean) and the
/// rest of the body.
pub const TISSUES: [&str; 4] = ["body", "hot", "lesion", "lung"];
/// z of the central 68.27 % and 95 % intervals of a normal distribution.
pub const Z68: f64 = 1.0;
pub const Z95: f64 = 1.96;
/// The reliability diagram's nominal central-interval levels (%) and their
/// z = Φ⁻¹((1 + p) / 2).
pub const LEVELS: [(u32, f64); 9] =
    [(10, 0.1257), (20, 0.2533), (30, 0.3853), (40, 0.5244), (50, 0.6745), (60, 0.8416), (70, 1.0364), (80, 1.2816), (90, 1.6449)];

/// Coverage on one restored image.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Coverage {
    /// Per tissue: [voxels, within 1 σ, within 1.96 σ].
    pub tissue: BTreeMap<String, [f64; 3]>,
    /// Per lesion: [diameter mm, |mean R − mean PET90| ÷ mean σ over its sphere].
    pub lesion_means: Vec<[f64; 2]>,
    /// Mean σ ÷ mean R over the body (%).
    pub body_relative_sd_pct: f64,
    /// RMS σ ÷ RMS(PET90 − oracle) over the body: σ against the simulator's
    /// own conditional SD of PET90 given the short frame (what a perfect
    /// denoiser's calibrated σ would be); 1 is the sharpest honest σ.
    pub body_sigma_over_conditional_sd: f64,
    /// Per [`LEVELS`] entry: [voxels inside the body, within z·σ].
    pub reliability: Vec<[f64; 2]>,
}

/// Tissue of every voxel (index into [`TISSUES`]), `None` outside the body.
pub fn tissues(st: &Study) -> Vec<Option<u8>> {
    let truth = &st.planes[TRUTH];
    let top = truth.data.iter().copied().fold(0.0f32, f32::max);
    let inside = |t: f32| t > 0.02 * top;
    let body: Vec<f32> = truth.data.iter().copied().filter(|t| *t > 0.05 * top).collect();
    let m = body.iter().map(|t| *t as f64).sum::<f64>() / body.len().max(1) as f64;
    let mut out: Vec<Option<u8>> = truth
        .data
        .iter()
        .map(|t| {
            let t = *t as f64;
            if !inside(t as f32) {
                None
            } else if t >= 2.5 * m {
                Some(1)
            } else if t < 0.5 * m {
                Some(3)
            } else {
                Some(0)
            }
        })
        .collect();
    for (dia, c, _, _) in st.lesions() {
        for i in sphere_voxels(truth, c, dia / 2.0) {
            out[i] = Some(2);
        }
    }
    out
}

/// Coverage of `sigma` for the restored `r` against the study's PET90;
/// `oracle` is the perfect denoiser's image of the same frame
/// ([`crate::eval::oracle`]), whose error is PET90's conditional spread.
pub fn coverage(st: &Study, r: &Volume, sigma: &Volume, oracle: &Volume) -> Coverage {
    let p90 = &st.planes[PET90];
    let tis = tissues(st);
    let mut c = Coverage::default();
    for name in TISSUES {
        c.tissue.insert(name.into(), [0.0; 3]);
    }
    let (mut sr, mut ss) = (0.0f64, 0.0f64);
    let (mut s2, mut o2) = (0.0f64, 0.0f64);
    c.reliability = vec![[0.0; 2]; LEVELS.len()];
    for (i, t) in tis.iter().enumerate() {
        let Some(t) = *t else { continue };
        let (e, s) = ((p90.data[i] - r.data[i]).abs() as f64, sigma.data[i] as f64);
        for (acc, (_, z)) in c.reliability.iter_mut().zip(LEVELS) {
            acc[0] += 1.0;
            acc[1] += (e <= z * s) as u8 as f64;
        }
        let acc = c.tissue.get_mut(TISSUES[t as usize]).expect("every tissue inserted");
        acc[0] += 1.0;
        acc[1] += (e <= Z68 * s) as u8 as f64;
        acc[2] += (e <= Z95 * s) as u8 as f64;
        if t != 3 {
            sr += r.data[i] as f64;
            ss += s;
            s2 += s * s;
            o2 += ((p90.data[i] - oracle.data[i]) as f64).powi(2);
        }
    }
    c.body_relative_sd_pct = 100.0 * ss / sr.max(f64::MIN_POSITIVE);
    c.body_sigma_over_conditional_sd = (s2 / o2.max(f64::MIN_POSITIVE)).sqrt();
    for (dia, centre, _, _) in st.lesions() {
        let idx = sphere_voxels(r, centre, dia / 2.0);
        let mean = |v: &Volume| idx.iter().map(|i| v.data[*i] as f64).sum::<f64>() / idx.len().max(1) as f64;
        let (mr, mp, ms) = (mean(r), mean(p90), mean(sigma));
        c.lesion_means.push([dia, (mr - mp).abs() / ms.max(f64::MIN_POSITIVE)]);
    }
    c
}

/// Flat summary keys for `method` at duration `d`, pooled over `covs`.
pub fn summarise(covs: &[&Coverage], d: u32, method: &str, s: &mut BTreeMap<String, f64>) {
    if covs.is_empty() {
        return;
    }
    for name in TISSUES {
        let [n, a, b] =
            covs.iter().filter_map(|c| c.tissue.get(name)).fold([0.0; 3], |acc, x| [acc[0] + x[0], acc[1] + x[1], acc[2] + x[2]]);
        if n > 0.0 {
            s.insert(format!("unc_cov68_{name}_{d}_{method}"), 100.0 * a / n);
            s.insert(format!("unc_cov95_{name}_{d}_{method}"), 100.0 * b / n);
        }
    }
    let ls: Vec<f64> = covs.iter().flat_map(|c| c.lesion_means.iter().filter(|l| l[0] >= 10.0).map(|l| l[1])).collect();
    if !ls.is_empty() {
        let n = ls.len() as f64;
        s.insert(format!("unc_lesion_mean_cov68_{d}_{method}"), 100.0 * ls.iter().filter(|z| **z <= Z68).count() as f64 / n);
        s.insert(format!("unc_lesion_mean_cov95_{d}_{method}"), 100.0 * ls.iter().filter(|z| **z <= Z95).count() as f64 / n);
        s.insert(format!("unc_lesion_count_{d}_{method}"), n);
    }
    for (k, (p, _)) in LEVELS.iter().enumerate() {
        let [n, w] = covs.iter().filter_map(|c| c.reliability.get(k)).fold([0.0; 2], |a, x| [a[0] + x[0], a[1] + x[1]]);
        if n > 0.0 {
            s.insert(format!("unc_reliability_{p}_{d}_{method}"), 100.0 * w / n);
        }
    }
    s.insert(format!("unc_body_relative_sd_{d}_{method}"), covs.iter().map(|c| c.body_relative_sd_pct).sum::<f64>() / covs.len() as f64);
    s.insert(
        format!("unc_body_sharpness_{d}_{method}"),
        covs.iter().map(|c| c.body_sigma_over_conditional_sd).sum::<f64>() / covs.len() as f64,
    );
}

/// One restored frame of the validation grid, as the calibration sees it.
pub struct Frame {
    /// The cell of the site matrix it belongs to.
    pub cell: &'static str,
    /// Its texture descriptors, in the order of `restore::texture::KNOWN`.
    pub descriptors: Vec<f64>,
    /// Per intensity class of R: (e², noise term, texture term, tissue) of
    /// every third voxel inside the body (tissue: index into [`TISSUES`]);
    /// for a network with a σ head, (e², its variance output, 0, tissue).
    pub samples: Vec<Vec<[f32; 4]>>,
    /// Whether the samples carry the σ head's variance (not the analytic terms).
    pub head: bool,
}

/// Restore every study of the grid's cells (validation studies only) at
/// 30 s and 60 s and collect what the calibration is fitted on: the
/// analytic terms, or with `head` the network's variance output.
pub fn frames(grid: &Path, engine: &dyn Engine, window_mm: f64, texture_mm: f64, head: bool) -> Result<Vec<Frame>, String> {
    let edges = unc::DEFAULT_CLASS_EDGES.to_vec();
    let known: Vec<String> = petrestore::restore::texture::KNOWN.iter().map(|s| s.to_string()).collect();
    let mut out = Vec::new();
    let mut studies = 0;
    for cell in petsim::sites::SITE_MATRIX.iter() {
        let dir = grid.join(cell.name);
        if !dir.is_dir() {
            continue;
        }
        for p in crate::eval::studies_in(&dir)? {
            let st = Study::load(&p)?;
            if st.meta["split"].as_str() == Some("test") {
                return Err(format!("{}: the calibration is fitted on validation studies, never on the test split", st.name));
            }
            if st.is_nema() {
                continue; // fitted on patients; NEMA phantoms are measured, not fitted on
            }
            studies += 1;
            let tis = tissues(&st);
            for d in crate::eval::DURATIONS {
                let short = st.short(d).clone();
                let (r, var) = if head {
                    let (r, var) = engine.run_with_variance(&short).map_err(|e| format!("{}: {e}", st.name))?;
                    (r, Some(var.ok_or_else(|| format!("{}: the engine gave no variance output", st.name))?))
                } else {
                    (engine.run(&short).map_err(|e| format!("{}: {e}", st.name))?, None)
                };
                let t = if head { None } else { Some(unc::terms(&short, &r, window_mm, texture_mm).map_err(|e| e.to_string())?) };
                let descriptors = petrestore::restore::texture::describe(&short, &known, 0.05, unc::body_mean(&short))?
                    .into_iter()
                    .map(f64::from)
                    .collect();
                let class = unc::classes(&r, &edges);
                let p90 = &st.planes[PET90];
                let mut samples = vec![Vec::new(); edges.len() + 1];
                for i in (0..r.data.len()).step_by(3) {
                    let (x1, x2) = match (&var, &t) {
                        (Some(v), _) => (v.data[i].max(0.0), 0.0),
                        (None, Some(t)) => (t.noise[i], t.texture[i]),
                        (None, None) => unreachable!("terms are computed without a variance"),
                    };
                    if let Some(k) = tis[i]
                        && x1 + x2 > 0.0
                    {
                        let e = p90.data[i] - r.data[i];
                        samples[class[i] as usize].push([e * e, x1, x2, k as f32]);
                    }
                }
                out.push(Frame { cell: cell.name, descriptors, samples, head });
            }
            eprintln!("calibrate: {} ({studies} studies)", st.name);
        }
    }
    if out.is_empty() {
        return Err(format!(
            "{} holds no cell of the site matrix with studies: make it with `petlab dataset --split val --site all`",
            grid.display()
        ));
    }
    Ok(out)
}

/// Fit the calibration on `frames`. Per intensity class of R: the weights
/// (a, b) of the noise and texture terms that maximise the Gaussian
/// likelihood of PET90 − R (for frames with a σ head's variance V: the
/// weight on V, mean of e² ÷ V, written as `head`); with `descriptors`, also the per-frame factor
/// exp(c₀ + Σ cⱼ·tⱼ) on σ² (least squares of ln of each frame's own
/// maximum-likelihood factor on the descriptors, alternated with the class
/// weights three times); then one factor per class on both weights so that
/// R ± σ holds PET90 in 68.27 % of its voxels. Returns the calibration
/// (without `fitted_on`) and per class: voxels, weights, the 95 % coverage
/// that follows.
pub fn fit_frames(frames: &[&Frame], window_mm: f64, texture_mm: f64, descriptors: bool) -> Result<(Calibration, Vec<Value>), String> {
    let edges = unc::DEFAULT_CLASS_EDGES.to_vec();
    let names: Vec<String> =
        if descriptors { petrestore::restore::texture::KNOWN.iter().map(|s| s.to_string()).collect() } else { Vec::new() };
    for (k, name) in unc::CLASS_NAMES.iter().enumerate() {
        let n: usize = frames.iter().map(|f| f.samples[k].len()).sum();
        if n < 100 {
            return Err(format!("class {name} has only {n} voxels: too few to fit"));
        }
    }
    let head = frames.first().is_some_and(|f| f.head);
    if frames.iter().any(|f| f.head != head) {
        return Err("frames with a σ head's variance and frames with the analytic terms cannot be fitted together".into());
    }
    // the Gaussian likelihood's weights: on V alone in closed form, else (a, b) on N and T
    let ml = |v: &[[f32; 4]]| -> (f64, f64) {
        if head { (v.iter().map(|s| s[0] as f64 / s[1] as f64).sum::<f64>() / v.len().max(1) as f64, 0.0) } else { max_likelihood(v) }
    };
    let mut coef: Vec<f64> = if descriptors { vec![0.0; names.len() + 1] } else { Vec::new() };
    let scale_of = |coef: &[f64], f: &Frame| unc::log_frame_scale(coef, &f.descriptors).exp();
    let class_samples = |coef: &[f64], k: usize| -> Vec<[f32; 4]> {
        frames
            .iter()
            .flat_map(|f| {
                let s = scale_of(coef, f) as f32;
                f.samples[k].iter().map(move |v| [v[0], s * v[1], s * v[2], v[3]])
            })
            .collect()
    };
    let mut weights: Vec<(f64, f64)> = (0..edges.len() + 1).map(|k| ml(&class_samples(&coef, k))).collect();
    if descriptors {
        for _ in 0..3 {
            // each frame's maximum-likelihood factor on the current σ², then
            // ln of it on the descriptors (ridge 1e-3 keeps it defined)
            let rows: Vec<(Vec<f64>, f64)> = frames
                .iter()
                .map(|f| {
                    let s = scale_of(&coef, f);
                    let (mut acc, mut n) = (0.0f64, 0usize);
                    for (k, v) in f.samples.iter().enumerate() {
                        let (a, b) = weights[k];
                        for x in v {
                            acc += x[0] as f64 / (s * (a * x[1] as f64 + b * x[2] as f64)).max(1e-30);
                            n += 1;
                        }
                    }
                    let mut t = vec![1.0];
                    t.extend(&f.descriptors);
                    (t, (s * acc / n.max(1) as f64).max(1e-30).ln())
                })
                .collect();
            coef = least_squares(&rows, 1e-3);
            weights = (0..edges.len() + 1).map(|k| ml(&class_samples(&coef, k))).collect();
        }
    }
    let (mut noise, mut texture, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for (k, (a, b)) in weights.into_iter().enumerate() {
        let v = class_samples(&coef, k);
        // one factor on both: 68.27 % of the voxels within R ± σ
        let mut z: Vec<f64> = v.iter().map(|s| (s[0] as f64 / (a * s[1] as f64 + b * s[2] as f64).max(1e-30)).sqrt()).collect();
        z.sort_by(f64::total_cmp);
        let q = |p: f64| z[((z.len() - 1) as f64 * p) as usize];
        let f = q(0.6827);
        let cov95 = 100.0 * z.iter().filter(|x| **x <= Z95 * f).count() as f64 / z.len() as f64;
        let round = |x: f64| (x * f * f * 1e4).round() / 1e4;
        noise.push(round(a));
        texture.push(round(b));
        rows.push(json!({"class": unc::CLASS_NAMES[k], "voxels": v.len(), "noise": round(a), "texture": round(b), "cov95_after": cov95}));
    }
    let (noise, texture, head) = if head { (vec![0.0; noise.len()], vec![0.0; noise.len()], noise) } else { (noise, texture, Vec::new()) };
    let cal = Calibration {
        window_mm,
        texture_mm,
        class_edges: edges,
        noise,
        texture,
        fitted_on: String::new(),
        descriptors: names,
        descriptor_coef: coef.iter().map(|c| (c * 1e4).round() / 1e4).collect(),
        head,
        site_scale: Vec::new(),
    };
    cal.check().map_err(|e| e.to_string())?;
    Ok((cal, rows))
}

/// Fit the calibration on every frame of the grid (see [`frames`],
/// [`fit_frames`]).
pub fn fit(grid: &Path, all: &[Frame], window_mm: f64, texture_mm: f64, descriptors: bool) -> Result<(Calibration, Value), String> {
    let refs: Vec<&Frame> = all.iter().collect();
    let (mut cal, rows) = fit_frames(&refs, window_mm, texture_mm, descriptors)?;
    let mut cells: Vec<&str> = all.iter().map(|f| f.cell).collect();
    cells.dedup();
    cal.fitted_on = format!(
        "validation grid, cells {}, {} studies, 30 s and 60 s (petlab calibrate{}{})",
        cells.join(" "),
        all.len() / crate::eval::DURATIONS.len(),
        if descriptors { " --descriptors" } else { "" },
        if cal.uses_variance() { ", on the σ head's variance" } else { "" }
    );
    Ok((cal, json!({"grid": grid.display().to_string(), "studies": all.len() / crate::eval::DURATIONS.len(), "classes": rows})))
}

/// Coverage (%) of R ± σ and R ± 1.96 σ for the samples of `frames` in
/// `tissue` under `cal`: [68, 95].
pub fn frame_coverage(frames: &[&Frame], cal: &Calibration, tissue: u8) -> [f64; 2] {
    let (mut n, mut a, mut b) = (0.0, 0.0, 0.0);
    for f in frames {
        let s = unc::log_frame_scale(&cal.descriptor_coef, &f.descriptors).exp();
        for (k, v) in f.samples.iter().enumerate() {
            // frames with a σ head carry V where the noise term would be
            let h = cal.head.get(k).copied().unwrap_or(0.0);
            for x in v.iter().filter(|x| x[3] as u8 == tissue) {
                let sd = (s * ((cal.noise[k] + h) * x[1] as f64 + cal.texture[k] * x[2] as f64)).max(0.0).sqrt();
                let e = (x[0] as f64).sqrt();
                n += 1.0;
                a += (e <= Z68 * sd) as u8 as f64;
                b += (e <= Z95 * sd) as u8 as f64;
            }
        }
    }
    if n > 0.0 { [100.0 * a / n, 100.0 * b / n] } else { [f64::NAN; 2] }
}

/// Leave one cell out: for every cell, fit on the other cells' frames
/// (with and without descriptors) and measure coverage on the cell left
/// out, in body and hot-organ voxels ("—" where the cell has none). This
/// is how a reconstruction the calibration never saw is served. With
/// `current`, the package's own calibration (fitted on none of these
/// frames) is measured on each cell beside them. Returns a markdown table.
pub fn cross_validate(all: &[Frame], window_mm: f64, texture_mm: f64, current: Option<&Calibration>) -> Result<String, String> {
    let mut cells: Vec<&str> = all.iter().map(|f| f.cell).collect();
    cells.dedup();
    let mut o = String::from(
        "| cell left out | body 68 / 95 %, class weights | body 68 / 95 %, with descriptors | hot 68 / 95 %, class weights | hot 68 / 95 %, with descriptors |",
    );
    o.push_str(if current.is_some() {
        " body 68 / 95 %, the package's own |\n|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|---|\n"
    });
    let mut worst = [[0.0f64; 2]; 3];
    for cell in &cells {
        let train: Vec<&Frame> = all.iter().filter(|f| f.cell != *cell).collect();
        let held: Vec<&Frame> = all.iter().filter(|f| f.cell == *cell).collect();
        let mut cols = vec![String::new(); 4];
        for (j, descriptors) in [false, true].into_iter().enumerate() {
            let (cal, _) = fit_frames(&train, window_mm, texture_mm, descriptors)?;
            for tissue in [0u8, 1] {
                let c = frame_coverage(&held, &cal, tissue);
                if tissue == 0 {
                    worst[j][0] = worst[j][0].max((c[0] - 68.27).abs());
                    worst[j][1] = worst[j][1].max((c[1] - 95.0).abs());
                }
                cols[2 * tissue as usize + j] = if c[0].is_nan() { "—".into() } else { format!("{:.1} / {:.1}", c[0], c[1]) };
            }
        }
        if let Some(cal) = current {
            let c = frame_coverage(&held, cal, 0);
            worst[2][0] = worst[2][0].max((c[0] - 68.27).abs());
            worst[2][1] = worst[2][1].max((c[1] - 95.0).abs());
            cols.push(format!("{:.1} / {:.1}", c[0], c[1]));
        }
        o.push_str(&format!("| {cell} | {} |\n", cols.join(" | ")));
    }
    o.push_str(&format!(
        "\nworst body distance from nominal (68.27 / 95 %), points: class weights {:.1} / {:.1}; with descriptors {:.1} / {:.1}",
        worst[0][0], worst[0][1], worst[1][0], worst[1][1]
    ));
    if current.is_some() {
        o.push_str(&format!("; the package's own {:.1} / {:.1}", worst[2][0], worst[2][1]));
    }
    o.push('\n');
    Ok(o)
}

/// Ridge least squares: coefficients β minimising Σ (t·β − y)² + λ|β|²
/// (λ not on the first, the intercept), by Gaussian elimination.
fn least_squares(rows: &[(Vec<f64>, f64)], lambda: f64) -> Vec<f64> {
    let p = rows.first().map_or(0, |r| r.0.len());
    let mut m = vec![vec![0.0f64; p + 1]; p];
    for (t, y) in rows {
        for i in 0..p {
            for j in 0..p {
                m[i][j] += t[i] * t[j];
            }
            m[i][p] += t[i] * y;
        }
    }
    for (i, row) in m.iter_mut().enumerate().skip(1) {
        row[i] += lambda * rows.len() as f64;
    }
    for c in 0..p {
        let piv = (c..p).max_by(|a, b| m[*a][c].abs().total_cmp(&m[*b][c].abs())).unwrap_or(c);
        m.swap(c, piv);
        let d = m[c][c];
        if d.abs() < 1e-300 {
            continue;
        }
        let pivot = m[c].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / d;
                for (x, y) in row.iter_mut().zip(&pivot).skip(c) {
                    *x -= f * y;
                }
            }
        }
    }
    (0..p).map(|i| if m[i][i].abs() < 1e-300 { 0.0 } else { m[i][p] / m[i][i] }).collect()
}

/// (a, b) ≥ 0 minimising the Gaussian negative log-likelihood
/// Σ ln σ² + e²/σ² with σ² = a·N + b·T, on a logarithmic grid refined twice.
fn max_likelihood(v: &[[f32; 4]]) -> (f64, f64) {
    let nll = |a: f64, b: f64| -> f64 {
        v.iter()
            .map(|s| {
                let var = (a * s[1] as f64 + b * s[2] as f64).max(1e-30);
                var.ln() + s[0] as f64 / var
            })
            .sum()
    };
    let grid = |c: f64, span: f64| -> Vec<f64> {
        let mut g: Vec<f64> = (0..=16).map(|i| c * (span * (i as f64 / 8.0 - 1.0)).exp()).collect();
        g.push(0.0);
        g
    };
    let (mut a, mut b) = (1.0, 1.0);
    for span in [4.6, 1.0, 0.25] {
        let mut best = (f64::INFINITY, a, b);
        for &x in &grid(if a > 0.0 { a } else { 1e-2 }, span) {
            for &y in &grid(if b > 0.0 { b } else { 1e-2 }, span) {
                if x + y <= 0.0 {
                    continue;
                }
                let l = nll(x, y);
                if l < best.0 {
                    best = (l, x, y);
                }
            }
        }
        (a, b) = (best.1, best.2);
    }
    (a, b)
}

/// `model.toml` with its `[uncertainty]` table replaced by `cal`.
pub fn with_calibration(toml_text: &str, cal: &Calibration) -> String {
    let mut out = String::new();
    let mut skip = false;
    for line in toml_text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            skip = t.starts_with("[uncertainty]");
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    let f = |v: &[f64]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(", ");
    out.push_str(&format!(
        "\n[uncertainty]\n# per-voxel σ of PET90 − R: σ² = noise[c] · w/(1 − w) · G ∗ (x − R)² + texture[c] · (1 − w)² · G ∗ (R − G_t ∗ R)²,\n\
         # w = duration / 90 s, G a Gaussian of window_mm, G_t of texture_mm, c the class of R ÷ its body mean\n\
         # (edges below); fitted by `petlab calibrate`. See docs/QUALITY.md \"Uncertainty\".\n\
         window_mm = {}\ntexture_mm = {}\nclass_edges = [{}]\nnoise = [{}]\ntexture = [{}]\nfitted_on = {:?}\n",
        cal.window_mm,
        cal.texture_mm,
        f(&cal.class_edges),
        f(&cal.noise),
        f(&cal.texture),
        cal.fitted_on
    ));
    if !cal.head.is_empty() {
        out.push_str(&format!(
            "# plus head[c] · V, V the network's variance output (io.variance), fitted on it by `petlab calibrate`\nhead = [{}]\n",
            f(&cal.head)
        ));
    }
    if !cal.descriptors.is_empty() {
        out.push_str(&format!(
            "# σ² times exp(c0 + Σ cj·tj) per frame, tj its texture descriptors (petlab calibrate --descriptors)\n\
             descriptors = [{}]\ndescriptor_coef = [{}]\n",
            cal.descriptors.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(", "),
            f(&cal.descriptor_coef)
        ));
    }
    out
}

/// The cells of one row of the coverage table (after the row's label):
/// each tissue's 68 / 95 % coverage, the lesion SUVmean intervals', the
/// body σ ÷ R and σ ÷ PET90's conditional SD, read from a summary by `get`.
pub fn coverage_cells(get: &dyn Fn(&str) -> Option<f64>, d: u32) -> String {
    let pair = |a: String, b: String| match (get(&a), get(&b)) {
        (Some(x), Some(y)) => format!("{x:.1} / {y:.1}"),
        _ => "—".into(),
    };
    let mut o = String::new();
    for t in TISSUES {
        o.push_str(&format!(" {} |", pair(format!("unc_cov68_{t}_{d}_model"), format!("unc_cov95_{t}_{d}_model"))));
    }
    let one = |k: String, digits: usize| get(&k).map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "—".into());
    o.push_str(&format!(
        " {} | {} | {} |\n",
        pair(format!("unc_lesion_mean_cov68_{d}_model"), format!("unc_lesion_mean_cov95_{d}_model")),
        one(format!("unc_body_relative_sd_{d}_model"), 1),
        one(format!("unc_body_sharpness_{d}_model"), 2)
    ));
    o
}

/// The reliability diagram of one summary (a cell, or a dataset): observed
/// against nominal coverage of the central intervals, 10 % to 90 %, inside
/// the body; grey the diagonal (a calibrated σ), red 30 s, blue 60 s.
/// Returns false when the summary has no uncertainty.
pub fn reliability_png(summary: &Value, path: &Path) -> std::io::Result<bool> {
    let get = |k: String| summary.get(&k).and_then(Value::as_f64);
    let mut curves = vec![LEVELS.iter().map(|(p, _)| *p as f32).collect::<Vec<f32>>()];
    for d in [30, 60] {
        let c: Option<Vec<f32>> = LEVELS.iter().map(|(p, _)| get(format!("unc_reliability_{p}_{d}_model")).map(|v| v as f32)).collect();
        match c {
            Some(c) => curves.push(c),
            None => return Ok(false),
        }
    }
    petrestore::figures::profile_plot(&curves, 100.0, path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharpness_is_sigma_against_the_perfect_denoisers_error() {
        // a uniform body; PET90 = 1000 ± 10 around the oracle, σ = 20 everywhere
        let vol = |f: &dyn Fn(usize) -> f32| Volume {
            nx: 8,
            ny: 8,
            nz: 2,
            spacing: [2.0, 2.0, 2.0],
            data: (0..128).map(f).collect(),
            frame_duration_s: None,
        };
        let flat = vol(&|_| 1000.0);
        let p90 = vol(&|i| if i % 2 == 0 { 1010.0 } else { 990.0 });
        let planes = vec![flat.clone(), flat.clone(), p90, flat.clone(), flat.clone()];
        let st = Study { name: "s".into(), source: "phantom".into(), planes, meta: json!({}) };
        let c = coverage(&st, &flat, &vol(&|_| 20.0), &flat);
        assert!((c.body_sigma_over_conditional_sd - 2.0).abs() < 1e-9, "{c:?}");
        assert_eq!(c.tissue["body"], [128.0, 128.0, 128.0]);
        let mut s = BTreeMap::new();
        summarise(&[&c], 30, "model", &mut s);
        assert!((s["unc_body_sharpness_30_model"] - 2.0).abs() < 1e-9);
        let row = coverage_cells(&|k| s.get(k).copied(), 30);
        assert!(row.trim_end().ends_with("| 2.00 |"), "{row}");
    }

    #[test]
    fn the_likelihood_fit_finds_the_weights_that_made_the_errors() {
        // e ~ N(0, 2·N + 0.5·T) with N and T varying independently
        let mut v = Vec::new();
        let mut rng = 12345u64;
        let mut unif = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((rng >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        for _ in 0..20000 {
            let (n, t) = (0.2 + 2.0 * unif(), 0.2 + 2.0 * unif());
            let g = (-2.0 * unif().ln()).sqrt() * (2.0 * std::f64::consts::PI * unif()).cos();
            let e = g * (2.0 * n + 0.5 * t).sqrt();
            v.push([(e * e) as f32, n as f32, t as f32, 0.0]);
        }
        let (a, b) = max_likelihood(&v);
        assert!((a - 2.0).abs() < 0.3 && (b - 0.5).abs() < 0.3, "a {a}, b {b}");
    }

    /// Frames whose true variance is (N + T)·exp(0.2 + 0.8·t0): with
    /// `head`, the samples carry V = N + T as a σ head's variance would.
    fn synthetic_frames(head: bool) -> Vec<Frame> {
        let mut rng = 99u64;
        let mut unif = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((rng >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let cells = ["c1-ref128", "c2-192-f5", "c3-256-f3", "c4-300-f4"];
        let mut frames = Vec::new();
        for (j, cell) in cells.iter().enumerate() {
            for d in 0..2 {
                let t = [-2.5 + 0.5 * j as f64 + 0.2 * d as f64, 0.3 * unif(), 0.5 * unif()];
                let f = (0.2 + 0.8 * t[0]).exp();
                let mut samples = vec![Vec::new(); 4];
                for (k, s) in samples.iter_mut().enumerate() {
                    for _ in 0..3000 {
                        let (n, tt) = (0.2 + unif(), 0.2 + unif());
                        let g = (-2.0 * unif().ln()).sqrt() * (2.0 * std::f64::consts::PI * unif()).cos();
                        let e = g * (f * (n + tt)).sqrt();
                        let (x1, x2) = if head { (n + tt, 0.0) } else { (n, tt) };
                        s.push([(e * e) as f32, x1 as f32, x2 as f32, (k % 2) as f32]);
                    }
                }
                frames.push(Frame { cell, descriptors: t.to_vec(), samples, head });
            }
        }
        frames
    }

    /// Per-frame 68 % coverage: the largest minus the smallest.
    fn spread(frames: &[Frame], cal: &Calibration) -> f64 {
        let c: Vec<f64> = frames.iter().map(|f| frame_coverage(&[f], cal, 0)[0]).collect();
        c.iter().copied().fold(f64::MIN, f64::max) - c.iter().copied().fold(f64::MAX, f64::min)
    }

    #[test]
    fn the_fit_finds_a_frame_scale_that_follows_a_descriptor() {
        // the class weights alone cannot cover every frame, the descriptor term can
        let frames = synthetic_frames(false);
        let refs: Vec<&Frame> = frames.iter().collect();
        let (plain, _) = fit_frames(&refs, 10.0, 6.0, false).unwrap();
        let (cal, _) = fit_frames(&refs, 10.0, 6.0, true).unwrap();
        assert!(plain.descriptors.is_empty() && plain.descriptor_coef.is_empty());
        assert_eq!(cal.descriptor_coef.len(), 4);
        assert!((cal.descriptor_coef[1] - 0.8).abs() < 0.1, "{:?}", cal.descriptor_coef);
        assert!(cal.head.is_empty() && !cal.uses_variance());
        // per frame: with the descriptor term every frame is covered near
        // 68 %; with class weights alone the extremes are far off
        assert!(spread(&frames, &cal) < 4.0, "with descriptors: {}", spread(&frames, &cal));
        assert!(spread(&frames, &plain) > 15.0, "class weights alone: {}", spread(&frames, &plain));
        let table = cross_validate(&frames, 10.0, 6.0, None).unwrap();
        assert_eq!(table.lines().filter(|l| l.starts_with("| c") && !l.starts_with("| cell")).count(), 4, "{table}");
    }

    #[test]
    fn on_a_sigma_heads_variance_the_fit_weighs_the_head_and_the_frame() {
        let frames = synthetic_frames(true);
        let refs: Vec<&Frame> = frames.iter().collect();
        let (cal, _) = fit_frames(&refs, 10.0, 6.0, true).unwrap();
        // the weights go on the variance output; the analytic terms stay off
        assert!(cal.uses_variance() && cal.head.len() == 4, "{cal:?}");
        assert!(cal.noise.iter().chain(&cal.texture).all(|w| *w == 0.0), "{cal:?}");
        assert!((cal.descriptor_coef[1] - 0.8).abs() < 0.1, "{:?}", cal.descriptor_coef);
        assert!(spread(&frames, &cal) < 4.0, "with descriptors: {}", spread(&frames, &cal));
        let all: Vec<f64> = refs.iter().map(|f| frame_coverage(&[f], &cal, 0)[0]).collect();
        assert!(all.iter().all(|c| (c - 68.27).abs() < 3.0), "{all:?}");
        // the package's own table (head 1, no frame factor) beside the fitted ones
        let own = Calibration { head: vec![1.0; 4], descriptors: Vec::new(), descriptor_coef: Vec::new(), ..cal.clone() };
        assert!(spread(&frames, &own) > 15.0, "head weight 1 alone: {}", spread(&frames, &own));
        let table = cross_validate(&frames, 10.0, 6.0, Some(&own)).unwrap();
        assert!(table.contains("the package's own"), "{table}");
        // the variance and the analytic terms are not fitted together
        let mut mixed = synthetic_frames(false);
        mixed.extend(synthetic_frames(true));
        let refs: Vec<&Frame> = mixed.iter().collect();
        assert!(fit_frames(&refs, 10.0, 6.0, false).unwrap_err().contains("cannot be fitted together"));
    }

    #[test]
    fn the_reliability_diagram_needs_both_durations() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("r.png");
        let mut summary = serde_json::Map::new();
        for (p, _) in LEVELS {
            summary.insert(format!("unc_reliability_{p}_30_model"), json!(p as f64 * 0.9));
        }
        assert!(!reliability_png(&Value::Object(summary.clone()), &png).unwrap());
        for (p, _) in LEVELS {
            summary.insert(format!("unc_reliability_{p}_60_model"), json!(p as f64 * 1.05));
        }
        assert!(reliability_png(&Value::Object(summary), &png).unwrap());
        assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn the_uncertainty_table_is_replaced_not_repeated() {
        let cal = Calibration {
            window_mm: 10.0,
            texture_mm: 6.0,
            class_edges: vec![0.5, 1.5, 3.0],
            noise: vec![1.0, 1.1, 1.2, 1.3],
            texture: vec![0.0, 0.5, 2.0, 0.25],
            fitted_on: "x".into(),
            descriptors: vec!["noise_px".into(), "axial_corr".into()],
            descriptor_coef: vec![0.25, -0.5, 1.5],
            head: Vec::new(),
            site_scale: Vec::new(),
        };
        let once = with_calibration("id = \"m\"\n\n[io]\nbatch = 1\n", &cal);
        let twice = with_calibration(&once, &cal);
        assert_eq!(once, twice);
        assert_eq!(once.matches("[uncertainty]").count(), 1);
        let parsed: toml::Table = toml::from_str(&once).unwrap();
        let back: Calibration = parsed["uncertainty"].clone().try_into().unwrap();
        assert_eq!(back, cal);
        assert_eq!(parsed["io"]["batch"].as_integer(), Some(1));
    }
}
