//! Cluster-wide settings that nodes and proxies follow, at `cluster/config`.
//! Written from the auth service's config at start; later changed live by
//! `turnstile admin config set`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use turnstile_api::error::ApiError;
use turnstile_api::recording::RecordingMode;

use crate::backend::{Backend, BackendError};

const KEY: &str = "cluster/config";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub session_control_timeout_ms: u64,
    pub session_recording: RecordingMode,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            session_control_timeout_ms: 120_000,
            session_recording: RecordingMode::Node,
        }
    }
}

impl ClusterConfig {
    pub fn session_control_timeout(&self) -> Duration {
        Duration::from_millis(self.session_control_timeout_ms)
    }
}

pub async fn get(backend: &dyn Backend) -> Result<ClusterConfig, ApiError> {
    match backend.get(KEY).await {
        Ok(item) => serde_json::from_slice(&item.value)
            .map_err(|e| ApiError::internal(format!("stored cluster config is corrupt: {e}"))),
        Err(BackendError::NotFound(_)) => Ok(ClusterConfig::default()),
        Err(e) => Err(e.into()),
    }
}

pub async fn put(backend: &dyn Backend, config: &ClusterConfig) -> Result<(), ApiError> {
    backend
        .put(KEY, serde_json::to_vec(config).unwrap_or_default(), None)
        .await?;
    Ok(())
}
