//! `Store` on SQLite: the reads the admin API, reports and replay make, on the read
//! connections. It must never write.

use super::*;

/// A member's first customer id at a provider (replay's comparison, resync).
pub(super) const CUSTOMER_OF_MEMBER: &str =
    "SELECT customer_id FROM member_customers WHERE tenant = ?1 AND provider = ?2 AND member_id = ?3
     ORDER BY customer_id LIMIT 1";

/// The reconciliation detail of one membership, with its last webhook time.
pub(super) fn sync_row(c: &Connection, membership_id: &str) -> Result<SyncRow> {
    let last_webhook_at: Option<i64> = c
        .prepare_cached("SELECT MAX(received_at) FROM events WHERE membership_id = ?1 AND source = 'webhook'")?
        .query_row([membership_id], |r| r.get(0))?;
    let row = c
        .prepare_cached(
            "SELECT attempted_at, detail, drift_at, drift, last_error, last_error_at FROM membership_sync
             WHERE membership_id = ?1",
        )?
        .query_row([membership_id], |r| {
            Ok(SyncRow {
                membership_id: membership_id.to_string(),
                attempted_at: opt_from(r.get(0)?),
                detail: r.get(1)?,
                drift_at: opt_from(r.get(2)?),
                drift: r.get(3)?,
                last_error: r.get(4)?,
                last_error_at: opt_from(r.get(5)?),
                last_webhook_at: None,
            })
        })
        .optional()?;
    let mut row = row.unwrap_or_else(|| SyncRow { membership_id: membership_id.to_string(), ..Default::default() });
    row.last_webhook_at = opt_from(last_webhook_at);
    Ok(row)
}

impl Store for SqliteStore {
    fn scratch(&self, f: ScratchJob<'_>) -> Result<()> {
        scratch(f)
    }

    fn submit(&self, work: Work) -> Result<()> {
        self.health.check()?;
        self.sender.try_send(Msg::Job(work)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Busy,
            mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })
    }

    fn health(&self) -> Result<()> {
        self.health.check()
    }

    fn member_detail(&self, id: &str, recent: usize) -> Result<Option<MemberDetail>> {
        self.read(|c| {
            let mut tx = SqliteTx::reader(c);
            let Some(member) = tx.member(id)? else { return Ok(None) };
            let memberships = tx.memberships_of(id)?;
            // The activity log shows neither raw bodies nor headers: they stay on disk.
            let cols = EVENT_COLS.replacen(", raw, headers,", ", x'', '[]',", 1);
            let sql = format!("SELECT {cols} FROM events WHERE member_id = ?1 ORDER BY seq DESC LIMIT ?2");
            let recent_events = c
                .prepare_cached(&sql)?
                .query_map(params![id, recent as i64], event_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut timers = Vec::new();
            for m in &memberships {
                let mut st = c.prepare_cached(super::tx::TIMERS_OF)?;
                timers.extend(st.query_map([&m.id], timer_row)?.collect::<rusqlite::Result<Vec<_>>>()?);
            }
            let mut sync = Vec::new();
            for m in &memberships {
                sync.push(sync_row(c, &m.id)?);
            }
            let erasures = c
                .prepare_cached(
                    "SELECT tenant, member_id, erased_by, erased_at, detail FROM erasures WHERE member_id = ?1 ORDER BY id",
                )?
                .query_map([id], |r| {
                    Ok(ErasureRow {
                        tenant: r.get(0)?,
                        member_id: r.get(1)?,
                        erased_by: r.get(2)?,
                        erased_at: from_ts(r.get(3)?),
                        detail: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(MemberDetail { member, memberships, recent_events, timers, sync, erasures }))
        })
    }

    fn member(&self, id: &str) -> Result<Option<MemberRow>> {
        self.read(|c| Tx::member(&mut SqliteTx::reader(c), id))
    }

    fn members_with_memberships(&self, ids: &[String]) -> Result<Vec<StoredMember>> {
        // The statements prepared once for the whole list: the cached ones would be
        // re-planned on every run (see `Prepared`), once per member.
        self.read(|c| {
            let (mut member, mut of) = (c.prepare(&MEMBER_BY_ID)?, c.prepare(&MEMBERSHIPS_OF)?);
            let (mut timers_of, mut customer) = (c.prepare(super::tx::TIMERS_OF)?, c.prepare(CUSTOMER_OF_MEMBER)?);
            let mut out = Vec::new();
            for id in ids {
                let Some(m) = member.query_row([id], member_row).optional()? else { continue };
                let memberships = of.query_map([id], membership_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
                let mut timers = Vec::new();
                for ms in &memberships {
                    timers.extend(timers_of.query_map([&ms.id], timer_row)?.collect::<rusqlite::Result<Vec<_>>>()?);
                }
                let providers: std::collections::BTreeSet<&str> =
                    memberships.iter().map(|ms| ms.provider.as_str()).collect();
                let mut customers = Vec::new();
                for p in providers {
                    let found: Option<String> =
                        customer.query_row(params![m.tenant, p, m.id], |r| r.get(0)).optional()?;
                    customers.extend(found.map(|cid| (p.to_string(), cid)));
                }
                out.push(StoredMember { member: m, memberships, timers, customers });
            }
            Ok(out)
        })
    }

    fn members_by_email(&self, email: &str) -> Result<Vec<MemberRow>> {
        self.read(|c| {
            let sql = format!("SELECT {MEMBER_COLS} FROM members WHERE email_lc = ?1 ORDER BY created_at");
            let rows = c
                .prepare_cached(&sql)?
                .query_map([email.to_lowercase()], member_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn events(&self, status: Option<&str>, tenant: Option<&str>, limit: usize) -> Result<Vec<EventRow>> {
        self.read(|c| Ok(newest_events(c, status, tenant, None, limit, true)?))
    }

    fn event_list(
        &self,
        status: Option<&str>,
        tenant: Option<&str>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<EventRow>> {
        // The raw body and headers stay on disk: a list shows neither.
        self.read(|c| Ok(newest_events(c, status, tenant, before, limit, false)?))
    }

    fn events_by_event_id(&self, event_id: &str) -> Result<Vec<EventRow>> {
        self.read(|c| {
            let sql = format!("SELECT {EVENT_COLS} FROM events WHERE event_id = ?1 ORDER BY seq");
            let rows =
                c.prepare_cached(&sql)?.query_map([event_id], event_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn events_where(&self, f: &EventFilter) -> Result<Vec<EventRow>> {
        self.read(|c| {
            let (sql, values) = events_where_sql(f);
            let rows = c
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(values), event_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn leads(&self, tenant: Option<&str>) -> Result<Vec<LeadRow>> {
        self.read(|c| {
            let rows = c
                .prepare_cached(
                    "SELECT tenant, email, name, provider, event_id, captured_at, converted_at, member_id FROM leads
                     WHERE (?1 IS NULL OR tenant = ?1) ORDER BY captured_at DESC",
                )?
                .query_map([tenant], lead_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn console_session_ended(&self, nonce: &str) -> Result<bool> {
        self.read(|c| {
            let n: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM console_logouts WHERE nonce = ?1")?
                .query_row([nonce], |r| r.get(0))?;
            Ok(n > 0)
        })
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
                 WHERE (?1 IS NULL OR m.tenant = ?1)
                   AND (?3 IS NULL OR m.id < ?3)
                   AND (?2 IS NULL
                        OR m.id = ?2
                        OR m.email_lc LIKE ?4 ESCAPE '\\'
                        OR ms_lower(m.name) LIKE ?4 ESCAPE '\\'
                        OR m.id IN (SELECT member_id FROM member_customers WHERE customer_id = ?2)
                        OR m.id IN (SELECT member_id FROM memberships WHERE subscription_id = ?2))
                 ORDER BY m.id DESC LIMIT ?5"
            );
            let rows = c
                .prepare_cached(&sql)?
                .query_map(params![tenant, q, before, pattern, limit as i64], member_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn products_seen(&self, tenant: Option<&str>, recent_events: usize) -> Result<Vec<ProductSeen>> {
        self.read(|c| {
            let mut found: std::collections::BTreeMap<(String, String, String, String), ProductSeen> =
                Default::default();
            let mut by_memberships = c.prepare_cached(
                "SELECT tenant, provider, kind, id, COUNT(*), SUM(holds) FROM (
                     SELECT tenant, provider, 'product' AS kind, product_id AS id,
                            state IN ('trialing', 'active', 'past_due', 'canceling') AS holds
                     FROM memberships WHERE product_id IS NOT NULL AND (?1 IS NULL OR tenant = ?1)
                       AND provider != 'manual'
                     UNION ALL
                     SELECT tenant, provider, 'plan', plan_id,
                            state IN ('trialing', 'active', 'past_due', 'canceling')
                     FROM memberships WHERE plan_id IS NOT NULL AND (?1 IS NULL OR tenant = ?1)
                       AND provider != 'manual')
                 GROUP BY tenant, provider, kind, id",
            )?;
            let rows = by_memberships.query_map([tenant], |r| {
                Ok(ProductSeen {
                    tenant: r.get(0)?,
                    provider: r.get(1)?,
                    kind: r.get(2)?,
                    id: r.get(3)?,
                    memberships: r.get(4)?,
                    holding_access: r.get(5)?,
                    events: 0,
                })
            })?;
            for p in rows {
                let p = p?;
                found.insert((p.tenant.clone(), p.provider.clone(), p.kind.clone(), p.id.clone()), p);
            }
            let mut by_events = c.prepare_cached(
                "SELECT tenant, provider, kind, id, COUNT(*) FROM (
                     SELECT tenant, provider, 'product' AS kind, json_extract(canonical, '$.product_id') AS id
                     FROM (SELECT tenant, provider, canonical FROM events WHERE (?1 IS NULL OR tenant = ?1)
                           ORDER BY seq DESC LIMIT ?2)
                     WHERE canonical IS NOT NULL
                     UNION ALL
                     SELECT tenant, provider, 'plan', json_extract(canonical, '$.plan_id')
                     FROM (SELECT tenant, provider, canonical FROM events WHERE (?1 IS NULL OR tenant = ?1)
                           ORDER BY seq DESC LIMIT ?2)
                     WHERE canonical IS NOT NULL)
                 WHERE id IS NOT NULL AND provider != 'manual' GROUP BY tenant, provider, kind, id",
            )?;
            let rows = by_events.query_map(params![tenant, recent_events as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            for row in rows {
                let (tenant, provider, kind, id, n) = row?;
                found
                    .entry((tenant.clone(), provider.clone(), kind.clone(), id.clone()))
                    .or_insert(ProductSeen { tenant, provider, kind, id, memberships: 0, holding_access: 0, events: 0 })
                    .events = n;
            }
            Ok(found.into_values().collect())
        })
    }

    fn due_timers(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<TimerRow>> {
        self.read(|c| {
            let rows = c
                .prepare_cached(super::tx::DUE_TIMERS)?
                .query_map(params![ts(now), limit as i64], timer_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn next_timer(&self) -> Result<Option<DateTime<Utc>>> {
        self.read(|c| {
            let v: Option<i64> = c.prepare_cached("SELECT MIN(due_at) FROM timers")?.query_row([], |r| r.get(0))?;
            Ok(opt_from(v))
        })
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
        self.read(|c| {
            let cols = qualified("m", MEMBERSHIP_COLS);
            let which = (0..targets.len())
                .map(|i| format!("(m.tenant = ?{} AND m.provider = ?{})", 3 + 2 * i, 4 + 2 * i))
                .collect::<Vec<_>>()
                .join(" OR ");
            let sql = format!(
                "SELECT {cols} FROM memberships m LEFT JOIN membership_sync s ON s.membership_id = m.id
                 WHERE ({which}) AND (s.attempted_at IS NULL OR s.attempted_at < ?1)
                 ORDER BY COALESCE(s.attempted_at, -1), m.id LIMIT ?2"
            );
            let mut args: Vec<rusqlite::types::Value> = vec![ts(attempted_before).into(), (limit as i64).into()];
            for (t, p) in targets {
                args.push(t.clone().into());
                args.push(p.clone().into());
            }
            let rows = c
                .prepare(&sql)?
                .query_map(rusqlite::params_from_iter(args), membership_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn customer_id(&self, tenant: &str, provider: &str, member_id: &str) -> Result<Option<String>> {
        self.read(|c| {
            Ok(c.prepare_cached(CUSTOMER_OF_MEMBER)?
                .query_row(params![tenant, provider, member_id], |r| r.get(0))
                .optional()?)
        })
    }

    fn prunable(&self, before: DateTime<Utc>) -> Result<Pruned> {
        static COUNT: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT COUNT(*), COALESCE(SUM(length(raw) + length(headers)), 0) FROM events
                 WHERE {PRUNABLE} AND received_at < ?1"
            )
        });
        self.read(|c| {
            let (events, bytes): (i64, i64) =
                c.prepare_cached(&COUNT)?.query_row([ts(before)], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(Pruned { events: events.max(0) as u64, bytes: bytes.max(0) as u64 })
        })
    }

    fn sync_status_counts(&self) -> Result<Vec<(String, i64)>> {
        self.read(|c| {
            let rows = c
                .prepare_cached(
                    "SELECT sync_status, COUNT(*) FROM memberships GROUP BY sync_status ORDER BY sync_status",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn event_counts(&self) -> Result<Vec<(String, i64)>> {
        self.read(|c| {
            let rows = c
                .prepare_cached("SELECT status, COUNT(*) FROM events GROUP BY status ORDER BY status")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }
}

/// `SELECT … FROM events` under `conds` (each a test, with the value for its `?` if it has
/// one), in `seq` order (`ASC` or `DESC`), at most `limit` rows; and the values to bind.
/// Callers pass only the filters that are set: a statement is planned before its
/// parameters are bound, so a generic `(?1 IS NULL OR member_id = ?1)` would keep every
/// filter off its index (`explain` of one member read the whole events table). Each
/// distinct statement is kept by the connection's statement cache.
/// Events newest first, filtered; without raw bodies and headers unless `whole`.
fn newest_events(
    c: &rusqlite::Connection,
    status: Option<&str>,
    tenant: Option<&str>,
    before: Option<i64>,
    limit: usize,
    whole: bool,
) -> rusqlite::Result<Vec<EventRow>> {
    let mut conds = Vec::new();
    if let Some(status) = status {
        conds.push(("status = ?", Some(status.to_string().into())));
    }
    if let Some(tenant) = tenant {
        conds.push(("tenant = ?", Some(tenant.to_string().into())));
    }
    if let Some(before) = before {
        conds.push(("seq < ?", Some(before.into())));
    }
    let (mut sql, values) = events_sql(conds, "DESC", Some(limit));
    if !whole {
        sql = sql.replacen(", raw, headers,", ", x'', '[]',", 1);
    }
    let mut st = c.prepare_cached(&sql)?;
    let rows = st.query_map(rusqlite::params_from_iter(values), event_row)?.collect();
    rows
}

pub(super) fn events_sql(
    conds: Vec<(&'static str, Option<rusqlite::types::Value>)>,
    order: &str,
    limit: Option<usize>,
) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = format!("SELECT {EVENT_COLS} FROM events");
    let mut values = Vec::new();
    for (i, (test, value)) in conds.into_iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        sql.push_str(test);
        values.extend(value);
    }
    sql.push_str(" ORDER BY seq ");
    sql.push_str(order);
    if let Some(n) = limit {
        sql.push_str(" LIMIT ?");
        values.push(rusqlite::types::Value::Integer(n as i64));
    }
    (sql, values)
}

/// The statement for an [`EventFilter`]: [`events_sql`] with the filters it sets, oldest first.
pub(super) fn events_where_sql(f: &EventFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let set = [
        ("status = ?", f.status.clone().map(Value::Text)),
        ("received_at >= ?", f.since.map(|t| Value::Integer(ts(t)))),
        ("member_id = ?", f.member_id.clone().map(Value::Text)),
        ("seq = ?", f.seq.map(Value::Integer)),
        ("seq > ?", f.after_seq.map(Value::Integer)),
        ("park_key = ?", f.park_key.clone().map(Value::Text)),
    ];
    let mut conds: Vec<_> = set.into_iter().filter_map(|(test, v)| Some((test, Some(v?)))).collect();
    if f.deliveries_only {
        conds.push(("source = 'webhook'", None));
    }
    events_sql(conds, "ASC", f.limit)
}
