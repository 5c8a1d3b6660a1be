//! DICOM Part 10 files: the spool keeps what arrived byte for byte behind a
//! file meta header; derived instances are encoded whole.

use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

/// Preamble, magic and file meta group for a data set already encoded in
/// `transfer_syntax`. The data set bytes follow unchanged.
pub fn header(sop_class: &str, sop_instance: &str, transfer_syntax: &str, source_ae: &str) -> Result<Vec<u8>, String> {
    let mut b = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid(super::IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(super::IMPLEMENTATION_VERSION_NAME);
    if !source_ae.is_empty() {
        b = b.source_application_entity_title(source_ae);
    }
    let meta = b.build().map_err(|e| e.to_string())?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Encode a data set as a Part 10 file in Explicit VR Little Endian.
pub fn encode(obj: InMemDicomObject) -> Result<Vec<u8>, String> {
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(super::EXPLICIT_VR_LE)
                .implementation_class_uid(super::IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(super::IMPLEMENTATION_VERSION_NAME),
        )
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    file.write_all(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Open a Part 10 file.
pub fn open(path: &std::path::Path) -> Result<DefaultDicomObject, String> {
    dicom_object::open_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// SOP Class UID and SOP Instance UID from a Part 10 file's meta group,
/// without reading its data set.
pub fn sop_of(path: &std::path::Path) -> Result<(String, String), String> {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(dicom_core::Tag(0x0008, 0x0000))
        .open_file(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let m = obj.meta();
    Ok((
        m.media_storage_sop_class_uid().trim_end_matches('\0').to_owned(),
        m.media_storage_sop_instance_uid().trim_end_matches('\0').to_owned(),
    ))
}

/// Encode only the data set (no meta) in the given transfer syntax, for
/// sending over an association.
pub fn dataset_bytes(obj: &InMemDicomObject, ts_uid: &str) -> Result<Vec<u8>, String> {
    let ts = super::transfer_syntax(ts_uid).ok_or_else(|| format!("unsupported transfer syntax {ts_uid}"))?;
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts).map_err(|e| e.to_string())?;
    Ok(out)
}
