use super::*;
use crate::canonical::{EventKind, MemberRef};

fn ev(kind: EventKind) -> CanonicalEvent {
    CanonicalEvent {
        kind: Some(kind),
        provider: "stripe".into(),
        tenant: "demo".into(),
        event_id: "evt_1".into(),
        event_type: "x".into(),
        occurred_at: Utc.timestamp_opt(1_000_000, 0).unwrap(),
        member: MemberRef::default(),
        subscription_id: Some("sub_1".into()),
        product_id: None,
        plan_id: None,
        status: None,
        period_end: None,
        cancel_at_period_end: false,
        amount_cents: None,
        currency: None,
        payment: Default::default(),
        note: None,
    }
}

fn set(src: &str) -> RuleSet {
    RuleSet::compile(vec![("rules/t.rhai".into(), src.into())], Utc::now()).expect("compiles")
}

fn policy() -> Dynamic {
    let mut m = Map::new();
    m.insert("grace_days".into(), Dynamic::from(7_i64));
    Dynamic::from_map(m)
}

fn decide(rs: &RuleSet, kind: EventKind) -> Result<Decision, Error> {
    rs.decide(&ev(kind), &MembershipView::default(), &policy(), Utc::now())
}

#[test]
fn rule_returns_input_and_effects() {
    let rs = set("fn on_payment_failed(ev, m, cfg) {\n let g = ev.occurred_at + days(cfg.grace_days);\n #{ input: \"payment_failed\", effects: [set_grace(g), schedule_timer(\"grace_end\", g)] }\n}");
    let d = decide(&rs, EventKind::PaymentFailed).unwrap();
    assert_eq!(d.input, Some(Input::PaymentFailed));
    let until = Utc.timestamp_opt(1_000_000 + 7 * 86_400, 0).unwrap();
    assert_eq!(
        d.effects,
        vec![Effect::SetGrace { until: Some(until) }, Effect::ScheduleTimer { timer: "grace_end".into(), at: until }]
    );
    let r = d.rule.unwrap();
    assert_eq!((r.file.as_str(), r.function.as_str(), r.line), ("rules/t.rhai", "on_payment_failed", 1));
}

#[test]
fn endless_loop_is_stopped_with_position() {
    let rs = set("fn on_renewed(ev, m, cfg) {\n  loop { }\n}");
    let e = decide(&rs, EventKind::Renewed).unwrap_err();
    assert_eq!(e.file, "rules/t.rhai");
    assert!(e.message.to_lowercase().contains("too many operations"), "{e}");
}

#[test]
fn deep_recursion_and_memory_bombs_are_stopped() {
    let rs = set("fn f(n) { f(n + 1) }\nfn on_renewed(ev, m, cfg) { f(0) }");
    assert!(decide(&rs, EventKind::Renewed).is_err());
    let rs = set("fn on_renewed(ev, m, cfg) {\n let s = \"x\";\n loop { s += s; }\n}");
    assert!(decide(&rs, EventKind::Renewed).is_err());
}

#[test]
fn typo_in_a_property_or_input_is_an_error_not_a_guess() {
    let rs = set("fn on_renewed(ev, m, cfg) {\n  if ev.perod_end == () { }\n  #{ input: \"activate\" }\n}");
    let e = decide(&rs, EventKind::Renewed).unwrap_err();
    assert_eq!(e.line, 2, "{e}");
    let rs = set("fn on_renewed(ev, m, cfg) { #{ input: \"activte\" } }");
    assert!(decide(&rs, EventKind::Renewed).unwrap_err().message.contains("unknown machine input `activte`"));
    let rs = set("fn on_renewed(ev, m, cfg) { #{ inptu: \"activate\" } }");
    assert!(decide(&rs, EventKind::Renewed).unwrap_err().message.contains("unknown key `inptu`"));
}

#[test]
fn kind_without_rule_is_refused_and_unknown_handler_is_a_load_error() {
    let rs = set("fn on_renewed(ev, m, cfg) { #{ input: \"activate\" } }");
    let d = decide(&rs, EventKind::Paused).unwrap();
    assert!(d.refuse.unwrap().contains("on_paused"));
    let err = RuleSet::compile(vec![("rules/t.rhai".into(), "fn on_renewd(ev, m, cfg) { () }".into())], Utc::now())
        .unwrap_err();
    assert!(err.to_string().contains("did you mean `on_renewed`?"), "{err}");
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let err = RuleSet::compile(
        vec![("rules/t.rhai".into(), "fn on_renewed(ev, m, cfg) {\n  let x = ;\n}".into())],
        Utc::now(),
    )
    .unwrap_err();
    assert_eq!((err.0[0].file.as_str(), err.0[0].line), ("rules/t.rhai", 2), "{err}");
}

#[test]
fn the_shipped_rules_compile() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let rs = RuleSet::load(&dir, "rules", Utc::now()).expect("shipped rules compile");
    assert!(rs.file_names().iter().any(|f| f == "rules/grace.rhai"));
}

#[test]
fn shipped_rank_orders_a_recovery_above_a_failure() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let rs = RuleSet::load(&dir, "rules", Utc::now()).unwrap();
    assert_eq!(rs.rank(&ev(EventKind::Renewed)).unwrap(), 30);
    assert_eq!(rs.rank(&ev(EventKind::PaymentFailed)).unwrap(), 20);
    let m = MembershipView {
        exists: true,
        last_event_at: Some(Utc.timestamp_opt(1_000_000, 0).unwrap()),
        last_event_rank: 30,
        ..Default::default()
    };
    assert!(rs.is_stale(&ev(EventKind::PaymentFailed), &m).unwrap());
    assert!(!rs.is_stale(&ev(EventKind::Refunded), &m).unwrap());
}

#[test]
fn one_event_view_serves_every_call_and_a_rule_changing_its_ev_changes_nothing_for_the_next() {
    let rs = set(
        "fn rank(ev) { ev.kind = \"refunded\"; ev.event_id += \"-changed\"; 1 }\n\
         fn is_stale(ev, m) { ev.kind = \"refunded\"; ev.kind != \"refunded\" }\n\
         fn on_renewed(ev, m, cfg) { if ev.kind == \"renewed\" && ev.event_id == \"evt_1\" { #{ input: \"activate\" } } else { #{ ignore: \"saw a changed ev\" } } }",
    );
    let e = ev(EventKind::Renewed);
    let view = EventView::of(&e);
    assert_eq!(rs.rank_of(&view).unwrap(), 1);
    assert!(!rs.is_stale_of(&view, &MembershipView::default()).unwrap());
    let d = rs.decide_of(&e, view, &MembershipView::default(), &policy(), Utc::now()).unwrap();
    assert_eq!(d.ignore, None);
    assert_eq!(d.input.map(|i| i.as_str().to_string()).as_deref(), Some("activate"));
}
