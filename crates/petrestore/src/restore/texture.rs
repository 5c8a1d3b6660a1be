//! What a series says about its own reconstruction: the texture
//! descriptors a textured model takes as constant input channels
//! (`io.texture` in model.toml). The same three numbers describe a 128²
//! unfiltered OSEM image, a 300² image with a 4 mm 3D post-filter and a
//! noisy heavy patient differently, so one network can denoise each as it
//! needs, where a network that sees only the frame duration settles between
//! them.
//!
//! The definitions are the trainer's (`models/train/petrain/data.py`,
//! `texture`), all relative to the body mean (the normalisation scale):
//!
//! - `noise_px`: ln of the median |high-pass| over body voxels, the
//!   high-pass being a voxel minus the mean of its four in-plane neighbours
//!   (interior pixels; every 4th value in z, y, x order);
//! - `noise_2px`: the same on planes binned 2×2 (mean of each block):
//!   correlated noise, e.g. after a post-filter, loses less there than
//!   white noise;
//! - `axial_corr`: the correlation of the high-pass between adjacent slices,
//!   over voxels in the body on both (a 3D filter or thin slices raise it).
//!
//! The body is every voxel above `fraction` × the 99.9th percentile, as for
//! the normalisation.

use super::Volume;

/// The descriptors this build can measure, in the order a package may name them.
pub const KNOWN: [&str; 3] = ["noise_px", "noise_2px", "axial_corr"];

/// The body threshold: `fraction` × the 99.9th percentile of a strided
/// sample (every 7th voxel), as `neural::body_scale` uses.
pub fn body_threshold(data: &[f32], fraction: f64) -> Option<f64> {
    let mut sample: Vec<f32> = data.iter().step_by(7).copied().filter(|x| x.is_finite()).collect();
    if sample.is_empty() {
        return None;
    }
    let k = ((sample.len() as f64 * 0.999) as usize).min(sample.len() - 1);
    let (_, p999, _) = sample.select_nth_unstable_by(k, f32::total_cmp);
    Some(*p999 as f64 * fraction)
}

/// The high-pass of one interior pixel: the voxel minus the mean of its four
/// in-plane neighbours (summed in the trainer's order).
fn highpass(p: &[f32], w: usize, y: usize, x: usize) -> f32 {
    let at = y * w + x;
    let n4 = ((p[at - w] + p[at + w]) + p[at - 1]) + p[at + 1];
    p[at] - 0.25 * n4
}

/// The (n/2)-th smallest |d| of every 4th value of `d` (the trainer's median).
fn median_abs(d: &[f32]) -> f64 {
    let mut a: Vec<f32> = d.iter().step_by(4).map(|v| v.abs()).collect();
    if a.is_empty() {
        return 0.0;
    }
    let k = a.len() / 2;
    let (_, m, _) = a.select_nth_unstable_by(k, f32::total_cmp);
    *m as f64
}

/// High-pass values of the body's interior pixels, plane by plane (z, y, x order).
fn body_highpass(data: &[f32], w: usize, h: usize, nz: usize, threshold: f64) -> Vec<f32> {
    let mut out = Vec::new();
    for z in 0..nz {
        let p = &data[z * w * h..(z + 1) * w * h];
        for y in 1..h.saturating_sub(1) {
            for x in 1..w.saturating_sub(1) {
                if p[y * w + x] as f64 > threshold {
                    out.push(highpass(p, w, y, x));
                }
            }
        }
    }
    out
}

/// Every plane binned 2×2 (mean of each block; an odd last row or column dropped).
fn binned(data: &[f32], w: usize, h: usize, nz: usize) -> (Vec<f32>, usize, usize) {
    let (bw, bh) = (w / 2, h / 2);
    let mut out = Vec::with_capacity(bw * bh * nz);
    for z in 0..nz {
        let p = &data[z * w * h..(z + 1) * w * h];
        for y in 0..bh {
            for x in 0..bw {
                let (a, b) = (p[2 * y * w + 2 * x], p[2 * y * w + 2 * x + 1]);
                let (c, d) = (p[(2 * y + 1) * w + 2 * x], p[(2 * y + 1) * w + 2 * x + 1]);
                out.push((((a + b) + c) + d) * 0.25);
            }
        }
    }
    (out, bw, bh)
}

/// The correlation of the high-pass between adjacent slices over interior
/// pixels in the body on both (0 for a single slice or no such pixel).
fn axial_corr(data: &[f32], w: usize, h: usize, nz: usize, threshold: f64) -> f64 {
    let plane = w * h;
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for z in 0..nz.saturating_sub(1) {
        let (p, q) = (&data[z * plane..(z + 1) * plane], &data[(z + 1) * plane..(z + 2) * plane]);
        for y in 1..h.saturating_sub(1) {
            for x in 1..w.saturating_sub(1) {
                let at = y * w + x;
                if p[at] as f64 > threshold && q[at] as f64 > threshold {
                    let (a, b) = (highpass(p, w, y, x) as f64, highpass(q, w, y, x) as f64);
                    ab += a * b;
                    aa += a * a;
                    bb += b * b;
                }
            }
        }
    }
    let den = (aa * bb).sqrt();
    if den > 0.0 { ab / den } else { 0.0 }
}

/// The descriptors `names` (each one of [`KNOWN`]) of a volume whose body
/// mean is `scale`, in the order asked.
pub fn describe(v: &Volume, names: &[String], fraction: f64, scale: f32) -> Result<Vec<f32>, String> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let threshold = body_threshold(&v.data, fraction).ok_or("the volume holds no finite value")?;
    let scale = scale as f64;
    let floor = 1e-6 * scale;
    let level = |d: &[f32]| (median_abs(d).max(floor) / scale).ln();
    names
        .iter()
        .map(|name| {
            let value = match name.as_str() {
                "noise_px" => level(&body_highpass(&v.data, v.nx, v.ny, v.nz, threshold)),
                "noise_2px" => {
                    let (b, bw, bh) = binned(&v.data, v.nx, v.ny, v.nz);
                    level(&body_highpass(&b, bw, bh, v.nz, threshold))
                }
                "axial_corr" => axial_corr(&v.data, v.nx, v.ny, v.nz, threshold),
                other => return Err(format!("texture descriptor {other:?} is unknown (this build knows {KNOWN:?})")),
            };
            Ok(value as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A uniform activity of 10 over the whole plane (no edges, whose
    /// high-pass is the same in every slice) with noise from a fixed LCG,
    /// optionally smoothed in-plane (5-point cross) and/or across slices.
    fn phantom(nz: usize, n: usize, noise: f32, smooth_xy: bool, smooth_z: bool) -> Volume {
        let mut state = 12345u64;
        let mut rand = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let mut data = vec![0.0f32; nz * n * n];
        for d in data.iter_mut() {
            *d = 10.0 + noise * rand();
        }
        let src = data.clone();
        let at = |z: usize, y: usize, x: usize| src[(z * n + y) * n + x];
        for z in 0..nz {
            for y in 1..n - 1 {
                for x in 1..n - 1 {
                    let mut v = at(z, y, x);
                    if smooth_xy {
                        v = (at(z, y, x - 1) + at(z, y, x) + at(z, y, x + 1) + at(z, y - 1, x) + at(z, y + 1, x)) / 5.0;
                    }
                    if smooth_z && z > 0 && z + 1 < nz {
                        v = (v + at(z - 1, y, x) + at(z + 1, y, x)) / 3.0;
                    }
                    data[(z * n + y) * n + x] = v;
                }
            }
        }
        Volume { nx: n, ny: n, nz, spacing: [2.0, 2.0, 3.0], data, frame_duration_s: Some(30.0) }
    }

    fn names() -> Vec<String> {
        KNOWN.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn more_noise_raises_the_noise_levels_by_its_ratio() {
        let a = describe(&phantom(6, 64, 1.0, false, false), &names(), 0.05, 10.0).unwrap();
        let b = describe(&phantom(6, 64, 4.0, false, false), &names(), 0.05, 10.0).unwrap();
        // the high-pass is linear in the noise: ln 4 apart (the disc edge aside)
        assert!(((b[0] - a[0]) - 4f32.ln()).abs() < 0.05, "{a:?} {b:?}");
        assert!(((b[1] - a[1]) - 4f32.ln()).abs() < 0.1, "{a:?} {b:?}");
        // independent slices: no axial correlation
        assert!(a[2].abs() < 0.05 && b[2].abs() < 0.05, "{a:?} {b:?}");
    }

    #[test]
    fn smoothing_lowers_the_pixel_noise_more_than_the_binned_and_across_slices_correlates() {
        let white = describe(&phantom(6, 64, 4.0, false, false), &names(), 0.05, 10.0).unwrap();
        let soft = describe(&phantom(6, 64, 4.0, true, false), &names(), 0.05, 10.0).unwrap();
        assert!(soft[0] < white[0] - 0.3, "{white:?} {soft:?}");
        assert!(soft[1] - soft[0] > white[1] - white[0] + 0.2, "{white:?} {soft:?}");
        let z = describe(&phantom(6, 64, 4.0, false, true), &names(), 0.05, 10.0).unwrap();
        assert!(z[2] > 0.4, "{z:?}");
    }

    #[test]
    fn scale_only_shifts_the_levels_and_unknown_names_are_refused() {
        let v = phantom(4, 32, 2.0, false, false);
        let a = describe(&v, &names(), 0.05, 10.0).unwrap();
        let b = describe(&v, &names(), 0.05, 20.0).unwrap();
        assert!(((a[0] - b[0]) - 2f32.ln()).abs() < 1e-5 && (a[2] - b[2]).abs() < 1e-9);
        let one = describe(&phantom(1, 32, 2.0, false, false), &["axial_corr".to_string()], 0.05, 10.0).unwrap();
        assert_eq!(one, vec![0.0]);
        let e = describe(&v, &["snr".to_string()], 0.05, 10.0).unwrap_err();
        assert!(e.contains("\"snr\" is unknown"), "{e}");
    }
}
