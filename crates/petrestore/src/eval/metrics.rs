//! Image-quality metrics of docs/QUALITY.md. Every formula here is
//! mirrored in `models/train/petrain/evaluate.py`, and a test compares the two.

use crate::restore::Volume;

/// Mean squared difference over all voxels.
pub fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((*x - *y) as f64).powi(2)).sum::<f64>() / a.len().max(1) as f64
}

/// The seed study's improvement metric: 100 · (1 − D(restored, ref) / D(short, ref)).
pub fn improvement(d_restored: f64, d_short: f64) -> f64 {
    100.0 * (1.0 - d_restored / d_short)
}

/// Its ceiling for nested frames (the conditional mean): 100 · (1 − d/90).
pub fn improvement_ceiling(duration_s: f64) -> f64 {
    100.0 * (1.0 - duration_s / 90.0)
}

/// RMSE over the body (truth > 0) divided by the mean truth there, in %.
pub fn nrmse_body(img: &[f32], truth: &[f32]) -> f64 {
    let (mut se, mut st, mut n) = (0.0f64, 0.0f64, 0usize);
    for (x, t) in img.iter().zip(truth) {
        if *t > 0.0 {
            se += ((*x - *t) as f64).powi(2);
            st += *t as f64;
            n += 1;
        }
    }
    if n == 0 {
        return f64::NAN;
    }
    100.0 * (se / n as f64).sqrt() / (st / n as f64)
}

fn gauss_kernel() -> Vec<f64> {
    // σ = 1.5 px, radius 5 (11 taps): the usual SSIM window.
    let k: Vec<f64> = (-5i32..=5).map(|i| (-(i * i) as f64 / (2.0 * 1.5 * 1.5)).exp()).collect();
    let s: f64 = k.iter().sum();
    k.into_iter().map(|v| v / s).collect()
}

/// Separable blur of an h×w image; weights outside the image are dropped
/// and the rest renormalised.
fn blur(img: &[f64], h: usize, w: usize, k: &[f64]) -> Vec<f64> {
    let r = (k.len() / 2) as i64;
    let mut tmp = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            let (mut acc, mut ws) = (0.0, 0.0);
            for (j, kw) in k.iter().enumerate() {
                let p = x as i64 + j as i64 - r;
                if p >= 0 && (p as usize) < w {
                    acc += kw * img[y * w + p as usize];
                    ws += kw;
                }
            }
            tmp[y * w + x] = acc / ws;
        }
    }
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            let (mut acc, mut ws) = (0.0, 0.0);
            for (j, kw) in k.iter().enumerate() {
                let p = y as i64 + j as i64 - r;
                if p >= 0 && (p as usize) < h {
                    acc += kw * tmp[p as usize * w + x];
                    ws += kw;
                }
            }
            out[y * w + x] = acc / ws;
        }
    }
    out
}

/// Mean 2D SSIM over the slices of two volumes (Gaussian window σ 1.5 px,
/// K1 0.01, K2 0.03, dynamic range `range`).
pub fn ssim(a: &Volume, b: &Volume, range: f64) -> f64 {
    let (h, w) = (a.ny, a.nx);
    let k = gauss_kernel();
    let c1 = (0.01 * range).powi(2);
    let c2 = (0.03 * range).powi(2);
    let mut total = 0.0;
    for z in 0..a.nz {
        let x: Vec<f64> = a.slice(z).iter().map(|v| *v as f64).collect();
        let y: Vec<f64> = b.slice(z).iter().map(|v| *v as f64).collect();
        let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
        let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
        let xy: Vec<f64> = x.iter().zip(&y).map(|(p, q)| p * q).collect();
        let (mx, my) = (blur(&x, h, w, &k), blur(&y, h, w, &k));
        let (sxx, syy, sxy) = (blur(&xx, h, w, &k), blur(&yy, h, w, &k), blur(&xy, h, w, &k));
        let mut s = 0.0;
        for i in 0..h * w {
            let (vx, vy, cxy) = (sxx[i] - mx[i] * mx[i], syy[i] - my[i] * my[i], sxy[i] - mx[i] * my[i]);
            s += ((2.0 * mx[i] * my[i] + c1) * (2.0 * cxy + c2)) / ((mx[i] * mx[i] + my[i] * my[i] + c1) * (vx + vy + c2));
        }
        total += s / (h * w) as f64;
    }
    total / a.nz as f64
}

/// Voxels whose centres lie within `radius_mm` of (slice, row, col) (voxel
/// coordinates); at least the nearest voxel.
pub fn sphere_voxels(v: &Volume, centre: [f64; 3], radius_mm: f64) -> Vec<usize> {
    let [cz, cy, cx] = centre;
    let [sx, sy, sz] = v.spacing;
    let mut out = Vec::new();
    let rz = (radius_mm / sz).ceil() as i64 + 1;
    let ry = (radius_mm / sy).ceil() as i64 + 1;
    let rx = (radius_mm / sx).ceil() as i64 + 1;
    for z in (cz.round() as i64 - rz)..=(cz.round() as i64 + rz) {
        for y in (cy.round() as i64 - ry)..=(cy.round() as i64 + ry) {
            for x in (cx.round() as i64 - rx)..=(cx.round() as i64 + rx) {
                if z < 0 || y < 0 || x < 0 || z >= v.nz as i64 || y >= v.ny as i64 || x >= v.nx as i64 {
                    continue;
                }
                let d2 = ((z as f64 - cz) * sz).powi(2) + ((y as f64 - cy) * sy).powi(2) + ((x as f64 - cx) * sx).powi(2);
                if d2 <= radius_mm * radius_mm {
                    out.push((z as usize * v.ny + y as usize) * v.nx + x as usize);
                }
            }
        }
    }
    if out.is_empty() {
        let z = (cz.round().max(0.0) as usize).min(v.nz - 1);
        let y = (cy.round().max(0.0) as usize).min(v.ny - 1);
        let x = (cx.round().max(0.0) as usize).min(v.nx - 1);
        out.push((z * v.ny + y) * v.nx + x);
    }
    out
}

/// (mean, max) of a volume over voxel indices.
pub fn mean_max(v: &Volume, idx: &[usize]) -> (f64, f64) {
    let mut s = 0.0;
    let mut m = f64::MIN;
    for i in idx {
        let x = v.data[*i] as f64;
        s += x;
        m = m.max(x);
    }
    (s / idx.len() as f64, m)
}

/// Mean of a 2D disc ROI on slice `z` (centre in voxel coordinates).
pub fn disc_mean(v: &Volume, z: usize, cy: f64, cx: f64, radius_mm: f64) -> f64 {
    let [sx, sy, _] = v.spacing;
    let (mut s, mut n) = (0.0, 0usize);
    let r = (radius_mm / sx.min(sy)).ceil() as i64 + 1;
    for y in (cy.round() as i64 - r)..=(cy.round() as i64 + r) {
        for x in (cx.round() as i64 - r)..=(cx.round() as i64 + r) {
            if y < 0 || x < 0 || y >= v.ny as i64 || x >= v.nx as i64 {
                continue;
            }
            if ((y as f64 - cy) * sy).powi(2) + ((x as f64 - cx) * sx).powi(2) <= radius_mm * radius_mm {
                s += v.data[(z * v.ny + y as usize) * v.nx + x as usize] as f64;
                n += 1;
            }
        }
    }
    s / n.max(1) as f64
}

/// Summary of a sample: mean, SD, 95 % limits (mean ± 1.96 SD), min, max, n.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub mean: f64,
    pub sd: f64,
    pub lo95: f64,
    pub hi95: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stats(v: &[f64]) -> Stats {
    let n = v.len();
    if n == 0 {
        return Stats { mean: f64::NAN, sd: f64::NAN, lo95: f64::NAN, hi95: f64::NAN, min: f64::NAN, max: f64::NAN, n };
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let sd = if n > 1 { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() } else { 0.0 };
    Stats {
        mean,
        sd,
        lo95: mean - 1.96 * sd,
        hi95: mean + 1.96 * sd,
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(data: Vec<f32>, n: usize, nz: usize) -> Volume {
        Volume { nx: n, ny: n, nz, spacing: [2.0, 2.0, 3.0], data, frame_duration_s: None }
    }

    #[test]
    fn ssim_is_one_for_identical_and_lower_for_noisy() {
        let n = 24;
        let a: Vec<f32> = (0..n * n * 2).map(|i| ((i % n) as f32).sin() * 10.0 + 20.0).collect();
        let b: Vec<f32> = a.iter().enumerate().map(|(i, v)| v + if i % 3 == 0 { 3.0 } else { -1.5 }).collect();
        let (va, vb) = (vol(a, n, 2), vol(b, n, 2));
        assert!((ssim(&va, &va, 30.0) - 1.0).abs() < 1e-9);
        let s = ssim(&va, &vb, 30.0);
        assert!(s < 0.99 && s > 0.0, "{s}");
    }

    #[test]
    fn ceilings_are_those_of_design_md() {
        assert!((improvement_ceiling(60.0) - 33.333).abs() < 0.01);
        assert!((improvement_ceiling(30.0) - 66.667).abs() < 0.01);
        assert_eq!(improvement(1.0, 2.0), 50.0);
    }

    #[test]
    fn sphere_and_disc_rois_cover_what_they_should() {
        let n = 32;
        let mut d = vec![1.0f32; n * n * 9];
        let v0 = vol(d.clone(), n, 9);
        let idx = sphere_voxels(&v0, [4.0, 16.0, 16.0], 5.0);
        for i in &idx {
            d[*i] = 8.0;
        }
        let v = vol(d, n, 9);
        let (m, mx) = mean_max(&v, &idx);
        assert_eq!((m, mx), (8.0, 8.0));
        assert!(idx.len() >= 7, "{}", idx.len());
        assert_eq!(disc_mean(&v, 4, 16.0, 16.0, 3.0), 8.0);
        assert_eq!(sphere_voxels(&v, [4.0, 16.3, 16.2], 0.1).len(), 1, "tiny lesion: the nearest voxel");
        let s = stats(&[1.0, 3.0]);
        assert_eq!((s.mean, s.min, s.max, s.n), (2.0, 1.0, 3.0, 2));
    }
}
