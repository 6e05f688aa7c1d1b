//! Roles (`roles/<name>`): stored, listed, removed only when no user has them.

use super::*;
use crate::backend::typed::{self, Change, Stored};

/// How long a role's removal mark lives if its remover dies before
/// clearing it.
const ROLE_REMOVAL_MARK: Duration = Duration::from_secs(30);

impl Authority {
    pub async fn upsert_role(&self, role: Role, create_only: bool) -> Result<bool, ApiError> {
        role.validate()
            .map_err(|e| ApiError::bad_parameter(format!("role {:?}: {e}", role.name())))?;
        if role.name() == BUILTIN_ACCESS_ROLE {
            return Err(ApiError::bad_parameter(format!(
                "role {BUILTIN_ACCESS_ROLE:?} is built in and cannot be changed; create a role with another name"
            )));
        }
        let key = format!("roles/{}", role.name());
        typed::update(
            self.backend.as_ref(),
            &key,
            |current: Option<&Stored<Role>>| {
                if create_only && current.is_some() {
                    return Err(ApiError::already_exists(format!(
                        "role {:?} already exists; remove it first or pick another name",
                        role.name()
                    )));
                }
                Ok((Change::Put(role.clone(), None), current.is_none()))
            },
        )
        .await
    }

    pub async fn get_role(&self, name: &str) -> Result<Role, ApiError> {
        if name == BUILTIN_ACCESS_ROLE {
            return Ok(Role::builtin_access());
        }
        let key = format!("roles/{name}");
        match self.backend.get(&key).await {
            Ok(item) => decode(&key, &item.value),
            Err(BackendError::NotFound(_)) => {
                Err(ApiError::not_found(format!("role {name:?} not found")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every role, the built-in ones first.
    pub async fn list_roles(&self) -> Result<Vec<Role>, ApiError> {
        let mut roles = vec![Role::builtin_access()];
        for item in self.backend.range("roles/").await? {
            roles.push(decode(&item.key, &item.value)?);
        }
        Ok(roles)
    }

    pub async fn delete_role(&self, name: &str) -> Result<(), ApiError> {
        if name == BUILTIN_ACCESS_ROLE {
            return Err(ApiError::bad_parameter(format!(
                "role {BUILTIN_ACCESS_ROLE:?} is built in and cannot be removed"
            )));
        }
        // Two keys cannot change in one transaction on every backend, so a
        // removal marks the role first and a user write giving the role
        // checks the mark after writing (`settle_given_roles`): either the
        // scan below sees the user, or the user write sees the mark.
        let marker = format!("role_removals/{name}");
        let expires = self.clock.now() + ROLE_REMOVAL_MARK;
        match self
            .backend
            .create(&marker, Vec::new(), Some(expires))
            .await
        {
            Ok(_) => {}
            Err(BackendError::AlreadyExists(_)) => {
                return Err(ApiError::new(
                    ErrorKind::Unavailable,
                    format!("role {name:?} is being removed by another request; try again"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        let removed = self.remove_unused_role(name).await;
        if let Err(e) = self.backend.delete(&marker).await {
            // It lapses on its own within ROLE_REMOVAL_MARK.
            tracing::warn!(role = name, error = %e, "could not clear a role's removal mark");
        }
        removed
    }

    async fn remove_unused_role(&self, name: &str) -> Result<(), ApiError> {
        let users: Vec<String> = self
            .list_users()
            .await?
            .into_iter()
            .filter(|u| u.roles.iter().any(|r| r == name))
            .map(|u| u.name)
            .collect();
        if !users.is_empty() {
            return Err(ApiError::bad_parameter(format!(
                "role {name:?} is given to user(s) {}; take it from them first",
                users.join(", ")
            )));
        }
        match self.backend.delete(&format!("roles/{name}")).await {
            Ok(()) => Ok(()),
            Err(BackendError::NotFound(_)) => {
                Err(ApiError::not_found(format!("role {name:?} not found")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// After `user`'s record was written with `roles`: waits out any removal
    /// of one of them that began meanwhile, and takes from the user a role
    /// that such a removal took away (the removal's scan did not see the
    /// user, so it went ahead), saying so.
    pub(super) async fn settle_given_roles(
        &self,
        user: &str,
        roles: &[String],
    ) -> Result<(), ApiError> {
        let mut gone = Vec::new();
        for role in roles.iter().filter(|r| *r != BUILTIN_ACCESS_ROLE) {
            let marker = format!("role_removals/{role}");
            let deadline = tokio::time::Instant::now() + ROLE_REMOVAL_MARK;
            loop {
                match self.backend.get(&marker).await {
                    Err(BackendError::NotFound(_)) => break,
                    Ok(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(_) => {
                        return Err(ApiError::new(
                            ErrorKind::Unavailable,
                            format!(
                                "role {role:?} is being removed; see whether user {user:?} still has it with `turnstile admin users ls`"
                            ),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            match self.get_role(role).await {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::NotFound => gone.push(role.clone()),
                Err(e) => return Err(e),
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        self.modify_user(user, |record| record.roles.retain(|r| !gone.contains(r)))
            .await?;
        Err(ApiError::bad_parameter(format!(
            "role(s) {} of user {user:?} were removed while the user was being saved; the user was saved without them",
            gone.join(", ")
        )))
    }

    /// The roles named, as a set; a missing role is an error naming it.
    pub async fn role_set(&self, names: &[String]) -> Result<RoleSet, ApiError> {
        let mut roles = Vec::with_capacity(names.len());
        for name in names {
            roles.push(self.get_role(name).await?);
        }
        Ok(RoleSet::new(roles))
    }
}
