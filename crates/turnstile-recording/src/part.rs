//! The part format (see docs/recording-format.md): a 32-byte header (magic,
//! version, flags, payload and padding lengths), a payload of one or more
//! zstd frames holding length-prefixed protobuf events, then zero padding.
//! Parts are independent: a reader can start at any part, a writer can
//! resume after the last part it knows was stored.
//!
//! Events are compressed once, by the recorder, into [`Frame`]s; auth joins
//! frames into parts without compressing them again.

use std::io::Read;

use prost::Message;

use crate::event::RecordingEvent;

pub const MAGIC: [u8; 8] = *b"TSREC\r\n\x1a";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;
/// zstd level of frames: fast, and terminal output compresses well.
pub const ZSTD_LEVEL: i32 = 1;
/// The largest event (encoded) a reader accepts.
pub const MAX_EVENT: usize = 1 << 20;
/// The most uncompressed record bytes in one frame a recorder sends; auth
/// refuses larger ones, so what it decompresses to check a frame is bounded.
pub const MAX_FRAME_RAW: usize = 4 << 20;

/// Appends `[u32 BE length][protobuf]` for `event` to `out`.
pub fn encode_record(event: &RecordingEvent, out: &mut Vec<u8>) {
    let len = event.encoded_len();
    out.reserve(len + 4);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    event.encode(out).unwrap_or_default();
}

/// The 32-byte header of a part.
pub fn header(payload_len: usize, padding: usize) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&VERSION.to_be_bytes());
    out[16..24].copy_from_slice(&(payload_len as u64).to_be_bytes());
    out[24..32].copy_from_slice(&(padding as u64).to_be_bytes());
    out
}

/// One part whose payload is `payload` (zstd frames, concatenated), padded
/// with zeros so the part is at least `pad_to` bytes.
pub fn part_from_payload<'a>(
    payload: impl IntoIterator<Item = &'a [u8]> + Clone,
    pad_to: usize,
) -> Vec<u8> {
    let payload_len: usize = payload.clone().into_iter().map(<[u8]>::len).sum();
    let padding = pad_to.saturating_sub(HEADER_LEN + payload_len);
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len + padding);
    out.extend_from_slice(&header(payload_len, padding));
    for p in payload {
        out.extend_from_slice(p);
    }
    out.resize(HEADER_LEN + payload_len + padding, 0);
    out
}

/// One part holding `records` (already length-prefixed) in one frame,
/// padded to at least `pad_to` bytes.
pub fn encode_part(records: &[u8], pad_to: usize) -> std::io::Result<Vec<u8>> {
    let payload = compress(records)?;
    Ok(part_from_payload([payload.as_slice()], pad_to))
}

/// One zstd frame of `records`, in a buffer of its own size: frames wait for
/// their acknowledgement, and zstd's buffer is as big as the input (a
/// thousand sessions' frames of repeated lines held 100 MiB more than their
/// bytes).
pub fn compress(records: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut zstd = zstd::bulk::compress(records, ZSTD_LEVEL)?;
    zstd.shrink_to_fit();
    Ok(zstd)
}

/// Consecutive events, compressed: one or more zstd frames of their records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub first_ei: u64,
    pub last_ei: u64,
    pub zstd: Vec<u8>,
    /// Uncompressed size of the records.
    pub raw_len: u64,
}

impl Frame {
    /// Compresses `records`, which hold events `first_ei..=last_ei`.
    pub fn compress(first_ei: u64, last_ei: u64, records: &[u8]) -> std::io::Result<Self> {
        Ok(Self {
            first_ei,
            last_ei,
            zstd: compress(records)?,
            raw_len: records.len() as u64,
        })
    }

    /// Compresses records given one by one (events `first_ei..=last_ei`).
    pub fn compress_records(
        first_ei: u64,
        last_ei: u64,
        records: &[Vec<u8>],
    ) -> std::io::Result<Self> {
        match records {
            [one] => Self::compress(first_ei, last_ei, one),
            _ => Self::compress(first_ei, last_ei, &records.concat()),
        }
    }

    pub fn from_proto(f: turnstile_api::rpc::proto::RecordFrame) -> Self {
        Self {
            first_ei: f.first_ei,
            last_ei: f.last_ei,
            zstd: f.zstd,
            raw_len: f.raw_len,
        }
    }

    pub fn into_proto(self) -> turnstile_api::rpc::proto::RecordFrame {
        turnstile_api::rpc::proto::RecordFrame {
            first_ei: self.first_ei,
            last_ei: self.last_ei,
            zstd: self.zstd,
            raw_len: self.raw_len,
        }
    }

    /// The frame's events, decompressed as a stream (never more than one
    /// record in memory besides the events returned), refusing more than
    /// `max_raw` bytes of records.
    pub fn events(&self, max_raw: usize) -> Result<Vec<RecordingEvent>, String> {
        let decoder = zstd::stream::read::Decoder::new(self.zstd.as_slice())
            .map_err(|e| format!("frame does not decompress: {e}"))?;
        let mut records = Records::new(decoder.take(max_raw as u64 + 1));
        let mut out = Vec::new();
        while let Some(event) = records.next_event()? {
            out.push(event);
        }
        if records.consumed > max_raw as u64 {
            return Err(format!("frame holds more than {max_raw} bytes of events"));
        }
        Ok(out)
    }
}

/// What auth needs to know of a frame's events, read without copying their
/// output: their indexes, whose they are, and the session's stop time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameSummary {
    pub count: u64,
    pub first_ei: Option<u64>,
    pub last_ei: Option<u64>,
    /// Every event's index follows the one before it.
    pub consecutive: bool,
    /// Every event names this session and this server.
    pub owned: bool,
    /// `session_stop_ms` of a `session.end` among them.
    pub stop_ms: Option<i64>,
}

impl Frame {
    /// Reads the frame's records as a stream (one record's bytes in memory
    /// at a time, none of their output copied out), refusing more than
    /// `max_raw` bytes of records.
    pub fn summarize(
        &self,
        max_raw: usize,
        sid: &str,
        server_id: &str,
    ) -> Result<FrameSummary, String> {
        let decoder = zstd::stream::read::Decoder::new(self.zstd.as_slice())
            .map_err(|e| format!("frame does not decompress: {e}"))?;
        let mut src = decoder.take(max_raw as u64 + 1);
        let mut out = FrameSummary {
            consecutive: true,
            owned: true,
            ..Default::default()
        };
        let mut body = Vec::new();
        let mut consumed = 0u64;
        loop {
            let mut len_bytes = [0u8; 4];
            match read_full(&mut src, &mut len_bytes) {
                Ok(0) => break,
                Ok(4) => {}
                Ok(_) => return Err(format!("truncated record length at {consumed}")),
                Err(e) => return Err(format!("at {consumed}: {e}")),
            }
            let len = u32::from_be_bytes(len_bytes) as usize;
            if len == 0 || len > MAX_EVENT {
                return Err(format!("record of {len} bytes at {consumed}"));
            }
            body.resize(len, 0);
            match read_full(&mut src, &mut body) {
                Ok(n) if n == len => {}
                Ok(_) => return Err(format!("truncated record at {consumed}")),
                Err(e) => return Err(format!("at {consumed}: {e}")),
            }
            consumed += 4 + len as u64;
            let fields =
                scan_event(&body).ok_or_else(|| format!("record at {consumed} does not decode"))?;
            if let Some(last) = out.last_ei
                && fields.ei != last + 1
            {
                out.consecutive = false;
            }
            out.first_ei.get_or_insert(fields.ei);
            out.last_ei = Some(fields.ei);
            out.count += 1;
            out.owned &= fields.sid == sid.as_bytes() && fields.server_id == server_id.as_bytes();
            if fields.is_end {
                out.stop_ms = Some(fields.stop_ms);
            }
        }
        if consumed > max_raw as u64 {
            return Err(format!("frame holds more than {max_raw} bytes of events"));
        }
        Ok(out)
    }
}

/// The fields of an encoded `RecordingEvent` that checks need.
struct ScannedEvent<'a> {
    ei: u64,
    sid: &'a [u8],
    server_id: &'a [u8],
    is_end: bool,
    stop_ms: i64,
}

/// Reads a protobuf varint.
fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Walks an encoded `RecordingEvent` (see turnstile.proto) for `ei` (1),
/// `event` (2), `sid` (4), `server_id` (5) and `session_stop_ms` (17),
/// skipping everything else; `None` if it is not well-formed protobuf.
fn scan_event(buf: &[u8]) -> Option<ScannedEvent<'_>> {
    let mut e = ScannedEvent {
        ei: 0,
        sid: &[],
        server_id: &[],
        is_end: false,
        stop_ms: 0,
    };
    let mut at = 0usize;
    while at < buf.len() {
        let key = varint(buf, &mut at)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(buf, &mut at)?;
                match field {
                    1 => e.ei = v,
                    17 => e.stop_ms = v as i64,
                    _ => {}
                }
            }
            1 => at = at.checked_add(8).filter(|&a| a <= buf.len())?,
            5 => at = at.checked_add(4).filter(|&a| a <= buf.len())?,
            2 => {
                let len = usize::try_from(varint(buf, &mut at)?).ok()?;
                let end = at.checked_add(len).filter(|&a| a <= buf.len())?;
                let bytes = &buf[at..end];
                match field {
                    2 => e.is_end = bytes == crate::event::SESSION_END.as_bytes(),
                    4 => e.sid = bytes,
                    5 => e.server_id = bytes,
                    _ => {}
                }
                at = end;
            }
            _ => return None,
        }
    }
    Some(e)
}

/// Length-prefixed records read one at a time from a stream.
pub struct Records<R> {
    src: R,
    /// Bytes read so far.
    pub consumed: u64,
}

impl<R: Read> Records<R> {
    pub fn new(src: R) -> Self {
        Self { src, consumed: 0 }
    }

    pub fn into_inner(self) -> R {
        self.src
    }

    /// The next event, `None` at a clean end (between records). The error
    /// says what is wrong and where (the offset of the record).
    pub fn next_event(&mut self) -> Result<Option<RecordingEvent>, String> {
        let at = self.consumed;
        let mut len_bytes = [0u8; 4];
        match read_full(&mut self.src, &mut len_bytes) {
            Ok(0) => return Ok(None),
            Ok(4) => {}
            Ok(_) => return Err(format!("truncated record length at {at}")),
            Err(e) => return Err(format!("at {at}: {e}")),
        }
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len == 0 || len > MAX_EVENT {
            return Err(format!("record of {len} bytes at {at}"));
        }
        let mut body = vec![0u8; len];
        match read_full(&mut self.src, &mut body) {
            Ok(n) if n == len => {}
            Ok(_) => return Err(format!("truncated record at {at}")),
            Err(e) => return Err(format!("at {at}: {e}")),
        }
        self.consumed += 4 + len as u64;
        RecordingEvent::decode(body.as_slice())
            .map(Some)
            .map_err(|e| format!("record at {at}: {e}"))
    }
}

/// Reads until `buf` is full or the end; returns how much was read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(ei: u64, data: &[u8]) -> RecordingEvent {
        RecordingEvent {
            ei,
            event: "print".into(),
            data: data.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn a_frame_round_trips_and_refuses_to_grow_past_its_bound() {
        let mut records = Vec::new();
        for i in 0..10 {
            encode_record(&print(i, &[b'x'; 1000]), &mut records);
        }
        let frame = Frame::compress(0, 9, &records).unwrap();
        assert!(frame.zstd.len() < records.len() / 10, "compressed");
        let events = frame.events(MAX_FRAME_RAW).unwrap();
        assert_eq!(events.len(), 10);
        assert_eq!(events[9].ei, 9);
        let err = frame.events(records.len() - 1).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn a_summary_reads_indexes_and_owners_without_decoding_output() {
        let ev = |ei: u64, sid: &str, kind: &str| RecordingEvent {
            ei,
            event: kind.into(),
            sid: sid.into(),
            server_id: "node".into(),
            data: vec![7; 5000],
            session_stop_ms: 42,
            ..Default::default()
        };
        let mut records = Vec::new();
        for e in [
            ev(3, "s", "print"),
            ev(4, "s", "print"),
            ev(5, "s", "session.end"),
        ] {
            encode_record(&e, &mut records);
        }
        let f = Frame::compress(3, 5, &records).unwrap();
        let sum = f.summarize(MAX_FRAME_RAW, "s", "node").unwrap();
        assert_eq!(
            sum,
            FrameSummary {
                count: 3,
                first_ei: Some(3),
                last_ei: Some(5),
                consecutive: true,
                owned: true,
                stop_ms: Some(42),
            }
        );
        assert!(!f.summarize(MAX_FRAME_RAW, "other", "node").unwrap().owned);
        let mut gap = Vec::new();
        for e in [ev(1, "s", "print"), ev(3, "s", "print")] {
            encode_record(&e, &mut gap);
        }
        let f = Frame::compress(1, 3, &gap).unwrap();
        assert!(!f.summarize(MAX_FRAME_RAW, "s", "node").unwrap().consecutive);
        let garbage = Frame::compress(0, 0, &[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
        assert!(garbage.summarize(MAX_FRAME_RAW, "s", "node").is_err());
    }

    proptest::proptest! {
        #[test]
        fn the_scanner_agrees_with_prost(ei in 0u64..u64::MAX, stop in proptest::prelude::any::<i64>(), sid in "[a-f0-9-]{0,40}", data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let e = RecordingEvent { ei, sid: sid.clone(), server_id: "srv".into(), event: "session.end".into(), data, session_stop_ms: stop, cols: 80, ..Default::default() };
            let buf = e.encode_to_vec();
            let scanned = scan_event(&buf).unwrap();
            proptest::prop_assert_eq!(scanned.ei, ei);
            proptest::prop_assert_eq!(scanned.sid, sid.as_bytes());
            proptest::prop_assert_eq!(scanned.server_id, b"srv");
            proptest::prop_assert!(scanned.is_end);
            proptest::prop_assert_eq!(scanned.stop_ms, stop);
        }

        #[test]
        fn the_scanner_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = scan_event(&bytes);
        }
    }

    #[test]
    fn parts_join_frames_without_recompressing() {
        let mut a = Vec::new();
        encode_record(&print(0, b"one"), &mut a);
        let mut b = Vec::new();
        encode_record(&print(1, b"two"), &mut b);
        let (fa, fb) = (compress(&a).unwrap(), compress(&b).unwrap());
        let part = part_from_payload([fa.as_slice(), fb.as_slice()], 256);
        assert_eq!(part.len(), 256);
        let events = crate::reader::read_events(&part).unwrap();
        assert_eq!(events.iter().map(|e| e.ei).collect::<Vec<_>>(), [0, 1]);
    }
}
