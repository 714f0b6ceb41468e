//! The compiled form of a provider file's field and event mapping: canonical fields by
//! index, field extractors, event maps with their cases, conditions and flags.
//!
//! What this module must never do: read a body or report a problem; `compile` builds
//! these values, `read` and the extractor use them.

use super::path::Path;
use crate::canonical::EventKind;
use crate::spec::{AmountUnit, TimeUnit};
use serde_json::Value;
use std::collections::BTreeMap;

/// Canonical fields, in a fixed order (index into `Fields`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum F {
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
    InvoiceId,
    PaymentId,
    ChargeId,
    AmountPaidCents,
}

impl F {
    /// The field's canonical name (from the one ordered list, `FieldsSpec::in_order`).
    pub(super) fn name(self) -> &'static str {
        crate::spec::FieldsSpec::default().in_order()[self as usize].0
    }
}

/// A compiled field extractor.
#[derive(Debug, Clone)]
pub(super) struct Field {
    pub(super) paths: Vec<Path>,
    pub(super) constant: Option<Value>,
    pub(super) time: Option<TimeUnit>,
    pub(super) amount: Option<AmountUnit>,
    pub(super) map: BTreeMap<String, Value>,
}

pub(super) type Fields = [Option<Field>; 15];

/// Where a mapped event's kind comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Kind(EventKind),
    Ignore,
}

#[derive(Debug, Clone)]
pub(super) struct Case {
    pub(super) name: String,
    pub(super) conds: Vec<(Path, Cond)>,
    pub(super) target: Target,
    pub(super) fields: Fields,
}

#[derive(Debug, Clone)]
pub(super) enum Cond {
    Equals(Value),
    NotEquals(Value),
    OneOf(Vec<Value>),
    Present(bool),
    Null(bool),
    /// Equals the value at another path.
    SameAs(Path),
    /// Differs from the value at another path.
    DiffersFrom(Path),
}

impl Cond {
    /// The other path a condition compares with, if it compares two paths.
    pub(super) fn other_path(&self) -> Option<&Path> {
        match self {
            Cond::SameAs(p) | Cond::DiffersFrom(p) => Some(p),
            _ => None,
        }
    }
}

/// A compiled `enrich:` step: its conditions and variables; the request itself is read from
/// the spec when it is made.
#[derive(Debug, Clone)]
pub(super) struct Enrich {
    pub(super) conds: Vec<(Path, Cond)>,
    pub(super) vars: Vec<(String, Path)>,
}

#[derive(Debug, Clone)]
pub(super) struct EventMap {
    pub(super) target: Option<Target>,
    pub(super) cases: Vec<Case>,
    pub(super) fields: Fields,
    /// (conditions, flag) for each of the event's `flags:`.
    pub(super) flags: Vec<(Vec<(Path, Cond)>, String)>,
}

#[derive(Debug, Clone)]
pub(super) enum Idempotency {
    Paths(Vec<Path>),
    Header(Vec<String>),
    BodyHash,
}
