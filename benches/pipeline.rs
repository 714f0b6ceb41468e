//! Durable ingest throughput: extract + rules + machine + SQLite commit for signed-off
//! Stripe events with distinct ids, 64 in flight at once, acknowledged after commit.
//! Compares group commit (many events per transaction) with one transaction per event.
//!
//! Run: `cargo bench --bench pipeline` (numbers in BENCHMARKS.md).

/// The allocator the `membersync` binary uses.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use membersync::canonical::Source;
use membersync::clock::SystemClock;
use membersync::config::Config;
use membersync::pipeline::{self, Ctx, Incoming, Raw};
use membersync::rules::RuleSet;
use membersync::store::sqlite::{Options, SqliteStore};
use membersync::store::Store;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IN_FLIGHT: usize = 64;
const EVENTS: u64 = 2048;

fn ctx(max_batch: usize, dir: &std::path::Path) -> Arc<Ctx> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config = Config::load(&root.join("membersync.yaml")).expect("config");
    config.database = dir.join("bench.db").display().to_string();
    let rules = RuleSet::load(&root.join("rules"), "rules", chrono::Utc::now()).expect("rules");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.database, Options { queue_capacity: 8192, max_batch, ..Options::default() })
            .expect("store"),
    );
    Arc::new(Ctx::new(config, rules, store, Arc::new(SystemClock)))
}

/// Sends `n` distinct `invoice.paid` events (each its own subscription) with `IN_FLIGHT`
/// concurrent senders; returns the wall time.
async fn ingest(ctx: &Arc<Ctx>, template: &Arc<String>, next: &Arc<AtomicU64>, n: u64) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (ctx, template, next) = (ctx.clone(), template.clone(), next.clone());
        let per = n / IN_FLIGHT as u64;
        tasks.push(tokio::spawn(async move {
            let x = &ctx.config().extractors["stripe"];
            for _ in 0..per {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let body = template
                    .replace("evt_1QxaZ1K7dEmoAc01GAm3W0e2", &format!("evt_bench_{i}"))
                    .replace("sub_1QxDemo001", &format!("sub_bench_{i}"));
                let decoded = x.decode_captured(body.as_bytes(), None).expect("decodes");
                let extraction =
                    x.extract("demo", &decoded, body.as_bytes(), &[], chrono::Utc::now()).expect("extracts");
                let raw = Raw {
                    body: body.into_bytes(),
                    headers: vec![],
                    source: Source::Webhook,
                    delivery: true,
                    enrichment: None,
                };
                let ack =
                    pipeline::process(&ctx, Incoming::Extracted(Box::new(extraction)), raw).await.expect("stored");
                assert_eq!(ack.status, pipeline::Status::Applied);
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    start.elapsed()
}

fn durable_ingest(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let template =
        Arc::new(std::fs::read_to_string(root.join("tests/fixtures/stripe/invoice_paid.json")).expect("fixture"));
    let mut g = c.benchmark_group("durable_ingest");
    g.throughput(Throughput::Elements(EVENTS));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    for (name, max_batch) in [("group_commit", 32), ("transaction_per_event", 1)] {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(max_batch, dir.path());
        let next = Arc::new(AtomicU64::new(0));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += rt.block_on(ingest(&ctx, &template, &next, EVENTS));
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, durable_ingest);
criterion_main!(benches);
