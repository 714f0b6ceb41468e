//! The HTTP application: one router for ingest, admin, health and metrics, and `serve`,
//! which runs it with the timer task, the reload triggers (file watch, SIGHUP) and the
//! reconcile schedule until shutdown.
//!
//! What this module must never do: hold state of its own (it is in `AppState`) or answer a
//! request anywhere but the handlers it routes to.

use crate::pipeline::Ctx;
use crate::state::AppState;
use crate::{reconcile, timers};
use axum::Router;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The API's routes and their OpenAPI document, declared together (see `openapi`).
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    crate::openapi::api().routes(utoipa_axum::routes!(healthz)).split_for_parts()
}

/// The router, for `serve` and for `oneshot` tests.
pub fn router(state: AppState) -> Router {
    api()
        .0
        .merge(crate::console::routes())
        .route_service("/mcp", mcp_service(state.clone()))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), measure))
        // No route: a 404 that `uniform` gives the error body.
        .fallback(|| async { axum::http::StatusCode::NOT_FOUND })
        .layer(axum::middleware::from_fn(crate::http_error::uniform))
        .with_state(state)
}

/// `/mcp`: the assistant's tools over streamable HTTP, stateless (every request stands
/// alone, so any replica answers), behind the MCP token (see `mcp`).
fn mcp_service(
    state: AppState,
) -> impl tower::Service<
    axum::extract::Request,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
    use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
    let ctx = state.ctx.clone();
    let service = StreamableHttpService::new(
        move || Ok(crate::mcp::Assistant::new(ctx.clone(), false)),
        Arc::new(NeverSessionManager::default()),
        // The token, not the Host header, is what keeps other sites out.
        StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            // The body is read within `max_body_bytes` before it gets here (`mcp_token`).
            .with_max_request_body_bytes(usize::MAX)
            .disable_allowed_hosts(),
    );
    tower::ServiceBuilder::new().layer(axum::middleware::from_fn_with_state(state, mcp_token)).service(service)
}

/// Lets a request through to `/mcp` with the scope its MCP bearer token opens, its body
/// read within `max_body_bytes` and the body timeout like a webhook's; 401 without a token
/// (the admin token is not one).
async fn mcp_token(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let given = crate::http_error::bearer(req.headers());
    match crate::mcp::scope_of(&state.ctx.config(), given) {
        Some(scope) => {
            let config = state.ctx.config();
            let (mut parts, body) = req.into_parts();
            match crate::ingest::read_body(body, config.max_body_bytes, config.connections.body_timeout).await {
                Ok(bytes) => {
                    parts.extensions.insert(scope);
                    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
                }
                Err(e) => e.into_response(),
            }
        }
        None => {
            let body = crate::http_error::ErrorBody::saying(
                "MCP token missing or wrong (MEMBERSYNC_MCP_TOKEN; the admin token is not one)",
            );
            (axum::http::StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
        }
    }
}

/// Times every request to a known route and counts its answer (see `metrics`). A webhook is
/// labelled with its provider when the config knows it, `unknown` otherwise.
async fn measure(
    axum::extract::State(state): axum::extract::State<AppState>,
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = matched.map(|m| m.as_str().to_string()).unwrap_or_default();
    let provider = if route.starts_with("/webhooks/") {
        let named = req.uri().path().rsplit('/').next().unwrap_or_default();
        if state.ctx.config().extractors.contains_key(named) {
            named.to_string()
        } else {
            "unknown".to_string()
        }
    } else {
        String::new()
    };
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    state.metrics.observe(&route, &provider, resp.status().as_u16(), start.elapsed());
    resp
}

/// `GET /healthz`: 200 `{"status": "ok"}`, or 503 `{"status": "failed", "error"}` once
/// the store has hit an I/O error (it then takes no writes; restart it), or while the
/// shared PostgreSQL store cannot be reached (a load balancer then sends elsewhere).
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "`{status: ok}`", body = Object),
        (status = 503, description = "The store hit an I/O error, or its PostgreSQL database cannot be reached: `{status: failed, error}`", body = crate::http_error::ErrorBody)))]
async fn healthz(
    axum::extract::State(ctx): axum::extract::State<Arc<Ctx>>,
) -> Result<axum::Json<serde_json::Value>, crate::http_error::ApiError> {
    // A store that does not answer within 5 s is as unhealthy as one that says so.
    let asked = tokio::time::timeout(std::time::Duration::from_secs(5), crate::store::read(&ctx.store, |s| s.health()));
    match asked.await {
        Ok(Ok(())) => Ok(axum::Json(serde_json::json!({"status": "ok"}))),
        Ok(Err(e)) => Err(crate::http_error::ApiError::Unhealthy(e.to_string())),
        Err(_) => Err(crate::http_error::ApiError::Unhealthy("the store did not answer within 5 s".into())),
    }
}

/// Serves until `shutdown` resolves: stops accepting, finishes requests in flight (and
/// their commits), stops the timer task and the reconcile schedule, then returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let ctx = state.ctx.clone();
    let timer_task = tokio::spawn(timers::run(ctx.clone(), stopped(stop_rx.clone())));
    let watch_state = state.clone();
    let watch_stop = stopped(stop_rx.clone());
    let watch_task = tokio::spawn(async move {
        let config = watch_state.ctx.config();
        crate::reload::watch(
            &config,
            || {
                let _ = watch_state.reload("watch");
            },
            watch_stop,
        )
        .await
    });
    #[cfg(unix)]
    let hup_task = {
        let (hup_state, hup_stop) = (state.clone(), stopped(stop_rx.clone()));
        tokio::spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
            tokio::pin!(hup_stop);
            loop {
                tokio::select! {
                    Some(()) = hup.recv() => { let _ = hup_state.reload("sighup"); }
                    _ = &mut hup_stop => return,
                }
            }
        })
    };
    let retention_task = tokio::spawn(crate::retention::run(ctx.clone(), stopped(stop_rx.clone())));
    let reconcile_task = tokio::spawn(reconcile::schedule::run(ctx, state.reconcile.clone(), stopped(stop_rx.clone())));
    let limits = state.ctx.config().connections;
    let app = router(state);
    let result = crate::listen::serve(listener, app, limits, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    let _ = timer_task.await;
    let _ = watch_task.await;
    #[cfg(unix)]
    let _ = hup_task.await;
    let _ = reconcile_task.await;
    let _ = retention_task.await;
    result
}
