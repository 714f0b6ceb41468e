//! Every fixture through `simulate` (decode → extract → rules → machine on an in-memory
//! store), snapshotted as the JSON `simulate` prints. A fixture `<name>.json` may have a
//! `<name>.state` beside it: the membership state to start from (`simulate --state`);
//! without one it starts from none; a `<name>.now` gives the time it was received. Snapshot names are `<provider>__<fixture>` so adding a
//! provider never renames another's snapshots.

use crate::support::*;
use membersync::machine::MState;
use membersync::simulate::SimulateInput;
use membersync::store::sqlite::{Options, SqliteStore};
use membersync::store::Store;
use std::sync::Arc;

fn fixtures() -> Vec<(String, std::path::PathBuf)> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(root().join("tests/fixtures")).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() || dir.file_name().is_some_and(|n| n == "scenarios") {
            continue;
        }
        let provider = dir.file_name().unwrap().to_string_lossy().to_string();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            if (name.ends_with(".json") && !name.ends_with(".headers.json")) || name.ends_with(".form") {
                out.push((provider.clone(), f));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn fixtures_simulate_to_reviewed_snapshots() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let all = fixtures();
    assert!(all.len() >= 20, "fixtures found: {}", all.len());
    let mut failed = Vec::new();
    for (provider, path) in all {
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let (body, content_type, headers) = crate::scenarios::load_fixture(&provider, &file);
        let state = std::fs::read_to_string(path.with_extension("state"))
            .ok()
            .map(|s| MState::parse(s.trim()).expect("a .state file names a state"));
        let input = SimulateInput {
            provider: provider.clone(),
            tenant: "demo".into(),
            headers,
            now: crate::scenarios::fixture_now(&provider, &file),
            state,
            body,
            content_type: content_type.into(),
        };
        let out = rt.block_on(async {
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(":memory:", Options::default()).unwrap());
            membersync::simulate::simulate_json(config(":memory:"), rules(), store, input).await.unwrap()
        });
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let name = format!("{provider}__{stem}");
        // Check every fixture, then fail once, so one run writes every pending snapshot.
        let checked = std::panic::catch_unwind(|| insta_settings().bind(|| insta::assert_json_snapshot!(name, out)));
        if checked.is_err() {
            failed.push(format!("{provider}/{stem}"));
        }
    }
    assert!(failed.is_empty(), "snapshots differ for: {failed:?}");
}

/// `simulate` of an example file fills its `${now…}` times from `--now`, as `send` does
/// from the clock: the example is read as the story it tells, not refused as undated.
#[test]
fn simulate_fills_example_times_from_now() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_membersync"))
        .current_dir(root())
        .args(["simulate", "--provider", "stripe", "--now", "2026-01-01T00:00:00Z", "--state", "active"])
        .arg("examples/stripe/3_invoice_payment_failed.json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["event"]["occurred_at"], "2026-01-01T00:00:00Z", "{j:#}");
    assert_eq!(j["event"]["period_end"], "2026-01-31T00:00:00Z", "{j:#}");
    assert_eq!(j["outcome"]["status"], "applied", "{j:#}");
    assert_eq!((&j["outcome"]["from"], &j["outcome"]["to"]), (&"active".into(), &"past_due".into()), "{j:#}");
}
