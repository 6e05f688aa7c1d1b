//! Reading a recording as a stream: parts one after another, each payload
//! decompressed as it is read, so memory stays bounded by one event however
//! large the recording. Padding is skipped; an event whose `ei` is not greater
//! than the last one kept is dropped (resends after a resume are normal);
//! damage is reported with the part number and byte offset. Never panics,
//! whatever the bytes.

use std::io::{BufRead, Read};

use crate::event::RecordingEvent;
use crate::part::{HEADER_LEN, MAGIC, Records, VERSION};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recording is damaged in part {part} at byte {offset}: {reason}")]
pub struct FormatError {
    /// Counted from 1.
    pub part: usize,
    pub offset: u64,
    pub reason: String,
}

type PayloadDecoder<R> = zstd::stream::read::Decoder<'static, std::io::Take<R>>;

enum State<R: BufRead> {
    /// Between parts.
    Between(R),
    /// Inside a part's payload; `padding` bytes follow it.
    Payload {
        records: Records<PayloadDecoder<R>>,
        payload_at: u64,
        end: u64,
        padding: u64,
    },
    Done,
}

/// The events of a recording (`<sid>.rec`, then its continuations, read
/// one after another), in order, without repeats.
pub struct EventReader<R: BufRead> {
    state: State<R>,
    /// Bytes consumed up to the start of the current part or payload.
    offset: u64,
    part: usize,
    last_ei: Option<u64>,
}

impl<R: BufRead> EventReader<R> {
    pub fn new(src: R) -> Self {
        Self {
            state: State::Between(src),
            offset: 0,
            part: 0,
            last_ei: None,
        }
    }

    fn err(&self, offset: u64, reason: impl Into<String>) -> FormatError {
        FormatError {
            part: self.part,
            offset,
            reason: reason.into(),
        }
    }

    /// Reads the next part header; `None` at the end of the recording.
    fn open_part(&mut self, mut src: R) -> Result<Option<State<R>>, FormatError> {
        // Stray zeros between parts are padding.
        loop {
            let buf = src
                .fill_buf()
                .map_err(|e| self.err(self.offset, e.to_string()))?;
            if buf.is_empty() {
                return Ok(None);
            }
            let zeros = buf.iter().take_while(|b| **b == 0).count();
            let more = zeros < buf.len();
            src.consume(zeros);
            self.offset += zeros as u64;
            if more {
                break;
            }
        }
        self.part += 1;
        let at = self.offset;
        let mut header = [0u8; HEADER_LEN];
        let mut n = 0;
        while n < HEADER_LEN {
            match src.read(&mut header[n..]) {
                Ok(0) => return Err(self.err(at, "truncated header")),
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(at, e.to_string())),
            }
        }
        if header[..8] != MAGIC {
            return Err(self.err(at, "bad magic: not a Turnstile recording part"));
        }
        let version = u16::from_be_bytes([header[8], header[9]]);
        if version != VERSION {
            return Err(self.err(at, format!("unsupported version {version}")));
        }
        let payload_len = u64::from_be_bytes(header[16..24].try_into().unwrap_or_default());
        let padding = u64::from_be_bytes(header[24..32].try_into().unwrap_or_default());
        let payload_at = at + HEADER_LEN as u64;
        let decoder = zstd::stream::read::Decoder::with_buffer(src.take(payload_len))
            .map_err(|e| self.err(payload_at, format!("payload does not decompress: {e}")))?;
        self.offset = payload_at;
        Ok(Some(State::Payload {
            records: Records::new(decoder),
            payload_at,
            end: payload_at.saturating_add(payload_len),
            padding,
        }))
    }

    /// Leaves a finished payload: checks it was all there, skips its padding.
    fn close_part(
        &mut self,
        records: Records<PayloadDecoder<R>>,
        payload_at: u64,
        end: u64,
        padding: u64,
    ) -> Result<R, FormatError> {
        let mut take = records.into_inner().finish();
        // The decoder may stop before the end of the payload's last frame
        // bytes (a skippable frame, trailing garbage): drain what is left.
        std::io::copy(&mut take, &mut std::io::sink())
            .map_err(|e| self.err(payload_at, e.to_string()))?;
        if take.limit() > 0 {
            return Err(self.err(
                payload_at - HEADER_LEN as u64,
                format!("payload of {} bytes runs past the end", end - payload_at),
            ));
        }
        let mut src = take.into_inner();
        let skipped = std::io::copy(&mut (&mut src).take(padding), &mut std::io::sink())
            .map_err(|e| self.err(end, e.to_string()))?;
        if skipped < padding {
            return Err(self.err(end, format!("padding of {padding} bytes runs past the end")));
        }
        self.offset = end + padding;
        Ok(src)
    }

    /// The next event, or `None` at the end.
    pub fn next_event(&mut self) -> Result<Option<RecordingEvent>, FormatError> {
        loop {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Done => return Ok(None),
                State::Between(src) => match self.open_part(src)? {
                    Some(state) => self.state = state,
                    None => return Ok(None),
                },
                State::Payload {
                    mut records,
                    payload_at,
                    end,
                    padding,
                } => match records.next_event() {
                    Ok(Some(event)) => {
                        self.state = State::Payload {
                            records,
                            payload_at,
                            end,
                            padding,
                        };
                        if self.last_ei.is_some_and(|last| event.ei <= last) {
                            continue;
                        }
                        self.last_ei = Some(event.ei);
                        return Ok(Some(event));
                    }
                    Ok(None) => {
                        let src = self.close_part(records, payload_at, end, padding)?;
                        self.state = State::Between(src);
                    }
                    Err(reason) => {
                        return Err(self.err(payload_at, format!("{reason} of the payload")));
                    }
                },
            }
        }
    }
}

impl<R: BufRead> Iterator for EventReader<R> {
    type Item = Result<RecordingEvent, FormatError>;
    fn next(&mut self) -> Option<Self::Item> {
        let next = self.next_event().transpose();
        if matches!(next, Some(Err(_))) {
            self.state = State::Done;
        }
        next
    }
}

/// The events of a whole recording held in memory, in order, without repeats.
pub fn read_events(bytes: &[u8]) -> Result<Vec<RecordingEvent>, FormatError> {
    EventReader::new(bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::part::{encode_part, encode_record};
    use proptest::prelude::*;

    fn print(ei: u64, data: &[u8]) -> RecordingEvent {
        RecordingEvent {
            ei,
            event: "print".into(),
            data: data.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn parts_round_trip_with_padding_and_duplicates() {
        let records = |range: std::ops::Range<u64>| {
            let mut r = Vec::new();
            for i in range {
                encode_record(&print(i, format!("line {i}\n").as_bytes()), &mut r);
            }
            r
        };
        let first = encode_part(&records(0..10), 256).unwrap();
        assert_eq!(first.len(), 256);
        // A resend after a resume repeats events 8 and 9.
        let last = encode_part(&records(8..12), 0).unwrap();
        let mut all = first.clone();
        all.extend_from_slice(&last);
        let events = read_events(&all).unwrap();
        assert_eq!(
            events.iter().map(|e| e.ei).collect::<Vec<_>>(),
            (0..12).collect::<Vec<_>>()
        );
    }

    #[test]
    fn damage_names_part_and_offset() {
        let mut records = Vec::new();
        encode_record(&print(0, b"hi"), &mut records);
        let part = encode_part(&records, 0).unwrap();
        let mut two = part.clone();
        two.extend_from_slice(&part);
        let second_start = part.len();
        two[second_start + 3] ^= 0xff;
        let e = read_events(&two).unwrap_err();
        assert_eq!((e.part, e.offset), (2, second_start as u64));
        assert!(e.reason.contains("magic"));
        let truncated = &part[..part.len() - 2];
        assert_eq!(read_events(truncated).unwrap_err().part, 1);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = read_events(&bytes);
        }

        #[test]
        fn mutated_recordings_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut records = Vec::new();
            for i in 0..5 {
                encode_record(&print(i, b"some output"), &mut records);
            }
            let mut bytes = encode_part(&records, 16).unwrap();
            for (at, b) in flips {
                let n = bytes.len();
                bytes[at % n] ^= b;
            }
            let _ = read_events(&bytes);
        }
    }
}

#[cfg(test)]
mod golden {
    //! Golden recordings keep the format stable: the bytes in
    //! `tests/fixtures/` were written by version 1 and must read the same
    //! forever. `TURNSTILE_WRITE_GOLDEN=1` rewrites them (only for a new version).
    use super::*;

    const REC: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/v1-session.rec"
    );
    const JSON: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/v1-session.jsonl"
    );

    fn session() -> Vec<u8> {
        let sid = "6c1a3f7e-2b4d-4e8f-9a0b-1c2d3e4f5a6b";
        let base = |ei: u64, event: &str, ms: u64| RecordingEvent {
            ei,
            event: event.into(),
            time_ms: 1_764_000_000_000 + ms as i64,
            sid: sid.into(),
            server_id: "0f0e0d0c-0b0a-4909-8807-060504030201".into(),
            user: "alice".into(),
            login: "root".into(),
            ms,
            ..Default::default()
        };
        let mut events = vec![RecordingEvent {
            cols: 80,
            rows: 24,
            node_name: "web1".into(),
            term: "xterm-256color".into(),
            ..base(0, "session.start", 0)
        }];
        let mut offset = 0;
        for (i, text) in ["$ echo hello\r\n", "hello\r\n", "$ "].iter().enumerate() {
            events.push(RecordingEvent {
                data: text.as_bytes().to_vec(),
                offset,
                ..base(1 + i as u64, "print", 100 * (i as u64 + 1))
            });
            offset += text.len() as u64;
        }
        events.push(RecordingEvent {
            cols: 120,
            rows: 40,
            ..base(4, "resize", 500)
        });
        events.push(RecordingEvent {
            tx: offset,
            rx: 12,
            ..base(5, "session.data", 900)
        });
        events.push(RecordingEvent {
            participants: vec!["alice".into()],
            session_start_ms: 1_764_000_000_000,
            session_stop_ms: 1_764_000_000_900,
            interactive: true,
            ..base(6, "session.end", 900)
        });
        // Two parts, the first padded to 256 bytes; the second resends event 3.
        let records = |events: &[RecordingEvent]| {
            let mut r = Vec::new();
            for e in events {
                crate::part::encode_record(e, &mut r);
            }
            r
        };
        let mut out = crate::part::encode_part(&records(&events[..4]), 256).unwrap();
        out.extend(crate::part::encode_part(&records(&events[3..]), 0).unwrap());
        out
    }

    #[test]
    fn version_1_recordings_read_the_same() {
        if std::env::var_os("TURNSTILE_WRITE_GOLDEN").is_some() {
            let bytes = session();
            let events = read_events(&bytes).unwrap();
            let json: String = events
                .iter()
                .map(|e| format!("{}\n", crate::event::to_json(e)))
                .collect();
            std::fs::write(REC, bytes).unwrap();
            std::fs::write(JSON, json).unwrap();
        }
        let bytes = std::fs::read(REC).expect("tests/fixtures/v1-session.rec");
        let expected = std::fs::read_to_string(JSON).expect("tests/fixtures/v1-session.jsonl");
        let events = read_events(&bytes).unwrap();
        let got: String = events
            .iter()
            .map(|e| format!("{}\n", crate::event::to_json(e)))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(events.len(), 7);
        assert_eq!(
            crate::player::output(&events),
            b"$ echo hello\r\nhello\r\n$ "
        );
    }
}
