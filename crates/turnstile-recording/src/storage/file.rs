//! Recordings in a directory: parts under `<dir>/multi/<upload-id>/`, staged
//! chunks under `<dir>/multi/<upload-id>/staged/`, joined into
//! `<dir>/<sid>.rec` (or a continuation `<sid>.<n>.rec`) on completion. The
//! join copies the parts in the kernel into a temporary file, synced, then
//! renamed: memory does not grow with the recording, and a crash never
//! leaves half a recording.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{Part, Result, StagedChunk, StorageError, Upload, UploadStore, check_id, object_name};

#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    min_part: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StorageError::NotFound(path.display().to_string())
        } else {
            StorageError::Io(format!("{}: {e}", path.display()))
        }
    }
}

impl FileStore {
    pub fn new(dir: &Path, min_part: usize) -> Result<Self> {
        std::fs::create_dir_all(dir.join("multi")).map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            min_part,
        })
    }

    fn upload_dir(&self, upload: &Upload) -> Result<PathBuf> {
        check_id("upload id", &upload.id)?;
        check_id("session id", &upload.sid)?;
        Ok(self.dir.join("multi").join(&upload.id))
    }

    fn object(&self, sid: &str, n: u32) -> Result<PathBuf> {
        check_id("session id", sid)?;
        Ok(self.dir.join(object_name(sid, n)))
    }

    fn staged_path(&self, upload: &Upload, chunk: &str) -> Result<PathBuf> {
        StagedChunk::check_name(chunk)?;
        Ok(self.upload_dir(upload)?.join("staged").join(chunk))
    }
}

async fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
    f.write_all(data).await.map_err(io(&tmp))?;
    f.sync_all().await.map_err(io(&tmp))?;
    tokio::fs::rename(&tmp, path).await.map_err(io(path))
}

#[async_trait]
impl UploadStore for FileStore {
    fn min_part_size(&self) -> usize {
        self.min_part
    }

    fn url(&self, sid: &str, object: u32) -> String {
        format!(
            "file://{}",
            self.dir.join(object_name(sid, object)).display()
        )
    }

    async fn create_upload(&self, sid: &str, object: u32) -> Result<Upload> {
        let upload = Upload {
            id: uuid::Uuid::new_v4().to_string(),
            sid: sid.to_string(),
            object,
            native: String::new(),
        };
        let dir = self.upload_dir(&upload)?;
        tokio::fs::create_dir_all(dir.join("staged"))
            .await
            .map_err(io(&dir))?;
        write_synced(
            &dir.join("upload.json"),
            &serde_json::to_vec(&upload).unwrap_or_default(),
        )
        .await?;
        Ok(upload)
    }

    async fn upload_part(&self, upload: &Upload, number: u32, data: Vec<u8>) -> Result<Part> {
        let dir = self.upload_dir(upload)?;
        if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            return Err(StorageError::NotFound(format!("upload {}", upload.id)));
        }
        let size = data.len() as u64;
        write_synced(&dir.join(format!("{number:08}.part")), &data).await?;
        Ok(Part {
            number,
            size,
            id: String::new(),
        })
    }

    async fn complete(&self, upload: &Upload, parts: &[Part]) -> Result<u64> {
        let dir = self.upload_dir(upload)?;
        let target = self.object(&upload.sid, upload.object)?;
        if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            // Completed before (a retry after a crash), or never created.
            return match tokio::fs::metadata(&target).await {
                Ok(m) => Ok(m.len()),
                Err(_) => Err(StorageError::NotFound(format!("upload {}", upload.id))),
            };
        }
        let mut sorted = parts.to_vec();
        sorted.sort_by_key(|p| p.number);
        // Joined in the kernel (copy_file_range), off the async workers:
        // neither memory nor a user-space copy grows with the recording.
        let (from, to) = (dir.clone(), target.clone());
        let size = tokio::task::spawn_blocking(move || -> Result<u64> {
            let tmp = to.with_extension("joining");
            let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            let mut size = 0u64;
            for p in &sorted {
                let path = from.join(format!("{:08}.part", p.number));
                let mut part = std::fs::File::open(&path).map_err(io(&path))?;
                size += std::io::copy(&mut part, &mut out).map_err(io(&path))?;
            }
            out.sync_all().map_err(io(&tmp))?;
            drop(out);
            std::fs::rename(&tmp, &to).map_err(io(&to))?;
            Ok(size)
        })
        .await
        .map_err(|e| StorageError::Io(format!("joining parts: {e}")))??;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        Ok(size)
    }

    async fn abort(&self, upload: &Upload) -> Result<()> {
        let dir = self.upload_dir(upload)?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&dir)(e)),
        }
    }

    async fn stage(
        &self,
        upload: &Upload,
        first_ei: u64,
        last_ei: u64,
        data: Vec<u8>,
    ) -> Result<StagedChunk> {
        let dir = self.upload_dir(upload)?.join("staged");
        if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            return Err(StorageError::NotFound(format!("upload {}", upload.id)));
        }
        let name = StagedChunk::new_name(first_ei, last_ei);
        write_synced(&dir.join(&name), &data).await?;
        Ok(StagedChunk {
            name,
            first_ei,
            last_ei,
            size: data.len() as u64,
        })
    }

    async fn list_staged(&self, upload: &Upload) -> Result<Vec<StagedChunk>> {
        let dir = self.upload_dir(upload)?.join("staged");
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&dir)(e)),
        };
        let mut out = Vec::new();
        while let Some(e) = entries.next_entry().await.map_err(io(&dir))? {
            let name = e.file_name().to_string_lossy().into_owned();
            let size = e.metadata().await.map(|m| m.len()).unwrap_or(0);
            if let Some(chunk) = StagedChunk::parse(&name, size) {
                out.push(chunk);
            }
        }
        StagedChunk::sort(&mut out);
        Ok(out)
    }

    async fn read_staged(&self, upload: &Upload, chunk: &StagedChunk) -> Result<Vec<u8>> {
        let path = self.staged_path(upload, &chunk.name)?;
        tokio::fs::read(&path).await.map_err(io(&path))
    }

    async fn delete_staged(&self, upload: &Upload, chunks: &[StagedChunk]) -> Result<()> {
        for chunk in chunks {
            let path = self.staged_path(upload, &chunk.name)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(())
    }

    async fn size(&self, sid: &str, object: u32) -> Result<u64> {
        let path = self.object(sid, object)?;
        Ok(tokio::fs::metadata(&path).await.map_err(io(&path))?.len())
    }

    async fn read(&self, sid: &str, object: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.object(sid, object)?;
        let mut f = tokio::fs::File::open(&path).await.map_err(io(&path))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io(&path))?;
        let mut buf = Vec::with_capacity(len.min(1 << 20));
        f.take(len as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(io(&path))?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path(), 16).unwrap();
        super::super::conformance::run(&store).await;
        // Completed and aborted uploads leave nothing under multi/.
        assert_eq!(
            std::fs::read_dir(dir.path().join("multi")).unwrap().count(),
            0
        );
    }
}
