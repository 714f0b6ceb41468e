//! Reload: operators edit `rules/` and `membersync.yaml` while the service runs. A reload
//! loads and compiles everything anew; only a fully valid set replaces the one in force
//! (atomically, for the next event — requests in flight finish under the old one). A
//! broken edit is reported (file:line) and the previous rules keep running.
//! Triggers: a file watch on the rules directory and the config file, `POST /admin/reload`
//! and SIGHUP.
//!
//! What this module must never do: swap in files that `check` refuses, or change where the
//! service listens and stores.

use crate::config::Config;
use crate::diagnostic::Diagnostic;
use crate::pipeline::{Ctx, Loaded};
use crate::rules::RuleSet;
use chrono::{DateTime, Utc};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Loads config and rules from where the running config came from; on success swaps
/// them in, on failure keeps the old ones. Either way the outcome is logged (the service
/// records it too: `AppState::reload`).
/// The files must first pass `membersync check` — the same function, so the service
/// refuses exactly what `check` refuses (its warnings do not refuse). Both read one copy
/// of the files (a private copy taken first), so an editor still writing cannot slip a version past
/// the check.
pub fn reload(ctx: &Ctx, trigger: &str) -> Result<String, Vec<Diagnostic>> {
    let now = ctx.clock.now();
    let old = ctx.config();
    let result = match Snapshot::take(&old.path) {
        Ok(snap) => check_and_load(&old, snap.as_ref(), now),
        Err(e) => Err(vec![Diagnostic::new(
            old.path.display().to_string(),
            1,
            1,
            format!("cannot copy the files to check them: {e}"),
        )]),
    };
    match result {
        Ok((config, rules)) => {
            ctx.swap(Loaded::new(config, rules));
            let version = ctx.rules().version.clone();
            tracing::info!(%trigger, %version, "Rules reloaded.");
            Ok(version)
        }
        Err(errors) => {
            for e in &errors {
                tracing::error!(%trigger, problem = %e, "Reload refused; the previous rules stay in force.");
            }
            Err(errors)
        }
    }
}

/// `check`, then the load, both on the snapshot's copy when there is one.
fn check_and_load(
    old: &Config,
    snap: Option<&Snapshot>,
    now: DateTime<Utc>,
) -> Result<(Config, RuleSet), Vec<Diagnostic>> {
    let path = snap.map_or(old.path.as_path(), |s| s.config.as_path());
    let checked = crate::check::check(path);
    if !checked.errors.is_empty() {
        return Err(checked.errors);
    }
    let mut config = Config::load(path).map_err(|e| e.0)?;
    let rules = RuleSet::load(&config.rules_dir, "rules", now).map_err(|e| e.0)?;
    if let Some(s) = snap {
        // Back to where the files live (the watch, the next reload).
        config.path = old.path.clone();
        config.rules_dir = old.path.parent().unwrap_or(Path::new("")).join(&s.rules_rel);
    }
    // Where the service listens and stores cannot change while it runs.
    config.database = old.database.clone();
    config.listen = old.listen.clone();
    // Off loopback, an edit cannot bring in what `serve` refuses to start with.
    let defaults = config.defaults_off_loopback();
    if !defaults.is_empty() {
        let shown = old.path.display().to_string();
        return Err(defaults
            .iter()
            .map(|s| {
                let mut d = Diagnostic::new(
                    &shown,
                    1,
                    1,
                    format!("{s} is still its built-in local value while listening on {}", config.listen),
                );
                d.hint =
                    Some("set the variable named (secrets come from the environment), or listen on 127.0.0.1".into());
                d
            })
            .collect());
    }
    Ok((config, rules))
}

/// The config file and the rules directory, copied once into a private directory, so that
/// `check` and the load read the same bytes. Taken when the rules directory lies under
/// the config's own (the usual layout); otherwise `None`, and both read the files in place.
struct Snapshot {
    dir: PathBuf,
    config: PathBuf,
    rules_rel: PathBuf,
}

impl Snapshot {
    fn take(config_path: &Path) -> std::io::Result<Option<Snapshot>> {
        let text = std::fs::read(config_path)?;
        let rules_rel = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| crate::yaml::from_str::<crate::config::ConfigFile>(t).ok())
            .and_then(|c| c.rules_dir)
            .unwrap_or_else(|| "rules".into());
        let rules_rel = PathBuf::from(rules_rel);
        let outside = rules_rel.is_absolute() || rules_rel.components().any(|c| c == Component::ParentDir);
        let Some(name) = config_path.file_name().filter(|_| !outside) else { return Ok(None) };
        let dir = std::env::temp_dir().join(format!("membersync-reload-{}", uuid::Uuid::new_v4()));
        let snap = Snapshot { config: dir.join(name), dir, rules_rel };
        std::fs::create_dir_all(&snap.dir)?;
        std::fs::write(&snap.config, &text)?;
        let base = config_path.parent().unwrap_or(Path::new(""));
        copy_tree(&base.join(&snap.rules_rel), &snap.dir.join(&snap.rules_rel))?;
        Ok(Some(snap))
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies a directory's files and subdirectories (a missing one copies nothing; `check`
/// reports it). An entry that cannot be read as a file is copied as an empty directory,
/// so that `check` reports it as it would in place.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(from) else { return Ok(()) };
    std::fs::create_dir_all(to)?;
    for entry in entries {
        let entry = entry?;
        let (src, dest) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_tree(&src, &dest)?;
        } else if std::fs::copy(&src, &dest).is_err() {
            std::fs::create_dir_all(&dest)?;
        }
    }
    Ok(())
}

/// Watches the rules directory and the config file of `config`; calls `reload` (debounced)
/// on any change until `shutdown` resolves. Returns at once if the watch cannot be set up
/// (logged).
pub async fn watch(config: &Config, reload: impl Fn(), shutdown: impl std::future::Future<Output = ()>) {
    use notify::{RecursiveMode, Watcher};
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
    if let Err(e) = watcher.watch(&config.rules_dir, RecursiveMode::Recursive) {
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
                reload();
            }
            _ = &mut shutdown => return,
        }
    }
}
