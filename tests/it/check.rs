//! `membersync check` reports every problem at once, located, with hints.

use crate::support::*;

/// The shipped files: `check` says `ok` and exits 0, `--strict` too; the fixture-coverage
/// notes are there for `--verbose`, not in the way.
// See: issue 18 (23 warnings on the untouched repository; `--strict` exited 1).
#[test]
fn check_says_ok_on_the_shipped_files() {
    let f = membersync::check::check(&root().join("membersync.yaml"));
    assert!(f.errors.is_empty() && f.warnings.is_empty(), "{}", f.render(true));
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_membersync"))
            .arg("check")
            .args(args)
            .current_dir(root())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    for args in [&[][..], &["--strict"][..]] {
        let (code, out) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {out}");
        assert_eq!(
            out,
            format!(
                "ok: membersync.yaml and its rules are valid ({} note(s): provider paths no fixture has; --verbose lists them)\n",
                f.notes.len()
            ),
            "{args:?}"
        );
    }
    let (code, out) = run(&["--verbose"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().filter(|l| l.contains(": note: ")).count(), f.notes.len(), "{out}");
    assert!(out.ends_with(&format!("0 error(s), 0 warning(s), {} note(s)\n", f.notes.len())), "{out}");
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
    assert_eq!(f.errors.len(), 3, "{}", f.render(true));
    let errors: String = f.errors.iter().map(|d| format!("{d}\n")).collect();
    insta_settings().bind(|| insta::assert_snapshot!("check_three_mistakes", errors));
}
