//! Store stage: durable members, memberships, events (raw body, canonical event, outcome),
//! leads and timers. Writes go through one writer that batches concurrent jobs into one
//! transaction (group commit); each job runs in its own savepoint, and its caller hears
//! back only after the batch commits. A full queue is `Busy` (503), never unbounded memory.
//! Two implementations: `sqlite` (embedded, the default) and `pg` (PostgreSQL, shared by
//! several replicas); nothing above this module writes SQL.

pub mod pg;
pub mod sqlite;

use crate::canonical::Source;
use crate::machine::MState;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::Arc;

/// What became of a stored event (a duplicate is not stored; `replayed` is an event that
/// ran again and whose new outcome is a row of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    Applied,
    Ignored,
    Stale,
    Refused,
    Failed,
    Replayed,
}

impl EventStatus {
    pub const ALL: [EventStatus; 6] = [
        EventStatus::Applied,
        EventStatus::Ignored,
        EventStatus::Stale,
        EventStatus::Refused,
        EventStatus::Failed,
        EventStatus::Replayed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Applied => "applied",
            EventStatus::Ignored => "ignored",
            EventStatus::Stale => "stale",
            EventStatus::Refused => "refused",
            EventStatus::Failed => "failed",
            EventStatus::Replayed => "replayed",
        }
    }

    /// The status named `s` (as `as_str` writes it).
    pub fn parse(s: &str) -> Option<EventStatus> {
        EventStatus::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Changed nothing, so running it again cannot apply anything twice.
    pub fn is_replayable(self) -> bool {
        matches!(self, EventStatus::Failed | EventStatus::Refused | EventStatus::Ignored)
    }
}

impl std::fmt::Display for EventStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a membership stands with reconciliation, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Never compared with the provider (or the provider cannot be asked).
    NeverReconciled,
    InSync,
    /// A difference was found and corrected through the rules.
    DriftCorrected,
    /// A difference the rules did not act on: flagged for a human.
    DriftUnresolved,
    /// The provider could not be read at the last attempt; nothing changed.
    ProviderUnreachable,
}

impl SyncState {
    pub const ALL: [SyncState; 5] = [
        SyncState::NeverReconciled,
        SyncState::InSync,
        SyncState::DriftCorrected,
        SyncState::DriftUnresolved,
        SyncState::ProviderUnreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::NeverReconciled => "never_reconciled",
            SyncState::InSync => "in_sync",
            SyncState::DriftCorrected => "drift_corrected",
            SyncState::DriftUnresolved => "drift_unresolved",
            SyncState::ProviderUnreachable => "provider_unreachable",
        }
    }

    /// The state named `s` (as `as_str` writes it).
    pub fn parse(s: &str) -> Option<SyncState> {
        SyncState::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Storage failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The database rejected an operation (500). The code is the engine's (SQLite's
    /// extended result code), when it gave one.
    #[error("database error: {message}")]
    Db { code: Option<i32>, message: String },
    /// A store thread could not be started, or a read task failed (500).
    #[error("{0}")]
    Thread(String),
    /// A file the store needs could not be opened (500).
    #[error("cannot open {path}: {message}")]
    File { path: String, message: String },
    /// The write queue is full (503 with Retry-After).
    #[error("write queue is full")]
    Busy,
    /// The writer has stopped (503).
    #[error("store is shut down")]
    Closed,
    /// A stored value could not be read back (500).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The store hit an I/O error (a failed sync, a failed write); it takes no more
    /// writes and `/healthz` answers 503 (503).
    #[error("the store hit an I/O error and takes no more writes: {0}")]
    Failed(String),
    /// The database failed its integrity check at start; the message says how to recover.
    #[error("{0}")]
    Damaged(String),
    /// Another replica's batch holds a member (or key) this job reached: the job is rolled
    /// back and runs again in the writer's next batch. Its caller never hears it, unless it
    /// could not run again (503).
    #[error("another replica is writing the same member; try again")]
    Contended,
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        let code = match &e {
            rusqlite::Error::SqliteFailure(f, _) => Some(f.extended_code),
            _ => None,
        };
        Error::Db { code, message: e.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A person, matched across providers by customer id then case-insensitive email.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberRow {
    pub id: String,
    pub tenant: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub flags: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the member's personal data was erased (see `erase`): it learns no email or
    /// name again. Not written by `save_member`; set by `Tx::erase_member_row` only.
    pub erased_at: Option<DateTime<Utc>>,
}

/// One subscription (or one-time product) of a member at one provider.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MembershipRow {
    pub id: String,
    pub tenant: String,
    pub member_id: String,
    pub provider: String,
    /// `sub:<subscription id>` or `product:<product id>`.
    pub key: String,
    pub subscription_id: Option<String>,
    pub product_id: Option<String>,
    pub plan_id: Option<String>,
    /// The provider's own status string, as last seen.
    pub status: Option<String>,
    pub state: MState,
    pub period_end: Option<DateTime<Utc>>,
    pub grace_until: Option<DateTime<Utc>>,
    pub access_until: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    pub access_levels: Vec<String>,
    pub flags: Vec<String>,
    pub last_event_at: Option<DateTime<Utc>>,
    pub last_event_id: Option<String>,
    pub last_reconciled_at: Option<DateTime<Utc>>,
    pub sync_status: SyncState,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Lifecycle rank of the event that last changed it (orders ties in time).
    pub last_event_rank: i64,
}

impl MembershipRow {
    /// Access is held in an access-holding state, through a mapped product (an unmapped one
    /// grants nothing) and, where the rules set an end, until it.
    pub fn has_access(&self, now: DateTime<Utc>) -> bool {
        let grace_ok = self.state != MState::PastDue || self.grace_until.is_none_or(|t| now < t);
        self.state.holds_access()
            && !self.access_levels.is_empty()
            && grace_ok
            && self.access_until.is_none_or(|t| now < t)
    }
}

/// A payment reference tied to the membership it paid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentLink {
    pub membership_id: String,
    /// The provider event that first named it.
    pub event_id: String,
    /// The event that counted it as a payment, if one did.
    pub counted_by: Option<String>,
}

/// JSON as stored: its text, written once by whoever produced it (the request thread for
/// the canonical event and headers) rather than by the writer thread, and read back as is.
/// `json_of` parses it where its structure is needed.
pub type StoredJson = Box<serde_json::value::RawValue>;

/// Serializes `v` to stored JSON (`null` if it cannot be).
pub fn stored_json<T: Serialize + ?Sized>(v: &T) -> StoredJson {
    serde_json::value::to_raw_value(v).unwrap_or_else(|_| null_json())
}

/// Stored JSON `null`.
pub fn null_json() -> StoredJson {
    serde_json::value::RawValue::from_string("null".into()).expect("null is JSON")
}

/// Parses stored JSON (`Null` if it is not JSON, which the store never writes).
pub fn json_of(j: &serde_json::value::RawValue) -> serde_json::Value {
    serde_json::from_str(j.get()).unwrap_or_default()
}

/// One stored delivery (or timer/replay/reconcile event) with its outcome.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub seq: i64,
    pub tenant: String,
    pub provider: String,
    pub event_id: String,
    pub idempotency_key: String,
    pub event_type: String,
    pub kind: Option<String>,
    pub source: Source,
    pub received_at: DateTime<Utc>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub member_id: Option<String>,
    pub membership_id: Option<String>,
    pub status: EventStatus,
    pub reason: Option<String>,
    #[serde(skip)]
    pub raw: Vec<u8>,
    pub headers: StoredJson,
    pub canonical: Option<StoredJson>,
    pub outcome: StoredJson,
    /// Set while the event waits for its membership to exist: the membership key it
    /// waits for (`""`: any membership of the member it names).
    pub park_key: Option<String>,
    /// Requests that delivered it: 1, and one more for each duplicate answered.
    pub deliveries: i64,
    /// What an enrichment fetched for it (JSON, `enrich::Enriched`), if one did.
    pub enrichment: Option<String>,
    /// When retention dropped its raw body and headers (`raw` is then empty); its
    /// canonical form and outcome stay.
    pub body_pruned_at: Option<DateTime<Utc>>,
}

/// An abandoned checkout's contact, until (and after) it converts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeadRow {
    pub tenant: String,
    pub email: String,
    pub name: Option<String>,
    pub provider: String,
    pub event_id: String,
    pub captured_at: DateTime<Utc>,
    pub converted_at: Option<DateTime<Utc>>,
    pub member_id: Option<String>,
}

/// A product (or plan) id as the stored memberships and events name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProductSeen {
    pub tenant: String,
    pub provider: String,
    /// `product` or `plan`.
    pub kind: String,
    pub id: String,
    pub memberships: i64,
    pub holding_access: i64,
    /// Events among the newest looked at that name it.
    pub events: i64,
}

/// A pending timer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimerRow {
    pub tenant: String,
    pub membership_id: String,
    pub name: String,
    pub due_at: DateTime<Utc>,
    pub set_by_event: String,
}

/// Reads and writes inside one job's savepoint of the current batch transaction.
pub trait Tx {
    fn event_by_key(&mut self, tenant: &str, provider: &str, key: &str) -> Result<Option<EventRow>>;
    /// Counts one more delivery of an already stored event.
    fn note_duplicate(&mut self, seq: i64) -> Result<()>;
    /// Takes a failed, refused or ignored event out of dedupe (its key gets a suffix) and
    /// marks it `replayed`, noting why, so that it runs again once — by a replay, or as a
    /// parked event whose membership now exists — and never again; returns false (and
    /// changes nothing) if it is not one of those any more (it already ran again).
    fn mark_replayed(&mut self, seq: i64, note: &str) -> Result<bool>;
    /// Parked events of a provider that may wait for membership `membership_id`: those
    /// parked under `key`, and those parked for any membership of their member that name
    /// this membership's member (by one of its customer ids at this provider, or its
    /// email in any ASCII case); oldest first. Events parked for other members are not read.
    fn parked(&mut self, tenant: &str, provider: &str, key: &str, membership_id: &str) -> Result<Vec<EventRow>>;
    /// The sequence number of the newest stored event (0 in an empty store).
    fn last_event_seq(&mut self) -> Result<i64>;
    /// What [`Tx::parked`]'s search for events parked for membership `membership_id`'s
    /// member depends on, as one comparable value: that member, its email and its customer
    /// ids at this provider. Unchanged value, unchanged search.
    fn parked_identity(&mut self, tenant: &str, provider: &str, membership_id: &str) -> Result<String>;
    /// Inserts an event; returns its sequence number.
    fn insert_event(&mut self, e: &EventRow) -> Result<i64>;
    fn member(&mut self, id: &str) -> Result<Option<MemberRow>>;
    fn member_by_customer(&mut self, tenant: &str, provider: &str, customer_id: &str) -> Result<Option<MemberRow>>;
    fn member_by_email(&mut self, tenant: &str, email: &str) -> Result<Option<MemberRow>>;
    fn save_member(&mut self, m: &MemberRow) -> Result<()>;
    fn link_customer(&mut self, tenant: &str, provider: &str, customer_id: &str, member_id: &str) -> Result<()>;
    /// Ties payment reference `r` (`invoice:…`, `payment:…`, `charge:…`) to a membership, as
    /// first named by `event_id`; a reference already tied keeps its membership. `counted`:
    /// the event counted it as a payment (recorded once, by the first that did).
    fn link_payment(
        &mut self,
        tenant: &str,
        provider: &str,
        r: &str,
        membership_id: &str,
        event_id: &str,
        counted: bool,
    ) -> Result<()>;
    /// Member `from` is member `into` (they turned out to share an email): its memberships,
    /// provider customer links, events and converted leads move to `into`, and `from` is
    /// deleted.
    fn merge_member(&mut self, from: &str, into: &str) -> Result<()>;
    /// Stores what an enrichment fetched with event `seq` (its row kept from before).
    fn set_enrichment(&mut self, seq: i64, enrichment: &str) -> Result<()>;
    /// Records a console session ended before its time (`until`: when it would have
    /// expired), forgetting those past their time at `now`.
    fn end_console_session(&mut self, nonce: &str, until: DateTime<Utc>, now: DateTime<Utc>) -> Result<()>;
    /// The payment reference `r` as stored.
    fn payment(&mut self, tenant: &str, provider: &str, r: &str) -> Result<Option<PaymentLink>>;
    fn membership(&mut self, id: &str) -> Result<Option<MembershipRow>>;
    fn membership_by_key(&mut self, tenant: &str, provider: &str, key: &str) -> Result<Option<MembershipRow>>;
    fn memberships_of(&mut self, member_id: &str) -> Result<Vec<MembershipRow>>;
    fn save_membership(&mut self, m: &MembershipRow) -> Result<()>;
    /// Records a lead (a second capture of the same email updates name and time).
    fn capture_lead(&mut self, l: &LeadRow) -> Result<()>;
    /// Marks an unconverted lead of this email converted (none: nothing to do).
    fn convert_lead(&mut self, tenant: &str, email: &str, member_id: &str, at: DateTime<Utc>) -> Result<()>;
    fn set_timer(&mut self, t: &TimerRow) -> Result<()>;
    fn cancel_timer(&mut self, membership_id: &str, name: &str) -> Result<()>;
    fn delete_timer_if_due(&mut self, membership_id: &str, name: &str, due_at: DateTime<Utc>) -> Result<bool>;
    /// Timers due at or before `now`, oldest first (inside the transaction).
    fn due_timers_tx(&mut self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TimerRow>>;
    /// A membership's timers, soonest first.
    fn timers_of(&mut self, membership_id: &str) -> Result<Vec<TimerRow>>;
    /// Whether an event from `source` was applied to the membership.
    fn applied_from(&mut self, membership_id: &str, source: Source) -> Result<bool>;
    /// Records a reconciliation attempt: sync status, times, drift or error. Touches only
    /// the sync columns, so a webhook applied meanwhile is kept. (Its lease, if any, runs
    /// out by itself: until then no other pass takes the membership, whatever its clock.)
    fn record_sync(&mut self, r: &SyncRecord) -> Result<()>;
    /// Takes the next memberships to reconcile, as [`Store::reconcile_queue`] orders them,
    /// leaving out those leased by anyone until after `now`, and leases each one taken
    /// until `until`: however many replicas ask at once, each membership is taken by one.
    fn lease_reconcile(
        &mut self,
        targets: &[(String, String)],
        attempted_before: DateTime<Utc>,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<MembershipRow>>;
    /// Drops the raw body and headers of up to `limit` events received before `before`,
    /// oldest first, marking each pruned at `now`: deliveries from a provider (a manual
    /// grant's and a timer's bodies are the record itself), and none still parked (a parked
    /// event runs again from its body when its membership arrives). Returns what was dropped.
    fn prune_bodies(&mut self, before: DateTime<Utc>, now: DateTime<Utc>, limit: usize) -> Result<Pruned>;
    /// Every event naming member `member_id` of `tenant`: those stored under it, and those
    /// stored under no member whose canonical form names `email_lc` (parked, failed or a
    /// lead's abandoned checkout), and those stored under no member and without a canonical
    /// form (a dead letter whose fields could not be read) whose body holds `email_lc` (or
    /// its form-encoded spelling), with their bodies; oldest first.
    fn events_naming(&mut self, tenant: &str, member_id: &str, email_lc: Option<&str>) -> Result<Vec<EventRow>>;
    /// Writes back an event's raw body, headers, canonical form, outcome, reason and
    /// enrichment (an erasure's rewrite); nothing else of it changes.
    fn rewrite_event(&mut self, e: &EventRow) -> Result<()>;
    /// Blanks a member's email and name, sets its flags to `flags` (without what named
    /// them) and marks it erased at `at`; from then on it takes neither again
    /// (`save_member` keeps them blank) and matches no email.
    fn erase_member_row(&mut self, member_id: &str, flags: &[String], at: DateTime<Utc>) -> Result<()>;
    /// Gives membership `id` the key `new_key` in place of `old_key`, and the events parked
    /// under the old key the new one (an erasure's re-key of a guest's membership, whose key
    /// named the buyer's email).
    fn rekey_membership(&mut self, id: &str, old_key: &str, new_key: &str) -> Result<()>;
    /// Deletes the leads of `tenant` with this email or converted to this member; returns
    /// how many.
    fn delete_leads(&mut self, tenant: &str, email_lc: Option<&str>, member_id: &str) -> Result<u64>;
    /// Records an erasure.
    fn record_erasure(&mut self, e: &ErasureRow) -> Result<()>;
}

/// What one prune dropped (or, for a dry run, would drop).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Events whose body was dropped.
    pub events: u64,
    /// Bytes of raw bodies and headers dropped.
    pub bytes: u64,
}

/// One erasure of a member's personal data, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErasureRow {
    pub tenant: String,
    pub member_id: String,
    /// Who asked: the operator's name given to `erase --by`, or `admin-api`.
    pub erased_by: String,
    pub erased_at: DateTime<Utc>,
    /// What was removed (JSON, `erase::Detail`).
    pub detail: serde_json::Value,
}

/// One reconciliation attempt's result, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncRecord {
    pub membership_id: String,
    /// `in_sync`, `drift_corrected`, `drift_unresolved`, `provider_unreachable`.
    pub sync_status: SyncState,
    pub attempted_at: DateTime<Utc>,
    /// Set when the provider answered (the comparison happened).
    pub reconciled_at: Option<DateTime<Utc>>,
    pub detail: Option<String>,
    /// (when, what changed) when drift was found.
    pub drift: Option<(DateTime<Utc>, String)>,
    /// (when, error) when the provider could not be read.
    pub error: Option<(DateTime<Utc>, String)>,
}

/// A membership's reconciliation detail (empty before the first attempt).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SyncRow {
    pub membership_id: String,
    pub attempted_at: Option<DateTime<Utc>>,
    pub detail: Option<String>,
    pub drift_at: Option<DateTime<Utc>>,
    pub drift: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// When a webhook about this membership last arrived.
    pub last_webhook_at: Option<DateTime<Utc>>,
}

/// What the writer runs: a job gets the transaction and returns whether it succeeded (its
/// savepoint is rolled back otherwise); `done` hears once the batch holding it committed.
///
/// A job that may run again (`rerun`) leaves nothing behind but what it writes through the
/// `Tx`: the shared PostgreSQL store runs it beside other replicas' batches and, when a
/// member it reaches is held by one of them, rolls its savepoint back and runs it again in
/// the next batch (see `pg`). One that may not runs once, in a batch of its own kind that
/// no other replica's batch runs beside.
pub struct Work {
    pub run: Run,
    pub done: Done,
    /// What the job will lock, as far as it is known before it runs (`lock_id`s): taken at
    /// the start of its batch, in order, with everything else the batch takes.
    pub hint: Vec<i64>,
    pub rerun: bool,
}

impl Work {
    /// A job that runs once, with no hint.
    pub fn once(
        run: impl FnMut(&mut dyn Tx) -> bool + Send + 'static,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Work {
        Work { run: Box::new(run), done: Box::new(done), hint: Vec::new(), rerun: false }
    }
}

/// Called after the batch commits (or fails to).
pub type Done = Box<dyn FnOnce(Result<()>) + Send>;
/// A job's body: whether it succeeded.
pub type Run = Box<dyn FnMut(&mut dyn Tx) -> bool + Send>;

/// The records the shared store's writers lock, as `lock_id`s: what a job reads a record
/// by (a delivery's idempotency key, a customer id, an email, a membership key, a payment
/// reference, a park key) and whose it is (a member). The PostgreSQL `Tx` takes each before
/// it reads or writes by it; a job's hint names them in advance.
pub mod lock_keys {
    use super::lock_id;

    pub fn member(id: &str) -> i64 {
        lock_id(&["m", id])
    }
    pub fn event(tenant: &str, provider: &str, idempotency_key: &str) -> i64 {
        lock_id(&["ev", tenant, provider, idempotency_key])
    }
    pub fn customer(tenant: &str, provider: &str, customer_id: &str) -> i64 {
        lock_id(&["cid", tenant, provider, customer_id])
    }
    /// Any case: the lookups by email fold it.
    pub fn email(tenant: &str, email: &str) -> i64 {
        lock_id(&["email", tenant, &email.to_lowercase()])
    }
    pub fn membership_key(tenant: &str, provider: &str, key: &str) -> i64 {
        lock_id(&["mk", tenant, provider, key])
    }
    pub fn payment(tenant: &str, provider: &str, r: &str) -> i64 {
        lock_id(&["pay", tenant, provider, r])
    }
    pub fn parked(tenant: &str, provider: &str, park_key: &str) -> i64 {
        lock_id(&["park", tenant, provider, park_key])
    }
    /// A membership that is not stored (yet): its timers.
    pub fn membership(id: &str) -> i64 {
        lock_id(&["ms", id])
    }
}

/// The 64-bit advisory lock id of a record the shared store's writers lock: the first 8
/// bytes of the SHA-256 of its parts (`["m", member_id]`, `["cid", tenant, provider, id]`,
/// ...), the same in every release and on every replica. Never one of the store's own
/// fixed locks (the writers' and the migrations').
pub fn lock_id(parts: &[&str]) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0x1f]);
        }
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let id = i64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    match id {
        pg::WRITER_LOCK | pg::MIGRATION_LOCK => id ^ 1,
        _ => id,
    }
}

/// Which stored events to read, in arrival order.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub status: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub member_id: Option<String>,
    pub seq: Option<i64>,
    /// Only events that arrived from outside (webhooks), not timers or replays.
    pub deliveries_only: bool,
    /// Only events after this sequence number (paging).
    pub after_seq: Option<i64>,
    /// At most this many (paging).
    pub limit: Option<usize>,
    /// Only events parked under this key.
    pub park_key: Option<String>,
}

/// A member with everything the admin API shows.
#[derive(Debug, Clone, Serialize)]
pub struct MemberDetail {
    pub member: MemberRow,
    pub memberships: Vec<MembershipRow>,
    /// The newest events about the member, without their raw bodies and headers (an
    /// activity log shows neither; `GET /events/{id}` does).
    pub recent_events: Vec<EventRow>,
    pub timers: Vec<TimerRow>,
    /// Reconciliation detail, one per membership.
    pub sync: Vec<SyncRow>,
    /// Erasures of the member's personal data, oldest first.
    pub erasures: Vec<ErasureRow>,
}

/// What runs on a scratch store (`Store::scratch`).
pub type ScratchJob<'a> = Box<dyn FnOnce(&mut dyn Tx) -> Result<()> + 'a>;

/// A member as replay's comparison reads it (see `members_with_memberships`).
#[derive(Debug, Clone)]
pub struct StoredMember {
    pub member: MemberRow,
    pub memberships: Vec<MembershipRow>,
    /// The timers of every membership of theirs.
    pub timers: Vec<TimerRow>,
    /// (provider, customer id): the first customer id at each provider of a membership.
    pub customers: Vec<(String, String)>,
}

/// Durable storage. Reads block (call them from `spawn_blocking`); writes are queued.
pub trait Store: Send + Sync + 'static {
    /// Queues a job for the writer; `Busy` when the queue is full.
    fn submit(&self, work: Work) -> Result<()>;
    fn member_detail(&self, id: &str, recent: usize) -> Result<Option<MemberDetail>>;
    fn members_by_email(&self, email: &str) -> Result<Vec<MemberRow>>;
    /// The newest `limit` events, of one status and/or one tenant if given.
    fn events(&self, status: Option<&str>, tenant: Option<&str>, limit: usize) -> Result<Vec<EventRow>>;
    /// Newest first, before sequence number `before` (a page of `GET /events`): without their
    /// raw bodies and headers, which a list does not show and need not load.
    fn event_list(
        &self,
        status: Option<&str>,
        tenant: Option<&str>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<EventRow>>;
    fn events_by_event_id(&self, event_id: &str) -> Result<Vec<EventRow>>;
    /// Events in arrival order, filtered (for replay and explain).
    fn events_where(&self, filter: &EventFilter) -> Result<Vec<EventRow>>;
    fn leads(&self, tenant: Option<&str>) -> Result<Vec<LeadRow>>;
    /// Whether the console session `nonce` was ended by logging out.
    fn console_session_ended(&self, nonce: &str) -> Result<bool>;
    /// Members newest first (ids are time-ordered), of one tenant if given, before the id
    /// `before` (a page's cursor), matching `q` if given: the member id, a provider customer
    /// id or subscription id exactly, or part of the email or name (any case).
    fn search_members(
        &self,
        tenant: Option<&str>,
        q: Option<&str>,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MemberRow>>;
    /// Every product and plan id the memberships name, per tenant and provider, with how
    /// many memberships name it and how many of those hold access; and those the newest
    /// `recent_events` events (of that tenant) name that no membership does (abandoned checkouts, refused
    /// or ignored events). Manual grants are no provider's products and are left out.
    fn products_seen(&self, tenant: Option<&str>, recent_events: usize) -> Result<Vec<ProductSeen>>;
    /// Timers due at or before `now`, oldest first.
    fn due_timers(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TimerRow>>;
    /// When the next timer falls due.
    fn next_timer(&self) -> Result<Option<DateTime<Utc>>>;
    /// Count of events by status (for /metrics).
    fn event_counts(&self) -> Result<Vec<(String, i64)>>;
    /// Memberships of these (tenant, provider) pairs not asked since `attempted_before`,
    /// least recently asked first (never asked first of all).
    fn reconcile_queue(
        &self,
        targets: &[(String, String)],
        attempted_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<MembershipRow>>;
    /// A member by id.
    fn member(&self, id: &str) -> Result<Option<MemberRow>>;
    /// These members (those that exist) with their memberships, their timers and their
    /// customer id at each of their memberships' providers, read in one go (replay's
    /// compare).
    fn members_with_memberships(&self, ids: &[String]) -> Result<Vec<StoredMember>>;
    /// The member's customer id at a provider (what `{customer_id}` stands for).
    fn customer_id(&self, tenant: &str, provider: &str, member_id: &str) -> Result<Option<String>>;
    /// Count of memberships by sync status (for /metrics).
    fn sync_status_counts(&self) -> Result<Vec<(String, i64)>>;
    /// What `Tx::prune_bodies` would drop of the events received before `before`.
    fn prunable(&self, before: DateTime<Utc>) -> Result<Pruned>;
    /// Runs `f` in one transaction on an empty scratch store of the same schema, dropped
    /// afterwards: what a dry run re-derives state into. Nothing reaches this store.
    fn scratch(&self, f: ScratchJob<'_>) -> Result<()>;
    /// `Failed` once the store has hit an I/O error, or while it cannot reach its database
    /// (`/healthz` answers 503 then). Blocks (called through [`read`]).
    fn health(&self) -> Result<()> {
        Ok(())
    }
    /// Longest a write's caller waits for its commit (none: as long as it takes). One that
    /// waited longer hears `Busy` (503): the provider delivers again, and dedupe makes the
    /// commit harmless if it comes after all.
    fn write_deadline(&self) -> Option<std::time::Duration> {
        None
    }
    /// What the writer has done since the store opened, where it runs beside other
    /// replicas' writers (`/metrics`).
    fn writer_stats(&self) -> WriterStats {
        WriterStats::default()
    }
    /// Whether writers of other replicas share this store (its jobs' lock hints count).
    fn shared(&self) -> bool {
        false
    }
    /// The members a delivery naming these is likely about, as stored now: the member of the
    /// membership keyed `mkey`, of the customer id, of the email (any case). A guess read
    /// before the write, for its lock hint: the write finds and locks the member itself.
    fn members_named(
        &self,
        _tenant: &str,
        _provider: &str,
        _mkey: Option<&str>,
        _customer_id: Option<&str>,
        _email: Option<&str>,
    ) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// Counts of the shared store's writer since it opened: batches that ran beside other
/// replicas' (keyed) and alone (exclusive), and runs of jobs rolled back because another
/// replica's batch held a member they reached (each then ran again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub keyed_batches: u64,
    pub exclusive_batches: u64,
    pub reruns: u64,
}

// What both stores share: times stored as unix seconds, lists as JSON text, the column
// lists their statements read.

pub(crate) fn ts(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

pub(crate) fn opt_ts(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(ts)
}

pub(crate) fn from_ts(s: i64) -> DateTime<Utc> {
    use chrono::TimeZone;
    Utc.timestamp_opt(s, 0).single().unwrap_or_default()
}

pub(crate) fn opt_from(s: Option<i64>) -> Option<DateTime<Utc>> {
    s.map(from_ts)
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub(crate) const EVENT_COLS: &str = "seq, tenant, provider, event_id, idempotency_key, event_type, kind, source, received_at, occurred_at, member_id, membership_id, status, reason, raw, headers, canonical, outcome, park_key, deliveries, enrichment, body_pruned_at";
pub(crate) const MEMBER_COLS: &str = "id, tenant, email, name, flags, created_at, updated_at, erased_at";
pub(crate) const MEMBERSHIP_COLS: &str = "id, tenant, member_id, provider, key, subscription_id, product_id, plan_id, status, state, period_end, grace_until, access_until, cancel_at_period_end, access_levels, flags, last_event_at, last_event_id, last_reconciled_at, sync_status, created_at, updated_at, last_event_rank";

/// The events whose raw body a prune may drop (see `Tx::prune_bodies`): the condition of
/// the `events_unpruned` index, which each store's prune names in full so that the index
/// serves it.
pub(crate) const PRUNABLE: &str = "body_pruned_at IS NULL AND park_key IS NULL AND provider <> 'manual' AND source IN ('webhook', 'reconcile', 'replay')";

/// The index a prune finds the oldest droppable bodies by, made by the first prune (same
/// SQL in both stores) rather than by a migration: it is one more entry to write for every
/// stored event, which an install that keeps bodies forever (the default) need not pay
/// (the load benchmark could not tell the difference: `BENCHMARKS.md`, 2026-12-03). A
/// pruned event leaves it.
pub(crate) static PRUNABLE_INDEX: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("CREATE INDEX IF NOT EXISTS events_unpruned ON events (received_at) WHERE {PRUNABLE}")
});

/// A database migrated by a newer membersync than this one: refused, since this binary
/// would write what it does not know about wrongly (an erased member's email, say).
pub(crate) fn newer_schema(found: i64, known: usize) -> Error {
    Error::Damaged(format!(
        "the database is at schema version {found}, newer than this membersync knows ({known}): it was \
         migrated by a newer release. Run that release, or restore the backup taken before the upgrade"
    ))
}

/// A column list (`a, b`) with each column named through a table's alias (`t.a, t.b`),
/// for statements that join.
pub(crate) fn qualified(alias: &str, cols: &str) -> String {
    cols.split(", ").map(|c| format!("{alias}.{c}")).collect::<Vec<_>>().join(", ")
}

/// Opens the store `database` names: a `postgres://` URL (the shared store), else an SQLite
/// file (`:memory:`: a private in-memory one).
pub fn open_database(database: &str, sqlite_opts: sqlite::Options, pg_opts: pg::Options) -> Result<Arc<dyn Store>> {
    Ok(match pg::is_postgres_url(database) {
        true => Arc::new(pg::PgStore::open(database, pg_opts)?),
        false => Arc::new(sqlite::SqliteStore::open(database, sqlite_opts)?),
    })
}

/// Runs a blocking read off the async threads — the one way async code reads the store. A
/// read task that panicked is reported as a store error, never swallowed.
pub async fn read<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T> + Send + 'static,
) -> Result<T> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .map_err(|e| Error::Thread(format!("a store read failed: {e}")))?
}

impl dyn Store {
    /// Runs `f` in the writer and returns its result once the batch holding it committed:
    /// once, in a batch no other replica's runs beside (see [`Work`]).
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let mut f = Some(f);
        self.write_work(Vec::new(), false, move |t| match f.take() {
            Some(f) => f(t),
            None => Err(Error::Thread("a job that runs once was run again".into())),
        })
        .await
    }

    /// `write` for a job that may run again (see [`Work`]): `f` leaves nothing behind but
    /// what it writes through the `Tx`; `hint`: the `lock_id`s it is known to take.
    pub async fn write_again<T: Send + 'static>(
        &self,
        hint: Vec<i64>,
        f: impl FnMut(&mut dyn Tx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.write_work(hint, true, f).await
    }

    async fn write_work<T: Send + 'static>(
        &self,
        hint: Vec<i64>,
        rerun: bool,
        mut f: impl FnMut(&mut dyn Tx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The last run's result: the one its batch committed.
        let slot = Arc::new(std::sync::Mutex::new(None));
        let ran = slot.clone();
        let work = Work {
            run: Box::new(move |t: &mut dyn Tx| {
                let r = f(t);
                let ok = r.is_ok();
                if let Ok(mut s) = ran.lock() {
                    *s = Some(r);
                }
                ok
            }),
            done: Box::new(move |commit: Result<()>| {
                let r = slot.lock().ok().and_then(|mut s| s.take()).unwrap_or(Err(Error::Closed));
                let _ = tx.send(commit.and(r));
            }),
            hint,
            rerun,
        };
        self.submit(work)?;
        match self.write_deadline() {
            None => rx.await.map_err(|_| Error::Closed)?,
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(answer) => answer.map_err(|_| Error::Closed)?,
                Err(_) => {
                    tracing::error!(
                        waited_secs = limit.as_secs_f64(),
                        "A write was not committed in time; answered 503."
                    );
                    Err(Error::Busy)
                }
            },
        }
    }
}
