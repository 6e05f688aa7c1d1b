//! Semaphores in the backend, at `semaphores/<kind>/<name>`: acquire, renew,
//! release, list. Exact under races on every backend: each change is a
//! read-modify-write through the typed layer, committed with
//! compare-and-swap on the revision read and retried with jitter on conflict. Within one auth process, changes to the
//! same semaphore queue for one committer task, which writes each batch with
//! a single compare-and-swap, so the swap rarely loses; the swap is what
//! keeps several auth servers exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use turnstile_api::clock::Clock;
use turnstile_api::error::ApiError;
use turnstile_api::role::validate_name;
use turnstile_api::semaphore::{self, Lease, Semaphore};

use crate::backend::typed::{self, Change, Stored};
use crate::backend::{Backend, BackendError};

/// Gives every change in `batch` the same error.
fn answer_all(batch: Vec<(Op, Reply)>, error: &SemaphoreError) {
    for (_, reply) in batch {
        let _ = reply.send(Err(error.clone()));
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SemaphoreError {
    /// `held`: where and since when the oldest lease is held.
    #[error("semaphore {key} is full (max={max}){held}")]
    LimitExceeded { key: String, max: u32, held: String },
    #[error("too much contention on semaphore {0}; try again")]
    Contention(String),
    #[error("lease {lease_id} of semaphore {key} expired or was released")]
    LeaseGone { key: String, lease_id: String },
    /// A host asked to renew or release a lease another host holds.
    #[error(
        "lease {lease_id} of semaphore {key} is held by another host; a host may renew or release only its own leases"
    )]
    NotHolder { key: String, lease_id: String },
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
            SemaphoreError::NotHolder { .. } => ErrorKind::AccessDenied,
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

/// The semaphore as this process last read or committed it.
type Cached = Option<Stored<Semaphore>>;

/// A change waiting to be committed. `holder`: the host asking, which must
/// hold the lease (`None`: an administrator, who may release any).
enum Op {
    Acquire(LeaseRequest),
    KeepAlive {
        lease_id: String,
        ttl: Duration,
        holder: String,
    },
    Cancel {
        lease_id: String,
        holder: Option<String>,
    },
}

type Reply = tokio::sync::oneshot::Sender<Result<Option<Lease>, SemaphoreError>>;

/// One semaphore's state in this process: the changes waiting for a commit,
/// whether a committer task is running, and the last committed value (held
/// by the committer while it runs).
#[derive(Default)]
struct Slot {
    queued: Vec<(Op, Reply)>,
    committing: bool,
    cached: Cached,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("queued", &self.queued.len())
            .field("committing", &self.committing)
            .finish_non_exhaustive()
    }
}

type SharedSlot = Arc<Mutex<Slot>>;

fn lock(slot: &SharedSlot) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Clears `committing` however the committer task ends, so a panic cannot
/// wedge the semaphore; changes it had not answered see their reply dropped.
struct CommitterGuard(SharedSlot);

impl Drop for CommitterGuard {
    fn drop(&mut self) {
        lock(&self.0).committing = false;
    }
}

#[derive(Debug)]
pub struct Semaphores {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    slots: Mutex<HashMap<String, SharedSlot>>,
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

fn decode(key: &str, bytes: &[u8]) -> Result<Semaphore, SemaphoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| BackendError::Storage(format!("semaphore {key} is corrupt: {e}")).into())
}

/// `now` plus a lease lifetime clamped to
/// [`semaphore::LEASE_TTL_MIN`]..=[`semaphore::LEASE_TTL_MAX`], so no host
/// can take a slot for ever nor overflow the expiry.
fn lease_expiry(now: i64, ttl: Duration) -> i64 {
    let ttl = ttl.clamp(semaphore::LEASE_TTL_MIN, semaphore::LEASE_TTL_MAX);
    now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
}

/// Refuses a change to `lease` from a host other than its holder.
fn check_holder(lease: &Lease, holder: Option<&str>, key: &str) -> Result<(), SemaphoreError> {
    match holder {
        Some(h) if h != lease.holder => Err(SemaphoreError::NotHolder {
            key: key.to_string(),
            lease_id: lease.lease_id.clone(),
        }),
        _ => Ok(()),
    }
}

/// Applies one change to the live leases; `Ok(Some)` for a new lease.
fn apply(
    sem: &mut Semaphore,
    op: &Op,
    key: &str,
    now: i64,
) -> Result<Option<Lease>, SemaphoreError> {
    match op {
        Op::Acquire(req) => {
            if sem.leases.len() >= req.max as usize {
                return Err(SemaphoreError::LimitExceeded {
                    key: key.to_string(),
                    max: req.max,
                    held: semaphore::held_on(&sem.leases),
                });
            }
            let lease = Lease {
                lease_id: uuid::Uuid::new_v4().to_string(),
                holder: req.holder.clone(),
                holder_name: req.holder_name.clone(),
                expires: lease_expiry(now, req.ttl),
                login: req.login.clone(),
                remote_addr: req.remote_addr.clone(),
                since: now,
            };
            sem.leases.push(lease.clone());
            Ok(Some(lease))
        }
        Op::KeepAlive {
            lease_id,
            ttl,
            holder,
        } => {
            let lease = sem
                .leases
                .iter_mut()
                .find(|l| &l.lease_id == lease_id)
                .ok_or_else(|| SemaphoreError::LeaseGone {
                    key: key.to_string(),
                    lease_id: lease_id.clone(),
                })?;
            check_holder(lease, Some(holder), key)?;
            lease.expires = lease_expiry(now, *ttl);
            Ok(Some(lease.clone()))
        }
        Op::Cancel { lease_id, holder } => {
            if let Some(lease) = sem.leases.iter().find(|l| &l.lease_id == lease_id) {
                check_holder(lease, holder.as_deref(), key)?;
            }
            sem.leases.retain(|l| &l.lease_id != lease_id);
            Ok(None)
        }
    }
}

/// Applies `batch` in order and commits it with one compare-and-swap
/// through the typed layer, starting from this process's cached copy;
/// answers every change.
async fn commit(
    backend: &dyn Backend,
    clock: &dyn Clock,
    key: &str,
    cached: &mut Cached,
    batch: Vec<(Op, Reply)>,
) {
    let outcome = typed::update_cached(backend, key, cached, |current, from_cache| {
        let now = ms(clock.now());
        let mut sem = current.map(|c| c.value.clone()).unwrap_or_default();
        sem.drop_expired(now);
        let results: Vec<_> = batch
            .iter()
            .map(|(op, _)| apply(&mut sem, op, key, now))
            .collect();
        let change = if current.map(|c| &c.value) == Some(&sem) {
            if from_cache && results.iter().any(Result::is_err) {
                // A refusal must not rest on a stale copy: another auth
                // server may have freed a slot.
                Change::Reread
            } else {
                Change::Keep
            }
        } else {
            match sem.expires() {
                Some(e) => Change::Put(sem, Some(from_ms(e))),
                None => Change::Delete,
            }
        };
        Ok::<_, SemaphoreError>((change, results))
    })
    .await;
    match outcome {
        Ok(results) => {
            for ((_, reply), result) in batch.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(e) => answer_all(batch, &e),
    }
}

impl Semaphores {
    pub fn new(backend: Arc<dyn Backend>, clock: Arc<dyn Clock>) -> Self {
        Self {
            backend,
            clock,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &str) -> SharedSlot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.len() > 4096 {
            slots.retain(|_, s| Arc::strong_count(s) > 1);
        }
        slots.entry(key.to_string()).or_default().clone()
    }

    fn check(kind: &str, name: &str) -> Result<(), SemaphoreError> {
        if kind != semaphore::CONNECTION {
            return Err(SemaphoreError::BadParameter(format!(
                "unknown semaphore kind {kind:?}"
            )));
        }
        validate_name("semaphore name", name).map_err(SemaphoreError::BadParameter)
    }

    /// Queues a change and waits for the commit that carries it. One
    /// committer task per semaphore commits everything queued so far in one
    /// compare-and-swap (group commit), so a crowd of contenders costs a few
    /// writes, not one each. The committer is detached from the callers, so
    /// a caller that goes away mid-commit cannot strand the changes queued
    /// with it. (Its own lease, if written, lapses with its TTL.)
    async fn submit(&self, key: &str, op: Op) -> Result<Option<Lease>, SemaphoreError> {
        let slot = self.slot(key);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut s = lock(&slot);
            s.queued.push((op, tx));
            !std::mem::replace(&mut s.committing, true)
        };
        if start {
            let (backend, clock, key) = (self.backend.clone(), self.clock.clone(), key.to_string());
            tokio::spawn(async move {
                let _guard = CommitterGuard(slot.clone());
                loop {
                    let (batch, mut cached) = {
                        let mut s = lock(&slot);
                        if s.queued.is_empty() {
                            return;
                        }
                        (std::mem::take(&mut s.queued), s.cached.take())
                    };
                    commit(&*backend, &*clock, &key, &mut cached, batch).await;
                    lock(&slot).cached = cached;
                }
            });
        }
        rx.await
            .unwrap_or_else(|_| Err(SemaphoreError::Contention(key.to_string())))
    }

    /// Takes a lease if fewer than `max` live leases are held.
    pub async fn acquire(&self, req: &LeaseRequest) -> Result<Lease, SemaphoreError> {
        Self::check(&req.kind, &req.name)?;
        if req.max == 0 || req.ttl.is_zero() {
            return Err(SemaphoreError::BadParameter(
                "a lease needs a limit and a lifetime above zero".into(),
            ));
        }
        self.submit(&key(&req.kind, &req.name), Op::Acquire(req.clone()))
            .await?
            .ok_or_else(|| SemaphoreError::BadParameter("no lease".into()))
    }

    /// Extends a live lease `holder` holds to `ttl` from now.
    pub async fn keep_alive(
        &self,
        kind: &str,
        name: &str,
        lease_id: &str,
        ttl: Duration,
        holder: &str,
    ) -> Result<Lease, SemaphoreError> {
        Self::check(kind, name)?;
        let op = Op::KeepAlive {
            lease_id: lease_id.to_string(),
            ttl,
            holder: holder.to_string(),
        };
        self.submit(&key(kind, name), op)
            .await?
            .ok_or_else(|| SemaphoreError::LeaseGone {
                key: key(kind, name),
                lease_id: lease_id.to_string(),
            })
    }

    /// Releases a lease `holder` holds (`None`: an administrator releasing
    /// any); releasing one that is already gone is not an error.
    pub async fn cancel(
        &self,
        kind: &str,
        name: &str,
        lease_id: &str,
        holder: Option<&str>,
    ) -> Result<(), SemaphoreError> {
        Self::check(kind, name)?;
        let op = Op::Cancel {
            lease_id: lease_id.to_string(),
            holder: holder.map(str::to_string),
        };
        self.submit(&key(kind, name), op).await.map(|_| ())
    }

    /// Releases every lease `holder` holds (a node starting again frees
    /// what its previous run held); returns how many.
    pub async fn release_holder(&self, holder: &str) -> Result<usize, SemaphoreError> {
        let mut released = 0;
        for (kind, name, lease) in self.list("").await? {
            if lease.holder == holder {
                self.cancel(&kind, &name, &lease.lease_id, Some(holder))
                    .await?;
                released += 1;
            }
        }
        Ok(released)
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

    const SECS_30: Duration = Duration::from_secs(30);

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
        // Two Semaphores on one backend: no shared queue, only the CAS.
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
    async fn a_refusal_rereads_a_slot_freed_by_another_auth_server() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let a = Semaphores::new(backend.clone(), Arc::new(SystemClock));
        let b = Semaphores::new(backend, Arc::new(SystemClock));
        let held = a.acquire(&request(1)).await.unwrap();
        assert!(matches!(
            a.acquire(&request(1)).await,
            Err(SemaphoreError::LimitExceeded { .. })
        ));
        // Released through the other server: `a` still caches it as full.
        b.cancel("connection", "alice", &held.lease_id, Some("node-1"))
            .await
            .unwrap();
        a.acquire(&request(1))
            .await
            .expect("the slot freed elsewhere is free here at once");
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
        sems.keep_alive("connection", "alice", &l1.lease_id, SECS_30, "node-1")
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
            sems.keep_alive("connection", "alice", &l1.lease_id, SECS_30, "node-1")
                .await,
            Err(SemaphoreError::LeaseGone { .. })
        ));
        let l2 = sems.acquire(&request(1)).await.unwrap();
        sems.cancel("connection", "alice", &l2.lease_id, Some("node-1"))
            .await
            .unwrap();
        sems.cancel("connection", "alice", &l2.lease_id, Some("node-1"))
            .await
            .unwrap();
        assert!(sems.list("").await.unwrap().is_empty());
        sems.acquire(&request(1)).await.unwrap();
    }

    #[tokio::test]
    async fn only_the_holder_renews_or_releases_a_lease() {
        let sems = Semaphores::new(Arc::new(MemoryBackend::new()), Arc::new(SystemClock));
        let held = sems.acquire(&request(1)).await.unwrap();
        let e = sems
            .keep_alive("connection", "alice", &held.lease_id, SECS_30, "node-2")
            .await
            .unwrap_err();
        assert!(matches!(e, SemaphoreError::NotHolder { .. }), "{e}");
        let e = sems
            .cancel("connection", "alice", &held.lease_id, Some("node-2"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("held by another host"), "{e}");
        assert_eq!(sems.list("").await.unwrap().len(), 1, "still held");
        assert_eq!(sems.release_holder("node-2").await.unwrap(), 0);
        sems.keep_alive("connection", "alice", &held.lease_id, SECS_30, "node-1")
            .await
            .expect("the holder renews");
        sems.cancel("connection", "alice", &held.lease_id, None)
            .await
            .expect("an administrator releases any lease");
        assert!(sems.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn lease_lifetimes_are_clamped() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let sems = Semaphores::new(
            Arc::new(MemoryBackend::with_clock(clock.clone())),
            clock.clone(),
        );
        let mut forever = request(1);
        forever.ttl = Duration::MAX;
        let lease = sems.acquire(&forever).await.expect("no overflow");
        let now = ms(clock.now());
        assert_eq!(lease.expires - now, 3_600_000, "at most an hour");
        let renewed = sems
            .keep_alive(
                "connection",
                "alice",
                &lease.lease_id,
                Duration::MAX,
                "node-1",
            )
            .await
            .unwrap();
        assert_eq!(renewed.expires - now, 3_600_000);
        clock.advance(semaphore::LEASE_TTL_MAX + Duration::from_secs(1));
        sems.acquire(&request(1))
            .await
            .expect("the hour-long lease lapsed");
        let mut instant = request(2);
        instant.ttl = Duration::from_millis(1);
        let short = sems.acquire(&instant).await.unwrap();
        assert_eq!(short.expires - ms(clock.now()), 1_000, "at least a second");
    }
}
