//! The proxy service: the door users knock on. It authenticates the user's
//! certificate and opens `direct-tcpip` tunnels to registered nodes only, by
//! name, whatever port was asked for (OpenSSH's `-J` asks for 22). The client
//! runs its own SSH handshake with the node through the tunnel; the proxy never
//! sees the session's contents and is never an open relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use turnstile_api::clock::{Clock, SystemClock};
use turnstile_api::identity::UserIdentity;

use crate::cluster_view::ClusterView;
use crate::node::prohibited;
use crate::server::{HostCredentials, serve};
use crate::user_cert::verify_user_cert;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub host_id: String,
    /// How long to let tunnels finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// How long to wait for a node to accept the TCP connection.
    pub node_connect_timeout: Duration,
}

struct ProxyShared {
    config: ProxyConfig,
    view: Arc<ClusterView>,
    tasks: TaskTracker,
    clock: Arc<dyn Clock>,
}

pub struct ProxyService {
    config: ProxyConfig,
    view: Arc<ClusterView>,
    host: HostCredentials,
}

/// Whose fault a refused tunnel is, for the message the user reads.
fn connect_failed(reason: String) -> ChannelOpenFailure {
    ChannelOpenFailure::Other { code: 2, reason }
}

impl ProxyService {
    pub fn new(config: ProxyConfig, view: Arc<ClusterView>, host: HostCredentials) -> Self {
        Self { config, view, host }
    }

    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let shared = Arc::new(ProxyShared {
            config: self.config.clone(),
            view: self.view.clone(),
            tasks: TaskTracker::new(),
            clock: Arc::new(SystemClock),
        });
        tracing::info!(addr = ?listener.local_addr().ok(), "proxy service listening");
        serve(
            listener,
            &self.host,
            &shared.tasks,
            &shutdown,
            self.config.shutdown_grace,
            "proxy",
            |peer| ProxyConnection {
                shared: shared.clone(),
                peer,
                identity: None,
            },
        )
        .await;
        tracing::info!("proxy service stopped");
        Ok(())
    }
}

struct ProxyConnection {
    shared: Arc<ProxyShared>,
    peer: SocketAddr,
    identity: Option<UserIdentity>,
}

impl Handler for ProxyConnection {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        _user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let fingerprints = match self.shared.view.user_ca_fingerprints().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "cannot load the user CA");
                return Ok(Auth::reject());
            }
        };
        match verify_user_cert(certificate, &fingerprints, self.shared.clock.unix_now()) {
            Ok(identity) => {
                self.identity = Some(identity);
                Ok(Auth::Accept)
            }
            Err(reason) => {
                tracing::warn!(peer = %self.peer, %reason, "certificate refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(prohibited(
                "the proxy runs no shells; reach a node through it (turnstile ssh NODE, or ssh -J PROXY NODE)",
            ))
            .await;
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
        let Some(identity) = &self.identity else {
            reply.reject(prohibited("not authenticated")).await;
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
        let connect = tokio::time::timeout(
            self.shared.config.node_connect_timeout,
            TcpStream::connect(node.addr.as_str()),
        )
        .await;
        let mut tcp = match connect {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                reply
                    .reject(connect_failed(format!(
                        "node {:?} at {} is unreachable from the proxy: {e}",
                        node.name, node.addr
                    )))
                    .await;
                return Ok(());
            }
            Err(_) => {
                reply
                    .reject(connect_failed(format!(
                        "node {:?} at {} did not answer the proxy in time",
                        node.name, node.addr
                    )))
                    .await;
                return Ok(());
            }
        };
        let _ = tcp.set_nodelay(true);
        tracing::info!(user = %identity.user, peer = %self.peer, node = %node.name, "tunnel opened");
        reply.accept().await;
        self.shared.tasks.spawn(async move {
            let mut stream = channel.into_stream();
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
        });
        Ok(())
    }
}
