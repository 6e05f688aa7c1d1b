//! Running one session on a node connection: asks for a PTY when wanted,
//! starts the shell or command, copies standard input to the node and the
//! node's output to standard output and error, forwards resizes, and returns
//! the remote exit status (255 when there is none, as OpenSSH does).

use russh::ChannelMsg;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{ClientError, NodeConnection};

/// How much of the node's stderr is kept to compare a closing reason with.
const SAID_KEPT: usize = 4096;

/// The exit status when the remote side reported none.
pub const NO_EXIT_STATUS: u32 = 255;

#[derive(Debug, Clone, Default)]
pub struct SessionRequest {
    /// `None`: an interactive shell.
    pub command: Option<String>,
    /// A PTY of (term, columns, rows).
    pub pty: Option<(String, u32, u32)>,
    pub env: Vec<(String, String)>,
}

/// Runs the session; returns the remote exit status.
pub async fn run_session(
    conn: &NodeConnection,
    request: SessionRequest,
    mut stdin: impl AsyncRead + Unpin + Send + 'static,
    mut stdout: impl AsyncWrite + Unpin,
    mut stderr: impl AsyncWrite + Unpin,
    mut resize: Option<mpsc::Receiver<(u32, u32)>>,
) -> Result<u32, ClientError> {
    let channel = match conn.handle.channel_open_session().await {
        Ok(channel) => channel,
        Err(e) => {
            let text = conn.open_refusal(e).await;
            return Err(ClientError::ChannelRefused(text));
        }
    };
    let protocol = |e: russh::Error| ClientError::Protocol {
        host: "the node".into(),
        message: e.to_string(),
    };
    for (k, v) in &request.env {
        channel
            .set_env(false, k.as_str(), v.as_str())
            .await
            .map_err(protocol)?;
    }
    if let Some((term, cols, rows)) = &request.pty {
        channel
            .request_pty(false, term, *cols, *rows, 0, 0, &[])
            .await
            .map_err(protocol)?;
    }
    match &request.command {
        Some(cmd) => channel.exec(true, cmd.as_bytes()).await.map_err(protocol)?,
        None => channel.request_shell(true).await.map_err(protocol)?,
    }
    let (mut reader, writer) = channel.split();
    let writer = std::sync::Arc::new(writer);
    let input = {
        let writer = writer.clone();
        let interactive = request.pty.is_some();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        if !interactive {
                            let _ = writer.eof().await;
                        }
                        break;
                    }
                    Ok(n) => {
                        if writer
                            .data_bytes(bytes::Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        })
    };
    let resizer = resize.take().map(|mut events| {
        let writer = writer.clone();
        tokio::spawn(async move {
            while let Some((cols, rows)) = events.recv().await {
                let _ = writer.window_change(cols, rows, 0, 0).await;
            }
        })
    });
    let mut status = None;
    let mut started = false;
    // The end of what the node wrote to stderr, so that a reason it gave
    // there is not told twice.
    let mut said: Vec<u8> = Vec::new();
    while let Some(msg) = reader.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                stdout.write_all(&data).await.ok();
                stdout.flush().await.ok();
            }
            ChannelMsg::ExtendedData { data, .. } => {
                stderr.write_all(&data).await.ok();
                stderr.flush().await.ok();
                said.extend_from_slice(&data);
                if said.len() > SAID_KEPT {
                    said.drain(..said.len() - SAID_KEPT);
                }
            }
            ChannelMsg::Success => started = true,
            ChannelMsg::Failure if !started => {
                input.abort();
                return Err(ClientError::ChannelRefused(match &request.command {
                    Some(_) => "the node refused to run the command".into(),
                    None => "the node refused to start a shell".into(),
                }));
            }
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                stderr
                    .write_all(
                        format!("remote command killed by signal {signal_name:?}\r\n").as_bytes(),
                    )
                    .await
                    .ok();
                stderr.flush().await.ok();
                status = Some(NO_EXIT_STATUS);
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    input.abort();
    if let Some(r) = resizer {
        r.abort();
    }
    stdout.flush().await.ok();
    if status.is_none()
        && let Some(reason) = conn.closed_with().await
        && !String::from_utf8_lossy(&said).contains(&reason)
    {
        // The node says why on the session channel; when the proxy ended
        // the connection first, this is the only place the user reads it.
        stderr
            .write_all(format!("turnstile: the connection was closed: {reason}\r\n").as_bytes())
            .await
            .ok();
    }
    stderr.flush().await.ok();
    Ok(status.unwrap_or(NO_EXIT_STATUS))
}
