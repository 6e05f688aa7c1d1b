//! Web console sessions, kept in the backend so that signing out, removing
//! the user or a lock ends them on every proxy. A session is found by the
//! SHA-256 of its token (`web_sessions/<hex>`): whoever reads the backend
//! cannot sign in with what it holds. A session ends after its idle timeout
//! without a request, and never outlives the user's `max_session_ttl`.

use super::*;
use crate::backend::typed::{self, Change, Stored};

const PREFIX: &str = "web_sessions/";
/// A session seen within this long is not written again for being seen.
const SEEN_WRITE_EVERY: Duration = Duration::from_secs(30);
/// The idle timeouts a proxy may ask for.
pub const WEB_IDLE_MIN: Duration = Duration::from_secs(5);
pub const WEB_IDLE_MAX: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebSessionRecord {
    pub user: String,
    pub created_unix: i64,
    /// The end, whatever the activity: creation plus `max_session_ttl`.
    pub expires_unix: i64,
    pub idle_timeout_secs: u64,
    pub last_seen_unix: i64,
    /// Sent back with every state-changing request.
    pub csrf_token: String,
    /// Why the session was ended, kept a while so the user is told
    /// (empty: live).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ended: String,
}

/// A live web session and who its user is now.
#[derive(Debug, Clone)]
pub struct WebSession {
    pub record: WebSessionRecord,
    pub identity: UserIdentity,
}

fn key_of(token: &str) -> String {
    use sha2::Digest;
    format!(
        "{PREFIX}{}",
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    )
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

fn ended(why: &str) -> ApiError {
    ApiError::access_denied(format!("{why}; sign in again"))
}

impl Authority {
    /// Signs a user in with a password (the guessing rules of `login`,
    /// audited as `user.login` with method `web`); returns the new session's
    /// token and record.
    pub async fn create_web_session(
        &self,
        user: &str,
        password: &str,
        remote_addr: &str,
        idle_timeout: Duration,
    ) -> Result<(String, WebSession), ApiError> {
        self.check_password(user, password, remote_addr, "web")
            .await?;
        self.refuse_if_locked(user).await?;
        let record = self.get_user(user).await?;
        let roles = self.role_set(&record.roles).await?;
        let now = self.now_unix();
        let lifetime = i64::try_from(roles.limits().max_session_ttl.as_secs()).unwrap_or(i64::MAX);
        let idle = idle_timeout.clamp(WEB_IDLE_MIN, WEB_IDLE_MAX);
        let session = WebSessionRecord {
            user: record.name.clone(),
            created_unix: now,
            expires_unix: now.saturating_add(lifetime),
            idle_timeout_secs: idle.as_secs(),
            last_seen_unix: now,
            csrf_token: random_token(),
            ended: String::new(),
        };
        let token = random_token();
        self.backend
            .create(
                &key_of(&token),
                typed::encode(&session),
                Some(UNIX_EPOCH + Duration::from_secs(session.expires_unix.max(0) as u64)),
            )
            .await?;
        self.record(users::login_event(user, "web", remote_addr, true, None))
            .await;
        let identity = UserIdentity {
            user: record.name,
            roles: record.roles,
            logins: record.logins,
        };
        Ok((
            token,
            WebSession {
                record: session,
                identity,
            },
        ))
    }

    /// The session `token` names, if it is live, with its user as the
    /// user's record says now; counts as activity. A session whose user is
    /// gone or locked, or that was idle too long, is ended.
    pub async fn web_session(&self, token: &str) -> Result<WebSession, ApiError> {
        let key = key_of(token);
        let now = self.now_unix();
        let Some(stored) = typed::get::<WebSessionRecord>(self.backend.as_ref(), &key).await?
        else {
            return Err(ended("your web session has ended"));
        };
        let session = stored.value;
        if !session.ended.is_empty() {
            self.forget(&key).await?;
            return Err(ended(&session.ended));
        }
        let idle_until = session
            .last_seen_unix
            .saturating_add(i64::try_from(session.idle_timeout_secs).unwrap_or(i64::MAX));
        let why = if now >= session.expires_unix {
            Some("your web session reached its time limit (max_session_ttl)".to_string())
        } else if now >= idle_until {
            Some(format!(
                "your web session ended after {} without activity",
                turnstile_api::duration::format(Duration::from_secs(session.idle_timeout_secs))
            ))
        } else {
            None
        };
        if let Some(why) = why {
            self.forget(&key).await?;
            return Err(ended(&why));
        }
        if let Err(locked) = self.refuse_if_locked(&session.user).await {
            self.forget(&key).await?;
            return Err(ended(&locked.message));
        }
        let record = match self.get_user(&session.user).await {
            Ok(record) => record,
            Err(e) if e.kind == ErrorKind::NotFound => {
                self.forget(&key).await?;
                return Err(ended("your user was removed"));
            }
            Err(e) => return Err(e),
        };
        let identity = UserIdentity {
            user: record.name,
            roles: record.roles,
            logins: record.logins,
        };
        let mut session = session;
        if now - session.last_seen_unix >= SEEN_WRITE_EVERY.as_secs() as i64 {
            session = typed::update(
                self.backend.as_ref(),
                &key,
                |current: Option<&Stored<WebSessionRecord>>| match current {
                    Some(s) => {
                        let seen = WebSessionRecord {
                            last_seen_unix: now.max(s.value.last_seen_unix),
                            ..s.value.clone()
                        };
                        Ok((Change::Put(seen.clone(), s.expires), seen))
                    }
                    None => Err(ended("your web session has ended")),
                },
            )
            .await?;
        }
        Ok(WebSession {
            record: session,
            identity,
        })
    }

    /// An ordinary user certificate for `key`, for one web terminal of the
    /// session `token`: valid no longer than the session (and the roles'
    /// `max_session_ttl`, as for `login`).
    pub async fn web_session_cert(
        &self,
        token: &str,
        key: &PublicKey,
        client_addr: &str,
    ) -> Result<IssuedUserCert, ApiError> {
        let session = self.web_session(token).await?;
        let left = session.record.expires_unix - self.now_unix();
        let ttl = Duration::from_secs(u64::try_from(left).unwrap_or(0).max(1));
        let client = client_addr.parse::<std::net::SocketAddr>().map_err(|_| {
            ApiError::bad_parameter(format!("client_addr {client_addr:?} is not ip:port"))
        })?;
        self.generate_user_cert_with(
            &session.identity.user,
            key,
            ttl,
            &[(
                turnstile_api::identity::EXT_WEB_CLIENT.to_string(),
                client.to_string(),
            )],
        )
        .await
    }

    /// Signs a session out.
    pub async fn delete_web_session(&self, token: &str) -> Result<(), ApiError> {
        self.forget(&key_of(token)).await
    }

    /// Ends every web session of `user` (the user was removed): each is
    /// kept ended for an hour, so its next request is told why and a user
    /// made again under the name does not inherit it.
    pub(super) async fn end_web_sessions_of(&self, user: &str) -> Result<(), ApiError> {
        let until = self.clock.now() + Duration::from_secs(3600);
        for item in self.backend.range(PREFIX).await? {
            let session: WebSessionRecord = typed::decode(&item.key, &item.value)?;
            if session.user == user {
                let tombstone = WebSessionRecord {
                    ended: "your user was removed".into(),
                    ..session
                };
                self.backend
                    .put(&item.key, typed::encode(&tombstone), Some(until))
                    .await?;
            }
        }
        Ok(())
    }

    async fn forget(&self, key: &str) -> Result<(), ApiError> {
        match self.backend.delete(key).await {
            Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
