//! DICOM building blocks shared by ingest, derive and egress: UID and AE-title
//! rules, DIMSE command messages, Part 10 files and attribute access.

pub mod attrs;
pub mod commitment;
pub mod dimse;
pub mod frames;
pub mod guard;
pub mod part10;
pub mod uid;

/// PET Image Storage.
pub const PET_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.128";
/// Enhanced PET Image Storage.
pub const ENHANCED_PET_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.130";
/// Legacy Converted Enhanced PET Image Storage.
pub const LEGACY_ENHANCED_PET_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.128.1";
/// The PET storage classes we accept for restoration.
pub const PET_STORAGE_CLASSES: &[&str] = &[PET_IMAGE_STORAGE, ENHANCED_PET_IMAGE_STORAGE, LEGACY_ENHANCED_PET_IMAGE_STORAGE];
/// Storage classes accepted for pass-through when configured (CT and
/// friends of a PET-CT study).
pub const PASSTHROUGH_STORAGE_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.2",     // CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",   // Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",     // MR Image Storage
    "1.2.840.10008.5.1.4.1.1.7",     // Secondary Capture
    "1.2.840.10008.5.1.4.1.1.66",    // Raw Data
    "1.2.840.10008.5.1.4.1.1.66.1",  // Spatial Registration
    "1.2.840.10008.5.1.4.1.1.88.67", // X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.22", // Enhanced SR
    "1.2.840.10008.5.1.4.1.1.481.1", // RT Image
];
/// Verification SOP class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Implicit VR Little Endian (the DICOM default every peer supports).
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Transfer syntaxes we decode, in order of preference.
pub const SUPPORTED_TS: &[&str] = &[EXPLICIT_VR_LE, IMPLICIT_VR_LE];

/// Our implementation class UID (a `2.25.` UUID-derived root).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.181426092312095717419383418146468390917";
/// Our implementation version name (≤ 16 chars).
pub const IMPLEMENTATION_VERSION_NAME: &str = "PETRESTORE_010";

/// Look up a transfer syntax we can read and write.
pub fn transfer_syntax(uid: &str) -> Option<&'static dicom_encoding::TransferSyntax> {
    use dicom_encoding::TransferSyntaxIndex;
    let uid = uid.trim_end_matches(['\0', ' ']);
    if !SUPPORTED_TS.contains(&uid) {
        return None;
    }
    dicom_transfer_syntax_registry::TransferSyntaxRegistry.get(uid)
}

/// Format a DS value in at most 16 characters.
pub fn ds(v: f64) -> String {
    let plain = format!("{v}");
    if plain.len() <= 16 { plain } else { format!("{v:.9E}") }
}
