//! Extract stage: a decoded provider body → one `CanonicalEvent`, driven only by the
//! provider's YAML (`rules/providers/<provider>.yaml`). No provider is named in this code;
//! adding a provider takes YAML. Unknown event types become `kind: None` (stored as
//! ignored), never an error; a mapped field of the wrong type is an error (dead letter).

pub mod decode;
pub mod path;
pub mod spec;
pub mod time;

use crate::canonical::{CanonicalEvent, EventKind, MemberRef};
use crate::diagnostic::Diagnostic;
use chrono::{DateTime, Utc};
use path::Path;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use spec::{AmountUnit, Condition, DecodeSpec, FieldSpec, FieldsSpec, ProviderSpec, TimeUnit};
use std::collections::{BTreeMap, HashMap};

/// Reading a provider file failed; every problem is listed.
#[derive(Debug, thiserror::Error)]
#[error("{}", crate::diagnostic::render(.0))]
pub struct CompileError(pub Vec<Diagnostic>);

/// A mapped field could not be read as its canonical type: the event is dead-lettered.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Error(pub String);

/// Canonical fields, in a fixed order (index into `Fields`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum F {
    Email,
    CustomerId,
    Name,
    SubscriptionId,
    ProductId,
    PlanId,
    Status,
    PeriodEnd,
    CancelAtPeriodEnd,
    AmountCents,
    Currency,
}

const FIELD_NAMES: [(F, &str); 11] = [
    (F::Email, "email"),
    (F::CustomerId, "provider_customer_id"),
    (F::Name, "name"),
    (F::SubscriptionId, "subscription_id"),
    (F::ProductId, "product_id"),
    (F::PlanId, "plan_id"),
    (F::Status, "status"),
    (F::PeriodEnd, "period_end"),
    (F::CancelAtPeriodEnd, "cancel_at_period_end"),
    (F::AmountCents, "amount_cents"),
    (F::Currency, "currency"),
];

/// A compiled field extractor.
#[derive(Debug, Clone)]
struct Field {
    paths: Vec<Path>,
    constant: Option<Value>,
    time: Option<TimeUnit>,
    amount: Option<AmountUnit>,
    map: BTreeMap<String, Value>,
}

type Fields = [Option<Field>; 11];

/// Where a mapped event's kind comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Kind(EventKind),
    Ignore,
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    conds: Vec<(Path, Cond)>,
    target: Target,
    fields: Fields,
}

#[derive(Debug, Clone)]
enum Cond {
    Equals(Value),
    NotEquals(Value),
    OneOf(Vec<Value>),
    Present(bool),
    Null(bool),
}

#[derive(Debug, Clone)]
struct EventMap {
    target: Option<Target>,
    cases: Vec<Case>,
    fields: Fields,
    /// (conditions, flag) for each of the event's `flags:`.
    flags: Vec<(Vec<(Path, Cond)>, String)>,
}

#[derive(Debug, Clone)]
enum Idempotency {
    Paths(Vec<Path>),
    Header(Vec<String>),
    BodyHash,
}

/// The compiled form of one provider file.
#[derive(Debug, Clone)]
pub struct Extractor {
    pub provider: String,
    pub spec: ProviderSpec,
    decode: DecodeSpec,
    idempotency: Idempotency,
    event_id: Option<Field>,
    event_type: Field,
    occurred_at: Field,
    defaults: Fields,
    events: HashMap<String, EventMap>,
    /// Every path above, as a tree: a JSON body is decoded only along these.
    paths: decode::PathTree,
}

/// Which part of the YAML decided the event's kind: recorded for `simulate` and the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Mapping {
    /// `rules/providers/<provider>.yaml`
    pub file: String,
    /// The `events:` key that matched, if any.
    pub event: Option<String>,
    /// The case that matched (name or `cases[i]`), if any.
    pub case: Option<String>,
    /// Why the event maps to no kind, when it does not.
    pub ignored_because: Option<String>,
    /// The event's `flags:` whose conditions held: put on the membership if it applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// An extracted event, with the idempotency key and what decided it.
#[derive(Debug, Clone)]
pub struct Extraction {
    pub event: CanonicalEvent,
    pub idempotency_key: String,
    pub mapping: Mapping,
}

/// What is known of an event whose fields could not be read, for the dead letter.
#[derive(Debug, Clone)]
pub struct Failure {
    pub idempotency_key: String,
    pub event_id: String,
    pub event_type: String,
    pub occurred_at: Option<DateTime<Utc>>,
    pub error: Error,
}

/// Request headers as (lower-case name, value) pairs.
pub type Headers = [(String, String)];

impl Extractor {
    /// Parses and compiles one provider file. `file` is used in diagnostics.
    pub fn load(file: &str, src: &str) -> Result<Extractor, CompileError> {
        let spec: ProviderSpec =
            crate::yaml::from_str(src).map_err(|e| CompileError(vec![Diagnostic::from_yaml(file, &e)]))?;
        Extractor::compile(file, src, spec)
    }

    /// Compiles a parsed provider spec, gathering every problem.
    pub fn compile(file: &str, src: &str, spec: ProviderSpec) -> Result<Extractor, CompileError> {
        let mut diags = Vec::new();
        let mut cx = Cx { file, src, diags: &mut diags };
        let idempotency = if spec.idempotency.body_hash {
            Idempotency::BodyHash
        } else if let Some(h) = &spec.idempotency.header {
            Idempotency::Header(h.paths().into_iter().map(|h| h.to_ascii_lowercase()).collect())
        } else if let Some(p) = &spec.idempotency.path {
            Idempotency::Paths(p.paths().into_iter().filter_map(|p| cx.path(p)).collect())
        } else {
            cx.err("idempotency", "`idempotency` needs one of `path`, `header`, `body_hash`");
            Idempotency::BodyHash
        };
        let event_id = spec.event_id.as_ref().map(|f| cx.field("event_id", f));
        let event_type = cx.field("event_type", &spec.event_type);
        let occurred_at = match &spec.occurred_at {
            Some(f) => cx.field("occurred_at", f),
            None => {
                if spec.occurred_at_fallback.is_none() {
                    cx.err("provider:", "`occurred_at` is required unless `occurred_at_fallback: received` is set");
                }
                Field { paths: vec![], constant: None, time: Some(TimeUnit::Auto), amount: None, map: BTreeMap::new() }
            }
        };
        if occurred_at.time.is_none() {
            cx.err("occurred_at", "`occurred_at` needs a `time:` unit (unix_seconds, unix_millis, iso8601, auto)");
        }
        let defaults = cx.fields(&spec.fields);
        let mut events = HashMap::new();
        for (name, ev) in &spec.events {
            let target = ev.kind.as_deref().map(|k| cx.target(k));
            let cases = ev
                .cases
                .iter()
                .enumerate()
                .map(|(i, c)| Case {
                    name: c.name.clone().unwrap_or_else(|| format!("cases[{i}]")),
                    conds: cx.conds(&c.when),
                    target: cx.target(&c.kind),
                    fields: cx.fields(&c.fields),
                })
                .collect();
            let fields = cx.fields(&ev.fields);
            let flags = ev.flags.iter().map(|f| (cx.conds(&f.when), f.flag.clone())).collect();
            events.insert(name.clone(), EventMap { target, cases, fields, flags });
        }
        if let Some(r) = &spec.reconcile {
            cx.reconcile(r);
        }
        let stem = std::path::Path::new(file).file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if !stem.is_empty() && stem != spec.provider {
            cx.err("provider:", &format!("`provider: {}` does not match the file name `{stem}`", spec.provider));
        }
        if !diags.is_empty() {
            return Err(CompileError(diags));
        }
        let mut x = Extractor {
            provider: spec.provider.clone(),
            decode: spec.decode,
            idempotency,
            event_id,
            event_type,
            occurred_at,
            defaults,
            events,
            spec,
            paths: decode::PathTree::default(),
        };
        let mut tree = decode::PathTree::default();
        for p in x.body_paths() {
            tree.add(p.steps());
        }
        x.paths = tree;
        Ok(x)
    }

    /// Every path this extractor reads a body at.
    fn body_paths(&self) -> Vec<&Path> {
        fn of_fields(fields: &Fields) -> impl Iterator<Item = &Path> {
            fields.iter().flatten().flat_map(|f| f.paths.iter())
        }
        let mut out: Vec<&Path> = Vec::new();
        if let Idempotency::Paths(ps) = &self.idempotency {
            out.extend(ps);
        }
        for f in self.event_id.iter().chain([&self.event_type, &self.occurred_at]) {
            out.extend(&f.paths);
        }
        out.extend(of_fields(&self.defaults));
        for ev in self.events.values() {
            out.extend(of_fields(&ev.fields));
            for c in &ev.cases {
                out.extend(c.conds.iter().map(|(p, _)| p));
                out.extend(of_fields(&c.fields));
            }
            for (conds, _) in &ev.flags {
                out.extend(conds.iter().map(|(p, _)| p));
            }
        }
        out
    }

    /// The provider file this came from, relative to the rules dir.
    pub fn file(&self) -> String {
        format!("rules/providers/{}.yaml", self.provider)
    }

    /// Decodes a raw body the way the provider encodes it.
    pub fn decode(&self, body: &[u8], content_type: Option<&str>) -> Result<Value, decode::DecodeError> {
        if self.is_form(content_type) {
            decode::form(body)
        } else {
            decode::json_paths(body, &self.paths)
        }
    }

    /// Decodes a raw body for [`extract`](Self::extract): JSON into only the values at the
    /// configured paths (no tree of objects around them), a form body into a tree.
    pub fn decode_captured(
        &self,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<decode::Decoded<'_>, decode::DecodeError> {
        if self.is_form(content_type) {
            decode::form(body).map(decode::Decoded::Tree)
        } else {
            decode::json_captured(body, &self.paths)
        }
    }

    fn is_form(&self, content_type: Option<&str>) -> bool {
        match self.decode {
            DecodeSpec::Json => false,
            DecodeSpec::Form => true,
            DecodeSpec::Auto => content_type
                .map(|c| c.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"))
                .unwrap_or(false),
        }
    }

    /// Maps a decoded body (a [`Value`], or a [`decode::Decoded`]) onto the canonical event.
    pub fn extract<B: decode::Lookup + ?Sized>(
        &self,
        tenant: &str,
        body: &B,
        raw: &[u8],
        headers: &Headers,
        received_at: DateTime<Utc>,
    ) -> Result<Extraction, Box<Failure>> {
        let idempotency_key = match &self.idempotency {
            Idempotency::BodyHash => body_hash(raw),
            Idempotency::Header(names) => {
                names.iter().find_map(|h| header(headers, h)).map(str::to_string).unwrap_or_else(|| body_hash(raw))
            }
            Idempotency::Paths(ps) => first(ps, body).and_then(as_string).unwrap_or_else(|| body_hash(raw)),
        };
        let event_type = read(&self.event_type, body).ok().flatten().and_then(|v| as_string(&v));
        let event_id = self
            .event_id
            .as_ref()
            .and_then(|f| read(f, body).ok().flatten())
            .and_then(|v| as_string(&v))
            .unwrap_or_else(|| idempotency_key.clone());
        let occurred_at = read(&self.occurred_at, body)
            .and_then(|v| v.map(|v| time::to_time(&v, self.occurred_at.time.unwrap_or(TimeUnit::Auto))).transpose())
            .map_err(Error);
        let fail = |error: Error, occurred_at: Option<DateTime<Utc>>| {
            Box::new(Failure {
                idempotency_key: idempotency_key.clone(),
                event_id: event_id.clone(),
                event_type: event_type.clone().unwrap_or_default(),
                occurred_at,
                error,
            })
        };
        let Some(event_type) = event_type.clone() else {
            return Err(fail(Error("no event type found at the configured `event_type` path".into()), None));
        };
        let occurred_at = match occurred_at {
            Ok(Some(t)) => t,
            Ok(None) if self.spec.occurred_at_fallback == Some(spec::OccurredFallback::Received) => received_at,
            Ok(None) => {
                return Err(fail(Error("no event time found at the configured `occurred_at` path".into()), None))
            }
            Err(e) => return Err(fail(Error(format!("occurred_at: {e}")), None)),
        };

        let mut mapping = Mapping { file: self.file(), event: None, case: None, ignored_because: None, flags: vec![] };
        let mut layers: Vec<&Fields> = Vec::with_capacity(3);
        let kind = match self.events.get(&event_type) {
            None => {
                mapping.ignored_because = Some(format!("event type `{event_type}` is not mapped"));
                None
            }
            Some(em) => {
                mapping.event = Some(event_type.clone());
                let all_hold = |conds: &[(Path, Cond)]| conds.iter().all(|(p, c)| holds(c, body.at(p)));
                mapping.flags = em.flags.iter().filter(|(conds, _)| all_hold(conds)).map(|(_, f)| f.clone()).collect();
                let matched = em.cases.iter().find(|c| all_hold(&c.conds));
                if let Some(case) = matched {
                    layers.push(&case.fields);
                }
                layers.push(&em.fields);
                let target = match matched {
                    Some(case) => {
                        mapping.case = Some(case.name.clone());
                        Some(case.target)
                    }
                    None => em.target,
                };
                match target {
                    Some(Target::Kind(k)) => Some(k),
                    Some(Target::Ignore) => {
                        mapping.ignored_because = Some(match &mapping.case {
                            Some(case) => format!("case `{case}` of `{event_type}` says ignore"),
                            None => format!("`{event_type}` is mapped to ignore"),
                        });
                        None
                    }
                    None => {
                        mapping.ignored_because =
                            Some(format!("no case of `{event_type}` matched and it has no default kind"));
                        None
                    }
                }
            }
        };
        layers.push(&self.defaults);

        let get = |f: F| -> Result<Option<Value>, Error> {
            for layer in &layers {
                if let Some(field) = &layer[f as usize] {
                    return read(field, body).map_err(|e| Error(format!("{}: {e}", FIELD_NAMES[f as usize].1)));
                }
            }
            Ok(None)
        };
        let string = |f: F| -> Result<Option<String>, Error> { Ok(get(f)?.and_then(|v| as_string(&v))) };
        let build = || -> Result<CanonicalEvent, Error> {
            let period_end = match get(F::PeriodEnd)? {
                None => None,
                Some(v) => {
                    let unit = field_in(&layers, F::PeriodEnd).and_then(|f| f.time).unwrap_or(TimeUnit::Auto);
                    Some(time::to_time(&v, unit).map_err(|e| Error(format!("period_end: {e}")))?)
                }
            };
            let amount_cents = match get(F::AmountCents)? {
                None => None,
                Some(v) => {
                    let unit = field_in(&layers, F::AmountCents).and_then(|f| f.amount).unwrap_or(AmountUnit::Cents);
                    Some(time::to_cents(&v, unit).map_err(|e| Error(format!("amount_cents: {e}")))?)
                }
            };
            let cancel_at_period_end = match get(F::CancelAtPeriodEnd)? {
                None => false,
                Some(v) => {
                    as_bool(&v).ok_or_else(|| Error(format!("cancel_at_period_end: expected a boolean, got {v}")))?
                }
            };
            Ok(CanonicalEvent {
                kind,
                provider: self.provider.clone(),
                tenant: tenant.to_string(),
                event_id: event_id.clone(),
                event_type: event_type.clone(),
                occurred_at,
                member: MemberRef {
                    email: string(F::Email)?,
                    provider_customer_id: string(F::CustomerId)?,
                    name: string(F::Name)?,
                },
                subscription_id: string(F::SubscriptionId)?,
                product_id: string(F::ProductId)?,
                plan_id: string(F::PlanId)?,
                status: string(F::Status)?,
                period_end,
                cancel_at_period_end,
                amount_cents,
                currency: string(F::Currency)?,
            })
        };
        match build() {
            Ok(event) => Ok(Extraction { event, idempotency_key, mapping }),
            Err(e) if kind.is_none() => {
                // An unmapped event is stored as ignored even when default fields don't read.
                let _ = e;
                Ok(Extraction {
                    event: CanonicalEvent {
                        kind: None,
                        provider: self.provider.clone(),
                        tenant: tenant.to_string(),
                        event_id: event_id.clone(),
                        event_type: event_type.clone(),
                        occurred_at,
                        member: MemberRef::default(),
                        subscription_id: None,
                        product_id: None,
                        plan_id: None,
                        status: None,
                        period_end: None,
                        cancel_at_period_end: false,
                        amount_cents: None,
                        currency: None,
                    },
                    idempotency_key,
                    mapping,
                })
            }
            Err(e) => Err(fail(e, Some(occurred_at))),
        }
    }
}

/// One field extractor used outside the event mapping: reconciliation reads a provider's
/// API answer with the same language (paths, first-non-null, `const`, `map:`, time units).
#[derive(Debug, Clone)]
pub struct FieldReader(Field);

impl FieldReader {
    /// Compiles a field spec; the error names what is wrong with it.
    pub fn compile(spec: &FieldSpec) -> Result<FieldReader, String> {
        let detail = match spec {
            FieldSpec::Path(p) => spec::FieldDetail { paths: vec![p.clone()], ..Default::default() },
            FieldSpec::Paths(ps) => spec::FieldDetail { paths: ps.clone(), ..Default::default() },
            FieldSpec::Full(d) => d.clone(),
        };
        if detail.paths.is_empty() && detail.constant.is_none() {
            return Err("a field needs `paths` or `const`".into());
        }
        let paths = detail.paths.iter().map(|p| Path::parse(p)).collect::<Result<Vec<_>, _>>()?;
        Ok(FieldReader(Field {
            paths,
            constant: detail.constant,
            time: detail.time,
            amount: detail.amount,
            map: detail.map,
        }))
    }

    /// The paths read, for messages (`a.b | c`).
    pub fn describe(&self) -> String {
        let p: Vec<&str> = self.0.paths.iter().map(Path::as_str).collect();
        if p.is_empty() {
            "const".into()
        } else {
            p.join(" | ")
        }
    }

    /// The value (after `map:`), `None` when no path resolves and there is no constant.
    pub fn value(&self, body: &Value) -> Result<Option<Value>, String> {
        read(&self.0, body)
    }

    pub fn string(&self, body: &Value) -> Result<Option<String>, String> {
        Ok(self.value(body)?.and_then(|v| as_string(&v)))
    }

    /// A time in the field's unit (`auto` when none is given).
    pub fn time(&self, body: &Value) -> Result<Option<DateTime<Utc>>, String> {
        self.value(body)?.map(|v| time::to_time(&v, self.0.time.unwrap_or(TimeUnit::Auto))).transpose()
    }

    pub fn bool(&self, body: &Value) -> Result<Option<bool>, String> {
        self.value(body)?.map(|v| as_bool(&v).ok_or_else(|| format!("expected a boolean, got {v}"))).transpose()
    }
}

/// Placeholders a reconcile template may use.
pub const TEMPLATE_VARS: [&str; 5] = ["api_base", "subscription_id", "customer_id", "product_id", "api_key"];

/// The `{name}` placeholders in a template.
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else { break };
        out.push(&rest[i + 1..i + j]);
        rest = &rest[i + j + 1..];
    }
    out
}

fn field_in<'a>(layers: &[&'a Fields], f: F) -> Option<&'a Field> {
    layers.iter().find_map(|l| l[f as usize].as_ref())
}

/// Hex SHA-256 of the raw body: the idempotency key of providers that send no id.
pub fn body_hash(raw: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(raw)))
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Literal strings "null" (form bodies) and "" read as absent.
fn is_nullish(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => {
            let t = s.trim();
            t.is_empty() || t == "null"
        }
        _ => false,
    }
}

fn first<'a, B: decode::Lookup + ?Sized>(paths: &[Path], body: &'a B) -> Option<&'a Value> {
    paths.iter().filter_map(|p| body.at(p)).find(|v| !is_nullish(v))
}

/// Reads a field: first non-null path, else the constant; then the value map.
fn read<B: decode::Lookup + ?Sized>(field: &Field, body: &B) -> Result<Option<Value>, String> {
    let v = first(&field.paths, body).cloned().or_else(|| field.constant.clone());
    let Some(v) = v else { return Ok(None) };
    if field.map.is_empty() {
        return Ok(Some(v));
    }
    let key = as_string(&v).unwrap_or_default();
    Ok(Some(field.map.get(&key).cloned().unwrap_or(v)))
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        // Form bodies pad values (`customer[name]=" "`); surrounding blanks carry nothing.
        Value::String(s) if !is_nullish(v) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" | "" | "null" => Some(false),
            _ => None,
        },
        Value::Null => Some(false),
        _ => None,
    }
}

/// Equality that reads `"true"` as `true` and `"6900"` as `6900` (form bodies).
fn loose_eq(a: &Value, b: &Value) -> bool {
    if a == b {
        return true;
    }
    match (as_string(a), as_string(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn holds(cond: &Cond, v: Option<&Value>) -> bool {
    match cond {
        Cond::Present(want) => v.is_some() == *want,
        Cond::Null(want) => v.is_none_or(is_nullish) == *want,
        Cond::Equals(x) => v.is_some_and(|v| loose_eq(v, x)),
        Cond::NotEquals(x) => !v.is_some_and(|v| loose_eq(v, x)),
        Cond::OneOf(xs) => v.is_some_and(|v| xs.iter().any(|x| loose_eq(v, x))),
    }
}

fn compile_cond(c: &Condition) -> Vec<Cond> {
    match c {
        Condition::Equals(v) => vec![Cond::Equals(v.clone())],
        Condition::Test(t) => {
            let mut out = Vec::new();
            if let Some(v) = &t.equals {
                out.push(Cond::Equals(v.clone()));
            }
            if let Some(v) = &t.not_equals {
                out.push(Cond::NotEquals(v.clone()));
            }
            if let Some(v) = &t.one_of {
                out.push(Cond::OneOf(v.clone()));
            }
            if let Some(b) = t.present {
                out.push(Cond::Present(b));
            }
            if let Some(b) = t.is_null {
                out.push(Cond::Null(b));
            }
            if out.is_empty() {
                out.push(Cond::Present(true));
            }
            out
        }
    }
}

/// Compile context: collects diagnostics with their location in the source.
struct Cx<'a> {
    file: &'a str,
    src: &'a str,
    diags: &'a mut Vec<Diagnostic>,
}

impl Cx<'_> {
    fn err(&mut self, needle: &str, msg: &str) {
        let (line, col) = locate(self.src, needle);
        self.diags.push(Diagnostic::new(self.file, line, col, msg));
    }

    fn path(&mut self, p: &str) -> Option<Path> {
        match Path::parse(p) {
            Ok(p) => Some(p),
            Err(e) => {
                self.err(p, &e);
                None
            }
        }
    }

    /// The conditions of a `when:` map, each path parsed (a bad one reported).
    fn conds(&mut self, when: &BTreeMap<String, spec::Condition>) -> Vec<(Path, Cond)> {
        let mut out = Vec::new();
        for (p, cond) in when {
            if let Some(path) = self.path(p) {
                out.extend(compile_cond(cond).into_iter().map(|c| (path.clone(), c)));
            }
        }
        out
    }

    fn target(&mut self, kind: &str) -> Target {
        if kind == "ignore" {
            return Target::Ignore;
        }
        match EventKind::parse(kind) {
            Some(k) => Target::Kind(k),
            None => {
                let (line, col) = locate(self.src, &format!("kind: {kind}"));
                let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                let d = Diagnostic::new(self.file, line, col, format!("unknown canonical kind `{kind}`"));
                self.diags.push(d.suggest(kind, &names, true, &["ignore"]));
                Target::Ignore
            }
        }
    }

    fn field(&mut self, name: &str, spec: &FieldSpec) -> Field {
        let detail = match spec {
            FieldSpec::Path(p) => spec::FieldDetail { paths: vec![p.clone()], ..Default::default() },
            FieldSpec::Paths(ps) => spec::FieldDetail { paths: ps.clone(), ..Default::default() },
            FieldSpec::Full(d) => d.clone(),
        };
        if detail.paths.is_empty() && detail.constant.is_none() {
            self.err(name, &format!("field `{name}` needs `paths` or `const`"));
        }
        Field {
            paths: detail.paths.iter().filter_map(|p| self.path(p)).collect(),
            constant: detail.constant,
            time: detail.time,
            amount: detail.amount,
            map: detail.map,
        }
    }

    /// Checks a `reconcile:` section: paths, placeholders, a URL and a status.
    fn reconcile(&mut self, r: &spec::ReconcileSpec) {
        if r.unsupported.is_some() {
            return;
        }
        let Some(url) = &r.url else {
            self.err("reconcile:", "`reconcile:` needs a `url` (or `unsupported: <why>`)");
            return;
        };
        let mut templates: Vec<&str> = vec![url.as_str()];
        templates.extend(r.headers.values().map(String::as_str));
        let body = r.body.as_ref().map(|b| b.to_string()).unwrap_or_default();
        templates.push(&body);
        if let Some(sel) = &r.select {
            self.path(&sel.list);
            self.path(&sel.key);
            if let Some(e) = &sel.equals {
                templates.push(e);
            }
        }
        for t in templates {
            for name in placeholders(t) {
                // GraphQL bodies use braces of their own: only `{word}` placeholders count.
                let word = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if word && !TEMPLATE_VARS.contains(&name) {
                    self.err(
                        &format!("{{{name}}}"),
                        &format!("unknown placeholder `{{{name}}}`; one of {}", TEMPLATE_VARS.join(", ")),
                    );
                }
            }
        }
        if url.contains("{api_key}") {
            self.err("{api_key}", "`{api_key}` may appear only in headers: URLs are logged");
        }
        let f = &r.fields;
        match &f.status {
            Some(s) => {
                self.field("status", s);
            }
            None => self.err("reconcile:", "`reconcile.fields.status` is required"),
        }
        for (name, spec) in [
            ("period_end", &f.period_end),
            ("cancel_at_period_end", &f.cancel_at_period_end),
            ("product_id", &f.product_id),
        ] {
            if let Some(s) = spec {
                self.field(name, s);
            }
        }
    }

    fn fields(&mut self, spec: &FieldsSpec) -> Fields {
        let specs = [
            &spec.email,
            &spec.provider_customer_id,
            &spec.name,
            &spec.subscription_id,
            &spec.product_id,
            &spec.plan_id,
            &spec.status,
            &spec.period_end,
            &spec.cancel_at_period_end,
            &spec.amount_cents,
            &spec.currency,
        ];
        let mut out: Fields = Default::default();
        for (i, s) in specs.into_iter().enumerate() {
            if let Some(s) = s {
                out[i] = Some(self.field(FIELD_NAMES[i].1, s));
            }
        }
        out
    }
}

/// 1-based line and column of the first occurrence of `needle` in `src` (1:1 if absent).
pub fn locate(src: &str, needle: &str) -> (usize, usize) {
    match src.find(needle) {
        Some(at) => {
            let before = &src[..at];
            let line = before.matches('\n').count() + 1;
            let col = at - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            (line, col)
        }
        None => (1, 1),
    }
}

#[cfg(test)]
mod tests;
