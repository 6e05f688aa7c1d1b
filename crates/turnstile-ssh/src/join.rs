//! Joining a cluster with a token: the first conversation a node or proxy has
//! with auth, before it holds any certificate. It trusts the auth server only
//! if the CA in the server's TLS chain matches the pin from the operator, then
//! asks for TLS identities under the token and keeps them in its data dir.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use turnstile_api::identity::SystemRole;
use turnstile_api::pin;
use turnstile_api::rpc::{AUTH_SERVER_NAME, AuthClient, proto};

use crate::identity::{IdentityError, TlsIdentity, identity_root, write_file};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot reach the auth server at {addr}: {message}")]
    Unreachable { addr: String, message: String },
    #[error(
        "the auth server at {addr} is not the cluster you pinned: its CA pin is {found}, the config says {expected}; check turnstile.ca_pin"
    )]
    PinMismatch {
        addr: String,
        found: String,
        expected: String,
    },
    #[error("the auth server refused to let this process join: {0}")]
    Refused(String),
    #[error("joining failed: {0}")]
    Other(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Accepts whatever certificate the server shows and keeps the chain: only to
/// read the CA out of it. Nothing secret is sent on this connection.
#[derive(Debug)]
struct CaptureChain {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CaptureChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        chain.push(end_entity.clone().into_owned());
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Fetches the auth server's TLS chain and returns the CA certificate (PEM)
/// whose pin is `expected_pin`.
pub async fn fetch_pinned_ca(addr: &str, expected_pin: &str) -> Result<String, JoinError> {
    let unreachable = |message: String| JoinError::Unreachable {
        addr: addr.to_string(),
        message,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let capture = Arc::new(CaptureChain {
        chain: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JoinError::Other(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| unreachable("timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let name =
        ServerName::try_from(AUTH_SERVER_NAME).map_err(|e| JoinError::Other(e.to_string()))?;
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| unreachable("the TLS handshake timed out".into()))?
    .map_err(|e| unreachable(format!("TLS handshake: {e}")))?;
    let chain = capture
        .chain
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut found = Vec::new();
    for cert in &chain {
        if let Ok(p) = pin::ca_pin_of_der(cert) {
            if pin::matches(&p, expected_pin) {
                return Ok(to_pem(cert));
            }
            found.push(p);
        }
    }
    Err(JoinError::PinMismatch {
        addr: addr.to_string(),
        found: found.last().cloned().unwrap_or_else(|| "unknown".into()),
        expected: expected_pin.to_string(),
    })
}

/// What a joined process received.
#[derive(Debug)]
pub struct JoinedProcess {
    pub host_id: String,
    pub identities: Vec<(SystemRole, TlsIdentity)>,
}

/// Joins the cluster at `addr` as `roles` with `token`, checking the auth
/// server against `expected_pin`, and saves the identities and host id in
/// `data_dir`.
pub async fn join(
    addr: &str,
    token: &str,
    expected_pin: &str,
    roles: &[SystemRole],
    data_dir: &Path,
) -> Result<JoinedProcess, JoinError> {
    let ca_pem = fetch_pinned_ca(addr, expected_pin).await?;
    let mut keys = Vec::new();
    let mut requests = Vec::new();
    for role in roles {
        let key = rcgen::KeyPair::generate().map_err(|e| JoinError::Other(e.to_string()))?;
        requests.push(proto::JoinIdentityRequest {
            role: role.to_string(),
            tls_public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        });
        keys.push((*role, key));
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name(AUTH_SERVER_NAME);
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| JoinError::Other(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| JoinError::Other(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| JoinError::Unreachable {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
    let response = AuthClient::new(channel)
        .join(proto::JoinRequest {
            token: token.to_string(),
            identities: requests,
        })
        .await
        .map_err(|s| JoinError::Refused(s.message().to_string()))?
        .into_inner();
    let mut identities = Vec::new();
    for (role, key) in keys {
        let cert = response
            .identities
            .iter()
            .find(|i| i.role == role.as_str())
            .ok_or_else(|| JoinError::Other(format!("auth sent no {role} identity")))?;
        let identity = TlsIdentity {
            cert_pem: cert.tls_cert_pem.clone(),
            key_pem: key.serialize_pem(),
            ca_pem: response.tls_ca_pem.clone(),
        };
        identity.save(data_dir, role)?;
        identities.push((role, identity));
    }
    write_file(
        &identity_root(data_dir).join("host_id"),
        response.host_id.as_bytes(),
        0o644,
    )?;
    Ok(JoinedProcess {
        host_id: response.host_id,
        identities,
    })
}
