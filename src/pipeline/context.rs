//! What an event is processed under: the snapshot of config and rules in force (`Loaded`,
//! swapped whole by a reload) and the pipeline's context (`Ctx`: store, clock, snapshot).
//!
//! What this module must never do: load files (reload does) or hold the state of what
//! drives the pipeline (the service's `AppState` does).

use crate::clock::Clock;
use crate::config::Config;
use crate::rules::RuleSet;
use crate::store::Store;
use rhai::Dynamic;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// One consistent snapshot of what operators edit: the config (tenants, provider YAML)
/// and the rule set. An event is processed under one snapshot from start to commit; a
/// reload swaps in a new one for the events after it.
pub struct Loaded {
    pub config: Arc<Config>,
    pub rules: Arc<RuleSet>,
    policies: HashMap<String, Dynamic>,
}

impl Loaded {
    pub fn new(config: Config, rules: RuleSet) -> Loaded {
        let policies = config
            .tenants
            .iter()
            .map(|(name, t)| {
                let d = rhai::serde::to_dynamic(&t.policy).unwrap_or_else(|_| Dynamic::from_map(rhai::Map::new()));
                (name.clone(), d)
            })
            .collect();
        Loaded { config: Arc::new(config), rules: Arc::new(rules), policies }
    }

    pub(super) fn policy(&self, tenant: &str) -> Dynamic {
        self.policies.get(tenant).cloned().unwrap_or_else(|| Dynamic::from_map(rhai::Map::new()))
    }
}

/// Everything the pipeline needs: the store, the clock and the snapshot in force. Shared
/// by whatever drives it (the service's `AppState`, the timer task, the CLI).
pub struct Ctx {
    loaded: RwLock<Arc<Loaded>>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// Woken when a timer is scheduled, so the timer task re-reads the next due time.
    pub timers_changed: tokio::sync::Notify,
}

impl Ctx {
    pub fn new(config: Config, rules: RuleSet, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Ctx {
        Ctx {
            loaded: RwLock::new(Arc::new(Loaded::new(config, rules))),
            store,
            clock,
            timers_changed: tokio::sync::Notify::new(),
        }
    }

    /// A context sharing an existing snapshot (a scratch run under the rules in force).
    pub fn with_loaded(loaded: Arc<Loaded>, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Ctx {
        Ctx { loaded: RwLock::new(loaded), store, clock, timers_changed: tokio::sync::Notify::new() }
    }

    /// The snapshot in force.
    pub fn loaded(&self) -> Arc<Loaded> {
        self.loaded.read().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.loaded().config.clone()
    }

    /// The rule set in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.loaded().rules.clone()
    }

    /// Swaps in a new snapshot; events already in the writer finish under the old one.
    pub fn swap(&self, loaded: Loaded) {
        match self.loaded.write() {
            Ok(mut r) => *r = Arc::new(loaded),
            Err(p) => *p.into_inner() = Arc::new(loaded),
        }
    }
}
