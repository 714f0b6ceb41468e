//! Lifecycle scenarios as data (`tests/fixtures/scenarios/*.yaml`): each step posts a
//! fixture over real HTTP with a real signature, on a fixed clock moved to the event's
//! own time, or moves the clock (due timers fire); after each, the member's state and
//! access are checked.

use crate::support::*;
use chrono::{DateTime, Utc};
use membersync::clock::{Clock, FixedClock};
use membersync::scenario::Scenario;
use std::path::Path;
use std::sync::Arc;

/// A fixture's body, content type and extra headers (`<name>.headers.json`).
pub fn load_fixture(provider: &str, file: &str) -> (Vec<u8>, &'static str, Vec<(String, String)>) {
    membersync::scenario::load_fixture(&root().join("tests/fixtures").join(provider), file)
        .unwrap_or_else(|e| panic!("{provider}/{file}: {e}"))
}

/// When a fixture was received (`<name>.now`), for payloads with no event time.
pub fn fixture_now(provider: &str, file: &str) -> Option<DateTime<Utc>> {
    membersync::scenario::fixture_now(&root().join("tests/fixtures").join(provider), file)
}

async fn run(path: &Path) -> Result<(), String> {
    let sc: Scenario = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).map_err(|e| e.to_string())?;
    let clock = Arc::new(FixedClock::new(at(0)));
    let dir = sc.fixtures_dir(path);
    // The provider's API as the scenario describes it (`api:`), for this server only.
    let api = if sc.api.is_empty() { None } else { Some(membersync::scenario::fake_api(&dir, &sc.api).await?) };
    let server = Server::start_tuned(clock.clone(), |c| {
        if let Some(api) = &api {
            c.api_bases.insert(sc.provider.clone(), api.url.clone());
            c.tenants.get_mut("demo").unwrap().providers.get_mut(&sc.provider).unwrap().api_key =
                Some(membersync::secret::Secret::new("sk_scenario_fake_api"));
        }
    })
    .await;
    let ctx = server.ctx.clone();
    let config = ctx.config();
    let mut mismatches = Vec::new();
    for (i, step) in sc.steps.iter().enumerate() {
        let what = step.send.clone().unwrap_or_else(|| format!("clock {:?}", step.clock));
        let mut status = None;
        if let Some(file) = &step.send {
            if let Some(t) =
                membersync::scenario::event_time(&config, &sc.provider, &dir, file).filter(|t| *t > clock.now())
            {
                clock.set(t);
                membersync::timers::fire_due(&ctx, t).await;
            }
            let (headers, body) =
                membersync::scenario::signed_request(&config, "demo", &sc.provider, &dir, file, clock.now())?;
            let (code, ack) = server.post(&format!("/webhooks/demo/{}", sc.provider), &headers, body).await;
            if code != 200 {
                return Err(format!("step {} ({what}): HTTP {code} {ack}", i + 1));
            }
            status = ack["status"].as_str().map(str::to_string);
        }
        if let Some(t) = step.clock {
            clock.set(t);
            membersync::timers::fire_due(&ctx, t).await;
        }
        let (_, found) = server.get(&format!("/members?email={}", sc.email), Some(TOKEN)).await;
        mismatches.extend(membersync::scenario::check(i + 1, &what, step, status.as_deref(), found["members"].get(0)));
    }
    server.stop().await;
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(format!("{mismatches:#?}"))
    }
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

#[tokio::test]
async fn membersync_test_passes_on_shipped_rules_and_shows_the_diff_when_grace_changes() {
    let dir = root().join("tests/fixtures/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    files.sort();
    let run_all = |loaded: Arc<membersync::pipeline::Loaded>| {
        let files = files.clone();
        async move {
            let mut out = Vec::new();
            for f in &files {
                out.push(membersync::scenario::run(f, loaded.clone()).await);
            }
            out
        }
    };
    let shipped = Arc::new(membersync::pipeline::Loaded::new(config(":memory:"), rules()));
    let reports = run_all(shipped).await;
    let text = membersync::scenario::render(&reports);
    assert!(text.ends_with(&format!("{} passed, 0 failed\n", files.len())), "{text}");

    // An operator shortens the grace period to one day.
    let (edit_dir, mut edited) = editable_config();
    edited.tenants.get_mut("demo").unwrap().policy.insert("grace_days".into(), 1.into());
    let loaded = Arc::new(membersync::pipeline::Loaded::new(edited, rules()));
    let reports = run_all(loaded).await;
    let text = membersync::scenario::render(&reports);
    assert!(text.contains("FAIL  stripe_lifecycle.yaml"), "{text}");
    assert!(
        text.contains("step 6 (clock 2026-02-02T12:00:00+00:00): state\n        - expected: past_due\n        + actual:   expired"),
        "{text}"
    );
    drop(edit_dir);
}

/// A fixture may carry `${now…}` placeholders, as `examples/` do: a scenario sends it at
/// its own clock, so what it sets in motion (a period end, a grace timer) starts then, not
/// at a date long past.
// See: issue 18 (fixed fixture times made timers fire at once on a live server).
#[tokio::test]
async fn a_fixture_with_now_placeholders_happens_at_the_scenario_clock() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = dir.path().join("stripe");
    std::fs::create_dir(&fixtures).unwrap();
    for name in ["checkout_session_completed", "customer_subscription_created", "invoice_payment_failed"] {
        let text = String::from_utf8(fixture("stripe", name)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let created = v["created"].as_i64().unwrap().to_string();
        let text = text.replace(&format!("\"created\": {created}"), "\"created\": ${now}");
        assert!(text.contains("${now}"), "{name}");
        std::fs::write(fixtures.join(format!("{name}.json")), text).unwrap();
    }
    let scenarios = dir.path().join("scenarios");
    std::fs::create_dir(&scenarios).unwrap();
    let file = scenarios.join("now.yaml");
    std::fs::write(
        &file,
        "provider: stripe\nemail: ada@example.com\nsteps:\n\
         \x20 - clock: 2026-06-01T00:00:00Z\n\
         \x20   expect: {}\n\
         \x20 - send: checkout_session_completed.json\n\
         \x20   expect: { status: applied }\n\
         \x20 - send: customer_subscription_created.json\n\
         \x20   expect: { status: applied, state: active, access: true }\n\
         \x20 - send: invoice_payment_failed.json\n\
         \x20   expect: { status: applied, state: past_due, access: true }\n\
         \x20 - clock: 2026-06-07T23:00:00Z\n\
         \x20   expect: { state: past_due, access: true }\n\
         \x20 - clock: 2026-06-08T00:00:01Z\n\
         \x20   expect: { state: expired, access: false }\n",
    )
    .unwrap();
    let loaded = Arc::new(membersync::pipeline::Loaded::new(config(":memory:"), rules()));
    let report = membersync::scenario::run(&file, loaded).await;
    assert!(report.error.is_none() && report.mismatches.is_empty(), "{}", membersync::scenario::render(&[report]));
}

/// Every scenario, step by step (`membersync test --verbose`), as a reviewed snapshot: a
/// change in what any step comes to shows up here, not only a failed expectation.
#[tokio::test]
async fn scenario_traces_match_their_reviewed_snapshots() {
    let dir = root().join("tests/fixtures/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    files.sort();
    let loaded = Arc::new(membersync::pipeline::Loaded::new(config(":memory:"), rules()));
    let settings = insta_settings();
    for f in &files {
        let report = membersync::scenario::run(f, loaded.clone()).await;
        let name = format!("scenario__{}", f.file_stem().unwrap().to_string_lossy());
        settings.bind(|| insta::assert_snapshot!(name, membersync::scenario::render_trace(&report)));
    }
}
