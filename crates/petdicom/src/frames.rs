//! Multi-frame (Enhanced PET, Legacy Converted Enhanced PET) access: a
//! frame's functional group macro comes from the Per-frame Functional Groups
//! Sequence when the frame has it there, else from the Shared Functional
//! Groups Sequence (PS3.3 C.7.6.16).

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::attrs::Attrs;

/// Number of Frames, 1 when absent.
pub fn number_of_frames(obj: &InMemDicomObject) -> usize {
    obj.str_of(tags::NUMBER_OF_FRAMES).and_then(|s| s.parse::<usize>().ok()).unwrap_or(1)
}

/// Whether the instance is organised in functional groups.
pub fn is_multiframe(obj: &InMemDicomObject) -> bool {
    obj.get(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).is_some()
        || obj.get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).is_some()
        || number_of_frames(obj) > 1
}

fn first_item(obj: &InMemDicomObject, seq: Tag) -> Option<&InMemDicomObject> {
    obj.get(seq)?.items()?.first()
}

/// The item of functional group `macro_seq` (e.g. Plane Position Sequence)
/// that applies to `frame` (0-based).
pub fn group(obj: &InMemDicomObject, frame: usize, macro_seq: Tag) -> Option<&InMemDicomObject> {
    let per_frame = obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.get(frame))
        .and_then(|item| first_item(item, macro_seq));
    per_frame.or_else(|| first_item(first_item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)?, macro_seq))
}

/// Attribute `tag` of functional group `macro_seq` for `frame`.
pub fn group_f64(obj: &InMemDicomObject, frame: usize, macro_seq: Tag, tag: Tag) -> Option<f64> {
    group(obj, frame, macro_seq)?.f64_of(tag)
}

pub fn group_f64s(obj: &InMemDicomObject, frame: usize, macro_seq: Tag, tag: Tag) -> Option<Vec<f64>> {
    group(obj, frame, macro_seq)?.f64s_of(tag)
}

pub fn group_str(obj: &InMemDicomObject, frame: usize, macro_seq: Tag, tag: Tag) -> Option<String> {
    group(obj, frame, macro_seq)?.str_of(tag)
}

/// Look up a classic attribute: at the top level, else (Legacy Converted
/// Enhanced objects) in the frame's Unassigned Per-frame Converted
/// Attributes, else in the Unassigned Shared Converted Attributes, where a
/// conversion puts what has no functional group.
pub fn classic<'a, T>(obj: &'a InMemDicomObject, frame: Option<usize>, read: impl Fn(&'a InMemDicomObject) -> Option<T>) -> Option<T> {
    read(obj).or_else(|| {
        let f = frame?;
        let per_frame = obj
            .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
            .and_then(|e| e.items())
            .and_then(|items| items.get(f))
            .and_then(|item| first_item(item, tags::UNASSIGNED_PER_FRAME_CONVERTED_ATTRIBUTES_SEQUENCE));
        let shared = first_item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)
            .and_then(|item| first_item(item, tags::UNASSIGNED_SHARED_CONVERTED_ATTRIBUTES_SEQUENCE));
        per_frame.and_then(&read).or_else(|| shared.and_then(&read))
    })
}

/// Frame duration in ms: Actual Frame Duration (0018,1242) of a classic
/// instance, or Frame Acquisition Duration (0018,9220) of the frame's Frame
/// Content (0020,9111) in a multi-frame one (a Legacy Converted one keeps
/// Actual Frame Duration among its converted attributes).
pub fn frame_duration_ms(obj: &InMemDicomObject, frame: Option<usize>) -> Option<f64> {
    frame
        .and_then(|f| group_f64(obj, f, tags::FRAME_CONTENT_SEQUENCE, tags::FRAME_ACQUISITION_DURATION))
        .or_else(|| classic(obj, frame, |o| o.f64_of(tags::ACTUAL_FRAME_DURATION)))
}

/// Units of the pixel values: Units (0054,1001) of a classic instance; an
/// Enhanced PET one states them as the Rescale Type of its Pixel Value
/// Transformation (it has no Units attribute).
pub fn units(obj: &InMemDicomObject, frame: Option<usize>) -> Option<String> {
    classic(obj, frame, |o| o.str_of(tags::UNITS)).or_else(|| {
        let f = frame?;
        group_str(obj, f, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tags::RESCALE_TYPE)
    })
}
