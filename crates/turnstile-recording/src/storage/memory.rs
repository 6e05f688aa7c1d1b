//! Recordings in memory, for unit tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Part, Result, StorageError, Upload, UploadStore, check_id};

#[derive(Debug, Default)]
pub struct MemoryStore {
    min_part: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    uploads: BTreeMap<String, (Upload, BTreeMap<u32, Vec<u8>>)>,
    recordings: BTreeMap<String, Vec<u8>>,
}

impl MemoryStore {
    pub fn new(min_part: usize) -> Self {
        Self {
            min_part,
            state: Mutex::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[async_trait]
impl UploadStore for MemoryStore {
    fn min_part_size(&self) -> usize {
        self.min_part
    }

    fn url(&self, sid: &str) -> String {
        format!("memory://{sid}")
    }

    async fn create_upload(&self, sid: &str) -> Result<Upload> {
        check_id("session id", sid)?;
        let upload = Upload {
            id: uuid::Uuid::new_v4().to_string(),
            sid: sid.to_string(),
        };
        self.with(|s| {
            s.uploads
                .insert(upload.id.clone(), (upload.clone(), BTreeMap::new()))
        });
        Ok(upload)
    }

    async fn upload_part(&self, upload: &Upload, number: u32, data: Vec<u8>) -> Result<Part> {
        self.with(|s| {
            let (_, parts) = s
                .uploads
                .get_mut(&upload.id)
                .ok_or_else(|| StorageError::NotFound(format!("upload {}", upload.id)))?;
            let size = data.len() as u64;
            parts.insert(number, data);
            Ok(Part { number, size })
        })
    }

    async fn list_parts(&self, upload: &Upload) -> Result<Vec<Part>> {
        self.with(|s| {
            let (_, parts) = s
                .uploads
                .get(&upload.id)
                .ok_or_else(|| StorageError::NotFound(format!("upload {}", upload.id)))?;
            Ok(parts
                .iter()
                .map(|(n, d)| Part {
                    number: *n,
                    size: d.len() as u64,
                })
                .collect())
        })
    }

    async fn complete(&self, upload: &Upload, parts: &[Part]) -> Result<u64> {
        self.with(|s| {
            let (_, stored) = s
                .uploads
                .remove(&upload.id)
                .ok_or_else(|| StorageError::NotFound(format!("upload {}", upload.id)))?;
            let mut sorted = parts.to_vec();
            sorted.sort_by_key(|p| p.number);
            let rec = s.recordings.entry(upload.sid.clone()).or_default();
            for p in sorted {
                let data = stored
                    .get(&p.number)
                    .ok_or_else(|| StorageError::NotFound(format!("part {}", p.number)))?;
                rec.extend_from_slice(data);
            }
            Ok(rec.len() as u64)
        })
    }

    async fn abort(&self, upload: &Upload) -> Result<()> {
        self.with(|s| s.uploads.remove(&upload.id));
        Ok(())
    }

    async fn list_uploads(&self) -> Result<Vec<Upload>> {
        Ok(self.with(|s| s.uploads.values().map(|(u, _)| u.clone()).collect()))
    }

    async fn size(&self, sid: &str) -> Result<u64> {
        self.with(|s| {
            s.recordings
                .get(sid)
                .map(|r| r.len() as u64)
                .ok_or_else(|| StorageError::NotFound(format!("recording {sid}")))
        })
    }

    async fn read(&self, sid: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.with(|s| {
            let r = s
                .recordings
                .get(sid)
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
