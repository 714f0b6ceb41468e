//! Stripe: `Stripe-Signature: t=<unix s>,v1=<hex>[,v1=<hex>…][,v0=…]`, HMAC-SHA256 over
//! `"{t}.{raw body}"` keyed with the whole `whsec_…` string as UTF-8. Any v1 may match
//! (secret rotation); v0 is ignored. Comparison is constant-time (`Mac::verify_slice`).
//!
//! What this module must never do: accept a signature outside the timestamp tolerance, or a
//! v0 signature.

use super::Error;
use crate::secret::Secret;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &Secret, t: &str, body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key length");
    m.update(t.as_bytes());
    m.update(b".");
    m.update(body);
    m
}

pub fn verify(secret: &Secret, header: &str, body: &[u8], now: DateTime<Utc>, tolerance: i64) -> Result<(), Error> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or_else(|| Error::Malformed("stripe-signature".into()))?;
        match k {
            "t" => t = Some(v),
            "v1" => sigs.push(v),
            _ => {}
        }
    }
    let t = t.ok_or_else(|| Error::Malformed("stripe-signature".into()))?;
    let ts: i64 = t.parse().map_err(|_| Error::Malformed("stripe-signature".into()))?;
    if sigs.is_empty() {
        return Err(Error::Malformed("stripe-signature".into()));
    }
    let m = mac(secret, t, body);
    let ok = sigs.iter().filter_map(|s| hex::decode(s).ok()).any(|s| m.clone().verify_slice(&s).is_ok());
    if !ok {
        return Err(Error::Mismatch);
    }
    if (now.timestamp() - ts).abs() > tolerance {
        return Err(Error::Expired(tolerance));
    }
    Ok(())
}

pub fn sign(secret: &Secret, body: &[u8], t: i64) -> String {
    let t = t.to_string();
    let sig = hex::encode(mac(secret, &t, body).finalize().into_bytes());
    format!("t={t},v1={sig}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_767_225_600, 0).unwrap()
    }

    #[test]
    fn stripe_signature_round_trips() {
        let s = Secret::new("whsec_test");
        let h = sign(&s, b"{}", now().timestamp());
        assert!(verify(&s, &h, b"{}", now(), 300).is_ok());
    }

    #[test]
    fn stripe_signature_matches_known_vector() {
        // HMAC-SHA256("whsec_test", "1767225600.{}") computed independently with `openssl dgst -sha256 -hmac`.
        let h = sign(&Secret::new("whsec_test"), b"{}", 1_767_225_600);
        assert_eq!(h, "t=1767225600,v1=4a942ef9477fb7b15b98664cf7ff2c2543984c1fa6bdf3520b48dcb25bcd1fe4");
    }

    #[test]
    fn stripe_signature_with_any_matching_v1_verifies() {
        let s = Secret::new("whsec_test");
        let good = sign(&s, b"{}", now().timestamp());
        let v1 = good.split_once("v1=").unwrap().1;
        let h = format!("t={},v1={},v1={v1},v0=abc", now().timestamp(), "00".repeat(32));
        assert!(verify(&s, &h, b"{}", now(), 300).is_ok());
    }

    #[test]
    fn stripe_signature_rejects_tamper_wrong_secret_and_old_timestamp() {
        let s = Secret::new("whsec_test");
        let h = sign(&s, b"{}", now().timestamp());
        assert_eq!(verify(&s, &h, b"{ }", now(), 300), Err(Error::Mismatch));
        assert_eq!(verify(&Secret::new("whsec_other"), &h, b"{}", now(), 300), Err(Error::Mismatch));
        let later = now() + chrono::Duration::seconds(301);
        assert_eq!(verify(&s, &h, b"{}", later, 300), Err(Error::Expired(300)));
        // The tolerance is inclusive, either way of the clock (Stripe's SDKs: 300 s).
        for off in [-300, 300] {
            let at = now() + chrono::Duration::seconds(off);
            assert_eq!(verify(&s, &h, b"{}", at, 300), Ok(()), "{off} s off");
        }
        let earlier = now() - chrono::Duration::seconds(301);
        assert_eq!(verify(&s, &h, b"{}", earlier, 300), Err(Error::Expired(300)));
        assert!(matches!(verify(&s, "garbage", b"{}", now(), 300), Err(Error::Malformed(_))));
        assert!(matches!(verify(&s, "t=1", b"{}", now(), 300), Err(Error::Malformed(_))));
    }
}
