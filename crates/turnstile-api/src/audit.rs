//! Audit events: typed values with the field names of the audit log (one JSON
//! object per line). They travel through the `AuditLog` of the auth service,
//! never through `tracing`.

use serde_json::{Map, Value, json};

/// An event as it happened; `time` and `uid` are stamped when it is written.
#[derive(Debug, Clone, PartialEq)]
pub enum AuditEvent {
    /// A login attempt with a password at the proxy.
    UserLogin {
        user: String,
        method: String,
        success: bool,
        error: Option<String>,
        remote_addr: String,
    },
}

impl AuditEvent {
    pub fn name(&self) -> &'static str {
        match self {
            AuditEvent::UserLogin { .. } => "user.login",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AuditEvent::UserLogin { success: true, .. } => "T1000I",
            AuditEvent::UserLogin { success: false, .. } => "T1000W",
        }
    }

    pub fn user(&self) -> &str {
        match self {
            AuditEvent::UserLogin { user, .. } => user,
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
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
