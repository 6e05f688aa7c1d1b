//! Recordings in a directory: parts under `<dir>/multi/<upload-id>/`, staged
//! chunks under `<dir>/multi/<upload-id>/staged/`, joined into
//! `<dir>/<sid>.rec` (or a continuation `<sid>.<n>.rec`) on completion. The
//! join copies the parts in the kernel into a temporary file, synced, then
//! renamed: memory does not grow with the recording, and a crash never
//! leaves half a recording.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{Part, Result, StagedChunk, StorageError, Upload, UploadStore, check_id, object_name};

#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    min_part: usize,
    writer: DurableWriter,
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
            writer: DurableWriter::start(dir)?,
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

/// Writes files durably in batches, on a thread of its own: each file is
/// written to a temporary name, then one `syncfs` makes the whole batch's
/// data durable, the files are renamed into place, and a second `syncfs`
/// makes the names durable. A thousand streams staging twice a second so
/// cost a few syncs a second instead of two thousand `fsync`s (each of a new
/// file a journal commit), and no async worker or blocking-pool thread
/// waits on the disk. The thread ends with the last clone of the store.
#[derive(Debug, Clone)]
struct DurableWriter {
    jobs: std::sync::mpsc::Sender<Write>,
}

struct Write {
    path: PathBuf,
    data: Vec<u8>,
    done: tokio::sync::oneshot::Sender<Result<()>>,
}

/// The most files one batch takes (the rest wait for the next).
const BATCH: usize = 1024;

impl DurableWriter {
    fn start(dir: &Path) -> Result<Self> {
        let root = std::fs::File::open(dir).map_err(io(dir))?;
        let (jobs, queue) = std::sync::mpsc::channel::<Write>();
        std::thread::Builder::new()
            .name("recording-writer".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    while batch.len() < BATCH
                        && let Ok(more) = queue.try_recv()
                    {
                        batch.push(more);
                    }
                    write_batch(&root, batch);
                }
            })
            .map_err(|e| StorageError::Io(format!("cannot start the recording writer: {e}")))?;
        Ok(Self { jobs })
    }

    /// Writes `data` to `path` durably: once this returns Ok, the file is
    /// whole under its name after a crash of the machine too.
    async fn write(&self, path: PathBuf, data: Vec<u8>) -> Result<()> {
        let (done, result) = tokio::sync::oneshot::channel();
        let gone = || StorageError::Io("the recording writer has stopped".into());
        self.jobs
            .send(Write { path, data, done })
            .map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }
}

fn write_batch(root: &std::fs::File, batch: Vec<Write>) {
    use std::io::Write as _;
    let mut written = Vec::with_capacity(batch.len());
    for w in batch {
        let tmp = w.path.with_extension("tmp");
        let result = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&w.data))
            .map_err(io(&tmp));
        match result {
            Ok(()) => written.push((w, tmp)),
            Err(e) => {
                let _ = w.done.send(Err(e));
            }
        }
    }
    let synced = |what: &str| {
        nix::unistd::syncfs(root).map_err(|e| {
            StorageError::Io(format!("syncing the recordings' file system ({what}): {e}"))
        })
    };
    if let Err(e) = synced("data") {
        for (w, _) in written {
            let _ = w.done.send(Err(e.clone()));
        }
        return;
    }
    let mut renamed = Vec::with_capacity(written.len());
    for (w, tmp) in written {
        match std::fs::rename(&tmp, &w.path).map_err(io(&w.path)) {
            Ok(()) => renamed.push(w),
            Err(e) => {
                let _ = w.done.send(Err(e));
            }
        }
    }
    let result = synced("names");
    for w in renamed {
        let _ = w.done.send(result.clone());
    }
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
        self.writer
            .write(
                dir.join("upload.json"),
                serde_json::to_vec(&upload).unwrap_or_default(),
            )
            .await?;
        Ok(upload)
    }

    async fn upload_part(&self, upload: &Upload, number: u32, data: Vec<u8>) -> Result<Part> {
        let dir = self.upload_dir(upload)?;
        let size = data.len() as u64;
        // A missing upload fails the write as not found.
        self.writer
            .write(dir.join(format!("{number:08}.part")), data)
            .await?;
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
        let name = StagedChunk::new_name(first_ei, last_ei);
        let size = data.len() as u64;
        self.writer.write(dir.join(&name), data).await?;
        Ok(StagedChunk {
            name,
            first_ei,
            last_ei,
            size,
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
        let paths = chunks
            .iter()
            .map(|c| self.staged_path(upload, &c.name))
            .collect::<Result<Vec<_>>>()?;
        // One trip to the blocking pool for all of them.
        tokio::task::spawn_blocking(move || {
            for path in paths {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(&path)(e)),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::Io(format!("deleting staged chunks: {e}")))?
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

    /// Many streams stage at once: the writer takes them in batches, each
    /// lands whole under its name, and one that cannot be written (its
    /// upload is gone) fails alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_stages_share_batches_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(FileStore::new(dir.path(), 16).unwrap());
        let mut uploads = Vec::new();
        for _ in 0..20 {
            let sid = uuid::Uuid::new_v4().to_string();
            uploads.push(store.create_upload(&sid, 0).await.unwrap());
        }
        let gone = uploads.pop().unwrap();
        store.abort(&gone).await.unwrap();
        let mut tasks = Vec::new();
        for (i, upload) in uploads.iter().chain([&gone]).enumerate() {
            for n in 0..25u64 {
                let (store, upload) = (store.clone(), upload.clone());
                let data = format!("{i}:{n}").repeat(100).into_bytes();
                tasks.push(tokio::spawn(async move {
                    let r = store.stage(&upload, n, n, data.clone()).await;
                    (upload, r, data)
                }));
            }
        }
        for t in tasks {
            let (upload, r, data) = t.await.unwrap();
            if upload.id == gone.id {
                assert!(matches!(r, Err(StorageError::NotFound(_))), "{r:?}");
                continue;
            }
            let chunk = r.unwrap();
            assert_eq!(store.read_staged(&upload, &chunk).await.unwrap(), data);
        }
        for upload in &uploads {
            assert_eq!(store.list_staged(upload).await.unwrap().len(), 25);
        }
    }
}
