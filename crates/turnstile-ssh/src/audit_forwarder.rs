//! Sends a node's (or proxy's) audit events to auth. Every event is first
//! written to the process's on-disk [`AuditQueue`], numbered, and sent in
//! batches until auth acknowledges it, so an auth outage, a restart or a
//! flood loses nothing. When the queue reaches its bound, running sessions
//! go on (their events are still kept) but the node refuses new sessions,
//! rather than dropping events. A stopping process sends what is queued
//! (for up to [`FLUSH_DEADLINE`]); what auth has not taken by then is sent
//! at the next start.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use turnstile_api::audit::AuditEvent;
use turnstile_api::auth_channel::AuthChannel;
use turnstile_api::metrics::METRICS;
use turnstile_api::rpc::{AuthClient, proto};

use crate::audit_queue::AuditQueue;

/// The default bound of the on-disk queue.
pub const DEFAULT_QUEUE_MAX: u64 = 256 << 20;
/// How long a stopping process keeps trying to hand its queued events to auth.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(10);
/// Events, and bytes, per `EmitAuditEvents` call (auth takes up to 4 MiB).
const BATCH: usize = 500;
const BATCH_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct AuditForwarder {
    tx: mpsc::UnboundedSender<AuditEvent>,
    /// Bytes in the on-disk queue, as of its last change.
    queued_bytes: Arc<AtomicU64>,
    /// Why the last write of the queue failed, while it keeps failing.
    write_failure: Arc<Mutex<Option<String>>>,
    max_bytes: u64,
}

fn lock(q: &Mutex<AuditQueue>) -> std::sync::MutexGuard<'_, AuditQueue> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

impl AuditForwarder {
    /// Opens the queue in `dir` and forwards until `drain` fires; then
    /// writes and sends what is queued, and ends the returned task.
    pub fn spawn(
        client: AuthClient<AuthChannel>,
        dir: &Path,
        max_bytes: u64,
        drain: CancellationToken,
    ) -> Result<(Arc<Self>, tokio::task::JoinHandle<()>), String> {
        let queue = AuditQueue::open(dir)?;
        let queued_bytes = Arc::new(AtomicU64::new(queue.bytes()));
        METRICS
            .audit_events_queued
            .set(i64::try_from(queue.pending()).unwrap_or(i64::MAX));
        let queue = Arc::new(Mutex::new(queue));
        let (tx, rx) = mpsc::unbounded_channel();
        let written = Arc::new(Notify::new());
        let writer_done = Arc::new(AtomicBool::new(false));
        let write_failure = Arc::new(Mutex::new(None));
        let writer = tokio::spawn(write(
            rx,
            queue.clone(),
            queued_bytes.clone(),
            write_failure.clone(),
            written.clone(),
            writer_done.clone(),
            drain.clone(),
        ));
        let sender = send(
            client,
            queue,
            queued_bytes.clone(),
            written,
            writer_done,
            drain,
        );
        let task = tokio::spawn(async move {
            let ((), ()) = tokio::join!(async { writer.await.unwrap_or(()) }, sender);
        });
        Ok((
            Arc::new(Self {
                tx,
                queued_bytes,
                write_failure,
                max_bytes,
            }),
            task,
        ))
    }

    /// Queues the event; never waits.
    pub fn emit(&self, event: AuditEvent) {
        METRICS.audit_events_queued.add(1);
        if self.tx.send(event).is_err() {
            // Only after the process stopped forwarding.
            METRICS.audit_events_dropped.inc();
            tracing::error!("an audit event came after the forwarder stopped");
        }
    }

    /// Refuses new sessions while the on-disk queue is at its bound, or
    /// cannot be written (their events would have nowhere durable to go).
    pub fn admits_new_sessions(&self) -> Result<(), String> {
        if let Some(why) = self
            .write_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(format!(
                "the audit queue here cannot be written ({why}); new sessions are refused until it can"
            ));
        }
        let bytes = self.queued_bytes.load(Ordering::Relaxed);
        if bytes < self.max_bytes {
            return Ok(());
        }
        Err(format!(
            "audit events cannot reach auth and the audit queue here is full ({} MiB of {} MiB); new sessions are refused until auth takes them",
            bytes >> 20,
            self.max_bytes >> 20
        ))
    }
}

impl turnstile_recording::recorder::AuditSink for AuditForwarder {
    fn emit(&self, event: AuditEvent) {
        AuditForwarder::emit(self, event);
    }
}

/// Moves events from memory to the disk queue, in batches (one sync each).
async fn write(
    mut rx: mpsc::UnboundedReceiver<AuditEvent>,
    queue: Arc<Mutex<AuditQueue>>,
    bytes: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    written: Arc<Notify>,
    done: Arc<AtomicBool>,
    drain: CancellationToken,
) {
    let mut draining = false;
    // A batch the disk refused, retried (with what came since) until written.
    let mut batch: Vec<AuditEvent> = Vec::new();
    loop {
        if draining {
            while let Ok(e) = rx.try_recv() {
                batch.push(e);
            }
            if batch.is_empty() {
                break;
            }
        } else {
            if batch.is_empty() {
                tokio::select! {
                    e = rx.recv() => match e {
                        Some(e) => batch.push(e),
                        // Every emitter is gone (the services stopped).
                        None => break,
                    },
                    _ = drain.cancelled() => {
                        draining = true;
                        continue;
                    }
                }
            }
            while batch.len() < 10_000
                && let Ok(e) = rx.try_recv()
            {
                batch.push(e);
            }
        }
        let q = queue.clone();
        let events = std::mem::take(&mut batch);
        let result = tokio::task::spawn_blocking(move || {
            let mut q = lock(&q);
            let r = q.append(&events).map(|()| q.bytes());
            (r, events)
        })
        .await;
        match result {
            Ok((Ok(now), _)) => {
                bytes.store(now, Ordering::Relaxed);
                *failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Ok((Err(e), events)) => {
                *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                tracing::error!(error = %e, events = events.len(), "cannot write the audit queue; retrying");
                batch = events;
                if draining {
                    // Nowhere left to keep them: say how many are lost.
                    METRICS.audit_events_dropped.add(batch.len() as u64);
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => tracing::error!(error = %e, "the audit queue writer failed"),
        }
        written.notify_one();
    }
    // Everything emitted is on disk: the sender may stop once it is sent.
    done.store(true, Ordering::Release);
    written.notify_one();
}

/// Sends queued events in batches until auth has them.
async fn send(
    client: AuthClient<AuthChannel>,
    queue: Arc<Mutex<AuditQueue>>,
    bytes: Arc<AtomicU64>,
    written: Arc<Notify>,
    writer_done: Arc<AtomicBool>,
    drain: CancellationToken,
) {
    let queue_id = lock(&queue).queue_id().to_string();
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        // Read before the queue: if the writer was done then, an empty
        // batch means everything written has been sent.
        let done_before = writer_done.load(Ordering::Acquire);
        let q = queue.clone();
        let batch = tokio::task::spawn_blocking(move || lock(&q).next_batch(BATCH, BATCH_BYTES))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the audit queue");
                Vec::new()
            }
        };
        let Some(&(last_seq, _)) = batch.last() else {
            let Some(until) = deadline else {
                tokio::select! {
                    _ = written.notified() => {}
                    _ = drain.cancelled() => {
                        deadline = Some(tokio::time::Instant::now() + FLUSH_DEADLINE);
                    }
                }
                continue;
            };
            if done_before {
                // Everything written has been sent.
                return;
            }
            if tokio::time::timeout_at(until, written.notified())
                .await
                .is_err()
            {
                return;
            }
            continue;
        };
        let events = batch
            .into_iter()
            .map(|(seq, event_json)| proto::SequencedEvent { seq, event_json })
            .collect::<Vec<_>>();
        let n = events.len();
        let sent = client
            .clone()
            .emit_audit_events(proto::EmitAuditEventsRequest {
                queue_id: queue_id.clone(),
                events,
            })
            .await;
        match sent {
            Ok(r) => {
                if failing {
                    failing = false;
                    tracing::info!("audit events reach auth again");
                }
                backoff = Duration::from_millis(100);
                if r.get_ref().refused > 0 {
                    tracing::error!(
                        refused = r.get_ref().refused,
                        "auth refused audit events (see auth's log)"
                    );
                }
                let q = queue.clone();
                let acked = tokio::task::spawn_blocking(move || {
                    let mut q = lock(&q);
                    q.ack(last_seq).map(|()| q.bytes())
                })
                .await;
                match acked {
                    Ok(Ok(now)) => bytes.store(now, Ordering::Relaxed),
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot write the audit queue"),
                    Err(e) => tracing::error!(error = %e, "the audit queue writer failed"),
                }
                METRICS
                    .audit_events_queued
                    .add(-i64::try_from(n).unwrap_or(0));
            }
            Err(s) => {
                lock(&queue).rewind();
                if !failing {
                    tracing::warn!(error = %s.message(), "cannot send audit events to auth; keeping them on disk");
                    failing = true;
                }
                if let Some(until) = deadline
                    && tokio::time::Instant::now() + backoff > until
                {
                    tracing::error!(
                        "stopping with audit events auth did not take within {}s; they are sent at the next start",
                        FLUSH_DEADLINE.as_secs()
                    );
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = drain.cancelled(), if deadline.is_none() => {
                        deadline = Some(tokio::time::Instant::now() + FLUSH_DEADLINE);
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn with_nothing_queued_a_drain_ends_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let unreachable = AuthClient::new(AuthChannel::single(
            "127.0.0.1:1",
            tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        ));
        let drain = CancellationToken::new();
        let (f, task) =
            AuditForwarder::spawn(unreachable, dir.path(), 1 << 20, drain.clone()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // As at shutdown: the services (and their forwarders) are gone first.
        drop(f);
        drain.cancel();
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("the forwarder ends at once when nothing waits")
            .unwrap();
    }

    #[tokio::test]
    async fn a_queue_that_cannot_be_written_refuses_new_sessions_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue");
        let unreachable = AuthClient::new(AuthChannel::single(
            "127.0.0.1:1",
            tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        ));
        let (f, _task) =
            AuditForwarder::spawn(unreachable, &queue, 1 << 20, CancellationToken::new()).unwrap();
        std::fs::remove_dir_all(&queue).unwrap();
        f.emit(AuditEvent::admin("user.create", "admin", "u", []));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let refusal = loop {
            if let Err(reason) = f.admits_new_sessions() {
                break reason;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a failing queue admitted sessions"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(refusal.contains("cannot be written"), "{refusal}");
        // The disk is back: the held event is written and sessions are admitted.
        std::fs::create_dir_all(&queue).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while f.admits_new_sessions().is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never admitted again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(AuditQueue::open(&queue).unwrap().pending(), 1);
    }

    #[tokio::test]
    async fn at_its_bound_the_queue_refuses_new_sessions_and_keeps_every_event() {
        let dir = tempfile::tempdir().unwrap();
        let unreachable = AuthClient::new(AuthChannel::single(
            "127.0.0.1:1",
            tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        ));
        let drain = CancellationToken::new();
        let (f, _task) =
            AuditForwarder::spawn(unreachable, dir.path(), 1 << 20, drain.clone()).unwrap();
        assert!(f.admits_new_sessions().is_ok());
        let pad = "x".repeat(400);
        for n in 0..4000 {
            f.emit(AuditEvent::admin(
                "user.create",
                "admin",
                &format!("u{n}{pad}"),
                [],
            ));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let refusal = loop {
            if let Err(reason) = f.admits_new_sessions() {
                break reason;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the queue never filled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(refusal.contains("audit queue here is full"), "{refusal}");
        drain.cancel();
        drop(f);
        // Every event is on disk, for when auth is back.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let q = AuditQueue::open(dir.path()).unwrap();
            if q.pending() == 4000 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of 4000 on disk",
                q.pending()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
