//! Scenarios: behaviour as data (`tests/fixtures/scenarios/*.yaml`). Each step posts a
//! fixture as the provider would (verified, signed with the tenant's secret) on a fixed
//! clock moved to the event's own time, or moves the clock (due timers fire); after each,
//! the member's state and access are compared with what the file expects.
//! `membersync test` runs them against the rules in force, in process, on a scratch store.
//!
//! What this module must never do: touch the configured database: scenarios run on a
//! scratch store.

use crate::clock::{Clock, FixedClock};
use crate::config::Config;
use crate::intake::{intake, Check, Delivery};
use crate::pipeline::{Ctx, Loaded};
use crate::store::sqlite::{Options, SqliteStore};
use crate::store::Store;
use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub provider: String,
    #[serde(default = "demo")]
    pub tenant: String,
    /// The member whose access is checked after each step.
    pub email: String,
    /// Where `send:` files are, relative to the scenario file (default `../<provider>`).
    #[serde(default)]
    pub fixtures: Option<PathBuf>,
    /// Why this story's end state (not its access) follows the order its deliveries come in:
    /// news of different objects (a charge's dispute, the subscription's end) ending one
    /// membership. The ordering test then compares the access only.
    #[serde(default)]
    pub order_matters: Option<String>,
    /// Why even the access this story ends with follows arrival (the ordering test leaves it
    /// out): only for an event that names nothing stored and is matched to what the member
    /// holds when it arrives.
    #[serde(default)]
    pub arrival_decides_access: Option<String>,
    /// The provider's API as the scenario needs it: URL path → JSON file (relative to the
    /// fixtures directory) answered with 200; anything else 404. The provider is pointed at
    /// it, with a test API key, for this scenario only (e.g. Stripe's checkout line items).
    #[serde(default)]
    pub api: std::collections::BTreeMap<String, PathBuf>,
    pub steps: Vec<Step>,
}

impl Scenario {
    /// Where its `send:` files are, for the scenario file at `path`.
    pub fn fixtures_dir(&self, path: &Path) -> PathBuf {
        let base = path.parent().unwrap_or(Path::new("."));
        match &self.fixtures {
            Some(d) => base.join(d),
            None => base.join("..").join(&self.provider),
        }
    }
}

/// A fake provider API on 127.0.0.1 answering each path with its file; stops when dropped.
pub struct FakeApi {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the fake API a scenario's `api:` describes (files relative to `dir`).
pub async fn fake_api(dir: &Path, answers: &std::collections::BTreeMap<String, PathBuf>) -> Result<FakeApi, String> {
    let mut by_path = std::collections::HashMap::new();
    for (path, file) in answers {
        let text =
            std::fs::read_to_string(dir.join(file)).map_err(|e| format!("api {path}: {}: {e}", file.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("api {path}: {}: {e}", file.display()))?;
        by_path.insert(path.clone(), v);
    }
    let by_path = Arc::new(by_path);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let by_path = by_path.clone();
        async move {
            match by_path.get(uri.path()) {
                Some(v) => (axum::http::StatusCode::OK, axum::Json(v.clone())),
                None => (axum::http::StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"error": "not found"}))),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("fake API: {e}"))?;
    let url = format!("http://{}", listener.local_addr().map_err(|e| format!("fake API: {e}"))?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(FakeApi { url, task })
}

fn demo() -> String {
    "demo".into()
}

/// One step: send a file, or move the clock.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub send: Option<String>,
    pub clock: Option<DateTime<Utc>>,
    /// Which membership `state`/`access` refer to: `sub:<id>` or `product:<id>`.
    pub membership: Option<String>,
    pub expect: Expect,
}

/// What must hold after a step.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The send's outcome (applied, duplicate, ignored, stale, refused, failed).
    pub status: Option<String>,
    pub state: Option<String>,
    /// Whether that membership has access.
    pub access: Option<bool>,
    /// The member's access levels (union over memberships).
    pub levels: Option<Vec<String>>,
    /// That membership's flags, all of them, in order.
    pub flags: Option<Vec<String>>,
}

/// Request headers as (lower-case name, value).
pub type Headers = Vec<(String, String)>;

/// A fixture's body, content type and extra headers (`<name>.headers.json`).
pub fn load_fixture(dir: &Path, file: &str) -> std::io::Result<(Vec<u8>, &'static str, Headers)> {
    let path = dir.join(file);
    let body = std::fs::read(&path)?;
    let content_type = if file.ends_with(".form") { "application/x-www-form-urlencoded" } else { "application/json" };
    let stem = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
    let headers = match std::fs::read(path.with_file_name(format!("{stem}.headers.json"))) {
        Ok(b) => {
            let v: serde_json::Map<String, Value> = serde_json::from_slice(&b).unwrap_or_default();
            v.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap_or_default().to_string())).collect()
        }
        Err(_) => vec![],
    };
    Ok((body, content_type, headers))
}

/// When a fixture was received (`<name>.now`), for payloads with no event time.
pub fn fixture_now(dir: &Path, file: &str) -> Option<DateTime<Utc>> {
    let text = std::fs::read_to_string(dir.join(file).with_extension("now")).ok()?;
    DateTime::parse_from_rfc3339(text.trim()).ok().map(|t| t.with_timezone(&Utc))
}

/// Headers and body for `file` as the provider would send them at `now`.
pub fn signed_request(
    config: &Config,
    tenant: &str,
    provider: &str,
    dir: &Path,
    file: &str,
    now: DateTime<Utc>,
) -> Result<(Headers, Vec<u8>), String> {
    let (body, content_type, extra) =
        load_fixture(dir, file).map_err(|e| format!("{}: {e}", dir.join(file).display()))?;
    // `${now…}` placeholders, as in `examples/`: the event happens at the scenario's clock.
    let body = crate::simulate::expand_time(&body, now.timestamp())
        .map_err(|e| format!("{}: {e}", dir.join(file).display()))?;
    let verifier = config.verifiers.get(provider).ok_or(format!("no provider `{provider}`"))?;
    let secret = config
        .tenants
        .get(tenant)
        .and_then(|t| t.providers.get(provider))
        .and_then(|p| p.secret.clone())
        .ok_or(format!("tenant `{tenant}` has no secret for `{provider}`"))?;
    let scheme = &verifier.scheme;
    let body = scheme.prepare_body(&secret, &body);
    let id = extra.iter().find(|(k, _)| k == "webhook-id" || k == "svix-id").map(|(_, v)| v.clone());
    let mut headers = extra;
    headers.retain(|(k, _)| !k.ends_with("-signature") && !k.ends_with("-timestamp") && k != "webhook-id");
    headers.extend(scheme.sign_with_id(&secret, &body, now, id.as_deref()));
    headers.push(("content-type".into(), content_type.into()));
    Ok((headers, body))
}

/// The event time a fixture carries (to move the clock there before sending it); `None` for
/// one whose times are `${now…}` placeholders (it reads as no time): it happens when sent.
pub fn event_time(config: &Config, provider: &str, dir: &Path, file: &str) -> Option<DateTime<Utc>> {
    if let Some(t) = fixture_now(dir, file) {
        return Some(t);
    }
    let (body, content_type, mut headers) = load_fixture(dir, file).ok()?;
    headers.push(("content-type".into(), content_type.into()));
    let received_at = Utc.timestamp_opt(0, 0).single()?;
    let delivery = Delivery { tenant: "t", provider, headers: &headers, body: &body, received_at };
    intake(config, &delivery, Check::Trusted).ok()?.extracted.ok().map(|x| x.event.occurred_at)
}

/// One failed expectation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub step: usize,
    pub what: String,
    pub field: &'static str,
    pub expected: String,
    pub actual: String,
}

/// The membership a step's expectations refer to: the one its `membership:` names, else
/// the member's first.
fn step_membership(step: &Step, member: Option<&Value>) -> Option<Value> {
    let memberships = member.and_then(|m| m["memberships"].as_array())?;
    match &step.membership {
        Some(key) => memberships
            .iter()
            .find(|x| {
                let (kind, id) = key.split_once(':').unwrap_or(("", ""));
                (kind == "sub" && x["subscription_id"] == id)
                    || (kind == "product" && x["subscription_id"].is_null() && x["product_id"] == id)
            })
            .cloned(),
        None => memberships.first().cloned(),
    }
}

/// Compares the member JSON (as `GET /members?email=` shows it) with a step's expectation.
pub fn check(step_no: usize, what: &str, step: &Step, status: Option<&str>, member: Option<&Value>) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let mut miss = |field: &'static str, expected: String, actual: String| {
        if expected != actual {
            out.push(Mismatch { step: step_no, what: what.to_string(), field, expected, actual });
        }
    };
    let e = &step.expect;
    if let Some(want) = &e.status {
        miss("status", want.clone(), status.unwrap_or("(none)").to_string());
    }
    let ms = step_membership(step, member);
    let ms = ms.as_ref();
    let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    if let Some(want) = &e.state {
        miss("state", want.clone(), ms.map(|m| text(&m["state"])).unwrap_or_else(|| "(no membership)".into()));
    }
    if let Some(want) = e.access {
        miss(
            "access",
            want.to_string(),
            ms.map(|m| text(&m["has_access"])).unwrap_or_else(|| "(no membership)".into()),
        );
    }
    if let Some(want) = &e.flags {
        let got = ms.map(|m| m["flags"].clone()).unwrap_or(Value::Array(vec![]));
        miss(
            "flags",
            format!("{want:?}"),
            format!("{:?}", serde_json::from_value::<Vec<String>>(got).unwrap_or_default()),
        );
    }
    if let Some(want) = &e.levels {
        let got = member.map(|m| m["access_levels"].clone()).unwrap_or(Value::Array(vec![]));
        miss(
            "levels",
            format!("{want:?}"),
            format!("{:?}", serde_json::from_value::<Vec<String>>(got).unwrap_or_default()),
        );
    }
    out
}

/// The result of one scenario file.
#[derive(Debug)]
pub struct Report {
    pub file: PathBuf,
    pub steps: usize,
    pub mismatches: Vec<Mismatch>,
    pub error: Option<String>,
    /// One line per step: what it did, what came of it and where the membership stands.
    pub trace: Vec<String>,
}

/// Runs one scenario in process against `loaded` (config and rules), on a scratch store.
pub async fn run(path: &Path, loaded: Arc<Loaded>) -> Report {
    let mut report = Report { file: path.to_path_buf(), steps: 0, mismatches: vec![], error: None, trace: vec![] };
    let sc: Scenario = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|s| crate::yaml::from_str(&s).map_err(|e| e.to_string()))
    {
        Ok(sc) => sc,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    let dir = sc.fixtures_dir(path);
    let _api;
    let loaded = if sc.api.is_empty() {
        loaded
    } else {
        match fake_api(&dir, &sc.api).await {
            Ok(api) => {
                let mut config = (*loaded.config).clone();
                config.api_bases.insert(sc.provider.clone(), api.url.clone());
                if let Some(p) = config.tenants.get_mut(&sc.tenant).and_then(|t| t.providers.get_mut(&sc.provider)) {
                    p.api_key = Some(crate::secret::Secret::new("sk_scenario_fake_api"));
                }
                _api = api;
                Arc::new(loaded.with_api(config))
            }
            Err(e) => {
                report.error = Some(e);
                return report;
            }
        }
    };
    let store: Arc<dyn Store> = match SqliteStore::open(":memory:", Options::default()) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    let clock = Arc::new(FixedClock::new(Utc.timestamp_opt(0, 0).single().unwrap_or_default()));
    let ctx = Arc::new(Ctx::with_loaded(loaded.clone(), store.clone(), clock.clone()));
    for (i, step) in sc.steps.iter().enumerate() {
        report.steps += 1;
        let n = i + 1;
        let mut status = None;
        let mut reason = None;
        let what = step
            .send
            .clone()
            .unwrap_or_else(|| format!("clock {}", step.clock.map(|t| t.to_rfc3339()).unwrap_or_default()));
        if let Some(file) = &step.send {
            if let Some(t) = event_time(&loaded.config, &sc.provider, &dir, file).filter(|t| *t > clock.now()) {
                // Time passes until the event: timers due before it fire first, as in life.
                clock.set(t);
                crate::timers::fire_due(&ctx, t).await;
            }
            let (headers, body) =
                match signed_request(&loaded.config, &sc.tenant, &sc.provider, &dir, file, clock.now()) {
                    Ok(r) => r,
                    Err(e) => {
                        report.error = Some(format!("step {n} ({what}): {e}"));
                        return report;
                    }
                };
            match crate::ingest::accept(&ctx, &sc.tenant, &sc.provider, headers, body).await {
                Ok(ack) => {
                    status = Some(ack.status.as_str().to_string());
                    reason = ack.outcome.reason.clone();
                }
                Err(e) => status = Some(format!("rejected: {e}")),
            }
        }
        if let Some(t) = step.clock {
            clock.set(t);
            crate::timers::fire_due(&ctx, t).await;
        }
        let email = sc.email.clone();
        let member = match store.members_by_email(&email).ok().and_then(|m| m.into_iter().next()) {
            Some(m) => store.member_detail(&m.id, 0).ok().flatten().map(|d| crate::views::member_json(&d, clock.now())),
            None => None,
        };
        report.mismatches.extend(check(n, &what, step, status.as_deref(), member.as_ref()));
        report.trace.push(trace_line(n, &what, status.as_deref(), reason.as_deref(), step, member.as_ref()));
    }
    report
}

/// One step of a trace: `3 clock … → past_due, access true [pro], flags [no renewal seen]`.
fn trace_line(
    n: usize,
    what: &str,
    status: Option<&str>,
    reason: Option<&str>,
    step: &Step,
    member: Option<&Value>,
) -> String {
    let ms = step_membership(step, member);
    let ms = ms.as_ref();
    let mut line = format!("{n:>2} {what}");
    if let Some(s) = status {
        line.push_str(&format!(": {s}"));
        if let Some(r) = reason {
            line.push_str(&format!(" ({r})"));
        }
    }
    match ms {
        Some(m) => line.push_str(&format!(
            "\n     → {} {}, access {} {}, flags {}",
            m["subscription_id"].as_str().or(m["product_id"].as_str()).unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            m["has_access"],
            m["access_levels"],
            m["flags"],
        )),
        None => line.push_str("\n     → (no membership)"),
    }
    line
}

/// A report's trace, step by step (`membersync test --verbose`).
pub fn render_trace(r: &Report) -> String {
    let name = r.file.file_name().unwrap_or_default().to_string_lossy();
    let mut out = format!("{name}\n");
    for l in &r.trace {
        out.push_str(l);
        out.push('\n');
    }
    if let Some(e) = &r.error {
        out.push_str(&format!("ERROR {e}\n"));
    }
    out
}

/// Renders reports as text: one line per scenario, and a diff line per mismatch.
pub fn render(reports: &[Report]) -> String {
    let mut out = String::new();
    for r in reports {
        let name = r.file.file_name().unwrap_or_default().to_string_lossy();
        match (&r.error, r.mismatches.is_empty()) {
            (Some(e), _) => out.push_str(&format!("ERROR {name}: {e}\n")),
            (None, true) => out.push_str(&format!("ok    {name} ({} steps)\n", r.steps)),
            (None, false) => {
                out.push_str(&format!("FAIL  {name}\n"));
                for m in &r.mismatches {
                    out.push_str(&format!(
                        "      step {} ({}): {}\n        - expected: {}\n        + actual:   {}\n",
                        m.step, m.what, m.field, m.expected, m.actual
                    ));
                }
            }
        }
    }
    let failed = reports.iter().filter(|r| r.error.is_some() || !r.mismatches.is_empty()).count();
    out.push_str(&format!("{} passed, {} failed\n", reports.len() - failed, failed));
    out
}
