//! Recordings in an object store with native multipart uploads (S3 and any
//! S3-compatible store, Azure block blobs), through the `object_store`
//! crate. A recording object is `<prefix>/<sid>.rec` (continuations
//! `<sid>.<n>.rec`); an upload is the store's own multipart upload of that
//! object, whose id and part ids (ETags, block ids) the caller keeps (in the
//! backend: object_store can list neither uploads nor parts); staged chunks
//! are objects of their own under `<prefix>/staging/<upload-id>/`.

use std::sync::Arc;

use async_trait::async_trait;
use futures::TryStreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{Part, Result, StagedChunk, StorageError, Upload, UploadStore, check_id, object_name};

/// A store that is both an object store and a multipart store.
pub trait Multipart: ObjectStore + MultipartStore {}
impl<T: ObjectStore + MultipartStore> Multipart for T {}

pub struct ObjectUploadStore {
    /// The URI operators wrote, for messages.
    uri: String,
    store: Arc<dyn Multipart>,
    prefix: Path,
    min_part: usize,
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
    pub fn new(uri: &str, store: Arc<dyn Multipart>, prefix: &str, min_part: usize) -> Self {
        Self {
            uri: uri.trim_end_matches('/').to_string(),
            store,
            prefix: Path::from(prefix.trim_matches('/')),
            min_part,
        }
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

    fn url(&self, sid: &str, object: u32) -> String {
        format!("{}/{}", self.uri, object_name(sid, object))
    }

    async fn check(&self) -> Result<()> {
        let probe = self.prefix.clone().join(".turnstile-probe");
        self.store
            .put(
                &probe,
                PutPayload::from_static(b"turnstile can write here\n"),
            )
            .await
            .map_err(|e| StorageError::Io(format!("{}: cannot write: {e}", self.uri)))?;
        self.store
            .delete(&probe)
            .await
            .map_err(|e| StorageError::Io(format!("{}: cannot delete: {e}", self.uri)))
    }

    async fn create_upload(&self, sid: &str, object: u32) -> Result<Upload> {
        let path = self.object(sid, object)?;
        let native = self
            .store
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
            .store
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
            .store
            .complete_multipart(&path, &upload.native, ids)
            .await
        {
            // Completed before (a retry after a crash)? Then the object is there.
            match self.store.head(&path).await {
                Ok(meta) => return Ok(meta.size),
                Err(_) => return Err(self.error(e)),
            }
        }
        if let Err(e) = self.delete_all_staged(upload).await {
            tracing::warn!(uri = %self.uri, upload = %upload.id, error = %e, "cannot delete staged chunks of a completed upload");
        }
        let meta = self.store.head(&path).await.map_err(|e| self.error(e))?;
        Ok(meta.size)
    }

    async fn abort(&self, upload: &Upload) -> Result<()> {
        let path = self.object(&upload.sid, upload.object)?;
        match self.store.abort_multipart(&path, &upload.native).await {
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
        self.store
            .put(&path, PutPayload::from(data))
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
        let listed: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.error(e))?;
        let mut out: Vec<StagedChunk> = listed
            .iter()
            .filter_map(|m| {
                m.location
                    .filename()
                    .and_then(|name| StagedChunk::parse(name, m.size))
            })
            .collect();
        out.sort_by(|a, b| (a.first_ei, a.last_ei, &a.name).cmp(&(b.first_ei, b.last_ei, &b.name)));
        Ok(out)
    }

    async fn read_staged(&self, upload: &Upload, chunk: &StagedChunk) -> Result<Vec<u8>> {
        if StagedChunk::parse(&chunk.name, 0).is_none() {
            return Err(StorageError::BadParameter(format!(
                "{:?} is not a staged chunk's name",
                chunk.name
            )));
        }
        let path = self.staging(upload)?.join(chunk.name.as_str());
        let got = self.store.get(&path).await.map_err(|e| self.error(e))?;
        Ok(got.bytes().await.map_err(|e| self.error(e))?.to_vec())
    }

    async fn delete_staged(&self, upload: &Upload, chunks: &[StagedChunk]) -> Result<()> {
        let dir = self.staging(upload)?;
        for chunk in chunks {
            match self
                .store
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
        Ok(self
            .store
            .head(&path)
            .await
            .map_err(|e| self.error(e))?
            .size)
    }

    async fn read(&self, sid: &str, object: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.object(sid, object)?;
        let size = self
            .store
            .head(&path)
            .await
            .map_err(|e| self.error(e))?
            .size;
        let end = offset.saturating_add(len as u64).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let bytes = self
            .store
            .get_range(&path, offset..end)
            .await
            .map_err(|e| self.error(e))?;
        Ok(bytes.to_vec())
    }
}
