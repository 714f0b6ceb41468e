//! Order does not matter: each provider's lifecycle delivered in a burst, shuffled and
//! with duplicates, ends in the state the in-order delivery gives. Events that arrive
//! before their membership exists are parked and applied once it does; older events are
//! stale; ties are ordered by lifecycle rank.

use crate::support::*;
use membersync::clock::FixedClock;
use membersync::scenario::{event_time, signed_request, Scenario};
use std::collections::BTreeMap;
use std::sync::Arc;

pub(crate) type Final = BTreeMap<(String, String), (String, bool)>;

/// Delivers `files` with the clock standing at the burst's end, fires what is due, and
/// returns every membership's state and access. One node gets them one after another, in
/// the given order; several replicas (sharing one store) get them all at once, file `i`
/// going to replica `i % n`, so that which arrives first is theirs to race for, and every
/// replica then fires what is due, at once.
pub(crate) async fn deliver_burst(
    sc: &Scenario,
    fixtures: &std::path::Path,
    files: &[String],
    end: chrono::DateTime<chrono::Utc>,
    replicas: &[Arc<membersync::pipeline::Ctx>],
) -> Final {
    let config = replicas[0].config();
    let mut sent = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let ctx = replicas[i % replicas.len()].clone();
        let (headers, body) = signed_request(&config, "demo", &sc.provider, fixtures, f, end).unwrap();
        let (provider, f) = (sc.provider.clone(), f.clone());
        sent.push(tokio::spawn(async move {
            let ack = membersync::ingest::accept(&ctx, "demo", &provider, headers, body).await.expect("accepted");
            assert_ne!(ack.status, membersync::pipeline::Status::Failed, "{f}: {:?}", ack.outcome.reason);
        }));
        if replicas.len() == 1 {
            sent.pop().unwrap().await.unwrap();
        }
    }
    for s in sent {
        s.await.unwrap();
    }
    let fired: Vec<_> = replicas
        .iter()
        .map(|ctx| {
            let ctx = ctx.clone();
            tokio::spawn(async move { membersync::timers::fire_due(&ctx, end).await })
        })
        .collect();
    for f in fired {
        f.await.unwrap();
    }
    membersync::store::read(&replicas[0].store, move |s| {
        let mut out = Final::new();
        for e in s.events(None, None, 10_000)? {
            if let Some(mid) = e.member_id {
                if let Some(d) = s.member_detail(&mid, 0)? {
                    for m in d.memberships {
                        out.insert((m.provider.clone(), m.key.clone()), (m.state.to_string(), m.has_access(end)));
                    }
                }
            }
        }
        Ok(out)
    })
    .await
    .unwrap()
}

/// One SQLite node on a fixed clock standing at `end`.
pub(crate) fn one_node(end: chrono::DateTime<chrono::Utc>) -> Vec<Arc<membersync::pipeline::Ctx>> {
    vec![ctx_on(std::path::Path::new(":memory:"), Arc::new(FixedClock::new(end)))]
}

/// A scenario: its file name, the scenario, its fixtures, its deliveries in order, its end.
pub(crate) type Story = (String, Scenario, std::path::PathBuf, Vec<String>, chrono::DateTime<chrono::Utc>);

/// The scenarios whose end state does not depend on arrival (those where it does are told
/// apart by access only), each with its fixtures, its deliveries in order and its end.
pub(crate) fn scenarios() -> Vec<Story> {
    let dir = root().join("tests/fixtures/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let sc: Scenario = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if sc.arrival_decides_access.is_some() {
            continue;
        }
        let config = config(":memory:");
        let fixtures = sc.fixtures_dir(&path);
        let sends: Vec<String> = sc.steps.iter().filter_map(|s| s.send.clone()).collect();
        // The burst ends at the latest event: what timers made of the story until then is
        // part of the expected result for every order.
        let end = sends.iter().filter_map(|f| event_time(&config, &sc.provider, &fixtures, f)).max().unwrap();
        out.push((path.file_name().unwrap().to_string_lossy().to_string(), sc, fixtures, sends, end));
    }
    out
}

/// `sends` shuffled with one to three of them sent twice more, by `seed`.
pub(crate) fn shuffled(sends: &[String], seed: u64) -> Vec<String> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order = sends.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for _ in 0..rng.below(3) + 1 {
        let dup = order[rng.below(order.len())].clone();
        let at = rng.below(order.len() + 1);
        order.insert(at, dup);
    }
    order
}

/// Whether `got` ends where `expected` does: the same state and access of every
/// membership or, for a story whose end state follows arrival (`order_matters`), the same
/// access.
pub(crate) fn same_end(sc: &Scenario, got: &Final, expected: &Final) -> bool {
    let access_only = |f: &Final| f.iter().map(|(k, (_, access))| (k.clone(), *access)).collect::<Vec<_>>();
    match sc.order_matters {
        Some(_) => access_only(got) == access_only(expected),
        None => got == expected,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_and_duplicated_lifecycles_end_where_the_in_order_one_does() {
    let mut failures = Vec::new();
    for (name, sc, fixtures, sends, end) in scenarios() {
        let expected = deliver_burst(&sc, &fixtures, &sends, end, &one_node(end)).await;
        for seed in 1..=12u64 {
            let order = shuffled(&sends, seed);
            let got = deliver_burst(&sc, &fixtures, &order, end, &one_node(end)).await;
            if !same_end(&sc, &got, &expected) {
                failures
                    .push(format!("{name} seed {seed}: order {order:?}\n  expected {expected:?}\n  got      {got:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} order(s) ended elsewhere:\n{}", failures.len(), failures.join("\n"));
}
