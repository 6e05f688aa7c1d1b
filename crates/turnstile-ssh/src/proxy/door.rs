//! The `turnstile` subsystem on the proxy: request/response frames (see
//! `turnstile_api::door`) answered from the cluster view or forwarded to auth
//! on the user's behalf, with what the user proved at authentication. A shell
//! or command on the proxy gets an explanation and exit status 1.

use std::net::SocketAddr;
use std::sync::Arc;

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg};
use tokio::io::AsyncWriteExt;
use turnstile_api::door::{
    self, DoorRequest, DoorResponse, IssuedCert, NodeEntry, RecordingEntry, SUBSYSTEM,
};
use turnstile_api::rpc::proto;

use super::ProxyShared;
use super::connection::{DOOR_IDLE, Principal};

const NO_SHELLS: &str = "the proxy runs no shells; reach a node through it (turnstile ssh NODE, or ssh -J PROXY NODE)\r\n";

fn error(message: impl Into<String>) -> DoorResponse {
    DoorResponse::Error {
        message: message.into(),
    }
}

fn issued(r: proto::GenerateUserCertResponse) -> DoorResponse {
    DoorResponse::Login(IssuedCert {
        certificate: r.certificate,
        valid_before: r.valid_before_unix,
        principals: r.principals,
    })
}

async fn answer(
    shared: &ProxyShared,
    principal: &Principal,
    client: SocketAddr,
    request: DoorRequest,
) -> DoorResponse {
    match (request, principal) {
        (_, Principal::Nobody) => error("not authenticated"),
        (_, Principal::Refused { reason }) => error(reason.clone()),
        (DoorRequest::ClusterInfo, _) => match shared.view.cluster_info().await {
            Ok(info) => DoorResponse::ClusterInfo(info),
            Err(e) => error(format!(
                "the proxy cannot reach auth for the cluster's CAs: {e}"
            )),
        },
        (DoorRequest::Login { .. }, Principal::Anonymous) => {
            error("log in with a password (or a certificate) first")
        }
        (
            DoorRequest::Login {
                public_key,
                ttl_seconds,
                user: asked,
            },
            Principal::Password { user, password },
        ) => {
            if asked.as_ref().is_some_and(|a| a != user) {
                return error(format!(
                    "this connection authenticated as {user:?}; it cannot log in as {:?}",
                    asked.unwrap_or_default()
                ));
            }
            let mut client_rpc = shared.view.client();
            match client_rpc
                .login(turnstile_api::auth_channel::with_affinity(
                    proto::LoginRequest {
                        user: user.clone(),
                        password: password.clone(),
                        public_key,
                        ttl_seconds,
                        client_addr: client.to_string(),
                    },
                    user,
                ))
                .await
            {
                Ok(r) => issued(r.into_inner()),
                Err(s) => error(s.message()),
            }
        }
        (
            DoorRequest::Login {
                public_key,
                ttl_seconds,
                user: asked,
            },
            Principal::Certificate {
                identity,
                certificate,
            },
        ) => {
            if let Some(asked) = asked.filter(|a| a != &identity.user) {
                return error(format!(
                    "a certificate of user {:?} cannot log in as {asked:?}",
                    identity.user
                ));
            }
            let Ok(cert_text) = certificate.to_openssh() else {
                return error("the certificate cannot be encoded");
            };
            let mut client_rpc = shared.view.client();
            match client_rpc
                .renew_user_cert(proto::RenewUserCertRequest {
                    certificate: cert_text,
                    public_key,
                    ttl_seconds,
                })
                .await
            {
                Ok(r) => issued(r.into_inner()),
                Err(s) => error(s.message()),
            }
        }
        (DoorRequest::Ls, Principal::Certificate { identity, .. }) => {
            match shared.view.visible_nodes(&identity.roles).await {
                Ok(nodes) => DoorResponse::Ls {
                    nodes: nodes
                        .into_iter()
                        .map(|n| NodeEntry {
                            name: n.name,
                            addr: n.addr,
                            labels: n.labels,
                            id: n.id,
                        })
                        .collect(),
                },
                Err(e) => error(e.to_string()),
            }
        }
        (
            DoorRequest::RecordingsLs { user, since_ms },
            Principal::Certificate { certificate, .. },
        ) => {
            let Ok(cert) = certificate.to_openssh() else {
                return error("the certificate cannot be encoded");
            };
            match shared
                .view
                .client()
                .list_recordings(proto::ListRecordingsRequest {
                    certificate: cert,
                    user: user.unwrap_or_default(),
                    since_ms,
                    ..Default::default()
                })
                .await
            {
                Ok(r) => DoorResponse::Recordings {
                    recordings: r
                        .into_inner()
                        .recordings
                        .into_iter()
                        .map(|r| RecordingEntry {
                            sid: r.sid,
                            user: r.user,
                            login: r.login,
                            node: r.node_name,
                            start_ms: r.start_ms,
                            stop_ms: r.stop_ms,
                            size: r.size,
                            status: r.status,
                            parts: r.parts,
                            failure: r.failure,
                        })
                        .collect(),
                },
                Err(s) => error(s.message()),
            }
        }
        (
            DoorRequest::RecordingChunk {
                sid,
                offset,
                length,
            },
            Principal::Certificate { certificate, .. },
        ) => {
            use base64::Engine;
            let Ok(cert) = certificate.to_openssh() else {
                return error("the certificate cannot be encoded");
            };
            match shared
                .view
                .client()
                .get_recording_chunk(proto::GetRecordingChunkRequest {
                    certificate: cert,
                    sid,
                    offset,
                    length,
                    ..Default::default()
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    DoorResponse::Chunk {
                        data_base64: base64::engine::general_purpose::STANDARD.encode(&r.data),
                        total: r.total,
                    }
                }
                Err(s) => error(s.message()),
            }
        }
        (
            DoorRequest::Ls | DoorRequest::RecordingsLs { .. } | DoorRequest::RecordingChunk { .. },
            _,
        ) => error("this request needs a certificate; log in first (turnstile login)"),
    }
}

/// Serves one session channel opened on the proxy.
pub(crate) async fn serve_door(
    channel: Channel<Msg>,
    handle: Handle,
    shared: Arc<ProxyShared>,
    principal: Principal,
    client: SocketAddr,
    max_frame: usize,
) {
    let id = channel.id();
    let (mut reader, writer) = channel.split();
    let mut in_subsystem = false;
    let mut buf = Vec::new();
    let reply = |ok: bool| {
        let handle = handle.clone();
        async move {
            let _ = if ok {
                handle.channel_success(id).await
            } else {
                handle.channel_failure(id).await
            };
        }
    };
    loop {
        let msg = match tokio::time::timeout(DOOR_IDLE, reader.wait()).await {
            Ok(Some(msg)) => msg,
            Ok(None) | Err(_) => break,
        };
        match msg {
            ChannelMsg::RequestSubsystem { want_reply, name } => {
                let ok = name == SUBSYSTEM && !in_subsystem;
                in_subsystem |= ok;
                if want_reply {
                    reply(ok).await;
                }
            }
            ChannelMsg::RequestPty {
                want_reply: true, ..
            }
            | ChannelMsg::SetEnv {
                want_reply: true, ..
            } => reply(true).await,
            ChannelMsg::Exec { want_reply, .. } | ChannelMsg::RequestShell { want_reply } => {
                if want_reply {
                    reply(true).await;
                }
                let mut stderr = writer.make_writer_ext(Some(1));
                let _ = stderr.write_all(NO_SHELLS.as_bytes()).await;
                let _ = stderr.flush().await;
                let _ = writer.exit_status(1).await;
                break;
            }
            ChannelMsg::Data { data } if in_subsystem => {
                buf.extend_from_slice(&data);
                loop {
                    match door::decode_within::<DoorRequest>(&mut buf, max_frame) {
                        Ok(Some(request)) => {
                            let response = answer(&shared, &principal, client, request).await;
                            let mut out = writer.make_writer();
                            if out.write_all(&door::encode(&response)).await.is_err() {
                                break;
                            }
                            let _ = out.flush().await;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let mut out = writer.make_writer();
                            let _ = out.write_all(&door::encode(&error(e.to_string()))).await;
                            let _ = out.flush().await;
                            let _ = writer.eof().await;
                            let _ = writer.close().await;
                            return;
                        }
                    }
                }
            }
            ChannelMsg::Eof | ChannelMsg::Close => break,
            _ => {}
        }
    }
    let _ = writer.eof().await;
    let _ = writer.close().await;
}
