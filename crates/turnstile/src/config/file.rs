//! The YAML file as operators write it, shaped like teleport.yaml. Every
//! section refuses unknown keys, so a typo is an error naming the key, its line
//! and column, never a setting silently ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use turnstile_api::duration::WrittenDuration;
use turnstile_api::recording::ByteSize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub turnstile: GlobalSection,
    pub auth_service: Option<AuthSection>,
    pub proxy_service: Option<ProxySection>,
    pub ssh_service: Option<SshSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalSection {
    pub data_dir: Option<PathBuf>,
    pub auth_servers: Option<Vec<String>>,
    pub join_token: Option<String>,
    pub ca_pin: Option<String>,
    pub storage: Option<StorageSection>,
    pub recording: Option<RecordingSection>,
    pub metrics_listen_addr: Option<String>,
    /// How often nodes and proxies refresh their view of the cluster (roles,
    /// users, locks); default 5s.
    pub view_refresh_interval: Option<WrittenDuration>,
    /// How long a stopping node or proxy lets live sessions finish.
    pub shutdown_grace: Option<WrittenDuration>,
    /// The bound of the on-disk queue of audit events on their way to auth.
    pub audit_queue_max_size: Option<ByteSize>,
    /// Limits on connections to the node and proxy before authentication.
    pub pre_auth: Option<PreAuthSection>,
}

/// Limits on connections before they authenticate, named like sshd's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreAuthSection {
    /// `start:rate:full`, default 64:30:512.
    pub max_startups: Option<String>,
    pub per_source_max_startups: Option<u32>,
    pub login_grace_time: Option<WrittenDuration>,
    pub proxy_header_timeout: Option<WrittenDuration>,
    pub anonymous_max_channels: Option<u32>,
    pub anonymous_max_frame: Option<ByteSize>,
}

/// How this process records sessions, when it is a recorder (node, or proxy
/// in the proxy modes).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordingSection {
    pub spool_max_size: Option<ByteSize>,
    pub spool_min_free: Option<ByteSize>,
    pub buffer_per_session: Option<ByteSize>,
    pub buffer_per_process: Option<ByteSize>,
    pub sync_ack_timeout: Option<WrittenDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<PathBuf>,
    pub peers: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub audit_sessions_uri: Option<String>,
    pub audit_events_uri: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub enabled: Option<bool>,
    pub listen_addr: Option<String>,
    pub cluster_name: Option<String>,
    pub session_recording: Option<String>,
    pub session_control_timeout: Option<WrittenDuration>,
    pub upload_grace_period: Option<WrittenDuration>,
    pub locking_mode: Option<String>,
    pub client_idle_timeout: Option<WrittenDuration>,
    pub disconnect_expired_cert: Option<bool>,
    /// How password logins resist guessing.
    pub password_login: Option<PasswordLoginSection>,
    /// How long SSH host certificates live (hosts renew them at half-life).
    pub host_cert_ttl: Option<WrittenDuration>,
}

/// Lockout of a (user, source address) pair and backoff per source.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordLoginSection {
    pub max_failures: Option<u32>,
    pub lockout: Option<WrittenDuration>,
    pub backoff_start: Option<WrittenDuration>,
    pub backoff_max: Option<WrittenDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    pub enabled: Option<bool>,
    pub listen_addr: Option<String>,
    pub public_addr: Option<String>,
    /// The web console's HTTPS address (off unless set).
    pub web_listen_addr: Option<String>,
    pub https_cert_file: Option<PathBuf>,
    pub https_key_file: Option<PathBuf>,
    /// A web session ends after this long without a request.
    pub web_idle_timeout: Option<WrittenDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSection {
    pub enabled: Option<bool>,
    pub listen_addr: Option<String>,
    pub public_addr: Option<String>,
    pub node_name: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub heartbeat_interval: Option<WrittenDuration>,
    pub connect_timeout: Option<WrittenDuration>,
    pub accept_env: Option<Vec<String>>,
    pub gateway_ports: Option<bool>,
}

/// Parses the YAML text; the error names the key, line and column.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_norway::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_name_key_line_and_column() {
        let err = parse("turnstile:\n  data_dir: /tmp/x\n  dta_dir: /tmp/y\n").unwrap_err();
        assert!(err.contains("dta_dir"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("column"), "{err}");
    }

    #[test]
    fn bad_durations_name_the_field() {
        let err = parse("auth_service:\n  session_control_timeout: 2 minutes\n").unwrap_err();
        assert!(err.contains("session_control_timeout"), "{err}");
    }
}
