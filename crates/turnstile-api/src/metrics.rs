//! The process's operational metrics: counters and gauges that every part
//! updates (lock-free atomics) and the Prometheus text exposition of them,
//! served on `/metrics` when `turnstile.metrics_listen_addr` is set. No I/O
//! here; metrics are for operators, never for audit.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::recording::RecordingMode;

/// The metrics of this process.
pub static METRICS: Metrics = Metrics::new();

/// A count that only grows.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A level that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new() -> Self {
        Self(AtomicI64::new(0))
    }
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Holds one unit of a gauge while it lives.
#[derive(Debug)]
pub struct GaugeGuard(&'static Gauge);

impl GaugeGuard {
    pub fn hold(gauge: &'static Gauge) -> Self {
        gauge.add(1);
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

/// What a store error was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    NotFound,
    BadParameter,
    Io,
}

#[derive(Debug)]
pub struct Metrics {
    /// Recorded sessions running on this recorder, by mode (RecordingMode::ALL order).
    pub sessions_live: [Gauge; 5],
    /// Output bytes taken into recordings.
    pub recorded_bytes: Counter,
    /// Recording events held in memory, not yet acknowledged by auth.
    pub unacknowledged_bytes: Gauge,
    /// `RecordSession` streams this recorder has open.
    pub streams_open: Gauge,
    /// Recordings that could not be written (sessions ended or unrecorded).
    pub recording_failures: Counter,
    /// Parts auth stored, and their bytes; chunks staged.
    pub parts_stored: Counter,
    pub part_bytes_stored: Counter,
    pub chunks_staged: Counter,
    /// Errors of the recording store, by kind (StoreErrorKind order).
    pub store_errors: [Counter; 3],
    /// `max_connections` slots this node holds.
    pub connection_slots_held: Gauge,
    /// Refusals by a limit: `max_connections`, `max_sessions`.
    pub limit_refusals_connection: Counter,
    pub limit_refusals_session: Counter,
    /// Audit events waiting for auth, and dropped because the queue was full.
    pub audit_events_queued: Gauge,
    pub audit_events_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub const fn new() -> Self {
        Self {
            sessions_live: [
                Gauge::new(),
                Gauge::new(),
                Gauge::new(),
                Gauge::new(),
                Gauge::new(),
            ],
            recorded_bytes: Counter::new(),
            unacknowledged_bytes: Gauge::new(),
            streams_open: Gauge::new(),
            recording_failures: Counter::new(),
            parts_stored: Counter::new(),
            part_bytes_stored: Counter::new(),
            chunks_staged: Counter::new(),
            store_errors: [Counter::new(), Counter::new(), Counter::new()],
            connection_slots_held: Gauge::new(),
            limit_refusals_connection: Counter::new(),
            limit_refusals_session: Counter::new(),
            audit_events_queued: Gauge::new(),
            audit_events_dropped: Counter::new(),
        }
    }

    pub fn session_live(&self, mode: RecordingMode) -> &Gauge {
        let i = RecordingMode::ALL
            .iter()
            .position(|m| *m == mode)
            .unwrap_or(0);
        &self.sessions_live[i]
    }

    pub fn store_error(&self, kind: StoreErrorKind) {
        self.store_errors[kind as usize].inc();
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, i128)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let one = |v: i128| vec![(String::new(), v)];
        family(
            "turnstile_sessions_live",
            "gauge",
            "Recorded sessions running on this recorder, by recording mode.",
            &RecordingMode::ALL
                .iter()
                .zip(&self.sessions_live)
                .map(|(m, g)| (format!("{{mode=\"{m}\"}}"), i128::from(g.get())))
                .collect::<Vec<_>>(),
        );
        family(
            "turnstile_recorded_bytes_total",
            "counter",
            "Session output bytes taken into recordings.",
            &one(i128::from(self.recorded_bytes.get())),
        );
        family(
            "turnstile_recording_unacknowledged_bytes",
            "gauge",
            "Recording events held in memory and not yet acknowledged by auth.",
            &one(i128::from(self.unacknowledged_bytes.get())),
        );
        family(
            "turnstile_recording_streams_open",
            "gauge",
            "Recording streams to auth this process has open.",
            &one(i128::from(self.streams_open.get())),
        );
        family(
            "turnstile_recording_failures_total",
            "counter",
            "Recordings that could not be written.",
            &one(i128::from(self.recording_failures.get())),
        );
        family(
            "turnstile_parts_stored_total",
            "counter",
            "Recording parts stored by auth.",
            &one(i128::from(self.parts_stored.get())),
        );
        family(
            "turnstile_part_bytes_stored_total",
            "counter",
            "Bytes of recording parts stored by auth.",
            &one(i128::from(self.part_bytes_stored.get())),
        );
        family(
            "turnstile_chunks_staged_total",
            "counter",
            "Chunks of events staged in the recording store until a part holds them.",
            &one(i128::from(self.chunks_staged.get())),
        );
        family(
            "turnstile_store_errors_total",
            "counter",
            "Errors of the recording store, by kind.",
            &["not_found", "bad_parameter", "io"]
                .iter()
                .zip(&self.store_errors)
                .map(|(k, c)| (format!("{{kind=\"{k}\"}}"), i128::from(c.get())))
                .collect::<Vec<_>>(),
        );
        family(
            "turnstile_connection_slots_held",
            "gauge",
            "max_connections slots held by this node.",
            &one(i128::from(self.connection_slots_held.get())),
        );
        family(
            "turnstile_limit_refusals_total",
            "counter",
            "Connections and session channels refused by a limit, by kind.",
            &[
                (
                    "{kind=\"connection\"}".to_string(),
                    i128::from(self.limit_refusals_connection.get()),
                ),
                (
                    "{kind=\"session\"}".to_string(),
                    i128::from(self.limit_refusals_session.get()),
                ),
            ],
        );
        family(
            "turnstile_audit_events_queued",
            "gauge",
            "Audit events waiting to reach auth.",
            &one(i128::from(self.audit_events_queued.get())),
        );
        family(
            "turnstile_audit_events_dropped_total",
            "counter",
            "Audit events dropped because the queue to auth was full.",
            &one(i128::from(self.audit_events_dropped.get())),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_prometheus_text_format() {
        let m = Metrics::new();
        m.session_live(RecordingMode::NodeSync).add(2);
        m.recorded_bytes.add(42);
        m.store_error(StoreErrorKind::Io);
        let text = m.render();
        assert!(
            text.contains("turnstile_sessions_live{mode=\"node-sync\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("turnstile_recorded_bytes_total 42\n"));
        assert!(text.contains("turnstile_store_errors_total{kind=\"io\"} 1\n"));
        assert!(text.contains("# TYPE turnstile_limit_refusals_total counter\n"));
        let g = Gauge::new();
        let leaked: &'static Gauge = Box::leak(Box::new(g));
        {
            let _held = GaugeGuard::hold(leaked);
            assert_eq!(leaked.get(), 1);
        }
        assert_eq!(leaked.get(), 0);
    }
}
