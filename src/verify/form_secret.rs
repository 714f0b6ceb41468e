//! A shared secret carried in the body (ThriveCart: the `thrivecart_secret` field equals
//! the account's secret word). Form or JSON bodies. Constant-time comparison. There is no
//! timestamp and no body integrity: a captured delivery could be altered and replayed, which
//! the README states plainly.
//!
//! What this module must never do: store or show the secret word: `redact` replaces it
//! before anything is kept.

use super::Error;
use crate::secret::Secret;
use subtle::ConstantTimeEq;

fn field_value(field: &str, body: &[u8]) -> Option<String> {
    let trimmed = body.iter().position(|b| !b.is_ascii_whitespace()).map(|i| &body[i..]).unwrap_or(body);
    if trimmed.first() == Some(&b'{') {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        return v.get(field).and_then(|v| v.as_str()).map(str::to_string);
    }
    form_urlencoded::parse(body).find(|(k, _)| k == field).map(|(_, v)| v.into_owned())
}

pub fn verify(secret: &Secret, field: &str, body: &[u8]) -> Result<(), Error> {
    let given = field_value(field, body).ok_or_else(|| Error::MissingHeader(format!("body field `{field}`")))?;
    if given.is_empty() {
        return Err(Error::MissingHeader(format!("body field `{field}`")));
    }
    if bool::from(given.as_bytes().ct_eq(secret.expose().as_bytes())) {
        Ok(())
    } else {
        Err(Error::Mismatch)
    }
}

/// The body with the secret field's value replaced, for storage.
pub fn redact(field: &str, body: &[u8]) -> Vec<u8> {
    let trimmed = body.iter().position(|b| !b.is_ascii_whitespace()).map(|i| &body[i..]).unwrap_or(body);
    if trimmed.first() == Some(&b'{') {
        return match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(mut v) => {
                if let Some(x) = v.get_mut(field) {
                    *x = serde_json::Value::String("[redacted]".into());
                }
                serde_json::to_vec(&v).unwrap_or_default()
            }
            Err(_) => body.to_vec(),
        };
    }
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(body) {
        if k == field {
            out.append_pair(&k, "[redacted]");
        } else {
            out.append_pair(&k, &v);
        }
    }
    out.finish().into_bytes()
}

/// Puts the secret into the body (`membersync send` playing ThriveCart).
pub fn insert(field: &str, secret: &Secret, body: &[u8]) -> Vec<u8> {
    let trimmed = body.iter().position(|b| !b.is_ascii_whitespace()).map(|i| &body[i..]).unwrap_or(body);
    if trimmed.first() == Some(&b'{') {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) {
            if let Some(map) = v.as_object_mut() {
                map.insert(field.to_string(), serde_json::Value::String(secret.expose().to_string()));
            }
            return serde_json::to_vec(&v).unwrap_or_default();
        }
        return body.to_vec();
    }
    let mut out = form_urlencoded::Serializer::new(String::new());
    let mut seen = false;
    for (k, v) in form_urlencoded::parse(body) {
        if k == field {
            out.append_pair(&k, secret.expose());
            seen = true;
        } else {
            out.append_pair(&k, &v);
        }
    }
    if !seen {
        out.append_pair(field, secret.expose());
    }
    out.finish().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_secret_checks_form_and_json_bodies() {
        let s = Secret::new("word");
        assert_eq!(verify(&s, "thrivecart_secret", b"event=x&thrivecart_secret=word"), Ok(()));
        assert_eq!(verify(&s, "thrivecart_secret", br#"{"thrivecart_secret":"word"}"#), Ok(()));
        assert_eq!(verify(&s, "thrivecart_secret", b"event=x&thrivecart_secret=nope"), Err(Error::Mismatch));
        assert!(matches!(verify(&s, "thrivecart_secret", b"event=x"), Err(Error::MissingHeader(_))));
        assert!(matches!(verify(&s, "thrivecart_secret", b"thrivecart_secret="), Err(Error::MissingHeader(_))));
    }

    #[test]
    fn form_secret_is_redacted_and_inserted() {
        let s = Secret::new("word");
        let body = insert("thrivecart_secret", &s, b"event=order.success&customer%5Bemail%5D=a%40b.c");
        assert_eq!(verify(&s, "thrivecart_secret", &body), Ok(()));
        let stored = redact("thrivecart_secret", &body);
        assert!(!String::from_utf8_lossy(&stored).contains("word"));
        assert!(String::from_utf8_lossy(&stored).contains("customer%5Bemail%5D=a%40b.c"));
        let json = redact("thrivecart_secret", br#"{"thrivecart_secret":"word","a":1}"#);
        assert_eq!(json, br#"{"a":1,"thrivecart_secret":"[redacted]"}"#);
    }
}
