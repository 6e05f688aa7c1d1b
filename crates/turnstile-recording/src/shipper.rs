//! Ships sessions' events to auth: one bidirectional `RecordSession` stream
//! per session, while the session runs and after it ends. Events are
//! compressed here into frames, once; auth acknowledges the last event it
//! stored durably, and frames are kept until then. After a reconnect (to the
//! same or another auth server) the stream resumes the same upload and
//! resends what was not acknowledged.
//!
//! A live session's events come from its [`Backlog`] in memory; the spool
//! file is read only for what spilled out of memory, and for sessions of an
//! earlier run of the process (shipped at start, a limited number at once).
//! A spool file that cannot be read is quarantined, once. In sync modes a
//! stream that cannot be kept up fails the recording (the session ends):
//! when no acknowledgement came for `sync_ack_timeout` while events waited.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use turnstile_api::auth_channel::AuthChannel;
use turnstile_api::rpc::AuthClient;
use turnstile_api::rpc::proto::{
    RecordComplete, RecordFrames, RecordOpen, RecordRequest, RecordStatus, record_request,
};

use crate::backlog::{Backlog, Taken};
use crate::event::SESSION_START;
use crate::part::{Frame, encode_record};
use crate::spool::{Spool, SpoolError};

/// Spooled sessions of an earlier run shipped at once.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// The most record bytes in one frame.
const FRAME_RAW: usize = 1 << 20;
/// The most spool bytes read at once.
const READ_CHUNK: usize = 4 * 1024 * 1024;
/// Frames of a spool file sent and not yet acknowledged, at most.
const SPOOL_IN_FLIGHT: usize = 16 << 20;
/// An idle stream still tells auth its recorder is alive this often.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// What opens the stream: whose session, where, since when.
pub type Opening = RecordOpen;

/// The rules of a sync-mode stream: fail rather than fall behind.
pub struct SyncRules {
    pub ack_timeout: Duration,
    /// Called once when the stream cannot be kept up.
    pub on_failure: Box<dyn Fn(String) + Send + Sync>,
}

impl std::fmt::Debug for SyncRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncRules")
            .field("ack_timeout", &self.ack_timeout)
            .finish()
    }
}

/// Where a shipped session's events are.
#[derive(Debug)]
pub enum Source {
    /// A session being recorded now; `spooled`: its events are in the spool
    /// too (async modes), where the stream reads what spilled from memory.
    Live {
        opening: Opening,
        backlog: Arc<Backlog>,
        spooled: bool,
        sync: Option<SyncRules>,
    },
    /// A session of an earlier run, in the spool only.
    Spooled,
}

#[derive(Debug)]
enum ShipError {
    /// The spool file cannot be read, or auth refuses the recording: retrying
    /// will not help.
    Corrupt(String),
    Transient(String),
    /// Sync mode: no acknowledgement in time.
    TimedOut(String),
}

impl From<SpoolError> for ShipError {
    fn from(e: SpoolError) -> Self {
        match e {
            SpoolError::Corrupt { .. } => ShipError::Corrupt(e.to_string()),
            SpoolError::Io { .. } => ShipError::Transient(e.to_string()),
        }
    }
}

impl From<tonic::Status> for ShipError {
    fn from(s: tonic::Status) -> Self {
        if matches!(
            s.code(),
            tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
        ) {
            ShipError::Corrupt(format!("auth refused the recording: {}", s.message()))
        } else {
            ShipError::Transient(format!("auth: {}", s.message()))
        }
    }
}

/// Ships every session of one recorder (node or proxy).
#[derive(Debug)]
pub struct Shipper {
    spool: Spool,
    client: AuthClient<AuthChannel>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    running: Mutex<HashSet<String>>,
    quarantined: AtomicU64,
    tasks: TaskTracker,
}

/// One stream's progress, kept across reconnects.
struct Progress {
    /// Frames sent (or cut) and not yet acknowledged, in order.
    unacked: VecDeque<Frame>,
    /// The last event auth has durably, -1: none.
    acked: i64,
    /// Reading the spool file from this byte (what spilled, or a session
    /// of an earlier run); `None`: from memory.
    spool_at: Option<u64>,
    /// Events up to this index were taken from memory or the spool.
    taken_to: i64,
    /// Every event was taken.
    all_taken: bool,
    /// Since when events have waited for an acknowledgement.
    waiting_since: Option<Instant>,
}

impl Progress {
    /// Bytes of the frames not acknowledged, as memory holds them.
    fn in_flight(&self) -> usize {
        self.unacked.iter().map(|f| f.zstd.len()).sum()
    }
}

impl Shipper {
    /// Starts shipping what is already in the spool (sessions of an earlier
    /// run of this process).
    pub fn start(
        spool: Spool,
        client: AuthClient<AuthChannel>,
        concurrency: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let shipper = Arc::new(Self {
            spool,
            client,
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            shutdown,
            running: Mutex::new(HashSet::new()),
            quarantined: AtomicU64::new(0),
            tasks: TaskTracker::new(),
        });
        match shipper.spool.sessions() {
            Ok(sids) => {
                for sid in sids {
                    tracing::info!(%sid, "shipping a session spooled by an earlier run");
                    shipper.clone().spawn(sid, Source::Spooled);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot list the spool"),
        }
        shipper
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn client(&self) -> AuthClient<AuthChannel> {
        self.client.clone()
    }

    /// Spool files moved aside as unreadable since start.
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Waits (up to `grace`) for the streams under way to finish.
    pub async fn drain(&self, grace: Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(grace, self.tasks.wait()).await;
    }

    /// Ships a session.
    pub fn spawn(self: Arc<Self>, sid: String, source: Source) {
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if !running.insert(sid.clone()) {
                return;
            }
        }
        let tasks = self.tasks.clone();
        tasks.spawn(async move {
            // Live sessions stream at once; a restart's backlog takes turns.
            let _slot = match source {
                Source::Spooled => match self.slots.clone().acquire_owned().await {
                    Ok(slot) => Some(slot),
                    Err(_) => return,
                },
                Source::Live { .. } => None,
            };
            self.ship(&sid, source).await;
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&sid);
        });
    }

    async fn ship(&self, sid: &str, source: Source) {
        let spooled = matches!(source, Source::Spooled | Source::Live { spooled: true, .. });
        let mut progress = Progress {
            unacked: VecDeque::new(),
            acked: -1,
            spool_at: matches!(source, Source::Spooled).then_some(0),
            taken_to: -1,
            all_taken: false,
            waiting_since: None,
        };
        let mut backoff = Duration::from_millis(200);
        let mut warned = false;
        loop {
            let result = self.stream_once(sid, &source, &mut progress).await;
            let (sync, backlog) = match &source {
                Source::Live { sync, backlog, .. } => (sync.as_ref(), Some(backlog)),
                Source::Spooled => (None, None),
            };
            let fail_sync = |reason: String| {
                if let (Some(rules), Some(b)) = (sync, backlog) {
                    tracing::warn!(%sid, %reason, "the session's recording cannot be streamed");
                    (rules.on_failure)(reason.clone());
                    b.fail(&reason);
                }
            };
            match result {
                Ok(()) => {
                    if spooled && let Err(e) = self.spool.remove(sid) {
                        tracing::warn!(%sid, error = %e, "recording stored, but the spool file stays");
                    }
                    tracing::info!(%sid, "recording uploaded");
                    return;
                }
                Err(ShipError::TimedOut(reason)) => {
                    fail_sync(reason);
                    return;
                }
                Err(ShipError::Corrupt(reason)) if spooled => {
                    self.quarantined.fetch_add(1, Ordering::Relaxed);
                    match self.spool.quarantine(sid, &reason) {
                        Ok(path) => {
                            tracing::error!(%sid, %reason, moved_to = %path.display(), "spooled recording cannot be read; moved aside")
                        }
                        Err(e) => {
                            tracing::error!(%sid, %reason, error = %e, "spooled recording cannot be read, nor moved aside")
                        }
                    }
                    if let Some(b) = backlog {
                        b.fail(&reason);
                    }
                    return;
                }
                Err(ShipError::Corrupt(reason)) => {
                    fail_sync(reason);
                    return;
                }
                Err(ShipError::Transient(reason)) => {
                    if backlog.is_some_and(|b| b.failed().is_some()) {
                        return;
                    }
                    if !warned {
                        tracing::warn!(%sid, %reason, "cannot ship the recording to auth; retrying");
                        warned = true;
                    }
                    if sync.is_some() {
                        // What waits in memory counts as waiting for auth.
                        let _ = self.cut(sid, &source, &mut progress).await;
                    }
                    // Sync mode: wait for auth no longer than the timeout.
                    let deadline = match (sync, progress.waiting_since) {
                        (Some(rules), Some(since)) => Some(since + rules.ack_timeout),
                        _ => None,
                    };
                    let retry = Instant::now() + backoff;
                    let wake = deadline.map_or(retry, |d| d.min(retry));
                    tokio::select! {
                        _ = self.shutdown.cancelled(), if sync.is_none() => return,
                        _ = tokio::time::sleep_until(wake) => {}
                    }
                    if let (Some(rules), Some(d)) = (sync, deadline)
                        && Instant::now() >= d
                    {
                        fail_sync(format!(
                            "auth has acknowledged nothing for {} ({reason})",
                            humantime::format_duration(rules.ack_timeout)
                        ));
                        return;
                    }
                    let cap = if sync.is_some() { 2 } else { 30 };
                    backoff = (backoff * 2).min(Duration::from_secs(cap));
                }
            }
        }
    }

    /// The next records of the spool file after `offset`, off the runtime.
    async fn read_spool(
        &self,
        sid: &str,
        offset: u64,
    ) -> Result<(Vec<crate::event::RecordingEvent>, u64), ShipError> {
        let (spool, sid) = (self.spool.clone(), sid.to_string());
        tokio::task::spawn_blocking(move || spool.read_from(&sid, offset, READ_CHUNK))
            .await
            .map_err(|e| ShipError::Transient(format!("reading the spool: {e}")))?
            .map_err(ShipError::from)
    }

    /// What opens the stream of a spooled session: its first event.
    async fn spooled_opening(&self, sid: &str) -> Result<Option<Opening>, ShipError> {
        let (events, _) = self.read_spool(sid, 0).await?;
        let Some(start) = events.into_iter().next() else {
            return Ok(None);
        };
        if start.event != SESSION_START {
            return Err(ShipError::Corrupt(format!(
                "the spool of {sid} does not begin with session.start"
            )));
        }
        Ok(Some(Opening {
            sid: sid.to_string(),
            user: start.user,
            login: start.login,
            node_name: start.node_name,
            start_ms: start.time_ms,
        }))
    }

    /// Cuts the next frames from memory or the spool into `progress`.
    /// Returns whether anything new was cut.
    async fn cut(
        &self,
        sid: &str,
        source: &Source,
        progress: &mut Progress,
    ) -> Result<bool, ShipError> {
        let mut cut_any = false;
        if progress.all_taken {
            return Ok(false);
        }
        if progress.spool_at.is_none()
            && let Source::Live { backlog, .. } = source
        {
            loop {
                match backlog.take(FRAME_RAW) {
                    Taken::Records {
                        first_ei,
                        last_ei,
                        records,
                    } => {
                        let raw = records.iter().map(Vec::len).sum();
                        let frame = compress(first_ei, last_ei, records).await?;
                        backlog.framed(raw, frame.zstd.len());
                        progress.taken_to = last_ei as i64;
                        self.queue(progress, frame);
                        cut_any = true;
                    }
                    Taken::Empty => return Ok(cut_any),
                    Taken::Ended => {
                        progress.all_taken = true;
                        return Ok(cut_any);
                    }
                    Taken::Spilled { ei, offset } => {
                        progress.spool_at = Some(offset);
                        progress.taken_to = progress.taken_to.max(ei as i64 - 1);
                        break;
                    }
                }
            }
        }
        let Some(offset) = progress.spool_at else {
            return Ok(cut_any);
        };
        if progress.in_flight() >= SPOOL_IN_FLIGHT {
            return Ok(cut_any);
        }
        let ended = match source {
            Source::Live { backlog, .. } => backlog.ended(),
            Source::Spooled => true,
        };
        let (events, next) = self.read_spool(sid, offset).await?;
        progress.spool_at = Some(next);
        let mut records = Vec::new();
        let mut first = None;
        let mut last = 0;
        for e in events {
            if (e.ei as i64) <= progress.taken_to.max(progress.acked) {
                continue;
            }
            first.get_or_insert(e.ei);
            last = e.ei;
            encode_record(&e, &mut records);
            if records.len() >= FRAME_RAW {
                let frame = compress(
                    first.take().unwrap_or(last),
                    last,
                    vec![std::mem::take(&mut records)],
                )
                .await?;
                progress.taken_to = last as i64;
                self.queue(progress, frame);
                cut_any = true;
            }
        }
        if let Some(first) = first {
            let frame = compress(first, last, vec![records]).await?;
            progress.taken_to = last as i64;
            self.queue(progress, frame);
            cut_any = true;
        }
        if next == offset && ended {
            progress.all_taken = true;
        }
        Ok(cut_any)
    }

    fn queue(&self, progress: &mut Progress, frame: Frame) {
        if progress.unacked.is_empty() {
            progress.waiting_since.get_or_insert_with(Instant::now);
        }
        progress.unacked.push_back(frame);
    }

    /// Takes an acknowledgement: frames auth has are let go.
    fn acknowledged(&self, source: &Source, progress: &mut Progress, last_ei: i64) {
        if last_ei <= progress.acked {
            return;
        }
        progress.acked = last_ei;
        let mut freed = 0usize;
        while progress
            .unacked
            .front()
            .is_some_and(|f| f.last_ei as i64 <= last_ei)
        {
            if let Some(f) = progress.unacked.pop_front() {
                freed += f.zstd.len();
            }
        }
        progress.waiting_since = if progress.unacked.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        if let Source::Live { backlog, .. } = source
            && freed > 0
        {
            backlog.release(freed);
        }
    }

    /// One stream: open or resume, send what auth lacks, complete once every
    /// event is sent. Ok means auth confirmed the whole recording.
    async fn stream_once(
        &self,
        sid: &str,
        source: &Source,
        progress: &mut Progress,
    ) -> Result<(), ShipError> {
        let (opening, backlog, sync) = match source {
            Source::Live {
                opening,
                backlog,
                sync,
                ..
            } => (opening.clone(), Some(backlog.clone()), sync.as_ref()),
            Source::Spooled => match self.spooled_opening(sid).await? {
                Some(o) => (o, None, None),
                // An empty file: nothing was recorded.
                None => return Ok(()),
            },
        };
        let (tx, rx) = mpsc::channel::<RecordRequest>(8);
        let send = |r: record_request::Request| {
            let tx = tx.clone();
            async move {
                tx.send(RecordRequest { request: Some(r) })
                    .await
                    .map_err(|_| ShipError::Transient("the stream to auth closed".into()))
            }
        };
        send(record_request::Request::Open(opening)).await?;
        let mut client = self.client.clone();
        let response = tokio::select! {
            r = client.record_session(ReceiverStream::new(rx)) => r?,
            _ = watchdog(sync, progress.waiting_since) => return Err(timed_out(sync)),
        };
        let mut inbound = response.into_inner();
        let _open =
            turnstile_api::metrics::GaugeGuard::hold(&turnstile_api::metrics::METRICS.streams_open);
        let first: RecordStatus = tokio::select! {
            m = inbound.message() => m?.ok_or_else(|| ShipError::Transient("auth closed the stream".into()))?,
            _ = watchdog(sync, progress.waiting_since) => return Err(timed_out(sync)),
        };
        if let Some(b) = &backlog {
            b.set_opened();
        }
        if first.last_ei < progress.acked {
            // Auth has less than it acknowledged before: only the spool can
            // still have what is missing.
            if backlog.is_none() || matches!(source, Source::Live { spooled: true, .. }) {
                if let Some(b) = &backlog {
                    b.release(progress.in_flight());
                }
                progress.unacked.clear();
                progress.spool_at = Some(0);
                progress.taken_to = first.last_ei;
                progress.acked = first.last_ei;
                progress.all_taken = false;
            } else {
                return Err(ShipError::Corrupt(format!(
                    "auth lost acknowledged events of {sid} (it has up to {}, had {})",
                    first.last_ei, progress.acked
                )));
            }
        }
        self.acknowledged(source, progress, first.last_ei);
        // Resend what was not acknowledged.
        let resend: Vec<_> = progress.unacked.iter().cloned().collect();
        for frame in resend {
            send(record_request::Request::Frames(RecordFrames {
                frames: vec![frame.into_proto()],
                flush: false,
            }))
            .await?;
        }
        let mut sent = progress.unacked.len();
        let mut complete_sent = false;
        let mut last_sent_at = Instant::now();
        loop {
            // Send what is cut and new.
            self.cut(sid, source, progress).await?;
            while sent < progress.unacked.len() {
                let frame = progress.unacked[sent].clone();
                sent += 1;
                // Short of room: ask auth to store at once rather than wait.
                let flush = sent == progress.unacked.len()
                    && match &backlog {
                        Some(b) if progress.spool_at.is_none() => b.pressed(),
                        _ => progress.in_flight() >= SPOOL_IN_FLIGHT / 2,
                    };
                send(record_request::Request::Frames(RecordFrames {
                    frames: vec![frame.into_proto()],
                    flush,
                }))
                .await?;
                last_sent_at = Instant::now();
            }
            if progress.all_taken && !complete_sent {
                send(record_request::Request::Complete(RecordComplete {})).await?;
                complete_sent = true;
            }
            if last_sent_at.elapsed() >= KEEPALIVE {
                send(record_request::Request::Frames(RecordFrames {
                    frames: Vec::new(),
                    flush: false,
                }))
                .await?;
                last_sent_at = Instant::now();
            }
            let more_spool = progress.spool_at.is_some()
                && !progress.all_taken
                && progress.in_flight() < SPOOL_IN_FLIGHT;
            let wake = async {
                if complete_sent {
                    return std::future::pending::<()>().await;
                }
                match &backlog {
                    Some(b) if progress.spool_at.is_none() => b.more().await,
                    Some(b) => {
                        // Reading a live spool: its end grows every sync.
                        tokio::select! {
                            _ = b.more() => {}
                            _ = tokio::time::sleep(Duration::from_millis(if more_spool { 0 } else { 250 })) => {}
                        }
                    }
                    None if more_spool => {}
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                msg = inbound.message() => {
                    let status = msg?.ok_or_else(|| ShipError::Transient("auth closed the stream".into()))?;
                    let before = progress.unacked.len();
                    self.acknowledged(source, progress, status.last_ei);
                    sent = sent.saturating_sub(before - progress.unacked.len());
                    if status.complete {
                        return Ok(());
                    }
                }
                _ = wake => {}
                _ = tokio::time::sleep(KEEPALIVE) => {}
                _ = watchdog(sync, progress.waiting_since) => return Err(timed_out(sync)),
                _ = self.shutdown.cancelled(), if sync.is_none() => {
                    return Err(ShipError::Transient("shutting down".into()));
                }
            }
            if let Some(b) = &backlog
                && let Some(reason) = b.failed()
            {
                return Err(ShipError::Transient(format!(
                    "the recording failed: {reason}"
                )));
            }
        }
    }
}

/// Resolves when a sync stream has waited too long for an acknowledgement.
async fn watchdog(sync: Option<&SyncRules>, waiting_since: Option<Instant>) {
    match (sync, waiting_since) {
        (Some(rules), Some(since)) => tokio::time::sleep_until(since + rules.ack_timeout).await,
        _ => std::future::pending().await,
    }
}

fn timed_out(sync: Option<&SyncRules>) -> ShipError {
    let timeout = sync.map_or(Duration::ZERO, |r| r.ack_timeout);
    ShipError::TimedOut(format!(
        "auth has acknowledged nothing for {}",
        humantime::format_duration(timeout)
    ))
}

/// Compresses records into a frame, off the async workers when it is big.
async fn compress(first_ei: u64, last_ei: u64, records: Vec<Vec<u8>>) -> Result<Frame, ShipError> {
    let raw: usize = records.iter().map(Vec::len).sum();
    let frame = if raw >= 64 * 1024 {
        tokio::task::spawn_blocking(move || Frame::compress_records(first_ei, last_ei, &records))
            .await
            .map_err(|e| ShipError::Transient(format!("compressing: {e}")))?
    } else {
        Frame::compress_records(first_ei, last_ei, &records)
    };
    frame.map_err(|e| ShipError::Transient(format!("compressing: {e}")))
}
