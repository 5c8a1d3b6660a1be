//! The lesion guard: a restored image may not move the local mean further
//! from the measured frame than the frame's own noise explains.
//!
//! A denoiser that reads a faint lesion as noise flattens it; one that
//! trusts a noise spike keeps it. Both move the mean of a small region away
//! from what the frame measured. After restoration (and test-time
//! augmentation) the guard smooths the network's change `x − R` (x the short
//! frame) with a 3D Gaussian of `fwhm_mm` and compares it, voxel by voxel,
//! with the frame's noise at that scale, `k · smoothed(R)`: `k` is the
//! robust spread (1.4826 × median absolute deviation) of `smoothed(x − R) ÷
//! smoothed(R)` over the body (voxels above the normalisation's fraction of
//! the frame's 99.9th percentile), so it is the frame's relative noise at
//! the guard's scale, measured on the series itself. Wherever the smoothed
//! change exceeds `z` times that noise, the excess is added back to R (a
//! soft threshold): a flattened lesion gets its local mean back, regions the
//! network changed within the noise are left exactly as restored.
//!
//! The package says whether and how (`[guard] fwhm_mm`, `z`); the numbers
//! and what they bought are in the model's EVAL.md. A package may give
//! several scales (`[[guard]]` tables), applied one after the other in the
//! order written: a lesion flattened by less than the noise at a small scale
//! can still exceed the (lower) noise at a larger one.

use serde::{Deserialize, Deserializer};

use super::Volume;
use super::gaussian;

/// `[guard]` of model.toml.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    /// FWHM of the 3D Gaussian that defines "local" (mm).
    pub fwhm_mm: f64,
    /// How many noise SDs the smoothed change may reach before the excess is given back.
    pub z: f64,
    /// How the frame's noise grows with the local level: SD ∝ level^power.
    /// 1 (the default) takes the relative noise to be the same everywhere;
    /// a reconstruction's noise grows more slowly than its level (the
    /// simulator's OSEM frames: power 0.7–0.8 at 5 mm), so below 1 a hot
    /// lesion is held to the noise it really has, not to the body's
    /// relative noise scaled up to its level.
    #[serde(default = "unit_power")]
    pub power: f64,
}

fn unit_power() -> f64 {
    1.0
}

/// What the guard did to one series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardReport {
    /// The frame's relative noise at the guard's scale (k).
    pub noise: f64,
    /// Share of body voxels whose value the guard changed.
    pub changed_share: f64,
}

impl Guard {
    pub fn check(&self) -> Result<(), String> {
        if !(1.0..=30.0).contains(&self.fwhm_mm) {
            return Err(format!("guard.fwhm_mm must be 1..=30 mm, is {}", self.fwhm_mm));
        }
        if !(self.z.is_finite() && self.z > 0.0 && self.z <= 10.0) {
            return Err(format!("guard.z must be above 0 and at most 10, is {}", self.z));
        }
        if !(0.0..=1.0).contains(&self.power) {
            return Err(format!("guard.power must be 0..=1 (1: noise proportional to the level), is {}", self.power));
        }
        Ok(())
    }

    /// Guard `r` (restored from `x`, same grid) in place. `fraction` is the
    /// package's body threshold (`normalisation.threshold_fraction`). None
    /// (and `r` untouched) when the frame has no body to measure noise on.
    pub fn apply(&self, x: &Volume, r: &mut Volume, fraction: f64) -> Option<GuardReport> {
        let threshold = super::texture::body_threshold(&x.data, fraction)?;
        let change = Volume { data: x.data.iter().zip(&r.data).map(|(a, b)| a - b).collect(), ..x.clone_shape() };
        let change = gaussian::filter_owned(change, self.fwhm_mm).data;
        let level = gaussian::filter(r, self.fwhm_mm).data;
        let body = |i: usize| x.data[i] as f64 > threshold && level[i] > 0.0;
        // the noise SD at each voxel, up to k: level^power, tied to the body's
        // median level so that k stays the frame's relative noise there
        let scaled: Option<Vec<f32>> = if self.power == 1.0 {
            None
        } else {
            let mut inside: Vec<f32> = (0..x.data.len()).filter(|&i| body(i)).map(|i| level[i]).collect();
            if inside.is_empty() {
                return None;
            }
            let typical = median(&mut inside) as f64;
            let (p, tie) = (self.power, typical.powf(1.0 - self.power));
            Some(level.iter().map(|l| ((*l as f64).max(0.0).powf(p) * tie) as f32).collect())
        };
        let noise: &[f32] = scaled.as_deref().unwrap_or(&level);
        let mut rel: Vec<f32> = (0..x.data.len()).filter(|&i| body(i)).map(|i| change[i] / noise[i]).collect();
        if rel.is_empty() {
            return None;
        }
        let centre = median(&mut rel);
        for v in rel.iter_mut() {
            *v = (*v - centre).abs();
        }
        let k = 1.4826 * median(&mut rel) as f64;
        drop(rel);
        let (mut changed, mut inside) = (0usize, 0usize);
        for (i, out) in r.data.iter_mut().enumerate() {
            let d = change[i] as f64;
            let allowed = self.z * k * (noise[i] as f64).max(0.0);
            let excess = d.abs() - allowed;
            if excess > 0.0 {
                *out += (d.signum() * excess) as f32;
            }
            if body(i) {
                inside += 1;
                changed += usize::from(excess > 0.0);
            }
        }
        Some(GuardReport { noise: k, changed_share: changed as f64 / inside.max(1) as f64 })
    }
}

/// `[guard]` (one table) or `[[guard]]` (several) of model.toml, as the
/// list of scales to apply in order.
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Guard>, D::Error> {
    use serde::de::Error;
    match toml::Value::deserialize(d)? {
        toml::Value::Array(tables) => tables.into_iter().map(|t| t.try_into::<Guard>().map_err(D::Error::custom)).collect(),
        table => table.try_into::<Guard>().map(|g| vec![g]).map_err(D::Error::custom),
    }
}

/// The median of `v` (reordered; the upper middle for even lengths).
fn median(v: &mut [f32]) -> f32 {
    let k = v.len() / 2;
    *v.select_nth_unstable_by(k, f32::total_cmp).1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 24³ volume at 4 mm: a uniform body at 1000 Bq/ml with a hot 20 mm
    /// sphere at 2000, plus deterministic pseudo-random noise of `sd_rel`.
    fn phantom(sd_rel: f32, seed: u64) -> Volume {
        phantom_with(sd_rel, seed, 2000.0)
    }

    /// [`phantom`] with the sphere at `hot` Bq/ml.
    fn phantom_with(sd_rel: f32, seed: u64, hot: f32) -> Volume {
        phantom_noise(sd_rel, seed, hot, 1.0)
    }

    /// [`phantom_with`] with a noise SD that grows as level^`power`
    /// (`sd_rel` of the level at the body's 1000 Bq/ml).
    fn phantom_noise(sd_rel: f32, seed: u64, hot: f32, power: f32) -> Volume {
        let n = 24;
        let mut s = seed;
        let mut data = Vec::with_capacity(n * n * n);
        for z in 0..n {
            for y in 0..n {
                for x in 0..n {
                    let d2 = ((z as f32 - 12.0).powi(2) + (y as f32 - 12.0).powi(2) + (x as f32 - 12.0).powi(2)) * 16.0;
                    let v = if d2 <= 100.0 { hot } else { 1000.0 };
                    // sum of four uniforms: roughly Gaussian, SD 1
                    let mut g = 0.0f32;
                    for _ in 0..4 {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        g += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                    }
                    data.push(v + 1000.0 * (v / 1000.0).powf(power) * sd_rel * g * 1.732);
                }
            }
        }
        Volume { nx: n, ny: n, nz: n, spacing: [4.0, 4.0, 4.0], data, frame_duration_s: Some(30.0) }
    }

    fn sphere_mean(v: &Volume) -> f64 {
        let mut s = (0.0, 0);
        for z in 0..v.nz {
            for y in 0..v.ny {
                for x in 0..v.nx {
                    let d2 = ((z as f64 - 12.0).powi(2) + (y as f64 - 12.0).powi(2) + (x as f64 - 12.0).powi(2)) * 16.0;
                    if d2 <= 64.0 {
                        s.0 += v.data[(z * v.ny + y) * v.nx + x] as f64;
                        s.1 += 1;
                    }
                }
            }
        }
        s.0 / s.1 as f64
    }

    const GUARD: Guard = Guard { fwhm_mm: 5.0, z: 1.25, power: 1.0 };

    #[test]
    fn a_flattened_lesion_gets_its_mean_back() {
        let x = phantom(0.2, 7);
        // the "restoration" erased the lesion: the body level everywhere
        let mut r = Volume { data: vec![1000.0; x.data.len()], ..x.clone_shape() };
        let before = sphere_mean(&r);
        let report = GUARD.apply(&x, &mut r, 0.05).unwrap();
        let after = sphere_mean(&r);
        let measured = sphere_mean(&x);
        assert!(before < 1010.0 && measured > 1900.0, "{before} {measured}");
        assert!(after > 1700.0, "the guard gave back {after:.0} of the measured {measured:.0} Bq/ml");
        assert!(report.changed_share > 0.0, "{report:?}");
    }

    #[test]
    fn a_larger_scale_finds_a_faint_lesion_the_small_one_cannot() {
        // a 20 % lesion in a noisy frame, erased: at 5 mm most of the
        // flattening hides in the noise; at 12 mm the noise is lower
        let x = phantom_with(0.25, 5, 1200.0);
        let flat = Volume { data: vec![1000.0; x.data.len()], ..x.clone_shape() };
        let wide = Guard { fwhm_mm: 12.0, z: 1.25, power: 1.0 };
        let guarded = |scales: &[Guard], mut r: Volume| {
            for g in scales {
                g.apply(&x, &mut r, 0.05).unwrap();
            }
            r
        };
        let (one, two) = (guarded(&[GUARD], flat.clone()), guarded(&[GUARD, wide], flat));
        let (m1, m2, measured) = (sphere_mean(&one), sphere_mean(&two), sphere_mean(&x));
        assert!(measured - m1 > 100.0, "at 5 mm alone the guard gave back {m1:.0} of the measured {measured:.0} Bq/ml");
        assert!(m2 - m1 > 0.25 * (measured - m1), "with 12 mm after it {m2:.0} (5 mm alone {m1:.0}) of {measured:.0} Bq/ml");
        // and a perfect restoration keeps most of what it removed at both scales
        let clean = phantom_with(0.0, 0, 1200.0);
        let kept = guarded(&[GUARD, wide], clean.clone());
        let rms =
            |a: &Volume| (a.data.iter().zip(&clean.data).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>() / a.data.len() as f64).sqrt();
        assert!(rms(&kept) < 0.3 * rms(&x), "two scales put back {:.1} of the frame's {:.1} Bq/ml RMS noise", rms(&kept), rms(&x));
    }

    #[test]
    fn a_noise_model_below_power_one_holds_a_hot_lesion_to_its_own_noise() {
        // noise that grows as √level: at 4000 Bq/ml the sphere's relative
        // noise is half the body's. A restoration that takes a quarter off
        // the sphere stays inside "relative noise × level" but not inside
        // the sphere's own noise.
        let x = phantom_noise(0.3, 3, 4000.0, 0.5);
        let mut r = phantom_noise(0.0, 0, 4000.0, 0.5);
        for v in r.data.iter_mut().filter(|v| **v > 3000.0) {
            *v = 3000.0;
        }
        let guarded = |power: f64| {
            let mut out = r.clone();
            Guard { power, ..GUARD }.apply(&x, &mut out, 0.05).unwrap();
            sphere_mean(&out)
        };
        let (relative, own, measured) = (guarded(1.0), guarded(0.5), sphere_mean(&x));
        assert!(own - relative > 0.2 * (measured - relative), "power 0.5 gave back {own:.0}, power 1 {relative:.0} of {measured:.0} Bq/ml");
    }

    #[test]
    fn a_restoration_within_the_noise_is_left_alone() {
        let x = phantom(0.2, 11);
        // a perfect denoiser: the noise-free image
        let clean = phantom(0.0, 0);
        let mut r = clean.clone();
        let report = GUARD.apply(&x, &mut r, 0.05).unwrap();
        // the frame's relative noise at 5 mm, measured on the series
        assert!(report.noise > 0.02 && report.noise < 0.2, "{report:?}");
        // a soft threshold at 1.25 SD gives back only the tails of the
        // smoothed noise, and only their excess: a small part of the noise
        let rms =
            |a: &Volume| (a.data.iter().zip(&clean.data).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>() / a.data.len() as f64).sqrt();
        let (kept, frame) = (rms(&r), rms(&x));
        assert!(kept < 0.25 * frame, "the guard put back {kept:.1} of the frame's {frame:.1} Bq/ml RMS noise");
        assert!((sphere_mean(&r) / sphere_mean(&clean) - 1.0).abs() < 0.02);
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        assert!(Guard { fwhm_mm: 0.5, z: 1.0, power: 1.0 }.check().is_err());
        assert!(Guard { fwhm_mm: 5.0, z: 0.0, power: 1.0 }.check().is_err());
        assert!(Guard { fwhm_mm: 5.0, z: f64::NAN, power: 1.0 }.check().is_err());
        assert!(Guard { power: 1.2, ..GUARD }.check().is_err());
        assert!(Guard { power: -0.1, ..GUARD }.check().is_err());
        assert!(GUARD.check().is_ok() && Guard { power: 0.75, ..GUARD }.check().is_ok());
    }

    #[test]
    fn an_empty_frame_is_left_untouched() {
        let x = Volume { data: vec![0.0; 8 * 8 * 8], nx: 8, ny: 8, nz: 8, spacing: [4.0; 3], frame_duration_s: Some(30.0) };
        let mut r = x.clone();
        assert!(GUARD.apply(&x, &mut r, 0.05).is_none());
        assert!(r.data.iter().all(|v| *v == 0.0));
    }
}
