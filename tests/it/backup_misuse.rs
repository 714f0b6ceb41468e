//! Backup as a careless operator runs it: `--to` the database's own write-ahead log (or
//! another file SQLite keeps beside it), with `--force` because the file "exists". The
//! copy must be refused, not renamed over a file the live database depends on.

use crate::support::*;
use membersync::clock::FixedClock;
use std::sync::Arc;

#[tokio::test]
async fn backup_refuses_to_write_over_the_databases_own_files() {
    let (dir, mut config) = editable_config();
    let db = dir.path().join("membersync.db");
    config.database = db.display().to_string();
    // A store left open, as `serve` keeps it: its commits sit in the WAL until a checkpoint.
    let ctx = ctx_with(config, Arc::new(FixedClock::new(at(1_767_225_600))));
    deliver(&ctx, "stripe", "checkout_session_completed").await;
    let wal = dir.path().join("membersync.db-wal");
    assert!(std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0), "the commit is in the WAL");
    for target in ["membersync.db-wal", "membersync.db-shm", "membersync.db.serve-lock"] {
        let path = dir.path().join(target);
        let before = std::fs::read(&path).ok();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_membersync"))
            .args(["backup", "--to", path.to_str().unwrap(), "--force"])
            .current_dir(dir.path())
            .env("MEMBERSYNC_DATABASE", &db)
            .env("MEMBERSYNC_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "backup --to {target} --force replaced the database's own file");
        assert!(err.contains(target), "{err}");
        assert_eq!(std::fs::read(&path).ok(), before, "{target} changed");
    }
    drop(ctx);
    // Everything acknowledged is still there.
    let ctx = ctx_on(&db, Arc::new(FixedClock::new(at(1_767_225_600))));
    member(&ctx, "ada@example.com");
}
