//! Active connections on nodes, at `sessions/<id>`: each node upserts its
//! connections with its heartbeat and deletes one when it closes; a crashed
//! node's entries expire. What `turnstile admin sessions ls` shows.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use turnstile_api::error::ApiError;

use crate::backend::{Backend, BackendError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracker {
    pub id: String,
    pub node_id: String,
    pub node_name: String,
    pub user: String,
    pub login: String,
    pub remote_addr: String,
    pub since_unix_ms: i64,
    pub channels: u32,
}

fn key(id: &str) -> String {
    format!("sessions/{id}")
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ApiError::bad_parameter(format!("bad session id {id:?}")));
    }
    Ok(())
}

/// Writes `trackers` for `node_id`, each living `ttl` from `now`.
pub async fn upsert(
    backend: &dyn Backend,
    node_id: &str,
    trackers: &[Tracker],
    now: SystemTime,
    ttl: Duration,
) -> Result<(), ApiError> {
    for t in trackers {
        check_id(&t.id)?;
        if t.node_id != node_id {
            return Err(ApiError::access_denied(format!(
                "node {node_id} may not report sessions of node {}",
                t.node_id
            )));
        }
        backend
            .put(
                &key(&t.id),
                serde_json::to_vec(t).unwrap_or_default(),
                Some(now + ttl.clamp(Duration::from_secs(1), Duration::from_secs(3600))),
            )
            .await?;
    }
    Ok(())
}

/// Deletes a tracker of `node_id`'s.
pub async fn delete(backend: &dyn Backend, node_id: &str, id: &str) -> Result<(), ApiError> {
    check_id(id)?;
    match backend.get(&key(id)).await {
        Ok(item) => {
            let t: Tracker = serde_json::from_slice(&item.value)
                .map_err(|e| ApiError::internal(format!("stored session is corrupt: {e}")))?;
            if t.node_id != node_id {
                return Err(ApiError::access_denied(
                    "a node may delete only its own sessions",
                ));
            }
            match backend.compare_and_delete(&key(id), item.revision).await {
                Ok(()) | Err(BackendError::NotFound(_) | BackendError::CompareFailed(_)) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(BackendError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub async fn list(backend: &dyn Backend) -> Result<Vec<Tracker>, ApiError> {
    let mut out: Vec<Tracker> = backend
        .range("sessions/")
        .await?
        .iter()
        .filter_map(|i| serde_json::from_slice(&i.value).ok())
        .collect();
    out.sort_by_key(|t| t.since_unix_ms);
    Ok(out)
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
