//! The running service's state, above the pipeline: the pipeline's context (store, clock,
//! the config and rules in force), the outcome of the last reload, reconciliation (the
//! reconciler in force and its counters) and the metrics. The HTTP handlers, the reload triggers and the
//! reconcile schedule share one `AppState`; what drives the pipeline lives here, so
//! the pipeline never imports the layers that call it.
//!
//! What this module must never do: process an event (the pipeline does) or load files
//! (reload does): it only records what happened and hands the new config to the layers
//! that keep their own compiled form of it.

use crate::diagnostic::Diagnostic;
use crate::metrics::Metrics;
use crate::pipeline::Ctx;
use crate::reconcile::Reconciliation;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::{Arc, Mutex};

/// The outcome of the last reload attempt.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// What triggered it (watch, admin, sighup).
    pub trigger: Option<String>,
    pub ok: Option<bool>,
    /// Every problem of the last failed attempt (the old rules stayed in force).
    pub errors: Vec<Diagnostic>,
}

/// The service's state; clones share it.
#[derive(Clone)]
pub struct AppState {
    /// The pipeline's context: store, clock, and the snapshot of config and rules in force.
    pub ctx: Arc<Ctx>,
    /// The reconciler in force and the reconcile counters.
    pub reconcile: Arc<Reconciliation>,
    /// What `/metrics` shows.
    pub metrics: Arc<Metrics>,
    reload_status: Arc<Mutex<ReloadStatus>>,
}

impl AppState {
    pub fn new(ctx: Arc<Ctx>) -> AppState {
        let reconcile = Arc::new(Reconciliation::new(&ctx.config()));
        let metrics = Arc::new(Metrics::new(reconcile.stats()));
        AppState { ctx, reconcile, metrics, reload_status: Arc::default() }
    }

    /// Reloads config and rules (see `reload::reload`), records the outcome for
    /// `GET /admin/rules`, and on success rebuilds the reconciler from the new config.
    pub fn reload(&self, trigger: &str) -> Result<String, Vec<Diagnostic>> {
        let now = self.ctx.clock.now();
        let result = crate::reload::reload(&self.ctx, trigger);
        let mut status =
            ReloadStatus { last_attempt_at: Some(now), trigger: Some(trigger.into()), ..Default::default() };
        match &result {
            Ok(_) => {
                status.ok = Some(true);
                self.reconcile.rebuild(&self.ctx.config());
            }
            Err(errors) => {
                status.ok = Some(false);
                status.errors = errors.clone();
            }
        }
        match self.reload_status.lock() {
            Ok(mut s) => *s = status,
            Err(p) => *p.into_inner() = status,
        }
        result
    }

    /// The outcome of the last reload attempt.
    pub fn reload_status(&self) -> ReloadStatus {
        self.reload_status.lock().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }
}

impl axum::extract::FromRef<AppState> for Arc<Ctx> {
    fn from_ref(state: &AppState) -> Arc<Ctx> {
        state.ctx.clone()
    }
}
