//! The auth service's state and rules: CAs, users, roles and node presence,
//! stored in the backend. Everything the RPC layer does lands here; this module
//! knows nothing of gRPC or of who is calling (the RPC layer checks that).
//!
//! Backend layout: `authorities/{user,host,tls}`, `roles/<name>`,
//! `users/<name>`, `nodes/<host id>`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::{Certificate, PublicKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use turnstile_api::audit::AuditEvent;
use turnstile_api::clock::Clock;
use turnstile_api::error::{ApiError, ErrorKind};
use turnstile_api::identity::{
    EXT_HOST_ROLE, EXT_VIA_PROXY, SystemRole, UserIdentity, host_ca_statement,
};
use turnstile_api::labels::Labels;
use turnstile_api::role::{BUILTIN_ACCESS_ROLE, Role, RoleSet, validate_name};

use crate::audit_log::AuditLog;
use crate::backend::{Backend, BackendError};
use crate::ca::{SshCa, StoredSshCa, TlsCa, TlsIdentityPem};
use crate::semaphores::Semaphores;
use crate::{passwords, tokens};

/// How long host and process TLS certificates live.
pub const HOST_CERT_TTL: Duration = Duration::from_secs(365 * 86400);
/// Certificates are valid from a little before they are issued, for clock skew.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The longest a node registration may live without a heartbeat.
pub const MAX_NODE_TTL: Duration = Duration::from_secs(3600);

const USER_CA_KEY: &str = "authorities/user";
const HOST_CA_KEY: &str = "authorities/host";
const TLS_CA_KEY: &str = "authorities/tls";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub roles: Vec<String>,
    pub logins: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    pub created_unix: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    pub addr: String,
    pub labels: Labels,
    #[serde(default)]
    pub expires_unix: i64,
}

/// A signed user certificate and what it says.
#[derive(Debug, Clone)]
pub struct IssuedUserCert {
    pub certificate: Certificate,
    pub principals: Vec<String>,
    pub valid_before: SystemTime,
}

/// How long a wrong password keeps the caller waiting.
pub const FAILED_LOGIN_DELAY: Duration = Duration::from_secs(1);

/// What a joining process receives.
#[derive(Debug, Clone)]
pub struct Joined {
    pub host_id: String,
    pub identities: Vec<(SystemRole, String)>,
}

#[derive(Debug)]
pub struct Authority {
    backend: Arc<dyn Backend>,
    clock: Arc<dyn Clock>,
    audit: Arc<dyn AuditLog>,
    cluster_name: String,
    user_ca: SshCa,
    host_ca: SshCa,
    tls_ca: TlsCa,
    host_ca_endorsement: Vec<u8>,
    semaphores: Semaphores,
}

fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(value)
        .map_err(|e| ApiError::internal(format!("stored record {key:?} is corrupt: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Authority {
    /// Loads the CAs from the backend, creating them on first start. Safe when
    /// several auth servers start at once: the first `create` wins, the others
    /// read what it wrote.
    pub async fn open(
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        audit: Arc<dyn AuditLog>,
        cluster_name: &str,
    ) -> Result<Self, ApiError> {
        let user_ca = load_or_create_ssh_ca(backend.as_ref(), USER_CA_KEY).await?;
        let host_ca = load_or_create_ssh_ca(backend.as_ref(), HOST_CA_KEY).await?;
        let tls_ca = match backend.get(TLS_CA_KEY).await {
            Ok(item) => decode::<TlsCa>(TLS_CA_KEY, &item.value)?,
            Err(BackendError::NotFound(_)) => {
                let fresh = TlsCa::generate(cluster_name, clock.now())?;
                match backend.create(TLS_CA_KEY, encode(&fresh), None).await {
                    Ok(_) => fresh,
                    Err(BackendError::AlreadyExists(_)) => {
                        decode(TLS_CA_KEY, &backend.get(TLS_CA_KEY).await?.value)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let host_ca_endorsement = tls_ca.sign(&host_ca_statement(
            cluster_name,
            &[host_ca.public_key_openssh()],
        ))?;
        Ok(Self {
            semaphores: Semaphores::new(backend.clone(), clock.clone()),
            backend,
            clock,
            audit,
            cluster_name: cluster_name.to_string(),
            user_ca,
            host_ca,
            tls_ca,
            host_ca_endorsement,
        })
    }

    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn user_ca(&self) -> &SshCa {
        &self.user_ca
    }

    pub fn host_ca(&self) -> &SshCa {
        &self.host_ca
    }

    pub fn tls_ca(&self) -> &TlsCa {
        &self.tls_ca
    }

    pub fn audit(&self) -> &Arc<dyn AuditLog> {
        &self.audit
    }

    pub fn semaphores(&self) -> &Semaphores {
        &self.semaphores
    }

    /// The TLS CA's signature over the host CA statement.
    pub fn host_ca_endorsement(&self) -> &[u8] {
        &self.host_ca_endorsement
    }

    /// Issues a TLS identity to a process of this cluster.
    pub fn issue_tls(
        &self,
        role: SystemRole,
        host_id: &str,
        public_key_der: Option<&[u8]>,
    ) -> Result<TlsIdentityPem, ApiError> {
        self.tls_ca.issue(
            &self.cluster_name,
            role,
            host_id,
            public_key_der,
            self.clock.now(),
            HOST_CERT_TTL,
        )
    }

    /// Signs a host certificate whose principals are the host id and `names`;
    /// a proxy's certificate says so in an extension.
    pub fn generate_host_cert(
        &self,
        host_id: &str,
        role: SystemRole,
        public_key: &PublicKey,
        names: &[String],
    ) -> Result<Certificate, ApiError> {
        let mut principals = vec![host_id.to_string()];
        for name in names {
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ApiError::bad_parameter(format!(
                    "host principal {name:?} is empty or has whitespace"
                )));
            }
            if !principals.contains(name) {
                principals.push(name.clone());
            }
        }
        let now = self.clock.now();
        let extensions: Vec<(String, String)> = match role {
            SystemRole::Proxy => vec![(EXT_HOST_ROLE.to_string(), role.to_string())],
            _ => Vec::new(),
        };
        self.host_ca.sign_host(
            public_key,
            host_id,
            &principals,
            &extensions,
            now - CLOCK_SKEW,
            now + HOST_CERT_TTL,
        )
    }

    // ---- joining ----

    /// A single-use token letting a process join as `roles` within `ttl`.
    pub async fn create_token(
        &self,
        roles: &[SystemRole],
        ttl: Duration,
    ) -> Result<(String, SystemTime), ApiError> {
        if roles.is_empty() {
            return Err(ApiError::bad_parameter(
                "a token needs at least one role: node or proxy",
            ));
        }
        if ttl.is_zero() || ttl > tokens::MAX_TOKEN_TTL {
            return Err(ApiError::bad_parameter(format!(
                "a token's ttl must be between 1s and {}",
                turnstile_api::duration::format(tokens::MAX_TOKEN_TTL)
            )));
        }
        let expires = self.clock.now() + ttl;
        let token = tokens::create(self.backend.as_ref(), roles, expires).await?;
        Ok((token, expires))
    }

    /// Consumes the token and issues a TLS identity per requested role, under
    /// a new host id.
    pub async fn join(
        &self,
        token: &str,
        requests: &[(SystemRole, Vec<u8>)],
    ) -> Result<Joined, ApiError> {
        if requests.is_empty() {
            return Err(ApiError::bad_parameter("a join asks for at least one role"));
        }
        let roles: Vec<SystemRole> = requests.iter().map(|(r, _)| *r).collect();
        tokens::consume(self.backend.as_ref(), token, &roles).await?;
        let host_id = uuid::Uuid::new_v4().to_string();
        let mut identities = Vec::new();
        for (role, key_der) in requests {
            let issued = self.issue_tls(*role, &host_id, Some(key_der))?;
            identities.push((*role, issued.cert_pem));
        }
        tracing::info!(%host_id, roles = ?roles, "a process joined the cluster");
        Ok(Joined {
            host_id,
            identities,
        })
    }

    // ---- passwords ----

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

    /// Writes an audit event; a failure to write is an operator's problem,
    /// logged at ERROR.
    pub async fn record(&self, event: AuditEvent) {
        if let Err(e) = self.audit.emit(event).await {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// The identity in a user certificate of this cluster that is valid now,
    /// cut down to the user's current record (refused for a locked or
    /// removed user).
    pub async fn verify_user_certificate(
        &self,
        text: &str,
    ) -> Result<(Certificate, UserIdentity), ApiError> {
        let (cert, identity) = self.certified_identity(text)?;
        let current = self.current_identity(&identity).await?;
        Ok((cert, current))
    }

    /// What a certificate's identity may do now: its roles and logins cut
    /// down to the user's current record; refused when a lock covers the
    /// user or the user is gone.
    pub async fn current_identity(
        &self,
        identity: &UserIdentity,
    ) -> Result<UserIdentity, ApiError> {
        self.refuse_if_locked(&identity.user).await?;
        let record = match self.get_user(&identity.user).await {
            Ok(r) => Some(r),
            Err(e) if e.kind == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        identity
            .bounded_by(
                record
                    .as_ref()
                    .map(|r| (r.roles.as_slice(), r.logins.as_slice())),
            )
            .map_err(ApiError::access_denied)
    }

    /// Refuses a user whom a lock covers.
    pub async fn refuse_if_locked(&self, user: &str) -> Result<(), ApiError> {
        let who = turnstile_api::lock::LockSubject {
            user,
            login: None,
            node: None,
        };
        match turnstile_api::lock::covering(&self.list_locks().await?, &who, self.now_unix()) {
            Some(lock) => Err(ApiError::access_denied(lock.refusal())),
            None => Ok(()),
        }
    }

    fn certified_identity(&self, text: &str) -> Result<(Certificate, UserIdentity), ApiError> {
        let cert = Certificate::from_openssh(text.trim())
            .map_err(|e| ApiError::bad_parameter(format!("certificate: {e}")))?;
        cert.validate_at(self.clock.unix_now(), [&self.user_ca.fingerprint()])
            .map_err(|_| {
                ApiError::access_denied(
                    "the certificate is not a valid certificate of this cluster",
                )
            })?;
        let identity =
            UserIdentity::from_extensions(|k| cert.extensions().get(k).map(String::as_str))
                .ok_or_else(|| {
                    ApiError::access_denied("the certificate carries no Turnstile identity")
                })?;
        Ok((cert, identity))
    }

    /// For a proxy recording a session: a host certificate naming the node
    /// (its name, id and address host) on the proxy's own key.
    pub async fn node_host_cert_for_proxy(
        &self,
        node_name: &str,
        proxy_key: &PublicKey,
    ) -> Result<Certificate, ApiError> {
        let node = self
            .list_nodes()
            .await?
            .into_iter()
            .find(|n| n.name.eq_ignore_ascii_case(node_name))
            .ok_or_else(|| ApiError::not_found(format!("node {node_name:?} not found")))?;
        let host = node
            .addr
            .rsplit_once(':')
            .map_or(node.addr.as_str(), |(h, _)| h)
            .to_string();
        self.generate_host_cert(
            &node.id,
            SystemRole::Node,
            proxy_key,
            &[node.name.clone(), node.name.to_ascii_lowercase(), host],
        )
    }

    /// For a proxy recording a session: a certificate for the proxy's key that
    /// is the user's (same identity, same logins), marked as the proxy's and
    /// valid for five minutes (long enough to authenticate to the node).
    pub async fn proxy_user_cert(
        &self,
        proxy_id: &str,
        user_certificate: &str,
        proxy_key: &PublicKey,
    ) -> Result<IssuedUserCert, ApiError> {
        let (current, identity) = self.verify_user_certificate(user_certificate).await?;
        let now = self.clock.now();
        let valid_before = now + Duration::from_secs(300);
        let mut b = Vec::new();
        for (k, v) in identity.extensions() {
            b.push((k, v));
        }
        b.push((EXT_VIA_PROXY.to_string(), proxy_id.to_string()));
        let certificate = self.user_ca.sign_user_with(
            proxy_key,
            &identity.user,
            current.valid_principals(),
            &b,
            now - CLOCK_SKEW,
            valid_before,
        )?;
        Ok(IssuedUserCert {
            certificate,
            principals: current.valid_principals().to_vec(),
            valid_before,
        })
    }

    /// A certificate for a new key of the holder of `current`, expiring no
    /// later than `current` does.
    pub async fn renew_user_cert(
        &self,
        current: &Certificate,
        public_key: &PublicKey,
        ttl: Duration,
    ) -> Result<IssuedUserCert, ApiError> {
        let unix_now = self.clock.unix_now();
        current
            .validate_at(unix_now, [&self.user_ca.fingerprint()])
            .map_err(|_| {
                ApiError::access_denied(
                    "the certificate is not a valid certificate of this cluster",
                )
            })?;
        let identity =
            UserIdentity::from_extensions(|k| current.extensions().get(k).map(String::as_str))
                .ok_or_else(|| {
                    ApiError::access_denied("the certificate carries no Turnstile identity")
                })?;
        let remaining = Duration::from_secs(current.valid_before().saturating_sub(unix_now));
        let ttl = if ttl.is_zero() {
            remaining
        } else {
            ttl.min(remaining)
        };
        self.generate_user_cert(&identity.user, public_key, ttl)
            .await
    }

    // ---- roles ----

    pub async fn upsert_role(&self, role: Role, create_only: bool) -> Result<bool, ApiError> {
        role.validate()
            .map_err(|e| ApiError::bad_parameter(format!("role {:?}: {e}", role.name())))?;
        if role.name() == BUILTIN_ACCESS_ROLE {
            return Err(ApiError::bad_parameter(format!(
                "role {BUILTIN_ACCESS_ROLE:?} is built in and cannot be changed; create a role with another name"
            )));
        }
        let key = format!("roles/{}", role.name());
        if create_only {
            match self.backend.create(&key, encode(&role), None).await {
                Ok(_) => Ok(true),
                Err(BackendError::AlreadyExists(_)) => Err(ApiError::already_exists(format!(
                    "role {:?} already exists; remove it first or pick another name",
                    role.name()
                ))),
                Err(e) => Err(e.into()),
            }
        } else {
            let existed = self.backend.get(&key).await.is_ok();
            self.backend.put(&key, encode(&role), None).await?;
            Ok(!existed)
        }
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

    // ---- users ----

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

    /// A user certificate for `public_key`, its TTL capped by the roles'
    /// `max_session_ttl` (`ttl` zero: the cap itself).
    pub async fn generate_user_cert(
        &self,
        user: &str,
        public_key: &PublicKey,
        ttl: Duration,
    ) -> Result<IssuedUserCert, ApiError> {
        self.refuse_if_locked(user).await?;
        let record = self.get_user(user).await?;
        let roles = self.role_set(&record.roles).await?;
        let principals = roles.allowed_logins(&record.logins);
        let cap = roles.limits().max_session_ttl;
        let ttl = if ttl.is_zero() { cap } else { ttl.min(cap) };
        let identity = UserIdentity {
            user: record.name.clone(),
            roles: record.roles.clone(),
            logins: record.logins.clone(),
        };
        let now = self.clock.now();
        let valid_before = now + ttl;
        let certificate = self.user_ca.sign_user(
            public_key,
            &identity,
            &principals,
            now - CLOCK_SKEW,
            valid_before,
        )?;
        Ok(IssuedUserCert {
            certificate,
            principals,
            valid_before,
        })
    }

    // ---- nodes ----

    /// A host certificate for the caller `host_id`, which may not claim a
    /// name (ignoring case) another registered node holds.
    pub async fn issue_host_cert(
        &self,
        host_id: &str,
        role: SystemRole,
        key: &PublicKey,
        principals: &[String],
    ) -> Result<Certificate, ApiError> {
        let nodes = self.list_nodes().await?;
        for p in principals {
            if let Some(other) = nodes
                .iter()
                .find(|n| n.name.eq_ignore_ascii_case(p) && n.id != host_id)
            {
                return Err(ApiError::access_denied(format!(
                    "principal {p:?} belongs to node {}",
                    other.id
                )));
            }
        }
        self.generate_host_cert(host_id, role, key, principals)
    }

    /// Registers or refreshes a node; it disappears after `ttl` without another call.
    /// Node names are unique ignoring case, as OpenSSH lower-cases host names.
    pub async fn upsert_node(&self, node: NodeRecord, ttl: Duration) -> Result<(), ApiError> {
        validate_name("node name", &node.name).map_err(ApiError::bad_parameter)?;
        if node.addr.ends_with(":0") || node.addr.is_empty() {
            return Err(ApiError::bad_parameter(format!(
                "node {:?} advertises address {:?}; a node must advertise the real address it listens on",
                node.name, node.addr
            )));
        }
        for other in self.list_nodes().await? {
            if other.name.eq_ignore_ascii_case(&node.name) && other.id != node.id {
                return Err(ApiError::already_exists(format!(
                    "node name {:?} is already used by node {} as {:?} (names match ignoring case); give this node another ssh_service.node_name",
                    node.name, other.id, other.name
                )));
            }
        }
        let expires = self.clock.now() + ttl.clamp(Duration::from_secs(1), MAX_NODE_TTL);
        let record = NodeRecord {
            expires_unix: unix_secs(expires),
            ..node
        };
        self.backend
            .put(
                &format!("nodes/{}", record.id),
                encode(&record),
                Some(expires),
            )
            .await?;
        Ok(())
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, ApiError> {
        let mut nodes: Vec<NodeRecord> = self
            .backend
            .range("nodes/")
            .await?
            .iter()
            .map(|item| decode(&item.key, &item.value))
            .collect::<Result<_, _>>()?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }

    /// Labels by node, for access checks in listings.
    pub async fn node_labels(&self) -> Result<BTreeMap<String, Labels>, ApiError> {
        Ok(self
            .list_nodes()
            .await?
            .into_iter()
            .map(|n| (n.name, n.labels))
            .collect())
    }

    pub fn now_unix(&self) -> i64 {
        unix_secs(self.clock.now())
    }
}

async fn load_or_create_ssh_ca(backend: &dyn Backend, key: &str) -> Result<SshCa, ApiError> {
    match backend.get(key).await {
        Ok(item) => SshCa::from_stored(&decode::<StoredSshCa>(key, &item.value)?),
        Err(BackendError::NotFound(_)) => {
            let fresh = SshCa::generate();
            match backend.create(key, encode(&fresh.to_stored()?), None).await {
                Ok(_) => Ok(fresh),
                Err(BackendError::AlreadyExists(_)) => {
                    SshCa::from_stored(&decode(key, &backend.get(key).await?.value)?)
                }
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit_log::MemoryAuditLog;
    use crate::backend::MemoryBackend;
    use crate::ca::generate_ed25519;
    use turnstile_api::clock::{ManualClock, SystemClock};

    /// An authority on a clock the test moves.
    pub(crate) async fn authority_at() -> (Authority, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let a = Authority::open(
            Arc::new(MemoryBackend::new()),
            clock.clone(),
            Arc::new(MemoryAuditLog::default()),
            "main",
        )
        .await
        .unwrap();
        (a, clock)
    }

    async fn authority() -> Authority {
        Authority::open(
            Arc::new(MemoryBackend::new()),
            Arc::new(SystemClock),
            Arc::new(MemoryAuditLog::default()),
            "main",
        )
        .await
        .unwrap()
    }

    fn user(name: &str, roles: &[&str], logins: &[&str]) -> UserRecord {
        UserRecord {
            name: name.into(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            logins: logins.iter().map(|s| s.to_string()).collect(),
            password_hash: None,
            created_unix: 0,
        }
    }

    #[tokio::test]
    async fn cas_are_created_once() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let audit = Arc::new(MemoryAuditLog::default());
        let a = Authority::open(
            backend.clone(),
            Arc::new(SystemClock),
            audit.clone(),
            "main",
        )
        .await
        .unwrap();
        let b = Authority::open(backend, Arc::new(SystemClock), audit, "main")
            .await
            .unwrap();
        assert_eq!(a.user_ca().fingerprint(), b.user_ca().fingerprint());
        assert_eq!(a.tls_ca().pin().unwrap(), b.tls_ca().pin().unwrap());
        assert_ne!(a.user_ca().fingerprint(), a.host_ca().fingerprint());
    }

    #[tokio::test]
    async fn refused_requests_change_nothing() {
        let a = authority().await;
        a.upsert_user(user("alice", &["access"], &["root"]), true)
            .await
            .unwrap();
        let before = a.get_user("alice").await.unwrap();
        let err = a
            .upsert_user(user("alice", &["nope"], &["root"]), false)
            .await
            .unwrap_err();
        assert!(
            err.message.contains("role \"nope\" does not exist"),
            "{err}"
        );
        assert_eq!(a.get_user("alice").await.unwrap(), before);
        let err = a
            .upsert_user(user("alice", &["access"], &[]), true)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::AlreadyExists);
        assert_eq!(a.get_user("alice").await.unwrap(), before);

        let mut bad = Role::new("dev");
        bad.spec.options.max_sessions = Some(-3);
        let err = a.upsert_role(bad, true).await.unwrap_err();
        assert!(err.message.contains("spec.options.max_sessions"), "{err}");
        assert!(a.get_role("dev").await.is_err());
    }

    #[tokio::test]
    async fn roles_in_use_and_builtin_roles_are_kept() {
        let a = authority().await;
        a.upsert_role(Role::new("dev"), true).await.unwrap();
        a.upsert_user(user("bob", &["dev"], &[]), true)
            .await
            .unwrap();
        let err = a.delete_role("dev").await.unwrap_err();
        assert!(err.message.contains("bob"), "{err}");
        assert!(a.delete_role("access").await.is_err());
        assert!(a.upsert_role(Role::builtin_access(), false).await.is_err());
        a.delete_user("bob").await.unwrap();
        a.delete_role("dev").await.unwrap();
    }

    #[tokio::test]
    async fn user_certs_are_capped_by_max_session_ttl() {
        let a = authority().await;
        let mut short = Role::new("short");
        short.spec.allow.logins = Some(vec!["deploy".into()]);
        short.spec.options.max_session_ttl = Some(turnstile_api::duration::WrittenDuration(
            Duration::from_secs(600),
        ));
        a.upsert_role(short, true).await.unwrap();
        a.upsert_user(user("carol", &["access", "short"], &["carol"]), true)
            .await
            .unwrap();
        let key = generate_ed25519();
        let issued = a
            .generate_user_cert("carol", key.public_key(), Duration::from_secs(86400))
            .await
            .unwrap();
        let lifetime = issued.certificate.valid_before() - issued.certificate.valid_after();
        assert!(lifetime <= 600 + 60, "{lifetime}");
        assert_eq!(issued.principals, vec!["carol", "deploy"]);
    }

    #[tokio::test]
    async fn nodes_expire_and_names_are_unique() {
        let clock = Arc::new(turnstile_api::clock::ManualClock::new(SystemTime::now()));
        let a = Authority::open(
            Arc::new(MemoryBackend::with_clock(clock.clone())),
            clock.clone(),
            Arc::new(MemoryAuditLog::default()),
            "main",
        )
        .await
        .unwrap();
        let node = |id: &str, addr: &str| NodeRecord {
            id: id.into(),
            name: "web1".into(),
            addr: addr.into(),
            labels: Labels::new(),
            expires_unix: 0,
        };
        let err = a
            .upsert_node(node("n1", "127.0.0.1:0"), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(err.message.contains("real address"), "{err}");
        a.upsert_node(node("n1", "127.0.0.1:3022"), Duration::from_secs(60))
            .await
            .unwrap();
        let err = a
            .upsert_node(node("n2", "127.0.0.1:4022"), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::AlreadyExists);
        // OpenSSH lower-cases host names: WEB1 and web1 are one name.
        let shouting = NodeRecord {
            name: "WEB1".into(),
            ..node("n3", "127.0.0.1:5022")
        };
        let err = a
            .upsert_node(shouting, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::AlreadyExists);
        assert!(err.message.contains("ignoring case"), "{err}");
        let key = generate_ed25519().public_key().clone();
        let err = a
            .issue_host_cert("n3", SystemRole::Node, &key, &["Web1".into()])
            .await
            .unwrap_err();
        assert!(err.message.contains("belongs to node n1"), "{err}");
        assert_eq!(a.list_nodes().await.unwrap().len(), 1);
        clock.advance(Duration::from_secs(61));
        assert!(a.list_nodes().await.unwrap().is_empty());
    }
}

#[cfg(test)]
mod login_tests {
    use super::*;
    use crate::audit_log::{AuditQuery, MemoryAuditLog};
    use crate::backend::MemoryBackend;
    use crate::ca::generate_ed25519;
    use turnstile_api::clock::SystemClock;

    #[tokio::test]
    async fn password_login_issues_certificates_and_audits_failures() {
        let audit = Arc::new(MemoryAuditLog::default());
        let a = Authority::open(
            Arc::new(MemoryBackend::new()),
            Arc::new(SystemClock),
            audit.clone(),
            "main",
        )
        .await
        .unwrap();
        a.upsert_user(
            UserRecord {
                name: "alice".into(),
                roles: vec!["access".into()],
                logins: vec!["root".into()],
                password_hash: None,
                created_unix: 0,
            },
            true,
        )
        .await
        .unwrap();
        let key = generate_ed25519();
        let no_password = a
            .login(
                "alice",
                "whatever1",
                Some(key.public_key()),
                Duration::ZERO,
                "1.2.3.4:5",
            )
            .await;
        assert!(
            no_password.is_err(),
            "a user without a password cannot log in"
        );
        a.set_password("alice", "s3cret-pass").await.unwrap();
        let err = a
            .login(
                "alice",
                "wrong-pass",
                Some(key.public_key()),
                Duration::ZERO,
                "1.2.3.4:5",
            )
            .await
            .unwrap_err();
        assert_eq!(err.message, "wrong user name or password");
        let issued = a
            .login(
                "alice",
                "s3cret-pass",
                Some(key.public_key()),
                Duration::from_secs(600),
                "1.2.3.4:5",
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(issued.principals, vec!["root"]);
        let failures = audit
            .search(&AuditQuery {
                event: Some("user.login".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(failures.len(), 3);
        assert_eq!(failures[1]["code"], "T1000W");
        assert_eq!(failures[1]["addr.remote"], "1.2.3.4:5");
        assert_eq!(failures[2]["success"], true);

        // Renewal keeps the expiry of the certificate it renews.
        let key2 = generate_ed25519();
        let renewed = a
            .renew_user_cert(
                &issued.certificate,
                key2.public_key(),
                Duration::from_secs(86400),
            )
            .await
            .unwrap();
        assert!(renewed.certificate.valid_before() <= issued.certificate.valid_before());
    }

    #[tokio::test]
    async fn join_tokens_are_single_use() {
        let a = Authority::open(
            Arc::new(MemoryBackend::new()),
            Arc::new(SystemClock),
            Arc::new(MemoryAuditLog::default()),
            "main",
        )
        .await
        .unwrap();
        let (token, _) = a
            .create_token(&[SystemRole::Node], Duration::from_secs(60))
            .await
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = rcgen::PublicKeyData::subject_public_key_info(&key);
        let joined = a
            .join(&token, &[(SystemRole::Node, der.clone())])
            .await
            .unwrap();
        assert_eq!(joined.identities.len(), 1);
        assert!(uuid::Uuid::parse_str(&joined.host_id).is_ok());
        let err = a
            .join(&token, &[(SystemRole::Node, der)])
            .await
            .unwrap_err();
        assert!(err.message.contains("already used"), "{err}");
    }
}
