//! UID and AE-title rules. Every UID that becomes a path component passes
//! [`valid_uid`] first (a UID like `../x` is hostile input, not a name).

/// A DICOM UID: 1..=64 chars of digits and dots, no empty component, no
/// leading zero in a multi-digit component (PS3.5 9.1).
pub fn valid_uid(uid: &str) -> bool {
    if uid.is_empty() || uid.len() > 64 {
        return false;
    }
    uid.split('.').all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) && !(c.len() > 1 && c.starts_with('0')))
}

/// An AE title: 1..=16 printable ASCII characters, no backslash, not all spaces.
pub fn valid_ae_title(ae: &str) -> bool {
    !ae.is_empty() && ae.len() <= 16 && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\') && !ae.trim().is_empty()
}

/// Deterministic derived UID: `2.25.` + the decimal of a name-based (v5)
/// UUID of `source` and `salt` (the model id). Reprocessing the same source
/// with the same model yields the same UID (README.md "How it works": idempotent).
pub fn derived_uid(source: &str, salt: &str) -> String {
    // Fixed namespace for petrestore (a random v4 UUID chosen once).
    const NS: uuid::Uuid = uuid::Uuid::from_u128(0x6a1c_3f0e_2b7d_4c59_9e41_8d0a_57b3_c2e1);
    let name = format!("{source}|{salt}");
    let u = uuid::Uuid::new_v5(&NS, name.as_bytes());
    format!("2.25.{}", u.as_u128())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_rules() {
        assert!(valid_uid("1.2.840.10008.5.1.4.1.1.128"));
        assert!(valid_uid("2.25.0"));
        for bad in ["", "../x", "1..2", "1.2.", ".1", "1.02", "1.2.a", "1/2", &"1.".repeat(40)] {
            assert!(!valid_uid(bad), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn ae_rules() {
        assert!(valid_ae_title("CONSOLE"));
        assert!(!valid_ae_title(""));
        assert!(!valid_ae_title("   "));
        assert!(!valid_ae_title("A\\B"));
        assert!(!valid_ae_title("SEVENTEEN_CHARSXX"));
    }

    #[test]
    fn derived_uids_are_deterministic_valid_and_distinct() {
        let a = derived_uid("1.2.3.4", "gaussian-fwhm4");
        assert_eq!(a, derived_uid("1.2.3.4", "gaussian-fwhm4"));
        assert_ne!(a, derived_uid("1.2.3.5", "gaussian-fwhm4"));
        assert_ne!(a, derived_uid("1.2.3.4", "gaussian-fwhm5"));
        assert!(a.starts_with("2.25.") && valid_uid(&a), "{a}");
    }
}
