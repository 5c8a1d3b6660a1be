//! Synthetic PET studies with every attribute a real scanner series carries
//! (units, decay correction, frame timing, radiopharmaceutical, geometry,
//! per-slice Rescale Slope, Number of Slices / Image Index), for the demo,
//! the tests and the benchmarks.
//!
//! The phantom: head and brain (z < −60 mm), a torso with subcutaneous fat,
//! muscle, cold lungs, heart (myocardium and blood pool), liver, spleen,
//! kidneys, vertebral marrow, bladder (z 600–700 mm) and hot lesions. Two
//! image models: [`write_series`] adds noise ∝ 1/√t to the phantom (fast, for
//! the demo, tests and benchmarks); [`write_study_physical`] simulates the
//! acquisition and reconstruction ([`physics`]) with nested 30/60/90 s frames.

pub mod dataset;
mod enhanced;
pub mod patient;
pub mod physics;
pub mod sites;

use std::path::{Path, PathBuf};

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use rand::{Rng, SeedableRng};

use petdicom::uid::derived_uid;
use petdicom::{PET_IMAGE_STORAGE, part10};

/// What to generate.
#[derive(Debug, Clone)]
pub struct SeriesSpec {
    pub slices: usize,
    pub matrix: usize,
    pub frame_duration_s: f64,
    pub seed: u64,
    /// Field of view across, mm (pixel spacing = fov / matrix).
    pub fov_mm: f64,
    pub slice_thickness_mm: f64,
}

impl Default for SeriesSpec {
    fn default() -> Self {
        SeriesSpec { slices: 48, matrix: 128, frame_duration_s: 30.0, seed: 1, fov_mm: 600.0, slice_thickness_mm: 3.0 }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SeriesFiles {
    pub study_uid: String,
    pub series_uid: String,
    pub sop_uids: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// Liver activity concentration (Bq/ml) of the phantom.
pub const LIVER_BQML: f64 = 8_000.0;

/// Mean activity (Bq/ml) at (x, y) mm from the centre, slice z mm.
pub fn activity(x: f64, y: f64, z: f64) -> f64 {
    let inside = |cx: f64, cy: f64, rx: f64, ry: f64| ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) <= 1.0;
    // Head and brain above the thorax (z < -60 mm), bladder far below.
    if z < -60.0 {
        return if !inside(0.0, 0.0, 80.0, 95.0) {
            0.0
        } else if inside(0.0, 0.0, 70.0, 85.0) {
            10_000.0 // brain
        } else {
            1_500.0 // scalp and skull
        };
    }
    if !inside(0.0, 0.0, 170.0, 110.0) {
        return 0.0;
    }
    let mut a = if inside(0.0, 0.0, 158.0, 98.0) { 3_000.0 } else { 1_200.0 }; // muscle / subcutaneous fat
    if inside(-70.0, -10.0, 55.0, 65.0) || inside(70.0, -10.0, 55.0, 65.0) {
        a = 600.0; // lungs, cold
    }
    if z <= 40.0 && inside(-5.0, -40.0, 35.0, 35.0) {
        // heart: myocardium ring around the blood pool
        a = if inside(-5.0, -40.0, 22.0, 22.0) { 1_800.0 } else { 7_000.0 };
    }
    if inside(-60.0, 20.0, 70.0, 55.0) && z > 20.0 {
        a = LIVER_BQML;
    }
    if (30.0..=110.0).contains(&z) && inside(100.0, 25.0, 25.0, 35.0) {
        a = 4_500.0; // spleen
    }
    if (100.0..=170.0).contains(&z) && (inside(-65.0, 75.0, 22.0, 28.0) || inside(65.0, 75.0, 22.0, 28.0)) {
        a = 7_500.0; // kidneys
    }
    if (600.0..=700.0).contains(&z) && inside(0.0, 20.0, 40.0, 30.0) {
        a = 25_000.0; // bladder
    }
    if inside(0.0, 75.0, 18.0, 18.0) {
        a = 5_000.0; // vertebra marrow
    }
    for (lx, ly, lz, r, v) in LESIONS {
        if (x - lx).powi(2) + (y - ly).powi(2) + (z - lz).powi(2) <= r * r {
            a = v;
        }
    }
    a
}

/// Lesions of the phantom: (x, y, z mm, radius mm, Bq/ml).
pub const LESIONS: [(f64, f64, f64, f64, f64); 3] =
    [(-70.0, 0.0, 40.0, 8.0, 30_000.0), (60.0, -20.0, 60.0, 5.0, 25_000.0), (20.0, -60.0, 30.0, 10.0, 20_000.0)];

/// Linear attenuation at 511 keV (1/mm) of the phantom: soft tissue as
/// water, lungs, vertebra.
pub fn mu(x: f64, y: f64, z: f64) -> f64 {
    let inside = |cx: f64, cy: f64, rx: f64, ry: f64| ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) <= 1.0;
    if z < -60.0 {
        return if !inside(0.0, 0.0, 80.0, 95.0) {
            0.0
        } else if inside(0.0, 0.0, 70.0, 85.0) {
            0.0096
        } else {
            0.0150 // skull
        };
    }
    if !inside(0.0, 0.0, 170.0, 110.0) {
        return 0.0;
    }
    if inside(0.0, 75.0, 18.0, 18.0) {
        return 0.0130;
    }
    if inside(-70.0, -10.0, 55.0, 65.0) || inside(70.0, -10.0, 55.0, 65.0) {
        return 0.0027;
    }
    0.0096
}

/// Which object a physical study images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phantom {
    /// The torso with liver, lungs, vertebra and lesions ([`activity`], [`mu`]).
    Torso,
    /// The NEMA NU 2 IEC body phantom: spheres of 10, 13, 17, 22, 28 and 37 mm
    /// at 4:1 in a 5.3 kBq/ml background, cold lung insert, sphere plane at
    /// z = [`NEMA_SPHERE_Z`].
    Nema,
    /// A random patient of a phantom family ([`patient::Patient`]); lesions
    /// are placed within the simulated slab.
    Patient { family: patient::Family, seed: u64 },
}

/// NEMA sphere diameters (mm).
pub const NEMA_SPHERES_MM: [f64; 6] = [10.0, 13.0, 17.0, 22.0, 28.0, 37.0];
/// z of the sphere centres (mm below the first slice).
pub const NEMA_SPHERE_Z: f64 = 69.0;
/// NEMA background activity (Bq/ml); spheres are 4× this.
pub const NEMA_BACKGROUND: f64 = 5300.0;

/// Centre (x, y) of NEMA sphere `i`: on a 57.2 mm circle, 60° apart.
pub fn nema_sphere_centre(i: usize) -> (f64, f64) {
    let a = std::f64::consts::PI / 3.0 * i as f64;
    (57.2 * a.cos(), 57.2 * a.sin() - 20.0)
}

fn nema_body(x: f64, y: f64) -> bool {
    // Simplified IEC body section: a 300 × 230 mm ellipse.
    (x / 150.0).powi(2) + ((y - 0.0) / 115.0).powi(2) <= 1.0
}

fn nema_lung(x: f64, y: f64) -> bool {
    x * x + (y + 20.0).powi(2) <= 25.0 * 25.0
}

/// NEMA IEC phantom activity (Bq/ml).
pub fn nema_activity(x: f64, y: f64, z: f64) -> f64 {
    if !nema_body(x, y) || nema_lung(x, y) {
        return 0.0;
    }
    for (i, d) in NEMA_SPHERES_MM.iter().enumerate() {
        let (cx, cy) = nema_sphere_centre(i);
        if (x - cx).powi(2) + (y - cy).powi(2) + (z - NEMA_SPHERE_Z).powi(2) <= (d / 2.0).powi(2) {
            return 4.0 * NEMA_BACKGROUND;
        }
    }
    NEMA_BACKGROUND
}

/// NEMA IEC phantom attenuation (1/mm): water, low-density lung insert.
pub fn nema_mu(x: f64, y: f64, _z: f64) -> f64 {
    if !nema_body(x, y) {
        0.0
    } else if nema_lung(x, y) {
        0.0025
    } else {
        0.0096
    }
}

/// Sample `f(x, y, z)` (mm from the centre) at the pixel centres of an n×n
/// grid over `fov_mm`, on slice z.
pub fn sample_grid(n: usize, fov_mm: f64, z: f64, f: &dyn Fn(f64, f64, f64) -> f64) -> Vec<f32> {
    let px = fov_mm / n as f64;
    let mut g = vec![0.0f32; n * n];
    for j in 0..n {
        for i in 0..n {
            let x = (i as f64 + 0.5) * px - fov_mm / 2.0;
            let y = (j as f64 + 0.5) * px - fov_mm / 2.0;
            g[j * n + i] = f(x, y, z) as f32;
        }
    }
    g
}

/// `f(k)` for k in 0..count on every core, results in order (slices are
/// independent: each has its own model and seeded generator).
pub fn par_slices<T: Send>(count: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let workers = std::thread::available_parallelism().map(|v| v.get()).unwrap_or(1).min(count.max(1));
    let results: Vec<std::sync::Mutex<Option<T>>> = (0..count).map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= count {
                        return;
                    }
                    let out = f(k);
                    *results[k].lock().expect("slice slot") = Some(out);
                }
            });
        }
    });
    results.into_iter().map(|m| m.into_inner().expect("slice slot").expect("every slice done")).collect()
}

/// A simulated study with nested frames.
#[derive(Debug, Clone)]
pub struct PhysicalStudy {
    pub study_uid: String,
    /// (frame duration s, series), for 30, 60 and 90 s.
    pub series: Vec<(f64, SeriesFiles)>,
    /// Truth activity (Bq/ml), float32 [slices, rows, cols], volume z order as written.
    pub truth: PathBuf,
    pub lesions: PathBuf,
}

/// Simulate a study physically (see [`physics`]): per slice, attenuated
/// projection, calibrated Poisson counts for 90 s, nested 60 s and 30 s
/// frames by binomial thinning, OSEM for each; written as three PET series
/// of one study (`PT30/`, `PT60/`, `PT90/`), the truth (`truth.npy`) and the
/// lesion list (`lesions.json`). Runs on all cores.
pub fn write_study_physical(dir: &Path, spec: &SeriesSpec, sc: &physics::Scanner, phantom: Phantom) -> std::io::Result<PhysicalStudy> {
    write_study_physical_at(dir, spec, sc, phantom, 0.0)
}

/// [`write_study_physical`] with the first slice at `z0` mm into the phantom.
pub fn write_study_physical_at(
    dir: &Path,
    spec: &SeriesSpec,
    sc: &physics::Scanner,
    phantom: Phantom,
    z0: f64,
) -> std::io::Result<PhysicalStudy> {
    write_study_physical_frames(dir, spec, sc, phantom, z0, &[30.0, 60.0, 90.0], &|_| {})
}

/// [`write_study_physical_at`] reconstructing and writing only the frames
/// in `frames` (seconds, of 30, 60 and 90; the counts are drawn for all
/// three, so a frame's pixels do not depend on which others are written),
/// calling `done` with the number of slices finished so far (progress).
pub fn write_study_physical_frames(
    dir: &Path,
    spec: &SeriesSpec,
    sc: &physics::Scanner,
    phantom: Phantom,
    z0: f64,
    frames: &[f64],
    done: &(dyn Fn(usize) + Sync),
) -> std::io::Result<PhysicalStudy> {
    let finished = std::sync::atomic::AtomicUsize::new(0);
    let span = spec.slices.saturating_sub(1) as f64 * spec.slice_thickness_mm;
    let patient = match phantom {
        Phantom::Patient { family, seed } => Some(patient::Patient::generate(family, seed, z0, z0 + span)),
        _ => None,
    };
    type Field<'a> = Box<dyn Fn(f64, f64, f64) -> f64 + Sync + 'a>;
    let (activity, mu, calib_z): (Field, Field, f64) = match (&patient, phantom) {
        (Some(p), _) => (Box::new(|x, y, z| p.activity(x, y, z)), Box::new(|x, y, z| p.mu(x, y, z)), p.liver_z()),
        (None, Phantom::Nema) => (Box::new(nema_activity), Box::new(nema_mu), NEMA_SPHERE_Z),
        (None, _) => (Box::new(activity), Box::new(mu), 60.0),
    };
    let sc =
        &physics::Scanner { reference_counts_90s: patient.as_ref().map(|p| p.counts_90s).unwrap_or(sc.reference_counts_90s), ..sc.clone() };
    let n = spec.matrix;
    let px = spec.fov_mm / n as f64;
    let grid = |z: f64, f: &dyn Fn(f64, f64, f64) -> f64| sample_grid(n, spec.fov_mm, z, f);
    // Calibrate on a torso slice through the liver.
    let k90 = physics::calibrate(&grid(calib_z, &activity), &grid(calib_z, &mu), n, px, sc);
    let slices = par_slices(spec.slices, |k| {
        let z = z0 + k as f64 * spec.slice_thickness_mm;
        let (act, att) = (grid(z, &activity), grid(z, &mu));
        let model = physics::Model::new(&act, &att, n, px, sc, k90);
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed.wrapping_mul(1_000_003).wrapping_add(k as u64));
        let f = model.acquire(&act, &mut rng);
        let rec = |c: &[u32], t: f64| {
            if frames.contains(&t) { model.osem(c, t, sc).into_iter().map(|v| v as f64).collect::<Vec<f64>>() } else { Vec::new() }
        };
        let out = (rec(&f.c30, 30.0), rec(&f.c60, 60.0), rec(&f.c90, 90.0), act);
        done(finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
        out
    });
    let tag = match phantom {
        Phantom::Nema => "nema".to_string(),
        Phantom::Torso => "phys".to_string(),
        Phantom::Patient { family, seed } => format!("patient-{}-{seed}", family.name()),
    };
    let ids = StudyIds::new(spec.seed, &tag);
    let mut series = Vec::new();
    for (d, pick) in [(30.0, 0usize), (60.0, 1), (90.0, 2)] {
        if !frames.contains(&d) {
            continue;
        }
        let images: Vec<Vec<f64>> = slices
            .iter()
            .map(|s| match pick {
                0 => s.0.clone(),
                1 => s.1.clone(),
                _ => s.2.clone(),
            })
            .collect();
        let desc = format!("WB FDG {d}s/bed (simulated, nested)");
        series.push((d, write_images(&dir.join(format!("PT{d}")), spec, &ids, d, &desc, &images)?));
    }
    let truth = dir.join("truth.npy");
    let flat: Vec<f32> = slices.iter().flat_map(|s| s.3.iter().copied()).collect();
    write_npy_f32(&truth, &[spec.slices, n, n], &flat)?;
    let lesions = dir.join("lesions.json");
    let list: Vec<serde_json::Value> = match phantom {
        Phantom::Patient { .. } => patient
            .as_ref()
            .map(|p| {
                p.lesions
                    .iter()
                    .map(|l| serde_json::json!({"x_mm": l.x_mm, "y_mm": l.y_mm, "z_mm": l.z_mm - z0, "diameter_mm": l.diameter_mm, "activity_bqml": l.activity_bqml, "background_bqml": l.background_bqml, "host": l.host}))
                    .collect()
            })
            .unwrap_or_default(),
        Phantom::Torso => LESIONS
            .iter()
            .map(|(x, y, z, r, v)| serde_json::json!({"x_mm": x, "y_mm": y, "z_mm": z, "diameter_mm": 2.0 * r, "activity_bqml": v}))
            .collect(),
        Phantom::Nema => NEMA_SPHERES_MM
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (x, y) = nema_sphere_centre(i);
                serde_json::json!({"x_mm": x, "y_mm": y, "z_mm": NEMA_SPHERE_Z, "diameter_mm": d, "activity_bqml": 4.0 * NEMA_BACKGROUND, "background_bqml": NEMA_BACKGROUND})
            })
            .collect(),
    };
    std::fs::write(
        &lesions,
        serde_json::to_vec_pretty(
            &serde_json::json!({"lesions": list, "slice_thickness_mm": spec.slice_thickness_mm, "note": "z is the distance below the first slice; x, y from the centre of the field of view"}),
        )?,
    )?;
    Ok(PhysicalStudy { study_uid: ids.study_uid.clone(), series, truth, lesions })
}

/// A float32 array in NumPy's .npy format (version 1.0, C order).
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> std::io::Result<()> {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}{}), }}", dims.join(", "), if shape.len() == 1 { "," } else { "" });
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out)
}

/// A region of the phantom's liver that is uniform, as (x, y) pixel bounds
/// and slice bounds **in volume order** (as [`petrestore::restore::volume::load`]
/// sorts them: increasing patient z, i.e. the last written slice first), for
/// noise measurements.
pub fn liver_roi(spec: &SeriesSpec) -> (std::ops::Range<usize>, std::ops::Range<usize>, std::ops::Range<usize>) {
    let px = spec.fov_mm / spec.matrix as f64;
    let to_px = |mm: f64| ((mm + spec.fov_mm / 2.0) / px) as usize;
    // Written slice k sits at z = k·thickness below the first; the liver
    // (z > 20 mm) clear of the lesions (z ≤ 70 mm) starts at k0.
    let k0 = ((75.0 / spec.slice_thickness_mm).ceil() as usize).min(spec.slices.saturating_sub(1));
    (to_px(-90.0)..to_px(-40.0), to_px(5.0)..to_px(35.0), 0..spec.slices - k0)
}

fn el(tag: dicom_core::Tag, vr: VR, v: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, v.into())
}

fn normal(rng: &mut impl Rng) -> f64 {
    // Box–Muller.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// UIDs shared by the series of one simulated study.
struct StudyIds {
    study_uid: String,
    frame_of_ref: String,
    root: String,
}

impl StudyIds {
    fn new(seed: u64, family: &str) -> StudyIds {
        let root = format!("sim-{family}{seed}");
        StudyIds { study_uid: derived_uid(&root, "study"), frame_of_ref: derived_uid(&root, "for"), root }
    }
}

/// Write one PET series (one file per slice) into `dir` with the simple
/// (non-physical) image model: the phantom plus noise ∝ 1/√t.
pub fn write_series(dir: &Path, spec: &SeriesSpec) -> std::io::Result<SeriesFiles> {
    let (ids, images) = simple_images(spec);
    let desc = format!("WB FDG {}s/bed", spec.frame_duration_s);
    write_images(dir, spec, &ids, spec.frame_duration_s, &desc, &images)
}

/// [`write_series`] as one multi-frame Enhanced PET Image instance (one
/// frame per slice), the way newer scanners can send it.
pub fn write_series_enhanced(dir: &Path, spec: &SeriesSpec) -> std::io::Result<SeriesFiles> {
    let (ids, images) = simple_images(spec);
    let desc = format!("WB FDG {}s/bed", spec.frame_duration_s);
    enhanced::write_images_enhanced(dir, spec, &ids, spec.frame_duration_s, &desc, &images)
}

/// [`write_series`] as one Legacy Converted Enhanced PET instance (what a
/// PACS makes of a classic series).
pub fn write_series_legacy(dir: &Path, spec: &SeriesSpec) -> std::io::Result<SeriesFiles> {
    let (ids, images) = simple_images(spec);
    let desc = format!("WB FDG {}s/bed", spec.frame_duration_s);
    enhanced::write_images_legacy(dir, spec, &ids, spec.frame_duration_s, &desc, &images)
}

fn simple_images(spec: &SeriesSpec) -> (StudyIds, Vec<Vec<f64>>) {
    let ids = StudyIds::new(spec.seed, "");
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed ^ (spec.frame_duration_s.to_bits()));
    let n = spec.matrix;
    let px = spec.fov_mm / n as f64;
    // Relative noise: ~10 % in the liver at 90 s (the simulator's calibration), ∝ 1/√t.
    let rel_noise = 0.10 * (90.0 / spec.frame_duration_s).sqrt();
    let images: Vec<Vec<f64>> = (0..spec.slices)
        .map(|k| {
            let z = k as f64 * spec.slice_thickness_mm;
            let mut img = vec![0.0f64; n * n];
            for j in 0..n {
                for i in 0..n {
                    let x = (i as f64 + 0.5) * px - spec.fov_mm / 2.0;
                    let y = (j as f64 + 0.5) * px - spec.fov_mm / 2.0;
                    let a = activity(x, y, z);
                    let sd = rel_noise * (a * LIVER_BQML).sqrt();
                    img[j * n + i] = (a + sd * normal(&mut rng)).max(0.0);
                }
            }
            img
        })
        .collect();
    (ids, images)
}

/// A one-item code sequence (SNOMED CT), optionally with a modifier
/// sequence inside the item.
fn code_seq(
    tag: dicom_core::Tag,
    value: &str,
    meaning: &str,
    modifier: Option<(dicom_core::Tag, &str, &str)>,
) -> DataElement<InMemDicomObject> {
    let mut item = InMemDicomObject::from_element_iter([
        el(tags::CODE_VALUE, VR::SH, value),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "SCT"),
        el(tags::CODE_MEANING, VR::LO, meaning),
    ]);
    if let Some((t, v, m)) = modifier {
        item.put(code_seq(t, v, m, None));
    }
    DataElement::new(tag, VR::SQ, DataSetSequence::from(vec![item]))
}

/// Patient, study and series attributes shared by the classic and the
/// Enhanced PET writers.
fn study_elements(spec: &SeriesSpec, ids: &StudyIds, series_uid: &str, description: &str) -> Vec<DataElement<InMemDicomObject>> {
    vec![
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        el(tags::STUDY_DATE, VR::DA, "20261127"),
        el(tags::SERIES_DATE, VR::DA, "20261127"),
        el(tags::STUDY_TIME, VR::TM, "090000"),
        el(tags::SERIES_TIME, VR::TM, "093000"),
        el(tags::ACCESSION_NUMBER, VR::SH, "SIM0001"),
        el(tags::MODALITY, VR::CS, "PT"),
        el(tags::MANUFACTURER, VR::LO, "petrestore simulator"),
        el(tags::SERIES_DESCRIPTION, VR::LO, description),
        el(tags::PATIENT_NAME, VR::PN, "SIMULATED^PATIENT"),
        el(tags::PATIENT_ID, VR::LO, format!("SIM{}", spec.seed)),
        el(tags::PATIENT_BIRTH_DATE, VR::DA, ""),
        el(tags::PATIENT_SEX, VR::CS, "O"),
        el(tags::PATIENT_WEIGHT, VR::DS, "75"),
        el(tags::PATIENT_SIZE, VR::DS, "1.75"),
        el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""),
        el(tags::BODY_PART_EXAMINED, VR::CS, "WHOLEBODY"),
        el(tags::STUDY_INSTANCE_UID, VR::UI, ids.study_uid.as_str()),
        el(tags::SERIES_INSTANCE_UID, VR::UI, series_uid),
        el(tags::STUDY_ID, VR::SH, "1"),
        el(tags::FRAME_OF_REFERENCE_UID, VR::UI, ids.frame_of_ref.as_str()),
        el(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
    ]
}

/// Write images (Bq/ml, one per slice) as a PET series with every attribute
/// a scanner series carries.
fn write_images(
    dir: &Path,
    spec: &SeriesSpec,
    ids: &StudyIds,
    duration_s: f64,
    description: &str,
    images: &[Vec<f64>],
) -> std::io::Result<SeriesFiles> {
    std::fs::create_dir_all(dir)?;
    let study_uid = ids.study_uid.clone();
    let series_uid = derived_uid(&ids.root, &format!("series-{duration_s}s"));
    let n = spec.matrix;
    let px = spec.fov_mm / n as f64;
    let mut out = SeriesFiles { study_uid: study_uid.clone(), series_uid: series_uid.clone(), sop_uids: vec![], files: vec![] };
    for (k, img) in images.iter().enumerate() {
        let z = k as f64 * spec.slice_thickness_mm;
        let max = img.iter().cloned().fold(0.0, f64::max);
        let slope = petdicom::ds(if max > 0.0 { max / 65000.0 } else { 1.0 });
        let slope_v: f64 = slope.parse().expect("ds parses");
        let mut bytes = Vec::with_capacity(n * n * 2);
        for v in img {
            bytes.extend_from_slice(&((v / slope_v).round().clamp(0.0, 65535.0) as u16).to_le_bytes());
        }
        let sop = derived_uid(&series_uid, &format!("slice-{k}"));
        let ms = (duration_s * 1000.0).round() as i64;
        let radiopharm = InMemDicomObject::from_element_iter([
            el(tags::RADIOPHARMACEUTICAL, VR::LO, "Fluorodeoxyglucose"),
            el(tags::RADIOPHARMACEUTICAL_START_TIME, VR::TM, "083000"),
            el(tags::RADIONUCLIDE_TOTAL_DOSE, VR::DS, "370000000"),
            el(tags::RADIONUCLIDE_HALF_LIFE, VR::DS, "6586.2"),
            el(tags::RADIONUCLIDE_POSITRON_FRACTION, VR::DS, "0.9673"),
            DataElement::new(
                tags::RADIONUCLIDE_CODE_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(vec![InMemDicomObject::from_element_iter([
                    el(tags::CODE_VALUE, VR::SH, "77004003"),
                    el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "SCT"),
                    el(tags::CODE_MEANING, VR::LO, "^18^Fluorine"),
                ])]),
            ),
        ]);
        let obj = InMemDicomObject::from_element_iter(study_elements(spec, ids, &series_uid, description).into_iter().chain([
            el(tags::IMAGE_TYPE, VR::CS, PrimitiveValue::Strs(["ORIGINAL", "PRIMARY"].map(String::from).into_iter().collect())),
            el(tags::SOP_CLASS_UID, VR::UI, PET_IMAGE_STORAGE),
            el(tags::SOP_INSTANCE_UID, VR::UI, sop.as_str()),
            el(tags::ACQUISITION_DATE, VR::DA, "20261127"),
            el(tags::ACQUISITION_TIME, VR::TM, "093000"),
            el(tags::COLLIMATOR_TYPE, VR::CS, "NONE"),
            code_seq(
                tags::PATIENT_ORIENTATION_CODE_SEQUENCE,
                "102538003",
                "recumbent",
                Some((tags::PATIENT_ORIENTATION_MODIFIER_CODE_SEQUENCE, "40199007", "supine")),
            ),
            code_seq(tags::PATIENT_GANTRY_RELATIONSHIP_CODE_SEQUENCE, "102540008", "headfirst", None),
            el(tags::SLICE_THICKNESS, VR::DS, petdicom::ds(spec.slice_thickness_mm)),
            el(tags::ACTUAL_FRAME_DURATION, VR::IS, ms.to_string()),
            el(tags::SERIES_NUMBER, VR::IS, "3"),
            el(tags::INSTANCE_NUMBER, VR::IS, (k + 1).to_string()),
            el(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                PrimitiveValue::Strs(
                    [-spec.fov_mm / 2.0 + px / 2.0, -spec.fov_mm / 2.0 + px / 2.0, -z].map(petdicom::ds).into_iter().collect(),
                ),
            ),
            el(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                PrimitiveValue::Strs(["1", "0", "0", "0", "1", "0"].map(String::from).into_iter().collect()),
            ),
            el(tags::SLICE_LOCATION, VR::DS, petdicom::ds(-z)),
            el(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
            el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
            el(tags::ROWS, VR::US, n as u16),
            el(tags::COLUMNS, VR::US, n as u16),
            el(tags::PIXEL_SPACING, VR::DS, PrimitiveValue::Strs([petdicom::ds(px), petdicom::ds(px)].into_iter().collect())),
            el(tags::BITS_ALLOCATED, VR::US, 16u16),
            el(tags::BITS_STORED, VR::US, 16u16),
            el(tags::HIGH_BIT, VR::US, 15u16),
            el(tags::PIXEL_REPRESENTATION, VR::US, 0u16),
            el(tags::RESCALE_INTERCEPT, VR::DS, "0"),
            el(tags::RESCALE_SLOPE, VR::DS, slope),
            el(tags::SERIES_TYPE, VR::CS, PrimitiveValue::Strs(["WHOLE BODY", "IMAGE"].map(String::from).into_iter().collect())),
            el(tags::UNITS, VR::CS, "BQML"),
            el(tags::COUNTS_SOURCE, VR::CS, "EMISSION"),
            el(tags::NUMBER_OF_SLICES, VR::US, spec.slices as u16),
            el(
                tags::CORRECTED_IMAGE,
                VR::CS,
                PrimitiveValue::Strs(["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"].map(String::from).into_iter().collect()),
            ),
            el(tags::DECAY_CORRECTION, VR::CS, "START"),
            el(tags::FRAME_REFERENCE_TIME, VR::DS, petdicom::ds(ms as f64 / 2.0)),
            el(tags::DECAY_FACTOR, VR::DS, "1"),
            el(tags::IMAGE_INDEX, VR::US, (k + 1) as u16),
            DataElement::new(tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE, VR::SQ, DataSetSequence::from(vec![radiopharm])),
            el(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(bytes)),
        ]));
        let path = dir.join(format!("{:04}.dcm", k + 1));
        std::fs::write(&path, part10::encode(obj).map_err(std::io::Error::other)?)?;
        out.sop_uids.push(sop);
        out.files.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_study_is_three_series_with_its_random_lesions_inside_the_slab() {
        let d = tempfile::tempdir().unwrap();
        let spec = SeriesSpec { slices: 4, matrix: 48, seed: 3, ..Default::default() };
        let sc = physics::Scanner { n_angles: 32, ..Default::default() };
        let fam = patient::Family::Lobulated;
        let st = write_study_physical(d.path(), &spec, &sc, Phantom::Patient { family: fam, seed: 20_005 }).unwrap();
        assert_eq!(st.series.len(), 3);
        assert!(st.series.iter().all(|(_, s)| s.files.len() == 4));
        let l: serde_json::Value = serde_json::from_slice(&std::fs::read(&st.lesions).unwrap()).unwrap();
        let lesions = l["lesions"].as_array().unwrap();
        assert!(!lesions.is_empty());
        let span = 3.0 * spec.slice_thickness_mm;
        for les in lesions {
            let z = les["z_mm"].as_f64().unwrap();
            assert!((0.0..=span).contains(&z), "lesion z {z} outside the slab 0..{span}");
        }
        // another seed is another patient, another study
        let d2 = tempfile::tempdir().unwrap();
        let st2 = write_study_physical(d2.path(), &spec, &sc, Phantom::Patient { family: fam, seed: 20_006 }).unwrap();
        assert_ne!(st.study_uid, st2.study_uid);
    }

    #[test]
    fn physical_study_has_nested_frames_of_one_study_with_the_truth() {
        let d = tempfile::tempdir().unwrap();
        let spec = SeriesSpec { slices: 6, matrix: 64, seed: 3, fov_mm: 600.0, slice_thickness_mm: 12.0, frame_duration_s: 90.0 };
        let sc = physics::Scanner { n_angles: 48, ..Default::default() };
        let st = write_study_physical(d.path(), &spec, &sc, Phantom::Torso).unwrap();
        assert_eq!(st.series.len(), 3);
        let mut stats = Vec::new();
        for (dur, s) in &st.series {
            assert_eq!(s.study_uid, st.study_uid, "one study");
            let l = petrestore::restore::volume::load(&s.files).unwrap();
            let o = &l.slices[0].dataset;
            use petdicom::attrs::Attrs;
            assert_eq!(o.f64_of(dicom_dictionary_std::tags::ACTUAL_FRAME_DURATION), Some(dur * 1000.0));
            let m = l.volume.data.iter().map(|v| *v as f64).sum::<f64>() / l.volume.data.len() as f64;
            stats.push(m);
        }
        assert_ne!(st.series[0].1.series_uid, st.series[2].1.series_uid);
        // total activity agrees between frames (nested data, same truth)
        assert!((stats[0] / stats[2] - 1.0).abs() < 0.05, "{stats:?}");
        let npy = std::fs::read(&st.truth).unwrap();
        assert_eq!(&npy[..6], b"\x93NUMPY");
        assert_eq!(npy.len() % 64, (6 * 64 * 64 * 4) % 64);
        assert!(npy.len() >= 6 * 64 * 64 * 4 + 64);
        let lj: serde_json::Value = serde_json::from_slice(&std::fs::read(&st.lesions).unwrap()).unwrap();
        assert_eq!(lj["lesions"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn a_subset_of_frames_gives_the_same_images_and_reports_progress() {
        let spec = SeriesSpec { slices: 3, matrix: 48, seed: 4, fov_mm: 600.0, slice_thickness_mm: 12.0, frame_duration_s: 90.0 };
        let sc = physics::Scanner { n_angles: 36, ..Default::default() };
        let (all, some) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let full = write_study_physical(all.path(), &spec, &sc, Phantom::Torso).unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let part =
            write_study_physical_frames(some.path(), &spec, &sc, Phantom::Torso, 0.0, &[30.0, 90.0], &|n| seen.lock().unwrap().push(n))
                .unwrap();
        assert_eq!(part.series.iter().map(|(d, _)| *d).collect::<Vec<_>>(), vec![30.0, 90.0]);
        assert!(!some.path().join("PT60").exists(), "the 60 s frame is not written");
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, vec![1, 2, 3], "one progress call per slice");
        for d in [30.0, 90.0] {
            let pick = |st: &PhysicalStudy| {
                let files = &st.series.iter().find(|(x, _)| *x == d).unwrap().1.files;
                petrestore::restore::volume::load(files).unwrap().volume.data
            };
            assert_eq!(pick(&full), pick(&part), "{d} s frame differs when the 60 s frame is skipped");
        }
    }

    #[test]
    fn nema_study_recovers_contrast_rising_with_sphere_size() {
        let d = tempfile::tempdir().unwrap();
        // 3 slices of 4 mm around the sphere plane, 2 mm pixels
        let spec = SeriesSpec { slices: 3, matrix: 160, seed: 9, fov_mm: 320.0, slice_thickness_mm: 4.0, frame_duration_s: 90.0 };
        let sc = physics::Scanner { n_angles: 96, reference_counts_90s: 2.0e7, ..Default::default() };
        // shift the slab so its middle slice is the sphere plane
        let st = { write_study_physical_at(d.path(), &spec, &sc, Phantom::Nema, NEMA_SPHERE_Z - 4.0).unwrap() };
        let l = petrestore::restore::volume::load(&st.series[2].1.files).unwrap();
        let n = spec.matrix;
        let px = spec.fov_mm / n as f64;
        // the middle slice (volume order is reversed z, the middle stays the middle)
        let img = l.volume.slice(1);
        let mean_in = |cx: f64, cy: f64, r: f64| {
            let mut v = vec![];
            for j in 0..n {
                for i in 0..n {
                    let x = (i as f64 + 0.5) * px - spec.fov_mm / 2.0;
                    let y = (j as f64 + 0.5) * px - spec.fov_mm / 2.0;
                    if (x - cx).powi(2) + (y - cy).powi(2) <= r * r {
                        v.push(img[j * n + i] as f64);
                    }
                }
            }
            v.iter().sum::<f64>() / v.len() as f64
        };
        let bg = mean_in(0.0, 70.0, 15.0);
        let crs: Vec<f64> = (0..6)
            .map(|i| {
                let (x, y) = nema_sphere_centre(i);
                (mean_in(x, y, NEMA_SPHERES_MM[i] / 2.0 * 0.6) / bg - 1.0) / 3.0
            })
            .collect();
        eprintln!("NEMA contrast recovery 10..37 mm (90 s): {crs:.3?}, background {bg:.0} Bq/ml");
        assert!((bg / NEMA_BACKGROUND - 1.0).abs() < 0.1, "background {bg}");
        assert!(crs[5] > crs[0] + 0.2 && crs[5] > 0.6, "{crs:?}");
        assert!(crs.windows(2).all(|w| w[1] > w[0]), "rising with size: {crs:?}");
    }

    #[test]
    fn series_loads_as_a_consistent_volume_with_the_phantom_activity() {
        let d = tempfile::tempdir().unwrap();
        let spec = SeriesSpec { slices: 30, matrix: 64, frame_duration_s: 90.0, ..Default::default() };
        let s = write_series(d.path(), &spec).unwrap();
        assert_eq!(s.files.len(), 30);
        let l = petrestore::restore::volume::load(&s.files).unwrap();
        assert_eq!((l.volume.nx, l.volume.ny, l.volume.nz), (64, 64, 30));
        assert!((l.volume.spacing[2] - 3.0).abs() < 1e-6);
        let (xr, yr, zr) = liver_roi(&spec);
        let mut vals = vec![];
        for z in zr {
            for y in yr.clone() {
                for x in xr.clone() {
                    vals.push(l.volume.data[(z * 64 + y) * 64 + x] as f64);
                }
            }
        }
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let sd = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
        assert!((mean / LIVER_BQML - 1.0).abs() < 0.03, "liver mean {mean}");
        assert!((sd / mean - 0.10).abs() < 0.02, "liver noise {}", sd / mean);
    }
}
