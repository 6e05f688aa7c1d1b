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
}

impl BackendError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackendError::NotFound(_) => ErrorKind::NotFound,
            BackendError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            BackendError::CompareFailed(_) => ErrorKind::CompareFailed,
            BackendError::Storage(_) => ErrorKind::Internal,
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
}

/// Is an item with this expiry still live at `now`?
pub(crate) fn is_live(expires: Option<SystemTime>, now: SystemTime) -> bool {
    expires.is_none_or(|e| e > now)
}
