//! Locks, stored at `locks/<id>` (with the backend's expiry when the lock
//! has a TTL). What a lock covers is `turnstile_api::lock`'s to say; this
//! module keeps them and audits every change.

use std::time::Duration;

use turnstile_api::audit::AuditEvent;
use turnstile_api::error::ApiError;
use turnstile_api::lock::{Lock, LockTarget};

use crate::authority::Authority;
use crate::backend::BackendError;

const PREFIX: &str = "locks/";

/// The longest lock message, so a lock cannot flood every user's terminal.
pub const MAX_MESSAGE: usize = 1024;

impl Authority {
    /// Places a lock for `ttl` (`None`: until removed), by `actor`.
    pub async fn create_lock(
        &self,
        target: LockTarget,
        message: String,
        ttl: Option<Duration>,
        actor: &str,
    ) -> Result<Lock, ApiError> {
        if message.len() > MAX_MESSAGE || message.chars().any(|c| c.is_control()) {
            return Err(ApiError::bad_parameter(format!(
                "a lock message is one line of at most {MAX_MESSAGE} bytes"
            )));
        }
        if target.value().len() > 256 {
            return Err(ApiError::bad_parameter(
                "a lock target is at most 256 bytes",
            ));
        }
        let now = self.clock().now();
        let expires = ttl.map(|t| now + t);
        let lock = Lock {
            id: uuid::Uuid::new_v4().to_string(),
            target,
            message,
            created_unix: self.now_unix(),
            created_by: actor.to_string(),
            expires_unix: expires.map(crate::authority::unix_secs),
        };
        let value = serde_json::to_vec(&lock).unwrap_or_default();
        self.backend()
            .create(&format!("{PREFIX}{}", lock.id), value, expires)
            .await?;
        self.record(AuditEvent::admin(
            "lock.created",
            actor,
            &lock.target.to_string(),
            [
                ("lock", lock.id.clone()),
                ("message", lock.message.clone()),
                (
                    "expires",
                    lock.expires_unix.map_or("never".into(), |t| t.to_string()),
                ),
            ],
        ))
        .await;
        Ok(lock)
    }

    /// The locks in force, oldest first.
    pub async fn list_locks(&self) -> Result<Vec<Lock>, ApiError> {
        let now = self.now_unix();
        let mut locks = Vec::new();
        for item in self.backend().range(PREFIX).await? {
            let lock: Lock = serde_json::from_slice(&item.value).map_err(|e| {
                ApiError::internal(format!("stored lock {:?} is corrupt: {e}", item.key))
            })?;
            if lock.in_force(now) {
                locks.push(lock);
            }
        }
        locks.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(locks)
    }

    pub async fn delete_lock(&self, id: &str, actor: &str) -> Result<(), ApiError> {
        let key = format!("{PREFIX}{id}");
        let lock: Lock = match self.backend().get(&key).await {
            Ok(item) => serde_json::from_slice(&item.value)
                .map_err(|e| ApiError::internal(format!("stored lock {key:?} is corrupt: {e}")))?,
            Err(BackendError::NotFound(_)) => {
                return Err(ApiError::not_found(format!(
                    "lock {id:?} not found; see `turnstile admin locks ls`"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        match self.backend().delete(&key).await {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.record(AuditEvent::admin(
            "lock.deleted",
            actor,
            &lock.target.to_string(),
            [("lock", lock.id)],
        ))
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::tests::authority_at;

    #[tokio::test]
    async fn locks_are_listed_until_removed_or_expired() {
        let (a, clock) = authority_at().await;
        let forever = a
            .create_lock(
                LockTarget::User("dave".into()),
                "incident".into(),
                None,
                "admin",
            )
            .await
            .unwrap();
        let brief = a
            .create_lock(
                LockTarget::Node("vm".into()),
                String::new(),
                Some(Duration::from_secs(60)),
                "admin",
            )
            .await
            .unwrap();
        let ids = |v: Vec<Lock>| v.into_iter().map(|l| l.id).collect::<Vec<_>>();
        let listed = ids(a.list_locks().await.unwrap());
        assert!(listed.contains(&forever.id) && listed.contains(&brief.id));
        clock.advance(Duration::from_secs(61));
        assert_eq!(ids(a.list_locks().await.unwrap()), vec![forever.id.clone()]);
        a.delete_lock(&forever.id, "admin").await.unwrap();
        assert!(a.list_locks().await.unwrap().is_empty());
        let e = a.delete_lock(&forever.id, "admin").await.unwrap_err();
        assert!(e.to_string().contains("locks ls"), "{e}");
    }

    #[tokio::test]
    async fn a_message_that_would_flood_terminals_is_refused() {
        let (a, _) = authority_at().await;
        for bad in ["x".repeat(MAX_MESSAGE + 1), "two\nlines".into()] {
            let e = a
                .create_lock(LockTarget::User("dave".into()), bad, None, "admin")
                .await
                .unwrap_err();
            assert!(e.to_string().contains("one line"), "{e}");
        }
    }
}
