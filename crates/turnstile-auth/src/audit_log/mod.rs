//! The audit log: typed events written through the [`AuditLog`] trait, never
//! through `tracing`. The file sink writes one JSON object per line under
//! `<data_dir>/log/`, a file per day, and syncs each line to disk before
//! `emit` returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use turnstile_api::audit::AuditEvent;
use turnstile_api::clock::Clock;

mod pg_tls;
mod postgres;
mod spooled;
pub use postgres::PostgresAuditLog;
#[cfg(any(test, feature = "test-support"))]
pub use postgres::testing;
pub use spooled::SpooledAuditLog;

#[derive(Debug, thiserror::Error)]
pub enum AuditLogError {
    #[error("audit log {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit log in PostgreSQL ({target}): {message}")]
    Postgres { target: String, message: String },
    #[error("audit search: {0}")]
    BadCursor(String),
    #[error(
        "the audit spool {path} is full ({max} bytes) while PostgreSQL cannot be written: \
         events wait at their senders until PostgreSQL answers or the spool is given room"
    )]
    SpoolFull { path: PathBuf, max: u64 },
}

/// What to look for.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub event: Option<String>,
    pub user: Option<String>,
    pub since: Option<SystemTime>,
    /// At most this many events (0: all).
    pub limit: usize,
    /// Where the previous page ended ([`AuditPage::next`]).
    pub after: Option<String>,
}

/// One page of a search, oldest first.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    pub events: Vec<Value>,
    /// Where the next page starts; `None` when this was the last.
    pub next: Option<String>,
}

/// The uid of an event a host sent: the same for a resent batch, so that a
/// log that keeps events by uid stores it once whichever auth server it
/// reaches.
pub fn host_event_uid(server_id: &str, queue_id: &str, seq: u64, part: &str) -> String {
    uuid::Uuid::new_v5(
        &HOST_EVENT_NAMESPACE,
        format!("{server_id}/{queue_id}/{seq}/{part}").as_bytes(),
    )
    .to_string()
}

const HOST_EVENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5f1c_2b9e_4d7a_4358_81e6_f2a9_b4d8_037e);

#[async_trait]
pub trait AuditLog: Send + Sync + std::fmt::Debug {
    /// Writes the event durably; returns the JSON written.
    async fn emit(&self, event: AuditEvent) -> Result<Value, AuditLogError>;
    /// Writes the events durably, in order, each with its uid (one sync for
    /// the batch where the log can). An event whose uid is already stored
    /// is not stored again, where the log can tell.
    async fn emit_batch(&self, events: Vec<(AuditEvent, String)>) -> Result<(), AuditLogError>;
    /// Events matching the query, oldest first, a page at a time.
    async fn search(&self, query: &AuditQuery) -> Result<AuditPage, AuditLogError>;
}

/// A page of `matching` (all the events a query matches, oldest first)
/// from the position `query.after` names: the file and memory logs page
/// by position in their append-only order.
fn page_by_position(matching: Vec<Value>, query: &AuditQuery) -> Result<AuditPage, AuditLogError> {
    let from = match &query.after {
        None => 0,
        Some(cursor) => cursor.parse::<usize>().map_err(|_| {
            AuditLogError::BadCursor(format!("{cursor:?} is not where a page of this log ended"))
        })?,
    };
    let rest: Vec<Value> = matching.into_iter().skip(from).collect();
    if query.limit == 0 || rest.len() <= query.limit {
        return Ok(AuditPage {
            events: rest,
            next: None,
        });
    }
    let events: Vec<Value> = rest.into_iter().take(query.limit).collect();
    Ok(AuditPage {
        next: Some((from + events.len()).to_string()),
        events,
    })
}

#[derive(Debug)]
pub struct FileAuditLog {
    dir: PathBuf,
    clock: Arc<dyn Clock>,
    write: Mutex<()>,
}

fn day_of(t: SystemTime) -> String {
    // RFC 3339 starts with the date: 2026-11-24T...
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_string()
}

impl FileAuditLog {
    pub fn new(dir: &Path, clock: Arc<dyn Clock>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            clock,
            write: Mutex::new(()),
        }
    }

    /// Appends whole lines to the day's file and syncs them.
    async fn append(&self, now: SystemTime, lines: &[u8]) -> Result<(), AuditLogError> {
        let path = self.dir.join(format!("{}.log", day_of(now)));
        let _one_writer = self.write.lock().await;
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(self.err(&self.dir))?;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(self.err(&path))?;
        file.write_all(lines).await.map_err(self.err(&path))?;
        file.sync_data().await.map_err(self.err(&path))?;
        Ok(())
    }

    fn err(&self, path: &Path) -> impl FnOnce(std::io::Error) -> AuditLogError {
        let path = path.to_path_buf();
        move |source| AuditLogError::File { path, source }
    }
}

#[async_trait]
impl AuditLog for FileAuditLog {
    async fn emit(&self, event: AuditEvent) -> Result<Value, AuditLogError> {
        let now = self.clock.now();
        let time = humantime::format_rfc3339_millis(now).to_string();
        let json = event.to_json(&time, &uuid::Uuid::new_v4().to_string());
        let mut line = serde_json::to_vec(&json).unwrap_or_default();
        line.push(b'\n');
        self.append(now, &line).await?;
        Ok(json)
    }

    async fn emit_batch(&self, events: Vec<(AuditEvent, String)>) -> Result<(), AuditLogError> {
        if events.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let time = humantime::format_rfc3339_millis(now).to_string();
        let mut text = Vec::new();
        for (event, uid) in &events {
            let json = event.to_json(&time, uid);
            serde_json::to_writer(&mut text, &json).unwrap_or_default();
            text.push(b'\n');
        }
        self.append(now, &text).await
    }

    async fn search(&self, query: &AuditQuery) -> Result<AuditPage, AuditLogError> {
        page_by_position(self.matching(query).await?, query)
    }
}

impl FileAuditLog {
    /// Takes the log's files for reading (renamed under the writers' lock,
    /// so no write lands in a file once it is taken) and returns each with
    /// its events; the caller deletes each when done with it. Files taken
    /// earlier and not deleted are returned again.
    pub async fn take_files(&self) -> Result<Vec<(PathBuf, Vec<Value>)>, AuditLogError> {
        {
            let _no_writer = self.write.lock().await;
            let mut dir = match tokio::fs::read_dir(&self.dir).await {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(self.err(&self.dir)(e)),
            };
            while let Some(entry) = dir.next_entry().await.map_err(self.err(&self.dir))? {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let taken = path.with_extension("taken");
                    tokio::fs::rename(&path, &taken)
                        .await
                        .map_err(self.err(&path))?;
                }
            }
        }
        let mut taken = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(self.err(&self.dir))?;
        while let Some(entry) = dir.next_entry().await.map_err(self.err(&self.dir))? {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "taken") {
                let text = tokio::fs::read_to_string(&path)
                    .await
                    .map_err(self.err(&path))?;
                let events = text
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                taken.push((path, events));
            }
        }
        taken.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(taken)
    }

    /// Every event of the log `query` matches, oldest first.
    async fn matching(&self, query: &AuditQuery) -> Result<Vec<Value>, AuditLogError> {
        let mut files = Vec::new();
        let mut dir = match tokio::fs::read_dir(&self.dir).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.err(&self.dir)(e)),
        };
        while let Some(entry) = dir.next_entry().await.map_err(self.err(&self.dir))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".log") {
                files.push(name);
            }
        }
        files.sort();
        let since_day = query.since.map(day_of);
        let since_ms = query
            .since
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis());
        let mut out = Vec::new();
        for name in files {
            if since_day
                .as_ref()
                .is_some_and(|d| name[..10.min(name.len())] < d[..])
            {
                continue;
            }
            let path = self.dir.join(&name);
            let text = tokio::fs::read_to_string(&path)
                .await
                .map_err(self.err(&path))?;
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if query.event.as_deref().is_some_and(|e| v["event"] != e) {
                    continue;
                }
                if query.user.as_deref().is_some_and(|u| v["user"] != u) {
                    continue;
                }
                if let Some(since) = since_ms {
                    let at = v["time"]
                        .as_str()
                        .and_then(|t| humantime::parse_rfc3339(t).ok())
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_millis());
                    if at.is_some_and(|at| at < since) {
                        continue;
                    }
                }
                out.push(v);
            }
        }
        Ok(out)
    }
}

/// Keeps events in memory; for unit tests.
#[derive(Debug, Default)]
pub struct MemoryAuditLog {
    events: std::sync::Mutex<Vec<Value>>,
}

#[async_trait]
impl AuditLog for MemoryAuditLog {
    async fn emit(&self, event: AuditEvent) -> Result<Value, AuditLogError> {
        let json = event.to_json(
            "1970-01-01T00:00:00.000Z",
            &uuid::Uuid::new_v4().to_string(),
        );
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(json.clone());
        Ok(json)
    }

    async fn emit_batch(&self, events: Vec<(AuditEvent, String)>) -> Result<(), AuditLogError> {
        let mut stored = self.events.lock().unwrap_or_else(|e| e.into_inner());
        for (event, uid) in events {
            if !stored.iter().any(|v| v["uid"] == uid.as_str()) {
                stored.push(event.to_json("1970-01-01T00:00:00.000Z", &uid));
            }
        }
        Ok(())
    }

    async fn search(&self, query: &AuditQuery) -> Result<AuditPage, AuditLogError> {
        let matching = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|v| query.event.as_deref().is_none_or(|e| v["event"] == e))
            .filter(|v| query.user.as_deref().is_none_or(|u| v["user"] == u))
            .cloned()
            .collect();
        page_by_position(matching, query)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use turnstile_api::clock::SystemClock;

    /// A successful password login of `user`: the event the log tests write.
    pub(crate) fn login(user: &str) -> AuditEvent {
        AuditEvent::UserLogin {
            user: user.into(),
            method: "password".into(),
            success: true,
            error: None,
            remote_addr: "127.0.0.1:1".into(),
        }
    }

    #[tokio::test]
    async fn events_are_written_as_json_lines_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileAuditLog::new(dir.path(), Arc::new(SystemClock));
        for (user, success) in [("alice", false), ("bob", true)] {
            log.emit(AuditEvent::UserLogin {
                user: user.into(),
                method: "password".into(),
                success,
                error: None,
                remote_addr: "127.0.0.1:1".into(),
            })
            .await
            .unwrap();
        }
        let all = log.search(&AuditQuery::default()).await.unwrap();
        assert_eq!(all.events.len(), 2);
        assert!(all.next.is_none());
        let first = log
            .search(&AuditQuery {
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(first.events[0]["user"], "alice");
        let second = log
            .search(&AuditQuery {
                limit: 1,
                after: first.next.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(second.events[0]["user"], "bob");
        assert!(second.next.is_none(), "the last page says so");
        let alice = log
            .search(&AuditQuery {
                user: Some("alice".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(alice.events.len(), 1);
        assert_eq!(alice.events[0]["code"], "T1000W");
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "one file per day");
    }
}
