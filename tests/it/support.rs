//! Shared test helpers: a context on a temp database with a fixed clock, fixture loading,
//! real signatures, and the insta settings every snapshot uses.

use chrono::{DateTime, TimeZone, Utc};
use membersync::clock::FixedClock;
use membersync::config::Config;
use membersync::pipeline::{Ack, Ctx};
use membersync::rules::RuleSet;
use membersync::store::sqlite::{Options, SqliteStore};
use membersync::store::{MemberDetail, Store};
use membersync::verify::Scheme;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The repo's own `membersync.yaml`, on the given database.
pub fn config(db: &str) -> Config {
    let mut c = Config::load(&root().join("membersync.yaml")).expect("membersync.yaml loads");
    c.database = db.to_string();
    c
}

pub fn rules() -> RuleSet {
    RuleSet::load(&root().join("rules"), "rules", Utc::now()).expect("rules compile")
}

pub fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).unwrap()
}

/// A pipeline context on `db` with a fixed clock.
pub fn ctx_on(db: &Path, clock: Arc<FixedClock>) -> Arc<Ctx> {
    let config = config(&db.display().to_string());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.database, Options::default()).expect("store opens"));
    Arc::new(Ctx::new(config, rules(), store, clock))
}

pub fn fixture(provider: &str, name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures").join(provider).join(format!("{name}.json"))).expect("fixture exists")
}

/// Signature headers for `body`, made by the same code `membersync send` uses.
pub fn signed_headers(ctx: &Ctx, provider: &str, body: &[u8], now: DateTime<Utc>) -> Vec<(String, String)> {
    let spec = &ctx.config.extractors[provider].spec.verify;
    let secret = ctx.config.tenants["demo"].providers[provider].secret.clone().expect("demo secret");
    let mut h = Scheme::compile(spec).sign(&secret, body, now);
    h.push(("content-type".into(), "application/json".into()));
    h
}

/// Posts a fixture through verify → extract → pipeline, signed at the clock's time.
pub async fn deliver(ctx: &Arc<Ctx>, provider: &str, name: &str) -> Ack {
    let body = fixture(provider, name);
    let headers = signed_headers(ctx, provider, &body, ctx.clock.now());
    membersync::ingest::accept(ctx, "demo", provider, headers, body).await.expect("delivery accepted")
}

/// The member with this email, with memberships and activity.
pub fn member(ctx: &Ctx, email: &str) -> MemberDetail {
    let m = ctx.store.members_by_email(email).expect("read").into_iter().next().expect("member exists");
    ctx.store.member_detail(&m.id, 100).expect("read").expect("member detail")
}

pub fn insta_settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path(root().join("snapshots"));
    s.set_prepend_module_to_snapshot(true);
    s.set_sort_maps(true);
    s.add_redaction(".outcome.rule.version", "[rule-set version]");
    s
}
