//! Operators edit rules under a running server: a valid edit governs the next webhook; a
//! broken one is refused with file:line while the previous rules keep serving.

use crate::support::*;
use membersync::clock::{Clock, FixedClock};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

async fn version(s: &Server) -> Value {
    s.get("/admin/rules", Some(TOKEN)).await.1
}

/// Posts a Stripe fixture signed at the server's (fixed) clock time.
async fn post_at(s: &Server, clock: &FixedClock, secs: i64, name: &str) -> Value {
    clock.set(at(secs));
    let body = fixture("stripe", name);
    let headers = signed_headers(&s.ctx, "stripe", &body, clock.now());
    let (status, ack) = s.post("/webhooks/demo/stripe", &headers, body).await;
    assert_eq!(status, 200, "{ack}");
    ack
}

async fn grace_until(s: &Server) -> Value {
    let (_, found) = s.get("/members?email=ada@example.com", Some(TOKEN)).await;
    found["members"][0]["memberships"][0]["grace_until"].clone()
}

/// A server on an editable copy of the config, with Ada subscribed; and its rules dir.
async fn subscribed_server() -> (Server, Arc<FixedClock>, std::path::PathBuf) {
    let (dir, config) = editable_config();
    let rules_dir = dir.path().join("rules");
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let s = Server::start_with(config, clock.clone(), dir).await;
    post_at(&s, &clock, 1_767_225_600, "checkout_session_completed").await;
    post_at(&s, &clock, 1_767_225_601, "customer_subscription_created").await;
    (s, clock, rules_dir)
}

#[tokio::test]
async fn edited_rule_file_governs_the_next_webhook() {
    let (s, clock, rules_dir) = subscribed_server().await;
    let before = version(&s).await["version"].clone();

    // The operator shortens the grace period to one day, in the rule file itself.
    let grace = rules_dir.join("grace.rhai");
    let src = std::fs::read_to_string(&grace).unwrap();
    assert!(src.contains("days(cfg.grace_days)"));
    std::fs::write(&grace, src.replace("days(cfg.grace_days)", "days(1)")).unwrap();

    // The file watch reloads it (bounded wait).
    let mut now_version = before.clone();
    for _ in 0..100 {
        now_version = version(&s).await["version"].clone();
        if now_version != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(now_version, before, "the watcher reloaded the edited rules");
    let rules = version(&s).await;
    assert_eq!(rules["last_reload"]["ok"], true);
    assert_eq!(rules["last_reload"]["trigger"], "watch");

    let ack = post_at(&s, &clock, 1_769_907_606, "invoice_payment_failed").await;
    assert_eq!(ack["status"], "applied");
    assert_eq!(grace_until(&s).await, "2026-02-02T01:00:06Z", "one day, not seven");
    // The transition records the rule-set version that made it.
    let (_, e) = s.get("/events/evt_1QxqTxK7dEmoAc01LZbqVCbE", Some(TOKEN)).await;
    assert_eq!(e["outcome"]["rule"]["version"], now_version);
    s.stop().await;
}

#[tokio::test]
async fn broken_rule_edit_is_reported_with_file_and_line_and_old_rules_keep_serving() {
    let (s, clock, rules_dir) = subscribed_server().await;
    let before = version(&s).await["version"].clone();

    // A syntax error on line 3 of grace.rhai.
    let grace = rules_dir.join("grace.rhai");
    let src = std::fs::read_to_string(&grace).unwrap();
    let mut lines: Vec<&str> = src.lines().collect();
    lines.insert(2, "let = ;");
    std::fs::write(&grace, lines.join("\n")).unwrap();

    let (status, answer) =
        s.post("/admin/reload", &[("authorization".into(), format!("Bearer {TOKEN}"))], vec![]).await;
    assert_eq!(status, 422, "{answer}");
    let errors = answer["errors"].to_string();
    assert!(errors.contains("rules/grace.rhai:3:"), "{errors}");

    let rules = version(&s).await;
    assert_eq!(rules["version"], before, "the old rules stay in force");
    assert_eq!(rules["last_reload"]["ok"], false);
    assert_eq!(rules["last_reload"]["errors"][0]["file"], "rules/grace.rhai");
    assert_eq!(rules["last_reload"]["errors"][0]["line"], 3);

    // And they keep serving: the failed payment gets the seven days of the old rule.
    let ack = post_at(&s, &clock, 1_769_907_606, "invoice_payment_failed").await;
    assert_eq!(ack["status"], "applied");
    assert_eq!(grace_until(&s).await, "2026-02-08T01:00:06Z");
    s.stop().await;
}

/// The grace period is the file's: `grace_days: 3` in `membersync.yaml` gives a failed
/// payment three days, over HTTP.
// See: issue 26 (forcing grace_days to 7 at load was caught by one indirect dry-run test).
#[tokio::test]
async fn grace_days_in_the_config_file_sets_grace_until() {
    let (dir, _) = editable_config();
    let file = dir.path().join("membersync.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap();
    assert!(yaml.contains("grace_days: 7 "), "the shipped default");
    std::fs::write(&file, yaml.replace("grace_days: 7 ", "grace_days: 3 ")).unwrap();
    let mut config = membersync::config::Config::load(&file).unwrap();
    config.database = dir.path().join("m.db").display().to_string();
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let s = Server::start_with(config, clock.clone(), dir).await;
    post_at(&s, &clock, 1_767_225_600, "checkout_session_completed").await;
    post_at(&s, &clock, 1_767_225_601, "customer_subscription_created").await;
    let ack = post_at(&s, &clock, 1_769_907_606, "invoice_payment_failed").await;
    assert_eq!(ack["status"], "applied");
    // invoice.payment_failed at 2026-02-01T01:00:06Z, three days on.
    assert_eq!(grace_until(&s).await, "2026-02-04T01:00:06Z");
    s.stop().await;
}

/// The version every decision records covers everything that decides: a rule file, a
/// provider file, a tenant's policy and its product map each change it; a comment in YAML
/// does not. Each decision after a reload records the new version, and `explain` shows it.
// See: issue 18 (grace_days 7 → 3 and a reload left the version as it was).
#[tokio::test]
async fn the_version_covers_rules_provider_files_policy_and_products() {
    let (s, clock, rules_dir) = subscribed_server().await;
    let root = rules_dir.parent().unwrap().to_path_buf();
    let mut seen = vec![version(&s).await["version"].as_str().unwrap().to_string()];
    let edits: &[(&str, &str, &str, bool)] = &[
        ("membersync.yaml", "grace_days: 7 ", "grace_days: 3 ", true),
        ("membersync.yaml", "prod_Pro001: [pro]", "prod_Pro001: [pro, extra]", true),
        ("rules/providers/stripe.yaml", "kind: renewed", "kind: renewed  # a comment", false),
        ("rules/providers/stripe.yaml", "api_base: https://api.stripe.com", "api_base: https://api.stripe.test", true),
        ("rules/grace.rhai", "fn on_payment_failed(", "// noted\nfn on_payment_failed(", true),
    ];
    for (file, from, to, changes) in edits {
        let path = root.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has `{from}`");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let (status, answer) =
            s.post("/admin/reload", &[("authorization".into(), format!("Bearer {TOKEN}"))], vec![]).await;
        assert_eq!(status, 200, "{file}: {answer}");
        let now = answer["version"].as_str().unwrap().to_string();
        assert_eq!(version(&s).await["version"], now.as_str(), "GET /admin/rules shows it");
        let last = seen.last().unwrap().clone();
        assert_eq!(now != last, *changes, "{file}: `{from}` → `{to}` changed the version from {last} to {now}");
        seen.push(now);
    }
    // The next decision records the version in force, and explain shows it.
    let ack = post_at(&s, &clock, 1_769_907_606, "invoice_payment_failed").await;
    assert_eq!(ack["status"], "applied");
    let (_, stored) = s.get(&format!("/events/{}", ack["event_id"].as_str().unwrap()), Some(TOKEN)).await;
    assert_eq!(stored["outcome"]["rule"]["version"], seen.last().unwrap().as_str(), "{stored}");
    let explained = membersync::explain::explain_json(&*s.ctx.store, &member(&s.ctx, "ada@example.com"), clock.now())
        .unwrap()
        .to_string();
    assert!(explained.contains(seen.last().unwrap().as_str()), "explain names the version: {explained}");
    s.stop().await;
}

/// One broken edit per kind of error `membersync check` reports. For each, on a running
/// service: `check` finds errors ⇔ the reload is refused (422), the version stays, and
/// `GET /admin/rules` shows what `check` showed, by file and line; undone, both accept.
// See: issue 26 and issue 18 (an input the machine lacks passed the reload, though `check`
// refused it; a handler named after no event kind was only a unit test's concern).
#[tokio::test]
async fn reload_refuses_exactly_what_check_refuses() {
    let (dir, config) = editable_config();
    let root = dir.path().to_path_buf();
    let s = Server::start_with(config, Arc::new(FixedClock::new(at(1_767_225_600))), dir).await;
    let cfg = root.join("membersync.yaml");
    let before = version(&s).await["version"].clone();
    // (file, what is replaced, by what, a word the error names)
    let edits: &[(&str, &str, &str, &str)] = &[
        ("membersync.yaml", "  policy:", "  polcy:", "polcy"),
        ("membersync.yaml", "max_batch: 32", "max_batch: lots", "max_batch"),
        ("membersync.yaml", "      memberful:\n", "      paddle:\n        products: {}\n      memberful:\n", "paddle"),
        ("rules/providers/stripe.yaml", "kind: renewed", "kind: renewd", "renewd"),
        ("rules/providers/stripe.yaml", "verify:\n", "verify:\n\t", "stripe.yaml"),
        ("rules/grace.rhai", "fn on_payment_failed(", "fn on_payment_failed(,", "grace.rhai"),
        (
            "rules/grace.rhai",
            "fn on_payment_failed(",
            "fn on_renewd(ev, m, cfg) { () }\nfn on_payment_failed(",
            "on_renewd",
        ),
        ("rules/grace.rhai", "input: \"payment_failed\"", "input: \"payment_fail\"", "payment_fail"),
        ("rules/pause.rhai", "\"paused\"", "\"pausd\"", "pausd"),
    ];
    for (file, from, to, names) in edits {
        let path = root.join(file);
        let good = std::fs::read_to_string(&path).unwrap();
        assert!(good.contains(from), "{file} has `{from}`");
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();

        let findings = membersync::check::check(&cfg);
        assert!(!findings.errors.is_empty(), "{file}: `{to}`: check finds an error");
        let shown = findings.render(false);
        assert!(shown.contains(names), "{file}: check names `{names}`: {shown}");
        let (status, answer) =
            s.post("/admin/reload", &[("authorization".into(), format!("Bearer {TOKEN}"))], vec![]).await;
        assert_eq!(status, 422, "{file}: `{to}`: the reload is refused: {answer}");
        let rules = version(&s).await;
        assert_eq!(rules["version"], before, "{file}: the rules in force stay");
        assert_eq!(rules["last_reload"]["ok"], false);
        let errors = &rules["last_reload"]["errors"];
        let first = &findings.errors[0];
        assert!(
            errors.as_array().unwrap().iter().any(|e| e["file"] == first.file.as_str() && e["line"] == first.line),
            "{file}: the service shows check's {}:{}: {errors}",
            first.file,
            first.line
        );

        std::fs::write(&path, &good).unwrap();
        assert!(membersync::check::check(&cfg).errors.is_empty(), "{file}: undone, check is clean");
        let (status, answer) =
            s.post("/admin/reload", &[("authorization".into(), format!("Bearer {TOKEN}"))], vec![]).await;
        assert_eq!(status, 200, "{file}: undone, the reload is accepted: {answer}");
    }
    s.stop().await;
}

/// `serve` refuses to start on files `check` refuses, naming the error.
#[tokio::test]
async fn serve_refuses_to_start_on_files_check_refuses() {
    let (dir, _) = editable_config();
    let grace = dir.path().join("rules/grace.rhai");
    let src = std::fs::read_to_string(&grace).unwrap();
    std::fs::write(&grace, src.replacen("input: \"payment_failed\"", "input: \"payment_fail\"", 1)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_membersync"))
        .args(["serve", "--config"])
        .arg(dir.path().join("membersync.yaml"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it did not start");
    assert!(stderr.contains("rules/grace.rhai:") && stderr.contains("payment_fail"), "{stderr}");
}

/// A provider file that cannot be read as text (not UTF-8: a half-copied file, a binary
/// dropped by mistake): `check` and the reload both refuse it.
// See: issue 26 (found on review: check skipped it and passed, the reload refused).
#[tokio::test]
async fn unreadable_provider_file_is_refused_by_check_and_reload_alike() {
    let (dir, config) = editable_config();
    let clock = Arc::new(FixedClock::new(at(1_769_907_606)));
    let ctx = ctx_with(config, clock);
    std::fs::write(dir.path().join("rules/providers/junk.yaml"), [0xffu8, 0xfe, 0x00, b'\n']).unwrap();
    let f = membersync::check::check(&dir.path().join("membersync.yaml"));
    let reloaded = membersync::reload::reload(&ctx, "test");
    assert!(!f.errors.is_empty(), "check refuses it");
    assert_eq!(
        f.errors.is_empty(),
        reloaded.is_ok(),
        "check {} but reload {:?}",
        if f.errors.is_empty() { "accepts" } else { "refuses" },
        reloaded
    );
}

/// The same with the binaries, a directory named like a provider file: `check` exits 1
/// and `serve` does not start.
#[tokio::test]
async fn provider_path_that_is_a_directory_fails_check_and_serve_alike() {
    let (dir, _) = editable_config();
    std::fs::create_dir(dir.path().join("rules/providers/old.yaml")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_membersync"))
        .args(["check", "--config"])
        .arg(dir.path().join("membersync.yaml"))
        .output()
        .unwrap();
    let check_ok = out.status.success();
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_membersync"))
        .args(["serve", "--config"])
        .arg(dir.path().join("membersync.yaml"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut serve_ok = false;
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await.is_ok() {
            serve_ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let out2 = child.wait_with_output().unwrap();
    assert!(!check_ok, "check exits 1: {}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out2.stderr).contains("cannot read"));
    assert_eq!(check_ok, serve_ok, "check ok={check_ok}, serve started={serve_ok}");
}

/// A rule file an editor keeps rewriting — here flipped every 0.3 ms, by atomic renames,
/// between the shipped text and one with an input `check` refuses — while the service
/// reloads again and again (for 5 s): no reload puts the refused text in force.
// See: issue 26 (found on review: `check` and the load read the files separately, and the
// second reload swapped in rules `check` never saw).
#[tokio::test]
async fn reload_never_swaps_in_a_file_check_did_not_see() {
    let (dir, config) = editable_config();
    let clock = Arc::new(FixedClock::new(at(1_769_907_606)));
    let ctx = ctx_with(config, clock);
    let rules_dir = dir.path().join("rules");
    let pause = rules_dir.join("pause.rhai");
    let good = std::fs::read_to_string(&pause).unwrap();
    let bad = good.replacen("#{ input: \"resume\" }", "#{ input: \"resum\" }", 1);
    assert_ne!(good, bad);
    std::fs::write(&pause, &bad).unwrap();
    assert!(!membersync::check::check(&dir.path().join("membersync.yaml")).errors.is_empty(), "check refuses bad");
    let bad_version = membersync::rules::RuleSet::load(&rules_dir, "rules", chrono::Utc::now()).unwrap().version;
    std::fs::write(&pause, &good).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (stop, pause, dir) = (stop.clone(), pause.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let tmp = dir.join("pause.tmp");
                std::fs::write(&tmp, if i.is_multiple_of(2) { &bad } else { &good }).unwrap();
                std::fs::rename(&tmp, &pause).unwrap();
                i += 1;
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let (mut tries, mut hit) = (0, None);
    while std::time::Instant::now() < deadline {
        tries += 1;
        if let Ok(v) = membersync::reload::reload(&ctx, "test") {
            if v == bad_version {
                hit = Some(v);
                break;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
    assert!(hit.is_none(), "after {tries} reloads the service runs rules {bad_version}, which check refuses");
}

/// Seed 001's workflow: a buyer of a product not mapped yet has no access and a flag; the
/// operator maps the product and reloads; a re-derive (dry run first) applies what the
/// stored deliveries now derive, recorded as an event `explain` shows; a second one finds
/// nothing to do.
// See: issue 18 (mapping the product later never reached the earlier buyer).
#[tokio::test]
async fn mapping_a_product_later_reaches_the_earlier_buyer_through_rederive() {
    let (dir, config) = editable_config();
    let yaml = dir.path().join("membersync.yaml");
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let s = Server::start_with(config, clock.clone(), dir).await;
    let admin = |path: &'static str| {
        let url = format!("{}{path}", s.url);
        async move {
            let resp = reqwest::Client::new().post(url).bearer_auth(TOKEN).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    post_at(&s, &clock, 1_767_225_600, "checkout_session_completed").await;
    clock.set(at(1_767_225_601));
    let ack = deliver_edited(&s.ctx, "stripe", "customer_subscription_created", |v| {
        let price = &mut v["data"]["object"]["items"]["data"][0]["price"];
        price["id"] = "price_Course99".into();
        price["product"] = "prod_Course99".into();
    })
    .await;
    assert_eq!(ack.status, membersync::pipeline::Status::Applied);
    let m = member(&s.ctx, "ada@example.com").memberships[0].clone();
    assert!(!m.has_access(clock.now()));
    assert!(m.flags.iter().any(|f| f.contains("prod_Course99")), "{:?}", m.flags);

    // Map it, reload: the stored membership is as it was.
    let text = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(&yaml, text.replacen("prod_Pro001: [pro]", "prod_Pro001: [pro]\n          prod_Course99: [pro]", 1))
        .unwrap();
    assert_eq!(admin("/admin/reload").await.0, 200);
    assert!(!member(&s.ctx, "ada@example.com").memberships[0].has_access(clock.now()));

    // The dry run shows it and writes nothing.
    let (status, dry) = admin("/admin/rederive?dry_run=true").await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["memberships"][0]["result"], "would apply", "{dry}");
    assert!(dry["memberships"][0]["changes"].to_string().contains("levels [] → [pro]"), "{dry}");
    assert!(!member(&s.ctx, "ada@example.com").memberships[0].has_access(clock.now()));

    // Applied: access, the flag gone, an event with source `rederive` that explain shows.
    let (status, done) = admin("/admin/rederive").await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["memberships"][0]["result"], "applied", "{done}");
    let m = member(&s.ctx, "ada@example.com").memberships[0].clone();
    assert!(m.has_access(clock.now()), "{m:?}");
    assert_eq!(m.access_levels, ["pro"]);
    assert!(!m.flags.iter().any(|f| f.starts_with("unmapped_product")), "{:?}", m.flags);
    let d = member(&s.ctx, "ada@example.com");
    let text =
        membersync::explain::explain_text(&membersync::explain::explain_json(&*s.ctx.store, &d, clock.now()).unwrap());
    assert!(text.contains("rederive") && text.contains("levels [] → [pro]"), "{text}");
    let event_id = done["memberships"][0]["event_id"].as_str().unwrap();
    let (_, stored) = s.get(&format!("/events/{event_id}"), Some(TOKEN)).await;
    assert_eq!(stored["source"], "rederive");
    assert_eq!(stored["outcome"]["rule"]["version"], version(&s).await["version"]);

    // Nothing left to do.
    let (_, again) = admin("/admin/rederive").await;
    assert_eq!(again["memberships"], serde_json::json!([]), "{again}");
    s.stop().await;
}

/// `rederive` runs whole histories, even for one member: a cancel that arrived before the
/// membership existed (stored without a member, parked, then released) is part of it.
// See: issue 18 (found on review: `--member` ran only the deliveries stored under the
// member and gave a canceled member access back).
#[tokio::test]
async fn rederive_for_one_member_still_runs_their_whole_history() {
    let (_dir, config) = editable_config();
    let clock = Arc::new(FixedClock::new(at(1_767_225_700)));
    let ctx = ctx_with(config, clock.clone());
    let cancel =
        deliver_edited(&ctx, "stripe", "customer_subscription_deleted", |v| v["created"] = 1_767_225_700.into()).await;
    assert_eq!(cancel.status, membersync::pipeline::Status::Refused, "parked: {:?}", cancel.outcome.reason);
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    let d = member(&ctx, "ada@example.com");
    let state = d.memberships[0].state;
    assert_eq!(
        state.as_str(),
        "canceled",
        "the parked cancel ran once the membership existed (Stripe ended it: access ends now)"
    );
    let only_ada = membersync::store::EventFilter { member_id: Some(d.member.id.clone()), ..Default::default() };
    for dry_run in [true, false] {
        let r = membersync::replay::rederive(&ctx, &only_ada, clock.now(), dry_run).await.unwrap();
        assert!(r.memberships.is_empty(), "{r:?}");
    }
    assert_eq!(member(&ctx, "ada@example.com").memberships[0].state, state);
}

/// A re-derivation applies over nothing that changed after its comparison (a webhook in
/// the same second included), and applies again when the rules go back and forth.
// See: issue 18 (found on review: a cancel acknowledged in the same second was overwritten;
// grace 3 → 7 → 3 left the 7 days in force).
#[tokio::test]
async fn rederive_yields_to_a_later_change_and_follows_rules_back_and_forth() {
    let (dir, config) = editable_config();
    let yaml = dir.path().join("membersync.yaml");
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let ctx = ctx_with(config, clock.clone());
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    clock.set(at(1_769_907_606));
    deliver(&ctx, "stripe", "invoice_payment_failed").await;
    clock.set(at(1_769_907_606 + 3600));
    let grace = |ctx: &membersync::pipeline::Ctx| member(ctx, "ada@example.com").memberships[0].grace_until;
    let all = membersync::store::EventFilter::default();
    for days in [3, 7, 3] {
        let text = std::fs::read_to_string(&yaml).unwrap();
        let text = text
            .replace("grace_days: 7 ", &format!("grace_days: {days} "))
            .replace("grace_days: 3 ", &format!("grace_days: {days} "));
        std::fs::write(&yaml, text).unwrap();
        membersync::reload::reload(&ctx, "test").unwrap();
        let r = membersync::replay::rederive(&ctx, &all, clock.now(), false).await.unwrap();
        assert_eq!(r.memberships.len(), 1, "{days}: {r:?}");
        assert_eq!(r.memberships[0].result, "applied", "{days}: {r:?}");
        assert_eq!(grace(&ctx), Some(at(1_769_907_606 + days * 86_400)), "{days} days");
    }

    // The comparison saw one membership; a change in the same second (its `updated_at` as
    // it was) comes before the apply: the apply yields.
    let stored = member(&ctx, "ada@example.com").memberships[0].clone();
    let mut derived = stored.clone();
    derived.grace_until = Some(at(1_769_907_606 + 86_400));
    let mut meanwhile = stored.clone();
    meanwhile.state = membersync::machine::MState::Canceled;
    let (s, d) = (stored.clone(), derived.clone());
    let left = ctx
        .store
        .write(move |tx| {
            tx.save_membership(&meanwhile)?;
            membersync::pipeline::apply_derived(tx, &s, &d, &[], &["grace".into()], "v", at(1_769_907_606 + 3600))
        })
        .await
        .unwrap();
    match left {
        membersync::pipeline::Rederived::Left(why) => assert!(why.contains("changed after the comparison"), "{why}"),
        membersync::pipeline::Rederived::Applied(_) => panic!("applied over a change made after the comparison"),
    }
    assert_eq!(member(&ctx, "ada@example.com").memberships[0].state.as_str(), "canceled");
}

/// A membership stored before the rules kept a renewal timer (or under another
/// `missed_renewal_grace_hours`) gets the timer the rules now derive through `rederive`:
/// the dry run shows it, the apply sets it, a second run finds nothing.
// See: issue 19 (memberships from before the renewal timer would hold access for ever).
#[tokio::test]
async fn rederive_gives_an_older_membership_the_renewal_timer_the_rules_now_keep() {
    let (_dir, config) = editable_config();
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let ctx = ctx_with(config, clock.clone());
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    let d = member(&ctx, "ada@example.com");
    let ms = d.memberships[0].id.clone();
    // As an older version left it: no renewal timer.
    ctx.store
        .write({
            let ms = ms.clone();
            move |tx| tx.cancel_timer(&ms, "renewal_due")
        })
        .await
        .unwrap();
    assert!(member(&ctx, "ada@example.com").timers.is_empty());

    let all = membersync::store::EventFilter::default();
    let dry = membersync::replay::rederive(&ctx, &all, clock.now(), true).await.unwrap();
    assert_eq!(dry.memberships.len(), 1, "{dry:?}");
    let changes = format!("{:?}", dry.memberships[0]);
    assert!(changes.contains("timers [] → [renewal_due@2026-02-02T00:00:00Z]"), "{changes}");
    assert!(member(&ctx, "ada@example.com").timers.is_empty(), "a dry run writes nothing");

    membersync::replay::rederive(&ctx, &all, clock.now(), false).await.unwrap();
    let timers = member(&ctx, "ada@example.com").timers;
    assert_eq!(
        timers.iter().map(|t| (t.name.as_str(), t.due_at)).collect::<Vec<_>>(),
        [("renewal_due", at(1_769_990_400))]
    );
    let again = membersync::replay::rederive(&ctx, &all, clock.now(), true).await.unwrap();
    assert!(again.memberships.is_empty(), "{again:?}");
}
