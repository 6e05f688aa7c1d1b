//! Users: their records (`users/<name>`), passwords and password login.

use super::*;

impl Authority {
    pub async fn set_password(&self, user: &str, password: &str) -> Result<(), ApiError> {
        passwords::check_policy(password)?;
        let hash = passwords::hash(password).await?;
        let key = format!("users/{user}");
        loop {
            let item = match self.backend.get(&key).await {
                Ok(item) => item,
                Err(BackendError::NotFound(_)) => {
                    return Err(ApiError::not_found(format!("user {user:?} not found")));
                }
                Err(e) => return Err(e.into()),
            };
            let mut record: UserRecord = decode(&key, &item.value)?;
            record.password_hash = Some(hash.clone());
            match self
                .backend
                .compare_and_swap(&key, item.revision, encode(&record), None)
                .await
            {
                Ok(_) => return Ok(()),
                Err(BackendError::CompareFailed(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Checks a password login and, given a public key, issues a certificate
    /// for it. Every attempt is audited as `user.login`; a failure waits
    /// [`FAILED_LOGIN_DELAY`] and says only that the user or password is wrong.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        public_key: Option<&PublicKey>,
        ttl: Duration,
        remote_addr: &str,
    ) -> Result<Option<IssuedUserCert>, ApiError> {
        let verified = match self.get_user(user).await {
            Ok(record) => match &record.password_hash {
                Some(hash) => passwords::verify(password, hash).await,
                None => false,
            },
            Err(e) if e.kind == ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        let event = |success: bool, error: Option<String>| AuditEvent::UserLogin {
            user: user.to_string(),
            method: "password".into(),
            success,
            error,
            remote_addr: remote_addr.to_string(),
        };
        if !verified {
            self.record(event(false, Some("wrong user name or password".into())))
                .await;
            tokio::time::sleep(FAILED_LOGIN_DELAY).await;
            return Err(ApiError::access_denied("wrong user name or password"));
        }
        let Some(public_key) = public_key else {
            return Ok(None);
        };
        let issued = self.generate_user_cert(user, public_key, ttl).await?;
        self.record(event(true, None)).await;
        Ok(Some(issued))
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
        let existing = match self.get_user(name).await {
            Ok(u) => Some(u),
            Err(e) if e.kind == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let record = UserRecord {
            name: name.to_string(),
            roles,
            logins,
            password_hash: existing.as_ref().and_then(|e| e.password_hash.clone()),
            created_unix: existing
                .as_ref()
                .map_or_else(|| self.now_unix(), |e| e.created_unix),
        };
        self.upsert_user(record, create_only).await
    }

    pub async fn upsert_user(&self, user: UserRecord, create_only: bool) -> Result<bool, ApiError> {
        validate_name("user name", &user.name).map_err(ApiError::bad_parameter)?;
        if user.roles.is_empty() {
            return Err(ApiError::bad_parameter(format!(
                "user {:?} has no roles; give at least one with --roles (for example --roles access)",
                user.name
            )));
        }
        for login in &user.logins {
            validate_name("login", login).map_err(ApiError::bad_parameter)?;
        }
        for role in &user.roles {
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
        let key = format!("users/{}", user.name);
        if create_only {
            match self.backend.create(&key, encode(&user), None).await {
                Ok(_) => Ok(true),
                Err(BackendError::AlreadyExists(_)) => Err(ApiError::already_exists(format!(
                    "user {:?} already exists",
                    user.name
                ))),
                Err(e) => Err(e.into()),
            }
        } else {
            let existed = self.backend.get(&key).await.is_ok();
            self.backend.put(&key, encode(&user), None).await?;
            Ok(!existed)
        }
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

    pub async fn delete_user(&self, name: &str) -> Result<(), ApiError> {
        match self.backend.delete(&format!("users/{name}")).await {
            Ok(()) => Ok(()),
            Err(BackendError::NotFound(_)) => {
                Err(ApiError::not_found(format!("user {name:?} not found")))
            }
            Err(e) => Err(e.into()),
        }
    }
}
