//! No input panics decode, extract or the rules: arbitrary bytes, and real fixtures with
//! arbitrary JSON dropped into arbitrary places (proptest, shrinking what fails); and a
//! bounded share of the fuzz campaign (`fuzz_campaign`), whose full run is
//! `cargo bench --bench fuzz`.

use crate::fuzz_campaign::{arb_json, plant, Corpus};
use crate::support::*;
use membersync::rules::MembershipView;
use proptest::prelude::*;
use serde_json::Value;

/// Every (provider, fixture body) pair, decoded.
fn fixtures() -> Vec<(String, Value)> {
    let config = config(":memory:");
    let mut out = Vec::new();
    for (provider, x) in &config.extractors {
        let dir = root().join("tests/fixtures").join(provider);
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let ct = if name.ends_with(".form") { "application/x-www-form-urlencoded" } else { "application/json" };
            if !(name.ends_with(".form") || (name.ends_with(".json") && !name.ends_with(".headers.json"))) {
                continue;
            }
            if let Ok(v) = x.decode(&std::fs::read(&p).unwrap(), Some(ct)) {
                out.push((provider.clone(), v));
            }
        }
    }
    out
}

/// A fixture (picked by `index`) with `value` planted at its `at`-th node, and its bytes.
fn planted(index: prop::sample::Index, at: usize, value: &Value) -> (String, Value, Vec<u8>) {
    let all = &*FIXTURES;
    let (provider, mut v) = all[index.index(all.len())].clone();
    let mut pick = at;
    plant(&mut v, &mut pick, value);
    let body = serde_json::to_vec(&v).unwrap();
    (provider, v, body)
}

static CONFIG: std::sync::LazyLock<membersync::config::Config> = std::sync::LazyLock::new(|| config(":memory:"));
static RULES: std::sync::LazyLock<membersync::rules::RuleSet> = std::sync::LazyLock::new(rules);
static FIXTURES: std::sync::LazyLock<Vec<(String, Value)>> = std::sync::LazyLock::new(fixtures);

fn run_all(provider: &str, body: &[u8], decoded: Option<&Value>) {
    let config = &*CONFIG;
    let rules = &*RULES;
    let x = &config.extractors[provider];
    for ct in ["application/json", "application/x-www-form-urlencoded"] {
        if let Ok(captured) = x.decode_captured(body, Some(ct)) {
            let _ = x.extract("demo", &captured, body, &[], chrono::Utc::now());
        }
        let owned;
        let v = match decoded {
            Some(v) => v,
            None => match x.decode(body, Some(ct)) {
                Ok(v) => {
                    owned = v;
                    &owned
                }
                Err(_) => continue,
            },
        };
        if let Ok(e) = x.extract("demo", v, body, &[], chrono::Utc::now()) {
            let policy = rhai::serde::to_dynamic(&config.tenants["demo"].policy).unwrap();
            let _ = rules.is_stale(&e.event, &MembershipView::default());
            let _ = rules.rank(&e.event);
            let _ = rules.decide(&e.event, &MembershipView::default(), &policy, chrono::Utc::now());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), which in 0usize..5) {
        let providers = ["stripe", "thrivecart", "whop", "memberstack", "memberful"];
        run_all(providers[which], &body, None);
    }

    #[test]
    fn fixtures_with_arbitrary_json_planted_never_panic(index in any::<prop::sample::Index>(), at in 0usize..400, value in arb_json()) {
        let (provider, v, body) = planted(index, at, &value);
        run_all(&provider, &body, Some(&v));
    }

    /// The decode the ingest path uses (only the values at the configured paths) maps any
    /// body exactly as the whole decode does.
    #[test]
    fn captured_decode_extracts_as_the_whole_decode(index in any::<prop::sample::Index>(), at in 0usize..400, value in arb_json()) {
        let (provider, _, body) = planted(index, at, &value);
        let x = &CONFIG.extractors[&provider];
        let now = chrono::Utc::now();
        let ct = Some("application/json");
        match (x.decode(&body, ct), x.decode_captured(&body, ct)) {
            (Ok(tree), Ok(captured)) => {
                let a = x.extract("demo", &tree, &body, &[], now);
                let b = x.extract("demo", &captured, &body, &[], now);
                prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "tree decode {:?}, captured decode {:?}", a.map(|_| ()), b.map(|_| ())),
        }
    }
}

/// The first 20,000 inputs of the campaign (the full command runs 1M): none panics, and the
/// mutations reach every stage (a campaign stopped at decode would prove little).
#[test]
fn a_bounded_share_of_the_campaign_never_panics() {
    let corpus = Corpus::load();
    let tally = corpus.campaign(0x6d73, 20_000, 2);
    assert!(tally.panics.is_empty(), "{}\n\n{}", tally.render(), tally.panics.join("\n\n"));
    let share = |n: u64| n as f64 / tally.inputs as f64;
    assert!(share(tally.decoded) > 0.5 && share(tally.mapped) > 0.3, "{}", tally.render());
    assert!(share(tally.decided) > 0.2 && tally.stepped > 1000, "{}", tally.render());
}
