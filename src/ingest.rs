//! Ingest: `POST /webhooks/{tenant}/{provider}` → size limit → intake (verify → redact →
//! decode → extract) → `pipeline::process`, answered only once the event is durable. `HEAD`/`GET` on the same
//! URL answer 200 (providers probe the URL when it is added). Never logs a secret.

use crate::canonical::Source;
use crate::http_error::{ApiError, ApiPath as Path, ErrorBody};
use crate::intake::{self, intake, Check, Delivery};
use crate::pipeline::{self, Ack, Ctx, Incoming, Raw};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// Headers never stored with an event.
const UNSTORED_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// Whether `x` is stored already (same tenant, provider and idempotency key).
async fn stored_already(ctx: &Arc<Ctx>, tenant: &str, provider: &str, x: &crate::extract::Extraction) -> bool {
    let (id, t, p, key) =
        (x.event.event_id.clone(), tenant.to_string(), provider.to_string(), x.idempotency_key.clone());
    crate::store::read(&ctx.store, move |s| s.events_by_event_id(&id))
        .await
        .is_ok_and(|rows| rows.iter().any(|e| e.tenant == t && e.provider == p && e.idempotency_key == key))
}

/// `HEAD`/`GET /webhooks/{tenant}/{provider}`: the URL check providers make.
#[utoipa::path(method(get, head), path = "/webhooks/{tenant}/{provider}", tag = "webhooks",
    params(("tenant" = String, Path), ("provider" = String, Path)),
    responses((status = 200, description = "The tenant takes this provider's webhooks", body = Object),
        (status = 400, description = "A path that cannot be read (not UTF-8)", body = ErrorBody),
        (status = 404, description = "Unknown tenant or provider", body = ErrorBody)))]
pub async fn probe(
    State(ctx): State<Arc<Ctx>>,
    Path((tenant, provider)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    target(&ctx.config(), &tenant, &provider)?;
    Ok(Json(json!({ "ok": true })))
}

fn target<'a>(
    config: &'a crate::config::Config,
    tenant: &str,
    provider: &str,
) -> Result<&'a crate::config::TenantProvider, ApiError> {
    let t = config.tenants.get(tenant).ok_or_else(|| ApiError::UnknownTarget(format!("tenant `{tenant}`")))?;
    let p = t
        .providers
        .get(provider)
        .ok_or_else(|| ApiError::UnknownTarget(format!("provider `{provider}` for tenant `{tenant}`")))?;
    if !config.extractors.contains_key(provider) {
        return Err(ApiError::UnknownTarget(format!("provider `{provider}`")));
    }
    Ok(p)
}

/// `POST /webhooks/{tenant}/{provider}`.
#[utoipa::path(post, path = "/webhooks/{tenant}/{provider}", tag = "webhooks",
    params(("tenant" = String, Path), ("provider" = String, Path)),
    request_body(content = String, description = "The provider's payload as sent (JSON or a form), signed its way", content_type = "application/json"),
    responses((status = 200, description = "Durable: `{event_id, status}`", body = Object),
        (status = 400, description = "Undecodable, or ids that conflict or are too long", body = ErrorBody),
        (status = 401, description = "Bad, missing or expired signature", body = ErrorBody),
        (status = 404, description = "Unknown tenant or provider", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body over `limits.max_body_bytes`", body = ErrorBody),
        (status = 503, description = "Busy (Retry-After) or the store failed", body = ErrorBody)))]
pub async fn webhook(
    State(ctx): State<Arc<Ctx>>,
    Path((tenant, provider)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Ack>, ApiError> {
    // The line's `duration_ms`: from here (the headers read) to the answer being ready.
    let started = std::time::Instant::now();
    // What the URL names is shown in logs escaped: it comes from anyone.
    let (shown_tenant, shown_provider) = (crate::logging::shown(&tenant), crate::logging::shown(&provider));
    target(&ctx.config(), &tenant, &provider).inspect_err(|e| {
        if let Some(held_back) = ctx.failure_log.first_in_interval("unknown target") {
            tracing::warn!(held_back, tenant = %shown_tenant, provider = %shown_provider, error = %crate::logging::shown(e.to_string()), "Webhook for an unknown target.");
        }
    })?;
    let (limit, body_timeout) = (ctx.config().max_body_bytes, ctx.config().connections.body_timeout);
    let body = read_body(body, limit, body_timeout).await.inspect_err(|e| {
        let what = match e {
            ApiError::TooLarge(_) => "body too large",
            ApiError::BodyTimeout(_) => return,
            _ => "body unreadable",
        };
        if let Some(held_back) = ctx.failure_log.first_in_interval(what) {
            tracing::warn!(held_back, tenant = %shown_tenant, provider = %shown_provider, limit, error = %crate::logging::shown(e.to_string()), "Webhook {what}.");
        }
    })?;
    let hdrs: Vec<(String, String)> =
        headers.iter().filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))).collect();
    let ack = accept(&ctx, &tenant, &provider, hdrs, body.to_vec()).await?;
    let duration_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    tracing::info!(%tenant, %provider, event_id = %ack.event_id, status = ack.status.as_str(), duration_ms, "Webhook processed.");
    Ok(Json(ack))
}

/// A request body within `limit` bytes and `timeout`: 413 past the limit, 408 when it
/// trickles (a client doing so holds nothing for long), 400 when it cannot be read.
pub async fn read_body(body: Body, limit: usize, timeout: std::time::Duration) -> Result<axum::body::Bytes, ApiError> {
    let body = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::BodyTimeout(timeout.as_secs()))?;
    body.map_err(|e| {
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            ApiError::TooLarge(limit)
        } else {
            ApiError::BadRequest(e.to_string())
        }
    })
}

/// Verifies, decodes and extracts one delivery, then runs it through the pipeline.
/// `headers` are (lower-case name, value). Shared by the HTTP handler and the tests.
pub async fn accept(
    ctx: &Arc<Ctx>,
    tenant: &str,
    provider: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Result<Ack, ApiError> {
    let config = ctx.config();
    let tp = target(&config, tenant, provider)?;
    if body.iter().all(u8::is_ascii_whitespace) && config.verifiers[provider].scheme.empty_body_is_probe() {
        tracing::info!(%tenant, %provider, "Empty POST answered as a URL check; nothing stored.");
        let outcome = pipeline::Outcome::probe();
        return Ok(Ack { event_id: String::new(), status: outcome.status, outcome });
    }
    let delivery = Delivery { tenant, provider, headers: &headers, body: &body, received_at: ctx.clock.now() };
    let taken = intake(&config, &delivery, Check::Signature(tp.secret.as_ref())).map_err(|e| match e {
        intake::Error::Unverified(e @ crate::verify::Error::Conflicting(_)) => {
            if let Some(held_back) = ctx.failure_log.first_in_interval("ids conflict") {
                tracing::warn!(held_back, tenant = %crate::logging::shown(tenant), provider = %crate::logging::shown(provider), reason = %crate::logging::shown(e.to_string()), "Webhook names itself twice.");
            }
            ApiError::Invalid(e.to_string())
        }
        e @ intake::Error::TooLong { .. } => ApiError::Invalid(e.to_string()),
        intake::Error::Unverified(e) => {
            if let Some(held_back) = ctx.failure_log.first_in_interval("signature") {
                tracing::warn!(held_back, tenant = %crate::logging::shown(tenant), provider = %crate::logging::shown(provider), reason = %crate::logging::shown(e.to_string()), "Signature did not verify.");
            }
            ApiError::Unauthorized(e.to_string())
        }
        e => {
            tracing::warn!(tenant = %crate::logging::shown(tenant), provider = %crate::logging::shown(provider), error = %crate::logging::shown(e.to_string()), "Webhook body could not be decoded.");
            ApiError::BadRequest(e.to_string())
        }
    })?;
    if let Err(failure) = &taken.extracted {
        tracing::warn!(tenant = %crate::logging::shown(tenant), provider = %crate::logging::shown(provider), event_id = %crate::logging::shown(&failure.event_id), error = %crate::logging::shown(failure.error.to_string()), "Webhook fields could not be read; storing it as failed.");
    }
    // What the delivery leaves out (`enrich:`), fetched before the event is applied and
    // within the provider's patience; a failure is the event's to record, not the request's.
    let enrichment = match taken.extracted.as_ref().ok().filter(|x| x.enrich.is_some()) {
        // A redelivery of a stored event is answered `duplicate` by the writer: no request.
        Some(x) if stored_already(ctx, tenant, provider, x).await => None,
        Some(x) => Some(
            crate::enrich::fetch(&config, tenant, provider, x.enrich.as_ref().expect("filtered")).await.map_err(|e| {
                tracing::warn!(tenant = %crate::logging::shown(tenant), provider = %crate::logging::shown(provider), error = %crate::logging::shown(e.to_string()), "Enrichment failed; the event is kept and tried again.");
                e.to_string()
            }),
        ),
        None => None,
    };
    let incoming = Incoming::of(tenant, provider, taken.extracted);
    let stored: Vec<(String, String)> =
        headers.into_iter().filter(|(k, _)| !UNSTORED_HEADERS.contains(&k.as_str())).collect();
    let raw = Raw { body: taken.body, headers: stored, source: Source::Webhook, delivery: true, enrichment };
    pipeline::process(ctx, incoming, raw).await.map_err(|e| {
        tracing::error!(%tenant, %provider, error = %crate::logging::shown(e.to_string()), "Webhook could not be stored; the provider will retry.");
        ApiError::from(e)
    })
}
