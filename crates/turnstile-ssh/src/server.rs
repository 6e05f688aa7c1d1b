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
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The host key and the certificate auth signed for it.
#[derive(Debug, Clone)]
pub struct HostCredentials {
    pub key: PrivateKey,
    pub certificate: Certificate,
}

/// A russh server config presenting a host certificate and accepting
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

/// Accepts SSH connections until `shutdown`, one handler per connection from
/// `make_handler`, then disconnects them (saying `who` is shutting down) and
/// waits up to `grace` for `tasks` (connections and anything they spawned).
pub(crate) async fn serve<H>(
    listener: TcpListener,
    host: &HostCredentials,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    grace: Duration,
    who: &'static str,
    mut make_handler: impl FnMut(SocketAddr) -> H,
) where
    H: Handler<Error = russh::Error> + Send + 'static,
{
    let config = Arc::new(server_config(host));
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
        let handler = make_handler(peer);
        let config = config.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
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
                _ = shutdown.cancelled() => {
                    let _ = handle
                        .disconnect(russh::Disconnect::ByApplication, format!("{who} shutting down"), String::new())
                        .await;
                }
            }
        });
    }
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            "{who}: connections still open after the shutdown grace period; stopping anyway"
        );
    }
}
