//! The provider file model: `rules/providers/<provider>.yaml` as written, shared by
//! verify (its `verify:` schemes), extract (fields and events), reconcile (its
//! `reconcile:` section), check and the JSON Schema.
//!
//! What this module must never do: evaluate anything; each layer compiles what it reads.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One provider file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    /// Provider name; must match the file name and the URL segment.
    pub provider: String,
    /// How a delivery proves it came from the provider.
    pub verify: VerifySpec,
    /// Body encoding.
    #[serde(default)]
    pub decode: DecodeSpec,
    /// Where the idempotency key comes from.
    pub idempotency: IdempotencySpec,
    /// Path(s) to the provider's event id (defaults to the idempotency key).
    #[serde(default)]
    pub event_id: Option<FieldSpec>,
    /// Path(s) to the provider's event type.
    pub event_type: FieldSpec,
    /// Path(s) to when the event happened, with the time unit. May be left out only with
    /// `occurred_at_fallback: received` (providers that send no event time).
    #[serde(default)]
    pub occurred_at: Option<FieldSpec>,
    /// When no `occurred_at` path resolves: `received` uses the time the delivery arrived
    /// (for payloads that carry no event time); without it such an event is dead-lettered.
    #[serde(default)]
    pub occurred_at_fallback: Option<OccurredFallback>,
    /// Further schemes tried, in order, when the delivery lacks the primary scheme's
    /// header (a provider's legacy signing; opt-in).
    #[serde(default)]
    pub verify_also: Vec<VerifySpec>,
    /// Top-level keys read in place of another when that one is absent: `{data: body}`
    /// reads every `data.…` path at `body.…` in a body that has no `data` (deliveries
    /// relayed by integration platforms rename the envelope).
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// Field extractors that apply to every event type (overridden per event type).
    #[serde(default)]
    pub fields: FieldsSpec,
    /// Event type → canonical kind, with conditions and field overrides.
    #[serde(default)]
    pub events: BTreeMap<String, EventSpec>,
    /// Operator notes (ignored by the engine).
    #[serde(default)]
    pub notes: Option<String>,
    /// How to read the provider's current view of one membership (reconciliation).
    #[serde(default)]
    pub reconcile: Option<ReconcileSpec>,
    /// Requests that fetch what a delivery leaves out (Stripe's checkout line items), made
    /// before the event is applied, for an event that names no subscription or product.
    #[serde(default)]
    pub enrich: Vec<EnrichSpec>,
}

/// One enrichment: when its conditions hold on a delivery that names no subscription or
/// product, `GET {url}` with the tenant's API key, and each item of the answer's list names
/// a product (each a membership of its own).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrichSpec {
    /// Shown in the activity log and `explain`.
    pub name: String,
    /// Conditions on the delivery's body (as a case's `when:`).
    #[serde(default)]
    pub when: BTreeMap<String, Condition>,
    /// API root; `<PROVIDER>_API_BASE` overrides it.
    #[serde(default)]
    pub api_base: Option<String>,
    /// URL template: `{api_base}`, and each of `vars` (percent-encoded, one path segment).
    pub url: String,
    /// Placeholder → path in the delivery's body (e.g. `session_id: data.object.id`).
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Header templates; `{api_key}` is the tenant's API key for the provider.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Path to the list of items in the answer (e.g. `data`).
    pub items: String,
    /// Per item: path(s) to the product id.
    pub product_id: FieldSpec,
    /// Per item: path(s) to the plan or price id.
    #[serde(default)]
    pub plan_id: Option<FieldSpec>,
}

/// The request that reads a provider's current view of one subscription, and the
/// extractors that turn its JSON answer into a status snapshot. Templates may use
/// `{api_base}`, `{subscription_id}`, `{customer_id}`, `{product_id}`; header templates
/// also `{api_key}` (the tenant's `api_key`, never logged).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSpec {
    /// Why this provider cannot be reconciled (no documented status API). Its memberships
    /// stay `never_reconciled`, and resync says this reason.
    #[serde(default)]
    pub unsupported: Option<String>,
    /// HTTP method. Default `get`.
    #[serde(default)]
    pub method: ReconcileMethod,
    /// URL template, e.g. `{api_base}/v1/subscriptions/{subscription_id}`.
    #[serde(default)]
    pub url: Option<String>,
    /// The API root when `<PROVIDER>_API_BASE` is not set (omit where it differs per account).
    #[serde(default)]
    pub api_base: Option<String>,
    /// Request headers (templates), e.g. `Authorization: "Bearer {api_key}"`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body for `post` (string values are templates), e.g. a GraphQL query.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// Where the answer lists several items (a member's plans): the one to read.
    #[serde(default)]
    pub select: Option<SelectSpec>,
    /// Snapshot extractors, read from the answer (or from the selected item).
    #[serde(default)]
    pub fields: SnapshotSpec,
}

/// HTTP methods for the reconcile request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileMethod {
    #[default]
    Get,
    Post,
}

/// Picks one item of a list in the answer: the one whose `key` equals the template `equals`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectSpec {
    /// Path to the list, e.g. `data.planConnections`.
    pub list: String,
    /// Path inside each item, e.g. `id`.
    pub key: String,
    /// Template the key must equal. Default `{subscription_id}`.
    #[serde(default)]
    pub equals: Option<String>,
}

/// What a reconcile answer is read into. `status` is required; a field left out is not
/// compared.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSpec {
    /// The provider's status, mapped (`map:`) onto rules/status.rhai's vocabulary.
    pub status: Option<FieldSpec>,
    pub period_end: Option<FieldSpec>,
    pub cancel_at_period_end: Option<FieldSpec>,
    pub product_id: Option<FieldSpec>,
}

/// What `occurred_at` falls back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OccurredFallback {
    /// The time the delivery was received.
    Received,
}

/// Signature scheme and its parameters.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    pub scheme: SchemeName,
    /// Header carrying the signature (scheme default when omitted).
    #[serde(default)]
    pub header: Option<String>,
    /// Accepted clock skew for timestamped schemes, in seconds.
    #[serde(default)]
    pub tolerance_secs: Option<i64>,
    /// `form_secret`: the body field carrying the shared secret.
    #[serde(default)]
    pub field: Option<String>,
    /// `standard_webhooks`: how the configured secret becomes the HMAC key.
    #[serde(default)]
    pub secret_encoding: Option<SecretEncoding>,
    /// `hmac_sha256_hex`: an older header also accepted, carrying hex SHA-256 of
    /// `body + secret` (Memberful's legacy digest).
    #[serde(default)]
    pub legacy_digest_header: Option<String>,
}

/// How a `standard_webhooks` secret string becomes the HMAC key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecretEncoding {
    /// `whsec_<base64>`: strip the prefix, base64-decode (Svix, Standard Webhooks).
    #[default]
    WhsecBase64,
    /// The secret string's own UTF-8 bytes.
    Raw,
    /// A hex string (after an optional `ws_`/`whsec_` prefix), hex-decoded.
    Hex,
}

/// Signature schemes the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SchemeName {
    /// `Stripe-Signature: t=…,v1=…`, HMAC-SHA256 hex over `"{t}.{body}"`.
    Stripe,
    /// Standard Webhooks / Svix: `webhook-id`, `webhook-timestamp`, `webhook-signature:
    /// v1,<base64>` (or the `svix-` prefixed names), HMAC-SHA256 over `"{id}.{ts}.{body}"`.
    StandardWebhooks,
    /// A shared secret in a body field (ThriveCart's `thrivecart_secret`), compared in
    /// constant time. No timestamp and no body integrity: say so to operators.
    FormSecret,
    /// Hex HMAC-SHA256 of the raw body in a header (Memberful).
    HmacSha256Hex,
}

/// Body encodings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecodeSpec {
    #[default]
    Json,
    /// `application/x-www-form-urlencoded` with PHP bracket keys.
    Form,
    /// By `Content-Type`: form when it says so, JSON otherwise.
    Auto,
}

/// Where the idempotency key is read from: exactly one of `path`, `header`, `body_hash`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySpec {
    /// A body field (first non-null of the paths).
    #[serde(default)]
    pub path: Option<PathList>,
    /// A request header, or the first present of several.
    #[serde(default)]
    pub header: Option<PathList>,
    /// SHA-256 of the raw body (providers that send no id).
    #[serde(default)]
    pub body_hash: bool,
}

/// One path or a first-non-null list of paths.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum PathList {
    One(String),
    Many(Vec<String>),
}

impl PathList {
    pub fn paths(&self) -> Vec<&str> {
        match self {
            PathList::One(p) => vec![p.as_str()],
            PathList::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// How to read one canonical field.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum FieldSpec {
    /// A single path.
    Path(String),
    /// First non-null of several paths.
    Paths(Vec<String>),
    /// Paths with a unit, a constant or a value map.
    Full(FieldDetail),
}

impl FieldSpec {
    /// The field in its full form, whichever form it was written in.
    pub fn detail(&self) -> FieldDetail {
        match self {
            FieldSpec::Path(p) => FieldDetail { paths: vec![p.clone()], ..Default::default() },
            FieldSpec::Paths(ps) => FieldDetail { paths: ps.clone(), ..Default::default() },
            FieldSpec::Full(d) => d.clone(),
        }
    }
}

/// The long form of a field extractor.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldDetail {
    /// First non-null of these paths.
    #[serde(default)]
    pub paths: Vec<String>,
    /// A fixed value used when no path resolves (or alone).
    #[serde(default, rename = "const")]
    pub constant: Option<serde_json::Value>,
    /// Time unit of the value.
    #[serde(default)]
    pub time: Option<TimeUnit>,
    /// Money unit of the value.
    #[serde(default)]
    pub amount: Option<AmountUnit>,
    /// Translate values (after reading, before typing), e.g. provider status names.
    #[serde(default)]
    pub map: BTreeMap<String, serde_json::Value>,
}

/// Time units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    UnixSeconds,
    UnixMillis,
    Iso8601,
    /// Numbers by magnitude (seconds or milliseconds), strings as ISO 8601.
    Auto,
}

/// Money units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AmountUnit {
    /// Integer minor units (cents).
    Cents,
    /// Decimal major units (2.50 → 250 cents).
    Major,
}

/// Canonical fields an extractor can fill.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldsSpec {
    pub email: Option<FieldSpec>,
    pub provider_customer_id: Option<FieldSpec>,
    pub name: Option<FieldSpec>,
    pub subscription_id: Option<FieldSpec>,
    pub product_id: Option<FieldSpec>,
    pub plan_id: Option<FieldSpec>,
    pub status: Option<FieldSpec>,
    pub period_end: Option<FieldSpec>,
    pub cancel_at_period_end: Option<FieldSpec>,
    pub amount_cents: Option<FieldSpec>,
    pub currency: Option<FieldSpec>,
    /// The bill the event is about (Stripe invoice, ThriveCart invoice, Memberful order).
    pub invoice_id: Option<FieldSpec>,
    /// The payment (Stripe payment intent, Whop payment).
    pub payment_id: Option<FieldSpec>,
    /// The card charge (Stripe charge).
    pub charge_id: Option<FieldSpec>,
    /// What the payment was, for a refund to compare with (`amount:` as for amount_cents).
    pub amount_paid_cents: Option<FieldSpec>,
}

impl FieldsSpec {
    /// The canonical fields in their fixed order (the order `extract` indexes them by),
    /// each with its name and its spec here.
    pub fn in_order(&self) -> [(&'static str, &Option<FieldSpec>); 15] {
        [
            ("email", &self.email),
            ("provider_customer_id", &self.provider_customer_id),
            ("name", &self.name),
            ("subscription_id", &self.subscription_id),
            ("product_id", &self.product_id),
            ("plan_id", &self.plan_id),
            ("status", &self.status),
            ("period_end", &self.period_end),
            ("cancel_at_period_end", &self.cancel_at_period_end),
            ("amount_cents", &self.amount_cents),
            ("currency", &self.currency),
            ("invoice_id", &self.invoice_id),
            ("payment_id", &self.payment_id),
            ("charge_id", &self.charge_id),
            ("amount_paid_cents", &self.amount_paid_cents),
        ]
    }
}

/// One event type's mapping.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    /// Canonical kind when no case matches (omit to store unmatched events as ignored).
    #[serde(default)]
    pub kind: Option<String>,
    /// Conditional kinds, first match wins.
    #[serde(default)]
    pub cases: Vec<CaseSpec>,
    /// Field overrides for this event type.
    #[serde(default)]
    pub fields: FieldsSpec,
    /// Flags put on the membership when this event applies and a flag's conditions hold
    /// (each flag on its own, whatever case matched): what the payload shows but this
    /// mapping cannot act on, for an operator to see.
    #[serde(default)]
    pub flags: Vec<FlagSpec>,
}

/// A flag an event puts on its membership: every condition in `when` must hold.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlagSpec {
    /// Path → condition.
    pub when: BTreeMap<String, Condition>,
    /// The flag, as the membership shows it: a short code, a colon, what it means.
    pub flag: String,
}

/// A conditional mapping: every condition in `when` must hold.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaseSpec {
    /// A short name shown in `simulate` and the activity log.
    #[serde(default)]
    pub name: Option<String>,
    /// Path → condition.
    pub when: BTreeMap<String, Condition>,
    /// Canonical kind, or `ignore` to store the event as ignored.
    pub kind: String,
    /// Field overrides when this case matches.
    #[serde(default)]
    pub fields: FieldsSpec,
}

/// A condition on one path. A bare scalar means `equals`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Condition {
    Test(ConditionTest),
    Equals(serde_json::Value),
}

/// The long form of a condition; all given tests must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionTest {
    /// Value equals this (strings compare with the literal text of numbers and booleans).
    #[serde(default)]
    pub equals: Option<serde_json::Value>,
    /// Value differs from this.
    #[serde(default)]
    pub not_equals: Option<serde_json::Value>,
    /// Value is one of these.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<serde_json::Value>>,
    /// The key is present in the body (even if its value is null).
    #[serde(default)]
    pub present: Option<bool>,
    /// The value is null or absent (`true`), or a non-null value (`false`).
    #[serde(default)]
    pub is_null: Option<bool>,
    /// The value equals the value at this other path (both absent counts as equal).
    #[serde(default)]
    pub same_as: Option<String>,
    /// The value differs from the value at this other path (e.g. a price id before and
    /// after an update).
    #[serde(default)]
    pub differs_from: Option<String>,
}
