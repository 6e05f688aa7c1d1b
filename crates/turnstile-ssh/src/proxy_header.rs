//! Telling a node the client's real address: the proxy sends a PROXY protocol
//! v2 header before the tunnelled SSH bytes, with a TLV (type 0xE0) carrying
//! the proxy's host certificate and its signature over the addresses, the
//! time, the target node's host id and a random nonce. A node believes a
//! header only if the certificate is from the cluster's host CA, marks a
//! proxy, the signature is fresh, the header names this node, and its nonce
//! was not seen before; anyone else connecting straight to a node cannot
//! claim an address, nor replay a header a proxy sent to another node.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use russh::keys::signature::{Signer, Verifier};
use russh::keys::ssh_encoding::Encode;
use russh::keys::ssh_key::Fingerprint;
use russh::keys::ssh_key::Signature;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Certificate, PrivateKey};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use turnstile_api::identity::{EXT_HOST_ROLE, SystemRole};

const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
const TLV_TURNSTILE: u8 = 0xE0;
const SIGNED_PREFIX: &[u8] = b"turnstile-proxy-header-v2";
/// The version of the TLV's layout (1: before headers named their node).
const TLV_VERSION: u8 = 2;
/// The most nonces a node remembers (headers of the last two minutes).
const MAX_SEEN: usize = 100_000;
const MAX_HEADER: usize = 8192;
/// How old (or how far in the future) a signed header may be.
pub const MAX_SKEW: u64 = 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("the PROXY header is not signed by a proxy of this cluster: {0}")]
    Untrusted(&'static str),
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn address_block(client: SocketAddr, node: SocketAddr) -> (u8, Vec<u8>) {
    let mut block = Vec::new();
    match (client.ip(), node.ip()) {
        (IpAddr::V4(c), IpAddr::V4(n)) => {
            block.extend_from_slice(&c.octets());
            block.extend_from_slice(&n.octets());
            block.extend_from_slice(&client.port().to_be_bytes());
            block.extend_from_slice(&node.port().to_be_bytes());
            (0x11, block)
        }
        (c, n) => {
            block.extend_from_slice(&to_v6(c).octets());
            block.extend_from_slice(&to_v6(n).octets());
            block.extend_from_slice(&client.port().to_be_bytes());
            block.extend_from_slice(&node.port().to_be_bytes());
            (0x21, block)
        }
    }
}

fn signed_message(
    family: u8,
    block: &[u8],
    timestamp: u64,
    nonce: &[u8; 16],
    target: &str,
) -> Vec<u8> {
    let mut m = SIGNED_PREFIX.to_vec();
    m.push(family);
    m.extend_from_slice(block);
    m.extend_from_slice(&timestamp.to_be_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(&u16::try_from(target.len()).unwrap_or(0).to_be_bytes());
    m.extend_from_slice(target.as_bytes());
    m
}

/// The header a proxy sends before tunnelling `client`'s bytes to `node`,
/// the node whose host id is `target`.
pub fn encode(
    client: SocketAddr,
    node: SocketAddr,
    target: &str,
    proxy_key: &PrivateKey,
    proxy_cert: &Certificate,
    now: u64,
) -> Result<Vec<u8>, String> {
    let (family, block) = address_block(client, node);
    let nonce: [u8; 16] = rand::random();
    let signature: Signature = proxy_key
        .try_sign(&signed_message(family, &block, now, &nonce, target))
        .map_err(|e| e.to_string())?;
    let mut sig_bytes = Vec::new();
    signature
        .encode(&mut sig_bytes)
        .map_err(|e| e.to_string())?;
    let cert_bytes = proxy_cert.to_bytes().map_err(|e| e.to_string())?;
    let mut value = vec![TLV_VERSION];
    value.extend_from_slice(&now.to_be_bytes());
    value.extend_from_slice(&nonce);
    value.extend_from_slice(
        &u16::try_from(target.len())
            .map_err(|_| "host id too long")?
            .to_be_bytes(),
    );
    value.extend_from_slice(target.as_bytes());
    value.extend_from_slice(&u32::try_from(cert_bytes.len()).unwrap_or(0).to_be_bytes());
    value.extend_from_slice(&cert_bytes);
    value.extend_from_slice(&u32::try_from(sig_bytes.len()).unwrap_or(0).to_be_bytes());
    value.extend_from_slice(&sig_bytes);
    let mut tlv = vec![TLV_TURNSTILE];
    tlv.extend_from_slice(
        &u16::try_from(value.len())
            .map_err(|_| "header too large")?
            .to_be_bytes(),
    );
    tlv.extend_from_slice(&value);
    let mut out = SIGNATURE.to_vec();
    out.push(0x21);
    out.push(family);
    out.extend_from_slice(
        &u16::try_from(block.len() + tlv.len())
            .map_err(|_| "header too large")?
            .to_be_bytes(),
    );
    out.extend_from_slice(&block);
    out.extend_from_slice(&tlv);
    Ok(out)
}

/// A header as read, before it is trusted.
#[derive(Debug, Clone)]
pub struct ProxyHeader {
    pub client: SocketAddr,
    family: u8,
    block: Vec<u8>,
    timestamp: u64,
    nonce: [u8; 16],
    /// The host id of the node the proxy meant it for.
    target: String,
    cert: Option<Certificate>,
    signature: Option<Signature>,
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], HeaderError> {
    if buf.len() < n {
        return Err(HeaderError::Malformed("truncated"));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn be_u32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// Parses the part after the 16-byte preamble.
pub fn parse(family: u8, mut body: &[u8]) -> Result<ProxyHeader, HeaderError> {
    let block_len = match family {
        0x11 => 12,
        0x21 => 36,
        _ => return Err(HeaderError::Malformed("unsupported address family")),
    };
    let block = take(&mut body, block_len)?.to_vec();
    let client = if family == 0x11 {
        SocketAddr::new(
            IpAddr::from([block[0], block[1], block[2], block[3]]),
            u16::from_be_bytes([block[8], block[9]]),
        )
    } else {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&block[..16]);
        let ip = Ipv6Addr::from(octets);
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        SocketAddr::new(ip, u16::from_be_bytes([block[32], block[33]]))
    };
    let mut header = ProxyHeader {
        client,
        family,
        block,
        timestamp: 0,
        nonce: [0; 16],
        target: String::new(),
        cert: None,
        signature: None,
    };
    while !body.is_empty() {
        let t = take(&mut body, 3)?;
        let (kind, len) = (t[0], u16::from_be_bytes([t[1], t[2]]) as usize);
        let mut value = take(&mut body, len)?;
        if kind != TLV_TURNSTILE {
            continue;
        }
        match take(&mut value, 1)?[0] {
            TLV_VERSION => {}
            1 => {
                return Err(HeaderError::Malformed(
                    "it is an older proxy's (it does not name its node); upgrade the proxy",
                ));
            }
            _ => return Err(HeaderError::Malformed("unknown TLV version")),
        }
        let ts = take(&mut value, 8)?;
        header.timestamp = u64::from_be_bytes(ts.try_into().unwrap_or([0; 8]));
        header.nonce = take(&mut value, 16)?.try_into().unwrap_or([0; 16]);
        let target_len = u16::from_be_bytes(take(&mut value, 2)?.try_into().unwrap_or([0; 2]));
        header.target = String::from_utf8(take(&mut value, target_len as usize)?.to_vec())
            .map_err(|_| HeaderError::Malformed("bad host id"))?;
        let cert_len = be_u32(take(&mut value, 4)?);
        let cert = Certificate::from_bytes(take(&mut value, cert_len)?)
            .map_err(|_| HeaderError::Malformed("bad certificate"))?;
        let sig_len = be_u32(take(&mut value, 4)?);
        let signature = Signature::try_from(take(&mut value, sig_len)?)
            .map_err(|_| HeaderError::Malformed("bad signature"))?;
        header.cert = Some(cert);
        header.signature = Some(signature);
    }
    Ok(header)
}

impl ProxyHeader {
    /// Checks the header was signed by a proxy of the cluster (its
    /// certificate from the proxy host CA `proxy_ca`), recently, for the node
    /// whose host id is `me`, and was not seen before by `seen`.
    pub fn verify(
        &self,
        proxy_ca: &[Fingerprint],
        now: u64,
        me: &str,
        seen: &SeenHeaders,
    ) -> Result<SocketAddr, HeaderError> {
        let (Some(cert), Some(signature)) = (&self.cert, &self.signature) else {
            return Err(HeaderError::Untrusted("it carries no signature"));
        };
        cert.validate_at(now, proxy_ca)
            .map_err(|_| HeaderError::Untrusted("the certificate is not from the proxy host CA"))?;
        if cert.cert_type() != CertType::Host
            || cert.extensions().get(EXT_HOST_ROLE).map(String::as_str)
                != Some(SystemRole::Proxy.as_str())
        {
            return Err(HeaderError::Untrusted("the certificate is not a proxy's"));
        }
        if self.timestamp.abs_diff(now) > MAX_SKEW {
            return Err(HeaderError::Untrusted("the signature is stale"));
        }
        cert.public_key()
            .verify(
                &signed_message(
                    self.family,
                    &self.block,
                    self.timestamp,
                    &self.nonce,
                    &self.target,
                ),
                signature,
            )
            .map_err(|_| HeaderError::Untrusted("the signature does not verify"))?;
        if self.target != me {
            return Err(HeaderError::Untrusted("it was signed for another node"));
        }
        if !seen.first_time(self.nonce, now) {
            return Err(HeaderError::Untrusted("it was seen before (a replay)"));
        }
        Ok(self.client)
    }
}

/// The nonces of the headers a node accepted within their freshness window.
#[derive(Debug, Default)]
pub struct SeenHeaders {
    /// nonce -> when it may be forgotten (unix seconds).
    nonces: Mutex<HashMap<[u8; 16], u64>>,
}

impl SeenHeaders {
    /// Remembers `nonce`; false if it was already there (or, in a flood
    /// beyond [`MAX_SEEN`] fresh headers, if there is no room to remember).
    fn first_time(&self, nonce: [u8; 16], now: u64) -> bool {
        let mut nonces = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        if nonces.len() >= MAX_SEEN {
            nonces.retain(|_, until| *until > now);
            if nonces.len() >= MAX_SEEN {
                return false;
            }
        }
        nonces.insert(nonce, now + 2 * MAX_SKEW + 1).is_none()
    }
}

/// Reads a PROXY v2 header off the front of `stream` if one is there; leaves
/// the stream untouched otherwise. Waits at most `wait` for the first byte.
pub async fn read_if_present(
    stream: &mut TcpStream,
    wait: Duration,
) -> Result<Option<ProxyHeader>, HeaderError> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == SIGNATURE[0] => {}
        _ => return Ok(None),
    }
    let mut preamble = [0u8; 16];
    stream
        .read_exact(&mut preamble)
        .await
        .map_err(|_| HeaderError::Malformed("truncated"))?;
    if preamble[..12] != SIGNATURE || preamble[12] != 0x21 {
        return Err(HeaderError::Malformed("not a PROXY v2 header"));
    }
    let len = u16::from_be_bytes([preamble[14], preamble[15]]) as usize;
    if len > MAX_HEADER {
        return Err(HeaderError::Malformed("too long"));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|_| HeaderError::Malformed("truncated"))?;
    parse(preamble[13], &body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::generate_ed25519;
    use russh::keys::HashAlg;
    use russh::keys::ssh_key::certificate::Builder;

    fn host_cert(ca: &PrivateKey, key: &PrivateKey, role: Option<&str>) -> Certificate {
        let mut b = Builder::new(
            vec![3; 16],
            key.public_key().key_data().clone(),
            0,
            u64::MAX - 1,
        )
        .unwrap();
        b.cert_type(CertType::Host).unwrap();
        b.valid_principal("proxy").unwrap();
        if let Some(role) = role {
            b.extension(EXT_HOST_ROLE, role).unwrap();
        }
        b.sign(ca).unwrap()
    }

    fn round_trip(bytes: &[u8]) -> ProxyHeader {
        assert_eq!(bytes[..12], SIGNATURE);
        parse(bytes[13], &bytes[16..]).unwrap()
    }

    #[test]
    fn a_proxy_signed_header_verifies_and_others_do_not() {
        let ca = generate_ed25519();
        let fp = [ca.fingerprint(HashAlg::Sha256)];
        let proxy = generate_ed25519();
        let cert = host_cert(&ca, &proxy, Some("proxy"));
        let client: SocketAddr = "203.0.113.7:50122".parse().unwrap();
        let node: SocketAddr = "127.0.0.1:3022".parse().unwrap();
        let now = 1_700_000_000;
        let h = round_trip(&encode(client, node, "node-1", &proxy, &cert, now).unwrap());
        let seen = SeenHeaders::default();
        assert_eq!(
            h.verify(&fp, now + 600, "node-1", &seen),
            Err(HeaderError::Untrusted("the signature is stale"))
        );
        assert!(
            h.verify(
                &[generate_ed25519().fingerprint(HashAlg::Sha256)],
                now,
                "node-1",
                &seen
            )
            .is_err()
        );
        assert_eq!(
            h.verify(&fp, now, "node-2", &seen),
            Err(HeaderError::Untrusted("it was signed for another node"))
        );
        assert_eq!(h.verify(&fp, now + 5, "node-1", &seen), Ok(client));
        assert_eq!(
            h.verify(&fp, now + 6, "node-1", &seen),
            Err(HeaderError::Untrusted("it was seen before (a replay)"))
        );

        let node_cert = host_cert(&ca, &proxy, None);
        let h = round_trip(&encode(client, node, "node-1", &proxy, &node_cert, now).unwrap());
        assert_eq!(
            h.verify(&fp, now, "node-1", &seen),
            Err(HeaderError::Untrusted("the certificate is not a proxy's"))
        );

        // A signature by another key under a real proxy certificate fails.
        let thief = generate_ed25519();
        let mut bytes = encode(client, node, "node-1", &thief, &cert, now).unwrap();
        assert!(
            round_trip(&bytes)
                .verify(&fp, now, "node-1", &seen)
                .is_err()
        );
        // Tampering with the address breaks the signature.
        bytes = encode(client, node, "node-1", &proxy, &cert, now).unwrap();
        bytes[16] ^= 1;
        assert!(
            round_trip(&bytes)
                .verify(&fp, now, "node-1", &seen)
                .is_err()
        );
    }

    #[test]
    fn ipv6_clients_round_trip() {
        let ca = generate_ed25519();
        let proxy = generate_ed25519();
        let cert = host_cert(&ca, &proxy, Some("proxy"));
        let client: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let node: SocketAddr = "127.0.0.1:3022".parse().unwrap();
        let h = round_trip(&encode(client, node, "node-1", &proxy, &cert, 10).unwrap());
        let seen = SeenHeaders::default();
        assert_eq!(
            h.verify(&[ca.fingerprint(HashAlg::Sha256)], 10, "node-1", &seen),
            Ok(client)
        );
    }

    #[test]
    fn garbage_never_panics() {
        for family in [0x11u8, 0x21, 0x00] {
            for len in 0..64 {
                let body: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
                let _ = parse(family, &body);
            }
        }
    }
}
