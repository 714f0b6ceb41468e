//! Extract stage: a decoded provider body → one `CanonicalEvent`, driven only by the
//! provider's YAML (`rules/providers/<provider>.yaml`). No provider is named in this code;
//! adding a provider takes YAML. Unknown event types become `kind: None` (stored as
//! ignored), never an error; a mapped field of the wrong type is an error (dead letter).

mod compile;
mod compiled;
pub mod decode;
mod form;
pub mod path;
mod read;
pub mod time;

pub use read::{FieldReader, Headers};

use compiled::{Cond, EventMap, Field, Fields, Idempotency, Target, F};
use read::{as_bool, as_string, body_hash, field_in, first, header, holds, read};

use crate::canonical::{CanonicalEvent, MemberRef};
use crate::diagnostic::Diagnostic;
use crate::spec::{self, AmountUnit, DecodeSpec, ProviderSpec, TimeUnit};
use chrono::{DateTime, Utc};
use path::Path;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;

/// Reading a provider file failed; every problem is listed.
#[derive(Debug, thiserror::Error)]
#[error("{}", crate::diagnostic::render(.0))]
pub struct CompileError(pub Vec<Diagnostic>);

/// Why a delivery's fields could not be read: the event is stored as a dead letter.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no event type found at the configured `event_type` path")]
    NoEventType,
    #[error("no event time found at the configured `occurred_at` path")]
    NoEventTime,
    /// A mapped field whose value is not of its canonical type.
    #[error("{field}: {problem}")]
    Field { field: &'static str, problem: String },
    /// A stored body that can no longer be decoded (replay, parked events).
    #[error("{0}")]
    Undecodable(String),
}

/// The longest text a mapped field may hold (an email, a name, a product or subscription
/// id): a longer one is an error for that field, so no stored row or list carries it.
pub const MAX_FIELD_BYTES: usize = 1024;

fn field_error(field: &'static str) -> impl Fn(String) -> Error {
    move |problem| Error::Field { field, problem }
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
    /// Enrichments (`enrich:`), with their conditions and variables compiled.
    enrich: Vec<compiled::Enrich>,
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
    /// Optional fields whose value could not be read (left out of the event, which still
    /// applies; the membership is flagged). A field the rules need fails the event instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
    /// Where what the delivery left out came from (`enrich:`): the enrichment and its request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enriched_by: Option<String>,
}

impl Mapping {
    /// What a file (or an engine source: `timers`, `rederive`) decided, with `event` its
    /// key there; nothing else known yet.
    pub fn new(file: impl Into<String>, event: Option<String>) -> Mapping {
        Mapping {
            file: file.into(),
            event,
            case: None,
            ignored_because: None,
            flags: vec![],
            unreadable: vec![],
            enriched_by: None,
        }
    }
}

/// An extracted event, with the idempotency key and what decided it.
#[derive(Debug, Clone)]
pub struct Extraction {
    pub event: CanonicalEvent,
    pub idempotency_key: String,
    pub mapping: Mapping,
    /// The request that would fetch what the delivery leaves out (`enrich:`), when it names
    /// no subscription or product and an enrichment's conditions hold.
    pub enrich: Option<EnrichPlan>,
}

/// An enrichment to make for one delivery: which one, and its placeholders' values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrichPlan {
    /// Index into the provider file's `enrich:`.
    pub step: usize,
    pub vars: std::collections::BTreeMap<String, String>,
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

impl Extractor {
    /// The provider file this came from, relative to the rules dir.
    pub fn file(&self) -> String {
        format!("rules/providers/{}.yaml", self.provider)
    }

    /// The first enrichment whose conditions hold on `body`, with its variables' values
    /// (`None` if a variable has no value there).
    fn enrich_plan<B: decode::Lookup + ?Sized>(&self, body: &B) -> Option<EnrichPlan> {
        let (step, e) = self
            .enrich
            .iter()
            .enumerate()
            .find(|(_, e)| e.conds.iter().all(|(p, c)| holds(c, body.at(p), |o| body.at(o))))?;
        let mut vars = std::collections::BTreeMap::new();
        for (name, path) in &e.vars {
            vars.insert(name.clone(), body.at(path).and_then(as_string)?);
        }
        Some(EnrichPlan { step, vars })
    }

    /// Decodes a raw body the way the provider encodes it.
    pub fn decode(&self, body: &[u8], content_type: Option<&str>) -> Result<Value, decode::DecodeError> {
        if self.is_form(content_type) {
            form::form(body)
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
            form::form(body).map(decode::Decoded::Tree)
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
            .map_err(field_error("occurred_at"));
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
            return Err(fail(Error::NoEventType, None));
        };
        let occurred_at = match occurred_at {
            Ok(Some(t)) => t,
            Ok(None) if self.spec.occurred_at_fallback == Some(spec::OccurredFallback::Received) => received_at,
            Ok(None) => return Err(fail(Error::NoEventTime, None)),
            Err(e) => return Err(fail(e, None)),
        };

        let mut mapping = Mapping::new(self.file(), None);
        let mut layers: Vec<&Fields> = Vec::with_capacity(3);
        let kind = match self.events.get(&event_type) {
            None => {
                mapping.ignored_because = Some(format!("event type `{event_type}` is not mapped"));
                None
            }
            Some(em) => {
                mapping.event = Some(event_type.clone());
                let all_hold = |conds: &[(Path, Cond)]| conds.iter().all(|(p, c)| holds(c, body.at(p), |o| body.at(o)));
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
                    return read(field, body).map_err(field_error(f.name()));
                }
            }
            Ok(None)
        };
        let string = |f: F| -> Result<Option<String>, Error> {
            match get(f)?.and_then(|v| as_string(&v)) {
                Some(s) if s.len() > MAX_FIELD_BYTES => {
                    Err(field_error(f.name())(format!("{} bytes long; at most {MAX_FIELD_BYTES} are read", s.len())))
                }
                other => Ok(other),
            }
        };
        // Fields the rules can do without (a name, a period end, amounts, payment ids): one
        // that cannot be read is left out and recorded, not a reason to fail the event.
        let unreadable = std::cell::RefCell::new(Vec::<String>::new());
        fn optional<T>(bad: &std::cell::RefCell<Vec<String>>, r: Result<Option<T>, Error>) -> Option<T> {
            r.unwrap_or_else(|e| {
                bad.borrow_mut().push(e.to_string());
                None
            })
        }
        let time_of = |f: F| -> Result<Option<DateTime<Utc>>, Error> {
            let Some(v) = get(f)? else { return Ok(None) };
            let unit = field_in(&layers, f).and_then(|x| x.time).unwrap_or(TimeUnit::Auto);
            time::to_time(&v, unit).map(Some).map_err(field_error(f.name()))
        };
        let cents_of = |f: F| -> Result<Option<i64>, Error> {
            let Some(v) = get(f)? else { return Ok(None) };
            let unit = field_in(&layers, f).and_then(|x| x.amount).unwrap_or(AmountUnit::Cents);
            time::to_cents(&v, unit).map(Some).map_err(field_error(f.name()))
        };
        let build = || -> Result<CanonicalEvent, Error> {
            let period_end = optional(&unreadable, time_of(F::PeriodEnd));
            let amount_cents = optional(&unreadable, cents_of(F::AmountCents));
            let amount_paid_cents = optional(&unreadable, cents_of(F::AmountPaidCents));
            let text = |f: F| optional(&unreadable, string(f));
            let cancel_at_period_end = match get(F::CancelAtPeriodEnd)? {
                None => false,
                Some(v) => as_bool(&v).ok_or_else(|| {
                    field_error("cancel_at_period_end")(format!("expected a boolean, got {}", time::brief(&v)))
                })?,
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
                    name: text(F::Name),
                },
                subscription_id: string(F::SubscriptionId)?,
                product_id: string(F::ProductId)?,
                plan_id: string(F::PlanId)?,
                status: string(F::Status)?,
                period_end,
                cancel_at_period_end,
                amount_cents,
                currency: text(F::Currency),
                payment: crate::canonical::PaymentRef {
                    invoice_id: text(F::InvoiceId),
                    payment_id: text(F::PaymentId),
                    charge_id: text(F::ChargeId),
                    amount_paid_cents,
                },
                note: None,
            })
        };
        match build() {
            Ok(event) => {
                mapping.unreadable = unreadable.into_inner();
                for why in &mapping.unreadable {
                    mapping.flags.push(format!("unreadable field left out: {why}"));
                }
                let enrich = if event.kind.is_some() && event.subscription_id.is_none() && event.product_id.is_none() {
                    self.enrich_plan(body)
                } else {
                    None
                };
                Ok(Extraction { event, idempotency_key, mapping, enrich })
            }
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
                        payment: Default::default(),
                        note: None,
                    },
                    idempotency_key,
                    mapping,
                    enrich: None,
                })
            }
            Err(e) => Err(fail(e, Some(occurred_at))),
        }
    }
}

#[cfg(test)]
mod tests;
