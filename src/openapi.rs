//! The HTTP API's OpenAPI 3.1 document, collected from the handlers' `#[utoipa::path]` as
//! they are routed (utoipa-axum: a route and its description are declared together).
//! Served at `GET /openapi.json` and committed as `schemas/openapi.json`.
//!
//! What this module must never do: describe a route the router does not serve, or route
//! one it does not describe (the console's pages are HTML and stay out of it).

use crate::state::AppState;
use crate::{admin, ingest};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;
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
        .routes(routes!(admin::products))
        .routes(routes!(admin::events))
        .routes(routes!(admin::event))
        .routes(routes!(admin::replay_event))
        .routes(routes!(admin::leads))
        .routes(routes!(admin::rules))
        .routes(routes!(admin::reload))
        .routes(routes!(admin::rederive))
        .routes(routes!(admin::metrics))
}

/// The document without its paths: what the API is, and how it is authenticated.
fn base() -> OpenApi {
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
    api
}

/// The document as `schemas/openapi.json` holds it.
pub fn document(api: &OpenApi) -> String {
    api.to_pretty_json().expect("the OpenAPI document serializes") + "\n"
}
