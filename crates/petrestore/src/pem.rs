//! PEM certificates and private keys, read as the DICOM TLS listener and
//! the MQTT connection load them, and as `check-config` checks them first.
//! Errors name the configuration key and the file.

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key} {}: {e} (the daemon's user must read it too)", path.display()))
}

/// The certificates of a PEM file: at least one.
pub fn certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &read(key, path)?[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{key} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{key} {}: no certificate in the file (PEM \"BEGIN CERTIFICATE\" expected)", path.display()));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut &read(key, path)?[..])
        .map_err(|e| format!("{key} {}: {e}", path.display()))?
        .ok_or_else(|| format!("{key} {}: no private key in the file (PEM expected)", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key_and_the_file() {
        let d = tempfile::tempdir().unwrap();
        let junk = d.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = certs("mqtt.ca_file", &junk).unwrap_err();
        assert!(e.starts_with("mqtt.ca_file ") && e.contains("junk.pem") && e.contains("no certificate"), "{e}");
        let e = private_key("dicom.tls.key", &junk).unwrap_err();
        assert!(e.contains("dicom.tls.key") && e.contains("no private key"), "{e}");
        let e = certs("dicom.tls.cert", &d.path().join("missing.pem")).unwrap_err();
        assert!(e.contains("the daemon's user must read it too"), "{e}");
    }
}
