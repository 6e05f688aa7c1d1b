//! The auth service's state and rules: CAs, users, roles and node presence,
//! stored in the backend. Everything the RPC layer does lands here; this module
//! knows nothing of gRPC or of who is calling (the RPC layer checks that).
//! Split along its seams: `certificates`, `users`, `roles`, `nodes` (and, in
//! sibling modules, `locks`, `tokens`, `semaphores`); joining stays here.
//!
//! Backend layout: `authorities/{user,host,tls}`, `roles/<name>`,
//! `users/<name>`, `nodes/<host id>`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::{Certificate, PublicKey};
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

/// How long process TLS certificates live.
pub const TLS_CERT_TTL: Duration = Duration::from_secs(365 * 86400);
/// How long SSH host certificates live by default; hosts renew them at
/// half-life.
pub const HOST_CERT_TTL: Duration = Duration::from_secs(86400);
/// Certificates are valid from a little before they are issued, for clock skew.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The longest a node registration may live without a heartbeat.
pub const MAX_NODE_TTL: Duration = Duration::from_secs(3600);

const USER_CA_KEY: &str = "authorities/user";
const HOST_CA_KEY: &str = "authorities/host";
/// Signs only proxies' certificates for their own names (created on first
/// start of a version that has it, upgrades included).
const PROXY_CA_KEY: &str = "authorities/proxy";
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
    /// The host key auth certified for this host id (set by auth from
    /// `node_keys/<host id>`, never by the node).
    #[serde(default)]
    pub host_key: String,
}

/// A signed user certificate and what it says.
#[derive(Debug, Clone)]
pub struct IssuedUserCert {
    pub certificate: Certificate,
    pub principals: Vec<String>,
    pub valid_before: SystemTime,
}

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
    proxy_ca: SshCa,
    tls_ca: TlsCa,
    host_ca_endorsement: Vec<u8>,
    host_cert_ttl: Duration,
    semaphores: Semaphores,
    /// Lockouts, backoff and the bound on concurrent password checks.
    login_guard: crate::login_guard::LoginGuard,
}

use crate::backend::typed::{decode, encode};

pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

mod certificates;
mod nodes;
mod roles;
mod users;
pub mod web_sessions;

impl Authority {
    /// Loads the CAs from the backend, creating them on first start. Safe when
    /// several auth servers start at once: the first `create` wins, the others
    /// read what it wrote.
    /// How password logins resist guessing (the default: 10 failures lock
    /// a user out from one address for 5m; 1s..8s backoff per address).
    pub fn with_login_policy(mut self, policy: crate::login_guard::LoginPolicy) -> Self {
        self.login_guard = crate::login_guard::LoginGuard::new(policy);
        self
    }

    /// How long SSH host certificates live (default 24 h).
    pub fn with_host_cert_ttl(mut self, ttl: Duration) -> Self {
        self.host_cert_ttl = ttl;
        self
    }

    pub async fn open(
        backend: Arc<dyn Backend>,
        clock: Arc<dyn Clock>,
        audit: Arc<dyn AuditLog>,
        cluster_name: &str,
    ) -> Result<Self, ApiError> {
        let user_ca = load_or_create_ssh_ca(backend.as_ref(), USER_CA_KEY).await?;
        let host_ca = load_or_create_ssh_ca(backend.as_ref(), HOST_CA_KEY).await?;
        let proxy_ca = load_or_create_ssh_ca(backend.as_ref(), PROXY_CA_KEY).await?;
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
            &[proxy_ca.public_key_openssh()],
        ))?;
        Ok(Self {
            semaphores: Semaphores::new(backend.clone(), clock.clone()),
            login_guard: crate::login_guard::LoginGuard::new(Default::default()),
            backend,
            clock,
            audit,
            cluster_name: cluster_name.to_string(),
            user_ca,
            host_ca,
            proxy_ca,
            tls_ca,
            host_ca_endorsement,
            host_cert_ttl: HOST_CERT_TTL,
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

    /// The proxy host CA: it signs proxies' certificates for their own names.
    pub fn proxy_ca(&self) -> &SshCa {
        &self.proxy_ca
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

    /// Writes an audit event; a failure to write is an operator's problem,
    /// logged at ERROR.
    pub async fn record(&self, event: AuditEvent) {
        if let Err(e) = self.audit.emit(event).await {
            tracing::error!(error = %e, "cannot write the audit log");
        }
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
pub(crate) mod tests;
