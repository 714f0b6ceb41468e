//! Admin API (bearer token): members with their memberships, access and activity log,
//! events with raw body and outcome, leads; resync of one member. Never shows a secret.

use crate::http_error::ApiError;
use crate::pipeline::Ctx;
use crate::state::AppState;
use crate::store::{EventRow, MemberDetail, MembershipRow};
use axum::extract::{FromRef, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::Json;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Proof that the request carried an admin token, and what it may see: every tenant
/// (the global token) or one tenant (that tenant's token).
pub struct AdminToken {
    tenant: Option<String>,
}

impl AdminToken {
    /// Whether this token may see `tenant`'s data.
    pub fn allows(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }

    /// Global endpoints (rules, reload) need the global token.
    pub fn require_global(&self) -> Result<(), ApiError> {
        match self.tenant {
            None => Ok(()),
            Some(_) => Err(ApiError::Forbidden),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AdminToken
where
    Arc<Ctx>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let config = Arc::<Ctx>::from_ref(state).config();
        let given = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if given.is_empty() {
            return Err(ApiError::AdminUnauthorized);
        }
        let matches = |s: &crate::secret::Secret| bool::from(given.as_bytes().ct_eq(s.expose().as_bytes()));
        if config.admin_token.as_ref().is_some_and(matches) {
            return Ok(AdminToken { tenant: None });
        }
        for t in config.tenants.values() {
            if t.admin_token.as_ref().is_some_and(matches) {
                return Ok(AdminToken { tenant: Some(t.name.clone()) });
            }
        }
        Err(ApiError::AdminUnauthorized)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::store::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(e.to_string()))?.map_err(ApiError::from)
}

fn rfc(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))).unwrap_or(Value::Null)
}

/// One membership as the API shows it.
pub fn membership_json(m: &MembershipRow, now: DateTime<Utc>, timers: &[crate::store::TimerRow]) -> Value {
    let has_access = m.has_access(now);
    json!({
        "id": m.id,
        "provider": m.provider,
        "subscription_id": m.subscription_id,
        "product_id": m.product_id,
        "plan_id": m.plan_id,
        "provider_status": m.status,
        "state": m.state,
        "has_access": has_access,
        "access_levels": if has_access { m.access_levels.clone() } else { vec![] },
        "period_end": rfc(m.period_end),
        "grace_until": rfc(m.grace_until),
        "access_until": rfc(m.access_until),
        "cancel_at_period_end": m.cancel_at_period_end,
        "last_event_at": rfc(m.last_event_at),
        "last_event_id": m.last_event_id,
        "last_reconciled_at": rfc(m.last_reconciled_at),
        "sync_status": m.sync_status,
        "flags": m.flags,
        "timers": timers.iter().filter(|t| t.membership_id == m.id)
            .map(|t| json!({"name": t.name, "due_at": rfc(Some(t.due_at)), "set_by_event": t.set_by_event}))
            .collect::<Vec<_>>(),
    })
}

/// The reconciliation detail next to `sync_status`: what the last comparison found, the
/// last drift corrected (what and when), the last provider error (what and when), and the
/// last webhook and last attempt times.
fn add_sync_json(j: &mut Value, s: Option<&crate::store::SyncRow>) {
    let d = crate::store::SyncRow::default();
    let s = s.unwrap_or(&d);
    if let Value::Object(o) = j {
        o.insert("last_webhook_at".into(), rfc(s.last_webhook_at));
        o.insert("last_reconcile_attempt_at".into(), rfc(s.attempted_at));
        o.insert("sync_detail".into(), json!(s.detail));
        o.insert("last_drift".into(), json!({ "at": rfc(s.drift_at), "what": s.drift }));
        o.insert("last_error".into(), json!({ "at": rfc(s.last_error_at), "error": s.last_error }));
    }
}

/// One activity-log line: the event, its outcome, the rule and transition, its source.
pub fn activity_json(e: &EventRow) -> Value {
    activity_json_with(e, &crate::store::json_of(&e.outcome))
}

/// `activity_json` with the event's outcome already parsed (`o`).
pub fn activity_json_with(e: &EventRow, o: &Value) -> Value {
    json!({
        "event_id": e.event_id,
        "provider": e.provider,
        "event_type": e.event_type,
        "kind": e.kind,
        "source": e.source,
        "status": e.status,
        "reason": e.reason,
        "occurred_at": rfc(e.occurred_at),
        "received_at": rfc(Some(e.received_at)),
        "membership_id": e.membership_id,
        "from": o.get("from").cloned().unwrap_or(Value::Null),
        "to": o.get("to").cloned().unwrap_or(Value::Null),
        "input": o.get("input").cloned().unwrap_or(Value::Null),
        "rule": o.get("rule").cloned().unwrap_or(Value::Null),
        "effects": o.get("effects").cloned().unwrap_or(Value::Null),
    })
}

/// The member JSON of DESIGN.md.
pub fn member_json(d: &MemberDetail, now: DateTime<Utc>) -> Value {
    let levels: BTreeSet<String> =
        d.memberships.iter().filter(|m| m.has_access(now)).flat_map(|m| m.access_levels.iter().cloned()).collect();
    json!({
        "id": d.member.id,
        "tenant": d.member.tenant,
        "email": d.member.email,
        "name": d.member.name,
        "has_access": !levels.is_empty() || d.memberships.iter().any(|m| m.has_access(now)),
        "access_levels": levels,
        "flags": d.member.flags,
        "memberships": d.memberships.iter().map(|m| {
            let mut j = membership_json(m, now, &d.timers);
            add_sync_json(&mut j, d.sync.iter().find(|s| s.membership_id == m.id));
            j
        }).collect::<Vec<_>>(),
        "recent_events": d.recent_events.iter().map(activity_json).collect::<Vec<_>>(),
    })
}

/// `GET /members/{id}`.
pub async fn member(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = ctx.store.clone();
    let d = blocking(move || store.member_detail(&id, 50)).await?.ok_or(ApiError::NotFound)?;
    if !token.allows(&d.member.tenant) {
        return Err(ApiError::NotFound);
    }
    Ok(Json(member_json(&d, ctx.clock.now())))
}

/// `POST /members/{id}/resync`: compares every membership of the member with its
/// provider now, corrects drift through the rules, and answers the member JSON after,
/// with what each membership's comparison found under `resync`.
pub async fn resync(
    token: AdminToken,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ctx = &state.ctx;
    let store = ctx.store.clone();
    let who = id.clone();
    let found = blocking(move || store.member_detail(&who, 0)).await?.ok_or(ApiError::NotFound)?;
    if !token.allows(&found.member.tenant) {
        return Err(ApiError::NotFound);
    }
    let reconciler = state.reconcile.reconciler();
    let summary = crate::reconcile::resync_member(ctx, &reconciler, &id).await.ok_or(ApiError::NotFound)?;
    let store = ctx.store.clone();
    let d = blocking(move || store.member_detail(&id, 50)).await?.ok_or(ApiError::NotFound)?;
    let mut out = member_json(&d, ctx.clock.now());
    out["resync"] = json!(summary.reports);
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct EmailQuery {
    email: Option<String>,
}

/// `GET /members?email=E`.
pub async fn members(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<EmailQuery>,
) -> Result<Json<Value>, ApiError> {
    let email = q.email.ok_or_else(|| ApiError::BadRequest("`email` query parameter is required".into()))?;
    let store = ctx.store.clone();
    let details = blocking(move || {
        let mut out = Vec::new();
        for m in store.members_by_email(&email)? {
            if !token.allows(&m.tenant) {
                continue;
            }
            if let Some(d) = store.member_detail(&m.id, 20)? {
                out.push(d);
            }
        }
        Ok(out)
    })
    .await?;
    let now = ctx.clock.now();
    Ok(Json(json!({ "members": details.iter().map(|d| member_json(d, now)).collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    status: Option<String>,
    limit: Option<usize>,
}

/// `GET /events?status=S&limit=N`.
pub async fn events(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = ctx.store.clone();
    let limit = q.limit.unwrap_or(50).min(1000);
    // A tenant's token: that tenant's newest events, however many others arrived since.
    let tenant = token.tenant.clone();
    let rows = blocking(move || store.events(q.status.as_deref(), tenant.as_deref(), limit)).await?;
    Ok(Json(json!({ "events": rows.iter().map(activity_json).collect::<Vec<_>>() })))
}

/// The full stored event: raw body, canonical event, outcome, rule and transition.
pub fn event_json(e: &EventRow) -> Value {
    let raw = match std::str::from_utf8(&e.raw) {
        Ok(s) => json!({ "encoding": "utf-8", "body": s }),
        Err(_) => {
            json!({ "encoding": "base64", "body": base64::engine::general_purpose::STANDARD.encode(&e.raw) })
        }
    };
    json!({
        "seq": e.seq,
        "tenant": e.tenant,
        "provider": e.provider,
        "event_id": e.event_id,
        "idempotency_key": e.idempotency_key,
        "event_type": e.event_type,
        "kind": e.kind,
        "source": e.source,
        "status": e.status,
        "reason": e.reason,
        "received_at": rfc(Some(e.received_at)),
        "occurred_at": rfc(e.occurred_at),
        "member_id": e.member_id,
        "membership_id": e.membership_id,
        "raw": raw,
        "headers": e.headers,
        "canonical": e.canonical,
        "outcome": e.outcome,
        "deliveries": e.deliveries,
    })
}

/// `GET /events/{event_id}`.
pub async fn event(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = ctx.store.clone();
    let mut rows = blocking(move || store.events_by_event_id(&id)).await?;
    rows.retain(|e| token.allows(&e.tenant));
    match rows.len() {
        0 => Err(ApiError::NotFound),
        1 => Ok(Json(event_json(&rows[0]))),
        _ => Ok(Json(json!({ "events": rows.iter().map(event_json).collect::<Vec<_>>() }))),
    }
}

/// `GET /leads`.
pub async fn leads(token: AdminToken, State(ctx): State<Arc<Ctx>>) -> Result<Json<Value>, ApiError> {
    let store = ctx.store.clone();
    let tenant = token.tenant.clone();
    let rows = blocking(move || store.leads(tenant.as_deref())).await?;
    Ok(Json(json!({ "leads": rows })))
}

/// `GET /metrics`: OpenMetrics text (see `metrics`).
pub async fn metrics(State(state): State<AppState>) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let store = state.ctx.store.clone();
    let (events, sync) = blocking(move || Ok((store.event_counts()?, store.sync_status_counts()?))).await?;
    let text = state.metrics.render(&events, &sync);
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// `GET /admin/rules`: the rule set in force and the last reload attempt.
pub async fn rules(token: AdminToken, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    token.require_global()?;
    let loaded = state.ctx.loaded();
    let status = state.reload_status();
    Ok(Json(json!({
        "version": loaded.rules.version,
        "source_hash": loaded.rules.source_hash(),
        "loaded_at": rfc(Some(loaded.rules.loaded_at)),
        "files": loaded.rules.file_names(),
        "providers": loaded.config.extractors.keys().collect::<Vec<_>>(),
        "last_reload": {
            "at": rfc(status.last_attempt_at),
            "trigger": status.trigger,
            "ok": status.ok,
            "errors": status.errors.iter().map(|d| json!({
                "file": d.file, "line": d.line, "column": d.column, "message": d.message, "hint": d.hint,
                "text": d.to_string(),
            })).collect::<Vec<_>>(),
        },
    })))
}

/// `POST /admin/reload`: reload now; 200 with the new version, or 422 with every problem
/// (the previous rules stay in force).
pub async fn reload(token: AdminToken, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    token.require_global()?;
    match state.reload("admin") {
        Ok(version) => Ok(Json(json!({ "ok": true, "version": version }))),
        Err(errors) => Err(ApiError::ReloadRefused {
            version: state.ctx.rules().version.clone(),
            errors: errors.iter().map(|d| d.to_string()).collect(),
        }),
    }
}

/// `POST /events/{event_id}/replay`: run a failed, refused or ignored event again under
/// the rules in force (409 for any other status).
pub async fn replay_event(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = ctx.store.clone();
    let mut rows = blocking(move || store.events_by_event_id(&id)).await?;
    rows.retain(|e| token.allows(&e.tenant));
    let Some(e) = rows.iter().rev().find(|e| crate::replay::REPLAYABLE.contains(&e.status.as_str())).or(rows.last())
    else {
        return Err(ApiError::NotFound);
    };
    match crate::replay::replay_one(&ctx, e).await {
        Ok(ack) => Ok(Json(json!({
            "event_id": ack.event_id, "was": e.status, "status": ack.status, "reason": ack.outcome.reason,
        }))),
        Err(err @ crate::replay::Error::NotReplayable(..)) => Err(ApiError::Conflict(err.to_string())),
        Err(crate::replay::Error::Store(err)) => Err(err.into()),
        Err(other) => Err(ApiError::Internal(other.to_string())),
    }
}
