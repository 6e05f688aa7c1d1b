//! Proxy recording mode: instead of piping a tunnel through, the proxy ends
//! the user's SSH connection itself, presenting a host certificate for the
//! node's name that auth issues to proxies only, records the session, and
//! connects to the node with a short-lived certificate for the same user,
//! marked as the proxy's. The node records nothing for such connections, and
//! refuses sessions that did not come through a proxy while the mode lasts.

use std::net::SocketAddr;
use std::sync::Arc;

use russh::keys::{Certificate, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Handle, Handler, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure, MethodKind};
use tokio::sync::watch;
use turnstile_api::audit::{Actor, AuditEvent};
use turnstile_api::identity::UserIdentity;
use turnstile_api::recording::RecordingPolicy;
use turnstile_api::role;
use turnstile_api::rpc::proto;
use turnstile_recording::recorder::{
    Outcome, SessionKind, SessionMeta, SessionRecording, SessionStart,
};

use super::ProxyShared;
use crate::client::{self, Connected, Inbound, UserCredentials};
use crate::cluster_view::NodeInfo;
use crate::node::prohibited;
use crate::server::{HostCredentials, server_config};
use crate::user_cert::verify_user_cert;

/// Serves the user's SSH connection to `node` inside the tunnel `channel`.
pub(crate) async fn serve(
    shared: Arc<ProxyShared>,
    channel: Channel<Msg>,
    node: NodeInfo,
    outer: UserIdentity,
    client: SocketAddr,
    host_cert: Certificate,
) {
    let host = HostCredentials::fixed(shared.host.key.clone(), host_cert);
    let config = Arc::new(server_config(&host, &[MethodKind::PublicKey]));
    let handler = Terminating {
        shared,
        node,
        outer,
        client,
        upstream: None,
        login: String::new(),
    };
    match russh::server::run_stream(config, channel.into_stream(), handler).await {
        Ok(session) => {
            let _ = session.await;
        }
        Err(e) => tracing::debug!(%client, error = %e, "inner handshake failed"),
    }
}

/// A host certificate for the node's name on the proxy's key, from auth.
pub(crate) async fn node_host_cert(
    shared: &ProxyShared,
    node_name: &str,
) -> Result<Certificate, String> {
    let public_key = shared
        .host
        .key
        .public_key()
        .to_openssh()
        .map_err(|e| e.to_string())?;
    let resp = shared
        .view
        .client()
        .generate_node_host_cert(proto::GenerateNodeHostCertRequest {
            node_name: node_name.to_string(),
            public_key,
        })
        .await
        .map_err(|s| s.message().to_string())?;
    Certificate::from_openssh(&resp.into_inner().certificate).map_err(|e| e.to_string())
}

struct Terminating {
    shared: Arc<ProxyShared>,
    node: NodeInfo,
    outer: UserIdentity,
    client: SocketAddr,
    upstream: Option<Arc<Connected>>,
    login: String,
}

impl Terminating {
    /// Connects to the node as `login` for the holder of `cert`.
    async fn connect_upstream(&self, login: &str, cert: &Certificate) -> Result<Connected, String> {
        let public_key = self
            .shared
            .session_key
            .public_key()
            .to_openssh()
            .map_err(|e| e.to_string())?;
        let issued = self
            .shared
            .view
            .client()
            .generate_proxy_user_cert(proto::GenerateProxyUserCertRequest {
                user_certificate: cert.to_openssh().map_err(|e| e.to_string())?,
                public_key,
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let creds = UserCredentials {
            key: self.shared.session_key.clone(),
            certificate: Certificate::from_openssh(&issued.certificate)
                .map_err(|e| e.to_string())?,
        };
        let tcp = self.shared.dial_node(self.client, &self.node).await?;
        let host_ca: Vec<PublicKey> = self
            .shared
            .view
            .host_ca_keys()
            .await
            .map_err(|e| e.to_string())?;
        let mut conn = client::open(
            tcp,
            &format!("node {:?}", self.node.name),
            &self.node.name,
            &host_ca,
        )
        .await
        .map_err(|e| e.to_string())?;
        conn.auth_certificate(login, &creds)
            .await
            .map_err(|e| e.to_string())?;
        Ok(conn)
    }
}

/// Carries the channels the node opens towards the user (connections to a
/// remote forward, the forwarded agent) to the user's side of the proxy.
async fn carry_inbound(mut inbound: tokio::sync::mpsc::UnboundedReceiver<Inbound>, user: Handle) {
    while let Some(offer) = inbound.recv().await {
        let user = user.clone();
        tokio::spawn(async move {
            let (node_side, reply, opened) = match offer {
                Inbound::Forwarded {
                    channel,
                    reply,
                    connected_address,
                    connected_port,
                    originator_address,
                    originator_port,
                } => {
                    let opened = user
                        .channel_open_forwarded_tcpip(
                            connected_address,
                            connected_port,
                            originator_address,
                            originator_port,
                        )
                        .await;
                    (channel, reply, opened)
                }
                Inbound::Agent { channel, reply } => {
                    let opened = user.channel_open_agent().await;
                    (channel, reply, opened)
                }
            };
            match opened {
                Ok(user_side) => {
                    reply.accept().await;
                    let mut a = user_side.into_stream();
                    let mut b = node_side.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
                Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
            }
        });
    }
}

impl Terminating {
    /// May the user forward their agent? The same rule the node applies;
    /// the node checks again and audits what it allows.
    async fn may_forward_agent(&self) -> Result<(), String> {
        let roles = self
            .shared
            .view
            .role_set(&self.outer.roles)
            .await
            .map_err(|e| format!("cannot check the roles of user {:?}: {e}", self.outer.user))?;
        if roles.limits().forward_agent {
            Ok(())
        } else {
            Err(role::agent_forwarding_refused(&self.outer.user))
        }
    }

    /// Records what the proxy refused itself (the node never sees it).
    fn refused_event(&self, event: &str, reason: &str) {
        let remote_addr = self.client.to_string();
        let actor = Actor {
            user: &self.outer.user,
            login: &self.login,
            server_id: &self.shared.config.host_id,
            remote_addr: &remote_addr,
        };
        self.shared.audit.emit(AuditEvent::channel(
            event,
            actor,
            Err(reason),
            serde_json::Map::new(),
        ));
    }
}

impl Handler for Terminating {
    type Error = russh::Error;

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(upstream) = &self.upstream {
            let inbound = upstream.inbound();
            self.shared
                .tasks
                .spawn(carry_inbound(inbound, session.handle()));
        }
        Ok(())
    }

    /// `ssh -L`, `-D`, `-W` on a connection the proxy ends: carried to the
    /// node, which decides and audits as for any forward.
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
        let Some(upstream) = self.upstream.clone() else {
            reply.reject(prohibited("not authenticated")).await;
            return Ok(());
        };
        let (host, originator) = (host_to_connect.to_string(), originator_address.to_string());
        self.shared.tasks.spawn(async move {
            match upstream
                .handle
                .channel_open_direct_tcpip(host, port_to_connect, originator, originator_port)
                .await
            {
                Ok(node_side) => {
                    reply.accept().await;
                    let mut a = channel.into_stream();
                    let mut b = node_side.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
                Err(e) => {
                    let text = upstream.open_refusal(e).await;
                    reply.reject(prohibited(text)).await;
                }
            }
        });
        Ok(())
    }

    /// `ssh -R`: asked of the node, which listens, decides and audits.
    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(upstream) = &self.upstream else {
            return Ok(false);
        };
        match upstream.handle.tcpip_forward(address, *port).await {
            Ok(bound) => {
                if *port == 0 {
                    *port = bound;
                }
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(upstream) = &self.upstream else {
            return Ok(false);
        };
        Ok(upstream
            .handle
            .cancel_tcpip_forward(address, port)
            .await
            .is_ok())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // The session's relay asks the node (see `Relay::run`).
        match self.may_forward_agent().await {
            Ok(()) => Ok(true),
            Err(reason) => {
                self.refused_event("agent.forward", &reason);
                crate::server::tell_stderr(session, channel, &reason);
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
        self.refused_event("x11-forward", role::X11_REFUSED);
        crate::server::tell_stderr(session, channel, role::X11_REFUSED);
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn auth_openssh_certificate(
        &mut self,
        login: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let Ok(fingerprints) = self.shared.view.user_ca_fingerprints().await else {
            return Ok(Auth::reject());
        };
        match verify_user_cert(cert, &fingerprints, self.shared.clock.unix_now()) {
            Ok(identity) if identity.user == self.outer.user => {}
            Ok(_) => {
                tracing::warn!(client = %self.client, "inner certificate of another user than the tunnel's");
                return Ok(Auth::reject());
            }
            Err(reason) => {
                tracing::warn!(client = %self.client, %reason, "inner certificate refused");
                return Ok(Auth::reject());
            }
        }
        match self.connect_upstream(login, cert).await {
            Ok(conn) => {
                self.upstream = Some(Arc::new(conn));
                self.login = login.to_string();
                Ok(Auth::Accept)
            }
            Err(reason) => {
                tracing::warn!(client = %self.client, node = %self.node.name, %reason, "cannot connect to the node for the user");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(upstream) = self.upstream.clone() else {
            reply.reject(prohibited("not authenticated")).await;
            return Ok(());
        };
        let node_channel = match upstream.handle.channel_open_session().await {
            Ok(ch) => ch,
            Err(e) => {
                let text = upstream.open_refusal(e).await;
                reply.reject(prohibited(text)).await;
                return Ok(());
            }
        };
        reply.accept().await;
        let meta = SessionMeta {
            sid: uuid::Uuid::new_v4().to_string(),
            server_id: self.shared.config.host_id.clone(),
            user: self.outer.user.clone(),
            login: self.login.clone(),
            node_name: self.node.name.clone(),
        };
        let relay = Relay {
            shared: self.shared.clone(),
            handle: session.handle(),
            meta,
            roles: self.outer.roles.clone(),
            forward_agent: self.may_forward_agent().await.is_ok(),
        };
        self.shared.tasks.spawn(relay.run(channel, node_channel));
        Ok(())
    }
}

/// One session channel, relayed between the user and the node, and recorded.
struct Relay {
    shared: Arc<ProxyShared>,
    handle: Handle,
    meta: SessionMeta,
    /// The user's roles, for their recording policy.
    roles: Vec<String>,
    /// The roles allow agent forwarding: a request for it is passed on.
    forward_agent: bool,
}

/// Resolves when the recording changes how it stands.
async fn outcome_changed(outcome: &mut Option<watch::Receiver<Outcome>>) -> Outcome {
    match outcome {
        Some(rx) => match rx.changed().await {
            Ok(()) => rx.borrow_and_update().clone(),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl Relay {
    /// Begins the recording of what the channel starts, in the mode of the
    /// moment. `Err`: the message for the user; the request must be refused.
    async fn begin(
        &self,
        kind: SessionKind,
        pty: &Option<(String, u32, u32)>,
    ) -> Result<SessionRecording, String> {
        let view = &self.shared.view;
        let mode = view
            .session_recording()
            .await
            .map_err(|e| format!("the proxy cannot tell how to record this session: {e}"))?;
        // The node records (or not) if the mode changed since the tunnel opened.
        let mode = if mode.at_proxy() {
            mode
        } else {
            turnstile_api::recording::RecordingMode::Proxy
        };
        let policy = match view.role_set(&self.roles).await {
            Ok(roles) => roles.limits().recording,
            Err(_) => RecordingPolicy::Strict,
        };
        let start = SessionStart {
            meta: self.meta.clone(),
            kind,
            pty: pty.clone(),
            mode,
            policy,
        };
        self.shared
            .recorder
            .begin(start, self.shared.audit.clone())
            .await
    }

    async fn run(self, user: Channel<Msg>, node: Channel<russh::client::Msg>) {
        let id = user.id();
        let (mut from_user, to_user) = user.split();
        let (mut from_node, to_node) = node.split();
        // The node names the session with the proxy's sid.
        let _ = to_node
            .set_env(false, "TURNSTILE_SESSION_ID", self.meta.sid.as_str())
            .await;
        let mut pty: Option<(String, u32, u32)> = None;
        let mut recording: Option<SessionRecording> = None;
        let mut outcome: Option<watch::Receiver<Outcome>> = None;
        let mut exit_code: Option<i32> = None;
        // Replies the node owes for requests the user wanted answered.
        let mut owed = 0usize;
        loop {
            tokio::select! {
                changed = outcome_changed(&mut outcome) => {
                    let Some(text) = changed.message() else { continue };
                    let _ = to_user.extended_data_bytes(1, format!("\r\n{text}\r\n").into_bytes()).await;
                    if matches!(changed, Outcome::Ended(_)) {
                        tracing::warn!(sid = %self.meta.sid, user = %self.meta.user, "ending the session: its recording cannot be written");
                        break;
                    }
                }
                msg = from_user.wait() => {
                    let Some(msg) = msg else { break };
                    // What starts the channel's work is recorded first, or refused.
                    let starts = match &msg {
                        ChannelMsg::RequestShell { want_reply } => Some((SessionKind::Shell, *want_reply)),
                        ChannelMsg::Exec { want_reply, command } => Some((SessionKind::Exec(String::from_utf8_lossy(command).into_owned()), *want_reply)),
                        ChannelMsg::RequestSubsystem { want_reply, name } => Some((SessionKind::Subsystem(name.clone()), *want_reply)),
                        _ => None,
                    };
                    if let Some((kind, want_reply)) = starts {
                        if recording.is_some() {
                            if want_reply {
                                let _ = self.handle.channel_failure(id).await;
                            }
                            continue;
                        }
                        match self.begin(kind, &pty).await {
                            Ok(r) => {
                                if let Some(text) = r.message() {
                                    let _ = to_user.extended_data_bytes(1, format!("{text}\r\n").into_bytes()).await;
                                }
                                outcome = Some(r.outcome());
                                recording = Some(r);
                            }
                            Err(message) => {
                                // The user reads why, and the channel closes (a
                                // failure reply would make OpenSSH drop the text).
                                let _ = to_user.extended_data_bytes(1, format!("{message}\r\n").into_bytes()).await;
                                if want_reply {
                                    let _ = self.handle.channel_success(id).await;
                                }
                                break;
                            }
                        }
                    }
                    let ok = match msg {
                        ChannelMsg::RequestPty { want_reply, term, col_width, row_height, pix_width, pix_height, terminal_modes } => {
                            pty = Some((term.clone(), col_width, row_height));
                            owed += usize::from(want_reply);
                            to_node.request_pty(want_reply, &term, col_width, row_height, pix_width, pix_height, &terminal_modes).await
                        }
                        // Never with a reply: russh marks every `env` as wanting
                        // one, the client did not, and the node sends none.
                        ChannelMsg::SetEnv { variable_name, variable_value, .. } => {
                            to_node.set_env(false, variable_name, variable_value).await
                        }
                        ChannelMsg::RequestShell { want_reply } => {
                            owed += usize::from(want_reply);
                            to_node.request_shell(want_reply).await
                        }
                        ChannelMsg::Exec { want_reply, command } => {
                            owed += usize::from(want_reply);
                            to_node.exec(want_reply, command).await
                        }
                        ChannelMsg::RequestSubsystem { want_reply, name } => {
                            owed += usize::from(want_reply);
                            to_node.request_subsystem(want_reply, name).await
                        }
                        ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height } => {
                            if let Some(r) = &recording {
                                r.resize(col_width, row_height).await;
                            }
                            to_node.window_change(col_width, row_height, pix_width, pix_height).await
                        }
                        ChannelMsg::Signal { signal } => to_node.signal(signal).await,
                        ChannelMsg::Data { data } => {
                            if let Some(r) = &recording {
                                r.received(data.len());
                            }
                            to_node.data_bytes(data).await
                        }
                        ChannelMsg::Eof => to_node.eof().await,
                        ChannelMsg::Close => break,
                        // Refused by the proxy's handler when not allowed.
                        ChannelMsg::AgentForward { .. } if self.forward_agent => {
                            to_node.agent_forward(false).await
                        }
                        _ => Ok(()),
                    };
                    if ok.is_err() {
                        break;
                    }
                }
                msg = from_node.wait() => {
                    let Some(msg) = msg else { break };
                    match msg {
                        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } if recording.is_none() => {
                            // Nothing reaches the user unrecorded.
                            tracing::debug!(sid = %self.meta.sid, bytes = data.len(), "output before the session started; dropped");
                        }
                        ChannelMsg::Data { data } => {
                            if let Some(r) = &recording
                                && r.print(&data).await.is_err()
                            {
                                continue;
                            }
                            if to_user.data_bytes(data).await.is_err() {
                                break;
                            }
                        }
                        ChannelMsg::ExtendedData { data, ext } => {
                            if let Some(r) = &recording
                                && r.print(&data).await.is_err()
                            {
                                continue;
                            }
                            if to_user.extended_data_bytes(ext, data).await.is_err() {
                                break;
                            }
                        }
                        ChannelMsg::Success | ChannelMsg::Failure if owed > 0 => {
                            owed -= 1;
                            let _ = if matches!(msg, ChannelMsg::Success) {
                                self.handle.channel_success(id).await
                            } else {
                                self.handle.channel_failure(id).await
                            };
                        }
                        ChannelMsg::ExitStatus { exit_status } => {
                            exit_code = i32::try_from(exit_status).ok();
                            let _ = to_user.exit_status(exit_status).await;
                        }
                        ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, lang_tag } => {
                            let _ = self
                                .handle
                                .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                                .await;
                        }
                        ChannelMsg::Eof => {
                            let _ = to_user.eof().await;
                        }
                        ChannelMsg::Close => break,
                        _ => {}
                    }
                }
            }
        }
        if let Some(r) = recording.take() {
            r.end(exit_code).await;
        }
        let _ = to_user.eof().await;
        let _ = to_user.close().await;
        let _ = to_node.close().await;
    }
}
