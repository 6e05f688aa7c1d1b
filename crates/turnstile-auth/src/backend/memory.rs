//! An in-memory backend for unit tests and the in-process test cluster. Nothing
//! survives the process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use turnstile_api::clock::{Clock, SystemClock};

use super::{Backend, BackendError, Item, Notifier, Result, Watch, is_live};

#[derive(Debug)]
pub struct MemoryBackend {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    notifier: Notifier,
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    items: BTreeMap<String, Item>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            state: Mutex::new(State::default()),
            notifier: Notifier::default(),
        }
    }

    /// Tells watchers of a write or delete that succeeded.
    fn told<T>(&self, key: &str, deleted: bool, result: Result<T>) -> Result<T> {
        if result.is_ok() {
            self.notifier.changed(key, deleted);
        }
        result
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State, SystemTime) -> T) -> T {
        let now = self.clock.now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state, now)
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    fn live(&self, key: &str, now: SystemTime) -> Option<&Item> {
        self.items.get(key).filter(|i| is_live(i.expires, now))
    }

    fn write(&mut self, key: &str, value: Vec<u8>, expires: Option<SystemTime>) -> u64 {
        self.revision += 1;
        let revision = self.revision;
        self.items.insert(
            key.to_string(),
            Item {
                key: key.to_string(),
                value,
                revision,
                expires,
            },
        );
        revision
    }

    fn check_revision(&self, key: &str, expected: u64, now: SystemTime) -> Result<()> {
        match self.live(key, now) {
            None => Err(BackendError::NotFound(key.into())),
            Some(item) if item.revision != expected => Err(BackendError::CompareFailed(key.into())),
            Some(_) => Ok(()),
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn get(&self, key: &str) -> Result<Item> {
        self.with_state(|s, now| {
            s.live(key, now)
                .cloned()
                .ok_or_else(|| BackendError::NotFound(key.into()))
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, expires: Option<SystemTime>) -> Result<u64> {
        let written = Ok(self.with_state(|s, _| s.write(key, value, expires)));
        self.told(key, false, written)
    }

    async fn create(&self, key: &str, value: Vec<u8>, expires: Option<SystemTime>) -> Result<u64> {
        let written = self.with_state(|s, now| {
            if s.live(key, now).is_some() {
                return Err(BackendError::AlreadyExists(key.into()));
            }
            Ok(s.write(key, value, expires))
        });
        self.told(key, false, written)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        expires: Option<SystemTime>,
    ) -> Result<u64> {
        let written = self.with_state(|s, now| {
            s.check_revision(key, expected, now)?;
            Ok(s.write(key, value, expires))
        });
        self.told(key, false, written)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let deleted = self.with_state(|s, now| {
            if s.live(key, now).is_none() {
                return Err(BackendError::NotFound(key.into()));
            }
            s.items.remove(key);
            Ok(())
        });
        self.told(key, true, deleted)
    }

    async fn compare_and_delete(&self, key: &str, expected: u64) -> Result<()> {
        let deleted = self.with_state(|s, now| {
            s.check_revision(key, expected, now)?;
            s.items.remove(key);
            Ok(())
        });
        self.told(key, true, deleted)
    }

    async fn range(&self, prefix: &str) -> Result<Vec<Item>> {
        Ok(self.with_state(|s, now| {
            s.items
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(_, i)| is_live(i.expires, now))
                .map(|(_, i)| i.clone())
                .collect()
        }))
    }

    async fn watch(&self, prefix: &str) -> Result<Watch> {
        Ok(self.notifier.watch(prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnstile_api::clock::ManualClock;

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        super::super::conformance::run(|clock: Arc<ManualClock>| async move {
            Arc::new(MemoryBackend::with_clock(clock)) as Arc<dyn Backend>
        })
        .await;
    }
}
