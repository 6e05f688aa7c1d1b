//! The proxy service: the door users knock on. It authenticates users (by
//! certificate, or by password for `login` only), serves the `turnstile`
//! subsystem (`door.rs`), and opens `direct-tcpip` tunnels to registered nodes
//! only, by name, whatever port was asked for (OpenSSH's `-J` asks for 22),
//! telling the node the user's real address in a signed PROXY header. The
//! client runs its own SSH handshake with the node through the tunnel; the
//! proxy never sees the session's contents and is never an open relay.

use std::sync::Arc;
use std::time::Duration;

use russh::MethodKind;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use turnstile_api::clock::{Clock, SystemClock};

use std::net::SocketAddr;

use russh::keys::PrivateKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use turnstile_recording::recorder::Recorder;

use crate::audit_forwarder::AuditForwarder;
use crate::cluster_view::{ClusterView, NodeInfo, SessionEndings};
use crate::identity::generate_ed25519;
use crate::live::{Judge, LiveConnections, Watched, ends_by_itself};
use crate::proxy_header;
use crate::server::{HostCredentials, Listening, serve};

mod connection;
mod door;
mod probe;
mod terminate;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub host_id: String,
    /// How long to let tunnels finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// How long to wait for a node to accept the TCP connection.
    pub node_connect_timeout: Duration,
    /// Limits on connections before they authenticate.
    pub pre_auth: crate::pre_auth::PreAuthLimits,
}

pub(crate) struct ProxyShared {
    pub config: ProxyConfig,
    pub view: Arc<ClusterView>,
    pub host: HostCredentials,
    pub tasks: TaskTracker,
    pub clock: Arc<dyn Clock>,
    /// Recording in proxy modes.
    pub recorder: Arc<Recorder>,
    pub audit: Arc<AuditForwarder>,
    /// The key the proxy authenticates to nodes with, under certificates auth
    /// issues per session in proxy mode.
    pub session_key: Arc<PrivateKey>,
    /// Certificate holders' connections, checked every second against locks
    /// and the users' records.
    pub live: Arc<LiveConnections>,
    /// Registered addresses seen answering with their node's host key.
    pub probes: probe::AddressProbes,
}

/// The proxy ends certificate holders' connections for locks and user
/// records, and at certificate expiry; idleness is the node's to judge (it
/// sees the session channels).
impl Judge for ProxyShared {
    async fn why_end(&self, w: &Watched) -> Option<String> {
        let now = self.clock.unix_now();
        let current = match self.view.standing(&w.identity, None, None, now).await {
            Ok(current) => current,
            Err(reason) => return Some(reason),
        };
        let roles = match self.view.role_set(&current.roles).await {
            Ok(roles) => roles,
            Err(e) => {
                return Some(format!(
                    "cannot check the roles of user {:?}: {e}",
                    w.identity.user
                ));
            }
        };
        let endings = SessionEndings {
            idle_timeout: None,
            ..self.view.session_endings(&roles).await
        };
        ends_by_itself(w, endings, now)
    }
}

impl ProxyShared {
    /// Connects to a node, once its registered address has answered with
    /// the node's host key, and sends the signed header naming the user's
    /// address and the node it is meant for.
    pub async fn dial_node(
        &self,
        client: SocketAddr,
        node: &NodeInfo,
    ) -> Result<TcpStream, String> {
        let host_ca = self.view.host_ca_keys().await.map_err(|e| e.to_string())?;
        self.probes
            .check(node, &host_ca, self.config.node_connect_timeout)
            .await?;
        let addr = node.addr.as_str();
        let mut tcp =
            tokio::time::timeout(self.config.node_connect_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| "did not answer the proxy in time".to_string())?
                .map_err(|e| format!("is unreachable from the proxy: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let node_addr: SocketAddr = tcp.peer_addr().map_err(|e| e.to_string())?;
        let header = proxy_header::encode(
            client,
            node_addr,
            &node.id,
            &self.host.key,
            &self.host.certificate(),
            self.clock.unix_now(),
        )
        .map_err(|e| format!("cannot sign the client address: {e}"))?;
        tcp.write_all(&header)
            .await
            .map_err(|e| format!("dropped the connection: {e}"))?;
        Ok(tcp)
    }
}

pub struct ProxyService {
    config: ProxyConfig,
    view: Arc<ClusterView>,
    host: HostCredentials,
    recorder: Arc<Recorder>,
    audit: Arc<AuditForwarder>,
}

impl ProxyService {
    pub fn new(
        config: ProxyConfig,
        view: Arc<ClusterView>,
        host: HostCredentials,
        recorder: Arc<Recorder>,
        audit: Arc<AuditForwarder>,
    ) -> Self {
        Self {
            config,
            view,
            host,
            recorder,
            audit,
        }
    }

    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let shared = Arc::new(ProxyShared {
            config: self.config.clone(),
            view: self.view.clone(),
            host: self.host.clone(),
            tasks: TaskTracker::new(),
            clock: Arc::new(SystemClock),
            recorder: self.recorder.clone(),
            audit: self.audit.clone(),
            session_key: Arc::new(generate_ed25519()),
            live: LiveConnections::new(),
            probes: Default::default(),
        });
        let stopped = CancellationToken::new();
        shared.live.spawn_sweeper(
            shared.clone(),
            shared.audit.clone(),
            shared.config.host_id.clone(),
            stopped.clone(),
        );
        tracing::info!(addr = ?listener.local_addr().ok(), "proxy service listening");
        let for_handlers = shared.clone();
        let listening = Listening {
            host: self.host.clone(),
            methods: &[
                MethodKind::PublicKey,
                MethodKind::Password,
                MethodKind::KeyboardInteractive,
            ],
            headers: None,
            pre_auth: self.config.pre_auth.clone(),
            grace: self.config.shutdown_grace,
            who: "proxy",
        };
        serve(
            listener,
            listening,
            &shared.tasks,
            &shutdown,
            move |info, pre_auth| {
                connection::ProxyConnection::new(for_handlers.clone(), info, pre_auth)
            },
        )
        .await;
        stopped.cancel();
        tracing::info!("proxy service stopped");
        Ok(())
    }
}
