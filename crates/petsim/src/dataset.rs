//! Training and evaluation datasets: compact arrays of simulated studies.
//!
//! One study = one slab of adjacent slices of one phantom, simulated
//! physically ([`super::physics`]) with nested 30/60/90 s frames. Written as
//! `<family>-<seed>.npy`, float32 `[5, slices, n, n]` in Bq/ml with planes
//!
//! | index | plane |
//! |---|---|
//! | 0 | PET30 (OSEM of the 30 s counts) |
//! | 1 | PET60 |
//! | 2 | PET90 |
//! | 3 | noise-free reconstruction (OSEM of the expected 90 s counts) |
//! | 4 | truth (activity) |
//!
//! and `<family>-<seed>.json`: lesions in voxel coordinates (slice, row,
//! column, as floats at voxel centres), their size and activities, and the
//! geometry. Splits are by family and seed (see [`Split`]); the Python
//! trainer and `petrestore eval` read these files.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

use super::patient::{Family, Patient};
use super::physics::{self, Scanner};
use super::sites::Setting;
use super::{NEMA_BACKGROUND, NEMA_SPHERE_Z, NEMA_SPHERES_MM, nema_activity, nema_mu, nema_sphere_centre, write_npy_f32};

/// What a dataset study images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Patient(Family),
    Nema,
}

impl Source {
    pub fn parse(s: &str) -> Option<Source> {
        if s == "nema" { Some(Source::Nema) } else { Family::parse(s).map(Source::Patient) }
    }
    pub fn name(self) -> &'static str {
        match self {
            Source::Patient(f) => f.name(),
            Source::Nema => "nema",
        }
    }
}

/// The fixed splits: seeds and families never overlap between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// ellipse family, seeds 0–9999.
    Train,
    /// ellipse family, seeds 10000–10999, and the textured family, seeds
    /// 30000–30999: every choice (epochs, Gaussian σ, calibration).
    Validation,
    /// lobulated family and NEMA, seeds 20000+: reported, never used for choices.
    Test,
}

impl Split {
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "val" | "validation" => Some(Split::Validation),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
    /// The split a (source, seed) belongs to, if any.
    pub fn of(source: Source, seed: u64) -> Option<Split> {
        match (source, seed) {
            (Source::Patient(Family::Ellipse), 0..=9_999) => Some(Split::Train),
            (Source::Patient(Family::Ellipse), 10_000..=10_999) => Some(Split::Validation),
            (Source::Patient(Family::Textured), 30_000..=30_999) => Some(Split::Validation),
            // validation noise realisations of the NEMA phantom: its own seeds
            (Source::Nema, 12_000..=13_999) => Some(Split::Validation),
            (Source::Patient(Family::Lobulated) | Source::Nema, 20_000..) => Some(Split::Test),
            _ => None,
        }
    }
}

/// Geometry of every study in a dataset.
#[derive(Debug, Clone)]
pub struct Geometry {
    pub slices: usize,
    pub matrix: usize,
    pub fov_mm: f64,
    pub slice_thickness_mm: f64,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry { slices: 16, matrix: 128, fov_mm: 600.0, slice_thickness_mm: 3.27 }
    }
}

/// Simulate one study and write its two files into `dir`; returns the .npy path.
pub fn write_study(dir: &Path, source: Source, seed: u64, g: &Geometry, sc: &Scanner) -> std::io::Result<PathBuf> {
    let setting = Setting { name: "fixed".into(), geometry: g.clone(), scanner: sc.clone(), counts_90s: None };
    write_study_with(dir, source, seed, &setting)
}

/// [`write_study`] with a reconstruction setting: geometry, scanner with
/// its 3D PSF and post-filter, and count level (see [`crate::sites`]).
pub fn write_study_with(dir: &Path, source: Source, seed: u64, setting: &Setting) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let g = &setting.geometry;
    let n = g.matrix;
    let px = g.fov_mm / n as f64;
    let span = (g.slices.saturating_sub(1)) as f64 * g.slice_thickness_mm;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xDA7A_5E70);
    let (z_first, patient) = match source {
        Source::Patient(f) => {
            let z0 = rng.random_range(-10.0..230.0);
            (z0, Some(Patient::generate(f, seed, z0, z0 + span)))
        }
        Source::Nema => (NEMA_SPHERE_Z - span / 2.0 + rng.random_range(-3.0..3.0), None),
    };
    let activity = |x: f64, y: f64, z: f64| match &patient {
        Some(p) => p.activity(x, y, z),
        None => nema_activity(x, y, z),
    };
    let mu = |x: f64, y: f64, z: f64| match &patient {
        Some(p) => p.mu(x, y, z),
        None => nema_mu(x, y, z),
    };
    let grid = |z: f64, f: &dyn Fn(f64, f64, f64) -> f64| super::sample_grid(n, g.fov_mm, z, f);
    let counts = setting.counts_90s.or(patient.as_ref().map(|p| p.counts_90s)).unwrap_or(setting.scanner.reference_counts_90s);
    let sc = Scanner { reference_counts_90s: counts, ..setting.scanner.clone() };
    let calib_z = patient.as_ref().map(|p| p.liver_z()).unwrap_or(NEMA_SPHERE_Z);
    let k90 = physics::calibrate(&grid(calib_z, &activity), &grid(calib_z, &mu), n, px, &sc);
    let plane = n * n;
    // What the scanner sees: the activity blurred along z by the axial PSF
    // (sampled on margin slices beyond the slab, so the ends are right).
    let sigma_axial = sc.axial_fwhm_mm / 2.3548 / g.slice_thickness_mm;
    let margin = if sigma_axial > 1e-3 { (3.0 * sigma_axial).ceil() as usize } else { 0 };
    let total = g.slices + 2 * margin;
    let mut seen: Vec<f32> =
        super::par_slices(total, |k| grid(z_first + (k as f64 - margin as f64) * g.slice_thickness_mm, &activity)).concat();
    physics::blur_z(&mut seen, total, plane, sigma_axial);
    let seen = &seen[margin * plane..(margin + g.slices) * plane];
    let results = super::par_slices(g.slices, |k| {
        let z = z_first + k as f64 * g.slice_thickness_mm;
        let (truth, att) = (grid(z, &activity), grid(z, &mu));
        let act = &seen[k * plane..(k + 1) * plane];
        let model = physics::Model::new(act, &att, n, px, &sc, k90);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(k as u64) ^ 0x0C0_u64);
        let f = model.acquire(act, &mut rng);
        let clean = model.osem_f32(&model.expected_counts(act, 90.0), 90.0, &sc);
        [model.osem(&f.c30, 30.0, &sc), model.osem(&f.c60, 60.0, &sc), model.osem(&f.c90, 90.0, &sc), clean, truth]
    });
    let mut out = vec![0.0f32; 5 * g.slices * plane];
    for (k, planes) in results.into_iter().enumerate() {
        for (p, img) in planes.iter().enumerate() {
            let at = (p * g.slices + k) * plane;
            out[at..at + plane].copy_from_slice(img);
        }
    }
    // The post-filter's z part (3D filter): every reconstructed plane, not the truth.
    if sc.post_filter_3d && sc.post_filter_fwhm_mm > 0.0 {
        let sigma_z = sc.post_filter_fwhm_mm / 2.3548 / g.slice_thickness_mm;
        for p in 0..4 {
            physics::blur_z(&mut out[p * g.slices * plane..(p + 1) * g.slices * plane], g.slices, plane, sigma_z);
        }
    }
    let stem = format!("{}-{seed:05}", source.name());
    let npy = dir.join(format!("{stem}.npy"));
    write_npy_f32(&npy, &[5, g.slices, n, n], &out)?;
    let to_vox =
        |x: f64, y: f64, z: f64| ((z - z_first) / g.slice_thickness_mm, (y + g.fov_mm / 2.0) / px - 0.5, (x + g.fov_mm / 2.0) / px - 0.5);
    let lesions: Vec<serde_json::Value> = match &patient {
        Some(p) => p
            .lesions
            .iter()
            .map(|l| {
                let (s, r, c) = to_vox(l.x_mm, l.y_mm, l.z_mm);
                serde_json::json!({"slice": s, "row": r, "col": c, "diameter_mm": l.diameter_mm, "activity_bqml": l.activity_bqml, "background_bqml": l.background_bqml, "host": l.host})
            })
            .collect(),
        None => NEMA_SPHERES_MM
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (x, y) = nema_sphere_centre(i);
                let (s, r, c) = to_vox(x, y, NEMA_SPHERE_Z);
                serde_json::json!({"slice": s, "row": r, "col": c, "diameter_mm": d, "activity_bqml": 4.0 * NEMA_BACKGROUND, "background_bqml": NEMA_BACKGROUND, "host": "nema"})
            })
            .collect(),
    };
    let meta = serde_json::json!({
        "source": source.name(),
        "seed": seed,
        "split": Split::of(source, seed).map(|s| format!("{s:?}").to_lowercase()),
        "planes": ["pet30", "pet60", "pet90", "clean90", "truth"],
        "frame_durations_s": [30.0, 60.0, 90.0],
        "pixel_mm": px,
        "slice_thickness_mm": g.slice_thickness_mm,
        "z_first_mm": z_first,
        "counts_90s_per_liver_slice": sc.reference_counts_90s,
        "setting": setting.name,
        "matrix": n,
        "scanner": {"angles": sc.n_angles, "fwhm_mm": sc.fwhm_mm, "axial_fwhm_mm": sc.axial_fwhm_mm, "scatter_fraction": sc.scatter_fraction, "randoms_fraction": sc.randoms_fraction, "iterations": sc.iterations, "subsets": sc.subsets, "resolution_modelling": sc.resolution_modelling, "post_filter_fwhm_mm": sc.post_filter_fwhm_mm, "post_filter_3d": sc.post_filter_3d},
        "lesions": lesions,
    });
    std::fs::write(dir.join(format!("{stem}.json")), serde_json::to_vec_pretty(&meta)?)?;
    Ok(npy)
}

/// A float32 .npy file: shape and data (C order). Reads what
/// [`write_npy_f32`] and NumPy (`np.save` of float32) write.
pub fn read_npy_f32(path: &Path) -> std::io::Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path)?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {why}", path.display()));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(bad(&format!("unsupported .npy version {v}"))),
    };
    let header = std::str::from_utf8(bytes.get(start..start + hlen).ok_or_else(|| bad("truncated header"))?)
        .map_err(|_| bad("header is not text"))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("expected little-endian float32 in C order"));
    }
    let shape_txt = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let body = &bytes[start + hlen..];
    let count: usize = shape.iter().product();
    if body.len() != count * 4 {
        return Err(bad(&format!("{} data bytes for shape {shape:?}", body.len())));
    }
    Ok((shape, body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_by_family_and_seed() {
        assert_eq!(Split::of(Source::Patient(Family::Ellipse), 5), Some(Split::Train));
        assert_eq!(Split::of(Source::Patient(Family::Ellipse), 10_005), Some(Split::Validation));
        assert_eq!(Split::of(Source::Patient(Family::Lobulated), 20_001), Some(Split::Test));
        assert_eq!(Split::of(Source::Patient(Family::Lobulated), 5), None, "test family never in training seeds");
        assert_eq!(Split::of(Source::Nema, 3), None);
        assert_eq!(Split::of(Source::Nema, 12_005), Some(Split::Validation));
        assert_eq!(Split::of(Source::Nema, 21_005), Some(Split::Test));
        assert_eq!(Split::of(Source::Patient(Family::Textured), 30_001), Some(Split::Validation));
        assert_eq!(Split::of(Source::Patient(Family::Textured), 5), None, "no training on the textured family");
        assert_eq!(Split::of(Source::Patient(Family::Textured), 20_001), None, "nor testing");
    }

    #[test]
    fn study_arrays_are_nested_frames_with_clean_and_truth() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry { slices: 3, matrix: 64, fov_mm: 600.0, slice_thickness_mm: 3.27 };
        let sc = Scanner { n_angles: 48, ..Scanner::default() };
        let npy = write_study(dir.path(), Source::Patient(Family::Ellipse), 3, &g, &sc).unwrap();
        let (shape, data) = read_npy_f32(&npy).unwrap();
        assert_eq!(shape, vec![5, 3, 64, 64]);
        let plane = 3 * 64 * 64;
        let sum = |p: usize| data[p * plane..(p + 1) * plane].iter().map(|v| *v as f64).sum::<f64>();
        let truth = sum(4);
        for p in 0..4 {
            let r = sum(p) / truth;
            assert!((0.9..1.1).contains(&r), "plane {p}: total activity ratio {r}");
        }
        // the noise-free reconstruction is smoother than PET90
        let tv = |p: usize| data[p * plane..(p + 1) * plane].windows(2).map(|w| (w[1] - w[0]).abs() as f64).sum::<f64>();
        assert!(tv(3) < tv(2) && tv(2) < tv(0), "total variation clean {} < 90 s {} < 30 s {}", tv(3), tv(2), tv(0));
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("ellipse-00003.json")).unwrap()).unwrap();
        assert_eq!(meta["split"], "train");
        assert!(!meta["lesions"].as_array().unwrap().is_empty());
    }

    /// Noise of a plane against the noise-free reconstruction, in voxels
    /// where the noise-free 90 s image is above 20 % of its maximum.
    fn noise(data: &[f32], p: usize, slices: usize, plane: usize) -> Vec<Vec<f64>> {
        let clean = &data[3 * slices * plane..4 * slices * plane];
        let max = clean.iter().copied().fold(0.0f32, f32::max);
        let body: Vec<usize> = (0..plane).filter(|i| (0..slices).all(|k| clean[k * plane + i] > 0.2 * max)).collect();
        (0..slices)
            .map(|k| {
                let v: Vec<f64> = body.iter().map(|i| (data[(p * slices + k) * plane + i] - clean[k * plane + i]) as f64).collect();
                let m = v.iter().sum::<f64>() / v.len() as f64;
                v.into_iter().map(|x| x - m).collect()
            })
            .collect()
    }

    fn corr(a: &[f64], b: &[f64]) -> f64 {
        let ab: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let aa: f64 = a.iter().map(|x| x * x).sum();
        let bb: f64 = b.iter().map(|x| x * x).sum();
        ab / (aa * bb).sqrt()
    }

    #[test]
    fn a_3d_post_filter_correlates_noise_between_slices_as_its_kernel_says() {
        let dir = tempfile::tempdir().unwrap();
        let (slices, n, dz) = (10, 48, 3.0);
        let mut setting = Setting::reference(slices);
        setting.geometry = Geometry { slices, matrix: n, fov_mm: 600.0, slice_thickness_mm: dz };
        setting.scanner.n_angles = 48;
        setting.counts_90s = Some(1.0e6);
        let plane = n * n;
        let mut adjacent = Vec::new();
        for (name, fwhm, three_d) in [("none", 0.0, false), ("3d", 8.0, true)] {
            setting.scanner.post_filter_fwhm_mm = fwhm;
            setting.scanner.post_filter_3d = three_d;
            let npy = write_study_with(&dir.path().join(name), Source::Patient(Family::Ellipse), 5, &setting).unwrap();
            let (_, data) = read_npy_f32(&npy).unwrap();
            let nz = noise(&data, 2, slices, plane);
            // inner slices only: the ends are mirrored
            let c: Vec<f64> = (2..slices - 3).map(|k| corr(&nz[k], &nz[k + 1])).collect();
            adjacent.push(c.iter().sum::<f64>() / c.len() as f64);
            // noise grows as 1/sqrt(t) and means are kept, whatever the filter
            let sd = |p: usize| noise(&data, p, slices, plane).iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
            let ratio = sd(0) / sd(2);
            assert!((ratio / 3f64.sqrt() - 1.0).abs() < 0.2, "{name}: noise 30 s / 90 s = {ratio}, expected about 1.73");
            let sum = |p: usize| data[p * slices * plane..(p + 1) * slices * plane].iter().map(|v| *v as f64).sum::<f64>();
            for p in 0..2 {
                assert!((sum(p) / sum(2) - 1.0).abs() < 0.03, "{name}: plane {p} mean vs PET90 {}", sum(p) / sum(2));
            }
        }
        // independent slices without a z filter; with it, adjacent noise
        // correlates as the Gaussian kernel does: exp(-1 / (4 sigma^2))
        let sigma = 8.0 / 2.3548 / dz;
        let expected = (-1.0 / (4.0 * sigma * sigma)).exp();
        assert!(adjacent[0].abs() < 0.1, "no z filter: adjacent-slice noise correlation {}", adjacent[0]);
        assert!((adjacent[1] - expected).abs() < 0.1, "3D filter: correlation {} vs the kernel's {expected}", adjacent[1]);
    }

    #[test]
    fn the_axial_psf_blurs_activity_across_slices_and_keeps_the_total() {
        let dir = tempfile::tempdir().unwrap();
        let mut setting = Setting::reference(8);
        setting.geometry = Geometry { slices: 8, matrix: 48, fov_mm: 600.0, slice_thickness_mm: 2.0 };
        setting.scanner.n_angles = 48;
        let read = |name: &str, s: &Setting| {
            let npy = write_study_with(&dir.path().join(name), Source::Nema, 20_000, s).unwrap();
            read_npy_f32(&npy).unwrap().1
        };
        let sharp = read("sharp", &setting);
        setting.scanner.axial_fwhm_mm = 10.0;
        let blurred = read("blurred", &setting);
        let plane = 48 * 48;
        let clean = |d: &[f32], k: usize| d[(3 * 8 + k) * plane..(3 * 8 + k + 1) * plane].iter().map(|v| *v as f64).collect::<Vec<_>>();
        // the NEMA spheres' ends lie in the slab: the axial blur smooths the
        // noise-free image along z (smaller slice-to-slice differences), the
        // truth stays the same
        let zdiff =
            |d: &[f32]| (0..7).map(|k| clean(d, k + 1).iter().zip(clean(d, k)).map(|(a, b)| (a - b).abs()).sum::<f64>()).sum::<f64>();
        assert!(zdiff(&blurred) < 0.8 * zdiff(&sharp), "z differences {} vs {}", zdiff(&blurred), zdiff(&sharp));
        assert_eq!(sharp[4 * 8 * plane..], blurred[4 * 8 * plane..], "truth unchanged");
        let total = |d: &[f32]| (2..6).map(|k| clean(d, k).iter().sum::<f64>()).sum::<f64>();
        assert!((total(&blurred) / total(&sharp) - 1.0).abs() < 0.05);
    }
}
