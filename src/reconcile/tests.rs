use super::*;

/// A reload keeps each provider's rate limiter (and the `Retry-After` it holds) unless
/// the rate itself changed.
#[test]
fn a_rebuild_keeps_the_rate_limiters_whose_rate_did_not_change() {
    let mut config = Config::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("membersync.yaml"))
        .expect("the shipped config loads");
    let r = Reconciliation::new(&config);
    let first = r.reconciler();
    r.rebuild(&config);
    let second = r.reconciler();
    assert!(!Arc::ptr_eq(&first, &second), "a new reconciler");
    for (p, l) in &first.limiters {
        assert!(Arc::ptr_eq(l, &second.limiters[p]), "{p}: the same limiter");
    }
    config.reconcile.rate_per_sec *= 2.0;
    r.rebuild(&config);
    let third = r.reconciler();
    for (p, l) in &second.limiters {
        assert!(!Arc::ptr_eq(l, &third.limiters[p]), "{p}: a new rate, a new limiter");
    }
}
