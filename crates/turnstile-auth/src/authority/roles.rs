//! Roles (`roles/<name>`): stored, listed, removed only when no user has them.

use super::*;
use crate::backend::typed::{self, Change, Stored};

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

    /// The roles named, as a set; a missing role is an error naming it.
    pub async fn role_set(&self, names: &[String]) -> Result<RoleSet, ApiError> {
        let mut roles = Vec::with_capacity(names.len());
        for name in names {
            roles.push(self.get_role(name).await?);
        }
        Ok(RoleSet::new(roles))
    }
}
