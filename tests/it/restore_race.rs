//! Restore beside a command that writes: `restore` refuses while `serve` runs, but a
//! `reconcile` pass (waiting on the provider's API) has the database open too and writes
//! when the answer comes. Run as an operator would: the real binary, a real (slow)
//! provider API on 127.0.0.1.

use crate::support::*;
use membersync::clock::FixedClock;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

async fn membersync(dir: &Path, db: &Path, args: &[&str], env: &[(&str, String)]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_membersync"));
    cmd.args(args).current_dir(dir).env("MEMBERSYNC_LOG", "warn").env("MEMBERSYNC_DATABASE", db);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output()).await.expect("bounded").unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test]
async fn restore_refuses_while_a_reconcile_pass_has_the_database_open() {
    let (dir, mut config) = editable_config();
    let db = dir.path().join("membersync.db");
    config.database = db.display().to_string();
    let ctx = ctx_with(config, Arc::new(FixedClock::new(at(1_767_225_600))));
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    deliver(&ctx, "stripe", "customer_subscription_created").await;
    let member_id = member(&ctx, "ada@example.com").member.id;
    drop(ctx);
    let backup = dir.path().join("backup.db");
    let (code, _, err) = membersync(dir.path(), &db, &["backup", "--to", backup.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(0), "{err}");

    // The provider's API answers once told to; it says when the request came.
    let sub: serde_json::Value = serde_json::from_slice(&fixture("stripe", "customer_subscription_created")).unwrap();
    let sub = sub["data"]["object"].clone();
    let (asked_tx, mut asked) = tokio::sync::mpsc::unbounded_channel::<()>();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let api = {
        let release = release.clone();
        axum::Router::new().fallback(move || {
            let (sub, asked_tx, release) = (sub.clone(), asked_tx.clone(), release.clone());
            async move {
                let _ = asked_tx.send(());
                drop(release.acquire().await);
                axum::Json(sub)
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, api).await });

    let env = [("STRIPE_API_KEY", "sk_test_local".to_string()), ("STRIPE_API_BASE", api_base)];
    let reconcile = {
        let (dir, db, member_id) = (dir.path().to_path_buf(), db.clone(), member_id.clone());
        tokio::spawn(async move { membersync(&dir, &db, &["reconcile", "--member", &member_id], &env).await })
    };
    tokio::time::timeout(Duration::from_secs(60), asked.recv()).await.expect("reconcile asked the provider");

    // Mid-pass, the operator restores yesterday's backup.
    let (code, out, err) = membersync(dir.path(), &db, &["restore", "--from", backup.to_str().unwrap()], &[]).await;
    release.add_permits(1);
    let reconciled = reconcile.await.unwrap();
    assert_ne!(
        code,
        Some(0),
        "restore replaced the database under a running reconcile, whose writes then went to the file set aside:\n\
         {out}{err}\nreconcile: {reconciled:?}"
    );
    assert!(err.contains("running"), "{err}");
}
