//! Before the proxy tunnels a user to a node's registered address, that
//! address must answer SSH with the host key auth certified for the node: a
//! node cannot register someone else's address and have the proxy relay
//! users (or itself) into the network there. A probe is one SSH key
//! exchange, no authentication; an answer is trusted for a minute per
//! (address, key).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use russh::keys::ssh_key::public::KeyData;
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use tokio::net::TcpStream;

use crate::client;
use crate::cluster_view::NodeInfo;

/// How long a verified (address, host key) pair is trusted without probing.
const VERIFIED_FOR: Duration = Duration::from_secs(60);
/// How many verified pairs are kept (the oldest go first).
const MAX_VERIFIED: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct AddressProbes {
    verified: Mutex<HashMap<(String, String), Instant>>,
}

impl AddressProbes {
    fn fresh(&self, key: &(String, String)) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .get(key)
            .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
    }

    fn remember(&self, key: (String, String)) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= MAX_VERIFIED {
            verified.retain(|_, at| at.elapsed() < VERIFIED_FOR);
            if verified.len() >= MAX_VERIFIED
                && let Some(oldest) = verified
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| k.clone())
            {
                verified.remove(&oldest);
            }
        }
        verified.insert(key, Instant::now());
    }

    /// Checks that `node.addr` answers with `node.host_key` under a
    /// certificate of `host_ca` for the node's host id; says why not, in
    /// words that follow "node NAME at ADDR".
    pub async fn check(
        &self,
        node: &NodeInfo,
        host_ca: &[PublicKey],
        timeout: Duration,
    ) -> Result<(), String> {
        if node.host_key.is_empty() {
            return Err(
                "has no host key on record with auth (it has not had a host certificate from this version of auth); restart the node"
                    .into(),
            );
        }
        let registered = PublicKey::from_openssh(&node.host_key)
            .map_err(|e| format!("has an unreadable host key on record: {e}"))?;
        let pair = (node.addr.clone(), node.host_key.clone());
        if self.fresh(&pair) {
            return Ok(());
        }
        let presented = tokio::time::timeout(timeout, probe(&node.addr, &node.id, host_ca))
            .await
            .map_err(|_| "did not answer the proxy in time".to_string())??;
        if &presented != registered.key_data() {
            tracing::warn!(node = %node.name, addr = %node.addr, "the registered address answers with another host key; not connecting");
            return Err(
                "answers with a host key that is not the node's, so the proxy does not connect to it (the address may belong to another machine)"
                    .into(),
            );
        }
        self.remember(pair);
        Ok(())
    }
}

/// One key exchange with `addr`, checking a host certificate of `host_ca`
/// naming `host_id`; returns the certified key.
async fn probe(addr: &str, host_id: &str, host_ca: &[PublicKey]) -> Result<KeyData, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("is unreachable from the proxy: {e}"))?;
    let conn = client::open_probe(tcp, host_id, host_ca)
        .await
        .map_err(|e| match e {
            client::ClientError::HostRejected { reason, .. } => format!(
                "does not answer with the node's host certificate ({reason}), so the proxy does not connect to it"
            ),
            other => format!("does not answer SSH: {other}"),
        })?;
    let presented = conn.take_presented_host_key();
    let _ = conn
        .handle
        .disconnect(russh::Disconnect::ByApplication, "host key checked", "en")
        .await;
    match presented {
        Some(PublicKeyOrCertificate::Certificate(cert)) => Ok(cert.public_key().clone()),
        _ => Err("presented no host certificate".into()),
    }
}
