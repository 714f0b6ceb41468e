//! The fuzz campaign in full: `cargo bench --bench fuzz [-- INPUTS [SEED]]` runs INPUTS
//! (default 1,000,000) generated deliveries through decode, extract, the rules and the
//! machine on every core, and prints how far they got, the rate and every panic (with the
//! seed and index that reproduce it). Exits non-zero on a panic. Not in CI, which runs a
//! bounded share (`fuzz::a_bounded_share_of_the_campaign_never_panics`); figures in
//! BENCHMARKS.md.

/// The allocator the `membersync` binary uses.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/it/fuzz_campaign.rs"]
mod fuzz_campaign;

fn main() {
    // `cargo bench` passes `--bench`; numbers are ours.
    let numbers: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.replace('_', "").parse().ok()).collect();
    let inputs = numbers.first().copied().unwrap_or(1_000_000);
    let seed = numbers.get(1).copied().unwrap_or(0x6d73);
    let threads = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    // Panics are caught and counted; their default report would bury the summary.
    std::panic::set_hook(Box::new(|_| {}));
    let corpus = fuzz_campaign::Corpus::load();
    let start = std::time::Instant::now();
    let tally = corpus.campaign(seed, inputs, threads);
    let took = start.elapsed();
    println!("{}", tally.render());
    println!(
        "seed {seed}, {threads} threads, {:.1} s, {:.0} inputs/s",
        took.as_secs_f64(),
        tally.inputs as f64 / took.as_secs_f64()
    );
    for p in &tally.panics {
        println!("\n{p}");
    }
    if !tally.panics.is_empty() {
        std::process::exit(1);
    }
}
