//! Operating the binary: `--version` names the commit it was built from (and `/metrics`
//! says the same), `completions` prints scripts the shells accept, and
//! `MEMBERSYNC_LOG_FORMAT=json` writes one JSON object per line that no request can break.

use crate::support::*;
use membersync::clock::{Clock, FixedClock, SystemClock};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_membersync");

/// The binary with `args`; its exit code, stdout and stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let Output { status, stdout, stderr } = Command::new(BIN).args(args).output().unwrap();
    (status.code(), String::from_utf8(stdout).unwrap(), String::from_utf8_lossy(&stderr).into_owned())
}

/// `git rev-parse --short=12 HEAD` of this checkout; `None` only when `git` is not
/// installed.
fn checkout_commit() -> Option<String> {
    let out = match Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(root()).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        other => other.unwrap(),
    };
    assert!(out.status.success(), "git rev-parse in a checkout: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8(out.stdout).unwrap().trim().to_string())
}

#[tokio::test]
async fn version_names_the_checkouts_commit_and_build_info_carries_it() {
    let (code, out, err) = run(&["--version"]);
    assert_eq!(code, Some(0), "{err}");
    let version = format!("membersync {} (commit ", env!("CARGO_PKG_VERSION"));
    let commit = out.strip_prefix(&version).unwrap_or_else(|| panic!("`{out}` does not start `{version}`"));
    let commit = commit.trim_end().trim_end_matches(')').trim_end_matches(", modified");
    assert_eq!(commit, membersync::BUILD_COMMIT, "the binary and the library name one build");
    match checkout_commit() {
        Some(head) => assert_eq!(commit, head, "`--version` names HEAD: {out}"),
        None => eprintln!("git is not installed: the commit is not compared with HEAD"),
    }
    let s = Server::start().await;
    let metrics = s.get_text("/metrics").await;
    let build_info = metrics.lines().find(|l| l.starts_with("membersync_build_info{")).expect("build_info");
    let modified = membersync::BUILD_MODIFIED;
    assert_eq!(
        build_info,
        format!(
            r#"membersync_build_info{{version="{}",commit="{commit}",modified="{modified}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(out.contains(", modified)"), modified, "{out}");
}

/// Every subcommand's name, as the parser knows them.
fn subcommands() -> Vec<String> {
    use clap::CommandFactory;
    let names: Vec<String> =
        membersync::cli::Cli::command().get_subcommands().map(|c| c.get_name().to_string()).collect();
    assert!(names.len() >= 10 && names.iter().any(|n| n == "migrate-store"), "{names:?}");
    names
}

/// Whether `shell` can be run here.
fn installed(shell: &str) -> bool {
    Command::new(shell).arg("-c").arg("exit 0").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// `shell` checks `script`'s syntax without running it (`-n`).
fn assert_parses(shell: &str, script: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), script).unwrap();
    let out = Command::new(shell).arg("-n").arg(file.path()).output().unwrap();
    assert!(out.status.success(), "{shell} -n refused the script: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn completions_for_each_shell_name_every_subcommand_and_the_shell_accepts_them() {
    let names = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, err) = run(&["completions", shell]);
        assert_eq!(code, Some(0), "{shell}: {err}");
        for name in &names {
            assert!(script.contains(name.as_str()), "the {shell} script does not name `{name}`");
        }
        if shell == "bash" || installed(shell) {
            assert_parses(shell, &script);
        } else {
            eprintln!("{shell} is not installed: its script's syntax is not checked");
        }
    }
}

/// The bash script, sourced, completes a subcommand from its first letters.
#[test]
fn bash_completion_completes_a_subcommand() {
    let (_, script, _) = run(&["completions", "bash"]);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), script).unwrap();
    let probe = r#"source "$1"
COMP_WORDS=(membersync re); COMP_CWORD=1; COMP_LINE="membersync re"; COMP_POINT=${#COMP_LINE}
_membersync membersync re membersync
printf '%s\n' "${COMPREPLY[@]}""#;
    let out = Command::new("bash").args(["-c", probe, "probe"]).arg(file.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut offered: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
    offered.sort();
    assert_eq!(offered, ["reconcile", "rederive", "replay", "restore"]);
}

#[test]
fn completions_for_an_unknown_shell_name_the_shells_there_are() {
    let (code, out, err) = run(&["completions", "tcsh"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("invalid value 'tcsh'"), "{err}");
    for shell in ["bash", "zsh", "fish"] {
        assert!(err.contains(shell), "the error names `{shell}`: {err}");
    }
}

/// SIGTERM, then waits (at most 30 s) for the service to exit.
fn terminate(svc: &mut Service) {
    let pid = i32::try_from(svc.child.id()).unwrap();
    // SAFETY: `kill` on the child's own pid, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while svc.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the service did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every line of `dir/service.log`, parsed: panics naming the first that is not a JSON
/// object.
fn json_lines(dir: &Path) -> Vec<Value> {
    let log = std::fs::read_to_string(dir.join("service.log")).unwrap();
    assert!(log.ends_with('\n'), "the log ends with a whole line: {log}");
    log.lines()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => v,
            _ => panic!("not a JSON object: `{line}`\nin\n{log}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_webhooks_fields_and_no_line_forged() {
    let (dir, config) = editable_config();
    let signer = ctx_with(config, Arc::new(FixedClock::new(SystemClock.now())));
    let env = [("MEMBERSYNC_LOG_FORMAT", "json")];
    let mut svc = spawn_env(dir.path(), free_port(), None, "info", &env).await;
    let client = reqwest::Client::new();

    // An event id (signed, so the provider's own) with characters that would end a line,
    // or that JSON strings may hold unescaped but a reader's terminal shows as a break.
    let hostile_id = r"evt_ops\n\u2028\u0085\u202e\u001b[31m";
    let body = invoice_paid_far_ahead().replace("evt_1QxaZ1K7dEmoAc01GAm3W0e2", hostile_id).into_bytes();
    let mut req = client.post(format!("{}/webhooks/demo/stripe", svc.url)).body(body.clone());
    for (k, v) in signed_headers(&signer, "stripe", &body, SystemClock.now()) {
        req = req.header(k, v);
    }
    let ack: Value = req.send().await.unwrap().json().await.unwrap();
    assert_eq!(ack["status"], "applied", "{ack}");
    assert_eq!(ack["event_id"], "evt_ops\n\u{2028}\u{85}\u{202e}\u{1b}[31m", "{ack}");
    // A tenant and a provider that try to end the line and start one of their own.
    let hostile = format!("{}/webhooks/demo%0A%7B%22level%22:%22ERROR%22%7D/stripe%22,%22x%22:%22%E2%80%A8", svc.url);
    let refused = client.post(hostile).body("{}").send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 404);
    terminate(&mut svc);

    let lines = json_lines(dir.path());
    for line in &lines {
        for key in ["timestamp", "level", "target", "fields"] {
            assert!(!line[key].is_null(), "no `{key}`: {line}");
        }
        assert!(line["timestamp"].as_str().is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()), "{line}");
    }
    let said = |message: &str| -> &Value {
        let found = lines.iter().find(|l| l["fields"]["message"] == message);
        &found.unwrap_or_else(|| panic!("no line `{message}` in {lines:#?}"))["fields"]
    };
    let processed = said("Webhook processed.");
    assert_eq!(processed["tenant"], "demo");
    assert_eq!(processed["provider"], "stripe");
    assert_eq!(processed["event_id"], ack["event_id"], "the id reads back as it was sent");
    assert_eq!(processed["status"], "applied");
    assert!(processed["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{processed}");

    let unknown = said("Webhook for an unknown target.");
    assert_eq!(unknown["tenant"], r#"demo\n{\"level\":\"ERROR\"}"#, "escaped, inside one value");
    assert_eq!(unknown["provider"], r#"stripe\",\"x\":\"\u{2028}"#);
    assert!(lines.iter().all(|l| l["level"] != "ERROR"), "no forged line: {lines:#?}");
    assert_eq!(lines.iter().filter(|l| l["level"] == "WARN").count(), 1, "{lines:#?}");
}

#[test]
fn an_unknown_log_format_is_refused_before_anything_starts() {
    let (dir, _) = editable_config();
    let port = free_port().to_string();
    let config = dir.path().join("membersync.yaml");
    let mut child = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .env("MEMBERSYNC_LOG_FORMAT", "logfmt")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`serve` started with MEMBERSYNC_LOG_FORMAT=logfmt");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        "error: MEMBERSYNC_LOG_FORMAT=`logfmt` is not a log format: set it to `text` (the default) or `json`, or unset it\n"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().starts_with("membersync.db")), "a database was opened: {left:?}");
}
