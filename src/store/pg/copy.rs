//! `membersync migrate-store`: an SQLite database copied, row for row, into an empty
//! PostgreSQL database of the current schema. The SQLite side is read in one read
//! transaction (one consistent snapshot, whatever writes meanwhile); the PostgreSQL side is
//! written in one transaction, so a copy that fails leaves the target as it was. Event
//! sequence numbers are kept (every reference to an event by number stays right), and the
//! target's own numbering continues after the highest.

use super::*;
use postgres::types::ToSql;
use rusqlite::types::Value;

/// How a column is stored in PostgreSQL (SQLite stores each as it came).
#[derive(Clone, Copy)]
enum Kind {
    Text,
    /// Text holding JSON.
    Json,
    Int,
    Bool,
    Bytes,
}

use Kind::*;

/// Every table, parents before children, with its columns.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "members",
        &[
            ("id", Text),
            ("tenant", Text),
            ("email", Text),
            ("email_lc", Text),
            ("name", Text),
            ("flags", Json),
            ("created_at", Int),
            ("updated_at", Int),
            ("erased_at", Int),
        ],
    ),
    ("member_customers", &[("tenant", Text), ("provider", Text), ("customer_id", Text), ("member_id", Text)]),
    (
        "memberships",
        &[
            ("id", Text),
            ("tenant", Text),
            ("member_id", Text),
            ("provider", Text),
            ("key", Text),
            ("subscription_id", Text),
            ("product_id", Text),
            ("plan_id", Text),
            ("status", Text),
            ("state", Text),
            ("period_end", Int),
            ("grace_until", Int),
            ("access_until", Int),
            ("cancel_at_period_end", Bool),
            ("access_levels", Json),
            ("flags", Json),
            ("last_event_at", Int),
            ("last_event_id", Text),
            ("last_reconciled_at", Int),
            ("sync_status", Text),
            ("created_at", Int),
            ("updated_at", Int),
            ("last_event_rank", Int),
        ],
    ),
    (
        "events",
        &[
            ("seq", Int),
            ("tenant", Text),
            ("provider", Text),
            ("event_id", Text),
            ("idempotency_key", Text),
            ("event_type", Text),
            ("kind", Text),
            ("source", Text),
            ("received_at", Int),
            ("occurred_at", Int),
            ("member_id", Text),
            ("membership_id", Text),
            ("status", Text),
            ("reason", Text),
            ("raw", Bytes),
            ("headers", Json),
            ("canonical", Json),
            ("outcome", Json),
            ("deliveries", Int),
            ("park_key", Text),
            ("enrichment", Json),
            ("body_pruned_at", Int),
        ],
    ),
    (
        "leads",
        &[
            ("tenant", Text),
            ("email_lc", Text),
            ("email", Text),
            ("name", Text),
            ("provider", Text),
            ("event_id", Text),
            ("captured_at", Int),
            ("converted_at", Int),
            ("member_id", Text),
        ],
    ),
    ("timers", &[("membership_id", Text), ("name", Text), ("tenant", Text), ("due_at", Int), ("set_by_event", Text)]),
    (
        "membership_sync",
        &[
            ("membership_id", Text),
            ("attempted_at", Int),
            ("detail", Text),
            ("drift_at", Int),
            ("drift", Text),
            ("last_error", Text),
            ("last_error_at", Int),
        ],
    ),
    (
        "payments",
        &[
            ("tenant", Text),
            ("provider", Text),
            ("ref", Text),
            ("membership_id", Text),
            ("event_id", Text),
            ("counted_by", Text),
        ],
    ),
    ("console_logouts", &[("nonce", Text), ("until", Int)]),
    (
        "erasures",
        &[
            ("id", Int),
            ("tenant", Text),
            ("member_id", Text),
            ("erased_by", Text),
            ("erased_at", Int),
            ("detail", Text),
        ],
    ),
];

/// What was copied: rows per table, in copy order.
pub type Copied = Vec<(&'static str, u64)>;

fn bad(table: &str, column: &str, v: &Value) -> Error {
    Error::Corrupt(format!("{table}.{column} holds {v:?}, which the schema does not allow"))
}

/// JSON text with every escaped U+0000 (`\u0000`, not an escaped backslash before `u0000`)
/// written as U+FFFD, which PostgreSQL's `jsonb` takes.
fn json_without_nul(s: String) -> String {
    if !s.contains("\\u0000") {
        return s;
    }
    let mut out = String::with_capacity(s.len());
    let mut backslashes = 0;
    let mut rest = s.as_str();
    while let Some(c) = rest.chars().next() {
        if c == '\\' && backslashes % 2 == 0 && rest.starts_with("\\u0000") {
            out.push_str("\\ufffd");
            rest = &rest[6..];
            backslashes = 0;
            continue;
        }
        backslashes = if c == '\\' { backslashes + 1 } else { 0 };
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// One SQLite value as the PostgreSQL column takes it. U+0000, which SQLite's text holds
/// and PostgreSQL's does not (a delivery stored before `intake` replaced it), becomes
/// U+FFFD, as `intake` now makes it.
fn convert(table: &str, column: &str, kind: Kind, v: Value) -> Result<Box<dyn ToSql + Sync>> {
    Ok(match (kind, v) {
        (Text | Json, Value::Null) => Box::new(None::<String>),
        (Text, Value::Text(s)) if s.contains('\0') => Box::new(Some(s.replace('\0', "\u{FFFD}"))),
        (Text, Value::Text(s)) => Box::new(Some(s)),
        (Json, Value::Text(s)) => Box::new(Some(json_without_nul(s))),
        (Int, Value::Null) => Box::new(None::<i64>),
        (Int, Value::Integer(i)) => Box::new(Some(i)),
        (Bool, Value::Integer(i)) => Box::new(i != 0),
        (Bytes, Value::Blob(b)) => Box::new(b),
        (Bytes, Value::Text(s)) => Box::new(s.into_bytes()),
        (_, v) => return Err(bad(table, column, &v)),
    })
}

/// Copies the SQLite database at `from` into the PostgreSQL database at `to` (migrated
/// first), which must hold no member and no event. Nothing is written to `from`.
pub fn copy_sqlite_to_pg(from: &str, to: &str) -> Result<Copied> {
    let path = from.strip_prefix("sqlite://").unwrap_or(from);
    if !std::path::Path::new(path).exists() {
        return Err(Error::File { path: path.to_string(), message: "no such database".into() });
    }
    // Migrated to the current schema first (as `serve` would), then read in one snapshot.
    drop(crate::store::sqlite::SqliteStore::open(path, Default::default())?);
    let src = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.execute_batch("BEGIN")?;
    off_runtime(move || {
        let mut dst = connect(to)?;
        migrate(&mut dst)?;
        let mut tx = dst.transaction()?;
        let held: i64 =
            tx.query_one("SELECT (SELECT COUNT(*) FROM members) + (SELECT COUNT(*) FROM events)", &[])?.get(0);
        if held > 0 {
            return Err(Error::Db {
                code: None,
                message: format!(
                    "the PostgreSQL database {} already holds members or events; migrate-store copies only into an empty one",
                    redacted(to)
                ),
            });
        }
        let mut copied = Vec::new();
        for (table, cols) in TABLES {
            let names = cols.iter().map(|(c, _)| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
            let marks = (1..=cols.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
            let insert = tx.prepare(&format!("INSERT INTO {table} ({names}) VALUES ({marks})"))?;
            let mut read = src.prepare(&format!("SELECT {names} FROM {table}"))?;
            let mut rows = read.query([])?;
            let mut n = 0u64;
            while let Some(row) = rows.next()? {
                let mut values = Vec::with_capacity(cols.len());
                for (i, (column, kind)) in cols.iter().enumerate() {
                    values.push(convert(table, column, *kind, row.get::<_, Value>(i)?)?);
                }
                let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| &**v).collect();
                tx.execute(&insert, &refs)?;
                n += 1;
            }
            copied.push((*table, n));
        }
        // New events (and erasures) are numbered after the copied ones.
        for table in ["events", "erasures"] {
            let key = if table == "events" { "seq" } else { "id" };
            tx.execute(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', '{key}'), GREATEST((SELECT MAX({key}) FROM {table}), 0) + 1, false)"
                ),
                &[],
            )?;
        }
        tx.commit()?;
        Ok(copied)
    })
}
