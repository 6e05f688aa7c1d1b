//! The CA pin: `sha256:` and the hex SHA-256 of a CA certificate's
//! SubjectPublicKeyInfo. Joining processes and `turnstile login` check the
//! cluster's TLS CA against it.

use sha2::{Digest, Sha256};

use crate::error::ApiError;

pub const PREFIX: &str = "sha256:";

/// The pin of a CA certificate in DER.
pub fn ca_pin_of_der(der: &[u8]) -> Result<String, ApiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| ApiError::bad_parameter(format!("CA certificate is not valid: {e}")))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(format!("{PREFIX}{}", hex::encode(Sha256::digest(spki))))
}

/// The pin of a CA certificate in PEM.
pub fn ca_pin_of_pem(pem: &str) -> Result<String, ApiError> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| ApiError::bad_parameter(format!("CA certificate is not PEM: {e}")))?;
    ca_pin_of_der(&parsed.contents)
}

/// Checks a pin as written by an operator: `sha256:` and 64 hex digits.
pub fn validate(pin: &str) -> Result<(), String> {
    let hex_part = pin.strip_prefix(PREFIX).ok_or_else(|| {
        format!("{pin:?} does not start with {PREFIX:?}; copy the pin `turnstile start` or `admin tokens add` printed")
    })?;
    if hex_part.len() != 64 || !hex_part.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{pin:?} is not sha256: followed by 64 hex digits; copy the pin `turnstile start` or `admin tokens add` printed"
        ));
    }
    Ok(())
}

/// Do two pins name the same key (hex case aside)?
pub fn matches(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The uncompressed public key point inside a CA certificate, for verifying
/// what the CA signed.
pub fn ca_public_key_of_pem(pem: &str) -> Result<Vec<u8>, ApiError> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| ApiError::bad_parameter(format!("CA certificate is not PEM: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&parsed.contents)
        .map_err(|e| ApiError::bad_parameter(format!("CA certificate is not valid: {e}")))?;
    Ok(cert
        .tbs_certificate
        .subject_pki
        .subject_public_key
        .data
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_checked_for_form() {
        assert!(validate(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        assert!(validate("sha1:abcd").is_err());
        assert!(validate("sha256:xyz").is_err());
        assert!(matches("sha256:AB", "sha256:ab"));
    }
}
