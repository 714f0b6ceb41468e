//! Admin API (bearer token): members with their memberships, access and activity log,
//! events with raw body and outcome, leads; resync of one member. Never shows a secret.

use crate::http_error::{ApiError, ApiPath as Path, ApiQuery as Query, ErrorBody};
use crate::pipeline::Ctx;
use crate::state::AppState;
use crate::store::read;
use crate::views::{activity_json, event_json, member_json, rfc};
use axum::extract::{FromRef, FromRequestParts, State};
use axum::http::request::Parts;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
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

    /// Who asked, as the activity log records it (never the token).
    pub fn who(&self) -> String {
        match &self.tenant {
            None => "the global admin token".into(),
            Some(t) => format!("tenant {t}'s admin token"),
        }
    }

    /// The tenant a tenant's token is for (`None` for the global token).
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
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
        let given = crate::http_error::bearer(&parts.headers);
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

/// `GET /members/{id}`.
#[utoipa::path(get, path = "/members/{id}", tag = "members", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Member id")),
    responses((status = 200, description = "The member: memberships with state, access, sync status; recent events", body = Object),
        (status = 400, description = "A path that cannot be read (not UTF-8)", body = ErrorBody),
        (status = 404, description = "No such member (or another tenant's)", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn member(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let d = read(&ctx.store, move |s| s.member_detail(&id, 50)).await?.ok_or(ApiError::NotFound)?;
    if !token.allows(&d.member.tenant) {
        return Err(ApiError::NotFound);
    }
    Ok(Json(member_json(&d, ctx.clock.now())))
}

/// `POST /members/{id}/resync`: compares every membership of the member with its
/// provider now, corrects drift through the rules, and answers the member JSON after,
/// with what each membership's comparison found under `resync`.
#[utoipa::path(post, path = "/members/{id}/resync", tag = "members", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Member id")),
    responses((status = 200, description = "The member after comparing with the providers, with `resync`", body = Object),
        (status = 400, description = "A path that cannot be read (not UTF-8)", body = ErrorBody),
        (status = 404, description = "No such member", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn resync(
    token: AdminToken,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ctx = &state.ctx;
    let who = id.clone();
    let found = read(&ctx.store, move |s| s.member_detail(&who, 0)).await?.ok_or(ApiError::NotFound)?;
    if !token.allows(&found.member.tenant) {
        return Err(ApiError::NotFound);
    }
    let reconciler = state.reconcile.reconciler();
    let summary = crate::reconcile::resync_member(ctx, &reconciler, &id).await?.ok_or(ApiError::NotFound)?;
    let d = read(&ctx.store, move |s| s.member_detail(&id, 50)).await?.ok_or(ApiError::NotFound)?;
    let mut out = member_json(&d, ctx.clock.now());
    out["resync"] = json!(summary.reports);
    Ok(Json(out))
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MembersQuery {
    /// Exactly this email (any case).
    pub email: Option<String>,
    /// Search: member id, provider customer id or subscription id exactly, or part of the
    /// email or name; at most 256 characters.
    #[param(max_length = 256)]
    pub q: Option<String>,
    /// The page after the one that answered `next` with this cursor.
    pub before: Option<String>,
    /// At most this many (at least 1, at most 200: clamped).
    #[param(minimum = 0)]
    pub limit: Option<i64>,
}

/// A page's `limit`: 50 unless given, clamped to `1..=most`; a negative one is an error.
fn page_limit(limit: Option<i64>, most: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(50.min(most)),
        Some(n) if n < 0 => Err(ApiError::Invalid(format!("`limit` is {n}; it is at least 0"))),
        Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX).clamp(1, most)),
    }
}

/// The most `GET /members` lists at once.
pub const MAX_MEMBERS_PAGE: usize = 200;

/// A page of members: newest first, searched by `q` if given; `next` is the cursor of the
/// following page, when there is one.
/// The longest search text (`q`).
pub const MAX_SEARCH_CHARS: usize = 256;

/// A search text no longer than any name or id; past that, SQLite's LIKE gives up ("pattern
/// too complex").
fn search_text(q: &MembersQuery) -> Result<(), ApiError> {
    match &q.q {
        Some(text) if text.chars().count() > MAX_SEARCH_CHARS => {
            Err(ApiError::Invalid(format!("`q` is at most {MAX_SEARCH_CHARS} characters")))
        }
        _ => Ok(()),
    }
}

pub async fn member_page(
    ctx: &Arc<Ctx>,
    tenant: Option<String>,
    q: &MembersQuery,
) -> Result<(Vec<crate::store::MemberDetail>, Option<String>), ApiError> {
    let limit = page_limit(q.limit, MAX_MEMBERS_PAGE)?;
    search_text(q)?;
    let (search, before) = (q.q.clone(), q.before.clone());
    let mut rows = read(&ctx.store, move |s| {
        let rows = s.search_members(tenant.as_deref(), search.as_deref(), before.as_deref(), limit + 1)?;
        let mut out = Vec::with_capacity(rows.len());
        for m in rows {
            if let Some(d) = s.member_detail(&m.id, 20)? {
                out.push(d);
            }
        }
        Ok(out)
    })
    .await?;
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|d| d.member.id.clone())
    } else {
        None
    };
    Ok((rows, next))
}

/// `GET /members?email=E` (that email exactly), or `GET /members?q=&before=&limit=` (a
/// search, or every member without `q`; newest first, paged).
#[utoipa::path(get, path = "/members", tag = "members", security(("admin_token" = [])), params(MembersQuery),
    responses((status = 200, description = "`{members: [...], next}`", body = Object),
        (status = 400, description = "A parameter that cannot be read", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn members(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<MembersQuery>,
) -> Result<Json<Value>, ApiError> {
    let now = ctx.clock.now();
    page_limit(q.limit, MAX_MEMBERS_PAGE)?;
    search_text(&q)?;
    if let Some(email) = q.email.clone() {
        let details = read(&ctx.store, move |store| {
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
        return Ok(Json(json!({ "members": details.iter().map(|d| member_json(d, now)).collect::<Vec<_>>() })));
    }
    let (page, next) = member_page(&ctx, token.tenant.clone(), &q).await?;
    Ok(Json(json!({ "members": page.iter().map(|d| member_json(d, now)).collect::<Vec<_>>(), "next": next })))
}

/// `POST /members/{id}/grants` with `{levels, until?, reason}`: access granted by hand, as an
/// event with source `manual` through the rules (see `manual`). 201 with the grant id, the
/// event's outcome and the member after; 422 with the same when the rules did not apply it.
#[utoipa::path(post, path = "/members/{id}/grants", tag = "members", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Member id")),
    request_body = crate::manual::GrantRequest,
    responses((status = 201, description = "Granted: `{grant_id, event_id, status, reason, member}`", body = Object),
        (status = 400, description = "A level, reason or date the grant cannot take", body = ErrorBody),
        (status = 413, description = "A body over 2 MB", body = ErrorBody),
        (status = 404, description = "No such member", body = ErrorBody),
        (status = 422, description = "Stored, but the rules did not apply it: `error` says why, with the grant, event and member", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn grant(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let req: crate::manual::GrantRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::Invalid(format!("expected {{\"levels\": [...], \"until\"?: RFC 3339, \"reason\": \"...\"}}: {e}"))
    })?;
    let tenant = tenant_of_member(&ctx, &token, &id).await?;
    let (grant_id, ack) = crate::manual::grant(&ctx, &tenant, &id, req, &token.who()).await.map_err(manual_error)?;
    let member = member_after(&ctx, &id).await?;
    // Created only when the rules applied it; otherwise the event is stored (failed,
    // refused, ignored) and explained, and no grant holds.
    let status = if ack.status == crate::pipeline::Status::Applied {
        axum::http::StatusCode::CREATED
    } else {
        axum::http::StatusCode::UNPROCESSABLE_ENTITY
    };
    let mut body = json!({
        "grant_id": grant_id, "event_id": ack.event_id, "status": ack.status, "reason": ack.outcome.reason,
        "member": member,
    });
    if status != axum::http::StatusCode::CREATED {
        body["error"] = json!(format!(
            "the grant was not applied ({}): {}",
            ack.status.as_str(),
            ack.outcome.reason.clone().unwrap_or_default()
        ));
    }
    Ok((status, Json(body)))
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevokeQuery {
    pub reason: Option<String>,
}

/// `DELETE /members/{id}/grants/{grant}[?reason=…]`: ends a manual grant now, as an event with
/// source `manual`. Revoking it again answers the first revocation.
#[utoipa::path(delete, path = "/members/{id}/grants/{grant}", tag = "members", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Member id"), ("grant" = String, Path, description = "Grant id"), RevokeQuery),
    responses((status = 200, description = "Revoked (or, again, the first revocation): `{grant_id, event_id, status, reason, member}`", body = Object),
        (status = 400, description = "A reason the revocation cannot take", body = ErrorBody),
        (status = 404, description = "No such member or grant of theirs", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn revoke(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Path((id, grant)): Path<(String, String)>,
    Query(q): Query<RevokeQuery>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_member(&ctx, &token, &id).await?;
    let reason = q.reason.unwrap_or_default();
    let ack = crate::manual::revoke(&ctx, &tenant, &id, &grant, &reason, &token.who()).await.map_err(manual_error)?;
    let member = member_after(&ctx, &id).await?;
    Ok(Json(json!({
        "grant_id": grant, "event_id": ack.event_id, "status": ack.status, "reason": ack.outcome.reason, "member": member,
    })))
}

/// `DELETE /members/{id}/personal-data`: erases the member's personal data (email, name,
/// and what stored raw bodies hold of them), keeping memberships, states and the audit
/// trail under the member id; the erasure is recorded with the token that asked.
#[utoipa::path(delete, path = "/members/{id}/personal-data", tag = "members", security(("admin_token" = [])),
    params(("id" = String, Path, description = "Member id")),
    responses((status = 200, description = "Erased: `{member_id, tenant, erased_by, erased_at, member_fields, events_examined, events_rewritten, leads_deleted}`", body = Object),
        (status = 400, description = "A path that cannot be read (not UTF-8)", body = ErrorBody),
        (status = 404, description = "No such member", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn erase_personal_data(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    tenant_of_member(&ctx, &token, &id).await?;
    let detail = crate::erase::erase_member(&ctx, &id, &token.who()).await?.ok_or(ApiError::NotFound)?;
    tracing::info!(member = %detail.member_id, by = %detail.erased_by, events = detail.events_rewritten, "Personal data erased.");
    Ok(Json(json!(detail)))
}

/// The tenant of member `id`, if the token may see them (else 404, as for no member).
async fn tenant_of_member(ctx: &Arc<Ctx>, token: &AdminToken, id: &str) -> Result<String, ApiError> {
    let who = id.to_string();
    let d = read(&ctx.store, move |s| s.member_detail(&who, 0)).await?.ok_or(ApiError::NotFound)?;
    if !token.allows(&d.member.tenant) {
        return Err(ApiError::NotFound);
    }
    Ok(d.member.tenant)
}

async fn member_after(ctx: &Arc<Ctx>, id: &str) -> Result<Value, ApiError> {
    let who = id.to_string();
    let d = read(&ctx.store, move |s| s.member_detail(&who, 50)).await?.ok_or(ApiError::NotFound)?;
    Ok(member_json(&d, ctx.clock.now()))
}

fn manual_error(e: crate::manual::Error) -> ApiError {
    match e {
        crate::manual::Error::Invalid(m) => ApiError::Invalid(m),
        crate::manual::Error::NotFound => ApiError::NotFound,
        crate::manual::Error::Store(e) => e.into(),
    }
}

/// `GET /products`: every product and plan id seen per provider (memberships, and the newest
/// 100,000 events), how many memberships name it, and the access levels it maps to (none:
/// unmapped, and flagged on its memberships).
#[utoipa::path(get, path = "/products", tag = "members", security(("admin_token" = [])),
    responses((status = 200, description = "`{products: [...]}`", body = Object), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn products(token: AdminToken, State(ctx): State<Arc<Ctx>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "products": products_json(&ctx, token.tenant.clone()).await? })))
}

/// How many of the newest events `GET /products` looks at for ids no membership names.
pub const PRODUCTS_RECENT_EVENTS: usize = 100_000;

/// The rows of `GET /products` (and the console's products page).
pub async fn products_json(ctx: &Arc<Ctx>, tenant: Option<String>) -> Result<Vec<Value>, ApiError> {
    let rows = read(&ctx.store, move |s| s.products_seen(tenant.as_deref(), PRODUCTS_RECENT_EVENTS)).await?;
    let config = ctx.config();
    Ok(rows
        .into_iter()
        .map(|p| {
            let levels = config.tenants.get(&p.tenant).and_then(|t| {
                let (product, plan) =
                    if p.kind == "plan" { (None, Some(p.id.as_str())) } else { (Some(p.id.as_str()), None) };
                t.access_levels(&p.provider, product, plan)
            });
            json!({
                "tenant": p.tenant, "provider": p.provider, "kind": p.kind, "id": p.id,
                "memberships": p.memberships, "holding_access": p.holding_access, "events": p.events,
                "mapped": levels.is_some(), "access_levels": levels,
            })
        })
        .collect())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    status: Option<String>,
    /// At most this many (at least 1, at most 500: clamped).
    #[param(minimum = 0)]
    limit: Option<i64>,
    /// The page after the one that answered `next` with this cursor.
    before: Option<i64>,
}

/// The most `GET /events` lists at once.
pub const MAX_EVENTS_PAGE: usize = 500;

/// `GET /events?status=S&limit=N&before=CURSOR`: newest first, without raw bodies (they
/// stay on `GET /events/{id}`); `next` is the cursor of the following page, when there is
/// one.
#[utoipa::path(get, path = "/events", tag = "events", security(("admin_token" = [])), params(EventsQuery),
    responses((status = 200, description = "`{events: [...], next}`, newest first, without raw bodies", body = Object),
        (status = 400, description = "A parameter that cannot be read", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn events(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit, MAX_EVENTS_PAGE)?;
    // A tenant's token: that tenant's newest events, however many others arrived since.
    let tenant = token.tenant.clone();
    let before = q.before;
    let rows =
        read(&ctx.store, move |s| s.event_list(q.status.as_deref(), tenant.as_deref(), before, limit + 1)).await?;
    let more = rows.len() > limit;
    let page = &rows[..rows.len().min(limit)];
    let next = if more { page.last().map(|e| e.seq) } else { None };
    Ok(Json(json!({
        "events": page.iter().map(|e| {
            let mut j = activity_json(e);
            j["seq"] = json!(e.seq);
            j
        }).collect::<Vec<_>>(),
        "next": next,
    })))
}

/// The full stored event: raw body, canonical event, outcome, rule and transition.
/// `GET /events/{event_id}`.
#[utoipa::path(get, path = "/events/{event_id}", tag = "events", security(("admin_token" = [])),
    params(("event_id" = String, Path, description = "The provider's event id")),
    responses((status = 200, description = "The stored event: raw body, canonical event, outcome, rule, transition", body = Object),
        (status = 400, description = "A path that cannot be read (not UTF-8)", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn event(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut rows = read(&ctx.store, move |s| s.events_by_event_id(&id)).await?;
    rows.retain(|e| token.allows(&e.tenant));
    match rows.len() {
        0 => Err(ApiError::NotFound),
        1 => Ok(Json(event_json(&rows[0]))),
        _ => Ok(Json(json!({ "events": rows.iter().map(event_json).collect::<Vec<_>>() }))),
    }
}

/// `GET /leads`.
#[utoipa::path(get, path = "/leads", tag = "members", security(("admin_token" = [])),
    responses((status = 200, description = "`{leads: [...]}`", body = Object), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn leads(token: AdminToken, State(ctx): State<Arc<Ctx>>) -> Result<Json<Value>, ApiError> {
    let tenant = token.tenant.clone();
    let rows = read(&ctx.store, move |s| s.leads(tenant.as_deref())).await?;
    Ok(Json(json!({ "leads": rows })))
}

/// `GET /metrics`: OpenMetrics text (see `metrics`).
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "OpenMetrics text (Prometheus)", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "A `metrics_token` is set and was not given", body = ErrorBody),
        (status = 503, description = "The store cannot be read", body = ErrorBody)))]
pub async fn metrics(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    // With a `metrics_token` configured, only it or the global admin token is answered; the
    // counts carry no tenant's name either way (DESIGN: `GET /metrics`, Prometheus text).
    let config = state.ctx.config();
    let given = crate::http_error::bearer(&headers);
    let matches =
        |s: &crate::secret::Secret| !given.is_empty() && bool::from(given.as_bytes().ct_eq(s.expose().as_bytes()));
    if config.metrics_token.is_some()
        && !(config.metrics_token.as_ref().is_some_and(matches) || config.admin_token.as_ref().is_some_and(matches))
    {
        return Err(ApiError::AdminUnauthorized);
    }
    let (events, sync) = read(&state.ctx.store, |s| Ok((s.event_counts()?, s.sync_status_counts()?))).await?;
    let text = state.metrics.render(&events, &sync, state.ctx.store.writer_stats());
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// `GET /admin/rules`: the rule set in force and the last reload attempt.
#[utoipa::path(get, path = "/admin/rules", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "The rule set in force and the last reload", body = Object),
        (status = 403, description = "A tenant's token", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn rules(token: AdminToken, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    token.require_global()?;
    let loaded = state.ctx.loaded();
    let status = state.reload_status();
    Ok(Json(json!({
        "version": loaded.rules.version,
        "version_covers": ["rules/*.rhai", "rules/providers/*.yaml", "tenants.*.policy", "tenants.*.providers.*.products"],
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
#[utoipa::path(post, path = "/admin/reload", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "`{ok, version}`", body = Object),
        (status = 403, description = "A tenant's token", body = ErrorBody),
        (status = 422, description = "Refused: every problem, and the version still in force", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RederiveQuery {
    /// Only this member's memberships (id or email).
    member: Option<String>,
    /// Show what would change; write nothing.
    #[serde(default)]
    dry_run: bool,
}

/// `POST /admin/rederive[?member=ID-or-EMAIL][&dry_run=true]`: sets each membership to what
/// its stored deliveries derive under the rules in force, recorded as events with source
/// `rederive` (global token; see `replay::rederive`).
#[utoipa::path(post, path = "/admin/rederive", tag = "admin", security(("admin_token" = [])), params(RederiveQuery),
    responses((status = 200, description = "`{version, dry_run, deliveries, compared, memberships}`", body = Object),
        (status = 400, description = "A parameter that cannot be read", body = ErrorBody),
        (status = 403, description = "A tenant's token", body = ErrorBody),
        (status = 404, description = "No such member", body = ErrorBody),
        (status = 409, description = "An email several members have", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn rederive(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<RederiveQuery>,
) -> Result<Json<Value>, ApiError> {
    token.require_global()?;
    let mut filter = crate::store::EventFilter::default();
    if let Some(who) = q.member {
        let found = match read(&ctx.store, move |s| crate::explain::find(s, &who)).await? {
            crate::explain::Found::Member(d) => d,
            crate::explain::Found::NotFound => return Err(ApiError::NotFound),
            several @ crate::explain::Found::Several(_) => {
                return Err(ApiError::Conflict(several.one("the email").err().unwrap_or_default()))
            }
        };
        filter.member_id = Some(found.member.id);
    }
    let r = crate::replay::rederive(&ctx, &filter, ctx.clock.now(), q.dry_run).await.map_err(|e| match e {
        crate::replay::Error::Store(e) => ApiError::from(e),
        other => ApiError::Internal(other.to_string()),
    })?;
    Ok(Json(json!(r)))
}

/// `POST /events/{event_id}/replay`: run a failed, refused or ignored event again under
/// the rules in force (409 for any other status).
#[utoipa::path(post, path = "/events/{event_id}/replay", tag = "events", security(("admin_token" = [])),
    params(("event_id" = String, Path, description = "The provider's event id")),
    responses((status = 200, description = "`{event_id, was, status, reason}`", body = Object),
        (status = 400, description = "A path that cannot be read (not UTF-8)", body = ErrorBody),
        (status = 404, description = "No such event", body = ErrorBody),
        (status = 409, description = "Not failed, refused or ignored (or replayed already), or its raw body was pruned", body = ErrorBody), (status = 401, description = "Admin token missing or wrong", body = ErrorBody), (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn replay_event(
    token: AdminToken,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut rows = read(&ctx.store, move |s| s.events_by_event_id(&id)).await?;
    rows.retain(|e| token.allows(&e.tenant));
    let Some(e) = rows.iter().rev().find(|e| e.status.is_replayable()).or(rows.last()) else {
        return Err(ApiError::NotFound);
    };
    match crate::replay::replay_one(&ctx, e).await {
        Ok(ack) => Ok(Json(json!({
            "event_id": ack.event_id, "was": e.status, "status": ack.status, "reason": ack.outcome.reason,
        }))),
        Err(err @ (crate::replay::Error::NotReplayable(..) | crate::replay::Error::Pruned(..))) => {
            Err(ApiError::Conflict(err.to_string()))
        }
        Err(crate::replay::Error::Store(err)) => Err(err.into()),
        Err(other) => Err(ApiError::Internal(other.to_string())),
    }
}
