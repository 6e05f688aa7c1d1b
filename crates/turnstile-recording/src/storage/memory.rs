//! Recordings in memory, for unit tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Part, Result, StagedChunk, StorageError, Upload, UploadStore, check_id, object_name};

#[derive(Debug, Default)]
pub struct MemoryStore {
    min_part: usize,
    max_parts: Option<u32>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct UploadState {
    parts: BTreeMap<u32, Vec<u8>>,
    staged: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Default)]
struct State {
    uploads: BTreeMap<String, UploadState>,
    /// By object name.
    objects: BTreeMap<String, Vec<u8>>,
    /// Requests that would fail, to test the callers' handling of a store that
    /// refuses writes.
    refuse_writes: bool,
}

impl MemoryStore {
    pub fn new(min_part: usize) -> Self {
        Self {
            min_part,
            max_parts: None,
            state: Mutex::default(),
        }
    }

    /// A store whose objects hold at most `max` parts.
    pub fn with_max_parts(mut self, max: u32) -> Self {
        self.max_parts = Some(max);
        self
    }

    /// Makes every write fail (or succeed again), as a store that is down.
    pub fn refuse_writes(&self, refuse: bool) {
        self.with(|s| s.refuse_writes = refuse);
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn write<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        self.with(|s| {
            if s.refuse_writes {
                return Err(StorageError::Io("the store refuses writes".into()));
            }
            f(s)
        })
    }
}

fn upload_of<'a>(s: &'a mut State, upload: &Upload) -> Result<&'a mut UploadState> {
    s.uploads
        .get_mut(&upload.id)
        .ok_or_else(|| StorageError::NotFound(format!("upload {}", upload.id)))
}

#[async_trait]
impl UploadStore for MemoryStore {
    fn min_part_size(&self) -> usize {
        self.min_part
    }

    fn max_parts(&self) -> u32 {
        self.max_parts.unwrap_or(u32::MAX)
    }

    fn url(&self, sid: &str, object: u32) -> String {
        format!("memory://{}", object_name(sid, object))
    }

    async fn create_upload(&self, sid: &str, object: u32) -> Result<Upload> {
        check_id("session id", sid)?;
        let upload = Upload {
            id: uuid::Uuid::new_v4().to_string(),
            sid: sid.to_string(),
            object,
            native: String::new(),
        };
        self.write(|s| {
            s.uploads.insert(upload.id.clone(), UploadState::default());
            Ok(())
        })?;
        Ok(upload)
    }

    async fn upload_part(&self, upload: &Upload, number: u32, data: Vec<u8>) -> Result<Part> {
        self.write(|s| {
            let size = data.len() as u64;
            upload_of(s, upload)?.parts.insert(number, data);
            Ok(Part {
                number,
                size,
                id: format!("part-{number}-{size}"),
            })
        })
    }

    async fn complete(&self, upload: &Upload, parts: &[Part]) -> Result<u64> {
        self.write(|s| {
            let name = object_name(&upload.sid, upload.object);
            let Some(state) = s.uploads.remove(&upload.id) else {
                return s
                    .objects
                    .get(&name)
                    .map(|o| o.len() as u64)
                    .ok_or_else(|| StorageError::NotFound(format!("upload {}", upload.id)));
            };
            let mut sorted = parts.to_vec();
            sorted.sort_by_key(|p| p.number);
            let mut object = Vec::new();
            for p in sorted {
                let data = state
                    .parts
                    .get(&p.number)
                    .ok_or_else(|| StorageError::NotFound(format!("part {}", p.number)))?;
                object.extend_from_slice(data);
            }
            let size = object.len() as u64;
            s.objects.insert(name, object);
            Ok(size)
        })
    }

    async fn abort(&self, upload: &Upload) -> Result<()> {
        self.with(|s| s.uploads.remove(&upload.id));
        Ok(())
    }

    async fn stage(
        &self,
        upload: &Upload,
        first_ei: u64,
        last_ei: u64,
        data: Vec<u8>,
    ) -> Result<StagedChunk> {
        self.write(|s| {
            let name = StagedChunk::new_name(first_ei, last_ei);
            let size = data.len() as u64;
            upload_of(s, upload)?.staged.insert(name.clone(), data);
            Ok(StagedChunk {
                name,
                first_ei,
                last_ei,
                size,
            })
        })
    }

    async fn list_staged(&self, upload: &Upload) -> Result<Vec<StagedChunk>> {
        Ok(self.with(|s| {
            s.uploads
                .get(&upload.id)
                .map(|u| {
                    u.staged
                        .iter()
                        .filter_map(|(name, d)| StagedChunk::parse(name, d.len() as u64))
                        .collect()
                })
                .unwrap_or_default()
        }))
    }

    async fn read_staged(&self, upload: &Upload, chunk: &StagedChunk) -> Result<Vec<u8>> {
        self.with(|s| {
            upload_of(s, upload)?
                .staged
                .get(&chunk.name)
                .cloned()
                .ok_or_else(|| StorageError::NotFound(chunk.name.clone()))
        })
    }

    async fn delete_staged(&self, upload: &Upload, chunks: &[StagedChunk]) -> Result<()> {
        self.write(|s| {
            if let Some(u) = s.uploads.get_mut(&upload.id) {
                for c in chunks {
                    u.staged.remove(&c.name);
                }
            }
            Ok(())
        })
    }

    async fn size(&self, sid: &str, object: u32) -> Result<u64> {
        self.with(|s| {
            s.objects
                .get(&object_name(sid, object))
                .map(|r| r.len() as u64)
                .ok_or_else(|| StorageError::NotFound(format!("recording {sid}")))
        })
    }

    async fn read(&self, sid: &str, object: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.with(|s| {
            let r = s
                .objects
                .get(&object_name(sid, object))
                .ok_or_else(|| StorageError::NotFound(format!("recording {sid}")))?;
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(r.len());
            let end = start.saturating_add(len).min(r.len());
            Ok(r[start..end].to_vec())
        })
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn passes_the_conformance_suite() {
        super::super::conformance::run(&super::MemoryStore::new(16)).await;
    }
}
