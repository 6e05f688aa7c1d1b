//! Where recordings are kept: a multipart-upload interface over file or
//! object storage. A recording is one object `<sid>.rec`; an upload writes its
//! parts one by one and joins them on completion. Completing an upload of a
//! session that already has a recording appends to it (a continuation), so
//! events spooled by a recorder that came back late are never lost; readers
//! drop the duplicates by `ei`.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod conformance;
mod file;
mod memory;

pub use file::FileStore;
pub use memory::MemoryStore;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub id: String,
    pub sid: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub number: u32,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    BadParameter(String),
    #[error("storage failed: {0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Session ids and upload ids are UUIDs; nothing else reaches a path.
pub fn check_id(what: &str, id: &str) -> Result<()> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(StorageError::BadParameter(format!(
            "{what} {id:?} is not a UUID"
        )));
    }
    Ok(())
}

#[async_trait]
pub trait UploadStore: Send + Sync + std::fmt::Debug {
    /// Every part but an upload's last is at least this big.
    fn min_part_size(&self) -> usize;
    /// Where a completed recording is, for `session.upload`.
    fn url(&self, sid: &str) -> String;
    async fn create_upload(&self, sid: &str) -> Result<Upload>;
    /// Stores part `number` (from 1; gaps allowed; a number may be rewritten).
    async fn upload_part(&self, upload: &Upload, number: u32, data: Vec<u8>) -> Result<Part>;
    async fn list_parts(&self, upload: &Upload) -> Result<Vec<Part>>;
    /// Joins `parts` in number order onto the session's recording; returns
    /// the recording's size.
    async fn complete(&self, upload: &Upload, parts: &[Part]) -> Result<u64>;
    async fn abort(&self, upload: &Upload) -> Result<()>;
    async fn list_uploads(&self) -> Result<Vec<Upload>>;
    /// The size of a completed recording.
    async fn size(&self, sid: &str) -> Result<u64>;
    /// Bytes of a completed recording.
    async fn read(&self, sid: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
}
