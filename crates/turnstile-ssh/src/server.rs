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
use crate::pre_auth::{Gatekeeper, PreAuth, PreAuthLimits};
use crate::proxy_header::read_if_present;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The host key and the certificate auth signed for it, which is renewed in
/// place (host certificates are short-lived): each new connection is
/// offered the newest.
#[derive(Debug, Clone)]
pub struct HostCredentials {
    pub key: PrivateKey,
    pub certificate: tokio::sync::watch::Receiver<Certificate>,
}

impl HostCredentials {
    /// Credentials whose certificate is never renewed.
    pub fn fixed(key: PrivateKey, certificate: Certificate) -> Self {
        Self {
            key,
            certificate: tokio::sync::watch::channel(certificate).1,
        }
    }

    /// The certificate as of now.
    pub fn certificate(&self) -> Certificate {
        self.certificate.borrow().clone()
    }
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
        certificates: vec![host.certificate()],
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        // Before authentication the gatekeeper's login_grace_time applies.
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
/// them against the cluster's proxy host CA.
pub(crate) struct HeaderPolicy {
    pub view: Arc<ClusterView>,
    pub clock: Arc<dyn Clock>,
    /// This node's host id: a header must name it.
    pub host_id: String,
    /// Headers already accepted, so none is accepted twice.
    pub seen: crate::proxy_header::SeenHeaders,
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
            let proxy_ca = policy
                .view
                .proxy_ca_fingerprints()
                .await
                .map_err(|e| e.to_string())?;
            let client = header
                .verify(
                    &proxy_ca,
                    policy.clock.unix_now(),
                    &policy.host_id,
                    &policy.seen,
                )
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

/// How a server takes connections: its host credentials and the methods it
/// offers, whether it reads PROXY headers (nodes), its limits before
/// authentication, and how it stops.
pub(crate) struct Listening {
    pub host: HostCredentials,
    pub methods: &'static [MethodKind],
    pub headers: Option<HeaderPolicy>,
    pub pre_auth: PreAuthLimits,
    /// How long open connections may finish at shutdown.
    pub grace: Duration,
    /// "node" or "proxy", for what users are told.
    pub who: &'static str,
}

/// Waits until `authenticated`, or for ever once `deadline` passes first.
async fn login_grace_over(deadline: tokio::time::Instant, authenticated: CancellationToken) {
    if tokio::time::timeout_at(deadline, authenticated.cancelled())
        .await
        .is_ok()
    {
        std::future::pending::<()>().await;
    }
}

/// Accepts SSH connections until `shutdown`, one handler per connection from
/// `make_handler` (given the connection's place among the unauthenticated,
/// to give back when it authenticates); then stops accepting, lets the open
/// connections finish for up to the grace, disconnects those still open
/// (saying who shut down) and waits a little more for `tasks` (connections
/// and anything they spawned) to write their last events.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    listening: Listening,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    make_handler: F,
) where
    H: Handler<Error = russh::Error> + Send + 'static,
    F: Fn(ConnectionInfo, PreAuth) -> H + Send + Sync + 'static,
{
    let Listening {
        mut host,
        methods,
        headers,
        pre_auth,
        grace,
        who,
    } = listening;
    let _ = host.certificate.borrow_and_update();
    let mut config = Arc::new(server_config(&host, methods));
    let headers = headers.map(Arc::new);
    let make_handler = Arc::new(make_handler);
    let grace_over = CancellationToken::new();
    let gatekeeper = Gatekeeper::new(pre_auth);
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
        if host.certificate.has_changed().unwrap_or(false) {
            let _ = host.certificate.borrow_and_update();
            config = Arc::new(server_config(&host, methods));
        }
        let mut stream = stream;
        let _ = stream.set_nodelay(true);
        let deadline = tokio::time::Instant::now() + gatekeeper.limits().login_grace_time;
        let pre_auth = match gatekeeper.admit(peer.ip()) {
            Ok(p) => p,
            Err(reason) => {
                // Lines before the SSH version are allowed (RFC 4253 4.2);
                // `ssh -v` shows this one.
                let _ = stream.try_write(format!("{reason}\r\n").as_bytes());
                tracing::debug!(%peer, %reason, "connection refused before authentication");
                continue;
            }
        };
        let header_timeout = gatekeeper.limits().proxy_header_timeout;
        let login_grace = gatekeeper.limits().login_grace_time;
        let config = config.clone();
        let grace_over = grace_over.clone();
        let headers = headers.clone();
        let make_handler = make_handler.clone();
        tasks.spawn(async move {
            let read = connection_info(&mut stream, peer, headers.as_deref());
            let info = match tokio::time::timeout(header_timeout, read).await {
                Ok(Ok(info)) => info,
                Ok(Err(reason)) => {
                    tracing::warn!(%peer, %reason, "connection refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "no complete PROXY header within proxy_header_timeout; connection closed");
                    return;
                }
            };
            if let Err(reason) = pre_auth.count_as(info.client.ip()) {
                tracing::debug!(%peer, client = %info.client, %reason, "connection refused before authentication");
                return;
            }
            let authenticated = pre_auth.authenticated_signal();
            let handler = make_handler(info, pre_auth);
            let cut = CancellationToken::new();
            let stream = Severable::new(stream, &cut);
            let started = russh::server::run_stream(config, stream, handler);
            let session = match tokio::time::timeout_at(deadline, started).await {
                Ok(Ok(session)) => session,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no SSH handshake within login_grace_time");
                    return;
                }
            };
            let handle = session.handle();
            let mut session = session;
            tokio::select! {
                r = &mut session => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = login_grace_over(deadline, authenticated) => {
                    let reason = format!(
                        "authentication did not finish within login_grace_time ({})",
                        turnstile_api::duration::format(login_grace)
                    );
                    tracing::info!(%peer, "{reason}; disconnected");
                    end_connection(&handle, &mut session, &cut, reason).await;
                }
                _ = grace_over.cancelled() => {
                    let reason = format!(
                        "the {who} shut down: its shutdown_grace of {} passed",
                        turnstile_api::duration::format(grace)
                    );
                    end_connection(&handle, &mut session, &cut, reason).await;
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

/// Ends a connection, telling the client `reason`; one that does not end
/// soon after (russh holds a disconnect back in the middle of a key
/// exchange) is cut.
async fn end_connection<F: std::future::Future + Unpin>(
    handle: &russh::server::Handle,
    session: &mut F,
    cut: &CancellationToken,
    reason: String,
) {
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, reason, String::new())
        .await;
    if tokio::time::timeout(LAST_WORDS / 5, &mut *session)
        .await
        .is_err()
    {
        cut.cancel();
        let _ = tokio::time::timeout(LAST_WORDS, session).await;
    }
}

/// A connection's TCP stream that the server can cut: once `cut` is
/// cancelled every read and write fails, so the SSH session ends and the
/// socket closes whatever state the session is in.
struct Severable {
    stream: TcpStream,
    cut: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    severed: bool,
}

impl Severable {
    fn new(stream: TcpStream, cut: &CancellationToken) -> Self {
        Self {
            stream,
            cut: Box::pin(cut.clone().cancelled_owned()),
            severed: false,
        }
    }

    /// An error once the stream is cut.
    fn check(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        if !self.severed && self.cut.as_mut().poll(cx).is_ready() {
            self.severed = true;
        }
        if self.severed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection was cut",
            ));
        }
        Ok(())
    }
}

impl tokio::io::AsyncRead for Severable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Severable {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
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
