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
    let padding = pad_to.saturating_sub(HEADER_LEN + payload.len());
    let mut out = header(payload.len(), padding);
    out.extend_from_slice(&payload);
    out.resize(HEADER_LEN + payload.len() + padding, 0);
    Ok(out)
}

/// Collects events into parts of at least `min_part` bytes, compressing as
/// it goes so the size of a part is known before it is finished (and padding
/// stays small).
pub struct PartWriter {
    min_part: usize,
    encoder: Option<zstd::stream::Encoder<'static, Vec<u8>>>,
    first_ei: Option<u64>,
    last_ei: Option<u64>,
    raw: usize,
    raw_since_flush: usize,
}

impl std::fmt::Debug for PartWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartWriter")
            .field("min_part", &self.min_part)
            .field("first_ei", &self.first_ei)
            .field("last_ei", &self.last_ei)
            .finish()
    }
}

/// A finished part and the events it holds.
#[derive(Debug, Clone)]
pub struct FinishedPart {
    pub bytes: Vec<u8>,
    pub first_ei: u64,
    pub last_ei: u64,
}

fn header(payload_len: usize, padding: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len + padding);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    out.extend_from_slice(&(padding as u64).to_be_bytes());
    out
}

impl PartWriter {
    pub fn new(min_part: usize) -> Self {
        Self {
            min_part,
            encoder: None,
            first_ei: None,
            last_ei: None,
            raw: 0,
            raw_since_flush: 0,
        }
    }

    pub fn push(&mut self, event: &RecordingEvent) -> std::io::Result<()> {
        use std::io::Write;
        let mut record = Vec::with_capacity(event.data.len() + 64);
        encode_record(event, &mut record);
        if self.encoder.is_none() {
            self.encoder = Some(zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL)?);
        }
        if let Some(enc) = self.encoder.as_mut() {
            enc.write_all(&record)?;
        }
        self.raw += record.len();
        self.raw_since_flush += record.len();
        self.first_ei.get_or_insert(event.ei);
        self.last_ei = Some(event.ei);
        Ok(())
    }

    /// Uncompressed bytes waiting.
    pub fn buffered(&self) -> usize {
        self.raw
    }

    pub fn last_ei(&self) -> Option<u64> {
        self.last_ei
    }

    fn compressed(&self) -> usize {
        self.encoder.as_ref().map_or(0, |e| e.get_ref().len())
    }

    /// A part, padded to the minimum size, once enough is written.
    pub fn take_full(&mut self) -> std::io::Result<Option<FinishedPart>> {
        if self.compressed() + HEADER_LEN < self.min_part {
            // The encoder holds back what it has not emitted yet; after a
            // part's worth of input, make it say how big the output is.
            if self.raw_since_flush < self.min_part {
                return Ok(None);
            }
            if let Some(enc) = self.encoder.as_mut() {
                use std::io::Write;
                enc.flush()?;
            }
            self.raw_since_flush = 0;
            if self.compressed() + HEADER_LEN < self.min_part {
                return Ok(None);
            }
        }
        self.take(self.min_part)
    }

    /// Whatever is buffered, unpadded: the last part of an upload.
    pub fn take_last(&mut self) -> std::io::Result<Option<FinishedPart>> {
        self.take(0)
    }

    fn take(&mut self, pad_to: usize) -> std::io::Result<Option<FinishedPart>> {
        let (Some(first_ei), Some(last_ei), Some(enc)) =
            (self.first_ei, self.last_ei, self.encoder.take())
        else {
            return Ok(None);
        };
        let payload = enc.finish()?;
        let padding = pad_to.saturating_sub(HEADER_LEN + payload.len());
        let mut bytes = header(payload.len(), padding);
        bytes.extend_from_slice(&payload);
        bytes.resize(HEADER_LEN + payload.len() + padding, 0);
        self.first_ei = None;
        self.last_ei = None;
        self.raw = 0;
        self.raw_since_flush = 0;
        Ok(Some(FinishedPart {
            bytes,
            first_ei,
            last_ei,
        }))
    }
}
