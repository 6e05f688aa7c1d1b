//! Recordings on auth: the index at `recordings/<sid>` (in-progress uploads
//! and their stored parts live there too, so any auth server can resume or
//! complete one; staged chunks are listed from the store), storing parts,
//! completing uploads (the upload completer's work too), continuations, and
//! reading a recording's objects as one byte stream. The stream from a
//! recorder is received in `recording_stream.rs`.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use turnstile_api::audit::AuditEvent;
use turnstile_api::clock::Clock;
use turnstile_api::error::ApiError;
use turnstile_api::metrics::{METRICS, StoreErrorKind};
use turnstile_api::rpc::proto::RecordingInfo;
use turnstile_recording::part::{HEADER_LEN, part_from_payload};
use turnstile_recording::storage::{Part, StagedChunk, Upload, UploadStore, check_id};

use crate::backend::Backend;
use crate::backend::typed::{self, Change, Stored};

pub const STATUS_RECORDING: &str = "recording";
pub const STATUS_COMPLETE: &str = "complete";
/// States users read (`RecordingRecord::state`), besides `complete`.
pub const STATE_LIVE: &str = "live";
pub const STATE_UPLOADING: &str = "uploading";
pub const STATE_FAILED: &str = "failed";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPart {
    pub number: u32,
    pub size: u64,
    pub last_ei: u64,
    /// The store's id of the part (ETag, block id), needed to complete.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
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
    /// Size of the completed recording (all its objects).
    #[serde(default)]
    pub size: u64,
    /// Sizes of its completed objects: `<sid>.rec`, then the continuations
    /// `<sid>.1.rec`, `<sid>.2.rec`, … (see docs/recording-format.md).
    #[serde(default)]
    pub objects: Vec<u64>,
    pub status: String,
    /// The upload in progress, if any.
    #[serde(default)]
    pub upload: Option<Upload>,
    #[serde(default)]
    pub parts: Vec<StoredPart>,
    pub next_part: u32,
    /// The last event index stored in a part; -1: none. (Events staged
    /// since are durable too; the store lists them.)
    pub last_ei: i64,
    /// When the recorder was last heard from.
    pub last_seen_ms: i64,
    #[serde(default)]
    pub url: String,
    /// When the session ended (its `session.end` reached auth); 0: not yet.
    #[serde(default)]
    pub ended_ms: i64,
    /// Why the recorder could not record the session (all of it), if it could not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub failed: String,
    /// The auth server completing the upload, while it does: no other
    /// completes it meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completing: Option<CompletionClaim>,
}

/// One auth server's hold on completing an upload, until `until_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionClaim {
    pub by: String,
    pub until_ms: i64,
}

/// How long a claim on completing an upload holds if its auth server dies
/// while completing.
const COMPLETION_CLAIM_MS: i64 = 5 * 60 * 1000;

/// What [`Recordings::complete_open`] did.
#[derive(Debug)]
pub enum Completion {
    /// Completed now, by this auth server.
    Done(RecordingRecord),
    /// It had no upload in progress.
    AlreadyComplete(RecordingRecord),
    /// Another auth server is completing it.
    ClaimedElsewhere,
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
            size: self.size + self.parts.iter().map(|p| p.size).sum::<u64>(),
            status: self.state().to_string(),
            parts: u32::try_from(self.parts.len()).unwrap_or(u32::MAX),
            url: self.url.clone(),
            failure: self.failed.clone(),
        }
    }

    /// How the recording stands, as users read it: `failed` (the recorder
    /// could not record all of the session; what was stored can still be
    /// played once complete), `complete`, `uploading` (the session ended, its
    /// events are still on their way) or `live`.
    pub fn state(&self) -> &'static str {
        if !self.failed.is_empty() {
            STATE_FAILED
        } else if self.status == STATUS_COMPLETE {
            STATUS_COMPLETE
        } else if self.ended_ms > 0 {
            STATE_UPLOADING
        } else {
            STATE_LIVE
        }
    }

    /// Whether `upload` is the one in progress (not completed, not replaced).
    pub(crate) fn uploads_to(&self, upload: &Upload) -> bool {
        self.upload.as_ref().is_some_and(|u| u.id == upload.id)
    }

    /// The parts of the upload in progress, as the store completes them.
    fn upload_parts(&self) -> Vec<Part> {
        self.parts
            .iter()
            .map(|p| Part {
                number: p.number,
                size: p.size,
                id: p.id.clone(),
            })
            .collect()
    }

    /// Notes that the upload in progress became an object of `size` bytes
    /// (none if it had no parts).
    fn push_object(&mut self, size: Option<u64>) {
        let mut objects = self.object_sizes();
        if let Some(size) = size {
            objects.push(size);
        }
        self.size = objects.iter().sum();
        self.objects = objects;
        self.upload = None;
        self.parts.clear();
    }

    /// Sizes of the completed objects (a recording indexed before
    /// continuations were objects of their own has one).
    pub fn object_sizes(&self) -> Vec<u64> {
        if self.objects.is_empty() && self.size > 0 {
            vec![self.size]
        } else {
            self.objects.clone()
        }
    }
}

/// Where byte `offset` of a recording read as one stream is: the object and
/// the offset within it, and how many bytes that object has from there.
pub fn locate(objects: &[u64], offset: u64) -> Option<(u32, u64, u64)> {
    let mut start = 0u64;
    for (n, size) in objects.iter().enumerate() {
        if offset < start + size {
            let within = offset - start;
            return Some((u32::try_from(n).ok()?, within, size - within));
        }
        start += size;
    }
    None
}

/// A writer's upload was completed (or replaced) under it.
fn completed_meanwhile(sid: &str) -> ApiError {
    ApiError::bad_parameter(format!("the upload of {sid} was completed meanwhile"))
}

fn key(sid: &str) -> String {
    format!("recordings/{sid}")
}

/// Uploads in progress each have a key of their own, so that the completer
/// reads only those, not the whole (never pruned) index. Written before the
/// index entry names the upload, deleted after the upload is completed: a
/// key without an upload behind it is only stale, never the reverse.
const UPLOADS: &str = "uploads/";

fn upload_key(sid: &str) -> String {
    format!("{UPLOADS}{sid}")
}

pub(crate) fn storage(e: turnstile_recording::storage::StorageError) -> ApiError {
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
    /// The recording store's failure being reported, if it is failing.
    failing: std::sync::Mutex<Option<String>>,
    /// Sessions with a recording stream open on this auth server (how many):
    /// the upload completer leaves them alone whatever the index says.
    streaming: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// This instance's name in completion claims.
    claimant: String,
    /// How often a live stream notes its recorder alive in the index: well
    /// within the completer's grace period, so that other auth servers never
    /// take a live upload for an abandoned one.
    touch_every: Duration,
}

/// A live stream noted alive at least this often.
const TOUCH_AT_MOST: Duration = Duration::from_secs(10);

/// Holds a session's place in [`Recordings`]' live streams while it lives.
#[derive(Debug)]
pub struct Streaming<'a> {
    recordings: &'a Recordings,
    sid: String,
}

impl Drop for Streaming<'_> {
    fn drop(&mut self) {
        let mut live = self
            .recordings
            .streaming
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = live.get_mut(&self.sid) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.sid);
            }
        }
    }
}

/// What kind of failure a store error is, for logging once per cause:
/// its text without the numbers (request ids, ports, sizes) that vary.
fn cause(e: &turnstile_recording::storage::StorageError) -> String {
    e.to_string()
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(160)
        .collect()
}

/// What a recorder's stream opened with.
pub use turnstile_api::rpc::proto::RecordOpen as Opening;

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
            failing: std::sync::Mutex::new(None),
            streaming: std::sync::Mutex::default(),
            claimant: uuid::Uuid::new_v4().to_string(),
            touch_every: TOUCH_AT_MOST,
        }
    }

    /// Live streams note themselves alive often enough for the completer's
    /// `grace` (a quarter of it, at most every 10 s).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.touch_every = (grace / 4).clamp(Duration::from_millis(100), TOUCH_AT_MOST);
        self
    }

    pub fn touch_every(&self) -> Duration {
        self.touch_every
    }

    /// Notes a stream of `sid` open here until the guard is dropped.
    pub fn streaming(&self, sid: &str) -> Streaming<'_> {
        *self
            .streaming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(sid.to_string())
            .or_default() += 1;
        Streaming {
            recordings: self,
            sid: sid.to_string(),
        }
    }

    fn is_streaming(&self, sid: &str) -> bool {
        self.streaming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(sid)
    }

    /// A store call's result, mapped to an API error; a failure is logged
    /// once per cause (not once per request) and the recovery once.
    pub fn observe<T>(
        &self,
        result: Result<T, turnstile_recording::storage::StorageError>,
    ) -> Result<T, ApiError> {
        use turnstile_recording::storage::StorageError as S;
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(v) => {
                if failing.take().is_some() {
                    tracing::info!("the recording store works again");
                }
                Ok(v)
            }
            // Not the store's failure: a caller's mistake, or a thing not there.
            Err(e @ (S::NotFound(_) | S::BadParameter(_))) => {
                METRICS.store_error(if matches!(e, S::NotFound(_)) {
                    StoreErrorKind::NotFound
                } else {
                    StoreErrorKind::BadParameter
                });
                Err(storage(e))
            }
            Err(e) => {
                METRICS.store_error(StoreErrorKind::Io);
                let now = cause(&e);
                if failing.as_deref() != Some(now.as_str()) {
                    tracing::error!(error = %e, "the recording store fails; nothing more is acknowledged until it works again (logged once per cause)");
                    *failing = Some(now);
                }
                Err(storage(e))
            }
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
        Ok(typed::get(self.backend.as_ref(), &key(sid))
            .await?
            .map(|stored| stored.value))
    }

    /// Read-modify-write of the index entry, exact under races.
    async fn update<T>(
        &self,
        sid: &str,
        mut change: impl FnMut(Option<RecordingRecord>) -> Result<(RecordingRecord, T), ApiError>,
    ) -> Result<T, ApiError> {
        typed::update(
            self.backend.as_ref(),
            &key(sid),
            |current: Option<&Stored<RecordingRecord>>| {
                let (next, out) = change(current.map(|c| c.value.clone()))?;
                Ok((Change::Put(next, None), out))
            },
        )
        .await
    }

    /// Creates or resumes the upload of a session for the recorder
    /// `server_id`: a new session, a resumed stream, or a continuation (the
    /// recorder came back after the upload was completed: a new object).
    /// Returns the index entry with its upload.
    pub async fn open(&self, server_id: &str, o: &Opening) -> Result<RecordingRecord, ApiError> {
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
        let fresh = match &existing {
            Some(r) if r.upload.is_some() => None,
            Some(r) => {
                let n = u32::try_from(r.object_sizes().len()).unwrap_or(u32::MAX);
                Some(self.observe(self.store.create_upload(&o.sid, n).await)?)
            }
            None => Some(self.observe(self.store.create_upload(&o.sid, 0).await)?),
        };
        if fresh.is_some() {
            self.backend
                .put(&upload_key(&o.sid), Vec::new(), None)
                .await?;
        }
        let now = self.now_ms();
        let url = self.store.url(&o.sid, 0);
        let record = self
            .update(&o.sid, |current| {
                let mut r = current.unwrap_or_else(|| RecordingRecord {
                    sid: o.sid.clone(),
                    user: o.user.clone(),
                    login: o.login.clone(),
                    node_name: o.node_name.clone(),
                    server_id: server_id.to_string(),
                    start_ms: o.start_ms,
                    stop_ms: 0,
                    size: 0,
                    objects: Vec::new(),
                    status: STATUS_RECORDING.into(),
                    upload: None,
                    parts: Vec::new(),
                    next_part: 1,
                    last_ei: -1,
                    last_seen_ms: now,
                    url: url.clone(),
                    ended_ms: 0,
                    failed: String::new(),
                    completing: None,
                });
                if r.upload.is_none() {
                    let Some(fresh) = fresh.clone() else {
                        return Err(ApiError::new(
                            turnstile_api::error::ErrorKind::Unavailable,
                            format!("the upload of {} changed meanwhile; try again", o.sid),
                        ));
                    };
                    r.objects = r.object_sizes();
                    r.upload = Some(fresh);
                    r.parts.clear();
                    r.next_part = 1;
                }
                r.status = STATUS_RECORDING.into();
                r.last_seen_ms = now;
                Ok((r.clone(), r))
            })
            .await?;
        // Another stream opened the session first: its upload is the one.
        if let Some(fresh) = fresh
            && !record.uploads_to(&fresh)
        {
            let _ = self.store.abort(&fresh).await;
        }
        Ok(record)
    }

    /// Notes that the session recorded by `server_id` ended (its
    /// `session.end` reached the audit log).
    pub async fn mark_ended(&self, server_id: &str, sid: &str) -> Result<(), ApiError> {
        let now = self.now_ms();
        self.update(sid, |r| {
            let mut r = r.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
            if r.server_id == server_id && r.ended_ms == 0 {
                r.ended_ms = now;
            }
            Ok((r, ()))
        })
        .await
    }

    /// Notes that the recorder could not record the session (a session
    /// refused at its start has no entry yet: it gets one, so auditors see it).
    pub async fn mark_failed(
        &self,
        server_id: &str,
        sid: &str,
        user: &str,
        login: &str,
        node_name: &str,
        reason: &str,
    ) -> Result<(), ApiError> {
        check_id("session id", sid).map_err(storage)?;
        let now = self.now_ms();
        self.update(sid, |current| {
            let mut r = current.unwrap_or_else(|| RecordingRecord {
                sid: sid.to_string(),
                user: user.to_string(),
                login: login.to_string(),
                node_name: node_name.to_string(),
                server_id: server_id.to_string(),
                start_ms: now,
                stop_ms: 0,
                size: 0,
                objects: Vec::new(),
                status: STATUS_COMPLETE.into(),
                upload: None,
                parts: Vec::new(),
                next_part: 1,
                last_ei: -1,
                last_seen_ms: now,
                url: String::new(),
                ended_ms: now,
                failed: String::new(),
                completing: None,
            });
            if r.server_id != server_id {
                return Err(ApiError::access_denied(format!(
                    "session {sid} was recorded by another server"
                )));
            }
            r.failed = reason.to_string();
            Ok((r, ()))
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

    /// Stores a part holding events up to `last_ei` in `upload`; returns
    /// the last event index stored in parts.
    pub async fn store_part(
        &self,
        sid: &str,
        upload: &mut Upload,
        bytes: Vec<u8>,
        last_ei: u64,
    ) -> Result<i64, ApiError> {
        // Reserve a part number first, so two writers never share one; an
        // object that holds the store's most parts is completed first and the
        // part goes to the next (a crash between two parts leaves it full).
        let max = self.store.max_parts();
        let number = loop {
            let reserved = self
                .update(sid, |r| {
                    let mut r = r.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
                    if !r.uploads_to(upload) {
                        return Err(completed_meanwhile(sid));
                    }
                    if u32::try_from(r.parts.len()).unwrap_or(u32::MAX) >= max {
                        return Ok((r, None));
                    }
                    let n = r.next_part;
                    r.next_part += 1;
                    Ok((r, Some(n)))
                })
                .await?;
            match reserved {
                Some(n) => break n,
                None => *upload = self.roll(sid, upload).await?,
            }
        };
        let stored = match self.observe(self.store.upload_part(upload, number, bytes).await) {
            Ok(stored) => stored,
            Err(e) => {
                // Give the number back if nobody took the next one: stores that
                // number parts by position (S3) need them to run without a gap.
                let _ = self
                    .update(sid, |r| {
                        let mut r = r.ok_or_else(|| ApiError::not_found(sid.to_string()))?;
                        if r.next_part == number + 1 && r.uploads_to(upload) {
                            r.next_part = number;
                        }
                        Ok((r, ()))
                    })
                    .await;
                return Err(e);
            }
        };
        METRICS.parts_stored.inc();
        METRICS.part_bytes_stored.add(stored.size);
        let now = self.now_ms();
        self.update(sid, |r| {
            let mut r = r.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
            if !r.uploads_to(upload) {
                return Err(completed_meanwhile(sid));
            }
            r.parts.push(StoredPart {
                number: stored.number,
                size: stored.size,
                last_ei,
                id: stored.id.clone(),
            });
            r.last_ei = r.last_ei.max(last_ei as i64);
            r.last_seen_ms = now;
            let last = r.last_ei;
            Ok((r, last))
        })
        .await
    }

    /// The staged chunks of an upload that hold events after `after`, in
    /// order, each with its payload (zstd frames); stops at a gap.
    pub async fn staged_after(
        &self,
        upload: &Upload,
        after: i64,
    ) -> Result<Vec<(StagedChunk, Vec<u8>)>, ApiError> {
        let mut out = Vec::new();
        let mut durable = after;
        for chunk in self.observe(self.store.list_staged(upload).await)? {
            if chunk.last_ei as i64 <= durable {
                continue;
            }
            if chunk.first_ei as i64 > durable + 1 {
                tracing::warn!(sid = %upload.sid, chunk = %chunk.name, after = durable, "a staged chunk does not follow the events before it; left out");
                break;
            }
            let bytes = self.observe(self.store.read_staged(upload, &chunk).await)?;
            let payload = chunk_payload(&bytes).ok_or_else(|| {
                ApiError::internal(format!(
                    "staged chunk {} of {} is damaged",
                    chunk.name, upload.sid
                ))
            })?;
            durable = chunk.last_ei as i64;
            out.push((chunk, payload));
        }
        Ok(out)
    }

    /// Joins the stored parts, and any staged chunks after them, into the
    /// upload's object; returns the index entry. Safe to repeat.
    pub async fn complete(
        &self,
        sid: &str,
        stop_ms: Option<i64>,
    ) -> Result<RecordingRecord, ApiError> {
        match self.complete_open(sid, stop_ms).await? {
            Completion::Done(r) | Completion::AlreadyComplete(r) => Ok(r),
            Completion::ClaimedElsewhere => Err(ApiError::new(
                turnstile_api::error::ErrorKind::Unavailable,
                format!(
                    "the recording of {sid} is being completed by another auth server; try again"
                ),
            )),
        }
    }

    /// Completes the upload in progress, if any, once it holds the claim on
    /// it: of several auth servers completing one upload at once, one does
    /// the work.
    pub async fn complete_open(
        &self,
        sid: &str,
        stop_ms: Option<i64>,
    ) -> Result<Completion, ApiError> {
        let now = self.now_ms();
        let claimed = self
            .update(sid, |current| {
                let mut r =
                    current.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
                if r.upload.is_none() {
                    return Ok((r.clone(), Completion::AlreadyComplete(r)));
                }
                if r.completing
                    .as_ref()
                    .is_some_and(|c| c.until_ms > now && c.by != self.claimant)
                {
                    return Ok((r, Completion::ClaimedElsewhere));
                }
                r.completing = Some(CompletionClaim {
                    by: self.claimant.clone(),
                    until_ms: now.saturating_add(COMPLETION_CLAIM_MS),
                });
                Ok((r.clone(), Completion::Done(r)))
            })
            .await?;
        let r = match claimed {
            Completion::Done(r) => r,
            Completion::AlreadyComplete(r) => {
                self.forget_upload(sid).await;
                return Ok(Completion::AlreadyComplete(r));
            }
            other => return Ok(other),
        };
        let Some(upload) = r.upload.clone() else {
            return Ok(Completion::AlreadyComplete(r));
        };
        // Events staged but never packed into a part (the stream broke)
        // become the last part (of the next object if this one is full).
        let mut upload = upload;
        let staged = self.staged_after(&upload, r.last_ei).await?;
        if let Some((last, _)) = staged.last() {
            let last_ei = last.last_ei;
            let bytes = part_from_payload(staged.iter().map(|(_, p)| p.as_slice()), 0);
            self.store_part(sid, &mut upload, bytes, last_ei).await?;
        }
        let Some(r) = self.get(sid).await? else {
            return Err(ApiError::not_found(format!("recording {sid}")));
        };
        let parts = r.upload_parts();
        let size = if parts.is_empty() {
            self.observe(self.store.abort(&upload).await)?;
            None
        } else {
            Some(self.observe(self.store.complete(&upload, &parts).await)?)
        };
        let done = self
            .update(sid, |current| {
                let mut r =
                    current.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
                if !r.uploads_to(&upload) {
                    // Completed by someone else meanwhile.
                    return Ok((r.clone(), r));
                }
                r.push_object(size);
                r.status = STATUS_COMPLETE.into();
                r.completing = None;
                if let Some(stop) = stop_ms {
                    r.stop_ms = stop;
                }
                Ok((r.clone(), r))
            })
            .await?;
        self.forget_upload(sid).await;
        Ok(Completion::Done(done))
    }

    /// Deletes the upload key of a recording that has no upload in progress.
    async fn forget_upload(&self, sid: &str) {
        match self.backend.delete(&upload_key(sid)).await {
            Ok(()) | Err(crate::backend::BackendError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(%sid, error = %e, "cannot delete the key of a completed upload")
            }
        }
    }

    /// Gives every upload in progress its key: for an index written before
    /// uploads had keys. Run once, at the completer's start.
    pub async fn index_uploads(&self) -> Result<usize, ApiError> {
        let mut added = 0;
        for r in self.list().await? {
            if r.upload.is_some() {
                match self
                    .backend
                    .create(&upload_key(&r.sid), Vec::new(), None)
                    .await
                {
                    Ok(_) => added += 1,
                    Err(crate::backend::BackendError::AlreadyExists(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(added)
    }

    /// Completes the upload of a recording whose object holds the store's
    /// most parts, and opens the next object's: the recording goes on there
    /// (a continuation, read as one with the objects before it).
    pub async fn roll(&self, sid: &str, upload: &Upload) -> Result<Upload, ApiError> {
        let Some(r) = self.get(sid).await? else {
            return Err(ApiError::not_found(format!("recording {sid}")));
        };
        if !r.uploads_to(upload) {
            return Err(completed_meanwhile(sid));
        }
        let size = self.observe(self.store.complete(upload, &r.upload_parts()).await)?;
        let object = u32::try_from(r.object_sizes().len() + 1).unwrap_or(u32::MAX);
        let next = self.observe(self.store.create_upload(sid, object).await)?;
        let rolled = self
            .update(sid, |current| {
                let mut r =
                    current.ok_or_else(|| ApiError::not_found(format!("recording {sid}")))?;
                if !r.uploads_to(upload) {
                    return Err(completed_meanwhile(sid));
                }
                r.push_object(Some(size));
                r.upload = Some(next.clone());
                r.next_part = 1;
                Ok((r, ()))
            })
            .await;
        if rolled.is_err() {
            let _ = self.store.abort(&next).await;
        }
        rolled.map(|()| next)
    }

    /// `len` bytes (at most, and never past one object) from byte `offset`
    /// of a completed recording read as one stream; and its total size.
    pub async fn read(
        &self,
        r: &RecordingRecord,
        offset: u64,
        len: usize,
    ) -> Result<(Vec<u8>, u64), ApiError> {
        let objects = r.object_sizes();
        let total = objects.iter().sum();
        let Some((n, within, left)) = locate(&objects, offset) else {
            return Ok((Vec::new(), total));
        };
        let len = len.min(usize::try_from(left).unwrap_or(usize::MAX));
        let data = self.observe(self.store.read(&r.sid, n, within, len).await)?;
        Ok((data, total))
    }

    /// Uploads whose recorder has not been heard from for `grace`.
    pub async fn abandoned(&self, grace: Duration) -> Result<Vec<RecordingRecord>, ApiError> {
        let cutoff = self.now_ms() - i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for item in self.backend.range(UPLOADS).await? {
            let sid = item.key.trim_start_matches(UPLOADS);
            match self.get(sid).await? {
                Some(r) if r.upload.is_some() => {
                    if r.last_seen_ms < cutoff && !self.is_streaming(sid) {
                        out.push(r);
                    }
                }
                // Completed (its key outlived it): stale.
                _ => self.forget_upload(sid).await,
            }
        }
        Ok(out)
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

/// The payload (zstd frames) of an unpadded part, as staged chunks are.
fn chunk_payload(bytes: &[u8]) -> Option<Vec<u8>> {
    let header = bytes.get(..HEADER_LEN)?;
    if header[..8] != turnstile_recording::part::MAGIC {
        return None;
    }
    let len = usize::try_from(u64::from_be_bytes(header[16..24].try_into().ok()?)).ok()?;
    bytes
        .get(HEADER_LEN..HEADER_LEN.checked_add(len)?)
        .map(<[u8]>::to_vec)
}

/// May a user with `roles` list every user's recordings (a role rule
/// allowing `session` `list`)? Without it, only their own.
pub fn may_list_all(roles: &turnstile_api::role::RoleSet) -> bool {
    roles.allows_rule("session", "list")
}

/// May `user` with `roles` read this recording: their own, or anyone's with
/// a role rule allowing `session` `read`.
pub fn may_read(
    rec: &RecordingRecord,
    user: &str,
    roles: &turnstile_api::role::RoleSet,
) -> Result<(), ApiError> {
    if rec.user == user || roles.allows_rule("session", "read") {
        return Ok(());
    }
    Err(ApiError::access_denied(format!(
        "session {} belongs to user {:?}; reading others' sessions needs a role rule allowing session read",
        rec.sid, rec.user
    )))
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
