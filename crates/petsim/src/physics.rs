//! Physical PET acquisition of one transaxial slice (2D): attenuation,
//! parallel-beam projection with detector blur, scatter and randoms as
//! smooth additive backgrounds, Poisson counts for the 90 s frame, **nested**
//! 60 s and 30 s frames by binomial thinning of the 90 s counts (as list-mode
//! rebinning does), and OSEM reconstruction with the same corrections,
//! scaled to Bq/ml.
//!
//! Calibration: the sensitivity constant is set so that a torso slice with
//! liver (mean activity ~3 kBq/ml over ~30 cm × 22 cm) gets ~2 M prompts at
//! 90 s; with that, liver noise after 3 × 8 OSEM is ~10 % (see the tests).
//! The projector is ray-driven with bilinear interpolation and its
//! backprojector is the exact adjoint (same weights, scatter-add).

use rand::Rng;
use rand_distr::{Binomial, Distribution, Poisson};

/// Scanner and reconstruction settings.
#[derive(Debug, Clone)]
pub struct Scanner {
    pub n_angles: usize,
    /// Detector resolution (FWHM, mm) applied along the detector.
    pub fwhm_mm: f64,
    /// Scatter as a fraction of trues + scatter.
    pub scatter_fraction: f64,
    /// Randoms as a fraction of all prompts.
    pub randoms_fraction: f64,
    /// Prompts of the reference torso slice in 90 s.
    pub reference_counts_90s: f64,
    pub iterations: usize,
    pub subsets: usize,
    /// Gaussian post-filter after OSEM (FWHM mm; 0 = none, as the 1.x
    /// models' training data). In-plane here; [`Scanner::post_filter_3d`]
    /// extends it across slices (the study writers apply that part).
    pub post_filter_fwhm_mm: f64,
    /// The post-filter is 3D (as on clinical scanners): the same FWHM along
    /// z, so noise is correlated between neighbouring slices.
    pub post_filter_3d: bool,
    /// Axial detector resolution (FWHM mm): the activity is blurred across
    /// slices before projection (the axial part of a 3D PSF; 0 = none).
    pub axial_fwhm_mm: f64,
    /// Resolution modelling in OSEM ("PSF" reconstructions): the detector
    /// blur is in the system model. Without it, OSEM assumes ideal
    /// resolution (less noise, less contrast, no edge overshoot).
    pub resolution_modelling: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            n_angles: 96,
            fwhm_mm: 5.0,
            scatter_fraction: 0.3,
            randoms_fraction: 0.1,
            reference_counts_90s: 2.0e6,
            iterations: 3,
            subsets: 8,
            post_filter_fwhm_mm: 0.0,
            post_filter_3d: false,
            axial_fwhm_mm: 0.0,
            resolution_modelling: true,
        }
    }
}

impl Scanner {
    /// Angles for an n×n matrix: about 0.75 n (96 at 128²), at least 96 and
    /// at most 192, so larger matrices keep their angular sampling within
    /// what the CPU can simulate.
    pub fn angles_for(n: usize) -> usize {
        ((n as f64 * 0.75).round() as usize).clamp(96, 192)
    }
}

/// Gaussian blur along z of a stack of `slices` planes of `plane` voxels
/// (σ in slices), with mirrored edges: a slab is a piece of a longer scan,
/// and mirroring keeps the mean and the noise texture at its ends.
pub fn blur_z(stack: &mut [f32], slices: usize, plane: usize, sigma: f64) {
    if sigma < 1e-3 || slices < 2 {
        return;
    }
    let r = (3.0 * sigma).ceil() as i64;
    let k: Vec<f32> = (-r..=r).map(|i| (-(i as f64).powi(2) / (2.0 * sigma * sigma)).exp() as f32).collect();
    let sum: f32 = k.iter().sum();
    let src = stack.to_vec();
    let last = slices as i64 - 1;
    let mirror = |z: i64| -> usize {
        let mut z = z;
        while z < 0 || z > last {
            z = if z < 0 { -z } else { 2 * last - z };
        }
        z as usize
    };
    for z in 0..slices {
        let out = &mut stack[z * plane..(z + 1) * plane];
        out.iter_mut().for_each(|v| *v = 0.0);
        for (j, w) in k.iter().enumerate() {
            let zz = mirror(z as i64 + j as i64 - r);
            let w = w / sum;
            for (o, v) in out.iter_mut().zip(&src[zz * plane..(zz + 1) * plane]) {
                *o += w * v;
            }
        }
    }
}

/// Ray-driven parallel-beam projector over an n×n image of `px` mm pixels.
pub struct Projector {
    pub n: usize,
    pub px: f64,
    pub n_bins: usize,
    angles: Vec<(f64, f64)>,
    step: f64,
    n_steps: usize,
}

impl Projector {
    pub fn new(n: usize, px: f64, n_angles: usize) -> Projector {
        let angles = (0..n_angles)
            .map(|a| {
                let th = std::f64::consts::PI * a as f64 / n_angles as f64;
                (th.cos(), th.sin())
            })
            .collect();
        let half = n as f64 * px * std::f64::consts::SQRT_2 / 2.0;
        let step = px / 2.0;
        Projector { n, px, n_bins: n, angles, step, n_steps: (2.0 * half / step).ceil() as usize }
    }

    pub fn n_angles(&self) -> usize {
        self.angles.len()
    }

    /// Visit the bilinear weights of every sample on ray (angle a, bin b).
    #[inline]
    fn ray(&self, a: usize, b: usize, mut f: impl FnMut(usize, f32)) {
        let (c, s) = self.angles[a];
        let n = self.n as f64;
        let t = (b as f64 - self.n_bins as f64 / 2.0 + 0.5) * self.px;
        let half = self.n_steps as f64 * self.step / 2.0;
        let w = (self.step / self.px) as f32; // line integral in pixel units
        // Only the samples inside the image contribute: x and y are linear in
        // k, so the steps to visit are found in closed form (widened by two
        // steps for rounding; the test in the loop still decides), which
        // skips the corners of the √2-long ray.
        let (x_at0, dx) = ((t * c + (half - 0.5 * self.step) * s) / self.px + n / 2.0 - 0.5, -s * self.step / self.px);
        let (y_at0, dy) = ((t * s - (half - 0.5 * self.step) * c) / self.px + n / 2.0 - 0.5, c * self.step / self.px);
        let (mut lo, mut hi) = (0.0f64, self.n_steps as f64);
        for (p, q) in [(x_at0, dx), (y_at0, dy)] {
            if q.abs() < 1e-12 {
                continue; // (nearly) constant along the ray: the loop's test decides
            }
            let (a, b) = ((0.0 - p) / q, (n - 1.0 - p) / q);
            lo = lo.max(a.min(b));
            hi = hi.min(a.max(b));
        }
        if hi < lo {
            return;
        }
        let first = (lo.floor() - 2.0).max(0.0) as usize;
        let last = ((hi.ceil() + 2.0) as usize).min(self.n_steps);
        for k in first..last {
            let u = -half + (k as f64 + 0.5) * self.step;
            // position in pixel coordinates (centre of pixel i at i + 0.5)
            let x = (t * c - u * s) / self.px + n / 2.0 - 0.5;
            let y = (t * s + u * c) / self.px + n / 2.0 - 0.5;
            if x < 0.0 || y < 0.0 || x >= n - 1.0 || y >= n - 1.0 {
                continue;
            }
            // x, y ≥ 0 here: truncation is floor (and needs no libm call)
            let (x0, y0) = (x as usize, y as usize);
            let (fx, fy) = ((x - x0 as f64) as f32, (y - y0 as f64) as f32);
            let i = y0 * self.n + x0;
            f(i, w * (1.0 - fx) * (1.0 - fy));
            f(i + 1, w * fx * (1.0 - fy));
            f(i + self.n, w * (1.0 - fx) * fy);
            f(i + self.n + 1, w * fx * fy);
        }
    }

    /// Sinogram `[angle][bin]` of `img` for the given angles (others 0).
    pub fn forward(&self, img: &[f32], angles: impl Iterator<Item = usize>) -> Vec<f32> {
        let mut out = vec![0.0f32; self.n_angles() * self.n_bins];
        for a in angles {
            for b in 0..self.n_bins {
                let mut acc = 0.0f32;
                self.ray(a, b, |i, w| acc += w * img[i]);
                out[a * self.n_bins + b] = acc;
            }
        }
        out
    }

    /// Exact adjoint of [`Projector::forward`].
    pub fn back(&self, sino: &[f32], angles: impl Iterator<Item = usize>) -> Vec<f32> {
        let mut out = vec![0.0f32; self.n * self.n];
        for a in angles {
            for b in 0..self.n_bins {
                let v = sino[a * self.n_bins + b];
                if v != 0.0 {
                    self.ray(a, b, |i, w| out[i] += w * v);
                }
            }
        }
        out
    }
}

/// Gaussian blur along the bins of each angle (symmetric: its own adjoint).
fn blur_bins(sino: &[f32], n_bins: usize, sigma_bins: f64) -> Vec<f32> {
    if sigma_bins < 1e-3 {
        return sino.to_vec();
    }
    let r = (3.0 * sigma_bins).ceil() as i64;
    let k: Vec<f32> = (-r..=r).map(|i| (-(i as f64).powi(2) / (2.0 * sigma_bins * sigma_bins)).exp() as f32).collect();
    let sum: f32 = k.iter().sum();
    let mut out = vec![0.0f32; sino.len()];
    for (row_in, row_out) in sino.chunks(n_bins).zip(out.chunks_mut(n_bins)) {
        for (b, o) in row_out.iter_mut().enumerate() {
            let mut acc = 0.0;
            for (j, w) in k.iter().enumerate() {
                let p = b as i64 + j as i64 - r;
                if p >= 0 && (p as usize) < n_bins {
                    acc += w * row_in[p as usize];
                }
            }
            *o = acc / sum;
        }
    }
    out
}

/// The measurement model of one slice: what OSEM needs besides the counts.
pub struct Model {
    pub proj: Projector,
    /// Attenuation factor per sinogram bin.
    pub att: Vec<f32>,
    pub sigma_bins: f64,
    /// Counts per (Bq/ml × line integral in pixels) in 90 s.
    pub k90: f64,
    /// Expected scatter + randoms per bin in 90 s.
    pub background90: Vec<f32>,
}

/// Counts of one slice: 90 s, and nested 60 s and 30 s subsets of it.
pub struct Frames {
    pub c90: Vec<u32>,
    pub c60: Vec<u32>,
    pub c30: Vec<u32>,
}

impl Model {
    /// Build the model for an activity map (Bq/ml) and attenuation map
    /// (1/mm) on an n×n grid of `px` mm.
    pub fn new(activity: &[f32], mu: &[f32], n: usize, px: f64, sc: &Scanner, k90: f64) -> Model {
        let proj = Projector::new(n, px, sc.n_angles);
        let all = 0..proj.n_angles();
        let mu_line = proj.forward(mu, all.clone());
        let att: Vec<f32> = mu_line.iter().map(|m| (-(*m as f64) * px).exp() as f32).collect();
        let sigma_bins = sc.fwhm_mm / 2.3548 / px;
        let trues = blur_bins(&mul(&att, &proj.forward(activity, all)), proj.n_bins, sigma_bins);
        let trues_total: f64 = trues.iter().map(|v| *v as f64).sum::<f64>() * k90;
        // Scatter: a broad blur of the trues, scaled to its fraction.
        let broad = blur_bins(&trues, proj.n_bins, 60.0 / px);
        let broad_total: f64 = broad.iter().map(|v| *v as f64).sum::<f64>().max(1e-12);
        let scatter_total = trues_total * sc.scatter_fraction / (1.0 - sc.scatter_fraction);
        let prompts_wo_randoms = trues_total + scatter_total;
        let randoms_total = prompts_wo_randoms * sc.randoms_fraction / (1.0 - sc.randoms_fraction);
        let n_bins_total = trues.len() as f64;
        let background90 = broad.iter().map(|b| (*b as f64 / broad_total * scatter_total + randoms_total / n_bins_total) as f32).collect();
        Model { proj, att, sigma_bins, k90, background90 }
    }

    /// Expected counts in `t` seconds for an image, on every angle.
    pub fn expected_counts(&self, img: &[f32], t: f64) -> Vec<f32> {
        let all: Vec<usize> = (0..self.proj.n_angles()).collect();
        self.expected(img, t, &all)
    }

    /// Expected counts in `t` seconds for an image, on the given angles.
    fn expected(&self, img: &[f32], t: f64, angles: &[usize]) -> Vec<f32> {
        let f = self.proj.forward(img, angles.iter().copied());
        let mut y = blur_bins(&mul(&self.att, &f), self.proj.n_bins, self.sigma_bins);
        let kt = (self.k90 * t / 90.0) as f32;
        let bt = (t / 90.0) as f32;
        for (v, b) in y.iter_mut().zip(&self.background90) {
            *v = *v * kt + b * bt;
        }
        y
    }

    /// Sample the 90 s counts and thin them to nested 60 s and 30 s frames.
    pub fn acquire(&self, activity: &[f32], rng: &mut impl Rng) -> Frames {
        let all: Vec<usize> = (0..self.proj.n_angles()).collect();
        let mean = self.expected(activity, 90.0, &all);
        let c90: Vec<u32> =
            mean.iter().map(|m| if *m > 0.0 { Poisson::new(*m as f64).map(|p| p.sample(rng) as u32).unwrap_or(0) } else { 0 }).collect();
        let thin = |c: &[u32], p: f64, rng: &mut dyn rand::RngCore| -> Vec<u32> {
            c.iter().map(|n| if *n == 0 { 0 } else { Binomial::new(*n as u64, p).map(|b| b.sample(rng) as u32).unwrap_or(0) }).collect()
        };
        let c60 = thin(&c90, 60.0 / 90.0, rng);
        let c30 = thin(&c60, 30.0 / 60.0, rng);
        Frames { c90, c60, c30 }
    }

    /// OSEM with attenuation, blur, scatter and randoms in the model; the
    /// image is in Bq/ml for counts acquired over `t` seconds.
    pub fn osem(&self, counts: &[u32], t: f64, sc: &Scanner) -> Vec<f32> {
        let c: Vec<f32> = counts.iter().map(|v| *v as f32).collect();
        self.osem_f32(&c, t, sc)
    }

    /// [`Model::osem`] of real-valued data: run on the expected counts it
    /// gives the noise-free reconstruction (same resolution, no noise).
    pub fn osem_f32(&self, counts: &[f32], t: f64, sc: &Scanner) -> Vec<f32> {
        let n = self.proj.n;
        let na = self.proj.n_angles();
        let kt = (self.k90 * t / 90.0) as f32;
        let bt = (t / 90.0) as f32;
        // The blur OSEM assumes: the detector's with resolution modelling,
        // none without (the data are blurred either way).
        let sigma = if sc.resolution_modelling { self.sigma_bins } else { 0.0 };
        let subsets: Vec<Vec<usize>> = (0..sc.subsets).map(|s| (s..na).step_by(sc.subsets).collect()).collect();
        // Sensitivity per subset: A^T 1 with A = k · blur · att · P.
        let sens: Vec<Vec<f32>> = subsets
            .iter()
            .map(|sub| {
                let mut ones = vec![0.0f32; na * self.proj.n_bins];
                for &a in sub {
                    ones[a * self.proj.n_bins..(a + 1) * self.proj.n_bins].iter_mut().for_each(|v| *v = kt);
                }
                let bl = mul(&self.att, &blur_bins(&ones, self.proj.n_bins, sigma));
                self.proj.back(&bl, sub.iter().copied())
            })
            .collect();
        let mut x = vec![1000.0f32; n * n];
        for _ in 0..sc.iterations {
            for (sub, sens) in subsets.iter().zip(&sens) {
                let f = self.proj.forward(&x, sub.iter().copied());
                let ybar = blur_bins(&mul(&self.att, &f), self.proj.n_bins, sigma);
                let mut ratio = vec![0.0f32; ybar.len()];
                for &a in sub {
                    for b in 0..self.proj.n_bins {
                        let i = a * self.proj.n_bins + b;
                        let e = ybar[i] * kt + self.background90[i] * bt;
                        ratio[i] = if e > 1e-12 { counts[i] / e * kt } else { 0.0 };
                    }
                }
                let corr = self.proj.back(&mul(&self.att, &blur_bins(&ratio, self.proj.n_bins, sigma)), sub.iter().copied());
                for ((xi, ci), si) in x.iter_mut().zip(&corr).zip(sens) {
                    *xi = if *si > 1e-12 { *xi * ci / si } else { 0.0 };
                }
            }
        }
        if sc.post_filter_fwhm_mm > 0.0 {
            x = post_filter(&x, n, sc.post_filter_fwhm_mm / 2.3548 / self.proj.px);
        }
        x
    }
}

/// Separable in-plane Gaussian (σ in pixels); zero outside the image (air).
fn post_filter(img: &[f32], n: usize, sigma: f64) -> Vec<f32> {
    let rows = blur_bins(img, n, sigma);
    let mut t = vec![0.0f32; n * n];
    for j in 0..n {
        for i in 0..n {
            t[i * n + j] = rows[j * n + i];
        }
    }
    let cols = blur_bins(&t, n, sigma);
    let mut out = vec![0.0f32; n * n];
    for j in 0..n {
        for i in 0..n {
            out[j * n + i] = cols[i * n + j];
        }
    }
    out
}

fn mul(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x * y).collect()
}

/// Sensitivity constant so that `activity` (the reference torso slice) gets
/// `sc.reference_counts_90s` prompts in 90 s.
pub fn calibrate(activity: &[f32], mu: &[f32], n: usize, px: f64, sc: &Scanner) -> f64 {
    let m = Model::new(activity, mu, n, px, sc, 1.0);
    let all: Vec<usize> = (0..m.proj.n_angles()).collect();
    let total: f64 = m.expected(activity, 90.0, &all).iter().map(|v| *v as f64).sum();
    sc.reference_counts_90s / total
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const N: usize = 96;
    const PX: f64 = 4.0;

    /// A uniform water cylinder (radius 150 mm) with optional hot spheres.
    fn cylinder(spheres: &[(f64, f64, f64)], contrast: f32) -> (Vec<f32>, Vec<f32>) {
        let mut act = vec![0.0f32; N * N];
        let mut mu = vec![0.0f32; N * N];
        for j in 0..N {
            for i in 0..N {
                let x = (i as f64 + 0.5 - N as f64 / 2.0) * PX;
                let y = (j as f64 + 0.5 - N as f64 / 2.0) * PX;
                if x * x + y * y <= 150.0 * 150.0 {
                    act[j * N + i] = 2000.0;
                    mu[j * N + i] = 0.0096;
                    for (cx, cy, d) in spheres {
                        if (x - cx).powi(2) + (y - cy).powi(2) <= (d / 2.0).powi(2) {
                            act[j * N + i] = 2000.0 * contrast;
                        }
                    }
                }
            }
        }
        (act, mu)
    }

    fn roi(img: &[f32], cx: f64, cy: f64, r: f64) -> Vec<f32> {
        let mut v = Vec::new();
        for j in 0..N {
            for i in 0..N {
                let x = (i as f64 + 0.5 - N as f64 / 2.0) * PX;
                let y = (j as f64 + 0.5 - N as f64 / 2.0) * PX;
                if (x - cx).powi(2) + (y - cy).powi(2) <= r * r {
                    v.push(img[j * N + i]);
                }
            }
        }
        v
    }

    fn mean_sd(v: &[f32]) -> (f64, f64) {
        let m = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        (m, (v.iter().map(|x| (*x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt())
    }

    #[test]
    fn post_filter_smooths_and_keeps_the_mean() {
        let sc = Scanner { post_filter_fwhm_mm: 10.0, ..Scanner::default() };
        let (act, mu) = cylinder(&[], 1.0);
        let k = calibrate(&act, &mu, N, PX, &sc);
        let m = Model::new(&act, &mu, N, PX, &sc, k);
        let f = m.acquire(&act, &mut rand::rngs::StdRng::seed_from_u64(3));
        let raw = m.osem(&f.c30, 30.0, &Scanner::default());
        let filtered = m.osem(&f.c30, 30.0, &sc);
        let (m0, s0) = mean_sd(&roi(&raw, 0.0, 0.0, 90.0));
        let (m1, s1) = mean_sd(&roi(&filtered, 0.0, 0.0, 90.0));
        assert!((m1 / m0 - 1.0).abs() < 0.01, "mean {m0} -> {m1}");
        assert!(s1 < 0.75 * s0, "noise {s0} -> {s1}");
    }

    #[test]
    fn rays_visit_exactly_the_samples_inside_the_image() {
        // the closed-form step range against visiting every step
        for (n, px, n_angles) in [(33, 4.0, 17), (64, 2.37, 31), (20, 5.3, 8)] {
            let p = Projector::new(n, px, n_angles);
            for a in 0..n_angles {
                for b in 0..p.n_bins {
                    let mut fast = Vec::new();
                    p.ray(a, b, |i, w| fast.push((i, w)));
                    let mut all = Vec::new();
                    let (c, s) = p.angles[a];
                    let nf = n as f64;
                    let t = (b as f64 - p.n_bins as f64 / 2.0 + 0.5) * p.px;
                    let half = p.n_steps as f64 * p.step / 2.0;
                    let w = (p.step / p.px) as f32;
                    for k in 0..p.n_steps {
                        let u = -half + (k as f64 + 0.5) * p.step;
                        let x = (t * c - u * s) / p.px + nf / 2.0 - 0.5;
                        let y = (t * s + u * c) / p.px + nf / 2.0 - 0.5;
                        if x < 0.0 || y < 0.0 || x >= nf - 1.0 || y >= nf - 1.0 {
                            continue;
                        }
                        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
                        let (fx, fy) = ((x - x0 as f64) as f32, (y - y0 as f64) as f32);
                        let i = y0 * n + x0;
                        all.extend([
                            (i, w * (1.0 - fx) * (1.0 - fy)),
                            (i + 1, w * fx * (1.0 - fy)),
                            (i + n, w * (1.0 - fx) * fy),
                            (i + n + 1, w * fx * fy),
                        ]);
                    }
                    assert_eq!(fast, all, "n {n}, angle {a}, bin {b}");
                }
            }
        }
    }

    #[test]
    fn projector_backprojector_are_adjoint() {
        let p = Projector::new(32, 4.0, 12);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let x: Vec<f32> = (0..32 * 32).map(|_| rng.random()).collect();
        let y: Vec<f32> = (0..12 * 32).map(|_| rng.random()).collect();
        let ax = p.forward(&x, 0..12);
        let aty = p.back(&y, 0..12);
        let lhs: f64 = ax.iter().zip(&y).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        let rhs: f64 = x.iter().zip(&aty).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        assert!((lhs - rhs).abs() < 1e-4 * lhs.abs(), "{lhs} vs {rhs}");
    }

    #[test]
    fn frames_are_nested_and_noise_scales_as_one_over_sqrt_time_and_means_hold() {
        let sc = Scanner::default();
        let (act, mu) = cylinder(&[], 1.0);
        let k = calibrate(&act, &mu, N, PX, &sc);
        let m = Model::new(&act, &mu, N, PX, &sc, k);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let f = m.acquire(&act, &mut rng);
        assert!(f.c90.iter().zip(&f.c60).zip(&f.c30).all(|((a, b), c)| c <= b && b <= a), "nested counts");
        let total: u64 = f.c90.iter().map(|c| *c as u64).sum();
        assert!((total as f64 / 2.0e6 - 1.0).abs() < 0.01, "calibrated prompts {total}");
        let mut sds = Vec::new();
        for (c, t) in [(&f.c90, 90.0), (&f.c60, 60.0), (&f.c30, 30.0)] {
            let img = m.osem(c, t, &sc);
            let (mean, sd) = mean_sd(&roi(&img, 0.0, 0.0, 90.0));
            assert!((mean / 2000.0 - 1.0).abs() < 0.03, "{t} s: mean {mean} (truth 2000)");
            sds.push(sd / mean);
        }
        let r30 = sds[2] / sds[0];
        let r60 = sds[1] / sds[0];
        eprintln!("relative noise 90/60/30 s: {sds:.4?}; ratios 60/90 {r60:.3} 30/90 {r30:.3}");
        assert!((r30 / 3f64.sqrt() - 1.0).abs() < 0.10, "noise 30/90 = {r30}, expected √3");
        assert!((r60 / 1.5f64.sqrt() - 1.0).abs() < 0.10, "noise 60/90 = {r60}, expected √1.5");
    }

    #[test]
    fn contrast_recovery_rises_with_sphere_size() {
        let sc = Scanner::default();
        let spheres = [(-70.0, -50.0, 10.0), (0.0, -80.0, 17.0), (70.0, -50.0, 22.0), (0.0, 60.0, 37.0)];
        let (act, mu) = cylinder(&spheres, 4.0);
        let k = calibrate(&act, &mu, N, PX, &sc);
        let m = Model::new(&act, &mu, N, PX, &sc, k);
        // noise-free expected counts isolate resolution from noise
        let all: Vec<usize> = (0..sc.n_angles).collect();
        let y: Vec<u32> = m.expected(&act, 90.0, &all).iter().map(|v| v.round() as u32).collect();
        let img = m.osem(&y, 90.0, &sc);
        let (bg, _) = mean_sd(&roi(&img, 80.0, 70.0, 20.0));
        let crs: Vec<f64> = spheres
            .iter()
            .map(|(x, y, d)| {
                let (s, _) = mean_sd(&roi(&img, *x, *y, d / 2.0 * 0.7));
                (s / bg - 1.0) / 3.0
            })
            .collect();
        eprintln!("contrast recovery 10/17/22/37 mm: {crs:.3?}");
        assert!(crs.windows(2).all(|w| w[0] < w[1]), "contrast recovery must rise with size: {crs:?}");
        assert!(crs[3] > 0.6 && crs[0] < crs[3], "{crs:?}");
    }
}
