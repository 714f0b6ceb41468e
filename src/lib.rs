//! membersync keeps member access in sync with payment-provider webhooks.
//!
//! ```text
//! POST /webhooks/{tenant}/{provider}
//!   → verify   (verify/: the scheme the provider's YAML names; 401)
//!   → decode   (extract/decode.rs: json | form with bracket keys; 400)
//!   → extract  (extract/: YAML field extractors → CanonicalEvent; unmapped → ignored)
//!   → dedupe   (pipeline.rs: idempotency key from body, header or body hash)
//!   → rules    (rules/: Rhai decides the machine input and the effects)
//!   → machine  (machine/: statig graph; an illegal transition is refused and recorded)
//!   → store    (store/: one transaction per batch; event, state, access, leads, timers)
//!   → respond  (2xx only after the commit)
//! timers.rs feeds due timers through the same path; reconcile/ feeds the provider's
//! current view (`status_synced`, source `reconcile`) where it differs from what is stored.
//! ```
//!
//! # Layout
//! Every module, top (what drives) to bottom (what is driven):
//! - `cli`: the commands; `app`: the router and `serve`; `ingest`, `admin`: the HTTP
//!   handlers; `http_error`: the status table; `logging`: stderr, routine lines batched.
//! - `state`: the running service's state above the pipeline (the pipeline's context,
//!   the last reload's outcome, the reconciler in force).
//! - `reload`: swapping in edited rules (checked first by `check`); `reconcile`: the
//!   provider APIs and the daily schedule; `timers`: due timers; `replay`: stored events
//!   run again, and the dry run; `explain`, `scenario`: why a member has access, and
//!   lifecycle files run as tests; `check`: every problem in the operator's files.
//! - `pipeline`: the order of stages; `verify`: signature schemes; `extract`: provider
//!   YAML → canonical event; `rules`: the Rhai policy; `machine`: the membership graph;
//!   `effects`: effect values; `store`: durable state (`store::sqlite`: SQLite).
//! - `config`: `membersync.yaml`; `canonical`: the event model; `clock`: injectable time;
//!   `diagnostic`: file:line:column problems and the one "did you mean"; `schema`: the
//!   JSON Schemas; `secret`: redacted secrets; `yaml`: the one YAML parser.

pub mod admin;
pub mod app;
pub mod canonical;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod diagnostic;
pub mod effects;
pub mod explain;
pub mod extract;
pub mod http_error;
pub mod ingest;
pub mod intake;
pub mod logging;
pub mod machine;
pub mod metrics;
pub mod pipeline;
pub mod reconcile;
pub mod reload;
pub mod replay;
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
