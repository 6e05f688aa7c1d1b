//! The backend: the cluster's state as keys and values with revisions and expiry.
//!
//! Every implementation passes the same [`conformance`] suite. Writes return the
//! item's new revision, and compare-and-swap on that revision is how callers
//! make read-modify-write exact under races (semaphores, single-use tokens).
//! An expired item is invisible: reads, ranges and swaps treat it as absent.
//! This module never interprets values; callers own their encoding.

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use turnstile_api::error::{ApiError, ErrorKind};

pub mod conformance;
pub mod etcd;
mod memory;
mod sqlite;
pub mod typed;

pub use etcd::{EtcdBackend, EtcdCredentials, EtcdSettings, EtcdTls};
pub use memory::MemoryBackend;
pub use sqlite::SqliteBackend;

/// One stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub value: Vec<u8>,
    /// Changes on every write; never reused, even after a delete.
    pub revision: u64,
    pub expires: Option<SystemTime>,
}

/// What went wrong, as a category the caller can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("key {0:?} not found")]
    NotFound(String),
    #[error("key {0:?} already exists")]
    AlreadyExists(String),
    #[error("key {0:?} changed since it was read")]
    CompareFailed(String),
    #[error("backend storage failed: {0}")]
    Storage(String),
    /// Others kept changing the key while this process tried to.
    #[error("key {0:?} kept changing while it was updated; try again")]
    Contended(String),
}

impl BackendError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackendError::NotFound(_) => ErrorKind::NotFound,
            BackendError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            BackendError::CompareFailed(_) => ErrorKind::CompareFailed,
            BackendError::Storage(_) => ErrorKind::Internal,
            BackendError::Contended(_) => ErrorKind::Unavailable,
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;

#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// The live item at `key`, or `NotFound`.
    async fn get(&self, key: &str) -> Result<Item>;

    /// Writes unconditionally; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, expires: Option<SystemTime>) -> Result<u64>;

    /// Writes only if no live item is at `key`, else `AlreadyExists`.
    async fn create(&self, key: &str, value: Vec<u8>, expires: Option<SystemTime>) -> Result<u64>;

    /// Writes only if the live item's revision is `expected`: `NotFound` if
    /// there is none, `CompareFailed` if it changed.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        expires: Option<SystemTime>,
    ) -> Result<u64>;

    /// Deletes the live item at `key`, or `NotFound`.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Deletes only if the live item's revision is `expected`.
    async fn compare_and_delete(&self, key: &str, expected: u64) -> Result<()>;

    /// Live items whose key starts with `prefix`, in key order.
    async fn range(&self, prefix: &str) -> Result<Vec<Item>>;

    /// The writes and deletes under `prefix` from now on, by whoever makes
    /// them (on etcd, every auth server). Expiry makes no change of its own.
    async fn watch(&self, prefix: &str) -> Result<Watch>;
}

/// A key written or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub deleted: bool,
}

/// Changes under a prefix, as they happen, until dropped.
#[derive(Debug)]
pub struct Watch {
    changes: WatchSource,
    prefix: String,
}

#[derive(Debug)]
enum WatchSource {
    /// This process's writes (memory, SQLite).
    Local(tokio::sync::broadcast::Receiver<Change>),
    /// A backend's own watch stream (etcd), fed by a task.
    Remote(tokio::sync::mpsc::Receiver<Change>),
}

impl Watch {
    /// The next change, or `None` once the watch has ended: the backend's
    /// stream broke, or this watcher fell behind and missed some. Whoever
    /// caches what it watches reads it all again, then watches anew.
    pub async fn next(&mut self) -> Option<Change> {
        loop {
            let change = match &mut self.changes {
                WatchSource::Local(rx) => rx.recv().await.ok()?,
                WatchSource::Remote(rx) => rx.recv().await?,
            };
            if change.key.starts_with(&self.prefix) {
                return Some(change);
            }
        }
    }
}

/// How many changes a local watcher may fall behind before its watch ends.
const LOCAL_WATCH_BACKLOG: usize = 4096;

/// The changes a local backend makes, told to its watchers.
#[derive(Debug, Clone)]
pub(crate) struct Notifier(tokio::sync::broadcast::Sender<Change>);

impl Default for Notifier {
    fn default() -> Self {
        Self(tokio::sync::broadcast::channel(LOCAL_WATCH_BACKLOG).0)
    }
}

impl Notifier {
    pub(crate) fn changed(&self, key: &str, deleted: bool) {
        // No watcher is no error.
        let _ = self.0.send(Change {
            key: key.to_string(),
            deleted,
        });
    }

    pub(crate) fn watch(&self, prefix: &str) -> Watch {
        Watch {
            changes: WatchSource::Local(self.0.subscribe()),
            prefix: prefix.to_string(),
        }
    }
}

impl Watch {
    /// A watch fed by a task that sends into `changes`.
    pub(crate) fn remote(changes: tokio::sync::mpsc::Receiver<Change>) -> Self {
        Self {
            changes: WatchSource::Remote(changes),
            prefix: String::new(),
        }
    }
}

/// Is an item with this expiry still live at `now`?
pub(crate) fn is_live(expires: Option<SystemTime>, now: SystemTime) -> bool {
    expires.is_none_or(|e| e > now)
}
