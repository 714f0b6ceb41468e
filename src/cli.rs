//! The command line: one function per command. `anyhow` lives here and in `main.rs` only.
//!
//! What this module must never do: hold library code: a command parses its arguments, calls
//! the library and prints.

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::machine::MState;
use crate::pipeline::Ctx;
use crate::rules::RuleSet;
use crate::store::sqlite::Options;
use crate::store::Store;
use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(name = "membersync", version = crate::VERSION, about = "Keeps member access in sync with payment-provider webhooks.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (webhooks, admin API, timers).
    Serve {
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        /// Address to listen on (overrides the config and MEMBERSYNC_LISTEN).
        #[arg(long)]
        listen: Option<String>,
        /// The database: an SQLite file, or a postgres:// URL shared by several replicas
        /// (overrides the config and MEMBERSYNC_DATABASE).
        #[arg(long)]
        database: Option<String>,
    },
    /// Copy an SQLite database into an empty PostgreSQL database (the move to several
    /// replicas): every row, event numbers kept, in one transaction. Stop `serve` first.
    MigrateStore {
        /// The SQLite database: sqlite://PATH or a path.
        #[arg(long)]
        from: String,
        /// The PostgreSQL database: postgres://USER:PASSWORD@HOST:PORT/NAME (empty).
        #[arg(long)]
        to: String,
    },
    /// Copy the SQLite database into FILE, beside a running `serve`: one consistent
    /// snapshot, checked (`PRAGMA integrity_check`) before it takes FILE's name.
    Backup {
        /// The backup's file (a single SQLite file).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        /// The SQLite database (overrides the config and MEMBERSYNC_DATABASE).
        #[arg(long)]
        database: Option<String>,
    },
    /// Put a backup in place of the SQLite database; `serve` must be stopped. The files it
    /// replaces are renamed aside, not deleted.
    Restore {
        /// A file written by `membersync backup`.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        /// The SQLite database to replace (overrides the config and MEMBERSYNC_DATABASE).
        #[arg(long)]
        database: Option<String>,
    },
    /// Validate the config, provider YAML and Rhai rules; report every problem.
    Check {
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        /// Treat warnings as errors too.
        #[arg(long)]
        strict: bool,
        /// Also list the notes: provider-file paths that no fixture of the provider has.
        #[arg(long)]
        verbose: bool,
    },
    /// Dry-run one payload: print the canonical event and the outcome as JSON.
    Simulate(SimulateArgs),
    /// Re-run stored events through the rules in force (dead letters by default).
    Replay {
        /// Which stored events: failed (default), refused or ignored.
        #[arg(long, default_value = "failed")]
        status: String,
        /// Only events received at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only this member's events.
        #[arg(long)]
        member: Option<String>,
        /// Re-derive memberships from every stored delivery (in range) under the current
        /// rules on a scratch store and print what would differ; writes nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
    },
    /// Set each membership to what its stored deliveries derive under the rules in force
    /// (after a product is mapped, a policy or a rule changes), recorded as events with
    /// source `rederive`; `--dry-run` shows the differences first.
    Rederive {
        /// Only this member's memberships (id or email). Every stored delivery of theirs is
        /// run again: a state derived from part of them would be wrong.
        #[arg(long)]
        member: Option<String>,
        /// Show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
    },
    /// Run scenario files (payloads, clock steps, expected state and access) against
    /// the rules in force, and show a diff where an expectation fails.
    Test {
        /// A scenario file or a directory of them.
        #[arg(default_value = "tests/fixtures/scenarios")]
        dir: PathBuf,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        /// Also show each scenario step by step: the outcome and where the membership stands.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Why does this member (not) have access? Every change with its evidence.
    Explain {
        /// Member id or email.
        member: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
    },
    /// Sign FILE with the tenant's secret the way the provider does and POST it.
    Send {
        #[arg(long)]
        provider: String,
        #[arg(long, default_value = "demo")]
        tenant: String,
        /// Webhook URL; defaults to the local server's URL for this tenant and provider.
        #[arg(long)]
        url: Option<String>,
        /// Extra request header, `Name: value` (repeatable). A `webhook-id` (or `svix-id`)
        /// sets the message id that Standard Webhooks providers sign; without one it is
        /// derived from the body, so the same file sent twice is the same delivery.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        file: PathBuf,
    },
    /// Compare memberships with the providers now and correct drift through the rules:
    /// one member's (`--member`), or one pass over every membership.
    Reconcile {
        /// Only this member's memberships (its `mbr_…` id or an email).
        #[arg(long)]
        member: Option<String>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        /// The database: an SQLite file, or a postgres:// URL shared by several replicas
        /// (overrides the config and MEMBERSYNC_DATABASE).
        #[arg(long)]
        database: Option<String>,
    },
    /// Drop the raw bodies (and headers) of deliveries older than `retention.raw_body_days`
    /// (`serve` also does it daily when that is set). Canonical forms, outcomes, rules and
    /// transitions stay, so `explain` still tells the story.
    Prune {
        /// Count what would be dropped; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Days to keep, instead of the config's `retention.raw_body_days`.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        days: Option<u32>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        /// The database: an SQLite file, or a postgres:// URL (overrides the config and
        /// MEMBERSYNC_DATABASE).
        #[arg(long)]
        database: Option<String>,
    },
    /// Erase a member's personal data (email, name, and what stored raw bodies hold of
    /// them) on request; memberships, states and the audit trail stay under the member id,
    /// and the erasure is recorded (who, when, what).
    Erase {
        /// The member: its `mbr_…` id or email.
        #[arg(long)]
        member: String,
        /// Who asks (recorded with the erasure); default: $USER.
        #[arg(long)]
        by: Option<String>,
        /// Print what was erased as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        /// The database: an SQLite file, or a postgres:// URL (overrides the config and
        /// MEMBERSYNC_DATABASE).
        #[arg(long)]
        database: Option<String>,
    },
    /// Serve the read-only MCP tools to an AI assistant over stdio (every tenant; over HTTP
    /// the same tools are at `/mcp` with `MEMBERSYNC_MCP_TOKEN`).
    Mcp {
        #[arg(long, default_value = "membersync.yaml")]
        config: PathBuf,
        /// The database: an SQLite file, or a postgres:// URL shared by several replicas
        /// (overrides the config and MEMBERSYNC_DATABASE).
        #[arg(long)]
        database: Option<String>,
    },
    /// Print the shell's completion script for membersync on stdout (see the README for
    /// where each shell reads it).
    Completions {
        /// The shell the script is for.
        shell: clap_complete::Shell,
    },
}

/// `membersync simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    #[arg(long)]
    provider: String,
    #[arg(long, default_value = "demo")]
    tenant: String,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// The time to simulate at (RFC 3339); defaults to the event's own time.
    #[arg(long)]
    now: Option<String>,
    /// Run it against the configured database instead of an empty in-memory one.
    #[arg(long)]
    apply: bool,
    /// Start from a membership already in this state (active, past_due, canceling, …)
    /// instead of none; for dry runs on the in-memory store.
    #[arg(long, conflicts_with = "apply")]
    state: Option<String>,
    #[arg(long, default_value = "membersync.yaml")]
    config: PathBuf,
    file: PathBuf,
}

/// Runs the CLI; the exit code is the process's.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Serve { config, listen, database } => serve(&config, listen, database).await,
        Command::Check { config, strict, verbose } => Ok(check(&config, strict, verbose)),
        Command::MigrateStore { from, to } => migrate_store(&from, &to),
        Command::Backup { to, force, config, database } => backup(&config, database, &to, force),
        Command::Restore { from, config, database } => restore(&config, database, &from),
        Command::Rederive { member, dry_run, json, config } => rederive(&config, member, dry_run, json).await,
        Command::Replay { status, since, member, dry_run, config } => {
            replay(&config, status, since.as_deref(), member, dry_run).await
        }
        Command::Explain { member, json, config } => explain(&config, &member, json).await,
        Command::Test { dir, config, verbose } => test(&config, &dir, verbose).await,
        Command::Simulate(args) => simulate(args).await,
        Command::Send { provider, tenant, url, headers, config, file } => {
            send(&config, &provider, &tenant, url, &headers, &file).await
        }
        Command::Reconcile { member, json, config, database } => reconcile(&config, database, member, json).await,
        Command::Mcp { config, database } => mcp(&config, database).await,
        Command::Prune { dry_run, days, json, config, database } => prune(&config, database, dry_run, days, json).await,
        Command::Erase { member, by, json, config, database } => erase(&config, database, &member, by, json).await,
        Command::Completions { shell } => completions(shell),
    }
}

/// `membersync prune`.
async fn prune(
    config_path: &Path,
    database: Option<String>,
    dry_run: bool,
    days: Option<u32>,
    json: bool,
) -> Result<ExitCode> {
    let _lock = if dry_run { None } else { hold_against_restore(config_path, database.clone())? };
    let ctx = existing_ctx(config_path, database)?;
    let Some(days) = days.or(ctx.config().raw_body_days) else {
        bail!(
            "retention.raw_body_days is not set in {}: raw bodies are kept forever. Set it (days to keep), or pass --days N",
            config_path.display()
        );
    };
    let report = crate::retention::prune(&ctx.store, days, Utc::now(), dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(ExitCode::SUCCESS)
}

/// `membersync erase`.
async fn erase(
    config_path: &Path,
    database: Option<String>,
    who: &str,
    by: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let _lock = hold_against_restore(config_path, database.clone())?;
    let ctx = existing_ctx(config_path, database)?;
    let w = who.to_string();
    let found = crate::store::read(&ctx.store, move |s| crate::explain::find(s, &w)).await?;
    let member = found.one(who).map_err(anyhow::Error::msg)?.member;
    let by = by
        .or_else(|| std::env::var("USER").ok())
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| "the command line".into());
    let d = crate::erase::erase_member(&ctx, &member.id, &by).await?.with_context(|| format!("no member `{who}`"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        println!(
            "erased {} of member {} (tenant {}): {} of {} stored event(s) rewritten, {} lead(s) deleted; recorded as by {} at {}",
            if d.member_fields.is_empty() { "no own field".to_string() } else { d.member_fields.join(" and ") },
            d.member_id,
            d.tenant,
            d.events_rewritten,
            d.events_examined,
            d.leads_deleted,
            d.erased_by,
            d.erased_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `membersync completions SHELL`: the script, from the same definition that parses.
fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "membersync", &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
        .context("Failed to write the script to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// A context over the database `serve` stored (`database` overriding the config's), on the
/// wall clock: one that does not exist is an error.
fn existing_ctx(config_path: &Path, database: Option<String>) -> Result<Arc<Ctx>> {
    let mut config = load_config(config_path)?;
    if let Some(d) = database {
        config.database = d;
    }
    let rules = load_rules(&config, Utc::now())?;
    let store = open_existing_store(&config)?;
    Ok(Arc::new(Ctx::new(config, rules, store, Arc::new(SystemClock))))
}

/// `membersync mcp`: the MCP tools on stdin/stdout until the client closes them (the log
/// stays on stderr).
async fn mcp(config_path: &Path, database: Option<String>) -> Result<ExitCode> {
    use rmcp::ServiceExt;
    let ctx = existing_ctx(config_path, database)?;
    let service = crate::mcp::Assistant::new(ctx, true)
        .serve(rmcp::transport::stdio())
        .await
        .context("Failed to start the MCP session on stdio")?;
    service.waiting().await.context("The MCP session on stdio failed")?;
    Ok(ExitCode::SUCCESS)
}

fn load_config(path: &Path) -> Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
}

fn load_rules(config: &Config, now: DateTime<Utc>) -> Result<RuleSet> {
    RuleSet::load(&config.rules_dir, "rules", now).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
}

/// The database of a command that reads what `serve` stored (explain, replay, reconcile):
/// one that does not exist is an error, not a new empty database.
fn open_existing_store(config: &Config) -> Result<Arc<dyn Store>> {
    let db = &config.database;
    if db != ":memory:" && !crate::store::pg::is_postgres_url(db) && !Path::new(db).exists() {
        bail!(
            "no database at {db}: nothing was stored there yet (`membersync serve` creates it; \
             `database:` in the config or MEMBERSYNC_DATABASE names another)"
        );
    }
    open_store(config, db)
}

fn open_store(config: &Config, database: &str) -> Result<Arc<dyn Store>> {
    let opts = Options {
        queue_capacity: config.queue_capacity,
        max_batch: config.max_batch,
        checkpoint_interval: config.checkpoint_interval,
        startup_check: config.startup_check,
        ..Options::default()
    };
    let pg = crate::store::pg::Options {
        queue_capacity: config.queue_capacity,
        max_batch: config.max_batch,
        ..Default::default()
    };
    crate::store::open_database(database, opts, pg)
        .with_context(|| format!("Failed to open the database {}", crate::store::pg::redacted(database)))
}

/// `membersync migrate-store`: the copy, and what it copied.
fn migrate_store(from: &str, to: &str) -> Result<ExitCode> {
    use crate::store::pg;
    if !pg::is_postgres_url(to) {
        bail!("--to must name a PostgreSQL database (postgres://…), not {to}");
    }
    if pg::is_postgres_url(from) {
        bail!("--from must name an SQLite database (sqlite://PATH or a path), not {}", pg::redacted(from));
    }
    let copied = pg::copy_sqlite_to_pg(from, to)
        .with_context(|| format!("Failed to copy {from} into {}; nothing was written there", pg::redacted(to)))?;
    for (table, n) in &copied {
        println!("{table:>18}  {n} rows");
    }
    println!("Copied {from} into {}. Point `database:` (or MEMBERSYNC_DATABASE) at it.", pg::redacted(to));
    Ok(ExitCode::SUCCESS)
}

/// The database a command names: `--database`, else the config's (`database:` or
/// MEMBERSYNC_DATABASE).
/// The lock a command that writes to an SQLite database holds while it runs (the one
/// `serve` holds), so that a `restore` refuses instead of swapping the file under it: its
/// writes would land in the file set aside. `None` for PostgreSQL and `:memory:`.
fn hold_against_restore(
    config_path: &Path,
    database: Option<String>,
) -> Result<Option<crate::store::sqlite::lock::ServeLock>> {
    Ok(crate::store::sqlite::lock::ServeLock::for_serve(&database_of(config_path, database)?)?)
}

fn database_of(config_path: &Path, database: Option<String>) -> Result<String> {
    match database {
        Some(d) => Ok(d),
        None => Ok(load_config(config_path)?.database),
    }
}

/// `membersync backup`: the copy, and what it holds.
fn backup(config_path: &Path, database: Option<String>, to: &Path, force: bool) -> Result<ExitCode> {
    let database = database_of(config_path, database)?;
    let c = crate::store::sqlite::backup::backup(&database, to, force)?;
    println!(
        "Backed up {} to {}: {}, {} events (highest seq {}), schema version {}, in {:.2} s.",
        c.database.display(),
        c.file.display(),
        size(c.bytes),
        c.contents.events,
        c.contents.highest_seq,
        c.contents.schema_version,
        c.took.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `membersync restore`: what was kept aside, and what was restored.
fn restore(config_path: &Path, database: Option<String>, from: &Path) -> Result<ExitCode> {
    let database = database_of(config_path, database)?;
    let r = crate::store::sqlite::backup::restore(from, &database)?;
    for p in &r.kept_aside {
        println!("Kept aside: {}", p.display());
    }
    println!(
        "Restored {} into {}: {} events (highest seq {}), schema version {}, in {:.2} s. \
         The next `membersync serve` migrates it if it needs to.",
        from.display(),
        r.database.display(),
        r.contents.events,
        r.contents.highest_seq,
        r.contents.schema_version,
        r.took.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `bytes` for a person: `12.3 MiB (12901234 bytes)`.
fn size(bytes: u64) -> String {
    format!("{:.1} MiB ({bytes} bytes)", bytes as f64 / (1024.0 * 1024.0))
}

/// On any address but loopback, the built-in local secrets (the config's `default:` values,
/// known to anyone who read this repository) would let anyone sign webhooks or read the
/// admin API: `serve` refuses to start, naming each and its variable.
fn refuse_demo_defaults_off_loopback(config: &crate::config::Config) -> Result<()> {
    if config.defaults_off_loopback().is_empty() {
        return Ok(());
    }
    bail!(
        "refusing to listen on {} with built-in local secrets still in force:\n{}\nset each variable named (or listen on 127.0.0.1)",
        config.listen,
        config.defaulted_secrets.iter().map(|s| format!("  {s}\n")).collect::<String>().trim_end()
    )
}

async fn serve(config_path: &Path, listen: Option<String>, database: Option<String>) -> Result<ExitCode> {
    // What `check` refuses, the service refuses: at start as at every reload.
    let findings = crate::check::check(config_path);
    if !findings.errors.is_empty() {
        let errors = findings.errors.iter().map(|d| format!("{d}\n")).collect::<String>();
        bail!(
            "{}{} error(s): `membersync check` refuses these files; nothing was started",
            errors,
            findings.errors.len()
        );
    }
    let mut config = load_config(config_path)?;
    if let Some(l) = listen {
        config.listen = l;
    }
    if let Some(d) = database {
        config.database = d;
    }
    refuse_demo_defaults_off_loopback(&config)?;
    let rules = load_rules(&config, Utc::now())?;
    // Held until `serve` returns (the kernel drops it if the process dies): `restore`
    // refuses to replace the database while it is held.
    let _serve_lock = crate::store::sqlite::lock::ServeLock::for_serve(&config.database)?;
    let store = open_store(&config, &config.database)?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("Failed to listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let ctx = Arc::new(Ctx::new(config, rules, store, Arc::new(SystemClock)));
    let config = ctx.config();
    tracing::info!(%addr, database = %crate::store::pg::redacted(&config.database), rules = %ctx.rules().version, tenants = config.tenants.len(), "Listening.");
    for name in &config.removed_settings {
        tracing::warn!(setting = %name, "This setting was removed and is ignored; delete it from the config.");
    }
    if config.admin_token.is_none() {
        tracing::warn!("No admin token configured: the admin API answers 401 to everyone.");
    }
    crate::app::serve(listener, crate::state::AppState::new(ctx), shutdown_signal()).await?;
    tracing::info!("Stopped.");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("Shutting down: finishing requests in flight.");
}

fn check(config_path: &Path, strict: bool, verbose: bool) -> ExitCode {
    let findings = crate::check::check(config_path);
    let listed_notes = verbose && !findings.notes.is_empty();
    if findings.errors.is_empty() && findings.warnings.is_empty() && !listed_notes {
        match findings.notes.len() {
            0 => println!("ok: {} and its rules are valid", config_path.display()),
            n => println!(
                "ok: {} and its rules are valid ({n} note(s): provider paths no fixture has; --verbose lists them)",
                config_path.display()
            ),
        }
        return ExitCode::SUCCESS;
    }
    print!("{}", findings.render(verbose));
    let failing_warnings = strict && !findings.warnings.is_empty();
    if findings.errors.is_empty() && !failing_warnings {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn reconcile(
    config_path: &Path,
    database: Option<String>,
    member: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let _lock = hold_against_restore(config_path, database.clone())?;
    let ctx = existing_ctx(config_path, database)?;
    let reconciler = Arc::new(crate::reconcile::Reconciler::new(&ctx.config(), Default::default()));
    // A member by id or email, as `explain` takes them.
    let member_id = match &member {
        Some(who) => {
            let w = who.clone();
            let found = crate::store::read(&ctx.store, move |s| crate::explain::find(s, &w)).await?;
            Some(found.one(who).map_err(anyhow::Error::msg)?.member.id)
        }
        None => None,
    };
    let summary = crate::reconcile::schedule::run_now(&ctx, &reconciler, member_id.as_deref())
        .await?
        .with_context(|| format!("no member `{}`", member.as_deref().unwrap_or_default()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", summary.render());
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_headers(headers: &[String]) -> Result<Vec<(String, String)>> {
    headers
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(':').with_context(|| format!("header `{h}` is not `Name: value`"))?;
            Ok((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect()
}

fn content_type_for(file: &Path) -> &'static str {
    if file.extension().is_some_and(|e| e == "form") {
        "application/x-www-form-urlencoded"
    } else {
        "application/json"
    }
}

async fn simulate(args: SimulateArgs) -> Result<ExitCode> {
    let SimulateArgs { provider, tenant, headers, now, apply, state, config: config_path, file } = args;
    let state = state
        .as_deref()
        .map(|s| {
            MState::parse(s).with_context(|| {
                let names: Vec<&str> = MState::ALL.iter().map(|m| m.as_str()).collect();
                format!("unknown state `{s}`; one of {}", names.join(", "))
            })
        })
        .transpose()?;
    let config = load_config(&config_path)?;
    let now = now
        .map(|s| DateTime::parse_from_rfc3339(&s).map(|t| t.with_timezone(&Utc)))
        .transpose()
        .context("`--now` must be RFC 3339, e.g. 2026-01-01T00:00:00Z")?;
    let rules = load_rules(&config, now.unwrap_or_else(Utc::now))?;
    let body = std::fs::read(&file).with_context(|| format!("Failed to read {}", file.display()))?;
    // The examples' `${now…}` times, as `send` fills them: from `--now`, else the clock.
    let body = crate::simulate::expand_time(&body, now.unwrap_or_else(Utc::now).timestamp())
        .with_context(|| format!("Failed to expand times in {}", file.display()))?;
    let _lock = if apply { hold_against_restore(&config_path, Some(config.database.clone()))? } else { None };
    let store = if apply { open_existing_store(&config)? } else { open_store(&config, ":memory:")? };
    let input = crate::simulate::SimulateInput {
        headers: parse_headers(&headers)?,
        content_type: content_type_for(&file).to_string(),
        provider,
        tenant,
        now,
        state,
        body,
    };
    let out = crate::simulate::simulate_json(config, rules, store, input).await?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

async fn send(
    config_path: &Path,
    provider: &str,
    tenant: &str,
    url: Option<String>,
    headers: &[String],
    file: &Path,
) -> Result<ExitCode> {
    let mut extra = parse_headers(headers)?;
    let config = load_config(config_path)?;
    let Some(verifier) = config.verifiers.get(provider) else {
        let known: Vec<&str> = config.verifiers.keys().map(String::as_str).collect();
        bail!("{}", crate::diagnostic::unknown("provider", provider, &known));
    };
    let Some(t) = config.tenants.get(tenant) else {
        let known: Vec<&str> = config.tenants.keys().map(String::as_str).collect();
        bail!("{}", crate::diagnostic::unknown("tenant", tenant, &known));
    };
    let Some(tp) = t.providers.get(provider) else {
        bail!("tenant `{tenant}` does not take `{provider}` (add it under tenants.{tenant}.providers in the config)");
    };
    let secret = tp.secret.clone().with_context(|| format!("tenant `{tenant}` has no secret for `{provider}`"))?;
    let body = std::fs::read(file).with_context(|| format!("Failed to read {}", file.display()))?;
    // The message id comes from the file as written, before its `${now…}` are filled: the
    // same file sent twice is one delivery.
    let written = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&body))
    };
    let now = SystemClock.now();
    let body = crate::simulate::expand_time(&body, now.timestamp())
        .with_context(|| format!("Failed to expand times in {}", file.display()))?;
    let url = url.unwrap_or_else(|| format!("http://{}/webhooks/{tenant}/{provider}", config.listen));
    let scheme = &verifier.scheme;
    let body = scheme.prepare_body(&secret, &body);
    // The message id a Standard Webhooks signature covers: the one given, else the body's
    // own, so a resend is recognised as the same delivery.
    let given = extra.iter().find(|(k, _)| k == "webhook-id" || k == "svix-id").map(|(_, v)| v.clone());
    extra.retain(|(k, _)| k != "webhook-id" && k != "svix-id");
    let id = given.unwrap_or_else(|| format!("msg_{}", &written[..24]));
    let signed = scheme.sign_with_id(&secret, &body, now, Some(&id));
    let mut req = reqwest::Client::new().post(&url).header("content-type", content_type_for(file)).body(body);
    for (k, v) in signed.into_iter().chain(extra) {
        req = req.header(k, v);
    }
    let resp = req.send().await.with_context(|| format!("Failed to POST to {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    println!("{} {}", status.as_u16(), text);
    if status.is_success() {
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("the server answered {status}")
    }
}

fn parse_time(s: &str, what: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("`{what}` must be RFC 3339, e.g. 2026-01-01T00:00:00Z"))
}

async fn open_ctx(config_path: &Path) -> Result<Arc<Ctx>> {
    let config = load_config(config_path)?;
    let rules = load_rules(&config, Utc::now())?;
    let store = open_existing_store(&config)?;
    Ok(Arc::new(Ctx::new(config, rules, store, Arc::new(SystemClock))))
}

async fn rederive(config_path: &Path, member: Option<String>, dry_run: bool, json: bool) -> Result<ExitCode> {
    let _lock = if dry_run { None } else { hold_against_restore(config_path, None)? };
    let ctx = open_ctx(config_path).await?;
    let mut filter = crate::store::EventFilter::default();
    if let Some(who) = &member {
        let w = who.clone();
        let found = crate::store::read(&ctx.store, move |s| crate::explain::find(s, &w)).await?;
        filter.member_id = Some(found.one(who).map_err(anyhow::Error::msg)?.member.id);
    }
    let r = crate::replay::rederive(&ctx, &filter, Utc::now(), dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "rules {}{}: {} deliveries re-derived; {} membership(s) compared; {} differ",
        r.version,
        if r.dry_run { " (dry run: nothing written)" } else { "" },
        r.deliveries,
        r.compared,
        r.memberships.len()
    );
    for m in &r.memberships {
        println!(
            "{} ({})  {} {}: {} — {}",
            m.member,
            m.member_id,
            m.provider,
            m.membership,
            m.changes.join("; "),
            m.result
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(
    config_path: &Path,
    status: String,
    since: Option<&str>,
    member: Option<String>,
    dry_run: bool,
) -> Result<ExitCode> {
    if dry_run && since.is_some() {
        bail!("--since does not go with --dry-run: a membership is derived from all its deliveries, not from a part");
    }
    let _lock = if dry_run { None } else { hold_against_restore(config_path, None)? };
    let ctx = open_ctx(config_path).await?;
    let since = since.map(|s| parse_time(s, "--since")).transpose()?;
    let mut filter = crate::store::EventFilter { since, member_id: member, ..Default::default() };
    if let Some(id) = &filter.member_id {
        let who = id.clone();
        let found = crate::store::read(&ctx.store, move |s| crate::explain::find(s, &who)).await?;
        filter.member_id = Some(found.one(id).map_err(anyhow::Error::msg)?.member.id);
    }
    if dry_run {
        let run = crate::replay::dry_run(&ctx, &filter, Utc::now()).await?;
        println!("rules {} (dry run: nothing written)", ctx.rules().version);
        println!(
            "{} deliveries re-derived; {} membership(s) compared; {} differ",
            run.deliveries,
            run.compared,
            run.differences.len()
        );
        if run.differences.is_empty() {
            println!("no differences: the stored state is what the current rules derive");
        }
        for d in &run.differences {
            println!("{} ({})  {} {}: {}", d.member, d.member_id, d.provider, d.membership, d.changes.join("; "));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !crate::store::EventStatus::parse(&status).is_some_and(|s| s.is_replayable()) {
        bail!("--status must be failed, refused or ignored: applied events would apply twice");
    }
    filter.status = Some(status);
    let done = crate::replay::replay(&ctx, &filter).await?;
    println!("rules {}: {} event(s) replayed", ctx.rules().version, done.len());
    for r in &done {
        println!(
            "#{} {}: {} → {}{}",
            r.seq,
            r.event_id,
            r.was,
            r.now.as_str(),
            r.reason.as_ref().map(|x| format!(" ({x})")).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn explain(config_path: &Path, who: &str, as_json: bool) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let store = open_existing_store(&config)?;
    let who = who.to_string();
    let now = Utc::now();
    let asked = who.clone();
    let j = crate::store::read(&store, move |s| match crate::explain::find(s, &asked)?.one(&asked) {
        Ok(d) => crate::explain::explain_json(s, &d, now).map(Ok),
        Err(why) => Ok(Err(why)),
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print!("{}", crate::explain::explain_text(&j));
    }
    Ok(ExitCode::SUCCESS)
}

async fn test(config_path: &Path, dir: &Path, verbose: bool) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let rules = load_rules(&config, Utc::now())?;
    let loaded = Arc::new(crate::pipeline::Loaded::new(config, rules));
    let files: Vec<PathBuf> = if dir.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("Failed to read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        v.sort();
        v
    } else {
        vec![dir.to_path_buf()]
    };
    if files.is_empty() {
        bail!("no scenario files in {}", dir.display());
    }
    let mut reports = Vec::new();
    for f in &files {
        reports.push(crate::scenario::run(f, loaded.clone()).await);
    }
    if verbose {
        for r in &reports {
            println!("{}", crate::scenario::render_trace(r));
        }
    }
    print!("{}", crate::scenario::render(&reports));
    let ok = reports.iter().all(|r| r.error.is_none() && r.mismatches.is_empty());
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
