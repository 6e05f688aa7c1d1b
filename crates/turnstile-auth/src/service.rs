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
use crate::change_feed::ChangeFeed;
use crate::recordings::{Completion, Recordings, upload_event};
use crate::rpc::{AuthApi, PresencePolicy};
use turnstile_recording::storage::UploadStore;

#[derive(Debug, Clone)]
pub struct AuthServiceConfig {
    /// This auth server's host id (the CN of its TLS certificate).
    pub host_id: String,
    /// A node that stops heartbeating disappears after this long.
    pub node_ttl: Duration,
    /// Where recordings are stored.
    pub store: Arc<dyn UploadStore>,
    /// An upload whose recorder has been silent this long is completed.
    pub upload_grace: Duration,
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
        let recordings = Arc::new(
            Recordings::new(
                self.authority.backend().clone(),
                self.config.store.clone(),
                self.authority.clock().clone(),
            )
            .with_grace(self.config.upload_grace),
        );
        tokio::spawn(complete_abandoned(
            recordings.clone(),
            self.authority.clone(),
            self.config.upload_grace,
            shutdown.clone(),
        ));
        let api = AuthApi::new(
            self.authority.clone(),
            PresencePolicy {
                node_ttl: self.config.node_ttl,
            },
            recordings,
            ChangeFeed::start(self.authority.backend().clone(), shutdown.clone()),
            shutdown.clone(),
        );
        tracing::info!(addr = ?listener.local_addr().ok(), "auth service listening");
        // Small RPCs must not wait for Nagle's algorithm (40 ms stalls under load).
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            conn.inspect(|stream| {
                let _ = stream.set_nodelay(true);
            })
        });
        Server::builder()
            // A recorder's connection carries a stream per session (1,000 and
            // more): a stream read late must not use up the whole
            // connection's window (1 MiB by default) and stall the others.
            // Each stream keeps its own window (1 MiB), so memory stays bounded
            // by what is actually in flight.
            .initial_connection_window_size(CONNECTION_WINDOW)
            .tls_config(tls)?
            .add_service(AuthServer::new(api))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await?;
        tracing::info!("auth service stopped");
        Ok(())
    }
}

/// The HTTP/2 flow-control window of one connection to auth, all its
/// streams together.
const CONNECTION_WINDOW: u32 = 16 << 20;

/// The upload completer: finishes uploads whose recorder has been silent for
/// the grace period (its node crashed, or its session was abandoned), with
/// the parts stored so far. A recorder that comes back later continues the
/// same recording.
async fn complete_abandoned(
    recordings: Arc<Recordings>,
    authority: Arc<Authority>,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let every = (grace / 4).clamp(Duration::from_millis(200), Duration::from_secs(60));
    match recordings.index_uploads().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(uploads = n, "gave uploads in progress their keys"),
        Err(e) => tracing::warn!(error = %e, "cannot index the uploads in progress"),
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let abandoned = match recordings.abandoned(grace).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list uploads in progress");
                continue;
            }
        };
        for rec in abandoned {
            match recordings.complete_open(&rec.sid, None).await {
                Ok(Completion::Done(done)) => {
                    tracing::info!(sid = %done.sid, parts = rec.parts.len(), "completed an abandoned recording");
                    authority.record(upload_event(&done)).await;
                }
                // Completed, or being completed, by another auth server.
                Ok(Completion::AlreadyComplete(_) | Completion::ClaimedElsewhere) => {}
                Err(e) => {
                    tracing::warn!(sid = %rec.sid, error = %e, "cannot complete an abandoned recording")
                }
            }
        }
    }
}
