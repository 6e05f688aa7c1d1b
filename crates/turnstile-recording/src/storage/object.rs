//! Recordings in an object store: S3 and any S3-compatible store, Azure
//! block blobs and GCS. A recording object is `<prefix>/<sid>.rec`
//! (continuations `<sid>.<n>.rec`); an upload is a multipart upload of that
//! object, whose id and part ids (ETags, block ids, part objects) the caller
//! keeps (in the backend: object_store can list neither uploads nor parts);
//! staged chunks are objects of their own under `<prefix>/staging/<upload-id>/`.
//!
//! Two seams: [`Blobs`], whole objects (object_store's for S3 and Azure, the
//! JSON API for GCS), and object_store's `MultipartStore`, the store's own
//! multipart uploads (S3, Azure) or parts composed into one object (GCS).

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use futures::TryStreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{Part, Result, StagedChunk, StorageError, Upload, UploadStore, check_id, object_name};

/// What a recording needs of an object store besides its multipart uploads.
#[async_trait]
pub trait Blobs: Send + Sync + 'static {
    async fn put(&self, path: &Path, data: Vec<u8>) -> object_store::Result<()>;
    async fn size(&self, path: &Path) -> object_store::Result<u64>;
    /// The bytes in `range`, which lies within the object.
    async fn read(&self, path: &Path, range: Range<u64>) -> object_store::Result<Vec<u8>>;
    /// Deletes an object; one that is not there is an error `NotFound`.
    async fn delete(&self, path: &Path) -> object_store::Result<()>;
    /// The objects under `prefix` with their sizes.
    async fn list(&self, prefix: &Path) -> object_store::Result<Vec<(Path, u64)>>;
}

#[async_trait]
impl<T: ObjectStore> Blobs for T {
    async fn put(&self, path: &Path, data: Vec<u8>) -> object_store::Result<()> {
        ObjectStoreExt::put(self, path, PutPayload::from(data))
            .await
            .map(drop)
    }

    async fn size(&self, path: &Path) -> object_store::Result<u64> {
        Ok(self.head(path).await?.size)
    }

    async fn read(&self, path: &Path, range: Range<u64>) -> object_store::Result<Vec<u8>> {
        Ok(self.get_range(path, range).await?.to_vec())
    }

    async fn delete(&self, path: &Path) -> object_store::Result<()> {
        ObjectStoreExt::delete(self, path).await
    }

    async fn list(&self, prefix: &Path) -> object_store::Result<Vec<(Path, u64)>> {
        let listed: Vec<_> = ObjectStore::list(self, Some(prefix)).try_collect().await?;
        Ok(listed.into_iter().map(|m| (m.location, m.size)).collect())
    }
}

pub struct ObjectUploadStore {
    /// The URI operators wrote, for messages.
    uri: String,
    blobs: Arc<dyn Blobs>,
    parts: Arc<dyn MultipartStore>,
    prefix: Path,
    min_part: usize,
    max_parts: u32,
}

impl std::fmt::Debug for ObjectUploadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectUploadStore")
            .field("uri", &self.uri)
            .field("min_part", &self.min_part)
            .finish()
    }
}

impl ObjectUploadStore {
    /// A store with native multipart uploads (S3, Azure).
    pub fn new<T: ObjectStore + MultipartStore>(
        uri: &str,
        store: Arc<T>,
        prefix: &str,
        min_part: usize,
    ) -> Self {
        Self::with_parts(uri, store.clone(), store, prefix, min_part)
    }

    pub fn with_parts(
        uri: &str,
        blobs: Arc<dyn Blobs>,
        parts: Arc<dyn MultipartStore>,
        prefix: &str,
        min_part: usize,
    ) -> Self {
        Self {
            uri: uri.trim_end_matches('/').to_string(),
            blobs,
            parts,
            prefix: Path::from(prefix.trim_matches('/')),
            min_part,
            max_parts: u32::MAX,
        }
    }

    /// Objects of at most `max` parts (the store's limit).
    pub fn with_max_parts(mut self, max: u32) -> Self {
        self.max_parts = max;
        self
    }

    fn object(&self, sid: &str, n: u32) -> Result<Path> {
        check_id("session id", sid)?;
        Ok(self.prefix.clone().join(object_name(sid, n)))
    }

    fn staging(&self, upload: &Upload) -> Result<Path> {
        check_id("upload id", &upload.id)?;
        Ok(self.prefix.clone().join("staging").join(upload.id.as_str()))
    }

    fn error(&self, e: object_store::Error) -> StorageError {
        match e {
            object_store::Error::NotFound { path, .. } => StorageError::NotFound(path),
            other => StorageError::Io(format!("{}: {other}", self.uri)),
        }
    }

    async fn delete_all_staged(&self, upload: &Upload) -> Result<()> {
        let chunks = self.list_staged(upload).await?;
        self.delete_staged(upload, &chunks).await
    }
}

#[async_trait]
impl UploadStore for ObjectUploadStore {
    fn min_part_size(&self) -> usize {
        self.min_part
    }

    fn max_parts(&self) -> u32 {
        self.max_parts
    }

    fn url(&self, sid: &str, object: u32) -> String {
        format!("{}/{}", self.uri, object_name(sid, object))
    }

    async fn check(&self) -> Result<()> {
        let probe = self.prefix.clone().join(".turnstile-probe");
        self.blobs
            .put(&probe, b"turnstile can write here\n".to_vec())
            .await
            .map_err(|e| StorageError::Io(format!("{}: cannot write: {e}", self.uri)))?;
        self.blobs
            .delete(&probe)
            .await
            .map_err(|e| StorageError::Io(format!("{}: cannot delete: {e}", self.uri)))
    }

    async fn create_upload(&self, sid: &str, object: u32) -> Result<Upload> {
        let path = self.object(sid, object)?;
        let native = self
            .parts
            .create_multipart(&path)
            .await
            .map_err(|e| self.error(e))?;
        Ok(Upload {
            id: uuid::Uuid::new_v4().to_string(),
            sid: sid.to_string(),
            object,
            native,
        })
    }

    async fn upload_part(&self, upload: &Upload, number: u32, data: Vec<u8>) -> Result<Part> {
        let path = self.object(&upload.sid, upload.object)?;
        if number == 0 {
            return Err(StorageError::BadParameter(
                "parts are numbered from 1".into(),
            ));
        }
        let size = data.len() as u64;
        let id = self
            .parts
            .put_part(
                &path,
                &upload.native,
                number as usize - 1,
                PutPayload::from(data),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(Part {
            number,
            size,
            id: id.content_id,
        })
    }

    async fn complete(&self, upload: &Upload, parts: &[Part]) -> Result<u64> {
        let path = self.object(&upload.sid, upload.object)?;
        let mut sorted = parts.to_vec();
        sorted.sort_by_key(|p| p.number);
        // The store numbers parts by position: they must run 1..=n.
        if let Some((i, p)) = sorted
            .iter()
            .enumerate()
            .find(|(i, p)| p.number as usize != i + 1)
        {
            return Err(StorageError::BadParameter(format!(
                "part {} is where part {} should be: the parts of upload {} do not run from 1 without a gap",
                p.number,
                i + 1,
                upload.id
            )));
        }
        let ids: Vec<PartId> = sorted
            .iter()
            .map(|p| PartId {
                content_id: p.id.clone(),
            })
            .collect();
        if let Err(e) = self
            .parts
            .complete_multipart(&path, &upload.native, ids)
            .await
        {
            // Completed before (a retry after a crash)? Then the object is there.
            match self.blobs.size(&path).await {
                Ok(size) => return Ok(size),
                Err(_) => return Err(self.error(e)),
            }
        }
        if let Err(e) = self.delete_all_staged(upload).await {
            tracing::warn!(uri = %self.uri, upload = %upload.id, error = %e, "cannot delete staged chunks of a completed upload");
        }
        self.blobs.size(&path).await.map_err(|e| self.error(e))
    }

    async fn abort(&self, upload: &Upload) -> Result<()> {
        let path = self.object(&upload.sid, upload.object)?;
        match self.parts.abort_multipart(&path, &upload.native).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.error(e)),
        }
        self.delete_all_staged(upload).await
    }

    async fn stage(
        &self,
        upload: &Upload,
        first_ei: u64,
        last_ei: u64,
        data: Vec<u8>,
    ) -> Result<StagedChunk> {
        let name = StagedChunk::new_name(first_ei, last_ei);
        let size = data.len() as u64;
        let path = self.staging(upload)?.join(name.as_str());
        self.blobs
            .put(&path, data)
            .await
            .map_err(|e| self.error(e))?;
        Ok(StagedChunk {
            name,
            first_ei,
            last_ei,
            size,
        })
    }

    async fn list_staged(&self, upload: &Upload) -> Result<Vec<StagedChunk>> {
        let dir = self.staging(upload)?;
        let listed = self.blobs.list(&dir).await.map_err(|e| self.error(e))?;
        let mut out: Vec<StagedChunk> = listed
            .iter()
            .filter_map(|(path, size)| {
                path.filename()
                    .and_then(|name| StagedChunk::parse(name, *size))
            })
            .collect();
        StagedChunk::sort(&mut out);
        Ok(out)
    }

    async fn read_staged(&self, upload: &Upload, chunk: &StagedChunk) -> Result<Vec<u8>> {
        StagedChunk::check_name(&chunk.name)?;
        let path = self.staging(upload)?.join(chunk.name.as_str());
        let size = self.blobs.size(&path).await.map_err(|e| self.error(e))?;
        self.blobs
            .read(&path, 0..size)
            .await
            .map_err(|e| self.error(e))
    }

    async fn delete_staged(&self, upload: &Upload, chunks: &[StagedChunk]) -> Result<()> {
        let dir = self.staging(upload)?;
        for chunk in chunks {
            match self
                .blobs
                .delete(&dir.clone().join(chunk.name.as_str()))
                .await
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(e)),
            }
        }
        Ok(())
    }

    async fn size(&self, sid: &str, object: u32) -> Result<u64> {
        let path = self.object(sid, object)?;
        self.blobs.size(&path).await.map_err(|e| self.error(e))
    }

    async fn read(&self, sid: &str, object: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.object(sid, object)?;
        let size = self.blobs.size(&path).await.map_err(|e| self.error(e))?;
        let end = offset.saturating_add(len as u64).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        self.blobs
            .read(&path, offset..end)
            .await
            .map_err(|e| self.error(e))
    }
}
