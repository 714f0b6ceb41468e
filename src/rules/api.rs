//! What Rhai sees: the event and membership as maps (times as unix seconds, absent values
//! as `()`), and helper functions that build effects. The decision a rule returns is read
//! back strictly: an unknown key, input or effect is an error, not a guess.
//!
//! What this module must never do: let a rule reach the store or the clock other than
//! through what it is handed.

use super::{from_unix, unix, Decision, MembershipView};
use crate::canonical::CanonicalEvent;
use crate::effects::Effect;
use crate::machine::Input;
use rhai::{Array, Dynamic, Engine, ImmutableString, Map};

/// A string value, from `&str`: one allocation (the shared string) at most, not a `String`
/// copy as well.
fn text(s: &str) -> Dynamic {
    Dynamic::from(ImmutableString::from(s))
}

fn opt_str(s: &Option<String>) -> Dynamic {
    s.as_deref().map(text).unwrap_or(Dynamic::UNIT)
}

fn opt_time(t: &Option<chrono::DateTime<chrono::Utc>>) -> Dynamic {
    t.map(|t| Dynamic::from(unix(t))).unwrap_or(Dynamic::UNIT)
}

/// The event as a map: every canonical field, times in unix seconds.
pub fn event_view(ev: &CanonicalEvent) -> Dynamic {
    let mut m = Map::new();
    m.insert("kind".into(), ev.kind.map(|k| text(k.as_str())).unwrap_or(Dynamic::UNIT));
    m.insert("provider".into(), text(&ev.provider));
    m.insert("tenant".into(), text(&ev.tenant));
    m.insert("event_id".into(), text(&ev.event_id));
    m.insert("event_type".into(), text(&ev.event_type));
    m.insert("occurred_at".into(), Dynamic::from(unix(ev.occurred_at)));
    m.insert("email".into(), opt_str(&ev.member.email));
    m.insert("name".into(), opt_str(&ev.member.name));
    m.insert("customer_id".into(), opt_str(&ev.member.provider_customer_id));
    m.insert("subscription_id".into(), opt_str(&ev.subscription_id));
    m.insert("product_id".into(), opt_str(&ev.product_id));
    m.insert("plan_id".into(), opt_str(&ev.plan_id));
    m.insert("status".into(), opt_str(&ev.status));
    m.insert("period_end".into(), opt_time(&ev.period_end));
    m.insert("cancel_at_period_end".into(), Dynamic::from(ev.cancel_at_period_end));
    m.insert("amount_cents".into(), ev.amount_cents.map(Dynamic::from).unwrap_or(Dynamic::UNIT));
    m.insert("currency".into(), opt_str(&ev.currency));
    m.insert("invoice_id".into(), opt_str(&ev.payment.invoice_id));
    m.insert("payment_id".into(), opt_str(&ev.payment.payment_id));
    m.insert("charge_id".into(), opt_str(&ev.payment.charge_id));
    m.insert("amount_paid_cents".into(), ev.payment.amount_paid_cents.map(Dynamic::from).unwrap_or(Dynamic::UNIT));
    Dynamic::from_map(m)
}

/// The membership as a map; `exists` is false (and `state` "none") before the first event.
pub fn membership_view(v: &MembershipView) -> Dynamic {
    let mut m = Map::new();
    m.insert("exists".into(), Dynamic::from(v.exists));
    m.insert("provider".into(), opt_str(&v.provider));
    m.insert("state".into(), text(v.state.unwrap_or(crate::machine::MState::None).as_str()));
    m.insert("period_end".into(), opt_time(&v.period_end));
    m.insert("grace_until".into(), opt_time(&v.grace_until));
    m.insert("access_until".into(), opt_time(&v.access_until));
    m.insert("last_event_at".into(), opt_time(&v.last_event_at));
    m.insert("last_event_rank".into(), Dynamic::from(v.last_event_rank));
    m.insert("cancel_at_period_end".into(), Dynamic::from(v.cancel_at_period_end));
    m.insert("product_id".into(), opt_str(&v.product_id));
    m.insert("plan_id".into(), opt_str(&v.plan_id));
    m.insert("status".into(), opt_str(&v.status));
    m.insert("flags".into(), Dynamic::from_array(v.flags.iter().map(|f| text(f)).collect()));
    m.insert("member_email".into(), opt_str(&v.member_email));
    Dynamic::from_map(m)
}

fn effect(kind: &str, fields: Vec<(&str, Dynamic)>) -> Map {
    let mut m = Map::new();
    m.insert("type".into(), text(kind));
    for (k, v) in fields {
        m.insert(k.into(), v);
    }
    m
}

/// Registers the helpers rules may call.
pub fn register(e: &mut Engine) {
    e.register_fn("days", |n: i64| n * 86_400);
    // A sender's value as a reason or flag may repeat it: briefly, on one line.
    e.register_fn("brief", |s: ImmutableString| crate::extract::time::brief_text(&s));
    e.register_fn("hours", |n: i64| n * 3_600);
    e.register_fn("set_grace", |until: i64| effect("set_grace", vec![("until", Dynamic::from(until))]));
    e.register_fn("clear_grace", || effect("set_grace", vec![("until", Dynamic::UNIT)]));
    e.register_fn("access_until", |until: i64| effect("set_access_until", vec![("until", Dynamic::from(until))]));
    e.register_fn("clear_access_until", || effect("set_access_until", vec![("until", Dynamic::UNIT)]));
    e.register_fn("schedule_timer", |name: ImmutableString, at: i64| {
        effect("schedule_timer", vec![("timer", Dynamic::from(name)), ("at", Dynamic::from(at))])
    });
    e.register_fn("cancel_timer", |name: ImmutableString| effect("cancel_timer", vec![("timer", Dynamic::from(name))]));
    e.register_fn("capture_lead", |email: ImmutableString, name: Dynamic| {
        effect("capture_lead", vec![("email", Dynamic::from(email)), ("name", name)])
    });
    e.register_fn("convert_lead", |email: ImmutableString| {
        effect("convert_lead", vec![("email", Dynamic::from(email))])
    });
    e.register_fn("flag", |reason: ImmutableString| effect("flag", vec![("reason", Dynamic::from(reason))]));
    e.register_fn("clear_flag", |prefix: ImmutableString| {
        effect("clear_flag", vec![("prefix", Dynamic::from(prefix))])
    });
    e.register_fn("ignore", |reason: ImmutableString| {
        let mut m = Map::new();
        m.insert("ignore".into(), Dynamic::from(reason));
        m
    });
    e.register_fn("refuse", |reason: ImmutableString| {
        let mut m = Map::new();
        m.insert("refuse".into(), Dynamic::from(reason));
        m
    });
}

fn get_str(m: &Map, key: &str) -> Result<Option<String>, String> {
    match m.get(key) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) => v
            .clone()
            .into_immutable_string()
            .map(|s| Some(s.to_string()))
            .map_err(|t| format!("`{key}` must be a string, got {t}")),
    }
}

fn get_time(m: &Map, key: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    match m.get(key) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) => {
            let s = v.as_int().map_err(|t| format!("`{key}` must be a unix time (int), got {t}"))?;
            from_unix(s).map(Some).ok_or_else(|| format!("`{key}` {s} is out of range"))
        }
    }
}

fn parse_effect(d: Dynamic) -> Result<Effect, String> {
    let m = d.try_cast::<Map>().ok_or("each effect must be a map built by an effect helper")?;
    let kind = get_str(&m, "type")?.ok_or("effect without `type`")?;
    let need = |k: &str| -> Result<String, String> { get_str(&m, k)?.ok_or(format!("effect `{kind}` needs `{k}`")) };
    Ok(match kind.as_str() {
        "set_grace" => Effect::SetGrace { until: get_time(&m, "until")? },
        "set_access_until" => Effect::SetAccessUntil { until: get_time(&m, "until")? },
        "schedule_timer" => {
            Effect::ScheduleTimer { timer: need("timer")?, at: get_time(&m, "at")?.ok_or("schedule_timer needs `at`")? }
        }
        "cancel_timer" => Effect::CancelTimer { timer: need("timer")? },
        "capture_lead" => Effect::CaptureLead { email: need("email")?, name: get_str(&m, "name")? },
        "convert_lead" => Effect::ConvertLead { email: need("email")? },
        "flag" => Effect::Flag { reason: need("reason")? },
        "clear_flag" => Effect::ClearFlag { prefix: need("prefix")? },
        other => return Err(format!("unknown effect `{other}`")),
    })
}

/// Reads a rule's return value: `#{ input, effects, ignore, refuse }` (all optional).
pub fn decision(out: Dynamic, _ev: &CanonicalEvent) -> Result<Decision, String> {
    if out.is_unit() {
        return Ok(Decision {
            input: None,
            effects: vec![],
            ignore: Some("rule returned nothing".into()),
            refuse: None,
            rule: None,
        });
    }
    let type_name = out.type_name();
    let m = out.try_cast::<Map>().ok_or_else(|| format!("a rule must return a map, got {type_name}"))?;
    for k in m.keys() {
        if !matches!(k.as_str(), "input" | "effects" | "ignore" | "refuse") {
            return Err(format!("unknown key `{k}` in the rule's result (expected input, effects, ignore, refuse)"));
        }
    }
    let input = match get_str(&m, "input")? {
        None => None,
        Some(s) => Some(Input::parse(&s).ok_or_else(|| {
            let names: Vec<&str> = Input::ALL.iter().map(|i| i.as_str()).collect();
            format!("unknown machine input `{s}` (one of: {})", names.join(", "))
        })?),
    };
    let effects = match m.get("effects") {
        None => vec![],
        Some(v) if v.is_unit() => vec![],
        Some(v) => {
            let arr = v.clone().try_cast::<Array>().ok_or("`effects` must be an array")?;
            arr.into_iter().map(parse_effect).collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok(Decision { input, effects, ignore: get_str(&m, "ignore")?, refuse: get_str(&m, "refuse")?, rule: None })
}
