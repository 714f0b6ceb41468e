//! `membersync check` reports every problem at once, located, with hints.

use crate::support::*;

#[test]
fn check_passes_on_the_shipped_files_with_only_warnings() {
    let f = membersync::check::check(&root().join("membersync.yaml"));
    assert!(f.errors.is_empty(), "{}", f.render());
}

#[test]
fn check_reports_three_different_mistakes_at_once() {
    let (dir, _) = editable_config();
    let edit = |rel: &str, from: &str, to: &str| {
        let p = dir.path().join(rel);
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{rel} has {from}");
        std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
    };
    // 1. A misspelt key in the config.
    edit("membersync.yaml", "    policy:\n", "    polcy:\n");
    // 2. A canonical kind that does not exist, in a provider file.
    edit("rules/providers/stripe.yaml", "  invoice.paid:\n    kind: renewed", "  invoice.paid:\n    kind: renewd");
    // 3. A machine input that does not exist, in a rule.
    edit("rules/pause.rhai", "#{ input: \"resume\" }", "#{ input: \"resum\" }");

    let f = membersync::check::check(&dir.path().join("membersync.yaml"));
    assert_eq!(f.errors.len(), 3, "{}", f.render());
    let errors: String = f.errors.iter().map(|d| format!("{d}\n")).collect();
    insta_settings().bind(|| insta::assert_snapshot!("check_three_mistakes", errors));
}
