//! `petlab eval --grid`: the evaluation on the site matrix.
//!
//! A grid folder holds one sub-folder per cell of the site matrix
//! (`petlab dataset --site all`), each with its own phantoms. Every cell is
//! evaluated like a dataset ([`crate::eval::run`]), with its Gaussian FWHM
//! chosen on the same cell of the validation grid, and the goals are read
//! per cell and on the worst cell: a model is judged across
//! reconstructions, never on one.

use std::path::Path;

use serde_json::{Value, json};

use crate::eval::{EvalOptions, run};
use petrestore::restore::Engine;
use petsim::sites::SITE_MATRIX;

/// Evaluate every cell present in `grid` (and in `val_grid`).
/// With `site_uncertainty`, σ is also scaled per cell by a site
/// calibration fitted on the validation cell (other patients, the same
/// reconstruction), as a site fits one on its own paired series.
pub fn run_grid(grid: &Path, val_grid: &Path, engine: Option<std::sync::Arc<dyn Engine>>, site_uncertainty: bool) -> Result<Value, String> {
    let mut cells = serde_json::Map::new();
    for cell in SITE_MATRIX.iter() {
        let dir = grid.join(cell.name);
        if !dir.is_dir() {
            continue;
        }
        let val = val_grid.join(cell.name);
        if !val.is_dir() {
            return Err(format!(
                "{} has no cell {} to choose the Gaussian on: make it with `petlab dataset --split val --site all`",
                val_grid.display(),
                cell.name
            ));
        }
        let t = std::time::Instant::now();
        let site_scale = match (&engine, site_uncertainty) {
            (Some(e), true) => Some(
                crate::eval::site_scale(&val, e)?
                    .ok_or("--site-uncertainty: the model package has no [uncertainty] calibration to scale (petlab calibrate --write)")?,
            ),
            (None, true) => return Err("--site-uncertainty needs --model DIR (a package with an [uncertainty] calibration)".into()),
            _ => None,
        };
        let r = run(&EvalOptions {
            dataset: dir,
            val: Some(val),
            gaussian_fwhm: None,
            engine: engine.clone(),
            dump: None,
            site_scale: site_scale.clone(),
        })?;
        eprintln!("cell {}: {} studies in {:.0} s", cell.name, r["studies"], t.elapsed().as_secs_f64());
        cells.insert(cell.name.to_string(), json!({"what": cell.what, "pixel_mm": cell.pixel_mm(), "summary": r["summary"], "model": r["model"], "studies": r["studies"], "gaussian_fwhm_mm": r["gaussian_fwhm_mm"], "site_uncertainty_scale": site_scale, "records": r["records"]}));
    }
    if cells.is_empty() {
        let names: Vec<_> = SITE_MATRIX.iter().map(|c| c.name).collect();
        return Err(format!(
            "{} holds none of the site matrix cells ({}): make it with `petlab dataset --site all`",
            grid.display(),
            names.join(", ")
        ));
    }
    Ok(json!({"grid": grid.display().to_string(), "val_grid": val_grid.display().to_string(), "cells": cells}))
}

/// The NEMA NU 2 sphere diameters (mm) as the summary keys name them.
fn spheres() -> impl Iterator<Item = u32> {
    petsim::NEMA_SPHERES_MM.iter().map(|d| *d as u32)
}

/// One number of a cell's summary.
fn get(cell: &Value, key: &str) -> Option<f64> {
    cell["summary"][key].as_f64()
}

/// The rows of the grid table: (header, summary key or computed value).
fn columns(method: &str) -> Vec<(String, Box<dyn Fn(&Value) -> Option<f64>>)> {
    let m = method.to_string();
    let key = move |k: String| -> Box<dyn Fn(&Value) -> Option<f64>> { Box::new(move |c: &Value| get(c, &k)) };
    let mut v: Vec<(String, Box<dyn Fn(&Value) -> Option<f64>>)> =
        vec![("seed MSE 30 s".into(), key(format!("seed_mse_30_{m}"))), ("seed MSE 60 s".into(), key(format!("seed_mse_60_{m}")))];
    let m2 = m.clone();
    v.push((
        "NRMSE 30 s ÷ raw PET90".into(),
        Box::new(move |c: &Value| Some(get(c, &format!("nrmse_truth_30_{m2}"))? / get(c, "nrmse_truth_pet90")?)),
    ));
    for (h, k) in [
        ("lesion ≥10 mm SUVmean bias vs PET90, 30 s (mean %)", "suvmean_bias_vs_pet90_30"),
        ("lesion ≥10 mm SUVmax bias vs PET90, 30 s (mean %)", "suvmax_bias_vs_pet90_30"),
    ] {
        v.push((h.into(), key(format!("lesion_ge10_{k}_{m}_mean"))));
    }
    let m3 = m.clone();
    v.push((
        "worst single lesion ≥10 mm below PET90, 30 s (%)".into(),
        Box::new(move |c: &Value| {
            let a = get(c, &format!("lesion_ge10_suvmean_bias_vs_pet90_30_{m3}_min"))?;
            let b = get(c, &format!("lesion_ge10_suvmax_bias_vs_pet90_30_{m3}_min"))?;
            Some(a.min(b))
        }),
    ));
    let m4 = m.clone();
    v.push((
        "worst single lesion ≥10 mm above PET90, 30 s (%)".into(),
        Box::new(move |c: &Value| {
            let a = get(c, &format!("lesion_ge10_suvmean_bias_vs_pet90_30_{m4}_max"))?;
            let b = get(c, &format!("lesion_ge10_suvmax_bias_vs_pet90_30_{m4}_max"))?;
            Some(a.max(b))
        }),
    ));
    let m5 = m.clone();
    v.push((
        "NEMA background variability 30 s ÷ PET90 (worst sphere)".into(),
        Box::new(move |c: &Value| {
            spheres()
                .filter_map(|d| Some(get(c, &format!("nema_bv_{d}mm_30_{m5}"))? / get(c, &format!("nema_bv_{d}mm_pet90"))?))
                .reduce(f64::max)
        }),
    ));
    let m6 = m;
    v.push((
        "NEMA contrast recovery 30 s − PET90 (worst sphere, points)".into(),
        Box::new(move |c: &Value| spheres().filter_map(|d| get(c, &format!("nema_cr_{d}mm_30_{m6}_minus_pet90_mean"))).reduce(f64::min)),
    ));
    v
}

/// Which end of a column is the worst cell: lower is worse for the seed
/// metric and the contrast drop, higher for ratios and biases above.
fn worst(header: &str, values: &[f64]) -> Option<f64> {
    let lower_is_worse = header.starts_with("seed") || header.contains("below") || header.contains("contrast recovery");
    if header.contains("(mean %)") {
        // a bias is worst by its magnitude
        return values.iter().copied().reduce(|a, b| if b.abs() > a.abs() { b } else { a });
    }
    if lower_is_worse { values.iter().copied().reduce(f64::min) } else { values.iter().copied().reduce(f64::max) }
}

/// The grid report as Markdown: one table per method (model, Gaussian,
/// oracle), cells as rows, the worst cell last.
pub fn grid_markdown(report: &Value) -> String {
    let cells = report["cells"].as_object().cloned().unwrap_or_default();
    let mut o = format!(
        "Site matrix: `{}` ({} cells; Gaussian FWHM per cell chosen on `{}`).\n\n",
        report["grid"].as_str().unwrap_or("?"),
        cells.len(),
        report["val_grid"].as_str().unwrap_or("?")
    );
    o.push_str("| cell | what |\n|---|---|\n");
    for (name, c) in &cells {
        o.push_str(&format!("| {name} | {} |\n", c["what"].as_str().unwrap_or("")));
    }
    for (method, title) in [
        ("model", "model"),
        ("gaussian", "Gaussian (FWHM chosen per cell on validation)"),
        ("oracle", "oracle (perfect denoiser: the reachable bound)"),
    ] {
        let cols = columns(method);
        if !cells.values().any(|c| cols.iter().any(|(_, f)| f(c).is_some())) {
            continue;
        }
        o.push_str(&format!("\n### {title}\n\n| cell |"));
        for (h, _) in &cols {
            o.push_str(&format!(" {h} |"));
        }
        o.push_str("\n|---|");
        o.push_str(&"---|".repeat(cols.len()));
        o.push('\n');
        let fmt =
            |v: Option<f64>| v.map(|v| if v.abs() < 10.0 { format!("{v:.2}") } else { format!("{v:.1}") }).unwrap_or_else(|| "—".into());
        for (name, c) in &cells {
            o.push_str(&format!("| {name} |"));
            for (_, f) in &cols {
                o.push_str(&format!(" {} |", fmt(f(c))));
            }
            o.push('\n');
        }
        o.push_str("| **worst cell** |");
        for (h, f) in &cols {
            let vals: Vec<f64> = cells.values().filter_map(f).collect();
            o.push_str(&format!(" **{}** |", fmt(worst(h, &vals))));
        }
        o.push('\n');
        if method == "model" {
            let mean = |k: &str| {
                let v: Vec<f64> = cells.values().filter_map(|c| get(c, k)).collect();
                v.iter().sum::<f64>() / v.len().max(1) as f64
            };
            if cells.values().any(|c| get(c, "seed_mse_30_model").is_some()) {
                o.push_str(&format!("| mean over cells | {:.2} | {:.2} |", mean("seed_mse_30_model"), mean("seed_mse_60_model")));
                o.push_str(&" |".repeat(cols.len() - 2));
                o.push('\n');
            }
        }
    }
    o.push_str(&nema_markdown(&cells));
    o.push_str(&uncertainty_markdown(&cells));
    o
}

/// NEMA NU 2 per sphere and cell, as the goal reads it: contrast recovery
/// at 30 s minus PET90's of the same realisation (mean ± SE over the cell's
/// realisations) and background variability ÷ PET90's, for every method.
fn nema_markdown(cells: &serde_json::Map<String, Value>) -> String {
    if !cells.values().any(|c| get(c, "nema_cr_10mm_pet90").is_some()) {
        return String::new();
    }
    let mut o = String::from(
        "\n### NEMA NU 2 per sphere, 30 s: contrast recovery − PET90's (points, mean ± SE over the realisations) / background variability ÷ PET90's\n\n| cell | method | realisations |",
    );
    for d in spheres() {
        o.push_str(&format!(" {d} mm |"));
    }
    o.push_str("\n|---|---|---|");
    o.push_str(&"---|".repeat(spheres().count()));
    o.push('\n');
    for (name, c) in cells {
        for (m, label) in [("model", "model"), ("gaussian", "Gaussian"), ("oracle", "oracle"), ("input", "raw 30 s")] {
            let Some(n) = get(c, &format!("nema_n_30_{m}")) else { continue };
            o.push_str(&format!("| {name} | {label} | {n:.0} |"));
            for d in spheres() {
                let cr = get(c, &format!("nema_cr_{d}mm_30_{m}_minus_pet90_mean"));
                let se = get(c, &format!("nema_cr_{d}mm_30_{m}_minus_pet90_se"));
                let bv = get(c, &format!("nema_bv_{d}mm_30_{m}")).zip(get(c, &format!("nema_bv_{d}mm_pet90"))).map(|(a, b)| a / b);
                match (cr, se, bv) {
                    (Some(cr), Some(se), Some(bv)) => o.push_str(&format!(" {cr:+.1} ± {se:.1} / {bv:.2} |")),
                    _ => o.push_str(" — |"),
                }
            }
            o.push('\n');
        }
    }
    o
}

/// Coverage of the model's σ per cell (when the package is calibrated):
/// the share of voxels (and of lesion SUVmeans) where PET90 lies within
/// R ± σ and R ± 1.96 σ; nominal 68.3 % and 95 %.
fn uncertainty_markdown(cells: &serde_json::Map<String, Value>) -> String {
    if !cells.values().any(|c| get(c, "unc_cov68_body_30_model").is_some()) {
        return String::new();
    }
    let mut o = String::from(
        "\n### uncertainty: coverage of R ± σ / R ± 1.96 σ (%; nominal 68.3 / 95)\n\n\
         | cell | frame | body | hot organs | lesions | lungs | lesion SUVmean ≥ 10 mm | body σ ÷ R (%) | body σ ÷ PET90's conditional SD |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, c) in cells {
        for d in [30, 60] {
            o.push_str(&format!("| {name} | {d} s |"));
            o.push_str(&crate::uncertainty::coverage_cells(&|k| get(c, k), d));
        }
    }
    let site: Vec<String> = cells
        .iter()
        .filter_map(|(name, c)| {
            let s = c["site_uncertainty_scale"].as_array()?;
            Some(format!("{name} [{}]", s.iter().filter_map(Value::as_f64).map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(", ")))
        })
        .collect();
    if !site.is_empty() {
        o.push_str(&format!(
            "\nσ scaled per cell by a site calibration fitted on the validation cell (factor per class {}): {}.\n",
            petrestore::restore::uncertainty::CLASS_NAMES.join("/"),
            site.join("; ")
        ));
    }
    o
}

/// One line of the shipping rule: what is compared, both values, and
/// whether the candidate passes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleLine {
    pub what: String,
    pub baseline: String,
    pub candidate: String,
    pub pass: bool,
}

/// The rule every candidate model is judged by on the validation grid
/// (models/petrestore-unet25d/EVAL.md, fixed before the first candidate):
/// (a) the mean over cells of the seed MSE metric improves by ≥ 0.3 points
/// at 30 s and ≥ 0.15 at 60 s; (b) the worst cell improves at 30 s and at
/// 60 s; (c) lesions ≥ 10 mm at 30 s: the mean SUVmean bias vs PET90 stays
/// within ±5 % in every cell; in every cell the worst single lesion below
/// PET90 (SUVmean or SUVmax) is no more than 5 points below that cell's
/// oracle row or no more than 2 points worse than the baseline's in that
/// cell, whichever is lower (PET90's own maximum is noisy: in an
/// unfiltered reconstruction even the oracle reads 20 % below it); and the
/// worst single lesion above PET90 over the cells is not more than 2
/// points worse than the baseline's. Both reports are `eval --grid --json`
/// output over the same cells.
pub fn rule(baseline: &Value, candidate: &Value) -> Result<Vec<RuleLine>, String> {
    let cells = |r: &Value| -> Result<Vec<(String, Value)>, String> {
        let m = r["cells"].as_object().ok_or("not an `eval --grid --json` report (no cells)")?;
        Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    };
    let (b, c) = (cells(baseline)?, cells(candidate)?);
    let names = |x: &[(String, Value)]| x.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    if names(&b) != names(&c) {
        return Err(format!("the reports cover different cells: {:?} and {:?}", names(&b), names(&c)));
    }
    let all = |x: &[(String, Value)], key: &str| -> Result<Vec<(String, f64)>, String> {
        x.iter()
            .map(|(n, v)| get(v, key).map(|f| (n.clone(), f)).ok_or(format!("cell {n} has no {key} (evaluated without --model?)")))
            .collect()
    };
    let mean = |v: &[(String, f64)]| v.iter().map(|(_, f)| f).sum::<f64>() / v.len() as f64;
    let min = |v: &[(String, f64)]| v.iter().cloned().reduce(|a, b| if b.1 < a.1 { b } else { a }).expect("cells");
    let max = |v: &[(String, f64)]| v.iter().cloned().reduce(|a, b| if b.1 > a.1 { b } else { a }).expect("cells");
    let mut lines = Vec::new();
    for (d, gain) in [(30, 0.3), (60, 0.15)] {
        let key = format!("seed_mse_{d}_model");
        let (mb, mc) = (mean(&all(&b, &key)?), mean(&all(&c, &key)?));
        lines.push(RuleLine {
            what: format!("(a) mean over cells, seed MSE {d} s: +{gain} or more"),
            baseline: format!("{mb:.2}"),
            candidate: format!("{mc:.2} ({:+.2})", mc - mb),
            pass: mc - mb >= gain,
        });
    }
    for d in [30, 60] {
        let key = format!("seed_mse_{d}_model");
        let (wb, wc) = (min(&all(&b, &key)?), min(&all(&c, &key)?));
        lines.push(RuleLine {
            what: format!("(b) worst cell, seed MSE {d} s: better"),
            baseline: format!("{:.1} ({})", wb.1, wb.0),
            candidate: format!("{:.1} ({})", wc.1, wc.0),
            pass: wc.1 > wb.1,
        });
    }
    let lesions = |x: &[(String, Value)], key: &str| -> Vec<(String, f64)> {
        x.iter().filter_map(|(n, v)| get(v, key).map(|f| (n.clone(), f))).collect()
    };
    let bias = lesions(&c, "lesion_ge10_suvmean_bias_vs_pet90_30_model_mean");
    let far = bias.iter().cloned().reduce(|a, b| if b.1.abs() > a.1.abs() { b } else { a });
    let bias_b = lesions(&b, "lesion_ge10_suvmean_bias_vs_pet90_30_model_mean");
    let far_b = bias_b.iter().cloned().reduce(|a, b| if b.1.abs() > a.1.abs() { b } else { a });
    let show = |x: &Option<(String, f64)>| x.as_ref().map_or("no lesions".to_string(), |(n, f)| format!("{f:+.1} ({n})"));
    lines.push(RuleLine {
        what: "(c) lesions ≥ 10 mm, 30 s: mean SUVmean bias within ±5 % in every cell".into(),
        baseline: show(&far_b),
        candidate: show(&far),
        pass: far.as_ref().is_some_and(|(_, f)| f.abs() <= 5.0),
    });
    // below PET90: per cell, against the cell's oracle or the baseline
    let cell_min = |x: &Value, method: &str| -> Option<f64> {
        ["suvmean", "suvmax"].iter().filter_map(|k| get(x, &format!("lesion_ge10_{k}_bias_vs_pet90_30_{method}_min"))).reduce(f64::min)
    };
    let mut short: Option<(String, f64, f64)> = None; // (cell, value, limit) furthest below its limit
    let mut judged = 0;
    for ((name, vb), (_, vc)) in b.iter().zip(&c) {
        let (Some(fb), Some(fc)) = (cell_min(vb, "model"), cell_min(vc, "model")) else { continue };
        judged += 1;
        let limit = cell_min(vc, "oracle").map_or(fb - 2.0, |o| (o - 5.0).min(fb - 2.0));
        if short.as_ref().is_none_or(|(_, v, l)| fc - limit < v - l) {
            short = Some((name.clone(), fc, limit));
        }
    }
    lines.push(RuleLine {
        what: "(c) worst single lesion below PET90 (SUVmean or SUVmax), every cell: ≥ min(oracle − 5, baseline − 2)".into(),
        baseline: "limit per cell".into(),
        candidate: short.as_ref().map_or("no lesions".into(), |(n, v, l)| format!("{v:+.1} ({n}, limit {l:+.1})")),
        pass: judged > 0 && short.as_ref().is_some_and(|(_, v, l)| v >= l),
    });
    let extreme = |x: &[(String, Value)]| -> Option<(String, f64)> {
        let v: Vec<(String, f64)> =
            ["suvmean", "suvmax"].iter().flat_map(|k| lesions(x, &format!("lesion_ge10_{k}_bias_vs_pet90_30_model_max"))).collect();
        if v.is_empty() { None } else { Some(max(&v)) }
    };
    let (eb, ec) = (extreme(&b), extreme(&c));
    lines.push(RuleLine {
        what: "(c) worst single lesion above PET90 (SUVmean or SUVmax): at most 2 points worse".into(),
        baseline: show(&eb),
        candidate: show(&ec),
        pass: matches!((&eb, &ec), (Some((_, fb)), Some((_, fc))) if *fc <= fb + 2.0),
    });
    Ok(lines)
}

/// The rule as a Markdown table with its verdict.
pub fn rule_markdown(lines: &[RuleLine]) -> String {
    let mut o = String::from("| rule | baseline | candidate | |\n|---|---|---|---|\n");
    for l in lines {
        o.push_str(&format!("| {} | {} | {} | {} |\n", l.what, l.baseline, l.candidate, if l.pass { "pass" } else { "**fail**" }));
    }
    let ok = lines.iter().all(|l| l.pass);
    o.push_str(&format!("\nverdict: {}\n", if ok { "PASS (the candidate may ship)" } else { "FAIL (the baseline stays)" }));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(cells: &[(&str, f64, f64, f64, f64, f64)]) -> Value {
        let mut m = serde_json::Map::new();
        for (name, s30, s60, bias, lo, hi) in cells {
            m.insert(
                name.to_string(),
                json!({"summary": {
                    "seed_mse_30_model": s30, "seed_mse_60_model": s60,
                    "lesion_ge10_suvmean_bias_vs_pet90_30_model_mean": bias,
                    "lesion_ge10_suvmean_bias_vs_pet90_30_model_min": lo,
                    "lesion_ge10_suvmax_bias_vs_pet90_30_model_min": lo - 1.0,
                    "lesion_ge10_suvmean_bias_vs_pet90_30_model_max": hi,
                    "lesion_ge10_suvmax_bias_vs_pet90_30_model_max": hi + 1.0,
                    "lesion_ge10_suvmax_bias_vs_pet90_30_oracle_min": -4.0,
                }}),
            );
        }
        json!({ "cells": m })
    }

    #[test]
    fn the_shipping_rule_needs_every_line() {
        let base = report(&[("c1", 50.0, 25.0, 1.0, -10.0, 5.0), ("c2", 40.0, 20.0, -2.0, -12.0, 8.0)]);
        let good = report(&[("c1", 50.5, 25.2, 1.0, -11.0, 6.0), ("c2", 40.5, 20.3, -3.0, -13.0, 9.0)]);
        let lines = rule(&base, &good).unwrap();
        assert_eq!(lines.len(), 7);
        assert!(lines.iter().all(|l| l.pass), "{lines:#?}");
        assert!(rule_markdown(&lines).contains("verdict: PASS"));
        // the mean rises but the worst cell falls
        let worse_worst = report(&[("c1", 55.0, 27.0, 1.0, -10.0, 5.0), ("c2", 39.9, 20.3, 1.0, -10.0, 5.0)]);
        let l = rule(&base, &worse_worst).unwrap();
        assert!(!l[2].pass && l[0].pass, "{l:#?}");
        // a lesion 2.5 points further below than the baseline's worst (-13 - 2.5)
        let lesion = report(&[("c1", 51.0, 26.0, 1.0, -14.5, 5.0), ("c2", 41.0, 21.0, 1.0, -10.0, 5.0)]);
        let l = rule(&base, &lesion).unwrap();
        assert!(!l[5].pass && l[4].pass && l[6].pass, "{l:#?}");
        assert!(rule_markdown(&l).contains("verdict: FAIL"));
        // where the oracle itself reads far below PET90's noisy maximum, a
        // lesion may go as far as 5 points below the oracle, not further
        let oracle = |mut r: Value, cell: &str, o: f64| {
            r["cells"][cell]["summary"]["lesion_ge10_suvmax_bias_vs_pet90_30_oracle_min"] = json!(o);
            r
        };
        let base_c1 = report(&[("c1", 50.0, 25.0, 1.0, -1.0, 5.0), ("c2", 40.0, 20.0, -2.0, -12.0, 8.0)]);
        let near = oracle(report(&[("c1", 51.0, 26.0, 1.0, -22.0, 5.0), ("c2", 41.0, 21.0, 1.0, -10.0, 5.0)]), "c1", -20.0);
        assert!(rule(&base_c1, &near).unwrap()[5].pass, "{:#?}", rule(&base_c1, &near).unwrap());
        let far = oracle(report(&[("c1", 51.0, 26.0, 1.0, -25.0, 5.0), ("c2", 41.0, 21.0, 1.0, -10.0, 5.0)]), "c1", -20.0);
        let l = rule(&base_c1, &far).unwrap();
        assert!(!l[5].pass && l[5].candidate.contains("c1, limit -25.0"), "{l:#?}");
        // a cell whose mean lesion bias leaves ±5 %
        let biased = report(&[("c1", 51.0, 26.0, 5.5, -10.0, 5.0), ("c2", 41.0, 21.0, 1.0, -10.0, 5.0)]);
        assert!(!rule(&base, &biased).unwrap()[4].pass);
        // different cells cannot be compared
        let other = report(&[("c1", 51.0, 26.0, 1.0, -10.0, 5.0)]);
        assert!(rule(&base, &other).unwrap_err().contains("different cells"));
    }

    #[test]
    fn a_grid_of_nema_realisations_alone_reports_every_sphere() {
        let mut summary = serde_json::Map::new();
        for d in [10, 13, 17, 22, 28, 37] {
            summary.insert(format!("nema_bv_{d}mm_pet90"), json!(5.0));
            for m in ["model", "gaussian", "oracle", "input"] {
                summary.insert(format!("nema_cr_{d}mm_30_{m}_minus_pet90_mean"), json!(if d == 10 { -18.5 } else { -1.0 }));
                summary.insert(format!("nema_cr_{d}mm_30_{m}_minus_pet90_se"), json!(3.0));
                summary.insert(format!("nema_bv_{d}mm_30_{m}"), json!(4.0));
                summary.insert(format!("nema_n_30_{m}"), json!(10.0));
            }
        }
        summary.insert("nema_cr_10mm_pet90".into(), json!(51.7));
        let report = json!({"grid": "g", "val_grid": "v", "cells": {"c6-144-nopsf": {"what": "144²", "summary": summary}}});
        let md = grid_markdown(&report);
        // the worst-sphere columns of the model's table, without patients
        assert!(md.contains("### model") && md.contains("| **-18.5** |"), "{md}");
        assert!(!md.contains("mean over cells"), "no seed metric to average:\n{md}");
        // and each sphere with its SE and the realisations behind it
        assert!(md.contains("| c6-144-nopsf | model | 10 | -18.5 ± 3.0 / 0.80 | -1.0 ± 3.0 / 0.80 |"), "{md}");
        assert!(md.contains("| c6-144-nopsf | raw 30 s | 10 |"), "{md}");
    }

    #[test]
    fn the_worst_cell_is_the_low_end_of_scores_and_the_far_end_of_biases() {
        assert_eq!(worst("seed MSE 30 s", &[60.0, 55.0, 58.0]), Some(55.0));
        assert_eq!(worst("NRMSE 30 s ÷ raw PET90", &[0.9, 1.1]), Some(1.1));
        assert_eq!(worst("lesion ≥10 mm SUVmean bias vs PET90, 30 s (mean %)", &[2.0, -4.0, 3.0]), Some(-4.0));
        assert_eq!(worst("worst single lesion ≥10 mm below PET90, 30 s (%)", &[-3.0, -12.0]), Some(-12.0));
        assert_eq!(worst("worst single lesion ≥10 mm above PET90, 30 s (%)", &[3.0, 12.0]), Some(12.0));
        assert_eq!(worst("NEMA contrast recovery 30 s − PET90 (worst sphere, points)", &[-1.0, -3.5]), Some(-3.5));
    }
}
