//! The embedded backend: one SQLite file in the data dir, in WAL mode with
//! `synchronous=NORMAL` (a power loss may lose the last transactions, never
//! corrupt the file). Calls run on the blocking pool, one at a time.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use turnstile_api::clock::{Clock, SystemClock};

use super::{Backend, BackendError, Item, Notifier, Result, Watch};

/// Expired rows are deleted every this many writes.
const PURGE_EVERY_WRITES: u64 = 512;

#[derive(Debug, Clone)]
pub struct SqliteBackend {
    conn: Arc<Mutex<Connection>>,
    clock: Arc<dyn Clock>,
    writes: Arc<AtomicU64>,
    notifier: Notifier,
}

fn storage(e: impl std::fmt::Display) -> BackendError {
    BackendError::Storage(e.to_string())
}

fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_clock(path, Arc::new(SystemClock))
    }

    pub fn open_with_clock(path: &Path, clock: Arc<dyn Clock>) -> Result<Self> {
        let conn = Connection::open(path)
            .map_err(|e| BackendError::Storage(format!("open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(storage)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(storage)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(storage)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (
                key TEXT PRIMARY KEY NOT NULL,
                value BLOB NOT NULL,
                revision INTEGER NOT NULL,
                expires_ms INTEGER
            );
            CREATE TABLE IF NOT EXISTS meta (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                revision INTEGER NOT NULL
            );
            INSERT OR IGNORE INTO meta (id, revision) VALUES (1, 0);",
        )
        .map_err(storage)?;
        // Checkpoints (which fsync) run on a connection of their own, off
        // the write path: a writer never waits for one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(storage)?;
        let checkpointer = Connection::open(path)
            .map_err(|e| BackendError::Storage(format!("open {}: {e}", path.display())))?;
        checkpointer
            .busy_timeout(Duration::from_secs(5))
            .map_err(storage)?;
        let backend = Self {
            conn: Arc::new(Mutex::new(conn)),
            clock,
            writes: Arc::new(AtomicU64::new(0)),
            notifier: Notifier::default(),
        };
        spawn_checkpointer(checkpointer, Arc::downgrade(&backend.conn));
        backend.purge_expired_blocking()?;
        Ok(backend)
    }

    /// Tells watchers of a write or delete that succeeded.
    fn told<T>(&self, key: &str, deleted: bool, result: Result<T>) -> Result<T> {
        if result.is_ok() {
            self.notifier.changed(key, deleted);
        }
        result
    }

    fn purge_expired_blocking(&self) -> Result<()> {
        let now = to_ms(self.clock.now());
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.execute(
            "DELETE FROM kv WHERE expires_ms IS NOT NULL AND expires_ms <= ?1",
            params![now],
        )
        .map_err(storage)?;
        Ok(())
    }

    /// Runs `f` in a transaction on the blocking pool.
    async fn transact<T: Send + 'static>(
        &self,
        write: bool,
        f: impl FnOnce(&Transaction<'_>, i64) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        let now = to_ms(self.clock.now());
        let result = tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            let tx = conn
                .transaction_with_behavior(if write {
                    rusqlite::TransactionBehavior::Immediate
                } else {
                    rusqlite::TransactionBehavior::Deferred
                })
                .map_err(storage)?;
            let out = f(&tx, now)?;
            tx.commit().map_err(storage)?;
            Ok(out)
        })
        .await
        .map_err(storage)?;
        if write
            && result.is_ok()
            && self.writes.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY_WRITES
                == PURGE_EVERY_WRITES - 1
        {
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.purge_expired_blocking()).await;
        }
        result
    }
}

/// How often the WAL is folded into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints the WAL in the background until the backend is dropped.
fn spawn_checkpointer(conn: Connection, backend: std::sync::Weak<Mutex<Connection>>) {
    let _ = std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            while backend.strong_count() > 0 {
                std::thread::sleep(CHECKPOINT_EVERY);
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "SQLite checkpoint failed; will retry");
                }
            }
        });
}

fn live_item(tx: &Transaction<'_>, key: &str, now: i64) -> Result<Option<Item>> {
    tx.query_row(
        "SELECT value, revision, expires_ms FROM kv
         WHERE key = ?1 AND (expires_ms IS NULL OR expires_ms > ?2)",
        params![key, now],
        |row| {
            Ok(Item {
                key: key.to_string(),
                value: row.get(0)?,
                revision: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
                expires: row.get::<_, Option<i64>>(2)?.map(from_ms),
            })
        },
    )
    .optional()
    .map_err(storage)
}

fn write(
    tx: &Transaction<'_>,
    key: &str,
    value: &[u8],
    expires: Option<SystemTime>,
) -> Result<u64> {
    let revision: i64 = tx
        .query_row(
            "UPDATE meta SET revision = revision + 1 WHERE id = 1 RETURNING revision",
            [],
            |row| row.get(0),
        )
        .map_err(storage)?;
    tx.execute(
        "INSERT INTO kv (key, value, revision, expires_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value,
             revision = excluded.revision, expires_ms = excluded.expires_ms",
        params![key, value, revision, expires.map(to_ms)],
    )
    .map_err(storage)?;
    Ok(u64::try_from(revision).unwrap_or(0))
}

fn check_revision(tx: &Transaction<'_>, key: &str, expected: u64, now: i64) -> Result<()> {
    match live_item(tx, key, now)? {
        None => Err(BackendError::NotFound(key.into())),
        Some(item) if item.revision != expected => Err(BackendError::CompareFailed(key.into())),
        Some(_) => Ok(()),
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn get(&self, key: &str) -> Result<Item> {
        let key = key.to_string();
        self.transact(false, move |tx, now| {
            live_item(tx, &key, now)?.ok_or(BackendError::NotFound(key))
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>, expires: Option<SystemTime>) -> Result<u64> {
        let told = key.to_string();
        let key = key.to_string();
        let result = self
            .transact(true, move |tx, _| write(tx, &key, &value, expires))
            .await;
        self.told(&told, false, result)
    }

    async fn create(&self, key: &str, value: Vec<u8>, expires: Option<SystemTime>) -> Result<u64> {
        let told = key.to_string();
        let key = key.to_string();
        let result = self
            .transact(true, move |tx, now| {
                if live_item(tx, &key, now)?.is_some() {
                    return Err(BackendError::AlreadyExists(key));
                }
                write(tx, &key, &value, expires)
            })
            .await;
        self.told(&told, false, result)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        expires: Option<SystemTime>,
    ) -> Result<u64> {
        let told = key.to_string();
        let key = key.to_string();
        let result = self
            .transact(true, move |tx, now| {
                check_revision(tx, &key, expected, now)?;
                write(tx, &key, &value, expires)
            })
            .await;
        self.told(&told, false, result)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let told = key.to_string();
        let key = key.to_string();
        let result = self
            .transact(true, move |tx, now| {
                if live_item(tx, &key, now)?.is_none() {
                    return Err(BackendError::NotFound(key));
                }
                tx.execute("DELETE FROM kv WHERE key = ?1", params![key])
                    .map_err(storage)?;
                Ok(())
            })
            .await;
        self.told(&told, true, result)
    }

    async fn compare_and_delete(&self, key: &str, expected: u64) -> Result<()> {
        let told = key.to_string();
        let key = key.to_string();
        let result = self
            .transact(true, move |tx, now| {
                check_revision(tx, &key, expected, now)?;
                tx.execute("DELETE FROM kv WHERE key = ?1", params![key])
                    .map_err(storage)?;
                Ok(())
            })
            .await;
        self.told(&told, true, result)
    }

    async fn range(&self, prefix: &str) -> Result<Vec<Item>> {
        let prefix = prefix.to_string();
        self.transact(false, move |tx, now| {
            let upper = format!("{prefix}\u{10FFFF}");
            let mut stmt = tx
                .prepare_cached(
                    "SELECT key, value, revision, expires_ms FROM kv
                     WHERE key >= ?1 AND key < ?2 AND (expires_ms IS NULL OR expires_ms > ?3)
                     ORDER BY key",
                )
                .map_err(storage)?;
            let rows = stmt
                .query_map(params![prefix, upper, now], |row| {
                    Ok(Item {
                        key: row.get(0)?,
                        value: row.get(1)?,
                        revision: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                        expires: row.get::<_, Option<i64>>(3)?.map(from_ms),
                    })
                })
                .map_err(storage)?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(storage)
        })
        .await
    }

    async fn watch(&self, prefix: &str) -> Result<Watch> {
        Ok(self.notifier.watch(prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnstile_api::clock::ManualClock;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path().to_path_buf();
        let counter = Arc::new(AtomicU64::new(0));
        super::super::conformance::run(move |clock: Arc<ManualClock>| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let path = dir_path.join(format!("backend-{n}.sqlite"));
            async move {
                Arc::new(SqliteBackend::open_with_clock(&path, clock).unwrap()) as Arc<dyn Backend>
            }
        })
        .await;
    }

    #[tokio::test]
    async fn data_survives_reopen_and_revisions_keep_rising() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.sqlite");
        let first = {
            let b = SqliteBackend::open(&path).unwrap();
            let rev = b.put("k", b"v".to_vec(), None).await.unwrap();
            b.delete("k").await.unwrap();
            b.put("k", b"v2".to_vec(), None).await.unwrap();
            rev
        };
        let b = SqliteBackend::open(&path).unwrap();
        let item = b.get("k").await.unwrap();
        assert_eq!(item.value, b"v2");
        let next = b.put("other", vec![], None).await.unwrap();
        assert!(next > item.revision && item.revision > first);
    }
}
