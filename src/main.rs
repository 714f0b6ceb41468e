//! The `membersync` binary: the allocator, the log format and writer, the panic hook, then the
//! command line (`cli`).
//!
//! What this module must never do: anything a command does; that is the library's.

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the request threads allocate what the writer thread
/// frees (and the dry run's reader thread what its applying thread frees), and glibc's
/// per-arena locks made those frees wait on each other.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Refused before anything starts: a service whose lines no one can read is no use.
    let format = match membersync::logging::Format::from_env() {
        Ok(format) => format,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log = membersync::logging::Buffered::with_format(std::io::stderr(), membersync::logging::FLUSH_EVERY, format);
    let on_panic = log.clone();
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        on_panic.flush();
        report_panic(info)
    }));
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMBERSYNC_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if std::env::args().nth(1).as_deref() == Some("serve") {
            "info"
        } else {
            "warn"
        })
    });
    membersync::logging::install(format, &log, filter);
    let code = membersync::cli::run();
    log.close();
    code
}
