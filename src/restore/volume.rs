//! From spooled slices to a volume in Bq/ml: per-slice Rescale Slope and
//! Intercept applied, slices ordered along the slice normal, geometry checked
//! (one matrix, one orientation, equal spacing, no gap).

use std::path::PathBuf;

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

/// One source slice: its data set without Pixel Data (kept to derive the
/// output instance from).
#[derive(Debug, Clone)]
pub struct SourceSlice {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub dataset: InMemDicomObject,
}

/// A series ready for an engine.
#[derive(Debug)]
pub struct LoadedSeries {
    pub volume: Volume,
    /// In volume order (increasing position along the slice normal).
    pub slices: Vec<SourceSlice>,
}

fn pixels(obj: &InMemDicomObject, rows: usize, cols: usize) -> Result<Vec<f32>, String> {
    let bits = obj.u16_of(tags::BITS_ALLOCATED).ok_or("Bits Allocated (0028,0100) missing")?;
    let signed = obj.u16_of(tags::PIXEL_REPRESENTATION).unwrap_or(0) == 1;
    let spp = obj.u16_of(tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    if spp != 1 {
        return Err(format!("Samples per Pixel is {spp}; PET must be 1"));
    }
    let frames = obj.str_of(tags::NUMBER_OF_FRAMES).and_then(|s| s.parse::<u32>().ok()).unwrap_or(1);
    if frames != 1 {
        return Err(format!("multi-frame instance ({frames} frames): restoration handles single-frame PET Image Storage only"));
    }
    let slope = obj.f64_of(tags::RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = obj.f64_of(tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    let px = obj.element(tags::PIXEL_DATA).map_err(|_| "Pixel Data missing".to_string())?;
    let bytes = px.to_bytes().map_err(|_| "Pixel Data is encapsulated (compressed); send uncompressed".to_string())?;
    let n = rows * cols;
    let raw: Vec<f64> = match (bits, signed) {
        (16, false) if bytes.len() >= 2 * n => bytes.chunks_exact(2).take(n).map(|c| u16::from_le_bytes([c[0], c[1]]) as f64).collect(),
        (16, true) if bytes.len() >= 2 * n => bytes.chunks_exact(2).take(n).map(|c| i16::from_le_bytes([c[0], c[1]]) as f64).collect(),
        (32, false) if bytes.len() >= 4 * n => bytes.chunks_exact(4).take(n).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
        (32, true) if bytes.len() >= 4 * n => bytes.chunks_exact(4).take(n).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
        (16 | 32, _) => return Err(format!("Pixel Data too short: {} bytes for {rows}x{cols}", bytes.len())),
        (b, _) => return Err(format!("Bits Allocated {b} not supported (16 or 32)")),
    };
    Ok(raw.into_iter().map(|v| (v * slope + intercept) as f32).collect())
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

/// Read the slices and build the volume. Errors say what is inconsistent.
pub fn load(paths: &[PathBuf]) -> Result<LoadedSeries, String> {
    if paths.is_empty() {
        return Err("series has no instances".into());
    }
    struct Item {
        pos: f64,
        data: Vec<f32>,
        slice: SourceSlice,
    }
    let mut items = Vec::with_capacity(paths.len());
    let mut shape: Option<(usize, usize, [f64; 6], [f64; 2])> = None;
    for p in paths {
        let file = crate::dicom::part10::open(p)?;
        let mut obj = file.into_inner();
        let sop = obj.str_of(tags::SOP_INSTANCE_UID).ok_or_else(|| format!("{}: SOP Instance UID missing", p.display()))?;
        let rows = obj.u16_of(tags::ROWS).ok_or_else(|| format!("{sop}: Rows missing"))? as usize;
        let cols = obj.u16_of(tags::COLUMNS).ok_or_else(|| format!("{sop}: Columns missing"))? as usize;
        let iop: [f64; 6] = obj
            .f64s_of(tags::IMAGE_ORIENTATION_PATIENT)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| format!("{sop}: Image Orientation (Patient) (0020,0037) missing or not 6 values"))?;
        let ipp: [f64; 3] = obj
            .f64s_of(tags::IMAGE_POSITION_PATIENT)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| format!("{sop}: Image Position (Patient) (0020,0032) missing or not 3 values"))?;
        let ps: [f64; 2] = obj
            .f64s_of(tags::PIXEL_SPACING)
            .and_then(|v| v.try_into().ok())
            .filter(|v: &[f64; 2]| v[0] > 0.0 && v[1] > 0.0)
            .ok_or_else(|| format!("{sop}: Pixel Spacing (0028,0030) missing or not positive"))?;
        match &shape {
            None => shape = Some((rows, cols, iop, ps)),
            Some((r, c, o, s)) => {
                if (*r, *c) != (rows, cols) {
                    return Err(format!("mixed matrix sizes: {r}x{c} and {rows}x{cols}"));
                }
                if o.iter().zip(iop).any(|(a, b)| (a - b).abs() > 1e-3) {
                    return Err("slices have different Image Orientation (Patient)".into());
                }
                if s.iter().zip(ps).any(|(a, b)| (a - b).abs() > 1e-3) {
                    return Err("slices have different Pixel Spacing".into());
                }
            }
        }
        let data = pixels(&obj, rows, cols).map_err(|e| format!("{sop}: {e}"))?;
        let normal = cross([iop[0], iop[1], iop[2]], [iop[3], iop[4], iop[5]]);
        let pos = ipp[0] * normal[0] + ipp[1] * normal[1] + ipp[2] * normal[2];
        obj.remove_element(tags::PIXEL_DATA);
        let sop_class = obj.str_of(tags::SOP_CLASS_UID).unwrap_or_default();
        items.push(Item { pos, data, slice: SourceSlice { sop_instance_uid: sop, sop_class_uid: sop_class, dataset: obj } });
    }
    items.sort_by(|a, b| a.pos.total_cmp(&b.pos));
    let (rows, cols, _, ps) = shape.expect("at least one slice");
    let dz = if items.len() > 1 {
        let mut gaps: Vec<f64> = items.windows(2).map(|w| w[1].pos - w[0].pos).collect();
        if let Some(i) = gaps.iter().position(|g| g.abs() < 1e-3) {
            return Err(format!("two slices at the same position ({:.2} mm)", items[i].pos));
        }
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        if let Some(i) = gaps.iter().position(|g| (g - median).abs() > 0.01 * median + 0.01) {
            return Err(format!(
                "uneven slice spacing: {:.3} mm between slices at {:.2} and {:.2} mm where the series uses {median:.3} mm (a missing slice?)",
                gaps[i], items[i].pos, items[i + 1].pos
            ));
        }
        gaps.clear();
        median
    } else {
        items[0].slice.dataset.f64_of(tags::SLICE_THICKNESS).unwrap_or(ps[0])
    };
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
