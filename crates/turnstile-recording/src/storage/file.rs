//! Recordings in a directory: parts under `<dir>/multi/<upload-id>/`, joined
//! into `<dir>/<sid>.rec` on completion (written to a temporary file, synced,
//! then renamed, so a crash never leaves half a recording).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{Part, Result, StorageError, Upload, UploadStore, check_id};

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

    fn recording(&self, sid: &str) -> Result<PathBuf> {
        check_id("session id", sid)?;
        Ok(self.dir.join(format!("{sid}.rec")))
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

    fn url(&self, sid: &str) -> String {
        format!("file://{}", self.dir.join(format!("{sid}.rec")).display())
    }

    async fn create_upload(&self, sid: &str) -> Result<Upload> {
        let upload = Upload {
            id: uuid::Uuid::new_v4().to_string(),
            sid: sid.to_string(),
        };
        let dir = self.upload_dir(&upload)?;
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        write_synced(
            &dir.join("upload.json"),
            &serde_json::to_vec(&upload).unwrap_or_default(),
        )
        .await?;
        Ok(upload)
    }

    async fn upload_part(&self, upload: &Upload, number: u32, data: Vec<u8>) -> Result<Part> {
        let dir = self.upload_dir(upload)?;
        if !dir.exists() {
            return Err(StorageError::NotFound(format!("upload {}", upload.id)));
        }
        let size = data.len() as u64;
        write_synced(&dir.join(format!("{number:08}.part")), &data).await?;
        Ok(Part { number, size })
    }

    async fn list_parts(&self, upload: &Upload) -> Result<Vec<Part>> {
        let dir = self.upload_dir(upload)?;
        let mut entries = tokio::fs::read_dir(&dir).await.map_err(io(&dir))?;
        let mut parts = Vec::new();
        while let Some(e) = entries.next_entry().await.map_err(io(&dir))? {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".part").and_then(|n| n.parse().ok()) {
                let size = e.metadata().await.map_err(io(&dir))?.len();
                parts.push(Part { number: n, size });
            }
        }
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    async fn complete(&self, upload: &Upload, parts: &[Part]) -> Result<u64> {
        let dir = self.upload_dir(upload)?;
        let target = self.recording(&upload.sid)?;
        let mut joined = match tokio::fs::read(&target).await {
            Ok(existing) => existing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&target)(e)),
        };
        let mut sorted = parts.to_vec();
        sorted.sort_by_key(|p| p.number);
        for p in &sorted {
            let path = dir.join(format!("{:08}.part", p.number));
            let mut bytes = tokio::fs::read(&path).await.map_err(io(&path))?;
            joined.append(&mut bytes);
        }
        write_synced(&target, &joined).await?;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        Ok(joined.len() as u64)
    }

    async fn abort(&self, upload: &Upload) -> Result<()> {
        let dir = self.upload_dir(upload)?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&dir)(e)),
        }
    }

    async fn list_uploads(&self) -> Result<Vec<Upload>> {
        let multi = self.dir.join("multi");
        let mut entries = tokio::fs::read_dir(&multi).await.map_err(io(&multi))?;
        let mut out = Vec::new();
        while let Some(e) = entries.next_entry().await.map_err(io(&multi))? {
            let marker = e.path().join("upload.json");
            if let Ok(bytes) = tokio::fs::read(&marker).await
                && let Ok(upload) = serde_json::from_slice::<Upload>(&bytes)
            {
                out.push(upload);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn size(&self, sid: &str) -> Result<u64> {
        let path = self.recording(sid)?;
        Ok(tokio::fs::metadata(&path).await.map_err(io(&path))?.len())
    }

    async fn read(&self, sid: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.recording(sid)?;
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
        // Completed uploads leave nothing under multi/.
        assert_eq!(
            std::fs::read_dir(dir.path().join("multi")).unwrap().count(),
            0
        );
    }
}
