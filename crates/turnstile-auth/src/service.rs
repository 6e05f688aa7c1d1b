//! Runs the auth service: the gRPC API on mutual TLS over a listener it is
//! given, until the shutdown token fires.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use turnstile_api::identity::SystemRole;
use turnstile_api::rpc::AuthServer;

use crate::authority::Authority;
use crate::rpc::{AuthApi, PresencePolicy};

#[derive(Debug, Clone)]
pub struct AuthServiceConfig {
    /// This auth server's host id (the CN of its TLS certificate).
    pub host_id: String,
    /// A node that stops heartbeating disappears after this long.
    pub node_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthServiceError {
    #[error("cannot issue the auth server's TLS certificate: {0}")]
    Identity(String),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[derive(Debug)]
pub struct AuthService {
    authority: Arc<Authority>,
    config: AuthServiceConfig,
}

impl AuthService {
    pub fn new(authority: Arc<Authority>, config: AuthServiceConfig) -> Self {
        Self { authority, config }
    }

    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), AuthServiceError> {
        let server_identity = self
            .authority
            .issue_tls(SystemRole::Auth, &self.config.host_id, None)
            .map_err(|e| AuthServiceError::Identity(e.to_string()))?;
        let tls = ServerTlsConfig::new()
            // The chain carries the CA too, so a joining process can check it
            // against its pin before it trusts anything.
            .identity(Identity::from_pem(
                format!(
                    "{}{}",
                    server_identity.cert_pem,
                    self.authority.tls_ca().cert_pem
                ),
                server_identity.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.authority.tls_ca().cert_pem))
            // Joining processes call before they have a certificate; every
            // other call checks for one.
            .client_auth_optional(true);
        let api = AuthApi::new(
            self.authority.clone(),
            PresencePolicy {
                node_ttl: self.config.node_ttl,
            },
        );
        tracing::info!(addr = ?listener.local_addr().ok(), "auth service listening");
        // Small RPCs must not wait for Nagle's algorithm (40 ms stalls under load).
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            conn.inspect(|stream| {
                let _ = stream.set_nodelay(true);
            })
        });
        Server::builder()
            .tls_config(tls)?
            .add_service(AuthServer::new(api))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await?;
        tracing::info!("auth service stopped");
        Ok(())
    }
}
