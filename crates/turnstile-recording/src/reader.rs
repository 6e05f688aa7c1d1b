//! Reading a recording: parts one after another; padding is skipped, events
//! whose `ei` was already seen are dropped (resends after a resume are
//! normal), and damage is reported with the part number and byte offset.
//! Never panics, whatever the bytes.

use prost::Message;

use crate::event::RecordingEvent;
use crate::part::{HEADER_LEN, MAGIC, MAX_EVENT, VERSION};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recording is damaged in part {part} at byte {offset}: {reason}")]
pub struct FormatError {
    /// Counted from 1.
    pub part: usize,
    pub offset: usize,
    pub reason: String,
}

/// The events of a whole recording, in order, without duplicates.
pub fn read_events(bytes: &[u8]) -> Result<Vec<RecordingEvent>, FormatError> {
    let mut events = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0usize;
    let mut part = 0usize;
    while offset < bytes.len() {
        // Stray zeros between parts are padding.
        if bytes[offset] == 0 {
            offset += 1;
            continue;
        }
        part += 1;
        let err = |at: usize, reason: String| FormatError {
            part,
            offset: at,
            reason,
        };
        let header = bytes
            .get(offset..offset + HEADER_LEN)
            .ok_or_else(|| err(offset, "truncated header".into()))?;
        if header[..8] != MAGIC {
            return Err(err(
                offset,
                "bad magic: not a Turnstile recording part".into(),
            ));
        }
        let version = u16::from_be_bytes([header[8], header[9]]);
        if version != VERSION {
            return Err(err(offset, format!("unsupported version {version}")));
        }
        let payload_len = u64::from_be_bytes(header[16..24].try_into().unwrap_or_default());
        let padding_len = u64::from_be_bytes(header[24..32].try_into().unwrap_or_default());
        let start = offset + HEADER_LEN;
        let end = usize::try_from(payload_len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                err(
                    offset,
                    format!("payload of {payload_len} bytes runs past the end"),
                )
            })?;
        let records = zstd::stream::decode_all(&bytes[start..end])
            .map_err(|e| err(start, format!("payload does not decompress: {e}")))?;
        let mut at = 0usize;
        while at < records.len() {
            let len_bytes = records.get(at..at + 4).ok_or_else(|| {
                err(
                    start,
                    format!("truncated record length at {at} of the payload"),
                )
            })?;
            let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]])
                as usize;
            if len == 0 || len > MAX_EVENT {
                return Err(err(
                    start,
                    format!("record of {len} bytes at {at} of the payload"),
                ));
            }
            let body = records
                .get(at + 4..at + 4 + len)
                .ok_or_else(|| err(start, format!("truncated record at {at} of the payload")))?;
            let event = RecordingEvent::decode(body)
                .map_err(|e| err(start, format!("record at {at} of the payload: {e}")))?;
            if seen.insert(event.ei) {
                events.push(event);
            }
            at += 4 + len;
        }
        offset = usize::try_from(padding_len)
            .ok()
            .and_then(|p| end.checked_add(p))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                err(
                    end,
                    format!("padding of {padding_len} bytes runs past the end"),
                )
            })?;
    }
    events.sort_by_key(|e| e.ei);
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::part::{PartWriter, encode_part, encode_record};
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
        let mut w = PartWriter::new(64);
        for i in 0..10 {
            w.push(&print(i, format!("line {i}\n").as_bytes())).unwrap();
        }
        let first = w.take_full().unwrap().unwrap();
        assert!(first.bytes.len() >= 64);
        // A resend after a resume repeats events 8 and 9.
        for i in 8..12 {
            w.push(&print(i, format!("line {i}\n").as_bytes())).unwrap();
        }
        let last = w.take_last().unwrap().unwrap();
        let mut all = first.bytes.clone();
        all.extend_from_slice(&last.bytes);
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
        assert_eq!((e.part, e.offset), (2, second_start));
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
            let mut w = PartWriter::new(16);
            for i in 0..5 {
                w.push(&print(i, b"some output")).unwrap();
            }
            let mut bytes = w.take_last().unwrap().unwrap().bytes;
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
