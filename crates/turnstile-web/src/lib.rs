//! The web console the proxy serves over HTTPS: a page of plain HTML, CSS
//! and JavaScript embedded in the binary, and a JSON API behind a session
//! cookie. Sessions live in auth's backend (so signing out, removing the
//! user or a lock ends them on every proxy); what a signed-in user may see
//! is decided by the rules the proxy's SSH subsystem uses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use turnstile_ssh::cluster_view::ClusterView;

mod api;
mod assets;
mod audit;
mod recordings;
mod session;
mod terminal;
pub mod tls;

pub use tls::CertSource;

/// The default idle timeout of a web session.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone)]
pub struct WebConfig {
    pub cert: CertSource,
    /// The proxy's own SSH door, which terminals connect through (an
    /// address its host certificate names).
    pub proxy_addr: String,
    /// A web session ends after this long without a request.
    pub idle_timeout: Duration,
}

/// What every request handler shares.
pub(crate) struct Shared {
    pub view: Arc<ClusterView>,
    pub proxy_addr: String,
    pub idle_timeout: Duration,
}

pub struct WebConsole {
    config: WebConfig,
    view: Arc<ClusterView>,
    tls: tls::Loaded,
}

impl WebConsole {
    /// Loads the certificate; an error names the setting and the fix.
    pub fn new(config: WebConfig, view: Arc<ClusterView>) -> Result<Self, tls::TlsError> {
        let tls = tls::load(&config.cert)?;
        Ok(Self { config, view, tls })
    }

    /// The SHA-256 fingerprint of the certificate the console presents.
    pub fn fingerprint(&self) -> &str {
        &self.tls.fingerprint
    }

    pub fn self_signed(&self) -> bool {
        self.tls.self_signed
    }

    /// Serves HTTPS on `listener` until `shutdown`.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let shared = Arc::new(Shared {
            view: self.view,
            proxy_addr: self.config.proxy_addr.clone(),
            idle_timeout: self.config.idle_timeout,
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.config);
        let tasks = TaskTracker::new();
        tracing::info!(addr = ?listener.local_addr().ok(), "web console listening");
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "web console accept failed");
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let router = api::router(shared.clone(), peer);
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "web console TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                serve_connection(tls, router, peer, shutdown).await;
            });
        }
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    }
}

async fn serve_connection<S>(
    stream: S,
    router: axum::Router,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "web console connection ended");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}
