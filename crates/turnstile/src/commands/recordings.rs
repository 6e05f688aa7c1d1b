//! `turnstile play` and `turnstile recordings ls|export`: recorded sessions
//! fetched through the proxy with the user's certificate (their own, or all
//! with a role rule for sessions), replayed or converted here.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::json;
use turnstile_recording::player::{FrameKind, position_at, timeline};
use turnstile_recording::{RecordingEvent, asciicast, event, reader};
use turnstile_ssh::client::door::{fetch_recording, list_recordings};
use turnstile_ssh::client::terminal::{RawMode, stdin_is_tty, stdout_is_tty};

use crate::cli::{ClientArgs, ExportFormat, Format, PlayArgs, PlayFormat, RecordingsCommand};
use crate::profile::client_identity;

/// Bytes arriving from the fetch, read as a stream by the decoder's thread.
struct Chunks {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl std::io::Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => (self.chunk, self.at) = (chunk, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Where decoded events go, one at a time.
trait EventSink: Send + 'static {
    fn event(&mut self, e: RecordingEvent) -> std::io::Result<()>;
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The output alone (`play --format text`).
struct TextOut(std::io::BufWriter<std::io::Stdout>);

impl EventSink for TextOut {
    fn event(&mut self, e: RecordingEvent) -> std::io::Result<()> {
        if e.event == event::PRINT {
            self.0.write_all(&e.data)?;
        }
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The events as JSON lines (`play --format json`).
struct JsonOut(std::io::BufWriter<std::io::Stdout>);

impl EventSink for JsonOut {
    fn event(&mut self, e: RecordingEvent) -> std::io::Result<()> {
        writeln!(self.0, "{}", event::to_json(&e))
    }
    fn finish(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// asciicast v2 (`recordings export`).
struct CastOut(std::io::BufWriter<Box<dyn Write + Send>>, asciicast::Writer);

impl EventSink for CastOut {
    fn event(&mut self, e: RecordingEvent) -> std::io::Result<()> {
        self.0.write_all(self.1.event(&e).as_bytes())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Every event (the timed player seeks back and forth, so it keeps them).
struct Collect(Vec<RecordingEvent>);

impl EventSink for Collect {
    fn event(&mut self, e: RecordingEvent) -> std::io::Result<()> {
        self.0.push(e);
        Ok(())
    }
}

/// Fetches a recording and decodes it as it arrives, handing every event in
/// order to `sink` (on a blocking thread); memory does not grow with the
/// recording unless the sink keeps the events. Returns the sink.
async fn for_each_event<S: EventSink>(
    client: &ClientArgs,
    sid: &str,
    mut sink: S,
) -> anyhow::Result<S> {
    if uuid::Uuid::parse_str(sid).is_err() {
        anyhow::bail!("{sid:?} is not a session id; see `turnstile recordings ls`");
    }
    let (identity, proxy) = client_identity(client)?;
    let show = stdout_is_tty() || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let decoder = tokio::task::spawn_blocking(move || -> anyhow::Result<S> {
        let chunks = Chunks {
            rx,
            chunk: Vec::new(),
            at: 0,
        };
        let mut reader =
            reader::EventReader::new(std::io::BufReader::with_capacity(1 << 16, chunks));
        while let Some(e) = reader
            .next_event()
            .context("the recording cannot be read")?
        {
            match sink.event(e) {
                Ok(()) => {}
                // `| head`: the reader stopped reading; so do we.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(sink),
                Err(e) => return Err(e.into()),
            }
        }
        match sink.finish() {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
            _ => Ok(sink),
        }
    });
    let fetched = fetch_recording(
        &proxy,
        &identity.trust,
        &identity.credentials,
        sid,
        tx,
        |got, total| {
            if show && total > 4 << 20 {
                eprint!(
                    "\rfetching the recording: {} of {} MiB",
                    got >> 20,
                    total >> 20
                );
            }
        },
    )
    .await;
    if show {
        eprint!("\r\x1b[K");
    }
    let decoded = decoder.await?;
    fetched?;
    decoded
}

fn rfc3339_ms(ms: i64) -> String {
    humantime::format_rfc3339_seconds(
        UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
    )
    .to_string()
}

pub async fn play(args: PlayArgs) -> anyhow::Result<()> {
    let format = args.format.unwrap_or(if stdout_is_tty() {
        PlayFormat::Tty
    } else {
        PlayFormat::Text
    });
    let stdout = || std::io::BufWriter::new(std::io::stdout());
    match format {
        // Streamed: printed as the recording arrives.
        PlayFormat::Json => {
            for_each_event(&args.client, &args.sid, JsonOut(stdout())).await?;
        }
        PlayFormat::Text => {
            for_each_event(&args.client, &args.sid, TextOut(stdout())).await?;
        }
        PlayFormat::Tty => {
            let Collect(events) =
                for_each_event(&args.client, &args.sid, Collect(Vec::new())).await?;
            let max_idle = (args.max_idle > 0.0).then(|| Duration::from_secs_f64(args.max_idle));
            replay(&events, args.speed, max_idle).await?;
        }
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Key {
    Pause,
    Back,
    Forward,
    Quit,
}

/// The key a read from the terminal holds. Arrows come as `ESC [ x`, or as
/// `ESC O x` once a replayed program (top, vim) turned on the terminal's
/// application cursor mode.
fn key_of(read: &[u8]) -> Option<Key> {
    match read {
        b" " => Some(Key::Pause),
        b"q" | b"Q" | [3] | [4] => Some(Key::Quit),
        [27, b'[' | b'O', b'D' | b'B'] => Some(Key::Back),
        [27, b'[' | b'O', b'C' | b'A'] => Some(Key::Forward),
        _ => None,
    }
}

/// Replays in this terminal with the original timing; keys pause, seek, quit.
async fn replay(
    events: &[RecordingEvent],
    speed: f64,
    max_idle: Option<Duration>,
) -> anyhow::Result<()> {
    let frames = timeline(events, speed, max_idle);
    let _raw = if stdin_is_tty() {
        RawMode::enable().ok()
    } else {
        None
    };
    let (tx, mut keys) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 16];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let Some(key) = key_of(&buf[..n]) else {
                continue;
            };
            if tx.send(key).await.is_err() {
                break;
            }
        }
    });
    let mut out = std::io::stdout();
    let show = |out: &mut std::io::Stdout, kind: &FrameKind| -> std::io::Result<()> {
        match kind {
            FrameKind::Output(data) => out.write_all(data)?,
            FrameKind::Resize { cols, rows } => write!(out, "\x1b[8;{rows};{cols}t")?,
        }
        out.flush()
    };
    write!(out, "\x1b[2J\x1b[H")?;
    out.flush()?;
    let mut idx = 0usize;
    let mut origin = tokio::time::Instant::now();
    let mut paused_at: Option<Duration> = None;
    let step = Duration::from_secs(5);
    while idx < frames.len() {
        let position = paused_at.unwrap_or_else(|| origin.elapsed());
        let wait = frames[idx].at.saturating_sub(position);
        tokio::select! {
            _ = tokio::time::sleep(wait), if paused_at.is_none() => {
                show(&mut out, &frames[idx].kind)?;
                idx += 1;
            }
            key = keys.recv() => {
                let Some(key) = key else { continue };
                let seek = |target: Duration, out: &mut std::io::Stdout| -> std::io::Result<usize> {
                    write!(out, "\x1b[2J\x1b[H")?;
                    let to = position_at(&frames, target);
                    for f in &frames[..to] {
                        show(out, &f.kind)?;
                    }
                    Ok(to)
                };
                match key {
                    Key::Quit => break,
                    Key::Pause => match paused_at.take() {
                        Some(p) => origin = tokio::time::Instant::now() - p,
                        None => paused_at = Some(position),
                    },
                    Key::Back | Key::Forward => {
                        let target = if matches!(key, Key::Back) {
                            position.saturating_sub(step)
                        } else {
                            position + step
                        };
                        idx = seek(target, &mut out)?;
                        if paused_at.is_some() {
                            paused_at = Some(target);
                        } else {
                            origin = tokio::time::Instant::now() - target;
                        }
                    }
                }
            }
        }
    }
    write!(out, "\r\n")?;
    out.flush()?;
    Ok(())
}

pub async fn run(cmd: RecordingsCommand) -> anyhow::Result<()> {
    match cmd {
        RecordingsCommand::Ls {
            client,
            user,
            since,
            format,
        } => {
            let since_ms = match since {
                Some(s) => {
                    let ago = turnstile_api::duration::parse(&s)
                        .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
                    i64::try_from(
                        (SystemTime::now() - ago)
                            .duration_since(UNIX_EPOCH)?
                            .as_millis(),
                    )?
                }
                None => 0,
            };
            let (identity, proxy) = client_identity(&client)?;
            let list = list_recordings(
                &proxy,
                &identity.trust,
                &identity.credentials,
                user,
                since_ms,
            )
            .await?;
            if format == Format::Json {
                for r in &list {
                    crate::outln!(
                        "{}",
                        json!({
                            "sid": r.sid, "user": r.user, "login": r.login, "node": r.node,
                            "start": rfc3339_ms(r.start_ms),
                            "duration_ms": (r.stop_ms - r.start_ms).max(0),
                            "size": r.size, "status": r.status, "parts": r.parts,
                            "failure": r.failure,
                        })
                    );
                }
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|r| {
                    vec![
                        r.sid.clone(),
                        r.user.clone(),
                        r.login.clone(),
                        r.node.clone(),
                        rfc3339_ms(r.start_ms),
                        if r.stop_ms > 0 {
                            turnstile_api::duration::format(Duration::from_millis(
                                u64::try_from(r.stop_ms - r.start_ms).unwrap_or(0) / 1000 * 1000,
                            ))
                        } else {
                            "-".into()
                        },
                        r.size.to_string(),
                        r.status.clone(),
                    ]
                })
                .collect();
            crate::commands::admin::print_table(
                &[
                    "SID", "USER", "LOGIN", "NODE", "START", "DURATION", "SIZE", "STATUS",
                ],
                &rows,
            );
            Ok(())
        }
        RecordingsCommand::Export {
            client,
            sid,
            format: ExportFormat::Asciicast,
            output,
        } => {
            let out: Box<dyn Write + Send> = match &output {
                Some(path) => Box::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot write {}", path.display()))?,
                ),
                None => Box::new(std::io::stdout()),
            };
            let sink = CastOut(std::io::BufWriter::new(out), asciicast::Writer::default());
            for_each_event(&client, &sid, sink).await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrows_seek_in_either_cursor_mode() {
        for (read, key) in [
            (&b"\x1b[C"[..], Key::Forward),
            (b"\x1bOC", Key::Forward),
            (b"\x1b[A", Key::Forward),
            (b"\x1bOA", Key::Forward),
            (b"\x1b[D", Key::Back),
            (b"\x1bOD", Key::Back),
            (b"\x1bOB", Key::Back),
            (b" ", Key::Pause),
            (b"q", Key::Quit),
        ] {
            assert_eq!(key_of(read), Some(key), "{read:?}");
        }
        assert_eq!(key_of(b"x"), None);
    }
}
