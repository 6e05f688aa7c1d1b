//! A session's events in memory on their way from the recorder to its
//! stream to auth: encoded records waiting to be framed, counted together
//! with the frames sent but not yet acknowledged. Bounded per session and per
//! process: in sync modes the recorder waits for room (back-pressure on the
//! session's output, nothing dropped); in async modes it spills to the spool,
//! which the stream then reads from where memory left off.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use turnstile_api::metrics::METRICS;

/// Bytes held in memory by every session of a process.
#[derive(Debug)]
pub struct ProcessBudget {
    held: AtomicUsize,
    cap: usize,
    room: Notify,
}

impl ProcessBudget {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            cap: cap.max(1),
            room: Notify::new(),
        })
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn full(&self) -> bool {
        self.held() >= self.cap
    }

    fn take(&self, n: usize) {
        self.held.fetch_add(n, Ordering::Relaxed);
        METRICS
            .unacknowledged_bytes
            .add(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn give_back(&self, n: usize) {
        let before = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(n))
            })
            .unwrap_or(0);
        METRICS
            .unacknowledged_bytes
            .add(-i64::try_from(n.min(before)).unwrap_or(i64::MAX));
        self.room.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct State {
    /// Encoded records not yet framed, one per event from `first_ei` on.
    records: std::collections::VecDeque<Vec<u8>>,
    first_ei: u64,
    /// Bytes of `records` plus those of frames (compressed) not acknowledged.
    held: usize,
    /// The recorder wrote the last event.
    ended: bool,
    /// From this event on (and this byte of the spool file) events are only
    /// in the spool.
    spilled: Option<(u64, u64)>,
    /// The recording failed; nothing more is taken.
    failed: Option<String>,
    /// Auth answered the stream's opening.
    opened: bool,
}

/// What the stream takes from the backlog.
#[derive(Debug)]
pub enum Taken {
    /// The records of events `first_ei..=last_ei`, one each.
    Records {
        first_ei: u64,
        last_ei: u64,
        records: Vec<Vec<u8>>,
    },
    /// Nothing now.
    Empty,
    /// Nothing more in memory: go on from the spool at this event and byte.
    Spilled { ei: u64, offset: u64 },
    /// The recorder wrote the last event and all of it was taken.
    Ended,
}

#[derive(Debug)]
pub struct Backlog {
    state: Mutex<State>,
    /// The stream is woken when there is more to take.
    more: Notify,
    /// The recorder is woken when there is room, or the recording failed.
    room: Notify,
    opened: Notify,
    cap: usize,
    process: Arc<ProcessBudget>,
}

impl Backlog {
    pub fn new(cap: usize, process: Arc<ProcessBudget>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            more: Notify::new(),
            room: Notify::new(),
            opened: Notify::new(),
            cap: cap.max(1),
            process,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn has_room(&self, s: &State) -> bool {
        s.held < self.cap && !self.process.full()
    }

    /// Waits until the session may hold more (sync modes). Fails once the
    /// recording has failed.
    pub async fn room(&self) -> Result<(), String> {
        loop {
            let session = self.room.notified();
            let process = self.process.room.notified();
            tokio::pin!(session, process);
            session.as_mut().enable();
            process.as_mut().enable();
            match self.with(|s| match &s.failed {
                Some(reason) => Some(Err(reason.clone())),
                None => self.has_room(s).then_some(Ok(())),
            }) {
                Some(result) => return result,
                None => {
                    tokio::select! {
                        _ = session => {}
                        _ = process => {}
                    }
                }
            }
        }
    }

    /// Adds the encoded record of event `ei`, the next one.
    /// (Dropped once the recording has failed: nobody takes them.)
    pub fn push(&self, ei: u64, record: Vec<u8>) {
        let len = record.len();
        let taken = self.with(|s| {
            if s.failed.is_some() {
                return false;
            }
            if s.records.is_empty() {
                s.first_ei = ei;
            }
            s.records.push_back(record);
            s.held += len;
            true
        });
        if taken {
            self.process.take(len);
            self.more.notify_one();
        }
    }

    /// Wakes the stream (more may be in the spool).
    pub fn nudge(&self) {
        self.more.notify_one();
    }

    /// Async modes: is there room for `n` more bytes? If not, the backlog
    /// spills: from event `ei` (at byte `offset` of the spool file) events
    /// are only in the spool. Returns whether the events still go to memory.
    pub fn keep_or_spill(&self, n: usize, ei: u64, offset: u64) -> bool {
        let keep = self.with(|s| {
            if s.spilled.is_some() {
                return false;
            }
            if s.held + n <= self.cap && self.process.held() + n <= self.process.cap {
                return true;
            }
            s.spilled = Some((ei, offset));
            false
        });
        if !keep {
            self.more.notify_one();
        }
        keep
    }

    /// Async modes, after a spool failure: no more events come; the stream
    /// ships what the spool holds from `ei` (byte `offset`) on.
    pub fn spill_and_end(&self, ei: u64, offset: u64) {
        self.with(|s| {
            s.spilled.get_or_insert((ei, offset));
            s.ended = true;
        });
        self.more.notify_one();
    }

    pub fn spilled(&self) -> bool {
        self.with(|s| s.spilled.is_some())
    }

    /// Takes up to `max` bytes of whole records (at least one).
    pub fn take(&self, max: usize) -> Taken {
        self.with(|s| {
            if s.records.is_empty() {
                return match (s.spilled, s.ended) {
                    (Some((ei, offset)), _) => Taken::Spilled { ei, offset },
                    (None, true) => Taken::Ended,
                    (None, false) => Taken::Empty,
                };
            }
            let mut n = 0usize;
            let mut bytes = 0usize;
            for r in &s.records {
                if n > 0 && bytes + r.len() > max {
                    break;
                }
                bytes += r.len();
                n += 1;
            }
            let records: Vec<Vec<u8>> = s.records.drain(..n).collect();
            let first_ei = s.first_ei;
            s.first_ei += n as u64;
            Taken::Records {
                first_ei,
                last_ei: first_ei + n as u64 - 1,
                records,
            }
        })
    }

    /// Records of `raw` bytes taken became a frame of `compressed` bytes:
    /// what is held shrinks to what memory really keeps.
    pub fn framed(&self, raw: usize, compressed: usize) {
        let less = raw.saturating_sub(compressed);
        self.with(|s| s.held = s.held.saturating_sub(less));
        self.process.give_back(less);
        self.room.notify_waiters();
    }

    /// Holding half of what it may: auth should store what it has at once.
    pub fn pressed(&self) -> bool {
        self.with(|s| s.held >= self.cap / 2) || self.process.held() >= self.process.cap / 2
    }

    /// Frames of `n` bytes were acknowledged: their room is free again.
    pub fn release(&self, n: usize) {
        self.with(|s| s.held = s.held.saturating_sub(n));
        self.process.give_back(n);
        self.room.notify_waiters();
    }

    /// The recorder wrote its last event.
    pub fn end(&self) {
        self.with(|s| s.ended = true);
        self.more.notify_one();
    }

    pub fn ended(&self) -> bool {
        self.with(|s| s.ended)
    }

    /// The recording failed: waiters are woken, and what is held is let go.
    pub fn fail(&self, reason: &str) {
        let held = self.with(|s| {
            s.failed.get_or_insert_with(|| reason.to_string());
            s.records.clear();
            std::mem::take(&mut s.held)
        });
        self.process.give_back(held);
        self.room.notify_waiters();
        self.more.notify_one();
    }

    pub fn failed(&self) -> Option<String> {
        self.with(|s| s.failed.clone())
    }

    /// Woken when there may be more to take.
    pub async fn more(&self) {
        self.more.notified().await
    }

    pub fn set_opened(&self) {
        self.with(|s| s.opened = true);
        self.opened.notify_waiters();
    }

    /// Waits until auth answered the stream's opening, or the recording failed.
    pub async fn opened(&self) -> Result<(), String> {
        loop {
            let notified = self.opened.notified();
            let room = self.room.notified();
            tokio::pin!(notified, room);
            notified.as_mut().enable();
            room.as_mut().enable();
            match self.with(|s| (s.opened, s.failed.clone())) {
                (_, Some(reason)) => return Err(reason),
                (true, None) => return Ok(()),
                (false, None) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = room => {}
                    }
                }
            }
        }
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        let held = self.with(|s| std::mem::take(&mut s.held));
        self.process.give_back(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: usize) -> Vec<u8> {
        let mut r = (len as u32).to_be_bytes().to_vec();
        r.extend(std::iter::repeat_n(7u8, len));
        r
    }

    #[tokio::test(start_paused = true)]
    async fn the_recorder_waits_for_room_until_frames_are_acknowledged() {
        let process = ProcessBudget::new(1 << 20);
        let b = Backlog::new(100, process.clone());
        b.push(0, record(60));
        b.room().await.unwrap();
        b.push(1, record(60));
        let waiting = tokio::time::timeout(std::time::Duration::from_secs(5), b.room()).await;
        assert!(waiting.is_err(), "full: the recorder waits");
        let Taken::Records {
            first_ei,
            last_ei,
            records,
        } = b.take(usize::MAX)
        else {
            panic!("records expected")
        };
        let bytes: usize = records.iter().map(Vec::len).sum();
        assert_eq!((first_ei, last_ei, bytes), (0, 1, 128));
        // Taken is not freed: only an acknowledgement frees room.
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(5), b.room())
                .await
                .is_err()
        );
        b.release(128);
        b.room().await.unwrap();
        assert_eq!(process.held(), 0);
        b.fail("gone");
        assert_eq!(b.room().await.unwrap_err(), "gone");
    }

    #[test]
    fn takes_whole_records_and_spills_when_full() {
        let process = ProcessBudget::new(1 << 20);
        let b = Backlog::new(200, process);
        for ei in 0..3 {
            assert!(b.keep_or_spill(54, ei, ei * 54));
            b.push(ei, record(50));
        }
        assert!(!b.keep_or_spill(54, 3, 162), "the fourth does not fit");
        assert!(!b.keep_or_spill(1, 4, 216), "once spilled, always spilled");
        match b.take(100) {
            Taken::Records {
                first_ei, last_ei, ..
            } => assert_eq!((first_ei, last_ei), (0, 0)),
            other => panic!("{other:?}"),
        }
        match b.take(usize::MAX) {
            Taken::Records {
                first_ei, last_ei, ..
            } => assert_eq!((first_ei, last_ei), (1, 2)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(b.take(100), Taken::Spilled { ei: 3, offset: 162 }));
    }
}
