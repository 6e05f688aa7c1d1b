//! A terminal in the page: a WebSocket carrying a real SSH session. The
//! proxy asks auth for an ordinary, short-lived user certificate for a key it
//! keeps in memory for this terminal only, and connects through its own SSH
//! door as `turnstile ssh` does, so recording, session limits and their
//! messages are the ones every SSH client gets.
//!
//! Frames: binary from the page is keystrokes, binary to the page is output;
//! text frames are JSON: `{"resize":[cols,rows]}` from the page, and
//! `{"type":"ready"}`, `{"type":"error","message":…}`,
//! `{"type":"exit","status":…}` to it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use russh::ChannelMsg;
use serde::Deserialize;
use serde_json::json;
use turnstile_api::rpc::proto;
use turnstile_ssh::client::{self, UserCredentials};

use crate::Shared;

/// How often an open terminal checks that its web session still stands.
const SESSION_CHECK: Duration = Duration::from_secs(5);
/// The largest keystroke frame taken from the page.
const MAX_INPUT: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
pub(crate) struct TerminalQuery {
    pub node: String,
    pub login: String,
    #[serde(default = "default_cols")]
    pub cols: u32,
    #[serde(default = "default_rows")]
    pub rows: u32,
    /// The session's CSRF token (a WebSocket cannot carry headers).
    #[serde(default)]
    pub csrf: String,
}

fn default_cols() -> u32 {
    80
}

fn default_rows() -> u32 {
    24
}

#[derive(Debug, Deserialize)]
struct Control {
    resize: Option<(u32, u32)>,
}

async fn say(socket: &mut WebSocket, value: serde_json::Value) -> bool {
    socket
        .send(Message::Text(value.to_string().into()))
        .await
        .is_ok()
}

async fn fail(mut socket: WebSocket, message: String) {
    let _ = say(&mut socket, json!({ "type": "error", "message": message })).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "".into(),
        })))
        .await;
}

/// Runs one terminal until the session ends, the page goes, or the web
/// session does.
pub(crate) async fn run(
    shared: Arc<Shared>,
    client: std::net::SocketAddr,
    token: String,
    user: String,
    q: TerminalQuery,
    mut socket: WebSocket,
) {
    let key = turnstile_ssh::identity::generate_ed25519();
    let public_key = match key.public_key().to_openssh() {
        Ok(k) => k,
        Err(e) => return fail(socket, e.to_string()).await,
    };
    let issued = match shared
        .view
        .client()
        .generate_web_session_cert(proto::WebSessionCertRequest {
            token: token.clone(),
            public_key,
            client_addr: client.to_string(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return fail(socket, s.message().to_string()).await,
    };
    let certificate = match russh::keys::Certificate::from_openssh(&issued.certificate) {
        Ok(c) => c,
        Err(e) => return fail(socket, format!("auth sent a bad certificate: {e}")).await,
    };
    let creds = UserCredentials {
        key: Arc::new(key),
        certificate,
    };
    let trust = match shared.view.trust().await {
        Ok(t) => t,
        Err(e) => return fail(socket, e.to_string()).await,
    };
    let conn = match client::connect_via_proxy(
        &shared.proxy_addr,
        &q.node,
        &q.login,
        &creds,
        &trust,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return fail(socket, e.to_string()).await,
    };
    let channel = match conn.handle.channel_open_session().await {
        Ok(c) => c,
        Err(e) => return fail(socket, conn.open_refusal(e).await).await,
    };
    let cols = q.cols.clamp(10, 1000);
    let rows = q.rows.clamp(5, 500);
    if let Err(e) = channel
        .request_pty(false, "xterm-256color", cols, rows, 0, 0, &[])
        .await
    {
        return fail(socket, e.to_string()).await;
    }
    if let Err(e) = channel.request_shell(true).await {
        return fail(socket, e.to_string()).await;
    }
    tracing::info!(%user, node = %q.node, login = %q.login, "web terminal opened");
    let (mut reader, writer) = channel.split();
    let mut check = tokio::time::interval(SESSION_CHECK);
    check.tick().await;
    let mut status = None;
    let mut started = false;
    let ended: Option<String> = loop {
        tokio::select! {
            msg = reader.wait() => match msg {
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    if socket.send(Message::Binary(data.to_vec().into())).await.is_err() {
                        break None;
                    }
                }
                Some(ChannelMsg::Success) if !started => {
                    started = true;
                    if !say(&mut socket, json!({ "type": "ready" })).await {
                        break None;
                    }
                }
                Some(ChannelMsg::Failure) if !started => {
                    break Some("the node refused to start a shell".into());
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                Some(ChannelMsg::Close) | None => {
                    break match status {
                        Some(_) => None,
                        None => conn.closed_with().await,
                    };
                }
                Some(_) => {}
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Binary(data))) => {
                    if data.len() > MAX_INPUT {
                        break Some("a frame from the page was too large".into());
                    }
                    if writer.data_bytes(data).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if let Ok(Control { resize: Some((c, r)) }) = serde_json::from_str(&text) {
                        let _ = writer
                            .window_change(c.clamp(10, 1000), r.clamp(5, 500), 0, 0)
                            .await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    let _ = writer.close().await;
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = check.tick() => {
                if let Err(s) = shared
                    .view
                    .client()
                    .get_web_session(proto::WebSessionRequest { token: token.clone() })
                    .await
                {
                    let _ = writer.close().await;
                    break Some(s.message().to_string());
                }
            }
        }
    };
    match ended {
        Some(message) => fail(socket, message).await,
        None => {
            let _ = say(
                &mut socket,
                json!({ "type": "exit", "status": status.unwrap_or(255) }),
            )
            .await;
            let _ = socket.send(Message::Close(None)).await;
        }
    }
    tracing::info!(%user, node = %q.node, "web terminal closed");
}
