//! Per-stage CPU cost, one stage at a time, on the checked-in fixtures and config:
//! - `verify/<scheme>`: each signature scheme on a signed fixture (stripe, standard_webhooks,
//!   form_secret, hmac_sha256_hex);
//! - `extract/<provider>`: decode + extract of every fixture of that provider (one
//!   iteration = all of them; criterion's throughput line gives the per-event figure), and
//!   `extract/stripe_invoice_paid`, the 3 KB payload the load benchmark posts;
//! - `rules/<kind>`: `RuleSet::decide` for a few kinds against a stored membership;
//! - `machine/step`: `machine::step` for one edge, and for every (state, input) pair.
//!
//! Run: `cargo bench --bench stages` (numbers in BENCHMARKS.md).

/// The allocator the `membersync` binary uses.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use membersync::config::Config;
use membersync::machine::{self, Input, MState};
use membersync::rules::{MembershipView, RuleSet};
use membersync::verify::Scheme;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config() -> Config {
    Config::load(&root().join("membersync.yaml")).expect("config")
}

/// A fixture: (file name, body, headers from `<name>.headers.json`).
type Fixture = (String, Vec<u8>, Vec<(String, String)>);

/// A provider's fixtures.
fn fixtures(provider: &str) -> Vec<Fixture> {
    let dir = root().join("tests/fixtures").join(provider);
    let mut out = Vec::new();
    let mut names: Vec<_> =
        std::fs::read_dir(&dir).expect("fixtures").filter_map(|e| e.ok()).map(|e| e.path()).collect();
    names.sort();
    for p in names {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let is_body = (name.ends_with(".json") && !name.ends_with(".headers.json")) || name.ends_with(".form");
        if !is_body {
            continue;
        }
        let body = std::fs::read(&p).expect("fixture");
        let mut headers = headers_of(&p);
        if name.ends_with(".form") {
            headers.push(("content-type".into(), "application/x-www-form-urlencoded".into()));
        }
        out.push((name, body, headers));
    }
    out
}

fn headers_of(body: &Path) -> Vec<(String, String)> {
    let stem = body.file_stem().unwrap().to_string_lossy().to_string();
    let h = body.with_file_name(format!("{stem}.headers.json"));
    match std::fs::read_to_string(h) {
        Ok(s) => {
            let m: std::collections::BTreeMap<String, String> = serde_json::from_str(&s).expect("headers");
            m.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect()
        }
        Err(_) => vec![],
    }
}

fn verify(c: &mut Criterion) {
    let config = config();
    let now = Utc::now();
    let mut g = c.benchmark_group("verify");
    // One provider per scheme, with a fixture of that provider.
    for (scheme, provider, fixture) in [
        ("stripe", "stripe", "invoice_paid.json"),
        ("standard_webhooks", "whop", "payment_succeeded.json"),
        ("form_secret", "thrivecart", "order_success.form"),
        ("hmac_sha256_hex", "memberful", "order_purchased.json"),
    ] {
        let x = &config.extractors[provider];
        let s = Scheme::compile(&x.spec.verify);
        let secret = config.tenants["demo"].providers[provider].secret.clone().expect("secret");
        let body = std::fs::read(root().join("tests/fixtures").join(provider).join(fixture)).expect("fixture");
        let body = s.prepare_body(&secret, &body);
        let headers = s.sign_with_id(&secret, &body, now, Some("msg_bench"));
        s.verify(Some(&secret), &headers, &body, now).expect("verifies");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(scheme, |b| b.iter(|| s.verify(Some(&secret), black_box(&headers), black_box(&body), now)));
    }
    g.finish();
}

fn extract(c: &mut Criterion) {
    let config = config();
    let now = Utc.timestamp_opt(1_767_225_600, 0).unwrap();
    let mut g = c.benchmark_group("extract");
    for provider in config.extractors.keys() {
        let x = &config.extractors[provider];
        let all = fixtures(provider);
        g.throughput(Throughput::Elements(all.len() as u64));
        g.bench_with_input(BenchmarkId::new("all_fixtures", provider), &all, |b, all| {
            b.iter(|| {
                for (_, body, headers) in all {
                    let ct = headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str());
                    let decoded = x.decode_captured(body, ct).expect("decodes");
                    let _ = black_box(x.extract("demo", &decoded, body, headers, now));
                }
            })
        });
    }
    let x = &config.extractors["stripe"];
    let body = std::fs::read(root().join("tests/fixtures/stripe/invoice_paid.json")).expect("fixture");
    g.throughput(Throughput::Elements(1));
    g.bench_function("stripe_invoice_paid", |b| {
        b.iter(|| {
            let decoded = x.decode_captured(black_box(&body), None).expect("decodes");
            x.extract("demo", &decoded, &body, &[], now).expect("extracts")
        })
    });
    g.finish();
}

fn rules(c: &mut Criterion) {
    let config = config();
    let now = Utc.timestamp_opt(1_767_225_600, 0).unwrap();
    let rules = RuleSet::load(&root().join("rules"), "rules", now).expect("rules");
    let policy = rhai::serde::to_dynamic(&config.tenants["demo"].policy).expect("policy");
    let active = MembershipView {
        exists: true,
        state: Some(MState::Active),
        period_end: Some(now + chrono::Duration::days(20)),
        product_id: Some("prod_Pro001".into()),
        status: Some("active".into()),
        last_event_at: Some(now - chrono::Duration::days(10)),
        ..Default::default()
    };
    let none = MembershipView::default();
    let x = &config.extractors["stripe"];
    let event = |fixture: &str| {
        let body = std::fs::read(root().join("tests/fixtures/stripe").join(fixture)).expect("fixture");
        let decoded = x.decode(&body, None).expect("decodes");
        x.extract("demo", &decoded, &body, &[], now).expect("extracts").event
    };
    let mut g = c.benchmark_group("rules");
    for (name, fixture, view) in [
        ("purchased_new", "checkout_session_completed.json", &none),
        ("renewed_active", "invoice_paid_renewal.json", &active),
        ("payment_failed_active", "invoice_payment_failed.json", &active),
        ("cancel_scheduled_active", "customer_subscription_updated_cancel_scheduled.json", &active),
    ] {
        let ev = event(fixture);
        rules.decide(&ev, view, &policy, now).expect("decides");
        g.bench_function(name, |b| b.iter(|| rules.decide(black_box(&ev), view, &policy, now)));
    }
    // The tie-break rank, worked out for every event before the writer.
    let ev = event("invoice_paid_renewal.json");
    assert_eq!(rules.rank(&ev).expect("ranks"), 30);
    g.bench_function("rank_renewed", |b| b.iter(|| rules.rank(black_box(&ev))));
    // When an active membership's renewal is due: asked after every transition.
    assert!(rules.renewal_due_at(&active, &policy).expect("due").is_some());
    g.bench_function("renewal_due_active", |b| b.iter(|| rules.renewal_due_at(black_box(&active), &policy)));
    // A rule call's fixed cost: the membership's view, the policy, the call, a `()` back.
    let empty =
        RuleSet::compile(vec![("t.rhai".into(), "fn renewal_due_at(m, cfg) { () }".into())], now).expect("rules");
    g.bench_function("empty_rule_call", |b| b.iter(|| empty.renewal_due_at(black_box(&active), &policy)));
    g.finish();
}

fn machine_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("machine");
    g.bench_function("step_active_payment_failed", |b| {
        b.iter(|| machine::step(black_box(MState::Active), black_box(Input::PaymentFailed)))
    });
    let pairs: Vec<(MState, Input)> =
        MState::ALL.iter().flat_map(|s| Input::ALL.iter().map(move |i| (*s, *i))).collect();
    g.throughput(Throughput::Elements(pairs.len() as u64));
    g.bench_function("step_every_pair", |b| {
        b.iter(|| {
            for &(s, i) in &pairs {
                black_box(machine::step(s, i));
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = verify, extract, rules, machine_step
}
criterion_main!(benches);
