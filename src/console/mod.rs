//! The admin console under `/console`: server-rendered pages (minijinja, templates built
//! into the binary, no JavaScript, no outbound request) over the same functions the admin
//! API calls — members and their timelines, manual grants, resync, leads, failed events and
//! their replay (the dry-run diff first), products seen and whether they are mapped, the
//! rules in force. Every action is a plain form.
//!
//! Signing in trades the admin token (form field `token`) for a session cookie (see
//! `session`); a tenant's token sees only its tenant. Every POST checks that it comes from
//! the console's own origin (`Origin`, else `Referer`: a cross-site POST gets 403) and the
//! session.
//!
//! What this module must never do: show a token or a secret, change anything on a GET, or
//! act on a POST from another origin.

// Helpers short-circuit a handler with the page to answer (`Result<_, Response>`); boxing
// it would only add an allocation to the rare path.
#![allow(clippy::result_large_err)]

pub mod session;

use crate::admin::{member_page, MembersQuery};
use crate::state::AppState;
use crate::store::{read, EventFilter};
use crate::views::{activity_json, event_json, member_json, rfc};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use session::Session;
use std::sync::LazyLock;

/// The console's routes (state: the service's).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/members") }))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/static/console.css", get(css))
        .route("/console/members", get(members))
        .route("/console/members/{id}", get(member))
        .route("/console/members/{id}/resync", post(resync))
        .route("/console/members/{id}/grants", post(grant))
        .route("/console/members/{id}/grants/{grant}/revoke", post(revoke))
        .route("/console/members/{id}/erase", post(erase))
        .route("/console/leads", get(leads))
        .route("/console/events", get(events))
        .route("/console/events/{event_id}", get(event))
        .route("/console/events/{event_id}/replay", get(replay_preview).post(replay_one))
        .route("/console/replay", get(replay_all_preview).post(replay_all))
        .route("/console/products", get(products))
        .route("/console/rules", get(rules))
        .route("/console/rules/reload", post(reload))
}

static TEMPLATES: LazyLock<minijinja::Environment<'static>> = LazyLock::new(|| {
    let mut env = minijinja::Environment::new();
    for (name, src) in [
        ("base.html", include_str!("templates/base.html")),
        ("login.html", include_str!("templates/login.html")),
        ("members.html", include_str!("templates/members.html")),
        ("member.html", include_str!("templates/member.html")),
        ("leads.html", include_str!("templates/leads.html")),
        ("events.html", include_str!("templates/events.html")),
        ("event.html", include_str!("templates/event.html")),
        ("replay.html", include_str!("templates/replay.html")),
        ("products.html", include_str!("templates/products.html")),
        ("rules.html", include_str!("templates/rules.html")),
    ] {
        env.add_template(name, src).expect("console templates compile");
    }
    env
});

/// A page: the template rendered with `ctx`, with the console's headers.
fn page(status: StatusCode, template: &str, ctx: Value) -> Response {
    let html = TEMPLATES.get_template(template).and_then(|t| t.render(ctx));
    match html {
        Ok(html) => {
            let mut resp = (status, html).into_response();
            secure_headers(resp.headers_mut(), "text/html; charset=utf-8");
            resp
        }
        Err(e) => {
            tracing::error!(template, error = %e, "A console page did not render.");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered").into_response()
        }
    }
}

fn secure_headers(h: &mut HeaderMap, content_type: &'static str) {
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
}

async fn css() -> Response {
    let mut resp = include_str!("static/console.css").into_response();
    secure_headers(resp.headers_mut(), "text/css; charset=utf-8");
    resp
}

/// The signed-in operator; without a valid session a page redirects to the login.
pub struct Operator(Session);

impl FromRequestParts<AppState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let found = current_session(state, &parts.headers).await;
        match found {
            Some(s) => {
                if parts.method == axum::http::Method::POST {
                    same_origin(&parts.headers)?;
                }
                Ok(Operator(s))
            }
            None if parts.method == axum::http::Method::POST => Err(forbidden("sign in again: no valid session")),
            None => Err(Redirect::to("/console/login").into_response()),
        }
    }
}

/// The session the request's cookie stands for: signed, in time, and not logged out.
async fn current_session(state: &AppState, headers: &HeaderMap) -> Option<Session> {
    let s = session::check(&state.ctx.config(), &session::from_headers(headers)?, state.ctx.clock.now())?;
    let nonce = s.nonce().to_string();
    match read(&state.ctx.store, move |st| st.console_session_ended(&nonce)).await {
        Ok(false) => Some(s),
        // Logged out, or the store cannot say: no session.
        _ => None,
    }
}

fn forbidden(why: &str) -> Response {
    page(StatusCode::FORBIDDEN, "login.html", json!({ "error": why, "title": "Forbidden" }))
}

/// A POST must come from a page of this console: its `Origin` (or, without one, its
/// `Referer`) names the host it was sent to.
fn same_origin(headers: &HeaderMap) -> Result<(), Response> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let ours = |o: &str| !host.is_empty() && (o == format!("http://{host}") || o == format!("https://{host}"));
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let ok = match origin {
        Some(o) => ours(o),
        None => {
            headers.get(header::REFERER).and_then(|v| v.to_str().ok()).and_then(url_origin).is_some_and(|o| ours(&o))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(forbidden("this form was not sent from the console's own pages"))
    }
}

/// `scheme://host[:port]` of a URL.
fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    Some(format!("{scheme}://{host}"))
}

/// What every page shows: who is signed in, and the navigation.
fn base(op: &Operator, active: &str) -> Value {
    json!({ "scope": op.0.tenant.clone().map(|t| format!("tenant {t}")).unwrap_or_else(|| "every tenant".into()),
            "active": active, "global": op.0.tenant.is_none() })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Value::Object(a), Value::Object(b)) = (&mut a, b) {
        a.extend(b);
    }
    a
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "A console action failed.");
    (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
}

// ---- sign in and out ----

async fn login_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if current_session(&state, &headers).await.is_some() {
        return Redirect::to("/console/members").into_response();
    }
    page(StatusCode::OK, "login.html", json!({ "title": "Sign in" }))
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn login(State(state): State<AppState>, headers: HeaderMap, form: axum::extract::Form<LoginForm>) -> Response {
    if let Err(r) = same_origin(&headers) {
        return r;
    }
    let config = state.ctx.config();
    let now = state.ctx.clock.now();
    let Some(scope) = session::scope_of(&config, form.token.trim()) else {
        if let Some(held_back) = state.ctx.failure_log.first_in_interval("console sign-in") {
            tracing::warn!(held_back, "A console sign-in was refused: not an admin token.");
        }
        return page(
            StatusCode::UNAUTHORIZED,
            "login.html",
            json!({ "title": "Sign in", "error": "That is not an admin token." }),
        );
    };
    let Some(value) = session::issue(&config, scope, now) else { return internal("no key for the session's scope") };
    let secure = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) == Some("https");
    let cookie = format!(
        "{}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        session::COOKIE,
        session::LIFETIME.num_seconds(),
        if secure { "; Secure" } else { "" }
    );
    let mut resp = Redirect::to("/console/members").into_response();
    resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("a cookie is ASCII"));
    resp
}

async fn logout(State(state): State<AppState>, op: Operator) -> Response {
    let (nonce, until, now) = (op.0.nonce().to_string(), op.0.expires, state.ctx.clock.now());
    if let Err(e) = state.ctx.store.write(move |tx| tx.end_console_session(&nonce, until, now)).await {
        return internal(e);
    }
    let mut resp = Redirect::to("/console/login").into_response();
    let clear = format!("{}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0", session::COOKIE);
    resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&clear).expect("ASCII"));
    resp
}

// ---- members ----

async fn members(State(state): State<AppState>, op: Operator, Query(q): Query<MembersQuery>) -> Response {
    let (rows, next) = match member_page(&state.ctx, op.0.tenant.clone(), &q).await {
        Ok(p) => p,
        Err(e) => return internal(e),
    };
    let now = state.ctx.clock.now();
    let members: Vec<Value> = rows.iter().map(|d| member_json(d, now)).collect();
    page(
        StatusCode::OK,
        "members.html",
        merge(base(&op, "members"), json!({ "title": "Members", "q": q.q, "members": members, "next": next })),
    )
}

#[derive(Deserialize, Default)]
struct MemberQuery {
    /// An event to show the outcome of (after an action).
    event: Option<String>,
    /// What a resync just found, membership by membership (not from the URL: shown by the
    /// resync's own answer).
    #[serde(skip)]
    resync: Option<Vec<crate::reconcile::Report>>,
}

async fn member(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    Query(q): Query<MemberQuery>,
) -> Response {
    member_view(&state, &op, &id, q, None).await
}

async fn member_view(state: &AppState, op: &Operator, id: &str, q: MemberQuery, error: Option<String>) -> Response {
    let ctx = &state.ctx;
    let now = ctx.clock.now();
    let who = id.to_string();
    let found = read(&ctx.store, move |s| {
        let Some(d) = s.member_detail(&who, 50)? else { return Ok(None) };
        let story = crate::explain::explain_json(s, &d, now)?;
        Ok(Some((d, story)))
    })
    .await;
    let (d, story) = match found {
        Ok(Some(found)) if op.0.allows(&found.0.member.tenant) => found,
        Ok(_) => {
            return page(
                StatusCode::NOT_FOUND,
                "members.html",
                merge(
                    base(op, "members"),
                    json!({"title": "Members", "members": [], "error": format!("No member {id}.")}),
                ),
            )
        }
        Err(e) => return internal(e),
    };
    let mut history: Vec<Value> = story["history"].as_array().cloned().unwrap_or_default();
    history.reverse();
    let outcome = q.event.as_ref().and_then(|e| history.iter().find(|h| h["event_id"] == *e).cloned());
    let config = ctx.config();
    let levels = config.tenants.get(&d.member.tenant).map(crate::manual::known_levels).unwrap_or_default();
    let status = if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    page(
        status,
        "member.html",
        merge(
            base(op, "members"),
            json!({
                "title": d.member.email.clone().unwrap_or_else(|| d.member.id.clone()),
                "m": member_json(&d, now),
                "history": history,
                "outcome": outcome,
                "resync": q.resync,
                "error": error,
                "levels": levels,
                "today": now.format("%Y-%m-%d").to_string(),
            }),
        ),
    )
}

async fn resync(State(state): State<AppState>, op: Operator, Path(id): Path<String>) -> Response {
    if let Err(r) = visible_member(&state, &op, &id).await {
        return r;
    }
    let reconciler = state.reconcile.reconciler();
    // Answered with the page itself, showing what each provider said: asking again (a
    // reload of the page) is harmless.
    match crate::reconcile::resync_member(&state.ctx, &reconciler, &id).await {
        Ok(Some(summary)) => {
            let q = MemberQuery { event: None, resync: Some(summary.reports) };
            member_view(&state, &op, &id, q, None).await
        }
        Ok(None) => Redirect::to("/console/members").into_response(),
        Err(e) => internal(e),
    }
}

/// The member's tenant, if the operator may see them.
async fn visible_member(state: &AppState, op: &Operator, id: &str) -> Result<String, Response> {
    let who = id.to_string();
    match read(&state.ctx.store, move |s| s.member_detail(&who, 0)).await {
        Ok(Some(d)) if op.0.allows(&d.member.tenant) => Ok(d.member.tenant),
        Ok(_) => Err((StatusCode::NOT_FOUND, "no such member").into_response()),
        Err(e) => Err(internal(e)),
    }
}

/// What stays as it is in a path segment or query value: unreserved characters (RFC 3986).
const UNRESERVED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

async fn grant(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let tenant = match visible_member(&state, &op, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut levels = Vec::new();
    let (mut until, mut reason) = (None, String::new());
    for (k, v) in form_urlencoded::parse(&body) {
        match &*k {
            "levels" => levels.push(v.into_owned()),
            "until" if !v.trim().is_empty() => until = Some(v.into_owned()),
            "reason" => reason = v.into_owned(),
            _ => {}
        }
    }
    let until = match until.map(|u| parse_day(&u)) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return member_view(&state, &op, &id, MemberQuery::default(), Some(e)).await,
    };
    let req = crate::manual::GrantRequest { levels, until, reason };
    match crate::manual::grant(&state.ctx, &tenant, &id, req, &op.0.who()).await {
        Ok((_, ack)) => {
            Redirect::to(&format!("/console/members/{}?event={}", enc(&id), enc(&ack.event_id))).into_response()
        }
        Err(crate::manual::Error::Invalid(e)) => member_view(&state, &op, &id, MemberQuery::default(), Some(e)).await,
        Err(crate::manual::Error::NotFound) => (StatusCode::NOT_FOUND, "no such member").into_response(),
        Err(crate::manual::Error::Store(e)) => internal(e),
    }
}

/// A day (`YYYY-MM-DD`, from a date field) as its end: access holds through that day (UTC).
fn parse_day(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let day = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .map_err(|_| format!("`{}` is not a date (YYYY-MM-DD)", s.trim()))?;
    let next = day.succ_opt().ok_or("that date is out of range")?;
    Ok(next.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
}

#[derive(Deserialize)]
struct RevokeForm {
    #[serde(default)]
    reason: String,
}

async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    Path((id, grant)): Path<(String, String)>,
    form: axum::extract::Form<RevokeForm>,
) -> Response {
    let tenant = match visible_member(&state, &op, &id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    match crate::manual::revoke(&state.ctx, &tenant, &id, &grant, &form.reason, &op.0.who()).await {
        Ok(ack) => Redirect::to(&format!("/console/members/{}?event={}", enc(&id), enc(&ack.event_id))).into_response(),
        Err(crate::manual::Error::Invalid(e)) => member_view(&state, &op, &id, MemberQuery::default(), Some(e)).await,
        Err(crate::manual::Error::NotFound) => (StatusCode::NOT_FOUND, "no such grant").into_response(),
        Err(crate::manual::Error::Store(e)) => internal(e),
    }
}

#[derive(Deserialize)]
struct EraseForm {
    #[serde(default)]
    confirm: String,
}

/// Erases the member's personal data once the operator has typed `erase` to confirm.
async fn erase(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    form: axum::extract::Form<EraseForm>,
) -> Response {
    if let Err(r) = visible_member(&state, &op, &id).await {
        return r;
    }
    if form.confirm.trim() != "erase" {
        let why = "Nothing was erased: type erase to confirm.".to_string();
        return member_view(&state, &op, &id, MemberQuery::default(), Some(why)).await;
    }
    match crate::erase::erase_member(&state.ctx, &id, &op.0.who()).await {
        Ok(Some(_)) => Redirect::to(&format!("/console/members/{}#erasure", enc(&id))).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no such member").into_response(),
        Err(e) => internal(e),
    }
}

// ---- leads ----

#[derive(Deserialize, Default)]
struct LeadsQuery {
    provider: Option<String>,
    /// `yes`, `no`, or all.
    converted: Option<String>,
}

async fn leads(State(state): State<AppState>, op: Operator, Query(q): Query<LeadsQuery>) -> Response {
    let tenant = op.0.tenant.clone();
    let rows = match read(&state.ctx.store, move |s| s.leads(tenant.as_deref())).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let mut providers: Vec<String> = rows.iter().map(|l| l.provider.clone()).collect();
    providers.sort();
    providers.dedup();
    let shown: Vec<Value> = rows
        .iter()
        .filter(|l| q.provider.as_deref().is_none_or(|p| p.is_empty() || l.provider == p))
        .filter(|l| match q.converted.as_deref() {
            Some("yes") => l.converted_at.is_some(),
            Some("no") => l.converted_at.is_none(),
            _ => true,
        })
        .map(|l| {
            json!({ "email": l.email, "name": l.name, "provider": l.provider, "event_id": l.event_id,
                    "captured_at": rfc(Some(l.captured_at)), "converted_at": rfc(l.converted_at), "member_id": l.member_id })
        })
        .collect();
    page(
        StatusCode::OK,
        "leads.html",
        merge(
            base(&op, "leads"),
            json!({ "title": "Leads", "leads": shown, "providers": providers, "provider": q.provider, "converted": q.converted }),
        ),
    )
}

// ---- events and replay ----

#[derive(Deserialize, Default)]
struct EventsQuery {
    status: Option<String>,
    before: Option<i64>,
    notice: Option<String>,
}

const STATUSES: [&str; 7] = ["failed", "refused", "ignored", "stale", "applied", "replayed", "duplicate"];

async fn events(State(state): State<AppState>, op: Operator, Query(q): Query<EventsQuery>) -> Response {
    let status = q.status.clone().filter(|s| STATUSES.contains(&s.as_str()));
    let (tenant, st, before) = (op.0.tenant.clone(), status.clone(), q.before);
    const PAGE: usize = 50;
    let rows =
        match read(&state.ctx.store, move |s| s.event_list(st.as_deref(), tenant.as_deref(), before, PAGE + 1)).await {
            Ok(r) => r,
            Err(e) => return internal(e),
        };
    let next = (rows.len() > PAGE).then(|| rows[PAGE - 1].seq);
    let list: Vec<Value> = rows
        .iter()
        .take(PAGE)
        .map(|e| {
            let mut j = activity_json(e);
            j["seq"] = json!(e.seq);
            j["member_id"] = json!(e.member_id);
            j
        })
        .collect();
    let replayable = matches!(status.as_deref(), Some("failed" | "refused" | "ignored"));
    page(
        StatusCode::OK,
        "events.html",
        merge(
            base(&op, "events"),
            json!({ "title": "Events", "events": list, "status": status, "statuses": STATUSES, "next": next,
                    "replayable": replayable, "notice": q.notice }),
        ),
    )
}

/// The stored rows of `event_id` the operator may see.
async fn rows_of(state: &AppState, op: &Operator, event_id: &str) -> Result<Vec<crate::store::EventRow>, Response> {
    let id = event_id.to_string();
    let mut rows = read(&state.ctx.store, move |s| s.events_by_event_id(&id)).await.map_err(internal)?;
    rows.retain(|e| op.0.allows(&e.tenant));
    if rows.is_empty() {
        return Err((StatusCode::NOT_FOUND, "no such event").into_response());
    }
    Ok(rows)
}

async fn event(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Response {
    let rows = match rows_of(&state, &op, &id).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let shown: Vec<Value> = rows
        .iter()
        .map(|e| {
            let mut j = event_json(e);
            j["raw_text"] = json!(match e.body_pruned_at {
                Some(at) => format!("(raw body and headers pruned at {} by retention.raw_body_days)", at.to_rfc3339()),
                None => pretty_body(&e.raw),
            });
            j["replayable"] = json!(
                e.status.is_replayable() && e.source != crate::canonical::Source::Timer && e.body_pruned_at.is_none()
            );
            j["pretty_canonical"] = json!(e.canonical.as_deref().map(crate::store::json_of).map(|v| pretty(&v)));
            j["pretty_outcome"] = json!(pretty(&crate::store::json_of(&e.outcome)));
            j["pretty_headers"] = json!(pretty(&crate::store::json_of(&e.headers)));
            j
        })
        .collect();
    page(
        StatusCode::OK,
        "event.html",
        merge(
            base(&op, "events"),
            json!({ "title": format!("Event {id}"), "event_id": id, "rows": shown, "notice": q.notice }),
        ),
    )
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// A raw body as text: pretty JSON, else as sent (lossy UTF-8).
fn pretty_body(raw: &[u8]) -> String {
    match serde_json::from_slice::<Value>(raw) {
        Ok(v) => pretty(&v),
        Err(_) => String::from_utf8_lossy(raw).into_owned(),
    }
}

/// What replaying would change: the dry run (every stored delivery under the rules in force,
/// on a scratch store) compared with what is stored — for these members and for members the
/// deliveries would create, or (`None`) for every member; only ever in the operator's
/// tenants.
async fn diff_for(state: &AppState, op: &Operator, members: Option<Vec<String>>) -> Result<Vec<Value>, Response> {
    let now = state.ctx.clock.now();
    let run = crate::replay::dry_run(&state.ctx, &EventFilter::default(), now).await.map_err(internal)?;
    Ok(run
        .differences
        .into_iter()
        .filter(|d| op.0.allows(&d.tenant))
        .filter(|d| d.member_id.is_empty() || members.as_ref().is_none_or(|m| m.contains(&d.member_id)))
        .map(|d| json!({ "member": d.member, "member_id": d.member_id, "provider": d.provider, "membership": d.membership, "changes": d.changes }))
        .collect())
}

async fn replay_preview(State(state): State<AppState>, op: Operator, Path(id): Path<String>) -> Response {
    let rows = match rows_of(&state, &op, &id).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let replayable: Vec<&crate::store::EventRow> =
        rows.iter().filter(|e| e.status.is_replayable() && e.source != crate::canonical::Source::Timer).collect();
    // An event that reached no member (it failed before) may create one: every difference.
    let members: Vec<String> = rows.iter().filter_map(|e| e.member_id.clone()).collect();
    let diff = match diff_for(&state, &op, (!members.is_empty()).then_some(members)).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    page(
        StatusCode::OK,
        "replay.html",
        merge(
            base(&op, "events"),
            json!({ "title": format!("Replay {id}"), "event_id": id, "count": replayable.len(), "diff": diff,
                    "action": format!("/console/events/{}/replay", enc(&id)),
                    "rules_version": state.ctx.rules().version }),
        ),
    )
}

async fn replay_one(State(state): State<AppState>, op: Operator, Path(id): Path<String>) -> Response {
    let rows = match rows_of(&state, &op, &id).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(e) = rows.iter().rev().find(|e| e.status.is_replayable()) else {
        return Redirect::to(&format!("/console/events/{}?notice=not-replayable", enc(&id))).into_response();
    };
    let notice = match crate::replay::replay_one(&state.ctx, e).await {
        Ok(ack) => format!("replayed-{}", ack.status.as_str()),
        Err(crate::replay::Error::NotReplayable(..) | crate::replay::Error::Pruned(..)) => "not-replayable".into(),
        Err(e) => return internal(e),
    };
    Redirect::to(&format!("/console/events/{}?notice={notice}", enc(&id))).into_response()
}

#[derive(Deserialize)]
struct StatusForm {
    status: String,
}

/// The replayable events of `status` the operator may see, oldest first.
async fn replayable_of(state: &AppState, op: &Operator, status: &str) -> Result<Vec<crate::store::EventRow>, Response> {
    if !matches!(status, "failed" | "refused" | "ignored") {
        return Err((StatusCode::BAD_REQUEST, "only failed, refused or ignored events are replayed").into_response());
    }
    let (tenant, st) = (op.0.tenant.clone(), status.to_string());
    let mut rows = read(&state.ctx.store, move |s| {
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = s.event_list(Some(&st), tenant.as_deref(), before, 500)?;
            let Some(last) = page.last() else { break };
            before = Some(last.seq);
            all.extend(page);
        }
        Ok(all)
    })
    .await
    .map_err(internal)?;
    rows.retain(|e| e.source != crate::canonical::Source::Timer);
    rows.reverse();
    Ok(rows)
}

async fn replay_all_preview(State(state): State<AppState>, op: Operator, Query(q): Query<EventsQuery>) -> Response {
    let status = q.status.unwrap_or_else(|| "failed".into());
    let rows = match replayable_of(&state, &op, &status).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let members: Vec<String> = rows.iter().filter_map(|e| e.member_id.clone()).collect();
    let diff = match diff_for(&state, &op, Some(members)).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    page(
        StatusCode::OK,
        "replay.html",
        merge(
            base(&op, "events"),
            json!({ "title": format!("Replay every {status} event"), "status": status, "count": rows.len(), "diff": diff,
                    "action": "/console/replay", "rules_version": state.ctx.rules().version }),
        ),
    )
}

async fn replay_all(State(state): State<AppState>, op: Operator, form: axum::extract::Form<StatusForm>) -> Response {
    let rows = match replayable_of(&state, &op, &form.status).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let mut done = 0;
    for e in &rows {
        match crate::replay::replay_one(&state.ctx, e).await {
            Ok(_) => done += 1,
            Err(crate::replay::Error::NotReplayable(..) | crate::replay::Error::Pruned(..)) => {}
            Err(e) => return internal(e),
        }
    }
    Redirect::to(&format!("/console/events?status={}&notice=replayed-{done}", enc(&form.status))).into_response()
}

// ---- products and rules ----

async fn products(State(state): State<AppState>, op: Operator) -> Response {
    let mut rows = match crate::admin::products_json(&state.ctx, op.0.tenant.clone()).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    // Unmapped first: the list to work from.
    rows.sort_by_key(|r| r["mapped"].as_bool().unwrap_or(false));
    let unmapped = rows.iter().filter(|r| r["mapped"] == false).count();
    page(
        StatusCode::OK,
        "products.html",
        merge(base(&op, "products"), json!({ "title": "Products", "products": rows, "unmapped": unmapped })),
    )
}

async fn rules(State(state): State<AppState>, op: Operator) -> Response {
    // Every tenant's files and errors: the global token's, as `GET /admin/rules`.
    if op.0.tenant.is_some() {
        return forbidden("the rules page needs the global admin token");
    }
    let loaded = state.ctx.loaded();
    let status = state.reload_status();
    page(
        StatusCode::OK,
        "rules.html",
        merge(
            base(&op, "rules"),
            json!({
                "title": "Rules",
                "version": loaded.rules.version,
                "loaded_at": rfc(Some(loaded.rules.loaded_at)),
                "source_hash": loaded.rules.source_hash(),
                "files": loaded.rules.file_names(),
                "last_reload": {
                    "at": rfc(status.last_attempt_at), "trigger": status.trigger, "ok": status.ok,
                    "errors": status.errors.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                },
            }),
        ),
    )
}

async fn reload(State(state): State<AppState>, op: Operator) -> Response {
    if op.0.tenant.is_some() {
        return forbidden("reloading the rules needs the global admin token");
    }
    let _ = state.reload("console");
    Redirect::to("/console/rules").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_is_granted_through_its_end() {
        assert_eq!(parse_day("2026-03-01").unwrap().to_rfc3339(), "2026-03-02T00:00:00+00:00");
        assert!(parse_day("01/03/2026").unwrap_err().contains("not a date"));
    }

    #[test]
    fn only_the_consoles_own_origin_may_post() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            m
        };
        assert!(same_origin(&h(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080")])).is_ok());
        assert!(same_origin(&h(&[("host", "ms.example"), ("origin", "https://ms.example")])).is_ok());
        assert!(same_origin(&h(&[("host", "127.0.0.1:8080"), ("origin", "http://evil.example")])).is_err());
        assert!(same_origin(&h(&[("host", "127.0.0.1:8080"), ("origin", "null")])).is_err());
        assert!(same_origin(&h(&[("host", "127.0.0.1:8080"), ("referer", "http://127.0.0.1:8080/console/x")])).is_ok());
        assert!(same_origin(&h(&[("host", "127.0.0.1:8080"), ("referer", "http://127.0.0.1:8080.evil/x")])).is_err());
        assert!(same_origin(&h(&[("host", "127.0.0.1:8080")])).is_err(), "neither: refused");
    }
}
