//! Rules stage: the policy, in operator-edited Rhai files under `rules/`. Given a canonical
//! event, the membership as stored and the tenant's policy values, a rule decides which
//! machine input the event becomes and which effects follow. One sandboxed `Engine`, each
//! file compiled once; a rule that raises becomes a dead letter with its file:line, never
//! a crash. Rules never touch the store or the network.

mod api;

use crate::canonical::CanonicalEvent;
use crate::diagnostic::Diagnostic;
use crate::effects::Effect;
use crate::machine::{Input, MState};
use chrono::{DateTime, TimeZone, Utc};
use rhai::{CallFnOptions, Dynamic, Engine, Map, Scope, AST};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Loading the rule set failed; every problem is listed.
#[derive(Debug, thiserror::Error)]
#[error("{}", crate::diagnostic::render(.0))]
pub struct LoadError(pub Vec<Diagnostic>);

/// A rule raised or returned something the engine cannot use (the event is dead-lettered).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}:{column}: {message}")]
pub struct Error {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The membership as the rules see it.
#[derive(Debug, Clone, Default)]
pub struct MembershipView {
    pub exists: bool,
    /// The membership's provider (`manual` for an operator's grant); none before it exists.
    pub provider: Option<String>,
    pub state: Option<MState>,
    pub period_end: Option<DateTime<Utc>>,
    pub grace_until: Option<DateTime<Utc>>,
    pub access_until: Option<DateTime<Utc>>,
    pub last_event_at: Option<DateTime<Utc>>,
    pub last_event_rank: i64,
    pub cancel_at_period_end: bool,
    pub product_id: Option<String>,
    pub plan_id: Option<String>,
    pub status: Option<String>,
    /// What operators were told to look at (e.g. `no renewal seen`).
    pub flags: Vec<String>,
    /// The email of the member the event is about, as stored (an event may name none).
    pub member_email: Option<String>,
}

/// Which rule decided, for the activity log and `explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    pub file: String,
    pub function: String,
    pub line: usize,
    pub version: String,
}

/// What a rule decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub input: Option<Input>,
    pub effects: Vec<Effect>,
    /// The rule says the event changes nothing (stored as `ignored`, with this reason).
    pub ignore: Option<String>,
    /// The rule refuses the event (stored as `refused`, flagged, with this reason).
    pub refuse: Option<String>,
    pub rule: Option<RuleRef>,
}

struct RuleFile {
    /// Path shown to operators, e.g. `rules/grace.rhai`.
    name: String,
    ast: AST,
    src: String,
}

/// The compiled rule set, shared read-only by every request; hot reload swaps the whole.
pub struct RuleSet {
    engine: Arc<Engine>,
    files: Vec<RuleFile>,
    handlers: HashMap<String, usize>,
    /// Line of each handler's `fn`, found once at compile (every decision records it).
    lines: HashMap<String, usize>,
    pub version: String,
    pub loaded_at: DateTime<Utc>,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet").field("version", &self.version).field("files", &self.files.len()).finish()
    }
}

/// Operation limit per rule call: a runaway loop stops here.
pub const MAX_OPERATIONS: u64 = 200_000;

/// Builds the sandboxed engine: limits on, strict variables, no imports, no eval.
pub fn engine() -> Engine {
    let mut e = Engine::new();
    e.set_max_operations(MAX_OPERATIONS)
        .set_max_call_levels(32)
        .set_max_expr_depths(64, 32)
        .set_max_string_size(64 * 1024)
        .set_max_array_size(10_000)
        .set_max_map_size(10_000)
        .set_max_variables(256)
        .set_max_functions(256)
        .set_max_modules(0)
        .set_strict_variables(true)
        .set_fail_on_invalid_map_property(true)
        .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    e.disable_symbol("eval");
    e.on_print(|s| tracing::info!(target: "membersync::rules", "{s}"));
    e.on_debug(|s, src, pos| tracing::debug!(target: "membersync::rules", ?src, %pos, "{s}"));
    api::register(&mut e);
    e
}

impl RuleSet {
    /// Loads and compiles every `*.rhai` in `dir` (sorted by name), gathering every problem.
    /// `shown_dir` is how the directory is named in diagnostics (e.g. `rules`).
    pub fn load(dir: &Path, shown_dir: &str, now: DateTime<Utc>) -> Result<RuleSet, LoadError> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| {
                LoadError(vec![Diagnostic::new(shown_dir, 1, 1, format!("cannot read rules directory: {e}"))])
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
            .collect();
        names.sort();
        let mut sources = Vec::new();
        for p in names {
            let shown = format!("{shown_dir}/{}", p.file_name().unwrap_or_default().to_string_lossy());
            match std::fs::read_to_string(&p) {
                Ok(src) => sources.push((shown, src)),
                Err(e) => return Err(LoadError(vec![Diagnostic::new(shown, 1, 1, format!("cannot read: {e}"))])),
            }
        }
        RuleSet::compile(sources, now)
    }

    /// Compiles rule sources given as (shown name, text).
    pub fn compile(sources: Vec<(String, String)>, now: DateTime<Utc>) -> Result<RuleSet, LoadError> {
        let engine = Arc::new(engine());
        let mut diags = Vec::new();
        let mut files = Vec::new();
        let mut handlers: HashMap<String, usize> = HashMap::new();
        let mut hasher = Sha256::new();
        for (name, src) in sources {
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(src.as_bytes());
            hasher.update([0]);
            match engine.compile(&src) {
                Ok(mut ast) => {
                    ast.set_source(name.clone());
                    for f in ast.iter_functions() {
                        let fname = f.name.to_string();
                        let is_handler = fname.starts_with("on_")
                            || matches!(fname.as_str(), "is_stale" | "status_matches" | "rank" | "renewal_due_at");
                        if !is_handler {
                            continue;
                        }
                        if let Some(prev) = handlers.get(&fname) {
                            let (line, col) = crate::diagnostic::locate(&src, &format!("fn {fname}"));
                            diags.push(Diagnostic::new(
                                &name,
                                line,
                                col,
                                format!("function `{fname}` is also defined in {}", files_name(&files, *prev)),
                            ));
                        } else {
                            handlers.insert(fname, files.len());
                        }
                    }
                    files.push(RuleFile { name, ast, src });
                }
                Err(e) => {
                    let pos = e.position();
                    diags.push(Diagnostic::new(
                        &name,
                        pos.line().unwrap_or(1),
                        pos.position().unwrap_or(1),
                        e.err_type().to_string(),
                    ));
                }
            }
        }
        for h in handlers.keys() {
            if let Some(kind) = h.strip_prefix("on_") {
                if crate::canonical::EventKind::parse(kind).is_none() {
                    let f = &files[handlers[h]];
                    let (line, col) = crate::diagnostic::locate(&f.src, &format!("fn {h}"));
                    let names: Vec<String> =
                        crate::canonical::EventKind::ALL.iter().map(|k| format!("on_{}", k.as_str())).collect();
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let d = Diagnostic::new(&f.name, line, col, format!("`{h}` handles no canonical kind"));
                    diags.push(d.suggest(h, &names, false, &[]));
                }
            }
        }
        if !diags.is_empty() {
            return Err(LoadError(diags));
        }
        let version = hex::encode(&hasher.finalize()[..6]);
        let lines = handlers
            .iter()
            .map(|(h, &idx)| (h.clone(), crate::diagnostic::locate(&files[idx].src, &format!("fn {h}")).0))
            .collect();
        Ok(RuleSet { engine, files, handlers, lines, version, loaded_at: now })
    }

    /// SHA-256 over every file name and source (the version is its first 12 hex digits).
    pub fn source_hash(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.files {
            h.update(f.name.as_bytes());
            h.update([0]);
            h.update(f.src.as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    }

    /// Names of the loaded files.
    pub fn file_names(&self) -> Vec<String> {
        self.files.iter().map(|f| f.name.clone()).collect()
    }

    fn rule_ref(&self, idx: usize, function: &str) -> RuleRef {
        let f = &self.files[idx];
        RuleRef {
            file: f.name.clone(),
            function: function.to_string(),
            line: match self.lines.get(function) {
                Some(&line) => line,
                None => crate::diagnostic::locate(&f.src, &format!("fn {function}")).0,
            },
            version: self.version.clone(),
        }
    }

    fn call_one(&self, idx: usize, function: &str, arg: Dynamic) -> Result<Dynamic, Error> {
        self.call(idx, function, vec![arg])
    }

    /// Calls a rule function with 1–3 arguments; a raise becomes an `Error` at its position.
    fn call(&self, idx: usize, function: &str, args: Vec<Dynamic>) -> Result<Dynamic, Error> {
        let f = &self.files[idx];
        let mut scope = Scope::new();
        let opts = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let mut a = args.into_iter();
        let (x, y, z) = (a.next(), a.next(), a.next());
        let r: Result<Dynamic, _> = match (x, y, z) {
            (Some(x), None, _) => self.engine.call_fn_with_options(opts, &mut scope, &f.ast, function, (x,)),
            (Some(x), Some(y), None) => self.engine.call_fn_with_options(opts, &mut scope, &f.ast, function, (x, y)),
            (x, y, z) => self.engine.call_fn_with_options(
                opts,
                &mut scope,
                &f.ast,
                function,
                (x.unwrap_or_default(), y.unwrap_or_default(), z.unwrap_or_default()),
            ),
        };
        r.map_err(|e| {
            let pos = e.position();
            Error {
                file: f.name.clone(),
                line: pos.line().unwrap_or(0),
                column: pos.position().unwrap_or(0),
                message: e.to_string(),
            }
        })
    }

    /// Whether the event is older than what the membership reflects (`is_stale` in the
    /// rules; without one, nothing is stale).
    pub fn is_stale(&self, ev: &CanonicalEvent, m: &MembershipView) -> Result<bool, Error> {
        self.is_stale_of(&EventView::of(ev), m)
    }

    /// `is_stale` with the event's view already built.
    pub fn is_stale_of(&self, ev: &EventView, m: &MembershipView) -> Result<bool, Error> {
        let Some(&idx) = self.handlers.get("is_stale") else {
            return Ok(false);
        };
        let out = self.call(idx, "is_stale", vec![ev.0.clone(), api::membership_view(m)])?;
        out.as_bool().map_err(|t| {
            let f = self.rule_ref(idx, "is_stale");
            Error { file: f.file, line: f.line, column: 1, message: format!("is_stale must return a bool, got {t}") }
        })
    }

    /// Whether a provider's status (already mapped onto the vocabulary) agrees with the
    /// membership's state: `status_matches` in the rules, used by reconciliation to tell
    /// drift from agreement. `None` when no rule defines it.
    pub fn status_matches(&self, status: &str, m: &MembershipView) -> Result<Option<bool>, Error> {
        let Some(&idx) = self.handlers.get("status_matches") else {
            return Ok(None);
        };
        let out = self.call(idx, "status_matches", vec![Dynamic::from(status.to_string()), api::membership_view(m)])?;
        out.as_bool().map(Some).map_err(|t| {
            let f = self.rule_ref(idx, "status_matches");
            Error {
                file: f.file,
                line: f.line,
                column: 1,
                message: format!("status_matches must return a bool, got {t}"),
            }
        })
    }

    /// The event's lifecycle rank (`rank` in the rules; 0 without one): orders events
    /// that carry the same provider time.
    pub fn rank(&self, ev: &CanonicalEvent) -> Result<i64, Error> {
        self.rank_of(&EventView::of(ev))
    }

    /// `rank` with the event's view already built.
    pub fn rank_of(&self, ev: &EventView) -> Result<i64, Error> {
        let Some(&idx) = self.handlers.get("rank") else { return Ok(0) };
        let out = self.call_one(idx, "rank", ev.0.clone())?;
        out.as_int().map_err(|t| {
            let f = self.rule_ref(idx, "rank");
            Error { file: f.file, line: f.line, column: 1, message: format!("rank must return an int, got {t}") }
        })
    }

    /// When a membership, as a transition leaves it, expects its next renewal at the
    /// latest: `renewal_due_at(m, cfg)` in the rules, a unix time or `()` for none. The
    /// pipeline keeps the membership's `renewal_due` timer at that time. `None` when no
    /// rule defines it (renewal timers are then left alone).
    pub fn renewal_due_at(&self, m: &MembershipView, policy: &Dynamic) -> Result<Option<Option<DateTime<Utc>>>, Error> {
        let Some(&idx) = self.handlers.get("renewal_due_at") else {
            return Ok(None);
        };
        let out = self.call(idx, "renewal_due_at", vec![api::membership_view(m), policy.clone()])?;
        if out.is_unit() {
            return Ok(Some(None));
        }
        let fail = |message: String| {
            let f = self.rule_ref(idx, "renewal_due_at");
            Error { file: f.file, line: f.line, column: 1, message }
        };
        let secs =
            out.as_int().map_err(|t| fail(format!("renewal_due_at must return a unix time (int) or (), got {t}")))?;
        from_unix(secs)
            .map(|t| Some(Some(t)))
            .ok_or_else(|| fail(format!("renewal_due_at returned {secs}, out of range")))
    }

    /// Runs the rule for the event's kind.
    pub fn decide(
        &self,
        ev: &CanonicalEvent,
        m: &MembershipView,
        policy: &Dynamic,
        now: DateTime<Utc>,
    ) -> Result<Decision, Error> {
        self.decide_of(ev, EventView::of(ev), m, policy, now)
    }

    /// `decide` with the event's view (`view`, built from `ev`) already built. The view is
    /// handed to the rule itself, not a copy: the decision is the last rule call an event
    /// gets.
    pub fn decide_of(
        &self,
        ev: &CanonicalEvent,
        view: EventView,
        m: &MembershipView,
        policy: &Dynamic,
        now: DateTime<Utc>,
    ) -> Result<Decision, Error> {
        let Some(kind) = ev.kind else {
            return Ok(Decision {
                input: None,
                effects: vec![],
                ignore: Some("unmapped event".into()),
                refuse: None,
                rule: None,
            });
        };
        let function = format!("on_{}", kind.as_str());
        let Some(&idx) = self.handlers.get(&function) else {
            return Ok(Decision {
                input: None,
                effects: vec![],
                ignore: None,
                refuse: Some(format!("no rule defines `{function}`")),
                rule: None,
            });
        };
        let mut policy = policy.clone();
        if let Some(mut map) = policy.write_lock::<Map>() {
            map.insert("now".into(), Dynamic::from(now.timestamp()));
        }
        let out = self.call(idx, &function, vec![view.0, api::membership_view(m), policy])?;
        let rule = self.rule_ref(idx, &function);
        api::decision(out, ev)
            .map(|mut d| {
                d.rule = Some(rule.clone());
                d
            })
            .map_err(|message| Error { file: rule.file.clone(), line: rule.line, column: 1, message })
    }
}

/// The event as the rules see it (a map), built once per event: each rule call gets its
/// own copy (a copy shares the strings), so a rule that changes its `ev` changes nothing
/// for the next.
#[derive(Clone)]
pub struct EventView(Dynamic);

impl EventView {
    pub fn of(ev: &CanonicalEvent) -> EventView {
        EventView(api::event_view(ev))
    }
}

fn files_name(files: &[RuleFile], idx: usize) -> String {
    files.get(idx).map(|f| f.name.clone()).unwrap_or_default()
}

/// A unix time in seconds, as the rules see times.
pub(crate) fn unix(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

pub(crate) fn from_unix(s: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(s, 0).single()
}

#[cfg(test)]
mod tests;
