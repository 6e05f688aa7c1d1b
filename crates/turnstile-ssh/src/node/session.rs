//! One session channel on a node: collects `pty-req` and `env`, starts the
//! shell, command or subsystem (recorded through the one pipeline of
//! `turnstile-recording`, or refused if it cannot be), moves bytes both ways
//! with the channel's flow control, forwards resizes and signals, and reports
//! the exit status after the last byte of output. A closed channel hangs up
//! the session's processes; so does a recording that fails under `strict`.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelId, ChannelMsg, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use std::sync::Arc;

use tokio::sync::watch;
use turnstile_api::recording::{RecordingMode, RecordingPolicy};
use turnstile_recording::recorder::{
    Outcome, Recorder, SessionKind, SessionMeta, SessionRecording, SessionStart,
};

use super::forward::{AgentSlot, agent_path};
use super::process::{Launch, LocalUser, PtyInput, spawn_piped, spawn_pty};
use super::sftp_audit::{SftpAudit, SftpWho};
use crate::audit_forwarder::AuditForwarder;
use crate::live::Activity;
use crate::server::ConnectionInfo;

/// How long output may keep flowing after the process exits (background jobs
/// holding the terminal) before the exit status is sent anyway.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(2);

/// May a client set the variable `name`? As sshd's `AcceptEnv`: a pattern
/// of `accept` matches it (`*` any run, `?` one character). Turnstile's own
/// variables are never the client's to set.
fn env_allowed(accept: &[String], name: &str) -> bool {
    !name.starts_with("TURNSTILE_")
        && accept
            .iter()
            .any(|p| glob_match(p.as_bytes(), name.as_bytes()))
}

/// `*` and `?` wildcards, as sshd matches `AcceptEnv` patterns.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pattern[1..], text) || (!text.is_empty() && glob_match(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob_match(&pattern[1..], &text[1..]),
        _ => false,
    }
}

const SFTP_SERVERS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/lib/sftp-server",
    "/usr/libexec/sftp-server",
];

/// Who the session is for.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub sid: String,
    pub user: String,
    pub local_user: LocalUser,
    pub connection: ConnectionInfo,
    /// The proxy records this session and names it with `TURNSTILE_SESSION_ID`.
    pub sid_from_proxy: bool,
    pub recording: RecordingContext,
    /// The connection's last input, for `client_idle_timeout`.
    pub activity: Arc<Activity>,
    /// The forwarded agent, if the client asked and may.
    pub agent: AgentSlot,
    /// `ssh_service.accept_env`.
    pub accept_env: Vec<String>,
}

/// How this session is recorded, decided when it starts and kept for its life.
#[derive(Debug, Clone)]
pub struct RecordingContext {
    /// Record at all (not when a proxy records the session).
    pub enabled: bool,
    pub mode: RecordingMode,
    pub policy: RecordingPolicy,
    pub recorder: Arc<Recorder>,
    pub audit: Arc<AuditForwarder>,
    pub server_id: String,
    pub node_name: String,
}

enum Input {
    Data(Bytes),
    Resize(pty_process::Size),
}

struct Running {
    child: Child,
    input: Option<mpsc::Sender<Input>>,
    /// The task writing `input` to the process: ended with the session, so
    /// input the process never read cannot keep it alive.
    writing: Option<tokio::task::AbortHandle>,
    output: Vec<JoinHandle<()>>,
    recording: Option<Arc<SessionRecording>>,
    /// The audit reader of an SFTP session.
    sftp: Option<Arc<SftpAudit>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(writing) = self.writing.take() {
            writing.abort();
        }
        if let Some(sftp) = self.sftp.take() {
            sftp.finish();
        }
    }
}

fn pty_size(cols: u32, rows: u32) -> pty_process::Size {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX).max(1);
    pty_process::Size::new(clamp(rows), clamp(cols))
}

fn to_signal(sig: &Sig) -> Option<Signal> {
    Some(match sig {
        Sig::ABRT => Signal::SIGABRT,
        Sig::ALRM => Signal::SIGALRM,
        Sig::FPE => Signal::SIGFPE,
        Sig::HUP => Signal::SIGHUP,
        Sig::ILL => Signal::SIGILL,
        Sig::INT => Signal::SIGINT,
        Sig::KILL => Signal::SIGKILL,
        Sig::PIPE => Signal::SIGPIPE,
        Sig::QUIT => Signal::SIGQUIT,
        Sig::SEGV => Signal::SIGSEGV,
        Sig::TERM => Signal::SIGTERM,
        Sig::USR1 => Signal::SIGUSR1,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => Signal::SIGUSR2,
            "CONT" => Signal::SIGCONT,
            "STOP" => Signal::SIGSTOP,
            "TSTP" => Signal::SIGTSTP,
            "WINCH" => Signal::SIGWINCH,
            _ => return None,
        },
    })
}

fn from_signal(signal: i32) -> Sig {
    match Signal::try_from(signal) {
        Ok(Signal::SIGABRT) => Sig::ABRT,
        Ok(Signal::SIGALRM) => Sig::ALRM,
        Ok(Signal::SIGFPE) => Sig::FPE,
        Ok(Signal::SIGHUP) => Sig::HUP,
        Ok(Signal::SIGILL) => Sig::ILL,
        Ok(Signal::SIGINT) => Sig::INT,
        Ok(Signal::SIGKILL) => Sig::KILL,
        Ok(Signal::SIGPIPE) => Sig::PIPE,
        Ok(Signal::SIGQUIT) => Sig::QUIT,
        Ok(Signal::SIGSEGV) => Sig::SEGV,
        Ok(Signal::SIGTERM) => Sig::TERM,
        Ok(Signal::SIGUSR1) => Sig::USR1,
        Ok(other) => Sig::Custom(other.as_str().trim_start_matches("SIG").to_string()),
        Err(_) => Sig::Custom(signal.to_string()),
    }
}

/// The read buffer of [`pump`], at first and at most.
const PUMP_MIN: usize = 4 * 1024;
const PUMP_MAX: usize = 64 * 1024;

/// Copies `from` into `to` until end of file; a read error (EIO from a PTY
/// whose last holder closed it) is the end too. Output is recorded before the
/// user sees it; output that cannot be recorded is not shown.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    recording: Option<Arc<SessionRecording>>,
    sftp: Option<Arc<SftpAudit>>,
) {
    // Small while output trickles (a thousand interactive sessions hold a
    // thousand of these), grown when reads fill it (bulk output).
    let mut buf = vec![0u8; PUMP_MIN];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if n == buf.len() && buf.len() < PUMP_MAX {
                    buf.resize(buf.len() * 2, 0);
                }
                if let Some(r) = &recording
                    && r.print(&buf[..n]).await.is_err()
                {
                    break;
                }
                // Nothing reaches the user unaudited.
                if let Some(a) = &sftp
                    && !a.server_sent(&buf[..n])
                {
                    break;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.flush().await;
}

/// Resolves when the session's recording changes how it stands.
async fn outcome_changed(outcome: &mut Option<watch::Receiver<Outcome>>) -> Outcome {
    match outcome {
        Some(rx) => match rx.changed().await {
            Ok(()) => rx.borrow_and_update().clone(),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// What an `env` request sets: the proxy's session id (before the session
/// starts), or a variable the node accepts; anything else is ignored, as
/// sshd does.
fn take_env(
    ctx: &mut SessionContext,
    env: &mut Vec<(String, String)>,
    started: bool,
    name: String,
    value: String,
) {
    if name == "TURNSTILE_SESSION_ID" && ctx.sid_from_proxy {
        if !started && uuid::Uuid::parse_str(&value).is_ok() {
            ctx.sid = value;
        }
    } else if env_allowed(&ctx.accept_env, &name) {
        env.push((name, value));
    }
}

/// Serves one session channel until it closes or its process exits.
pub async fn serve_session(channel: Channel<Msg>, handle: Handle, mut ctx: SessionContext) {
    let id = channel.id();
    let (mut reader, writer) = channel.split();
    let mut pty: Option<(String, u32, u32)> = None;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut running: Option<Running> = None;
    let mut outcome: Option<watch::Receiver<Outcome>> = None;

    let reply = |ok: bool, want: bool| {
        let handle = handle.clone();
        async move {
            if want {
                let _ = if ok {
                    handle.channel_success(id).await
                } else {
                    handle.channel_failure(id).await
                };
            }
        }
    };

    loop {
        let exited = async {
            match running.as_mut() {
                Some(r) => r.child.wait().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = exited => {
                let Some(mut r) = running.take() else { break };
                drop(r.input.take());
                if let Some(writing) = r.writing.take() {
                    writing.abort();
                }
                let drain = futures::future::join_all(r.output.drain(..));
                let _ = tokio::time::timeout(OUTPUT_DRAIN_GRACE, drain).await;
                if let Some(rec) = r.recording.take() {
                    rec.end(status.and_then(|s| s.code())).await;
                }
                // The process may have died of the recording's failure (its
                // output pipe closed): say so, and report no status of its own.
                if let Some(Outcome::Ended(reason)) = outcome.as_ref().map(|o| o.borrow().clone()) {
                    let text = turnstile_recording::recorder::failure_message(&reason);
                    let _ = writer.extended_data_bytes(1, format!("\r\n{text}\r\n").into_bytes()).await;
                } else if let Some(status) = status {
                    if let Some(code) = status.code() {
                        let _ = writer.exit_status(u32::try_from(code).unwrap_or(255)).await;
                    } else if let Some(signal) = status.signal() {
                        let _ = handle
                            .exit_signal_request(id, from_signal(signal), status.core_dumped(), String::new(), String::new())
                            .await;
                    }
                }
                let _ = writer.eof().await;
                let _ = writer.close().await;
                break;
            }
            changed = outcome_changed(&mut outcome) => {
                let Some(text) = changed.message() else { continue };
                let _ = writer
                    .extended_data_bytes(1, format!("\r\n{text}\r\n").into_bytes())
                    .await;
                if matches!(changed, Outcome::Ended(_)) {
                    tracing::warn!(sid = %ctx.sid, user = %ctx.user, "ending the session: its recording cannot be written");
                    break;
                }
            }
            msg = reader.wait() => {
                let Some(msg) = msg else { break };
                match msg {
                    ChannelMsg::RequestPty { want_reply, term, col_width, row_height, .. } => {
                        let ok = running.is_none();
                        if ok {
                            pty = Some((term, col_width, row_height));
                        }
                        reply(ok, want_reply).await;
                    }
                    // No reply to `env`, ever: russh reports every `env` as
                    // wanting one, OpenSSH sends them without, and a stray
                    // failure is read as the reply to the `exec` that follows
                    // ("exec request failed"). A variable not accepted is
                    // ignored, as sshd does.
                    ChannelMsg::SetEnv { variable_name, variable_value, .. } => {
                        let started = running.is_some();
                        take_env(&mut ctx, &mut env, started, variable_name, variable_value);
                    }
                    ChannelMsg::RequestShell { want_reply } => {
                        let launch = Launch { command: None, program: None, env: env.clone(), term: None };
                        let ok = running.is_none() && start(&mut running, &mut outcome, &ctx, launch, SessionKind::Shell, &pty, &writer, id).await;
                        // Refused for its recording: the user reads why, and the
                        // channel closes (OpenSSH would drop the text on a failure).
                        reply(ok || outcome.is_some(), want_reply).await;
                        if !ok && outcome.is_some() { break; }
                    }
                    ChannelMsg::Exec { want_reply, command } => {
                        let command = String::from_utf8_lossy(&command).into_owned();
                        let kind = SessionKind::Exec(command.clone());
                        let launch = Launch { command: Some(command), program: None, env: env.clone(), term: None };
                        let ok = running.is_none() && start(&mut running, &mut outcome, &ctx, launch, kind, &pty, &writer, id).await;
                        // Refused for its recording: the user reads why, and the
                        // channel closes (OpenSSH would drop the text on a failure).
                        reply(ok || outcome.is_some(), want_reply).await;
                        if !ok && outcome.is_some() { break; }
                    }
                    ChannelMsg::RequestSubsystem { want_reply, name } => {
                        let program = (name == "sftp")
                            .then(|| SFTP_SERVERS.iter().find(|p| std::path::Path::new(p).exists()))
                            .flatten();
                        let ok = match program {
                            Some(p) if running.is_none() => {
                                let launch = Launch { command: None, program: Some(p.into()), env: env.clone(), term: None };
                                start(&mut running, &mut outcome, &ctx, launch, SessionKind::Subsystem(name), &None, &writer, id).await
                            }
                            _ => false,
                        };
                        // Refused for its recording: the user reads why, and the
                        // channel closes (OpenSSH would drop the text on a failure).
                        reply(ok || outcome.is_some(), want_reply).await;
                        if !ok && outcome.is_some() { break; }
                    }
                    ChannelMsg::WindowChange { col_width, row_height, .. } => {
                        if let Some((_, cols, rows)) = pty.as_mut() {
                            (*cols, *rows) = (col_width, row_height);
                        }
                        if let Some(rec) = running.as_ref().and_then(|r| r.recording.as_ref()) {
                            rec.resize(col_width, row_height).await;
                        }
                        if let Some(input) = running.as_ref().and_then(|r| r.input.as_ref()) {
                            let _ = input.send(Input::Resize(pty_size(col_width, row_height))).await;
                        }
                    }
                    ChannelMsg::Signal { signal } => {
                        if let (Some(r), Some(sig)) = (running.as_ref(), to_signal(&signal))
                            && let Some(pid) = r.child.id()
                        {
                            let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), sig);
                        }
                    }
                    ChannelMsg::Data { data } => {
                        ctx.activity.touch();
                        if let Some(rec) = running.as_ref().and_then(|r| r.recording.as_ref()) {
                            rec.received(data.len());
                        }
                        if let Some(input) = running.as_ref().and_then(|r| r.input.as_ref()) {
                            let _ = input.send(Input::Data(data)).await;
                        }
                    }
                    ChannelMsg::Eof => {
                        // Closing the input lets `cat`-like commands finish.
                        if let Some(r) = running.as_mut()
                            && pty.is_none()
                        {
                            r.input = None;
                        }
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
        }
    }
    // The channel is gone: hang up whatever still runs.
    if let Some(r) = running.as_mut() {
        if let Some(pid) = r.child.id() {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGHUP);
        }
        if let Some(rec) = r.recording.take() {
            rec.end(None).await;
        }
    }
    let _ = writer.eof().await;
    let _ = writer.close().await;
    tracing::debug!(sid = %ctx.sid, user = %ctx.user, "session channel finished");
}

/// Starts the shell, command or subsystem, recorded. Returns false if it
/// could not start; `outcome` is set if that was its recording's fault (the
/// user has read why on stderr; the channel is to be closed).
#[allow(clippy::too_many_arguments)]
async fn start(
    running: &mut Option<Running>,
    outcome: &mut Option<watch::Receiver<Outcome>>,
    ctx: &SessionContext,
    mut launch: Launch,
    kind: SessionKind,
    pty: &Option<(String, u32, u32)>,
    writer: &russh::ChannelWriteHalf<Msg>,
    id: ChannelId,
) -> bool {
    let (client, local) = (ctx.connection.client, ctx.connection.local);
    launch.env.extend([
        ("TURNSTILE_SESSION_ID".to_string(), ctx.sid.clone()),
        // As sshd sets them, with the user's own address even through a proxy.
        (
            "SSH_CLIENT".to_string(),
            format!("{} {} {}", client.ip(), client.port(), local.port()),
        ),
        (
            "SSH_CONNECTION".to_string(),
            format!(
                "{} {} {} {}",
                client.ip(),
                client.port(),
                local.ip(),
                local.port()
            ),
        ),
    ]);
    if let Some(path) = agent_path(&ctx.agent) {
        launch.env.push(("SSH_AUTH_SOCK".to_string(), path));
    }
    let is_sftp = matches!(&kind, SessionKind::Subsystem(name) if name == "sftp");
    let recording = match begin_recording(ctx, kind, pty).await {
        Ok(r) => r.map(Arc::new),
        Err(message) => {
            let _ = writer
                .extended_data_bytes(1, format!("{message}\r\n").into_bytes())
                .await;
            *outcome = Some(watch::channel(Outcome::Ended(message)).1);
            return false;
        }
    };
    let unrecorded_warning = recording.as_ref().and_then(|r| r.message());
    if let Some(text) = unrecorded_warning {
        let _ = writer
            .extended_data_bytes(1, format!("{text}\r\n").into_bytes())
            .await;
    }
    *outcome = recording.as_ref().map(|r| r.outcome());
    // File operations are audited in every recording mode, `off` too.
    let sftp = is_sftp.then(|| {
        SftpAudit::new(
            SftpWho {
                sid: ctx.sid.clone(),
                user: ctx.user.clone(),
                login: ctx.local_user.name.clone(),
                server_id: ctx.recording.server_id.clone(),
                remote_addr: ctx.connection.client.to_string(),
            },
            ctx.recording.audit.clone(),
        )
    });
    match spawn_process(ctx, launch, pty, writer, recording.clone(), sftp) {
        Ok(mut r) => {
            tracing::info!(sid = %ctx.sid, user = %ctx.user, login = %ctx.local_user.name, channel = ?id, "session started");
            r.recording = recording;
            *running = Some(r);
            true
        }
        Err(e) => {
            tracing::warn!(sid = %ctx.sid, error = %e, "cannot start the session's process");
            if let Some(rec) = recording {
                rec.end(None).await;
            }
            *outcome = None;
            false
        }
    }
}

fn spawn_process(
    ctx: &SessionContext,
    mut launch: Launch,
    pty: &Option<(String, u32, u32)>,
    writer: &russh::ChannelWriteHalf<Msg>,
    recorder: Option<Arc<SessionRecording>>,
    sftp: Option<Arc<SftpAudit>>,
) -> std::io::Result<Running> {
    let (tx, mut rx) = mpsc::channel::<Input>(64);
    let result = match pty {
        Some((term, cols, rows)) => {
            launch.term = Some(term.clone());
            let (child, pty) = spawn_pty(&ctx.local_user, &launch, pty_size(*cols, *rows))?;
            let input = PtyInput::new(&pty)?;
            let (read, write) = pty.into_split();
            let out = tokio::spawn(pump(read, writer.make_writer(), recorder.clone(), None));
            let writing = tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    match msg {
                        Input::Data(d) => {
                            if input.write_all(&d).await.is_err() {
                                break;
                            }
                        }
                        // `write` (pty-process's half) only resizes.
                        Input::Resize(size) => {
                            let _ = write.resize(size);
                        }
                    }
                }
            });
            Running {
                child,
                input: Some(tx),
                writing: Some(writing.abort_handle()),
                output: vec![out],
                recording: None,
                sftp: None,
            }
        }
        None => {
            let p = spawn_piped(&ctx.local_user, &launch)?;
            let out = tokio::spawn(pump(
                p.stdout,
                writer.make_writer(),
                recorder.clone(),
                sftp.clone(),
            ));
            let err = tokio::spawn(pump(
                p.stderr,
                writer.make_writer_ext(Some(1)),
                recorder.clone(),
                None,
            ));
            let mut stdin = p.stdin;
            let requests = sftp.clone();
            let writing = tokio::spawn(async move {
                while let Some(input) = rx.recv().await {
                    let Input::Data(d) = input else { continue };
                    // Nothing reaches sftp-server unaudited: its input
                    // closes, and it ends.
                    if let Some(a) = &requests
                        && !a.client_sent(&d)
                    {
                        break;
                    }
                    if stdin.write_all(&d).await.is_err() {
                        break;
                    }
                }
                // Dropping stdin here closes the process's input.
            });
            Running {
                child: p.child,
                input: Some(tx),
                writing: Some(writing.abort_handle()),
                output: vec![out, err],
                recording: None,
                sftp,
            }
        }
    };
    Ok(result)
}

/// Begins the session's recording in the cluster's mode (`None` when the
/// proxy records it). `Err`: the message for the user; the session must not
/// start.
async fn begin_recording(
    ctx: &SessionContext,
    kind: SessionKind,
    pty: &Option<(String, u32, u32)>,
) -> Result<Option<SessionRecording>, String> {
    let rc = &ctx.recording;
    if !rc.enabled {
        return Ok(None);
    }
    let start = SessionStart {
        meta: SessionMeta {
            sid: ctx.sid.clone(),
            server_id: rc.server_id.clone(),
            user: ctx.user.clone(),
            login: ctx.local_user.name.clone(),
            node_name: rc.node_name.clone(),
        },
        kind,
        pty: pty.clone(),
        mode: rc.mode,
        policy: rc.policy,
    };
    rc.recorder.begin(start, rc.audit.clone()).await.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_env_matches_as_sshd_and_never_turnstile_variables() {
        let accept: Vec<String> = super::super::DEFAULT_ACCEPT_ENV
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(env_allowed(&accept, "LANG"));
        assert!(env_allowed(&accept, "LC_ALL"));
        assert!(!env_allowed(&accept, "FOO"));
        assert!(!env_allowed(&accept, "LANGUAGE"));
        let all = vec!["*".to_string(), "X?".to_string()];
        assert!(env_allowed(&all, "FOO"));
        assert!(!env_allowed(&all, "TURNSTILE_SESSION_ID"));
        assert!(glob_match(b"X?", b"XY"));
        assert!(!glob_match(b"X?", b"XYZ"));
        assert!(glob_match(b"A*B*", b"AxxBy"));
    }
}
