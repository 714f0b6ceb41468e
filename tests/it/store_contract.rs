//! The `Store` contract, one suite for both stores: every test runs the same operations on
//! the embedded SQLite store and on the shared PostgreSQL store (a fresh database cloned
//! from the migrated template, on the test cluster of `pg_cluster`) and asserts what each
//! must answer, and that both answer alike.

use membersync::store::{self, pg::PgStore, sqlite::SqliteStore, Store};
use std::sync::Arc;

/// Both stores, empty: (name, store, what keeps the SQLite file alive).
pub fn both() -> Vec<(&'static str, Arc<dyn Store>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(dir.path().join("m.db").to_str().unwrap(), Default::default()).unwrap();
    let url = crate::pg_cluster::fresh_database();
    let pg = std::thread::spawn(move || PgStore::open(&url, Default::default()).unwrap()).join().unwrap();
    vec![("sqlite", Arc::new(sqlite), Some(dir)), ("postgres", Arc::new(pg), None)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_store_reads_as_empty() {
    for (kind, s, _dir) in both() {
        let counts = store::read(&s, |s| s.event_counts()).await.unwrap();
        assert!(counts.is_empty(), "{kind}: {counts:?}");
        let seq = s.write(|tx| tx.last_event_seq()).await.unwrap();
        assert_eq!(seq, 0, "{kind}");
    }
}
