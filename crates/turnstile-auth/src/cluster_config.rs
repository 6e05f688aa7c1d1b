//! Cluster-wide settings that nodes and proxies follow, at `cluster/config`.
//! At each auth server's start, the settings its file sets are written (those
//! it omits are left as stored); `turnstile admin config set` changes one live,
//! until a file that sets it starts an auth server again.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use turnstile_api::error::ApiError;
use turnstile_api::lock::LockingMode;
use turnstile_api::recording::RecordingMode;
use turnstile_api::rpc::proto;

use crate::backend::typed::{self, Change, Stored};
use crate::backend::{Backend, BackendError};

const KEY: &str = "cluster/config";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub session_control_timeout_ms: u64,
    pub session_recording: RecordingMode,
    /// How nodes and proxies apply cached locks while auth is unreachable.
    #[serde(default)]
    pub locking_mode: LockingMode,
    /// Ends a session after this long without input, for roles that do not
    /// set `client_idle_timeout`; 0: never.
    #[serde(default)]
    pub client_idle_timeout_ms: u64,
    /// Ends a session when its certificate expires, for every role.
    #[serde(default)]
    pub disconnect_expired_cert: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            session_control_timeout_ms: 120_000,
            session_recording: RecordingMode::Node,
            locking_mode: LockingMode::BestEffort,
            client_idle_timeout_ms: 0,
            disconnect_expired_cert: false,
        }
    }
}

/// The settings `turnstile admin config set` may change.
pub const SETTABLE: &str = "session_recording, session_control_timeout, locking_mode, client_idle_timeout, disconnect_expired_cert";

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ClusterConfig {
    pub fn session_control_timeout(&self) -> Duration {
        Duration::from_millis(self.session_control_timeout_ms)
    }

    /// Changes one setting from its written form; the error names the
    /// setting and what it takes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ApiError> {
        let bad = |e: String| ApiError::bad_parameter(format!("{key}: {e}"));
        let duration = |v: &str| turnstile_api::duration::parse(v).map_err(|e| bad(e.to_string()));
        match key {
            "session_recording" => {
                self.session_recording = value.parse().map_err(|e| bad(format!("{e}")))?
            }
            "session_control_timeout" => {
                let d = duration(value)?;
                turnstile_api::semaphore::check_lease_ttl(d).map_err(bad)?;
                self.session_control_timeout_ms = millis(d);
            }
            "locking_mode" => self.locking_mode = value.parse().map_err(bad)?,
            "client_idle_timeout" => self.client_idle_timeout_ms = millis(duration(value)?),
            "disconnect_expired_cert" => {
                self.disconnect_expired_cert = match value {
                    "true" | "yes" => true,
                    "false" | "no" => false,
                    other => return Err(bad(format!("{other:?} is not true or false"))),
                }
            }
            other => {
                return Err(ApiError::bad_parameter(format!(
                    "unknown setting {other:?}; settable: {SETTABLE}"
                )));
            }
        }
        Ok(())
    }

    pub fn to_proto(&self) -> proto::ClusterConfig {
        proto::ClusterConfig {
            session_control_timeout_ms: self.session_control_timeout_ms,
            session_recording: self.session_recording.to_string(),
            locking_mode: self.locking_mode.to_string(),
            client_idle_timeout_ms: self.client_idle_timeout_ms,
            disconnect_expired_cert: self.disconnect_expired_cert,
        }
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

/// Changes one setting (`admin config set`) by compare-and-swap, so that a
/// change made meanwhile through another auth server, or by a start, is
/// kept; returns the settings as written.
pub async fn set(backend: &dyn Backend, key: &str, value: &str) -> Result<ClusterConfig, ApiError> {
    typed::update(backend, KEY, |current: Option<&Stored<ClusterConfig>>| {
        let mut next = current.map(|c| c.value.clone()).unwrap_or_default();
        next.set(key, value)?;
        Ok((Change::Put(next.clone(), None), next))
    })
    .await
}

/// The settings an auth server's config file sets; `None` where it is
/// silent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSettings {
    pub session_control_timeout: Option<Duration>,
    pub session_recording: Option<RecordingMode>,
    pub locking_mode: Option<LockingMode>,
    pub client_idle_timeout: Option<Duration>,
    pub disconnect_expired_cert: Option<bool>,
}

impl FileSettings {
    fn apply_to(&self, c: &mut ClusterConfig) {
        if let Some(d) = self.session_control_timeout {
            c.session_control_timeout_ms = millis(d);
        }
        if let Some(m) = self.session_recording {
            c.session_recording = m;
        }
        if let Some(m) = self.locking_mode {
            c.locking_mode = m;
        }
        if let Some(d) = self.client_idle_timeout {
            c.client_idle_timeout_ms = millis(d);
        }
        if let Some(b) = self.disconnect_expired_cert {
            c.disconnect_expired_cert = b;
        }
    }
}

/// At an auth server's start: writes the settings its file sets, only where
/// they differ from the stored ones, by compare-and-swap. Settings the file
/// omits keep what is stored (a value `admin config set` gave, or another
/// auth server's). Returns whether anything was written.
pub async fn apply_file(backend: &dyn Backend, file: &FileSettings) -> Result<bool, ApiError> {
    typed::update(backend, KEY, |current: Option<&Stored<ClusterConfig>>| {
        let stored = current.map(|c| c.value.clone()).unwrap_or_default();
        let mut next = stored.clone();
        file.apply_to(&mut next);
        Ok(if next == stored {
            (Change::Keep, false)
        } else {
            (Change::Put(next, None), true)
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_start_writes_only_what_its_file_sets_and_only_when_it_differs() {
        let backend = crate::backend::MemoryBackend::new();
        let quiet = FileSettings::default();
        assert!(
            !apply_file(&backend, &quiet).await.unwrap(),
            "defaults need no write"
        );
        let mut c = get(&backend).await.unwrap();
        c.set("locking_mode", "strict").unwrap();
        put(&backend, &c).await.unwrap();
        // A file that sets the idle timeout only keeps the live lock mode.
        let file = FileSettings {
            client_idle_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        assert!(apply_file(&backend, &file).await.unwrap());
        let c = get(&backend).await.unwrap();
        assert_eq!(c.locking_mode, LockingMode::Strict);
        assert_eq!(c.client_idle_timeout_ms, 60_000);
        assert!(
            !apply_file(&backend, &file).await.unwrap(),
            "a second start with the same file writes nothing"
        );
        // A file that sets the lock mode sets it again.
        let file = FileSettings {
            locking_mode: Some(LockingMode::BestEffort),
            ..Default::default()
        };
        assert!(apply_file(&backend, &file).await.unwrap());
        assert_eq!(
            get(&backend).await.unwrap().locking_mode,
            LockingMode::BestEffort
        );
        // `admin config set` changes its one key and keeps the rest.
        let c = set(&backend, "disconnect_expired_cert", "true")
            .await
            .unwrap();
        assert!(c.disconnect_expired_cert);
        assert_eq!(c.client_idle_timeout_ms, 60_000);
        assert!(set(&backend, "locking_mode", "nope").await.is_err());
        assert_eq!(
            get(&backend).await.unwrap(),
            c,
            "a refused set writes nothing"
        );
    }

    #[test]
    fn settings_change_by_name_and_bad_values_name_the_setting() {
        let mut c = ClusterConfig::default();
        c.set("locking_mode", "strict").unwrap();
        c.set("client_idle_timeout", "15m").unwrap();
        c.set("disconnect_expired_cert", "true").unwrap();
        assert_eq!(c.locking_mode, LockingMode::Strict);
        assert_eq!(c.client_idle_timeout_ms, 900_000);
        assert!(c.disconnect_expired_cert);
        let e = c.set("locking_mode", "strikt").unwrap_err().to_string();
        assert!(
            e.contains("locking_mode") && e.contains("best_effort, strict"),
            "{e}"
        );
        let e = c
            .set("session_control_timeout", "0s")
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 1s and 1h"), "{e}");
        let e = c
            .set("session_control_timeout", "2h")
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 1s and 1h"), "{e}");
        let e = c.set("colour", "red").unwrap_err().to_string();
        assert!(e.contains(SETTABLE), "{e}");
    }
}
