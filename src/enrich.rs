//! Enrichment: what a delivery leaves out, fetched from the provider before the event is
//! applied — Stripe's checkout sessions name no line items, so a one-time purchase names
//! no product until `GET /v1/checkout/sessions/{id}/line_items` says which. Declared in the
//! provider file (`enrich:`); made with the tenant's API key, bounded in time and size, no
//! redirects; what it fetched is stored with the event (replay and re-derivation read it
//! again without a request), and an event whose enrichment failed is kept, parked, and tried
//! again by the reconcile schedule — never dropped, never guessed.
//!
//! What this module must never do: put the API key anywhere but the request's headers (not
//! in a URL, an error, a log line or the store), follow a redirect, or panic on an answer.

use crate::config::Config;
use crate::extract::EnrichPlan;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::OnceLock;
use std::time::Duration;

/// The longest an enrichment may take: Stripe waits 10–20 s for an answer to its delivery,
/// and the commit comes after this.
pub const TIMEOUT: Duration = Duration::from_secs(6);

/// The largest answer read (a checkout's line items are a few KB).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// What an enrichment fetched: the request (as shown to operators; never the key) and one
/// item per product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enriched {
    /// The enrichment's name in the provider file.
    pub name: String,
    /// `GET https://…` (the URL holds no secret).
    pub request: String,
    pub items: Vec<Item>,
    /// How many items the whole answer listed (more than one: a checkout of several
    /// products, whose payment belongs to none of its memberships alone).
    #[serde(default)]
    pub of: usize,
}

/// One item of the answer: the product it names (and its plan or price).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub product_id: String,
    pub plan_id: Option<String>,
}

/// Why an enrichment could not be made (an operator reads it on the member's flags).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no API key configured for {provider}: set {var}")]
    NoKey { provider: String, var: String },
    #[error("{0}")]
    Request(String),
}

/// The one client for enrichments: no redirects (a redirect could carry the key's header to
/// another host), a connect and total time limit.
fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(3))
            .timeout(TIMEOUT)
            .build()
            .unwrap_or_default()
    })
}

/// Makes the enrichment `plan` for `tenant`'s `provider` delivery.
pub async fn fetch(config: &Config, tenant: &str, provider: &str, plan: &EnrichPlan) -> Result<Enriched, Error> {
    let fail = |m: String| Error::Request(m);
    let spec = config
        .extractors
        .get(provider)
        .and_then(|x| x.spec.enrich.get(plan.step))
        .ok_or_else(|| fail(format!("{provider} has no enrichment #{}", plan.step)))?;
    let api_key = config
        .tenants
        .get(tenant)
        .and_then(|t| t.providers.get(provider))
        .and_then(|p| p.api_key.as_ref())
        .map(|k| k.expose().to_string())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Error::NoKey {
            provider: provider.to_string(),
            var: format!("{}_API_KEY", provider.to_ascii_uppercase()),
        })?;
    let api_base = config
        .api_bases
        .get(provider)
        .cloned()
        .or_else(|| spec.api_base.clone())
        .ok_or_else(|| fail(format!("enrich `{}` has no api_base", spec.name)))?;
    let url = fill(&spec.url, api_base.trim_end_matches('/'), &plan.vars, None)?;
    let shown = format!("GET {url}");
    let mut req = client().get(&url);
    for (name, template) in &spec.headers {
        let value = fill(template, &api_base, &plan.vars, Some(&api_key))?;
        let mut value = reqwest::header::HeaderValue::from_str(&value)
            .map_err(|_| fail(format!("header `{name}` is not valid")))?;
        value.set_sensitive(true);
        req = req.header(name.as_str(), value);
    }
    let answer = async {
        let mut resp = req.send().await.map_err(|e| fail(format!("{shown}: {}", without_url(&e))))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(fail(format!("{shown}: HTTP {}", status.as_u16())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(format!("{shown}: {}", without_url(&e))))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(fail(format!("{shown}: answer larger than {MAX_ANSWER_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let body = tokio::time::timeout(TIMEOUT, answer)
        .await
        .map_err(|_| fail(format!("{shown}: no answer within {} s", TIMEOUT.as_secs())))??;
    let v: Value = serde_json::from_slice(&body).map_err(|e| fail(format!("{shown}: the answer is not JSON ({e})")))?;
    let items = items_of(spec, &v).map_err(|m| fail(format!("{shown}: {m}")))?;
    if v.get("has_more").and_then(Value::as_bool) == Some(true) {
        return Err(fail(format!("{shown}: the answer lists more items than one page holds; not all were read")));
    }
    Ok(Enriched { name: spec.name.clone(), request: shown, of: items.len(), items })
}

/// Tries again the enrichment of every event kept because it could not be made (parked
/// under `enrich:`), oldest first; each that now succeeds runs through the pipeline with
/// what was fetched, and its kept row is marked `replayed`. Returns how many ran. Called by
/// each reconcile pass.
pub async fn retry_parked(ctx: &std::sync::Arc<crate::pipeline::Ctx>) -> usize {
    const LIMIT: usize = 500;
    let filter = crate::store::EventFilter {
        status: Some("refused".into()),
        park_key: Some(crate::pipeline::ENRICH_KEY.into()),
        limit: Some(LIMIT),
        ..Default::default()
    };
    let kept = match crate::store::read(&ctx.store, move |s| s.events_where(&filter)).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "Could not read the events kept for their enrichment.");
            return 0;
        }
    };
    let mut ran = 0;
    for e in kept {
        let config = ctx.config();
        let Some((incoming, mut raw)) = crate::pipeline::incoming_from_row(&config, &e) else { continue };
        let crate::pipeline::Incoming::Extracted(x) = &incoming else { continue };
        let Some(plan) = &x.enrich else { continue };
        match fetch(&config, &e.tenant, &e.provider, plan).await {
            Ok(fetched) if !fetched.items.is_empty() => raw.enrichment = Some(Ok(fetched)),
            Ok(_) => continue, // still nothing to apply: stays kept as it is
            Err(why) => {
                tracing::info!(tenant = %e.tenant, provider = %e.provider, event = %e.event_id, error = %why,
                    "Enrichment still fails; the event stays kept.");
                continue;
            }
        }
        let (loaded, now, seq, member_id) = (ctx.loaded(), ctx.clock.now(), e.seq, e.member_id.clone());
        let fetched = raw.enrichment.clone().and_then(Result::ok).and_then(|f| serde_json::to_string(&f).ok());
        let done = ctx
            .store
            .write(move |tx| {
                if !tx.mark_replayed(seq, "enriched and re-applied")? {
                    return Ok(None);
                }
                // The delivery's own row keeps what was fetched: a dry run replays it as it
                // now applies.
                if let Some(f) = &fetched {
                    tx.set_enrichment(seq, f)?;
                }
                let ack = crate::pipeline::apply(&loaded, tx, incoming, raw, now)?;
                if let Some(mut m) = member_id.map(|id| tx.member(&id)).transpose()?.flatten() {
                    let before = m.flags.len();
                    m.flags.retain(|f| !f.contains(crate::pipeline::ENRICH_FLAG));
                    if m.flags.len() != before {
                        tx.save_member(&m)?;
                    }
                }
                Ok(Some(ack))
            })
            .await;
        match done {
            Ok(Some(ack)) => {
                ran += 1;
                tracing::info!(tenant = %e.tenant, provider = %e.provider, event = %e.event_id,
                    status = ack.status.as_str(), "Enriched and re-applied.");
            }
            Ok(None) => {}
            Err(err) => tracing::error!(event = %e.event_id, error = %err, "Could not re-apply an enriched event."),
        }
    }
    if ran > 0 {
        ctx.timers_changed.notify_one();
    }
    ran
}

/// The items an answer lists, each with its product (an item without one is an error: it
/// cannot be told which access it buys).
fn items_of(spec: &crate::spec::EnrichSpec, v: &Value) -> Result<Vec<Item>, String> {
    let path = |p: &str| crate::extract::path::Path::parse(p).map_err(|e| format!("path {p}: {e}"));
    let list =
        path(&spec.items)?.lookup(v).and_then(Value::as_array).ok_or_else(|| format!("no list at `{}`", spec.items))?;
    let read = |item: &Value, paths: Vec<&str>| -> Result<Option<String>, String> {
        for p in paths {
            match path(p)?.lookup(item) {
                Some(Value::String(s)) if !s.is_empty() => return Ok(Some(s.clone())),
                Some(Value::Number(n)) => return Ok(Some(n.to_string())),
                _ => {}
            }
        }
        Ok(None)
    };
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let product_id = read(item, spec.product_id.detail().paths.iter().map(String::as_str).collect())?
            .ok_or_else(|| format!("item {i} names no product"))?;
        let plan_id = match &spec.plan_id {
            Some(f) => read(item, f.detail().paths.iter().map(String::as_str).collect())?,
            None => None,
        };
        out.push(Item { product_id, plan_id });
    }
    Ok(out)
}

/// Fills `{api_base}`, `{api_key}` and the plan's variables (each one encoded URL path
/// segment; `.`, `..` and the empty string are refused: they would change the path).
fn fill(
    template: &str,
    api_base: &str,
    vars: &std::collections::BTreeMap<String, String>,
    api_key: Option<&str>,
) -> Result<String, Error> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(j) = after.find('}') else {
            out.push('{');
            rest = after;
            continue;
        };
        let name = &after[..j];
        match name {
            "api_base" => out.push_str(api_base),
            "api_key" => out.push_str(api_key.ok_or_else(|| Error::Request("{api_key} outside a header".into()))?),
            _ => {
                let v = vars.get(name).ok_or_else(|| Error::Request(format!("no value for {{{name}}}")))?;
                if v.is_empty() || v == "." || v == ".." {
                    return Err(Error::Request(format!("{{{name}}} `{v}` is not an id")));
                }
                const UNRESERVED: &percent_encoding::AsciiSet =
                    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
                out.push_str(&percent_encoding::utf8_percent_encode(v, UNRESERVED).to_string());
            }
        }
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A transport error's text without its URL (said once, by the caller).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.without_url_ref_string();
    if e.is_timeout() {
        text = "timed out".into();
    }
    text
}

trait WithoutUrl {
    fn without_url_ref_string(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref_string(&self) -> String {
        let mut s = self.to_string();
        if let Some(u) = self.url() {
            s = s.replace(u.as_str(), "");
        }
        s.trim().trim_end_matches(" ()").trim_end_matches(':').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variable_is_one_encoded_segment_and_dots_are_refused() {
        let vars = |v: &str| [("id".to_string(), v.to_string())].into_iter().collect();
        let f = |v: &str| fill("{api_base}/v1/checkout/sessions/{id}/line_items", "http://h", &vars(v), None);
        assert_eq!(f("cs_1").unwrap(), "http://h/v1/checkout/sessions/cs_1/line_items");
        assert_eq!(f("a/b?c#d").unwrap(), "http://h/v1/checkout/sessions/a%2Fb%3Fc%23d/line_items");
        for bad in ["", ".", ".."] {
            assert!(f(bad).is_err(), "{bad:?}");
        }
        assert!(fill("{api_base}/{api_key}", "http://h", &vars("x"), None).is_err(), "no key outside headers");
    }
}
