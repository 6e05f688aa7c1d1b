//! Recordings in the console: the list a user may see (auth decides, with
//! the rules `turnstile recordings ls` meets) and a recording as asciicast v2
//! for the page's player and for download, with the session's commands as
//! markers.

use serde::Deserialize;
use serde_json::{Value, json};
use turnstile_api::rpc::proto;
use turnstile_recording::asciicast;
use turnstile_recording::event::EXEC;

use crate::Shared;
use crate::session::Refusal;
use axum::http::StatusCode;

/// The most of a recording the console reads for one answer.
const MAX_RECORDING: u64 = 1 << 30;
const CHUNK: u32 = 1 << 20;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub since_ms: i64,
}

pub(crate) async fn list(shared: &Shared, token: &str, q: ListQuery) -> Result<Value, Refusal> {
    let list = shared
        .view
        .client()
        .list_recordings(proto::ListRecordingsRequest {
            web_session: token.to_string(),
            user: q.user.trim().to_string(),
            since_ms: q.since_ms,
            ..Default::default()
        })
        .await
        .map_err(|s| Refusal::from_status(&s))?
        .into_inner();
    let node = q.node.trim().to_ascii_lowercase();
    let mut rows: Vec<Value> = list
        .recordings
        .into_iter()
        .filter(|r| node.is_empty() || r.node_name.to_ascii_lowercase().contains(&node))
        .filter(|r| q.state.is_empty() || r.status == q.state)
        .map(|r| {
            json!({
                "sid": r.sid, "user": r.user, "login": r.login, "node": r.node_name,
                "start_ms": r.start_ms, "stop_ms": r.stop_ms, "size": r.size,
                "status": r.status, "failure": r.failure,
            })
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r["start_ms"].as_i64().unwrap_or(0)));
    Ok(json!({ "recordings": rows }))
}

/// The recording `sid` as asciicast v2, commands as `m` markers.
pub(crate) async fn asciicast(shared: &Shared, token: &str, sid: &str) -> Result<String, Refusal> {
    if sid.is_empty() || sid.len() > 64 || !sid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{sid:?} is not a session id"),
        ));
    }
    let mut bytes = Vec::new();
    loop {
        let chunk = shared
            .view
            .client()
            .get_recording_chunk(proto::GetRecordingChunkRequest {
                web_session: token.to_string(),
                sid: sid.to_string(),
                offset: bytes.len() as u64,
                length: CHUNK,
                ..Default::default()
            })
            .await
            .map_err(|s| Refusal::from_status(&s))?
            .into_inner();
        if chunk.total > MAX_RECORDING {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "session {sid} is recorded in {} MiB, more than the console plays (1 GiB); export it with `turnstile recordings export`",
                    chunk.total >> 20
                ),
            ));
        }
        let done = chunk.data.is_empty();
        bytes.extend_from_slice(&chunk.data);
        if done || bytes.len() as u64 >= chunk.total {
            break;
        }
    }
    tokio::task::spawn_blocking(move || {
        let events = turnstile_recording::reader::read_events(&bytes).map_err(|e| {
            Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the recording cannot be read: {e}"),
            )
        })?;
        let mut writer = asciicast::Writer::default();
        let mut out = String::new();
        for e in &events {
            out.push_str(&writer.event(e));
            if e.event == EXEC && !e.command.is_empty() {
                let t = e.ms as f64 / 1000.0;
                out.push_str(&json!([t, "m", e.command]).to_string());
                out.push('\n');
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}
