//! The node service: an SSH server that runs shells and commands in real PTYs
//! for users holding a certificate of the cluster, registers itself with auth
//! and keeps heartbeating while it runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{Certificate, PrivateKey};
use russh::{MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use turnstile_api::clock::{Clock, SystemClock};
use turnstile_api::labels::Labels;
use turnstile_api::rpc::proto;

use crate::cluster_view::ClusterView;

mod connection;
mod process;
mod session;

pub(crate) use connection::prohibited;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub host_id: String,
    pub node_name: String,
    pub labels: Labels,
    /// What the node advertises; `None`: the bound address.
    pub public_addr: Option<String>,
    pub heartbeat_interval: Duration,
    /// How long to let sessions finish after shutdown begins.
    pub shutdown_grace: Duration,
}

pub(crate) struct NodeShared {
    pub config: NodeConfig,
    pub view: Arc<ClusterView>,
    pub tasks: TaskTracker,
    pub clock: Arc<dyn Clock>,
}

impl NodeShared {
    pub fn clock_unix(&self) -> u64 {
        self.clock.unix_now()
    }
}

/// The host key and the certificate auth signed for it.
#[derive(Debug, Clone)]
pub struct HostCredentials {
    pub key: PrivateKey,
    pub certificate: Certificate,
}

/// Builds a russh server config presenting a host certificate and accepting
/// publickey (certificate) authentication only.
pub(crate) fn server_config(host: &HostCredentials) -> russh::server::Config {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    russh::server::Config {
        methods,
        keys: vec![host.key.clone()],
        certificates: vec![host.certificate.clone()],
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: Some(Duration::from_secs(3600)),
        keepalive_interval: Some(Duration::from_secs(30)),
        nodelay: true,
        ..Default::default()
    }
}

pub struct NodeService {
    config: NodeConfig,
    view: Arc<ClusterView>,
    host: HostCredentials,
}

/// The address a service advertises: `public_addr`, else the bound one.
pub fn advertised_addr(public_addr: Option<&str>, bound: SocketAddr) -> String {
    public_addr.map_or_else(|| bound.to_string(), str::to_string)
}

impl NodeService {
    pub fn new(config: NodeConfig, view: Arc<ClusterView>, host: HostCredentials) -> Self {
        Self { config, view, host }
    }

    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let bound = listener.local_addr()?;
        let advertised = advertised_addr(self.config.public_addr.as_deref(), bound);
        let shared = Arc::new(NodeShared {
            config: self.config.clone(),
            view: self.view.clone(),
            tasks: TaskTracker::new(),
            clock: Arc::new(SystemClock),
        });
        let heartbeat = tokio::spawn(heartbeat(
            shared.clone(),
            advertised.clone(),
            shutdown.clone(),
        ));
        let server_config = Arc::new(server_config(&self.host));
        tracing::info!(node = %self.config.node_name, %advertised, "node service listening");
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let handler = connection::NodeConnection::new(shared.clone(), Some(peer));
            let config = server_config.clone();
            let conn_shutdown = shutdown.clone();
            shared.tasks.spawn(async move {
                match russh::server::run_stream(config, stream, handler).await {
                    Ok(session) => {
                        let handle = session.handle();
                        tokio::select! {
                            r = session => {
                                if let Err(e) = r {
                                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                                }
                            }
                            _ = conn_shutdown.cancelled() => {
                                let _ = handle
                                    .disconnect(russh::Disconnect::ByApplication, "node shutting down".into(), String::new())
                                    .await;
                            }
                        }
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "handshake failed"),
                }
            });
        }
        heartbeat.abort();
        shared.tasks.close();
        if tokio::time::timeout(self.config.shutdown_grace, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "sessions still running after the shutdown grace period; stopping anyway"
            );
        }
        tracing::info!("node service stopped");
        Ok(())
    }
}

/// Registers the node with auth now and every `heartbeat_interval`.
async fn heartbeat(shared: Arc<NodeShared>, advertised: String, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let mut client = shared.view.client();
        let node = proto::Node {
            id: shared.config.host_id.clone(),
            name: shared.config.node_name.clone(),
            addr: advertised.clone(),
            labels: shared.config.labels.clone().into_iter().collect(),
            expires_unix: 0,
        };
        match client.upsert_node(node).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("node registration with auth restored");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e.message(), "cannot register the node with auth; will retry");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(shared.config.heartbeat_interval) => {}
        }
    }
}
