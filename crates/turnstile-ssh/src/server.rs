//! What the node and the proxy share as SSH servers: the russh config they
//! present (a host certificate, publickey authentication only) and the accept
//! loop that runs each connection on a task tracker and, at shutdown, stops
//! accepting, disconnects everyone, and drains within a grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{Certificate, PrivateKey};
use russh::server::Handler;
use russh::{MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use turnstile_api::clock::Clock;

use crate::cluster_view::ClusterView;
use crate::proxy_header::read_if_present;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The host key and the certificate auth signed for it.
#[derive(Debug, Clone)]
pub struct HostCredentials {
    pub key: PrivateKey,
    pub certificate: Certificate,
}

/// A russh server config presenting a host certificate and offering `methods`
/// (nodes: publickey only).
pub(crate) fn server_config(
    host: &HostCredentials,
    offered: &[MethodKind],
) -> russh::server::Config {
    let mut methods = MethodSet::empty();
    for m in offered {
        methods.push(*m);
    }
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

/// Where a connection comes from.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    /// The user's address: the TCP peer, or what a proxy's signed header says.
    pub client: SocketAddr,
    /// Our end of the TCP connection.
    pub local: SocketAddr,
    /// Did the connection come through a proxy of this cluster?
    pub via_proxy: bool,
}

/// How a server reads signed PROXY headers: only nodes do, and they check
/// them against the cluster's host CA.
pub(crate) struct HeaderPolicy {
    pub view: Arc<ClusterView>,
    pub clock: Arc<dyn Clock>,
}

/// How long to wait for the first byte that could start a PROXY header.
const HEADER_WAIT: Duration = Duration::from_secs(5);

async fn connection_info(
    stream: &mut TcpStream,
    peer: SocketAddr,
    policy: Option<&HeaderPolicy>,
) -> Result<ConnectionInfo, String> {
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let direct = ConnectionInfo {
        client: peer,
        local,
        via_proxy: false,
    };
    let Some(policy) = policy else {
        return Ok(direct);
    };
    match read_if_present(stream, HEADER_WAIT).await {
        Ok(None) => Ok(direct),
        Ok(Some(header)) => {
            let host_ca = policy
                .view
                .host_ca_fingerprints()
                .await
                .map_err(|e| e.to_string())?;
            let client = header
                .verify(&host_ca, policy.clock.unix_now())
                .map_err(|e| e.to_string())?;
            Ok(ConnectionInfo {
                client,
                local,
                via_proxy: true,
            })
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Accepts SSH connections until `shutdown`, one handler per connection from
/// `make_handler`; then stops accepting, lets the open connections finish
/// for up to `grace`, disconnects those still open (saying `who` shut down)
/// and waits a little more for `tasks` (connections and anything they
/// spawned) to write their last events.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    config: russh::server::Config,
    headers: Option<HeaderPolicy>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    grace: Duration,
    who: &'static str,
    make_handler: F,
) where
    H: Handler<Error = russh::Error> + Send + 'static,
    F: Fn(ConnectionInfo) -> H + Send + Sync + 'static,
{
    let config = Arc::new(config);
    let headers = headers.map(Arc::new);
    let make_handler = Arc::new(make_handler);
    let grace_over = CancellationToken::new();
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
        let mut stream = stream;
        let _ = stream.set_nodelay(true);
        let config = config.clone();
        let grace_over = grace_over.clone();
        let headers = headers.clone();
        let make_handler = make_handler.clone();
        tasks.spawn(async move {
            let info = match connection_info(&mut stream, peer, headers.as_deref()).await {
                Ok(info) => info,
                Err(reason) => {
                    tracing::warn!(%peer, %reason, "connection refused");
                    return;
                }
            };
            let handler = make_handler(info);
            let session = match russh::server::run_stream(config, stream, handler).await {
                Ok(session) => session,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "handshake failed");
                    return;
                }
            };
            let handle = session.handle();
            tokio::select! {
                r = session => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = grace_over.cancelled() => {
                    let reason = format!(
                        "the {who} shut down: its shutdown_grace of {} passed",
                        turnstile_api::duration::format(grace)
                    );
                    let _ = handle
                        .disconnect(russh::Disconnect::ByApplication, reason, String::new())
                        .await;
                }
            }
        });
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            "{who}: connections still open after shutdown_grace ({}); ending them",
            turnstile_api::duration::format(grace)
        );
        grace_over.cancel();
        if tokio::time::timeout(LAST_WORDS, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "{who}: connections did not end after their disconnect; stopping anyway"
            );
        }
    }
}

/// How long ended connections get to write their last events at shutdown.
const LAST_WORDS: Duration = Duration::from_secs(5);

/// Writes `text` on a session channel's stderr: the only way to tell the user
/// why a request OpenSSH sends without wanting a reply was refused.
pub(crate) fn tell_stderr(
    session: &mut russh::server::Session,
    channel: russh::ChannelId,
    text: &str,
) {
    let _ = session.extended_data(
        channel,
        1,
        bytes::Bytes::from(format!("{text}\r\n").into_bytes()),
    );
}
