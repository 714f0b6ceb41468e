//! membersync keeps member access in sync with payment-provider webhooks.
//!
//! ```text
//! POST /webhooks/{tenant}/{provider}                                 (ingest.rs)
//!   → intake   (intake.rs, the one way a delivery enters:
//!                 verify/  the scheme the provider's YAML names; 401
//!                 redact   a secret carried in the body never stored
//!                 decode   extract/decode.rs: json | form with bracket keys; 400
//!                 extract  extract/: YAML field extractors → CanonicalEvent; unmapped → ignored)
//!   → pipeline (pipeline/, in the writer, one savepoint per event:
//!                 dedupe   idempotency key from body, header or body hash
//!                 resolve  member and membership
//!                 rules    rules/: Rhai decides the machine input and the effects
//!                 machine  machine/: statig graph; an illegal transition is refused and recorded
//!                 commit   store/: event, state, access, leads, timers; one transaction per batch)
//!   → respond  (2xx only after the commit is on disk)
//! timers.rs feeds due timers through the same pipeline; reconcile/ feeds the provider's
//! current view (`status_synced`, source `reconcile`) where it differs from what is stored.
//! ```
//!
//! # Layout
//! Every module, top (what drives) to bottom (what is driven); no module imports one
//! above it:
//! - `cli`: the commands; `app`: the router, `serve` and the request metrics; `listen`: the
//!   connection loop (connection cap, header and write time limits); `ingest`,
//!   `admin`: the HTTP handlers; `console`: the admin console's pages and sessions;
//!   `mcp`: the read-only tools for AI assistants; `openapi`: the API's OpenAPI document;
//!   `views`: the JSON of members, memberships and events;
//!   `http_error`: the one status table; `logging`: stderr as text or JSON, routine lines
//!   batched.
//! - `state`: the running service's state above the pipeline (the pipeline's context,
//!   the last reload's outcome, the reconciler in force, the metrics); `metrics`: what
//!   `/metrics` shows.
//! - `reload`: swapping in edited rules (checked first by `check`); `reconcile`: the
//!   provider APIs and the daily schedule; `enrich`: what a delivery leaves out, fetched
//!   (Stripe's line items); `manual`: operators' grants as events; `timers`: the one
//!   timer-firing path; `replay`:
//!   stored events run again, and the dry run; `retention`: old raw bodies dropped;
//!   `erase`: a member's personal data removed; `explain`, `scenario`, `simulate`: why a
//!   member has access, lifecycle files run as tests, one payload as a dry run; `check`:
//!   every problem in the operator's files.
//! - `pipeline`: the order of stages (`resolve`, `commit`, `parked`); `intake`: how a
//!   delivery enters; `verify`: signature schemes; `extract`: provider YAML → canonical
//!   event; `rules`: the Rhai policy; `machine`: the membership graph; `effects`: effect
//!   values; `store`: durable state (`store::sqlite`: SQLite).
//! - `config`: `membersync.yaml`; `spec`: the provider file model; `canonical`: the event
//!   model; `clock`: injectable time; `diagnostic`: file:line:column problems and the one
//!   "did you mean"; `schema`: the JSON Schemas; `secret`: redacted secrets; `yaml`: the
//!   one YAML parser.

/// The git commit this build was made from (12 hex digits), from `build.rs`: outside a
/// checkout, `MEMBERSYNC_BUILD_COMMIT` as the build was given it, else `unknown`.
pub const BUILD_COMMIT: &str = env!("MEMBERSYNC_BUILD_COMMIT");

/// Whether tracked files differed from [`BUILD_COMMIT`] when it was built.
pub const BUILD_MODIFIED: bool = !env!("MEMBERSYNC_BUILD_MODIFIED").is_empty();

/// What `--version` prints after the name: `0.1.0 (commit 1a2b3c4d5e6f)`, with
/// `, modified` inside the brackets when [`BUILD_MODIFIED`].
pub const VERSION: &str = if BUILD_MODIFIED {
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("MEMBERSYNC_BUILD_COMMIT"), ", modified)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("MEMBERSYNC_BUILD_COMMIT"), ")")
};

pub mod admin;
pub mod app;
pub mod canonical;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod diagnostic;
pub mod effects;
pub mod enrich;
pub mod erase;
pub mod explain;
pub mod extract;
pub mod http_error;
pub mod ingest;
pub mod intake;
pub mod listen;
pub mod logging;
pub mod machine;
pub mod manual;
pub mod mcp;
pub mod metrics;
pub mod openapi;
pub mod pipeline;
pub mod reconcile;
pub mod reload;
pub mod replay;
pub mod retention;
pub mod rules;
pub mod scenario;
pub mod schema;
pub mod secret;
pub mod simulate;
pub mod spec;
pub mod state;
pub mod store;
pub mod timers;
pub mod verify;
pub mod views;
pub mod yaml;
