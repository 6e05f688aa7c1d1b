//! The local terminal during an interactive session: raw mode for as long as a
//! guard lives, the window size, and resize notifications.

use std::io::IsTerminal;

use rustix::termios::{OptionalActions, Termios, tcgetattr, tcgetwinsize, tcsetattr};
use tokio::sync::mpsc;

/// Is standard input a terminal?
pub fn stdin_is_tty() -> bool {
    std::io::stdin().is_terminal()
}

pub fn stdout_is_tty() -> bool {
    std::io::stdout().is_terminal()
}

/// (columns, rows) of the terminal on standard output, or on standard input.
pub fn window_size() -> Option<(u32, u32)> {
    let ws = tcgetwinsize(std::io::stdout())
        .or_else(|_| tcgetwinsize(std::io::stdin()))
        .ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then(|| (u32::from(ws.ws_col), u32::from(ws.ws_row)))
}

/// Puts standard input in raw mode; restores the previous mode on drop.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> std::io::Result<Self> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

/// Sends the new (columns, rows) every time the terminal is resized.
pub fn resize_events() -> Option<mpsc::Receiver<(u32, u32)>> {
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok()?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if let Some(size) = window_size()
                && tx.send(size).await.is_err()
            {
                break;
            }
        }
    });
    Some(rx)
}
