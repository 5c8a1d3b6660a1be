//! Reconstruction settings as clinical scanners use them: the range a
//! restoration model must hold up across, drawn at random per training
//! study, and the fixed **site matrix** it is judged on.
//!
//! Ranges (published clinical whole-body FDG settings): pixel size 2.0–5.3
//! mm (matrices ~110–300 over a 600 mm field of view here; larger matrices
//! cost more CPU than the simulator can spend), slice thickness 2–5 mm,
//! detector resolution 4–6.5 mm in-plane and axially (a 3D PSF: the axial
//! part blurs the activity across slices before projection), OSEM 2–4
//! iterations × 8–24 subsets with or without resolution modelling, a
//! Gaussian post-filter of 0–8.5 mm FWHM applied in 3D (noise correlated
//! between slices; the harmonised EARL-like 7 mm must lie inside, not at the
//! edge), 0.3–4 M prompts per liver slice in 90 s, scatter 20–45 %, randoms
//! 5–30 %. The filter range was 0–7 mm until December 2026: training seeds
//! 1000–1013 were drawn with it, and their .json files record what was drawn.
//!
//! A setting is a pure function of its seed (training) or its name (the
//! site matrix), so datasets can be regenerated and extended.

use rand::{Rng, SeedableRng};

use super::dataset::Geometry;
use super::physics::Scanner;

/// One reconstruction setting: geometry, scanner, count level.
#[derive(Debug, Clone)]
pub struct Setting {
    /// Short name (a site matrix cell, or `random`).
    pub name: String,
    pub geometry: Geometry,
    pub scanner: Scanner,
    /// Prompts per liver slice in 90 s; `None` keeps the phantom's own
    /// (each patient has a random level, 1.4–3 M).
    pub counts_90s: Option<f64>,
}

impl Setting {
    /// The setting of the 1.x models' training data: 128² at 4.69 mm,
    /// 3.27 mm slices, OSEM 3 × 8 with resolution modelling, no post-filter.
    pub fn reference(slices: usize) -> Setting {
        Setting {
            name: "reference".into(),
            geometry: Geometry { slices, ..Geometry::default() },
            scanner: Scanner::default(),
            counts_90s: None,
        }
    }

    /// A setting drawn at random within the documented ranges (module doc),
    /// a pure function of `seed`.
    pub fn random(seed: u64, slices: usize) -> Setting {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5E77_1A65);
        let fov = 600.0;
        // log-uniform pixel size: as many small as large pixels in ratio terms
        let px = (rng.random_range(2.0f64.ln()..5.3f64.ln())).exp();
        let matrix = ((fov / px).round() as usize).clamp(96, 320);
        let slice_thickness_mm = rng.random_range(2.0..5.0);
        let detector = rng.random_range(4.0..6.5);
        let post = if rng.random_bool(0.25) { 0.0 } else { rng.random_range(1.0..8.5) };
        let subsets = [8, 12, 16, 21, 24][rng.random_range(0..5)];
        let scanner = Scanner {
            n_angles: Scanner::angles_for(matrix),
            fwhm_mm: detector,
            axial_fwhm_mm: detector * rng.random_range(0.8..1.2),
            scatter_fraction: rng.random_range(0.20..0.45),
            randoms_fraction: rng.random_range(0.05..0.30),
            reference_counts_90s: 2.0e6,
            iterations: rng.random_range(2..=4),
            subsets,
            post_filter_fwhm_mm: post,
            post_filter_3d: true,
            resolution_modelling: rng.random_bool(0.6),
        };
        // log-uniform count level, 0.3–4 M prompts per liver slice
        let counts = (rng.random_range(0.3e6f64.ln()..4.0e6f64.ln())).exp();
        Setting {
            name: "random".into(),
            geometry: Geometry { slices, matrix, fov_mm: fov, slice_thickness_mm },
            scanner,
            counts_90s: Some(counts),
        }
    }

    /// The unfiltered stratum of [`Setting::random`]: the same draw for the
    /// same seed (pixel size, slices, OSEM, counts, scatter, randoms), then no
    /// post-filter and no resolution modelling, as on scanners and protocols
    /// that reconstruct plain OSEM (a quarter of the random draws have no
    /// filter and two in five no PSF, so only one in ten has neither). Used to
    /// give a training set more of the noisiest texture without drawing any
    /// cell's fixed setting.
    pub fn random_unfiltered(seed: u64, slices: usize) -> Setting {
        let mut s = Setting::random(seed, slices);
        s.name = "random-unfiltered".into();
        s.scanner.post_filter_fwhm_mm = 0.0;
        s.scanner.resolution_modelling = false;
        s
    }

    /// A cell of the site matrix by name (see [`SITE_MATRIX`]).
    pub fn site(name: &str, slices: usize) -> Option<Setting> {
        SITE_MATRIX.iter().find(|c| c.name == name).map(|c| c.setting(slices))
    }
}

/// A cell of the site matrix: a fixed reconstruction setting modelled on a
/// published clinical one; `what` says which.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub name: &'static str,
    /// What the cell stands for.
    pub what: &'static str,
    pub matrix: usize,
    pub fov_mm: f64,
    pub slice_thickness_mm: f64,
    pub detector_fwhm_mm: f64,
    pub iterations: usize,
    pub subsets: usize,
    pub resolution_modelling: bool,
    /// 3D Gaussian post-filter FWHM (mm), 0 = none.
    pub post_filter_mm: f64,
    /// Prompts per liver slice in 90 s; 0 = the phantom's own level.
    pub counts_90s: f64,
    pub scatter_fraction: f64,
    pub randoms_fraction: f64,
}

impl Cell {
    pub fn setting(&self, slices: usize) -> Setting {
        Setting {
            name: self.name.into(),
            geometry: Geometry { slices, matrix: self.matrix, fov_mm: self.fov_mm, slice_thickness_mm: self.slice_thickness_mm },
            scanner: Scanner {
                n_angles: Scanner::angles_for(self.matrix),
                fwhm_mm: self.detector_fwhm_mm,
                axial_fwhm_mm: if self.name == "c1-ref128" { 0.0 } else { self.detector_fwhm_mm },
                scatter_fraction: self.scatter_fraction,
                randoms_fraction: self.randoms_fraction,
                reference_counts_90s: 2.0e6,
                iterations: self.iterations,
                subsets: self.subsets,
                post_filter_fwhm_mm: self.post_filter_mm,
                post_filter_3d: true,
                resolution_modelling: self.resolution_modelling,
            },
            counts_90s: (self.counts_90s > 0.0).then_some(self.counts_90s),
        }
    }

    /// Pixel size (mm).
    pub fn pixel_mm(&self) -> f64 {
        self.fov_mm / self.matrix as f64
    }
}

/// The site matrix: eight fixed settings spanning the clinical range. The
/// validation grid and the test grid use these settings with disjoint
/// phantom families and seeds.
pub const SITE_MATRIX: [Cell; 8] = [
    Cell {
        name: "c1-ref128",
        what: "128² at 4.69 mm, OSEM 3×8, no filter: the 1.x training reconstruction (older GE-like)",
        matrix: 128,
        fov_mm: 600.0,
        slice_thickness_mm: 3.27,
        detector_fwhm_mm: 5.0,
        iterations: 3,
        subsets: 8,
        resolution_modelling: true,
        post_filter_mm: 0.0,
        counts_90s: 0.0,
        scatter_fraction: 0.3,
        randoms_fraction: 0.1,
    },
    Cell {
        name: "c2-192-f5",
        what: "192² at 3.65 mm, 3.27 mm slices, OSEM 3×16 with PSF, 5 mm 3D filter (Discovery 690/710-like)",
        matrix: 192,
        fov_mm: 700.0,
        slice_thickness_mm: 3.27,
        detector_fwhm_mm: 5.0,
        iterations: 3,
        subsets: 16,
        resolution_modelling: true,
        post_filter_mm: 5.0,
        counts_90s: 0.0,
        scatter_fraction: 0.3,
        randoms_fraction: 0.1,
    },
    Cell {
        name: "c3-256-f3",
        what: "256² at 2.73 mm, 2 mm slices, OSEM 2×21 with PSF, 3 mm 3D filter (Biograph mCT-like)",
        matrix: 256,
        fov_mm: 700.0,
        slice_thickness_mm: 2.0,
        detector_fwhm_mm: 4.5,
        iterations: 2,
        subsets: 21,
        resolution_modelling: true,
        post_filter_mm: 3.0,
        counts_90s: 0.0,
        scatter_fraction: 0.3,
        randoms_fraction: 0.1,
    },
    Cell {
        name: "c4-300-f4",
        what: "300² at 2.0 mm, 3 mm slices, OSEM 4×8 with PSF, 4 mm 3D filter (the finest grid simulated; Siemens TOF-like)",
        matrix: 300,
        fov_mm: 600.0,
        slice_thickness_mm: 3.0,
        detector_fwhm_mm: 4.0,
        iterations: 4,
        subsets: 8,
        resolution_modelling: true,
        post_filter_mm: 4.0,
        counts_90s: 0.0,
        scatter_fraction: 0.3,
        randoms_fraction: 0.1,
    },
    Cell {
        name: "c5-heavy",
        what: "heavy patient, low dose: 192² at 3.65 mm, 0.4 M prompts per liver slice, 45 % scatter, 25 % randoms, OSEM 3×16 PSF, 5 mm 3D filter",
        matrix: 192,
        fov_mm: 700.0,
        slice_thickness_mm: 3.27,
        detector_fwhm_mm: 5.0,
        iterations: 3,
        subsets: 16,
        resolution_modelling: true,
        post_filter_mm: 5.0,
        counts_90s: 0.4e6,
        scatter_fraction: 0.45,
        randoms_fraction: 0.25,
    },
    Cell {
        name: "c6-144-nopsf",
        what: "144² at 4.0 mm, 4 mm slices, OSEM 3×24 without resolution modelling, no filter (Gemini TF-like)",
        matrix: 144,
        fov_mm: 576.0,
        slice_thickness_mm: 4.0,
        detector_fwhm_mm: 5.5,
        iterations: 3,
        subsets: 24,
        resolution_modelling: false,
        post_filter_mm: 0.0,
        counts_90s: 0.0,
        scatter_fraction: 0.3,
        randoms_fraction: 0.1,
    },
    Cell {
        name: "c7-earl-f7",
        what: "harmonised (EARL1-like): 192² at 3.65 mm, OSEM 4×12 PSF, 7 mm 3D filter",
        matrix: 192,
        fov_mm: 700.0,
        slice_thickness_mm: 3.27,
        detector_fwhm_mm: 5.0,
        iterations: 4,
        subsets: 12,
        resolution_modelling: true,
        post_filter_mm: 7.0,
        counts_90s: 0.0,
        scatter_fraction: 0.3,
        randoms_fraction: 0.1,
    },
    Cell {
        name: "c8-highcount",
        what: "generous dose: 200² at 3.0 mm, 4 M prompts per liver slice, OSEM 2×24 PSF, 2 mm 3D filter",
        matrix: 200,
        fov_mm: 600.0,
        slice_thickness_mm: 3.0,
        detector_fwhm_mm: 4.5,
        iterations: 2,
        subsets: 24,
        resolution_modelling: true,
        post_filter_mm: 2.0,
        counts_90s: 4.0e6,
        scatter_fraction: 0.25,
        randoms_fraction: 0.08,
    },
];

/// Two settings outside the ranges the models are trained on, for showing
/// what the uncertainty does there (it must grow): a count level below the
/// range (0.15 M prompts per liver slice, under the 0.3 M floor) and a
/// reconstruction beyond it (OSEM 6 × 24, no resolution modelling, no
/// filter: far noisier than any clinical protocol in the matrix). Not part
/// of the site matrix: `petlab dataset --site x1-lowcount` makes one.
pub const OUT_OF_RANGE: [Cell; 2] = [
    Cell {
        name: "x1-lowcount",
        what: "192² at 3.65 mm, 5 mm filter, 0.15 M prompts per liver slice: below the trained count range",
        matrix: 192,
        fov_mm: 700.0,
        slice_thickness_mm: 3.27,
        detector_fwhm_mm: 5.0,
        iterations: 3,
        subsets: 16,
        resolution_modelling: true,
        post_filter_mm: 5.0,
        counts_90s: 0.15e6,
        scatter_fraction: 0.3,
        randoms_fraction: 0.1,
    },
    Cell {
        name: "x2-osem6x24",
        what: "192² at 3.65 mm, OSEM 6×24 without resolution modelling or filter: beyond the trained reconstructions",
        matrix: 192,
        fov_mm: 700.0,
        slice_thickness_mm: 3.27,
        detector_fwhm_mm: 5.0,
        iterations: 6,
        subsets: 24,
        resolution_modelling: false,
        post_filter_mm: 0.0,
        counts_90s: 0.0,
        scatter_fraction: 0.3,
        randoms_fraction: 0.1,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_settings_cover_the_documented_ranges_and_repeat_by_seed() {
        let all: Vec<Setting> = (0..400).map(|s| Setting::random(s, 8)).collect();
        let px: Vec<f64> = all.iter().map(|s| s.geometry.fov_mm / s.geometry.matrix as f64).collect();
        let lo = px.iter().copied().fold(f64::MAX, f64::min);
        let hi = px.iter().copied().fold(0.0, f64::max);
        assert!(lo < 2.2 && hi > 4.8, "pixel sizes {lo}..{hi}");
        assert!(all.iter().any(|s| s.scanner.post_filter_fwhm_mm == 0.0) && all.iter().any(|s| s.scanner.post_filter_fwhm_mm > 6.0));
        assert!(all.iter().any(|s| !s.scanner.resolution_modelling) && all.iter().any(|s| s.scanner.resolution_modelling));
        let counts: Vec<f64> = all.iter().map(|s| s.counts_90s.unwrap()).collect();
        assert!(counts.iter().all(|c| (0.3e6..=4.0e6).contains(c)));
        assert!(counts.iter().any(|c| *c < 0.5e6) && counts.iter().any(|c| *c > 3.0e6));
        assert!(all.iter().all(|s| (2.0..=5.0).contains(&s.geometry.slice_thickness_mm)));
        assert_eq!(format!("{:?}", Setting::random(7, 8)), format!("{:?}", Setting::random(7, 8)));
        assert_ne!(format!("{:?}", Setting::random(7, 8)), format!("{:?}", Setting::random(8, 8)));
    }

    #[test]
    fn the_unfiltered_stratum_keeps_the_random_draw_without_filter_or_psf() {
        for seed in 0..50 {
            let (r, u) = (Setting::random(seed, 8), Setting::random_unfiltered(seed, 8));
            assert_eq!(u.scanner.post_filter_fwhm_mm, 0.0);
            assert!(!u.scanner.resolution_modelling);
            assert_eq!(u.name, "random-unfiltered");
            assert_eq!(format!("{:?}", u.geometry), format!("{:?}", r.geometry));
            assert_eq!(u.counts_90s, r.counts_90s);
            assert_eq!((u.scanner.iterations, u.scanner.subsets), (r.scanner.iterations, r.scanner.subsets));
        }
    }

    #[test]
    fn the_site_matrix_spans_matrices_pixels_filters_and_counts() {
        assert_eq!(SITE_MATRIX.len(), 8);
        let names: std::collections::BTreeSet<_> = SITE_MATRIX.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), 8, "unique names");
        assert!(SITE_MATRIX.iter().any(|c| c.matrix == 128) && SITE_MATRIX.iter().any(|c| c.matrix >= 300));
        assert!(SITE_MATRIX.iter().any(|c| c.pixel_mm() <= 2.0) && SITE_MATRIX.iter().any(|c| c.pixel_mm() > 4.5));
        assert!(SITE_MATRIX.iter().any(|c| c.post_filter_mm == 0.0) && SITE_MATRIX.iter().any(|c| c.post_filter_mm >= 7.0));
        assert!(SITE_MATRIX.iter().any(|c| !c.resolution_modelling));
        assert!(SITE_MATRIX.iter().any(|c| c.counts_90s > 0.0 && c.counts_90s < 0.5e6));
        assert!(Setting::site("c2-192-f5", 4).is_some() && Setting::site("nope", 4).is_none());
    }
}
