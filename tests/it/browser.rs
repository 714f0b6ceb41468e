//! The console in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! which `.ci/run` installs when missing), driven over WebDriver: the README walk-through
//! an operator follows — sign in, find the member, see why they have access, resync, grant
//! a complimentary level and revoke it, fix a broken rule and replay its dead letter (the
//! dry-run diff first) and see its row change, see a lead from an abandoned checkout and an
//! unmapped product, sign out. A screenshot of each page goes to
//! `target/console-screenshots/`.

use crate::support::*;
use fantoccini::{Client, ClientBuilder, Locator};
use membersync::clock::FixedClock;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Chromium under chromedriver, each on its own profile and port; both end with it.
struct Browser {
    driver: std::process::Child,
    client: Client,
    _profile: tempfile::TempDir,
}

/// Debian's Chromium and its driver, installed the way `.ci/run` does when they are missing
/// (as root, or with `sudo` that asks no password), so `cargo test` needs no set-up of its
/// own; anywhere else the test says what to install.
fn ensure_chromium() {
    let present = |c: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if std::env::var_os("CHROMEDRIVER").is_some() || (present("chromedriver") && present("chromium")) {
        return;
    }
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let sudo = if root { "" } else { "sudo -n " };
    let script = format!(
        "{sudo}apt-get update -q && DEBIAN_FRONTEND=noninteractive {sudo}apt-get install -y -q chromium chromium-driver"
    );
    let ok = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "the console's browser test needs Chromium: install Debian's `chromium` and `chromium-driver` (`{script}` failed)");
}

impl Browser {
    async fn start() -> Browser {
        tokio::task::spawn_blocking(ensure_chromium).await.unwrap();
        let chromedriver = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let port = free_port();
        let driver = std::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("`{chromedriver}` did not start ({e}): install Debian's chromium and chromium-driver (.ci/run does)")
            });
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while reqwest::get(format!("{url}/status")).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "chromedriver did not answer on {url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        // As root, without a GPU, on a machine whose outside network is closed.
        let caps = json!({ "goog:chromeOptions": { "binary": chromium, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1400,1000", format!("--user-data-dir={}", profile.path().display()),
        ]}});
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.as_object().unwrap().clone())
            .connect(&url)
            .await
            .expect("a Chromium session");
        Browser { driver, client, _profile: profile }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn css(&self, selector: &str) -> fantoccini::elements::Element {
        match self.client.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(selector)).await {
            Ok(e) => e,
            Err(e) => {
                let at = self.client.current_url().await.map(|u| u.to_string()).unwrap_or_default();
                let source = self.client.source().await.unwrap_or_default();
                panic!("{selector} ({e}) on {at}:\n{}", source.chars().take(3000).collect::<String>())
            }
        }
    }

    async fn text(&self, selector: &str) -> String {
        self.css(selector).await.text().await.unwrap()
    }

    async fn path(&self) -> String {
        let url = self.client.current_url().await.unwrap();
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        }
    }

    /// Clicks and waits for the page it leads to.
    async fn click_to_next_page(&self, selector: &str) {
        let before = self.client.find(Locator::Css("body")).await.unwrap();
        self.css(selector).await.click().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The old page's body goes stale once the new page has loaded.
        while before.tag_name().await.is_ok() {
            assert!(std::time::Instant::now() < deadline, "{selector} led nowhere");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.css("main").await;
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = root().join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    /// A failing test never leaves chromedriver running.
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_walks_through_the_console_in_a_real_browser() {
    // The README walk-through's member (Ada, Pro on Stripe), an abandoned checkout, a member
    // on a product the config does not map, and a pause that a broken rule dead-letters.
    let (dir, config) = editable_config();
    // The fixtures' periods end in early 2026: no renewal is missed while the test runs
    // (in the file, which the console's reload reads again).
    let yaml = dir.path().join("membersync.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    let text = text.replace("missed_renewal_grace_hours: 24 ", "missed_renewal_grace_hours: 87600 ");
    std::fs::write(&yaml, text).unwrap();
    let config =
        membersync::config::Config { database: config.database, ..membersync::config::Config::load(&yaml).unwrap() };
    let pause = dir.path().join("rules/pause.rhai");
    let good_rule = std::fs::read_to_string(&pause).unwrap();
    std::fs::write(
        &pause,
        good_rule.replace(
            "fn on_paused(ev, m, cfg) {",
            "fn on_paused(ev, m, cfg) {\n    throw \"pause rule broken on purpose\";",
        ),
    )
    .unwrap();
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let s = Server::start_with(config, clock.clone(), dir).await;
    deliver(&s.ctx, "stripe", "checkout_session_completed").await;
    deliver(&s.ctx, "stripe", "customer_subscription_created").await;
    deliver(&s.ctx, "stripe", "checkout_session_expired").await;
    deliver_unmapped_product(&s.ctx).await;
    clock.set(at(1_772_020_855));
    let paused = deliver(&s.ctx, "stripe", "customer_subscription_paused").await;
    assert_eq!(paused.status.as_str(), "failed", "the broken rule dead-letters the pause");

    let b = Browser::start().await;
    let console = format!("{}/console", s.url);

    // Signing in.
    b.goto(&format!("{console}/members")).await;
    assert_eq!(b.path().await, "/console/login", "a page needs a session");
    b.screenshot("login").await;
    b.css("input[name=token]").await.send_keys(TOKEN).await.unwrap();
    b.click_to_next_page("main form button[type=submit]").await;
    assert_eq!(b.path().await, "/console/members");
    b.screenshot("members").await;

    // Finding the walk-through's member and why they have access.
    b.css("input[name=q]").await.send_keys("ada@example.com").await.unwrap();
    b.click_to_next_page("form.search button").await;
    assert!(b.text("#members").await.contains("ada@example.com"));
    b.click_to_next_page("#members tbody a").await;
    assert!(b.path().await.starts_with("/console/members/mbr_"));
    assert_eq!(b.text("#access .big").await, "pro");
    let timeline = b.text("#timeline").await;
    assert!(timeline.contains("rules/access.rhai:") && timeline.contains("none → active"), "{timeline}");
    assert!(timeline.contains("rules/pause.rhai") && timeline.contains("failed"), "the dead letter: {timeline}");
    b.screenshot("member").await;

    // Resync (no API key configured: the membership says so).
    b.click_to_next_page("#access form button").await;
    let resync = b.text("#resync").await;
    assert!(resync.contains("Resynced") && resync.contains("stripe: skipped"), "{resync}");

    // A complimentary level, granted and revoked.
    b.css("#grant input[value=lifetime]").await.click().await.unwrap();
    b.css("#grant input[name=reason]").await.send_keys("complimentary: speaker at the webinar").await.unwrap();
    b.click_to_next_page("#grant button").await;
    assert!(b.text("#outcome").await.contains("applied"), "{}", b.text("#outcome").await);
    assert_eq!(b.text("#access .big").await, "lifetime, pro");
    assert!(b.text("#timeline").await.contains("complimentary: speaker at the webinar"));
    b.screenshot("member_granted").await;
    b.css("form.revoke input[name=reason]").await.send_keys("webinar over").await.unwrap();
    b.click_to_next_page("form.revoke button").await;
    assert!(b.text("#outcome").await.contains("revoked lifetime"), "{}", b.text("#outcome").await);
    assert_eq!(b.text("#access .big").await, "pro");

    // The dead letter: fix its rule, reload, replay (the diff first), and its row changes.
    b.goto(&format!("{console}/events?status=failed")).await;
    let failed = b.text("#events").await;
    assert!(failed.contains("pause rule broken on purpose"), "{failed}");
    b.screenshot("events_failed").await;
    std::fs::write(&pause, &good_rule).unwrap();
    b.goto(&format!("{console}/rules")).await;
    let version_before = b.text("#version").await;
    b.click_to_next_page("#last-reload form button").await;
    assert_ne!(b.text("#version").await, version_before, "the fixed rule is in force");
    assert!(b.text("#last-reload").await.contains("loaded"));
    b.screenshot("rules").await;
    b.goto(&format!("{console}/events?status=failed")).await;
    b.click_to_next_page("#events tbody a").await;
    b.screenshot("event").await;
    b.click_to_next_page("a.button").await;
    let diff = b.text("#diff").await;
    assert!(diff.contains("paused"), "the dry run shows the pause it would apply: {diff}");
    b.screenshot("replay_preview").await;
    b.click_to_next_page("main form button").await;
    assert!(b.text(".notice").await.contains("applied"), "{}", b.text(".notice").await);
    let rows = b.text("main").await;
    assert!(rows.contains("replayed") && rows.contains("applied"), "{rows}");
    b.goto(&format!("{console}/events?status=failed")).await;
    assert!(!b.text("#events").await.contains("pause rule broken"), "no longer failed");

    // A lead from an abandoned checkout; an unmapped product.
    b.goto(&format!("{console}/leads")).await;
    assert!(b.text("#leads").await.contains("grace@example.com"));
    b.screenshot("leads").await;
    b.goto(&format!("{console}/products")).await;
    let mut unmapped = Vec::new();
    for row in b.client.find_all(Locator::Css("#products tr.unmapped")).await.unwrap() {
        unmapped.push(row.text().await.unwrap());
    }
    assert!(unmapped.iter().any(|r| r.contains("prod_NotInConfig") && r.ends_with("unmapped")), "{unmapped:?}");
    b.screenshot("products").await;

    // Signing out ends the session.
    b.click_to_next_page("header form.logout button").await;
    assert_eq!(b.path().await, "/console/login");
    b.goto(&format!("{console}/members")).await;
    assert_eq!(b.path().await, "/console/login");
    b.close().await;
    s.stop().await;
}
