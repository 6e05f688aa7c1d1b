//! Typed records over the backend: one encoding (JSON), `NotFound` mapped
//! once, and every read-modify-write as one compare-and-swap loop around a
//! closure, so that two auth servers changing one record at once never lose
//! either change.

use std::time::SystemTime;

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
}

/// The record at `key`, or `None`.
pub async fn get<T: DeserializeOwned>(
    backend: &dyn Backend,
    key: &str,
) -> Result<Option<Stored<T>>, ApiError> {
    match backend.get(key).await {
        Ok(item) => Ok(Some(Stored {
            value: decode(key, &item.value)?,
            revision: item.revision,
            expires: item.expires,
        })),
        Err(BackendError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
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
    loop {
        let current = get::<T>(backend, key).await?;
        let (change, out) = decide(current.as_ref())?;
        let written = match (change, &current) {
            (Change::Keep, _) | (Change::Delete, None) => return Ok(out),
            (Change::Put(value, expires), None) => {
                backend.create(key, encode(&value), expires).await.map(drop)
            }
            (Change::Put(value, expires), Some(c)) => backend
                .compare_and_swap(key, c.revision, encode(&value), expires)
                .await
                .map(drop),
            (Change::Delete, Some(c)) => backend.compare_and_delete(key, c.revision).await,
        };
        match written {
            Ok(()) => return Ok(out),
            // Somebody wrote (or deleted, or created) in between: again.
            Err(
                BackendError::CompareFailed(_)
                | BackendError::AlreadyExists(_)
                | BackendError::NotFound(_),
            ) => continue,
            Err(e) => return Err(e.into()),
        }
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
