//! The events of a session recording. Every event carries `ei` (its index
//! from 0 within the session), `sid`, `time`, `server_id`, `user`, `login`.
//! Output is in `print` events of at most 64 KiB, each with `ms` since the
//! session started and its `offset` in the output stream.

use base64::Engine;
use serde_json::{Map, Value, json};

pub use turnstile_api::rpc::proto::RecordingEvent;

/// The largest output carried by one `print` event.
pub const MAX_PRINT: usize = 64 * 1024;

pub const SESSION_START: &str = "session.start";
pub const PRINT: &str = "print";
pub const RESIZE: &str = "resize";
pub const EXEC: &str = "exec";
pub const SESSION_END: &str = "session.end";
pub const SESSION_DATA: &str = "session.data";
pub const SESSION_UPLOAD: &str = "session.upload";
/// Audit only: a session's recording could not be written (see `policy`
/// and `action` for what became of the session).
pub const RECORDING_FAILED: &str = "recording.failed";

fn time_text(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// The event as a JSON object with the audit log's field names. `print`
/// events carry their output as `data` (UTF-8, lossy) and `data_base64`.
pub fn to_json(e: &RecordingEvent) -> Value {
    let mut m = Map::new();
    m.insert("ei".into(), json!(e.ei));
    m.insert("event".into(), json!(e.event));
    m.insert("time".into(), json!(time_text(e.time_ms)));
    m.insert("sid".into(), json!(e.sid));
    m.insert("server_id".into(), json!(e.server_id));
    m.insert("user".into(), json!(e.user));
    m.insert("login".into(), json!(e.login));
    match e.event.as_str() {
        PRINT => {
            m.insert("bytes".into(), json!(e.data.len()));
            m.insert("ms".into(), json!(e.ms));
            m.insert("offset".into(), json!(e.offset));
            m.insert("data".into(), json!(String::from_utf8_lossy(&e.data)));
            m.insert(
                "data_base64".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(&e.data)),
            );
        }
        SESSION_START | RESIZE => {
            m.insert("size".into(), json!(format!("{}:{}", e.cols, e.rows)));
            m.insert("ms".into(), json!(e.ms));
            if e.event == SESSION_START {
                m.insert("node".into(), json!(e.node_name));
                if !e.subsystem.is_empty() {
                    m.insert("subsystem".into(), json!(e.subsystem));
                }
            }
        }
        EXEC => {
            m.insert("command".into(), json!(e.command));
            m.insert("exitCode".into(), json!(e.exit_code));
        }
        SESSION_END => {
            m.insert("participants".into(), json!(e.participants));
            m.insert("session_start".into(), json!(time_text(e.session_start_ms)));
            m.insert("session_stop".into(), json!(time_text(e.session_stop_ms)));
            m.insert("interactive".into(), json!(e.interactive));
        }
        SESSION_DATA => {
            m.insert("tx".into(), json!(e.tx));
            m.insert("rx".into(), json!(e.rx));
        }
        SESSION_UPLOAD => {
            m.insert("url".into(), json!(e.url));
        }
        _ => {}
    }
    Value::Object(m)
}

/// The audit-log form of a recorded event (not for `print`).
pub fn audit_event(e: &RecordingEvent) -> turnstile_api::audit::AuditEvent {
    let mut fields = match to_json(e) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    for k in [
        "ei",
        "event",
        "time",
        "sid",
        "server_id",
        "user",
        "login",
        "data",
        "data_base64",
    ] {
        fields.remove(k);
    }
    fields.insert("ei".into(), json!(e.ei));
    turnstile_api::audit::AuditEvent::SessionEvent {
        event: e.event.clone(),
        sid: e.sid.clone(),
        server_id: e.server_id.clone(),
        user: e.user.clone(),
        login: e.login.clone(),
        fields,
    }
}
