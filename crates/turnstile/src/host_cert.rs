//! A node's or proxy's SSH host certificate: asked of auth at start, kept in
//! the data dir (so a restart while auth is down still has one), and renewed
//! at half its remaining life by a background task, which hands each new
//! certificate to the running server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use russh::keys::Certificate;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use turnstile_api::identity::SystemRole;
use turnstile_api::rpc::proto;
use turnstile_ssh::cluster_view::ClusterView;
use turnstile_ssh::identity::HostKeys;
use turnstile_ssh::node::HostCredentials;

/// What a host asks for: a proxy names itself; a node gives the name it is
/// configured with (bound to it at first join; auth decides its names) and
/// the address it advertises.
#[derive(Debug, Clone)]
pub enum HostRequest {
    Proxy { principals: Vec<String> },
    Node { name: String, addr: String },
}

/// The credentials a host runs with, and the name auth bound to it (a node's;
/// empty for a proxy, or when auth could not be asked).
pub struct Issued {
    pub credentials: HostCredentials,
    pub node_name: Option<String>,
}

/// When a certificate received at `now` is renewed: at half its remaining
/// life, at least a second from now.
pub fn renewal_due(cert: &Certificate, now: SystemTime) -> Duration {
    let until = UNIX_EPOCH + Duration::from_secs(cert.valid_before());
    until
        .duration_since(now)
        .unwrap_or_default()
        .div_f64(2.0)
        .max(Duration::from_secs(1))
}

/// Why auth gave no certificate: out of reach (`true`), or a refusal.
type Failure = (bool, String);

async fn ask(
    view: &ClusterView,
    keys: &HostKeys,
    request: &HostRequest,
) -> Result<(Certificate, String), Failure> {
    let public_key = keys
        .key
        .public_key()
        .to_openssh()
        .map_err(|e| (false, e.to_string()))?;
    let message = match request {
        HostRequest::Proxy { principals } => proto::GenerateHostCertRequest {
            public_key,
            principals: principals.clone(),
            ..Default::default()
        },
        HostRequest::Node { name, addr } => proto::GenerateHostCertRequest {
            public_key,
            node_name: name.clone(),
            addr: addr.clone(),
            ..Default::default()
        },
    };
    let resp = view
        .client()
        .generate_host_cert(message)
        .await
        .map_err(|s| {
            let unreachable = matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
            );
            (unreachable, s.message().to_string())
        })?
        .into_inner();
    let cert = Certificate::from_openssh(&resp.certificate).map_err(|e| {
        (
            false,
            format!("auth sent a certificate that cannot be read: {e}"),
        )
    })?;
    Ok((cert, resp.node_name))
}

/// Gets a fresh host certificate; falls back to the last one kept on disk
/// if auth cannot be reached (a refusal, such as a name bound to another
/// node, is never papered over). Spawns the renewal, which stops at `stop`.
pub async fn obtain(
    view: &Arc<ClusterView>,
    data_dir: &Path,
    role: SystemRole,
    request: HostRequest,
    stop: CancellationToken,
) -> anyhow::Result<Issued> {
    let mut keys = HostKeys::load_or_create(data_dir, role)?;
    let mut node_name = None;
    match ask(view, &keys, &request).await {
        Ok((cert, name)) => {
            keys.save_certificate(data_dir, role, cert)?;
            node_name = Some(name).filter(|n| !n.is_empty());
        }
        Err((true, message)) if keys.certificate.is_some() => {
            tracing::warn!(
                error = %message,
                "cannot renew the {role} host certificate from auth; using the one kept in the data dir until auth answers"
            );
        }
        Err((_, message)) => bail!("cannot get a {role} host certificate from auth: {message}"),
    }
    let certificate = keys.certificate.clone().context("no host certificate")?;
    let key = keys.key.clone();
    let (tx, rx) = watch::channel(certificate);
    tokio::spawn(renew(
        view.clone(),
        data_dir.to_path_buf(),
        role,
        request,
        keys,
        tx,
        stop,
    ));
    Ok(Issued {
        credentials: HostCredentials {
            key,
            certificate: rx,
        },
        node_name,
    })
}

async fn renew(
    view: Arc<ClusterView>,
    data_dir: PathBuf,
    role: SystemRole,
    request: HostRequest,
    mut keys: HostKeys,
    tx: watch::Sender<Certificate>,
    stop: CancellationToken,
) {
    let mut wait = renewal_due(&tx.borrow(), SystemTime::now());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match ask(&view, &keys, &request).await {
            Ok((cert, _)) => {
                wait = renewal_due(&cert, SystemTime::now());
                if let Err(e) = keys.save_certificate(&data_dir, role, cert.clone()) {
                    tracing::warn!(error = %e, "cannot keep the renewed {role} host certificate in the data dir");
                }
                tracing::debug!(
                    valid_before = cert.valid_before(),
                    "{role} host certificate renewed"
                );
                tx.send_replace(cert);
            }
            Err((_, message)) => {
                let left = renewal_due(&tx.borrow(), SystemTime::now());
                tracing::warn!(error = %message, "cannot renew the {role} host certificate; trying again");
                wait = left.min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_half_the_remaining_life() {
        let ca = turnstile_ssh::identity::generate_ed25519();
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut b = russh::keys::ssh_key::certificate::Builder::new(
            vec![0; 16],
            ca.public_key().key_data().clone(),
            1_000_000 - 60,
            1_000_000 + 86_400,
        )
        .unwrap();
        b.cert_type(russh::keys::ssh_key::certificate::CertType::Host)
            .unwrap();
        b.valid_principal("n").unwrap();
        let cert = b.sign(&ca).unwrap();
        assert_eq!(renewal_due(&cert, now), Duration::from_secs(43_200));
        let late = now + Duration::from_secs(90_000);
        assert_eq!(renewal_due(&cert, late), Duration::from_secs(1));
    }
}
