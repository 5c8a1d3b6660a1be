//! Selection rules (DESIGN "DICOM"): a series outside them is Skipped with a
//! reason naming the attribute, and forwarded unchanged if configured.

use dicom_dictionary_std::tags;

use super::SourceSlice;
use crate::config::RestoreSettings;
use crate::dicom::attrs::Attrs;
use crate::dicom::frames;

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
    let first_slice = slices.first().ok_or("series has no instances")?;
    let first = &*first_slice.dataset;
    let modality = first.str_of(tags::MODALITY).unwrap_or_default();
    if modality != "PT" {
        return Err(format!("Modality (0008,0060) is {modality:?}, not PT"));
    }
    let mut assumed = Vec::new();
    let multi = first_slice.frame.is_some();
    let units_attr = if multi { "Units (0054,1001) / Rescale Type (0028,1054) of Pixel Value Transformation" } else { "Units (0054,1001)" };
    let duration_attr =
        if multi { "Frame Acquisition Duration (0018,9220) of Frame Content (0020,9111)" } else { "Actual Frame Duration (0018,1242)" };
    let units = match (frames::units(first, first_slice.frame), &s.assume_units) {
        (Some(u), _) => u,
        (None, Some(u)) => {
            assumed.push(format!("{units_attr} missing: assumed {u} (operator setting)"));
            u.clone()
        }
        (None, None) => {
            return Err(format!(
                "{units_attr} missing: cannot tell whether pixel values are activity concentrations; \
                 if you know them, set restore.assume_units (or --units for `restore`)"
            ));
        }
    };
    if !s.units.iter().any(|u| u == &units) {
        return Err(format!("Units (0054,1001) is {units:?}; restore.units accepts {:?}", s.units));
    }
    let ms = match (frames::frame_duration_ms(first, first_slice.frame), s.assume_frame_duration_s) {
        (Some(ms), _) => ms,
        (None, Some(secs)) => {
            assumed.push(format!("{duration_attr} missing: assumed {secs} s (operator setting); the output does not add it"));
            secs * 1000.0
        }
        (None, None) => {
            return Err(format!(
                "{duration_attr} missing: the frame length decides whether and how to restore; \
                 if you know it, set restore.assume_frame_duration_s (or --frame-duration for `restore`)"
            ));
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
        let v = frames::frame_duration_ms(&sl.dataset, sl.frame)?;
        ((v - ms).abs() > 0.5).then_some(v)
    }) {
        return Err(format!("slices have different Actual Frame Durations ({ms} and {d} ms)"));
    }
    Ok(Selected { frame_duration_s: secs, units, assumed })
}
