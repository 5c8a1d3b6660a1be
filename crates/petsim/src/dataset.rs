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
    /// ellipse family, seeds 10000–10999: every choice (epochs, Gaussian σ).
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
    std::fs::create_dir_all(dir)?;
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
    let sc = Scanner { reference_counts_90s: patient.as_ref().map(|p| p.counts_90s).unwrap_or(sc.reference_counts_90s), ..sc.clone() };
    let calib_z = patient.as_ref().map(|p| p.liver_z()).unwrap_or(NEMA_SPHERE_Z);
    let k90 = physics::calibrate(&grid(calib_z, &activity), &grid(calib_z, &mu), n, px, &sc);
    let plane = n * n;
    let mut out = vec![0.0f32; 5 * g.slices * plane];
    let results = super::par_slices(g.slices, |k| {
        let z = z_first + k as f64 * g.slice_thickness_mm;
        let (act, att) = (grid(z, &activity), grid(z, &mu));
        let model = physics::Model::new(&act, &att, n, px, &sc, k90);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(k as u64) ^ 0x0C0_u64);
        let f = model.acquire(&act, &mut rng);
        let clean = model.osem_f32(&model.expected_counts(&act, 90.0), 90.0, &sc);
        [model.osem(&f.c30, 30.0, &sc), model.osem(&f.c60, 60.0, &sc), model.osem(&f.c90, 90.0, &sc), clean, act]
    });
    for (k, planes) in results.into_iter().enumerate() {
        for (p, img) in planes.iter().enumerate() {
            let at = (p * g.slices + k) * plane;
            out[at..at + plane].copy_from_slice(img);
        }
    }
    let stem = format!("{}-{seed:05}", source.name());
    let npy = dir.join(format!("{stem}.npy"));
    write_npy_f32(&npy, &[5, g.slices, n, n], &out)?;
    let to_vox = |x: f64, y: f64, z: f64| ((z - z_first) / g.slice_thickness_mm, (y + g.fov_mm / 2.0) / px - 0.5, (x + g.fov_mm / 2.0) / px - 0.5);
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
        "scanner": {"angles": sc.n_angles, "fwhm_mm": sc.fwhm_mm, "scatter_fraction": sc.scatter_fraction, "randoms_fraction": sc.randoms_fraction, "iterations": sc.iterations, "subsets": sc.subsets, "post_filter_fwhm_mm": sc.post_filter_fwhm_mm},
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
    let header = std::str::from_utf8(bytes.get(start..start + hlen).ok_or_else(|| bad("truncated header"))?).map_err(|_| bad("header is not text"))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("expected little-endian float32 in C order"));
    }
    let shape_txt = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_txt.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().map_err(|_| bad("bad shape"))).collect::<Result<_, _>>()?;
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
}
