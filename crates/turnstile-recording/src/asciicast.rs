//! asciicast v2 export: a header line, then `[seconds, "o", text]` for
//! output and `[seconds, "r", "COLSxROWS"]` for resizes, one JSON array a line.

use serde_json::json;

use crate::event::{PRINT, RESIZE, RecordingEvent, SESSION_START};

/// Writes asciicast v2 as events arrive: a header from `session.start`, then
/// one line per output or resize. Output split inside a UTF-8 sequence is
/// carried over to the next event.
#[derive(Debug, Default)]
pub struct Writer {
    started: bool,
    pending: Vec<u8>,
}

impl Writer {
    /// The lines (each ending in a newline) this event adds.
    pub fn event(&mut self, e: &RecordingEvent) -> String {
        let mut out = String::new();
        if !self.started {
            self.started = true;
            let start = (e.event == SESSION_START).then_some(e);
            let (width, height) = start
                .filter(|s| s.cols > 0 && s.rows > 0)
                .map_or((80, 24), |s| (s.cols, s.rows));
            let mut header = json!({
                "version": 2,
                "width": width,
                "height": height,
                "timestamp": start.map_or(0, |s| s.time_ms / 1000),
            });
            if let Some(s) = start.filter(|s| !s.term.is_empty()) {
                header["env"] = json!({"TERM": s.term});
            }
            out.push_str(&header.to_string());
            out.push('\n');
        }
        let t = e.ms as f64 / 1000.0;
        match e.event.as_str() {
            PRINT => {
                self.pending.extend_from_slice(&e.data);
                let valid = match std::str::from_utf8(&self.pending) {
                    Ok(_) => self.pending.len(),
                    Err(err) if err.error_len().is_none() => err.valid_up_to(),
                    Err(_) => self.pending.len(),
                };
                let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                if !text.is_empty() {
                    out.push_str(&json!([t, "o", text]).to_string());
                    out.push('\n');
                }
            }
            RESIZE => {
                out.push_str(&json!([t, "r", format!("{}x{}", e.cols, e.rows)]).to_string());
                out.push('\n');
            }
            _ => {}
        }
        out
    }
}

/// A whole recording as asciicast v2.
pub fn export(events: &[RecordingEvent]) -> String {
    let mut w = Writer::default();
    events.iter().map(|e| w.event(e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_events_is_rejoined() {
        let euro = "€".as_bytes();
        let events = vec![
            RecordingEvent {
                event: "session.start".into(),
                cols: 100,
                rows: 30,
                term: "xterm".into(),
                ..Default::default()
            },
            RecordingEvent {
                event: "print".into(),
                ms: 10,
                data: vec![b'a', euro[0]],
                ..Default::default()
            },
            RecordingEvent {
                event: "print".into(),
                ms: 20,
                data: euro[1..].to_vec(),
                ..Default::default()
            },
            RecordingEvent {
                event: "resize".into(),
                ms: 30,
                cols: 120,
                rows: 40,
                ..Default::default()
            },
        ];
        let text = export(&events);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("\"width\":100"));
        assert_eq!(lines[1], "[0.01,\"o\",\"a\"]");
        assert_eq!(lines[2], "[0.02,\"o\",\"€\"]");
        assert_eq!(lines[3], "[0.03,\"r\",\"120x40\"]");
    }
}
