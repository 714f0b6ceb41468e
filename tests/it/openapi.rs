//! The OpenAPI document: served at `GET /openapi.json` as committed in `schemas/openapi.json`
//! (`schemas.rs` fails when the code and the file differ), and held to by the service:
//! schemathesis (installed by `.ci/run`, or here with pip when missing) runs its contract
//! checks against a seeded service on loopback, bounded in examples and time, and finds
//! nothing.

use crate::support::*;
use membersync::clock::{Clock, SystemClock};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test]
async fn the_served_document_is_the_checked_in_one() {
    let s = Server::start().await;
    let resp = reqwest::get(format!("{}/openapi.json", s.url)).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let served = resp.text().await.unwrap();
    assert_eq!(served, std::fs::read_to_string(root().join("schemas/openapi.json")).unwrap());
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    // Every error is the one error body.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, resp) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &resp["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(schema, "#/components/schemas/ErrorBody", "{method} {path} {status}");
                }
            }
        }
    }
    s.stop().await;
}

/// schemathesis, on the PATH or installed with pip the way `.ci/run` does.
fn schemathesis() -> String {
    let works = |c: &str| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success());
    if works("schemathesis") {
        return "schemathesis".into();
    }
    let installed = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "-q", "schemathesis"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed && works("schemathesis"),
        "the contract test needs schemathesis: `python3 -m pip install schemathesis`"
    );
    "schemathesis".into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failures_against_a_seeded_service() {
    let cli = tokio::task::spawn_blocking(schemathesis).await.unwrap();
    let (dir, config) = editable_config();
    let signer = ctx_with(config, Arc::new(membersync::clock::FixedClock::new(SystemClock.now())));
    let svc = spawn(dir.path(), free_port()).await;
    let client = reqwest::Client::new();
    for name in ["checkout_session_completed", "customer_subscription_created", "checkout_session_expired"] {
        let body = fixture("stripe", name);
        let mut req = client.post(format!("{}/webhooks/demo/stripe", svc.url)).body(body.clone());
        for (k, v) in signed_headers(&signer, "stripe", &body, signer.clock.now()) {
            req = req.header(k, v);
        }
        assert_eq!(req.send().await.unwrap().status().as_u16(), 200, "{name}");
    }
    let found: serde_json::Value = client
        .get(format!("{}/members?email=ada@example.com", svc.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let member = found["members"][0]["id"].as_str().unwrap().to_string();
    // Real ids, so the checks reach past 404s; and one check off for one operation: a grant
    // names levels the tenant's products map to, which no static document can list.
    std::fs::write(
        dir.path().join("schemathesis.toml"),
        format!(
            "[parameters]\n\"path.id\" = \"{member}\"\n\"path.tenant\" = \"demo\"\n\"path.provider\" = \"stripe\"\n\
             \"path.event_id\" = \"evt_1QxDVvK7dEmoAc01mEgKFGt6\"\n\n\
             [[operations]]\ninclude-name = \"POST /members/{{id}}/grants\"\n\
             checks.positive_data_acceptance.enabled = false\n"
        ),
    )
    .unwrap();
    let mut run = tokio::process::Command::new(cli)
        .args(["run", &format!("{}/openapi.json", svc.url), "-H", &format!("Authorization: Bearer {TOKEN}")])
        // Every check schemathesis has is on by default; the config turns one off for one
        // operation (a `--checks` here would override that).
        .args(["--max-examples", "25", "--seed", "1", "--no-color"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("schemathesis runs");
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(300), run.wait())
        .await
        .expect("schemathesis within 5 minutes")
        .unwrap();
    let out = run.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(status.success(), "schemathesis found failures ({:?}):\n{}", started.elapsed(), text);
    // Every operation but `GET /openapi.json`, which schemathesis loaded the document from.
    assert!(text.contains("Tested: 20"), "every operation tested:\n{text}");
    drop(svc);
}
