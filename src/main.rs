use std::process::ExitCode;

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
