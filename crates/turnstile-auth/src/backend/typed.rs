//! Typed records over the backend: one encoding (JSON), `NotFound` mapped
//! once, and every read-modify-write as one compare-and-swap loop around a
//! closure, so that two auth servers changing one record at once never lose
//! either change.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;
use turnstile_api::error::ApiError;

use super::{Backend, BackendError};

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(value)
        .map_err(|e| ApiError::internal(format!("stored record {key:?} is corrupt: {e}")))
}

/// A record as read, with what a conditional write needs.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    pub value: T,
    pub revision: u64,
    pub expires: Option<SystemTime>,
}

/// What [`update`]'s closure decides a record becomes.
#[derive(Debug)]
pub enum Change<T> {
    /// Leave it as it is (or absent).
    Keep,
    Put(T, Option<SystemTime>),
    Delete,
    /// Decide again on what the backend holds now: for a decision (a
    /// refusal, say) that must not rest on a cached copy another auth
    /// server may have made stale. On a fresh read it is taken as `Keep`.
    Reread,
}

/// Attempts before an update gives up on a record others keep changing.
const MAX_ATTEMPTS: u32 = 64;

/// The record at `key`, or `None`.
pub async fn get<T: DeserializeOwned>(
    backend: &dyn Backend,
    key: &str,
) -> Result<Option<Stored<T>>, ApiError> {
    Ok(read(backend, key).await?)
}

async fn read<T: DeserializeOwned>(
    backend: &dyn Backend,
    key: &str,
) -> Result<Option<Stored<T>>, BackendError> {
    match backend.get(key).await {
        Ok(item) => Ok(Some(Stored {
            value: serde_json::from_slice(&item.value).map_err(|e| {
                BackendError::Storage(format!("stored record {key:?} is corrupt: {e}"))
            })?,
            revision: item.revision,
            expires: item.expires,
        })),
        Err(BackendError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads `key`, asks `decide` what it becomes, and writes that only if
/// nobody wrote in between; when somebody did, reads again and asks again.
/// Returns what the last call of `decide` returned beside its change. An
/// error from `decide` ends the update with nothing written.
pub async fn update<T, R>(
    backend: &dyn Backend,
    key: &str,
    mut decide: impl FnMut(Option<&Stored<T>>) -> Result<(Change<T>, R), ApiError>,
) -> Result<R, ApiError>
where
    T: Serialize + DeserializeOwned,
{
    update_cached(backend, key, &mut None, |current, _| decide(current)).await
}

/// [`update`] starting from `cache`, the record as this process last read
/// or wrote it (`None`: read it first), which saves a read per change while
/// this process is the record's only writer. `decide` is told whether what
/// it sees is that cached copy. A conflict drops the copy and reads; on
/// return `cache` holds the record as last read or written. Retries after
/// a conflict wait a random while, up to the time the failed round took
/// times the attempt, so that two auth servers fighting over one record
/// stop meeting in lockstep whatever the backend's speed.
pub async fn update_cached<T, R, E>(
    backend: &dyn Backend,
    key: &str,
    cache: &mut Option<Stored<T>>,
    mut decide: impl FnMut(Option<&Stored<T>>, bool) -> Result<(Change<T>, R), E>,
) -> Result<R, E>
where
    T: Serialize + DeserializeOwned,
    E: From<BackendError>,
{
    let mut round = Duration::ZERO;
    for attempt in 0..MAX_ATTEMPTS {
        backoff(attempt, round).await;
        let began = Instant::now();
        let (current, from_cache) = match cache.take() {
            Some(c) => (Some(c), true),
            None => (read::<T>(backend, key).await?, false),
        };
        let (change, out) = decide(current.as_ref(), from_cache)?;
        let written = match (change, current) {
            (Change::Reread, _) if from_cache => {
                round = Duration::ZERO;
                continue;
            }
            (Change::Keep | Change::Reread, current) => {
                *cache = current;
                return Ok(out);
            }
            (Change::Delete, None) => return Ok(out),
            (Change::Put(value, expires), None) => backend
                .create(key, encode(&value), expires)
                .await
                .map(|revision| Some((value, revision, expires))),
            (Change::Put(value, expires), Some(c)) => backend
                .compare_and_swap(key, c.revision, encode(&value), expires)
                .await
                .map(|revision| Some((value, revision, expires))),
            (Change::Delete, Some(c)) => backend
                .compare_and_delete(key, c.revision)
                .await
                .map(|()| None),
        };
        match written {
            Ok(stored) => {
                *cache = stored.map(|(value, revision, expires)| Stored {
                    value,
                    revision,
                    expires,
                });
                return Ok(out);
            }
            // Somebody wrote (or deleted, or created) in between: again.
            Err(
                BackendError::CompareFailed(_)
                | BackendError::AlreadyExists(_)
                | BackendError::NotFound(_),
            ) => round = began.elapsed(),
            Err(e) => return Err(e.into()),
        }
    }
    Err(BackendError::Contended(key.to_string()).into())
}

/// Nothing before a first try or a reread; after a conflict, a random
/// while up to the failed round's time (at least 0.2 ms) times the attempt.
async fn backoff(attempt: u32, round: Duration) {
    if attempt > 0 && !round.is_zero() {
        let unit_us = u64::try_from(round.as_micros())
            .unwrap_or(u64::MAX)
            .max(200);
        let max_us = unit_us.saturating_mul(u64::from(attempt.min(8)));
        let us = rand::random::<u64>() % max_us.max(1);
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;
    use crate::backend::MemoryBackend;

    #[tokio::test]
    async fn racing_updates_of_different_fields_keep_both() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        backend.put("r", encode(&(0u32, 0u32)), None).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..20u32 {
            let backend = backend.clone();
            tasks.push(tokio::spawn(async move {
                update(backend.as_ref(), "r", |c: Option<&Stored<(u32, u32)>>| {
                    let (a, b) = c.map_or((0, 0), |c| c.value);
                    let next = if i % 2 == 0 { (a + 1, b) } else { (a, b + 1) };
                    Ok((Change::Put(next, None), ()))
                })
                .await
                .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let stored: Stored<(u32, u32)> = get(backend.as_ref(), "r").await.unwrap().unwrap();
        assert_eq!(stored.value, (10, 10));
    }

    #[tokio::test]
    async fn a_refusal_writes_nothing_and_keep_and_delete_do_what_they_say() {
        let backend = MemoryBackend::new();
        let e = update(
            &backend,
            "k",
            |_: Option<&Stored<u32>>| -> Result<(Change<u32>, ()), _> {
                Err(ApiError::bad_parameter("no"))
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.message, "no");
        assert!(get::<u32>(&backend, "k").await.unwrap().is_none());
        update(&backend, "k", |_: Option<&Stored<u32>>| {
            Ok((Change::Put(7, None), ()))
        })
        .await
        .unwrap();
        update(&backend, "k", |_: Option<&Stored<u32>>| {
            Ok((Change::Keep, ()))
        })
        .await
        .unwrap();
        assert_eq!(get::<u32>(&backend, "k").await.unwrap().unwrap().value, 7);
        update(&backend, "k", |_: Option<&Stored<u32>>| {
            Ok((Change::Delete, ()))
        })
        .await
        .unwrap();
        assert!(get::<u32>(&backend, "k").await.unwrap().is_none());
    }
}
