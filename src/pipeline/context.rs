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
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// One consistent snapshot of what operators edit: the config (tenants, provider YAML)
/// and the rule set. An event is processed under one snapshot from start to commit; a
/// reload swaps in a new one for the events after it. Its version (`rules.version`, the
/// one every decision records) covers everything that decides: every rule file, every
/// provider file, and each tenant's policy and product → access map.
pub struct Loaded {
    pub config: Arc<Config>,
    pub rules: Arc<RuleSet>,
    policies: HashMap<String, Dynamic>,
}

impl Loaded {
    pub fn new(config: Config, rules: RuleSet) -> Loaded {
        let mut rules = rules;
        rules.version = version_of(&rules, &config);
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

    /// The same rules and policies under `config`, which differs in what the version does
    /// not cover (API roots and keys: a scenario pointing a provider at its fake API).
    pub fn with_api(&self, config: Config) -> Loaded {
        Loaded { config: Arc::new(config), rules: self.rules.clone(), policies: self.policies.clone() }
    }

    pub(super) fn policy(&self, tenant: &str) -> Dynamic {
        self.policies.get(tenant).cloned().unwrap_or_else(|| Dynamic::from_map(rhai::Map::new()))
    }
}

/// The snapshot's version: the first 12 hex digits of a SHA-256 over the rule files, the
/// provider files as read (their meaning: comments and layout do not count) and each
/// tenant's policy and product map. Secrets are not part of it.
pub fn version_of(rules: &RuleSet, config: &Config) -> String {
    let mut h = Sha256::new();
    let mut part = |label: &str, bytes: &[u8]| {
        h.update(label.as_bytes());
        h.update([0]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part("rules", rules.source_hash().as_bytes());
    for (name, x) in &config.extractors {
        part(&format!("provider {name}"), &serde_json::to_vec(&x.spec).unwrap_or_default());
    }
    for (name, t) in &config.tenants {
        part(&format!("tenant {name} policy"), &serde_json::to_vec(&t.policy).unwrap_or_default());
        for (provider, p) in &t.providers {
            part(&format!("tenant {name} products {provider}"), &serde_json::to_vec(&p.products).unwrap_or_default());
        }
    }
    hex::encode(&h.finalize()[..6])
}

/// Everything the pipeline needs: the store, the clock and the snapshot in force. Shared
/// by whatever drives it (the service's `AppState`, the timer task, the CLI).
pub struct Ctx {
    loaded: RwLock<Arc<Loaded>>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// Woken when a timer is scheduled, so the timer task re-reads the next due time.
    pub timers_changed: tokio::sync::Notify,
    /// How often this service has logged each kind of unauthenticated failure lately.
    pub failure_log: crate::logging::Throttle,
}

impl Ctx {
    pub fn new(config: Config, rules: RuleSet, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Ctx {
        Ctx {
            loaded: RwLock::new(Arc::new(Loaded::new(config, rules))),
            store,
            clock,
            timers_changed: tokio::sync::Notify::new(),
            failure_log: Default::default(),
        }
    }

    /// A context sharing an existing snapshot (a scratch run under the rules in force).
    pub fn with_loaded(loaded: Arc<Loaded>, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Ctx {
        Ctx {
            loaded: RwLock::new(loaded),
            store,
            clock,
            timers_changed: tokio::sync::Notify::new(),
            failure_log: Default::default(),
        }
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
