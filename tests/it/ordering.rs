//! Order does not matter: each provider's lifecycle delivered in a burst, shuffled and
//! with duplicates, ends in the state the in-order delivery gives. Events that arrive
//! before their membership exists are parked and applied once it does; older events are
//! stale; ties are ordered by lifecycle rank.

use crate::support::*;
use membersync::clock::{Clock, FixedClock};
use membersync::scenario::{event_time, signed_request, Scenario};
use std::collections::BTreeMap;
use std::sync::Arc;

type Final = BTreeMap<(String, String), (String, bool)>;

/// Delivers `files` in the given order with the clock standing at the burst's end, fires
/// what is due, and returns every membership's state and access.
async fn deliver_burst(
    sc: &Scenario,
    fixtures: &std::path::Path,
    files: &[String],
    end: chrono::DateTime<chrono::Utc>,
) -> Final {
    let clock = Arc::new(FixedClock::new(end));
    let ctx = ctx_on(std::path::Path::new(":memory:"), clock.clone());
    let config = ctx.config();
    for f in files {
        let (headers, body) = signed_request(&config, "demo", &sc.provider, fixtures, f, clock.now()).unwrap();
        let ack = membersync::ingest::accept(&ctx, "demo", &sc.provider, headers, body).await.expect("accepted");
        assert_ne!(ack.status, membersync::pipeline::Status::Failed, "{f}: {:?}", ack.outcome.reason);
    }
    membersync::timers::fire_due(&ctx, end).await;
    let mut out = Final::new();
    for e in ctx.store.events(None, None, 10_000).unwrap() {
        if let Some(mid) = e.member_id {
            if let Some(d) = ctx.store.member_detail(&mid, 0).unwrap() {
                for m in d.memberships {
                    out.insert((m.provider.clone(), m.key.clone()), (m.state.to_string(), m.has_access(end)));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn shuffled_and_duplicated_lifecycles_end_where_the_in_order_one_does() {
    let dir = root().join("tests/fixtures/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    files.sort();
    let mut failures = Vec::new();
    for path in files {
        let sc: Scenario = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        // A story whose end state follows arrival (`order_matters`) must still end with the
        // same access in every order; the others, in the same state too.
        let access_only = |f: &Final| f.iter().map(|(k, (_, access))| (k.clone(), *access)).collect::<Vec<_>>();
        if sc.arrival_decides_access.is_some() {
            continue;
        }
        let config = config(":memory:");
        let fixtures = sc.fixtures_dir(&path);
        let sends: Vec<String> = sc.steps.iter().filter_map(|s| s.send.clone()).collect();
        // The burst ends at the latest event: what timers made of the story until then is
        // part of the expected result for every order.
        let end = sends.iter().filter_map(|f| event_time(&config, &sc.provider, &fixtures, f)).max().unwrap();
        let expected = deliver_burst(&sc, &fixtures, &sends, end).await;
        for seed in 1..=12u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut order = sends.clone();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            for _ in 0..rng.below(3) + 1 {
                let dup = order[rng.below(order.len())].clone();
                let at = rng.below(order.len() + 1);
                order.insert(at, dup);
            }
            let got = deliver_burst(&sc, &fixtures, &order, end).await;
            let differs = match sc.order_matters {
                Some(_) => access_only(&got) != access_only(&expected),
                None => got != expected,
            };
            if differs {
                failures.push(format!(
                    "{} seed {seed}: order {order:?}\n  expected {expected:?}\n  got      {got:?}",
                    path.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} order(s) ended elsewhere:\n{}", failures.len(), failures.join("\n"));
}
