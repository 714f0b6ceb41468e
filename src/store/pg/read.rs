//! `Store` on PostgreSQL: the reads the admin API, reports and replay make, on the read
//! connections. It must never write.

use super::*;
use postgres::types::ToSql;

/// A member's first customer id at a provider (replay's comparison, resync).
const CUSTOMER_OF_MEMBER: &str =
    "SELECT customer_id FROM member_customers WHERE tenant = $1 AND provider = $2 AND member_id = $3
     ORDER BY customer_id LIMIT 1";

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

fn refs(p: &Params) -> Vec<&(dyn ToSql + Sync)> {
    p.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect()
}

/// The reconciliation detail of one membership, with its last webhook time.
fn sync_row(c: &mut Client, membership_id: &str) -> Result<SyncRow> {
    let last_webhook_at: Option<i64> = c
        .query_one(
            "SELECT MAX(received_at) FROM events WHERE membership_id = $1 AND source = 'webhook'",
            &[&membership_id],
        )?
        .try_get(0)?;
    let row = c.query_opt(
        "SELECT attempted_at, detail, drift_at, drift, last_error, last_error_at FROM membership_sync
         WHERE membership_id = $1",
        &[&membership_id],
    )?;
    let mut row = match row {
        Some(r) => SyncRow {
            membership_id: membership_id.to_string(),
            attempted_at: opt_from(r.try_get(0)?),
            detail: r.try_get(1)?,
            drift_at: opt_from(r.try_get(2)?),
            drift: r.try_get(3)?,
            last_error: r.try_get(4)?,
            last_error_at: opt_from(r.try_get(5)?),
            last_webhook_at: None,
        },
        None => SyncRow { membership_id: membership_id.to_string(), ..Default::default() },
    };
    row.last_webhook_at = opt_from(last_webhook_at);
    Ok(row)
}

/// The event columns without the raw body and headers (a list or an activity log shows
/// neither: they stay in the database).
fn light_event_cols() -> String {
    EVENT_COLS.replacen(", raw, headers,", ", ''::bytea, '[]',", 1)
}

/// `SELECT … FROM events` under `conds` (each a test with `$?` for its value), in `seq`
/// order, at most `limit` rows; the placeholders numbered in order.
fn events_sql(
    cols: &str,
    conds: Vec<(&str, Option<Box<dyn ToSql + Sync + Send>>)>,
    order: &str,
    limit: Option<usize>,
) -> (String, Params) {
    let mut sql = format!("SELECT {cols} FROM events");
    let mut values: Params = Vec::new();
    for (i, (test, value)) in conds.into_iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        if let Some(v) = value {
            values.push(v);
            sql.push_str(&test.replace("$?", &format!("${}", values.len())));
        } else {
            sql.push_str(test);
        }
    }
    sql.push_str(" ORDER BY seq ");
    sql.push_str(order);
    if let Some(n) = limit {
        values.push(Box::new(n as i64));
        sql.push_str(&format!(" LIMIT ${}", values.len()));
    }
    (sql, values)
}

fn boxed<T: ToSql + Sync + Send + 'static>(v: T) -> Option<Box<dyn ToSql + Sync + Send>> {
    Some(Box::new(v))
}

impl Store for PgStore {
    fn scratch(&self, f: ScratchJob<'_>) -> Result<()> {
        // A dry run's scratch is private to it: an in-process SQLite database.
        crate::store::sqlite::scratch(f)
    }

    /// Whether the writer is not stuck on a batch past the write deadline, and the
    /// database answers now (`SELECT 1` on a read connection).
    fn health(&self) -> Result<()> {
        let since = self.batch_since.load(std::sync::atomic::Ordering::Acquire);
        let waited = Utc::now().timestamp_millis() - since;
        if since != 0 && waited > self.write_deadline.as_millis() as i64 {
            return Err(Error::Failed(format!(
                "the writer has waited {:.0} s for PostgreSQL to commit a batch",
                waited as f64 / 1000.0
            )));
        }
        self.read(|c| c.batch_execute("SELECT 1").map_err(Error::from))
            .map_err(|e| Error::Failed(format!("the PostgreSQL database cannot be reached: {e}")))
    }

    fn write_deadline(&self) -> Option<std::time::Duration> {
        Some(self.write_deadline)
    }

    fn writer_stats(&self) -> WriterStats {
        self.stats.read()
    }

    fn shared(&self) -> bool {
        true
    }

    fn members_named(
        &self,
        tenant: &str,
        provider: &str,
        mkey: Option<&str>,
        customer_id: Option<&str>,
        email: Option<&str>,
    ) -> Result<Vec<String>> {
        let email = email.map(str::to_lowercase);
        self.read(|c| {
            let rows = c.query(
                "SELECT m FROM (VALUES
                   ((SELECT member_id FROM memberships WHERE tenant = $1 AND provider = $2 AND key = $3)),
                   ((SELECT member_id FROM member_customers WHERE tenant = $1 AND provider = $2 AND customer_id = $4)),
                   ((SELECT id FROM members WHERE tenant = $1 AND email_lc = $5 ORDER BY created_at, id LIMIT 1))
                 ) AS v(m) WHERE m IS NOT NULL",
                &[&tenant, &provider, &mkey, &customer_id, &email],
            )?;
            rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
        })
    }

    fn submit(&self, work: Work) -> Result<()> {
        self.sender.try_send(work).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Busy,
            mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })
    }

    fn member_detail(&self, id: &str, recent: usize) -> Result<Option<MemberDetail>> {
        self.read(|c| {
            let mut prepared = Prepared::new();
            let mut tx = PgTx { conn: &mut *c, prepared: &mut prepared, locks: None };
            let Some(member) = tx.member(id)? else { return Ok(None) };
            let memberships = tx.memberships_of(id)?;
            let mut timers = Vec::new();
            for m in &memberships {
                timers.extend(tx.timers_of(&m.id)?);
            }
            let sql =
                format!("SELECT {} FROM events WHERE member_id = $1 ORDER BY seq DESC LIMIT $2", light_event_cols());
            let recent_events = rows(c.query(&sql, &[&id, &(recent as i64)])?, event_row)?;
            let mut sync = Vec::new();
            for m in &memberships {
                sync.push(sync_row(c, &m.id)?);
            }
            let erasures = c
                .query(
                    "SELECT tenant, member_id, erased_by, erased_at, detail FROM erasures WHERE member_id = $1 ORDER BY id",
                    &[&id],
                )?
                .iter()
                .map(|r| {
                    Ok(ErasureRow {
                        tenant: r.try_get(0)?,
                        member_id: r.try_get(1)?,
                        erased_by: r.try_get(2)?,
                        erased_at: from_ts(r.try_get(3)?),
                        detail: serde_json::from_str(r.try_get::<_, &str>(4)?).unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(MemberDetail { member, memberships, recent_events, timers, sync, erasures }))
        })
    }

    fn member(&self, id: &str) -> Result<Option<MemberRow>> {
        self.read(|c| Tx::member(&mut PgTx { conn: c, prepared: &mut Prepared::new(), locks: None }, id))
    }

    fn members_with_memberships(&self, ids: &[String]) -> Result<Vec<StoredMember>> {
        self.read(|c| {
            let mut prepared = Prepared::new();
            let customer = c.prepare(CUSTOMER_OF_MEMBER)?;
            let mut out = Vec::new();
            for id in ids {
                let mut tx = PgTx { conn: &mut *c, prepared: &mut prepared, locks: None };
                let Some(m) = tx.member(id)? else { continue };
                let memberships = tx.memberships_of(id)?;
                let mut timers = Vec::new();
                for ms in &memberships {
                    timers.extend(tx.timers_of(&ms.id)?);
                }
                let providers: std::collections::BTreeSet<&str> =
                    memberships.iter().map(|ms| ms.provider.as_str()).collect();
                let mut customers = Vec::new();
                for p in providers {
                    if let Some(r) = c.query_opt(&customer, &[&m.tenant, &p, &m.id])? {
                        customers.push((p.to_string(), r.try_get(0)?));
                    }
                }
                out.push(StoredMember { member: m, memberships, timers, customers });
            }
            Ok(out)
        })
    }

    fn members_by_email(&self, email: &str) -> Result<Vec<MemberRow>> {
        self.read(|c| {
            let sql = format!("SELECT {MEMBER_COLS} FROM members WHERE email_lc = $1 ORDER BY created_at, id");
            rows(c.query(&sql, &[&email.to_lowercase()])?, member_row)
        })
    }

    fn events(&self, status: Option<&str>, tenant: Option<&str>, limit: usize) -> Result<Vec<EventRow>> {
        self.read(|c| newest_events(c, status, tenant, None, limit, true))
    }

    fn event_list(
        &self,
        status: Option<&str>,
        tenant: Option<&str>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<EventRow>> {
        self.read(|c| newest_events(c, status, tenant, before, limit, false))
    }

    fn events_by_event_id(&self, event_id: &str) -> Result<Vec<EventRow>> {
        self.read(|c| {
            let sql = format!("SELECT {EVENT_COLS} FROM events WHERE event_id = $1 ORDER BY seq");
            rows(c.query(&sql, &[&event_id])?, event_row)
        })
    }

    fn events_where(&self, f: &EventFilter) -> Result<Vec<EventRow>> {
        let set = [
            ("status = $?", f.status.clone().and_then(boxed)),
            ("received_at >= $?", f.since.map(ts).and_then(boxed)),
            ("member_id = $?", f.member_id.clone().and_then(boxed)),
            ("seq = $?", f.seq.and_then(boxed)),
            ("seq > $?", f.after_seq.and_then(boxed)),
            ("park_key = $?", f.park_key.clone().and_then(boxed)),
        ];
        let mut conds: Vec<_> = set.into_iter().filter_map(|(test, v)| Some((test, Some(v?)))).collect();
        if f.deliveries_only {
            conds.push(("source = 'webhook'", None));
        }
        let (sql, values) = events_sql(EVENT_COLS, conds, "ASC", f.limit);
        self.read(|c| rows(c.query(&sql, &refs(&values))?, event_row))
    }

    fn leads(&self, tenant: Option<&str>) -> Result<Vec<LeadRow>> {
        self.read(|c| {
            rows(
                c.query(
                    "SELECT tenant, email, name, provider, event_id, captured_at, converted_at, member_id FROM leads
                     WHERE ($1::text IS NULL OR tenant = $1) ORDER BY captured_at DESC, email_lc",
                    &[&tenant],
                )?,
                lead_row,
            )
        })
    }

    fn console_session_ended(&self, nonce: &str) -> Result<bool> {
        self.read(|c| Ok(c.query_opt("SELECT 1 FROM console_logouts WHERE nonce = $1", &[&nonce])?.is_some()))
    }

    fn search_members(
        &self,
        tenant: Option<&str>,
        q: Option<&str>,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MemberRow>> {
        let q = q.map(str::trim).filter(|q| !q.is_empty());
        let pattern = q.map(|q| {
            let escaped = q.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            format!("%{escaped}%")
        });
        self.read(|c| {
            let sql = format!(
                "SELECT {MEMBER_COLS} FROM members m
                 WHERE ($1::text IS NULL OR m.tenant = $1)
                   AND ($3::text IS NULL OR m.id < $3)
                   AND ($2::text IS NULL
                        OR m.id = $2
                        OR m.email_lc LIKE $4 ESCAPE '\\'
                        OR lower(m.name) LIKE $4 ESCAPE '\\'
                        OR m.id IN (SELECT member_id FROM member_customers WHERE customer_id = $2)
                        OR m.id IN (SELECT member_id FROM memberships WHERE subscription_id = $2))
                 ORDER BY m.id DESC LIMIT $5",
                MEMBER_COLS = qualified("m", MEMBER_COLS)
            );
            rows(c.query(&sql, &[&tenant, &q, &before, &pattern, &(limit as i64)])?, member_row)
        })
    }

    fn products_seen(&self, tenant: Option<&str>, recent_events: usize) -> Result<Vec<ProductSeen>> {
        self.read(|c| {
            let mut found: std::collections::BTreeMap<(String, String, String, String), ProductSeen> =
                Default::default();
            let by_memberships = c.query(
                "SELECT tenant, provider, kind, id, COUNT(*)::BIGINT, SUM(holds::int)::BIGINT FROM (
                     SELECT tenant, provider, 'product' AS kind, product_id AS id,
                            state IN ('trialing', 'active', 'past_due', 'canceling') AS holds
                     FROM memberships WHERE product_id IS NOT NULL AND ($1::text IS NULL OR tenant = $1)
                       AND provider != 'manual'
                     UNION ALL
                     SELECT tenant, provider, 'plan', plan_id,
                            state IN ('trialing', 'active', 'past_due', 'canceling')
                     FROM memberships WHERE plan_id IS NOT NULL AND ($1::text IS NULL OR tenant = $1)
                       AND provider != 'manual') x
                 GROUP BY tenant, provider, kind, id",
                &[&tenant],
            )?;
            for r in by_memberships {
                let p = ProductSeen {
                    tenant: r.try_get(0)?,
                    provider: r.try_get(1)?,
                    kind: r.try_get(2)?,
                    id: r.try_get(3)?,
                    memberships: r.try_get(4)?,
                    holding_access: r.try_get(5)?,
                    events: 0,
                };
                found.insert((p.tenant.clone(), p.provider.clone(), p.kind.clone(), p.id.clone()), p);
            }
            // A product or plan id as the canonical event holds it: text as is, a number as
            // its digits (SQLite's json_extract gives the same).
            let by_events = c.query(
                "WITH recent AS (SELECT tenant, provider, canonical::jsonb AS c FROM events
                                 WHERE ($1::text IS NULL OR tenant = $1) ORDER BY seq DESC LIMIT $2)
                 SELECT tenant, provider, kind, id, COUNT(*)::BIGINT FROM (
                     SELECT tenant, provider, 'product' AS kind, c ->> 'product_id' AS id FROM recent WHERE c IS NOT NULL
                     UNION ALL
                     SELECT tenant, provider, 'plan', c ->> 'plan_id' FROM recent WHERE c IS NOT NULL) x
                 WHERE id IS NOT NULL AND provider != 'manual' GROUP BY tenant, provider, kind, id",
                &[&tenant, &(recent_events as i64)],
            )?;
            for r in by_events {
                let (tenant, provider, kind, id): (String, String, String, String) =
                    (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
                let n: i64 = r.try_get(4)?;
                found
                    .entry((tenant.clone(), provider.clone(), kind.clone(), id.clone()))
                    .or_insert(ProductSeen { tenant, provider, kind, id, memberships: 0, holding_access: 0, events: 0 })
                    .events = n;
            }
            Ok(found.into_values().collect())
        })
    }

    fn due_timers(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TimerRow>> {
        self.read(|c| rows(c.query(DUE_TIMERS, &[&ts(now), &(limit as i64)])?, timer_row))
    }

    fn next_timer(&self) -> Result<Option<DateTime<Utc>>> {
        self.read(|c| Ok(opt_from(c.query_one("SELECT MIN(due_at) FROM timers", &[])?.try_get(0)?)))
    }

    fn reconcile_queue(
        &self,
        targets: &[(String, String)],
        attempted_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<MembershipRow>> {
        if targets.is_empty() {
            return Ok(vec![]);
        }
        let (tenants, providers): (Vec<String>, Vec<String>) = targets.iter().cloned().unzip();
        self.read(|c| {
            let sql = format!(
                "SELECT {} FROM memberships m LEFT JOIN membership_sync s ON s.membership_id = m.id
                 WHERE (m.tenant, m.provider) IN (SELECT * FROM unnest($3::text[], $4::text[]))
                   AND (s.attempted_at IS NULL OR s.attempted_at < $1)
                 ORDER BY COALESCE(s.attempted_at, -1), m.id LIMIT $2",
                qualified("m", MEMBERSHIP_COLS)
            );
            rows(c.query(&sql, &[&ts(attempted_before), &(limit as i64), &tenants, &providers])?, membership_row)
        })
    }

    fn customer_id(&self, tenant: &str, provider: &str, member_id: &str) -> Result<Option<String>> {
        self.read(|c| {
            Ok(match c.query_opt(CUSTOMER_OF_MEMBER, &[&tenant, &provider, &member_id])? {
                Some(r) => Some(r.try_get(0)?),
                None => None,
            })
        })
    }

    fn prunable(&self, before: DateTime<Utc>) -> Result<Pruned> {
        let sql = format!(
            "SELECT COUNT(*)::BIGINT, COALESCE(SUM(octet_length(raw) + octet_length(headers)), 0)::BIGINT FROM events
             WHERE {PRUNABLE} AND received_at < $1"
        );
        self.read(|c| {
            let row = c.query_one(&sql, &[&ts(before)])?;
            let (events, bytes): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            Ok(Pruned { events: events.max(0) as u64, bytes: bytes.max(0) as u64 })
        })
    }

    fn sync_status_counts(&self) -> Result<Vec<(String, i64)>> {
        self.read(|c| {
            c.query(
                "SELECT sync_status, COUNT(*)::BIGINT FROM memberships GROUP BY sync_status ORDER BY sync_status",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
        })
    }

    fn event_counts(&self) -> Result<Vec<(String, i64)>> {
        self.read(|c| {
            c.query("SELECT status, COUNT(*)::BIGINT FROM events GROUP BY status ORDER BY status", &[])?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
    }
}

/// Events newest first, filtered; without raw bodies and headers unless `whole`.
fn newest_events(
    c: &mut Client,
    status: Option<&str>,
    tenant: Option<&str>,
    before: Option<i64>,
    limit: usize,
    whole: bool,
) -> Result<Vec<EventRow>> {
    let mut conds = Vec::new();
    if let Some(status) = status {
        conds.push(("status = $?", boxed(status.to_string())));
    }
    if let Some(tenant) = tenant {
        conds.push(("tenant = $?", boxed(tenant.to_string())));
    }
    if let Some(before) = before {
        conds.push(("seq < $?", boxed(before)));
    }
    let cols = if whole { EVENT_COLS.to_string() } else { light_event_cols() };
    let (sql, values) = events_sql(&cols, conds, "DESC", Some(limit));
    rows(c.query(&sql, &refs(&values))?, event_row)
}
