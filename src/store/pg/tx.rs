//! `Tx` on a PostgreSQL connection: the writer's kept statements, the row mappers and every
//! write and lookup a job makes inside its savepoint. It holds no state of its own.
//!
//! What this module must never do: commit or roll back: the writer owns the transaction.

use super::*;
use postgres::types::ToSql;
use postgres::{Row, Statement};
use std::collections::HashMap;
use std::sync::LazyLock;

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("{what}: {e}"))
}

fn json_list(s: String) -> Result<Vec<String>> {
    serde_json::from_str(&s).map_err(|e| corrupt("a stored list", e))
}

fn json_value(s: Option<String>) -> Result<Option<StoredJson>> {
    s.map(serde_json::value::RawValue::from_string).transpose().map_err(|e| corrupt("stored JSON", e))
}

fn named<T>(what: &str, s: String, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
    parse(&s).ok_or_else(|| Error::Corrupt(format!("unknown {what} `{s}`")))
}

/// Statements the writer keeps prepared on its connection, keyed by where their SQL text
/// lives (a `'static` string never moves or changes). Emptied when the connection is
/// opened again.
#[derive(Default)]
pub(super) struct Prepared(HashMap<(usize, usize), Statement>);

impl Prepared {
    pub(super) fn new() -> Prepared {
        Prepared::default()
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    pub(super) fn get(&mut self, conn: &mut Client, sql: &'static str) -> Result<Statement> {
        let key = (sql.as_ptr() as usize, sql.len());
        if let Some(st) = self.0.get(&key) {
            return Ok(st.clone());
        }
        let st = conn.prepare(sql)?;
        self.0.insert(key, st.clone());
        Ok(st)
    }
}

/// The writer's transaction (with its kept statements and its batch's locks), or a read
/// connection (with statements kept for one read, and no locks).
pub(super) struct PgTx<'a> {
    pub(super) conn: &'a mut Client,
    pub(super) prepared: &'a mut Prepared,
    pub(super) locks: Option<&'a mut Locks>,
}

impl PgTx<'_> {
    fn query(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let st = self.prepared.get(self.conn, sql)?;
        self.conn.query(&st, params).map_err(|e| self.failed(e))
    }

    fn opt(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let st = self.prepared.get(self.conn, sql)?;
        self.conn.query_opt(&st, params).map_err(|e| self.failed(e))
    }

    fn exec(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let st = self.prepared.get(self.conn, sql)?;
        self.conn.execute(&st, params).map_err(|e| self.failed(e))
    }

    /// A statement's error. The server's lock table full (`out of shared memory`: the locks
    /// of this batch and of other sessions fill it) fails any statement that takes a lock,
    /// a record's or a table's: in a keyed batch, the job is rolled back, which frees what
    /// it took, and runs again alone, where it takes no record lock.
    fn failed(&mut self, e: postgres::Error) -> Error {
        if e.code() == Some(&postgres::error::SqlState::OUT_OF_MEMORY) {
            if let Some(Err(contended)) = self.locks.as_deref_mut().map(Locks::exclusive_only) {
                return contended;
            }
        }
        e.into()
    }

    /// Takes lock `id` for the rest of the batch (see `locks`); true when it was taken just
    /// now (so that what was read before it must be read again), false when the batch held
    /// it already or takes no locks. `Contended` when another batch holds it.
    fn claim(&mut self, id: i64) -> Result<bool> {
        let Some(locks) = self.locks.as_deref_mut() else { return Ok(false) };
        if !locks.wants(id)? {
            return Ok(false);
        }
        let st = self.prepared.get(self.conn, "SELECT pg_try_advisory_xact_lock($1)")?;
        let taken: bool = self.conn.query_one(&st, &[&id]).map_err(|e| self.failed(e))?.try_get(0)?;
        let locks = self.locks.as_deref_mut().ok_or(Error::Closed)?;
        locks.got(id, taken)?;
        Ok(true)
    }

    /// What only an exclusive batch may do: a keyed batch's job stops here and runs again
    /// in an exclusive one.
    fn exclusive_only(&mut self) -> Result<()> {
        match self.locks.as_deref_mut() {
            Some(locks) => locks.exclusive_only(),
            None => Ok(()),
        }
    }

    /// A member found by a lookup, its lock taken: read again while the lock was taken
    /// only after the read (another batch may have changed it just before).
    fn owned_member(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<MemberRow>> {
        loop {
            let found = self.opt(sql, params)?.as_ref().map(member_row).transpose()?;
            match &found {
                Some(m) if self.claim(lock_keys::member(&m.id))? => continue,
                Some(m) => {
                    if let Some(locks) = self.locks.as_deref_mut() {
                        locks.note_email(&m.id, m.email.as_deref());
                    }
                    return Ok(found);
                }
                None => return Ok(found),
            }
        }
    }

    /// A membership, its member's lock taken, read as `owned_member` reads a member.
    fn owned_membership(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<MembershipRow>> {
        loop {
            let found = self.opt(sql, params)?.as_ref().map(membership_row).transpose()?;
            let Some(ms) = &found else { return Ok(found) };
            if let Some(locks) = self.locks.as_deref_mut() {
                locks.note_owner(&ms.id, &ms.member_id);
            }
            if !self.claim(lock_keys::member(&ms.member_id))? {
                return Ok(found);
            }
        }
    }

    /// The locks a search for the events parked for membership `id`'s member reads under:
    /// that member, and its email (read in one go, again while the member was taken only
    /// after the read).
    fn claim_parked_for(&mut self, tenant: &str, id: &str) -> Result<()> {
        // Known from this batch's reads (under the member's lock): nothing to read.
        let known = self.locks.as_deref().and_then(|l| {
            let owner = l.owner(id)?;
            l.email_of(owner).map(|e| (owner.to_string(), e.map(str::to_string)))
        });
        if let Some((member, email)) = known {
            self.claim(lock_keys::member(&member))?;
            if let Some(email) = email {
                self.claim(lock_keys::email(tenant, &email))?;
            }
            if let Some(locks) = self.locks.as_deref_mut() {
                locks.note_searched(id);
            }
            return Ok(());
        }
        loop {
            let who = self.opt(
                "SELECT s.member_id, m.email FROM memberships s LEFT JOIN members m ON m.id = s.member_id WHERE s.id = $1",
                &[&id],
            )?;
            let Some(row) = who else { return Ok(()) };
            let (member, email): (String, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
            if let Some(locks) = self.locks.as_deref_mut() {
                locks.note_owner(id, &member);
            }
            if self.claim(lock_keys::member(&member))? {
                continue;
            }
            if let Some(email) = email {
                self.claim(lock_keys::email(tenant, &email))?;
            }
            if let Some(locks) = self.locks.as_deref_mut() {
                locks.note_searched(id);
            }
            return Ok(());
        }
    }

    /// The lock of membership `id`'s member (its timers, its events), taken: known from
    /// an earlier read in the batch, else read; a membership not stored has its own.
    fn claim_membership(&mut self, id: &str) -> Result<()> {
        let Some(locks) = self.locks.as_deref() else { return Ok(()) };
        if locks.exclusive {
            return Ok(());
        }
        if let Some(owner) = locks.owner(id).map(str::to_string) {
            self.claim(lock_keys::member(&owner))?;
            return Ok(());
        }
        if self.owned_membership(*MEMBERSHIP_BY_ID, &[&id])?.is_none() {
            self.claim(lock_keys::membership(id))?;
        }
        Ok(())
    }
}

/// A membership's timers, soonest first.
pub(super) const TIMERS_OF: &str =
    "SELECT tenant, membership_id, name, due_at, set_by_event FROM timers WHERE membership_id = $1 ORDER BY due_at, name";

/// Timers due by $1, oldest first, at most $2, read by the timer task's look.
pub(super) const DUE_TIMERS: &str = "SELECT tenant, membership_id, name, due_at, set_by_event FROM timers
     WHERE due_at <= $1 ORDER BY due_at, membership_id, name LIMIT $2";

/// The same, claimed inside the writer's batch: rows another transaction holds are
/// skipped, never waited for nor fired twice.
const DUE_TIMERS_CLAIMED: &str = "SELECT tenant, membership_id, name, due_at, set_by_event FROM timers
     WHERE due_at <= $1 ORDER BY due_at, membership_id, name LIMIT $2 FOR UPDATE SKIP LOCKED";

/// A statement built once from the column lists, kept for the life of the process (the
/// writer keys its prepared statements by where their text lives).
fn leak(sql: String) -> &'static str {
    Box::leak(sql.into_boxed_str())
}

static EVENT_BY_KEY: LazyLock<&'static str> = LazyLock::new(|| {
    leak(format!("SELECT {EVENT_COLS} FROM events WHERE tenant = $1 AND provider = $2 AND idempotency_key = $3"))
});
/// Events parked under a key, then those parked for a membership of the member of
/// membership `$4` that name that member: by a customer id of it at this provider, or by
/// its email (ASCII case folded); the expressions are the indexes'. The index's `lower`
/// folds as the database's locale does (every letter, under most); the second test of the
/// email folds ASCII only, as SQLite does and as `parked_identity` assumes.
static PARKED: LazyLock<&'static str> = LazyLock::new(|| {
    leak({
        let e_cols = qualified("e", EVENT_COLS);
        format!(
            "SELECT {EVENT_COLS} FROM events WHERE tenant = $1 AND provider = $2 AND park_key = $3
             UNION ALL
             SELECT {e_cols} FROM member_customers c
               JOIN events e ON e.tenant = $1 AND e.provider = $2 AND e.park_key = ''
                AND (e.canonical::jsonb -> 'member' ->> 'provider_customer_id') = c.customer_id
              WHERE c.member_id = (SELECT member_id FROM memberships WHERE id = $4)
                AND c.tenant = $1 AND c.provider = $2
             UNION ALL
             SELECT {EVENT_COLS} FROM events
              WHERE tenant = $1 AND provider = $2 AND park_key = ''
               AND (lower(canonical::jsonb -> 'member' ->> 'email') COLLATE \"C\") =
                 (SELECT lower(m.email) COLLATE \"C\" FROM memberships s JOIN members m ON m.id = s.member_id WHERE s.id = $4)
               AND lower((canonical::jsonb -> 'member' ->> 'email') COLLATE \"C\") =
                 (SELECT lower(m.email COLLATE \"C\") FROM memberships s JOIN members m ON m.id = s.member_id WHERE s.id = $4)"
        )
    })
});
static LEASE_RECONCILE: LazyLock<&'static str> = LazyLock::new(|| {
    leak(format!(
        "SELECT {} FROM memberships m LEFT JOIN membership_sync s ON s.membership_id = m.id
           LEFT JOIN reconcile_leases l ON l.membership_id = m.id
         WHERE (m.tenant, m.provider) IN (SELECT * FROM unnest($4::text[], $5::text[]))
           AND (s.attempted_at IS NULL OR s.attempted_at < $1)
           AND (l.locked_until IS NULL OR l.locked_until <= $3)
         ORDER BY COALESCE(s.attempted_at, -1), m.id LIMIT $2 FOR UPDATE OF m SKIP LOCKED",
        qualified("m", MEMBERSHIP_COLS)
    ))
});
pub(super) static MEMBER_BY_ID: LazyLock<&'static str> =
    LazyLock::new(|| leak(format!("SELECT {MEMBER_COLS} FROM members WHERE id = $1")));
static MEMBER_BY_CUSTOMER: LazyLock<&'static str> = LazyLock::new(|| {
    leak({
        format!(
            "SELECT {} FROM members m JOIN member_customers c ON c.member_id = m.id
             WHERE c.tenant = $1 AND c.provider = $2 AND c.customer_id = $3",
            qualified("m", MEMBER_COLS)
        )
    })
});
static MEMBER_BY_EMAIL: LazyLock<&'static str> = LazyLock::new(|| {
    leak({
        format!("SELECT {MEMBER_COLS} FROM members WHERE tenant = $1 AND email_lc = $2 ORDER BY created_at, id LIMIT 1")
    })
});
static MEMBERSHIP_BY_ID: LazyLock<&'static str> =
    LazyLock::new(|| leak(format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE id = $1")));
static MEMBERSHIP_BY_KEY: LazyLock<&'static str> = LazyLock::new(|| {
    leak(format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE tenant = $1 AND provider = $2 AND key = $3"))
});
pub(super) static MEMBERSHIPS_OF: LazyLock<&'static str> = LazyLock::new(|| {
    leak(format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE member_id = $1 ORDER BY created_at, id"))
});

pub(super) fn event_row(r: &Row) -> Result<EventRow> {
    Ok(EventRow {
        seq: r.try_get(0)?,
        tenant: r.try_get(1)?,
        provider: r.try_get(2)?,
        event_id: r.try_get(3)?,
        idempotency_key: r.try_get(4)?,
        event_type: r.try_get(5)?,
        kind: r.try_get(6)?,
        source: named("event source", r.try_get(7)?, Source::parse)?,
        received_at: from_ts(r.try_get(8)?),
        occurred_at: opt_from(r.try_get(9)?),
        member_id: r.try_get(10)?,
        membership_id: r.try_get(11)?,
        status: named("event status", r.try_get(12)?, EventStatus::parse)?,
        reason: r.try_get(13)?,
        raw: r.try_get(14)?,
        headers: json_value(r.try_get(15)?)?.unwrap_or_else(null_json),
        canonical: json_value(r.try_get(16)?)?,
        outcome: json_value(r.try_get(17)?)?.unwrap_or_else(null_json),
        park_key: r.try_get(18)?,
        deliveries: r.try_get(19)?,
        enrichment: r.try_get(20)?,
        body_pruned_at: opt_from(r.try_get(21)?),
    })
}

pub(super) fn member_row(r: &Row) -> Result<MemberRow> {
    Ok(MemberRow {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        email: r.try_get(2)?,
        name: r.try_get(3)?,
        flags: json_list(r.try_get(4)?)?,
        created_at: from_ts(r.try_get(5)?),
        updated_at: from_ts(r.try_get(6)?),
        erased_at: opt_from(r.try_get(7)?),
    })
}

pub(super) fn membership_row(r: &Row) -> Result<MembershipRow> {
    Ok(MembershipRow {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        member_id: r.try_get(2)?,
        provider: r.try_get(3)?,
        key: r.try_get(4)?,
        subscription_id: r.try_get(5)?,
        product_id: r.try_get(6)?,
        plan_id: r.try_get(7)?,
        status: r.try_get(8)?,
        state: named("state", r.try_get(9)?, MState::parse)?,
        period_end: opt_from(r.try_get(10)?),
        grace_until: opt_from(r.try_get(11)?),
        access_until: opt_from(r.try_get(12)?),
        cancel_at_period_end: r.try_get(13)?,
        access_levels: json_list(r.try_get(14)?)?,
        flags: json_list(r.try_get(15)?)?,
        last_event_at: opt_from(r.try_get(16)?),
        last_event_id: r.try_get(17)?,
        last_reconciled_at: opt_from(r.try_get(18)?),
        sync_status: named("sync status", r.try_get(19)?, SyncState::parse)?,
        created_at: from_ts(r.try_get(20)?),
        updated_at: from_ts(r.try_get(21)?),
        last_event_rank: r.try_get(22)?,
    })
}

pub(super) fn lead_row(r: &Row) -> Result<LeadRow> {
    Ok(LeadRow {
        tenant: r.try_get(0)?,
        email: r.try_get(1)?,
        name: r.try_get(2)?,
        provider: r.try_get(3)?,
        event_id: r.try_get(4)?,
        captured_at: from_ts(r.try_get(5)?),
        converted_at: opt_from(r.try_get(6)?),
        member_id: r.try_get(7)?,
    })
}

pub(super) fn timer_row(r: &Row) -> Result<TimerRow> {
    Ok(TimerRow {
        tenant: r.try_get(0)?,
        membership_id: r.try_get(1)?,
        name: r.try_get(2)?,
        due_at: from_ts(r.try_get(3)?),
        set_by_event: r.try_get(4)?,
    })
}

pub(super) fn rows<T>(rows: Vec<Row>, f: fn(&Row) -> Result<T>) -> Result<Vec<T>> {
    rows.iter().map(f).collect()
}

impl Tx for PgTx<'_> {
    fn event_by_key(&mut self, tenant: &str, provider: &str, key: &str) -> Result<Option<EventRow>> {
        self.claim(lock_keys::event(tenant, provider, key))?;
        self.opt(*EVENT_BY_KEY, &[&tenant, &provider, &key])?.as_ref().map(event_row).transpose()
    }

    fn note_duplicate(&mut self, seq: i64) -> Result<()> {
        self.exec("UPDATE events SET deliveries = deliveries + 1 WHERE seq = $1", &[&seq])?;
        Ok(())
    }

    fn mark_replayed(&mut self, seq: i64, note: &str) -> Result<bool> {
        let n = self.exec(
            "UPDATE events SET idempotency_key = idempotency_key || '#retired@' || seq, park_key = NULL,
               status = 'replayed', reason = COALESCE(reason || ' — ', '') || $2
             WHERE seq = $1 AND status IN ('failed', 'refused', 'ignored')",
            &[&seq, &note],
        )?;
        Ok(n > 0)
    }

    fn parked(&mut self, tenant: &str, provider: &str, key: &str, membership_id: &str) -> Result<Vec<EventRow>> {
        // What a parked event was stored under: the key; else the member it names, by a
        // customer id (whose lookup and link take the customer id) or by the email of the
        // membership's member (taken here).
        self.claim(lock_keys::parked(tenant, provider, key))?;
        if self.locks.as_deref().is_some_and(|l| !l.searched(membership_id)) {
            self.claim_parked_for(tenant, membership_id)?;
        }
        let mut found = rows(self.query(*PARKED, &[&tenant, &provider, &key, &membership_id])?, event_row)?;
        found.sort_by_key(|e| (e.occurred_at, e.seq));
        found.dedup_by_key(|e| e.seq);
        Ok(found)
    }

    fn parked_identity(&mut self, tenant: &str, provider: &str, membership_id: &str) -> Result<String> {
        self.claim_membership(membership_id)?;
        let who = self.opt(
            "SELECT m.id || chr(10) || COALESCE(lower(m.email COLLATE \"C\"), '') || chr(10) ||
               COALESCE((SELECT string_agg(customer_id, chr(10) ORDER BY customer_id) FROM member_customers
                   WHERE member_id = m.id AND tenant = $1 AND provider = $2), '')
             FROM memberships s JOIN members m ON m.id = s.member_id WHERE s.id = $3",
            &[&tenant, &provider, &membership_id],
        )?;
        Ok(match who {
            Some(r) => r.try_get::<_, Option<String>>(0)?.unwrap_or_default(),
            None => String::new(),
        })
    }

    fn last_event_seq(&mut self) -> Result<i64> {
        self.exclusive_only()?;
        Ok(self.query("SELECT COALESCE(MAX(seq), 0)::BIGINT FROM events", &[])?[0].try_get(0)?)
    }

    fn insert_event(&mut self, e: &EventRow) -> Result<i64> {
        self.claim(lock_keys::event(&e.tenant, &e.provider, &e.idempotency_key))?;
        if let Some(member) = &e.member_id {
            self.claim(lock_keys::member(member))?;
        }
        match e.park_key.as_deref() {
            None => {}
            // Parked for whichever membership of its member: found by the member it names.
            Some("") => {
                let named = e.canonical.as_ref().and_then(|c| serde_json::from_str::<serde_json::Value>(c.get()).ok());
                let who = named.as_ref().and_then(|c| c.get("member"));
                let field = |f: &str| who.and_then(|w| w.get(f)).and_then(|v| v.as_str()).map(str::to_string);
                if let Some(cid) = field("provider_customer_id") {
                    self.claim(lock_keys::customer(&e.tenant, &e.provider, &cid))?;
                }
                if let Some(email) = field("email") {
                    self.claim(lock_keys::email(&e.tenant, &email))?;
                }
            }
            Some(key) => {
                self.claim(lock_keys::parked(&e.tenant, &e.provider, key))?;
            }
        }
        let row = self.opt(
            "INSERT INTO events (tenant, provider, event_id, idempotency_key, event_type, kind, source, received_at, occurred_at,
               member_id, membership_id, status, reason, raw, headers, canonical, outcome, park_key, deliveries, enrichment)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
             ON CONFLICT (tenant, provider, idempotency_key) DO NOTHING RETURNING seq",
            &[
                &e.tenant,
                &e.provider,
                &e.event_id,
                &e.idempotency_key,
                &e.event_type,
                &e.kind,
                &e.source.as_str(),
                &ts(e.received_at),
                &opt_ts(e.occurred_at),
                &e.member_id,
                &e.membership_id,
                &e.status.as_str(),
                &e.reason,
                &e.raw,
                &e.headers.get(),
                &e.canonical.as_ref().map(|c| c.get()),
                &e.outcome.get(),
                &e.park_key,
                &e.deliveries,
                &e.enrichment,
            ],
        )?;
        match row {
            Some(r) => Ok(r.try_get(0)?),
            // Only a transaction that took no lock on its key can have stored it meanwhile.
            None => Err(Error::Db {
                code: None,
                message: format!(
                    "event {} of {}/{} was stored by another writer meanwhile",
                    e.idempotency_key, e.tenant, e.provider
                ),
            }),
        }
    }

    fn member(&mut self, id: &str) -> Result<Option<MemberRow>> {
        self.claim(lock_keys::member(id))?;
        let found = self.opt(*MEMBER_BY_ID, &[&id])?.as_ref().map(member_row).transpose()?;
        if let (Some(m), Some(locks)) = (&found, self.locks.as_deref_mut()) {
            locks.note_email(&m.id, m.email.as_deref());
        }
        Ok(found)
    }

    fn member_by_customer(&mut self, tenant: &str, provider: &str, customer_id: &str) -> Result<Option<MemberRow>> {
        self.claim(lock_keys::customer(tenant, provider, customer_id))?;
        self.owned_member(*MEMBER_BY_CUSTOMER, &[&tenant, &provider, &customer_id])
    }

    fn member_by_email(&mut self, tenant: &str, email: &str) -> Result<Option<MemberRow>> {
        self.claim(lock_keys::email(tenant, email))?;
        self.owned_member(*MEMBER_BY_EMAIL, &[&tenant, &email.to_lowercase()])
    }

    fn save_member(&mut self, m: &MemberRow) -> Result<()> {
        self.claim(lock_keys::member(&m.id))?;
        if let Some(email) = &m.email {
            self.claim(lock_keys::email(&m.tenant, email))?;
        }
        // (An erased member keeps none whatever is saved: its email locked is one too many.)
        if let Some(locks) = self.locks.as_deref_mut() {
            locks.note_email(&m.id, m.email.as_deref());
        }
        self.exec(
            "INSERT INTO members (id, tenant, email, email_lc, name, flags, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET
               email = CASE WHEN members.erased_at IS NULL THEN excluded.email END,
               email_lc = CASE WHEN members.erased_at IS NULL THEN excluded.email_lc END,
               name = CASE WHEN members.erased_at IS NULL THEN excluded.name END,
               flags = excluded.flags, updated_at = excluded.updated_at",
            &[
                &m.id,
                &m.tenant,
                &m.email,
                &m.email.as_ref().map(|e| e.to_lowercase()),
                &m.name,
                &to_json(&m.flags),
                &ts(m.created_at),
                &ts(m.updated_at),
            ],
        )?;
        Ok(())
    }

    fn link_customer(&mut self, tenant: &str, provider: &str, customer_id: &str, member_id: &str) -> Result<()> {
        self.claim(lock_keys::customer(tenant, provider, customer_id))?;
        self.claim(lock_keys::member(member_id))?;
        self.exec(
            "INSERT INTO member_customers (tenant, provider, customer_id, member_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&tenant, &provider, &customer_id, &member_id],
        )?;
        Ok(())
    }

    fn link_payment(
        &mut self,
        tenant: &str,
        provider: &str,
        r: &str,
        membership_id: &str,
        event_id: &str,
        counted: bool,
    ) -> Result<()> {
        self.claim(lock_keys::payment(tenant, provider, r))?;
        self.exec(
            "INSERT INTO payments (tenant, provider, \"ref\", membership_id, event_id, counted_by)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant, provider, \"ref\") DO UPDATE
               SET counted_by = COALESCE(payments.counted_by, excluded.counted_by)",
            &[&tenant, &provider, &r, &membership_id, &event_id, &counted.then_some(event_id)],
        )?;
        Ok(())
    }

    fn merge_member(&mut self, from: &str, into: &str) -> Result<()> {
        // Moves what other members' keys lead to (customer ids, leads): rare enough to run
        // alone.
        self.exclusive_only()?;
        self.exec("UPDATE memberships SET member_id = $2 WHERE member_id = $1", &[&from, &into])?;
        self.exec("UPDATE member_customers SET member_id = $2 WHERE member_id = $1", &[&from, &into])?;
        self.exec("UPDATE events SET member_id = $2 WHERE member_id = $1", &[&from, &into])?;
        self.exec("UPDATE leads SET member_id = $2 WHERE member_id = $1", &[&from, &into])?;
        self.exec("DELETE FROM members WHERE id = $1", &[&from])?;
        Ok(())
    }

    fn set_enrichment(&mut self, seq: i64, enrichment: &str) -> Result<()> {
        self.exec("UPDATE events SET enrichment = $2 WHERE seq = $1", &[&seq, &enrichment])?;
        Ok(())
    }

    fn end_console_session(&mut self, nonce: &str, until: DateTime<Utc>, now: DateTime<Utc>) -> Result<()> {
        self.exec("DELETE FROM console_logouts WHERE \"until\" <= $1", &[&ts(now)])?;
        self.exec(
            "INSERT INTO console_logouts (nonce, \"until\") VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&nonce, &ts(until)],
        )?;
        Ok(())
    }

    fn payment(&mut self, tenant: &str, provider: &str, r: &str) -> Result<Option<PaymentLink>> {
        self.claim(lock_keys::payment(tenant, provider, r))?;
        let row = self.opt(
            "SELECT membership_id, event_id, counted_by FROM payments WHERE tenant = $1 AND provider = $2 AND \"ref\" = $3",
            &[&tenant, &provider, &r],
        )?;
        row.map(|row| {
            Ok(PaymentLink { membership_id: row.try_get(0)?, event_id: row.try_get(1)?, counted_by: row.try_get(2)? })
        })
        .transpose()
    }

    fn membership(&mut self, id: &str) -> Result<Option<MembershipRow>> {
        self.owned_membership(*MEMBERSHIP_BY_ID, &[&id])
    }

    fn membership_by_key(&mut self, tenant: &str, provider: &str, key: &str) -> Result<Option<MembershipRow>> {
        self.claim(lock_keys::membership_key(tenant, provider, key))?;
        self.owned_membership(*MEMBERSHIP_BY_KEY, &[&tenant, &provider, &key])
    }

    fn memberships_of(&mut self, member_id: &str) -> Result<Vec<MembershipRow>> {
        self.claim(lock_keys::member(member_id))?;
        rows(self.query(*MEMBERSHIPS_OF, &[&member_id])?, membership_row)
    }

    fn save_membership(&mut self, m: &MembershipRow) -> Result<()> {
        // Its member before (if stored: a move from one to another) and after, and its key.
        self.claim_membership(&m.id)?;
        self.claim(lock_keys::member(&m.member_id))?;
        self.claim(lock_keys::membership_key(&m.tenant, &m.provider, &m.key))?;
        if let Some(locks) = self.locks.as_deref_mut() {
            locks.note_owner(&m.id, &m.member_id);
        }
        self.exec(
            "INSERT INTO memberships (id, tenant, member_id, provider, key, subscription_id, product_id, plan_id, status, state,
               period_end, grace_until, access_until, cancel_at_period_end, access_levels, flags, last_event_at, last_event_id,
               last_reconciled_at, sync_status, created_at, updated_at, last_event_rank)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)
             ON CONFLICT (id) DO UPDATE SET member_id = excluded.member_id, subscription_id = excluded.subscription_id,
               product_id = excluded.product_id, plan_id = excluded.plan_id, status = excluded.status, state = excluded.state,
               period_end = excluded.period_end, grace_until = excluded.grace_until, access_until = excluded.access_until,
               cancel_at_period_end = excluded.cancel_at_period_end, access_levels = excluded.access_levels,
               flags = excluded.flags, last_event_at = excluded.last_event_at, last_event_id = excluded.last_event_id,
               last_reconciled_at = excluded.last_reconciled_at, sync_status = excluded.sync_status,
               updated_at = excluded.updated_at, last_event_rank = excluded.last_event_rank",
            &[
                &m.id,
                &m.tenant,
                &m.member_id,
                &m.provider,
                &m.key,
                &m.subscription_id,
                &m.product_id,
                &m.plan_id,
                &m.status,
                &m.state.as_str(),
                &opt_ts(m.period_end),
                &opt_ts(m.grace_until),
                &opt_ts(m.access_until),
                &m.cancel_at_period_end,
                &to_json(&m.access_levels),
                &to_json(&m.flags),
                &opt_ts(m.last_event_at),
                &m.last_event_id,
                &opt_ts(m.last_reconciled_at),
                &m.sync_status.as_str(),
                &ts(m.created_at),
                &ts(m.updated_at),
                &m.last_event_rank,
            ],
        )?;
        Ok(())
    }

    fn capture_lead(&mut self, l: &LeadRow) -> Result<()> {
        self.claim(lock_keys::email(&l.tenant, &l.email))?;
        self.exec(
            "INSERT INTO leads (tenant, email_lc, email, name, provider, event_id, captured_at, converted_at, member_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL)
             ON CONFLICT (tenant, email_lc) DO UPDATE SET name = COALESCE(excluded.name, leads.name),
               provider = excluded.provider, event_id = excluded.event_id, captured_at = excluded.captured_at
             WHERE leads.converted_at IS NULL",
            &[&l.tenant, &l.email.to_lowercase(), &l.email, &l.name, &l.provider, &l.event_id, &ts(l.captured_at)],
        )?;
        Ok(())
    }

    fn convert_lead(&mut self, tenant: &str, email: &str, member_id: &str, at: DateTime<Utc>) -> Result<()> {
        self.claim(lock_keys::email(tenant, email))?;
        self.claim(lock_keys::member(member_id))?;
        self.exec(
            "UPDATE leads SET converted_at = $4, member_id = $3 WHERE tenant = $1 AND email_lc = $2 AND converted_at IS NULL",
            &[&tenant, &email.to_lowercase(), &member_id, &ts(at)],
        )?;
        Ok(())
    }

    fn set_timer(&mut self, t: &TimerRow) -> Result<()> {
        self.claim_membership(&t.membership_id)?;
        self.exec(
            "INSERT INTO timers (membership_id, name, tenant, due_at, set_by_event) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (membership_id, name) DO UPDATE SET due_at = excluded.due_at, set_by_event = excluded.set_by_event",
            &[&t.membership_id, &t.name, &t.tenant, &ts(t.due_at), &t.set_by_event],
        )?;
        Ok(())
    }

    fn cancel_timer(&mut self, membership_id: &str, name: &str) -> Result<()> {
        self.claim_membership(membership_id)?;
        self.exec("DELETE FROM timers WHERE membership_id = $1 AND name = $2", &[&membership_id, &name])?;
        Ok(())
    }

    fn delete_timer_if_due(&mut self, membership_id: &str, name: &str, due_at: DateTime<Utc>) -> Result<bool> {
        self.claim_membership(membership_id)?;
        let n = self.exec(
            "DELETE FROM timers WHERE membership_id = $1 AND name = $2 AND due_at = $3",
            &[&membership_id, &name, &ts(due_at)],
        )?;
        Ok(n > 0)
    }

    fn due_timers_tx(&mut self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TimerRow>> {
        // Rows another batch holds are skipped; the member of each one taken is locked
        // before it fires, so that its firing and a delivery about it never run at once.
        let due = rows(self.query(DUE_TIMERS_CLAIMED, &[&ts(now), &(limit as i64)])?, timer_row)?;
        for t in &due {
            self.claim_membership(&t.membership_id)?;
        }
        Ok(due)
    }

    fn timers_of(&mut self, membership_id: &str) -> Result<Vec<TimerRow>> {
        self.claim_membership(membership_id)?;
        rows(self.query(TIMERS_OF, &[&membership_id])?, timer_row)
    }

    fn applied_from(&mut self, membership_id: &str, source: Source) -> Result<bool> {
        self.claim_membership(membership_id)?;
        Ok(self
            .opt(
                "SELECT 1 FROM events WHERE membership_id = $1 AND source = $2 AND status = 'applied' LIMIT 1",
                &[&membership_id, &source.as_str()],
            )?
            .is_some())
    }

    fn lease_reconcile(
        &mut self,
        targets: &[(String, String)],
        attempted_before: DateTime<Utc>,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<MembershipRow>> {
        self.exclusive_only()?;
        if targets.is_empty() {
            return Ok(vec![]);
        }
        let (tenants, providers): (Vec<String>, Vec<String>) = targets.iter().cloned().unzip();
        // Rows another transaction holds are skipped, never waited for.
        let taken = rows(
            self.query(*LEASE_RECONCILE, &[&ts(attempted_before), &(limit as i64), &ts(now), &tenants, &providers])?,
            membership_row,
        )?;
        for m in &taken {
            self.exec(
                "INSERT INTO reconcile_leases (membership_id, locked_until) VALUES ($1, $2)
                 ON CONFLICT (membership_id) DO UPDATE SET locked_until = excluded.locked_until",
                &[&m.id, &ts(until)],
            )?;
        }
        Ok(taken)
    }

    fn prune_bodies(&mut self, before: DateTime<Utc>, now: DateTime<Utc>, limit: usize) -> Result<Pruned> {
        self.exclusive_only()?;
        static OLDEST: LazyLock<&'static str> = LazyLock::new(|| {
            leak(format!(
                "SELECT seq, (octet_length(raw) + octet_length(headers))::BIGINT FROM events
                 WHERE {PRUNABLE} AND received_at < $1 ORDER BY received_at LIMIT $2 FOR UPDATE"
            ))
        });
        static INDEX: LazyLock<&'static str> = LazyLock::new(|| leak(PRUNABLE_INDEX.clone()));
        self.exec(*INDEX, &[])?;
        let found = self.query(*OLDEST, &[&ts(before), &(limit as i64)])?;
        let mut pruned = Pruned::default();
        for row in found {
            let (seq, bytes): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            self.exec(
                "UPDATE events SET raw = ''::bytea, headers = '[]', body_pruned_at = $2 WHERE seq = $1",
                &[&seq, &ts(now)],
            )?;
            pruned.events += 1;
            pruned.bytes += bytes.max(0) as u64;
        }
        Ok(pruned)
    }

    fn events_naming(&mut self, tenant: &str, member_id: &str, email_lc: Option<&str>) -> Result<Vec<EventRow>> {
        self.exclusive_only()?;
        static NAMING: LazyLock<&'static str> = LazyLock::new(|| {
            leak(format!(
                "SELECT {EVENT_COLS} FROM events WHERE member_id = $1
                 UNION ALL
                 SELECT {EVENT_COLS} FROM events WHERE $3::TEXT IS NOT NULL AND member_id IS NULL AND tenant = $2
                   AND lower(canonical::jsonb -> 'member' ->> 'email') = $3::TEXT
                 UNION ALL
                 SELECT {EVENT_COLS} FROM events WHERE $3::TEXT IS NOT NULL AND member_id IS NULL AND tenant = $2
                   AND canonical IS NULL AND body_pruned_at IS NULL
                   AND (strpos(lower(encode(raw, 'escape')), $3::TEXT) > 0
                        OR strpos(lower(encode(raw, 'escape')), replace($3::TEXT, '@', '%40')) > 0)
                 ORDER BY seq"
            ))
        });
        rows(self.query(*NAMING, &[&member_id, &tenant, &email_lc])?, event_row)
    }

    fn rewrite_event(&mut self, e: &EventRow) -> Result<()> {
        self.exclusive_only()?;
        self.exec(
            "UPDATE events SET raw = $2, headers = $3, canonical = $4, outcome = $5, reason = $6, enrichment = $7
             WHERE seq = $1",
            &[
                &e.seq,
                &e.raw,
                &e.headers.get(),
                &e.canonical.as_ref().map(|c| c.get()),
                &e.outcome.get(),
                &e.reason,
                &e.enrichment,
            ],
        )?;
        Ok(())
    }

    fn erase_member_row(&mut self, member_id: &str, flags: &[String], at: DateTime<Utc>) -> Result<()> {
        self.exclusive_only()?;
        self.exec(
            "UPDATE members SET email = NULL, email_lc = NULL, name = NULL, flags = $3, erased_at = $2, updated_at = $2
             WHERE id = $1",
            &[&member_id, &ts(at), &to_json(&flags)],
        )?;
        Ok(())
    }

    fn rekey_membership(&mut self, id: &str, old_key: &str, new_key: &str) -> Result<()> {
        self.exclusive_only()?;
        self.exec(
            "UPDATE events SET park_key = $3
             WHERE park_key = $2 AND (tenant, provider) = (SELECT tenant, provider FROM memberships WHERE id = $1)",
            &[&id, &old_key, &new_key],
        )?;
        self.exec("UPDATE memberships SET key = $3 WHERE id = $1 AND key = $2", &[&id, &old_key, &new_key])?;
        Ok(())
    }

    fn delete_leads(&mut self, tenant: &str, email_lc: Option<&str>, member_id: &str) -> Result<u64> {
        self.exclusive_only()?;
        self.exec(
            "DELETE FROM leads WHERE tenant = $1 AND (email_lc = $2 OR member_id = $3)",
            &[&tenant, &email_lc, &member_id],
        )
    }

    fn record_erasure(&mut self, e: &ErasureRow) -> Result<()> {
        self.exclusive_only()?;
        self.exec(
            "INSERT INTO erasures (tenant, member_id, erased_by, erased_at, detail) VALUES ($1, $2, $3, $4, $5)",
            &[&e.tenant, &e.member_id, &e.erased_by, &ts(e.erased_at), &e.detail.to_string()],
        )?;
        Ok(())
    }

    fn record_sync(&mut self, r: &SyncRecord) -> Result<()> {
        self.exclusive_only()?;
        // Only the sync columns: a webhook applied meanwhile keeps everything else.
        self.exec(
            "UPDATE memberships SET sync_status = $2, last_reconciled_at = COALESCE($3, last_reconciled_at) WHERE id = $1",
            &[&r.membership_id, &r.sync_status.as_str(), &opt_ts(r.reconciled_at)],
        )?;
        self.exec(
            "INSERT INTO membership_sync (membership_id, attempted_at, detail, drift_at, drift, last_error, last_error_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (membership_id) DO UPDATE SET attempted_at = excluded.attempted_at,
               detail = excluded.detail,
               drift_at = COALESCE(excluded.drift_at, membership_sync.drift_at),
               drift = COALESCE(excluded.drift, membership_sync.drift),
               last_error = COALESCE(excluded.last_error, membership_sync.last_error),
               last_error_at = COALESCE(excluded.last_error_at, membership_sync.last_error_at)",
            &[
                &r.membership_id,
                &ts(r.attempted_at),
                &r.detail,
                &opt_ts(r.drift.as_ref().map(|d| d.0)),
                &r.drift.as_ref().map(|d| d.1.clone()),
                &r.error.as_ref().map(|e| e.1.clone()),
                &opt_ts(r.error.as_ref().map(|e| e.0)),
            ],
        )?;
        Ok(())
    }
}
