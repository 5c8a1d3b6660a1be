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
pub fn run_grid(grid: &Path, val_grid: &Path, engine: Option<std::sync::Arc<dyn Engine>>) -> Result<Value, String> {
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
        let r = run(&EvalOptions { dataset: dir, val: Some(val), gaussian_fwhm: None, engine: engine.clone(), dump: None })?;
        eprintln!("cell {}: {} studies in {:.0} s", cell.name, r["studies"], t.elapsed().as_secs_f64());
        cells.insert(cell.name.to_string(), json!({"what": cell.what, "pixel_mm": cell.pixel_mm(), "summary": r["summary"], "model": r["model"], "studies": r["studies"], "gaussian_fwhm_mm": r["gaussian_fwhm_mm"]}));
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
            [10, 13, 17, 22, 28, 37]
                .iter()
                .filter_map(|d| Some(get(c, &format!("nema_bv_{d}mm_30_{m5}"))? / get(c, &format!("nema_bv_{d}mm_pet90"))?))
                .reduce(f64::max)
        }),
    ));
    let m6 = m;
    v.push((
        "NEMA contrast recovery 30 s − PET90 (worst sphere, points)".into(),
        Box::new(move |c: &Value| {
            [10, 13, 17, 22, 28, 37].iter().filter_map(|d| get(c, &format!("nema_cr_{d}mm_30_{m6}_minus_pet90_mean"))).reduce(f64::min)
        }),
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
        if !cells.values().any(|c| cols[0].1(c).is_some()) {
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
            o.push_str(&format!("| mean over cells | {:.2} | {:.2} |", mean("seed_mse_30_model"), mean("seed_mse_60_model")));
            o.push_str(&" |".repeat(cols.len() - 2));
            o.push('\n');
        }
    }
    o.push_str(&uncertainty_markdown(&cells));
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
         | cell | frame | body | hot organs | lesions | lungs | lesion SUVmean ≥ 10 mm | body σ ÷ R (%) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (name, c) in cells {
        for d in [30, 60] {
            o.push_str(&format!("| {name} | {d} s |"));
            o.push_str(&crate::uncertainty::coverage_cells(&|k| get(c, k), d));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

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
