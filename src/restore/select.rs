//! Selection rules (DESIGN "DICOM"): a series outside them is Skipped with a
//! reason naming the attribute, and forwarded unchanged if configured.

use dicom_dictionary_std::tags;

use super::SourceSlice;
use crate::config::RestoreSettings;
use crate::dicom::attrs::Attrs;

/// Frame duration and units of a series that passed the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Selected {
    pub frame_duration_s: f64,
    pub units: String,
    /// What was assumed because the series lacks it (operator-supplied).
    pub assumed: Vec<String>,
}

/// Check the first slice (attributes are per series) against the rules.
pub fn check(slices: &[SourceSlice], rows: usize, cols: usize, s: &RestoreSettings) -> Result<Selected, String> {
    let first = &slices.first().ok_or("series has no instances")?.dataset;
    let modality = first.str_of(tags::MODALITY).unwrap_or_default();
    if modality != "PT" {
        return Err(format!("Modality (0008,0060) is {modality:?}, not PT"));
    }
    let mut assumed = Vec::new();
    let units = match (first.str_of(tags::UNITS), &s.assume_units) {
        (Some(u), _) => u,
        (None, Some(u)) => {
            assumed.push(format!("Units (0054,1001) missing: assumed {u} (operator setting)"));
            u.clone()
        }
        (None, None) => {
            return Err("Units (0054,1001) missing: cannot tell whether pixel values are activity concentrations; \
                        if you know them, set restore.assume_units (or --units for `restore`)"
                .into());
        }
    };
    if !s.units.iter().any(|u| u == &units) {
        return Err(format!("Units (0054,1001) is {units:?}; restore.units accepts {:?}", s.units));
    }
    let ms = match (first.f64_of(tags::ACTUAL_FRAME_DURATION), s.assume_frame_duration_s) {
        (Some(ms), _) => ms,
        (None, Some(secs)) => {
            assumed.push(format!("Actual Frame Duration (0018,1242) missing: assumed {secs} s (operator setting); the output does not add it"));
            secs * 1000.0
        }
        (None, None) => {
            return Err("Actual Frame Duration (0018,1242) missing: the frame length decides whether and how to restore; \
                        if you know it, set restore.assume_frame_duration_s (or --frame-duration for `restore`)"
                .into());
        }
    };
    let secs = ms / 1000.0;
    if secs < s.min_frame_duration_s || secs > s.max_frame_duration_s {
        return Err(format!(
            "Actual Frame Duration is {secs:.1} s, outside restore.min/max_frame_duration_s [{}, {}] s",
            s.min_frame_duration_s, s.max_frame_duration_s
        ));
    }
    if rows as u32 > s.max_matrix || cols as u32 > s.max_matrix {
        return Err(format!("matrix {rows}x{cols} exceeds restore.max_matrix {}", s.max_matrix));
    }
    if let Some(d) = slices.iter().find_map(|sl| {
        let v = sl.dataset.f64_of(tags::ACTUAL_FRAME_DURATION)?;
        ((v - ms).abs() > 0.5).then_some(v)
    }) {
        return Err(format!("slices have different Actual Frame Durations ({ms} and {d} ms)"));
    }
    Ok(Selected { frame_duration_s: secs, units, assumed })
}
