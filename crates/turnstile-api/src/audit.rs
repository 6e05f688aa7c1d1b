//! Audit events: typed values with the field names of the audit log (one JSON
//! object per line). They travel through the `AuditLog` of the auth service,
//! never through `tracing`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Which limit refused a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessctlKind {
    /// `max_connections`: concurrent connections to nodes, cluster-wide.
    Connection,
    /// `max_sessions`: session channels on one connection.
    Session,
}

impl SessctlKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessctlKind::Connection => "connection",
            SessctlKind::Session => "session",
        }
    }
}

/// An event as it happened; `time` and `uid` are stamped when it is written.
/// (De)serializes for the trip from a node to auth; [`AuditEvent::to_json`]
/// is the form in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A login attempt with a password at the proxy.
    UserLogin {
        user: String,
        method: String,
        success: bool,
        error: Option<String>,
        remote_addr: String,
    },
    /// A session's start, resize, command, end, byte counts or completed
    /// upload (everything recorded but its output).
    SessionEvent {
        event: String,
        sid: String,
        server_id: String,
        user: String,
        login: String,
        fields: Map<String, Value>,
    },
    /// A session-control limit refused a connection or a session channel.
    SessctlLimit {
        user: String,
        login: String,
        remote_addr: String,
        server_id: String,
        max: u32,
        sessctl_kind: SessctlKind,
    },
    /// An administrator changed the cluster: a user, role, token, lock or
    /// setting. `user` is who did it; `target` what was changed.
    AdminChange {
        event: String,
        user: String,
        target: String,
        fields: Map<String, Value>,
    },
    /// Access refused: a certificate not accepted, a login or node not
    /// allowed, a lock, a user no longer in the cluster.
    AccessDenied {
        user: String,
        login: String,
        server_id: String,
        remote_addr: String,
        reason: String,
    },
    /// Auth received events of a host's queue with numbers missing before
    /// them: events were lost on the host (its queue was removed, or a crash
    /// cut its last batch).
    AuditGap {
        server_id: String,
        queue_id: String,
        missing_from: u64,
        missing_to: u64,
    },
    /// Something a connection did besides a session, allowed or refused: a
    /// port forward (`port`), agent forwarding (`agent.forward`), X11
    /// forwarding (`x11-forward`), a file operation over SFTP (`sftp`, its
    /// `action` in the fields).
    ChannelEvent {
        event: String,
        user: String,
        login: String,
        server_id: String,
        remote_addr: String,
        success: bool,
        fields: Map<String, Value>,
    },
    /// Turnstile ended a live connection: a lock, a removed user, idleness,
    /// an expired certificate, shutdown.
    ClientDisconnect {
        user: String,
        login: String,
        server_id: String,
        remote_addr: String,
        reason: String,
    },
}

/// Every event the audit log can hold, with its code: the list that
/// `docs/audit-events.md` documents (a test holds the two together).
pub const CATALOGUE: &[(&str, &str)] = &[
    ("user.login", "T1000I"),
    ("user.login", "T1000W"),
    ("user.create", "T1002I"),
    ("user.update", "T1003I"),
    ("user.delete", "T1004I"),
    ("user.password_change", "T1005I"),
    ("sessctl.limit", "T1006W"),
    ("session.start", "T2000I"),
    ("resize", "T2002I"),
    ("session.end", "T2004I"),
    ("session.upload", "T2005I"),
    ("session.data", "T2006I"),
    ("recording.failed", "T2010W"),
    ("recording.failed", "T2010E"),
    ("exec", "T3002I"),
    ("exec", "T3002E"),
    ("port", "T3003I"),
    ("port", "T3003E"),
    ("client.disconnect", "T3006I"),
    ("auth", "T3007W"),
    ("x11-forward", "T3008W"),
    ("sftp", "TS001I"),
    ("sftp", "TS001E"),
    ("sftp", "TS002I"),
    ("sftp", "TS007I"),
    ("sftp", "TS007E"),
    ("sftp", "TS011I"),
    ("sftp", "TS011E"),
    ("sftp", "TS012I"),
    ("sftp", "TS012E"),
    ("sftp", "TS013I"),
    ("sftp", "TS013E"),
    ("sftp", "TS016I"),
    ("sftp", "TS016E"),
    ("role.created", "T9000I"),
    ("role.deleted", "T9001I"),
    ("role.updated", "T9002I"),
    ("join_token.create", "TJT00I"),
    ("lock.created", "TLK00I"),
    ("lock.deleted", "TLK01I"),
    ("cluster_config.update", "TST00I"),
    ("semaphore.release", "TST01I"),
    ("audit.gap", "TST02W"),
    ("agent.forward", "TST03I"),
    ("agent.forward", "TST03W"),
];

/// The code of a [`AuditEvent::ChannelEvent`].
fn channel_event_code(event: &str, success: bool, fields: &Map<String, Value>) -> &'static str {
    let pick = |ok: &'static str, failed: &'static str| if success { ok } else { failed };
    match event {
        "port" => pick("T3003I", "T3003E"),
        "x11-forward" => "T3008W",
        "agent.forward" => pick("TST03I", "TST03W"),
        "sftp" => match fields.get("action").and_then(Value::as_str).unwrap_or("") {
            "open" => pick("TS001I", "TS001E"),
            "close" => "TS002I",
            "setstat" => pick("TS007I", "TS007E"),
            "remove" => pick("TS011I", "TS011E"),
            "mkdir" => pick("TS012I", "TS012E"),
            "rmdir" => pick("TS013I", "TS013E"),
            "rename" => pick("TS016I", "TS016E"),
            _ => "T0000I",
        },
        _ => "T0000I",
    }
}

/// The code of an event named `name` with one code; `T0000I` for an unknown name.
fn code_of(name: &str) -> &'static str {
    CATALOGUE
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("T0000I", |(_, c)| c)
}

/// The most of a text an event keeps from what a client sent (a user name
/// from an unverified certificate, a reason quoting it).
pub const MAX_CLIENT_TEXT: usize = 1024;

/// `text`, cut to [`MAX_CLIENT_TEXT`] bytes at a character boundary.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_CLIENT_TEXT {
        return text.to_string();
    }
    let mut end = MAX_CLIENT_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl AuditEvent {
    /// An administrator's change of the cluster.
    pub fn admin<const N: usize>(
        event: &str,
        actor: &str,
        target: &str,
        fields: [(&str, String); N],
    ) -> AuditEvent {
        AuditEvent::AdminChange {
            event: event.to_string(),
            user: actor.to_string(),
            target: target.to_string(),
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), Value::String(v)))
                .collect(),
        }
    }
}

/// Who did something on which host, from where: the common part of an
/// [`AuditEvent::ChannelEvent`].
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub user: &'a str,
    pub login: &'a str,
    pub server_id: &'a str,
    pub remote_addr: &'a str,
}

impl AuditEvent {
    /// A [`AuditEvent::ChannelEvent`]; `Err(reason)` makes it a refusal or
    /// failure, with the reason in `error`.
    pub fn channel(
        event: &str,
        actor: Actor<'_>,
        result: Result<(), &str>,
        mut fields: Map<String, Value>,
    ) -> Self {
        if let Err(reason) = result {
            fields.insert("error".into(), json!(reason));
        }
        AuditEvent::ChannelEvent {
            event: event.to_string(),
            user: actor.user.to_string(),
            login: actor.login.to_string(),
            server_id: actor.server_id.to_string(),
            remote_addr: actor.remote_addr.to_string(),
            success: result.is_ok(),
            fields,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            AuditEvent::UserLogin { .. } => "user.login",
            AuditEvent::SessctlLimit { .. } => "sessctl.limit",
            AuditEvent::SessionEvent { event, .. }
            | AuditEvent::AdminChange { event, .. }
            | AuditEvent::ChannelEvent { event, .. } => event,
            AuditEvent::AccessDenied { .. } => "auth",
            AuditEvent::AuditGap { .. } => "audit.gap",
            AuditEvent::ClientDisconnect { .. } => "client.disconnect",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AuditEvent::UserLogin { success: true, .. } => "T1000I",
            AuditEvent::UserLogin { success: false, .. } => "T1000W",
            AuditEvent::SessctlLimit { .. } => "T1006W",
            AuditEvent::SessionEvent { event, fields, .. } => match event.as_str() {
                "session.start" => "T2000I",
                "resize" => "T2002I",
                "session.end" => "T2004I",
                "session.upload" => "T2005I",
                "session.data" => "T2006I",
                "exec" if fields.get("exitCode").and_then(Value::as_i64).unwrap_or(0) != 0 => {
                    "T3002E"
                }
                "exec" => "T3002I",
                "recording.failed"
                    if fields.get("action").and_then(Value::as_str) == Some("session ended") =>
                {
                    "T2010E"
                }
                "recording.failed" => "T2010W",
                other => code_of(other),
            },
            AuditEvent::ChannelEvent {
                event,
                success,
                fields,
                ..
            } => channel_event_code(event, *success, fields),
            other => code_of(other.name()),
        }
    }

    pub fn user(&self) -> &str {
        match self {
            AuditEvent::UserLogin { user, .. }
            | AuditEvent::SessctlLimit { user, .. }
            | AuditEvent::SessionEvent { user, .. }
            | AuditEvent::AdminChange { user, .. }
            | AuditEvent::AccessDenied { user, .. }
            | AuditEvent::ChannelEvent { user, .. }
            | AuditEvent::ClientDisconnect { user, .. } => user,
            AuditEvent::AuditGap { .. } => "",
        }
    }

    /// The host that saw it, if one did (auth checks it is the caller).
    pub fn server_id(&self) -> Option<&str> {
        match self {
            AuditEvent::SessctlLimit { server_id, .. }
            | AuditEvent::SessionEvent { server_id, .. }
            | AuditEvent::AccessDenied { server_id, .. }
            | AuditEvent::ChannelEvent { server_id, .. }
            | AuditEvent::ClientDisconnect { server_id, .. }
            | AuditEvent::AuditGap { server_id, .. } => Some(server_id),
            AuditEvent::UserLogin { .. } | AuditEvent::AdminChange { .. } => None,
        }
    }

    /// The JSON object written to the log.
    pub fn to_json(&self, time: &str, uid: &str) -> Value {
        let mut m = Map::new();
        m.insert("event".into(), json!(self.name()));
        m.insert("code".into(), json!(self.code()));
        m.insert("time".into(), json!(time));
        m.insert("uid".into(), json!(uid));
        match self {
            AuditEvent::UserLogin {
                user,
                method,
                success,
                error,
                remote_addr,
            } => {
                m.insert("user".into(), json!(user));
                m.insert("method".into(), json!(method));
                m.insert("success".into(), json!(success));
                if let Some(e) = error {
                    m.insert("error".into(), json!(e));
                }
                m.insert("addr.remote".into(), json!(remote_addr));
            }
            AuditEvent::SessctlLimit {
                user,
                login,
                remote_addr,
                server_id,
                max,
                sessctl_kind,
            } => {
                m.insert("max".into(), json!(max));
                m.insert("proto".into(), json!("ssh"));
                m.insert("server_id".into(), json!(server_id));
                m.insert("sessctl_kind".into(), json!(sessctl_kind.as_str()));
                m.insert("user".into(), json!(user));
                m.insert("login".into(), json!(login));
                m.insert("addr.remote".into(), json!(remote_addr));
                let limit = match sessctl_kind {
                    SessctlKind::Connection => "max_connections",
                    SessctlKind::Session => "max_sessions",
                };
                m.insert("reason".into(), json!(format!("{limit} limit reached")));
            }
            AuditEvent::SessionEvent {
                sid,
                server_id,
                user,
                login,
                fields,
                ..
            } => {
                m.insert("sid".into(), json!(sid));
                m.insert("server_id".into(), json!(server_id));
                m.insert("user".into(), json!(user));
                m.insert("login".into(), json!(login));
                for (k, v) in fields {
                    m.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            AuditEvent::AuditGap {
                server_id,
                queue_id,
                missing_from,
                missing_to,
            } => {
                m.insert("server_id".into(), json!(server_id));
                m.insert("queue_id".into(), json!(queue_id));
                m.insert("missing_from".into(), json!(missing_from));
                m.insert("missing_to".into(), json!(missing_to));
            }
            AuditEvent::AdminChange {
                user,
                target,
                fields,
                ..
            } => {
                m.insert("user".into(), json!(user));
                m.insert("target".into(), json!(target));
                for (k, v) in fields {
                    m.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            AuditEvent::ChannelEvent {
                user,
                login,
                server_id,
                remote_addr,
                success,
                fields,
                ..
            } => {
                m.insert("user".into(), json!(user));
                m.insert("login".into(), json!(login));
                m.insert("server_id".into(), json!(server_id));
                m.insert("addr.remote".into(), json!(remote_addr));
                m.insert("success".into(), json!(success));
                for (k, v) in fields {
                    m.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            AuditEvent::AccessDenied {
                user,
                login,
                server_id,
                remote_addr,
                reason,
            }
            | AuditEvent::ClientDisconnect {
                user,
                login,
                server_id,
                remote_addr,
                reason,
            } => {
                m.insert("user".into(), json!(user));
                m.insert("login".into(), json!(login));
                m.insert("server_id".into(), json!(server_id));
                m.insert("addr.remote".into(), json!(remote_addr));
                if matches!(self, AuditEvent::AccessDenied { .. }) {
                    m.insert("success".into(), json!(false));
                    m.insert("error".into(), json!(reason));
                } else {
                    m.insert("reason".into(), json!(reason));
                }
            }
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessctl_limit_has_the_fields_of_the_release_announcement() {
        let e = AuditEvent::SessctlLimit {
            user: "alice".into(),
            login: "root".into(),
            remote_addr: "127.0.0.1:50122".into(),
            server_id: "node-uuid".into(),
            max: 2,
            sessctl_kind: SessctlKind::Connection,
        };
        let v = e.to_json("2020-08-25T20:55:28.548Z", "event-uuid");
        for (k, want) in [
            ("code", json!("T1006W")),
            ("event", json!("sessctl.limit")),
            ("max", json!(2)),
            ("proto", json!("ssh")),
            ("server_id", json!("node-uuid")),
            ("sessctl_kind", json!("connection")),
            ("time", json!("2020-08-25T20:55:28.548Z")),
            ("uid", json!("event-uuid")),
            ("user", json!("alice")),
            ("login", json!("root")),
            ("addr.remote", json!("127.0.0.1:50122")),
        ] {
            assert_eq!(v[k], want, "{k}");
        }
        let wire = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<AuditEvent>(&wire).unwrap(), e);
    }

    #[test]
    fn the_documented_events_are_the_events_of_the_code() {
        let doc = include_str!("../../../docs/audit-events.md");
        let documented: Vec<(String, String)> = doc
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells[1].trim_matches('`').to_string(), cells[2].to_string())
            })
            .collect();
        let coded: Vec<(String, String)> = CATALOGUE
            .iter()
            .map(|(n, c)| (n.to_string(), c.to_string()))
            .collect();
        for e in &coded {
            assert!(
                documented.contains(e),
                "{e:?} is not in docs/audit-events.md"
            );
        }
        for e in &documented {
            assert!(
                coded.contains(e),
                "{e:?} is documented but not in CATALOGUE"
            );
        }
    }

    #[test]
    fn every_kind_of_event_has_a_catalogued_code() {
        let none = Map::new;
        let events = [
            AuditEvent::admin("lock.created", "admin", "user \"dave\"", []),
            AuditEvent::admin("user.delete", "admin", "dave", []),
            AuditEvent::AccessDenied {
                user: "dave".into(),
                login: "root".into(),
                server_id: "n".into(),
                remote_addr: "a".into(),
                reason: "locked".into(),
            },
            AuditEvent::ClientDisconnect {
                user: "dave".into(),
                login: "root".into(),
                server_id: "n".into(),
                remote_addr: "a".into(),
                reason: "locked".into(),
            },
            AuditEvent::SessionEvent {
                event: "session.end".into(),
                sid: "s".into(),
                server_id: "n".into(),
                user: "dave".into(),
                login: "root".into(),
                fields: none(),
            },
        ];
        let channel = |event: &str, success: bool, action: Option<&str>| {
            let mut fields = Map::new();
            if let Some(a) = action {
                fields.insert("action".into(), json!(a));
            }
            AuditEvent::ChannelEvent {
                event: event.into(),
                user: "dave".into(),
                login: "root".into(),
                server_id: "n".into(),
                remote_addr: "a".into(),
                success,
                fields,
            }
        };
        let mut channel_events = vec![
            channel("port", true, None),
            channel("port", false, None),
            channel("agent.forward", true, None),
            channel("agent.forward", false, None),
            channel("x11-forward", false, None),
            channel("sftp", true, Some("close")),
        ];
        for action in ["open", "setstat", "remove", "mkdir", "rmdir", "rename"] {
            channel_events.push(channel("sftp", true, Some(action)));
            channel_events.push(channel("sftp", false, Some(action)));
        }
        for e in events.into_iter().chain(channel_events) {
            let code = e.code();
            assert!(
                CATALOGUE.contains(&(e.name(), code)),
                "{} has code {code}, not in CATALOGUE",
                e.name()
            );
        }
        let v = AuditEvent::AccessDenied {
            user: "dave".into(),
            login: "root".into(),
            server_id: "n".into(),
            remote_addr: "a".into(),
            reason: "locked".into(),
        }
        .to_json("t", "u");
        assert_eq!(v["event"], "auth");
        assert_eq!(v["code"], "T3007W");
        assert_eq!(v["error"], "locked");
    }

    #[test]
    fn failed_login_has_the_warning_code_and_the_address() {
        let e = AuditEvent::UserLogin {
            user: "alice".into(),
            method: "password".into(),
            success: false,
            error: Some("wrong password".into()),
            remote_addr: "127.0.0.1:5000".into(),
        };
        let v = e.to_json("2026-01-01T00:00:00.000Z", "u1");
        assert_eq!(v["event"], "user.login");
        assert_eq!(v["code"], "T1000W");
        assert_eq!(v["addr.remote"], "127.0.0.1:5000");
        assert_eq!(v["success"], false);
    }
}
