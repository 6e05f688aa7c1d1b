//! The recorder's local spool: `<dir>/<sid>.events`, events appended as the
//! session runs (`[u32 BE length][protobuf]`, as inside a part but not
//! compressed), synced to disk at least every second. A file that cannot be
//! read is moved to `<dir>/corrupt/` with a `.error` note and never retried.
//! The spool knows its own size (every file under it, the corrupt ones too)
//! and the free space of its file system, for the bounds operators set.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;

use crate::event::RecordingEvent;
use crate::part::{MAX_EVENT, encode_record};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool file {path} is damaged at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    /// Bytes of every file under `dir`.
    size: Arc<AtomicU64>,
    /// Free space to report instead of the file system's (tests); MAX: none.
    pretend_free: Arc<AtomicU64>,
    /// The last reading of the free space, and when: every session of a
    /// process checks it, the file system is asked at most twice a second.
    free_seen: Arc<std::sync::Mutex<Option<(std::time::Instant, u64)>>>,
}

/// Bytes of the files under `dir`, recursively.
fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

fn valid_sid(sid: &str) -> bool {
    !sid.is_empty() && sid.len() <= 64 && sid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

impl Spool {
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir.join("corrupt")).map_err(io(dir))?;
        // Leftover checkpoints of an earlier version are not needed.
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".checkpoint") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            size: Arc::new(AtomicU64::new(tree_size(dir))),
            pretend_free: Arc::new(AtomicU64::new(u64::MAX)),
            free_seen: Arc::default(),
        })
    }

    /// Bytes in the spool now.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Makes [`Spool::free_space`] report `free` (a disk filling up, in
    /// tests); `None`: the file system's real figure again.
    pub fn pretend_free_space(&self, free: Option<u64>) {
        self.pretend_free
            .store(free.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Bytes free for unprivileged users on the spool's file system.
    pub fn free_space(&self) -> Result<u64, SpoolError> {
        let pretend = self.pretend_free.load(Ordering::Relaxed);
        if pretend != u64::MAX {
            return Ok(pretend);
        }
        let mut seen = self.free_seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, free)) = *seen
            && at.elapsed() < std::time::Duration::from_millis(500)
        {
            return Ok(free);
        }
        let st = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| SpoolError::Io {
            path: self.dir.clone(),
            source: std::io::Error::from(e),
        })?;
        #[allow(clippy::unnecessary_cast)]
        let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
        *seen = Some((std::time::Instant::now(), free));
        Ok(free)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn events_path(&self, sid: &str) -> PathBuf {
        self.dir.join(format!("{sid}.events"))
    }

    /// A new session's file.
    pub fn create(&self, sid: &str) -> Result<SpoolWriter, SpoolError> {
        let path = self.events_path(sid);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let durable = file.try_clone().map_err(io(&path))?;
        Ok(SpoolWriter {
            path,
            file: BufWriter::with_capacity(64 * 1024, file),
            durable: Arc::new(durable),
            dirty: false,
            written: 0,
            spool_size: self.size.clone(),
        })
    }

    /// Sessions with spooled events, by sid.
    pub fn sessions(&self) -> Result<Vec<String>, SpoolError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(sid) = name.strip_suffix(".events") {
                out.push(sid.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads the complete records in the `limit` bytes after byte `offset`
    /// (at least one record's worth, so a record of the largest size is
    /// never split); returns them and the offset after the last complete
    /// one. A record cut short at the end is not an error (it is still being
    /// written, a crash cut it, or the limit did: read on from the offset).
    pub fn read_from(
        &self,
        sid: &str,
        offset: u64,
        limit: usize,
    ) -> Result<(Vec<RecordingEvent>, u64), SpoolError> {
        let path = self.events_path(sid);
        let mut file = File::open(&path).map_err(io(&path))?;
        file.seek(SeekFrom::Start(offset)).map_err(io(&path))?;
        let limit = limit.max(MAX_EVENT + 4);
        let mut buf = Vec::new();
        file.take(limit as u64)
            .read_to_end(&mut buf)
            .map_err(io(&path))?;
        let mut events = Vec::new();
        let mut at = 0usize;
        while at + 4 <= buf.len() {
            let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let corrupt = |reason: String| SpoolError::Corrupt {
                path: path.clone(),
                offset: offset + at as u64,
                reason,
            };
            if len == 0 || len > MAX_EVENT {
                return Err(corrupt(format!("record length {len}")));
            }
            let Some(body) = buf.get(at + 4..at + 4 + len) else {
                break;
            };
            let event = RecordingEvent::decode(body).map_err(|e| corrupt(e.to_string()))?;
            if !valid_sid(&event.sid) || event.sid != sid {
                return Err(corrupt(format!(
                    "event of session {:?} in the file of {sid}",
                    event.sid
                )));
            }
            events.push(event);
            at += 4 + len;
        }
        Ok((events, offset + at as u64))
    }

    /// Deletes a session's spool once auth has the whole recording.
    pub fn remove(&self, sid: &str) -> Result<(), SpoolError> {
        let path = self.events_path(sid);
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.size.fetch_sub(len.min(self.size()), Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Moves a session's spool aside with a note saying why.
    pub fn quarantine(&self, sid: &str, reason: &str) -> Result<PathBuf, SpoolError> {
        let corrupt = self.dir.join("corrupt");
        let target = corrupt.join(format!("{sid}.events"));
        let from = self.events_path(sid);
        fs::rename(&from, &target).map_err(io(&from))?;
        // Written aside and renamed: whoever sees the note sees all of it.
        let note = corrupt.join(format!("{sid}.error"));
        let partial = corrupt.join(format!("{sid}.error.partial"));
        fs::write(&partial, format!("{reason}\n")).map_err(io(&partial))?;
        fs::rename(&partial, &note).map_err(io(&note))?;
        Ok(target)
    }
}

/// Appends one session's events.
#[derive(Debug)]
pub struct SpoolWriter {
    path: PathBuf,
    file: BufWriter<File>,
    /// The same file, for syncing while appends go on.
    durable: Arc<File>,
    dirty: bool,
    /// Bytes appended so far: where the next record starts.
    written: u64,
    spool_size: Arc<AtomicU64>,
}

/// What was appended up to a moment, handed to the kernel and waiting to be
/// made durable with [`PendingSync::wait`].
#[derive(Debug)]
pub struct PendingSync {
    path: PathBuf,
    file: Arc<File>,
}

impl PendingSync {
    /// Blocks until the data is on disk.
    pub fn wait(self) -> Result<(), SpoolError> {
        self.file.sync_data().map_err(io(&self.path))
    }
}

impl SpoolWriter {
    pub fn append(&mut self, event: &RecordingEvent) -> Result<(), SpoolError> {
        let mut record = Vec::with_capacity(event.data.len() + 64);
        encode_record(event, &mut record);
        self.append_records(&record)
    }

    /// Appends records already encoded (`[u32 BE length][protobuf]`).
    pub fn append_records(&mut self, records: &[u8]) -> Result<(), SpoolError> {
        self.file.write_all(records).map_err(io(&self.path))?;
        self.dirty = true;
        self.written += records.len() as u64;
        self.spool_size
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Where the next record will start in the file.
    pub fn offset(&self) -> u64 {
        self.written
    }

    /// Pushes what was appended to disk. Returns whether there was anything.
    pub fn sync(&mut self) -> Result<bool, SpoolError> {
        match self.start_sync()? {
            Some(pending) => pending.wait().map(|()| true),
            None => Ok(false),
        }
    }

    /// Hands what was appended to the kernel (fast) and returns the slow
    /// part, the wait for the disk, to do without holding up appends.
    /// `None` when nothing was appended since the last sync.
    pub fn start_sync(&mut self) -> Result<Option<PendingSync>, SpoolError> {
        if !self.dirty {
            return Ok(None);
        }
        self.file.flush().map_err(io(&self.path))?;
        self.dirty = false;
        Ok(Some(PendingSync {
            path: self.path.clone(),
            file: self.durable.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sid: &str, ei: u64) -> RecordingEvent {
        RecordingEvent {
            ei,
            sid: sid.into(),
            event: "print".into(),
            data: vec![b'x'; 10],
            ..Default::default()
        }
    }

    #[test]
    fn reads_complete_records_and_stops_at_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let sid = "0b5f1d2e-aaaa-4bbb-8ccc-123456789abc";
        let mut w = spool.create(sid).unwrap();
        for i in 0..3 {
            w.append(&event(sid, i)).unwrap();
        }
        w.sync().unwrap();
        let (events, end) = spool.read_from(sid, 0, usize::MAX).unwrap();
        assert_eq!(events.len(), 3);
        // A half-written record at the end is left for later.
        let mut f = OpenOptions::new()
            .append(true)
            .open(spool.events_path(sid))
            .unwrap();
        f.write_all(&[0, 0, 0, 40, 1, 2]).unwrap();
        let (more, end2) = spool.read_from(sid, end, usize::MAX).unwrap();
        assert!(more.is_empty());
        assert_eq!(end2, end);
        assert_eq!(spool.sessions().unwrap(), vec![sid.to_string()]);
    }

    #[test]
    fn a_limited_read_takes_whole_records_and_goes_on_from_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let sid = "0b5f1d2e-aaaa-4bbb-8ccc-123456789abd";
        let mut w = spool.create(sid).unwrap();
        let big = |ei| RecordingEvent {
            data: vec![b'y'; 700 * 1024],
            ..event(sid, ei)
        };
        for i in 0..5 {
            w.append(&big(i)).unwrap();
        }
        w.sync().unwrap();
        // The limit is raised to one largest record: one 700 KiB event fits
        // per read, never half of one.
        let (mut offset, mut seen) = (0, Vec::new());
        loop {
            let (events, next) = spool.read_from(sid, offset, 1).unwrap();
            if events.is_empty() {
                break;
            }
            assert_eq!(events.len(), 1);
            seen.extend(events.into_iter().map(|e| e.ei));
            offset = next;
        }
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        assert_eq!(offset, fs::metadata(spool.events_path(sid)).unwrap().len());
    }

    #[test]
    fn garbage_is_corrupt_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let sid = "11111111-2222-4333-8444-555555555555";
        fs::write(spool.events_path(sid), b"\xff\xff\xff\xffgarbage").unwrap();
        let err = spool.read_from(sid, 0, usize::MAX).unwrap_err();
        assert!(
            matches!(err, SpoolError::Corrupt { offset: 0, .. }),
            "{err}"
        );
        let moved = spool.quarantine(sid, &err.to_string()).unwrap();
        assert!(moved.exists());
        assert!(spool.sessions().unwrap().is_empty());
        assert!(dir.path().join(format!("corrupt/{sid}.error")).exists());
    }
}
