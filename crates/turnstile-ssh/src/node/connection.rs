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

use crate::pre_auth::PreAuth;
use std::sync::Arc;

use russh::keys::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Handle, Handler, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio_util::sync::CancellationToken;
use turnstile_api::audit::{Actor, AuditEvent, SessctlKind};
use turnstile_api::identity::{EXT_VIA_PROXY, UserIdentity};
use turnstile_api::recording::RecordingPolicy;
use turnstile_api::role;
use turnstile_api::rpc::proto;
use turnstile_api::semaphore::{too_many_connections, too_many_sessions};

use super::NodeShared;
use super::forward::{self, AgentSlot, AgentSocket, RemoteForwards};
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
        /// Some role allows port forwarding.
        port_forwarding: bool,
        /// Some role allows agent forwarding.
        forward_agent: bool,
        /// The forwarded agent's socket, once asked for and allowed.
        agent: AgentSlot,
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
    /// The remote forwards (`ssh -R`) listening for this connection.
    remote: RemoteForwards,
    /// Counted among the unauthenticated connections until it authenticates.
    pre_auth: PreAuth,
}

/// Why a forward is refused, and whose it was when the connection has a user.
struct Refusal {
    who: Option<(String, String)>,
    reason: String,
}

/// The same event, refused for `reason`.
fn failed(mut event: AuditEvent, reason: &str) -> AuditEvent {
    if let AuditEvent::ChannelEvent {
        success, fields, ..
    } = &mut event
    {
        *success = false;
        fields.insert("error".into(), reason.into());
    }
    event
}

/// "administratively prohibited" with our text, as OpenSSH prints it.
pub(crate) fn prohibited(reason: impl Into<String>) -> ChannelOpenFailure {
    ChannelOpenFailure::Other {
        code: 1,
        reason: reason.into(),
    }
}

impl NodeConnection {
    pub(super) fn new(shared: Arc<NodeShared>, info: ConnectionInfo, pre_auth: PreAuth) -> Self {
        Self {
            shared,
            info,
            pre_auth,
            id: uuid::Uuid::new_v4().to_string(),
            access: Access::Pending,
            closed: CancellationToken::new(),
            watch: None,
            remote: RemoteForwards::default(),
        }
    }

    /// Something the connection did besides a session, for the audit log.
    fn event(
        &self,
        event: &str,
        (user, login): (&str, &str),
        result: Result<(), &str>,
        fields: impl IntoIterator<Item = (&'static str, serde_json::Value)>,
    ) -> AuditEvent {
        let remote_addr = self.info.client.to_string();
        let actor = Actor {
            user,
            login,
            server_id: &self.shared.config.host_id,
            remote_addr: &remote_addr,
        };
        let fields = fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        AuditEvent::channel(event, actor, result, fields)
    }

    /// Records something the connection did besides a session.
    fn channel_event(
        &self,
        event: &str,
        who: (&str, &str),
        result: Result<(), &str>,
        fields: impl IntoIterator<Item = (&'static str, serde_json::Value)>,
    ) {
        self.shared
            .audit
            .emit(self.event(event, who, result, fields));
    }

    /// May this connection forward ports now? The roles must allow it, the
    /// audit log must be able to take the forward's event, and while sessions
    /// are recorded at the proxy only a connection through a proxy may (the
    /// proxy carries the user's forwards here). The user and login if so.
    async fn may_forward_ports(&self) -> Result<(String, String), Refusal> {
        let (identity, login, allowed, via_proxy) = match &self.access {
            Access::Allowed {
                identity,
                login,
                port_forwarding,
                via_proxy,
                ..
            } => (identity, login, *port_forwarding, *via_proxy),
            Access::Denied { reason, .. } => {
                return Err(Refusal {
                    who: None,
                    reason: reason.clone(),
                });
            }
            Access::Pending => {
                return Err(Refusal {
                    who: None,
                    reason: "not authenticated".into(),
                });
            }
        };
        let who = (identity.user.clone(), login.clone());
        let refused = |reason: String| {
            Err(Refusal {
                who: Some(who.clone()),
                reason,
            })
        };
        if !allowed {
            return refused(role::port_forwarding_refused(&identity.user));
        }
        if let Err(reason) = self.shared.audit.admits_new_sessions() {
            return refused(reason);
        }
        match self.shared.view.session_recording().await {
            Ok(mode) if mode.at_proxy() && !via_proxy => refused(
                "sessions and forwards are recorded by the proxy: connect through it (turnstile ssh NODE, or ssh -J PROXY NODE)".into(),
            ),
            Ok(_) => Ok(who),
            Err(e) => refused(format!("the node cannot tell how sessions are recorded: {e}")),
        }
    }

    /// Logs and audits a refused forward (when the connection has a user);
    /// the reason, for the client.
    fn refuse_forward<const N: usize>(
        &self,
        refusal: Refusal,
        fields: [(&'static str, serde_json::Value); N],
    ) -> String {
        if let Some((user, login)) = &refusal.who {
            tracing::info!(%user, reason = %refusal.reason, "port forward refused");
            self.channel_event("port", (user, login), Err(&refusal.reason), fields);
        }
        refusal.reason
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
            port_forwarding: limits.port_forwarding,
            forward_agent: limits.forward_agent,
            agent: AgentSlot::default(),
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
        self.pre_auth.authenticated();
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
                agent,
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
                    agent: agent.clone(),
                    accept_env: self.shared.config.accept_env.clone(),
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
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let target = format!("{host_to_connect}:{port_to_connect}");
        let fields = |target: &str| {
            [
                ("kind", "local".into()),
                ("addr", target.into()),
                (
                    "originator",
                    format!("{originator_address}:{originator_port}").into(),
                ),
            ]
        };
        let who = match self.may_forward_ports().await {
            Ok(who) => who,
            Err(refusal) => {
                let reason = self.refuse_forward(refusal, fields(&target));
                reply.reject(prohibited(reason)).await;
                return Ok(());
            }
        };
        let Ok(port) = u16::try_from(port_to_connect) else {
            let reason = format!("port {port_to_connect} is out of range");
            self.channel_event("port", (&who.0, &who.1), Err(&reason), fields(&target));
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        // The connect runs on its own, bounded by `connect_timeout`: a target
        // that does not answer never holds up the rest of the connection.
        let host = host_to_connect.to_string();
        let timeout = self.shared.config.connect_timeout;
        let audit = self.shared.audit.clone();
        let opened = self.event("port", (&who.0, &who.1), Ok(()), fields(&target));
        self.shared.tasks.spawn(async move {
            let refuse = |reason: String| ChannelOpenFailure::Other { code: 2, reason };
            match tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
            {
                Ok(Ok(mut tcp)) => {
                    audit.emit(opened);
                    reply.accept().await;
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                }
                Ok(Err(e)) => {
                    let reason = format!("connect to {host}:{port}: {e}");
                    audit.emit(failed(opened, &reason));
                    reply.reject(refuse(reason)).await;
                }
                Err(_) => {
                    let reason = format!(
                        "connect to {host}:{port} timed out after {} (ssh_service.connect_timeout)",
                        turnstile_api::duration::format(timeout)
                    );
                    audit.emit(failed(opened, &reason));
                    reply.reject(refuse(reason)).await;
                }
            }
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let requested = format!("{address}:{port}");
        let fields = |addr: String| [("kind", "remote".into()), ("addr", addr.into())];
        let (user, login) = match self.may_forward_ports().await {
            Ok(who) => who,
            Err(refusal) => {
                self.refuse_forward(refusal, fields(requested));
                return Ok(false);
            }
        };
        let Access::Allowed { local_user, .. } = &self.access else {
            return Ok(false);
        };
        let root = local_user.uid.is_root();
        let who = (user.as_str(), login.as_str());
        let ip = match forward::bind_address(address, self.shared.config.gateway_ports) {
            Ok(ip) => ip,
            Err(reason) => {
                self.channel_event("port", who, Err(&reason), fields(requested));
                return Ok(false);
            }
        };
        let Ok(wanted) = u16::try_from(*port) else {
            let reason = format!("port {port} is out of range");
            self.channel_event("port", who, Err(&reason), fields(requested));
            return Ok(false);
        };
        // As sshd: only root may listen on a privileged port.
        if wanted != 0 && wanted < 1024 && !root {
            let reason = format!(
                "login {login:?} may not listen on privileged port {wanted}; only root may"
            );
            self.channel_event("port", who, Err(&reason), fields(requested));
            return Ok(false);
        }
        let bind = std::net::SocketAddr::new(ip, wanted);
        match self
            .remote
            .listen(session.handle(), address, bind, &self.closed)
            .await
        {
            Ok(bound) => {
                *port = bound;
                tracing::info!(%user, %bind, bound, "remote port forward listening");
                self.channel_event("port", who, Ok(()), fields(format!("{}:{bound}", ip)));
                Ok(true)
            }
            Err(e) => {
                let reason = format!("cannot listen on {bind}: {e}");
                self.channel_event("port", who, Err(&reason), fields(requested));
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.remote.cancel(address, port))
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Access::Allowed {
            identity,
            login,
            local_user,
            forward_agent,
            agent,
            ..
        } = &self.access
        else {
            return Ok(false);
        };
        let who = (identity.user.as_str(), login.as_str());
        let result = if !forward_agent {
            Err(role::agent_forwarding_refused(&identity.user))
        } else if let Err(reason) = self.shared.audit.admits_new_sessions() {
            Err(reason)
        } else {
            let mut slot = agent.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                Ok(())
            } else {
                AgentSocket::open(session.handle(), local_user).map(|socket| {
                    *slot = Some(socket);
                })
            }
        };
        match &result {
            Ok(()) => {
                self.channel_event("agent.forward", who, Ok(()), []);
                Ok(true)
            }
            Err(reason) => {
                tracing::info!(user = %identity.user, %reason, "agent forwarding refused");
                self.channel_event("agent.forward", who, Err(reason), []);
                // OpenSSH asks without wanting a reply: the user reads why on
                // the session's stderr.
                crate::server::tell_stderr(session, channel, reason);
                Ok(false)
            }
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let reason = role::X11_REFUSED;
        if let Access::Allowed {
            identity, login, ..
        } = &self.access
        {
            let who = (identity.user.clone(), login.clone());
            self.channel_event("x11-forward", (&who.0, &who.1), Err(reason), []);
        }
        crate::server::tell_stderr(session, channel, reason);
        session.channel_failure(channel)?;
        Ok(())
    }
}
