//! Sends a node's audit events to auth. Events wait in a bounded queue and
//! are retried, in order, until auth has them, so a brief auth outage loses
//! nothing; if the queue is full (auth gone for long, or a flood), the new
//! event is dropped and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use turnstile_api::audit::AuditEvent;
use turnstile_api::metrics::METRICS;
use turnstile_api::rpc::{AuthClient, proto};

/// Events held while auth cannot be reached.
pub const QUEUE_CAPACITY: usize = 10_000;

#[derive(Debug)]
pub struct AuditForwarder {
    tx: mpsc::Sender<AuditEvent>,
    dropped: AtomicU64,
}

impl AuditForwarder {
    pub fn spawn(
        client: AuthClient<Channel>,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(capacity);
        tokio::spawn(forward(client, rx, shutdown));
        Arc::new(Self {
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues the event; never waits.
    pub fn emit(&self, event: AuditEvent) {
        if self.tx.try_send(event).is_ok() {
            METRICS.audit_events_queued.add(1);
        } else {
            METRICS.audit_events_dropped.inc();
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(
                    dropped = n,
                    "audit events dropped: the queue to auth is full"
                );
            }
        }
    }

    /// How many events were dropped since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl turnstile_recording::recorder::AuditSink for AuditForwarder {
    fn emit(&self, event: AuditEvent) {
        AuditForwarder::emit(self, event);
    }
}

async fn forward(
    client: AuthClient<Channel>,
    mut rx: mpsc::Receiver<AuditEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            e = rx.recv() => match e { Some(e) => e, None => return },
            _ = shutdown.cancelled() => return,
        };
        METRICS.audit_events_queued.add(-1);
        let json = serde_json::to_string(&event).unwrap_or_default();
        let mut backoff = Duration::from_millis(100);
        let mut failing = false;
        loop {
            match client
                .clone()
                .emit_audit_event(proto::EmitAuditEventRequest {
                    event_json: json.clone(),
                })
                .await
            {
                Ok(_) => {
                    if failing {
                        tracing::info!("audit events reach auth again");
                    }
                    break;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
                    ) =>
                {
                    tracing::error!(error = %s.message(), event = %json, "auth refused an audit event");
                    break;
                }
                Err(s) => {
                    if !failing {
                        tracing::warn!(error = %s.message(), "cannot send audit events to auth; holding them");
                        failing = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
