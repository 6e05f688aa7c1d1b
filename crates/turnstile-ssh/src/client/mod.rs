//! The client behind `turnstile ssh`: connects to the proxy with the user's
//! certificate, asks for a tunnel to the node by name, and runs a second,
//! end-to-end SSH handshake with the node through it, as `ssh -J` does. The
//! proxy must present a certificate from the cluster's proxy host CA and the
//! node one from its host CA, each naming the host we meant; there is no
//! trust-on-first-use prompt.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle, Handler};
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Algorithm, Certificate, HashAlg, PrivateKey, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelId, ChannelOpenFailure};
use tokio::net::TcpStream;

pub mod door;
mod session;
pub mod terminal;

pub use session::{SessionRequest, run_session};

/// Why a connection failed, naming whose fault it was.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the proxy at {addr}: {source}")]
    ProxyUnreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error("{host} failed host verification: {reason}")]
    HostRejected { host: String, reason: String },
    #[error("{host} refused the certificate: {reason}")]
    AuthRefused { host: String, reason: String },
    #[error("{0}")]
    ChannelRefused(String),
    #[error("SSH with {host} failed: {message}")]
    Protocol { host: String, message: String },
    #[error(
        "this identity was written before the cluster had a proxy host CA; renew it with `turnstile login` (or write it again with `turnstile admin sign`)"
    )]
    IdentityTooOld,
}

/// The CAs a client trusts for one cluster: the proxy host CA for the proxy
/// hop, the host CA for nodes. A node's certificate never passes for the
/// proxy's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub host_ca: Vec<PublicKey>,
    pub proxy_ca: Vec<PublicKey>,
}

impl Trust {
    /// Trusts nothing: first contact, which only records the host key.
    pub fn first_contact() -> Self {
        Self::default()
    }
}

/// The user's key and certificate.
#[derive(Debug, Clone)]
pub struct UserCredentials {
    pub key: Arc<PrivateKey>,
    pub certificate: Certificate,
}

impl UserCredentials {
    /// The Turnstile user this certificate is for (its key id).
    pub fn user(&self) -> &str {
        self.certificate.key_id()
    }

    /// A local check before connecting, so an expired certificate is named
    /// as such instead of as "authentication refused".
    pub fn check_fresh(&self, now_unix: u64) -> Result<(), ClientError> {
        if now_unix >= self.certificate.valid_before() {
            return Err(ClientError::AuthRefused {
                host: "the cluster".into(),
                reason: format!(
                    "your certificate expired at {}; get a new one with `turnstile login` or `turnstile admin sign`",
                    humanize_unix(self.certificate.valid_before())
                ),
            });
        }
        Ok(())
    }
}

fn humanize_unix(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

/// The text of the last refused channel open. russh resolves the open call
/// before it hands the refusal's text to the handler, so a reader may have to
/// wait a moment for it.
#[derive(Debug, Default)]
pub struct OpenFailure {
    text: Mutex<Option<String>>,
    arrived: tokio::sync::Notify,
}

impl OpenFailure {
    fn set(&self, text: String) {
        *self.text.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
        self.arrived.notify_waiters();
    }

    fn take_now(&self) -> Option<String> {
        self.text.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Why a channel open failed with `e`: the refusal's text if one
    /// arrives within a second, else the error itself.
    pub async fn refusal(&self, e: russh::Error) -> String {
        self.take().await.unwrap_or_else(|| e.to_string())
    }

    /// The refusal's text, waiting up to a second for it to arrive.
    pub async fn take(&self) -> Option<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let arrived = self.arrived.notified();
            if let Some(text) = self.take_now() {
                return Some(text);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.take_now();
            }
        }
    }
}

/// A channel the server opened towards us: a connection to a remote
/// forward, or to the forwarded agent. Offered to whoever asked for them
/// ([`Connected::inbound`]); refused when nobody did.
pub enum Inbound {
    Forwarded {
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        connected_address: String,
        connected_port: u32,
        originator_address: String,
        originator_port: u32,
    },
    Agent {
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
    },
}

type InboundSink = Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<Inbound>>>>;

/// Checks host certificates against the cluster's host CA, for one expected name.
pub struct HostChecker {
    host_ca: Vec<PublicKey>,
    /// What `host_ca` is, for what the user is told.
    ca_name: &'static str,
    expected: String,
    refusal: Arc<Mutex<Option<String>>>,
    open_failure: Arc<OpenFailure>,
    presented: Arc<Mutex<Option<PublicKeyOrCertificate>>>,
    inbound: InboundSink,
    /// Why the server closed the connection, once it said.
    closed: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl HostChecker {
    fn new(host_ca: &[PublicKey], ca_name: &'static str, expected: &str) -> Self {
        Self {
            host_ca: host_ca.to_vec(),
            ca_name,
            expected: expected.to_string(),
            refusal: Arc::default(),
            open_failure: Arc::default(),
            presented: Arc::default(),
            inbound: Arc::default(),
            closed: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }

    /// Hands a server-opened channel to whoever asked for them, or refuses it.
    async fn offer(&self, inbound: Inbound) {
        let sink = self
            .inbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let refused = match sink {
            Some(tx) => match tx.send(inbound) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => inbound,
        };
        let reply = match refused {
            Inbound::Forwarded { reply, .. } | Inbound::Agent { reply, .. } => reply,
        };
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
    }

    fn verify(&self, key: &PublicKeyOrCertificate) -> Result<(), String> {
        verify_host_key(key, &self.host_ca, self.ca_name, &self.expected)
    }
}

/// Is `key` a host certificate from `host_ca` (the cluster's `ca_name`) for
/// `expected`?
pub fn verify_host_key(
    key: &PublicKeyOrCertificate,
    host_ca: &[PublicKey],
    ca_name: &str,
    expected: &str,
) -> Result<(), String> {
    let cert = match key {
        PublicKeyOrCertificate::Certificate(cert) => cert,
        PublicKeyOrCertificate::PublicKey { .. } => {
            return Err(
                "it presented a bare host key, not a host certificate of the cluster".into(),
            );
        }
    };
    let fingerprints: Vec<_> = host_ca
        .iter()
        .map(|k| k.fingerprint(HashAlg::Sha256))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    cert.validate_at(now, &fingerprints).map_err(|_| {
        format!("its host certificate is not signed by the cluster's {ca_name}, or has expired")
    })?;
    if cert.cert_type() != CertType::Host {
        return Err("it presented a user certificate as its host certificate".into());
    }
    if !cert.valid_principals().iter().any(|p| p == expected) {
        return Err(format!(
            "its host certificate is for {}, not {expected:?}",
            cert.valid_principals().join(", ")
        ));
    }
    Ok(())
}

impl Handler for HostChecker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let copy = match key {
            PublicKeyOrCertificate::Certificate(c) => {
                PublicKeyOrCertificate::Certificate(c.clone())
            }
            PublicKeyOrCertificate::PublicKey { key, hash_alg } => {
                PublicKeyOrCertificate::PublicKey {
                    key: key.clone(),
                    hash_alg: *hash_alg,
                }
            }
        };
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(copy);
        if self.host_ca.is_empty() {
            // First contact: recorded, checked by the caller before any secret is sent.
            return Ok(true);
        }
        match self.verify(key) {
            Ok(()) => Ok(true),
            Err(reason) => {
                *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.offer(Inbound::Forwarded {
            channel,
            reply,
            connected_address: connected_address.to_string(),
            connected_port,
            originator_address: originator_address.to_string(),
            originator_port,
        })
        .await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.offer(Inbound::Agent { channel, reply }).await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        match reason {
            client::DisconnectReason::ReceivedDisconnect(info) => {
                if !info.message.is_empty() {
                    self.closed.send_replace(Some(info.message));
                }
                Ok(())
            }
            client::DisconnectReason::Error(e) => Err(e),
        }
    }

    async fn channel_open_failure(
        &mut self,
        _channel: ChannelId,
        reason: ChannelOpenFailure,
        description: &str,
        _language: &str,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let text = if description.is_empty() {
            reason.description().to_string()
        } else {
            description.to_string()
        };
        self.open_failure.set(text);
        Ok(())
    }
}

/// The ciphers Turnstile's own hops prefer: AES-GCM has hardware support on
/// the machines Turnstile runs on and costs a fraction of ChaCha20-Poly1305
/// there; the client's order decides (RFC 4253, 7.1).
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

fn client_config() -> Arc<client::Config> {
    Arc::new(base_config())
}

fn base_config() -> client::Config {
    let preferred = russh::Preferred {
        host_key_certificates: std::borrow::Cow::Borrowed(&[Algorithm::Ed25519]),
        cipher: std::borrow::Cow::Borrowed(CIPHERS),
        ..Default::default()
    };
    client::Config {
        preferred,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        nodelay: true,
        ..Default::default()
    }
}

/// A connection to a node, through the proxy.
pub struct NodeConnection {
    pub handle: Handle<HostChecker>,
    open_failure: Arc<OpenFailure>,
    // Keeps the proxy hop alive for as long as the node connection lives.
    _proxy: Handle<HostChecker>,
    /// What the node, then the proxy, said when it closed its connection.
    closed: [Arc<tokio::sync::watch::Sender<Option<String>>>; 2],
}

/// How long a session that ended without an exit status waits for the
/// reason its node or proxy closed the connection with.
const CLOSE_REASON_WAIT: Duration = Duration::from_millis(500);

impl NodeConnection {
    /// Why the node or the proxy closed the connection (a lock, a removed
    /// user: the text it sent), if either said within a moment.
    pub async fn closed_with(&self) -> Option<String> {
        let wait = async {
            let mut node = self.closed[0].subscribe();
            let mut proxy = self.closed[1].subscribe();
            tokio::select! {
                r = node.wait_for(Option::is_some) => r.ok().and_then(|m| m.clone()),
                r = proxy.wait_for(Option::is_some) => r.ok().and_then(|m| m.clone()),
            }
        };
        tokio::time::timeout(CLOSE_REASON_WAIT, wait)
            .await
            .ok()
            .flatten()
    }

    /// Why a channel open failed with `e`, for the user: the server's text
    /// if it sent one.
    pub async fn open_refusal(&self, e: russh::Error) -> String {
        self.open_failure.refusal(e).await
    }
}

fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            host.trim_start_matches('[').trim_end_matches(']')
        }
        _ => addr,
    }
}

/// An SSH connection whose host was checked, not yet authenticated.
pub struct Connected {
    pub handle: Handle<HostChecker>,
    pub label: String,
    open_failure: Arc<OpenFailure>,
    presented: Arc<Mutex<Option<PublicKeyOrCertificate>>>,
    inbound: InboundSink,
    closed: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl Connected {
    /// The channels the server opens towards us from now on (remote forward
    /// connections, the forwarded agent); refused while nobody reads them.
    pub fn inbound(&self) -> tokio::sync::mpsc::UnboundedReceiver<Inbound> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.inbound.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// What the server presented as its host key or certificate.
    pub fn take_presented_host_key(&self) -> Option<PublicKeyOrCertificate> {
        self.presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Why a channel open failed with `e`: the server's text if it sent one.
    pub async fn open_refusal(&self, e: russh::Error) -> String {
        self.open_failure.refusal(e).await
    }

    fn protocol(&self, e: russh::Error) -> ClientError {
        ClientError::Protocol {
            host: self.label.clone(),
            message: e.to_string(),
        }
    }

    /// Authenticates with the user's certificate as `login`.
    pub async fn auth_certificate(
        &mut self,
        login: &str,
        creds: &UserCredentials,
    ) -> Result<(), ClientError> {
        let result = self
            .handle
            .authenticate_openssh_cert(login, creds.key.clone(), creds.certificate.clone())
            .await
            .map_err(|e| self.protocol(e))?;
        if !result.success() {
            return Err(ClientError::AuthRefused {
                host: self.label.clone(),
                reason:
                    "the certificate was not accepted (is it from this cluster, and still valid?)"
                        .into(),
            });
        }
        Ok(())
    }

    /// Authenticates with a password.
    pub async fn auth_password(&mut self, user: &str, password: &str) -> Result<(), ClientError> {
        let result = self
            .handle
            .authenticate_password(user, password)
            .await
            .map_err(|e| self.protocol(e))?;
        if !result.success() {
            return Err(ClientError::AuthRefused {
                host: self.label.clone(),
                reason: "wrong user name or password".into(),
            });
        }
        Ok(())
    }

    /// Authenticates as the anonymous user that may only read the cluster's
    /// public trust material.
    pub async fn auth_anonymous(&mut self) -> Result<(), ClientError> {
        let result = self
            .handle
            .authenticate_none(turnstile_api::door::ANONYMOUS_USER)
            .await
            .map_err(|e| self.protocol(e))?;
        if !result.success() {
            return Err(ClientError::AuthRefused {
                host: self.label.clone(),
                reason: "it does not answer cluster-info requests; is it a Turnstile proxy?".into(),
            });
        }
        Ok(())
    }
}

/// Runs the SSH handshake on `stream`, checking the host certificate against
/// `host_ca` for `expected`; with `host_ca` empty, accepts any host key and
/// only records it (first contact: nothing secret is sent before it is
/// checked).
pub async fn open<S>(
    stream: S,
    label: &str,
    expected: &str,
    host_ca: &[PublicKey],
) -> Result<Connected, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    open_with(client_config(), stream, label, expected, host_ca, "host CA").await
}

/// The proxy's check of a node's address ([`open`], saying who it is in its
/// SSH version, so node logs and packet captures tell probes apart).
pub(crate) async fn open_probe(
    stream: TcpStream,
    expected: &str,
    host_ca: &[PublicKey],
) -> Result<Connected, ClientError> {
    let mut config = base_config();
    config.client_id = russh::SshId::Standard("SSH-2.0-Turnstile_address_probe".into());
    open_with(
        Arc::new(config),
        stream,
        "node",
        expected,
        host_ca,
        "host CA",
    )
    .await
}

async fn open_with<S>(
    config: Arc<client::Config>,
    stream: S,
    label: &str,
    expected: &str,
    host_ca: &[PublicKey],
    ca_name: &'static str,
) -> Result<Connected, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let checker = HostChecker::new(host_ca, ca_name, expected);
    let refusal = checker.refusal.clone();
    let open_failure = checker.open_failure.clone();
    let presented = checker.presented.clone();
    let inbound = checker.inbound.clone();
    let closed = checker.closed.clone();
    let handle = client::connect_stream(config, stream, checker)
        .await
        .map_err(
            |e| match refusal.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(reason) => ClientError::HostRejected {
                    host: label.to_string(),
                    reason,
                },
                None => ClientError::Protocol {
                    host: label.to_string(),
                    message: e.to_string(),
                },
            },
        )?;
    Ok(Connected {
        handle,
        label: label.to_string(),
        open_failure,
        presented,
        inbound,
        closed,
    })
}

/// Opens an SSH connection to the proxy at `proxy_addr`, which must present
/// a certificate of `trust`'s proxy host CA (with nothing trusted: first
/// contact).
pub async fn open_proxy(proxy_addr: &str, trust: &Trust) -> Result<Connected, ClientError> {
    if trust.proxy_ca.is_empty() && !trust.host_ca.is_empty() {
        return Err(ClientError::IdentityTooOld);
    }
    let tcp =
        TcpStream::connect(proxy_addr)
            .await
            .map_err(|source| ClientError::ProxyUnreachable {
                addr: proxy_addr.to_string(),
                source,
            })?;
    let _ = tcp.set_nodelay(true);
    open_with(
        client_config(),
        tcp,
        &format!("the proxy at {proxy_addr}"),
        host_of(proxy_addr),
        &trust.proxy_ca,
        "proxy host CA",
    )
    .await
}

/// The proxy's own name in its host certificate: the host part of its address.
pub fn proxy_principal(proxy_addr: &str) -> &str {
    host_of(proxy_addr)
}

/// Connects to `node` as `login` through the proxy at `proxy_addr`.
pub async fn connect_via_proxy(
    proxy_addr: &str,
    node: &str,
    login: &str,
    creds: &UserCredentials,
    trust: &Trust,
) -> Result<NodeConnection, ClientError> {
    let mut proxy = open_proxy(proxy_addr, trust).await?;
    proxy.auth_certificate(creds.user(), creds).await?;
    let channel = match proxy
        .handle
        .channel_open_direct_tcpip(node, 22, "127.0.0.1", 0)
        .await
    {
        Ok(channel) => channel,
        Err(e) => {
            let text = proxy.open_refusal(e).await;
            return Err(ClientError::ChannelRefused(text));
        }
    };
    let mut conn = open(
        channel.into_stream(),
        &format!("node {node:?}"),
        node,
        &trust.host_ca,
    )
    .await?;
    conn.auth_certificate(login, creds).await?;
    Ok(NodeConnection {
        handle: conn.handle,
        open_failure: conn.open_failure,
        _proxy: proxy.handle,
        closed: [conn.closed, proxy.closed],
    })
}

/// Reads the CAs from the `@cert-authority` lines of a known_hosts file: a
/// line for every host but some (`*,!…`) holds the host CA, a line for named
/// hosts the proxy host CA (as [`known_hosts_lines`] writes them).
pub fn parse_cert_authorities(known_hosts: &str) -> Trust {
    let mut trust = Trust::default();
    for rest in known_hosts
        .lines()
        .filter_map(|line| line.trim().strip_prefix("@cert-authority"))
    {
        let mut fields = rest.split_whitespace();
        let (Some(hosts), Some(algo), Some(data)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(key) = PublicKey::from_openssh(&format!("{algo} {data}")) else {
            continue;
        };
        if hosts == "*" || hosts.starts_with("*,") {
            trust.host_ca.push(key);
        } else {
            trust.proxy_ca.push(key);
        }
    }
    trust
}

/// How OpenSSH names a host in known_hosts: `host`, or `[host]:port` off
/// port 22.
pub fn known_hosts_name(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some((host, port)) if port != "22" && !host.is_empty() => {
            format!("[{}]:{port}", host.trim_matches(['[', ']']))
        }
        _ => host_of(addr).to_string(),
    }
}

/// The `@cert-authority` lines for a cluster reached through `proxy`
/// (HOST:PORT): the proxy host CA for the proxy's name only, the host CA
/// for every other host, so a node's certificate never passes for the
/// proxy's in OpenSSH either. OpenSSH looks a certificate's CA up under
/// `[host]:port` and then under the bare host, so the host CA's line
/// excludes both (a node on the proxy's host at port 22 is then reached
/// through the proxy, not straight).
pub fn known_hosts_lines(
    cluster: &str,
    proxy: &str,
    host_ca: &[String],
    proxy_ca: &[String],
) -> String {
    let name = known_hosts_name(proxy);
    let bare = host_of(proxy);
    let excluded = if name == bare {
        format!("!{name}")
    } else {
        format!("!{name},!{bare}")
    };
    let mut out = String::new();
    for k in proxy_ca {
        out.push_str(&format!(
            "@cert-authority {name} {} turnstile-{cluster}-proxy-ca\n",
            k.trim()
        ));
    }
    for k in host_ca {
        out.push_str(&format!(
            "@cert-authority *,{excluded} {} turnstile-{cluster}-host-ca\n",
            k.trim()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_ports_and_brackets() {
        assert_eq!(host_of("127.0.0.1:3023"), "127.0.0.1");
        assert_eq!(host_of("[::1]:3023"), "::1");
        assert_eq!(host_of("proxy.example.com"), "proxy.example.com");
    }

    #[test]
    fn cert_authority_lines_are_read_back_as_written() {
        let host = crate::identity::generate_ed25519();
        let proxy = crate::identity::generate_ed25519();
        let text = known_hosts_lines(
            "c1",
            "127.0.0.1:3023",
            &[host.public_key().to_openssh().unwrap()],
            &[proxy.public_key().to_openssh().unwrap()],
        );
        assert!(text.contains("@cert-authority [127.0.0.1]:3023 "), "{text}");
        assert!(
            text.contains("@cert-authority *,![127.0.0.1]:3023,!127.0.0.1 "),
            "{text}"
        );
        let trust = parse_cert_authorities(&format!("{text}# comment\n"));
        assert_eq!(trust.host_ca, vec![host.public_key().clone()]);
        assert_eq!(trust.proxy_ca, vec![proxy.public_key().clone()]);
        // A file written before the proxy host CA: the host CA only.
        let old = format!(
            "@cert-authority * {} turnstile-c1-host-ca\n",
            host.public_key().to_openssh().unwrap()
        );
        let trust = parse_cert_authorities(&old);
        assert!(trust.proxy_ca.is_empty());
        assert_eq!(
            known_hosts_name("proxy.example.com:22"),
            "proxy.example.com"
        );
        assert_eq!(known_hosts_name("[::1]:3023"), "[::1]:3023");
    }
}
