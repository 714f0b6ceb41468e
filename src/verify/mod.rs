//! Verify stage: proves a delivery came from the provider, with the scheme the provider's
//! YAML names. Runs on the raw bytes before anything is decoded; never logs a secret or a
//! signature. `sign` is the exact inverse, used by `membersync send` and the tests.

mod form_secret;
mod hmac_hex;
mod standard;
mod stripe;

use crate::secret::Secret;
use crate::spec::{SchemeName, SecretEncoding, VerifySpec};
use chrono::{DateTime, Utc};

/// Why a delivery did not verify (all 401).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The signature header is absent (401).
    #[error("missing signature header `{0}`")]
    MissingHeader(String),
    /// The signature header cannot be parsed (401).
    #[error("malformed signature header `{0}`")]
    Malformed(String),
    /// The signed timestamp is outside the tolerance (401).
    #[error("signature timestamp is outside the {0} s tolerance")]
    Expired(i64),
    /// No signature matched the body under this tenant's secret (401).
    #[error("signature does not match")]
    Mismatch,
    /// The tenant has no secret configured for this provider (401).
    #[error("no secret configured for this provider")]
    NoSecret,
    /// The configured secret cannot be decoded as the scheme requires (401; a config error).
    #[error("the configured secret is not valid for this scheme ({0})")]
    BadSecret(String),
    /// Two headers name the delivery differently (`webhook-id` and `svix-id`): which one was
    /// signed decides the idempotency key, so neither is taken (400).
    #[error("{0}")]
    Conflicting(String),
}

/// A provider's verification, compiled once at load: its scheme, and the legacy schemes its
/// file also accepts (`verify_also`), tried only when the primary scheme's header is absent.
#[derive(Debug, Clone)]
pub struct Verifier {
    pub scheme: Scheme,
    also: Vec<Scheme>,
}

impl Verifier {
    pub fn compile(spec: &VerifySpec, also: &[VerifySpec]) -> Verifier {
        Verifier { scheme: Scheme::compile(spec), also: also.iter().map(Scheme::compile).collect() }
    }

    /// Checks a delivery with the primary scheme, then (its header absent) each legacy one.
    pub fn verify(
        &self,
        secret: Option<&Secret>,
        headers: &[(String, String)],
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        match self.scheme.verify(secret, headers, body, now) {
            Err(first @ Error::MissingHeader(_)) => {
                let mut result = Err(first);
                for alt in &self.also {
                    result = alt.verify(secret, headers, body, now);
                    if result.is_ok() {
                        break;
                    }
                }
                result
            }
            other => other,
        }
    }
}

/// A compiled verification scheme.
#[derive(Debug, Clone)]
pub struct Scheme {
    name: SchemeName,
    header: String,
    tolerance_secs: i64,
    field: String,
    encoding: SecretEncoding,
    legacy_digest_header: Option<String>,
}

impl Scheme {
    pub fn compile(spec: &VerifySpec) -> Scheme {
        let (header, tolerance) = match spec.scheme {
            SchemeName::Stripe => ("stripe-signature", 300),
            SchemeName::StandardWebhooks => ("webhook-signature", 300),
            SchemeName::FormSecret => ("", 0),
            SchemeName::HmacSha256Hex => ("x-signature", 0),
        };
        Scheme {
            name: spec.scheme,
            header: spec.header.clone().unwrap_or_else(|| header.to_string()).to_ascii_lowercase(),
            tolerance_secs: spec.tolerance_secs.unwrap_or(tolerance),
            field: spec.field.clone().unwrap_or_else(|| "secret".into()),
            encoding: spec.secret_encoding.unwrap_or_default(),
            legacy_digest_header: spec.legacy_digest_header.as_ref().map(|h| h.to_ascii_lowercase()),
        }
    }

    /// Whether a delivery with an empty body is a URL check to answer 200 without storing
    /// (ThriveCart probes the URL when it is added).
    pub fn empty_body_is_probe(&self) -> bool {
        self.name == SchemeName::FormSecret
    }

    /// The body as it may be stored and shown: a secret carried in the body is replaced.
    pub fn redact(&self, body: &[u8]) -> Vec<u8> {
        match self.name {
            SchemeName::FormSecret => form_secret::redact(&self.field, body),
            _ => body.to_vec(),
        }
    }

    /// Checks a delivery. `headers` are (lower-case name, value).
    pub fn verify(
        &self,
        secret: Option<&Secret>,
        headers: &[(String, String)],
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        let secret = secret.ok_or(Error::NoSecret)?;
        let header = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
        match self.name {
            SchemeName::Stripe => {
                let value = header(&self.header).ok_or_else(|| Error::MissingHeader(self.header.clone()))?;
                stripe::verify(secret, value, body, now, self.tolerance_secs)
            }
            SchemeName::StandardWebhooks => {
                standard::verify(&standard::key(secret, self.encoding)?, header, body, now, self.tolerance_secs)
            }
            SchemeName::FormSecret => form_secret::verify(secret, &self.field, body),
            SchemeName::HmacSha256Hex => {
                if let Some(v) = header(&self.header) {
                    return hmac_hex::verify(secret, v, body);
                }
                if let Some(legacy) = &self.legacy_digest_header {
                    if let Some(v) = header(legacy) {
                        return hmac_hex::verify_digest(secret, v, body);
                    }
                }
                Err(Error::MissingHeader(self.header.clone()))
            }
        }
    }

    /// Signs a body the way the provider does; returns the headers to send. `id` is the
    /// message id for schemes that sign one (a fresh one is made when `None`).
    pub fn sign(&self, secret: &Secret, body: &[u8], now: DateTime<Utc>) -> Vec<(String, String)> {
        self.sign_with_id(secret, body, now, None)
    }

    /// Like `sign`, with the message id to sign where the scheme signs one (a replayed
    /// delivery keeps its id; a new one gets a fresh id).
    pub fn sign_with_id(
        &self,
        secret: &Secret,
        body: &[u8],
        now: DateTime<Utc>,
        message_id: Option<&str>,
    ) -> Vec<(String, String)> {
        match self.name {
            SchemeName::Stripe => vec![(self.header.clone(), stripe::sign(secret, body, now.timestamp()))],
            SchemeName::StandardWebhooks => {
                let id =
                    message_id.map(str::to_string).unwrap_or_else(|| format!("msg_{}", uuid::Uuid::new_v4().simple()));
                match standard::key(secret, self.encoding) {
                    Ok(key) => standard::sign(&key, &id, now.timestamp(), body),
                    Err(_) => vec![],
                }
            }
            // The secret travels in the body; `send` puts it there (see `prepare_body`).
            SchemeName::FormSecret => vec![],
            SchemeName::HmacSha256Hex => vec![(self.header.clone(), hmac_hex::sign(secret, body))],
        }
    }

    /// The body to send for a scheme that carries the secret inside it (`send`).
    pub fn prepare_body(&self, secret: &Secret, body: &[u8]) -> Vec<u8> {
        match self.name {
            SchemeName::FormSecret => form_secret::insert(&self.field, secret, body),
            _ => body.to_vec(),
        }
    }
}
