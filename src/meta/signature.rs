//! `X-Hub-Signature-256`: HMAC-SHA256 of the raw request body, keyed by the
//! Meta app secret, sent as `sha256=<64 lowercase hex>`.
//!
//! The HMAC is computed over the bytes exactly as received (never over a
//! re-serialized body) and compared in constant time. An app may have two
//! valid secrets during a rotation; a body signed by either verifies.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Why a signature did not verify. The distinction only feeds metrics and
/// logs; every variant is answered 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    #[error("malformed X-Hub-Signature-256 header (expected sha256=<64 hex digits>)")]
    Malformed,
    #[error("signature does not match the body")]
    Mismatch,
}

impl SignatureError {
    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::Mismatch => "signature_mismatch",
        }
    }
}

/// Parses `sha256=<hex>` into the 32-byte digest.
pub fn parse_header(value: &[u8]) -> Result<[u8; 32], SignatureError> {
    let value = value.trim_ascii();
    let hex_part = value
        .strip_prefix(b"sha256=")
        .ok_or(SignatureError::Malformed)?;
    if hex_part.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| SignatureError::Malformed)?;
    Ok(out)
}

/// Verifies `header` against `body` with any of `secrets`, in constant time
/// with respect to the digest.
pub fn verify(
    header: Option<&[u8]>,
    body: &[u8],
    secrets: &[Secret],
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let expected = parse_header(header)?;
    let mut ok = false;
    for secret in secrets {
        let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(body);
        // `verify_slice` compares in constant time.
        ok |= mac.verify_slice(&expected).is_ok();
    }
    if ok {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The header value Meta would send for `body` signed with `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR: &str = include_str!("../../tests/fixtures/signature_test_vector.json");

    fn vector() -> (String, Vec<u8>, String, String, String) {
        let v: serde_json::Value = serde_json::from_str(VECTOR).unwrap();
        (
            v["app_secret"].as_str().unwrap().to_string(),
            v["raw_body"].as_str().unwrap().as_bytes().to_vec(),
            v["expected_X-Hub-Signature-256"]
                .as_str()
                .unwrap()
                .to_string(),
            v["wrong_if_reserialized_utf8"]
                .as_str()
                .unwrap()
                .to_string(),
            v["wrong_if_reserialized_ascii_escaped"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    }

    #[test]
    fn meta_vector_verifies() {
        let (secret, body, expected, _, _) = vector();
        // The raw body carries \u00e9, a surrogate-pair emoji and \/ escapes.
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains(r"caf\u00e9"));
        assert!(text.contains(r"\ud83d\ude00"));
        assert!(text.contains(r"https:\/\/"));
        assert_eq!(sign(secret.as_bytes(), &body), expected);
        verify(Some(expected.as_bytes()), &body, &[Secret::new(secret)]).unwrap();
    }

    #[test]
    fn reserialized_bodies_do_not_verify() {
        let (secret, body, _, wrong_utf8, wrong_ascii) = vector();
        let s = [Secret::new(secret)];
        assert_eq!(
            verify(Some(wrong_utf8.as_bytes()), &body, &s),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(Some(wrong_ascii.as_bytes()), &body, &s),
            Err(SignatureError::Mismatch)
        );
        // Re-serializing the parsed body (what a framework would do) changes the bytes.
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let reser = serde_json::to_vec(&parsed).unwrap();
        assert_ne!(reser, body);
        let (_, _, expected, _, _) = vector();
        assert_eq!(
            verify(Some(expected.as_bytes()), &reser, &s),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn wrong_secret_missing_and_garbled_headers() {
        let (_, body, expected, _, _) = vector();
        let wrong = [Secret::new("another_secret")];
        assert_eq!(
            verify(Some(expected.as_bytes()), &body, &wrong),
            Err(SignatureError::Mismatch)
        );
        let s = [Secret::new("x")];
        assert_eq!(verify(None, &body, &s), Err(SignatureError::Missing));
        for bad in [
            "",
            "sha256=",
            "sha1=98760b7010344f1f9d8f9678ffae1e8551d7c490475fdaaf477b0b9a39d3ef91",
            "98760b7010344f1f9d8f9678ffae1e8551d7c490475fdaaf477b0b9a39d3ef91",
            "sha256=98760b7010344f1f9d8f9678ffae1e8551d7c490475fdaaf477b0b9a39d3ef9",
            "sha256=zz760b7010344f1f9d8f9678ffae1e8551d7c490475fdaaf477b0b9a39d3ef91",
            "sha256=mDYLcBA0Tx+dj5Z4/64ehVHXxJBHXaivR3sLmjnT75E=",
        ] {
            assert_eq!(
                verify(Some(bad.as_bytes()), &body, &s),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn rotation_accepts_either_secret() {
        let body = b"{\"object\":\"whatsapp_business_account\",\"entry\":[]}";
        let secrets = [Secret::new("new-secret"), Secret::new("old-secret")];
        for k in ["new-secret", "old-secret"] {
            let h = sign(k.as_bytes(), body);
            verify(Some(h.as_bytes()), body, &secrets).unwrap();
        }
        let h = sign(b"third", body);
        assert_eq!(
            verify(Some(h.as_bytes()), body, &secrets),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn one_flipped_byte_fails() {
        let (secret, mut body, expected, _, _) = vector();
        let s = [Secret::new(secret)];
        let last = body.len() - 2;
        body[last] ^= 1;
        assert_eq!(
            verify(Some(expected.as_bytes()), &body, &s),
            Err(SignatureError::Mismatch)
        );
    }
}
