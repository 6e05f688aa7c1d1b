//! The client side of the proxy's `turnstile` subsystem: first contact
//! (reading and checking the cluster's trust material), password login, and
//! requests made with a certificate (`ls`, renewal).

use base64::Engine;
use russh::ChannelMsg;
use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};
use turnstile_api::door::{self, ClusterInfo, DoorRequest, DoorResponse, IssuedCert, NodeEntry};
use turnstile_api::identity::host_ca_statement;
use turnstile_api::pin;

use super::{
    ClientError, Connected, Trust, UserCredentials, open_proxy, proxy_principal, verify_host_key,
};

/// Sends one request over a fresh `turnstile` subsystem channel and returns
/// the response; an error response becomes `ClientError::ChannelRefused`.
pub async fn call(conn: &Connected, request: &DoorRequest) -> Result<DoorResponse, ClientError> {
    let protocol = |message: String| ClientError::Protocol {
        host: conn.label.clone(),
        message,
    };
    let mut channel = match conn.handle.channel_open_session().await {
        Ok(c) => c,
        Err(e) => {
            let text = conn.open_refusal(e).await;
            return Err(ClientError::ChannelRefused(text));
        }
    };
    channel
        .request_subsystem(true, door::SUBSYSTEM)
        .await
        .map_err(|e| protocol(e.to_string()))?;
    channel
        .data(&door::encode(request)[..])
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let mut buf = Vec::new();
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Failure => {
                return Err(protocol(
                    "it has no turnstile subsystem; is it a Turnstile proxy?".into(),
                ));
            }
            ChannelMsg::Data { data } => {
                buf.extend_from_slice(&data);
                if let Some(response) =
                    door::decode::<DoorResponse>(&mut buf).map_err(|e| protocol(e.to_string()))?
                {
                    let _ = channel.eof().await;
                    return match response {
                        DoorResponse::Error { message } => {
                            Err(ClientError::ChannelRefused(message))
                        }
                        other => Ok(other),
                    };
                }
            }
            ChannelMsg::Close | ChannelMsg::Eof => break,
            _ => {}
        }
    }
    Err(protocol("it closed the channel without answering".into()))
}

/// What first contact learned: the cluster's trust material and the host key
/// the proxy presented (checked once the host CA is trusted).
pub struct FirstContact {
    pub info: ClusterInfo,
    presented: Option<PublicKeyOrCertificate>,
    proxy_addr: String,
}

/// Asks the proxy for the cluster's public trust material, anonymously.
pub async fn first_contact(proxy_addr: &str) -> Result<FirstContact, ClientError> {
    let mut conn = open_proxy(proxy_addr, &Trust::first_contact()).await?;
    let presented = conn.take_presented_host_key();
    conn.auth_anonymous().await?;
    match call(&conn, &DoorRequest::ClusterInfo).await? {
        DoorResponse::ClusterInfo(info) => Ok(FirstContact {
            info,
            presented,
            proxy_addr: proxy_addr.to_string(),
        }),
        _ => Err(ClientError::Protocol {
            host: conn.label.clone(),
            message: "unexpected answer to cluster_info".into(),
        }),
    }
}

/// `SHA256:…` of each host CA key, as OpenSSH prints fingerprints.
pub fn fingerprints(keys: &[PublicKey]) -> Vec<String> {
    keys.iter()
        .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
        .collect()
}

impl FirstContact {
    /// The host CA keys, unverified.
    pub fn host_ca(&self) -> Result<Vec<PublicKey>, String> {
        parse_keys(&self.info.host_ca, "host CA")
    }

    /// The CA pin of the cluster's TLS CA (`sha256:<hex>`), as `turnstile
    /// start` and `admin tokens add` print it.
    pub fn ca_pin(&self) -> Result<String, String> {
        pin::ca_pin_of_pem(&self.info.tls_ca_pem).map_err(|e| e.to_string())
    }

    /// Checks the trust material against the operator's CA pin: the TLS CA
    /// must have that pin, and must have signed the host CA and proxy host
    /// CA keys.
    pub fn verify_pin(&self, expected_pin: &str) -> Result<Trust, String> {
        let found = pin::ca_pin_of_pem(&self.info.tls_ca_pem).map_err(|e| e.to_string())?;
        if !pin::matches(&found, expected_pin) {
            return Err(format!(
                "the cluster behind {} has CA pin {found}, not {expected_pin}; check the pin (and that you reached the right proxy)",
                self.proxy_addr
            ));
        }
        let ca_key = pin::ca_public_key_of_pem(&self.info.tls_ca_pem).map_err(|e| e.to_string())?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(&self.info.host_ca_endorsement)
            .map_err(|_| "the host CA endorsement is not base64".to_string())?;
        if self.info.proxy_ca.is_empty() {
            return Err(format!(
                "the proxy at {} serves no proxy host CA: the cluster runs a Turnstile older than this client; upgrade it",
                self.proxy_addr
            ));
        }
        let statement = host_ca_statement(
            &self.info.cluster_name,
            &self.info.host_ca,
            &self.info.proxy_ca,
        );
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            &ca_key,
        )
        .verify(&statement, &signature)
        .map_err(|_| "the host CA is not endorsed by the pinned CA".to_string())?;
        Ok(Trust {
            host_ca: self.host_ca()?,
            proxy_ca: parse_keys(&self.info.proxy_ca, "proxy host CA")?,
        })
    }

    /// Checks, once `trust` is trusted, that the proxy we talked to presented
    /// a certificate from its proxy host CA for its own name.
    pub fn verify_proxy(&self, trust: &Trust) -> Result<(), String> {
        let presented = self
            .presented
            .as_ref()
            .ok_or_else(|| "the proxy presented no host key".to_string())?;
        verify_host_key(
            presented,
            &trust.proxy_ca,
            "proxy host CA",
            proxy_principal(&self.proxy_addr),
        )
        .map_err(|reason| format!("the proxy at {}: {reason}", self.proxy_addr))
    }
}

/// Logs in with a password and returns a certificate for `public_key`.
pub async fn password_login(
    proxy_addr: &str,
    trust: &Trust,
    user: &str,
    password: &str,
    public_key: &PublicKey,
    ttl_seconds: u64,
) -> Result<IssuedCert, ClientError> {
    let mut conn = open_proxy(proxy_addr, trust).await?;
    conn.auth_password(user, password).await?;
    let request = DoorRequest::Login {
        public_key: public_key.to_openssh().unwrap_or_default(),
        ttl_seconds,
        user: None,
    };
    match call(&conn, &request).await? {
        DoorResponse::Login(issued) => Ok(issued),
        _ => Err(ClientError::Protocol {
            host: conn.label.clone(),
            message: "unexpected answer to login".into(),
        }),
    }
}

/// Asks the proxy with a certificate; for `ls` and renewals.
pub async fn call_with_certificate(
    proxy_addr: &str,
    trust: &Trust,
    creds: &UserCredentials,
    request: &DoorRequest,
) -> Result<DoorResponse, ClientError> {
    let mut conn = open_proxy(proxy_addr, trust).await?;
    conn.auth_certificate(creds.user(), creds).await?;
    call(&conn, request).await
}

/// The nodes the user may reach.
pub async fn list_nodes(
    proxy_addr: &str,
    trust: &Trust,
    creds: &UserCredentials,
) -> Result<Vec<NodeEntry>, ClientError> {
    match call_with_certificate(proxy_addr, trust, creds, &DoorRequest::Ls).await? {
        DoorResponse::Ls { nodes } => Ok(nodes),
        _ => Err(ClientError::Protocol {
            host: format!("the proxy at {proxy_addr}"),
            message: "unexpected answer to ls".into(),
        }),
    }
}

/// Recordings the user may see.
pub async fn list_recordings(
    proxy_addr: &str,
    trust: &Trust,
    creds: &UserCredentials,
    user: Option<String>,
    since_ms: i64,
) -> Result<Vec<turnstile_api::door::RecordingEntry>, ClientError> {
    match call_with_certificate(
        proxy_addr,
        trust,
        creds,
        &DoorRequest::RecordingsLs { user, since_ms },
    )
    .await?
    {
        DoorResponse::Recordings { recordings } => Ok(recordings),
        _ => Err(ClientError::Protocol {
            host: format!("the proxy at {proxy_addr}"),
            message: "unexpected answer to recordings_ls".into(),
        }),
    }
}

/// Fetches a recording (its objects, as one byte stream) chunk by chunk,
/// handing each to `chunks` as it arrives; stops early if the receiver is
/// gone. Memory stays at one chunk whatever the recording's size.
pub async fn fetch_recording(
    proxy_addr: &str,
    trust: &Trust,
    creds: &UserCredentials,
    sid: &str,
    chunks: tokio::sync::mpsc::Sender<Vec<u8>>,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), ClientError> {
    const CHUNK: u32 = 512 * 1024;
    let mut conn = open_proxy(proxy_addr, trust).await?;
    conn.auth_certificate(creds.user(), creds).await?;
    let mut offset = 0u64;
    loop {
        let request = DoorRequest::RecordingChunk {
            sid: sid.to_string(),
            offset,
            length: CHUNK,
        };
        match call(&conn, &request).await? {
            DoorResponse::Chunk { data_base64, total } => {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(data_base64)
                    .map_err(|e| ClientError::Protocol {
                        host: conn.label.clone(),
                        message: format!("bad chunk: {e}"),
                    })?;
                let done = data.is_empty();
                offset += data.len() as u64;
                progress(offset, total);
                if !done && chunks.send(data).await.is_err() {
                    return Ok(());
                }
                if done || offset >= total {
                    return Ok(());
                }
            }
            _ => {
                return Err(ClientError::Protocol {
                    host: conn.label.clone(),
                    message: "unexpected answer to recording_chunk".into(),
                });
            }
        }
    }
}

fn parse_keys(keys: &[String], what: &str) -> Result<Vec<PublicKey>, String> {
    keys.iter()
        .map(|k| PublicKey::from_openssh(k).map_err(|e| format!("bad {what} key: {e}")))
        .collect()
}
