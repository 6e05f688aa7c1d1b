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

use crate::cluster_view::ClusterView;
use crate::server::{HostCredentials, serve, server_config};

mod connection;
mod door;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub host_id: String,
    /// How long to let tunnels finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// How long to wait for a node to accept the TCP connection.
    pub node_connect_timeout: Duration,
}

pub(crate) struct ProxyShared {
    pub config: ProxyConfig,
    pub view: Arc<ClusterView>,
    pub host: HostCredentials,
    pub tasks: TaskTracker,
    pub clock: Arc<dyn Clock>,
}

pub struct ProxyService {
    config: ProxyConfig,
    view: Arc<ClusterView>,
    host: HostCredentials,
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
            host: self.host.clone(),
            tasks: TaskTracker::new(),
            clock: Arc::new(SystemClock),
        });
        tracing::info!(addr = ?listener.local_addr().ok(), "proxy service listening");
        let methods = [
            MethodKind::PublicKey,
            MethodKind::Password,
            MethodKind::KeyboardInteractive,
        ];
        let for_handlers = shared.clone();
        serve(
            listener,
            server_config(&self.host, &methods),
            None,
            &shared.tasks,
            &shutdown,
            self.config.shutdown_grace,
            "proxy",
            move |info| connection::ProxyConnection::new(for_handlers.clone(), info),
        )
        .await;
        tracing::info!("proxy service stopped");
        Ok(())
    }
}
