//! Recordings on auth: receiving a recorder's stream into parts in the
//! `UploadStore`, the index at `recordings/<sid>` (in-progress uploads and
//! their stored parts live there too, so any auth server can resume or
//! complete one), the upload completer, and who may list and read what.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use turnstile_api::audit::AuditEvent;
use turnstile_api::clock::Clock;
use turnstile_api::error::ApiError;
use turnstile_api::rpc::proto::{RecordingEvent, RecordingInfo};
use turnstile_recording::part::{FinishedPart, PartWriter};
use turnstile_recording::storage::{Part, Upload, UploadStore, check_id};

use crate::backend::{Backend, BackendError};

pub const STATUS_RECORDING: &str = "recording";
pub const STATUS_COMPLETE: &str = "complete";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPart {
    pub number: u32,
    pub size: u64,
    pub last_ei: u64,
}

/// The index entry of a session's recording.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordingRecord {
    pub sid: String,
    pub user: String,
    pub login: String,
    pub node_name: String,
    pub server_id: String,
    pub start_ms: i64,
    #[serde(default)]
    pub stop_ms: i64,
    /// Size of the completed recording.
    #[serde(default)]
    pub size: u64,
    pub status: String,
    /// The upload in progress, if any.
    #[serde(default)]
    pub upload: Option<Upload>,
    #[serde(default)]
    pub parts: Vec<StoredPart>,
    pub next_part: u32,
    /// The last event index durably stored; -1: none.
    pub last_ei: i64,
    /// When the recorder was last heard from.
    pub last_seen_ms: i64,
    #[serde(default)]
    pub url: String,
}

impl RecordingRecord {
    pub fn info(&self) -> RecordingInfo {
        RecordingInfo {
            sid: self.sid.clone(),
            user: self.user.clone(),
            login: self.login.clone(),
            node_name: self.node_name.clone(),
            server_id: self.server_id.clone(),
            start_ms: self.start_ms,
            stop_ms: self.stop_ms,
            size: self.size,
            status: self.status.clone(),
            parts: u32::try_from(self.parts.len()).unwrap_or(u32::MAX),
            url: self.url.clone(),
        }
    }
}

fn key(sid: &str) -> String {
    format!("recordings/{sid}")
}

fn storage(e: turnstile_recording::storage::StorageError) -> ApiError {
    use turnstile_recording::storage::StorageError as S;
    match e {
        S::NotFound(m) => ApiError::not_found(m),
        S::BadParameter(m) => ApiError::bad_parameter(m),
        S::Io(m) => ApiError::new(turnstile_api::error::ErrorKind::Unavailable, m),
    }
}

#[derive(Debug)]
pub struct Recordings {
    backend: Arc<dyn Backend>,
    store: Arc<dyn UploadStore>,
    clock: Arc<dyn Clock>,
}

/// What a recorder's stream opened.
#[derive(Debug, Clone)]
pub struct Opening {
    pub sid: String,
    pub user: String,
    pub login: String,
    pub node_name: String,
    pub start_ms: i64,
}

impl Recordings {
    pub fn new(
        backend: Arc<dyn Backend>,
        store: Arc<dyn UploadStore>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            backend,
            store,
            clock,
        }
    }

    pub fn store(&self) -> &Arc<dyn UploadStore> {
        &self.store
    }

    fn now_ms(&self) -> i64 {
        self.clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    pub async fn get(&self, sid: &str) -> Result<Option<RecordingRecord>, ApiError> {
        match self.backend.get(&key(sid)).await {
            Ok(item) => serde_json::from_slice(&item.value).map(Some).map_err(|e| {
                ApiError::internal(format!("recording index of {sid} is corrupt: {e}"))
            }),
            Err(BackendError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Read-modify-write of the index entry, exact under races.
    async fn update<T>(
        &self,
        sid: &str,
        mut change: impl FnMut(Option<RecordingRecord>) -> Result<(RecordingRecord, T), ApiError>,
    ) -> Result<T, ApiError> {
        for _ in 0..64 {
            let (current, revision) = match self.backend.get(&key(sid)).await {
                Ok(item) => (
                    Some(
                        serde_json::from_slice::<RecordingRecord>(&item.value).map_err(|e| {
                            ApiError::internal(format!("recording index of {sid} is corrupt: {e}"))
                        })?,
                    ),
                    Some(item.revision),
                ),
                Err(BackendError::NotFound(_)) => (None, None),
                Err(e) => return Err(e.into()),
            };
            let (next, out) = change(current)?;
            let bytes = serde_json::to_vec(&next).unwrap_or_default();
            let result = match revision {
                Some(r) => {
                    self.backend
                        .compare_and_swap(&key(sid), r, bytes, None)
                        .await
                }
                None => self.backend.create(&key(sid), bytes, None).await,
            };
            match result {
                Ok(_) => return Ok(out),
                Err(
                    BackendError::CompareFailed(_)
                    | BackendError::AlreadyExists(_)
                    | BackendError::NotFound(_),
                ) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::new(
            turnstile_api::error::ErrorKind::Unavailable,
            format!("too much contention on the recording of {sid}"),
        ))
    }

    /// Creates or resumes the upload of a session for the recorder `server_id`;
    /// returns the last stored event index.
    pub async fn open(&self, server_id: &str, o: &Opening) -> Result<i64, ApiError> {
        check_id("session id", &o.sid).map_err(storage)?;
        let existing = self.get(&o.sid).await?;
        if let Some(r) = &existing
            && r.server_id != server_id
        {
            return Err(ApiError::access_denied(format!(
                "session {} was recorded by another server",
                o.sid
            )));
        }
        // A new upload is needed for a new session or a continuation.
        let needs_upload = existing.as_ref().is_none_or(|r| r.upload.is_none());
        let fresh = if needs_upload {
            Some(self.store.create_upload(&o.sid).await.map_err(storage)?)
        } else {
            None
        };
        let now = self.now_ms();
        let url = self.store.url(&o.sid);
        self.update(&o.sid, |current| {
            let mut r = current.unwrap_or_else(|| RecordingRecord {
                sid: o.sid.clone(),
                user: o.user.clone(),
                login: o.login.clone(),
                node_name: o.node_name.clone(),
                server_id: server_id.to_string(),
                start_ms: o.start_ms,
                stop_ms: 0,
                size: 0,
                status: STATUS_RECORDING.into(),
                upload: None,
                parts: Vec::new(),
                next_part: 1,
                last_ei: -1,
                last_seen_ms: now,
                url: url.clone(),
            });
            if r.upload.is_none() {
                r.upload = fresh.clone();
                r.parts.clear();
                r.next_part = 1;
            }
            r.status = STATUS_RECORDING.into();
            r.last_seen_ms = now;
            let last = r.last_ei;
            Ok((r, last))
        })
        .await
    }

    /// Notes that the recorder is alive.
    pub async fn touch(&self, sid: &str) -> Result<(), ApiError> {
        let now = self.now_ms();
        self.update(sid, |r| {
            let mut r = r.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
            r.last_seen_ms = now;
            Ok((r, ()))
        })
        .await
    }

    /// Stores a part; returns the last stored event index.
    pub async fn store_part(&self, sid: &str, part: FinishedPart) -> Result<i64, ApiError> {
        // Reserve a part number first, so two writers never share one.
        let (upload, number) = self
            .update(sid, |r| {
                let mut r = r.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
                let upload = r.upload.clone().ok_or_else(|| {
                    ApiError::bad_parameter(format!("recording {sid} has no upload in progress"))
                })?;
                let n = r.next_part;
                r.next_part += 1;
                Ok((r, (upload, n)))
            })
            .await?;
        let stored = self
            .store
            .upload_part(&upload, number, part.bytes)
            .await
            .map_err(storage)?;
        let now = self.now_ms();
        self.update(sid, |r| {
            let mut r = r.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
            if r.upload.as_ref().map(|u| &u.id) != Some(&upload.id) {
                return Err(ApiError::bad_parameter(format!(
                    "the upload of {sid} was completed meanwhile"
                )));
            }
            r.parts.push(StoredPart {
                number: stored.number,
                size: stored.size,
                last_ei: part.last_ei,
            });
            r.last_ei = r.last_ei.max(part.last_ei as i64);
            r.last_seen_ms = now;
            let last = r.last_ei;
            Ok((r, last))
        })
        .await
    }

    /// Joins the stored parts into the recording; returns the index entry.
    pub async fn complete(
        &self,
        sid: &str,
        stop_ms: Option<i64>,
    ) -> Result<RecordingRecord, ApiError> {
        let Some(r) = self.get(sid).await? else {
            return Err(ApiError::not_found(format!("recording {sid}")));
        };
        let Some(upload) = r.upload.clone() else {
            return Ok(r);
        };
        let parts: Vec<Part> = r
            .parts
            .iter()
            .map(|p| Part {
                number: p.number,
                size: p.size,
            })
            .collect();
        let size = if parts.is_empty() {
            self.store.abort(&upload).await.map_err(storage)?;
            self.store.size(sid).await.unwrap_or(0)
        } else {
            self.store
                .complete(&upload, &parts)
                .await
                .map_err(storage)?
        };
        self.update(sid, |current| {
            let mut r = current.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
            r.upload = None;
            r.parts.clear();
            r.size = size;
            r.status = STATUS_COMPLETE.into();
            if let Some(stop) = stop_ms {
                r.stop_ms = stop;
            }
            Ok((r.clone(), r))
        })
        .await
    }

    /// Uploads whose recorder has not been heard from for `grace`.
    pub async fn abandoned(&self, grace: Duration) -> Result<Vec<RecordingRecord>, ApiError> {
        let cutoff = self.now_ms() - i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|r| r.upload.is_some() && r.last_seen_ms < cutoff)
            .collect())
    }

    pub async fn list(&self) -> Result<Vec<RecordingRecord>, ApiError> {
        let mut out: Vec<RecordingRecord> = self
            .backend
            .range("recordings/")
            .await?
            .iter()
            .filter_map(|i| serde_json::from_slice(&i.value).ok())
            .collect();
        out.sort_by_key(|r| r.start_ms);
        Ok(out)
    }
}

/// Receives one recorder's stream of events into parts.
#[derive(Debug)]
pub struct StreamState {
    pub sid: String,
    writer: PartWriter,
    /// The highest index taken into the writer (or stored).
    taken: i64,
    pub stop_ms: Option<i64>,
}

impl StreamState {
    pub fn new(sid: &str, min_part: usize, last_stored: i64) -> Self {
        Self {
            sid: sid.to_string(),
            writer: PartWriter::new(min_part),
            taken: last_stored,
            stop_ms: None,
        }
    }

    /// Takes events (dropping ones already stored or taken); returns a part
    /// once one is full.
    pub fn push(
        &mut self,
        server_id: &str,
        events: &[RecordingEvent],
    ) -> Result<Option<FinishedPart>, ApiError> {
        for e in events {
            if e.sid != self.sid || e.server_id != server_id {
                return Err(ApiError::access_denied(
                    "failed to validate event metadata: the event is for another session or server",
                ));
            }
            if (e.ei as i64) <= self.taken {
                continue;
            }
            if e.event == turnstile_recording::event::SESSION_END {
                self.stop_ms = Some(e.session_stop_ms);
            }
            self.writer
                .push(e)
                .map_err(|err| ApiError::internal(format!("compress: {err}")))?;
            self.taken = e.ei as i64;
        }
        self.writer
            .take_full()
            .map_err(|err| ApiError::internal(format!("compress: {err}")))
    }

    /// The last, unpadded part.
    pub fn finish(&mut self) -> Result<Option<FinishedPart>, ApiError> {
        self.writer
            .take_last()
            .map_err(|err| ApiError::internal(format!("compress: {err}")))
    }
}

/// The `session.upload` audit event of a completed recording.
pub fn upload_event(r: &RecordingRecord) -> AuditEvent {
    AuditEvent::SessionEvent {
        event: turnstile_recording::event::SESSION_UPLOAD.into(),
        sid: r.sid.clone(),
        server_id: r.server_id.clone(),
        user: r.user.clone(),
        login: r.login.clone(),
        fields: serde_json::json!({"url": r.url})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    }
}
