//! Verify stage: proves a delivery came from the provider, with the scheme the provider's
//! YAML names. Runs on the raw bytes before anything is decoded; never logs a secret or a
//! signature. `sign` is the exact inverse, used by `membersync send` and the tests.

mod stripe;

use crate::extract::spec::{SchemeName, VerifySpec};
use crate::secret::Secret;
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
}

/// A compiled verification scheme.
#[derive(Debug, Clone)]
pub struct Scheme {
    name: SchemeName,
    header: String,
    tolerance_secs: i64,
}

impl Scheme {
    pub fn compile(spec: &VerifySpec) -> Scheme {
        let (header, tolerance) = match spec.scheme {
            SchemeName::Stripe => ("stripe-signature", 300),
        };
        Scheme {
            name: spec.scheme,
            header: spec
                .header
                .clone()
                .unwrap_or_else(|| header.to_string())
                .to_ascii_lowercase(),
            tolerance_secs: spec.tolerance_secs.unwrap_or(tolerance),
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
        let value = headers
            .iter()
            .find(|(k, _)| *k == self.header)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| Error::MissingHeader(self.header.clone()))?;
        match self.name {
            SchemeName::Stripe => stripe::verify(secret, value, body, now, self.tolerance_secs),
        }
    }

    /// Signs a body the way the provider does; returns the headers to send.
    pub fn sign(&self, secret: &Secret, body: &[u8], now: DateTime<Utc>) -> Vec<(String, String)> {
        match self.name {
            SchemeName::Stripe => vec![(
                self.header.clone(),
                stripe::sign(secret, body, now.timestamp()),
            )],
        }
    }
}
