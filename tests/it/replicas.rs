//! Several replicas on one PostgreSQL: each with its own writer, reads and timer task,
//! sharing one database. What one SQLite node guarantees holds across them: a delivery
//! sent to two at once is applied once, a due timer fires once, replicas starting together
//! migrate once, and a replica killed mid-batch loses no acknowledged event.

use crate::pg_cluster::*;
use membersync::store::pg::{Options, PgStore};

/// Three stores opening an empty database at the same moment: one migrates, the others
/// wait for it and find nothing left to do; each migration is applied (and recorded) once
/// and every store opens.
#[test]
fn three_replicas_opening_an_empty_database_at_once_migrate_it_once() {
    let url = empty_database();
    let start = std::sync::Arc::new(std::sync::Barrier::new(3));
    let opened: Vec<_> = (0..3)
        .map(|_| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                PgStore::open(&url, Options::default()).map(drop).map_err(|e| e.to_string())
            })
        })
        .collect();
    for o in opened {
        o.join().unwrap().expect("every replica opens");
    }
    let (versions, tables): (Vec<i32>, i64) = query(&url, |c| {
        let v = c.query("SELECT version FROM membersync_migrations ORDER BY version", &[]).unwrap();
        let t = c
            .query_one("SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'events'", &[])
            .unwrap()
            .get(0);
        (v.iter().map(|r| r.get(0)).collect(), t)
    });
    assert_eq!(versions, vec![1], "each migration recorded once");
    assert_eq!(tables, 1);
}
