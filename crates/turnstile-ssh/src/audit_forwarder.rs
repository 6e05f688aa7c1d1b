//! Sends a node's audit events to auth. Events wait in a bounded queue and
//! are retried, in order, until auth has them, so a brief auth outage loses
//! nothing; if the queue is full (auth gone for long, or a flood), the new
//! event is dropped and counted. A stopping process sends what is queued
//! before it exits.

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
    /// Forwards events until `drain` fires, then sends what is queued (for
    /// up to [`FLUSH_DEADLINE`]) and ends the returned task.
    pub fn spawn(
        client: AuthClient<Channel>,
        capacity: usize,
        drain: CancellationToken,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity);
        let task = tokio::spawn(forward(client, rx, drain));
        (
            Arc::new(Self {
                tx,
                dropped: AtomicU64::new(0),
            }),
            task,
        )
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

/// How long a stopping process keeps trying to hand its queued events to auth.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(10);

async fn forward(
    client: AuthClient<Channel>,
    mut rx: mpsc::Receiver<AuditEvent>,
    drain: CancellationToken,
) {
    // Set once `drain` fires: what is queued then is still sent, until this.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let event = match deadline {
            Some(_) => match rx.try_recv() {
                Ok(e) => e,
                Err(_) => return,
            },
            None => tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => return },
                _ = drain.cancelled() => {
                    deadline = Some(tokio::time::Instant::now() + FLUSH_DEADLINE);
                    continue;
                }
            },
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
                    let pause = tokio::time::sleep(backoff);
                    match deadline {
                        Some(until) => {
                            if tokio::time::Instant::now() + backoff > until {
                                let left = rx.len() + 1;
                                METRICS.audit_events_dropped.add(left as u64);
                                tracing::error!(
                                    left,
                                    "stopping with audit events auth did not take within {}s",
                                    FLUSH_DEADLINE.as_secs()
                                );
                                return;
                            }
                            pause.await;
                        }
                        None => tokio::select! {
                            _ = pause => {}
                            _ = drain.cancelled() => {
                                deadline = Some(tokio::time::Instant::now() + FLUSH_DEADLINE);
                            }
                        },
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
