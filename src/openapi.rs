//! The HTTP API's OpenAPI 3.1 document, collected from the handlers' `#[utoipa::path]` as
//! they are routed (utoipa-axum: a route and its description are declared together).
//! Served at `GET /openapi.json` and committed as `schemas/openapi.json`.
//!
//! `/mcp` is served by the MCP transport rather than a handler; its description is merged in
//! here all the same. Every `GET` route also answers `HEAD` (the router does that), which the
//! document leaves implicit.
//!
//! What this module must never do: describe a route the router does not serve, or route
//! one it does not describe (the console's pages are HTML and stay out of it).

use crate::state::AppState;
use crate::{admin, ingest};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as Document;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The API's routes with their description (the caller adds `healthz` and state).
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(base())
        .routes(routes!(ingest::probe, ingest::webhook))
        .routes(routes!(admin::members))
        .routes(routes!(admin::member))
        .routes(routes!(admin::resync))
        .routes(routes!(admin::grant))
        .routes(routes!(admin::revoke))
        .routes(routes!(admin::erase_personal_data))
        .routes(routes!(admin::products))
        .routes(routes!(admin::events))
        .routes(routes!(admin::event))
        .routes(routes!(admin::replay_event))
        .routes(routes!(admin::leads))
        .routes(routes!(admin::rules))
        .routes(routes!(admin::reload))
        .routes(routes!(admin::rederive))
        .routes(routes!(admin::metrics))
        .routes(routes!(openapi_json))
        .merge(OpenApiRouter::with_openapi(Mcp::openapi()))
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object)))]
async fn openapi_json() -> impl axum::response::IntoResponse {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| document(&crate::app::api().1));
    ([(axum::http::header::CONTENT_TYPE, "application/json")], doc.as_str())
}

/// `/mcp`'s description (the MCP transport serves it; see `app::mcp_service`).
#[derive(utoipa::OpenApi)]
#[openapi(paths(mcp))]
struct Mcp;

/// `POST /mcp`: the MCP server over streamable HTTP.
///
/// Stateless: one JSON-RPC message in, its answer out (`initialize`, `tools/list`, `tools/call` of the four read-only tools). The
/// `Accept` header names both `application/json` and `text/event-stream`.
#[utoipa::path(post, path = "/mcp", tag = "assistant", security(("mcp_token" = [])),
    request_body(content = Object, description = "One JSON-RPC 2.0 message"),
    responses(
        (status = 200, description = "The JSON-RPC answer (a tool's failure is a JSON-RPC result or error, not an HTTP one)", body = Object),
        (status = 202, description = "A notification, taken"),
        (status = 400, description = "A message the server does not take (a JSON-RPC response, an unsupported `MCP-Protocol-Version`)", body = crate::http_error::ErrorBody),
        (status = 401, description = "MCP token missing or wrong (the admin token is not one)", body = crate::http_error::ErrorBody),
        (status = 406, description = "`Accept` does not name both answer types", body = crate::http_error::ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = crate::http_error::ErrorBody),
        (status = 413, description = "The body is larger than `max_body_bytes`", body = crate::http_error::ErrorBody),
        (status = 415, description = "Not one JSON-RPC message", body = crate::http_error::ErrorBody)))]
#[allow(dead_code)]
fn mcp() {}

/// The document without its paths: what the API is, and how it is authenticated.
fn base() -> Document {
    let mut api = utoipa::openapi::OpenApiBuilder::new()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("membersync")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Keeps member access in sync with payment-provider webhooks. Webhooks are \
                     authenticated by each provider's signature; the admin API by a bearer token \
                     (the global `admin_token`, or a tenant's, which sees that tenant only). Every \
                     error answers the same body, `ErrorBody`.",
                ))
                .build(),
        )
        .build();
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "admin_token",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("`MEMBERSYNC_ADMIN_TOKEN`, or a tenant's `admin_token`"))
                .build(),
        ),
    );
    components.add_security_scheme(
        "mcp_token",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("`MEMBERSYNC_MCP_TOKEN`, or a tenant's `mcp_token` (not the admin token)"))
                .build(),
        ),
    );
    api
}

/// The document as `schemas/openapi.json` holds it.
pub fn document(api: &Document) -> String {
    api.to_pretty_json().expect("the OpenAPI document serializes") + "\n"
}
