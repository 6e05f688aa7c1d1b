//! Users: their records (`users/<name>`), passwords and password login.

use super::*;
use crate::backend::typed::{self, Change, Stored};

impl Authority {
    pub async fn set_password(&self, user: &str, password: &str) -> Result<(), ApiError> {
        passwords::check_policy(password)?;
        let hash = passwords::hash(password).await?;
        let found = self
            .modify_user(user, |record| record.password_hash = Some(hash.clone()))
            .await?;
        if !found {
            return Err(ApiError::not_found(format!("user {user:?} not found")));
        }
        Ok(())
    }

    /// Changes `user`'s record as it is when written (compare-and-swap, so
    /// a concurrent change to another field is never lost). False when there
    /// is no such user; nothing is written then.
    pub(super) async fn modify_user(
        &self,
        user: &str,
        change: impl Fn(&mut UserRecord),
    ) -> Result<bool, ApiError> {
        let key = format!("users/{user}");
        typed::update(
            self.backend.as_ref(),
            &key,
            |current: Option<&Stored<UserRecord>>| {
                let Some(current) = current else {
                    return Ok((Change::Keep, false));
                };
                let mut record = current.value.clone();
                change(&mut record);
                Ok((Change::Put(record, None), true))
            },
        )
        .await
    }

    /// Checks a password login and, given a public key, issues a certificate
    /// for it. Every attempt is audited as `user.login`; a failure waits out
    /// its source's backoff and says only that the user or password is
    /// wrong; a (user, source) pair that failed too often is locked out (see
    /// [`crate::login_guard`]).
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        public_key: Option<&PublicKey>,
        ttl: Duration,
        remote_addr: &str,
    ) -> Result<Option<IssuedUserCert>, ApiError> {
        self.check_password(user, password, remote_addr, "password")
            .await?;
        let Some(public_key) = public_key else {
            return Ok(None);
        };
        let issued = self.generate_user_cert(user, public_key, ttl).await?;
        self.record(login_event(user, "password", remote_addr, true, None))
            .await;
        Ok(Some(issued))
    }

    /// Checks a password under the guessing rules (lockout, backoff, a
    /// bounded number of verifications); audits every failure as
    /// `user.login` with `method`.
    pub(super) async fn check_password(
        &self,
        user: &str,
        password: &str,
        remote_addr: &str,
        method: &str,
    ) -> Result<(), ApiError> {
        let event = |success: bool, error: Option<String>| {
            login_event(user, method, remote_addr, success, error)
        };
        let guard = &self.login_guard;
        let source = crate::login_guard::source_of(remote_addr);
        if let Some(left) = guard.locked_out(user, &source) {
            let refusal = format!(
                "too many failed logins for user {user:?} from {source}; try again in {}",
                turnstile_api::duration::format(Duration::from_secs(left.as_secs() + 1))
            );
            self.record(event(false, Some(refusal.clone()))).await;
            return Err(ApiError::new(ErrorKind::LimitExceeded, refusal));
        }
        // An unknown user, or one without a password, costs a verification
        // too, so the answer's timing does not tell who exists.
        let verified = match self.get_user(user).await {
            Ok(record) => {
                guard
                    .verify(password, record.password_hash.as_deref())
                    .await
            }
            Err(e) if e.kind == ErrorKind::NotFound => guard.verify(password, None).await,
            Err(e) => return Err(e),
        };
        if !verified {
            let after = guard.failed(user, &source);
            let mut error = "wrong user name or password".to_string();
            if after.locked_out {
                error.push_str(&format!(
                    "; user {user:?} is locked out from {source} for {}",
                    turnstile_api::duration::format(guard.policy().lockout)
                ));
            }
            self.record(event(false, Some(error))).await;
            tokio::time::sleep(after.wait).await;
            return Err(ApiError::access_denied("wrong user name or password"));
        }
        guard.succeeded(user, &source);
        Ok(())
    }

    /// Adds a user or changes one's roles and logins, keeping what the
    /// record holds besides (its password, its creation time).
    pub async fn put_user(
        &self,
        name: &str,
        roles: Vec<String>,
        logins: Vec<String>,
        create_only: bool,
    ) -> Result<bool, ApiError> {
        self.validate_user(name, &roles, &logins).await?;
        let now = self.now_unix();
        // The password and creation time are taken from the record as it is
        // when written, so a password set meanwhile is never lost.
        let created = self
            .write_user(name, create_only, |current| UserRecord {
                name: name.to_string(),
                roles: roles.clone(),
                logins: logins.clone(),
                password_hash: current.and_then(|c| c.password_hash.clone()),
                created_unix: current.map_or(now, |c| c.created_unix),
            })
            .await?;
        self.settle_given_roles(name, &roles).await?;
        Ok(created)
    }

    /// Writes the record `build` makes of the stored one (`None`: absent);
    /// `create_only` refuses an existing user. Returns whether it is new.
    async fn write_user(
        &self,
        name: &str,
        create_only: bool,
        build: impl Fn(Option<&UserRecord>) -> UserRecord,
    ) -> Result<bool, ApiError> {
        let key = format!("users/{name}");
        typed::update(
            self.backend.as_ref(),
            &key,
            |current: Option<&Stored<UserRecord>>| {
                if create_only && current.is_some() {
                    return Err(ApiError::already_exists(format!(
                        "user {name:?} already exists"
                    )));
                }
                let record = build(current.map(|c| &c.value));
                Ok((Change::Put(record, None), current.is_none()))
            },
        )
        .await
    }

    /// Refuses a user record that names no role, a role that does not
    /// exist, or a malformed name or login.
    async fn validate_user(
        &self,
        name: &str,
        roles: &[String],
        logins: &[String],
    ) -> Result<(), ApiError> {
        validate_name("user name", name).map_err(ApiError::bad_parameter)?;
        if roles.is_empty() {
            return Err(ApiError::bad_parameter(format!(
                "user {name:?} has no roles; give at least one with --roles (for example --roles access)"
            )));
        }
        for login in logins {
            validate_name("login", login).map_err(ApiError::bad_parameter)?;
        }
        for role in roles {
            match self.get_role(role).await {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::NotFound => {
                    return Err(ApiError::bad_parameter(format!(
                        "role {role:?} does not exist; create it with `turnstile admin roles create -f FILE` or see `turnstile admin roles ls`"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes a whole user record (its password hash included).
    pub async fn upsert_user(&self, user: UserRecord, create_only: bool) -> Result<bool, ApiError> {
        self.validate_user(&user.name, &user.roles, &user.logins)
            .await?;
        let created = self
            .write_user(&user.name, create_only, |_| user.clone())
            .await?;
        self.settle_given_roles(&user.name, &user.roles).await?;
        Ok(created)
    }

    pub async fn get_user(&self, name: &str) -> Result<UserRecord, ApiError> {
        let key = format!("users/{name}");
        match self.backend.get(&key).await {
            Ok(item) => decode(&key, &item.value),
            Err(BackendError::NotFound(_)) => {
                Err(ApiError::not_found(format!("user {name:?} not found")))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>, ApiError> {
        self.backend
            .range("users/")
            .await?
            .iter()
            .map(|item| decode(&item.key, &item.value))
            .collect()
    }

    /// Removes a user, and ends the user's web sessions.
    pub async fn delete_user(&self, name: &str) -> Result<(), ApiError> {
        match self.backend.delete(&format!("users/{name}")).await {
            Ok(()) => self.end_web_sessions_of(name).await,
            Err(BackendError::NotFound(_)) => {
                Err(ApiError::not_found(format!("user {name:?} not found")))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A `user.login` event.
pub(super) fn login_event(
    user: &str,
    method: &str,
    remote_addr: &str,
    success: bool,
    error: Option<String>,
) -> AuditEvent {
    AuditEvent::UserLogin {
        user: user.to_string(),
        method: method.to_string(),
        success,
        error,
        remote_addr: remote_addr.to_string(),
    }
}
