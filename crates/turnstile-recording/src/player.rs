//! Playback timing: a recording's events become frames at moments on the
//! player's clock, after the speed factor and with long pauses capped.

use std::time::Duration;

use crate::event::{PRINT, RESIZE, RecordingEvent, SESSION_START};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameKind {
    Output(Vec<u8>),
    Resize { cols: u32, rows: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// When to show it, from the start of playback.
    pub at: Duration,
    pub kind: FrameKind,
}

/// The frames of `events`, played `speed` times as fast, with no pause longer
/// than `max_idle` (after the speed factor).
pub fn timeline(events: &[RecordingEvent], speed: f64, max_idle: Option<Duration>) -> Vec<Frame> {
    let speed = if speed.is_finite() && speed > 0.0 {
        speed
    } else {
        1.0
    };
    let mut frames = Vec::new();
    let mut at = Duration::ZERO;
    let mut last_ms = 0u64;
    for e in events {
        let kind = match e.event.as_str() {
            PRINT => FrameKind::Output(e.data.clone()),
            RESIZE | SESSION_START if e.cols > 0 && e.rows > 0 => FrameKind::Resize {
                cols: e.cols,
                rows: e.rows,
            },
            _ => continue,
        };
        let gap = Duration::from_millis(e.ms.saturating_sub(last_ms)).div_f64(speed);
        let gap = max_idle.map_or(gap, |cap| gap.min(cap));
        at += gap;
        last_ms = last_ms.max(e.ms);
        frames.push(Frame { at, kind });
    }
    frames
}

/// The output alone, in order.
pub fn output(events: &[RecordingEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events.iter().filter(|e| e.event == PRINT) {
        out.extend_from_slice(&e.data);
    }
    out
}

/// Where a frame index lands for time `t` (the first frame after `t`).
pub fn position_at(frames: &[Frame], t: Duration) -> usize {
    frames.partition_point(|f| f.at <= t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, ms: u64, data: &[u8]) -> RecordingEvent {
        RecordingEvent {
            event: kind.into(),
            ms,
            data: data.to_vec(),
            cols: 80,
            rows: 24,
            ..Default::default()
        }
    }

    #[test]
    fn speed_and_idle_cap_shape_the_timeline() {
        let events = [
            ev("session.start", 0, b""),
            ev("print", 1000, b"a"),
            ev("print", 61_000, b"b"),
            ev("print", 61_500, b"c"),
        ];
        let t = timeline(&events, 2.0, Some(Duration::from_secs(1)));
        let at: Vec<u64> = t.iter().map(|f| f.at.as_millis() as u64).collect();
        assert_eq!(at, vec![0, 500, 1500, 1750]);
        assert_eq!(output(&events), b"abc");
        assert_eq!(position_at(&t, Duration::from_millis(600)), 2);
    }
}
