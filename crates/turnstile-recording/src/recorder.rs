//! Recording one session: turns output, resizes and the command into events
//! with `ei`, `ms` and `offset`, and appends them to the spool. What is
//! appended reaches the disk within a second (a crash loses at most the last
//! second); the uploader is woken each time it does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::event::{
    self, EXEC, MAX_PRINT, PRINT, RESIZE, RecordingEvent, SESSION_DATA, SESSION_END, SESSION_START,
};
use crate::spool::{Spool, SpoolError, SpoolWriter};

/// How often appended events are synced to disk.
pub const SYNC_EVERY: Duration = Duration::from_millis(500);

/// Who and where.
#[derive(Debug, Clone)]
pub struct SessionMeta {
    pub sid: String,
    pub server_id: String,
    pub user: String,
    pub login: String,
    pub node_name: String,
}

#[derive(Debug)]
struct State {
    meta: SessionMeta,
    next_ei: u64,
    started: Instant,
    start_ms: i64,
    offset: u64,
    tx: u64,
    rx: u64,
    /// `None`: recording is off; events are made (for the audit log) but not kept.
    writer: Option<SpoolWriter>,
    failed: bool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl State {
    fn stamp(&mut self, kind: &str) -> RecordingEvent {
        let e = RecordingEvent {
            ei: self.next_ei,
            event: kind.to_string(),
            time_ms: now_ms(),
            sid: self.meta.sid.clone(),
            server_id: self.meta.server_id.clone(),
            user: self.meta.user.clone(),
            login: self.meta.login.clone(),
            ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ..Default::default()
        };
        self.next_ei += 1;
        e
    }

    fn append(&mut self, e: &RecordingEvent) {
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        if let Err(err) = writer.append(e) {
            self.report(&err);
        }
    }

    /// Logs the first failure to write or sync the spool.
    fn report(&mut self, err: &SpoolError) {
        if !self.failed {
            self.failed = true;
            tracing::error!(sid = %self.meta.sid, error = %err, "cannot write the session recording to the spool");
        }
    }
}

#[derive(Debug)]
pub struct SessionRecorder {
    state: Arc<Mutex<State>>,
    synced: Arc<Notify>,
    syncer: Option<JoinHandle<()>>,
}

/// Makes what was appended durable. Only the hand-off to the kernel holds
/// the session's lock; the wait for the disk does not, so output keeps
/// flowing during it.
fn sync(state: &Mutex<State>) -> bool {
    let pending = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(writer) = s.writer.as_mut() else {
            return false;
        };
        match writer.start_sync() {
            Ok(Some(pending)) => pending,
            Ok(None) => return false,
            Err(err) => {
                s.report(&err);
                return false;
            }
        }
    };
    match pending.wait() {
        Ok(()) => true,
        Err(err) => {
            state.lock().unwrap_or_else(|e| e.into_inner()).report(&err);
            false
        }
    }
}

impl SessionRecorder {
    /// Starts recording: writes `session.start` and returns it (for the audit log).
    pub fn start(
        spool: &Spool,
        meta: SessionMeta,
        cols: u32,
        rows: u32,
        term: &str,
    ) -> Result<(Self, RecordingEvent), SpoolError> {
        let writer = spool.create(&meta.sid)?;
        Ok(Self::begin(Some(writer), meta, cols, rows, term))
    }

    /// A session whose output is not recorded (mode `off`): its events are
    /// still made, for the audit log.
    pub fn unrecorded(
        meta: SessionMeta,
        cols: u32,
        rows: u32,
        term: &str,
    ) -> (Self, RecordingEvent) {
        Self::begin(None, meta, cols, rows, term)
    }

    fn begin(
        writer: Option<SpoolWriter>,
        meta: SessionMeta,
        cols: u32,
        rows: u32,
        term: &str,
    ) -> (Self, RecordingEvent) {
        let recorded = writer.is_some();
        let mut state = State {
            meta: meta.clone(),
            next_ei: 0,
            started: Instant::now(),
            start_ms: now_ms(),
            offset: 0,
            tx: 0,
            rx: 0,
            writer,
            failed: false,
        };
        let mut start = state.stamp(SESSION_START);
        start.cols = cols;
        start.rows = rows;
        start.node_name = meta.node_name.clone();
        start.term = term.to_string();
        state.append(&start);
        let state = Arc::new(Mutex::new(state));
        let synced = Arc::new(Notify::new());
        let syncer = recorded.then(|| {
            let state = state.clone();
            let synced = synced.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SYNC_EVERY).await;
                    let state = state.clone();
                    if tokio::task::spawn_blocking(move || sync(&state))
                        .await
                        .unwrap_or(false)
                    {
                        synced.notify_waiters();
                    }
                }
            })
        });
        (
            Self {
                state,
                synced,
                syncer,
            },
            start,
        )
    }

    /// Woken whenever new events reach the disk.
    pub fn synced(&self) -> Arc<Notify> {
        self.synced.clone()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Output of the session, in `print` events of at most 64 KiB (none when
    /// recording is off).
    pub fn print(&self, data: &[u8]) {
        self.with(|s| {
            s.tx += data.len() as u64;
            if s.writer.is_none() {
                return;
            }
            for chunk in data.chunks(MAX_PRINT) {
                let mut e = s.stamp(PRINT);
                e.data = chunk.to_vec();
                e.offset = s.offset;
                s.offset += chunk.len() as u64;
                s.append(&e);
            }
        });
    }

    /// Input the user sent (counted, not recorded).
    pub fn received(&self, n: usize) {
        self.with(|s| s.rx += n as u64);
    }

    pub fn resize(&self, cols: u32, rows: u32) -> RecordingEvent {
        self.with(|s| {
            let mut e = s.stamp(RESIZE);
            e.cols = cols;
            e.rows = rows;
            s.append(&e);
            e
        })
    }

    pub fn exec(&self, command: &str, exit_code: i32) -> RecordingEvent {
        self.with(|s| {
            let mut e = s.stamp(EXEC);
            e.command = command.to_string();
            e.exit_code = exit_code;
            s.append(&e);
            e
        })
    }

    /// Ends the recording: `session.data` and `session.end`, synced before
    /// returning. Returns both (for the audit log).
    pub async fn end(&self, interactive: bool) -> Vec<RecordingEvent> {
        if let Some(syncer) = &self.syncer {
            syncer.abort();
        }
        let events = self.with(|s| {
            let mut data = s.stamp(SESSION_DATA);
            data.tx = s.tx;
            data.rx = s.rx;
            s.append(&data);
            let mut end = s.stamp(SESSION_END);
            end.participants = vec![s.meta.user.clone()];
            end.session_start_ms = s.start_ms;
            end.session_stop_ms = now_ms();
            end.interactive = interactive;
            s.append(&end);
            vec![data, end]
        });
        let state = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || sync(&state)).await;
        self.synced.notify_waiters();
        events
    }
}

/// Is this event one that also goes to the audit log (everything but output)?
pub fn audited(e: &RecordingEvent) -> bool {
    e.event != event::PRINT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_split_with_offsets_and_everything_is_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let sid = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee".to_string();
        let meta = SessionMeta {
            sid: sid.clone(),
            server_id: "node".into(),
            user: "alice".into(),
            login: "root".into(),
            node_name: "web1".into(),
        };
        let (rec, start) = SessionRecorder::start(&spool, meta, 80, 24, "xterm").unwrap();
        assert_eq!(start.ei, 0);
        rec.print(&vec![b'a'; MAX_PRINT + 10]);
        rec.print(b"tail");
        rec.resize(100, 40);
        let end = rec.end(true).await;
        assert_eq!(end[1].event, SESSION_END);
        let (events, _) = spool.read_from(&sid, 0, usize::MAX).unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "session.start",
                "print",
                "print",
                "print",
                "resize",
                "session.data",
                "session.end"
            ]
        );
        assert_eq!(events[2].offset, MAX_PRINT as u64);
        assert_eq!(events[3].offset, MAX_PRINT as u64 + 10);
        assert_eq!(events[5].tx, MAX_PRINT as u64 + 14);
        assert!(events.iter().enumerate().all(|(i, e)| e.ei == i as u64));
    }
}
