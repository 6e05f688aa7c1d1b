//! One SSH connection to a node: authenticates the user's certificate,
//! decides what the login may do here, and hands each accepted session channel
//! to its own task. A certificate that is not a valid credential of this
//! cluster fails authentication; a valid one whose roles do not allow this
//! login on this node authenticates, and every channel is then refused with
//! the reason, so the user reads why instead of "Permission denied".

use std::sync::Arc;

use russh::keys::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use turnstile_api::identity::UserIdentity;

use super::NodeShared;
use super::process::LocalUser;
use super::session::{SessionContext, serve_session};
use crate::server::ConnectionInfo;
use crate::user_cert::verify_user_cert;

/// What this connection may do, decided at authentication.
#[derive(Debug)]
enum Access {
    Pending,
    Allowed {
        identity: UserIdentity,
        local_user: LocalUser,
    },
    Denied {
        reason: String,
    },
}

pub struct NodeConnection {
    shared: Arc<NodeShared>,
    info: ConnectionInfo,
    access: Access,
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
            access: Access::Pending,
        }
    }

    async fn decide(&self, login: &str, cert: &Certificate) -> Result<Access, String> {
        let fingerprints = self
            .shared
            .view
            .user_ca_fingerprints()
            .await
            .map_err(|e| format!("cannot load the user CA: {e}"))?;
        let identity = verify_user_cert(cert, &fingerprints, self.shared.clock_unix())
            .map_err(|e| e.to_string())?;
        if !cert.valid_principals().iter().any(|p| p == login) {
            return Ok(Access::Denied {
                reason: format!(
                    "user {:?} may not log in as {login:?}; the certificate allows: {}",
                    identity.user,
                    cert.valid_principals().join(", ")
                ),
            });
        }
        let roles = match self.shared.view.role_set(&identity.roles).await {
            Ok(r) => r,
            Err(e) => {
                return Ok(Access::Denied {
                    reason: format!("cannot check the roles of user {:?}: {e}", identity.user),
                });
            }
        };
        if let Err(denied) = roles.check_login(
            &identity.user,
            login,
            &identity.logins,
            &self.shared.config.node_name,
            &self.shared.config.labels,
        ) {
            return Ok(Access::Denied { reason: denied.0 });
        }
        match LocalUser::lookup(login) {
            Ok(local_user) => Ok(Access::Allowed {
                identity,
                local_user,
            }),
            Err(reason) => Ok(Access::Denied { reason }),
        }
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
                if let Access::Denied { reason } = &access {
                    tracing::warn!(client = %self.info.client, login = user, %reason, "access denied after authentication");
                }
                self.access = access;
                Ok(Auth::Accept)
            }
            Err(reason) => {
                tracing::warn!(client = %self.info.client, login = user, %reason, "certificate refused");
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
        match &self.access {
            Access::Allowed {
                identity,
                local_user,
            } => {
                let ctx = SessionContext {
                    sid: uuid::Uuid::new_v4().to_string(),
                    user: identity.user.clone(),
                    local_user: local_user.clone(),
                    connection: self.info,
                };
                reply.accept().await;
                let handle = session.handle();
                self.shared.tasks.spawn(serve_session(channel, handle, ctx));
            }
            Access::Denied { reason } => reply.reject(prohibited(reason.clone())).await,
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
        if let Access::Denied { reason } = &self.access {
            reply.reject(prohibited(reason.clone())).await;
            return Ok(());
        }
        let Ok(port) = u16::try_from(port_to_connect) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        match tokio::net::TcpStream::connect((host_to_connect, port)).await {
            Ok(mut tcp) => {
                reply.accept().await;
                self.shared.tasks.spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                });
            }
            Err(e) => {
                reply
                    .reject(ChannelOpenFailure::Other {
                        code: 2,
                        reason: format!("connect to {host_to_connect}:{port}: {e}"),
                    })
                    .await;
            }
        }
        Ok(())
    }
}
