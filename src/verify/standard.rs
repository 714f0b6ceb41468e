//! Standard Webhooks (Svix; Whop and Memberstack): `webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64> [v1,<base64>…]` — or the same with the `svix-` prefix.
//! HMAC-SHA256 over `"{id}.{timestamp}.{raw body}"`; the key is the secret decoded as the
//! provider YAML says (default: `whsec_` stripped, base64-decoded). Any listed v1 may
//! match; the timestamp must be within the tolerance.
//!
//! What this module must never do: accept a signature outside the timestamp tolerance.

use super::Error;
use crate::secret::Secret;
use crate::spec::SecretEncoding;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The HMAC key for a configured secret.
pub fn key(secret: &Secret, encoding: SecretEncoding) -> Result<Vec<u8>, Error> {
    let s = secret.expose();
    match encoding {
        SecretEncoding::Raw => Ok(s.as_bytes().to_vec()),
        SecretEncoding::WhsecBase64 => STANDARD
            .decode(s.strip_prefix("whsec_").unwrap_or(s))
            .map_err(|_| Error::BadSecret("expected whsec_<base64>".into())),
        SecretEncoding::Hex => {
            let h = s.strip_prefix("whsec_").or_else(|| s.strip_prefix("ws_")).unwrap_or(s);
            hex::decode(h).map_err(|_| Error::BadSecret("expected a hex secret".into()))
        }
    }
}

fn mac(key: &[u8], id: &str, ts: &str, body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(id.as_bytes());
    m.update(b".");
    m.update(ts.as_bytes());
    m.update(b".");
    m.update(body);
    m
}

pub fn verify<'a>(
    key: &[u8],
    header: impl Fn(&str) -> Option<&'a str>,
    body: &[u8],
    now: DateTime<Utc>,
    tolerance: i64,
) -> Result<(), Error> {
    let pick = |name: &str| header(&format!("webhook-{name}")).or_else(|| header(&format!("svix-{name}")));
    // The id is signed and is the delivery's idempotency key: one delivery, one id. Both
    // header families naming different ids would let a captured delivery be resent under
    // a fresh unsigned id.
    if let (Some(a), Some(b)) = (header("webhook-id"), header("svix-id")) {
        if a.trim() != b.trim() {
            return Err(Error::Conflicting("webhook-id and svix-id name different ids".into()));
        }
    }
    let id = pick("id").ok_or_else(|| Error::MissingHeader("webhook-id".into()))?;
    let ts = pick("timestamp").ok_or_else(|| Error::MissingHeader("webhook-timestamp".into()))?;
    let sigs = pick("signature").ok_or_else(|| Error::MissingHeader("webhook-signature".into()))?;
    let t: i64 = ts.trim().parse().map_err(|_| Error::Malformed("webhook-timestamp".into()))?;
    let m = mac(key, id, ts.trim(), body);
    let ok = sigs
        .split_whitespace()
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b| STANDARD.decode(b).ok())
        .any(|s| m.clone().verify_slice(&s).is_ok());
    if !ok {
        return Err(Error::Mismatch);
    }
    if (now.timestamp() - t).abs() > tolerance {
        return Err(Error::Expired(tolerance));
    }
    Ok(())
}

pub fn sign(key: &[u8], id: &str, ts: i64, body: &[u8]) -> Vec<(String, String)> {
    let ts = ts.to_string();
    let sig = STANDARD.encode(mac(key, id, &ts, body).finalize().into_bytes());
    vec![
        ("webhook-id".into(), id.to_string()),
        ("webhook-timestamp".into(), ts),
        ("webhook-signature".into(), format!("v1,{sig}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn lookup<'a>(h: &'a [(String, String)]) -> impl Fn(&str) -> Option<&'a str> {
        move |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str())
    }

    #[test]
    fn standard_webhooks_matches_the_svix_reference_vector() {
        // The example from Svix's "verifying manually" guide.
        let k = key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), SecretEncoding::WhsecBase64).unwrap();
        let body = br#"{"test": 2432232314}"#;
        let h = vec![
            ("webhook-id".to_string(), "msg_p5jXN8AQM9LWM0D4loKWxJek".to_string()),
            ("webhook-timestamp".to_string(), "1614265330".to_string()),
            ("webhook-signature".to_string(), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".to_string()),
        ];
        let now = Utc.timestamp_opt(1614265330, 0).unwrap();
        assert_eq!(verify(&k, lookup(&h), body, now, 300), Ok(()));
    }

    #[test]
    fn standard_webhooks_accepts_svix_prefix_and_any_listed_signature() {
        let k = key(&Secret::new("whsec_c2VjcmV0Cg=="), SecretEncoding::WhsecBase64).unwrap();
        assert_eq!(k, b"secret\n");
        let signed = sign(&k, "msg_1", 1000, b"{}");
        let sig = signed[2].1.clone();
        let h = vec![
            ("svix-id".to_string(), "msg_1".to_string()),
            ("svix-timestamp".to_string(), "1000".to_string()),
            ("svix-signature".to_string(), format!("v1,AAAA {sig}")),
        ];
        let now = Utc.timestamp_opt(1000, 0).unwrap();
        assert_eq!(verify(&k, lookup(&h), b"{}", now, 300), Ok(()));
        assert_eq!(verify(&k, lookup(&h), b"{ }", now, 300), Err(Error::Mismatch));
        let late = Utc.timestamp_opt(1301, 0).unwrap();
        assert_eq!(verify(&k, lookup(&h), b"{}", late, 300), Err(Error::Expired(300)));
        // The tolerance is inclusive, either way of the clock: 300 s off is still accepted.
        for at in [700, 1300] {
            assert_eq!(verify(&k, lookup(&h), b"{}", Utc.timestamp_opt(at, 0).unwrap(), 300), Ok(()), "at {at}");
        }
        assert_eq!(verify(&k, lookup(&h), b"{}", Utc.timestamp_opt(699, 0).unwrap(), 300), Err(Error::Expired(300)));
        assert!(matches!(verify(&k, lookup(&h[..2]), b"{}", now, 300), Err(Error::MissingHeader(_))));
    }

    #[test]
    fn secret_encodings_decode_as_configured() {
        assert_eq!(key(&Secret::new("ws_0a0b"), SecretEncoding::Hex).unwrap(), vec![10, 11]);
        assert_eq!(key(&Secret::new("ws_0a0b"), SecretEncoding::Raw).unwrap(), b"ws_0a0b".to_vec());
        assert!(key(&Secret::new("whsec_!!"), SecretEncoding::WhsecBase64).is_err());
    }
}
