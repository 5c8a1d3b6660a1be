//! Derive: the restored volume becomes a new DICOM series, labelled as
//! derived (PS3.3 C.7.6.1, C.8.9.4): new deterministic UIDs, `DERIVED\PRIMARY`,
//! Derivation Description, Source Image Sequence, Contributing Equipment
//! Sequence, a description suffix and a new Series Number. Timing and
//! quantitation attributes are copied unchanged: a 30 s frame stays a 30 s
//! frame, so SUV software computes the same SUV on source and output.

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::dicom::attrs::Attrs;
use crate::dicom::uid::derived_uid;
use crate::restore::{SourceSlice, Volume};

/// What the derived series says about how it was made.
#[derive(Debug, Clone)]
pub struct DeriveParams {
    pub engine: String,
    /// A warning that must travel with the images (test model).
    pub notice: Option<String>,
    pub model_id: String,
    pub series_description_suffix: String,
    pub series_number_offset: u32,
    pub device_id: String,
}

/// A derived instance, ready to encode.
pub struct DerivedInstance {
    pub sop_instance_uid: String,
    pub dataset: InMemDicomObject,
}

/// Format a DS value in at most 16 characters.
pub fn ds(v: f64) -> String {
    let plain = format!("{v}");
    if plain.len() <= 16 { plain } else { format!("{v:.9E}") }
}

/// Rescale slope for one output slice: the largest magnitude maps to 32766,
/// so nothing clips; the slope is what the DS string says (parsed back), so
/// stored value × slope reproduces the restored value to rounding.
pub fn slice_slope(values: &[f32]) -> (String, f64) {
    let max = values.iter().fold(0.0f64, |m, v| m.max((*v as f64).abs()));
    let s = if max > 0.0 { ds(max / 32766.0) } else { "1".to_string() };
    let parsed: f64 = s.parse().expect("ds() output parses");
    (s, parsed)
}

fn el(tag: dicom_core::Tag, vr: VR, v: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, v.into())
}

fn seq(tag: dicom_core::Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::CODE_VALUE, VR::SH, value),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        el(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Build the derived series from the source slices (volume order) and the
/// restored volume.
pub fn derive_series(slices: &[SourceSlice], restored: &Volume, p: &DeriveParams) -> Vec<DerivedInstance> {
    let now = chrono_like_now();
    let mut out = Vec::with_capacity(slices.len());
    for (z, src) in slices.iter().enumerate() {
        let mut obj = src.dataset.clone();
        let src_series = obj.str_of(tags::SERIES_INSTANCE_UID).unwrap_or_default();
        let sop = derived_uid(&src.sop_instance_uid, &p.model_id);
        obj.put(el(tags::SOP_INSTANCE_UID, VR::UI, sop.as_str()));
        obj.put(el(tags::SERIES_INSTANCE_UID, VR::UI, derived_uid(&src_series, &p.model_id)));

        let mut image_type: Vec<String> = obj
            .element_opt(tags::IMAGE_TYPE)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok().map(|s| s.split('\\').map(|x| x.trim().to_string()).collect()))
            .unwrap_or_default();
        if image_type.len() < 2 {
            image_type.resize(2, String::new());
        }
        image_type[0] = "DERIVED".into();
        image_type[1] = "PRIMARY".into();
        obj.put(el(tags::IMAGE_TYPE, VR::CS, PrimitiveValue::Strs(image_type.into_iter().collect())));

        let desc = format!(
            "{}Restored by petrestore {} on {}: engine {}, model {}. Denoised only; Actual Frame Duration and quantitation attributes unchanged.",
            p.notice.as_ref().map(|n| format!("{n} ")).unwrap_or_default(),
            env!("CARGO_PKG_VERSION"),
            p.device_id,
            p.engine,
            p.model_id
        );
        obj.put(el(tags::DERIVATION_DESCRIPTION, VR::ST, truncate(&desc, 1024)));
        obj.put(seq(
            tags::SOURCE_IMAGE_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, src.sop_class_uid.as_str()),
                el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, src.sop_instance_uid.as_str()),
                seq(
                    tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                    vec![code("121322", "DCM", "Source image for image processing operation")],
                ),
            ])],
        ));
        let mut equipment: Vec<InMemDicomObject> = obj
            .element_opt(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE)
            .ok()
            .flatten()
            .and_then(|e| e.items().map(|i| i.to_vec()))
            .unwrap_or_default();
        equipment.push(InMemDicomObject::from_element_iter([
            el(tags::MANUFACTURER, VR::LO, "petrestore"),
            el(tags::MANUFACTURER_MODEL_NAME, VR::LO, "petrestore"),
            el(tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION")),
            el(tags::DEVICE_SERIAL_NUMBER, VR::LO, truncate(&p.device_id, 64)),
            el(tags::CONTRIBUTION_DATE_TIME, VR::DT, now.as_str()),
            el(tags::CONTRIBUTION_DESCRIPTION, VR::ST, truncate(&format!("PET denoising ({}, {})", p.engine, p.model_id), 1024)),
            seq(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, vec![code("109103", "DCM", "Modifying Equipment")]),
        ]));
        obj.put(seq(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE, equipment));

        let sd = obj.str_of(tags::SERIES_DESCRIPTION).unwrap_or_else(|| "PET".into());
        let keep = 64usize.saturating_sub(p.series_description_suffix.chars().count());
        obj.put(el(tags::SERIES_DESCRIPTION, VR::LO, format!("{}{}", truncate(&sd, keep), p.series_description_suffix)));
        let sn = obj.i64_of(tags::SERIES_NUMBER).unwrap_or(0);
        obj.put(el(tags::SERIES_NUMBER, VR::IS, ((sn + p.series_number_offset as i64) % 100_000).to_string()));

        // Pixels: signed 16 bit, per-slice slope chosen to use the range
        // without clipping, intercept 0.
        let values = restored.slice(z);
        let (slope_s, slope) = slice_slope(values);
        let mut bytes = Vec::with_capacity(values.len() * 2);
        for v in values {
            let q = (*v as f64 / slope).round().clamp(-32768.0, 32767.0) as i16;
            bytes.extend_from_slice(&q.to_le_bytes());
        }
        obj.put(el(tags::RESCALE_SLOPE, VR::DS, slope_s));
        obj.put(el(tags::RESCALE_INTERCEPT, VR::DS, "0"));
        obj.put(el(tags::BITS_ALLOCATED, VR::US, 16u16));
        obj.put(el(tags::BITS_STORED, VR::US, 16u16));
        obj.put(el(tags::HIGH_BIT, VR::US, 15u16));
        obj.put(el(tags::PIXEL_REPRESENTATION, VR::US, 1u16));
        obj.remove_element(tags::SMALLEST_IMAGE_PIXEL_VALUE);
        obj.remove_element(tags::LARGEST_IMAGE_PIXEL_VALUE);
        obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(bytes)));
        out.push(DerivedInstance { sop_instance_uid: sop, dataset: obj });
    }
    out
}

/// Current UTC date-time as a DICOM DT (no external time crate needed).
fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}+0000", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ds_fits_16_chars_and_round_trips() {
        for v in [1.0, 0.123456789012345, 12345.678901234, 1e-9, 3.0e7 / 32766.0] {
            let s = ds(v);
            assert!(s.len() <= 16, "{s}");
            let back: f64 = s.parse().unwrap();
            assert!((back - v).abs() <= 1e-8 * v.abs(), "{v} -> {s}");
        }
    }

    #[test]
    fn slope_never_clips() {
        let vals = [-5.0f32, 0.0, 123456.7, 99.0];
        let (_, slope) = slice_slope(&vals);
        for v in vals {
            let q = (v as f64 / slope).round();
            assert!((-32768.0..=32767.0).contains(&q));
            assert!((q * slope - v as f64).abs() <= slope / 2.0 + 1e-6);
        }
        assert_eq!(slice_slope(&[0.0, 0.0]).1, 1.0);
    }

    #[test]
    fn date_time_is_plausible() {
        let s = chrono_like_now();
        assert_eq!(s.len(), 19, "{s}");
        assert!(s.starts_with("20"));
    }
}
