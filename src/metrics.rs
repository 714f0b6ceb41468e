//! Metrics: what `GET /metrics` shows, as OpenMetrics text through `prometheus-client`.
//! Counters (names ending `_total`) count since the process started: HTTP requests and
//! their latency per route and provider, deliveries whose signature did not verify per
//! provider, and reconciliation outcomes. Gauges read from the store at each scrape:
//! stored events by status, memberships by sync status; on the shared store, the writer's
//! batches by kind and the jobs it ran again. `membersync_build_info` names the
//! version, the git commit it was built from and whether tracked files differed from it.
//!
//! What this module must never do: label by anything a caller chooses freely (an unknown
//! provider in a webhook URL is counted as `unknown`, unmatched paths are not counted), or
//! touch the store itself (the handler hands it the counts).

use crate::reconcile::Stats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// The content type of the text `render` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    provider: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Provider {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
    commit: String,
    /// `true` when tracked files differed from `commit` at build time.
    modified: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    latency: Family<Route, Histogram, fn() -> Histogram>,
    requests: Family<RouteStatus, Counter>,
    unverified: Family<Provider, Counter>,
    events_stored: Family<Status, Gauge>,
    sync_status: Family<Status, Gauge>,
    writer_batches: Family<Kind, Counter>,
    writer_reruns: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

impl Metrics {
    /// Registers everything, `reconcile`'s counters among them.
    pub fn new(reconcile: &Stats) -> Metrics {
        let mut registry = Registry::default();
        let latency = Family::<Route, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let requests = Family::<RouteStatus, Counter>::default();
        let unverified = Family::<Provider, Counter>::default();
        let events_stored = Family::<Status, Gauge>::default();
        let sync_status = Family::<Status, Gauge>::default();
        registry.register(
            "membersync_build",
            "The running version and the git commit it was built from",
            Info::new(Build {
                version: env!("CARGO_PKG_VERSION").to_string(),
                commit: crate::BUILD_COMMIT.to_string(),
                modified: crate::BUILD_MODIFIED.to_string(),
            }),
        );
        registry.register(
            "membersync_http_request_duration_seconds",
            "Time from request to answer, per route (and provider, for webhooks)",
            latency.clone(),
        );
        registry.register("membersync_http_requests", "Requests answered, per route and status", requests.clone());
        registry.register(
            "membersync_webhook_verification_failures",
            "Deliveries refused because their signature did not verify (401), per provider",
            unverified.clone(),
        );
        registry.register("membersync_events_stored", "Stored events by outcome", events_stored.clone());
        registry.register(
            "membersync_memberships_by_sync_status",
            "Memberships by reconciliation status",
            sync_status.clone(),
        );
        let writer_batches = Family::<Kind, Counter>::default();
        let writer_reruns = Counter::default();
        registry.register(
            "membersync_writer_batches",
            "Batches the shared store's writer committed or tried: beside other replicas' (keyed) or alone (exclusive)",
            writer_batches.clone(),
        );
        registry.register(
            "membersync_writer_reruns",
            "Jobs rolled back because another replica's batch held a member they reached, each run again",
            writer_reruns.clone(),
        );
        reconcile.register(&mut registry);
        Metrics { registry, latency, requests, unverified, events_stored, sync_status, writer_batches, writer_reruns }
    }

    /// One request answered. `provider` is empty outside the webhook routes.
    pub fn observe(&self, route: &str, provider: &str, status: u16, took: Duration) {
        let (route, provider) = (route.to_string(), provider.to_string());
        self.latency
            .get_or_create(&Route { route: route.clone(), provider: provider.clone() })
            .observe(took.as_secs_f64());
        if route.starts_with("/webhooks/") && status == 401 {
            self.unverified.get_or_create(&Provider { provider: provider.clone() }).inc();
        }
        self.requests.get_or_create(&RouteStatus { route, provider, status }).inc();
    }

    /// The text for a scrape, with the store's counts as they are now.
    pub fn render(
        &self,
        events_by_status: &[(String, i64)],
        memberships_by_sync_status: &[(String, i64)],
        writer: crate::store::WriterStats,
    ) -> String {
        // The store counts since it opened; the counters take what it counted since the last
        // scrape.
        for (kind, n) in [("keyed", writer.keyed_batches), ("exclusive", writer.exclusive_batches)] {
            if n > 0 {
                let c = self.writer_batches.get_or_create(&Kind { kind });
                c.inc_by(n.saturating_sub(c.get()));
            }
        }
        self.writer_reruns.inc_by(writer.reruns.saturating_sub(self.writer_reruns.get()));
        for (family, counts) in
            [(&self.events_stored, events_by_status), (&self.sync_status, memberships_by_sync_status)]
        {
            family.clear();
            for (status, n) in counts {
                family.get_or_create(&Status { status: status.clone() }).set(*n);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
