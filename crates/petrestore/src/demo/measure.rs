//! The demo's numbers: what a physicist would look at first, for the 30 s
//! input, the restored series, the 90 s reference and the truth side by
//! side: liver mean and noise, lesion SUVmean and SUVmax, the seed metric
//! with its ceiling, and NRMSE against the truth.

use crate::eval::metrics::{improvement, improvement_ceiling, mean_max, mse, nrmse_body, sphere_voxels};
use crate::restore::Volume;

/// A lesion in voxel coordinates of the volume (slice, row, column).
#[derive(Debug, Clone)]
pub struct Lesion {
    pub centre: [f64; 3],
    pub diameter_mm: f64,
}

/// Everything the table prints, per column (input, restored, 90 s, truth).
pub struct Report {
    pub liver_mean: [f64; 4],
    pub liver_noise_pct: [f64; 4],
    /// Per lesion: diameter, then (SUVmean, SUVmax) per column.
    pub lesions: Vec<(f64, [(f64, f64); 4])>,
    pub seed_mse: f64,
    pub ceiling: f64,
    pub nrmse_truth: [f64; 3],
}

/// Measure the four volumes. `liver` are the voxel indices of the uniform
/// liver (away from edges and lesions); `suv` converts Bq/ml to SUV.
pub fn measure(vols: [&Volume; 4], liver: &[usize], lesions: &[Lesion], suv: f64, duration_s: f64) -> Report {
    let stat = |v: &Volume| {
        let vals: Vec<f64> = liver.iter().map(|i| v.data[*i] as f64).collect();
        let m = vals.iter().sum::<f64>() / vals.len().max(1) as f64;
        let sd = (vals.iter().map(|x| (x - m).powi(2)).sum::<f64>() / vals.len().max(1) as f64).sqrt();
        (m, 100.0 * sd / m)
    };
    let s = vols.map(stat);
    let lesions = lesions
        .iter()
        .map(|l| {
            // SUVmean over the inner half of the sphere (partial volume at
            // the rim would dominate otherwise); SUVmax over the sphere.
            let inner = sphere_voxels(vols[0], l.centre, l.diameter_mm / 4.0);
            let whole = sphere_voxels(vols[0], l.centre, l.diameter_mm / 2.0);
            let per = vols.map(|v| (mean_max(v, &inner).0 * suv, mean_max(v, &whole).1 * suv));
            (l.diameter_mm, per)
        })
        .collect();
    let [input, restored, pet90, truth] = vols;
    Report {
        liver_mean: s.map(|x| x.0 * suv),
        liver_noise_pct: s.map(|x| x.1),
        lesions,
        seed_mse: improvement(mse(&restored.data, &pet90.data), mse(&input.data, &pet90.data)),
        ceiling: improvement_ceiling(duration_s),
        nrmse_truth: [nrmse_body(&input.data, &truth.data), nrmse_body(&restored.data, &truth.data), nrmse_body(&pet90.data, &truth.data)],
    }
}

impl Report {
    /// The table as the terminal shows it.
    pub fn table(&self, duration_s: f64, engine: &str) -> String {
        let mut o = String::new();
        let head = format!("{:.0} s input", duration_s);
        o.push_str(&format!("  {:<34} {:>12} {:>12} {:>12} {:>12}\n", "", head, "restored", "90 s", "truth"));
        let row = |name: &str, v: [f64; 4], digits: usize| {
            format!("  {:<34} {:>12.*} {:>12.*} {:>12.*} {:>12.*}\n", name, digits, v[0], digits, v[1], digits, v[2], digits, v[3])
        };
        o.push_str(&row("liver SUVmean", self.liver_mean, 2));
        o.push_str(&row("liver noise (SD / mean, %)", self.liver_noise_pct, 1));
        for (d, per) in &self.lesions {
            o.push_str(&row(&format!("lesion {d:.0} mm SUVmean"), per.map(|p| p.0), 2));
            o.push_str(&row(&format!("lesion {d:.0} mm SUVmax"), per.map(|p| p.1), 2));
        }
        o.push_str(&format!(
            "  {:<34} {:>12.1} {:>12.1} {:>12.1} {:>12}\n",
            "NRMSE vs truth (%)", self.nrmse_truth[0], self.nrmse_truth[1], self.nrmse_truth[2], "—"
        ));
        o.push_str(&format!(
            "\n  seed metric (MSE vs the 90 s image, improvement over the input): {:.1} % with {engine}; \
             the best any method can reach with nested frames: {:.1} %\n",
            self.seed_mse, self.ceiling
        ));
        o
    }
}
