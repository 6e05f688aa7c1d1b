//! `max_connections`: a lease on the semaphore `connection/<user>` held by the
//! node for as long as the connection lives. Renewed every third of the
//! session-control timeout; if renewals keep failing until the lease has
//! expired, the lease is lost and the connection must close. Dropping the
//! lease releases it at once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use turnstile_api::auth_channel::{AuthChannel, with_affinity};
use turnstile_api::rpc::{AuthClient, proto};
use turnstile_api::semaphore::CONNECTION;

/// Who the lease is for.
#[derive(Debug, Clone)]
pub struct LeaseParams {
    pub user: String,
    pub max: u32,
    pub login: String,
    pub remote_addr: String,
    pub holder_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// Every slot is taken; `held` says where the oldest is (may be empty).
    #[error("at the limit of {max}{held}")]
    Limit { max: u32, held: String },
    /// Auth could not be asked.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Refused(String),
}

/// Why a renewal failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewError {
    /// The lease no longer exists: stop at once.
    Gone,
    /// Try again.
    Transient(String),
}

/// What the lease needs from auth.
#[async_trait]
pub trait LeaseService: Send + Sync + 'static {
    async fn acquire(&self, params: &LeaseParams, ttl: Duration) -> Result<String, AcquireError>;
    async fn keep_alive(&self, user: &str, lease_id: &str, ttl: Duration)
    -> Result<(), RenewError>;
    async fn cancel(&self, user: &str, lease_id: &str) -> Result<(), String>;
}

#[async_trait]
impl LeaseService for AuthClient<AuthChannel> {
    async fn acquire(&self, p: &LeaseParams, ttl: Duration) -> Result<String, AcquireError> {
        let resp = self
            .clone()
            .acquire_semaphore(with_affinity(
                proto::AcquireSemaphoreRequest {
                    kind: CONNECTION.into(),
                    name: p.user.clone(),
                    max: p.max,
                    ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                    login: p.login.clone(),
                    remote_addr: p.remote_addr.clone(),
                    holder_name: p.holder_name.clone(),
                },
                &p.user,
            ))
            .await;
        match resp {
            Ok(r) => Ok(r.into_inner().lease_id),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => Err(AcquireError::Limit {
                max: p.max,
                held: s
                    .message()
                    .find(turnstile_api::semaphore::HELD_ON)
                    .map_or(String::new(), |at| s.message()[at..].to_string()),
            }),
            Err(s) if turnstile_api::error::unanswered(s.code()) => {
                Err(AcquireError::Unavailable(s.message().to_string()))
            }
            Err(s) => Err(AcquireError::Refused(s.message().to_string())),
        }
    }

    async fn keep_alive(
        &self,
        user: &str,
        lease_id: &str,
        ttl: Duration,
    ) -> Result<(), RenewError> {
        match self
            .clone()
            .keep_alive_semaphore(with_affinity(
                proto::KeepAliveSemaphoreRequest {
                    kind: CONNECTION.into(),
                    name: user.to_string(),
                    lease_id: lease_id.to_string(),
                    ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                },
                user,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Err(RenewError::Gone),
            Err(s) => Err(RenewError::Transient(s.message().to_string())),
        }
    }

    async fn cancel(&self, user: &str, lease_id: &str) -> Result<(), String> {
        self.clone()
            .cancel_semaphore(with_affinity(
                proto::CancelSemaphoreRequest {
                    kind: CONNECTION.into(),
                    name: user.to_string(),
                    lease_id: lease_id.to_string(),
                },
                user,
            ))
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }
}

/// A held connection slot. Dropping it releases the slot.
pub struct ConnectionLease {
    service: Arc<dyn LeaseService>,
    user: String,
    lease_id: String,
    timeout: Duration,
    renewer: JoinHandle<()>,
    lost: watch::Receiver<Option<String>>,
    /// Counts the slot in `turnstile_connection_slots_held` while it lives.
    _held: turnstile_api::metrics::GaugeGuard,
}

impl std::fmt::Debug for ConnectionLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionLease")
            .field("user", &self.user)
            .field("lease_id", &self.lease_id)
            .finish()
    }
}

impl ConnectionLease {
    /// Takes a slot, living `timeout` unless renewed.
    pub async fn acquire(
        service: Arc<dyn LeaseService>,
        params: LeaseParams,
        timeout: Duration,
    ) -> Result<Self, AcquireError> {
        let lease_id = service.acquire(&params, timeout).await?;
        let (lost_tx, lost) = watch::channel(None);
        let renewer = tokio::spawn(renew(
            service.clone(),
            params.user.clone(),
            lease_id.clone(),
            timeout,
            lost_tx,
        ));
        Ok(Self {
            service,
            user: params.user,
            lease_id,
            timeout,
            renewer,
            lost,
            _held: turnstile_api::metrics::GaugeGuard::hold(
                &turnstile_api::metrics::METRICS.connection_slots_held,
            ),
        })
    }

    pub fn lease_id(&self) -> &str {
        &self.lease_id
    }

    /// Resolves with the reason once the lease is lost.
    pub fn lost(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut rx = self.lost.clone();
        async move {
            loop {
                if let Some(reason) = rx.borrow().clone() {
                    return reason;
                }
                if rx.changed().await.is_err() {
                    // The lease was dropped: never resolves.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// Renews every third of `timeout`; retries failures until the lease's own
/// deadline, then reports it lost.
async fn renew(
    service: Arc<dyn LeaseService>,
    user: String,
    lease_id: String,
    timeout: Duration,
    lost: watch::Sender<Option<String>>,
) {
    let mut deadline = Instant::now() + timeout;
    loop {
        tokio::time::sleep(timeout / 3).await;
        let mut backoff = (timeout / 16).max(Duration::from_millis(10));
        loop {
            let attempt_started = Instant::now();
            match service.keep_alive(&user, &lease_id, timeout).await {
                Ok(()) => {
                    deadline = attempt_started + timeout;
                    break;
                }
                Err(RenewError::Gone) => {
                    let _ = lost.send(Some(
                        "your connection slot was released by the cluster".into(),
                    ));
                    return;
                }
                Err(RenewError::Transient(e)) => {
                    tracing::warn!(%user, error = %e, "cannot renew the connection slot; retrying");
                    if Instant::now() + backoff >= deadline {
                        tokio::time::sleep_until(deadline).await;
                        let _ = lost.send(Some(format!(
                            "the connection slot of user {user:?} expired: the node could not reach the auth service to renew it for {}",
                            turnstile_api::duration::format(timeout)
                        )));
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(timeout / 4);
                }
            }
        }
    }
}

impl Drop for ConnectionLease {
    fn drop(&mut self) {
        self.renewer.abort();
        let service = self.service.clone();
        let user = self.user.clone();
        let lease_id = self.lease_id.clone();
        let give_up = self.timeout / 4;
        // Released at once; if auth is unreachable, the lease expires by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(give_up, async {
                    let mut backoff = Duration::from_millis(50);
                    while let Err(e) = service.cancel(&user, &lease_id).await {
                        tracing::debug!(%user, error = %e, "cannot release the connection slot yet");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                })
                .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    #[derive(Default)]
    struct Fake {
        auth_down: AtomicBool,
        renewals: AtomicU32,
        cancels: AtomicU32,
    }

    #[async_trait]
    impl LeaseService for Fake {
        async fn acquire(&self, _: &LeaseParams, _: Duration) -> Result<String, AcquireError> {
            Ok("lease-1".into())
        }
        async fn keep_alive(&self, _: &str, _: &str, _: Duration) -> Result<(), RenewError> {
            if self.auth_down.load(Ordering::SeqCst) {
                return Err(RenewError::Transient("unreachable".into()));
            }
            self.renewals.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn cancel(&self, _: &str, _: &str) -> Result<(), String> {
            self.cancels.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn params() -> LeaseParams {
        LeaseParams {
            user: "alice".into(),
            max: 1,
            login: "root".into(),
            remote_addr: "127.0.0.1:1".into(),
            holder_name: "web1".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_every_third_and_is_lost_only_after_the_deadline() {
        let fake = Arc::new(Fake::default());
        let timeout = Duration::from_secs(120);
        let lease = ConnectionLease::acquire(fake.clone(), params(), timeout)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(125)).await;
        assert_eq!(fake.renewals.load(Ordering::SeqCst), 3, "at 40s, 80s, 120s");

        let started = Instant::now();
        fake.auth_down.store(true, Ordering::SeqCst);
        let reason = lease.lost().await;
        assert!(
            reason.contains("could not reach the auth service"),
            "{reason}"
        );
        // Last renewal at 120s, so the lease lived until 240s.
        let lived = started.elapsed() + Duration::from_secs(125);
        assert!(lived >= Duration::from_secs(240), "{lived:?}");
        assert!(lived < Duration::from_secs(241), "{lived:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_releases_at_once() {
        let fake = Arc::new(Fake::default());
        let lease = ConnectionLease::acquire(fake.clone(), params(), Duration::from_secs(3))
            .await
            .unwrap();
        drop(lease);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(fake.cancels.load(Ordering::SeqCst), 1);
    }
}
