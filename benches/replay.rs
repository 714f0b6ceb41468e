//! Replay throughput: `replay --dry-run` (`replay::dry_run`) over 100k stored deliveries.
//!
//! Setup (not timed): a fresh SQLite file receives, through `pipeline::process` with 64 in
//! flight, 33,334 Stripe subscriptions × 3 deliveries each (`invoice.paid` → active,
//! `invoice.payment_failed` → past_due with a grace timer, `invoice.paid` renewal → active,
//! timer cancelled), each subscription with its own customer and email. The clock is fixed
//! so the run is deterministic.
//!
//! Timed: `replay::dry_run` over all of them — read every stored delivery, decode and
//! extract its raw body again, run it through rules → machine → a scratch store in arrival
//! order with due timers fired in between, then compare every touched member's stored
//! state with the re-derived one. Reported: events/s over the whole call (and the number
//! of differences, which must be 0).
//!
//! Run: `cargo bench --bench replay` (`MEMBERSYNC_REPLAY_EVENTS` changes the 100k).

/// The allocator the `membersync` binary uses.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use chrono::{TimeZone, Utc};
use membersync::canonical::Source;
use membersync::clock::FixedClock;
use membersync::config::Config;
use membersync::pipeline::{self, Ctx, Incoming, Raw, Status};
use membersync::rules::RuleSet;
use membersync::store::sqlite::{Options, SqliteStore};
use membersync::store::{EventFilter, Store};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const IN_FLIGHT: u64 = 64;
const FIXTURES: [&str; 3] = ["invoice_paid.json", "invoice_payment_failed.json", "invoice_paid_renewal.json"];

fn main() {
    let events: u64 = std::env::var("MEMBERSYNC_REPLAY_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let subs = events.div_ceil(3);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::load(&root.join("membersync.yaml")).expect("config");
    config.database = dir.path().join("replay.db").display().to_string();
    // Before the fixtures' grace timers fall due: nothing fires, stored == derived.
    let now = Utc.timestamp_opt(1_767_225_700, 0).unwrap();
    let rules = RuleSet::load(&root.join("rules"), "rules", now).expect("rules");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.database, Options { queue_capacity: 8192, max_batch: 256, ..Options::default() })
            .expect("store"),
    );
    let ctx = Arc::new(Ctx::new(config, rules, store, Arc::new(FixedClock::new(now))));
    let templates: Arc<Vec<String>> = Arc::new(
        FIXTURES
            .iter()
            .map(|f| std::fs::read_to_string(root.join("tests/fixtures/stripe").join(f)).expect("fixture"))
            .collect(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let setup = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..IN_FLIGHT {
            let (ctx, templates, next) = (ctx.clone(), templates.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let x = &ctx.config().extractors["stripe"];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= subs {
                        break;
                    }
                    for (k, t) in templates.iter().enumerate() {
                        let body = t
                            .replace("\"id\": \"evt_", &format!("\"id\": \"evt_r{i}_{k}_"))
                            .replace("sub_1QxDemo001", &format!("sub_r{i}"))
                            .replace("cus_QxDemo001", &format!("cus_r{i}"))
                            .replace("ada@example.com", &format!("ada+{i}@example.com"))
                            // Each subscription's own invoices, charges and payments: one
                            // payment is counted once (`payments`), across subscriptions too.
                            .replace("\"in_1Qx", &format!("\"in_r{i}_"))
                            .replace("\"ch_3Qx", &format!("\"ch_r{i}_"))
                            .replace("\"pi_3Qx", &format!("\"pi_r{i}_"));
                        let decoded = x.decode_captured(body.as_bytes(), None).expect("decodes");
                        let ex = x.extract("demo", &decoded, body.as_bytes(), &[], now).expect("extracts");
                        let raw = Raw {
                            body: body.into_bytes(),
                            headers: vec![],
                            source: Source::Webhook,
                            delivery: true,
                            enrichment: None,
                        };
                        let ack =
                            pipeline::process(&ctx, Incoming::Extracted(Box::new(ex)), raw).await.expect("stored");
                        assert_eq!(ack.status, Status::Applied, "{:?}", ack.outcome.reason);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("sender");
        }
    });
    let stored = subs * 3;
    eprintln!("stored {stored} deliveries in {:.1} s (setup, not timed)", setup.elapsed().as_secs_f64());
    // The setup leaves hundreds of MB of dirty pages; let the kernel write them back now
    // rather than during the timed run.
    let _ = std::process::Command::new("sync").status();

    let t0 = Instant::now();
    let diffs =
        rt.block_on(membersync::replay::dry_run(&ctx, &EventFilter::default(), now)).expect("dry run").differences;
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "replay --dry-run: {stored} stored events re-derived and compared in {dt:.2} s = {:.0} events/s (target >= 20000); {} difference(s)",
        stored as f64 / dt,
        diffs.len()
    );
}
