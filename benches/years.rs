//! Running it for years: what backup, prune and erase cost on a store that has lived.
//!
//! Setup (not timed): a fresh SQLite file receives, through `pipeline::process` with 64 in
//! flight, 33,334 Stripe subscriptions × 3 deliveries each (as `benches/replay.rs`), each
//! subscription with its own customer and email: 100k deliveries with their raw bodies.
//!
//! Timed, in order:
//! 1. deliveries per second with nothing else running (the baseline), for a few seconds;
//! 2. `backup` of the whole file while the same deliveries go on: how long the copy took
//!    and the deliveries per second during it (the writer must not stop);
//! 3. `backup` with nothing running;
//! 4. `erase` of one member (every event naming it found and rewritten, its leads deleted);
//! 5. `prune` of every body (each one older than the cutoff), a batch per write.
//!
//! Run: `cargo bench --bench years` (`MEMBERSYNC_YEARS_EVENTS` changes the 100k).

/// The allocator the `membersync` binary uses.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use chrono::{Duration, TimeZone, Utc};
use membersync::canonical::Source;
use membersync::clock::FixedClock;
use membersync::config::Config;
use membersync::pipeline::{self, Ctx, Incoming, Raw};
use membersync::rules::RuleSet;
use membersync::store::sqlite::{Options, SqliteStore};
use membersync::store::Store;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const IN_FLIGHT: u64 = 64;
const FIXTURES: [&str; 3] = ["invoice_paid.json", "invoice_payment_failed.json", "invoice_paid_renewal.json"];

/// Delivers subscription `i`'s three events (distinct ids, customer, email, payments).
async fn subscription(ctx: &Arc<Ctx>, templates: &[String], i: u64, tag: &str) {
    let x = &ctx.config().extractors["stripe"];
    let now = ctx.clock.now();
    for (k, t) in templates.iter().enumerate() {
        let body = t
            .replace("\"id\": \"evt_", &format!("\"id\": \"evt_{tag}{i}_{k}_"))
            .replace("sub_1QxDemo001", &format!("sub_{tag}{i}"))
            .replace("cus_QxDemo001", &format!("cus_{tag}{i}"))
            .replace("ada@example.com", &format!("ada+{tag}{i}@example.com"))
            .replace("\"in_1Qx", &format!("\"in_{tag}{i}_"))
            .replace("\"ch_3Qx", &format!("\"ch_{tag}{i}_"))
            .replace("\"pi_3Qx", &format!("\"pi_{tag}{i}_"));
        let decoded = x.decode_captured(body.as_bytes(), None).expect("decodes");
        let ex = x.extract("demo", &decoded, body.as_bytes(), &[], now).expect("extracts");
        let raw =
            Raw { body: body.into_bytes(), headers: vec![], source: Source::Webhook, delivery: true, enrichment: None };
        pipeline::process(ctx, Incoming::Extracted(Box::new(ex)), raw).await.expect("stored");
    }
}

/// Deliveries by 64 senders until `stop`; returns how many were delivered.
async fn load(ctx: Arc<Ctx>, templates: Arc<Vec<String>>, tag: &'static str, stop: Arc<AtomicBool>) -> u64 {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (ctx, templates, next, stop) = (ctx.clone(), templates.clone(), next.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                subscription(&ctx, &templates, i, tag).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    next.load(Ordering::Relaxed) * 3
}

fn main() {
    let events: u64 = std::env::var("MEMBERSYNC_YEARS_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let subs = events.div_ceil(3);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::load(&root.join("membersync.yaml")).expect("config");
    config.database = dir.path().join("years.db").display().to_string();
    let now = Utc.timestamp_opt(1_767_225_700, 0).unwrap();
    let rules = RuleSet::load(&root.join("rules"), "rules", now).expect("rules");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.database, Options { queue_capacity: 8192, ..Options::default() }).expect("store"),
    );
    let db = config.database.clone();
    let ctx = Arc::new(Ctx::new(config, rules, store, Arc::new(FixedClock::new(now))));
    let templates: Arc<Vec<String>> = Arc::new(
        FIXTURES
            .iter()
            .map(|f| std::fs::read_to_string(root.join("tests/fixtures/stripe").join(f)).expect("fixture"))
            .collect(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let setup = Instant::now();
    rt.block_on(async {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..IN_FLIGHT {
            let (ctx, templates, next) = (ctx.clone(), templates.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= subs {
                        break;
                    }
                    subscription(&ctx, &templates, i, "r").await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("sender");
        }
    });
    let size = |p: &str| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "stored {} deliveries in {:.1} s (setup, not timed); database {:.0} MB",
        subs * 3,
        setup.elapsed().as_secs_f64(),
        size(&db) as f64 / 1e6
    );
    let _ = std::process::Command::new("sync").status();

    // 1. The baseline: deliveries per second with nothing else running.
    let secs = 5.0;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let baseline = rt.block_on(async {
        let run = tokio::spawn(load(ctx.clone(), templates.clone(), "a", stop.clone()));
        tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        run.await.unwrap()
    });
    let base_rate = baseline as f64 / t0.elapsed().as_secs_f64();
    println!("deliveries alone: {base_rate:.0}/s");

    // 2. A backup while the same load goes on.
    let stop = Arc::new(AtomicBool::new(false));
    let (copied, during, took) = rt.block_on(async {
        let run = tokio::spawn(load(ctx.clone(), templates.clone(), "b", stop.clone()));
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let (db, to) = (db.clone(), dir.path().join("under-load.backup"));
        let t = Instant::now();
        let copied = tokio::task::spawn_blocking(move || membersync::store::sqlite::backup::backup(&db, &to, false))
            .await
            .unwrap()
            .expect("backup");
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        (copied, run.await.unwrap(), took)
    });
    println!(
        "backup under load: {:.0} MB ({} events) in {:.2} s; deliveries meanwhile {:.0}/s over the whole run ({:.0}/s alone)",
        copied.bytes as f64 / 1e6,
        copied.contents.events,
        took.as_secs_f64(),
        during as f64 / (took.as_secs_f64() + 1.0),
        base_rate
    );

    // 3. A backup with nothing running.
    let t = Instant::now();
    let idle = membersync::store::sqlite::backup::backup(&db, &dir.path().join("idle.backup"), false).expect("backup");
    println!("backup idle: {:.0} MB in {:.2} s", idle.bytes as f64 / 1e6, t.elapsed().as_secs_f64());

    // 4. One erasure.
    let id = ctx.store.members_by_email("ada+r7@example.com").expect("read").remove(0).id;
    let t = Instant::now();
    let d = rt.block_on(membersync::erase::erase_member(&ctx, &id, "bench")).expect("erase").expect("member");
    println!(
        "erase one member: {} of {} events rewritten in {:.1} ms",
        d.events_rewritten,
        d.events_examined,
        t.elapsed().as_secs_f64() * 1e3
    );

    // 5. Prune every body.
    let t = Instant::now();
    let r = rt.block_on(membersync::retention::prune(&ctx.store, 1, now + Duration::days(2), false)).expect("prune");
    let dt = t.elapsed().as_secs_f64();
    println!(
        "prune: {} bodies ({:.0} MB) in {:.2} s = {:.0} events/s",
        r.events,
        r.bytes as f64 / 1e6,
        dt,
        r.events as f64 / dt
    );
}
