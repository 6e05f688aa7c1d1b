//! Semaphores in the backend, at `semaphores/<kind>/<name>`: acquire, renew,
//! release, list. Exact under races on every backend: each change is a
//! read-modify-write committed with compare-and-swap on the revision read,
//! retried with jitter on conflict. Within one auth process, changes to the
//! same semaphore also queue on a local lock, so the compare-and-swap rarely
//! loses; it is what keeps several auth servers exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use turnstile_api::clock::Clock;
use turnstile_api::error::ApiError;
use turnstile_api::role::validate_name;
use turnstile_api::semaphore::{self, Lease, Semaphore};

use crate::backend::{Backend, BackendError};

/// Attempts before giving up on a contended semaphore.
const MAX_ATTEMPTS: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum SemaphoreError {
    #[error("semaphore {key} is full (max={max})")]
    LimitExceeded { key: String, max: u32 },
    #[error("too much contention on semaphore {0}; try again")]
    Contention(String),
    #[error("lease {lease_id} of semaphore {key} expired or was released")]
    LeaseGone { key: String, lease_id: String },
    #[error("{0}")]
    BadParameter(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl From<SemaphoreError> for ApiError {
    fn from(e: SemaphoreError) -> Self {
        use turnstile_api::error::ErrorKind;
        let kind = match &e {
            SemaphoreError::LimitExceeded { .. } => ErrorKind::LimitExceeded,
            SemaphoreError::Contention(_) => ErrorKind::Unavailable,
            SemaphoreError::LeaseGone { .. } => ErrorKind::NotFound,
            SemaphoreError::BadParameter(_) => ErrorKind::BadParameter,
            SemaphoreError::Backend(b) => b.kind(),
        };
        ApiError::new(kind, e.to_string())
    }
}

/// What a new lease records about its holder.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    pub kind: String,
    pub name: String,
    pub max: u32,
    pub ttl: Duration,
    pub holder: String,
    pub holder_name: String,
    pub login: String,
    pub remote_addr: String,
}

/// The revision and value this process last committed for a semaphore.
type Cached = Option<(u64, Semaphore)>;

#[derive(Debug)]
pub struct Semaphores {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Cached>>>>,
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_ms(v: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

fn key(kind: &str, name: &str) -> String {
    format!("semaphores/{kind}/{name}")
}

fn encode(s: &Semaphore) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_default()
}

fn decode(key: &str, bytes: &[u8]) -> Result<Semaphore, SemaphoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| BackendError::Storage(format!("semaphore {key} is corrupt: {e}")).into())
}

async fn jitter(attempt: u32) {
    if attempt > 0 {
        let max_us = 200 * u64::from(attempt.min(20));
        let us = rand::random::<u64>() % max_us.max(1);
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
}

impl Semaphores {
    pub fn new(backend: Arc<dyn Backend>, clock: Arc<dyn Clock>) -> Self {
        Self {
            backend,
            clock,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn local_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<Cached>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key.to_string()).or_default().clone()
    }

    fn check(kind: &str, name: &str) -> Result<(), SemaphoreError> {
        if kind != semaphore::CONNECTION {
            return Err(SemaphoreError::BadParameter(format!(
                "unknown semaphore kind {kind:?}"
            )));
        }
        validate_name("semaphore name", name).map_err(SemaphoreError::BadParameter)
    }

    /// Takes a lease if fewer than `max` live leases are held.
    pub async fn acquire(&self, req: &LeaseRequest) -> Result<Lease, SemaphoreError> {
        Self::check(&req.kind, &req.name)?;
        if req.max == 0 || req.ttl.is_zero() {
            return Err(SemaphoreError::BadParameter(
                "a lease needs a limit and a lifetime above zero".into(),
            ));
        }
        let key = key(&req.kind, &req.name);
        let ttl_ms = i64::try_from(req.ttl.as_millis()).unwrap_or(i64::MAX);
        let (lease, _) = self
            .modify(&key, true, |sem, now| {
                if sem.leases.len() >= req.max as usize {
                    return Err(SemaphoreError::LimitExceeded {
                        key: key.clone(),
                        max: req.max,
                    });
                }
                let lease = Lease {
                    lease_id: uuid::Uuid::new_v4().to_string(),
                    holder: req.holder.clone(),
                    holder_name: req.holder_name.clone(),
                    expires: now + ttl_ms,
                    login: req.login.clone(),
                    remote_addr: req.remote_addr.clone(),
                    since: now,
                };
                sem.leases.push(lease.clone());
                Ok(lease)
            })
            .await?;
        Ok(lease)
    }

    /// Applies `change` to the live leases of the semaphore at `key` and
    /// commits with compare-and-swap, retrying on conflict. The last value
    /// this process committed is cached under the local lock, so an
    /// uncontended change is one backend write; a conflict (another auth
    /// server wrote) reloads it.
    async fn modify<T>(
        &self,
        key: &str,
        create: bool,
        mut change: impl FnMut(&mut Semaphore, i64) -> Result<T, SemaphoreError>,
    ) -> Result<(T, Semaphore), SemaphoreError> {
        let lock = self.local_lock(key);
        let mut cached = lock.lock().await;
        for attempt in 0..MAX_ATTEMPTS {
            jitter(attempt).await;
            let now = ms(self.clock.now());
            let current = match cached.take() {
                Some(c) => Some(c),
                None => match self.backend.get(key).await {
                    Ok(item) => Some((item.revision, decode(key, &item.value)?)),
                    Err(BackendError::NotFound(_)) => None,
                    Err(e) => return Err(e.into()),
                },
            };
            let Some((revision, stored)) = current else {
                if !create {
                    return Err(BackendError::NotFound(key.to_string()).into());
                }
                let mut sem = Semaphore::default();
                let out = change(&mut sem, now)?;
                let expires = sem.expires().map(from_ms);
                match self.backend.create(key, encode(&sem), expires).await {
                    Ok(rev) => {
                        *cached = Some((rev, sem.clone()));
                        return Ok((out, sem));
                    }
                    Err(BackendError::AlreadyExists(_)) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            let mut sem = stored.clone();
            sem.drop_expired(now);
            let out = match change(&mut sem, now) {
                Ok(out) => out,
                Err(e) => {
                    *cached = Some((revision, stored));
                    return Err(e);
                }
            };
            let result = match sem.expires() {
                Some(e) => self
                    .backend
                    .compare_and_swap(key, revision, encode(&sem), Some(from_ms(e)))
                    .await
                    .map(Some),
                None => self
                    .backend
                    .compare_and_delete(key, revision)
                    .await
                    .map(|()| None),
            };
            match result {
                Ok(new_revision) => {
                    *cached = new_revision.map(|r| (r, sem.clone()));
                    return Ok((out, sem));
                }
                Err(BackendError::CompareFailed(_) | BackendError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(SemaphoreError::Contention(key.to_string()))
    }

    /// Applies `change` to an existing semaphore.
    async fn update(
        &self,
        kind: &str,
        name: &str,
        change: impl FnMut(&mut Semaphore, i64) -> Result<(), SemaphoreError>,
    ) -> Result<Semaphore, SemaphoreError> {
        Self::check(kind, name)?;
        let (_, sem) = self.modify(&key(kind, name), false, change).await?;
        Ok(sem)
    }

    /// Extends a live lease to `ttl` from now.
    pub async fn keep_alive(
        &self,
        kind: &str,
        name: &str,
        lease_id: &str,
        ttl: Duration,
    ) -> Result<Lease, SemaphoreError> {
        let gone = || SemaphoreError::LeaseGone {
            key: key(kind, name),
            lease_id: lease_id.to_string(),
        };
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let sem = match self
            .update(kind, name, |sem, now| {
                let lease = sem
                    .leases
                    .iter_mut()
                    .find(|l| l.lease_id == lease_id)
                    .ok_or_else(gone)?;
                lease.expires = now + ttl_ms;
                Ok(())
            })
            .await
        {
            Err(SemaphoreError::Backend(BackendError::NotFound(_))) => return Err(gone()),
            other => other?,
        };
        sem.leases
            .into_iter()
            .find(|l| l.lease_id == lease_id)
            .ok_or_else(gone)
    }

    /// Releases a lease; releasing one that is already gone is not an error.
    pub async fn cancel(
        &self,
        kind: &str,
        name: &str,
        lease_id: &str,
    ) -> Result<(), SemaphoreError> {
        match self
            .update(kind, name, |sem, _| {
                sem.leases.retain(|l| l.lease_id != lease_id);
                Ok(())
            })
            .await
        {
            Ok(_) | Err(SemaphoreError::Backend(BackendError::NotFound(_))) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every live lease of `kind` (all kinds if empty), as (name, lease).
    pub async fn list(&self, kind: &str) -> Result<Vec<(String, String, Lease)>, SemaphoreError> {
        let prefix = if kind.is_empty() {
            "semaphores/".to_string()
        } else {
            format!("semaphores/{kind}/")
        };
        let now = ms(self.clock.now());
        let mut out = Vec::new();
        for item in self.backend.range(&prefix).await? {
            let rest = item.key.trim_start_matches("semaphores/");
            let Some((k, name)) = rest.split_once('/') else {
                continue;
            };
            let mut sem = decode(&item.key, &item.value)?;
            sem.drop_expired(now);
            for lease in sem.leases {
                out.push((k.to_string(), name.to_string(), lease));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{MemoryBackend, SqliteBackend};
    use turnstile_api::clock::{ManualClock, SystemClock};

    fn request(max: u32) -> LeaseRequest {
        LeaseRequest {
            kind: "connection".into(),
            name: "alice".into(),
            max,
            ttl: Duration::from_secs(30),
            holder: "node-1".into(),
            holder_name: "web1".into(),
            login: "root".into(),
            remote_addr: "127.0.0.1:1".into(),
        }
    }

    async fn race(backend: Arc<dyn Backend>) {
        let sems = Arc::new(Semaphores::new(backend, Arc::new(SystemClock)));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let sems = sems.clone();
            tasks.push(tokio::spawn(async move { sems.acquire(&request(2)).await }));
        }
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(SemaphoreError::LimitExceeded { max: 2, .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won, 2, "100 racers for 2 slots");
        assert_eq!(sems.list("connection").await.unwrap().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_hundred_racers_get_exactly_two_slots_on_every_backend() {
        race(Arc::new(MemoryBackend::new())).await;
        let dir = tempfile::tempdir().unwrap();
        race(Arc::new(
            SqliteBackend::open(&dir.path().join("b.sqlite")).unwrap(),
        ))
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn separate_auth_servers_sharing_a_backend_stay_exact() {
        // Two Semaphores on one backend: no shared local lock, only the CAS.
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let a = Arc::new(Semaphores::new(backend.clone(), Arc::new(SystemClock)));
        let b = Arc::new(Semaphores::new(backend, Arc::new(SystemClock)));
        let mut tasks = Vec::new();
        for i in 0..60 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(
                async move { s.acquire(&request(3)).await.is_ok() },
            ));
        }
        let mut won = 0;
        for t in tasks {
            won += usize::from(t.await.unwrap());
        }
        assert_eq!(won, 3);
    }

    #[tokio::test]
    async fn leases_expire_renew_and_release() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let sems = Semaphores::new(
            Arc::new(MemoryBackend::with_clock(clock.clone())),
            clock.clone(),
        );
        let l1 = sems.acquire(&request(1)).await.unwrap();
        assert!(matches!(
            sems.acquire(&request(1)).await,
            Err(SemaphoreError::LimitExceeded { .. })
        ));
        clock.advance(Duration::from_secs(20));
        sems.keep_alive("connection", "alice", &l1.lease_id, Duration::from_secs(30))
            .await
            .unwrap();
        clock.advance(Duration::from_secs(20));
        assert!(
            sems.acquire(&request(1)).await.is_err(),
            "renewed lease still holds"
        );
        clock.advance(Duration::from_secs(11));
        // Expired: the slot is free and the old lease cannot be renewed.
        assert!(matches!(
            sems.keep_alive("connection", "alice", &l1.lease_id, Duration::from_secs(30))
                .await,
            Err(SemaphoreError::LeaseGone { .. })
        ));
        let l2 = sems.acquire(&request(1)).await.unwrap();
        sems.cancel("connection", "alice", &l2.lease_id)
            .await
            .unwrap();
        sems.cancel("connection", "alice", &l2.lease_id)
            .await
            .unwrap();
        assert!(sems.list("").await.unwrap().is_empty());
        sems.acquire(&request(1)).await.unwrap();
    }
}
