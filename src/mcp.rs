//! The MCP server: "what is this member's payment sync status?" answered to an AI assistant,
//! over streamable HTTP at `/mcp` (stateless: any replica answers) and over stdio
//! (`membersync mcp`). Four read-only tools, each a thin face over the functions the admin
//! API calls — `member_sync_status`, `explain_access`, `find_members`,
//! `list_failed_events` — answering compact text plus structured content.
//!
//! Over HTTP it takes its own bearer token (`mcp_token`, env `MEMBERSYNC_MCP_TOKEN`, or a
//! tenant's, which sees that tenant only); the admin token is not accepted there.
//!
//! What this module must never do: change anything, or put a secret, a token or a raw body
//! in an answer.

use crate::pipeline::Ctx;
use crate::store::{read, MemberDetail};
use crate::views::{activity_json, member_json};
use axum::http::request::Parts;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Extensions, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Which tenants an assistant may see: every one (`None`), or one.
#[derive(Debug, Clone)]
pub struct Scope(pub Option<String>);

/// The assistant's tools over a pipeline context.
#[derive(Clone)]
pub struct Assistant {
    ctx: Arc<Ctx>,
    /// Over stdio: every tenant (the operator's own machine). Over HTTP: the scope the
    /// token opened, carried in the request.
    stdio: bool,
    tool_router: ToolRouter<Assistant>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Who {
    /// The member's email or member id.
    pub member: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Search {
    /// Part of an email or name, or a member, customer or subscription id exactly (at most
    /// 256 characters); empty: the newest members.
    #[serde(default)]
    pub q: Option<String>,
    /// At most this many (1–50, default 20).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Failed {
    /// Only events received at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// At most this many (1–100, default 20).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// How much of any one stored string an answer repeats (see [`clean`]).
const ANSWER_CHARS: usize = 200;

/// How many events `explain_access` tells, the newest.
const HISTORY_EVENTS: usize = 50;

/// How many memberships an answer lists (the newest), and flags of each.
const MEMBERSHIPS: usize = 20;
const FLAGS: usize = 10;

/// A member's JSON as an answer carries it: the newest [`MEMBERSHIPS`] memberships, at most
/// [`FLAGS`] flags on it and on each, every string cleaned (see [`clean`]). Returns how many
/// memberships were left out.
fn bounded(member: &mut Value) -> usize {
    let cap_flags = |v: &mut Value| {
        if let Some(flags) = v["flags"].as_array_mut().filter(|f| f.len() > FLAGS) {
            let more = flags.len() - FLAGS;
            flags.truncate(FLAGS);
            flags.push(json!(format!("… {more} more flag(s); the console has them all")));
        }
    };
    cap_flags(member);
    let mut omitted = 0;
    if let Some(all) = member["memberships"].as_array_mut() {
        omitted = all.len().saturating_sub(MEMBERSHIPS);
        all.drain(..omitted);
        all.iter_mut().for_each(cap_flags);
    }
    clean(member);
    omitted
}

/// Every string in `v` as an answer may carry it: senders choose much of what is stored
/// (names, emails, statuses, product and event ids) and the assistant reads the answer as
/// its own input, so no stored value may start a line of its own or run on for pages.
fn clean(v: &mut Value) {
    match v {
        Value::String(s) if s.chars().count() > ANSWER_CHARS || s.chars().any(|c| c.is_control() || !c.is_ascii()) => {
            *s = crate::logging::one_line(s, ANSWER_CHARS);
        }
        Value::Array(items) => items.iter_mut().for_each(clean),
        Value::Object(fields) => fields.values_mut().for_each(clean),
        _ => {}
    }
}

fn answer(text: String, structured: Value) -> CallToolResult {
    let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
    r.structured_content = Some(structured);
    r
}

fn refused(text: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text.into())])
}

fn internal(e: impl std::fmt::Display + std::fmt::Debug) -> ErrorData {
    tracing::error!(error = ?e, "An MCP tool could not read the store.");
    ErrorData::internal_error(format!("the store could not be read: {e}"), None)
}

#[tool_router]
impl Assistant {
    pub fn new(ctx: Arc<Ctx>, stdio: bool) -> Assistant {
        Assistant { ctx, stdio, tool_router: Self::tool_router() }
    }

    /// The tenants this request may see.
    fn scope(&self, ext: &Extensions) -> Result<Option<String>, ErrorData> {
        if self.stdio {
            return Ok(None);
        }
        ext.get::<Parts>()
            .and_then(|p| p.extensions.get::<Scope>())
            .map(|s| s.0.clone())
            .ok_or_else(|| ErrorData::invalid_request("no MCP token scope on this request", None))
    }

    /// The member named by email or id, if this scope may see them.
    async fn member(&self, ext: &Extensions, who: &str) -> Result<Result<MemberDetail, String>, ErrorData> {
        let scope = self.scope(ext)?;
        let w = who.trim().to_string();
        let found = read(&self.ctx.store, move |s| {
            let mut hits = Vec::new();
            if let Some(d) = s.member_detail(&w, 50)? {
                hits.push(d);
            } else {
                for m in s.members_by_email(&w)? {
                    if let Some(d) = s.member_detail(&m.id, 50)? {
                        hits.push(d);
                    }
                }
            }
            Ok(hits)
        })
        .await
        .map_err(internal)?;
        let mut mine: Vec<MemberDetail> =
            found.into_iter().filter(|d| scope.as_deref().is_none_or(|t| t == d.member.tenant)).collect();
        // The caller's words come back short: a tool's answer is read by the assistant.
        let who = crate::extract::time::brief_text(who.trim());
        Ok(match mine.len() {
            0 => Err(format!("no member `{who}` (by email or member id)")),
            1 => Ok(mine.remove(0)),
            n => Err(format!("`{who}` is the email of {n} members (in different tenants): name one by member id")),
        })
    }

    #[tool(
        description = "A member's payment sync status: for each membership, its state, access levels and until when, the sync status with the provider, the last webhook, the last reconcile, the last drift and error, and flags. Ask this before granting or revoking anything.",
        annotations(read_only_hint = true)
    )]
    async fn member_sync_status(
        &self,
        Parameters(who): Parameters<Who>,
        ext: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        let d = match self.member(&ext, &who.member).await? {
            Ok(d) => d,
            Err(why) => return Ok(refused(why)),
        };
        let mut full = member_json(&d, self.ctx.clock.now());
        let omitted = bounded(&mut full);
        let memberships: Vec<Value> = full["memberships"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                // Until when access holds: none without access.
                let until = if m["has_access"] == true {
                    [&m["access_until"], &m["grace_until"], &m["period_end"]]
                        .into_iter()
                        .find(|v| !v.is_null())
                        .cloned()
                } else {
                    None
                };
                json!({
                    "provider": m["provider"], "subscription_id": m["subscription_id"], "product_id": m["product_id"],
                    "state": m["state"], "has_access": m["has_access"], "access_levels": m["access_levels"],
                    "until": until, "sync_status": m["sync_status"], "sync_detail": m["sync_detail"],
                    "last_webhook_at": m["last_webhook_at"], "last_reconciled_at": m["last_reconciled_at"],
                    "last_drift": m["last_drift"], "last_error": m["last_error"], "flags": m["flags"],
                })
            })
            .collect();
        let structured = json!({
            "member_id": full["id"], "tenant": full["tenant"], "email": full["email"], "name": full["name"],
            "has_access": full["has_access"], "access_levels": full["access_levels"], "flags": full["flags"],
            "memberships": memberships, "omitted_older_memberships": omitted,
        });
        let mut text = format!(
            "{} ({}): {}.",
            full["email"].as_str().unwrap_or("no email"),
            full["id"].as_str().unwrap_or_default(),
            if full["has_access"] == true {
                format!("access {}", list(&full["access_levels"]))
            } else {
                "no access".into()
            }
        );
        if omitted > 0 {
            text.push_str(&format!(" ({omitted} older membership(s) left out; the console has them all)"));
        }
        for m in &memberships {
            text.push_str(&format!(
                "\n- {} {}: {}, access {}, until {}; sync {}; last webhook {}; last reconcile {}",
                m["provider"].as_str().unwrap_or_default(),
                m["subscription_id"].as_str().unwrap_or("—"),
                m["state"].as_str().unwrap_or_default(),
                list(&m["access_levels"]),
                m["until"].as_str().unwrap_or("—"),
                m["sync_status"].as_str().unwrap_or_default(),
                m["last_webhook_at"].as_str().unwrap_or("never"),
                m["last_reconciled_at"].as_str().unwrap_or("never"),
            ));
            if let Some(what) = m["last_drift"]["what"].as_str() {
                text.push_str(&format!("; last drift {}: {what}", m["last_drift"]["at"].as_str().unwrap_or("")));
            }
            if let Some(e) = m["last_error"]["error"].as_str() {
                text.push_str(&format!("; last error {}: {e}", m["last_error"]["at"].as_str().unwrap_or("")));
            }
            if let Some(flags) = m["flags"].as_array().filter(|f| !f.is_empty()) {
                text.push_str(&format!(
                    "; flags: {}",
                    flags.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        Ok(answer(text, structured))
    }

    #[tool(
        description = "Why a member has (or lacks) access: every stored event about them, newest last, with the mapping that read it, the rule that decided (file:line, rule-set version) and the transition.",
        annotations(read_only_hint = true)
    )]
    async fn explain_access(
        &self,
        Parameters(who): Parameters<Who>,
        ext: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        let d = match self.member(&ext, &who.member).await? {
            Ok(d) => d,
            Err(why) => return Ok(refused(why)),
        };
        let now = self.ctx.clock.now();
        let mut story =
            read(&self.ctx.store, move |s| crate::explain::explain_json(s, &d, now)).await.map_err(internal)?;
        // The newest events only; the console and `membersync explain` have them all.
        let mut omitted = 0;
        if let Some(history) = story["history"].as_array_mut() {
            omitted = history.len().saturating_sub(HISTORY_EVENTS);
            history.drain(..omitted);
        }
        let older = bounded(&mut story);
        let mut text = crate::explain::explain_text(&story);
        if omitted > 0 || older > 0 {
            text = format!(
                "({omitted} earlier event(s) and {older} older membership(s) left out; the console has them all)\n{text}"
            );
        }
        let structured = json!({
            "member_id": story["id"], "email": story["email"], "access_levels": story["access_levels"],
            "history": story["history"], "omitted_earlier_events": omitted, "as_of": story["as_of"],
        });
        Ok(answer(text, structured))
    }

    #[tool(
        description = "Find members by part of an email or name, or by member, provider customer or subscription id; newest first.",
        annotations(read_only_hint = true)
    )]
    async fn find_members(
        &self,
        Parameters(search): Parameters<Search>,
        ext: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        let scope = self.scope(&ext)?;
        let q = crate::admin::MembersQuery {
            q: search.q.clone(),
            limit: Some(i64::from(search.limit.unwrap_or(20).clamp(1, 50))),
            ..Default::default()
        };
        let (page, _) = match crate::admin::member_page(&self.ctx, scope, &q).await {
            Ok(found) => found,
            Err(crate::http_error::ApiError::Invalid(why)) => return Ok(refused(why)),
            Err(e) => return Err(internal(e)),
        };
        let now = self.ctx.clock.now();
        let found: Vec<Value> = page
            .iter()
            .map(|d| {
                let mut j = member_json(d, now);
                bounded(&mut j);
                json!({
                    "member_id": j["id"], "tenant": j["tenant"], "email": j["email"], "name": j["name"],
                    "access_levels": j["access_levels"],
                    "memberships": j["memberships"].as_array().into_iter().flatten().map(|m| json!({
                        "provider": m["provider"], "subscription_id": m["subscription_id"], "state": m["state"],
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut text = format!("{} member(s)", found.len());
        for m in &found {
            text.push_str(&format!(
                "\n- {} {} ({}): access {}",
                m["email"].as_str().unwrap_or("no email"),
                m["name"].as_str().unwrap_or(""),
                m["member_id"].as_str().unwrap_or_default(),
                list(&m["access_levels"])
            ));
        }
        Ok(answer(text, json!({ "members": found })))
    }

    #[tool(
        description = "Dead letters: the newest events that failed (a field that could not be read, a rule error), with their reason, so they can be fixed and replayed from the console.",
        annotations(read_only_hint = true)
    )]
    async fn list_failed_events(
        &self,
        Parameters(f): Parameters<Failed>,
        ext: Extensions,
    ) -> Result<CallToolResult, ErrorData> {
        let scope = self.scope(&ext)?;
        let limit = f.limit.unwrap_or(20).clamp(1, 100) as usize;
        let rows = read(&self.ctx.store, move |s| s.event_list(Some("failed"), scope.as_deref(), None, limit))
            .await
            .map_err(internal)?;
        let events: Vec<Value> = rows
            .iter()
            .filter(|e| f.since.is_none_or(|t| e.received_at >= t))
            .map(|e| {
                let mut j = json!({
                    "event_id": e.event_id, "tenant": e.tenant, "provider": e.provider, "event_type": e.event_type,
                    "received_at": activity_json(e)["received_at"], "reason": e.reason, "member_id": e.member_id,
                });
                clean(&mut j);
                j
            })
            .collect();
        let mut text = format!("{} failed event(s)", events.len());
        for e in &events {
            text.push_str(&format!(
                "\n- {} {} {} at {}: {}",
                e["event_id"].as_str().unwrap_or_default(),
                e["provider"].as_str().unwrap_or_default(),
                e["event_type"].as_str().unwrap_or_default(),
                e["received_at"].as_str().unwrap_or_default(),
                e["reason"].as_str().unwrap_or_default()
            ));
        }
        Ok(answer(text, json!({ "events": events })))
    }
}

fn list(v: &Value) -> String {
    let items: Vec<&str> = v.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Assistant {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::default();
        info.capabilities = ServerCapabilities::builder().enable_tools().build();
        info.server_info = rmcp::model::Implementation::new("membersync", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "membersync keeps member access in sync with payment providers. Read-only: ask \
             member_sync_status before granting or revoking anything; explain_access says why."
                .into(),
        );
        info
    }
}

/// The scope an MCP bearer token opens (every tenant, or one), if it is an MCP token. The
/// admin token is not one.
pub fn scope_of(config: &crate::config::Config, token: &str) -> Option<Scope> {
    let matches =
        |s: &crate::secret::Secret| !token.is_empty() && bool::from(token.as_bytes().ct_eq(s.expose().as_bytes()));
    if config.mcp_token.as_ref().is_some_and(matches) {
        return Some(Scope(None));
    }
    config.tenants.values().find(|t| t.mcp_token.as_ref().is_some_and(matches)).map(|t| Scope(Some(t.name.clone())))
}
