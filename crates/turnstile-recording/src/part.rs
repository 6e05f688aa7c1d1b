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

/// One zstd frame of `records`.
pub fn compress(records: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(records, ZSTD_LEVEL)
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
