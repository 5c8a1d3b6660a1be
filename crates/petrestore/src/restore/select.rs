//! Selection rules (README.md "How it works"): a series outside them is Skipped with a
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
    /// The same assumptions as `key=value` (`frame_duration_s=30`,
    /// `units=BQML`): what the derived UIDs are salted with, so that they
    /// never depend on the wording of `assumed`.
    pub assumed_values: Vec<String>,
}

/// Why a series is not restored (it is Skipped, and forwarded unchanged
/// if configured). The message names the attribute and the setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotSelected {
    #[error("series has no instances")]
    Empty,
    #[error("Modality (0008,0060) is {0:?}, not PT")]
    NotPet(String),
    #[error(
        "{0} missing: cannot tell whether pixel values are activity concentrations; \
         if you know them, set restore.assume_units (or --units for `restore`)"
    )]
    UnitsMissing(&'static str),
    #[error("Units (0054,1001) is {units:?}; restore.units accepts {accepted:?}")]
    Units { units: String, accepted: Vec<String> },
    #[error(
        "{0} missing: the frame length decides whether and how to restore; \
         if you know it, set restore.assume_frame_duration_s (or --frame-duration for `restore`)"
    )]
    DurationMissing(&'static str),
    #[error("Actual Frame Duration is {secs:.1} s, outside restore.min/max_frame_duration_s [{min}, {max}] s")]
    Duration { secs: f64, min: f64, max: f64 },
    #[error(
        "Actual Frame Duration is {secs:.1} s, outside the {lo}–{hi} s the model was trained for: \
         its output there was never measured, so no engine restores it (the model's range, not restore.min/max_frame_duration_s)"
    )]
    ModelDuration { secs: f64, lo: f64, hi: f64 },
    #[error(
        "{0}: the images are not attenuation-corrected; the model was trained on corrected images only: \
         send the attenuation-corrected series to restore"
    )]
    NotAttenuationCorrected(String),
    #[error(
        "Pixel Spacing {mm:.2} mm is outside the {lo}–{hi} mm the model was trained on: its output there was never \
         measured, so no engine restores it"
    )]
    ModelPixel { mm: f64, lo: f64, hi: f64 },
    #[error(
        "the series has {slices} slice{}; the model reads {need} neighbouring slices for each one it restores \
         (io.context_slices) and its output on fewer was never measured, so no engine restores it",
        if *slices == 1 { "" } else { "s" }
    )]
    TooFewSlices { slices: usize, need: usize },
    #[error(
        "the series was made by petrestore ({0}): restoring a restored image (or an uncertainty series) again would \
         denoise it twice; a destination or router that sends derived series back to this node should not"
    )]
    AlreadyRestored(String),
    #[error(
        "{attr} could not be read as the series' Specific Character Set ({charset}) says (its bytes are not valid there, \
         or a multi-byte character holds a backslash byte): the derived series would carry other text than the source \
         (another patient name), so the series is not restored; the original is left as it is"
    )]
    TextNotInCharset { attr: String, charset: String },
    #[error("matrix {rows}x{cols} exceeds restore.max_matrix {max}")]
    Matrix { rows: usize, cols: usize, max: u32 },
    #[error("slices have different Actual Frame Durations ({0} and {1} ms)")]
    MixedDurations(f64, f64),
    #[error(
        "Radiopharmaceutical (0018,0031) and its code missing: cannot tell whether the model (trained for {0}) applies; \
         if you know the tracer, set restore.assume_tracer (or --tracer for `restore`)"
    )]
    TracerMissing(String),
    #[error(
        "tracer {found} is not one the model was trained for ({trained}): its uptake pattern was never seen in training and \
         restoring it could move SUVs or erase lesions"
    )]
    Tracer { found: String, trained: String },
}

/// Check the first slice (attributes are per series) against the rules.
pub fn check(slices: &[SourceSlice], rows: usize, cols: usize, s: &RestoreSettings) -> Result<Selected, NotSelected> {
    let first_slice = slices.first().ok_or(NotSelected::Empty)?;
    let first = &*first_slice.dataset;
    let modality = first.str_of(tags::MODALITY).unwrap_or_default();
    if modality != "PT" {
        return Err(NotSelected::NotPet(modality));
    }
    if let Some(what) = made_by_petrestore(first) {
        return Err(NotSelected::AlreadyRestored(what));
    }
    if let Some(attr) = slices.iter().find_map(|s| text_not_in_charset(&s.dataset)) {
        let charset = first.str_of(tags::SPECIFIC_CHARACTER_SET).unwrap_or_else(|| "ISO_IR 6, the default".into());
        return Err(NotSelected::TextNotInCharset { attr, charset });
    }
    if let Some(why) = not_attenuation_corrected(first_slice) {
        return Err(NotSelected::NotAttenuationCorrected(why));
    }
    let (mut assumed, mut assumed_values) = (Vec::new(), Vec::new());
    let multi = first_slice.frame.is_some();
    let units_attr = if multi { "Units (0054,1001) / Rescale Type (0028,1054) of Pixel Value Transformation" } else { "Units (0054,1001)" };
    let duration_attr =
        if multi { "Frame Acquisition Duration (0018,9220) of Frame Content (0020,9111)" } else { "Actual Frame Duration (0018,1242)" };
    let units = match (frames::units(first, first_slice.frame), &s.assume_units) {
        (Some(u), _) => u,
        (None, Some(u)) => {
            assumed.push(format!("{units_attr} missing: assumed {u} (operator setting)"));
            assumed_values.push(format!("units={u}"));
            u.clone()
        }
        (None, None) => return Err(NotSelected::UnitsMissing(units_attr)),
    };
    if !s.units.iter().any(|u| u == &units) {
        return Err(NotSelected::Units { units, accepted: s.units.clone() });
    }
    let ms = match (frames::frame_duration_ms(first, first_slice.frame), s.assume_frame_duration_s) {
        (Some(ms), _) => ms,
        (None, Some(secs)) => {
            assumed.push(format!("{duration_attr} missing: assumed {secs} s (operator setting); the output does not add it"));
            assumed_values.push(format!("frame_duration_s={secs}"));
            secs * 1000.0
        }
        (None, None) => return Err(NotSelected::DurationMissing(duration_attr)),
    };
    let secs = ms / 1000.0;
    if secs < s.min_frame_duration_s || secs > s.max_frame_duration_s {
        return Err(NotSelected::Duration { secs, min: s.min_frame_duration_s, max: s.max_frame_duration_s });
    }
    if rows as u32 > s.max_matrix || cols as u32 > s.max_matrix {
        return Err(NotSelected::Matrix { rows, cols, max: s.max_matrix });
    }
    if let Some(d) = slices.iter().find_map(|sl| {
        let v = frames::frame_duration_ms(&sl.dataset, sl.frame)?;
        ((v - ms).abs() > 0.5).then_some(v)
    }) {
        return Err(NotSelected::MixedDurations(ms, d));
    }
    Ok(Selected { frame_duration_s: secs, units, assumed, assumed_values })
}

/// Our own output, sent back (a routing rule, a destination that is this
/// node): every derived instance lists petrestore in its Contributing
/// Equipment Sequence (0018,A001), which it never removes. Returns the
/// Contribution Description it wrote.
fn made_by_petrestore(ds: &dicom_object::InMemDicomObject) -> Option<String> {
    let items = ds.get(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE)?.items()?;
    items.iter().find_map(|i| {
        (i.str_of(tags::MANUFACTURER).as_deref() == Some("petrestore"))
            .then(|| i.str_of(tags::CONTRIBUTION_DESCRIPTION).unwrap_or_else(|| "petrestore".into()))
    })
}

/// A name or identifier whose bytes the declared character set could not
/// decode. The reader splits PN, SH, LO and UC values at backslashes and
/// then decodes each value, writing a byte it cannot decode as a backslash
/// and three octal digits; a value that holds a backslash after that was
/// decoded that way. Re-encoded, it would become other text (two names
/// instead of one) in the derived series. Returns the attribute's tag.
fn text_not_in_charset(ds: &dicom_object::InMemDicomObject) -> Option<String> {
    use dicom_core::VR;
    use dicom_core::header::Header;
    use dicom_core::value::{PrimitiveValue, Value};
    ds.iter().find_map(|e| match e.value() {
        Value::Primitive(PrimitiveValue::Strs(v)) if matches!(e.vr(), VR::PN | VR::SH | VR::LO | VR::UC) => {
            v.iter().any(|s| s.contains('\\')).then(|| format!("({:04X},{:04X})", e.tag().group(), e.tag().element()))
        }
        Value::Sequence(s) => s.items().iter().find_map(text_not_in_charset),
        _ => None,
    })
}

/// What says a series is not attenuation-corrected (a NAC companion series,
/// which some consoles send with the same units): Corrected Image
/// (0028,0051) listing corrections without ATTN, or Enhanced PET's
/// Attenuation Corrected (0018,9759) NO. An empty or absent attribute says
/// nothing and is not held against the series.
fn not_attenuation_corrected(slice: &SourceSlice) -> Option<String> {
    let ds = &*slice.dataset;
    if let Some(v) = frames::classic(ds, slice.frame, |o| o.str_of(tags::CORRECTED_IMAGE))
        && !v.split('\\').any(|c| c.trim() == "ATTN")
    {
        return Some(format!("Corrected Image (0028,0051) is {v:?}, without ATTN"));
    }
    if ds.str_of(tags::ATTENUATION_CORRECTED).is_some_and(|v| v == "NO") {
        return Some("Attenuation Corrected (0018,9759) is NO".into());
    }
    None
}

/// Names and codes by which one tracer is recorded. Scanners write the
/// Radiopharmaceutical text their own way ("Fluorodeoxyglucose", "FDG --
/// fluorodeoxyglucose", "18F-FDG") or only a code.
struct Aliases {
    names: Vec<String>,
    codes: Vec<&'static str>,
}

/// Lower case, letters and digits only.
fn norm(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

fn aliases(tracer: &str) -> Aliases {
    let n = norm(tracer);
    if ["fluorodeoxyglucose", "fdg", "18ffdg", "f18fdg"].contains(&n.as_str()) {
        // SNOMED CT 35321007 "Fluorodeoxyglucose F^18^"; C-B1031 is its
        // retired SNOMED-RT code, still sent by older consoles.
        Aliases { names: vec!["fluorodeoxyglucose".into(), "fdg".into()], codes: vec!["35321007", "C-B1031"] }
    } else {
        Aliases { names: vec![n], codes: vec![] }
    }
}

/// What the series says its tracer is: Radiopharmaceutical (0018,0031) and
/// the Radiopharmaceutical Code Sequence (0054,0304) of the first
/// Radiopharmaceutical Information Sequence item.
fn recorded_tracer(first: &dicom_object::InMemDicomObject, frame: Option<usize>) -> (Option<String>, Option<(String, String)>) {
    let item = frames::classic(first, frame, |o| {
        o.get(tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE).and_then(|e| e.items()).and_then(|i| i.first())
    });
    let Some(item) = item else { return (None, None) };
    let code = item
        .get(tags::RADIOPHARMACEUTICAL_CODE_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|i| i.first())
        .and_then(|c| Some((c.str_of(tags::CODE_VALUE)?, c.str_of(tags::CODE_MEANING).unwrap_or_default())));
    (item.str_of(tags::RADIOPHARMACEUTICAL), code)
}

/// The tracer rule (README.md "How it works", selection rules): a model restores only the
/// tracers it was trained for. Returns what was assumed, or why the series
/// is skipped.
pub fn check_tracer(slices: &[SourceSlice], allowed: &[String], s: &RestoreSettings) -> Result<Vec<String>, NotSelected> {
    let first_slice = slices.first().ok_or(NotSelected::Empty)?;
    let (name, code) = recorded_tracer(&first_slice.dataset, first_slice.frame);
    let mut assumed = Vec::new();
    let (name, code) = match (name, code, &s.assume_tracer) {
        (None, None, Some(t)) => {
            assumed.push(format!("Radiopharmaceutical (0018,0031) missing: assumed {t} (operator setting)"));
            (Some(t.clone()), None)
        }
        (None, None, None) => return Err(NotSelected::TracerMissing(allowed.join(", "))),
        (n, c, _) => (n, c),
    };
    let matches = allowed.iter().any(|t| {
        let a = aliases(t);
        let by_name = |text: &str| {
            let n = norm(text);
            a.names.iter().any(|alias| !alias.is_empty() && n.contains(alias.as_str()))
        };
        name.as_deref().is_some_and(by_name)
            || code.as_ref().is_some_and(|(value, meaning)| a.codes.contains(&value.as_str()) || by_name(meaning))
    });
    if matches {
        return Ok(assumed);
    }
    let shown = match (&name, &code) {
        (Some(n), _) => format!("{n:?}"),
        (None, Some((v, m))) => format!("code {v} ({m})"),
        (None, None) => unreachable!("handled above"),
    };
    Err(NotSelected::Tracer { found: shown, trained: allowed.join(", ") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::InMemDicomObject;
    use std::sync::Arc;

    #[test]
    fn a_name_whose_bytes_the_declared_character_set_cannot_decode_is_found() {
        // a console that declares UTF-8 and writes Latin-1 (0xDC: Ü)
        let d = tempfile::tempdir().unwrap();
        let src = petsim::write_series(d.path(), &petsim::SeriesSpec { slices: 1, matrix: 8, ..Default::default() }).unwrap();
        let mut obj = crate::dicom::part10::open(&src.files[0]).unwrap().into_inner();
        obj.put(DataElement::new(tags::SPECIFIC_CHARACTER_SET, VR::CS, PrimitiveValue::from("ISO_IR 192")));
        obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("MXLLER^HANS")));
        let mut bytes = crate::dicom::part10::encode(obj).unwrap();
        let at = bytes.windows(6).position(|w| w == b"MXLLER").unwrap();
        bytes[at + 1] = 0xDC;
        let path = d.path().join("latin1.dcm");
        std::fs::write(&path, &bytes).unwrap();
        let read = crate::dicom::part10::open(&path).unwrap().into_inner();
        assert_eq!(text_not_in_charset(&read).as_deref(), Some("(0010,0010)"));
        // the same name in bytes of its character set, and a real second value
        let mut ok = crate::dicom::part10::open(&src.files[0]).unwrap().into_inner();
        ok.put(DataElement::new(tags::SPECIFIC_CHARACTER_SET, VR::CS, PrimitiveValue::from("ISO_IR 192")));
        ok.put(DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("M\u{dc}LLER^HANS")));
        ok.put(DataElement::new(
            tags::ADMITTING_DIAGNOSES_DESCRIPTION,
            VR::LO,
            PrimitiveValue::Strs(["A1".to_string(), "B2".to_string()].into()),
        ));
        let path = d.path().join("utf8.dcm");
        std::fs::write(&path, crate::dicom::part10::encode(ok).unwrap()).unwrap();
        assert_eq!(text_not_in_charset(&crate::dicom::part10::open(&path).unwrap().into_inner()), None);
    }

    fn slice_with(name: Option<&str>, code: Option<(&str, &str)>) -> Vec<SourceSlice> {
        let mut item = InMemDicomObject::new_empty();
        if let Some(n) = name {
            item.put(DataElement::new(tags::RADIOPHARMACEUTICAL, VR::LO, PrimitiveValue::from(n)));
        }
        if let Some((v, m)) = code {
            let c = InMemDicomObject::from_element_iter([
                DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from(v)),
                DataElement::new(tags::CODING_SCHEME_DESIGNATOR, VR::SH, PrimitiveValue::from("SCT")),
                DataElement::new(tags::CODE_MEANING, VR::LO, PrimitiveValue::from(m)),
            ]);
            item.put(DataElement::new(tags::RADIOPHARMACEUTICAL_CODE_SEQUENCE, VR::SQ, DataSetSequence::from(vec![c])));
        }
        let mut obj = InMemDicomObject::new_empty();
        if name.is_some() || code.is_some() {
            obj.put(DataElement::new(tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE, VR::SQ, DataSetSequence::from(vec![item])));
        }
        vec![SourceSlice { sop_instance_uid: "1.2".into(), sop_class_uid: "1.2".into(), frame: None, dataset: Arc::new(obj) }]
    }

    fn settings(assume: Option<&str>) -> RestoreSettings {
        let mut s = crate::config::Settings::defaults().restore;
        s.assume_tracer = assume.map(str::to_owned);
        s
    }

    #[test]
    fn a_series_that_is_not_attenuation_corrected_is_not_restored() {
        let slice = |corrected: Option<&[&str]>, flag: Option<&str>| {
            let mut obj = InMemDicomObject::new_empty();
            if let Some(c) = corrected {
                obj.put(DataElement::new(tags::CORRECTED_IMAGE, VR::CS, PrimitiveValue::Strs(c.iter().map(|s| s.to_string()).collect())));
            }
            if let Some(f) = flag {
                obj.put(DataElement::new(tags::ATTENUATION_CORRECTED, VR::CS, PrimitiveValue::from(f)));
            }
            SourceSlice { sop_instance_uid: "1.2".into(), sop_class_uid: "1.2".into(), frame: None, dataset: Arc::new(obj) }
        };
        let nac = not_attenuation_corrected(&slice(Some(&["DECY", "SCAT", "NORM"]), None)).expect("NAC refused");
        assert!(nac.contains("without ATTN"), "{nac}");
        assert!(not_attenuation_corrected(&slice(None, Some("NO"))).is_some());
        assert_eq!(not_attenuation_corrected(&slice(Some(&["DECY", "ATTN", "SCAT"]), None)), None);
        assert_eq!(not_attenuation_corrected(&slice(None, Some("YES"))), None);
        assert_eq!(not_attenuation_corrected(&slice(None, None)), None, "absent says nothing");
    }

    #[test]
    fn fdg_is_recognised_however_the_scanner_writes_it() {
        let fdg = ["Fluorodeoxyglucose".to_string()];
        for (name, code) in [
            (Some("Fluorodeoxyglucose"), None),
            (Some("FDG -- fluorodeoxyglucose"), None),
            (Some("18F-FDG"), None),
            (Some("F-18 FDG"), None),
            (None, Some(("35321007", "Fluorodeoxyglucose F^18^"))),
            (None, Some(("C-B1031", "Fluorodeoxyglucose F^18^"))),
        ] {
            assert_eq!(check_tracer(&slice_with(name, code), &fdg, &settings(None)), Ok(vec![]), "{name:?} {code:?}");
        }
    }

    #[test]
    fn other_tracers_are_refused_and_a_missing_one_is_explained() {
        let fdg = ["Fluorodeoxyglucose".to_string()];
        for (name, code) in [
            (Some("Ga-68 PSMA-11"), None),
            (Some("Fluciclovine"), None),
            (None, Some(("424024001", "Gallium (68-Ga) dotatate"))),
            (Some("FLT"), None),
        ] {
            let e = check_tracer(&slice_with(name, code), &fdg, &settings(None)).unwrap_err();
            assert!(matches!(e, NotSelected::Tracer { .. }), "{e:?}");
            assert!(e.to_string().contains("not one the model was trained for (Fluorodeoxyglucose)"), "{e}");
        }
        let e = check_tracer(&slice_with(None, None), &fdg, &settings(None)).unwrap_err().to_string();
        assert!(e.contains("Radiopharmaceutical (0018,0031)") && e.contains("restore.assume_tracer") && e.contains("--tracer"), "{e}");
        // The operator's assumption is checked like a recorded tracer and said.
        let ok = check_tracer(&slice_with(None, None), &fdg, &settings(Some("FDG"))).unwrap();
        assert!(ok[0].contains("assumed FDG"), "{ok:?}");
        assert!(check_tracer(&slice_with(None, None), &fdg, &settings(Some("PSMA"))).is_err());
        // A recorded tracer wins over the assumption.
        assert!(check_tracer(&slice_with(Some("PSMA"), None), &fdg, &settings(Some("FDG"))).is_err());
    }
}
