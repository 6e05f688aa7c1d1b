//! The one recording pipeline of node and proxy. A [`Recorder`] per process
//! begins a [`SessionRecording`] for each session channel (shell, exec or
//! subsystem) in the cluster's mode of the moment; the recording stamps its
//! events (`ei`, `ms`, `offset`), batches output into `print` events, sends
//! every event but output to the audit log, and hands them to its sink:
//!
//! - async modes (`node`, `proxy`): the spool on disk, synced every 500 ms,
//!   and, in memory, the session's stream to auth (the spool is not read back
//!   while the session is live unless memory overflowed);
//! - sync modes (`node-sync`, `proxy-sync`): the stream only, nothing on
//!   disk, at most a bounded number of unacknowledged bytes in memory; output
//!   waits when the bound is reached;
//! - `off`: nothing but the audit log.
//!
//! A recording that cannot be written never fails open: under the `strict`
//! policy the session ends (`session ended: its recording cannot be written:
//! …`), under `best_effort` it goes on unrecorded with a warning; either way an
//! audit event says so. The session learns of it through [`Outcome`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use turnstile_api::audit::AuditEvent;
use turnstile_api::auth_channel::AuthChannel;
use turnstile_api::metrics::METRICS;
use turnstile_api::recording::{ByteSize, RecordingMode, RecordingPolicy};
use turnstile_api::rpc::AuthClient;

use crate::backlog::{Backlog, ProcessBudget};
use crate::event::{
    self, EXEC, MAX_PRINT, PRINT, RESIZE, RecordingEvent, SESSION_DATA, SESSION_END, SESSION_START,
};
use crate::part::encode_record;
use crate::shipper::{Opening, Shipper, Source, SyncRules};
use crate::spool::{PendingSync, Spool, SpoolWriter};

/// How often spooled events are synced to disk (a crash loses at most this
/// much, and the output batched before it).
pub const SYNC_EVERY: Duration = Duration::from_millis(500);
/// Output is batched into `print` events of up to 64 KiB, for at most this long.
pub const BATCH_FOR: Duration = Duration::from_millis(50);

/// A session records at most one `resize` per this long: a flood of window
/// changes becomes a few events, and the last size sent is always recorded
/// (when the interval ends, and before the session's end).
pub const RESIZE_EVERY: Duration = Duration::from_millis(250);

/// Where audit events of recordings go (the process's forwarder to auth).
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    fn emit(&self, event: AuditEvent);
}

/// The bounds a recorder keeps.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// New recorded sessions are refused while the spool holds this much.
    pub spool_max_size: u64,
    /// Recorded sessions end when their spool's file system has less free.
    pub spool_min_free: u64,
    /// Unacknowledged bytes in memory per session.
    pub session_buffer: usize,
    /// Unacknowledged bytes in memory per process.
    pub process_buffer: usize,
    /// Sync modes: a session ends when auth acknowledges nothing for this long.
    pub sync_ack_timeout: Duration,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        Self {
            spool_max_size: 10 << 30,
            spool_min_free: 1 << 30,
            session_buffer: 4 << 20,
            process_buffer: 64 << 20,
            sync_ack_timeout: Duration::from_secs(30),
        }
    }
}

/// Who and where.
#[derive(Debug, Clone)]
pub struct SessionMeta {
    pub sid: String,
    pub server_id: String,
    pub user: String,
    pub login: String,
    pub node_name: String,
}

/// What the session channel runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKind {
    Shell,
    Exec(String),
    /// A subsystem (`sftp`): its bytes are counted, not recorded as output.
    Subsystem(String),
}

/// What a session starting needs recorded.
#[derive(Debug, Clone)]
pub struct SessionStart {
    pub meta: SessionMeta,
    pub kind: SessionKind,
    /// `(term, cols, rows)` of its terminal, if it has one.
    pub pty: Option<(String, u32, u32)>,
    pub mode: RecordingMode,
    pub policy: RecordingPolicy,
}

/// How a session's recording stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Recording,
    /// `best_effort`: the recording failed and the session goes on without it.
    Unrecorded(String),
    /// `strict`: the recording failed and the session must end.
    Ended(String),
}

impl Outcome {
    /// What the user reads on the terminal.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::Recording => None,
            Outcome::Unrecorded(reason) => {
                Some(format!("warning: this session is not recorded: {reason}"))
            }
            Outcome::Ended(reason) => Some(failure_message(reason)),
        }
    }
}

/// The text a user reads when a session ends for its recording.
pub fn failure_message(reason: &str) -> String {
    format!("session ended: its recording cannot be written: {reason}")
}

/// A process's recorder: its spool, its shipper, its memory budget.
#[derive(Debug)]
pub struct Recorder {
    shipper: Arc<Shipper>,
    config: RecorderConfig,
    budget: Arc<ProcessBudget>,
}

/// The event sink of a session.
#[derive(Debug)]
enum Sink {
    Off,
    Spool {
        spool: Spool,
        writer: SpoolWriter,
        /// The stream's copy in memory, until it spills.
        live: Arc<Backlog>,
    },
    Stream(Arc<Backlog>),
}

impl State {
    /// When the waiting size is to be recorded, if one waits.
    fn resize_due_at(&self) -> Option<Instant> {
        self.resize_pending?;
        Some(
            self.resized_at
                .map_or_else(Instant::now, |at| at + RESIZE_EVERY),
        )
    }
}

#[derive(Debug)]
struct State {
    next_ei: u64,
    started: Instant,
    start_ms: i64,
    offset: u64,
    tx: u64,
    rx: u64,
    /// Output waiting to become a `print` event, and when its first byte came.
    pending: Vec<u8>,
    pending_since: Option<(Instant, u64, i64)>,
    sink: Sink,
    /// Output is recorded (not for `off`, nor for subsystems).
    record_output: bool,
    /// Spooled events not yet synced to disk.
    unsynced: bool,
    /// Wakes the ticker when something starts waiting for it.
    waiting: Arc<Notify>,
    /// When the last `resize` was recorded, and a newer size not yet recorded.
    resized_at: Option<Instant>,
    resize_pending: Option<(u32, u32)>,
}

#[derive(Debug)]
struct Shared {
    meta: SessionMeta,
    policy: RecordingPolicy,
    mode: RecordingMode,
    audit: Arc<dyn AuditSink>,
    state: Mutex<State>,
    outcome: watch::Sender<Outcome>,
    min_free: u64,
    waiting: Arc<Notify>,
}

/// One session channel's recording.
#[derive(Debug)]
pub struct SessionRecording {
    shared: Arc<Shared>,
    kind: SessionKind,
    interactive: bool,
    ticker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    ticks: CancellationToken,
    ended: std::sync::atomic::AtomicBool,
    /// Counts the session in `turnstile_sessions_live` while it lives.
    _live: turnstile_api::metrics::GaugeGuard,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn size(b: u64) -> String {
    ByteSize(b).to_string()
}

impl Recorder {
    pub fn new(shipper: Arc<Shipper>, config: RecorderConfig) -> Arc<Self> {
        Arc::new(Self {
            budget: ProcessBudget::new(config.process_buffer),
            shipper,
            config,
        })
    }

    pub fn shipper(&self) -> &Arc<Shipper> {
        &self.shipper
    }

    pub fn client(&self) -> AuthClient<AuthChannel> {
        self.shipper.client()
    }

    /// Bytes of recordings held in memory by this process, unacknowledged.
    pub fn memory_held(&self) -> usize {
        self.budget.held()
    }

    /// Why a new recorded session cannot go to the spool, if it cannot.
    fn spool_refusal(&self) -> Option<String> {
        let spool = self.shipper.spool();
        let held = spool.size();
        if held >= self.config.spool_max_size {
            return Some(format!(
                "the recording spool is full ({} held, spool_max_size is {}); new sessions are refused until it is shipped to auth",
                size(held),
                size(self.config.spool_max_size)
            ));
        }
        match spool.free_space() {
            Ok(free) if free < self.config.spool_min_free => Some(format!(
                "the recording spool's disk has {} free, below spool_min_free ({})",
                size(free),
                size(self.config.spool_min_free)
            )),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Begins recording a session. `Err` carries the message for the user:
    /// the session must not start (a `strict` recording that cannot be
    /// written). Under `best_effort` such a session starts unrecorded, and the
    /// returned recording's outcome says so.
    pub async fn begin(
        self: &Arc<Self>,
        start: SessionStart,
        audit: Arc<dyn AuditSink>,
    ) -> Result<SessionRecording, String> {
        let mode = start.mode;
        let sid = start.meta.sid.clone();
        let record_output =
            mode.records_output() && !matches!(start.kind, SessionKind::Subsystem(_));
        let (sink, failure) = if !mode.records_output() {
            (Sink::Off, None)
        } else if mode.is_sync() {
            let backlog = Backlog::new(self.config.session_buffer, self.budget.clone());
            (Sink::Stream(backlog), None)
        } else {
            match self.spool_refusal() {
                Some(reason) => (Sink::Off, Some(reason)),
                None => match self.shipper.spool().create(&sid) {
                    Ok(writer) => (
                        Sink::Spool {
                            spool: self.shipper.spool().clone(),
                            writer,
                            live: Backlog::new(self.config.session_buffer, self.budget.clone()),
                        },
                        None,
                    ),
                    Err(e) => (Sink::Off, Some(e.to_string())),
                },
            }
        };
        let (cols, rows, term) = match &start.pty {
            Some((term, cols, rows)) => (*cols, *rows, term.clone()),
            None => (0, 0, String::new()),
        };
        let (outcome, _) = watch::channel(Outcome::Recording);
        let waiting = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            meta: start.meta.clone(),
            policy: start.policy,
            mode,
            audit,
            state: Mutex::new(State {
                next_ei: 0,
                started: Instant::now(),
                start_ms: now_ms(),
                offset: 0,
                tx: 0,
                rx: 0,
                pending: Vec::new(),
                pending_since: None,
                sink,
                record_output,
                unsynced: false,
                waiting: waiting.clone(),
                resized_at: None,
                resize_pending: None,
            }),
            waiting,
            outcome,
            min_free: self.config.spool_min_free,
        });
        let recording = SessionRecording {
            shared: shared.clone(),
            kind: start.kind.clone(),
            interactive: start.pty.is_some(),
            ticker: Mutex::new(None),
            ticks: CancellationToken::new(),
            ended: std::sync::atomic::AtomicBool::new(false),
            _live: turnstile_api::metrics::GaugeGuard::hold(METRICS.session_live(mode)),
        };
        if let Some(reason) = failure {
            shared.fail(&reason);
            if start.policy == RecordingPolicy::Strict {
                return Err(failure_message(&reason));
            }
        }
        let start_ms = shared.record(SESSION_START, |e, _| {
            e.cols = cols;
            e.rows = rows;
            e.node_name = start.meta.node_name.clone();
            e.term = term;
            if let SessionKind::Subsystem(name) = &start.kind {
                e.subsystem = name.clone();
            }
        });
        let opening = Opening {
            sid: sid.clone(),
            user: start.meta.user.clone(),
            login: start.meta.login.clone(),
            node_name: start.meta.node_name.clone(),
            start_ms,
        };
        let backlog = shared.with(|s| match &s.sink {
            Sink::Spool { live, .. } => Some((live.clone(), true)),
            Sink::Stream(b) => Some((b.clone(), false)),
            Sink::Off => None,
        });
        if let Some((backlog, spooled)) = backlog {
            let sync = (!spooled).then(|| {
                let shared = shared.clone();
                SyncRules {
                    ack_timeout: self.config.sync_ack_timeout,
                    on_failure: Box::new(move |reason| shared.fail(&reason)),
                }
            });
            self.shipper.clone().spawn(
                sid.clone(),
                Source::Live {
                    opening,
                    backlog: backlog.clone(),
                    spooled,
                    sync,
                },
            );
            if !spooled {
                // Fail closed from the start: no session without its stream.
                let wait = self.config.sync_ack_timeout.min(Duration::from_secs(10));
                let opened = match tokio::time::timeout(wait, backlog.opened()).await {
                    Ok(r) => r,
                    Err(_) => Err(format!(
                        "auth did not answer the recording stream within {}",
                        humantime::format_duration(wait)
                    )),
                };
                if let Err(reason) = opened {
                    shared.fail(&format!("cannot stream the recording to auth: {reason}"));
                    if start.policy == RecordingPolicy::Strict {
                        return Err(failure_message(&format!(
                            "cannot stream the recording to auth: {reason}"
                        )));
                    }
                }
            }
        }
        Ok(recording.with_ticker())
    }
}

impl State {
    fn stamp(&mut self, meta: &SessionMeta, kind: &str) -> RecordingEvent {
        let e = RecordingEvent {
            ei: self.next_ei,
            event: kind.to_string(),
            time_ms: now_ms(),
            sid: meta.sid.clone(),
            server_id: meta.server_id.clone(),
            user: meta.user.clone(),
            login: meta.login.clone(),
            ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ..Default::default()
        };
        self.next_ei += 1;
        e
    }

    /// Hands one event to the sink.
    fn store(&mut self, e: &RecordingEvent) -> Result<(), String> {
        if matches!(self.sink, Sink::Off) {
            return Ok(());
        }
        let mut record = Vec::with_capacity(e.data.len() + 96);
        encode_record(e, &mut record);
        self.store_record(e.ei, record)
    }

    /// Hands one encoded record to the sink: appended to the spool, then
    /// moved (not copied) into the stream's backlog.
    fn store_record(&mut self, ei: u64, record: Vec<u8>) -> Result<(), String> {
        match &mut self.sink {
            Sink::Off => Ok(()),
            Sink::Stream(backlog) => {
                backlog.push(ei, record);
                Ok(())
            }
            Sink::Spool { writer, live, .. } => {
                let offset = writer.offset();
                writer.append_records(&record).map_err(|e| e.to_string())?;
                if live.keep_or_spill(record.len(), ei, offset) {
                    live.push(ei, record);
                }
                if !self.unsynced {
                    self.unsynced = true;
                    self.waiting.notify_one();
                }
                Ok(())
            }
        }
    }

    /// When output arriving at `now` happened, on the session's clocks.
    fn now_stamp(&self, now: Instant) -> (Instant, u64, i64) {
        let ms = u64::try_from(now.duration_since(self.started).as_millis()).unwrap_or(u64::MAX);
        (now, ms, now_ms())
    }

    /// One `print` event of `data`, stamped `(ms, time_ms)`, encoded straight
    /// from the slice (the output is copied once, into the record).
    fn print_record(
        &mut self,
        meta: &SessionMeta,
        ms: u64,
        time_ms: i64,
        data: &[u8],
    ) -> Result<(), String> {
        let mut e = self.stamp(meta, PRINT);
        e.ms = ms;
        e.time_ms = time_ms;
        e.offset = self.offset;
        self.offset += data.len() as u64;
        if matches!(self.sink, Sink::Off) {
            return Ok(());
        }
        let ei = e.ei;
        self.store_record(ei, encode_print_record(&e, data))
    }

    /// Output arriving at `now`: whole 64 KiB go out as events at once
    /// (topping up what waits first); the rest waits, for at most [`BATCH_FOR`].
    fn take_output(
        &mut self,
        meta: &SessionMeta,
        now: Instant,
        mut data: &[u8],
    ) -> Result<(), String> {
        if !self.pending.is_empty() {
            let room = MAX_PRINT - self.pending.len();
            let (top, rest) = data.split_at(room.min(data.len()));
            self.pending.extend_from_slice(top);
            data = rest;
            if self.pending.len() < MAX_PRINT {
                return Ok(());
            }
            self.flush_output(meta)?;
        }
        let stamp = self.now_stamp(now);
        let mut chunks = data.chunks_exact(MAX_PRINT);
        for chunk in &mut chunks {
            self.print_record(meta, stamp.1, stamp.2, chunk)?;
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            self.pending.extend_from_slice(rest);
            self.pending_since = Some(stamp);
            self.waiting.notify_one();
        }
        Ok(())
    }

    /// Turns the batched output into a `print` event.
    fn flush_output(&mut self, meta: &SessionMeta) -> Result<(), String> {
        let Some((_, ms, time_ms)) = self.pending_since.take() else {
            return Ok(());
        };
        let mut pending = std::mem::take(&mut self.pending);
        let result = self.print_record(meta, ms, time_ms, &pending);
        // Kept for the next batch unless output came in bulk: a thousand
        // quiet sessions would each hold up to 64 KiB.
        if pending.capacity() <= PENDING_KEPT {
            pending.clear();
            self.pending = pending;
        }
        result
    }
}

/// The most capacity of the output batch kept once it became an event.
const PENDING_KEPT: usize = 4 * 1024;

/// `[u32 BE length][protobuf]` of `e` with `data` as its output, without
/// copying `data` into the event first (field 8 is appended; protobuf fields
/// may come in any order).
fn encode_print_record(e: &RecordingEvent, data: &[u8]) -> Vec<u8> {
    use prost::Message;
    let head = e.encoded_len();
    let len = head + 1 + prost::encoding::encoded_len_varint(data.len() as u64) + data.len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    e.encode(&mut out).unwrap_or_default();
    out.push(0x42); // field 8, length-delimited
    prost::encoding::encode_varint(data.len() as u64, &mut out);
    out.extend_from_slice(data);
    out
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records a size taken (with `resized_at` set) under the state lock.
    fn record_resize(&self, cols: u32, rows: u32) {
        self.record(RESIZE, |e, _| {
            e.cols = cols;
            e.rows = rows;
        });
    }

    /// Records the size waiting since the last `resize`, once its interval
    /// is over (or `now`, at the session's end).
    fn record_due_resize(&self, now: bool) {
        let due = self.with(|s| match s.resize_due_at() {
            Some(at) if now || Instant::now() >= at => {
                // Taken and stamped in one step: a resize arriving meanwhile
                // waits behind this one rather than overtaking it.
                s.resized_at = Some(Instant::now());
                s.resize_pending.take()
            }
            _ => None,
        });
        if let Some((cols, rows)) = due {
            self.record_resize(cols, rows);
        }
    }

    /// Stores one (non-output) event of `kind`, filled in by `fill`, after
    /// the output before it, and audits it. Returns its time.
    fn record(&self, kind: &str, fill: impl FnOnce(&mut RecordingEvent, &State)) -> i64 {
        let (e, result) = self.with(|s| {
            let flushed = s.flush_output(&self.meta);
            let mut e = s.stamp(&self.meta, kind);
            fill(&mut e, s);
            let result = flushed.and_then(|()| s.store(&e));
            (e, result)
        });
        if let Err(reason) = result {
            self.fail(&reason);
        }
        self.audit.emit(event::audit_event(&e));
        e.time_ms
    }

    /// The recording cannot be written: decide by policy, tell the session,
    /// audit it. Only the first failure counts.
    fn fail(&self, reason: &str) {
        if *self.outcome.borrow() != Outcome::Recording {
            return;
        }
        let (sink, next_ei) = self.with(|s| (std::mem::replace(&mut s.sink, Sink::Off), s.next_ei));
        match sink {
            // What reached the spool is still shipped, from the spool.
            Sink::Spool { writer, live, .. } => {
                live.spill_and_end(next_ei, writer.offset());
                drop(writer);
            }
            Sink::Stream(b) => b.fail(reason),
            Sink::Off => {}
        }
        let (outcome, action) = match self.policy {
            RecordingPolicy::Strict => (Outcome::Ended(reason.to_string()), "session ended"),
            RecordingPolicy::BestEffort => (
                Outcome::Unrecorded(reason.to_string()),
                "session continued unrecorded",
            ),
        };
        tracing::warn!(sid = %self.meta.sid, user = %self.meta.user, %reason, policy = self.policy.as_str(), action, "session recording failed");
        METRICS.recording_failures.inc();
        let mut fields = serde_json::Map::new();
        fields.insert("error".into(), json!(reason));
        fields.insert("policy".into(), json!(self.policy.as_str()));
        fields.insert("action".into(), json!(action));
        fields.insert("session_recording".into(), json!(self.mode.as_str()));
        fields.insert("node".into(), json!(self.meta.node_name));
        self.audit.emit(AuditEvent::SessionEvent {
            event: event::RECORDING_FAILED.into(),
            sid: self.meta.sid.clone(),
            server_id: self.meta.server_id.clone(),
            user: self.meta.user.clone(),
            login: self.meta.login.clone(),
            fields,
        });
        self.outcome.send_replace(outcome);
    }

    /// The spool's periodic sync, off the session's lock while the disk works.
    fn start_sync(&self) -> Option<(PendingSync, Arc<Backlog>)> {
        let result: Result<_, String> = self.with(|s| {
            s.unsynced = false;
            let Sink::Spool { writer, live, .. } = &mut s.sink else {
                return Ok(None);
            };
            Ok(writer
                .start_sync()
                .map_err(|e| e.to_string())?
                .map(|p| (p, live.clone())))
        });
        match result {
            Ok(p) => p,
            Err(reason) => {
                self.fail(&reason);
                None
            }
        }
    }

    fn check_free_space(&self) {
        let spool = self.with(|s| match &s.sink {
            Sink::Spool { spool, .. } => Some(spool.clone()),
            _ => None,
        });
        if let Some(spool) = spool {
            match spool.free_space() {
                Ok(free) if free < self.min_free => self.fail(&format!(
                    "the recording spool's disk has {} free, below spool_min_free ({})",
                    size(free),
                    size(self.min_free)
                )),
                _ => {}
            }
        }
    }
}

impl SessionRecording {
    /// The session's timer: batched output becomes events within
    /// [`BATCH_FOR`]; spooled events are synced within [`SYNC_EVERY`] (and
    /// the spool's free space checked). It sleeps while nothing waits.
    fn with_ticker(self) -> Self {
        let shared = self.shared.clone();
        let ticks = self.ticks.clone();
        let ticker = tokio::spawn(async move {
            let mut synced_at = Instant::now();
            loop {
                let (flush_at, unsynced, resize_at) = shared.with(|s| {
                    (
                        s.pending_since.map(|(at, _, _)| at + BATCH_FOR),
                        s.unsynced,
                        s.resize_due_at(),
                    )
                });
                let sync_at = unsynced.then_some(synced_at + SYNC_EVERY);
                let wake = [flush_at, sync_at, resize_at].into_iter().flatten().min();
                tokio::select! {
                    _ = async {
                        match wake {
                            Some(at) => tokio::time::sleep_until(at.into()).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                    _ = shared.waiting.notified() => continue,
                    _ = ticks.cancelled() => return,
                }
                shared.record_due_resize(false);
                let flushed = shared.with(|s| {
                    let due = s
                        .pending_since
                        .is_some_and(|(at, _, _)| at.elapsed() >= BATCH_FOR);
                    if due {
                        s.flush_output(&shared.meta)
                    } else {
                        Ok(())
                    }
                });
                if let Err(reason) = flushed {
                    shared.fail(&reason);
                }
                if unsynced && synced_at.elapsed() >= SYNC_EVERY {
                    synced_at = Instant::now();
                    if let Some((pending, live)) = shared.start_sync() {
                        let waited = tokio::task::spawn_blocking(move || pending.wait()).await;
                        match waited {
                            Ok(Ok(())) => live.nudge(),
                            Ok(Err(e)) => shared.fail(&e.to_string()),
                            Err(e) => shared.fail(&e.to_string()),
                        }
                    }
                    shared.check_free_space();
                }
            }
        });
        *self.ticker.lock().unwrap_or_else(|e| e.into_inner()) = Some(ticker);
        self
    }

    pub fn sid(&self) -> &str {
        &self.shared.meta.sid
    }

    /// What the user should read about the recording now (a warning when it
    /// runs unrecorded), if anything.
    pub fn message(&self) -> Option<String> {
        self.shared.outcome.borrow().message()
    }

    /// How the recording stands; changes once, if it fails.
    pub fn outcome(&self) -> watch::Receiver<Outcome> {
        self.shared.outcome.subscribe()
    }

    /// Session output. Waits while the session holds as much unacknowledged
    /// output as it may (sync modes). `Err`: the session must end, and these
    /// bytes must not reach the user.
    pub async fn print(&self, data: &[u8]) -> Result<(), String> {
        let backlog = self.shared.with(|s| {
            s.tx += data.len() as u64;
            match &s.sink {
                Sink::Stream(b) if s.record_output => Some(b.clone()),
                _ => None,
            }
        });
        if let Some(b) = backlog
            && let Err(reason) = b.room().await
        {
            return self.refused(reason);
        }
        let result: Result<(), String> = self.shared.with(|s| {
            if !s.record_output || matches!(s.sink, Sink::Off) {
                return Ok(());
            }
            let now = Instant::now();
            let due = s
                .pending_since
                .is_some_and(|(at, _, _)| now.duration_since(at) >= BATCH_FOR);
            if due {
                s.flush_output(&self.shared.meta)?;
            }
            s.take_output(&self.shared.meta, now, data)?;
            METRICS.recorded_bytes.add(data.len() as u64);
            Ok(())
        });
        match result {
            Ok(()) => self.ok_unless_ended(),
            Err(reason) => {
                self.shared.fail(&reason);
                self.ok_unless_ended()
            }
        }
    }

    fn ok_unless_ended(&self) -> Result<(), String> {
        match &*self.shared.outcome.borrow() {
            Outcome::Ended(reason) => Err(reason.clone()),
            _ => Ok(()),
        }
    }

    fn refused(&self, reason: String) -> Result<(), String> {
        self.shared.fail(&reason);
        self.ok_unless_ended()
    }

    /// Input the user sent (counted, not recorded).
    pub fn received(&self, n: usize) {
        self.shared.with(|s| s.rx += n as u64);
    }

    /// The terminal's new size: recorded now, or (within [`RESIZE_EVERY`]
    /// of the last one recorded) when the interval ends, as the latest size.
    pub async fn resize(&self, cols: u32, rows: u32) {
        let backlog = self.shared.with(|s| match &s.sink {
            Sink::Stream(b) => Some(b.clone()),
            _ => None,
        });
        if let Some(b) = backlog
            && b.room().await.is_err()
        {
            return;
        }
        let later = self.shared.with(|s| {
            let recent = s.resized_at.is_some_and(|at| at.elapsed() < RESIZE_EVERY);
            if recent {
                s.resize_pending = Some((cols, rows));
                s.waiting.notify_one();
            } else {
                s.resized_at = Some(Instant::now());
                s.resize_pending = None;
            }
            recent
        });
        if !later {
            self.shared.record_resize(cols, rows);
        }
    }

    /// Ends the recording: the command's `exec` (with its exit code, -1 if
    /// it had none), `session.data` and `session.end`; the spool is synced
    /// before this returns, and the stream completes in the background.
    /// Only the first call counts.
    pub async fn end(&self, exit_code: Option<i32>) {
        if self.ended.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        self.ticks.cancel();
        let ticker = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = ticker {
            let _ = t.await;
        }
        let shared = &self.shared;
        shared.record_due_resize(true);
        if let SessionKind::Exec(command) = &self.kind {
            shared.record(EXEC, |e, _| {
                e.command = command.clone();
                e.exit_code = exit_code.unwrap_or(-1);
            });
        }
        shared.record(SESSION_DATA, |e, s| (e.tx, e.rx) = (s.tx, s.rx));
        let interactive = self.interactive;
        shared.record(SESSION_END, |e, s| {
            e.participants = vec![shared.meta.user.clone()];
            e.session_start_ms = s.start_ms;
            e.session_stop_ms = now_ms();
            e.interactive = interactive;
        });
        if let Some((pending, _)) = shared.start_sync() {
            match tokio::task::spawn_blocking(move || pending.wait()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => shared.fail(&e.to_string()),
                Err(e) => shared.fail(&e.to_string()),
            }
        }
        shared.with(|s| match &s.sink {
            Sink::Spool { live, .. } => live.end(),
            Sink::Stream(b) => b.end(),
            Sink::Off => {}
        });
    }
}

impl Drop for SessionRecording {
    fn drop(&mut self) {
        self.ticks.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Audit(Mutex<Vec<AuditEvent>>);
    impl AuditSink for Audit {
        fn emit(&self, event: AuditEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    fn unreachable_client() -> AuthClient<AuthChannel> {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        AuthClient::new(AuthChannel::single("127.0.0.1:1", channel))
    }

    fn start(mode: RecordingMode, policy: RecordingPolicy) -> SessionStart {
        SessionStart {
            meta: SessionMeta {
                sid: uuid::Uuid::new_v4().to_string(),
                server_id: "node".into(),
                user: "alice".into(),
                login: "root".into(),
                node_name: "web1".into(),
            },
            kind: SessionKind::Exec("cat".into()),
            pty: None,
            mode,
            policy,
        }
    }

    fn recorder(dir: &std::path::Path, config: RecorderConfig) -> Arc<Recorder> {
        let spool = Spool::open(dir).unwrap();
        let shipper = Shipper::start(spool, unreachable_client(), 1, CancellationToken::new());
        Recorder::new(shipper, config)
    }

    #[tokio::test]
    async fn output_is_batched_split_with_offsets_and_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let rec = recorder(dir.path(), RecorderConfig::default());
        let audit = Arc::new(Audit::default());
        let s = start(RecordingMode::Node, RecordingPolicy::Strict);
        let sid = s.meta.sid.clone();
        let r = rec.begin(s, audit.clone()).await.unwrap();
        // Small writes become one event; a large one is split at 64 KiB.
        for _ in 0..10 {
            r.print(b"0123456789").await.unwrap();
        }
        r.print(&vec![b'a'; MAX_PRINT + 10]).await.unwrap();
        r.resize(100, 40).await;
        r.received(3);
        r.end(Some(0)).await;
        let (events, _) = rec.shipper.spool().read_from(&sid, 0, usize::MAX).unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "session.start",
                "print",
                "print",
                "resize",
                "exec",
                "session.data",
                "session.end"
            ]
        );
        assert_eq!(events[1].data.len(), MAX_PRINT);
        assert_eq!(events[2].offset, MAX_PRINT as u64);
        assert_eq!(events[2].data.len(), 110);
        assert_eq!(events[5].tx, 100 + MAX_PRINT as u64 + 10);
        assert_eq!(events[5].rx, 3);
        assert!(events.iter().enumerate().all(|(i, e)| e.ei == i as u64));
        let audited: Vec<String> = audit
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.name().to_string())
            .collect();
        assert_eq!(
            audited,
            [
                "session.start",
                "resize",
                "exec",
                "session.data",
                "session.end"
            ]
        );
    }

    #[tokio::test]
    async fn a_flood_of_resizes_records_a_few_and_always_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let rec = recorder(dir.path(), RecorderConfig::default());
        let audit = Arc::new(Audit::default());
        let s = start(RecordingMode::Node, RecordingPolicy::Strict);
        let sid = s.meta.sid.clone();
        let r = rec.begin(s, audit.clone()).await.unwrap();
        for i in 0..100_000u32 {
            r.resize(80 + i % 100, 24 + i % 50).await;
        }
        r.resize(123, 45).await;
        r.end(Some(0)).await;
        let (events, _) = rec.shipper.spool().read_from(&sid, 0, usize::MAX).unwrap();
        let resizes: Vec<(u32, u32)> = events
            .iter()
            .filter(|e| e.event == "resize")
            .map(|e| (e.cols, e.rows))
            .collect();
        assert!(resizes.len() <= 20, "{} resizes recorded", resizes.len());
        assert_eq!(resizes.last(), Some(&(123, 45)));
        let audited = audit
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.name() == "resize")
            .count();
        assert_eq!(audited, resizes.len());
        // The last size comes before the session's end.
        let last_resize = events.iter().rposition(|e| e.event == "resize").unwrap();
        let end = events
            .iter()
            .position(|e| e.event == "session.end")
            .unwrap();
        assert!(last_resize < end);
    }

    #[tokio::test]
    async fn a_waiting_size_is_recorded_when_its_interval_ends() {
        let dir = tempfile::tempdir().unwrap();
        let rec = recorder(dir.path(), RecorderConfig::default());
        let audit = Arc::new(Audit::default());
        let r = rec
            .begin(
                start(RecordingMode::Node, RecordingPolicy::Strict),
                audit.clone(),
            )
            .await
            .unwrap();
        r.resize(100, 40).await;
        r.resize(101, 41).await;
        let sizes = |audit: &Audit| {
            audit
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.name() == "resize")
                .count()
        };
        assert_eq!(sizes(&audit), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while sizes(&audit) < 2 {
            assert!(
                Instant::now() < deadline,
                "the waiting size is never recorded without another event"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.end(Some(0)).await;
    }

    #[test]
    fn a_print_record_decodes_as_the_event_with_its_data() {
        use prost::Message;
        let e = RecordingEvent {
            ei: 7,
            event: PRINT.into(),
            sid: "s".into(),
            offset: 99,
            ..Default::default()
        };
        let record = encode_print_record(&e, b"hello");
        let len = u32::from_be_bytes(record[..4].try_into().unwrap()) as usize;
        assert_eq!(len, record.len() - 4);
        let back = RecordingEvent::decode(&record[4..]).unwrap();
        assert_eq!(
            back,
            RecordingEvent {
                data: b"hello".to_vec(),
                ..e
            }
        );
    }

    #[tokio::test]
    async fn a_full_spool_refuses_strict_sessions_and_lets_best_effort_ones_run_unrecorded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("corrupt")).unwrap();
        std::fs::write(dir.path().join("corrupt/old.events"), vec![0u8; 2048]).unwrap();
        let config = RecorderConfig {
            spool_max_size: 1024,
            ..Default::default()
        };
        let rec = recorder(dir.path(), config);
        let audit = Arc::new(Audit::default());
        let err = rec
            .begin(
                start(RecordingMode::Node, RecordingPolicy::Strict),
                audit.clone(),
            )
            .await
            .unwrap_err();
        assert!(
            err.starts_with(
                "session ended: its recording cannot be written: the recording spool is full"
            ),
            "{err}"
        );
        assert!(err.contains("spool_max_size is 1KiB"), "{err}");
        let r = rec
            .begin(
                start(RecordingMode::Node, RecordingPolicy::BestEffort),
                audit.clone(),
            )
            .await
            .unwrap();
        assert!(
            matches!(&*r.outcome().borrow(), Outcome::Unrecorded(m) if m.contains("spool is full"))
        );
        r.print(b"goes on").await.unwrap();
        r.end(Some(0)).await;
        let failed: Vec<_> = audit
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.name() == event::RECORDING_FAILED)
            .cloned()
            .collect();
        assert_eq!(failed.len(), 2);
        assert_eq!(
            rec.shipper.spool().sessions().unwrap(),
            Vec::<String>::new()
        );
    }

    #[tokio::test]
    async fn a_spool_that_cannot_be_created_refuses_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let rec = recorder(&dir.path().join("spool"), RecorderConfig::default());
        std::fs::remove_dir_all(dir.path().join("spool")).unwrap();
        std::fs::write(dir.path().join("spool"), b"not a directory").unwrap();
        let err = rec
            .begin(
                start(RecordingMode::Proxy, RecordingPolicy::Strict),
                Arc::new(Audit::default()),
            )
            .await
            .unwrap_err();
        assert!(
            err.starts_with("session ended: its recording cannot be written: "),
            "{err}"
        );
    }

    #[tokio::test]
    async fn below_the_free_space_floor_a_running_session_ends() {
        let dir = tempfile::tempdir().unwrap();
        let rec = recorder(dir.path(), RecorderConfig::default());
        let audit = Arc::new(Audit::default());
        let r = rec
            .begin(
                start(RecordingMode::Node, RecordingPolicy::Strict),
                audit.clone(),
            )
            .await
            .unwrap();
        r.print(b"before").await.unwrap();
        rec.shipper.spool().pretend_free_space(Some(1 << 20));
        let mut outcome = r.outcome();
        tokio::time::timeout(
            Duration::from_secs(5),
            outcome.wait_for(|o| *o != Outcome::Recording),
        )
        .await
        .expect("the floor is checked within a second")
        .unwrap();
        let message = outcome.borrow().message().unwrap();
        assert!(message.starts_with("session ended: its recording cannot be written: the recording spool's disk has 1MiB free, below spool_min_free (1GiB)"), "{message}");
        assert!(
            r.print(b"after").await.is_err(),
            "no more output reaches the user"
        );
        assert!(
            audit
                .0
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.name() == event::RECORDING_FAILED)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sync_session_without_auth_is_refused_within_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let rec = recorder(
            dir.path(),
            RecorderConfig {
                sync_ack_timeout: Duration::from_secs(3),
                ..Default::default()
            },
        );
        let err = rec
            .begin(
                start(RecordingMode::NodeSync, RecordingPolicy::Strict),
                Arc::new(Audit::default()),
            )
            .await
            .unwrap_err();
        assert!(err.contains("cannot stream the recording to auth"), "{err}");
        assert!(
            rec.shipper.spool().sessions().unwrap().is_empty(),
            "nothing on disk"
        );
    }
}
