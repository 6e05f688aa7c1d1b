//! The part format (see docs/recording-format.md): a 32-byte header (magic,
//! version, flags, payload and padding lengths), a zstd frame of
//! length-prefixed protobuf events, then zero padding. Parts are independent:
//! a reader can start at any part, a writer can resume after the last part it
//! knows was stored.

use prost::Message;

use crate::event::RecordingEvent;

pub const MAGIC: [u8; 8] = *b"TSREC\r\n\x1a";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;
/// zstd level used for parts: fast, and terminal output compresses well.
pub const ZSTD_LEVEL: i32 = 3;
/// The largest event (encoded) a reader accepts.
pub const MAX_EVENT: usize = 1 << 20;

/// Appends `[u32 BE length][protobuf]` for `event` to `out`.
pub fn encode_record(event: &RecordingEvent, out: &mut Vec<u8>) {
    let len = event.encoded_len();
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    event.encode(out).unwrap_or_default();
}

/// One part holding `records` (already length-prefixed), padded with zeros so
/// the part is at least `pad_to` bytes.
pub fn encode_part(records: &[u8], pad_to: usize) -> std::io::Result<Vec<u8>> {
    let payload = zstd::bulk::compress(records, ZSTD_LEVEL)?;
    let unpadded = HEADER_LEN + payload.len();
    let padding = pad_to.saturating_sub(unpadded);
    let mut out = Vec::with_capacity(unpadded + padding);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(&(padding as u64).to_be_bytes());
    out.extend_from_slice(&payload);
    out.resize(unpadded + padding, 0);
    Ok(out)
}

/// Collects events into parts of at least `min_part` bytes of records.
#[derive(Debug)]
pub struct PartWriter {
    min_part: usize,
    records: Vec<u8>,
    first_ei: Option<u64>,
    last_ei: Option<u64>,
}

/// A finished part and the events it holds.
#[derive(Debug, Clone)]
pub struct FinishedPart {
    pub bytes: Vec<u8>,
    pub first_ei: u64,
    pub last_ei: u64,
}

impl PartWriter {
    pub fn new(min_part: usize) -> Self {
        Self {
            min_part,
            records: Vec::new(),
            first_ei: None,
            last_ei: None,
        }
    }

    pub fn push(&mut self, event: &RecordingEvent) {
        encode_record(event, &mut self.records);
        self.first_ei.get_or_insert(event.ei);
        self.last_ei = Some(event.ei);
    }

    pub fn buffered(&self) -> usize {
        self.records.len()
    }

    pub fn last_ei(&self) -> Option<u64> {
        self.last_ei
    }

    /// A part padded to the minimum size, once enough is buffered.
    pub fn take_full(&mut self) -> std::io::Result<Option<FinishedPart>> {
        if self.records.len() < self.min_part {
            return Ok(None);
        }
        self.take(self.min_part)
    }

    /// Whatever is buffered, unpadded: the last part of a recording.
    pub fn take_last(&mut self) -> std::io::Result<Option<FinishedPart>> {
        self.take(0)
    }

    fn take(&mut self, pad_to: usize) -> std::io::Result<Option<FinishedPart>> {
        let (Some(first_ei), Some(last_ei)) = (self.first_ei, self.last_ei) else {
            return Ok(None);
        };
        let bytes = encode_part(&self.records, pad_to)?;
        self.records.clear();
        self.first_ei = None;
        self.last_ei = None;
        Ok(Some(FinishedPart {
            bytes,
            first_ei,
            last_ei,
        }))
    }
}
