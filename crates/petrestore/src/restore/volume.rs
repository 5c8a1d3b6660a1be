//! From spooled slices to a volume in Bq/ml: per-slice Rescale Slope and
//! Intercept applied, slices ordered along the slice normal, geometry checked
//! (one matrix, one orientation, equal spacing, no gap).

use std::path::PathBuf;
use std::sync::Arc;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::dicom::attrs::Attrs;

/// A 3D image, x fastest: `data[(z * ny + y) * nx + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub nx: usize,
    pub ny: usize,
    pub nz: usize,
    /// mm between columns, rows and slices.
    pub spacing: [f64; 3],
    pub data: Vec<f32>,
    /// Actual Frame Duration (s) once the selection rules have settled it
    /// (a duration-conditioned model needs it).
    pub frame_duration_s: Option<f64>,
}

impl Volume {
    /// Same shape and spacing, empty data (to be filled by the caller).
    pub fn clone_shape(&self) -> Volume {
        Volume { nx: self.nx, ny: self.ny, nz: self.nz, spacing: self.spacing, data: Vec::new(), frame_duration_s: self.frame_duration_s }
    }
    pub fn slice(&self, z: usize) -> &[f32] {
        &self.data[z * self.nx * self.ny..(z + 1) * self.nx * self.ny]
    }
}

/// One source slice: a single-frame instance, or one frame of a multi-frame
/// (Enhanced PET) instance. The data set has no Pixel Data; the frames of
/// one instance share it.
#[derive(Debug, Clone)]
pub struct SourceSlice {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    /// 0-based frame of a multi-frame instance; `None` for a single-frame image.
    pub frame: Option<usize>,
    pub dataset: Arc<InMemDicomObject>,
}

/// A series ready for an engine.
#[derive(Debug)]
pub struct LoadedSeries {
    pub volume: Volume,
    /// In volume order (increasing position along the slice normal).
    pub slices: Vec<SourceSlice>,
}

/// Why a series could not become a volume. The messages name the instance
/// (SOP Instance UID, and frame) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("series has no instances")]
    Empty,
    /// The file could not be read as DICOM Part 10.
    #[error("{0}")]
    Unreadable(String),
    #[error("{sop}: {what} missing")]
    Missing { sop: String, what: &'static str },
    /// Pixel data this node cannot use (samples, compression, length, bit depth).
    #[error("{0}")]
    Pixels(String),
    /// Geometry missing, or slices that do not form one regular volume.
    #[error("{0}")]
    Geometry(String),
    /// More voxels than the bound the caller set (memory): found before
    /// the rest of the series is read.
    #[error(
        "the series has more than {max} voxels ({rows}x{cols} per slice, {slices} slices in the first {files} files): \
         larger than restore.max_voxels allows on this box's memory"
    )]
    TooLarge { max: u64, rows: usize, cols: usize, slices: usize, files: usize },
}

/// Stored values of one frame to Bq/ml; a stored value equal to `padding`
/// (Pixel Padding Value) is outside the image and reads 0. A rescale that
/// makes every pixel 0, or values beyond the float range, is refused.
fn decode(bytes: &[u8], bits: u16, signed: bool, n: usize, slope: f64, intercept: f64, padding: Option<f64>) -> Result<Vec<f32>, String> {
    if !slope.is_finite() || slope == 0.0 || !intercept.is_finite() {
        return Err(format!("Rescale Slope {slope} / Intercept {intercept}: not a rescale to activity"));
    }
    let raw: Vec<f64> = match (bits, signed) {
        (16, false) if bytes.len() >= 2 * n => bytes.chunks_exact(2).take(n).map(|c| u16::from_le_bytes([c[0], c[1]]) as f64).collect(),
        (16, true) if bytes.len() >= 2 * n => bytes.chunks_exact(2).take(n).map(|c| i16::from_le_bytes([c[0], c[1]]) as f64).collect(),
        (32, false) if bytes.len() >= 4 * n => {
            bytes.chunks_exact(4).take(n).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
        }
        (32, true) if bytes.len() >= 4 * n => {
            bytes.chunks_exact(4).take(n).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
        }
        (16 | 32, _) => return Err(format!("Pixel Data too short: {} bytes for {n} pixels", bytes.len())),
        (b, _) => return Err(format!("Bits Allocated {b} not supported (16 or 32)")),
    };
    let out: Vec<f32> = raw.into_iter().map(|v| if Some(v) == padding { 0.0 } else { (v * slope + intercept) as f32 }).collect();
    if out.iter().any(|v| !v.is_finite()) {
        return Err(format!("Rescale Slope {slope} gives values beyond the float range"));
    }
    Ok(out)
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

/// Geometry and rescale of one frame (or of a single-frame instance).
struct FrameGeometry {
    iop: [f64; 6],
    ipp: [f64; 3],
    ps: [f64; 2],
    slope: f64,
    intercept: f64,
}

/// Pixel and slice spacings the restoration takes (mm). Below, filter
/// kernels sized in millimetres grow without bound (0.0001 mm pixels ask a
/// 15 mm filter for 380,000 taps); no clinical PET comes near either end.
pub const SPACING_MM: std::ops::RangeInclusive<f64> = 0.5..=100.0;

fn frame_geometry(obj: &InMemDicomObject, frame: Option<usize>, what: &str) -> Result<FrameGeometry, String> {
    use crate::dicom::frames::group_f64s;
    // A multi-frame instance keeps these in functional groups; read the
    // top level as a fallback (Legacy Converted objects may have both).
    let multi = |seq, tag| frame.and_then(|f| group_f64s(obj, f, seq, tag)).or_else(|| obj.f64s_of(tag));
    let iop: [f64; 6] = multi(tags::PLANE_ORIENTATION_SEQUENCE, tags::IMAGE_ORIENTATION_PATIENT)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| format!("{what}: Image Orientation (Patient) (0020,0037) missing or not 6 values"))?;
    let ipp: [f64; 3] = multi(tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| format!("{what}: Image Position (Patient) (0020,0032) missing or not 3 values"))?;
    let ps: [f64; 2] = multi(tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING)
        .and_then(|v| v.try_into().ok())
        .filter(|v: &[f64; 2]| v[0] > 0.0 && v[1] > 0.0)
        .ok_or_else(|| format!("{what}: Pixel Spacing (0028,0030) missing or not positive"))?;
    let rescale = |tag, default| {
        frame
            .and_then(|f| crate::dicom::frames::group_f64(obj, f, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tag))
            .or_else(|| obj.f64_of(tag))
            .unwrap_or(default)
    };
    Ok(FrameGeometry { iop, ipp, ps, slope: rescale(tags::RESCALE_SLOPE, 1.0), intercept: rescale(tags::RESCALE_INTERCEPT, 0.0) })
}

/// Read the slices (single-frame instances, or the frames of multi-frame
/// instances) and build the volume. Errors say what is inconsistent.
pub fn load(paths: &[PathBuf]) -> Result<LoadedSeries, VolumeError> {
    load_bounded(paths, u64::MAX)
}

/// [`load`], refusing a series of more than `max_voxels` voxels as soon as
/// the files read so far hold more (the memory a series may take is
/// bounded, not found by running out of it).
pub fn load_bounded(paths: &[PathBuf], max_voxels: u64) -> Result<LoadedSeries, VolumeError> {
    use VolumeError::{Geometry, Missing, Pixels};
    if paths.is_empty() {
        return Err(VolumeError::Empty);
    }
    struct Item {
        pos: f64,
        /// Image Position along the rows and the columns (mm).
        lateral: [f64; 2],
        data: Vec<f32>,
        slice: SourceSlice,
    }
    let mut items = Vec::with_capacity(paths.len());
    let mut shape: Option<(usize, usize, [f64; 6], [f64; 2])> = None;
    let mut voxels: u64 = 0;
    for (read, p) in paths.iter().enumerate() {
        let file = crate::dicom::part10::open(p).map_err(VolumeError::Unreadable)?;
        let mut obj = file.into_inner();
        let sop = obj.str_of(tags::SOP_INSTANCE_UID).ok_or_else(|| Missing { sop: p.display().to_string(), what: "SOP Instance UID" })?;
        let missing = |what| Missing { sop: sop.clone(), what };
        let rows = obj.u16_of(tags::ROWS).ok_or_else(|| missing("Rows"))? as usize;
        let cols = obj.u16_of(tags::COLUMNS).ok_or_else(|| missing("Columns"))? as usize;
        if rows == 0 || cols == 0 {
            return Err(Pixels(format!("{sop}: an image of {rows} rows and {cols} columns")));
        }
        let bits = obj.u16_of(tags::BITS_ALLOCATED).ok_or_else(|| missing("Bits Allocated (0028,0100)"))?;
        let signed = obj.u16_of(tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1;
        let spp = obj.u16_of(tags::SAMPLES_PER_PIXEL).unwrap_or(1);
        if spp != 1 {
            return Err(Pixels(format!("{sop}: Samples per Pixel is {spp}; PET must be 1")));
        }
        // PET stores every bit it allocates (PS3.3 C.8.9.4.1.3); a 12-bit
        // layout would be misread as activity
        if let Some(stored) = obj.u16_of(tags::BITS_STORED)
            && stored != bits
        {
            return Err(Pixels(format!(
                "{sop}: Bits Stored {stored} with Bits Allocated {bits}; PET images store all allocated bits (PS3.3 C.8.9.4)"
            )));
        }
        // stored values marking pixels outside the image (Pixel Padding
        // Value, in the Pixel Representation's sign): no activity there
        let padding: Option<f64> = obj.element(tags::PIXEL_PADDING_VALUE).ok().and_then(|e| {
            let b = e.to_bytes().ok()?;
            match (b.len(), signed) {
                (2, false) => Some(u16::from_le_bytes([b[0], b[1]]) as f64),
                (2, true) => Some(i16::from_le_bytes([b[0], b[1]]) as f64),
                (4, false) => Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
                (4, true) => Some(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
                _ => None,
            }
        });
        let multi = crate::dicom::frames::is_multiframe(&obj);
        let frames = crate::dicom::frames::number_of_frames(&obj);
        if frames == 0 {
            return Err(Pixels(format!("{sop}: Number of Frames is 0")));
        }
        // before the pixels are copied and decoded
        voxels = voxels.saturating_add(((rows * cols) as u64).saturating_mul(frames as u64));
        if voxels > max_voxels {
            return Err(VolumeError::TooLarge { max: max_voxels, rows, cols, slices: items.len() + frames, files: read + 1 });
        }
        let pixel_data = {
            let px = obj.element(tags::PIXEL_DATA).map_err(|_| missing("Pixel Data"))?;
            px.to_bytes().map_err(|_| Pixels(format!("{sop}: Pixel Data is encapsulated (compressed); send uncompressed")))?.into_owned()
        };
        obj.remove_element(tags::PIXEL_DATA);
        let sop_class = obj.str_of(tags::SOP_CLASS_UID).unwrap_or_default();
        let dataset = Arc::new(obj);
        let n = rows * cols;
        let frame_bytes = n * (bits as usize).div_ceil(8);
        // saturating: Number of Frames comes from the sender
        if pixel_data.len() < frames.saturating_mul(frame_bytes) {
            return Err(Pixels(format!(
                "{sop}: Pixel Data has {} bytes, {frames} frames of {rows}x{cols} need {}",
                pixel_data.len(),
                frames.saturating_mul(frame_bytes)
            )));
        }
        for f in 0..frames {
            let frame = multi.then_some(f);
            let what = if multi { format!("{sop} frame {}", f + 1) } else { sop.clone() };
            let g = frame_geometry(&dataset, frame, &what).map_err(Geometry)?;
            match &shape {
                None => shape = Some((rows, cols, g.iop, g.ps)),
                Some((r, c, o, s)) => {
                    if (*r, *c) != (rows, cols) {
                        return Err(Geometry(format!("mixed matrix sizes: {r}x{c} and {rows}x{cols}")));
                    }
                    if o.iter().zip(g.iop).any(|(a, b)| (a - b).abs() > 1e-3) {
                        return Err(Geometry("slices have different Image Orientation (Patient)".into()));
                    }
                    if s.iter().zip(g.ps).any(|(a, b)| (a - b).abs() > 1e-3) {
                        return Err(Geometry("slices have different Pixel Spacing".into()));
                    }
                }
            }
            let bytes = &pixel_data[f * frame_bytes..(f + 1) * frame_bytes];
            let data = decode(bytes, bits, signed, n, g.slope, g.intercept, padding).map_err(|e| Pixels(format!("{what}: {e}")))?;
            let normal = cross([g.iop[0], g.iop[1], g.iop[2]], [g.iop[3], g.iop[4], g.iop[5]]);
            let along = |d: &[f64]| g.ipp[0] * d[0] + g.ipp[1] * d[1] + g.ipp[2] * d[2];
            let pos = along(&normal);
            items.push(Item {
                pos,
                lateral: [along(&g.iop[..3]), along(&g.iop[3..])],
                data,
                slice: SourceSlice { sop_instance_uid: sop.clone(), sop_class_uid: sop_class.clone(), frame, dataset: dataset.clone() },
            });
        }
    }
    items.sort_by(|a, b| a.pos.total_cmp(&b.pos));
    let Some((rows, cols, _, ps)) = shape else { return Err(VolumeError::Empty) };
    if let Some(s) = ps.iter().find(|s| !SPACING_MM.contains(s)) {
        return Err(Geometry(format!(
            "Pixel Spacing {s} mm is outside {}-{} mm: not a clinical PET image",
            SPACING_MM.start(),
            SPACING_MM.end()
        )));
    }
    // slices stacked straight: a slice shifted sideways by half a pixel or
    // more is not part of one regular volume (the model would see edges move)
    let first = items[0].lateral;
    if let Some(it) = items.iter().find(|it| (0..2).any(|k| (it.lateral[k] - first[k]).abs() >= 0.5 * ps[1 - k])) {
        return Err(Geometry(format!(
            "slices do not stack straight: Image Position (Patient) of the slice at {:.2} mm is {:.2} mm along the rows and \
             {:.2} mm along the columns from the first slice's (half a pixel allowed)",
            it.pos,
            it.lateral[0] - first[0],
            it.lateral[1] - first[1]
        )));
    }
    let dz = if items.len() > 1 {
        let mut gaps: Vec<f64> = items.windows(2).map(|w| w[1].pos - w[0].pos).collect();
        if let Some(i) = gaps.iter().position(|g| g.abs() < 1e-3) {
            return Err(Geometry(format!("two slices at the same position ({:.2} mm)", items[i].pos)));
        }
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        if let Some(i) = gaps.iter().position(|g| (g - median).abs() > 0.01 * median + 0.01) {
            return Err(Geometry(format!(
                "uneven slice spacing: {:.3} mm between slices at {:.2} and {:.2} mm where the series uses {median:.3} mm (a missing slice?)",
                gaps[i],
                items[i].pos,
                items[i + 1].pos
            )));
        }
        gaps.clear();
        median
    } else {
        let d = &items[0].slice.dataset;
        items[0]
            .slice
            .frame
            .and_then(|f| crate::dicom::frames::group_f64(d, f, tags::PIXEL_MEASURES_SEQUENCE, tags::SLICE_THICKNESS))
            .or_else(|| d.f64_of(tags::SLICE_THICKNESS))
            .unwrap_or(ps[0])
    };
    if !SPACING_MM.contains(&dz) {
        return Err(Geometry(format!(
            "slice spacing {dz:.4} mm (Image Position, or Slice Thickness of a single slice) is outside {}-{} mm",
            SPACING_MM.start(),
            SPACING_MM.end()
        )));
    }
    let nz = items.len();
    let mut data = Vec::with_capacity(rows * cols * nz);
    let mut slices = Vec::with_capacity(nz);
    for it in items {
        data.extend_from_slice(&it.data);
        slices.push(it.slice);
    }
    // Pixel Spacing is row spacing \ column spacing: x step is the column spacing ps[1].
    Ok(LoadedSeries { volume: Volume { nx: cols, ny: rows, nz, spacing: [ps[1], ps[0], dz], data, frame_duration_s: None }, slices })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(dir: &std::path::Path, fov_mm: f64, slices: usize, thickness: f64) -> Vec<PathBuf> {
        let spec = petsim::SeriesSpec { slices, matrix: 16, seed: 3, fov_mm, slice_thickness_mm: thickness, ..Default::default() };
        petsim::write_series(dir, &spec).unwrap().files
    }

    #[test]
    fn stored_values_are_decoded_to_activity_or_refused() {
        let px: Vec<u8> = [100i16, -32768, 32767, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode(&px, 16, true, 4, 2.0, 0.0, None).unwrap(), [200.0, -65536.0, 65534.0, 0.0]);
        // padding outside the image reads no activity
        assert_eq!(decode(&px, 16, true, 4, 2.0, 0.0, Some(-32768.0)).unwrap(), [200.0, 0.0, 65534.0, 0.0]);
        // a slope that makes every pixel 0, or values beyond f32
        assert!(decode(&px, 16, true, 4, 0.0, 0.0, None).unwrap_err().contains("Rescale Slope 0"));
        assert!(decode(&px, 16, true, 4, 1e35, 0.0, None).unwrap_err().contains("beyond the float range"));
        assert!(decode(&px, 16, true, 4, f64::NAN, 0.0, None).is_err());
    }

    #[test]
    fn spacings_no_clinical_pet_has_are_refused_before_any_filter_is_sized() {
        let d = tempfile::tempdir().unwrap();
        // 0.0001 mm pixels: a 15 mm filter would need 380,000 taps
        let files = series(&d.path().join("tiny"), 0.0016, 4, 3.0);
        let Err(VolumeError::Geometry(e)) = load(&files) else { panic!("tiny pixels accepted") };
        assert!(e.contains("Pixel Spacing") && e.contains("outside 0.5-100 mm"), "{e}");
        // one slice with a Slice Thickness of zero
        let files = series(&d.path().join("flat"), 400.0, 1, 0.0);
        let Err(VolumeError::Geometry(e)) = load(&files) else { panic!("zero thickness accepted") };
        assert!(e.contains("slice spacing"), "{e}");
        // an ordinary series loads
        let files = series(&d.path().join("ok"), 400.0, 4, 3.0);
        let v = load(&files).unwrap().volume;
        assert_eq!((v.nx, v.nz), (16, 4));
        assert!((v.spacing[0] - 25.0).abs() < 1e-9 && (v.spacing[2] - 3.0).abs() < 1e-6, "{:?}", v.spacing);
    }

    #[test]
    fn a_series_over_the_voxel_bound_is_refused_before_it_is_read_whole() {
        let d = tempfile::tempdir().unwrap();
        // 16 x 16 = 256 voxels per slice: the bound of 1,000 is passed by the fourth file
        let files = series(&d.path().join("s"), 400.0, 10, 3.0);
        let Err(e @ VolumeError::TooLarge { files: 4, slices: 4, .. }) = load_bounded(&files, 1000) else {
            panic!("not refused at file 4")
        };
        assert!(e.to_string().contains("more than 1000 voxels (16x16 per slice"), "{e}");
        assert_eq!(load_bounded(&files, 2560).unwrap().volume.nz, 10, "exactly at the bound loads");
    }

    #[test]
    fn slices_shifted_sideways_are_not_one_volume() {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let d = tempfile::tempdir().unwrap();
        let files = series(&d.path().join("s"), 400.0, 4, 3.0);
        let mut o = crate::dicom::part10::open(&files[2]).unwrap();
        let ipp: Vec<f64> = o.element(tags::IMAGE_POSITION_PATIENT).unwrap().to_multi_float64().unwrap();
        // pixels of 25 mm: move the third slice 12 mm (under half a pixel), then 13 mm
        let mut shift = |mm: f64| {
            let v = [ipp[0] + mm, ipp[1], ipp[2]];
            o.put(DataElement::new(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                PrimitiveValue::Strs(v.iter().map(|x| format!("{x:.4}")).collect()),
            ));
            o.write_to_file(&files[2]).unwrap();
        };
        shift(12.0);
        assert_eq!(load(&files).unwrap().volume.nz, 4, "under half a pixel is rounding");
        shift(13.0);
        let Err(VolumeError::Geometry(e)) = load(&files) else { panic!("a slice 13 mm off accepted") };
        assert!(e.contains("do not stack straight") && e.contains("13.00 mm along the rows"), "{e}");
    }
}
