//! One SSH connection to a node: authenticates the user's certificate,
//! decides what the login may do here, takes a connection slot when the
//! user's roles set `max_connections`, and hands each accepted session channel
//! to its own task, counted against `max_sessions`.
//!
//! A certificate that is not a valid credential of this cluster fails
//! authentication. A valid one whose roles do not allow this login on this
//! node, or whose user is at a limit, authenticates, and every channel is then
//! refused with the reason ("administratively prohibited"), so the user reads
//! why instead of "Permission denied".

use std::sync::Arc;

use russh::keys::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Handle, Handler, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio_util::sync::CancellationToken;
use turnstile_api::audit::{AuditEvent, SessctlKind};
use turnstile_api::identity::{EXT_VIA_PROXY, UserIdentity};
use turnstile_api::recording::RecordingPolicy;
use turnstile_api::rpc::proto;
use turnstile_api::semaphore::{too_many_connections, too_many_sessions};

use super::NodeShared;
use super::process::LocalUser;
use super::session::{RecordingContext, SessionContext, serve_session};
use crate::live::{Activity, WatchGuard, WatchRequest};
use crate::server::ConnectionInfo;
use crate::session_control::{AcquireError, ChannelLimit, ConnectionLease, LeaseParams};
use crate::user_cert::{refusal_event, verify_user_cert};

/// What this connection may do, decided at authentication.
// One per connection, decided once: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Access {
    Pending,
    Allowed {
        identity: UserIdentity,
        login: String,
        local_user: LocalUser,
        channels: Arc<ChannelLimit>,
        /// Held while the connection lives, for users with `max_connections`.
        lease: Option<ConnectionLease>,
        /// The proxy connected for the user and records the session itself.
        via_proxy: bool,
        /// What becomes of a session whose recording cannot be written.
        recording: RecordingPolicy,
        /// When the user's certificate expires, if the node is to end the
        /// connection then.
        cert_valid_before: Option<u64>,
        activity: Arc<Activity>,
    },
    Denied {
        reason: String,
        /// Close the connection after refusing the first channel.
        close: bool,
    },
}

pub struct NodeConnection {
    shared: Arc<NodeShared>,
    info: ConnectionInfo,
    id: String,
    access: Access,
    /// Cancelled when the connection ends, stopping its helper tasks.
    closed: CancellationToken,
    /// On the node's list of live connections while it lives.
    watch: Option<WatchGuard>,
}

/// "administratively prohibited" with our text, as OpenSSH prints it.
pub(crate) fn prohibited(reason: impl Into<String>) -> ChannelOpenFailure {
    ChannelOpenFailure::Other {
        code: 1,
        reason: reason.into(),
    }
}

impl NodeConnection {
    pub(super) fn new(shared: Arc<NodeShared>, info: ConnectionInfo) -> Self {
        Self {
            shared,
            info,
            id: uuid::Uuid::new_v4().to_string(),
            access: Access::Pending,
            closed: CancellationToken::new(),
            watch: None,
        }
    }

    /// Records a refusal in the audit log.
    fn refused(&self, cert: &Certificate, login: &str, reason: &str) {
        self.shared.audit.emit(refusal_event(
            cert,
            login,
            &self.shared.config.host_id,
            &self.info.client.to_string(),
            reason,
        ));
    }

    fn limit_event(&self, user: &str, login: &str, max: u32, kind: SessctlKind) -> AuditEvent {
        AuditEvent::SessctlLimit {
            user: user.to_string(),
            login: login.to_string(),
            remote_addr: self.info.client.to_string(),
            server_id: self.shared.config.host_id.clone(),
            max,
            sessctl_kind: kind,
        }
    }

    async fn decide(&self, login: &str, cert: &Certificate) -> Result<Access, String> {
        let denied = |reason: String| Access::Denied {
            reason,
            close: false,
        };
        let fingerprints = self
            .shared
            .view
            .user_ca_fingerprints()
            .await
            .map_err(|e| format!("cannot load the user CA: {e}"))?;
        let identity = verify_user_cert(cert, &fingerprints, self.shared.clock_unix())
            .map_err(|e| e.to_string())?;
        // A proxy's certificate is good only on a connection that came through a proxy.
        let via_proxy = cert.extensions().contains_key(EXT_VIA_PROXY);
        if via_proxy && !self.info.via_proxy {
            return Err("a proxy's certificate was offered on a connection that did not come through a proxy".into());
        }
        if !cert.valid_principals().iter().any(|p| p == login) {
            return Ok(denied(format!(
                "user {:?} may not log in as {login:?}; the certificate allows: {}",
                identity.user,
                cert.valid_principals().join(", ")
            )));
        }
        if let Err(reason) = self.shared.view.locks_fresh_enough().await {
            return Ok(denied(reason));
        }
        let roles = match self.shared.admit(&identity, login).await {
            Ok((_, roles)) => roles,
            Err(reason) => return Ok(denied(reason)),
        };
        let local_user = match LocalUser::lookup(login) {
            Ok(u) => u,
            Err(reason) => return Ok(denied(reason)),
        };
        let limits = roles.limits();
        let lease = if limits.max_connections > 0 {
            match self
                .take_slot(&identity.user, login, limits.max_connections)
                .await
            {
                Ok(lease) => Some(lease),
                Err(refusal) => return Ok(refusal),
            }
        } else {
            None
        };
        Ok(Access::Allowed {
            channels: ChannelLimit::new(limits.max_sessions),
            // A proxy's certificate lives minutes: the proxy ends the
            // session when the user's own certificate expires.
            cert_valid_before: (!via_proxy).then(|| cert.valid_before()),
            activity: Activity::new(),
            identity,
            login: login.to_string(),
            local_user,
            lease,
            via_proxy,
            recording: limits.recording,
        })
    }

    /// Takes a `max_connections` slot, or says why not.
    async fn take_slot(
        &self,
        user: &str,
        login: &str,
        max: u32,
    ) -> Result<ConnectionLease, Access> {
        let refuse = |reason: String| Access::Denied {
            reason,
            close: true,
        };
        let timeout = match self.shared.view.session_control_timeout().await {
            Ok(t) => t,
            Err(e) => {
                return Err(refuse(format!(
                    "cannot take a connection slot for user {user:?} (max_connections={max}): the auth service is unreachable ({e}); try again later"
                )));
            }
        };
        let params = LeaseParams {
            user: user.to_string(),
            max,
            login: login.to_string(),
            remote_addr: self.info.client.to_string(),
            holder_name: self.shared.config.node_name.clone(),
        };
        match ConnectionLease::acquire(self.shared.lease_service.clone(), params, timeout).await {
            Ok(lease) => Ok(lease),
            Err(AcquireError::Limit { max, held }) => {
                turnstile_api::metrics::METRICS
                    .limit_refusals_connection
                    .inc();
                self.shared
                    .audit
                    .emit(self.limit_event(user, login, max, SessctlKind::Connection));
                Err(refuse(format!("{}{held}", too_many_connections(user, max))))
            }
            Err(AcquireError::Unavailable(e)) => Err(refuse(format!(
                "cannot take a connection slot for user {user:?} (max_connections={max}): the auth service is unreachable ({e}); try again later"
            ))),
            Err(AcquireError::Refused(e)) => Err(refuse(format!(
                "cannot take a connection slot for user {user:?}: {e}"
            ))),
        }
    }

    /// Registers the connection for `admin sessions ls` and, if it holds a
    /// slot, watches for the slot's loss to close the connection.
    fn on_authenticated(&mut self, handle: Handle) {
        let Access::Allowed {
            identity,
            login,
            channels,
            lease,
            cert_valid_before,
            activity,
            ..
        } = &self.access
        else {
            return;
        };
        self.watch = Some(self.shared.live.watch(WatchRequest {
            identity: identity.clone(),
            login: login.clone(),
            remote_addr: self.info.client.to_string(),
            cert_valid_before: *cert_valid_before,
            activity: activity.clone(),
            handle: handle.clone(),
            channels: Some(channels.clone()),
        }));
        let tracker = proto::SessionTracker {
            id: self.id.clone(),
            node_id: self.shared.config.host_id.clone(),
            node_name: self.shared.config.node_name.clone(),
            user: identity.user.clone(),
            login: login.clone(),
            remote_addr: self.info.client.to_string(),
            since_unix_ms: i64::try_from(self.shared.clock_unix()).unwrap_or(0) * 1000,
            channels: 0,
            ttl_ms: 0,
        };
        self.shared.track(tracker, channels.clone());
        if let Some(lease) = lease {
            let lost = lease.lost();
            let closed = self.closed.clone();
            let channels = channels.clone();
            tokio::spawn(async move {
                let reason = tokio::select! {
                    reason = lost => reason,
                    _ = closed.cancelled() => return,
                };
                tracing::warn!(%reason, "closing a connection whose slot was lost");
                crate::live::end(&handle, &channels.open_channels(), &reason).await;
            });
        }
    }
}

impl Drop for NodeConnection {
    fn drop(&mut self) {
        self.closed.cancel();
        self.shared.untrack(&self.id);
        // The lease, if any, drops with `access` and is released at once.
    }
}

impl Handler for NodeConnection {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        match self.decide(user, certificate).await {
            Ok(access) => {
                if let Access::Denied { reason, .. } = &access {
                    tracing::warn!(client = %self.info.client, login = user, %reason, "access denied after authentication");
                    self.refused(certificate, user, reason);
                }
                self.access = access;
                Ok(Auth::Accept)
            }
            Err(reason) => {
                tracing::warn!(client = %self.info.client, login = user, %reason, "certificate refused");
                self.refused(certificate, user, &reason);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.on_authenticated(session.handle());
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match &self.access {
            Access::Allowed {
                identity,
                login,
                local_user,
                channels,
                via_proxy,
                recording,
                activity,
                ..
            } => {
                let Some(slot) = channels.try_open(channel.id()) else {
                    let max = channels.max();
                    turnstile_api::metrics::METRICS.limit_refusals_session.inc();
                    self.shared.audit.emit(self.limit_event(
                        &identity.user,
                        login,
                        max,
                        SessctlKind::Session,
                    ));
                    tracing::info!(user = %identity.user, max, "session channel refused: max_sessions");
                    reply
                        .reject(prohibited(too_many_sessions(&identity.user, max)))
                        .await;
                    return Ok(());
                };
                if let Err(reason) = self.shared.audit.admits_new_sessions() {
                    tracing::error!(user = %identity.user, %reason, "session refused");
                    reply.reject(prohibited(reason)).await;
                    return Ok(());
                }
                let mode = match self.shared.view.session_recording().await {
                    Ok(mode) => mode,
                    Err(e) => {
                        reply
                            .reject(prohibited(format!(
                                "the node cannot tell how to record this session: {e}"
                            )))
                            .await;
                        return Ok(());
                    }
                };
                if mode.at_proxy() && !via_proxy {
                    reply
                        .reject(prohibited(
                            "sessions are recorded by the proxy: connect through it (turnstile ssh NODE, or ssh -J PROXY NODE)",
                        ))
                        .await;
                    return Ok(());
                }
                let ctx = SessionContext {
                    activity: activity.clone(),
                    sid: uuid::Uuid::new_v4().to_string(),
                    user: identity.user.clone(),
                    local_user: local_user.clone(),
                    connection: self.info,
                    sid_from_proxy: *via_proxy,
                    recording: RecordingContext {
                        // The proxy records what comes through it.
                        enabled: !via_proxy,
                        mode,
                        policy: *recording,
                        recorder: self.shared.recorder.clone(),
                        audit: self.shared.audit.clone(),
                        server_id: self.shared.config.host_id.clone(),
                        node_name: self.shared.config.node_name.clone(),
                    },
                };
                reply.accept().await;
                let handle = session.handle();
                self.shared.tasks.spawn(async move {
                    let _slot = slot;
                    serve_session(channel, handle, ctx).await;
                });
            }
            Access::Denied { reason, close } => {
                reply.reject(prohibited(reason.clone())).await;
                if *close {
                    let handle = session.handle();
                    let reason = reason.clone();
                    tokio::spawn(async move {
                        let _ = handle
                            .disconnect(russh::Disconnect::ByApplication, reason, String::new())
                            .await;
                    });
                }
            }
            Access::Pending => reply.reject(prohibited("not authenticated")).await,
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !matches!(self.access, Access::Allowed { .. }) {
            let reason = match &self.access {
                Access::Denied { reason, .. } => reason.clone(),
                _ => "not authenticated".into(),
            };
            reply.reject(prohibited(reason)).await;
            return Ok(());
        }
        let Ok(port) = u16::try_from(port_to_connect) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        // The connect runs on its own, bounded by `connect_timeout`: a target
        // that does not answer never holds up the rest of the connection.
        let host = host_to_connect.to_string();
        let timeout = self.shared.config.connect_timeout;
        self.shared.tasks.spawn(async move {
            let failed = |reason: String| ChannelOpenFailure::Other { code: 2, reason };
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), port)))
                .await
            {
                Ok(Ok(mut tcp)) => {
                    reply.accept().await;
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                }
                Ok(Err(e)) => reply.reject(failed(format!("connect to {host}:{port}: {e}"))).await,
                Err(_) => {
                    reply
                        .reject(failed(format!(
                            "connect to {host}:{port} timed out after {} (ssh_service.connect_timeout)",
                            turnstile_api::duration::format(timeout)
                        )))
                        .await;
                }
            }
        });
        Ok(())
    }
}
