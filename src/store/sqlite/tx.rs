//! `Tx` on an SQLite connection: the writer's kept statements, the row mappers and every
//! write and lookup a job makes inside its savepoint. It holds no state of its own.
//!
//! What this module must never do: commit or roll back: the writer owns the transaction.

use super::*;

pub(super) fn json_list(s: String) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(&s)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

pub(super) fn json_value(s: Option<String>) -> rusqlite::Result<Option<StoredJson>> {
    s.map(serde_json::value::RawValue::from_string)
        .transpose()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// Statements the writer keeps prepared for its whole life, bindings and plan included.
/// rusqlite's statement cache clears a statement's bindings when it takes it back, and
/// SQLite then re-plans, on its next run, any statement whose plan looked at a bound value
/// (the partial index of parked events, the join of `member_by_customer`, the
/// `ORDER BY … LIMIT` of `member_by_email`): a full re-prepare per event, a fifth of the
/// writer's time under load. Every run binds every parameter, so keeping them is safe.
/// Keyed by where the SQL text lives (a `'static` string never moves or changes), so a
/// lookup hashes two words rather than the whole statement.
pub(super) type Prepared<'c> = HashMap<(usize, usize), Statement<'c>>;

/// A statement from the writer's own set or, on a read connection, rusqlite's cache.
pub(super) enum Stmt<'s, 'c> {
    Kept(&'s mut Statement<'c>),
    Cached(CachedStatement<'c>),
}

impl<'c> Deref for Stmt<'_, 'c> {
    type Target = Statement<'c>;
    fn deref(&self) -> &Statement<'c> {
        match self {
            Stmt::Kept(s) => s,
            Stmt::Cached(s) => s,
        }
    }
}

impl DerefMut for Stmt<'_, '_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Stmt::Kept(s) => s,
            Stmt::Cached(s) => s,
        }
    }
}

/// The writer's transaction (with its kept statements), or a read connection.
pub(super) struct SqliteTx<'a, 'c> {
    pub(super) conn: &'c Connection,
    pub(super) prepared: Option<&'a mut Prepared<'c>>,
    /// A scratch database: event rows keep their body, headers and outcome only when
    /// parked (a later event runs them again); nothing else reads them back.
    pub(super) lean: bool,
}

impl<'c> SqliteTx<'_, 'c> {
    pub(super) fn reader(conn: &'c Connection) -> SqliteTx<'c, 'c> {
        SqliteTx { conn, prepared: None, lean: false }
    }

    pub(super) fn st(&mut self, sql: &'static str) -> Result<Stmt<'_, 'c>> {
        let conn = self.conn;
        match self.prepared.as_deref_mut() {
            Some(kept) => {
                let st = match kept.entry((sql.as_ptr() as usize, sql.len())) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(conn.prepare(sql)?),
                };
                Ok(Stmt::Kept(st))
            }
            None => Ok(Stmt::Cached(conn.prepare_cached(sql)?)),
        }
    }
}

/// A membership's timers, soonest first.
pub(super) const TIMERS_OF: &str =
    "SELECT tenant, membership_id, name, due_at, set_by_event FROM timers WHERE membership_id = ?1 ORDER BY due_at";

/// Timers due by ?1, oldest first, at most ?2 (read by the timer task and in a transaction).
pub(super) const DUE_TIMERS: &str =
    "SELECT tenant, membership_id, name, due_at, set_by_event FROM timers WHERE due_at <= ?1
     ORDER BY due_at, membership_id, name LIMIT ?2";

// The writer's lookups that name their columns (built once; kept prepared by the writer).
pub(super) static EVENT_BY_KEY: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {EVENT_COLS} FROM events WHERE tenant = ?1 AND provider = ?2 AND idempotency_key = ?3")
});
/// Events parked under a key, then those parked for a membership of the member of
/// membership `?4` that name that member: by a customer id of it at this provider, or by
/// its email (ASCII case folded). Each part one search of its own index (migration 009;
/// the expressions are the indexes'), never a walk over every member's parked events: the
/// planner, left to itself, took `events_parked` for `park_key = ''` and read them all, or
/// (without `CROSS JOIN`, which fixes the order) read the events before the customer ids;
/// and weighing the `park_key = ''` indexes for `park_key = ?3`, it looked at the key's
/// value, so that each new key re-prepared the whole statement (`INDEXED BY` there). (A
/// store an operator has run `ANALYZE` on has statistics that SQLite weighs bound values
/// against, for this statement as for any other: it is then re-prepared per run, on the
/// same indexes. membersync itself never runs `ANALYZE`.)
pub(super) static PARKED: LazyLock<String> = LazyLock::new(|| {
    let e_cols = qualified("e", EVENT_COLS);
    format!(
        "SELECT {EVENT_COLS} FROM events INDEXED BY events_parked WHERE tenant = ?1 AND provider = ?2 AND park_key = ?3
         UNION ALL
         SELECT {e_cols} FROM memberships s
           CROSS JOIN member_customers c ON c.member_id = s.member_id AND c.tenant = ?1 AND c.provider = ?2
           CROSS JOIN events e INDEXED BY events_parked_customer ON e.tenant = ?1 AND e.provider = ?2
            AND e.park_key = ''
            AND CAST(json_extract(e.canonical, '$.member.provider_customer_id') AS TEXT) = c.customer_id
          WHERE s.id = ?4
         UNION ALL
         SELECT {EVENT_COLS} FROM events INDEXED BY events_parked_email
          WHERE tenant = ?1 AND provider = ?2 AND park_key = ''
           AND lower(json_extract(canonical, '$.member.email')) =
             (SELECT lower(m.email) FROM memberships s JOIN members m ON m.id = s.member_id WHERE s.id = ?4)"
    )
});
pub(super) static MEMBER_BY_ID: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {MEMBER_COLS} FROM members WHERE id = ?1"));
pub(super) static MEMBER_BY_CUSTOMER: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM members m JOIN member_customers c ON c.member_id = m.id
         WHERE c.tenant = ?1 AND c.provider = ?2 AND c.customer_id = ?3",
        qualified("m", MEMBER_COLS)
    )
});
pub(super) static MEMBER_BY_EMAIL: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {MEMBER_COLS} FROM members WHERE tenant = ?1 AND email_lc = ?2 ORDER BY created_at LIMIT 1")
});
pub(super) static MEMBERSHIP_BY_ID: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE id = ?1"));
pub(super) static MEMBERSHIP_BY_KEY: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE tenant = ?1 AND provider = ?2 AND key = ?3")
});
pub(super) static MEMBERSHIPS_OF: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE member_id = ?1 ORDER BY created_at, id"));

/// Enums stored by name (`as_str` / `parse`); a name read back that is not one is an error.
macro_rules! stored_by_name {
    ($t:ty, $what:literal) => {
        impl rusqlite::types::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $t {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                let s = v.as_str()?;
                <$t>::parse(s)
                    .ok_or_else(|| rusqlite::types::FromSqlError::Other(format!("unknown {} `{s}`", $what).into()))
            }
        }
    };
}

stored_by_name!(Source, "event source");
stored_by_name!(SyncState, "sync status");
stored_by_name!(EventStatus, "event status");

pub(super) fn event_row(r: &Row) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        seq: r.get(0)?,
        tenant: r.get(1)?,
        provider: r.get(2)?,
        event_id: r.get(3)?,
        idempotency_key: r.get(4)?,
        event_type: r.get(5)?,
        kind: r.get(6)?,
        source: r.get(7)?,
        received_at: from_ts(r.get(8)?),
        occurred_at: opt_from(r.get(9)?),
        member_id: r.get(10)?,
        membership_id: r.get(11)?,
        status: r.get(12)?,
        reason: r.get(13)?,
        raw: r.get(14)?,
        headers: json_value(r.get(15)?)?.unwrap_or_else(null_json),
        canonical: json_value(r.get(16)?)?,
        outcome: json_value(r.get(17)?)?.unwrap_or_else(null_json),
        park_key: r.get(18)?,
        deliveries: r.get(19)?,
        enrichment: r.get(20)?,
        body_pruned_at: opt_from(r.get(21)?),
    })
}

pub(super) fn member_row(r: &Row) -> rusqlite::Result<MemberRow> {
    Ok(MemberRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        email: r.get(2)?,
        name: r.get(3)?,
        flags: json_list(r.get(4)?)?,
        created_at: from_ts(r.get(5)?),
        updated_at: from_ts(r.get(6)?),
        erased_at: opt_from(r.get(7)?),
    })
}

pub(super) fn membership_row(r: &Row) -> rusqlite::Result<MembershipRow> {
    let state: String = r.get(9)?;
    Ok(MembershipRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        member_id: r.get(2)?,
        provider: r.get(3)?,
        key: r.get(4)?,
        subscription_id: r.get(5)?,
        product_id: r.get(6)?,
        plan_id: r.get(7)?,
        status: r.get(8)?,
        state: MState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                9,
                rusqlite::types::Type::Text,
                format!("unknown state {state}").into(),
            )
        })?,
        period_end: opt_from(r.get(10)?),
        grace_until: opt_from(r.get(11)?),
        access_until: opt_from(r.get(12)?),
        cancel_at_period_end: r.get(13)?,
        access_levels: json_list(r.get(14)?)?,
        flags: json_list(r.get(15)?)?,
        last_event_at: opt_from(r.get(16)?),
        last_event_id: r.get(17)?,
        last_reconciled_at: opt_from(r.get(18)?),
        sync_status: r.get(19)?,
        created_at: from_ts(r.get(20)?),
        updated_at: from_ts(r.get(21)?),
        last_event_rank: r.get(22)?,
    })
}

pub(super) fn lead_row(r: &Row) -> rusqlite::Result<LeadRow> {
    Ok(LeadRow {
        tenant: r.get(0)?,
        email: r.get(1)?,
        name: r.get(2)?,
        provider: r.get(3)?,
        event_id: r.get(4)?,
        captured_at: from_ts(r.get(5)?),
        converted_at: opt_from(r.get(6)?),
        member_id: r.get(7)?,
    })
}

pub(super) fn timer_row(r: &Row) -> rusqlite::Result<TimerRow> {
    Ok(TimerRow {
        tenant: r.get(0)?,
        membership_id: r.get(1)?,
        name: r.get(2)?,
        due_at: from_ts(r.get(3)?),
        set_by_event: r.get(4)?,
    })
}

impl Tx for SqliteTx<'_, '_> {
    fn event_by_key(&mut self, tenant: &str, provider: &str, key: &str) -> Result<Option<EventRow>> {
        Ok(self.st(&EVENT_BY_KEY)?.query_row(params![tenant, provider, key], event_row).optional()?)
    }

    fn note_duplicate(&mut self, seq: i64) -> Result<()> {
        self.st("UPDATE events SET deliveries = deliveries + 1 WHERE seq = ?1")?.execute([seq])?;
        Ok(())
    }

    fn mark_replayed(&mut self, seq: i64, note: &str) -> Result<bool> {
        let n = self
            .st("UPDATE events SET idempotency_key = idempotency_key || '#retired@' || seq, park_key = NULL,
                   status = 'replayed', reason = COALESCE(reason || ' — ', '') || ?2
                 WHERE seq = ?1 AND status IN ('failed', 'refused', 'ignored')")?
            .execute(params![seq, note])?;
        Ok(n > 0)
    }

    fn parked(&mut self, tenant: &str, provider: &str, key: &str, membership_id: &str) -> Result<Vec<EventRow>> {
        // Lookups in partial indexes, almost always empty: ordered here rather than by SQL,
        // whose ORDER BY built a temporary B-tree for every event (8% of the writer). An
        // event naming its member both ways is found twice: once is kept.
        let mut rows = self
            .st(&PARKED)?
            .query_map(params![tenant, provider, key, membership_id], event_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.sort_by_key(|e| (e.occurred_at, e.seq));
        rows.dedup_by_key(|e| e.seq);
        Ok(rows)
    }

    fn parked_identity(&mut self, tenant: &str, provider: &str, membership_id: &str) -> Result<String> {
        let who: Option<String> = self
            .st("SELECT m.id || char(10) || COALESCE(lower(m.email), '') || char(10) ||
                   COALESCE((SELECT group_concat(customer_id, char(10)) FROM
                     (SELECT customer_id FROM member_customers
                       WHERE member_id = m.id AND tenant = ?1 AND provider = ?2 ORDER BY customer_id)), '')
                 FROM memberships s JOIN members m ON m.id = s.member_id WHERE s.id = ?3")?
            .query_row(params![tenant, provider, membership_id], |r| r.get(0))
            .optional()?;
        Ok(who.unwrap_or_default())
    }

    fn last_event_seq(&mut self) -> Result<i64> {
        Ok(self.st("SELECT COALESCE(MAX(seq), 0) FROM events")?.query_row([], |r| r.get(0))?)
    }

    fn insert_event(&mut self, e: &EventRow) -> Result<i64> {
        // A scratch keeps the body only of events it may run again (parked ones).
        let lean = self.lean && e.park_key.is_none();
        self.st(
                "INSERT INTO events (tenant, provider, event_id, idempotency_key, event_type, kind, source, received_at, occurred_at, member_id, membership_id, status, reason, raw, headers, canonical, outcome, park_key, deliveries, enrichment)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
            )?
            .execute(params![
                e.tenant,
                e.provider,
                e.event_id,
                e.idempotency_key,
                e.event_type,
                e.kind,
                e.source,
                ts(e.received_at),
                opt_ts(e.occurred_at),
                e.member_id,
                e.membership_id,
                e.status,
                e.reason,
                if lean { &[][..] } else { &e.raw[..] },
                if lean { "[]" } else { e.headers.get() },
                if lean { None } else { e.canonical.as_ref().map(|c| c.get()) },
                if lean { "null" } else { e.outcome.get() },
                e.park_key,
                e.deliveries,
                e.enrichment,
            ])?;
        Ok(self.conn.last_insert_rowid())
    }

    fn member(&mut self, id: &str) -> Result<Option<MemberRow>> {
        Ok(self.st(&MEMBER_BY_ID)?.query_row([id], member_row).optional()?)
    }

    fn member_by_customer(&mut self, tenant: &str, provider: &str, customer_id: &str) -> Result<Option<MemberRow>> {
        Ok(self.st(&MEMBER_BY_CUSTOMER)?.query_row(params![tenant, provider, customer_id], member_row).optional()?)
    }

    fn member_by_email(&mut self, tenant: &str, email: &str) -> Result<Option<MemberRow>> {
        Ok(self.st(&MEMBER_BY_EMAIL)?.query_row(params![tenant, email.to_lowercase()], member_row).optional()?)
    }

    fn save_member(&mut self, m: &MemberRow) -> Result<()> {
        self.st("INSERT INTO members (id, tenant, email, email_lc, name, flags, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (id) DO UPDATE SET
                   email = CASE WHEN members.erased_at IS NULL THEN excluded.email END,
                   email_lc = CASE WHEN members.erased_at IS NULL THEN excluded.email_lc END,
                   name = CASE WHEN members.erased_at IS NULL THEN excluded.name END,
                   flags = excluded.flags, updated_at = excluded.updated_at")?
            .execute(params![
                m.id,
                m.tenant,
                m.email,
                m.email.as_ref().map(|e| e.to_lowercase()),
                m.name,
                to_json(&m.flags),
                ts(m.created_at),
                ts(m.updated_at)
            ])?;
        Ok(())
    }

    fn link_customer(&mut self, tenant: &str, provider: &str, customer_id: &str, member_id: &str) -> Result<()> {
        self.st("INSERT INTO member_customers (tenant, provider, customer_id, member_id) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING")?
            .execute(params![tenant, provider, customer_id, member_id])?;
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
        self.st("INSERT INTO payments (tenant, provider, ref, membership_id, event_id, counted_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT DO UPDATE SET counted_by = coalesce(counted_by, excluded.counted_by)")?
            .execute(params![tenant, provider, r, membership_id, event_id, counted.then_some(event_id)])?;
        Ok(())
    }

    fn merge_member(&mut self, from: &str, into: &str) -> Result<()> {
        for sql in [
            "UPDATE memberships SET member_id = ?2 WHERE member_id = ?1",
            "UPDATE member_customers SET member_id = ?2 WHERE member_id = ?1",
            "UPDATE events SET member_id = ?2 WHERE member_id = ?1",
            "UPDATE leads SET member_id = ?2 WHERE member_id = ?1",
        ] {
            self.st(sql)?.execute(params![from, into])?;
        }
        self.st("DELETE FROM members WHERE id = ?1")?.execute([from])?;
        Ok(())
    }

    fn end_console_session(&mut self, nonce: &str, until: DateTime<Utc>, now: DateTime<Utc>) -> Result<()> {
        self.st("DELETE FROM console_logouts WHERE until <= ?1")?.execute([ts(now)])?;
        self.st("INSERT OR IGNORE INTO console_logouts (nonce, until) VALUES (?1, ?2)")?
            .execute(params![nonce, ts(until)])?;
        Ok(())
    }

    fn set_enrichment(&mut self, seq: i64, enrichment: &str) -> Result<()> {
        self.st("UPDATE events SET enrichment = ?2 WHERE seq = ?1")?.execute(params![seq, enrichment])?;
        Ok(())
    }

    fn payment(&mut self, tenant: &str, provider: &str, r: &str) -> Result<Option<PaymentLink>> {
        Ok(self
            .st("SELECT membership_id, event_id, counted_by FROM payments WHERE tenant = ?1 AND provider = ?2 AND ref = ?3")?
            .query_row(params![tenant, provider, r], |row| {
                Ok(PaymentLink { membership_id: row.get(0)?, event_id: row.get(1)?, counted_by: row.get(2)? })
            })
            .optional()?)
    }

    fn membership(&mut self, id: &str) -> Result<Option<MembershipRow>> {
        Ok(self.st(&MEMBERSHIP_BY_ID)?.query_row([id], membership_row).optional()?)
    }

    fn membership_by_key(&mut self, tenant: &str, provider: &str, key: &str) -> Result<Option<MembershipRow>> {
        Ok(self.st(&MEMBERSHIP_BY_KEY)?.query_row(params![tenant, provider, key], membership_row).optional()?)
    }

    fn memberships_of(&mut self, member_id: &str) -> Result<Vec<MembershipRow>> {
        let mut st = self.st(&MEMBERSHIPS_OF)?;
        let rows = st.query_map([member_id], membership_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn save_membership(&mut self, m: &MembershipRow) -> Result<()> {
        self.st(
                "INSERT INTO memberships (id, tenant, member_id, provider, key, subscription_id, product_id, plan_id, status, state,
                   period_end, grace_until, access_until, cancel_at_period_end, access_levels, flags, last_event_at, last_event_id,
                   last_reconciled_at, sync_status, created_at, updated_at, last_event_rank)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)
                 ON CONFLICT (id) DO UPDATE SET member_id = excluded.member_id, subscription_id = excluded.subscription_id,
                   product_id = excluded.product_id, plan_id = excluded.plan_id, status = excluded.status, state = excluded.state,
                   period_end = excluded.period_end, grace_until = excluded.grace_until, access_until = excluded.access_until,
                   cancel_at_period_end = excluded.cancel_at_period_end, access_levels = excluded.access_levels,
                   flags = excluded.flags, last_event_at = excluded.last_event_at, last_event_id = excluded.last_event_id,
                   last_reconciled_at = excluded.last_reconciled_at, sync_status = excluded.sync_status,
                   updated_at = excluded.updated_at, last_event_rank = excluded.last_event_rank",
            )?
            .execute(params![
                m.id,
                m.tenant,
                m.member_id,
                m.provider,
                m.key,
                m.subscription_id,
                m.product_id,
                m.plan_id,
                m.status,
                m.state.as_str(),
                opt_ts(m.period_end),
                opt_ts(m.grace_until),
                opt_ts(m.access_until),
                m.cancel_at_period_end,
                to_json(&m.access_levels),
                to_json(&m.flags),
                opt_ts(m.last_event_at),
                m.last_event_id,
                opt_ts(m.last_reconciled_at),
                m.sync_status,
                ts(m.created_at),
                ts(m.updated_at),
                m.last_event_rank,
            ])?;
        Ok(())
    }

    fn capture_lead(&mut self, l: &LeadRow) -> Result<()> {
        self.st(
                "INSERT INTO leads (tenant, email_lc, email, name, provider, event_id, captured_at, converted_at, member_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, NULL)
                 ON CONFLICT (tenant, email_lc) DO UPDATE SET name = COALESCE(excluded.name, leads.name),
                   provider = excluded.provider, event_id = excluded.event_id, captured_at = excluded.captured_at
                 WHERE leads.converted_at IS NULL",
            )?
            .execute(params![l.tenant, l.email.to_lowercase(), l.email, l.name, l.provider, l.event_id, ts(l.captured_at)])?;
        Ok(())
    }

    fn convert_lead(&mut self, tenant: &str, email: &str, member_id: &str, at: DateTime<Utc>) -> Result<()> {
        self.st(
            "UPDATE leads SET converted_at = ?4, member_id = ?3 WHERE tenant = ?1 AND email_lc = ?2 AND converted_at IS NULL",
        )?
        .execute(params![tenant, email.to_lowercase(), member_id, ts(at)])?;
        Ok(())
    }

    fn set_timer(&mut self, t: &TimerRow) -> Result<()> {
        self.st(
                "INSERT INTO timers (membership_id, name, tenant, due_at, set_by_event) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (membership_id, name) DO UPDATE SET due_at = excluded.due_at, set_by_event = excluded.set_by_event",
            )?
            .execute(params![t.membership_id, t.name, t.tenant, ts(t.due_at), t.set_by_event])?;
        Ok(())
    }

    fn cancel_timer(&mut self, membership_id: &str, name: &str) -> Result<()> {
        self.st("DELETE FROM timers WHERE membership_id = ?1 AND name = ?2")?.execute(params![membership_id, name])?;
        Ok(())
    }

    fn due_timers_tx(&mut self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TimerRow>> {
        let rows = self
            .st(DUE_TIMERS)?
            .query_map(params![ts(now), limit as i64], timer_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn applied_from(&mut self, membership_id: &str, source: Source) -> Result<bool> {
        Ok(self
            .st("SELECT 1 FROM events WHERE membership_id = ?1 AND source = ?2 AND status = 'applied' LIMIT 1")?
            .query_row(params![membership_id, source], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn timers_of(&mut self, membership_id: &str) -> Result<Vec<TimerRow>> {
        let rows = self.st(TIMERS_OF)?.query_map([membership_id], timer_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn delete_timer_if_due(&mut self, membership_id: &str, name: &str, due_at: DateTime<Utc>) -> Result<bool> {
        let n = self
            .st("DELETE FROM timers WHERE membership_id = ?1 AND name = ?2 AND due_at = ?3")?
            .execute(params![membership_id, name, ts(due_at)])?;
        Ok(n > 0)
    }

    fn lease_reconcile(
        &mut self,
        targets: &[(String, String)],
        attempted_before: DateTime<Utc>,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<MembershipRow>> {
        if targets.is_empty() {
            return Ok(vec![]);
        }
        let cols = qualified("m", MEMBERSHIP_COLS);
        let which = (0..targets.len())
            .map(|i| format!("(m.tenant = ?{} AND m.provider = ?{})", 4 + 2 * i, 5 + 2 * i))
            .collect::<Vec<_>>()
            .join(" OR ");
        let sql = format!(
            "SELECT {cols} FROM memberships m LEFT JOIN membership_sync s ON s.membership_id = m.id
               LEFT JOIN reconcile_leases l ON l.membership_id = m.id
             WHERE ({which}) AND (s.attempted_at IS NULL OR s.attempted_at < ?1)
               AND (l.locked_until IS NULL OR l.locked_until <= ?3)
             ORDER BY COALESCE(s.attempted_at, -1), m.id LIMIT ?2"
        );
        let mut args: Vec<rusqlite::types::Value> =
            vec![ts(attempted_before).into(), (limit as i64).into(), ts(now).into()];
        for (t, p) in targets {
            args.push(t.clone().into());
            args.push(p.clone().into());
        }
        let taken = self
            .conn
            .prepare(&sql)?
            .query_map(rusqlite::params_from_iter(args), membership_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for m in &taken {
            self.st("INSERT INTO reconcile_leases (membership_id, locked_until) VALUES (?1, ?2)
                 ON CONFLICT (membership_id) DO UPDATE SET locked_until = excluded.locked_until")?
                .execute(params![m.id, ts(until)])?;
        }
        Ok(taken)
    }

    fn prune_bodies(&mut self, before: DateTime<Utc>, now: DateTime<Utc>, limit: usize) -> Result<Pruned> {
        static OLDEST: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT seq, length(raw) + length(headers) FROM events WHERE {PRUNABLE} AND received_at < ?1
                 ORDER BY received_at LIMIT ?2"
            )
        });
        self.st(&PRUNABLE_INDEX)?.execute([])?;
        let found = self
            .st(&OLDEST)?
            .query_map(params![ts(before), limit as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut pruned = Pruned::default();
        for (seq, bytes) in found {
            self.st("UPDATE events SET raw = x'', headers = '[]', body_pruned_at = ?2 WHERE seq = ?1")?
                .execute(params![seq, ts(now)])?;
            pruned.events += 1;
            pruned.bytes += bytes.max(0) as u64;
        }
        Ok(pruned)
    }

    fn events_naming(&mut self, tenant: &str, member_id: &str, email_lc: Option<&str>) -> Result<Vec<EventRow>> {
        static NAMING: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT {EVENT_COLS} FROM events WHERE member_id = ?1
                 UNION ALL
                 SELECT {EVENT_COLS} FROM events WHERE ?3 IS NOT NULL AND member_id IS NULL AND tenant = ?2
                   AND lower(json_extract(canonical, '$.member.email')) = ?3
                 UNION ALL
                 SELECT {EVENT_COLS} FROM events WHERE ?3 IS NOT NULL AND member_id IS NULL AND tenant = ?2
                   AND canonical IS NULL AND body_pruned_at IS NULL
                   AND (instr(lower(CAST(raw AS TEXT)), ?3) > 0
                        OR instr(lower(CAST(raw AS TEXT)), replace(?3, '@', '%40')) > 0)
                 ORDER BY seq"
            )
        });
        let rows = self
            .st(&NAMING)?
            .query_map(params![member_id, tenant, email_lc], event_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn rewrite_event(&mut self, e: &EventRow) -> Result<()> {
        self.st("UPDATE events SET raw = ?2, headers = ?3, canonical = ?4, outcome = ?5, reason = ?6, enrichment = ?7
                 WHERE seq = ?1")?
            .execute(params![
                e.seq,
                e.raw,
                e.headers.get(),
                e.canonical.as_ref().map(|c| c.get()),
                e.outcome.get(),
                e.reason,
                e.enrichment
            ])?;
        Ok(())
    }

    fn erase_member_row(&mut self, member_id: &str, flags: &[String], at: DateTime<Utc>) -> Result<()> {
        self.st("UPDATE members SET email = NULL, email_lc = NULL, name = NULL, flags = ?3, erased_at = ?2,
                   updated_at = ?2 WHERE id = ?1")?
            .execute(params![member_id, ts(at), to_json(&flags)])?;
        Ok(())
    }

    fn rekey_membership(&mut self, id: &str, old_key: &str, new_key: &str) -> Result<()> {
        self.st(
            "UPDATE events SET park_key = ?3
                 WHERE park_key = ?2 AND (tenant, provider) = (SELECT tenant, provider FROM memberships WHERE id = ?1)",
        )?
        .execute(params![id, old_key, new_key])?;
        self.st("UPDATE memberships SET key = ?3 WHERE id = ?1 AND key = ?2")?
            .execute(params![id, old_key, new_key])?;
        Ok(())
    }

    fn delete_leads(&mut self, tenant: &str, email_lc: Option<&str>, member_id: &str) -> Result<u64> {
        let n = self
            .st("DELETE FROM leads WHERE tenant = ?1 AND (email_lc = ?2 OR member_id = ?3)")?
            .execute(params![tenant, email_lc, member_id])?;
        Ok(n as u64)
    }

    fn record_erasure(&mut self, e: &ErasureRow) -> Result<()> {
        self.st("INSERT INTO erasures (tenant, member_id, erased_by, erased_at, detail) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![e.tenant, e.member_id, e.erased_by, ts(e.erased_at), e.detail.to_string()])?;
        Ok(())
    }

    fn record_sync(&mut self, r: &SyncRecord) -> Result<()> {
        // Only the sync columns: a webhook applied meanwhile keeps everything else.
        self.st("UPDATE memberships SET sync_status = ?2,
                   last_reconciled_at = COALESCE(?3, last_reconciled_at) WHERE id = ?1")?
            .execute(params![r.membership_id, r.sync_status, opt_ts(r.reconciled_at)])?;
        self.st(
                "INSERT INTO membership_sync (membership_id, attempted_at, detail, drift_at, drift, last_error, last_error_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (membership_id) DO UPDATE SET attempted_at = excluded.attempted_at,
                   detail = excluded.detail,
                   drift_at = COALESCE(excluded.drift_at, membership_sync.drift_at),
                   drift = COALESCE(excluded.drift, membership_sync.drift),
                   last_error = COALESCE(excluded.last_error, membership_sync.last_error),
                   last_error_at = COALESCE(excluded.last_error_at, membership_sync.last_error_at)",
            )?
            .execute(params![
                r.membership_id,
                ts(r.attempted_at),
                r.detail,
                opt_ts(r.drift.as_ref().map(|d| d.0)),
                r.drift.as_ref().map(|d| d.1.clone()),
                r.error.as_ref().map(|e| e.1.clone()),
                opt_ts(r.error.as_ref().map(|e| e.0)),
            ])?;
        Ok(())
    }
}
