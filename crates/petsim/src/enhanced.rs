//! The simulator's Enhanced PET Image Storage writer (PS3.3 A.56): the same
//! images as the classic writer, as one multi-frame instance with shared
//! and per-frame functional groups, checked against dicom3tools' `dciodvfy`
//! in the tests.

use std::path::Path;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::{SeriesFiles, SeriesSpec, StudyIds, code_seq, el};
use petdicom::ds;
use petdicom::uid::derived_uid;
use petdicom::{ENHANCED_PET_IMAGE_STORAGE, part10};

fn item<I: IntoIterator<Item = DataElement<InMemDicomObject>>>(elems: I) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elems)
}

fn sq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn strs(tag: Tag, vr: VR, v: &[&str]) -> DataElement<InMemDicomObject> {
    el(tag, vr, PrimitiveValue::Strs(v.iter().map(|s| s.to_string()).collect()))
}

fn dss(tag: Tag, v: &[f64]) -> DataElement<InMemDicomObject> {
    el(tag, VR::DS, PrimitiveValue::Strs(v.iter().map(|x| ds(*x)).collect()))
}

fn tag_value(t: Tag) -> PrimitiveValue {
    PrimitiveValue::Tags(std::iter::once(t).collect())
}

/// One frame's stored values (signed 16 bit, no negative activity) and its
/// Rescale Slope as written.
fn quantize(img: &[f64], pixels: &mut Vec<u8>) -> String {
    let max = img.iter().cloned().fold(0.0, f64::max);
    let slope = ds(if max > 0.0 { max / 32000.0 } else { 1.0 });
    let slope_v: f64 = slope.parse().expect("ds parses");
    for v in img {
        pixels.extend_from_slice(&((v / slope_v).round().clamp(0.0, 32767.0) as i16).to_le_bytes());
    }
    slope
}

/// Image Type (or Frame Type) of an original static PET volume and the
/// image description attributes that go with it (Common CT/MR Image
/// Description macro).
fn image_description(type_tag: Tag) -> [DataElement<InMemDicomObject>; 4] {
    [
        strs(type_tag, VR::CS, &["ORIGINAL", "PRIMARY", "STATIC", "NONE"]),
        el(tags::PIXEL_PRESENTATION, VR::CS, "MONOCHROME"),
        el(tags::VOLUMETRIC_PROPERTIES, VR::CS, "VOLUME"),
        el(tags::VOLUME_BASED_CALCULATION_TECHNIQUE, VR::CS, "NONE"),
    ]
}

/// Instance, equipment and Image Pixel attributes of a multi-frame PET
/// instance of `frames` frames of `n`×`n` signed 16-bit pixels.
fn image_elements(sop_class: &str, sop: &str, series_number: &str, frames: usize, n: usize) -> Vec<DataElement<InMemDicomObject>> {
    let mut v = vec![
        el(tags::SOP_CLASS_UID, VR::UI, sop_class),
        el(tags::SOP_INSTANCE_UID, VR::UI, sop),
        el(tags::CONTENT_DATE, VR::DA, "20261127"),
        el(tags::CONTENT_TIME, VR::TM, "093000"),
        el(tags::MANUFACTURER_MODEL_NAME, VR::LO, "petrestore simulator"),
        el(tags::DEVICE_SERIAL_NUMBER, VR::LO, "SIM-0001"),
        el(tags::SOFTWARE_VERSIONS, VR::LO, env!("CARGO_PKG_VERSION")),
        el(tags::SERIES_NUMBER, VR::IS, series_number),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        el(tags::NUMBER_OF_FRAMES, VR::IS, frames.to_string()),
        el(tags::ROWS, VR::US, n as u16),
        el(tags::COLUMNS, VR::US, n as u16),
        el(tags::BITS_ALLOCATED, VR::US, 16u16),
        el(tags::BITS_STORED, VR::US, 16u16),
        el(tags::HIGH_BIT, VR::US, 15u16),
        el(tags::PIXEL_REPRESENTATION, VR::US, 1u16),
        el(tags::CONTENT_QUALIFICATION, VR::CS, "PRODUCT"),
        el(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"),
        el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        el(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY"),
        sq(tags::ACQUISITION_CONTEXT_SEQUENCE, vec![]),
    ];
    v.extend(image_description(tags::IMAGE_TYPE));
    v
}

/// Write `images` (Bq/ml, one per slice) as one Enhanced PET instance.
pub(super) fn write_images_enhanced(
    dir: &Path,
    spec: &SeriesSpec,
    ids: &StudyIds,
    duration_s: f64,
    description: &str,
    images: &[Vec<f64>],
) -> std::io::Result<SeriesFiles> {
    std::fs::create_dir_all(dir)?;
    let series_uid = derived_uid(&ids.root, &format!("enhanced-series-{duration_s}s"));
    let sop = derived_uid(&series_uid, "instance-1");
    let n = spec.matrix;
    let px = spec.fov_mm / n as f64;
    let ms = (duration_s * 1000.0).round();
    let acq_dt = "20261127093000";
    let dim_org = derived_uid(&series_uid, "dimension-organization");

    // Pixels and per-frame slopes.
    let mut pixels = Vec::with_capacity(images.len() * n * n * 2);
    let mut per_frame = Vec::with_capacity(images.len());
    for (k, img) in images.iter().enumerate() {
        let slope = quantize(img, &mut pixels);
        let z = k as f64 * spec.slice_thickness_mm;
        per_frame.push(item([
            sq(
                tags::FRAME_CONTENT_SEQUENCE,
                vec![item([
                    el(tags::FRAME_ACQUISITION_NUMBER, VR::US, 1u16),
                    el(tags::FRAME_REFERENCE_DATE_TIME, VR::DT, acq_dt),
                    el(tags::FRAME_ACQUISITION_DATE_TIME, VR::DT, acq_dt),
                    el(tags::FRAME_ACQUISITION_DURATION, VR::FD, PrimitiveValue::from(ms)),
                    el(tags::DIMENSION_INDEX_VALUES, VR::UL, PrimitiveValue::from((k + 1) as u32)),
                    el(tags::TEMPORAL_POSITION_INDEX, VR::UL, PrimitiveValue::from(1u32)),
                    el(tags::STACK_ID, VR::SH, "1"),
                    el(tags::IN_STACK_POSITION_NUMBER, VR::UL, PrimitiveValue::from((k + 1) as u32)),
                ])],
            ),
            sq(
                tags::PLANE_POSITION_SEQUENCE,
                vec![item([dss(tags::IMAGE_POSITION_PATIENT, &[-spec.fov_mm / 2.0 + px / 2.0, -spec.fov_mm / 2.0 + px / 2.0, -z])])],
            ),
            sq(
                tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
                vec![item([
                    el(tags::RESCALE_INTERCEPT, VR::DS, "0"),
                    el(tags::RESCALE_SLOPE, VR::DS, slope),
                    el(tags::RESCALE_TYPE, VR::LO, "BQML"),
                ])],
            ),
        ]));
    }

    let shared = item([
        sq(
            tags::PIXEL_MEASURES_SEQUENCE,
            vec![item([dss(tags::PIXEL_SPACING, &[px, px]), el(tags::SLICE_THICKNESS, VR::DS, ds(spec.slice_thickness_mm))])],
        ),
        sq(tags::PLANE_ORIENTATION_SEQUENCE, vec![item([strs(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, &["1", "0", "0", "0", "1", "0"])])]),
        sq(
            tags::FRAME_ANATOMY_SEQUENCE,
            vec![item([
                code_seq(tags::ANATOMIC_REGION_SEQUENCE, "38266002", "Entire body", None),
                el(tags::FRAME_LATERALITY, VR::CS, "U"),
            ])],
        ),
        sq(tags::PET_FRAME_TYPE_SEQUENCE, vec![item(image_description(tags::FRAME_TYPE))]),
        sq(tags::RADIOPHARMACEUTICAL_USAGE_SEQUENCE, vec![item([el(tags::RADIOPHARMACEUTICAL_AGENT_NUMBER, VR::US, 1u16)])]),
        sq(
            tags::PET_FRAME_ACQUISITION_SEQUENCE,
            vec![item([
                el(tags::TABLE_HEIGHT, VR::DS, "150"),
                el(tags::GANTRY_DETECTOR_TILT, VR::DS, "0"),
                el(tags::GANTRY_DETECTOR_SLEW, VR::DS, "0"),
                el(tags::DATA_COLLECTION_DIAMETER, VR::DS, "700"),
            ])],
        ),
        sq(
            tags::PET_DETECTOR_MOTION_DETAILS_SEQUENCE,
            vec![item([el(tags::ROTATION_DIRECTION, VR::CS, "CW"), el(tags::REVOLUTION_TIME, VR::FD, PrimitiveValue::from(0.0f64))])],
        ),
        sq(
            tags::PET_POSITION_SEQUENCE,
            vec![item([
                el(tags::TABLE_POSITION, VR::FD, PrimitiveValue::from(0.0f64)),
                el(tags::DATA_COLLECTION_CENTER_PATIENT, VR::FD, PrimitiveValue::from([0.0f64, 0.0, 0.0])),
                el(tags::RECONSTRUCTION_TARGET_CENTER_PATIENT, VR::FD, PrimitiveValue::from([0.0f64, 0.0, 0.0])),
            ])],
        ),
        sq(
            tags::PET_FRAME_CORRECTION_FACTORS_SEQUENCE,
            vec![item([
                el(tags::PRIMARY_PROMPTS_COUNTS_ACCUMULATED, VR::IS, "2000000"),
                el(tags::SLICE_SENSITIVITY_FACTOR, VR::DS, "1"),
                el(tags::DECAY_FACTOR, VR::DS, "1"),
                el(tags::SCATTER_FRACTION_FACTOR, VR::DS, "0.3"),
                el(tags::DEAD_TIME_FACTOR, VR::DS, "1"),
            ])],
        ),
        sq(
            tags::PET_RECONSTRUCTION_SEQUENCE,
            vec![item([
                el(tags::RECONSTRUCTION_TYPE, VR::CS, "2D"),
                el(tags::RECONSTRUCTION_ALGORITHM, VR::CS, "OSEM"),
                el(tags::ITERATIVE_RECONSTRUCTION_METHOD, VR::CS, "YES"),
                el(tags::NUMBER_OF_ITERATIONS, VR::US, 3u16),
                el(tags::NUMBER_OF_SUBSETS, VR::US, 8u16),
                el(tags::RECONSTRUCTION_DIAMETER, VR::DS, ds(spec.fov_mm)),
            ])],
        ),
    ]);

    let radiopharm = item([
        el(tags::RADIOPHARMACEUTICAL_AGENT_NUMBER, VR::US, 1u16),
        el(tags::RADIOPHARMACEUTICAL_START_DATE_TIME, VR::DT, "20261127083000"),
        el(tags::RADIONUCLIDE_TOTAL_DOSE, VR::DS, "370000000"),
        el(tags::RADIONUCLIDE_HALF_LIFE, VR::DS, "6586.2"),
        el(tags::RADIONUCLIDE_POSITRON_FRACTION, VR::DS, "0.9673"),
        code_seq(tags::RADIONUCLIDE_CODE_SEQUENCE, "77004003", "^18^Fluorine", None),
        code_seq(tags::RADIOPHARMACEUTICAL_CODE_SEQUENCE, "35321007", "Fluorodeoxyglucose F^18^", None),
        code_seq(tags::ADMINISTRATION_ROUTE_CODE_SEQUENCE, "47625008", "Intravenous route", None),
    ]);
    let obj = item(
        super::study_elements(spec, ids, &series_uid, description)
            .into_iter()
            .chain(image_elements(ENHANCED_PET_IMAGE_STORAGE, &sop, "4", images.len(), n))
            .chain([
                el(tags::ACQUISITION_DATE_TIME, VR::DT, acq_dt),
                el(tags::ACQUISITION_DURATION, VR::FD, PrimitiveValue::from(duration_s)),
                sq(tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![item([el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dim_org.as_str())])]),
                sq(
                    tags::DIMENSION_INDEX_SEQUENCE,
                    vec![item([
                        el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dim_org.as_str()),
                        el(tags::DIMENSION_INDEX_POINTER, VR::AT, tag_value(tags::IMAGE_POSITION_PATIENT)),
                        el(tags::FUNCTIONAL_GROUP_POINTER, VR::AT, tag_value(tags::PLANE_POSITION_SEQUENCE)),
                    ])],
                ),
                sq(tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE, vec![radiopharm]),
                el(tags::COUNTS_SOURCE, VR::CS, "EMISSION"),
                el(tags::ACQUISITION_START_CONDITION, VR::CS, "MANU"),
                el(tags::ACQUISITION_TERMINATION_CONDITION, VR::CS, "TIME"),
                el(tags::TYPE_OF_DETECTOR_MOTION, VR::CS, "STATIONARY"),
                el(tags::TERMINATION_TIME_THRESHOLD, VR::FD, PrimitiveValue::from(duration_s)),
                el(tags::DETECTOR_GEOMETRY, VR::CS, "CYLINDRICAL_RING"),
                el(tags::TRANSVERSE_DETECTOR_SEPARATION, VR::FD, PrimitiveValue::from(820.0f64)),
                el(tags::AXIAL_DETECTOR_DIMENSION, VR::FD, PrimitiveValue::from(260.0f64)),
                el(tags::COLLIMATOR_TYPE, VR::CS, "NONE"),
                el(tags::COINCIDENCE_WINDOW_WIDTH, VR::DS, "4.7"),
                sq(
                    tags::ENERGY_WINDOW_RANGE_SEQUENCE,
                    vec![item([el(tags::ENERGY_WINDOW_LOWER_LIMIT, VR::DS, "435"), el(tags::ENERGY_WINDOW_UPPER_LIMIT, VR::DS, "585")])],
                ),
                el(tags::TABLE_MOTION, VR::CS, "STATIC"),
                el(tags::TIME_OF_FLIGHT_INFORMATION_USED, VR::CS, "TRUE"),
                code_seq(tags::VIEW_CODE_SEQUENCE, "62824007", "transverse", None),
                el(tags::RANDOMS_CORRECTION_METHOD, VR::CS, "DLYD"),
                el(tags::ATTENUATION_CORRECTION_SOURCE, VR::CS, "CT"),
                el(tags::ATTENUATION_CORRECTION_TEMPORAL_RELATIONSHIP, VR::CS, "CONCURRENT"),
                el(tags::SCATTER_CORRECTION_METHOD, VR::LO, "MODEL"),
                el(tags::DECAY_CORRECTED, VR::CS, "YES"),
                el(tags::DECAY_CORRECTION_DATE_TIME, VR::DT, acq_dt),
                el(tags::ATTENUATION_CORRECTED, VR::CS, "YES"),
                el(tags::SCATTER_CORRECTED, VR::CS, "YES"),
                el(tags::DEAD_TIME_CORRECTED, VR::CS, "YES"),
                el(tags::GANTRY_MOTION_CORRECTED, VR::CS, "NO"),
                el(tags::PATIENT_MOTION_CORRECTED, VR::CS, "NO"),
                el(tags::COUNT_LOSS_NORMALIZATION_CORRECTED, VR::CS, "YES"),
                el(tags::RANDOMS_CORRECTED, VR::CS, "YES"),
                el(tags::NON_UNIFORM_RADIAL_SAMPLING_CORRECTED, VR::CS, "NO"),
                el(tags::SENSITIVITY_CALIBRATED, VR::CS, "YES"),
                el(tags::DETECTOR_NORMALIZATION_CORRECTION, VR::CS, "YES"),
                sq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]),
                sq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame),
                el(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(pixels)),
            ]),
    );
    let path = dir.join("enhanced.dcm");
    std::fs::write(&path, part10::encode(obj).map_err(std::io::Error::other)?)?;
    Ok(SeriesFiles { study_uid: ids.study_uid.clone(), series_uid, sop_uids: vec![sop], files: vec![path] })
}

/// Write `images` as one Legacy Converted Enhanced PET instance (PS3.3
/// A.65.3), the way a PACS converts a classic series: the PET attributes
/// that have no functional group (Units, Actual Frame Duration, the
/// radiopharmaceutical, decay correction) travel in the Unassigned Shared
/// Converted Attributes, and each frame names the classic slice it came from.
pub(super) fn write_images_legacy(
    dir: &Path,
    spec: &SeriesSpec,
    ids: &StudyIds,
    duration_s: f64,
    description: &str,
    images: &[Vec<f64>],
) -> std::io::Result<SeriesFiles> {
    std::fs::create_dir_all(dir)?;
    let series_uid = derived_uid(&ids.root, &format!("legacy-series-{duration_s}s"));
    let sop = derived_uid(&series_uid, "instance-1");
    let n = spec.matrix;
    let px = spec.fov_mm / n as f64;
    let ms = (duration_s * 1000.0).round() as i64;
    let mut pixels = Vec::with_capacity(images.len() * n * n * 2);
    let mut per_frame = Vec::with_capacity(images.len());
    for (k, img) in images.iter().enumerate() {
        let slope = quantize(img, &mut pixels);
        let z = k as f64 * spec.slice_thickness_mm;
        per_frame.push(item([
            sq(tags::FRAME_CONTENT_SEQUENCE, vec![item([])]),
            sq(
                tags::PLANE_POSITION_SEQUENCE,
                vec![item([dss(tags::IMAGE_POSITION_PATIENT, &[-spec.fov_mm / 2.0 + px / 2.0, -spec.fov_mm / 2.0 + px / 2.0, -z])])],
            ),
            sq(
                tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
                vec![item([
                    el(tags::RESCALE_INTERCEPT, VR::DS, "0"),
                    el(tags::RESCALE_SLOPE, VR::DS, slope),
                    el(tags::RESCALE_TYPE, VR::LO, "BQML"),
                ])],
            ),
            sq(
                tags::CONVERSION_SOURCE_ATTRIBUTES_SEQUENCE,
                vec![item([
                    el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, petdicom::PET_IMAGE_STORAGE),
                    el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, derived_uid(&series_uid, &format!("classic-slice-{k}"))),
                ])],
            ),
            sq(
                tags::UNASSIGNED_PER_FRAME_CONVERTED_ATTRIBUTES_SEQUENCE,
                vec![item([el(tags::IMAGE_INDEX, VR::US, (k + 1) as u16), el(tags::SLICE_LOCATION, VR::DS, ds(-z))])],
            ),
        ]));
    }
    let radiopharm = item([
        el(tags::RADIOPHARMACEUTICAL, VR::LO, "Fluorodeoxyglucose"),
        el(tags::RADIOPHARMACEUTICAL_START_TIME, VR::TM, "083000"),
        el(tags::RADIONUCLIDE_TOTAL_DOSE, VR::DS, "370000000"),
        el(tags::RADIONUCLIDE_HALF_LIFE, VR::DS, "6586.2"),
        el(tags::RADIONUCLIDE_POSITRON_FRACTION, VR::DS, "0.9673"),
        code_seq(tags::RADIONUCLIDE_CODE_SEQUENCE, "77004003", "^18^Fluorine", None),
    ]);
    let shared = item([
        sq(
            tags::PIXEL_MEASURES_SEQUENCE,
            vec![item([dss(tags::PIXEL_SPACING, &[px, px]), el(tags::SLICE_THICKNESS, VR::DS, ds(spec.slice_thickness_mm))])],
        ),
        sq(tags::PLANE_ORIENTATION_SEQUENCE, vec![item([strs(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, &["1", "0", "0", "0", "1", "0"])])]),
        sq(tags::PET_FRAME_TYPE_SEQUENCE, vec![item(image_description(tags::FRAME_TYPE))]),
        sq(
            tags::UNASSIGNED_SHARED_CONVERTED_ATTRIBUTES_SEQUENCE,
            vec![item([
                el(tags::ACTUAL_FRAME_DURATION, VR::IS, ms.to_string()),
                el(tags::UNITS, VR::CS, "BQML"),
                el(tags::DECAY_CORRECTION, VR::CS, "START"),
                el(tags::COUNTS_SOURCE, VR::CS, "EMISSION"),
                strs(tags::SERIES_TYPE, VR::CS, &["WHOLE BODY", "IMAGE"]),
                strs(tags::CORRECTED_IMAGE, VR::CS, &["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]),
                el(tags::NUMBER_OF_SLICES, VR::US, images.len() as u16),
                sq(tags::RADIOPHARMACEUTICAL_INFORMATION_SEQUENCE, vec![radiopharm]),
            ])],
        ),
    ]);
    let obj = item(
        super::study_elements(spec, ids, &series_uid, description)
            .into_iter()
            .chain(image_elements(petdicom::LEGACY_ENHANCED_PET_IMAGE_STORAGE, &sop, "5", images.len(), n))
            .chain([
                sq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]),
                sq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame),
                el(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(pixels)),
            ]),
    );
    let path = dir.join("legacy.dcm");
    std::fs::write(&path, part10::encode(obj).map_err(std::io::Error::other)?)?;
    Ok(SeriesFiles { study_uid: ids.study_uid.clone(), series_uid, sop_uids: vec![sop], files: vec![path] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use petdicom::attrs::Attrs;
    use petrestore::derive::{DeriveParams, derive_series};
    use petrestore::restore::volume::load;

    fn per_frame_ipp(o: &InMemDicomObject) -> Vec<Option<Vec<f64>>> {
        let n = petdicom::frames::number_of_frames(o);
        (0..n).map(|f| petdicom::frames::group_f64s(o, f, tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT)).collect()
    }

    #[test]
    fn enhanced_loads_like_classic_and_derives_back_in_the_source_frame_order() {
        let d = tempfile::tempdir().unwrap();
        let spec = SeriesSpec { slices: 6, matrix: 24, seed: 5, ..Default::default() };
        let classic = load(&super::super::write_series(&d.path().join("c"), &spec).unwrap().files).unwrap();
        let path = super::super::write_series_enhanced(&d.path().join("e"), &spec).unwrap().files.remove(0);

        // Scanners need not store frames in position order: reverse them.
        let mut file = dicom_object::open_file(&path).unwrap();
        let mut items = file.element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap().to_vec();
        items.reverse();
        file.put(sq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, items));
        let px = file.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().into_owned();
        let frame = px.len() / spec.slices;
        let reversed: Vec<u8> = px.chunks(frame).rev().flatten().copied().collect();
        file.put(el(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(reversed)));
        file.write_to_file(&path).unwrap();
        let source = file.into_inner();

        let e = load(std::slice::from_ref(&path)).unwrap();
        assert_eq!((e.volume.nx, e.volume.ny, e.volume.nz), (classic.volume.nx, classic.volume.ny, classic.volume.nz));
        for (a, b) in e.volume.spacing.iter().zip(classic.volume.spacing) {
            assert!((a - b).abs() < 1e-9, "{:?} vs {:?}", e.volume.spacing, classic.volume.spacing);
        }
        for z in 0..spec.slices {
            let max = classic.volume.slice(z).iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = e.volume.slice(z).iter().zip(classic.volume.slice(z)).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err <= max / 30_000.0 + 1e-3, "slice {z}: {err} (max {max})");
        }
        // Volume order is by position along the normal (+z here), whatever
        // the frame order (the simulator writes frames head first, -z; the
        // reversed file has them feet first; the end-to-end test sends the
        // unreversed one).
        let ipp = per_frame_ipp(&source);
        let z_of = |f: usize| ipp[f].as_ref().unwrap()[2];
        assert!(e.slices.windows(2).all(|w| z_of(w[0].frame.unwrap()) < z_of(w[1].frame.unwrap())));

        // Derive: one instance, frames kept in the source's order with their
        // own per-frame groups and slopes.
        let mut restored = e.volume.clone();
        restored.data.iter_mut().for_each(|v| *v *= 2.0);
        let params = DeriveParams {
            engine: "test".into(),
            notice: None,
            research: true,
            model_id: "m".into(),
            inputs_id: "0".into(),
            uncertainty_id: None,
            series_description_suffix: " [petrestore]".into(),
            series_number_offset: 1000,
            device_id: "dev".into(),
        };
        let out = derive_series(&e.slices, &restored, &params);
        assert_eq!(out.len(), 1);
        let out_path = d.path().join("derived.dcm");
        std::fs::write(&out_path, part10::encode(out.into_iter().next().unwrap().dataset).unwrap()).unwrap();
        let o = load(std::slice::from_ref(&out_path)).unwrap();
        let derived = dicom_object::open_file(&out_path).unwrap().into_inner();
        assert_eq!(per_frame_ipp(&derived), per_frame_ipp(&source), "per-frame groups stay with their frames");
        assert_eq!(derived.str_of(tags::NUMBER_OF_FRAMES).as_deref(), Some("6"));
        assert_eq!(derived.str_of(tags::CONTENT_QUALIFICATION).as_deref(), Some("RESEARCH"));
        for z in 0..spec.slices {
            assert_eq!(o.slices[z].frame, e.slices[z].frame);
            let max = restored.slice(z).iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = o.volume.slice(z).iter().zip(restored.slice(z)).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err <= max / 32_766.0 * 0.5 + 1e-3, "slice {z}: {err}");
        }
    }

    #[test]
    fn broken_multi_frame_instances_are_refused_with_the_frame_and_attribute() {
        let d = tempfile::tempdir().unwrap();
        let spec = SeriesSpec { slices: 4, matrix: 16, seed: 6, ..Default::default() };
        let path = super::super::write_series_enhanced(&d.path().join("e"), &spec).unwrap().files.remove(0);
        let original = dicom_object::open_file(&path).unwrap();

        // Frame 3 lost its position (and there is none shared to fall back on).
        let mut f = original.clone();
        let mut items = f.element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap().to_vec();
        items[2].remove_element(tags::PLANE_POSITION_SEQUENCE);
        f.put(sq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, items));
        f.write_to_file(&path).unwrap();
        let e = load(std::slice::from_ref(&path)).unwrap_err();
        assert!(matches!(e, petrestore::restore::volume::VolumeError::Geometry(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("frame 3") && e.contains("Image Position (Patient)"), "{e}");

        // More frames announced than Pixel Data holds.
        let mut f = original.clone();
        f.put(el(tags::NUMBER_OF_FRAMES, VR::IS, "5"));
        f.write_to_file(&path).unwrap();
        let e = load(std::slice::from_ref(&path)).unwrap_err();
        assert!(matches!(e, petrestore::restore::volume::VolumeError::Pixels(_)), "{e:?}");
        assert!(e.to_string().contains("5 frames of 16x16 need"), "{e}");
    }
}
