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
    /// Made by a test or research model (not validated for clinical use):
    /// an Enhanced PET output says so in Content Qualification.
    pub research: bool,
    pub model_id: String,
    /// What else the pixels depend on ([`inputs_id`]): the engine that ran
    /// and, for a series not known complete (processed without all its
    /// slices, or without Number of Slices to tell), the set of source
    /// instances. Salts every derived UID.
    pub inputs_id: String,
    /// Identity of the σ calibration in use (the package's `[uncertainty]`
    /// and a site's factor, `Calibration::id`): it changes the σ pixels
    /// without changing the model, so it salts the uncertainty series' UIDs.
    pub uncertainty_id: Option<String>,
    pub series_description_suffix: String,
    pub series_number_offset: u32,
    pub device_id: String,
}

/// A derived instance, ready to encode.
pub struct DerivedInstance {
    pub sop_instance_uid: String,
    pub dataset: InMemDicomObject,
}

pub use crate::dicom::ds;

/// Which derived series: the restored image, or its uncertainty (per voxel,
/// 1 SD of PET90 − R; Image Type `DERIVED\PRIMARY\UNCERTAINTY`, not for
/// diagnosis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Restored,
    Uncertainty,
}

/// Identity of what a restoration read besides the model: the engine that
/// ran (providers and precisions give different pixels: TensorRT's fp16,
/// or tract after a fallback) and, for a series processed without all its
/// slices (`partial`: the source instances read), which instances (the
/// normalisation and the slice context are volume-wide, so the complete
/// series restored later differs in every slice and must not reuse the
/// partial one's UIDs), and what was assumed for attributes the series
/// lacks (`assumed`: the operator's settings as `key=value`, e.g.
/// `frame_duration_s=30`; a frame duration conditions the network and σ,
/// so correcting it and restoring again gives other pixels, and must give
/// other UIDs). A
/// complete series with nothing assumed is salted by the engine alone,
/// whatever order its instances came in. Hex, 16 digits.
pub fn inputs_id<S: AsRef<str>>(engine: &str, partial: Option<&[S]>, assumed: &[String]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(engine.as_bytes());
    for a in assumed {
        h.update(b"\0assumed\0");
        h.update(a.as_bytes());
    }
    if let Some(sops) = partial {
        let mut sops: Vec<&str> = sops.iter().map(AsRef::as_ref).collect();
        sops.sort_unstable();
        sops.dedup();
        h.update(b"\0partial");
        for s in sops {
            h.update([0u8]);
            h.update(s.as_bytes());
        }
    }
    h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Salt of the restored series' UIDs for a model and an [`inputs_id`].
pub fn restored_salt(model_id: &str, inputs_id: &str) -> String {
    format!("{model_id}|{inputs_id}")
}

/// Salt of a derived series' UIDs: the model id and what else the pixels
/// depend on ([`inputs_id`]), and for the uncertainty series also the σ
/// calibration's identity, so different pixels never share a UID while the
/// same restoration done again (a retry, a restart) gives the same UIDs.
fn uid_salt(kind: Kind, p: &DeriveParams) -> String {
    let base = restored_salt(&p.model_id, &p.inputs_id);
    match (kind, &p.uncertainty_id) {
        (Kind::Restored, _) => base,
        (Kind::Uncertainty, None) => format!("{base}/uncertainty-1sd"),
        (Kind::Uncertainty, Some(cal)) => format!("{base}/uncertainty-1sd/{cal}"),
    }
}

/// Series Instance UID of the restored series of `source_series`.
pub fn restored_series_uid(source_series: &str, p: &DeriveParams) -> String {
    derived_uid(source_series, &uid_salt(Kind::Restored, p))
}

/// Series Instance UID of the uncertainty series of `source_series`.
pub fn uncertainty_series_uid(source_series: &str, p: &DeriveParams) -> String {
    derived_uid(source_series, &uid_salt(Kind::Uncertainty, p))
}

/// Series Description suffix of the uncertainty series: what it is, and
/// that it is not for diagnosis, where a reader sees it in a series list.
pub const UNCERTAINTY_SUFFIX: &str = " uncertainty 1SD NOT FOR DX";

/// Image Comments of every uncertainty instance (shown beside the image by
/// most viewers).
const UNCERTAINTY_COMMENT: &str = "NOT FOR DIAGNOSIS. Uncertainty (1 SD) of a restored PET image, in Bq/ml: not an activity image.";

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
/// restored volume: one derived instance per source instance (a
/// multi-frame source gives a multi-frame output with its frames in the
/// source's frame order).
pub fn derive_series(slices: &[SourceSlice], restored: &Volume, p: &DeriveParams) -> Vec<DerivedInstance> {
    derive(slices, restored, p, Kind::Restored)
}

/// The uncertainty series of a restored series: one instance per source
/// instance, like [`derive_series`], holding σ (Bq/ml) with its own
/// deterministic UIDs, Image Type `DERIVED\PRIMARY\UNCERTAINTY`, a Derivation Description that
/// says what it is and that it is not for diagnosis, and Source Image
/// references to both the source and the restored instance.
pub fn derive_uncertainty(slices: &[SourceSlice], sigma: &Volume, p: &DeriveParams) -> Vec<DerivedInstance> {
    derive(slices, sigma, p, Kind::Uncertainty)
}

fn derive(slices: &[SourceSlice], restored: &Volume, p: &DeriveParams, kind: Kind) -> Vec<DerivedInstance> {
    let now = chrono_like_now();
    if slices.iter().all(|s| s.frame.is_none()) {
        let mut out: Vec<DerivedInstance> =
            slices.iter().enumerate().map(|(z, src)| derive_single(src, restored.slice(z), p, &now, kind)).collect();
        renumber_partial(slices, &mut out);
        return out;
    }
    // Multi-frame: the volume slices of each instance, by frame number.
    let mut order: Vec<&str> = Vec::new();
    let mut frames: std::collections::HashMap<&str, Vec<(usize, usize)>> = std::collections::HashMap::new();
    for (z, s) in slices.iter().enumerate() {
        let e = frames.entry(s.sop_instance_uid.as_str()).or_insert_with(|| {
            order.push(s.sop_instance_uid.as_str());
            Vec::new()
        });
        e.push((s.frame.unwrap_or(0), z));
    }
    order
        .into_iter()
        .map(|sop| {
            let mut f = frames.remove(sop).expect("recorded above");
            f.sort_unstable();
            let src = &slices[f[0].1];
            let values: Vec<&[f32]> = f.iter().map(|(_, z)| restored.slice(*z)).collect();
            derive_multiframe(src, &values, p, &now, kind)
        })
        .collect()
}

/// What every derived instance gets: new UIDs, `DERIVED\PRIMARY`, our
/// Contributing Equipment item, description suffix and series number.
/// Returns the new SOP Instance UID.
fn relabel(obj: &mut InMemDicomObject, src_sop: &str, p: &DeriveParams, now: &str, kind: Kind) -> String {
    let src_series = obj.str_of(tags::SERIES_INSTANCE_UID).unwrap_or_default();
    let salt = uid_salt(kind, p);
    let sop = derived_uid(src_sop, &salt);
    obj.put(el(tags::SOP_INSTANCE_UID, VR::UI, sop.as_str()));
    obj.put(el(tags::SERIES_INSTANCE_UID, VR::UI, derived_uid(&src_series, &salt)));
    let enhanced = obj.get(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).is_some();
    set_derived(obj, tags::IMAGE_TYPE, kind, enhanced);

    let mut equipment: Vec<InMemDicomObject> =
        obj.get(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE).and_then(|e| e.items().map(|i| i.to_vec())).unwrap_or_default();
    equipment.push(InMemDicomObject::from_element_iter([
        el(tags::MANUFACTURER, VR::LO, "petrestore"),
        el(tags::MANUFACTURER_MODEL_NAME, VR::LO, "petrestore"),
        el(tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION")),
        el(tags::DEVICE_SERIAL_NUMBER, VR::LO, truncate(&p.device_id, 64)),
        el(tags::CONTRIBUTION_DATE_TIME, VR::DT, now),
        el(tags::CONTRIBUTION_DESCRIPTION, VR::ST, truncate(&format!("PET denoising ({}, {})", p.engine, p.model_id), 1024)),
        seq(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, vec![code("109103", "DCM", "Modifying Equipment")]),
    ]));
    obj.put(seq(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE, equipment));

    let sd = obj.str_of(tags::SERIES_DESCRIPTION).unwrap_or_else(|| "PET".into());
    let suffix = match kind {
        Kind::Restored => p.series_description_suffix.clone(),
        Kind::Uncertainty => format!("{}{UNCERTAINTY_SUFFIX}", p.series_description_suffix),
    };
    let keep = 64usize.saturating_sub(suffix.chars().count());
    // Under ISO 2022 code extensions (Japanese, Korean sites) the text
    // switches character sets with escape sequences; cut anywhere, it can
    // lose the switch back to ASCII, and the suffix (the uncertainty
    // series' NOT FOR DX among it) would read as other characters. Such a
    // description that does not fit whole gives way.
    let sd = if sd.chars().count() > keep && sd.contains('\u{1b}') { "PET".to_string() } else { sd };
    obj.put(el(tags::SERIES_DESCRIPTION, VR::LO, format!("{}{suffix}", truncate(&sd, keep))));
    let sn = obj.i64_of(tags::SERIES_NUMBER).unwrap_or(0);
    // the uncertainty series at twice the offset: at offset + 1 it would
    // take the number of the next source series' restored series
    let offset = p.series_number_offset as i64 * if kind == Kind::Uncertainty { 2 } else { 1 };
    obj.put(el(tags::SERIES_NUMBER, VR::IS, ((sn + offset) % 100_000).to_string()));

    // A concatenation of the source becomes the same concatenation of
    // derived instances, never a part of the source's.
    for tag in [tags::CONCATENATION_UID, tags::SOP_INSTANCE_UID_OF_CONCATENATION_SOURCE] {
        if let Some(uid) = obj.str_of(tag) {
            obj.put(el(tag, VR::UI, derived_uid(&uid, &salt)));
        }
    }
    remove_stale(obj, kind);
    match kind {
        Kind::Uncertainty => {
            obj.put(el(tags::IMAGE_COMMENTS, VR::LT, UNCERTAINTY_COMMENT));
            // added to the schemes the source declares (its copied code
            // sequences may use them)
            let mut schemes = fg_items(obj, tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE);
            if !schemes.iter().any(|i| i.str_of(tags::CODING_SCHEME_DESIGNATOR).as_deref() == Some(LOCAL_SCHEME)) {
                schemes.push(InMemDicomObject::from_element_iter([
                    el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, LOCAL_SCHEME),
                    el(tags::CODING_SCHEME_NAME, VR::ST, "petrestore local codes"),
                    el(tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION, VR::ST, "petrestore"),
                ]));
            }
            obj.put(seq(tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE, schemes));
        }
        // a test or research model's notice goes first; the source's own
        // comment (about the acquisition) still holds and follows it
        Kind::Restored => {
            if let Some(n) = &p.notice {
                let text = match obj.str_of(tags::IMAGE_COMMENTS) {
                    Some(c) => format!("{n} {c}"),
                    None => n.clone(),
                };
                obj.put(el(tags::IMAGE_COMMENTS, VR::LT, truncate(&text, 10240)));
            }
        }
    }
    sop
}

/// Coding scheme of the uncertainty series' derivation code (no DCM code
/// says "uncertainty of a restoration").
const LOCAL_SCHEME: &str = "99PETRST";

/// Remove Group Length elements (gggg,0000), at every depth: retired
/// outside the command set (PS3.5 7.2), they would state the source's
/// lengths for groups the derived instance changes (new UIDs, derivation
/// elements, 16-bit pixels), and a reader that trusts them misparses it.
/// Returns whether any was found.
fn remove_group_lengths(obj: &mut InMemDicomObject) -> bool {
    let lengths: Vec<dicom_core::Tag> = obj.iter().map(|e| e.header().tag).filter(|t| t.element() == 0).collect();
    let mut found = !lengths.is_empty();
    for t in lengths {
        obj.remove_element(t);
    }
    let sequences: Vec<dicom_core::Tag> = obj.iter().filter(|e| e.items().is_some()).map(|e| e.header().tag).collect();
    for t in sequences {
        let mut items = fg_items(obj, t);
        if items.iter_mut().fold(false, |any, item| remove_group_lengths(item) | any) {
            obj.put(seq(t, items));
            found = true;
        }
    }
    found
}

/// Attributes of the source that the new pixel values make wrong, in the
/// data set, in every functional group and in the Legacy Converted
/// "unassigned" groups:
/// - stored-value ranges and padding (the output is signed, on its own
///   slope per slice);
/// - Real World Value Mapping: its slope maps the source's stored values
///   (a viewer reading SUV or Bq/ml from it would be off by the ratio of
///   the slopes, slice by slice); the output's units are Rescale Slope and
///   Units, as the source's were;
/// - Conversion Source Attributes: it says "converted from these classic
///   instances", which a derived image is not;
/// - Instance Creation Date/Time: the source's, not this instance's (left
///   out: optional, and better absent than wrong);
/// - the Icon Image Sequence (a thumbnail of the source's pixels) and
///   every Group Length ([`remove_group_lengths`]);
/// - for the uncertainty series also the source's window (an activity
///   window on a σ image).
fn remove_stale(obj: &mut InMemDicomObject, kind: Kind) {
    const EVERYWHERE: [dicom_core::Tag; 6] = [
        tags::SMALLEST_PIXEL_VALUE_IN_SERIES,
        tags::LARGEST_PIXEL_VALUE_IN_SERIES,
        tags::SMALLEST_IMAGE_PIXEL_VALUE,
        tags::LARGEST_IMAGE_PIXEL_VALUE,
        tags::PIXEL_PADDING_VALUE,
        tags::PIXEL_PADDING_RANGE_LIMIT,
    ];
    const WINDOW: [dicom_core::Tag; 4] =
        [tags::WINDOW_CENTER, tags::WINDOW_WIDTH, tags::WINDOW_CENTER_WIDTH_EXPLANATION, tags::VOILUT_FUNCTION];
    // Real World Value Mapping and, for σ, the window are rebuilt for the
    // new pixels by derive_single / derive_multiframe (in an Enhanced PET
    // image both functional groups are mandatory); here they only go from
    // the Legacy Converted "unassigned" groups
    let strip = |o: &mut InMemDicomObject, unassigned: bool| {
        for t in EVERYWHERE.iter().chain(std::iter::once(&tags::CONVERSION_SOURCE_ATTRIBUTES_SEQUENCE)) {
            o.remove_element(*t);
        }
        if unassigned {
            o.remove_element(tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE);
        }
        if kind == Kind::Uncertainty {
            for t in WINDOW {
                o.remove_element(t);
            }
            if unassigned {
                o.remove_element(tags::FRAME_VOILUT_SEQUENCE);
            }
        }
    };
    strip(obj, false);
    obj.remove_element(tags::INSTANCE_CREATION_DATE);
    obj.remove_element(tags::INSTANCE_CREATION_TIME);
    // a thumbnail of the source's pixels (PS3.3 C.7.6.1.1.6): of the noisy
    // frame, and in the uncertainty series an activity image
    obj.remove_element(tags::ICON_IMAGE_SEQUENCE);
    remove_group_lengths(obj);
    for fg_tag in [tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE] {
        let Some(mut items) = obj.get(fg_tag).and_then(|e| e.items().map(|i| i.to_vec())) else { continue };
        for item in items.iter_mut() {
            strip(item, false);
            for unassigned in
                [tags::UNASSIGNED_SHARED_CONVERTED_ATTRIBUTES_SEQUENCE, tags::UNASSIGNED_PER_FRAME_CONVERTED_ATTRIBUTES_SEQUENCE]
            {
                if let Some(mut inner) = item.get(unassigned).and_then(|e| e.items().map(|i| i.to_vec())) {
                    inner.iter_mut().for_each(|i| strip(i, true));
                    item.put(seq(unassigned, inner));
                }
            }
        }
        obj.put(seq(fg_tag, items));
    }
}

/// Image Type or Frame Type: value 1 `DERIVED`, value 2 `PRIMARY`; for the
/// uncertainty series value 3 `UNCERTAINTY`, or on an `enhanced` (multi-
/// frame) object, whose value 3 is the Image Flavor and value 4 the Derived
/// Pixel Contrast (PS3.3 C.8.16.1), value 4 `STD_DEVIATION`; the others kept.
fn set_derived(obj: &mut InMemDicomObject, tag: dicom_core::Tag, kind: Kind, enhanced: bool) {
    let mut values: Vec<String> =
        obj.get(tag).and_then(|e| e.to_str().ok().map(|s| s.split('\\').map(|x| x.trim().to_string()).collect())).unwrap_or_default();
    if values.len() < 2 {
        values.resize(2, String::new());
    }
    // Value 2 of a PET image is PRIMARY by the IOD (PS3.3 C.8.9.4.1.1), for
    // the uncertainty series too; its value 3 says what it is.
    values[0] = "DERIVED".into();
    values[1] = "PRIMARY".into();
    if kind == Kind::Uncertainty {
        if enhanced {
            // Image Flavor (STATIC, WHOLE_BODY, ...) still holds
            if values.len() < 4 {
                values.resize(4, String::new());
            }
            values[3] = "STD_DEVIATION".into();
        } else {
            values.resize(3, String::new());
            values[2] = "UNCERTAINTY".into();
        }
    }
    obj.put(el(tag, VR::CS, PrimitiveValue::Strs(values.into_iter().collect())));
}

fn derivation_description(p: &DeriveParams, kind: Kind) -> String {
    if kind == Kind::Uncertainty {
        let desc = format!(
            "NOT FOR DIAGNOSIS. Uncertainty of the series restored by petrestore {} on {} (engine {}, model {}{}): per voxel, the \
             predicted standard deviation (1 SD, in the image's units) of the difference between the restored image and a \
             standard 90 s acquisition of the same bed; calibrated on simulated data. Not an activity image.{}",
            env!("CARGO_PKG_VERSION"),
            p.device_id,
            p.engine,
            p.model_id,
            p.uncertainty_id.as_ref().map(|c| format!(", sigma calibration {c}")).unwrap_or_default(),
            p.notice.as_ref().map(|n| format!(" {n}")).unwrap_or_default(),
        );
        return truncate(&desc, 1024);
    }
    let desc = format!(
        "{}Restored by petrestore {} on {}: engine {}, model {}. Denoised only; frame duration and quantitation attributes unchanged.",
        p.notice.as_ref().map(|n| format!("{n} ")).unwrap_or_default(),
        env!("CARGO_PKG_VERSION"),
        p.device_id,
        p.engine,
        p.model_id
    );
    truncate(&desc, 1024)
}

/// What was done to the pixels (Derivation Code Sequence, CID 7203).
fn derivation_code(kind: Kind) -> InMemDicomObject {
    match kind {
        Kind::Restored => code("113087", "DCM", "Smoothing"),
        Kind::Uncertainty => code("SD1", LOCAL_SCHEME, "Standard deviation of restoration error"),
    }
}

/// A series processed without all its slices (`series.incomplete_policy
/// = "process"`): the derived series says how many it has (Number of
/// Slices) and numbers them 1..n in the source's Image Index order, so a
/// receiver checking completeness by index does not wait for slices that
/// will never come.
fn renumber_partial(slices: &[SourceSlice], out: &mut [DerivedInstance]) {
    let Ok(n) = u16::try_from(slices.len()) else { return };
    let declared = slices.first().and_then(|s| s.dataset.i64_of(tags::NUMBER_OF_SLICES));
    if declared.is_none_or(|d| d == i64::from(n)) {
        return;
    }
    let mut by_index: Vec<(i64, usize)> =
        slices.iter().enumerate().filter_map(|(z, s)| Some((s.dataset.i64_of(tags::IMAGE_INDEX)?, z))).collect();
    // without an index on every slice the two cannot agree: both are left
    if by_index.len() != slices.len() {
        return;
    }
    by_index.sort_unstable();
    for (rank, (_, z)) in by_index.iter().enumerate() {
        out[*z].dataset.put(el(tags::IMAGE_INDEX, VR::US, PrimitiveValue::from(rank as u16 + 1)));
    }
    for o in out.iter_mut() {
        o.dataset.put(el(tags::NUMBER_OF_SLICES, VR::US, PrimitiveValue::from(n)));
    }
}

fn source_image_item(src: &SourceSlice) -> InMemDicomObject {
    reference_item(&src.sop_class_uid, &src.sop_instance_uid)
}

fn reference_item(class: &str, instance: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class),
        el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, instance),
        seq(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, vec![code("121322", "DCM", "Source image for image processing operation")]),
    ])
}

/// The Source Image Sequence items: the source instance, and for the
/// uncertainty series also the restored instance it describes.
fn source_items(src: &SourceSlice, p: &DeriveParams, kind: Kind) -> Vec<InMemDicomObject> {
    let mut items = vec![source_image_item(src)];
    if kind == Kind::Uncertainty {
        items.push(reference_item(&src.sop_class_uid, &derived_uid(&src.sop_instance_uid, &uid_salt(Kind::Restored, p))));
    }
    items
}

/// Real World Value Mapping items for new stored values: each source item
/// that maps linearly (slope, intercept 0) is kept with its slope scaled by
/// new ÷ old Rescale Slope (so an SUV mapping still gives the same SUV) and
/// the signed 16-bit range as its first and last values mapped; others are
/// dropped. None kept (or none given, `synthesize`): one Bq/ml item on the
/// new slope.
fn rescaled_mapping(items: &[InMemDicomObject], old_slope: Option<f64>, new_slope: f64, synthesize: bool) -> Vec<InMemDicomObject> {
    let range = |mut i: InMemDicomObject| {
        i.put(el(tags::REAL_WORLD_VALUE_FIRST_VALUE_MAPPED, VR::SS, PrimitiveValue::from(i16::MIN)));
        i.put(el(tags::REAL_WORLD_VALUE_LAST_VALUE_MAPPED, VR::SS, PrimitiveValue::from(i16::MAX)));
        i
    };
    let mut out: Vec<InMemDicomObject> = items
        .iter()
        .filter_map(|i| {
            let old = old_slope.filter(|v| v.is_finite() && *v > 0.0)?;
            let m = i.f64_of(tags::REAL_WORLD_VALUE_SLOPE)?;
            if i.f64_of(tags::REAL_WORLD_VALUE_INTERCEPT).unwrap_or(0.0) != 0.0 || i.get(tags::REAL_WORLD_VALUE_LUT_DATA).is_some() {
                return None;
            }
            let mut n = i.clone();
            n.put(el(tags::REAL_WORLD_VALUE_SLOPE, VR::FD, m * new_slope / old));
            n.put(el(tags::REAL_WORLD_VALUE_INTERCEPT, VR::FD, 0.0f64));
            Some(range(n))
        })
        .collect();
    if out.is_empty() && (synthesize || !items.is_empty()) {
        out.push(range(InMemDicomObject::from_element_iter([
            el(tags::LUT_EXPLANATION, VR::LO, "Bq/ml"),
            el(tags::LUT_LABEL, VR::SH, "BQML"),
            seq(tags::MEASUREMENT_UNITS_CODE_SEQUENCE, vec![code("Bq/ml", "UCUM", "Becquerels/milliliter")]),
            el(tags::REAL_WORLD_VALUE_INTERCEPT, VR::FD, 0.0f64),
            el(tags::REAL_WORLD_VALUE_SLOPE, VR::FD, new_slope),
        ])));
    }
    out
}

/// A window over σ (0 to the slice's largest value) for the uncertainty
/// series: the source's activity window does not suit it.
fn sigma_window(values: &[f32]) -> (String, String) {
    let max = values.iter().fold(0.0f64, |m, v| m.max(*v as f64)).max(1e-6);
    (ds(max / 2.0), ds(max))
}

/// Stored values (signed 16 bit) and the DS slope of one restored slice.
fn quantize(values: &[f32], out: &mut Vec<u8>) -> String {
    let (slope_s, slope) = slice_slope(values);
    for v in values {
        let q = (*v as f64 / slope).round().clamp(-32768.0, 32767.0) as i16;
        out.extend_from_slice(&q.to_le_bytes());
    }
    slope_s
}

fn signed_16_bit(obj: &mut InMemDicomObject, pixels: Vec<u8>) {
    obj.put(el(tags::BITS_ALLOCATED, VR::US, 16u16));
    obj.put(el(tags::BITS_STORED, VR::US, 16u16));
    obj.put(el(tags::HIGH_BIT, VR::US, 15u16));
    obj.put(el(tags::PIXEL_REPRESENTATION, VR::US, 1u16));
    obj.remove_element(tags::SMALLEST_IMAGE_PIXEL_VALUE);
    obj.remove_element(tags::LARGEST_IMAGE_PIXEL_VALUE);
    obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(pixels)));
}

/// A single-frame PET image (PS3.3 C.7.6.1, C.8.9.4).
fn derive_single(src: &SourceSlice, values: &[f32], p: &DeriveParams, now: &str, kind: Kind) -> DerivedInstance {
    let mut obj = (*src.dataset).clone();
    let sop = relabel(&mut obj, &src.sop_instance_uid, p, now, kind);
    obj.put(el(tags::DERIVATION_DESCRIPTION, VR::ST, derivation_description(p, kind)));
    obj.put(seq(tags::DERIVATION_CODE_SEQUENCE, vec![derivation_code(kind)]));
    obj.put(seq(tags::SOURCE_IMAGE_SEQUENCE, source_items(src, p, kind)));
    // Pixels: signed 16 bit, per-slice slope chosen to use the range
    // without clipping, intercept 0.
    let mut bytes = Vec::with_capacity(values.len() * 2);
    let old_slope = src.dataset.f64_of(tags::RESCALE_SLOPE).or(Some(1.0));
    let slope = quantize(values, &mut bytes);
    let new_slope: f64 = slope.parse().expect("ds() output parses");
    let mapping = rescaled_mapping(&fg_items(&obj, tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE), old_slope, new_slope, false);
    if mapping.is_empty() {
        obj.remove_element(tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE);
    } else {
        obj.put(seq(tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE, mapping));
    }
    if kind == Kind::Uncertainty {
        let (c, w) = sigma_window(values);
        obj.put(el(tags::WINDOW_CENTER, VR::DS, c));
        obj.put(el(tags::WINDOW_WIDTH, VR::DS, w));
    }
    obj.put(el(tags::RESCALE_SLOPE, VR::DS, slope));
    obj.put(el(tags::RESCALE_INTERCEPT, VR::DS, "0"));
    signed_16_bit(&mut obj, bytes);
    DerivedInstance { sop_instance_uid: sop, dataset: obj }
}

/// Apply `f` to the first item of functional group `macro_seq` in `fg`
/// (a Shared or one Per-frame Functional Groups item).
fn edit_group(fg: &mut InMemDicomObject, macro_seq: dicom_core::Tag, f: impl FnOnce(&mut InMemDicomObject)) -> bool {
    let Some(mut items) = fg.get(macro_seq).and_then(|e| e.items().map(|i| i.to_vec())) else {
        return false;
    };
    let Some(first) = items.first_mut() else { return false };
    f(first);
    fg.put(seq(macro_seq, items));
    true
}

fn fg_items(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Vec<InMemDicomObject> {
    obj.get(tag).and_then(|e| e.items().map(|i| i.to_vec())).unwrap_or_default()
}

/// A multi-frame (Enhanced PET) instance: the Derivation Image macro in the
/// shared functional groups, a Pixel Value Transformation per frame (each
/// frame's slope chosen like a single slice's), Frame Type `DERIVED`.
fn derive_multiframe(src: &SourceSlice, frames: &[&[f32]], p: &DeriveParams, now: &str, kind: Kind) -> DerivedInstance {
    let mut obj = (*src.dataset).clone();
    let sop = relabel(&mut obj, &src.sop_instance_uid, p, now, kind);

    let mut shared = fg_items(&obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).into_iter().next().unwrap_or_else(InMemDicomObject::new_empty);
    let mut per_frame = fg_items(&obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    per_frame.resize_with(frames.len(), InMemDicomObject::new_empty);

    // A functional group sits either in the shared item or in every
    // per-frame item: these move to (or stay in) per-frame / shared. Real
    // World Value Mapping follows each frame's new slope; σ gets its own
    // window per frame.
    let shared_mapping = fg_items(&shared, tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE);
    shared.remove_element(tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE);
    shared.remove_element(tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE);
    if kind == Kind::Uncertainty {
        shared.remove_element(tags::FRAME_VOILUT_SEQUENCE);
    }
    shared.put(seq(
        tags::DERIVATION_IMAGE_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            el(tags::DERIVATION_DESCRIPTION, VR::ST, derivation_description(p, kind)),
            seq(tags::DERIVATION_CODE_SEQUENCE, vec![derivation_code(kind)]),
            seq(tags::SOURCE_IMAGE_SEQUENCE, source_items(src, p, kind)),
        ])],
    ));
    edit_group(&mut shared, tags::PET_FRAME_TYPE_SEQUENCE, |g| set_derived(g, tags::FRAME_TYPE, kind, true));

    // Keep the source's Rescale Type (the units of an Enhanced PET image).
    let rescale_type = crate::dicom::frames::group_str(&src.dataset, 0, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tags::RESCALE_TYPE);
    let mut pixels = Vec::with_capacity(frames.iter().map(|f| f.len() * 2).sum());
    for (i, (item, values)) in per_frame.iter_mut().zip(frames).enumerate() {
        item.remove_element(tags::DERIVATION_IMAGE_SEQUENCE);
        edit_group(item, tags::PET_FRAME_TYPE_SEQUENCE, |g| set_derived(g, tags::FRAME_TYPE, kind, true));
        let slope = quantize(values, &mut pixels);
        let new_slope: f64 = slope.parse().expect("ds() output parses");
        let own = fg_items(item, tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE);
        let old_slope = crate::dicom::frames::group_f64(&src.dataset, i, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tags::RESCALE_SLOPE);
        let template = if own.is_empty() { &shared_mapping } else { &own };
        item.put(seq(tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE, rescaled_mapping(template, old_slope, new_slope, true)));
        if kind == Kind::Uncertainty {
            let (c, w) = sigma_window(values);
            item.put(seq(
                tags::FRAME_VOILUT_SEQUENCE,
                vec![InMemDicomObject::from_element_iter([el(tags::WINDOW_CENTER, VR::DS, c), el(tags::WINDOW_WIDTH, VR::DS, w)])],
            ));
        }
        let mut pvt =
            InMemDicomObject::from_element_iter([el(tags::RESCALE_INTERCEPT, VR::DS, "0"), el(tags::RESCALE_SLOPE, VR::DS, slope)]);
        if let Some(t) = &rescale_type {
            pvt.put(el(tags::RESCALE_TYPE, VR::LO, t.as_str()));
        }
        item.put(seq(tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, vec![pvt]));
    }
    // Enhanced PET Image module: a DERIVED image lists its sources by study
    // and series (hierarchical SOP instance reference): every instance its
    // Source Image Sequence names, so for the uncertainty series also the
    // restored instance, in the restored series.
    let src_series = src.dataset.str_of(tags::SERIES_INSTANCE_UID).unwrap_or_default();
    let series_item = |series: String, sop: &str| {
        InMemDicomObject::from_element_iter([
            el(tags::SERIES_INSTANCE_UID, VR::UI, series),
            seq(
                tags::REFERENCED_SOP_SEQUENCE,
                vec![InMemDicomObject::from_element_iter([
                    el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, src.sop_class_uid.as_str()),
                    el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, sop),
                ])],
            ),
        ])
    };
    let mut series_items = vec![series_item(src_series.clone(), &src.sop_instance_uid)];
    if kind == Kind::Uncertainty {
        let restored = uid_salt(Kind::Restored, p);
        series_items.push(series_item(derived_uid(&src_series, &restored), &derived_uid(&src.sop_instance_uid, &restored)));
    }
    obj.put(seq(
        tags::SOURCE_IMAGE_EVIDENCE_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            el(tags::STUDY_INSTANCE_UID, VR::UI, src.dataset.str_of(tags::STUDY_INSTANCE_UID).unwrap_or_default()),
            seq(tags::REFERENCED_SERIES_SEQUENCE, series_items),
        ])],
    ));
    obj.put(seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]));
    obj.put(seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame));
    obj.put(el(tags::NUMBER_OF_FRAMES, VR::IS, frames.len().to_string()));
    if p.research || kind == Kind::Uncertainty {
        obj.put(el(tags::CONTENT_QUALIFICATION, VR::CS, "RESEARCH"));
    }
    // Top-level rescale attributes do not belong in a functional-group image.
    obj.remove_element(tags::RESCALE_SLOPE);
    obj.remove_element(tags::RESCALE_INTERCEPT);
    signed_16_bit(&mut obj, pixels);
    DerivedInstance { sop_instance_uid: sop, dataset: obj }
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
    use std::sync::Arc;

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
    fn the_sigma_calibration_salts_only_the_uncertainty_series() {
        let p = |cal: Option<&str>| DeriveParams {
            engine: "tract".into(),
            notice: None,
            research: true,
            model_id: "m@1+abc".into(),
            inputs_id: "0123456789abcdef".into(),
            uncertainty_id: cal.map(str::to_owned),
            series_description_suffix: String::new(),
            series_number_offset: 1000,
            device_id: "dev".into(),
        };
        let (a, b) = (p(Some("111111111111")), p(Some("222222222222")));
        assert_eq!(uid_salt(Kind::Restored, &a), uid_salt(Kind::Restored, &b), "the restored image does not depend on σ");
        assert_ne!(uncertainty_series_uid("1.2.3", &a), uncertainty_series_uid("1.2.3", &b));
        assert_eq!(uncertainty_series_uid("1.2.3", &a), uncertainty_series_uid("1.2.3", &p(Some("111111111111"))));
        let d = derivation_description(&a, Kind::Uncertainty);
        // the default character set: a non-ASCII letter here cannot be encoded
        assert!(d.contains("sigma calibration 111111111111") && d.is_ascii(), "{d}");
    }

    #[test]
    fn a_partial_series_another_engine_or_assumption_gives_other_uids() {
        let sops = ["1.2.3.1", "1.2.3.2", "1.2.3.3"];
        let none: Option<&[&str]> = None;
        let id = inputs_id("ort/tensorrt", Some(&sops[..]), &[]);
        assert_eq!(id.len(), 16);
        assert_eq!(
            id,
            inputs_id("ort/tensorrt", Some(&["1.2.3.3", "1.2.3.1", "1.2.3.2", "1.2.3.1"][..]), &[]),
            "order and repeats do not matter"
        );
        assert_ne!(id, inputs_id("ort/tensorrt", Some(&sops[..2]), &[]), "a slice more or less");
        assert_ne!(id, inputs_id("tract", Some(&sops[..]), &[]), "another engine");
        assert_ne!(id, inputs_id("ort/tensorrt", none, &[]), "the complete series differs from a partial one");
        assert_ne!(inputs_id("ort/tensorrt", none, &[]), inputs_id("tract", none, &[]), "another engine, complete series");
        let assumed = |s: u32| [format!("frame_duration_s={s}")];
        assert_ne!(inputs_id("tract", none, &assumed(30)), inputs_id("tract", none, &assumed(60)), "another assumed duration");
        assert_ne!(inputs_id("tract", none, &assumed(30)), inputs_id("tract", none, &[]), "a duration assumed");
        assert_eq!(inputs_id("tract", none, &assumed(30)), inputs_id("tract", none, &assumed(30)));
        let p = |inputs: &str| DeriveParams { inputs_id: inputs.into(), ..params(None) };
        assert_ne!(restored_series_uid("1.2.3", &p(&id)), restored_series_uid("1.2.3", &p(&inputs_id("tract", Some(&sops[..]), &[]))));
        assert_eq!(
            restored_series_uid("1.2.3", &p(&id)),
            restored_series_uid("1.2.3", &p(&inputs_id("ort/tensorrt", Some(&sops[..]), &[])))
        );
    }

    fn params(notice: Option<&str>) -> DeriveParams {
        DeriveParams {
            engine: "tract".into(),
            notice: notice.map(str::to_owned),
            research: false,
            model_id: "m@1+abc".into(),
            inputs_id: "0123456789abcdef".into(),
            uncertainty_id: None,
            series_description_suffix: " [petrestore]".into(),
            series_number_offset: 1000,
            device_id: "dev".into(),
        }
    }

    /// A classic PET slice carrying what a console may send beside the
    /// pixels: a Real World Value Mapping to SUV on the source's stored
    /// values, series-wide pixel ranges, padding, a window, a concatenation.
    fn source_slice() -> SourceSlice {
        let mapping = InMemDicomObject::from_element_iter([
            el(tags::REAL_WORLD_VALUE_SLOPE, VR::FD, 0.0004f64),
            el(tags::REAL_WORLD_VALUE_INTERCEPT, VR::FD, 0.0f64),
            el(tags::LUT_LABEL, VR::SH, "SUVbw"),
        ]);
        let ds = InMemDicomObject::from_element_iter([
            el(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.128"),
            el(tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4"),
            el(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3"),
            el(tags::SERIES_NUMBER, VR::IS, "3"),
            el(tags::SERIES_DESCRIPTION, VR::LO, "WB FDG"),
            el(tags::IMAGE_COMMENTS, VR::LT, "arms up"),
            el(tags::INSTANCE_CREATION_DATE, VR::DA, "20260101"),
            el(tags::INSTANCE_CREATION_TIME, VR::TM, "101010"),
            el(tags::SMALLEST_PIXEL_VALUE_IN_SERIES, VR::US, 0u16),
            el(tags::LARGEST_PIXEL_VALUE_IN_SERIES, VR::US, 32000u16),
            el(tags::PIXEL_PADDING_VALUE, VR::US, 0u16),
            el(tags::WINDOW_CENTER, VR::DS, "5000"),
            el(tags::WINDOW_WIDTH, VR::DS, "10000"),
            el(tags::CONCATENATION_UID, VR::UI, "1.2.9"),
            el(tags::RESCALE_SLOPE, VR::DS, "0.25"),
            seq(tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE, vec![mapping]),
            // an older console's Group Lengths, at the top and in an item,
            // and a thumbnail of the source's pixels
            el(dicom_core::Tag(0x0008, 0x0000), VR::UL, 412u32),
            el(dicom_core::Tag(0x0028, 0x0000), VR::UL, 128u32),
            seq(
                tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE,
                vec![InMemDicomObject::from_element_iter([
                    el(dicom_core::Tag(0x0018, 0x0000), VR::UL, 20u32),
                    el(tags::RADIOPHARMACEUTICAL, VR::LO, "Fluorodeoxyglucose"),
                ])],
            ),
            seq(tags::ICON_IMAGE_SEQUENCE, vec![InMemDicomObject::from_element_iter([el(tags::ROWS, VR::US, 64u16)])]),
        ]);
        SourceSlice {
            sop_instance_uid: "1.2.3.4".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.128".into(),
            frame: None,
            dataset: Arc::new(ds),
        }
    }

    fn volume(v: f32) -> Volume {
        Volume { nx: 2, ny: 2, nz: 1, spacing: [2.0, 2.0, 2.0], data: vec![v, 2.0 * v, 3.0 * v, 4.0 * v], frame_duration_s: Some(30.0) }
    }

    #[test]
    fn a_series_processed_without_all_its_slices_says_how_many_it_has() {
        // slices 3, 4 and 6 of 7 (Image Index), in volume order 6, 3, 4
        let slice = |sop: &str, index: u16| {
            let mut ds = (*source_slice().dataset).clone();
            ds.put(el(tags::SOP_INSTANCE_UID, VR::UI, sop));
            ds.put(el(tags::NUMBER_OF_SLICES, VR::US, PrimitiveValue::from(7u16)));
            ds.put(el(tags::IMAGE_INDEX, VR::US, PrimitiveValue::from(index)));
            SourceSlice {
                sop_instance_uid: sop.into(),
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.128".into(),
                frame: None,
                dataset: Arc::new(ds),
            }
        };
        let slices = [slice("1.2.3.6", 6), slice("1.2.3.3", 3), slice("1.2.3.4", 4)];
        let v = Volume { nx: 2, ny: 2, nz: 3, spacing: [2.0; 3], data: vec![1.0; 12], frame_duration_s: Some(30.0) };
        let out = derive_series(&slices, &v, &params(None));
        let got: Vec<(i64, i64)> =
            out.iter().map(|o| (o.dataset.i64_of(tags::NUMBER_OF_SLICES).unwrap(), o.dataset.i64_of(tags::IMAGE_INDEX).unwrap())).collect();
        assert_eq!(got, [(3, 3), (3, 1), (3, 2)]);
        // a complete series keeps its numbers
        let whole: Vec<SourceSlice> = (1..=3)
            .map(|i| {
                let mut s = slice(&format!("1.2.4.{i}"), i);
                let mut ds = (*s.dataset).clone();
                ds.put(el(tags::NUMBER_OF_SLICES, VR::US, PrimitiveValue::from(3u16)));
                s.dataset = Arc::new(ds);
                s
            })
            .collect();
        let out = derive_series(&whole, &v, &params(None));
        assert_eq!(out.iter().map(|o| o.dataset.i64_of(tags::IMAGE_INDEX).unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn what_the_new_pixels_make_wrong_is_not_copied() {
        let src = source_slice();
        let restored = derive_series(std::slice::from_ref(&src), &volume(1000.0), &params(None));
        let o = &restored[0].dataset;
        // the SUV mapping follows the new slope: the same SUV per Bq/ml
        let rw = &o.get(tags::REAL_WORLD_VALUE_MAPPING_SEQUENCE).unwrap().items().unwrap()[0];
        let (m, rescale) = (rw.f64_of(tags::REAL_WORLD_VALUE_SLOPE).unwrap(), o.f64_of(tags::RESCALE_SLOPE).unwrap());
        assert!((m / rescale - 0.0004 / 0.25).abs() < 1e-12, "{m} / {rescale}");
        assert_eq!(rw.str_of(tags::LUT_LABEL).as_deref(), Some("SUVbw"));
        assert_eq!(rw.i64_of(tags::REAL_WORLD_VALUE_FIRST_VALUE_MAPPED), Some(-32768));
        assert_eq!(rw.i64_of(tags::REAL_WORLD_VALUE_LAST_VALUE_MAPPED), Some(32767));
        for t in [
            tags::SMALLEST_PIXEL_VALUE_IN_SERIES,
            tags::LARGEST_PIXEL_VALUE_IN_SERIES,
            tags::PIXEL_PADDING_VALUE,
            tags::INSTANCE_CREATION_DATE,
            tags::INSTANCE_CREATION_TIME,
            tags::ICON_IMAGE_SEQUENCE,
            dicom_core::Tag(0x0008, 0x0000),
            dicom_core::Tag(0x0028, 0x0000),
        ] {
            assert!(o.get(t).is_none(), "{t} copied from the source");
        }
        let radiopharmaceutical = &o.get(tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE).unwrap().items().unwrap()[0];
        assert!(radiopharmaceutical.get(dicom_core::Tag(0x0018, 0x0000)).is_none(), "a Group Length inside an item");
        assert_eq!(radiopharmaceutical.str_of(tags::RADIOPHARMACEUTICAL).as_deref(), Some("Fluorodeoxyglucose"));
        // the restored image keeps its window (it applies to Bq/ml) and the
        // source's comment; its concatenation is a derived one
        assert_eq!(o.str_of(tags::WINDOW_CENTER).as_deref(), Some("5000"));
        assert_eq!(o.str_of(tags::IMAGE_COMMENTS).as_deref(), Some("arms up"));
        assert_eq!(o.str_of(tags::CONCATENATION_UID).unwrap(), derived_uid("1.2.9", "m@1+abc|0123456789abcdef"));
        let code = &o.get(tags::DERIVATION_CODE_SEQUENCE).unwrap().items().unwrap()[0];
        assert_eq!(code.str_of(tags::CODE_VALUE).as_deref(), Some("113087"));
        assert_eq!(o.i64_of(tags::SERIES_NUMBER), Some(1003));

        let sigma = derive_uncertainty(std::slice::from_ref(&src), &volume(50.0), &params(None));
        let o = &sigma[0].dataset;
        // a window over σ (50 to 200 Bq/ml here), not the activity window
        assert_eq!((o.f64_of(tags::WINDOW_CENTER), o.f64_of(tags::WINDOW_WIDTH)), (Some(100.0), Some(200.0)));
        assert!(o.str_of(tags::IMAGE_COMMENTS).unwrap().starts_with("NOT FOR DIAGNOSIS"));
        assert_eq!(o.str_of(tags::SERIES_DESCRIPTION).as_deref(), Some("WB FDG [petrestore] uncertainty 1SD NOT FOR DX"));
        assert_eq!(o.i64_of(tags::SERIES_NUMBER), Some(2003));
        let scheme = &o.get(tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE).unwrap().items().unwrap()[0];
        assert_eq!(scheme.str_of(tags::CODING_SCHEME_DESIGNATOR).as_deref(), Some(LOCAL_SCHEME));
    }

    /// A Japanese site's description (ISO 2022 IR 87: escape sequences
    /// switch to kanji and back) is kept whole when it fits; one that must
    /// be cut gives way, so no cut leaves the suffix in kanji.
    #[test]
    fn a_description_with_escape_sequences_is_never_cut() {
        let with_sd = |sd: &str| {
            let mut s = source_slice();
            let mut ds = (*s.dataset).clone();
            ds.put(el(tags::SPECIFIC_CHARACTER_SET, VR::CS, PrimitiveValue::Strs(["".to_string(), "ISO 2022 IR 87".to_string()].into())));
            ds.put(el(tags::SERIES_DESCRIPTION, VR::LO, sd));
            s.dataset = Arc::new(ds);
            derive_uncertainty(&[s], &volume(50.0), &params(None))[0].dataset.str_of(tags::SERIES_DESCRIPTION).unwrap()
        };
        let short = "WB \u{1b}$B;3;3\u{1b}(B";
        assert_eq!(with_sd(short), format!("{short} [petrestore] uncertainty 1SD NOT FOR DX"));
        let long = format!("WB \u{1b}$B{}\u{1b}(B", ";3".repeat(20));
        assert_eq!(with_sd(&long), "PET [petrestore] uncertainty 1SD NOT FOR DX");
    }

    #[test]
    fn a_test_model_says_so_in_image_comments_before_the_sources_comment() {
        let out = derive_series(&[source_slice()], &volume(1.0), &params(Some("TEST MODEL, NOT FOR CLINICAL USE.")));
        assert_eq!(out[0].dataset.str_of(tags::IMAGE_COMMENTS).as_deref(), Some("TEST MODEL, NOT FOR CLINICAL USE. arms up"));
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
