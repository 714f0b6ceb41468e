//! Hex HMAC-SHA256 of the raw body in one header (Memberful's
//! `X-Memberful-Webhook-Signature`); optionally the legacy digest, hex SHA-256 of
//! `body + secret`, in another. Constant-time comparison; no timestamp.
//!
//! What this module must never do: accept the legacy digest when the primary signature
//! header is present.

use super::Error;
use crate::secret::Secret;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &Secret, body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key length");
    m.update(body);
    m
}

pub fn verify(secret: &Secret, header: &str, body: &[u8]) -> Result<(), Error> {
    let given =
        hex::decode(header.trim().trim_start_matches("sha256=")).map_err(|_| Error::Malformed("signature".into()))?;
    mac(secret, body).verify_slice(&given).map_err(|_| Error::Mismatch)
}

pub fn verify_digest(secret: &Secret, header: &str, body: &[u8]) -> Result<(), Error> {
    let mut h = Sha256::new();
    h.update(body);
    h.update(secret.expose().as_bytes());
    let want = hex::encode(h.finalize());
    if bool::from(want.as_bytes().ct_eq(header.trim().to_ascii_lowercase().as_bytes())) {
        Ok(())
    } else {
        Err(Error::Mismatch)
    }
}

pub fn sign(secret: &Secret, body: &[u8]) -> String {
    hex::encode(mac(secret, body).finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_hex_round_trips_and_matches_openssl() {
        let s = Secret::new("secret");
        // printf '{}' | openssl dgst -sha256 -hmac secret
        let sig = sign(&s, b"{}");
        assert_eq!(sig, "77325902caca812dc259733aacd046b73817372c777b8d95b402647474516e13");
        assert_eq!(verify(&s, &sig, b"{}"), Ok(()));
        assert_eq!(verify(&s, &sig, b"{ }"), Err(Error::Mismatch));
        assert_eq!(verify(&Secret::new("other"), &sig, b"{}"), Err(Error::Mismatch));
        assert!(matches!(verify(&s, "zz", b"{}"), Err(Error::Malformed(_))));
    }

    #[test]
    fn legacy_digest_is_sha256_of_body_then_secret() {
        // printf '{}secret' | sha256sum
        let d = "6826e169e270a699d36407a3e3f9c9bba4778bb9b27c99e99a0bf47762093d46";
        assert_eq!(verify_digest(&Secret::new("secret"), d, b"{}"), Ok(()));
        assert_eq!(verify_digest(&Secret::new("secret"), d, b"{ }"), Err(Error::Mismatch));
    }
}
