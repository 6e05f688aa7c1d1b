//! Reads an SFTP (version 3) conversation as it passes between the client and
//! `sftp-server`, and turns its file operations into audit events: one per
//! file opened and closed (path, read or write, bytes), and one per remove,
//! rename, mkdir, rmdir and setstat, each with its outcome. The bytes are
//! only read, never altered or held back.
//!
//! Requests are matched to their replies by request id. A stream that stops
//! making sense (a packet over the protocol's size, which `sftp-server`
//! refuses too) cannot be audited: the session ends there, before the packet
//! is passed on, and that is logged. Nothing moves unaudited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};
use turnstile_api::audit::{Actor, AuditEvent};

use crate::audit_forwarder::AuditForwarder;

/// The largest packet read (OpenSSH's `sftp-server` allows 256 KiB).
const MAX_PACKET: usize = 256 * 1024 + 1024;

const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const SETSTAT: u8 = 9;
const FSETSTAT: u8 = 10;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const RENAME: u8 = 18;
const EXTENDED: u8 = 200;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;

const FXF_READ: u32 = 0x01;
const FXF_WRITE: u32 = 0x02;
const FXF_APPEND: u32 = 0x04;
const FXF_CREAT: u32 = 0x08;
const FXF_TRUNC: u32 = 0x10;

/// Who the conversation is for, stamped on every event.
#[derive(Debug, Clone)]
pub struct SftpWho {
    pub sid: String,
    pub user: String,
    pub login: String,
    pub server_id: String,
    pub remote_addr: String,
}

/// A request waiting for its reply.
#[derive(Debug)]
enum Pending {
    Open {
        path: String,
        flags: u32,
    },
    Close {
        handle: Vec<u8>,
    },
    Read {
        handle: Vec<u8>,
    },
    Write {
        handle: Vec<u8>,
        len: u64,
    },
    /// remove, mkdir, rmdir, setstat, rename: reported on their status.
    Change {
        action: &'static str,
        fields: Map<String, Value>,
    },
}

#[derive(Debug)]
struct OpenFile {
    path: String,
    flags: u32,
    read: u64,
    written: u64,
}

/// Bytes of one direction, cut into packets.
#[derive(Debug, Default)]
struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    /// Adds `bytes`; returns the whole packets now available (type and body,
    /// without the length), or `Err` if a packet is over the bound.
    fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, usize> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(len) = self.buf.get(..4) {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if len > MAX_PACKET {
                return Err(len);
            }
            if self.buf.len() < 4 + len {
                break;
            }
            out.push(self.buf[4..4 + len].to_vec());
            self.buf.drain(..4 + len);
        }
        Ok(out)
    }
}

/// Reads SSH wire types off a packet body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.0.get(..4)?;
        let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        self.0 = &self.0[4..];
        Some(v)
    }
    fn u64(&mut self) -> Option<u64> {
        let hi = u64::from(self.u32()?);
        let lo = u64::from(self.u32()?);
        Some(hi << 32 | lo)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        let b = self.0.get(..len)?;
        self.0 = &self.0[len..];
        Some(b)
    }
    fn string(&mut self) -> Option<String> {
        self.bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

#[derive(Debug, Default)]
struct State {
    from_client: Framer,
    from_server: Framer,
    pending: HashMap<u32, Pending>,
    open: HashMap<Vec<u8>, OpenFile>,
    /// Stopped reading: the stream made no sense.
    lost: bool,
}

/// The audit reader of one SFTP session.
pub struct SftpAudit {
    who: SftpWho,
    audit: Arc<AuditForwarder>,
    state: Mutex<State>,
}

fn flags_text(flags: u32) -> &'static str {
    match (flags & FXF_READ != 0, flags & (FXF_WRITE | FXF_APPEND) != 0) {
        (true, true) => "read,write",
        (false, true) => "write",
        _ => "read",
    }
}

impl SftpAudit {
    pub fn new(who: SftpWho, audit: Arc<AuditForwarder>) -> Arc<Self> {
        Arc::new(Self {
            who,
            audit,
            state: Mutex::new(State::default()),
        })
    }

    fn emit(&self, action: &str, error: Option<String>, mut fields: Map<String, Value>) {
        fields.insert("action".into(), json!(action));
        fields.insert("sid".into(), json!(self.who.sid));
        let actor = Actor {
            user: &self.who.user,
            login: &self.who.login,
            server_id: &self.who.server_id,
            remote_addr: &self.who.remote_addr,
        };
        let result = error.as_deref().map_or(Ok(()), Err);
        self.audit
            .emit(AuditEvent::channel("sftp", actor, result, fields));
    }

    /// Runs `f` on the state and emits its events; false once the stream
    /// can no longer be audited.
    fn with_state(&self, f: impl FnOnce(&mut State) -> Vec<Event>) -> bool {
        let (events, audited) = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.lost {
                return false;
            }
            let events = f(&mut state);
            (events, !state.lost)
        };
        for (action, error, fields) in events {
            self.emit(action, error, fields);
        }
        audited
    }

    /// Bytes the client sent to `sftp-server`. False: they cannot be
    /// audited, and must not be passed on (the session is to end).
    #[must_use]
    pub fn client_sent(&self, bytes: &[u8]) -> bool {
        self.with_state(|s| match s.from_client.feed(bytes) {
            Ok(packets) => {
                for p in packets {
                    request(s, &p);
                }
                Vec::new()
            }
            Err(len) => lose(s, "client", len),
        })
    }

    /// Bytes `sftp-server` sent to the client. False: as for
    /// [`SftpAudit::client_sent`].
    #[must_use]
    pub fn server_sent(&self, bytes: &[u8]) -> bool {
        self.with_state(|s| match s.from_server.feed(bytes) {
            Ok(packets) => packets.iter().filter_map(|p| reply(s, p)).collect(),
            Err(len) => lose(s, "server", len),
        })
    }

    /// The session ended: files still open are reported closed.
    pub fn finish(&self) {
        let _ = self.with_state(|s| {
            s.open
                .drain()
                .map(|(_, f)| ("close", None, closed_fields(&f)))
                .collect()
        });
    }
}

type Event = (&'static str, Option<String>, Map<String, Value>);

fn lose(s: &mut State, side: &str, len: usize) -> Vec<Event> {
    s.lost = true;
    tracing::warn!(
        side,
        len,
        "an SFTP packet over the protocol's size: the session ends, as its file operations cannot be audited"
    );
    Vec::new()
}

fn closed_fields(f: &OpenFile) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("path".into(), json!(f.path));
    m.insert("flags".into(), json!(flags_text(f.flags)));
    m.insert("bytes_read".into(), json!(f.read));
    m.insert("bytes_written".into(), json!(f.written));
    m
}

/// Notes a request, to be reported with its reply.
fn request(s: &mut State, packet: &[u8]) {
    let mut r = Reader(packet);
    let (Some(kind), Some(id)) = (r.u8(), r.u32()) else {
        return;
    };
    let path_change = |action: &'static str, r: &mut Reader| {
        let path = r.string()?;
        let mut fields = Map::new();
        fields.insert("path".into(), json!(path));
        Some(Pending::Change { action, fields })
    };
    let pending = match kind {
        OPEN => r
            .string()
            .zip(r.u32())
            .map(|(path, flags)| Pending::Open { path, flags }),
        CLOSE => r.bytes().map(|h| Pending::Close { handle: h.to_vec() }),
        READ => r.bytes().map(|h| Pending::Read { handle: h.to_vec() }),
        WRITE => (|| {
            let handle = r.bytes()?.to_vec();
            let _offset = r.u64()?;
            let len = r.bytes()?.len() as u64;
            Some(Pending::Write { handle, len })
        })(),
        REMOVE => path_change("remove", &mut r),
        MKDIR => path_change("mkdir", &mut r),
        RMDIR => path_change("rmdir", &mut r),
        SETSTAT => path_change("setstat", &mut r),
        FSETSTAT => r.bytes().and_then(|h| {
            let path = s.open.get(h).map(|f| f.path.clone())?;
            let mut fields = Map::new();
            fields.insert("path".into(), json!(path));
            Some(Pending::Change {
                action: "setstat",
                fields,
            })
        }),
        RENAME => rename(&mut r),
        EXTENDED => match r.string().as_deref() {
            Some("posix-rename@openssh.com") => rename(&mut r),
            Some("lsetstat@openssh.com") => path_change("setstat", &mut r),
            _ => None,
        },
        _ => None,
    };
    if let Some(p) = pending {
        s.pending.insert(id, p);
    }
}

fn rename(r: &mut Reader) -> Option<Pending> {
    let from = r.string()?;
    let to = r.string()?;
    let mut fields = Map::new();
    fields.insert("path".into(), json!(from));
    fields.insert("new_path".into(), json!(to));
    Some(Pending::Change {
        action: "rename",
        fields,
    })
}

/// Matches a reply to its request; the event it completes, if any.
fn reply(s: &mut State, packet: &[u8]) -> Option<Event> {
    let mut r = Reader(packet);
    let kind = r.u8()?;
    let id = r.u32()?;
    let pending = s.pending.remove(&id)?;
    // A status's error text, `None` for success.
    let status = |r: &mut Reader| -> Option<Option<String>> {
        let code = r.u32()?;
        if code == 0 {
            return Some(None);
        }
        let message = r.string().unwrap_or_default();
        Some(Some(if message.is_empty() {
            format!("SFTP status {code}")
        } else {
            message
        }))
    };
    match (pending, kind) {
        (Pending::Open { path, flags }, HANDLE) => {
            let handle = r.bytes()?.to_vec();
            let mut fields = Map::new();
            fields.insert("path".into(), json!(path));
            fields.insert("flags".into(), json!(flags_text(flags)));
            if flags & (FXF_CREAT | FXF_TRUNC) != 0 {
                fields.insert("create".into(), json!(flags & FXF_CREAT != 0));
            }
            s.open.insert(
                handle,
                OpenFile {
                    path,
                    flags,
                    read: 0,
                    written: 0,
                },
            );
            Some(("open", None, fields))
        }
        (Pending::Open { path, flags }, STATUS) => {
            let error = status(&mut r)?.unwrap_or_else(|| "no handle".into());
            let mut fields = Map::new();
            fields.insert("path".into(), json!(path));
            fields.insert("flags".into(), json!(flags_text(flags)));
            Some(("open", Some(error), fields))
        }
        (Pending::Read { handle }, DATA) => {
            let n = r.bytes()?.len() as u64;
            if let Some(f) = s.open.get_mut(&handle) {
                f.read += n;
            }
            None
        }
        (Pending::Write { handle, len }, STATUS) => {
            if status(&mut r)?.is_none()
                && let Some(f) = s.open.get_mut(&handle)
            {
                f.written += len;
            }
            None
        }
        (Pending::Close { handle }, STATUS) => {
            // Directories are closed too; only files were reported open.
            let f = s.open.remove(&handle)?;
            Some(("close", None, closed_fields(&f)))
        }
        (Pending::Change { action, fields }, STATUS) => Some((action, status(&mut r)?, fields)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn packet(kind: u8, id: u32, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut p = vec![kind];
        p.extend_from_slice(&id.to_be_bytes());
        body(&mut p);
        let mut out = (p.len() as u32).to_be_bytes().to_vec();
        out.extend(p);
        out
    }

    fn status(id: u32, code: u32, msg: &str) -> Vec<u8> {
        packet(STATUS, id, |p| {
            p.extend_from_slice(&code.to_be_bytes());
            string(p, msg.as_bytes());
            string(p, b"");
        })
    }

    fn state_events(s: &mut State, client: &[Vec<u8>], server: &[Vec<u8>]) -> Vec<Event> {
        let mut events = Vec::new();
        for (c, r) in client.iter().zip(server) {
            for p in s.from_client.feed(c).unwrap() {
                request(s, &p);
            }
            for p in s.from_server.feed(r).unwrap() {
                events.extend(reply(s, &p));
            }
        }
        events
    }

    #[test]
    fn a_written_file_is_opened_and_closed_with_its_bytes() {
        let mut s = State::default();
        let open = packet(OPEN, 1, |p| {
            string(p, b"/tmp/up.bin");
            p.extend_from_slice(&(FXF_WRITE | FXF_CREAT | FXF_TRUNC).to_be_bytes());
            p.extend_from_slice(&0u32.to_be_bytes());
        });
        let handle = packet(HANDLE, 1, |p| string(p, b"h1"));
        let write = |id: u32, n: usize| {
            packet(WRITE, id, |p| {
                string(p, b"h1");
                p.extend_from_slice(&0u64.to_be_bytes());
                string(p, &vec![7u8; n]);
            })
        };
        let close = packet(CLOSE, 4, |p| string(p, b"h1"));
        // The first write's packet arrives in two pieces.
        let w2 = write(2, 1000);
        let (a, b) = w2.split_at(10);
        let events = state_events(
            &mut s,
            &[open, a.to_vec(), b.to_vec(), write(3, 24), close],
            &[
                handle,
                vec![],
                status(2, 0, ""),
                status(3, 0, ""),
                status(4, 0, ""),
            ],
        );
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].0, "open");
        assert_eq!(events[0].2["flags"], "write");
        assert_eq!(events[1].0, "close");
        assert_eq!(events[1].2["path"], "/tmp/up.bin");
        assert_eq!(events[1].2["bytes_written"], 1024);
        assert_eq!(events[1].2["bytes_read"], 0);
    }

    #[test]
    fn changes_are_reported_with_their_outcome() {
        let mut s = State::default();
        let remove = packet(REMOVE, 9, |p| string(p, b"/etc/shadow"));
        let rename = packet(EXTENDED, 10, |p| {
            string(p, b"posix-rename@openssh.com");
            string(p, b"/tmp/a");
            string(p, b"/tmp/b");
        });
        let events = state_events(
            &mut s,
            &[remove, rename],
            &[status(9, 3, "Permission denied"), status(10, 0, "")],
        );
        assert_eq!(events[0].0, "remove");
        assert_eq!(events[0].1.as_deref(), Some("Permission denied"));
        assert_eq!(events[1].0, "rename");
        assert_eq!(events[1].1, None);
        assert_eq!(events[1].2["new_path"], "/tmp/b");
    }

    #[test]
    fn an_oversized_packet_stops_the_reading_not_the_stream() {
        let mut f = Framer::default();
        let huge = ((MAX_PACKET + 1) as u32).to_be_bytes();
        assert!(f.feed(&huge).is_err());
    }
}
