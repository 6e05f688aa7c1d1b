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
}

impl AuditEvent {
    pub fn name(&self) -> &str {
        match self {
            AuditEvent::UserLogin { .. } => "user.login",
            AuditEvent::SessctlLimit { .. } => "sessctl.limit",
            AuditEvent::SessionEvent { event, .. } => event,
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
                _ => "T0000I",
            },
        }
    }

    pub fn user(&self) -> &str {
        match self {
            AuditEvent::UserLogin { user, .. }
            | AuditEvent::SessctlLimit { user, .. }
            | AuditEvent::SessionEvent { user, .. } => user,
        }
    }

    /// The host that saw it, if one did (auth checks it is the caller).
    pub fn server_id(&self) -> Option<&str> {
        match self {
            AuditEvent::SessctlLimit { server_id, .. }
            | AuditEvent::SessionEvent { server_id, .. } => Some(server_id),
            AuditEvent::UserLogin { .. } => None,
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
