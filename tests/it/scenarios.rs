//! Lifecycle scenarios as data (`tests/fixtures/scenarios/*.yaml`): each step posts a
//! fixture over real HTTP with a real signature, on a fixed clock moved to the event's
//! own time, or moves the clock (due timers fire); after each, the member's state and
//! access are checked.

use crate::support::*;
use chrono::{DateTime, Utc};
use membersync::clock::{Clock, FixedClock};
use membersync::verify::Scheme;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    provider: String,
    email: String,
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    send: Option<String>,
    clock: Option<DateTime<Utc>>,
    membership: Option<String>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    status: Option<String>,
    state: Option<String>,
    access: Option<bool>,
    levels: Option<Vec<String>>,
}

/// When a fixture was received (`<name>.now`, RFC 3339), for payloads with no event time.
pub fn fixture_now(provider: &str, file: &str) -> Option<DateTime<Utc>> {
    let path = root().join("tests/fixtures").join(provider).join(file).with_extension("now");
    let text = std::fs::read_to_string(path).ok()?;
    Some(DateTime::parse_from_rfc3339(text.trim()).expect("a .now file holds an RFC 3339 time").with_timezone(&Utc))
}

/// A fixture's body, content type and extra headers (`<name>.headers.json`).
pub fn load_fixture(provider: &str, file: &str) -> (Vec<u8>, &'static str, Vec<(String, String)>) {
    let path = root().join("tests/fixtures").join(provider).join(file);
    let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content_type = if file.ends_with(".form") { "application/x-www-form-urlencoded" } else { "application/json" };
    let stem = path.file_stem().unwrap().to_string_lossy().to_string();
    let sidecar = path.with_file_name(format!("{stem}.headers.json"));
    let headers = match std::fs::read(&sidecar) {
        Ok(b) => {
            let v: serde_json::Map<String, Value> =
                serde_json::from_slice(&b).expect("headers sidecar is a JSON object");
            v.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap_or_default().to_string())).collect()
        }
        Err(_) => vec![],
    };
    (body, content_type, headers)
}

async fn run(path: &Path) -> Result<(), String> {
    let sc: Scenario = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).map_err(|e| e.to_string())?;
    let clock = Arc::new(FixedClock::new(at(0)));
    let server = Server::start_with_clock(clock.clone()).await;
    let ctx = server.ctx.clone();
    let extractor = ctx.config().extractors.get(&sc.provider).ok_or("no such provider")?.clone();
    let secret = ctx.config().tenants["demo"].providers[&sc.provider].secret.clone().ok_or("no secret")?;
    let scheme = Scheme::compile(&extractor.spec.verify);
    for (i, step) in sc.steps.iter().enumerate() {
        let here =
            format!("step {} ({})", i + 1, step.send.clone().unwrap_or_else(|| format!("clock {:?}", step.clock)));
        let mut status = None;
        if let Some(file) = &step.send {
            let (body, content_type, extra) = load_fixture(&sc.provider, file);
            if let Some(t) = fixture_now(&sc.provider, file).filter(|t| *t > clock.now()) {
                clock.set(t);
            }
            let body = scheme.prepare_body(&secret, &body);
            let decoded = extractor.decode(&body, Some(content_type)).map_err(|e| format!("{here}: {e}"))?;
            if let Ok(x) = extractor.extract("demo", &decoded, &body, &extra, clock.now()) {
                if x.event.occurred_at > clock.now() {
                    clock.set(x.event.occurred_at);
                }
            }
            let id = extra.iter().find(|(k, _)| k == "webhook-id" || k == "svix-id").map(|(_, v)| v.clone());
            let mut headers = extra.clone();
            headers.retain(|(k, _)| !k.ends_with("-signature") && !k.ends_with("-timestamp"));
            headers.retain(|(k, _)| !(k == "webhook-id" && id.is_some()));
            headers.extend(scheme.sign_with_id(&secret, &body, clock.now(), id.as_deref()));
            headers.push(("content-type".into(), content_type.into()));
            let (code, ack) = server.post(&format!("/webhooks/demo/{}", sc.provider), &headers, body).await;
            if code != 200 {
                return Err(format!("{here}: HTTP {code} {ack}"));
            }
            status = ack["status"].as_str().map(str::to_string);
        }
        if let Some(t) = step.clock {
            clock.set(t);
            membersync::timers::fire_due(&ctx, t).await;
        }
        let e = &step.expect;
        if let Some(want) = &e.status {
            if status.as_deref() != Some(want) {
                return Err(format!("{here}: status {status:?}, expected {want}"));
            }
        }
        let (code, found) = server.get(&format!("/members?email={}", sc.email), Some(TOKEN)).await;
        let m =
            found["members"].get(0).cloned().ok_or_else(|| format!("{here}: HTTP {code}, no member {}", sc.email))?;
        let memberships = m["memberships"].as_array().cloned().unwrap_or_default();
        let ms = match &step.membership {
            Some(key) => memberships.iter().find(|x| {
                let (kind, id) = key.split_once(':').unwrap_or(("", ""));
                (kind == "sub" && x["subscription_id"] == id)
                    || (kind == "product" && x["subscription_id"].is_null() && x["product_id"] == id)
            }),
            None => memberships.first(),
        }
        .ok_or_else(|| format!("{here}: no membership {:?} in {memberships:?}", step.membership))?;
        if let Some(want) = &e.state {
            if ms["state"] != Value::String(want.clone()) {
                return Err(format!("{here}: state {}, expected {want}; flags {}", ms["state"], ms["flags"]));
            }
        }
        if let Some(want) = e.access {
            if ms["has_access"] != Value::Bool(want) {
                return Err(format!("{here}: has_access {}, expected {want}; {ms}", ms["has_access"]));
            }
        }
        if let Some(want) = &e.levels {
            if m["access_levels"] != serde_json::json!(want) {
                return Err(format!("{here}: levels {}, expected {want:?}", m["access_levels"]));
            }
        }
    }
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn lifecycle_scenarios_hold_over_real_http() {
    let dir = root().join("tests/fixtures/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    files.sort();
    assert!(!files.is_empty());
    let mut failures = Vec::new();
    for f in &files {
        if let Err(e) = run(f).await {
            failures.push(format!("{}: {e}", f.file_name().unwrap().to_string_lossy()));
        }
    }
    assert!(failures.is_empty(), "scenario failures:\n{}", failures.join("\n"));
}
