//! The gRPC face of the [`Authority`]: decodes requests, identifies the caller
//! from its TLS certificate, checks the caller's system role may do this, and
//! maps results onto wire messages. No rule of the cluster lives here.

use std::sync::Arc;
use std::time::Duration;

use russh::keys::PublicKey;
use tonic::{Request, Response, Status};
use turnstile_api::error::ApiError;
use turnstile_api::identity::SystemRole;
use turnstile_api::role::Role;
use turnstile_api::rpc::proto;

use crate::audit_log::{AuditQuery, host_event_uid};
use crate::authority::{Authority, NodeRecord, UserRecord};
use crate::ca::peer_identity;
use crate::change_feed::{ChangeFeed, Notice};
use crate::cluster_config;
use crate::recordings::Recordings;
use crate::semaphores::LeaseRequest;
use crate::session_trackers::{self, Tracker};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use turnstile_api::audit::AuditEvent;
use turnstile_api::role::RoleSet;

/// Who is calling, from the TLS client certificate.
#[derive(Debug, Clone)]
pub struct Caller {
    pub role: SystemRole,
    pub id: String,
}

pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let (role, id) = peer_identity(leaf.as_ref())?;
    Ok(Caller { role, id })
}

fn require<T>(req: &Request<T>, allowed: &[SystemRole]) -> Result<Caller, Status> {
    let c = caller(req)?;
    if c.role == SystemRole::Auth || allowed.contains(&c.role) {
        Ok(c)
    } else {
        Err(Status::permission_denied(format!(
            "a {} identity may not do this",
            c.role
        )))
    }
}

const ANY: &[SystemRole] = &[SystemRole::Admin, SystemRole::Node, SystemRole::Proxy];
const ADMIN: &[SystemRole] = &[SystemRole::Admin];
const HOSTS: &[SystemRole] = &[SystemRole::Node, SystemRole::Proxy];

fn parse_public_key(s: &str) -> Result<PublicKey, Status> {
    PublicKey::from_openssh(s.trim())
        .map_err(|e| Status::invalid_argument(format!("public key is not in OpenSSH form: {e}")))
}

fn role_from_json(json: &str) -> Result<Role, Status> {
    serde_json::from_str(json).map_err(|e| Status::invalid_argument(format!("role: {e}")))
}

fn user_to_proto(u: UserRecord) -> proto::User {
    proto::User {
        name: u.name,
        roles: u.roles,
        logins: u.logins,
        created_unix: u.created_unix,
    }
}

fn node_to_proto(n: NodeRecord) -> proto::Node {
    proto::Node {
        id: n.id,
        name: n.name,
        addr: n.addr,
        labels: n.labels.into_iter().collect(),
        expires_unix: n.expires_unix,
        ttl_seconds: 0,
        host_key: n.host_key,
    }
}

fn cert_response(
    issued: crate::authority::IssuedUserCert,
) -> RpcResult<proto::GenerateUserCertResponse> {
    ok(proto::GenerateUserCertResponse {
        certificate: issued
            .certificate
            .to_openssh()
            .map_err(|e| Status::internal(e.to_string()))?,
        valid_before_unix: issued.certificate.valid_before(),
        principals: issued.principals,
    })
}

/// How long a node registration lives without a heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct PresencePolicy {
    pub node_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct AuthApi {
    authority: Arc<Authority>,
    presence: PresencePolicy,
    recordings: Arc<Recordings>,
    changes: Arc<ChangeFeed>,
    /// Ends long-lived streams when the server shuts down.
    shutdown: tokio_util::sync::CancellationToken,
}

/// The most events one `EmitAuditEvents` call may carry.
const MAX_AUDIT_BATCH: usize = 1000;
/// The most events one page of `SearchAuditEvents` holds.
const MAX_AUDIT_PAGE: usize = 1000;

impl AuthApi {
    /// Checks an event a host sends (it may speak only for itself, never as
    /// an administrator) and applies what it means for `recordings ls`;
    /// returns it to be written.
    async fn take_host_event(&self, c: &Caller, event: AuditEvent) -> Result<AuditEvent, Status> {
        // What a host may say: events it saw itself (they carry its id).
        // Nothing of administrators or of auth's own checks: logins are
        // written by auth, which checked the password.
        let allowed = match &event {
            AuditEvent::AdminChange { .. }
            | AuditEvent::AuditGap { .. }
            | AuditEvent::UserLogin { .. } => false,
            other => other.server_id() == Some(c.id.as_str()),
        };
        if !allowed {
            return Err(Status::permission_denied(format!(
                "{} {} may not emit {} events for others",
                c.role,
                c.id,
                event.name()
            )));
        }
        // What `recordings ls` says follows the session's audit events, which
        // reach auth whatever becomes of the recording store: an ended
        // session is uploading until complete; a failed recording is failed.
        if let AuditEvent::SessionEvent {
            event: name,
            sid,
            user,
            login,
            fields,
            ..
        } = &event
        {
            let text = |k: &str| fields.get(k).and_then(|v| v.as_str()).unwrap_or_default();
            if name == turnstile_recording::event::RECORDING_FAILED {
                self.recordings
                    .mark_failed(&c.id, sid, user, login, text("node"), text("error"))
                    .await
                    .map_err(fail)?;
            } else if name == turnstile_recording::event::SESSION_END {
                // Sessions recorded by nobody (`off`) have no entry.
                match self.recordings.mark_ended(&c.id, sid).await {
                    Ok(()) => {}
                    Err(e) if e.kind == turnstile_api::error::ErrorKind::NotFound => {}
                    Err(e) => return Err(fail(e)),
                }
            }
        }
        Ok(event)
    }

    pub fn new(
        authority: Arc<Authority>,
        presence: PresencePolicy,
        recordings: Arc<Recordings>,
        changes: Arc<ChangeFeed>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            authority,
            presence,
            recordings,
            changes,
            shutdown,
        }
    }

    /// May the holder of `certificate` see recordings of `owner` (`verb`: list or read)?
    /// Who reads recordings: the holder of a certificate, or of a web
    /// console session; either way the same rules decide what they see.
    async fn reader(
        &self,
        certificate: &str,
        web_session: &str,
    ) -> Result<(String, RoleSet), Status> {
        let identity = if web_session.is_empty() {
            self.authority
                .verify_user_certificate(certificate)
                .await
                .map_err(fail)?
                .1
        } else {
            self.authority
                .web_session(web_session)
                .await
                .map_err(fail)?
                .identity
        };
        let roles = self
            .authority
            .role_set(&identity.roles)
            .await
            .map_err(fail)?;
        Ok((identity.user, roles))
    }
}

type RpcResult<T> = Result<Response<T>, Status>;

fn ok<T>(v: T) -> RpcResult<T> {
    Ok(Response::new(v))
}

fn fail(e: ApiError) -> Status {
    e.into()
}

fn web_session_to_proto(
    token: String,
    s: crate::authority::web_sessions::WebSession,
) -> proto::WebSession {
    proto::WebSession {
        token,
        user: s.identity.user,
        roles: s.identity.roles,
        logins: s.identity.logins,
        csrf_token: s.record.csrf_token,
        expires_unix: s.record.expires_unix,
        idle_timeout_seconds: s.record.idle_timeout_secs,
    }
}

#[tonic::async_trait]
impl proto::auth_server::Auth for AuthApi {
    async fn ping(&self, req: Request<proto::PingRequest>) -> RpcResult<proto::PingResponse> {
        let c = require(&req, ANY)?;
        ok(proto::PingResponse {
            cluster_name: self.authority.cluster_name().to_string(),
            server_version: turnstile_api::VERSION.to_string(),
            caller_role: c.role.to_string(),
            caller_id: c.id,
        })
    }

    async fn get_authorities(
        &self,
        req: Request<proto::GetAuthoritiesRequest>,
    ) -> RpcResult<proto::Authorities> {
        require(&req, ANY)?;
        let a = &self.authority;
        ok(proto::Authorities {
            cluster_name: a.cluster_name().to_string(),
            user_ca: vec![a.user_ca().public_key_openssh()],
            host_ca: vec![a.host_ca().public_key_openssh()],
            tls_ca_pem: a.tls_ca().cert_pem.clone(),
            host_ca_endorsement: a.host_ca_endorsement().to_vec(),
            proxy_ca: vec![a.proxy_ca().public_key_openssh()],
        })
    }

    async fn upsert_role(
        &self,
        req: Request<proto::UpsertRoleRequest>,
    ) -> RpcResult<proto::UpsertRoleResponse> {
        let c = require(&req, ADMIN)?;
        let r = req.into_inner();
        let role = role_from_json(&r.role_json)?;
        let name = role.metadata.name.clone();
        let created = self
            .authority
            .upsert_role(role, r.create_only)
            .await
            .map_err(fail)?;
        let event = if created {
            "role.created"
        } else {
            "role.updated"
        };
        self.authority
            .record(AuditEvent::admin(event, &c.id, &name, []))
            .await;
        ok(proto::UpsertRoleResponse { created })
    }

    async fn get_roles(&self, req: Request<proto::GetRolesRequest>) -> RpcResult<proto::RoleList> {
        require(&req, ANY)?;
        let names = req.into_inner().names;
        let roles = if names.is_empty() {
            self.authority.list_roles().await.map_err(fail)?
        } else {
            let mut roles = Vec::new();
            for name in &names {
                roles.push(self.authority.get_role(name).await.map_err(fail)?);
            }
            roles
        };
        ok(proto::RoleList {
            role_json: roles
                .iter()
                .map(|r| serde_json::to_string(r).unwrap_or_default())
                .collect(),
        })
    }

    async fn delete_role(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> RpcResult<proto::DeleteResponse> {
        let c = require(&req, ADMIN)?;
        let name = req.into_inner().name;
        self.authority.delete_role(&name).await.map_err(fail)?;
        self.authority
            .record(AuditEvent::admin("role.deleted", &c.id, &name, []))
            .await;
        ok(proto::DeleteResponse {})
    }

    async fn upsert_user(
        &self,
        req: Request<proto::UpsertUserRequest>,
    ) -> RpcResult<proto::UpsertUserResponse> {
        let c = require(&req, ADMIN)?;
        let r = req.into_inner();
        let u = r
            .user
            .ok_or_else(|| Status::invalid_argument("user is missing"))?;
        let (audited_roles, audited_logins) = (u.roles.join(","), u.logins.join(","));
        let created = self
            .authority
            .put_user(&u.name, u.roles, u.logins, r.create_only)
            .await
            .map_err(fail)?;
        let event = if created {
            "user.create"
        } else {
            "user.update"
        };
        self.authority
            .record(AuditEvent::admin(
                event,
                &c.id,
                &u.name,
                [("roles", audited_roles), ("logins", audited_logins)],
            ))
            .await;
        ok(proto::UpsertUserResponse { created })
    }

    async fn list_users(
        &self,
        req: Request<proto::ListUsersRequest>,
    ) -> RpcResult<proto::UserList> {
        // Nodes and proxies hold certificates to the user's current record.
        require(&req, ANY)?;
        let users = self.authority.list_users().await.map_err(fail)?;
        ok(proto::UserList {
            users: users.into_iter().map(user_to_proto).collect(),
        })
    }

    async fn delete_user(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> RpcResult<proto::DeleteResponse> {
        let c = require(&req, ADMIN)?;
        let name = req.into_inner().name;
        self.authority.delete_user(&name).await.map_err(fail)?;
        self.authority
            .record(AuditEvent::admin("user.delete", &c.id, &name, []))
            .await;
        ok(proto::DeleteResponse {})
    }

    async fn generate_user_cert(
        &self,
        req: Request<proto::GenerateUserCertRequest>,
    ) -> RpcResult<proto::GenerateUserCertResponse> {
        require(&req, ADMIN)?;
        let r = req.into_inner();
        let key = parse_public_key(&r.public_key)?;
        let issued = self
            .authority
            .generate_user_cert(&r.user, &key, Duration::from_secs(r.ttl_seconds))
            .await
            .map_err(fail)?;
        cert_response(issued)
    }

    async fn generate_host_cert(
        &self,
        req: Request<proto::GenerateHostCertRequest>,
    ) -> RpcResult<proto::GenerateHostCertResponse> {
        let c = require(&req, HOSTS)?;
        let caller = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let key = parse_public_key(&r.public_key)?;
        let (cert, node_name) = match c.role {
            SystemRole::Proxy => (
                self.authority
                    .issue_proxy_host_cert(&c.id, &key, &r.principals)
                    .map_err(fail)?,
                String::new(),
            ),
            _ => self
                .authority
                .issue_node_host_cert(
                    &c.id,
                    &key,
                    // Nodes older than name binding sent their name first
                    // among the principals.
                    if r.node_name.is_empty() {
                        r.principals.first().map_or("", String::as_str)
                    } else {
                        &r.node_name
                    },
                    &r.addr,
                    caller,
                )
                .await
                .map_err(fail)?,
        };
        ok(proto::GenerateHostCertResponse {
            certificate: cert
                .to_openssh()
                .map_err(|e| Status::internal(e.to_string()))?,
            node_name,
        })
    }

    async fn upsert_node(&self, req: Request<proto::Node>) -> RpcResult<proto::UpsertNodeResponse> {
        let c = require(&req, &[SystemRole::Node])?;
        let n = req.into_inner();
        if n.id != c.id {
            return Err(Status::permission_denied(format!(
                "node {} may not register as {}",
                c.id, n.id
            )));
        }
        self.authority
            .upsert_node(
                NodeRecord {
                    id: n.id,
                    name: n.name,
                    addr: n.addr,
                    labels: n.labels.into_iter().collect(),
                    expires_unix: 0,
                    host_key: String::new(),
                },
                if n.ttl_seconds == 0 {
                    self.presence.node_ttl
                } else {
                    Duration::from_secs(n.ttl_seconds)
                },
            )
            .await
            .map_err(fail)?;
        ok(proto::UpsertNodeResponse {})
    }

    async fn rename_node(
        &self,
        req: Request<proto::RenameNodeRequest>,
    ) -> RpcResult<proto::NodeBinding> {
        let c = require(&req, ADMIN)?;
        let r = req.into_inner();
        let bound = self
            .authority
            .rename_node(&r.name, &r.new_name)
            .await
            .map_err(fail)?;
        self.authority
            .record(AuditEvent::admin(
                "node.rename",
                &c.id,
                &bound.host_id,
                [("from", r.name), ("to", bound.name.clone())],
            ))
            .await;
        ok(proto::NodeBinding {
            name: bound.name,
            host_id: bound.host_id,
        })
    }

    async fn remove_node(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> RpcResult<proto::NodeBinding> {
        let c = require(&req, ADMIN)?;
        let name = req.into_inner().name;
        let bound = self.authority.remove_node(&name).await.map_err(fail)?;
        self.authority
            .record(AuditEvent::admin(
                "node.remove",
                &c.id,
                &bound.host_id,
                [("name", bound.name.clone())],
            ))
            .await;
        ok(proto::NodeBinding {
            name: bound.name,
            host_id: bound.host_id,
        })
    }

    async fn list_nodes(
        &self,
        req: Request<proto::ListNodesRequest>,
    ) -> RpcResult<proto::NodeList> {
        require(&req, ANY)?;
        let nodes = self.authority.list_nodes().await.map_err(fail)?;
        ok(proto::NodeList {
            nodes: nodes.into_iter().map(node_to_proto).collect(),
        })
    }

    async fn create_token(
        &self,
        req: Request<proto::CreateTokenRequest>,
    ) -> RpcResult<proto::CreateTokenResponse> {
        let c = require(&req, ADMIN)?;
        let r = req.into_inner();
        let roles = r
            .roles
            .iter()
            .map(|s| crate::tokens::parse_joinable_role(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        let (token, expires) = self
            .authority
            .create_token(&roles, Duration::from_secs(r.ttl_seconds))
            .await
            .map_err(fail)?;
        // The token itself is a secret: the log names it by its roles only.
        self.authority
            .record(AuditEvent::admin(
                "join_token.create",
                &c.id,
                &r.roles.join(","),
                [("ttl", format!("{}s", r.ttl_seconds))],
            ))
            .await;
        ok(proto::CreateTokenResponse {
            token,
            expires_unix: expires
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0),
            ca_pin: self.authority.tls_ca().pin().map_err(fail)?,
            roles: r.roles,
        })
    }

    async fn join(&self, req: Request<proto::JoinRequest>) -> RpcResult<proto::JoinResponse> {
        // The joining process has no certificate yet: the token is its proof.
        let r = req.into_inner();
        let requests = r
            .identities
            .iter()
            .map(|i| {
                crate::tokens::parse_joinable_role(&i.role)
                    .map(|role| (role, i.tls_public_key_der.clone()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        let joined = self
            .authority
            .join(&r.token, &requests)
            .await
            .map_err(fail)?;
        ok(proto::JoinResponse {
            host_id: joined.host_id,
            identities: joined
                .identities
                .into_iter()
                .map(|(role, tls_cert_pem)| proto::JoinIdentity {
                    role: role.to_string(),
                    tls_cert_pem,
                })
                .collect(),
            tls_ca_pem: self.authority.tls_ca().cert_pem.clone(),
            cluster_name: self.authority.cluster_name().to_string(),
        })
    }

    async fn set_password(
        &self,
        req: Request<proto::SetPasswordRequest>,
    ) -> RpcResult<proto::SetPasswordResponse> {
        let c = require(&req, ADMIN)?;
        let r = req.into_inner();
        self.authority
            .set_password(&r.user, &r.password)
            .await
            .map_err(fail)?;
        self.authority
            .record(AuditEvent::admin(
                "user.password_change",
                &c.id,
                &r.user,
                [],
            ))
            .await;
        ok(proto::SetPasswordResponse {})
    }

    async fn login(
        &self,
        req: Request<proto::LoginRequest>,
    ) -> RpcResult<proto::GenerateUserCertResponse> {
        require(&req, &[SystemRole::Proxy])?;
        let r = req.into_inner();
        let key = if r.public_key.is_empty() {
            None
        } else {
            Some(parse_public_key(&r.public_key)?)
        };
        let issued = self
            .authority
            .login(
                &r.user,
                &r.password,
                key.as_ref(),
                Duration::from_secs(r.ttl_seconds),
                &r.client_addr,
            )
            .await
            .map_err(fail)?;
        match issued {
            Some(issued) => cert_response(issued),
            None => ok(proto::GenerateUserCertResponse::default()),
        }
    }

    async fn renew_user_cert(
        &self,
        req: Request<proto::RenewUserCertRequest>,
    ) -> RpcResult<proto::GenerateUserCertResponse> {
        require(&req, &[SystemRole::Proxy])?;
        let r = req.into_inner();
        let current = russh::keys::Certificate::from_openssh(r.certificate.trim())
            .map_err(|e| Status::invalid_argument(format!("certificate: {e}")))?;
        let key = parse_public_key(&r.public_key)?;
        let issued = self
            .authority
            .renew_user_cert(&current, &key, Duration::from_secs(r.ttl_seconds))
            .await
            .map_err(fail)?;
        cert_response(issued)
    }

    async fn get_cluster_config(
        &self,
        req: Request<proto::GetClusterConfigRequest>,
    ) -> RpcResult<proto::ClusterConfig> {
        require(&req, ANY)?;
        let c = cluster_config::get(self.authority.backend().as_ref())
            .await
            .map_err(fail)?;
        ok(c.to_proto())
    }

    async fn acquire_semaphore(
        &self,
        req: Request<proto::AcquireSemaphoreRequest>,
    ) -> RpcResult<proto::SemaphoreLease> {
        let c = require(&req, &[SystemRole::Node])?;
        let r = req.into_inner();
        let lease = self
            .authority
            .semaphores()
            .acquire(&LeaseRequest {
                kind: r.kind.clone(),
                name: r.name.clone(),
                max: r.max,
                ttl: Duration::from_millis(r.ttl_ms),
                holder: c.id,
                holder_name: r.holder_name,
                login: r.login,
                remote_addr: r.remote_addr,
            })
            .await
            .map_err(|e| fail(e.into()))?;
        ok(lease_to_proto(&r.kind, &r.name, lease))
    }

    async fn keep_alive_semaphore(
        &self,
        req: Request<proto::KeepAliveSemaphoreRequest>,
    ) -> RpcResult<proto::SemaphoreLease> {
        let c = require(&req, &[SystemRole::Node])?;
        let r = req.into_inner();
        let lease = self
            .authority
            .semaphores()
            .keep_alive(
                &r.kind,
                &r.name,
                &r.lease_id,
                Duration::from_millis(r.ttl_ms),
                &c.id,
            )
            .await
            .map_err(|e| fail(e.into()))?;
        ok(lease_to_proto(&r.kind, &r.name, lease))
    }

    async fn cancel_semaphore(
        &self,
        req: Request<proto::CancelSemaphoreRequest>,
    ) -> RpcResult<proto::CancelSemaphoreResponse> {
        // Nodes release their own; an admin frees a slot by hand.
        let c = require(&req, &[SystemRole::Node, SystemRole::Admin])?;
        let r = req.into_inner();
        self.authority
            .semaphores()
            .cancel(
                &r.kind,
                &r.name,
                &r.lease_id,
                (c.role != SystemRole::Admin).then_some(c.id.as_str()),
            )
            .await
            .map_err(|e| fail(e.into()))?;
        if c.role == SystemRole::Admin {
            self.authority
                .record(AuditEvent::admin(
                    "semaphore.release",
                    &c.id,
                    &r.name,
                    [("lease", r.lease_id)],
                ))
                .await;
        }
        ok(proto::CancelSemaphoreResponse {})
    }

    async fn release_semaphores(
        &self,
        req: Request<proto::ReleaseSemaphoresRequest>,
    ) -> RpcResult<proto::ReleaseSemaphoresResponse> {
        let c = require(&req, &[SystemRole::Node])?;
        let released = self
            .authority
            .semaphores()
            .release_holder(&c.id)
            .await
            .map_err(|e| fail(e.into()))?;
        ok(proto::ReleaseSemaphoresResponse {
            released: u32::try_from(released).unwrap_or(u32::MAX),
        })
    }

    async fn list_semaphores(
        &self,
        req: Request<proto::ListSemaphoresRequest>,
    ) -> RpcResult<proto::SemaphoreList> {
        require(&req, ADMIN)?;
        let leases = self
            .authority
            .semaphores()
            .list(&req.into_inner().kind)
            .await
            .map_err(|e| fail(e.into()))?;
        ok(proto::SemaphoreList {
            leases: leases
                .into_iter()
                .map(|(kind, name, lease)| lease_to_proto(&kind, &name, lease))
                .collect(),
        })
    }

    async fn emit_audit_events(
        &self,
        req: Request<proto::EmitAuditEventsRequest>,
    ) -> RpcResult<proto::EmitAuditEventsResponse> {
        let c = require(&req, HOSTS)?;
        let r = req.into_inner();
        if r.queue_id.is_empty() || r.queue_id.len() > 64 || r.events.len() > MAX_AUDIT_BATCH {
            return Err(Status::invalid_argument(format!(
                "an audit batch names its queue (at most 64 bytes) and holds at most {MAX_AUDIT_BATCH} events"
            )));
        }
        let backend = self.authority.backend();
        let key = format!("audit_seq/{}/{}", c.id, r.queue_id);
        // The number is stored as JSON (a bare number, as it always was).
        let mut last: u64 = crate::backend::typed::get::<u64>(backend.as_ref(), &key)
            .await
            .map_err(fail)?
            .map_or(0, |s| s.value);
        let (mut refused, mut duplicates) = (0u32, 0u32);
        let mut write = Vec::new();
        for e in r.events {
            if e.seq <= last {
                duplicates += 1;
                continue;
            }
            // The uids follow from the host, its queue and the numbers: a
            // batch resent to another auth server is stored once.
            if e.seq > last + 1 {
                tracing::warn!(server = %c.id, queue = %r.queue_id, from = last + 1, to = e.seq - 1, "audit events missing from a host's queue");
                write.push((
                    AuditEvent::AuditGap {
                        server_id: c.id.clone(),
                        queue_id: r.queue_id.clone(),
                        missing_from: last + 1,
                        missing_to: e.seq - 1,
                    },
                    host_event_uid(&c.id, &r.queue_id, last + 1, "gap"),
                ));
            }
            last = e.seq;
            let taken = match serde_json::from_str::<AuditEvent>(&e.event_json) {
                Ok(event) => self.take_host_event(&c, event).await,
                Err(err) => Err(Status::invalid_argument(format!("audit event: {err}"))),
            };
            match taken {
                Ok(event) => {
                    write.push((event, host_event_uid(&c.id, &r.queue_id, e.seq, "event")))
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
                    ) =>
                {
                    tracing::error!(server = %c.id, error = %s.message(), "refused an audit event");
                    refused += 1;
                }
                Err(s) => return Err(s),
            }
        }
        self.authority
            .audit()
            .emit_batch(write)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        // Only forward: two auth servers taking a host's batches at once
        // never move its number back.
        crate::backend::typed::update(
            backend.as_ref(),
            &key,
            |stored: Option<&crate::backend::typed::Stored<u64>>| {
                Ok(match stored {
                    Some(s) if s.value >= last => (crate::backend::typed::Change::Keep, ()),
                    _ => (crate::backend::typed::Change::Put(last, None), ()),
                })
            },
        )
        .await
        .map_err(fail)?;
        ok(proto::EmitAuditEventsResponse {
            refused,
            duplicates,
        })
    }

    async fn search_audit_events(
        &self,
        req: Request<proto::SearchAuditEventsRequest>,
    ) -> RpcResult<proto::AuditEventList> {
        let c = require(&req, &[SystemRole::Admin, SystemRole::Proxy])?;
        let r = req.into_inner();
        if c.role == SystemRole::Proxy {
            // Only on behalf of a web console user who may read it.
            let session = self
                .authority
                .web_session(&r.web_session)
                .await
                .map_err(fail)?;
            let roles = self
                .authority
                .role_set(&session.identity.roles)
                .await
                .map_err(fail)?;
            if !roles.may_read_audit() {
                return Err(Status::permission_denied(format!(
                    "user {:?} may not read the audit log: that needs a role rule allowing event list",
                    session.identity.user
                )));
            }
        }
        let query = AuditQuery {
            event: Some(r.event).filter(|e| !e.is_empty()),
            user: Some(r.user).filter(|u| !u.is_empty()),
            since: (r.since_unix_ms > 0).then(|| {
                std::time::UNIX_EPOCH
                    + Duration::from_millis(u64::try_from(r.since_unix_ms).unwrap_or(0))
            }),
            limit: match usize::try_from(r.limit).unwrap_or(0) {
                0 => MAX_AUDIT_PAGE,
                n => n.min(MAX_AUDIT_PAGE),
            },
            after: Some(r.after).filter(|a| !a.is_empty()),
        };
        let page = self
            .authority
            .audit()
            .search(&query)
            .await
            .map_err(|e| match e {
                crate::audit_log::AuditLogError::BadCursor(m) => Status::invalid_argument(m),
                e => Status::unavailable(e.to_string()),
            })?;
        ok(proto::AuditEventList {
            event_json: page.events.iter().map(|v| v.to_string()).collect(),
            next: page.next.unwrap_or_default(),
        })
    }

    async fn upsert_session_trackers(
        &self,
        req: Request<proto::SessionTrackerList>,
    ) -> RpcResult<proto::UpsertSessionTrackersResponse> {
        let c = require(&req, &[SystemRole::Node])?;
        let list = req.into_inner().trackers;
        let ttl = list
            .first()
            .map_or(Duration::from_secs(60), |t| Duration::from_millis(t.ttl_ms));
        let trackers: Vec<Tracker> = list
            .into_iter()
            .map(|t| Tracker {
                id: t.id,
                node_id: t.node_id,
                node_name: t.node_name,
                user: t.user,
                login: t.login,
                remote_addr: t.remote_addr,
                since_unix_ms: t.since_unix_ms,
                channels: t.channels,
            })
            .collect();
        session_trackers::upsert(
            self.authority.backend().as_ref(),
            &c.id,
            &trackers,
            self.authority.clock().now(),
            ttl,
        )
        .await
        .map_err(fail)?;
        ok(proto::UpsertSessionTrackersResponse {})
    }

    async fn delete_session_tracker(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> RpcResult<proto::DeleteResponse> {
        let c = require(&req, &[SystemRole::Node])?;
        session_trackers::delete(
            self.authority.backend().as_ref(),
            &c.id,
            &req.into_inner().name,
        )
        .await
        .map_err(fail)?;
        ok(proto::DeleteResponse {})
    }

    async fn list_session_trackers(
        &self,
        req: Request<proto::ListSessionTrackersRequest>,
    ) -> RpcResult<proto::SessionTrackerList> {
        require(&req, ADMIN)?;
        let trackers = session_trackers::list(self.authority.backend().as_ref())
            .await
            .map_err(fail)?;
        ok(proto::SessionTrackerList {
            trackers: trackers
                .into_iter()
                .map(|t| proto::SessionTracker {
                    id: t.id,
                    node_id: t.node_id,
                    node_name: t.node_name,
                    user: t.user,
                    login: t.login,
                    remote_addr: t.remote_addr,
                    since_unix_ms: t.since_unix_ms,
                    channels: t.channels,
                    ttl_ms: 0,
                })
                .collect(),
        })
    }

    async fn generate_node_host_cert(
        &self,
        req: Request<proto::GenerateNodeHostCertRequest>,
    ) -> RpcResult<proto::GenerateHostCertResponse> {
        require(&req, &[SystemRole::Proxy])?;
        let r = req.into_inner();
        let key = parse_public_key(&r.public_key)?;
        let cert = self
            .authority
            .node_host_cert_for_proxy(&r.node_name, &key)
            .await
            .map_err(fail)?;
        ok(proto::GenerateHostCertResponse {
            certificate: cert
                .to_openssh()
                .map_err(|e| Status::internal(e.to_string()))?,
            node_name: r.node_name,
        })
    }

    async fn generate_proxy_user_cert(
        &self,
        req: Request<proto::GenerateProxyUserCertRequest>,
    ) -> RpcResult<proto::GenerateUserCertResponse> {
        let c = require(&req, &[SystemRole::Proxy])?;
        let r = req.into_inner();
        let key = parse_public_key(&r.public_key)?;
        let issued = self
            .authority
            .proxy_user_cert(&c.id, &r.user_certificate, &key)
            .await
            .map_err(fail)?;
        cert_response(issued)
    }

    async fn create_web_session(
        &self,
        req: Request<proto::CreateWebSessionRequest>,
    ) -> RpcResult<proto::WebSession> {
        require(&req, &[SystemRole::Proxy])?;
        let r = req.into_inner();
        let (token, session) = self
            .authority
            .create_web_session(
                &r.user,
                &r.password,
                &r.client_addr,
                Duration::from_secs(r.idle_timeout_seconds),
            )
            .await
            .map_err(fail)?;
        ok(web_session_to_proto(token, session))
    }

    async fn get_web_session(
        &self,
        req: Request<proto::WebSessionRequest>,
    ) -> RpcResult<proto::WebSession> {
        require(&req, &[SystemRole::Proxy])?;
        let session = self
            .authority
            .web_session(&req.into_inner().token)
            .await
            .map_err(fail)?;
        ok(web_session_to_proto(String::new(), session))
    }

    async fn delete_web_session(
        &self,
        req: Request<proto::WebSessionRequest>,
    ) -> RpcResult<proto::DeleteResponse> {
        require(&req, &[SystemRole::Proxy])?;
        self.authority
            .delete_web_session(&req.into_inner().token)
            .await
            .map_err(fail)?;
        ok(proto::DeleteResponse {})
    }

    async fn generate_web_session_cert(
        &self,
        req: Request<proto::WebSessionCertRequest>,
    ) -> RpcResult<proto::GenerateUserCertResponse> {
        require(&req, &[SystemRole::Proxy])?;
        let r = req.into_inner();
        let key = parse_public_key(&r.public_key)?;
        let issued = self
            .authority
            .web_session_cert(&r.token, &key, &r.client_addr)
            .await
            .map_err(fail)?;
        cert_response(issued)
    }

    type WatchChangesStream = ReceiverStream<Result<proto::ClusterChange, Status>>;

    async fn watch_changes(
        &self,
        req: Request<proto::WatchChangesRequest>,
    ) -> RpcResult<Self::WatchChangesStream> {
        require(&req, ANY)?;
        let mut notices = self.changes.subscribe();
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        // First: the stream is open; what changed before, the watcher reads.
        let _ = tx
            .send(Ok(proto::ClusterChange { key: String::new() }))
            .await;
        tokio::spawn(async move {
            loop {
                // Returning drops `tx`: the stream ends, and the watcher
                // watches again (through another auth server, at shutdown).
                let notice = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    notice = notices.recv() => notice,
                };
                let key = match notice {
                    Ok(Notice::Changed(key)) => key,
                    // Missed some (this stream lagged, or the backend's watch
                    // broke): the watcher reads everything.
                    Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        String::new()
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(proto::ClusterChange { key })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type RecordSessionStream = ReceiverStream<Result<proto::RecordStatus, Status>>;

    async fn record_session(
        &self,
        req: Request<tonic::Streaming<proto::RecordRequest>>,
    ) -> RpcResult<Self::RecordSessionStream> {
        let c = require(&req, HOSTS)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let recordings = self.recordings.clone();
        let authority = self.authority.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            if let Err(status) = crate::recording_stream::serve(
                &recordings,
                &authority,
                &c.id,
                &mut inbound,
                &tx,
                &shutdown,
            )
            .await
            {
                // The store's failures are logged once per cause where they happen.
                if status.code() == tonic::Code::Unavailable {
                    tracing::debug!(recorder = %c.id, error = %status.message(), "recording stream ended");
                } else {
                    tracing::warn!(recorder = %c.id, error = %status.message(), "recording stream ended with an error");
                }
                let _ = tx.send(Err(status)).await;
            }
        });
        ok(ReceiverStream::new(rx))
    }

    async fn list_recordings(
        &self,
        req: Request<proto::ListRecordingsRequest>,
    ) -> RpcResult<proto::RecordingList> {
        require(&req, &[SystemRole::Proxy])?;
        let r = req.into_inner();
        let (user, roles) = self.reader(&r.certificate, &r.web_session).await?;
        let all = crate::recordings::may_list_all(&roles);
        let recordings = self.recordings.list().await.map_err(fail)?;
        ok(proto::RecordingList {
            recordings: recordings
                .into_iter()
                .filter(|rec| all || rec.user == user)
                .filter(|rec| r.user.is_empty() || rec.user == r.user)
                .filter(|rec| rec.start_ms >= r.since_ms)
                .map(|rec| rec.info())
                .collect(),
        })
    }

    async fn get_recording_chunk(
        &self,
        req: Request<proto::GetRecordingChunkRequest>,
    ) -> RpcResult<proto::RecordingChunk> {
        require(&req, &[SystemRole::Proxy])?;
        let r = req.into_inner();
        let (user, roles) = self.reader(&r.certificate, &r.web_session).await?;
        let not_found = || {
            Status::not_found(format!(
                "no recording of session {}; a session that just started is listed once its node reports it, within a second",
                r.sid
            ))
        };
        let rec = self
            .recordings
            .get(&r.sid)
            .await
            .map_err(fail)?
            .ok_or_else(not_found)?;
        crate::recordings::may_read(&rec, &user, &roles).map_err(fail)?;
        if !rec.failed.is_empty() && rec.object_sizes().is_empty() && rec.parts.is_empty() {
            return Err(Status::failed_precondition(format!(
                "session {} was not recorded: {}",
                r.sid, rec.failed
            )));
        }
        if rec.status != crate::recordings::STATUS_COMPLETE {
            return Err(Status::failed_precondition(format!(
                "session {} is not uploaded yet: {} part(s) stored, the upload is still in progress; try again when the session has ended",
                r.sid,
                rec.parts.len()
            )));
        }
        let len = (r.length as usize).min(1 << 20);
        let (data, total) = self
            .recordings
            .read(&rec, r.offset, len)
            .await
            .map_err(fail)?;
        ok(proto::RecordingChunk { data, total })
    }

    async fn set_cluster_config(
        &self,
        req: Request<proto::SetClusterConfigRequest>,
    ) -> RpcResult<proto::ClusterConfig> {
        let caller = require(&req, ADMIN)?;
        let r = req.into_inner();
        let c = cluster_config::set(self.authority.backend().as_ref(), &r.key, &r.value)
            .await
            .map_err(fail)?;
        self.authority
            .record(AuditEvent::admin(
                "cluster_config.update",
                &caller.id,
                &r.key,
                [("value", r.value)],
            ))
            .await;
        ok(c.to_proto())
    }

    async fn create_lock(
        &self,
        req: Request<proto::CreateLockRequest>,
    ) -> RpcResult<proto::LockMessage> {
        let c = require(&req, ADMIN)?;
        let r = req.into_inner();
        let target = r.target.parse().map_err(Status::invalid_argument)?;
        let ttl = (r.ttl_seconds > 0).then(|| Duration::from_secs(r.ttl_seconds));
        let lock = self
            .authority
            .create_lock(target, r.message, ttl, &c.id)
            .await
            .map_err(fail)?;
        ok(lock_to_proto(&lock))
    }

    async fn list_locks(
        &self,
        req: Request<proto::ListLocksRequest>,
    ) -> RpcResult<proto::LockList> {
        require(&req, ANY)?;
        let locks = self.authority.list_locks().await.map_err(fail)?;
        ok(proto::LockList {
            locks: locks.iter().map(lock_to_proto).collect(),
        })
    }

    async fn delete_lock(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> RpcResult<proto::DeleteResponse> {
        let c = require(&req, ADMIN)?;
        self.authority
            .delete_lock(&req.into_inner().name, &c.id)
            .await
            .map_err(fail)?;
        ok(proto::DeleteResponse {})
    }
}

fn lock_to_proto(lock: &turnstile_api::lock::Lock) -> proto::LockMessage {
    proto::LockMessage {
        lock_json: serde_json::to_string(lock).unwrap_or_default(),
    }
}

fn lease_to_proto(
    kind: &str,
    name: &str,
    l: turnstile_api::semaphore::Lease,
) -> proto::SemaphoreLease {
    proto::SemaphoreLease {
        kind: kind.to_string(),
        name: name.to_string(),
        lease_id: l.lease_id,
        holder: l.holder,
        holder_name: l.holder_name,
        expires_unix_ms: l.expires,
        login: l.login,
        remote_addr: l.remote_addr,
        since_unix_ms: l.since,
    }
}
