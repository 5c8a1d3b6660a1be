//! The classical baseline: a separable 3D Gaussian filter with its width in
//! millimetres (so it means the same at 192² and 400² matrices). Weights are
//! renormalised at the volume's edges, so the local mean (and hence SUVmean
//! of large regions) is preserved everywhere.

use super::{Engine, EngineError, Volume};

pub struct Gaussian {
    fwhm_mm: f64,
}

impl Gaussian {
    pub fn new(fwhm_mm: f64) -> Gaussian {
        Gaussian { fwhm_mm }
    }
}

/// Normalised 1D kernel for `sigma` in voxels (radius 3σ, at least 1 tap).
fn kernel(sigma: f64) -> Vec<f32> {
    if sigma <= 1e-6 {
        return vec![1.0];
    }
    let r = (3.0 * sigma).ceil() as i64;
    (-r..=r).map(|i| (-(i as f64).powi(2) / (2.0 * sigma * sigma)).exp() as f32).collect()
}

/// Convolve along one axis, one line at a time. `stride` is the distance
/// between neighbours along the axis, `n` the axis length; `lines`
/// enumerates the start of every line along that axis. Used for x (lines
/// are contiguous); for y and z, [`convolve_blocks`] gives the same numbers.
fn convolve_axis(src: &[f32], dst: &mut [f32], k: &[f32], n: usize, stride: usize, lines: impl Iterator<Item = usize>) {
    let r = (k.len() / 2) as i64;
    for start in lines {
        for i in 0..n as i64 {
            let (mut acc, mut wsum) = (0.0f32, 0.0f32);
            for (j, w) in k.iter().enumerate() {
                let p = i + j as i64 - r;
                if p >= 0 && p < n as i64 {
                    acc += w * src[start + p as usize * stride];
                    wsum += w;
                }
            }
            dst[start + i as usize * stride] = acc / wsum;
        }
    }
}

/// Convolve along an axis whose neighbours are `stride` apart, a whole row
/// (y: `stride` = nx) or plane (z: `stride` = nx·ny) at a time: the output
/// row i is the weighted sum of input rows i − r … i + r, read front to
/// back. Every voxel sums the same terms in the same order as
/// [`convolve_axis`], so the result is bit for bit the same; reading whole
/// rows instead of one value per row is what makes it fast (the line-wise
/// walk along z touches a new cache line for every tap).
fn convolve_blocks(src: &[f32], dst: &mut [f32], k: &[f32], n: usize, stride: usize, blocks: impl Iterator<Item = usize>) {
    let r = (k.len() / 2) as i64;
    for start in blocks {
        for i in 0..n as i64 {
            let out = &mut dst[start + i as usize * stride..][..stride];
            out.fill(0.0);
            let mut wsum = 0.0f32;
            for (j, &w) in k.iter().enumerate() {
                let p = i + j as i64 - r;
                if p >= 0 && p < n as i64 {
                    let row = &src[start + p as usize * stride..][..stride];
                    for (o, s) in out.iter_mut().zip(row) {
                        *o += w * s;
                    }
                    wsum += w;
                }
            }
            for o in out.iter_mut() {
                *o /= wsum;
            }
        }
    }
}

/// Filter `v` with a Gaussian of `fwhm_mm` (public: the tests check the
/// daemon's output against it).
pub fn filter(v: &Volume, fwhm_mm: f64) -> Volume {
    filter_owned(Volume { data: v.data.clone(), ..v.clone_shape() }, fwhm_mm)
}

/// [`filter`] on a volume the caller gives up: one scratch buffer instead of two.
pub fn filter_owned(v: Volume, fwhm_mm: f64) -> Volume {
    separable(v, fwhm_mm, true)
}

/// [`filter`] walking y and z one line at a time, as it was first written:
/// the reference the row-wise filter is checked against (bit for bit) and
/// measured beside (`cargo bench --bench engines`, `FILTER=1`).
#[doc(hidden)]
pub fn filter_by_lines(v: &Volume, fwhm_mm: f64) -> Volume {
    separable(Volume { data: v.data.clone(), ..v.clone_shape() }, fwhm_mm, false)
}

/// The three 1D passes, x then y then z; y and z row-wise or line-wise.
fn separable(v: Volume, fwhm_mm: f64, row_wise: bool) -> Volume {
    let sigma_mm = fwhm_mm / (8.0f64.ln() * 2.0).sqrt();
    let (nx, ny, nz) = (v.nx, v.ny, v.nz);
    let shape = v.clone_shape();
    let mut a = v.data;
    let mut b = vec![0.0f32; a.len()];
    let kx = kernel(sigma_mm / v.spacing[0]);
    convolve_axis(&a, &mut b, &kx, nx, 1, (0..nz * ny).map(|l| l * nx));
    let ky = kernel(sigma_mm / v.spacing[1]);
    let kz = kernel(sigma_mm / v.spacing[2]);
    if row_wise {
        convolve_blocks(&b, &mut a, &ky, ny, nx, (0..nz).map(|z| z * nx * ny));
        convolve_blocks(&a, &mut b, &kz, nz, nx * ny, std::iter::once(0));
    } else {
        convolve_axis(&b, &mut a, &ky, ny, nx, (0..nz).flat_map(|z| (0..nx).map(move |x| z * nx * ny + x)));
        convolve_axis(&a, &mut b, &kz, nz, nx * ny, 0..nx * ny);
    }
    Volume { data: b, ..shape }
}

impl Engine for Gaussian {
    fn name(&self) -> &str {
        "gaussian"
    }
    fn model_id(&self) -> String {
        format!("gaussian-fwhm{:.2}mm", self.fwhm_mm)
    }
    fn check(&self) -> Result<(), EngineError> {
        Ok(())
    }
    fn run(&self, input: &Volume) -> Result<Volume, EngineError> {
        Ok(filter(input, self.fwhm_mm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(nx: usize, ny: usize, nz: usize, mut f: impl FnMut(usize, usize, usize) -> f32) -> Volume {
        let mut data = Vec::with_capacity(nx * ny * nz);
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    data.push(f(x, y, z));
                }
            }
        }
        Volume { nx, ny, nz, spacing: [4.0, 4.0, 3.0], data, frame_duration_s: None }
    }

    #[test]
    fn constant_stays_constant_even_at_edges() {
        let v = vol(9, 7, 5, |_, _, _| 1234.5);
        let f = filter(&v, 8.0);
        assert!(f.data.iter().all(|x| (x - 1234.5).abs() < 1e-2));
    }

    #[test]
    fn impulse_spreads_symmetrically_and_keeps_its_sum_inside() {
        let v = vol(31, 31, 31, |x, y, z| if (x, y, z) == (15, 15, 15) { 1000.0 } else { 0.0 });
        let f = filter(&v, 8.0);
        let sum: f32 = f.data.iter().sum();
        assert!((sum - 1000.0).abs() < 1.0, "{sum}");
        let at = |x: usize, y: usize, z: usize| f.data[z * 31 * 31 + y * 31 + x];
        assert!((at(14, 15, 15) - at(16, 15, 15)).abs() < 1e-4);
        assert!((at(15, 14, 15) - at(15, 16, 15)).abs() < 1e-4);
        assert!(at(15, 15, 15) < 1000.0 && at(15, 15, 15) > at(16, 15, 15));
        // z spacing is finer (3 mm), so the blur reaches further in voxels along z
        assert!(at(15, 15, 16) > at(16, 15, 15));
    }

    #[test]
    fn the_row_wise_filter_gives_the_line_wise_numbers_bit_for_bit() {
        let mut seed = 7u64;
        // odd sizes, anisotropic spacing, kernels wider than the z extent
        for (fwhm, nz) in [(5.0, 9), (15.0, 5), (15.0, 23), (2.0, 1)] {
            let v = vol(19, 13, nz, |_, _, _| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) as f32 / (1u64 << 31) as f32) * 5000.0
            });
            let (a, b) = (filter(&v, fwhm), filter_by_lines(&v, fwhm));
            assert!(a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()), "fwhm {fwhm}, nz {nz}");
        }
    }

    #[test]
    fn noise_is_reduced() {
        let mut seed = 1u64;
        let v = vol(32, 32, 8, |_, _, _| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            100.0 + ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 40.0
        });
        let sd = |d: &[f32]| {
            let m = d.iter().sum::<f32>() / d.len() as f32;
            (d.iter().map(|x| (x - m).powi(2)).sum::<f32>() / d.len() as f32).sqrt()
        };
        let f = filter(&v, 8.0);
        assert!(sd(&f.data) < 0.5 * sd(&v.data));
    }
}
