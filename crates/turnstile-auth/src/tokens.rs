//! Join tokens: random, single-use, with a lifetime, each naming the system
//! roles it lets a process join as. Stored at `tokens/<token>`; consuming one
//! deletes it with compare-and-delete, so two racing joins cannot both win.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use turnstile_api::error::ApiError;
use turnstile_api::identity::SystemRole;

use crate::backend::{Backend, BackendError};

pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86400);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    roles: Vec<String>,
}

/// Roles a token may carry.
pub fn parse_joinable_role(s: &str) -> Result<SystemRole, ApiError> {
    match s {
        "node" => Ok(SystemRole::Node),
        "proxy" => Ok(SystemRole::Proxy),
        other => Err(ApiError::bad_parameter(format!(
            "a token can be for node or proxy, not {other:?}"
        ))),
    }
}

fn key(token: &str) -> String {
    format!("tokens/{token}")
}

/// Creates a token for `roles`, valid until `expires`.
pub async fn create(
    backend: &dyn Backend,
    roles: &[SystemRole],
    expires: SystemTime,
) -> Result<String, ApiError> {
    let bytes: [u8; 16] = rand::random();
    let token = hex::encode(bytes);
    let record = TokenRecord {
        roles: roles.iter().map(|r| r.to_string()).collect(),
    };
    backend
        .create(
            &key(&token),
            serde_json::to_vec(&record).unwrap_or_default(),
            Some(expires),
        )
        .await?;
    Ok(token)
}

fn invalid() -> ApiError {
    ApiError::access_denied(
        "the join token is invalid, expired or already used; create a new one with `turnstile admin tokens add`",
    )
}

/// Consumes the token if it allows every role in `wanted`.
pub async fn consume(
    backend: &dyn Backend,
    token: &str,
    wanted: &[SystemRole],
) -> Result<(), ApiError> {
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let item = match backend.get(&key(token)).await {
        Ok(item) => item,
        Err(BackendError::NotFound(_)) => return Err(invalid()),
        Err(e) => return Err(e.into()),
    };
    let record: TokenRecord = serde_json::from_slice(&item.value)
        .map_err(|e| ApiError::internal(format!("stored token is corrupt: {e}")))?;
    for role in wanted {
        if !record.roles.iter().any(|r| r == role.as_str()) {
            return Err(ApiError::access_denied(format!(
                "the join token is for {}, not {role}",
                record.roles.join(", ")
            )));
        }
    }
    match backend.compare_and_delete(&key(token), item.revision).await {
        Ok(()) => Ok(()),
        Err(BackendError::NotFound(_) | BackendError::CompareFailed(_)) => Err(invalid()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use std::sync::Arc;
    use turnstile_api::clock::{Clock, ManualClock};

    #[tokio::test]
    async fn tokens_are_single_use_and_expire() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let b = MemoryBackend::with_clock(clock.clone());
        let t = create(
            &b,
            &[SystemRole::Node],
            clock.now() + Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert!(
            consume(&b, &t, &[SystemRole::Proxy]).await.is_err(),
            "wrong role"
        );
        consume(&b, &t, &[SystemRole::Node]).await.unwrap();
        let again = consume(&b, &t, &[SystemRole::Node]).await.unwrap_err();
        assert!(again.message.contains("already used"), "{again}");
        let t2 = create(
            &b,
            &[SystemRole::Node],
            clock.now() + Duration::from_secs(60),
        )
        .await
        .unwrap();
        clock.advance(Duration::from_secs(61));
        assert!(
            consume(&b, &t2, &[SystemRole::Node]).await.is_err(),
            "expired"
        );
    }
}
