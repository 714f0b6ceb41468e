use super::*;
use crate::canonical::EventKind;
use chrono::TimeZone;
use decode::Lookup;
use serde_json::json;

const SPEC: &str = r#"
provider: acme
verify: { scheme: hmac_sha256_hex, header: X-Sig }
idempotency: { header: webhook-id }
event_type: type
occurred_at: { paths: [ts_ms, ts], time: auto }
fields:
  email: [data.email, data.user.email]
  status: { paths: [data.status], map: { PAST_DUE: past_due } }
  amount_cents: { paths: [data.amount], amount: major }
  cancel_at_period_end: data.cancel
events:
  sub.changed:
    cases:
      - name: cancel set
        when:
          prev.cancel: { present: true }
          data.cancel: true
        kind: cancel_scheduled
      - name: was null
        when:
          prev.note: { present: true, is_null: true }
        kind: plan_changed
      - when:
          data.status: { in: [PAST_DUE, unpaid] }
        kind: payment_failed
    kind: status_synced
  sub.gone:
    kind: canceled
    fields:
      period_end: { paths: [data.ended], time: iso8601 }
  noise:
    cases:
      - when: {}
        kind: ignore
"#;

fn x() -> Extractor {
    Extractor::load("rules/providers/acme.yaml", SPEC).expect("spec compiles")
}

fn run(body: serde_json::Value, headers: &[(String, String)]) -> Result<Extraction, Box<Failure>> {
    let raw = serde_json::to_vec(&body).unwrap();
    x().extract("t", &body, &raw, headers, chrono::Utc::now())
}

#[test]
fn cases_match_in_order_with_present_null_and_in() {
    let e =
        run(json!({"type": "sub.changed", "ts": 1, "prev": {"cancel": false}, "data": {"cancel": true}}), &[]).unwrap();
    assert_eq!((e.event.kind, e.mapping.case.as_deref()), (Some(EventKind::CancelScheduled), Some("cancel set")));
    let e = run(json!({"type": "sub.changed", "ts": 1, "prev": {"note": null}, "data": {}}), &[]).unwrap();
    assert_eq!(e.event.kind, Some(EventKind::PlanChanged));
    let e = run(json!({"type": "sub.changed", "ts": 1, "prev": {"note": "x"}, "data": {"status": "PAST_DUE"}}), &[])
        .unwrap();
    assert_eq!((e.event.kind, e.mapping.case.as_deref()), (Some(EventKind::PaymentFailed), Some("cases[2]")));
    assert_eq!(e.event.status.as_deref(), Some("past_due"), "value map applied");
    let e = run(json!({"type": "sub.changed", "ts": 1, "data": {"status": "active"}}), &[]).unwrap();
    assert_eq!((e.event.kind, e.mapping.case.as_deref()), (Some(EventKind::StatusSynced), None));
}

#[test]
fn units_first_non_null_and_overrides_apply() {
    let e = run(
        json!({"type": "sub.gone", "ts_ms": 1767225600000i64, "data": {"email": null, "user": {"email": "a@b.c"},
               "amount": "29.00", "ended": "2026-02-01T00:00:00Z"}}),
        &[],
    )
    .unwrap();
    assert_eq!(e.event.occurred_at.timestamp(), 1_767_225_600);
    assert_eq!(e.event.member.email.as_deref(), Some("a@b.c"));
    assert_eq!(e.event.amount_cents, Some(2900));
    assert_eq!(e.event.period_end.map(|t| t.timestamp()), Some(1_769_904_000));
}

#[test]
fn idempotency_key_from_header_else_body_hash() {
    let h = vec![("webhook-id".to_string(), "msg_1".to_string())];
    assert_eq!(run(json!({"type": "noise", "ts": 1}), &h).unwrap().idempotency_key, "msg_1");
    let a = run(json!({"type": "noise", "ts": 1}), &[]).unwrap();
    let b = run(json!({"type": "noise", "ts": 2}), &[]).unwrap();
    assert!(a.idempotency_key.starts_with("sha256:"));
    assert_ne!(a.idempotency_key, b.idempotency_key);
    assert_eq!(a.event.event_id, a.idempotency_key, "event id defaults to the key");
}

#[test]
fn unmapped_and_ignored_types_carry_a_reason() {
    let e = run(json!({"type": "other", "ts": 1}), &[]).unwrap();
    assert_eq!(e.event.kind, None);
    assert!(e.mapping.ignored_because.unwrap().contains("not mapped"));
    let e = run(json!({"type": "noise", "ts": 1}), &[]).unwrap();
    assert!(e.mapping.ignored_because.unwrap().contains("says ignore"));
}

#[test]
fn wrong_types_and_missing_basics_fail_with_reason() {
    let f = run(json!({"type": "sub.gone", "ts": 1, "data": {"cancel": "maybe"}}), &[]).unwrap_err();
    assert!(f.error.to_string().contains("cancel_at_period_end"), "{}", f.error);
    // An optional field (the period end) that cannot be read is left out and recorded;
    // the event still maps.
    let e = run(json!({"type": "sub.gone", "ts": 1, "data": {"ended": "soon"}}), &[]).unwrap();
    assert_eq!(e.event.period_end, None);
    assert_eq!(e.mapping.unreadable, ["period_end: `soon` is not an ISO 8601 time"]);
    assert!(e.mapping.flags.iter().any(|f| f.starts_with("unreadable field left out: ")), "{:?}", e.mapping.flags);
    let f = run(json!({"ts": 1}), &[]).unwrap_err();
    assert!(f.error.to_string().contains("event type"), "{}", f.error);
    let f = run(json!({"type": "noise"}), &[]).unwrap_err();
    assert!(f.error.to_string().contains("event time"), "{}", f.error);
}

#[test]
fn compile_reports_every_problem_with_location_and_hint() {
    let bad = SPEC.replace("kind: canceled", "kind: cancelled").replace("data.user.email", "data..email");
    let err = Extractor::load("rules/providers/acme.yaml", &bad).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.0.len(), 2, "{text}");
    assert!(text.contains("unknown canonical kind `cancelled`") && text.contains("did you mean `canceled`?"), "{text}");
    assert!(text.contains("empty segment"), "{text}");
    let d = err.0.iter().find(|d| d.message.contains("cancelled")).unwrap();
    assert_eq!(d.line, bad.lines().position(|l| l.contains("kind: cancelled")).unwrap() + 1);
    assert!(Extractor::load("rules/providers/acme.yaml", "provider: [").is_err());
}

/// The decode that builds only the configured paths gives every provider's fixtures the
/// same extraction as building the whole body, and refuses what the whole decode refuses.
#[test]
fn decoding_only_configured_paths_extracts_what_the_whole_body_gives() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut compared = 0;
    for provider in ["stripe", "thrivecart", "whop", "memberstack", "memberful"] {
        let src = std::fs::read_to_string(root.join(format!("rules/providers/{provider}.yaml"))).unwrap();
        let x = Extractor::load(&format!("rules/providers/{provider}.yaml"), &src).unwrap();
        let at = Utc.timestamp_opt(1_767_225_600, 0).unwrap();
        for entry in std::fs::read_dir(root.join("tests/fixtures").join(provider)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let body = std::fs::read(&path).unwrap();
            let whole = decode::json(&body).unwrap();
            let pruned = x.decode(&body, Some("application/json")).unwrap();
            assert!(pruned.to_string().len() <= whole.to_string().len());
            let a = x.extract("t", &whole, &body, &[], at);
            let b = x.extract("t", &pruned, &body, &[], at);
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{}", path.display());
            let captured = x.decode_captured(&body, Some("application/json")).unwrap();
            assert!(matches!(captured, decode::Decoded::Captured(_)), "{}", path.display());
            let c = x.extract("t", &captured, &body, &[], at);
            assert_eq!(format!("{a:?}"), format!("{c:?}"), "{}", path.display());
            compared += 1;
        }
    }
    assert!(compared > 50, "only {compared} fixtures compared");
    let x = Extractor::load("acme.yaml", SPEC).unwrap();
    let deep = format!(r#"{{"type":"a","skipped":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    for bad in [&b"{"[..], b"[1]", b"{\"a\":1} x", b"{\"type\":\"a\",\"skipped\":[1,}", b"\"s\"", deep.as_bytes()] {
        assert_eq!(x.decode(bad, None).is_err(), decode::json(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        assert!(x.decode(bad, None).is_err(), "{}", String::from_utf8_lossy(bad));
        assert_eq!(
            x.decode_captured(bad, None).map(|_| ()),
            x.decode(bad, None).map(|_| ()),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn decoding_only_configured_paths_keeps_indexes_nulls_and_the_last_duplicate() {
    let mut tree = decode::PathTree::default();
    for p in ["data.items[1].id", "data.gone", "data.obj", "n"] {
        tree.add(path::Path::parse(p).unwrap().steps());
    }
    let body = br#"{"n": null, "data": {"items": [{"id": "a", "x": 1}, {"id": "b", "y": [2]}, {"id": "c"}],
        "obj": {"deep": {"k": [1, 2]}}, "other": {"big": [1, 2, 3]}, "obj": {"last": true}}, "z": 1}"#;
    let v = decode::json_paths(body, &tree).unwrap();
    assert_eq!(v, json!({"n": null, "data": {"items": [null, {"id": "b"}], "obj": {"last": true}}}));
    assert_eq!(path::Path::parse("data.items[1].id").unwrap().lookup(&v), Some(&json!("b")));
    assert_eq!(path::Path::parse("data.gone").unwrap().lookup(&v), None);
    assert_eq!(path::Path::parse("n").unwrap().lookup(&v), Some(&Value::Null));
}

/// The captured decode keeps only the values the paths end at, and reads every path as
/// the whole decode does: absent, null, array indexes (kept or not), a path ending inside
/// a kept value, a path through a scalar or the wrong kind of container; and a key
/// repeated on the way to a path falls back to a tree where the last occurrence wins.
#[test]
fn captured_decoding_reads_every_path_as_the_whole_decode() {
    let paths = [
        "data.items[1].id",
        "data.items[0].gone",
        "data.gone",
        "data.obj",
        "data.obj.deep.k[1]",
        "n",
        "s.inner",
        "arr.key",
        "obj.0",
        "top",
    ];
    let mut tree = decode::PathTree::default();
    for p in paths {
        tree.add(path::Path::parse(p).unwrap().steps());
    }
    let bodies: [&[u8]; 4] = [
        br#"{"n": null, "data": {"items": [{"id": "a", "x": 1}, {"id": "b", "y": [2]}, {"id": "c"}],
            "obj": {"deep": {"k": [1, 2]}}, "other": {"big": [1, 2, 3]}, "obj": {"deep": {"k": [3, 4]}}},
            "s": "text", "arr": [{"key": 1}], "obj": {"0": "zero"}, "top": [1, {"a": 2}], "z": 1}"#,
        br#"{"data": {"items": []}, "top": "t", "top": "last"}"#,
        // `data` repeated: its subtree is read from the last one only.
        br#"{"data": {"items": [{"id": "a"}, {"id": "b"}], "gone": 1}, "n": 2, "data": {"obj": true}}"#,
        br#"{"data": 5, "data": {"gone": [1]}}"#,
    ];
    for body in bodies {
        let whole = decode::json(body).unwrap();
        let captured = decode::json_captured(body, &tree).unwrap();
        for p in paths {
            let p = path::Path::parse(p).unwrap();
            assert_eq!(captured.at(&p), p.lookup(&whole), "{} in {}", p.as_str(), String::from_utf8_lossy(body));
        }
    }
    let repeated = decode::json_captured(bodies[2], &tree).unwrap();
    assert!(matches!(repeated, decode::Decoded::Tree(_)), "a repeated key on a path is decoded as a tree");
    let first = decode::json_captured(bodies[0], &tree).unwrap();
    assert!(matches!(first, decode::Decoded::Captured(_)), "a repeated path end needs no tree");
    assert_eq!(decode::json_captured(b"[1]", &tree).unwrap_err(), decode::DecodeError::NotObject);
    assert!(matches!(decode::json_captured(br#"{"data": {"obj": 1"#, &tree), Err(decode::DecodeError::Json(_))));
}

#[test]
fn canonical_field_indexes_follow_the_one_ordered_list() {
    use compiled::F;
    let all = [
        (F::Email, "email"),
        (F::CustomerId, "provider_customer_id"),
        (F::Name, "name"),
        (F::SubscriptionId, "subscription_id"),
        (F::ProductId, "product_id"),
        (F::PlanId, "plan_id"),
        (F::Status, "status"),
        (F::PeriodEnd, "period_end"),
        (F::CancelAtPeriodEnd, "cancel_at_period_end"),
        (F::AmountCents, "amount_cents"),
        (F::Currency, "currency"),
        (F::InvoiceId, "invoice_id"),
        (F::PaymentId, "payment_id"),
        (F::ChargeId, "charge_id"),
        (F::AmountPaidCents, "amount_paid_cents"),
    ];
    for (f, name) in all {
        assert_eq!(f.name(), name);
    }
}
