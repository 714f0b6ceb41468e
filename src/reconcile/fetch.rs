//! The provider request: per-provider rate limit, time limit, and 429 `Retry-After`.
//! Errors are plain text for the operator; they name the method and URL (which never hold
//! the API key: that lives in headers only) and never a header.

use super::error::Unreachable;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// How many 429 answers in a row one attempt waits out before giving up until next pass.
pub const MAX_RETRIES_429: usize = 3;

/// The largest answer read from a provider (one membership's view is a few KB).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The longest `Retry-After` read as such; anything longer (or out of range) is this, and
/// then over the configured wait, so the attempt gives up until the next pass.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(365 * 86_400);

/// Spaces requests to one provider evenly; a 429 holds every request to it back.
#[derive(Debug)]
pub struct Limiter {
    next: Mutex<Option<Instant>>,
    gap: Duration,
}

impl Limiter {
    pub fn new(rate_per_sec: f64) -> Limiter {
        Limiter { next: Mutex::new(None), gap: Duration::from_secs_f64(1.0 / rate_per_sec.max(0.001)) }
    }

    /// Whether this limiter spaces requests as one for `rate_per_sec` would.
    pub fn paces_as(&self, rate_per_sec: f64) -> bool {
        self.gap == Limiter::new(rate_per_sec).gap
    }

    /// Waits for this provider's next free slot.
    pub async fn acquire(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let at = next.map_or(now, |n| n.max(now));
            *next = Some(at + self.gap);
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// No request to this provider before `wait` from now (a 429's `Retry-After`).
    pub async fn hold_off(&self, wait: Duration) {
        let mut next = self.next.lock().await;
        let until = Instant::now() + wait;
        *next = Some(next.map_or(until, |n| n.max(until)));
    }
}

/// One prepared request.
pub struct Request {
    pub method: reqwest::Method,
    pub url: String,
    /// Header values may hold the API key: never print them.
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    /// `GET https://…`: what logs, errors and the activity log show.
    pub fn describe(&self) -> String {
        format!("{} {}", self.method, self.url)
    }
}

/// Sends `req`, honouring the limiter and 429 `Retry-After` (up to `max_wait` each time).
/// Any other non-2xx, a transport error or the time limit is an error.
pub async fn send(
    client: &reqwest::Client,
    limiter: &Limiter,
    req: &Request,
    timeout: Duration,
    max_wait: Duration,
) -> Result<Vec<u8>, Unreachable> {
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| Unreachable::HeaderName(k.clone()))?;
        let mut value = HeaderValue::from_str(v).map_err(|_| Unreachable::HeaderValue(k.clone()))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    let timed_out = || Unreachable::Timeout { secs: timeout.as_secs_f64(), request: req.describe() };
    // Every wait a provider asks for counts against one allowance: a request is never held
    // longer than `max_wait` in all, however many times it is asked to wait.
    let mut waited = Duration::ZERO;
    for _ in 0..=MAX_RETRIES_429 {
        limiter.acquire().await;
        let mut builder = client.request(req.method.clone(), &req.url).headers(headers.clone()).timeout(timeout);
        if let Some(b) = &req.body {
            builder = builder.header("content-type", "application/json").body(b.clone());
        }
        let answer = async {
            let mut resp = builder.send().await.map_err(Read::Http)?;
            let status = resp.status();
            let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
            // Read up to the limit, not the whole of whatever is sent.
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(Read::Http)? {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(Read::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, retry_after, body))
        };
        let (status, retry_after, body) = match tokio::time::timeout(timeout, answer).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(Read::Http(e))) if e.is_timeout() => return Err(timed_out()),
            Ok(Err(Read::Http(e))) => {
                return Err(Unreachable::Transport { request: req.describe(), cause: transport_error(&e) })
            }
            Ok(Err(Read::TooLarge)) => {
                return Err(Unreachable::Transport {
                    request: req.describe(),
                    cause: format!("answer larger than {MAX_ANSWER_BYTES} bytes"),
                })
            }
            Ok(Ok(r)) => r,
        };
        if status.is_redirection() {
            // Not followed: the API key's header must not reach another address.
            return Err(Unreachable::Status {
                status: status.to_string(),
                request: req.describe(),
                excerpt: "redirects are not followed".into(),
            });
        }
        if status.as_u16() == 429 {
            let wait = retry_after.as_deref().and_then(parse_retry_after).unwrap_or(Duration::from_secs(1));
            if waited + wait > max_wait {
                return Err(Unreachable::WaitTooLong {
                    wait_secs: (waited + wait).as_secs(),
                    max_secs: max_wait.as_secs(),
                    request: req.describe(),
                });
            }
            tracing::info!(request = %req.describe(), wait_secs = wait.as_secs_f64(), "Provider asked to slow down; waiting.");
            limiter.hold_off(wait).await;
            waited += wait;
            continue;
        }
        if !status.is_success() {
            return Err(Unreachable::Status {
                status: status.to_string(),
                request: req.describe(),
                excerpt: excerpt(&body),
            });
        }
        return Ok(body);
    }
    Err(Unreachable::StillTooMany { tries: MAX_RETRIES_429, request: req.describe() })
}

/// What reading an answer can fail with.
enum Read {
    Http(reqwest::Error),
    TooLarge,
}

/// `Retry-After` (RFC 9110): delay seconds, or an HTTP date in any of its three forms. A value too large for a
/// duration (`1e20`) is capped rather than trusted — or turned into a panic.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        return Some(Duration::try_from_secs_f64(secs).unwrap_or(RETRY_AFTER_CAP).min(RETRY_AFTER_CAP));
    }
    // Any of the three forms RFC 9110 has recipients accept: IMF-fixdate, RFC 850, asctime.
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO).min(RETRY_AFTER_CAP))
}

/// The cause chain of a transport error, without the URL reqwest adds (already shown).
fn transport_error(e: &reqwest::Error) -> String {
    let mut out = if e.is_connect() { "cannot connect".to_string() } else { "transport error".to_string() };
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// The start of an error body, on one line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 200 {
        format!("{}…", one_line.chars().take(200).collect::<String>())
    } else if one_line.is_empty() {
        "(empty body)".into()
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        // RFC 9110's other two date forms, an hour ahead: about an hour, not "unreadable".
        let ahead = std::time::SystemTime::now() + Duration::from_secs(3600);
        let imf = httpdate::fmt_http_date(ahead);
        let t = chrono::DateTime::<chrono::Utc>::from(ahead);
        let rfc850 = t.format("%A, %d-%b-%y %H:%M:%S GMT").to_string();
        let asctime = t.format("%a %b %e %H:%M:%S %Y").to_string();
        for form in [imf, rfc850, asctime] {
            let wait = parse_retry_after(&form).unwrap_or_else(|| panic!("{form} unread"));
            assert!(wait > Duration::from_secs(3500) && wait <= Duration::from_secs(3600), "{form}: {wait:?}");
        }
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
        // Out of range: capped, never a panic (issue 20: `1e20` panicked a lane).
        for huge in ["1e20", "18446744073709551616", "1e308"] {
            assert_eq!(parse_retry_after(huge), Some(RETRY_AFTER_CAP), "{huge}");
        }
        assert_eq!(parse_retry_after("NaN"), None);
        assert_eq!(parse_retry_after("inf"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_spaces_requests_and_holds_off_after_429() {
        let l = Limiter::new(2.0);
        let t0 = Instant::now();
        l.acquire().await;
        l.acquire().await;
        l.acquire().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(1), "3 requests at 2/s take 1 s");
        l.hold_off(Duration::from_secs(5)).await;
        l.acquire().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(6));
    }
}
