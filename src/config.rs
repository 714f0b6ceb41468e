//! Configuration: `membersync.yaml` as written (`ConfigFile`) → resolved (`Config`), with
//! secrets read from the environment and every provider file under `rules/providers/`
//! compiled. Problems are gathered, not reported one at a time.
//!
//! What this module must never do: log or show a secret (they are `Secret`s), or stop at
//! the first problem.

use crate::diagnostic::Diagnostic;
use crate::extract::Extractor;
use crate::secret::Secret;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Loading the configuration failed; every problem is listed.
#[derive(Debug, thiserror::Error)]
#[error("{}", crate::diagnostic::render(.0))]
pub struct Error(pub Vec<Diagnostic>);

/// `membersync.yaml` as written.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address to listen on (env `MEMBERSYNC_LISTEN` overrides).
    #[serde(default)]
    pub listen: Option<String>,
    /// SQLite file path (env `MEMBERSYNC_DATABASE` overrides), relative to the config file.
    #[serde(default)]
    pub database: Option<String>,
    /// Bearer token for the admin API (env `MEMBERSYNC_ADMIN_TOKEN` overrides).
    #[serde(default)]
    pub admin_token: Option<SecretSpec>,
    /// Bearer token for `GET /metrics` (a scraper's; the global admin token is accepted
    /// too). Set, `/metrics` answers 401 without one of them; unset, it answers anyone (the
    /// counts name no tenant).
    #[serde(default)]
    pub metrics_token: Option<SecretSpec>,
    /// Bearer token for AI assistants at `/mcp` (env `MEMBERSYNC_MCP_TOKEN`): read-only
    /// tools over every tenant. The admin token is not accepted there. Unset: `/mcp`
    /// answers 401.
    #[serde(default)]
    pub mcp_token: Option<SecretSpec>,
    /// Directory holding `*.rhai` and `providers/*.yaml`, relative to the config file.
    #[serde(default)]
    pub rules_dir: Option<String>,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Tenants by name (the `{tenant}` URL segment).
    pub tenants: BTreeMap<String, TenantSpec>,
    /// Reconciliation schedule and limits.
    #[serde(default)]
    pub reconcile: ReconcileConfigSpec,
    /// How long raw deliveries are kept (`membersync prune`).
    #[serde(default)]
    pub retention: RetentionSpec,
    /// What erasing a member's personal data removes (`membersync erase`).
    #[serde(default)]
    pub erasure: ErasureSpec,
}

/// How long raw deliveries are kept.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionSpec {
    /// Raw bodies and headers of deliveries received more than this many days ago are
    /// dropped by `membersync prune`, and by `serve` once a day; each event's canonical
    /// form, outcome, rule and transition stay. Unset: kept forever.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub raw_body_days: Option<u32>,
}

/// What erasing a member's personal data removes from stored raw bodies, beyond every
/// value that is the member's email or name (or a word of it).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErasureSpec {
    /// Field names (any depth, any case) whose values are personal: removed from the
    /// member's stored bodies whatever they hold (a phone number, an address line).
    #[serde(default)]
    pub personal_fields: Vec<String>,
}

/// How often and how fast memberships are compared with the providers.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfigSpec {
    /// Run the schedule in `serve`. Default true (memberships of providers without an
    /// API key are skipped anyway).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Each membership is compared at most once per this many seconds. Default 86400.
    #[serde(default)]
    pub interval_secs: Option<u64>,
    /// Requests per second to each provider's API. Default 5.
    #[serde(default)]
    pub per_provider_rate_per_sec: Option<f64>,
    /// Time limit for one provider request, in seconds. Default 10.
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// Longest `Retry-After` honoured by waiting; a longer one ends the attempt as
    /// `provider_unreachable` (retried next pass). Default 120.
    #[serde(default)]
    pub max_retry_after_secs: Option<u64>,
}

/// The resolved reconciliation settings.
#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    pub enabled: bool,
    pub interval: std::time::Duration,
    pub rate_per_sec: f64,
    pub timeout: std::time::Duration,
    pub max_retry_after: std::time::Duration,
}

impl ReconcileSettings {
    fn from_spec(s: &ReconcileConfigSpec) -> ReconcileSettings {
        use std::time::Duration;
        ReconcileSettings {
            enabled: s.enabled.unwrap_or(true),
            interval: Duration::from_secs(s.interval_secs.unwrap_or(86_400).max(1)),
            rate_per_sec: s.per_provider_rate_per_sec.filter(|r| *r > 0.0).unwrap_or(5.0),
            timeout: Duration::from_secs_f64(s.timeout_secs.filter(|t| *t > 0.0).unwrap_or(10.0)),
            max_retry_after: Duration::from_secs(s.max_retry_after_secs.unwrap_or(120)),
        }
    }
}

/// Request and queue limits.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Largest webhook body accepted, in bytes (413 above). Default 1 MiB.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// A request's headers must arrive within this many seconds, or the connection is
    /// closed; an idle keep-alive connection waiting for its next request closes then too.
    /// Default 10.
    #[serde(default)]
    pub header_timeout_secs: Option<u64>,
    /// A webhook's body must arrive within this many seconds (408 after). Default 30.
    #[serde(default)]
    pub body_timeout_secs: Option<u64>,
    /// A client that takes none of its answer for this many seconds is disconnected.
    /// Default 30.
    #[serde(default)]
    pub write_timeout_secs: Option<u64>,
    /// Most connections open at once; past it the service waits before accepting more
    /// rather than failing accepts. Default 512 (under the usual open-file limit of 1024,
    /// with room for the store and the log).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Writes that may wait before new ones get 503. Default 4096.
    #[serde(default)]
    pub queue_capacity: Option<usize>,
    /// Most events committed in one transaction. Default 32.
    #[serde(default)]
    pub max_batch: Option<usize>,
    /// Least time between two passes of the WAL checkpointer, in milliseconds. Shorter
    /// passes are smaller (a lower p99 under load) and cost more CPU per event. Default 20.
    #[serde(default)]
    pub checkpoint_interval_ms: Option<u64>,
    /// Removed: ignored, with a warning at start (kept so that existing files load). It
    /// opened the database file beside SQLite, and closing that descriptor dropped the
    /// process's locks on the file.
    #[serde(default)]
    pub drop_appended_pages: Option<bool>,
    /// Removed: ignored, with a warning at start (kept so that existing files load). The
    /// WAL-writing VFS it switched on acknowledged commits it had not yet written.
    #[serde(default)]
    pub coalesce_wal_writes: Option<bool>,
    /// Most time, in seconds, the integrity check at start (`PRAGMA quick_check`) may
    /// take; a larger database is served unchecked, with a warning. 0 skips the check.
    /// Default 10.
    #[serde(default)]
    pub startup_check_secs: Option<u64>,
}

/// A secret: a literal, or an environment variable with an optional local default.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum SecretSpec {
    Env {
        env: String,
        #[serde(default)]
        default: Option<String>,
    },
    Literal(String),
}

impl SecretSpec {
    /// The environment variable it falls back from, when it resolves to its `default:` (the
    /// built-in local value: no variable set, or the variable set to that very value).
    fn defaulted(&self) -> Option<&str> {
        match self {
            SecretSpec::Env { env, default: Some(d) } => match std::env::var(env).ok().filter(|v| !v.is_empty()) {
                None => Some(env),
                Some(v) if &v == d => Some(env),
                Some(_) => None,
            },
            _ => None,
        }
    }

    fn resolve(&self) -> Option<Secret> {
        match self {
            SecretSpec::Literal(s) => Some(Secret::new(s.clone())),
            SecretSpec::Env { env, default } => {
                std::env::var(env).ok().filter(|v| !v.is_empty()).or_else(|| default.clone()).map(Secret::new)
            }
        }
    }
}

/// One tenant (one platform/app).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// A bearer token for this tenant's admin API only (members, events, leads of this
    /// tenant); the global `admin_token` sees every tenant.
    #[serde(default)]
    pub admin_token: Option<SecretSpec>,
    /// A bearer token for AI assistants at `/mcp` that sees this tenant only.
    #[serde(default)]
    pub mcp_token: Option<SecretSpec>,
    /// Policy values handed to the rules as `cfg` (e.g. `grace_days`).
    #[serde(default)]
    pub policy: serde_json::Map<String, serde_json::Value>,
    /// Providers this tenant accepts webhooks from.
    #[serde(default)]
    pub providers: BTreeMap<String, TenantProviderSpec>,
}

/// A tenant's settings for one provider.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantProviderSpec {
    /// Webhook signing secret.
    pub secret: SecretSpec,
    /// API key for reconciliation (e.g. env `STRIPE_API_KEY`); without one this
    /// provider's memberships are not reconciled.
    #[serde(default)]
    pub api_key: Option<SecretSpec>,
    /// Product (or plan/price) id → access levels it grants.
    #[serde(default)]
    pub products: BTreeMap<String, Vec<String>>,
}

/// A resolved tenant provider.
#[derive(Debug, Clone)]
pub struct TenantProvider {
    pub secret: Option<Secret>,
    pub api_key: Option<Secret>,
    pub products: BTreeMap<String, Vec<String>>,
}

/// A resolved tenant.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub admin_token: Option<Secret>,
    pub mcp_token: Option<Secret>,
    pub policy: serde_json::Map<String, serde_json::Value>,
    pub providers: BTreeMap<String, TenantProvider>,
}

impl Tenant {
    /// Access levels for a product (tried by product id, then plan id); `None` when unmapped.
    pub fn access_levels(&self, provider: &str, product: Option<&str>, plan: Option<&str>) -> Option<Vec<String>> {
        if provider == crate::manual::PROVIDER {
            // A manual grant's product is the levels it grants (checked when granted).
            return product.map(|p| p.split(crate::manual::LEVEL_SEPARATOR).map(str::to_string).collect());
        }
        let p = self.providers.get(provider)?;
        [product, plan].into_iter().flatten().find_map(|id| p.products.get(id).cloned())
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: String,
    pub database: String,
    pub admin_token: Option<Secret>,
    /// Bearer token for `GET /metrics` (the admin token is accepted too).
    pub metrics_token: Option<Secret>,
    pub mcp_token: Option<Secret>,
    pub rules_dir: PathBuf,
    pub max_body_bytes: usize,
    /// How long a client may take: its headers, its body, its silence; and how many may be
    /// connected at once.
    pub connections: ConnectionLimits,
    pub queue_capacity: usize,
    pub max_batch: usize,
    pub checkpoint_interval: std::time::Duration,
    /// Settings of `limits` that are no longer used, as written (warned about at start).
    pub removed_settings: Vec<String>,
    pub startup_check: std::time::Duration,
    pub tenants: BTreeMap<String, Tenant>,
    pub extractors: BTreeMap<String, Extractor>,
    /// Provider → its verification, compiled from the same file.
    pub verifiers: BTreeMap<String, crate::verify::Verifier>,
    pub reconcile: ReconcileSettings,
    /// Raw bodies older than this are pruned (`retention.raw_body_days`); `None`: kept.
    pub raw_body_days: Option<u32>,
    /// Field names whose values erasure removes (`erasure.personal_fields`), lowercased.
    pub personal_fields: Vec<String>,
    /// Provider → API root from `<PROVIDER>_API_BASE` (overrides the YAML's `api_base`).
    pub api_bases: BTreeMap<String, String>,
    /// Secrets in force at their built-in `default:` (no environment variable set), each as
    /// `where (VARIABLE)`: fine on loopback, refused by `serve` on any other address.
    pub defaulted_secrets: Vec<String>,
}

/// Defaults for local use, documented in the README.
/// What a client connection may take (`limits:` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_timeout: std::time::Duration,
    pub body_timeout: std::time::Duration,
    pub write_timeout: std::time::Duration,
    pub max_connections: usize,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATABASE: &str = "membersync.db";

impl Config {
    /// The secrets still at their built-in local values (`defaulted_secrets`) when the
    /// service listens anywhere but loopback: what `serve` refuses to start with and a
    /// reload refuses to bring in. Empty on loopback.
    pub fn defaults_off_loopback(&self) -> &[String] {
        let loopback = match self.listen.parse::<std::net::SocketAddr>() {
            Ok(addr) => addr.ip().is_loopback(),
            Err(_) => self.listen.starts_with("localhost:"),
        };
        if loopback {
            &[]
        } else {
            &self.defaulted_secrets
        }
    }

    /// Reads `path` and everything it points at.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let shown = path.display().to_string();
        let src = std::fs::read_to_string(path)
            .map_err(|e| Error(vec![Diagnostic::new(&shown, 1, 1, format!("cannot read config: {e}"))]))?;
        let file: ConfigFile =
            crate::yaml::from_str(&src).map_err(|e| Error(vec![Diagnostic::from_yaml(&shown, &e)]))?;
        Config::compile(path, &src, file)
    }

    /// Resolves a parsed config file.
    pub fn compile(path: &Path, src: &str, file: ConfigFile) -> Result<Config, Error> {
        let shown = path.display().to_string();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut diags = Vec::new();
        let rules_dir = base.join(file.rules_dir.as_deref().unwrap_or("rules"));
        let extractors = load_extractors(&rules_dir, &mut diags);
        let mut tenants = BTreeMap::new();
        for (name, t) in &file.tenants {
            let mut providers = BTreeMap::new();
            for (pname, p) in &t.providers {
                if !extractors.contains_key(pname) {
                    let (line, col) = crate::diagnostic::locate(src, &format!("{pname}:"));
                    let known: Vec<&str> = extractors.keys().map(String::as_str).collect();
                    let d = Diagnostic::new(
                        &shown,
                        line,
                        col,
                        format!(
                            "tenant `{name}` names provider `{pname}`, which has no valid rules/providers/{pname}.yaml"
                        ),
                    );
                    diags.push(d.suggest(pname, &known, false, &[]));
                }
                providers.insert(
                    pname.clone(),
                    TenantProvider {
                        secret: p.secret.resolve(),
                        api_key: p.api_key.as_ref().and_then(SecretSpec::resolve),
                        products: p.products.clone(),
                    },
                );
            }
            tenants.insert(
                name.clone(),
                Tenant {
                    name: name.clone(),
                    admin_token: t.admin_token.as_ref().and_then(SecretSpec::resolve),
                    mcp_token: t.mcp_token.as_ref().and_then(SecretSpec::resolve),
                    policy: t.policy.clone(),
                    providers,
                },
            );
        }
        if !diags.is_empty() {
            return Err(Error(diags));
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let database =
            env("MEMBERSYNC_DATABASE").or(file.database.clone()).unwrap_or_else(|| DEFAULT_DATABASE.to_string());
        let database = if database == ":memory:"
            || crate::store::pg::is_postgres_url(&database)
            || Path::new(&database).is_absolute()
        {
            database
        } else {
            base.join(database).display().to_string()
        };
        let mut defaulted_secrets = Vec::new();
        if let Some(var) = file.admin_token.as_ref().and_then(SecretSpec::defaulted) {
            defaulted_secrets.push(format!("admin_token ({var})"));
        }
        for (name, t) in &file.tenants {
            if let Some(var) = t.admin_token.as_ref().and_then(SecretSpec::defaulted) {
                defaulted_secrets.push(format!("tenants.{name}.admin_token ({var})"));
            }
            for (pname, p) in &t.providers {
                if let Some(var) = p.secret.defaulted() {
                    defaulted_secrets.push(format!("tenants.{name}.providers.{pname}.secret ({var})"));
                }
            }
        }
        let config = Config {
            defaulted_secrets,
            path: path.to_path_buf(),
            listen: env("MEMBERSYNC_LISTEN").or(file.listen.clone()).unwrap_or_else(|| DEFAULT_LISTEN.to_string()),
            database,
            admin_token: env("MEMBERSYNC_ADMIN_TOKEN")
                .map(Secret::new)
                .or_else(|| file.admin_token.as_ref().and_then(SecretSpec::resolve)),
            metrics_token: file.metrics_token.as_ref().and_then(SecretSpec::resolve),
            mcp_token: env("MEMBERSYNC_MCP_TOKEN")
                .map(Secret::new)
                .or_else(|| file.mcp_token.as_ref().and_then(SecretSpec::resolve)),
            rules_dir,
            max_body_bytes: file.limits.max_body_bytes.unwrap_or(1024 * 1024),
            connections: ConnectionLimits {
                header_timeout: std::time::Duration::from_secs(file.limits.header_timeout_secs.unwrap_or(10).max(1)),
                body_timeout: std::time::Duration::from_secs(file.limits.body_timeout_secs.unwrap_or(30).max(1)),
                write_timeout: std::time::Duration::from_secs(file.limits.write_timeout_secs.unwrap_or(30).max(1)),
                max_connections: file.limits.max_connections.unwrap_or(512).max(1),
            },
            queue_capacity: file.limits.queue_capacity.unwrap_or(4096),
            max_batch: file.limits.max_batch.unwrap_or(32),
            checkpoint_interval: std::time::Duration::from_millis(file.limits.checkpoint_interval_ms.unwrap_or(20)),
            removed_settings: [
                ("limits.drop_appended_pages", file.limits.drop_appended_pages.is_some()),
                ("limits.coalesce_wal_writes", file.limits.coalesce_wal_writes.is_some()),
            ]
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| name.to_string())
            .collect(),
            startup_check: std::time::Duration::from_secs(file.limits.startup_check_secs.unwrap_or(10)),
            tenants,
            reconcile: ReconcileSettings::from_spec(&file.reconcile),
            raw_body_days: file.retention.raw_body_days,
            personal_fields: file.erasure.personal_fields.iter().map(|f| f.to_lowercase()).collect(),
            api_bases: extractors
                .keys()
                .filter_map(|p| env(&format!("{}_API_BASE", p.to_ascii_uppercase())).map(|b| (p.clone(), b)))
                .collect(),
            verifiers: extractors
                .iter()
                .map(|(p, x)| (p.clone(), crate::verify::Verifier::compile(&x.spec.verify, &x.spec.verify_also)))
                .collect(),
            extractors,
        };
        // An MCP token opens less than an admin token: one that is also an admin token
        // would make the admin token usable at /mcp, and the MCP token able to write. And
        // each opens one scope: a tenant's equal to another's, or to the global one, would
        // open whichever is found first.
        let admins: Vec<&Secret> =
            config.admin_token.iter().chain(config.tenants.values().filter_map(|t| t.admin_token.as_ref())).collect();
        let mcps: Vec<(Option<&str>, &Secret)> = config
            .mcp_token
            .iter()
            .map(|t| (None, t))
            .chain(config.tenants.values().filter_map(|t| Some((Some(t.name.as_str()), t.mcp_token.as_ref()?))))
            .collect();
        let named = |tenant: Option<&str>| match tenant {
            None => "mcp_token".to_string(),
            Some(t) => format!("tenants.{t}.mcp_token"),
        };
        // Where a tenant's key is written: after its own `name:` line under `tenants:`.
        let at = |tenant: Option<&str>| {
            let from = tenant
                .and_then(|t| {
                    let tenants = src.find("\ntenants:")?;
                    Some(tenants + src[tenants..].find(&format!(" {t}:"))?)
                })
                .unwrap_or(0);
            let (line, col) = crate::diagnostic::locate(&src[from..], "mcp_token");
            let lines_before = src[..from].matches('\n').count();
            if src[from..].contains("mcp_token") {
                (line + lines_before, col)
            } else {
                (1, 1)
            }
        };
        // The scraper's token opens `/metrics` only.
        let metrics = config.metrics_token.as_ref();
        if metrics.is_some_and(|m| admins.iter().any(|a| a.expose() == m.expose())) {
            let (line, col) = crate::diagnostic::locate(src, "metrics_token");
            let why = "metrics_token is also an admin token: give the scraper a token of its own";
            return Err(Error(vec![Diagnostic::new(&shown, line, col, why)]));
        }
        for (i, (tenant, mcp)) in mcps.iter().enumerate() {
            let why = if admins.iter().any(|a| a.expose() == mcp.expose()) {
                Some(format!("{} is also an admin token: give the assistant a token of its own", named(*tenant)))
            } else if metrics.is_some_and(|m| m.expose() == mcp.expose()) {
                Some(format!("{} is also the metrics_token: give the assistant a token of its own", named(*tenant)))
            } else {
                mcps[..i].iter().find(|(_, other)| other.expose() == mcp.expose()).map(|(other, _)| {
                    format!(
                        "{} is the same token as {}: each MCP token opens one scope, so give each its own",
                        named(*tenant),
                        named(*other)
                    )
                })
            };
            if let Some(why) = why {
                let (line, col) = at(*tenant);
                return Err(Error(vec![Diagnostic::new(&shown, line, col, why)]));
            }
        }
        Ok(config)
    }
}

fn load_extractors(rules_dir: &Path, diags: &mut Vec<Diagnostic>) -> BTreeMap<String, Extractor> {
    let dir = rules_dir.join("providers");
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) => {
            diags.push(Diagnostic::new(
                dir.display().to_string(),
                1,
                1,
                format!("cannot read provider directory: {e}"),
            ));
            return out;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    for p in paths {
        let shown = format!("rules/providers/{}", p.file_name().unwrap_or_default().to_string_lossy());
        match std::fs::read_to_string(&p) {
            Ok(src) => match Extractor::load(&shown, &src) {
                Ok(x) => {
                    out.insert(x.provider.clone(), x);
                }
                Err(e) => diags.extend(e.0),
            },
            Err(e) => diags.push(Diagnostic::new(&shown, 1, 1, format!("cannot read: {e}"))),
        }
    }
    out
}
