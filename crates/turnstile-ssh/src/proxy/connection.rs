//! One connection to the proxy: who the user proved to be, and what that
//! lets them open. A certificate opens tunnels and the whole door; a password
//! only the door's `login`; the anonymous name only `cluster_info`.

use std::sync::Arc;
use std::time::Duration;

use russh::keys::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Response, Session};
use russh::{Channel, ChannelOpenFailure};
use turnstile_api::door::ANONYMOUS_USER;
use turnstile_api::identity::UserIdentity;
use turnstile_api::rpc::proto;

use super::ProxyShared;
use super::door::serve_door;
use crate::live::{Activity, WatchGuard, WatchRequest};
use crate::node::prohibited;
use crate::pre_auth::PreAuth;
use crate::server::ConnectionInfo;
use crate::user_cert::{refusal_event, verify_user_cert};

/// Who is on the other end, as proved at authentication.
#[derive(Debug, Clone)]
pub(crate) enum Principal {
    Nobody,
    /// Asked only for the cluster's public trust material.
    Anonymous,
    /// Proved a password; may only log in.
    Password {
        user: String,
        password: String,
    },
    /// Authenticated, but may do nothing: every request is refused with
    /// `reason`, so the user reads why rather than `wrong user name or
    /// password` or `Permission denied` (a password that could not be
    /// checked while auth is unreachable; a locked or removed user).
    Refused {
        reason: String,
    },
    /// Holds a valid certificate of the cluster.
    Certificate {
        identity: UserIdentity,
        certificate: Box<Certificate>,
    },
}

pub(crate) struct ProxyConnection {
    shared: Arc<ProxyShared>,
    info: ConnectionInfo,
    principal: Principal,
    /// On the proxy's list of live connections while a certificate's holder
    /// is connected.
    watch: Option<WatchGuard>,
    /// Counted among the unauthenticated connections until a user
    /// authenticates; the anonymous user stays counted.
    pre_auth: PreAuth,
    /// Channels opened so far (the anonymous user may open only a few).
    channels_opened: u32,
}

fn connect_failed(reason: String) -> ChannelOpenFailure {
    ChannelOpenFailure::Other { code: 2, reason }
}

impl ProxyConnection {
    pub(super) fn new(shared: Arc<ProxyShared>, info: ConnectionInfo, pre_auth: PreAuth) -> Self {
        Self {
            shared,
            info,
            principal: Principal::Nobody,
            watch: None,
            pre_auth,
            channels_opened: 0,
        }
    }

    /// Records a refusal of a certificate's holder in the audit log.
    fn refused(&self, certificate: &Certificate, reason: &str) {
        self.shared.audit.emit(refusal_event(
            certificate,
            "",
            &self.shared.config.host_id,
            &self.info.client.to_string(),
            reason,
        ));
    }

    async fn check_password(&mut self, user: &str, password: &str) -> Auth {
        let mut client = self.shared.view.client();
        // One user's attempts go to one auth server, where they are counted.
        let result = client
            .login(turnstile_api::auth_channel::with_affinity(
                proto::LoginRequest {
                    user: user.to_string(),
                    password: password.to_string(),
                    public_key: String::new(),
                    ttl_seconds: 0,
                    client_addr: self.info.client.to_string(),
                },
                user,
            ))
            .await;
        match result {
            Ok(_) => {
                self.principal = Principal::Password {
                    user: user.to_string(),
                    password: password.to_string(),
                };
                Auth::Accept
            }
            Err(status) if turnstile_api::error::unanswered(status.code()) => {
                tracing::warn!(client = %self.info.client, user, error = %status.message(), "cannot check a password: auth is unreachable");
                self.principal = Principal::Refused {
                    reason: format!(
                        "the proxy cannot reach auth to check the password ({}); try again once auth is back",
                        status.message()
                    ),
                };
                Auth::Accept
            }
            Err(status) => {
                tracing::info!(client = %self.info.client, user, reason = %status.message(), "password login refused");
                Auth::reject()
            }
        }
    }
}

impl Handler for ProxyConnection {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if user == ANONYMOUS_USER {
            self.principal = Principal::Anonymous;
            return Ok(Auth::Accept);
        }
        Ok(Auth::reject())
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        Ok(self.check_password(user, password).await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        let Some(mut response) = response else {
            return Ok(Auth::Partial {
                name: "".into(),
                instructions: "".into(),
                prompts: vec![("Password: ".into(), false)].into(),
            });
        };
        let password = response
            .next()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Ok(self.check_password(user, &password).await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        _user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let fingerprints = match self.shared.view.user_ca_fingerprints().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(client = %self.info.client, error = %e, "cannot load the user CA");
                return Ok(Auth::reject());
            }
        };
        match verify_user_cert(certificate, &fingerprints, self.shared.clock.unix_now()) {
            Ok(identity) => {
                // A web console terminal comes in through this door from
                // the proxy's own host; its certificate (whose key never
                // leaves the proxy) names the browser, whom the audit names.
                if self.info.client.ip().is_loopback()
                    && let Some(browser) = certificate
                        .extensions()
                        .get(turnstile_api::identity::EXT_WEB_CLIENT)
                        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                {
                    self.info.client = browser;
                }
                let standing = match self.shared.view.locks_fresh_enough().await {
                    Ok(()) => {
                        self.shared
                            .view
                            .standing(&identity, None, None, self.shared.clock.unix_now())
                            .await
                    }
                    Err(reason) => Err(reason),
                };
                self.principal = match standing {
                    // What the user may do now, not what the certificate once said.
                    Ok(current) => Principal::Certificate {
                        identity: current,
                        certificate: Box::new(certificate.clone()),
                    },
                    Err(reason) => {
                        tracing::warn!(client = %self.info.client, user = %identity.user, %reason, "access denied after authentication");
                        self.refused(certificate, &reason);
                        Principal::Refused { reason }
                    }
                };
                Ok(Auth::Accept)
            }
            Err(reason) => {
                tracing::warn!(client = %self.info.client, %reason, "certificate refused");
                self.refused(certificate, &reason.to_string());
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        // The anonymous user proved nothing: it stays under the limits of
        // the unauthenticated, login_grace_time included.
        if !matches!(self.principal, Principal::Anonymous) {
            self.pre_auth.authenticated();
        }
        if let Principal::Certificate {
            identity,
            certificate,
        } = &self.principal
        {
            self.watch = Some(self.shared.live.watch(WatchRequest {
                identity: identity.clone(),
                login: String::new(),
                remote_addr: self.info.client.to_string(),
                cert_valid_before: Some(certificate.valid_before()),
                activity: Activity::new(),
                handle: session.handle(),
                channels: None,
            }));
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if matches!(self.principal, Principal::Nobody) {
            reply.reject(prohibited("not authenticated")).await;
            return Ok(());
        }
        let limits = &self.shared.config.pre_auth;
        let max_frame = if matches!(self.principal, Principal::Anonymous) {
            if self.channels_opened >= limits.anonymous_max_channels {
                reply
                    .reject(prohibited(format!(
                        "the anonymous user may open at most {} channels on a connection (anonymous_max_channels)",
                        limits.anonymous_max_channels
                    )))
                    .await;
                return Ok(());
            }
            limits.anonymous_max_frame
        } else {
            turnstile_api::door::MAX_FRAME
        };
        self.channels_opened += 1;
        reply.accept().await;
        let shared = self.shared.clone();
        let principal = self.principal.clone();
        let client = self.info.client;
        let handle = session.handle();
        self.shared.tasks.spawn(async move {
            serve_door(channel, handle, shared, principal, client, max_frame).await
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Principal::Refused { reason } = &self.principal {
            reply.reject(prohibited(reason.clone())).await;
            return Ok(());
        }
        let Principal::Certificate {
            identity,
            certificate: _,
        } = &self.principal
        else {
            reply
                .reject(prohibited(
                    "tunnels need a certificate: log in with `turnstile login` first",
                ))
                .await;
            return Ok(());
        };
        let node = match self.shared.view.find_node(host_to_connect).await {
            Ok(Some(node)) => node,
            Ok(None) => {
                reply
                    .reject(connect_failed(format!(
                        "node {host_to_connect:?} not found; try turnstile ls"
                    )))
                    .await;
                return Ok(());
            }
            Err(e) => {
                reply
                    .reject(connect_failed(format!(
                        "the proxy cannot look up node {host_to_connect:?}: {e}"
                    )))
                    .await;
                return Ok(());
            }
        };
        if let Err(reason) = self
            .shared
            .view
            .standing(
                identity,
                None,
                Some((&node.name, &node.id)),
                self.shared.clock.unix_now(),
            )
            .await
        {
            reply.reject(prohibited(reason)).await;
            return Ok(());
        }
        // In a proxy recording mode the proxy ends the user's connection and records it.
        let mode = match self.shared.view.session_recording().await {
            Ok(mode) => mode,
            Err(e) => {
                reply
                    .reject(connect_failed(format!(
                        "the proxy cannot tell how sessions are recorded: {e}"
                    )))
                    .await;
                return Ok(());
            }
        };
        if mode.at_proxy() {
            if let Err(reason) = self.shared.audit.admits_new_sessions() {
                tracing::error!(user = %identity.user, %reason, "session refused");
                reply.reject(connect_failed(reason)).await;
                return Ok(());
            }
            let host_cert = match super::terminate::node_host_cert(&self.shared, &node.name).await {
                Ok(c) => c,
                Err(e) => {
                    reply
                        .reject(connect_failed(format!(
                            "the proxy cannot record a session on node {:?}: {e}",
                            node.name
                        )))
                        .await;
                    return Ok(());
                }
            };
            tracing::info!(user = %identity.user, client = %self.info.client, node = %node.name, "recording session opened");
            reply.accept().await;
            let shared = self.shared.clone();
            let outer = identity.clone();
            let client = self.info.client;
            self.shared.tasks.spawn(super::terminate::serve(
                shared, channel, node, outer, client, host_cert,
            ));
            return Ok(());
        }
        let mut node = node;
        let mut connected = self.shared.dial_node(self.info.client, &node).await;
        if connected.is_err() {
            // The node may have restarted elsewhere since the view was cached.
            if self.shared.view.refresh().await.is_ok()
                && let Ok(Some(fresh)) = self.shared.view.find_node(host_to_connect).await
                && fresh.addr != node.addr
            {
                connected = self.shared.dial_node(self.info.client, &fresh).await;
                node = fresh;
            }
        }
        let mut tcp = match connected {
            Ok(tcp) => tcp,
            Err(why) => {
                reply
                    .reject(connect_failed(format!(
                        "node {:?} at {} {why}",
                        node.name, node.addr
                    )))
                    .await;
                return Ok(());
            }
        };
        tracing::info!(user = %identity.user, client = %self.info.client, node = %node.name, "tunnel opened");
        reply.accept().await;
        self.shared.tasks.spawn(async move {
            let mut stream = channel.into_stream();
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
        });
        Ok(())
    }
}

/// How long the door waits for a request before closing an idle channel.
pub(crate) const DOOR_IDLE: Duration = Duration::from_secs(60);
