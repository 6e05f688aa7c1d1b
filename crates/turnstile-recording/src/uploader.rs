//! Ships spooled sessions to auth: one bidirectional `RecordSession` stream
//! per session, while the session runs and after it ends, up to a limit of
//! sessions at once. Auth acknowledges the last event it stored after each
//! part; events stay in the spool until auth confirms the whole recording, and
//! after a reconnect (to the same or another auth server) the stream resumes
//! and resends what was not acknowledged. Spool files left by a crash are
//! shipped at start; a file that cannot be read is quarantined, once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use turnstile_api::rpc::AuthClient;
use turnstile_api::rpc::proto::{
    RecordComplete, RecordEvents, RecordOpen, RecordRequest, record_request,
};

use crate::event::SESSION_START;
use crate::spool::{Checkpoint, Spool, SpoolError};

/// Sessions shipped at once.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// The most event bytes in one message to auth.
const BATCH_BYTES: usize = 256 * 1024;
/// The most spool bytes read at once: memory stays bounded however far
/// behind the uploader is.
const READ_CHUNK: usize = 4 * 1024 * 1024;
/// Reads per round before acknowledgements are taken.
const READS_PER_ROUND: usize = 4;
/// An idle stream still tells auth its recorder is alive this often.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// A live session's link to the uploader.
#[derive(Debug, Clone)]
pub struct LiveSession {
    synced: Arc<Notify>,
    ended: Arc<AtomicBool>,
}

impl LiveSession {
    /// Says the session ended and its last events are on disk.
    pub fn ended(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.synced.notify_waiters();
    }
}

#[derive(Debug)]
enum UploadError {
    Corrupt(String),
    Transient(String),
}

impl From<SpoolError> for UploadError {
    fn from(e: SpoolError) -> Self {
        match e {
            SpoolError::Corrupt { .. } => UploadError::Corrupt(e.to_string()),
            SpoolError::Io { .. } => UploadError::Transient(e.to_string()),
        }
    }
}

impl From<tonic::Status> for UploadError {
    fn from(s: tonic::Status) -> Self {
        if matches!(
            s.code(),
            tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
        ) {
            UploadError::Corrupt(format!("auth refused the recording: {}", s.message()))
        } else {
            UploadError::Transient(s.message().to_string())
        }
    }
}

#[derive(Debug)]
pub struct Uploader {
    spool: Spool,
    client: AuthClient<Channel>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    running: Mutex<HashMap<String, ()>>,
    quarantined: AtomicU64,
}

impl Uploader {
    /// Starts shipping what is already in the spool (sessions of an earlier
    /// run of this process).
    pub fn start(
        spool: Spool,
        client: AuthClient<Channel>,
        concurrency: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let uploader = Arc::new(Self {
            spool,
            client,
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            shutdown,
            running: Mutex::new(HashMap::new()),
            quarantined: AtomicU64::new(0),
        });
        match uploader.spool.sessions() {
            Ok(sids) => {
                for sid in sids {
                    tracing::info!(%sid, "shipping a session spooled by an earlier run");
                    uploader.clone().spawn(sid, None);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list the spool"),
        }
        uploader
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Spool files moved aside as unreadable since start.
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Starts shipping a session that is being recorded now.
    pub fn live(self: &Arc<Self>, sid: &str, synced: Arc<Notify>) -> LiveSession {
        let live = LiveSession {
            synced,
            ended: Arc::new(AtomicBool::new(false)),
        };
        self.clone().spawn(sid.to_string(), Some(live.clone()));
        live
    }

    fn spawn(self: Arc<Self>, sid: String, live: Option<LiveSession>) {
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if running.insert(sid.clone(), ()).is_some() {
                return;
            }
        }
        tokio::spawn(async move {
            let Ok(_slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            self.ship(&sid, live.as_ref()).await;
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&sid);
        });
    }

    async fn ship(&self, sid: &str, live: Option<&LiveSession>) {
        let mut backoff = Duration::from_millis(500);
        let mut warned = false;
        loop {
            match self.stream_once(sid, live).await {
                Ok(()) => {
                    if let Err(e) = self.spool.remove(sid) {
                        tracing::warn!(%sid, error = %e, "recording stored, but the spool file stays");
                    }
                    tracing::info!(%sid, "recording uploaded");
                    return;
                }
                Err(UploadError::Corrupt(reason)) => {
                    self.quarantined.fetch_add(1, Ordering::Relaxed);
                    match self.spool.quarantine(sid, &reason) {
                        Ok(path) => {
                            tracing::error!(%sid, %reason, moved_to = %path.display(), "spooled recording cannot be read; moved aside")
                        }
                        Err(e) => {
                            tracing::error!(%sid, %reason, error = %e, "spooled recording cannot be read, nor moved aside")
                        }
                    }
                    return;
                }
                Err(UploadError::Transient(reason)) => {
                    if !warned {
                        tracing::warn!(%sid, %reason, "cannot ship the recording to auth; keeping it in the spool and retrying");
                        warned = true;
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// The next records of `sid` after `offset`, read off the async runtime.
    async fn read(
        &self,
        sid: &str,
        offset: u64,
    ) -> Result<(Vec<crate::event::RecordingEvent>, u64), UploadError> {
        let (spool, sid) = (self.spool.clone(), sid.to_string());
        tokio::task::spawn_blocking(move || spool.read_from(&sid, offset, READ_CHUNK))
            .await
            .map_err(|e| UploadError::Transient(format!("reading the spool: {e}")))?
            .map_err(UploadError::from)
    }

    /// One stream: open or resume, send what auth lacks, complete once the
    /// session has ended. Ok means auth confirmed the whole recording.
    async fn stream_once(&self, sid: &str, live: Option<&LiveSession>) -> Result<(), UploadError> {
        // The first event says whose session it is; wait for it if need be.
        let start = loop {
            let (events, _) = self.read(sid, 0).await?;
            if let Some(first) = events.into_iter().next() {
                break first;
            }
            match live {
                Some(l) if !l.ended.load(Ordering::SeqCst) => {
                    tokio::select! {
                        _ = l.synced.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
                _ => return Ok(()),
            }
        };
        if start.event != SESSION_START {
            return Err(UploadError::Corrupt(format!(
                "the spool of {sid} does not begin with session.start"
            )));
        }
        let (tx, rx) = mpsc::channel::<RecordRequest>(8);
        let send = |r: record_request::Request| {
            let tx = tx.clone();
            async move {
                tx.send(RecordRequest { request: Some(r) })
                    .await
                    .map_err(|_| UploadError::Transient("the stream to auth closed".into()))
            }
        };
        send(record_request::Request::Open(RecordOpen {
            sid: sid.to_string(),
            user: start.user.clone(),
            login: start.login.clone(),
            node_name: start.node_name.clone(),
            start_ms: start.time_ms,
        }))
        .await?;
        let mut inbound = self
            .client
            .clone()
            .record_session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| UploadError::Transient("auth closed the stream".into()))?;
        let mut acked = first.last_ei;
        self.spool
            .save_checkpoint(sid, &Checkpoint { acked_ei: acked })?;
        let mut sent = acked;
        let mut offset = 0u64;
        let mut complete_sent = false;
        // Spool left unread after a round: acknowledgements are taken
        // between rounds, so auth is never kept waiting on a full channel.
        let mut more = false;
        let mut last_sent_at = tokio::time::Instant::now();
        loop {
            if !complete_sent {
                let ended = live.is_none_or(|l| l.ended.load(Ordering::SeqCst));
                let mut batch = Vec::new();
                let mut bytes = 0;
                more = true;
                for _ in 0..READS_PER_ROUND {
                    let (events, next) = self.read(sid, offset).await?;
                    if next == offset {
                        more = false;
                        break;
                    }
                    offset = next;
                    let from = sent;
                    for e in events.into_iter().filter(|e| e.ei as i64 > from) {
                        sent = e.ei as i64;
                        bytes += e.data.len() + 64;
                        batch.push(e);
                        if bytes >= BATCH_BYTES {
                            send(record_request::Request::Events(RecordEvents {
                                events: std::mem::take(&mut batch),
                            }))
                            .await?;
                            bytes = 0;
                            last_sent_at = tokio::time::Instant::now();
                        }
                    }
                }
                if !batch.is_empty() || last_sent_at.elapsed() >= KEEPALIVE {
                    send(record_request::Request::Events(RecordEvents {
                        events: batch,
                    }))
                    .await?;
                    last_sent_at = tokio::time::Instant::now();
                }
                if ended && !more {
                    send(record_request::Request::Complete(RecordComplete {})).await?;
                    complete_sent = true;
                }
            }
            let wake = async {
                if more {
                    return;
                }
                match live {
                    Some(l) if !complete_sent => {
                        tokio::select! {
                            _ = l.synced.notified() => {}
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                    _ => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                msg = inbound.message() => {
                    let status = msg?.ok_or_else(|| UploadError::Transient("auth closed the stream".into()))?;
                    if status.last_ei > acked {
                        acked = status.last_ei;
                        self.spool.save_checkpoint(sid, &Checkpoint { acked_ei: acked })?;
                    }
                    if status.complete {
                        return Ok(());
                    }
                }
                _ = wake => {}
                _ = self.shutdown.cancelled() => {
                    return Err(UploadError::Transient("shutting down".into()));
                }
            }
        }
    }
}
