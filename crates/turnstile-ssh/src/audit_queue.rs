//! A node's (or proxy's) audit events on their way to auth, on disk: what
//! auth has not acknowledged survives an auth outage, a restart and a crash
//! of this process (all but the last batch not yet written). Events get a
//! sequence number here, per queue, so auth can tell a gap from a resend.
//!
//! Layout of the directory: `queue_id` (this queue's random name, made once;
//! sequence numbers count within it), `acked` (the highest sequence number
//! auth has), and segments `<first seq, 20 digits>.q` of lines
//! `{"seq":N,"event":{…}}`, rotated at [`SEGMENT_BYTES`]. A segment is
//! deleted once auth has all of it.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use turnstile_api::audit::AuditEvent;

/// Segments are rotated past this size.
pub const SEGMENT_BYTES: u64 = 4 << 20;

/// One queued event as written.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    seq: u64,
    event: AuditEvent,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    bytes: u64,
}

/// The queue. Not thread-safe; the forwarder holds it behind a mutex and
/// calls it from blocking threads.
#[derive(Debug)]
pub struct AuditQueue {
    dir: PathBuf,
    queue_id: String,
    segments: Vec<Segment>,
    next_seq: u64,
    acked: u64,
    /// Where the next unsent line starts: (segment first seq, byte offset, seq).
    cursor: Option<(u64, u64, u64)>,
}

fn io(path: &Path, e: std::io::Error) -> String {
    format!("audit queue {}: {e}", path.display())
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.q")
}

impl AuditQueue {
    /// Opens (or creates) the queue in `dir`, repairing a last line a crash
    /// cut short.
    pub fn open(dir: &Path) -> Result<Self, String> {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let id_path = dir.join("queue_id");
        let queue_id = match fs::read_to_string(&id_path) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                write_atomically(&id_path, id.as_bytes())?;
                id
            }
        };
        let acked = fs::read_to_string(dir.join("acked"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mut segments = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let entry = entry.map_err(|e| io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(first) = name.strip_suffix(".q").and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let path = entry.path();
            let bytes = entry.metadata().map_err(|e| io(&path, e))?.len();
            segments.push(Segment {
                first_seq: first,
                path,
                bytes,
            });
        }
        segments.sort_by_key(|s| s.first_seq);
        let mut next_seq = acked + 1;
        if let Some(last) = segments.last_mut() {
            let (kept, last_seq) = scan_whole_lines(&last.path)?;
            if kept < last.bytes {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&last.path)
                    .map_err(|e| io(&last.path, e))?;
                f.set_len(kept).map_err(|e| io(&last.path, e))?;
                last.bytes = kept;
            }
            next_seq = next_seq.max(last_seq.map_or(last.first_seq, |s| s + 1));
        }
        let mut q = Self {
            dir: dir.to_path_buf(),
            queue_id,
            segments,
            next_seq,
            acked,
            cursor: None,
        };
        q.drop_acked_segments();
        Ok(q)
    }

    pub fn queue_id(&self) -> &str {
        &self.queue_id
    }

    /// Bytes on disk not yet known to auth (whole segments, so a little more).
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Events written and not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.next_seq - 1 - self.acked.min(self.next_seq - 1)
    }

    /// Appends `events` with the next sequence numbers, synced to disk once.
    pub fn append(&mut self, events: &[AuditEvent]) -> Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        if self
            .segments
            .last()
            .is_none_or(|s| s.bytes >= SEGMENT_BYTES)
        {
            let path = self.dir.join(segment_name(self.next_seq));
            File::create(&path).map_err(|e| io(&path, e))?;
            self.segments.push(Segment {
                first_seq: self.next_seq,
                path,
                bytes: 0,
            });
        }
        let mut text = Vec::new();
        let mut seq = self.next_seq;
        for event in events {
            let line = Line {
                seq,
                event: event.clone(),
            };
            serde_json::to_writer(&mut text, &line).map_err(|e| e.to_string())?;
            text.push(b'\n');
            seq += 1;
        }
        let seg = self.segments.last_mut().expect("a segment");
        let written = OpenOptions::new()
            .append(true)
            .open(&seg.path)
            .and_then(|mut f| {
                f.write_all(&text)?;
                f.sync_data()?;
                Ok(())
            });
        if let Err(e) = written {
            // Nothing of a failed batch stays: the file is cut back and the
            // numbers are given again to the retry.
            if let Ok(f) = OpenOptions::new().write(true).open(&seg.path) {
                let _ = f.set_len(seg.bytes);
            }
            return Err(io(&seg.path, e));
        }
        seg.bytes += text.len() as u64;
        self.next_seq = seq;
        Ok(())
    }

    /// Up to `max` unsent events after the last one handed out (or, after
    /// [`AuditQueue::rewind`], after the last acknowledged), as
    /// (seq, event JSON).
    pub fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, String)>, String> {
        let mut bytes = 0usize;
        let (seg_first, offset, mut seq) = match self.cursor {
            Some(c) => c,
            None => match self.locate(self.acked + 1)? {
                Some(c) => c,
                None => return Ok(Vec::new()),
            },
        };
        let mut out = Vec::new();
        let mut at = (seg_first, offset);
        for seg in self.segments.iter().filter(|s| s.first_seq >= seg_first) {
            let start = if seg.first_seq == seg_first { at.1 } else { 0 };
            let mut f = File::open(&seg.path).map_err(|e| io(&seg.path, e))?;
            f.seek(SeekFrom::Start(start))
                .map_err(|e| io(&seg.path, e))?;
            let mut reader = BufReader::new(f).take(seg.bytes.saturating_sub(start));
            let mut pos = start;
            let mut buf = String::new();
            loop {
                buf.clear();
                let n = reader.read_line(&mut buf).map_err(|e| io(&seg.path, e))?;
                if n == 0 || !buf.ends_with('\n') {
                    break;
                }
                pos += n as u64;
                let line: Line = serde_json::from_str(buf.trim_end())
                    .map_err(|e| format!("audit queue {}: {e}", seg.path.display()))?;
                seq = line.seq + 1;
                let json = serde_json::to_string(&line.event).unwrap_or_default();
                bytes += json.len();
                out.push((line.seq, json));
                at = (seg.first_seq, pos);
                if out.len() >= max || bytes >= max_bytes {
                    self.cursor = Some((at.0, at.1, seq));
                    return Ok(out);
                }
            }
            at = (seg.first_seq, pos);
        }
        self.cursor = Some((at.0, at.1, seq));
        Ok(out)
    }

    /// Hands out again from the last acknowledged event (after a failed send).
    pub fn rewind(&mut self) {
        self.cursor = None;
    }

    /// Auth has every event up to `seq`.
    pub fn ack(&mut self, seq: u64) -> Result<(), String> {
        if seq <= self.acked {
            return Ok(());
        }
        // On disk first: a restart must never number anew what auth has.
        write_atomically(&self.dir.join("acked"), seq.to_string().as_bytes())?;
        self.acked = seq;
        self.drop_acked_segments();
        Ok(())
    }

    /// Deletes the segments whose every event auth has; keeps the newest.
    fn drop_acked_segments(&mut self) {
        while self.segments.len() > 1 && self.segments[1].first_seq <= self.acked + 1 {
            let gone = self.segments.remove(0);
            let _ = fs::remove_file(&gone.path);
            if self.cursor.is_some_and(|c| c.0 == gone.first_seq) {
                self.cursor = None;
            }
        }
        // The newest segment, fully acknowledged and big: start afresh.
        if let Some(last) = self.segments.last()
            && self.acked + 1 >= self.next_seq
            && last.bytes >= SEGMENT_BYTES
        {
            let gone = self.segments.remove(0);
            let _ = fs::remove_file(&gone.path);
            self.cursor = None;
        }
    }

    /// Where the event `seq` starts: (segment first seq, offset, seq).
    fn locate(&self, seq: u64) -> Result<Option<(u64, u64, u64)>, String> {
        let Some(seg) = self.segments.iter().rev().find(|s| s.first_seq <= seq) else {
            return Ok(self.segments.first().map(|s| (s.first_seq, 0, s.first_seq)));
        };
        let f = File::open(&seg.path).map_err(|e| io(&seg.path, e))?;
        let mut reader = BufReader::new(f).take(seg.bytes);
        let mut pos = 0u64;
        let mut buf = String::new();
        loop {
            buf.clear();
            let n = reader.read_line(&mut buf).map_err(|e| io(&seg.path, e))?;
            if n == 0 || !buf.ends_with('\n') {
                return Ok(Some((seg.first_seq, pos, seq)));
            }
            let line_seq = serde_json::from_str::<Line>(buf.trim_end())
                .map(|l| l.seq)
                .unwrap_or(0);
            if line_seq >= seq {
                return Ok(Some((seg.first_seq, pos, seq)));
            }
            pos += n as u64;
        }
    }
}

/// The length of `path` up to its last whole line, and that line's seq.
fn scan_whole_lines(path: &Path) -> Result<(u64, Option<u64>), String> {
    let f = File::open(path).map_err(|e| io(path, e))?;
    let mut reader = BufReader::new(f);
    let mut kept = 0u64;
    let mut last = None;
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).map_err(|e| io(path, e))?;
        if n == 0 || !buf.ends_with('\n') {
            return Ok((kept, last));
        }
        match serde_json::from_str::<Line>(buf.trim_end()) {
            Ok(line) => last = Some(line.seq),
            Err(_) => return Ok((kept, last)),
        }
        kept += n as u64;
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_data().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> AuditEvent {
        AuditEvent::admin("user.create", "admin", &format!("u{n}"), [])
    }

    #[test]
    fn events_are_numbered_handed_out_in_order_and_kept_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = AuditQueue::open(dir.path()).unwrap();
        let id = q.queue_id().to_string();
        q.append(&(0..5).map(event).collect::<Vec<_>>()).unwrap();
        let batch = q.next_batch(3, usize::MAX).unwrap();
        assert_eq!(batch.iter().map(|b| b.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(q.next_batch(10, usize::MAX).unwrap().len(), 2);
        assert!(q.next_batch(10, usize::MAX).unwrap().is_empty());
        q.ack(3).unwrap();
        // Reopened (a restart), the unacknowledged events come again, with
        // their numbers, and new ones follow them.
        let mut q = AuditQueue::open(dir.path()).unwrap();
        assert_eq!(q.queue_id(), id);
        q.append(&[event(5)]).unwrap();
        let again: Vec<u64> = q
            .next_batch(10, usize::MAX)
            .unwrap()
            .iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(again, [4, 5, 6]);
        // A failed send is retried from the last acknowledged event.
        q.rewind();
        assert_eq!(q.next_batch(1, usize::MAX).unwrap()[0].0, 4);
        q.ack(6).unwrap();
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_dropped_and_numbering_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = AuditQueue::open(dir.path()).unwrap();
        q.append(&[event(0), event(1)]).unwrap();
        let seg = dir.path().join(segment_name(1));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"seq\":3,\"ev").unwrap();
        let mut q = AuditQueue::open(dir.path()).unwrap();
        q.append(&[event(2)]).unwrap();
        let seqs: Vec<u64> = q
            .next_batch(10, usize::MAX)
            .unwrap()
            .iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn acknowledged_segments_are_deleted_and_the_size_falls() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = AuditQueue::open(dir.path()).unwrap();
        let pad = "x".repeat(300);
        let big: Vec<AuditEvent> = (0..20_000)
            .map(|n| AuditEvent::admin("user.create", "admin", &format!("u{n}{pad}"), []))
            .collect();
        for chunk in big.chunks(1000) {
            q.append(chunk).unwrap();
        }
        assert!(q.segments.len() > 1, "rotated");
        let before = q.bytes();
        let mut sent = 0;
        loop {
            let batch = q.next_batch(700, usize::MAX).unwrap();
            let Some(last) = batch.last() else { break };
            sent += batch.len();
            q.ack(last.0).unwrap();
        }
        assert_eq!(sent, 20_000);
        assert!(q.bytes() < before / 2, "{} of {before}", q.bytes());
        assert_eq!(q.pending(), 0);
    }
}
