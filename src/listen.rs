//! The connection loop: accepts at most `max_connections` clients at once (past it, it waits
//! before accepting more rather than failing accepts), gives each request's headers
//! `header_timeout` to arrive (a new connection's first, an idle keep-alive one's next: so
//! idle connections close then too), and closes a connection whose client stops reading
//! what it is sent for `write_timeout`; on shutdown it stops accepting and lets every
//! connection finish what it is answering. The body's own time limit is the handler's
//! (`ingest`). No limit runs while a handler works: a slow answer is never cut. At start it
//! raises the open-file limit to what the system allows and, if `max_connections` still
//! does not fit in it beside the service's own files, serves fewer and says so: accepts
//! never fail for want of descriptors.
//!
//! What this module must never do: answer a request itself, or drop one in flight at
//! shutdown.

use crate::config::ConnectionLimits;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// Serves `app` on `listener` until `shutdown` resolves, then waits for the connections.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(fit_to_open_files(limits.max_connections)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let accept_failures = crate::logging::Throttle::default();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut shutdown => break,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors or a reset before accept: wait a moment, go on.
                    if let Some(held_back) = accept_failures.first_in_interval("accept") {
                        tracing::warn!(held_back, error = %e, "Could not accept a connection.");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(Stalled::new(stream, limits.write_timeout));
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    // Finish what is being answered, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        // Reap what has finished, so the set does not grow with the connections served.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Descriptors kept for what the service opens beside its clients: the database and its
/// WAL and shared memory per connection, the log, the rules watcher, outbound clients.
const RESERVED_FILES: u64 = 64;

/// How many connections to serve at once: `wanted`, or fewer when the open-file limit (once
/// raised to the system's hard limit) leaves no room for them beside `RESERVED_FILES`.
fn fit_to_open_files(wanted: usize) -> usize {
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "Could not read or raise the open-file limit; serving max_connections as configured.");
            return wanted;
        }
    };
    let room = usize::try_from(soft.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX).max(1);
    if wanted <= room {
        return wanted;
    }
    tracing::warn!(
        max_connections = wanted,
        open_file_limit = soft,
        serving = room,
        "max_connections does not fit in the open-file limit (ulimit -n) beside the service's own {RESERVED_FILES} files; \
         serving at most {room} connections at once. Raise the limit or lower limits.max_connections."
    );
    room
}

/// A connection whose writes error when the client has not taken any of what it is sent
/// for `limit` (a client that pipelines requests and never reads would otherwise hold its
/// slot, and shutdown, for ever). Reads are left alone: a handler's time is its own.
struct Stalled {
    inner: TcpStream,
    limit: std::time::Duration,
    stalled_since: Option<Pin<Box<Sleep>>>,
}

impl Stalled {
    fn new(inner: TcpStream, limit: std::time::Duration) -> Stalled {
        Stalled { inner, limit, stalled_since: None }
    }
}

impl AsyncRead for Stalled {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stalled {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, data) {
            Poll::Pending => {
                let limit = self.limit;
                let since = self.stalled_since.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match since.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client took nothing of the answer for the write limit",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => {
                self.stalled_since = None;
                ready
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
