//! The audit log in the console, for users whose roles allow reading it
//! (auth decides, with the rule `may_read_audit`): a page at a time, oldest
//! first, and all of a search as JSON Lines.

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use turnstile_api::rpc::proto;

use crate::Shared;
use crate::session::Refusal;

/// The most events one export holds.
const MAX_EXPORT: usize = 100_000;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub since_ms: i64,
    #[serde(default)]
    pub after: String,
    #[serde(default)]
    pub limit: u32,
}

/// What an event must carry to be about `node` (a name): the node's host
/// id as its `server_id`, or the name itself.
async fn node_filter(shared: &Shared, node: &str) -> Option<(String, Option<String>)> {
    let node = node.trim();
    if node.is_empty() {
        return None;
    }
    let id = shared
        .view
        .find_node(node)
        .await
        .ok()
        .flatten()
        .map(|n| n.id);
    Some((node.to_ascii_lowercase(), id))
}

fn about(e: &Value, filter: &(String, Option<String>)) -> bool {
    let (name, id) = filter;
    let text = |k: &str| e[k].as_str().map(str::to_ascii_lowercase);
    id.as_deref().is_some_and(|id| e["server_id"] == id)
        || text("server_hostname").as_deref() == Some(name)
        || text("node").as_deref() == Some(name)
}

async fn search(
    shared: &Shared,
    token: &str,
    q: &AuditQuery,
    after: &str,
    limit: u32,
) -> Result<(Vec<Value>, String), Refusal> {
    let page = shared
        .view
        .client()
        .search_audit_events(proto::SearchAuditEventsRequest {
            web_session: token.to_string(),
            event: q.event.trim().to_string(),
            user: q.user.trim().to_string(),
            since_unix_ms: q.since_ms,
            limit,
            after: after.to_string(),
        })
        .await
        .map_err(|s| Refusal::from_status(&s))?
        .into_inner();
    let events = page
        .event_json
        .iter()
        .filter_map(|t| serde_json::from_str(t).ok())
        .collect();
    Ok((events, page.next))
}

/// One page; with a node filter a page may hold fewer than `limit`.
pub(crate) async fn page(shared: &Shared, token: &str, q: AuditQuery) -> Result<Value, Refusal> {
    let limit = match q.limit {
        0 => 100,
        n => n.min(1000),
    };
    let filter = node_filter(shared, &q.node).await;
    let (events, next) = search(shared, token, &q, &q.after, limit).await?;
    let events: Vec<Value> = events
        .into_iter()
        .filter(|e| filter.as_ref().is_none_or(|f| about(e, f)))
        .collect();
    Ok(json!({ "events": events, "next": next }))
}

/// Every event of the search, one JSON object a line.
pub(crate) async fn export(shared: &Shared, token: &str, q: AuditQuery) -> Result<String, Refusal> {
    let filter = node_filter(shared, &q.node).await;
    let mut out = String::new();
    let mut after = String::new();
    let mut count = 0;
    loop {
        let (events, next) = search(shared, token, &q, &after, 1000).await?;
        for e in events
            .iter()
            .filter(|e| filter.as_ref().is_none_or(|f| about(e, f)))
        {
            out.push_str(&e.to_string());
            out.push('\n');
            count += 1;
            if count >= MAX_EXPORT {
                return Err(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the search matches more than {MAX_EXPORT} events; narrow it (since, user, event) or use `turnstile admin audit search`"
                    ),
                ));
            }
        }
        if next.is_empty() {
            return Ok(out);
        }
        after = next;
    }
}
