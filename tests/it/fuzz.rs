//! No input panics decode, extract or the rules: arbitrary bytes, and real fixtures with
//! arbitrary JSON dropped into arbitrary places.

use crate::support::*;
use membersync::rules::MembershipView;
use proptest::prelude::*;
use serde_json::Value;

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        ".{0,12}".prop_map(Value::String),
        Just(Value::String("null".into())),
        Just(Value::String("2026-13-45T99:99:99Z".into())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

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

/// Sets `value` at the `pick`-th node of `v` (depth-first), replacing what was there.
fn plant(v: &mut Value, pick: &mut usize, value: &Value) -> bool {
    if *pick == 0 {
        *v = value.clone();
        return true;
    }
    *pick -= 1;
    match v {
        Value::Object(m) => m.values_mut().any(|c| plant(c, pick, value)),
        Value::Array(a) => a.iter_mut().any(|c| plant(c, pick, value)),
        _ => false,
    }
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
