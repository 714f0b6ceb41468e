//! The promises of the README's "Guarantees" section, each proven here.

use crate::support::*;
use membersync::clock::{Clock, FixedClock, SystemClock};
use membersync::pipeline::Status;
use std::sync::Arc;

/// The same delivery 50 times at once: applied once, 49 duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_delivery_fifty_times_concurrently_applies_once() {
    let s = Server::start().await;
    let body = fixture("stripe", "customer_subscription_created");
    let headers = signed_headers(&s.ctx, "stripe", &body, SystemClock.now());
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (url, headers, body) = (s.url.clone(), headers.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut req = reqwest::Client::new().post(format!("{url}/webhooks/demo/stripe")).body(body);
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            resp.json::<serde_json::Value>().await.unwrap()["status"].as_str().unwrap().to_string()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| *s == "applied").count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| *s == "duplicate").count(), 49);
    let rows = s.ctx.store.events(None, None, 100).unwrap();
    assert_eq!(rows.len(), 1, "stored once");
    let d = s.ctx.store.member_detail(rows[0].member_id.as_deref().unwrap(), 10).unwrap().unwrap();
    assert_eq!(d.memberships.len(), 1);
    s.stop().await;
}

/// When the writer's queue is full the answer is 503 with Retry-After, not more memory.
#[tokio::test]
async fn full_write_queue_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&dir.path().join("m.db").display().to_string());
    config.queue_capacity = 1;
    let store: Arc<dyn membersync::store::Store> = Arc::new(
        membersync::store::sqlite::SqliteStore::open(
            &config.database,
            membersync::store::sqlite::Options { queue_capacity: 1, max_batch: 1, ..Default::default() },
        )
        .unwrap(),
    );
    let ctx = Arc::new(membersync::pipeline::Ctx::new(config, rules(), store.clone(), Arc::new(SystemClock)));
    // Hold the writer, then fill its one queue slot.
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    store
        .submit(membersync::store::Work::once(
            move |_tx| {
                let _ = held_tx.send(());
                let _ = release_rx.recv();
                true
            },
            |_| {},
        ))
        .unwrap();
    held_rx.recv().unwrap();
    store.submit(membersync::store::Work::once(|_tx| true, |_| {})).unwrap();

    let app = membersync::app::router(membersync::state::AppState::new(ctx.clone()));
    let body = fixture("stripe", "invoice_paid");
    let mut req = axum::http::Request::post("/webhooks/demo/stripe");
    for (k, v) in signed_headers(&ctx, "stripe", &body, SystemClock.now()) {
        req = req.header(k, v);
    }
    let answer = tower::ServiceExt::oneshot(app, req.body(axum::body::Body::from(body)).unwrap());
    let resp = tokio::time::timeout(std::time::Duration::from_secs(5), answer)
        .await
        .expect("answered at once, not queued behind the held writer")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    release_tx.send(()).unwrap();
}

/// Bad input: each answered with its status, nothing half-written; unreadable fields are
/// stored as dead letters with the reason.
#[tokio::test]
async fn bad_input_gets_its_status_and_unreadable_fields_are_dead_lettered() {
    let s = Server::start().await;
    let url = "/webhooks/demo/stripe";
    let post = |body: Vec<u8>| {
        let headers = signed_headers(&s.ctx, "stripe", &body, SystemClock.now());
        let s = &s;
        async move { s.post(url, &headers, body).await }
    };
    // Not UTF-8.
    let (status, err) = post(vec![0xff, 0xfe, b'{', b'}']).await;
    assert_eq!(status, 400, "{err}");
    // Nested deeper than a sane limit.
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let (status, err) = post(format!(r#"{{"id":"evt_deep","type":"x","created":1,"a":{deep}}}"#).into_bytes()).await;
    assert_eq!(status, 400, "{err}");
    assert!(s.ctx.store.events(None, None, 10).unwrap().is_empty(), "nothing stored for undecodable bodies");

    // A mapped field of the wrong type: stored, dead-lettered with the reason.
    let body = String::from_utf8(fixture("stripe", "invoice_paid"))
        .unwrap()
        .replace("\"created\": 1767225603", "\"created\": \"yesterday\"");
    assert!(body.contains("yesterday"));
    let (status, ack) = post(body.into_bytes()).await;
    assert_eq!((status, ack["status"].as_str()), (200, Some("failed")), "{ack}");
    let dead = s.ctx.store.events(Some("failed"), None, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.as_deref().unwrap().contains("occurred_at"), "{:?}", dead[0].reason);
    assert!(!dead[0].raw.is_empty(), "the raw body is kept for replay");
    s.stop().await;
}

/// A rule with an endless loop is stopped by the limits: the event is dead-lettered and
/// the service keeps serving.
#[tokio::test]
async fn runaway_rule_dead_letters_its_event_and_the_service_keeps_serving() {
    let (dir, config) = editable_config();
    let clock = Arc::new(FixedClock::new(at(1_767_225_600)));
    let ctx = ctx_with(config, clock.clone());
    let pause = dir.path().join("rules/pause.rhai");
    let src = std::fs::read_to_string(&pause).unwrap();
    std::fs::write(
        &pause,
        src.replace("fn on_paused(ev, m, cfg) {", "fn on_paused(ev, m, cfg) {\n    let n = 0; loop { n += 1; }"),
    )
    .unwrap();
    membersync::reload::reload(&ctx, "test").unwrap();
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    clock.set(at(1_772_020_855));
    let ack = deliver(&ctx, "stripe", "customer_subscription_paused").await;
    assert_eq!(ack.status, Status::Failed);
    assert!(ack.outcome.reason.as_deref().unwrap().contains("rules/pause.rhai"), "{:?}", ack.outcome.reason);
    assert_eq!(member(&ctx, "ada@example.com").memberships[0].state.as_str(), "active");
    // Still serving.
    clock.set(at(1_772_184_033));
    assert_eq!(deliver(&ctx, "stripe", "customer_subscription_resumed").await.status, Status::Ignored);
}

#[tokio::test]
async fn one_tenants_signature_and_admin_token_cannot_touch_another_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let config = two_tenants(&dir.path().join("m.db"));
    let s = Server::start_with(config, Arc::new(SystemClock), dir).await;
    // demo's delivery, signed with demo's secret, posted to acme: 401.
    let body = fixture("stripe", "checkout_session_completed");
    let demo_signed = signed_headers(&s.ctx, "stripe", &body, SystemClock.now());
    assert_eq!(s.post("/webhooks/acme/stripe", &demo_signed, body.clone()).await.0, 401);
    assert!(s.ctx.store.events(None, None, 10).unwrap().is_empty(), "nothing written to acme");
    // Into demo it goes.
    assert_eq!(s.post("/webhooks/demo/stripe", &demo_signed, body).await.0, 200);

    // acme's admin token cannot read demo's member, events or leads, nor run global endpoints.
    let acme = Some("acme-admin-token");
    let (_, found) = s.get("/members?email=ada@example.com", acme).await;
    assert_eq!(found["members"], serde_json::json!([]));
    let (_, demo_view) = s.get("/members?email=ada@example.com", Some(TOKEN)).await;
    let id = demo_view["members"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(s.get(&format!("/members/{id}"), acme).await.0, 404);
    assert_eq!(s.get("/events/evt_1QxDVvK7dEmoAc01mEgKFGt6", acme).await.0, 404);
    assert_eq!(s.get("/events", acme).await.1["events"], serde_json::json!([]));
    assert_eq!(s.get("/admin/rules", acme).await.0, 403);
    // The global token sees it; a made-up token nothing.
    assert_eq!(s.get(&format!("/members/{id}"), Some(TOKEN)).await.0, 200);
    assert_eq!(s.get(&format!("/members/{id}"), Some("acme-admin-tokenX")).await.0, 401);
    s.stop().await;
}

/// A tenant's admin token lists that tenant's newest events, however many of another
/// tenant's arrived after them (the list is filtered in the query, not cut from the
/// newest events of every tenant).
#[tokio::test]
async fn a_tenants_event_list_is_its_own_behind_any_number_of_others() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let config = two_tenants(&db);
    let s = Server::start_with(config, Arc::new(SystemClock), dir).await;
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        let mut insert = conn
            .prepare(
                "INSERT INTO events (tenant, provider, event_id, idempotency_key, event_type, source,
                 received_at, status, raw, outcome) VALUES (?1, 'stripe', ?2, ?2, 'invoice.paid', 'webhook',
                 1700000000, ?3, x'7b7d', '{}')",
            )
            .unwrap();
        insert.execute(("acme", "evt_acme_failed", "failed")).unwrap();
        insert.execute(("acme", "evt_acme_applied", "applied")).unwrap();
        for i in 0..12_000 {
            insert.execute(("demo", format!("evt_demo_{i}"), if i % 2 == 0 { "failed" } else { "applied" })).unwrap();
        }
        drop(insert);
        conn.execute_batch("COMMIT").unwrap();
    }
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["events"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_string()).collect()
    };
    let acme = Some("acme-admin-token");
    assert_eq!(ids(&s.get("/events", acme).await.1), ["evt_acme_applied", "evt_acme_failed"]);
    assert_eq!(ids(&s.get("/events?status=failed", acme).await.1), ["evt_acme_failed"]);
    assert_eq!(ids(&s.get("/events?limit=1", acme).await.1), ["evt_acme_applied"]);
    // The global token: every tenant's, newest first.
    assert_eq!(ids(&s.get("/events?limit=2", Some(TOKEN)).await.1), ["evt_demo_11999", "evt_demo_11998"]);
    assert_eq!(ids(&s.get("/events?status=failed&limit=1", Some(TOKEN)).await.1), ["evt_demo_11998"]);
    s.stop().await;
}

/// Captures every log line (all levels) of this test's thread.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn secrets_never_appear_in_logs_errors_or_api_output() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (dir, config) = editable_config();
    let secrets: Vec<String> = config
        .tenants
        .values()
        .flat_map(|t| t.providers.values().filter_map(|p| p.secret.as_ref().map(|s| s.expose().to_string())))
        .chain(config.admin_token.as_ref().map(|s| s.expose().to_string()))
        .collect();
    assert!(secrets.len() >= 6);
    let s = Server::start_with(config, Arc::new(SystemClock), tempfile::tempdir().unwrap()).await;
    let mut outputs = Vec::new();
    // Good and bad deliveries for every provider, including ThriveCart's secret-in-body.
    for (provider, file) in [
        ("stripe", "invoice_paid.json"),
        ("thrivecart", "order_success.form"),
        ("whop", "payment_succeeded.json"),
        ("memberstack", "member_plan_added.json"),
        ("memberful", "order_purchased.json"),
    ] {
        let dir_f = root().join("tests/fixtures").join(provider);
        let config = s.ctx.config();
        let (headers, body) =
            membersync::scenario::signed_request(&config, "demo", provider, &dir_f, file, SystemClock.now()).unwrap();
        let url = format!("/webhooks/demo/{provider}");
        outputs.push(s.post(&url, &headers, body.clone()).await.1.to_string());
        let mut tampered = body.clone();
        tampered.extend_from_slice(b" ");
        outputs.push(s.post(&url, &headers, tampered).await.1.to_string());
        let stripped: Vec<_> = headers.iter().filter(|(k, _)| k == "content-type").cloned().collect();
        outputs.push(s.post(&url, &stripped, b"thrivecart_secret=nope".to_vec()).await.1.to_string());
    }
    // Admin output: every event in full, the rules, a bad token.
    let (_, events) = s.get("/events?limit=100", Some(TOKEN)).await;
    for e in events["events"].as_array().unwrap() {
        let id = e["event_id"].as_str().unwrap();
        outputs.push(s.get(&format!("/events/{id}"), Some(TOKEN)).await.1.to_string());
    }
    outputs.push(s.get("/admin/rules", Some(TOKEN)).await.1.to_string());
    outputs.push(s.get("/members?email=x", Some("wrong")).await.1.to_string());
    // A reload error.
    std::fs::write(dir.path().join("rules/broken.rhai"), "fn on_paused(ev, m, cfg) { ").unwrap();
    let _ = s.state.reload("test");
    let debug = format!("{:?}", s.ctx.config());
    s.stop().await;

    let log = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("Signature did not verify."), "logs were captured");
    let all = format!("{log}\n{}", outputs.join("\n"));
    for secret in &secrets {
        assert!(!all.contains(secret.as_str()), "a secret leaked: {secret}");
    }
    // A Debug of the config redacts too.
    for secret in &secrets {
        assert!(!debug.contains(secret.as_str()));
    }
}

/// Every tenant-scoped admin route, tried with another tenant's token: each answers 404
/// (or an empty list) and changes nothing.
// See: issue 26 (dropping the tenant filter from `GET /leads`, `POST /members/{id}/resync`
// or `POST /events/{id}/replay` passed every test).
#[tokio::test]
async fn every_tenant_scoped_route_refuses_another_tenants_token_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = two_tenants(&dir.path().join("m.db"));
    let s = Server::start_with(config, Arc::new(SystemClock), dir).await;
    let post = |name: &'static str, body: Vec<u8>| {
        let headers = signed_headers(&s.ctx, "stripe", &body, SystemClock.now());
        let s = &s;
        async move {
            let (code, ack) = s.post("/webhooks/demo/stripe", &headers, body).await;
            assert_eq!(code, 200, "{name}: {ack}");
            ack
        }
    };
    // demo: a member, a lead (an abandoned checkout) and a dead letter.
    post("checkout", fixture("stripe", "checkout_session_completed")).await;
    post("subscription", fixture("stripe", "customer_subscription_created")).await;
    post("abandoned", fixture("stripe", "checkout_session_expired")).await;
    let dead = String::from_utf8(fixture("stripe", "invoice_paid"))
        .unwrap()
        .replace("\"created\": 1767225603", "\"created\": \"yesterday\"");
    assert_eq!(post("dead letter", dead.into_bytes()).await["status"], "failed");
    let dead_id = "evt_1QxaZ1K7dEmoAc01GAm3W0e2";

    let demo = Some(TOKEN);
    let acme = Some("acme-admin-token");
    let (_, found) = s.get("/members?email=ada@example.com", demo).await;
    let id = found["members"][0]["id"].as_str().unwrap().to_string();
    let before = s.get(&format!("/members/{id}"), demo).await.1;
    let (_, leads) = s.get("/leads", demo).await;
    assert_eq!(leads["leads"].as_array().map(Vec::len), Some(1), "demo's lead: {leads}");

    // Reads.
    assert_eq!(s.get("/leads", acme).await.1["leads"], serde_json::json!([]), "acme sees no lead of demo's");
    assert_eq!(s.get("/members?email=ada@example.com", acme).await.1["members"], serde_json::json!([]));
    assert_eq!(s.get(&format!("/members/{id}"), acme).await.0, 404);
    assert_eq!(s.get(&format!("/events/{dead_id}"), acme).await.0, 404);
    assert_eq!(s.get("/events?status=failed", acme).await.1["events"], serde_json::json!([]));
    // Writes.
    let as_acme = |path: String| {
        let url = format!("{}{path}", s.url);
        async move {
            let resp = reqwest::Client::new().post(url).bearer_auth("acme-admin-token").send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let (code, body) = as_acme(format!("/members/{id}/resync")).await;
    assert_eq!(code, 404, "resync of another tenant's member: {body}");
    let (code, body) = as_acme(format!("/events/{dead_id}/replay")).await;
    assert_eq!(code, 404, "replay of another tenant's event: {body}");

    // Nothing changed: the dead letter is still the one row, still failed; the member is
    // as it was.
    let (_, e) = s.get(&format!("/events/{dead_id}"), demo).await;
    assert_eq!(e["status"], "failed", "{e}");
    let after = s.get(&format!("/members/{id}"), demo).await.1;
    assert_eq!(after, before);
    s.stop().await;
}

/// ThriveCart's Event Subscription API posts JSON with the secret word in the body: it is
/// redacted before the body is stored, so neither the database nor the admin API shows it.
// See: issue 26 (leaving it in JSON bodies passed every HTTP test; they posted forms only).
#[tokio::test]
async fn thrivecart_json_delivery_never_stores_or_shows_its_secret_word() {
    let s = Server::start().await;
    let (raw, content_type, _) = crate::scenarios::load_fixture("thrivecart", "api_order_payment_product.json");
    assert_eq!(content_type, "application/json");
    let spec = &s.ctx.config().extractors["thrivecart"].spec.verify;
    let secret = s.ctx.config().tenants["demo"].providers["thrivecart"].secret.clone().unwrap();
    let word = secret.expose().to_string();
    let scheme = membersync::verify::Scheme::compile(spec);
    let body = scheme.prepare_body(&secret, &raw);
    assert!(String::from_utf8_lossy(&body).contains(&word), "the delivery carries the word");
    let mut headers = scheme.sign(&secret, &body, SystemClock.now());
    headers.push(("content-type".into(), content_type.into()));
    let (status, ack) = s.post("/webhooks/demo/thrivecart", &headers, body).await;
    assert_eq!(status, 200, "{ack}");
    let id = ack["event_id"].as_str().unwrap().to_string();

    let stored = s.ctx.store.events_by_event_id(&id).unwrap();
    assert_eq!(stored.len(), 1);
    let text = String::from_utf8_lossy(&stored[0].raw).to_string();
    assert!(!text.contains(&word), "stored body: {text}");
    assert!(text.contains("[redacted]"), "stored body keeps the field, redacted: {text}");
    assert!(!stored[0].headers.get().contains(&word));
    let (_, e) = s.get(&format!("/events/{id}"), Some(TOKEN)).await;
    assert!(!e.to_string().contains(&word), "GET /events/{id}: {e}");
    let (_, list) = s.get("/events", Some(TOKEN)).await;
    assert!(!list.to_string().contains(&word));
    s.stop().await;
}
