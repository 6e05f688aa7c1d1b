//! Where recordings are kept: a multipart-upload interface over file or
//! object storage. A session's recording is one object `<sid>.rec`, followed
//! by continuation objects `<sid>.1.rec`, `<sid>.2.rec`, … when a recorder
//! came back after its upload was completed (objects are never appended to,
//! so this works on every store). An upload writes one object: its parts
//! one by one, joined on completion. Small chunks of events are staged as
//! objects of their own until a part is full, so auth can acknowledge them
//! within a second whatever the store's minimum part size.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod conformance;
mod file;
mod gcs;
mod memory;
mod object;
mod uri;

pub use file::FileStore;
pub use gcs::{COMPOSE_MAX_SOURCES, ComposedParts, GcsJson};
pub use memory::MemoryStore;
pub use object::{Blobs, ObjectUploadStore};
pub use uri::{
    AZURE_MIN_PART, AzureOptions, GCS_MIN_PART, GcsOptions, S3_MIN_PART, S3Options, StoreUri, open,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub id: String,
    pub sid: String,
    /// Which object of the session it writes: 0 is `<sid>.rec`, n is the
    /// continuation `<sid>.<n>.rec`.
    #[serde(default)]
    pub object: u32,
    /// The store's own id of the upload (S3's UploadId), if it has one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub native: String,
}

/// The name of object `n` of a session's recording.
pub fn object_name(sid: &str, n: u32) -> String {
    if n == 0 {
        format!("{sid}.rec")
    } else {
        format!("{sid}.{n}.rec")
    }
}

/// Events `first_ei..=last_ei` staged for an upload: an unpadded part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedChunk {
    pub name: String,
    pub first_ei: u64,
    pub last_ei: u64,
    pub size: u64,
}

impl StagedChunk {
    /// A fresh name for a chunk of these events; unique, so two auth
    /// servers staging the same events never overwrite each other.
    pub fn new_name(first_ei: u64, last_ei: u64) -> String {
        format!(
            "{first_ei:020}-{last_ei:020}-{}.chunk",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )
    }

    /// Refuses a name [`StagedChunk::new_name`] did not make (so a caller
    /// cannot reach other files or objects through it).
    pub fn check_name(name: &str) -> Result<()> {
        match Self::parse(name, 0) {
            Some(_) => Ok(()),
            None => Err(StorageError::BadParameter(format!(
                "{name:?} is not a staged chunk's name"
            ))),
        }
    }

    /// Puts chunks in the order `list_staged` returns them: by events.
    pub fn sort(chunks: &mut [StagedChunk]) {
        chunks.sort_by(|a, b| {
            (a.first_ei, a.last_ei, &a.name).cmp(&(b.first_ei, b.last_ei, &b.name))
        });
    }

    /// Reads back what [`StagedChunk::new_name`] wrote.
    pub fn parse(name: &str, size: u64) -> Option<Self> {
        let stem = name.strip_suffix(".chunk")?;
        let mut it = stem.splitn(3, '-');
        let first_ei = it.next()?.parse().ok()?;
        let last_ei = it.next()?.parse().ok()?;
        let tag = it.next()?;
        (tag.len() == 12 && tag.chars().all(|c| c.is_ascii_hexdigit())).then(|| Self {
            name: name.to_string(),
            first_ei,
            last_ei,
            size,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub number: u32,
    pub size: u64,
    /// The store's id of the stored part (an ETag, a block id), if it has one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
}

#[derive(Debug, Clone, thiserror::Error)]
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
    /// An object holds at most this many parts (the store's limit: S3's
    /// 10,000 parts, GCS's 1,024 composed components); a recording with more
    /// goes on in a continuation object.
    fn max_parts(&self) -> u32 {
        u32::MAX
    }
    /// Where object `object` of a session's recording is, for `session.upload`.
    fn url(&self, sid: &str, object: u32) -> String;
    /// Proves the store is there and writable (at start: a URI with bad
    /// credentials or a missing bucket is refused with the store's answer).
    async fn check(&self) -> Result<()> {
        Ok(())
    }
    async fn create_upload(&self, sid: &str, object: u32) -> Result<Upload>;
    /// Stores part `number` (from 1; gaps allowed; a number may be rewritten).
    async fn upload_part(&self, upload: &Upload, number: u32, data: Vec<u8>) -> Result<Part>;
    /// Joins `parts` in number order into the upload's object and ends the
    /// upload (its staged chunks go with it); returns the object's size.
    /// Completing an upload that was already completed returns the size of
    /// its object: a retry after a crash is harmless.
    async fn complete(&self, upload: &Upload, parts: &[Part]) -> Result<u64>;
    /// Ends an upload without an object.
    async fn abort(&self, upload: &Upload) -> Result<()>;
    /// Stores a chunk of events durably, as an object of its own.
    async fn stage(
        &self,
        upload: &Upload,
        first_ei: u64,
        last_ei: u64,
        data: Vec<u8>,
    ) -> Result<StagedChunk>;
    /// The upload's staged chunks, by `first_ei`.
    async fn list_staged(&self, upload: &Upload) -> Result<Vec<StagedChunk>>;
    async fn read_staged(&self, upload: &Upload, chunk: &StagedChunk) -> Result<Vec<u8>>;
    /// Deletes chunks (ones already gone are not an error).
    async fn delete_staged(&self, upload: &Upload, chunks: &[StagedChunk]) -> Result<()>;
    /// The size of a completed object.
    async fn size(&self, sid: &str, object: u32) -> Result<u64>;
    /// Bytes of a completed object.
    async fn read(&self, sid: &str, object: u32, offset: u64, len: usize) -> Result<Vec<u8>>;
}
