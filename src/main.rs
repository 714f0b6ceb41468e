use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the request threads allocate what the writer thread
/// frees (and the dry run's reader thread what its applying thread frees), and glibc's
/// per-arena locks made those frees wait on each other.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MEMBERSYNC_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(if std::env::args().nth(1).as_deref() == Some("serve") {
                "info"
            } else {
                "warn"
            })
        }))
        .with_writer(std::io::stderr)
        .init();
    membersync::cli::run()
}
