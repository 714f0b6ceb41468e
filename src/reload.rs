//! Reload: operators edit `rules/` and `membersync.yaml` while the service runs. A reload
//! loads and compiles everything anew; only a fully valid set replaces the one in force
//! (atomically, for the next event — requests in flight finish under the old one). A
//! broken edit is reported (file:line) and the previous rules keep running.
//! Triggers: a file watch on the rules directory and the config file, `POST /admin/reload`
//! and SIGHUP.

use crate::config::Config;
use crate::diagnostic::Diagnostic;
use crate::pipeline::{Ctx, Loaded};
use crate::rules::RuleSet;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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

/// Loads config and rules from where the running config came from; on success swaps
/// them in, on failure keeps the old ones. Either way the status is recorded and logged.
/// The files must first pass `membersync check` — the same function, so the service
/// refuses exactly what `check` refuses (its warnings do not refuse).
pub fn reload(ctx: &Ctx, trigger: &str) -> Result<String, Vec<Diagnostic>> {
    let now = ctx.clock.now();
    let old = ctx.config();
    let checked = crate::check::check(&old.path);
    let result = match checked.errors.is_empty() {
        true => Ok(()),
        false => Err(checked.errors),
    };
    let result = result.and_then(|()| Config::load(&old.path).map_err(|e| e.0)).and_then(|mut config| {
        // Where the service listens and stores cannot change while it runs.
        config.database = old.database.clone();
        config.listen = old.listen.clone();
        let rules = RuleSet::load(&config.rules_dir, "rules", now).map_err(|e| e.0)?;
        Ok((config, rules))
    });
    let mut status = ReloadStatus { last_attempt_at: Some(now), trigger: Some(trigger.into()), ..Default::default() };
    let out = match result {
        Ok((config, rules)) => {
            let version = rules.version.clone();
            ctx.swap(Loaded::new(config, rules));
            status.ok = Some(true);
            tracing::info!(%trigger, %version, "Rules reloaded.");
            Ok(version)
        }
        Err(errors) => {
            status.ok = Some(false);
            status.errors = errors.clone();
            for e in &errors {
                tracing::error!(%trigger, problem = %e, "Reload refused; the previous rules stay in force.");
            }
            Err(errors)
        }
    };
    if let Ok(mut s) = ctx.reload_status.lock() {
        *s = status;
    }
    out
}

/// Watches the rules directory and the config file; reloads (debounced) on any change
/// until `shutdown` resolves. Returns at once if the watch cannot be set up (logged).
pub async fn watch(ctx: Arc<Ctx>, shutdown: impl std::future::Future<Output = ()>) {
    use notify::{RecursiveMode, Watcher};
    let config = ctx.config();
    let rules_dir: PathBuf = config.rules_dir.clone();
    let config_path: PathBuf = config.path.clone();
    let config_dir =
        config_path.parent().map(|p| if p.as_os_str().is_empty() { PathBuf::from(".") } else { p.to_path_buf() });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let config_name = config_path.file_name().map(|n| n.to_os_string());
    let rules_abs = std::fs::canonicalize(&rules_dir).unwrap_or(rules_dir.clone());
    let mut watcher = match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let relevant = ev.paths.iter().any(|p| {
                p.starts_with(&rules_abs)
                    || p.starts_with(&rules_dir)
                    || (config_name.is_some() && p.file_name().map(|n| n.to_os_string()) == config_name)
            });
            if relevant && !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = tx.try_send(());
            }
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot watch the rules; reload with POST /admin/reload or SIGHUP.");
            return;
        }
    };
    if let Err(e) = watcher.watch(&ctx.config().rules_dir, RecursiveMode::Recursive) {
        tracing::warn!(error = %e, "Cannot watch the rules directory; reload with POST /admin/reload or SIGHUP.");
        return;
    }
    if let Some(dir) = config_dir {
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, "Cannot watch the config file's directory.");
        }
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            got = rx.recv() => {
                if got.is_none() {
                    return;
                }
                // Editors write in several steps: wait for the burst to settle.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
                let _ = reload(&ctx, "watch");
            }
            _ = &mut shutdown => return,
        }
    }
}
