//! The fuzz campaign: generated deliveries run through decode, extract, the rules and the
//! machine, each under `catch_unwind`, counting how deep each got and every panic. It is
//! self-contained (the library, proptest and the checked-in fixtures), so two callers share
//! it: the test `fuzz::a_bounded_share_of_the_campaign_never_panics` (in CI) and the command
//! `cargo bench --bench fuzz` (1M inputs by default; not in CI; figures in BENCHMARKS.md).
//!
//! Each input starts from a checked-in fixture (or from nothing) and gets one mutation:
//! random bytes; bytes of a fixture flipped, inserted, deleted or cut; arbitrary JSON planted
//! at a node; a node removed; an interesting value (huge numbers, odd times, long or control
//! strings, deep nesting) planted; the event type swapped for another the provider maps, so
//! one event's mapping reads another's body; for form bodies, a pair's value replaced or a
//! pair dropped. The rules then decide it against a membership in a random state.

use membersync::config::Config;
use membersync::machine::{self, MState};
use membersync::rules::{MembershipView, RuleSet};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;
use std::path::{Path, PathBuf};

const FORM: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";

/// A checked-in delivery to start from.
struct Seed {
    provider: String,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    form: bool,
    /// The decoded body (JSON seeds only).
    tree: Option<Value>,
    /// The event type the fixture carries, when it maps.
    event_type: Option<String>,
}

/// What the campaign runs against: the shipped config, rules and fixtures.
pub struct Corpus {
    config: Config,
    rules: RuleSet,
    policy: rhai::Dynamic,
    seeds: Vec<Seed>,
    providers: Vec<String>,
    /// Provider → the event types its YAML maps.
    types: std::collections::BTreeMap<String, Vec<String>>,
}

/// One generated delivery.
pub struct Input {
    pub provider: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub content_type: &'static str,
    pub membership: MembershipView,
    /// Which mutation made it (for the tally and a failure's message).
    pub how: &'static str,
}

/// How far the inputs got, and every panic with the input that caused it.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub inputs: u64,
    pub decoded: u64,
    pub extracted: u64,
    pub mapped: u64,
    pub decided: u64,
    pub stepped: u64,
    pub panics: Vec<String>,
    /// Errors a rule returned (the service dead-letters these), the first few kept.
    pub rule_errors: u64,
    pub rule_error_examples: Vec<String>,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.inputs += o.inputs;
        self.decoded += o.decoded;
        self.extracted += o.extracted;
        self.mapped += o.mapped;
        self.decided += o.decided;
        self.stepped += o.stepped;
        self.panics.extend(o.panics.iter().cloned());
        self.rule_errors += o.rule_errors;
        for e in &o.rule_error_examples {
            if self.rule_error_examples.len() < 5 && !self.rule_error_examples.contains(e) {
                self.rule_error_examples.push(e.clone());
            }
        }
    }

    /// One line per stage: how many inputs reached it.
    pub fn render(&self) -> String {
        let pct = |n: u64| if self.inputs == 0 { 0.0 } else { 100.0 * n as f64 / self.inputs as f64 };
        format!(
            "inputs {}\ndecoded {} ({:.1}%)\nextracted {} ({:.1}%)\nmapped to a kind {} ({:.1}%)\ndecided by a rule {} ({:.1}%)\nstepped the machine {} ({:.1}%)\nrule errors {} (e.g. {:?})\npanics {}",
            self.inputs,
            self.decoded,
            pct(self.decoded),
            self.extracted,
            pct(self.extracted),
            self.mapped,
            pct(self.mapped),
            self.decided,
            pct(self.decided),
            self.stepped,
            pct(self.stepped),
            self.rule_errors,
            self.rule_error_examples,
            self.panics.len()
        )
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Corpus {
    pub fn load() -> Corpus {
        let config = Config::load(&root().join("membersync.yaml")).expect("membersync.yaml loads");
        let rules = RuleSet::load(&root().join("rules"), "rules", chrono::Utc::now()).expect("rules compile");
        let policy = rhai::serde::to_dynamic(&config.tenants["demo"].policy).expect("policy");
        let mut seeds = Vec::new();
        let mut types = std::collections::BTreeMap::new();
        for (provider, x) in &config.extractors {
            types.insert(provider.clone(), x.spec.events.keys().cloned().collect::<Vec<_>>());
            let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures").join(provider))
                .expect("fixtures")
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for p in files {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                let form = name.ends_with(".form");
                if !(form || (name.ends_with(".json") && !name.ends_with(".headers.json"))) {
                    continue;
                }
                let body = std::fs::read(&p).unwrap();
                let headers = headers_of(&p);
                let ct = if form { FORM } else { JSON };
                let event_type = x
                    .decode(&body, Some(ct))
                    .ok()
                    .and_then(|v| x.extract("demo", &v, &body, &headers, chrono::Utc::now()).ok())
                    .and_then(|e| e.mapping.event);
                let tree = if form { None } else { serde_json::from_slice(&body).ok() };
                seeds.push(Seed { provider: provider.clone(), body, headers, form, tree, event_type });
            }
        }
        let providers = config.extractors.keys().cloned().collect();
        Corpus { config, rules, policy, seeds, providers, types }
    }

    /// The `index`-th input of the campaign seeded by `seed`: the same pair gives the same
    /// input, so a panic's message is enough to reproduce it.
    pub fn input(&self, seed: u64, index: u64) -> Input {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&index.to_le_bytes());
        let mut runner =
            TestRunner::new_with_rng(ProptestConfig::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &key));
        let r = &mut runner;
        let seed_at = below(r, self.seeds.len() as u64) as usize;
        let s = &self.seeds[seed_at];
        let mut body = s.body.clone();
        let mut headers = s.headers.clone();
        let mut provider = s.provider.clone();
        let form_ct = if s.form { FORM } else { JSON };
        let (how, content_type) = match below(r, 8) {
            0 => {
                provider = self.providers[below(r, self.providers.len() as u64) as usize].clone();
                let n = below(r, 1024) as usize;
                body = (0..n).map(|_| r.rng().next_u32() as u8).collect();
                ("random bytes", if below(r, 2) == 0 { JSON } else { FORM })
            }
            1 => {
                flip_bytes(r, &mut body);
                ("bytes mutated", form_ct)
            }
            _ if s.form => {
                mutate_form(r, &mut body, s.event_type.as_deref(), &self.types[&s.provider]);
                ("form pair changed", FORM)
            }
            2 => {
                let mut v = s.tree.clone().unwrap_or(Value::Null);
                let value = sample(r, arb_json());
                let mut pick = below(r, 400) as usize;
                plant(&mut v, &mut pick, &value);
                body = serde_json::to_vec(&v).unwrap();
                ("arbitrary JSON planted", JSON)
            }
            3 => {
                let mut v = s.tree.clone().unwrap_or(Value::Null);
                let mut pick = below(r, 400) as usize;
                remove(&mut v, &mut pick);
                body = serde_json::to_vec(&v).unwrap();
                ("a node removed", JSON)
            }
            4 | 5 => {
                let mut v = s.tree.clone().unwrap_or(Value::Null);
                let value = interesting(r);
                let mut pick = below(r, 400) as usize;
                plant(&mut v, &mut pick, &value);
                body = serde_json::to_vec(&v).unwrap();
                ("interesting value planted", JSON)
            }
            _ => {
                let mut v = s.tree.clone().unwrap_or(Value::Null);
                let types = &self.types[&s.provider];
                if let (Some(from), false) = (s.event_type.as_deref(), types.is_empty()) {
                    let to = &types[below(r, types.len() as u64) as usize];
                    retype(&mut v, from, to);
                }
                body = serde_json::to_vec(&v).unwrap();
                ("event type swapped", JSON)
            }
        };
        if below(r, 16) == 0 {
            headers.clear();
        }
        let membership = membership(r);
        Input { provider, body, headers, content_type, membership, how }
    }

    /// Runs one input through every stage; a panic is recorded with how to reproduce it.
    pub fn run(&self, seed: u64, index: u64, tally: &mut Tally) {
        let input = self.input(seed, index);
        tally.inputs += 1;
        let mut local = Tally::default();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stages(&input, &mut local)));
        if let Err(p) = outcome {
            let message = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            tally.panics.push(format!(
                "seed {seed} input {index} ({}, {}): {message}\nbody: {}",
                input.provider,
                input.how,
                String::from_utf8_lossy(&input.body).chars().take(2000).collect::<String>()
            ));
        }
        tally.add(&Tally { inputs: 0, ..local });
    }

    fn stages(&self, input: &Input, tally: &mut Tally) {
        let x = &self.config.extractors[&input.provider];
        let now = chrono::Utc::now();
        let ct = Some(input.content_type);
        let whole = x.decode(&input.body, ct);
        let captured = x.decode_captured(&input.body, ct);
        if let Ok(c) = &captured {
            let _ = x.extract("demo", c, &input.body, &input.headers, now);
        }
        let Ok(tree) = whole else { return };
        tally.decoded += 1;
        let Ok(e) = x.extract("demo", &tree, &input.body, &input.headers, now) else { return };
        tally.extracted += 1;
        if e.event.kind.is_none() {
            return;
        }
        tally.mapped += 1;
        let m = &input.membership;
        let _ = self.rules.is_stale(&e.event, m);
        let _ = self.rules.rank(&e.event);
        if let Some(status) = &e.event.status {
            let _ = self.rules.status_matches(status, m);
        }
        let _ = self.rules.renewal_due_at(m, &self.policy);
        let d = match self.rules.decide(&e.event, m, &self.policy, now) {
            Ok(d) => d,
            Err(err) => {
                tally.rule_errors += 1;
                tally.rule_error_examples.push(format!("{} ({})", err, input.how));
                return;
            }
        };
        tally.decided += 1;
        if let (Some(i), Some(state)) = (d.input, m.state) {
            let _ = machine::step(state, i);
            tally.stepped += 1;
        }
    }

    /// Runs inputs `0..n` of `seed` on `threads` threads.
    pub fn campaign(&self, seed: u64, n: u64, threads: u64) -> Tally {
        let threads = threads.max(1);
        let mut total = Tally::default();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    scope.spawn(move || {
                        let mut tally = Tally::default();
                        let mut i = t;
                        while i < n {
                            self.run(seed, i, &mut tally);
                            i += threads;
                        }
                        tally
                    })
                })
                .collect();
            for h in handles {
                total.add(&h.join().expect("a campaign thread"));
            }
        });
        total
    }
}

fn headers_of(body: &Path) -> Vec<(String, String)> {
    let stem = body.file_stem().unwrap().to_string_lossy().to_string();
    match std::fs::read_to_string(body.with_file_name(format!("{stem}.headers.json"))) {
        Ok(s) => {
            let m: std::collections::BTreeMap<String, String> = serde_json::from_str(&s).expect("headers");
            m.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect()
        }
        Err(_) => vec![],
    }
}

/// A number in `0..n`.
fn below(r: &mut TestRunner, n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        r.rng().next_u64() % n
    }
}

fn sample<S: Strategy>(r: &mut TestRunner, s: S) -> S::Value {
    s.new_tree(r).expect("a value").current()
}

pub fn arb_json() -> impl Strategy<Value = Value> {
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

/// Values that sit on a boundary somewhere: numbers at the ends of their types, times in
/// every shape and none, strings that are long, empty, or control characters, deep nesting.
fn interesting(r: &mut TestRunner) -> Value {
    let numbers = [
        "0",
        "-1",
        "1e308",
        "-1e308",
        "9223372036854775807",
        "-9223372036854775808",
        "18446744073709551615",
        "1.5",
        "253402300800",
        "-62135596801",
        "1e20",
        "4102444800000",
    ];
    let strings = [
        "",
        " ",
        "null",
        "0",
        "-0",
        "1e400",
        "9999-12-31T23:59:59Z",
        "0000-01-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "2026-01-01 00:00:00 +99:99",
        "\u{0}\u{1b}[31m\n\r",
        "é\u{202e}\u{fffd}",
        "../../etc/passwd",
        "%00%0a",
    ];
    match below(r, 5) {
        0 => serde_json::from_str(numbers[below(r, numbers.len() as u64) as usize]).unwrap(),
        1 => Value::String(strings[below(r, strings.len() as u64) as usize].to_string()),
        2 => Value::String("x".repeat(below(r, 200_000) as usize)),
        3 => {
            let depth = below(r, 120) as usize;
            let mut v = Value::Null;
            for _ in 0..depth {
                v = if below(r, 2) == 0 { Value::Array(vec![v]) } else { serde_json::json!({ "a": v }) };
            }
            v
        }
        _ => Value::Array((0..below(r, 2000)).map(Value::from).collect()),
    }
}

/// Sets `value` at the `pick`-th node of `v` (depth-first), replacing what was there.
pub fn plant(v: &mut Value, pick: &mut usize, value: &Value) -> bool {
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

/// Removes the `pick`-th node under `v` (depth-first).
fn remove(v: &mut Value, pick: &mut usize) -> bool {
    match v {
        Value::Object(m) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                if *pick == 0 {
                    m.remove(&k);
                    return true;
                }
                *pick -= 1;
                if remove(m.get_mut(&k).unwrap(), pick) {
                    return true;
                }
            }
            false
        }
        Value::Array(a) => {
            for i in 0..a.len() {
                if *pick == 0 {
                    a.remove(i);
                    return true;
                }
                *pick -= 1;
                if remove(&mut a[i], pick) {
                    return true;
                }
            }
            false
        }
        _ => false,
    }
}

/// Every string equal to `from` becomes `to`.
fn retype(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::String(s) if s == from => *s = to.to_string(),
        Value::Object(m) => m.values_mut().for_each(|c| retype(c, from, to)),
        Value::Array(a) => a.iter_mut().for_each(|c| retype(c, from, to)),
        _ => {}
    }
}

/// A few byte-level changes: flips, inserts, deletions, a cut.
fn flip_bytes(r: &mut TestRunner, body: &mut Vec<u8>) {
    for _ in 0..1 + below(r, 4) {
        let len = body.len() as u64;
        match below(r, 4) {
            0 if len > 0 => {
                let at = below(r, len) as usize;
                body[at] = r.rng().next_u32() as u8;
            }
            1 => {
                let at = below(r, len + 1) as usize;
                let insert = [b'{', b'}', b'[', b']', b'"', b'\\', b',', b':', b'0', b'&', b'=', b'%', 0xff];
                body.insert(at, insert[below(r, insert.len() as u64) as usize]);
            }
            2 if len > 0 => {
                let at = below(r, len) as usize;
                let n = (below(r, 16) as usize).min(body.len() - at);
                body.drain(at..at + n);
            }
            _ => {
                let at = below(r, len + 1) as usize;
                body.truncate(at);
            }
        }
    }
}

/// A form body with one pair's value replaced (by an interesting string, another event
/// type, or nothing), one pair dropped, or a key nested deeper.
fn mutate_form(r: &mut TestRunner, body: &mut Vec<u8>, event_type: Option<&str>, types: &[String]) {
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    if pairs.is_empty() {
        return;
    }
    let at = below(r, pairs.len() as u64) as usize;
    match below(r, 5) {
        0 => {
            pairs.remove(at);
        }
        1 => {
            if let (Some(from), false) = (event_type, types.is_empty()) {
                let to = types[below(r, types.len() as u64) as usize].clone();
                pairs.iter_mut().filter(|p| p.1 == from).for_each(|p| p.1 = to.clone());
            }
        }
        2 => pairs[at].0.push_str(&"[x]".repeat(below(r, 40) as usize)),
        3 => pairs[at].1 = sample(r, ".{0,40}"),
        _ => {
            pairs[at].1 = match interesting(r) {
                Value::String(s) => s,
                other => other.to_string(),
            }
        }
    }
    *body = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish().into_bytes();
}

/// A membership as the rules see it, in a random state (or none yet).
fn membership(r: &mut TestRunner) -> MembershipView {
    let state = if below(r, 8) == 0 { None } else { Some(MState::ALL[below(r, MState::ALL.len() as u64) as usize]) };
    let time = |r: &mut TestRunner| {
        if below(r, 4) == 0 {
            None
        } else {
            chrono::DateTime::from_timestamp(1_700_000_000 + below(r, 200_000_000) as i64, 0)
        }
    };
    MembershipView {
        exists: state.is_some(),
        provider: None,
        state,
        period_end: time(r),
        grace_until: time(r),
        access_until: time(r),
        last_event_at: time(r),
        last_event_rank: below(r, 5) as i64,
        cancel_at_period_end: below(r, 2) == 0,
        product_id: Some("prod_Pro".into()),
        plan_id: None,
        status: None,
        flags: vec![],
        member_email: Some("a@example.com".into()),
    }
}
