//! Shared test helpers: a context on a temp database with a fixed clock, fixture loading,
//! real signatures, and the insta settings every snapshot uses.

use chrono::{DateTime, TimeZone, Utc};
use membersync::clock::{Clock, FixedClock, SystemClock};
use membersync::config::Config;
use membersync::pipeline::{Ack, Ctx};
use membersync::rules::RuleSet;
use membersync::store::sqlite::{Options, SqliteStore};
use membersync::store::{MemberDetail, Store};
use membersync::verify::Scheme;
use serde_json::Value;
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

/// A pipeline context for an edited config (see `editable_config`) with a fixed clock.
pub fn ctx_with(config: Config, clock: Arc<FixedClock>) -> Arc<Ctx> {
    let rules = RuleSet::load(&config.rules_dir, "rules", Utc::now()).expect("rules compile");
    let store = membersync::store::open_database(&config.database, Options::default(), Default::default())
        .expect("store opens");
    Arc::new(Ctx::new(config, rules, store, clock))
}

/// Stripe's `invoice_paid` fixture, paid through 2100: for tests on the wall clock, whose
/// fixture periods (early 2026) would otherwise be long over, so that the service's renewal
/// timers fire and write while they run.
pub fn invoice_paid_far_ahead() -> String {
    let text = String::from_utf8(fixture("stripe", "invoice_paid")).unwrap();
    assert!(text.contains("\"end\": 1769904000"), "the fixture's line period end moved");
    text.replace("\"end\": 1769904000", "\"end\": 4102444800")
}

pub fn fixture(provider: &str, name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures").join(provider).join(format!("{name}.json"))).expect("fixture exists")
}

/// Signature headers for `body`, made by the same code `membersync send` uses.
pub fn signed_headers(ctx: &Ctx, provider: &str, body: &[u8], now: DateTime<Utc>) -> Vec<(String, String)> {
    let spec = &ctx.config().extractors[provider].spec.verify;
    let secret = ctx.config().tenants["demo"].providers[provider].secret.clone().expect("demo secret");
    let mut h = Scheme::compile(spec).sign(&secret, body, now);
    h.push(("content-type".into(), "application/json".into()));
    h
}

/// A Stripe subscription (`sub_Unmapped01`, customer `cus_Unmapped01`) for a product and
/// price the config maps to nothing (`prod_NotInConfig`, `price_NotInConfig`).
pub async fn deliver_unmapped_product(ctx: &Arc<Ctx>) -> Ack {
    deliver_edited(ctx, "stripe", "customer_subscription_created", |v| {
        v["id"] = serde_json::json!("evt_unmapped_product");
        v["data"]["object"]["id"] = serde_json::json!("sub_Unmapped01");
        v["data"]["object"]["customer"] = serde_json::json!("cus_Unmapped01");
        for item in v["data"]["object"]["items"]["data"].as_array_mut().unwrap() {
            item["price"]["product"] = serde_json::json!("prod_NotInConfig");
            item["price"]["id"] = serde_json::json!("price_NotInConfig");
        }
        v["data"]["object"]["plan"]["product"] = serde_json::json!("prod_NotInConfig");
        v["data"]["object"]["plan"]["id"] = serde_json::json!("price_NotInConfig");
    })
    .await
}

/// Posts a fixture through verify → extract → pipeline, signed at the clock's time.
pub async fn deliver(ctx: &Arc<Ctx>, provider: &str, name: &str) -> Ack {
    let body = fixture(provider, name);
    let headers = signed_headers(ctx, provider, &body, ctx.clock.now());
    membersync::ingest::accept(ctx, "demo", provider, headers, body).await.expect("delivery accepted")
}

/// Posts a fixture edited first by `edit` (signed as sent), like `deliver`.
pub async fn deliver_edited(
    ctx: &Arc<Ctx>,
    provider: &str,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Ack {
    let mut v: serde_json::Value = serde_json::from_slice(&fixture(provider, name)).expect("fixture is JSON");
    edit(&mut v);
    let body = serde_json::to_vec(&v).expect("serializes");
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

/// The admin token of the repo's `membersync.yaml` (its local default).
pub const TOKEN: &str = "dev-admin-token";

pub struct Server {
    pub url: String,
    pub ctx: Arc<Ctx>,
    /// The service's state (`ctx` is its pipeline context).
    pub state: membersync::state::AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A real server on 127.0.0.1:0 with the wall clock. The fixtures' periods ended early
    /// in 2026: on the wall clock every renewal timer they set would be long due and fire at
    /// once, so here a renewal counts as missed only after ten years. Tests of missed
    /// renewals run on a fixed clock (`start_tuned`) with the shipped policy.
    pub async fn start() -> Server {
        Server::start_tuned(Arc::new(SystemClock), |c| {
            for t in c.tenants.values_mut() {
                t.policy.insert("missed_renewal_grace_hours".into(), (24 * 365 * 10).into());
            }
        })
        .await
    }

    /// A real server for `config` (its database inside `dir`, which the server keeps).
    pub async fn start_with(config: Config, clock: Arc<dyn Clock>, dir: tempfile::TempDir) -> Server {
        Server::start_with_options(config, clock, dir, Options::default()).await
    }

    /// `start_with`, the store opened with `opts` (a sync hook, say).
    pub async fn start_with_options(
        config: Config,
        clock: Arc<dyn Clock>,
        dir: tempfile::TempDir,
        opts: Options,
    ) -> Server {
        let store = membersync::store::open_database(&config.database, opts, Default::default()).unwrap();
        let rules = RuleSet::load(&config.rules_dir, "rules", Utc::now()).expect("rules compile");
        let ctx = Arc::new(Ctx::new(config, rules, store, clock));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let state = membersync::state::AppState::new(ctx.clone());
        let task = tokio::spawn(membersync::app::serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        Server { url, ctx, state, stop: Some(stop), task: Some(task), _dir: dir }
    }

    pub async fn post(&self, path: &str, headers: &[(String, String)], body: Vec<u8>) -> (u16, Value) {
        let mut req = reqwest::Client::new().post(format!("{}{path}", self.url)).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_signed(&self, fixture_name: &str) -> (u16, Value) {
        let body = fixture("stripe", fixture_name);
        let headers = signed_headers(&self.ctx, "stripe", &body, SystemClock.now());
        self.post("/webhooks/demo/stripe", &headers, body).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new().get(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// A copy of the repo's `membersync.yaml` and `rules/` in a temp dir (to edit in a test),
/// with the database there too.
pub fn editable_config() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("rules"), &dir.path().join("rules"));
    std::fs::copy(root().join("membersync.yaml"), dir.path().join("membersync.yaml")).unwrap();
    let mut c = Config::load(&dir.path().join("membersync.yaml")).expect("copied config loads");
    c.database = dir.path().join("m.db").display().to_string();
    (dir, c)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

impl Server {
    /// A real server on 127.0.0.1:0 with the given clock and a config adjusted by `tune`
    /// (API roots of fake providers, API keys, short time limits).
    pub async fn start_tuned(clock: Arc<dyn Clock>, tune: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&dir.path().join("m.db").display().to_string());
        tune(&mut config);
        Server::start_with(config, clock, dir).await
    }

    pub async fn post_admin(&self, path: &str) -> (u16, Value) {
        let resp = reqwest::Client::new().post(format!("{}{path}", self.url)).bearer_auth(TOKEN).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    /// A JSON POST with a token.
    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    /// A DELETE with a token.
    pub async fn delete(&self, path: &str, token: &str) -> (u16, Value) {
        let resp =
            reqwest::Client::new().delete(format!("{}{path}", self.url)).bearer_auth(token).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    /// A text answer, asked with the admin token.
    pub async fn get_text(&self, path: &str) -> String {
        let req = reqwest::Client::new().get(format!("{}{path}", self.url)).bearer_auth(TOKEN);
        req.send().await.unwrap().text().await.unwrap()
    }
}

/// A free loopback port (bound, then released for the service to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `membersync serve` as a child process, on the config in a directory made by
/// `editable_config` (its database, `membersync.db`, beside it). Its log is appended to
/// `service.log` there.
pub struct Service {
    pub child: std::process::Child,
    pub url: String,
}

/// Starts the service and waits until `/healthz` answers; panics with its log if it exits
/// or does not come up within 15 s.
pub async fn spawn(dir: &Path, port: u16) -> Service {
    spawn_under(dir, port, None, "warn").await
}

/// `spawn`, with the open-file limit (soft and hard) set to `open_files` when given, and
/// the log at `log` (`MEMBERSYNC_LOG`).
pub async fn spawn_under(dir: &Path, port: u16, open_files: Option<u32>, level: &str) -> Service {
    spawn_on(dir, port, open_files, level, None).await
}

/// `spawn_under`, on `database` (`MEMBERSYNC_DATABASE`) when given.
pub async fn spawn_on(dir: &Path, port: u16, open_files: Option<u32>, level: &str, database: Option<&str>) -> Service {
    let env: Vec<(&str, &str)> = database.map(|d| ("MEMBERSYNC_DATABASE", d)).into_iter().collect();
    spawn_env(dir, port, open_files, level, &env).await
}

/// `spawn_under`, with these environment variables set.
pub async fn spawn_env(dir: &Path, port: u16, open_files: Option<u32>, level: &str, env: &[(&str, &str)]) -> Service {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("service.log")).unwrap();
    let mut command = match open_files {
        None => std::process::Command::new(env!("CARGO_BIN_EXE_membersync")),
        Some(n) => {
            let mut c = std::process::Command::new("sh");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_membersync")]);
            c
        }
    };
    let mut child = command
        .args(["serve", "--config"])
        .arg(dir.join("membersync.yaml"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("MEMBERSYNC_LOG", level)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the service starts");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("service.log")).unwrap_or_default();
            panic!("the service exited ({status}) at start:\n{log}");
        }
        if let Ok(r) = reqwest::get(format!("{url}/healthz")).await {
            if r.status().is_success() {
                return Service { child, url };
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the service did not come up");
}

impl Service {
    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Service {
    /// A failing test never leaves the service running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small deterministic generator (xorshift), so a failing case can be named by its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A second tenant with its own secrets and its own admin token.
pub fn two_tenants(db: &std::path::Path) -> membersync::config::Config {
    let mut c = config(&db.display().to_string());
    let mut acme = c.tenants["demo"].clone();
    acme.name = "acme".into();
    acme.admin_token = Some(membersync::secret::Secret::new("acme-admin-token"));
    for p in acme.providers.values_mut() {
        p.secret = Some(membersync::secret::Secret::new("whsec_YWNtZS1vd24tc2VjcmV0"));
    }
    c.tenants.insert("acme".into(), acme);
    c
}
