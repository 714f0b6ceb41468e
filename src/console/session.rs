//! Console sessions: the admin token traded once, at `/console/login`, for a cookie that
//! names the scope (every tenant, or one) and when it ends, signed with HMAC-SHA256 under
//! the token of that scope. The token itself is never in the cookie, a URL or a page; the
//! cookie is `HttpOnly`, `SameSite=Strict` and scoped to `/console`. Changing the admin
//! token ends every session it signed; logging out ends that session for good (the store
//! keeps it until it would have expired: a restart does not bring it back).
//!
//! What this module must never do: accept a cookie whose signature, scope or expiry does
//! not check out, or put a token anywhere it could be read back.

use crate::config::Config;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The cookie's name.
pub const COOKIE: &str = "membersync_console";

/// How long a session lasts.
pub const LIFETIME: chrono::Duration = chrono::Duration::hours(8);

/// A signed-in operator: every tenant (`tenant: None`) or one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub tenant: Option<String>,
    pub expires: DateTime<Utc>,
    nonce: String,
}

impl Session {
    /// Whether this session may see `tenant`'s data.
    pub fn allows(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }

    /// What names this session when it is ended (`Store::console_session_ended`).
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// Who acted, as the activity log records it.
    pub fn who(&self) -> String {
        match &self.tenant {
            None => "the global admin token (console)".into(),
            Some(t) => format!("tenant {t}'s admin token (console)"),
        }
    }
}

/// The scope a token opens (every tenant, or one), if it is an admin token.
pub fn scope_of(config: &Config, token: &str) -> Option<Option<String>> {
    let matches =
        |s: &crate::secret::Secret| !token.is_empty() && bool::from(token.as_bytes().ct_eq(s.expose().as_bytes()));
    if config.admin_token.as_ref().is_some_and(matches) {
        return Some(None);
    }
    config.tenants.values().find(|t| t.admin_token.as_ref().is_some_and(matches)).map(|t| Some(t.name.clone()))
}

/// The token that signs a scope's sessions.
fn key_of(config: &Config, tenant: Option<&str>) -> Option<String> {
    match tenant {
        None => config.admin_token.as_ref().map(|s| s.expose().to_string()),
        Some(t) => config.tenants.get(t)?.admin_token.as_ref().map(|s| s.expose().to_string()),
    }
}

fn mac(key: &str, payload: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    m.update(b"membersync console session\n");
    m.update(payload.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// A new session's cookie value for `tenant`'s scope, from `now`.
pub fn issue(config: &Config, tenant: Option<String>, now: DateTime<Utc>) -> Option<String> {
    let key = key_of(config, tenant.as_deref())?;
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let payload = serde_json::json!({ "t": tenant, "e": (now + LIFETIME).timestamp(), "n": nonce }).to_string();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
    Some(format!("{payload}.{}", hex::encode(mac(&key, &payload))))
}

/// The session a cookie value stands for, if its signature and time check out now (whether
/// it was logged out is the store's to say).
pub fn check(config: &Config, value: &str, now: DateTime<Utc>) -> Option<Session> {
    let (payload, signature) = value.split_once('.')?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let tenant = match &v["t"] {
        serde_json::Value::Null => None,
        serde_json::Value::String(t) => Some(t.clone()),
        _ => return None,
    };
    let key = key_of(config, tenant.as_deref())?;
    let given = hex::decode(signature).ok()?;
    if !bool::from(given.as_slice().ct_eq(&mac(&key, payload))) {
        return None;
    }
    let expires = DateTime::from_timestamp(v["e"].as_i64()?, 0)?;
    let nonce = v["n"].as_str()?.to_string();
    if expires <= now {
        return None;
    }
    Some(Session { tenant, expires, nonce })
}

/// The value of the console's cookie in a `Cookie` header.
pub fn from_headers(headers: &axum::http::HeaderMap) -> Option<String> {
    headers.get_all(axum::http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';').map(str::trim).find_map(|kv| kv.strip_prefix(COOKIE)?.strip_prefix('=').map(str::to_string))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("membersync.yaml")).unwrap()
    }

    #[test]
    fn a_session_checks_out_until_it_expires_or_is_tampered_with() {
        let c = config();
        let now = Utc::now();
        let v = issue(&c, None, now).unwrap();
        let s = check(&c, &v, now).expect("fresh");
        assert_eq!(s.tenant, None);
        assert!(!v.contains(c.admin_token.as_ref().unwrap().expose()), "the token is not in the cookie");
        assert!(check(&c, &v, now + LIFETIME).is_none(), "expired");
        // Another scope in the payload, same signature: refused.
        let (payload, sig) = v.split_once('.').unwrap();
        let forged = serde_json::json!({"t": "demo", "e": (now + LIFETIME).timestamp(), "n": "x"}).to_string();
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged);
        assert!(check(&c, &format!("{forged}.{sig}"), now).is_none());
        assert!(check(&c, &format!("{payload}.{}", "00".repeat(32)), now).is_none());
        assert!(check(&c, "garbage", now).is_none());
        // Another token signs differently: a changed admin token ends its sessions.
        let mut other = c.clone();
        other.admin_token = Some(crate::secret::Secret::new("another-token"));
        assert!(check(&other, &v, now).is_none());
        assert_eq!(s.nonce().len(), 32);
    }
}
