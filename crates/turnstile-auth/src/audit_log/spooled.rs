//! The audit log in PostgreSQL, with nothing lost while PostgreSQL is
//! unreachable: an event that cannot be written there is written to a spool
//! on the auth server's disk (the file log's format, synced), and written
//! to PostgreSQL, under the same uid, as soon as it answers again; then the
//! spool's file is deleted. A spooled event shows in searches once it is
//! in PostgreSQL. The spool is bounded ([`SPOOL_MAX_BYTES`]): a full spool
//! refuses events, which then wait in their senders' bounded queues (a
//! node's refuses new sessions once its queue is full): nothing is dropped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use turnstile_api::audit::AuditEvent;
use turnstile_api::clock::Clock;

use super::{AuditLog, AuditLogError, AuditPage, AuditQuery, FileAuditLog, PostgresAuditLog};

/// How often spooled events are offered to PostgreSQL again.
const REPLAY_EVERY: Duration = Duration::from_secs(2);
/// Spooled events written to PostgreSQL per statement.
const REPLAY_BATCH: usize = 1000;
/// The most the spool holds on disk.
pub const SPOOL_MAX_BYTES: u64 = 1 << 30;

#[derive(Debug)]
pub struct SpooledAuditLog {
    postgres: Arc<PostgresAuditLog>,
    spool: Arc<FileAuditLog>,
    spool_dir: PathBuf,
    max_bytes: u64,
}

impl SpooledAuditLog {
    /// `postgres`, spooling under `spool_dir`; replays until `shutdown`.
    pub fn new(
        postgres: PostgresAuditLog,
        spool_dir: PathBuf,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Self {
        let log = Self {
            postgres: Arc::new(postgres),
            spool: Arc::new(FileAuditLog::new(&spool_dir, clock)),
            spool_dir,
            max_bytes: SPOOL_MAX_BYTES,
        };
        let (postgres, spool) = (log.postgres.clone(), log.spool.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(REPLAY_EVERY) => {}
                }
                match replay(&postgres, &spool).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(events = n, "spooled audit events written to PostgreSQL")
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "spooled audit events wait for PostgreSQL")
                    }
                }
            }
        });
        log
    }

    /// The spool holds at most `max_bytes` (default [`SPOOL_MAX_BYTES`]).
    #[must_use]
    pub fn with_spool_limit(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Refuses to spool more once the spool holds its limit.
    async fn check_room(&self) -> Result<(), AuditLogError> {
        let dir = self.spool_dir.clone();
        let used = tokio::task::spawn_blocking(move || size_of(&dir))
            .await
            .unwrap_or(0);
        if used >= self.max_bytes {
            return Err(AuditLogError::SpoolFull {
                path: self.spool_dir.clone(),
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Writes what the spool holds to PostgreSQL; returns how many.
    pub async fn replay(&self) -> Result<usize, AuditLogError> {
        replay(&self.postgres, &self.spool).await
    }
}

/// Bytes of the files under `dir` (0 if it is missing).
fn size_of(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => size_of(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn replay(postgres: &PostgresAuditLog, spool: &FileAuditLog) -> Result<usize, AuditLogError> {
    let mut written = 0;
    for (path, events) in spool.take_files().await? {
        for chunk in events.chunks(REPLAY_BATCH) {
            postgres.insert(chunk.to_vec()).await?;
        }
        // Written (under their uids: a replay cut short and run again
        // stores nothing twice): the file can go.
        written += events.len();
        tokio::fs::remove_file(&path)
            .await
            .map_err(|source| AuditLogError::File { path, source })?;
    }
    Ok(written)
}

#[async_trait]
impl AuditLog for SpooledAuditLog {
    async fn emit(&self, event: AuditEvent) -> Result<Value, AuditLogError> {
        match self.postgres.emit(event.clone()).await {
            Ok(json) => Ok(json),
            Err(e) => {
                self.check_room().await?;
                tracing::warn!(error = %e, "audit event spooled on disk until PostgreSQL answers");
                self.spool.emit(event).await
            }
        }
    }

    async fn emit_batch(&self, events: Vec<(AuditEvent, String)>) -> Result<(), AuditLogError> {
        match self.postgres.emit_batch(events.clone()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.check_room().await?;
                tracing::warn!(error = %e, events = events.len(), "audit events spooled on disk until PostgreSQL answers");
                self.spool.emit_batch(events).await
            }
        }
    }

    async fn search(&self, query: &AuditQuery) -> Result<AuditPage, AuditLogError> {
        self.postgres.search(query).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::audit_log::testing::PostgresServer;
    use turnstile_api::clock::SystemClock;

    use crate::audit_log::tests::login;

    /// A spooled log over a running PostgreSQL, spooling under `dir`.
    async fn spooled(
        server: &PostgresServer,
        dir: &tempfile::TempDir,
        shutdown: &CancellationToken,
    ) -> SpooledAuditLog {
        let postgres = PostgresAuditLog::connect(&server.uri(), Arc::new(SystemClock))
            .await
            .unwrap();
        SpooledAuditLog::new(
            postgres,
            dir.path().join("spool"),
            Arc::new(SystemClock),
            shutdown.clone(),
        )
    }

    #[tokio::test]
    async fn events_of_an_outage_wait_on_disk_and_reach_postgres_once() {
        let mut server = PostgresServer::start();
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let log = spooled(&server, &dir, &shutdown).await;
        log.emit(login("before")).await.unwrap();
        server.stop();
        log.emit(login("during")).await.expect("spooled, not lost");
        log.emit_batch(vec![(login("batch"), "uid-batch".into())])
            .await
            .expect("spooled, not lost");
        assert!(log.replay().await.is_err(), "PostgreSQL is still down");
        server.restart();
        assert_eq!(log.replay().await.unwrap(), 2);
        assert_eq!(log.replay().await.unwrap(), 0, "the spool is empty");
        let mut users: Vec<String> = log
            .search(&AuditQuery::default())
            .await
            .unwrap()
            .events
            .iter()
            .map(|e| e["user"].as_str().unwrap().to_string())
            .collect();
        users.sort();
        assert_eq!(users, ["batch", "before", "during"]);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_full_spool_refuses_events_rather_than_dropping_them() {
        let mut server = PostgresServer::start();
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let log = spooled(&server, &dir, &shutdown).await.with_spool_limit(1);
        server.stop();
        log.emit(login("first")).await.expect("the spool had room");
        let e = log.emit(login("second")).await.unwrap_err().to_string();
        assert!(e.contains("spool") && e.contains("full"), "{e}");
        let e = log
            .emit_batch(vec![(login("batch"), "uid-b".into())])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("full"), "{e}");
        server.restart();
        assert_eq!(log.replay().await.unwrap(), 1);
        log.emit(login("after")).await.unwrap();
        shutdown.cancel();
    }
}
