//! From the file's shapes to typed per-service settings, with every default
//! applied and every value checked. Errors name the field and the fix.
//!
//! Without a config file, auth, proxy and node all run. With one, a service
//! runs when its section is present and not `enabled: false`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use turnstile_api::labels::{Labels, validate_label};
use turnstile_api::lock::LockingMode;
use turnstile_api::recording::{ByteSize, RecordingMode};
use turnstile_api::role::validate_name;
use turnstile_auth::backend::{EtcdCredentials, EtcdSettings, EtcdTls};
use turnstile_auth::cluster_config::FileSettings;
use turnstile_recording::recorder::RecorderConfig;
use turnstile_recording::storage::StoreUri;
use turnstile_ssh::pre_auth::PreAuthLimits;

use super::file::FileConfig;

pub const DEFAULT_DATA_DIR: &str = "./turnstile-data";
pub const DEFAULT_AUTH_ADDR: &str = "127.0.0.1:3025";
pub const DEFAULT_PROXY_ADDR: &str = "127.0.0.1:3023";
pub const DEFAULT_WEB_ADDR: &str = "127.0.0.1:3080";
pub const DEFAULT_NODE_ADDR: &str = "127.0.0.1:3022";
pub const DEFAULT_CLUSTER_NAME: &str = "main";
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_UPLOAD_GRACE: Duration = Duration::from_secs(600);
pub const DEFAULT_VIEW_REFRESH: Duration = Duration::from_secs(5);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Parts of recordings in a directory. Acknowledgements do not wait for a
/// part (auth stages chunks), so this only trades auth's memory per stream
/// against the number of part files written and synced.
pub const FILE_STORE_MIN_PART: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    pub data_dir: PathBuf,
    /// Where processes without the auth service find it.
    pub auth_servers: Vec<String>,
    pub join_token: Option<String>,
    pub ca_pin: Option<String>,
    pub auth: Option<AuthSettings>,
    pub proxy: Option<ProxySettings>,
    pub node: Option<NodeSettings>,
    /// The bounds of this process's recorder (node; proxy in proxy modes).
    pub recording: RecorderConfig,
    /// Where `/metrics` is served, if anywhere (off by default).
    pub metrics_listen_addr: Option<SocketAddr>,
    /// How often nodes and proxies refresh their view of the cluster.
    pub view_refresh: Duration,
    /// How long a stopping node or proxy lets live sessions finish.
    pub shutdown_grace: Duration,
    /// The bound of each on-disk audit queue (node, proxy); at it, new sessions are refused.
    pub audit_queue_max: u64,
    /// Limits on connections to the node and proxy before authentication.
    pub pre_auth: PreAuthLimits,
}

/// Where auth keeps the cluster's state.
#[derive(Debug, Clone)]
pub enum StorageKind {
    /// One SQLite file in the data dir.
    Sqlite,
    /// In memory, lost when the process stops; for tests.
    Memory,
    /// etcd, shared by every auth server of the cluster.
    Etcd(EtcdSettings),
}

/// Where the auth service writes audit events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditEventsUri {
    /// JSON lines, a file per day, in this directory (one auth server).
    File(PathBuf),
    /// One PostgreSQL database every auth server writes to (a libpq URI).
    Postgres(String),
}

impl AuditEventsUri {
    fn parse(uri: &str) -> Result<Self, String> {
        if let Some(path) = uri.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{uri:?}: a file:// URI names an absolute directory, like file:///var/lib/turnstile/log"
                ));
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        if uri.starts_with("postgres://") || uri.starts_with("postgresql://") {
            return Ok(Self::Postgres(uri.to_string()));
        }
        Err(format!(
            "{uri:?} is not file:///DIR or postgres://USER@HOST/DATABASE"
        ))
    }
}

/// The default `turnstile.storage.prefix` of the etcd backend.
pub const DEFAULT_ETCD_PREFIX: &str = "/turnstile";
/// How long a call to etcd may go unanswered before it fails.
pub const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub storage: StorageKind,
    pub listen_addr: SocketAddr,
    pub cluster_name: String,
    pub storage_path: PathBuf,
    /// Where recordings go (`storage.audit_sessions_uri`).
    pub recordings: StoreUri,
    /// Where audit events go (`storage.audit_events_uri`).
    pub audit_events: AuditEventsUri,
    /// An upload whose recorder has been silent this long is completed.
    pub upload_grace: Duration,
    /// The cluster settings the file sets, written at start where they
    /// differ from the stored ones; what the file omits is left as stored.
    pub cluster_settings: FileSettings,
    /// How password logins resist guessing.
    pub login_policy: turnstile_auth::login_guard::LoginPolicy,
    /// How long SSH host certificates live.
    pub host_cert_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen_addr: SocketAddr,
    pub public_addr: Option<String>,
    /// The web console, when it is served.
    pub web: Option<WebSettings>,
}

#[derive(Debug, Clone)]
pub struct WebSettings {
    pub listen_addr: SocketAddr,
    /// The operator's certificate and key; none: self-signed.
    pub cert_files: Option<(PathBuf, PathBuf)>,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub listen_addr: SocketAddr,
    pub public_addr: Option<String>,
    pub node_name: String,
    pub labels: Labels,
    /// How often the node tells auth it is alive; it disappears from listings
    /// after three missed heartbeats.
    pub heartbeat_interval: Duration,
    /// How long the node waits for a forwarded (`direct-tcpip`) connection.
    pub connect_timeout: Duration,
    /// Variables a client may set (sshd's `AcceptEnv`).
    pub accept_env: Vec<String>,
    /// Remote forwards listen where the client asks (sshd's `GatewayPorts`).
    pub gateway_ports: bool,
}

fn field_error(field: &str, message: impl std::fmt::Display) -> String {
    format!("{field}: {message}")
}

fn parse_listen(field: &str, value: Option<&str>, default: &str) -> Result<SocketAddr, String> {
    let value = value.unwrap_or(default);
    value.parse().map_err(|_| {
        field_error(
            field,
            format!("{value:?} is not an IP address and port; write it like {default}"),
        )
    })
}

/// The web console: on at 127.0.0.1:3080 without a config file, off in a
/// config file unless `web_listen_addr` is set.
fn resolve_web(
    p: &super::file::ProxySection,
    from_file: bool,
) -> Result<Option<WebSettings>, String> {
    let addr = match (&p.web_listen_addr, from_file) {
        (Some(a), _) => a.as_str(),
        (None, false) => DEFAULT_WEB_ADDR,
        (None, true) => {
            for (field, set) in [
                ("https_cert_file", p.https_cert_file.is_some()),
                ("https_key_file", p.https_key_file.is_some()),
                ("web_idle_timeout", p.web_idle_timeout.is_some()),
            ] {
                if set {
                    return Err(field_error(
                        &format!("proxy_service.{field}"),
                        "is for the web console, which is off: set proxy_service.web_listen_addr too",
                    ));
                }
            }
            return Ok(None);
        }
    };
    let listen_addr = parse_listen(
        "proxy_service.web_listen_addr",
        Some(addr),
        DEFAULT_WEB_ADDR,
    )?;
    let cert_files = match (&p.https_cert_file, &p.https_key_file) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        (Some(_), None) => {
            return Err(field_error(
                "proxy_service.https_key_file",
                "is missing: https_cert_file needs its key (or set neither for a self-signed certificate)",
            ));
        }
        (None, Some(_)) => {
            return Err(field_error(
                "proxy_service.https_cert_file",
                "is missing: https_key_file needs its certificate (or set neither for a self-signed certificate)",
            ));
        }
    };
    let idle_timeout = p
        .web_idle_timeout
        .as_ref()
        .map_or(turnstile_web::DEFAULT_IDLE_TIMEOUT, |d| d.0);
    if idle_timeout < Duration::from_secs(5) || idle_timeout > Duration::from_secs(12 * 3600) {
        return Err(field_error(
            "proxy_service.web_idle_timeout",
            "must be between 5s and 12h (default 30m)",
        ));
    }
    Ok(Some(WebSettings {
        listen_addr,
        cert_files,
        idle_timeout,
    }))
}

fn check_public_addr(field: &str, value: Option<String>) -> Result<Option<String>, String> {
    let Some(value) = value else { return Ok(None) };
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            Ok(Some(value))
        }
        _ => Err(field_error(
            field,
            format!(
                "{value:?} is not host:port with a real port; write it like proxy.example.com:3023"
            ),
        )),
    }
}

/// The host's name, for the default node name.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .map(|h| h.split('.').next().unwrap_or(&h).to_string())
        .unwrap_or_else(|| "node".to_string())
}

fn enabled(section_present: bool, flag: Option<bool>, from_file: bool) -> bool {
    if from_file {
        section_present && flag.unwrap_or(true)
    } else {
        flag.unwrap_or(true)
    }
}

/// The etcd backend's settings, with the files they name read now so that a
/// missing or unreadable one is reported with its field.
fn etcd_settings(storage: &super::file::StorageSection) -> Result<EtcdSettings, String> {
    let peers = storage.peers.clone().unwrap_or_default();
    if peers.is_empty() {
        return Err(field_error(
            "turnstile.storage.peers",
            "the etcd backend needs its client URLs, like [\"https://etcd1:2379\"]",
        ));
    }
    let tls = storage.tls_ca_file.is_some()
        || storage.tls_cert_file.is_some()
        || storage.tls_key_file.is_some();
    for peer in &peers {
        let scheme_ok = if tls {
            peer.starts_with("https://")
        } else {
            peer.starts_with("http://") || peer.starts_with("https://")
        };
        if !scheme_ok {
            return Err(field_error(
                "turnstile.storage.peers",
                format!(
                    "{peer:?} is not an etcd client URL; write it like https://etcd1:2379{}",
                    if tls {
                        " (TLS is configured, so https)"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            field_error(
                &format!("turnstile.storage.{field}"),
                format!("cannot read {}: {e}", path.display()),
            )
        })
    };
    let tls = if tls {
        let Some(ca) = &storage.tls_ca_file else {
            return Err(field_error(
                "turnstile.storage.tls_ca_file",
                "TLS to etcd needs the CA that signed etcd's certificate",
            ));
        };
        let ca_pem = read("tls_ca_file", ca)?;
        let client = match (&storage.tls_cert_file, &storage.tls_key_file) {
            (Some(cert), Some(key)) => {
                Some((read("tls_cert_file", cert)?, read("tls_key_file", key)?))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(field_error(
                    "turnstile.storage.tls_key_file",
                    "a client certificate needs its key",
                ));
            }
            (None, Some(_)) => {
                return Err(field_error(
                    "turnstile.storage.tls_cert_file",
                    "a client key needs its certificate",
                ));
            }
        };
        Some(EtcdTls { ca_pem, client })
    } else {
        None
    };
    let credentials = match (&storage.username, &storage.password_file) {
        (Some(username), Some(file)) => {
            let password = String::from_utf8(read("password_file", file)?)
                .map_err(|_| field_error("turnstile.storage.password_file", "is not UTF-8 text"))?;
            Some(EtcdCredentials {
                username: username.clone(),
                password: password.trim_end_matches(['\r', '\n']).to_string(),
            })
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(field_error(
                "turnstile.storage.password_file",
                "etcd's username needs a file holding its password",
            ));
        }
        (None, Some(_)) => {
            return Err(field_error(
                "turnstile.storage.username",
                "a password_file needs the username it is for",
            ));
        }
    };
    let prefix = storage
        .prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_string());
    if !prefix.starts_with('/') || prefix.trim_end_matches('/').is_empty() {
        return Err(field_error(
            "turnstile.storage.prefix",
            format!("{prefix:?} must start with / and name something, like /turnstile"),
        ));
    }
    Ok(EtcdSettings {
        peers,
        prefix,
        tls,
        credentials,
        request_timeout: ETCD_REQUEST_TIMEOUT,
    })
}

/// Resolves the file (or no file, when `from_file` is false) with the
/// command line's `--data-dir` taking precedence.
pub fn resolve(
    file: FileConfig,
    data_dir_flag: Option<PathBuf>,
    from_file: bool,
) -> Result<ResolvedConfig, String> {
    let global = file.turnstile;
    let data_dir = data_dir_flag
        .or(global.data_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let storage = global.storage.unwrap_or_default();
    let storage_kind = match storage.kind.as_deref() {
        None | Some("sqlite") => StorageKind::Sqlite,
        Some("memory") => StorageKind::Memory,
        Some("etcd") => StorageKind::Etcd(etcd_settings(&storage)?),
        Some(other) => {
            return Err(field_error(
                "turnstile.storage.type",
                format!("unknown backend {other:?}; use sqlite, etcd (or memory, for tests)"),
            ));
        }
    };
    if !matches!(storage_kind, StorageKind::Etcd(_)) {
        let etcd_only = [
            ("peers", storage.peers.is_some()),
            ("prefix", storage.prefix.is_some()),
            ("tls_ca_file", storage.tls_ca_file.is_some()),
            ("tls_cert_file", storage.tls_cert_file.is_some()),
            ("tls_key_file", storage.tls_key_file.is_some()),
            ("username", storage.username.is_some()),
            ("password_file", storage.password_file.is_some()),
        ];
        if let Some((name, _)) = etcd_only.iter().find(|(_, set)| *set) {
            return Err(field_error(
                &format!("turnstile.storage.{name}"),
                "is for the etcd backend (type: etcd); remove it, or set type: etcd",
            ));
        }
    }

    let auth_section = file.auth_service.as_ref();
    let auth = if enabled(
        auth_section.is_some(),
        auth_section.and_then(|a| a.enabled),
        from_file,
    ) {
        let a = file.auth_service.unwrap_or_default();
        let session_recording: Option<RecordingMode> = a
            .session_recording
            .as_deref()
            .map(|s| {
                s.parse()
                    .map_err(|e| field_error("auth_service.session_recording", e))
            })
            .transpose()?;
        let login_policy = resolve_password_login(a.password_login.unwrap_or_default())?;
        let host_cert_ttl = a
            .host_cert_ttl
            .map_or(turnstile_auth::authority::HOST_CERT_TTL, |d| d.0);
        if host_cert_ttl < Duration::from_secs(4)
            || host_cert_ttl > Duration::from_secs(30 * 86_400)
        {
            return Err(field_error(
                "auth_service.host_cert_ttl",
                "must be between 4s and 30d (default 24h; hosts renew at half-life)",
            ));
        }
        let upload_grace = a.upload_grace_period.map_or(DEFAULT_UPLOAD_GRACE, |d| d.0);
        if upload_grace.is_zero() {
            return Err(field_error(
                "auth_service.upload_grace_period",
                "must be longer than zero (default 10m)",
            ));
        }
        let recordings = match storage.audit_sessions_uri.as_deref() {
            None => StoreUri::File {
                dir: data_dir.join("records"),
            },
            Some(uri) => StoreUri::parse(uri)
                .map_err(|e| field_error("turnstile.storage.audit_sessions_uri", e))?,
        };
        let audit_events = match storage.audit_events_uri.as_deref() {
            None => AuditEventsUri::File(data_dir.join("log")),
            Some(uri) => AuditEventsUri::parse(uri)
                .map_err(|e| field_error("turnstile.storage.audit_events_uri", e))?,
        };
        if matches!(storage_kind, StorageKind::Etcd(_))
            && matches!(audit_events, AuditEventsUri::File(_))
        {
            return Err(field_error(
                "turnstile.storage.audit_events_uri",
                "with the etcd backend every auth server writes one audit log, and a \
                 file:// directory is one machine's; set postgres://USER@HOST/DATABASE",
            ));
        }
        if matches!(storage_kind, StorageKind::Etcd(_))
            && matches!(recordings, StoreUri::File { .. })
        {
            return Err(field_error(
                "turnstile.storage.audit_sessions_uri",
                "with the etcd backend every auth server must reach every recording, and a \
                 file:// directory is one machine's disk; set an object store \
                 (s3://BUCKET, gs://BUCKET or azblob://CONTAINER)",
            ));
        }
        let timeout = a.session_control_timeout.map(|d| d.0);
        if let Some(Err(e)) = timeout.map(turnstile_api::semaphore::check_lease_ttl) {
            return Err(field_error("auth_service.session_control_timeout", e));
        }
        let cluster_name = a
            .cluster_name
            .unwrap_or_else(|| DEFAULT_CLUSTER_NAME.to_string());
        validate_name("cluster name", &cluster_name)
            .map_err(|m| field_error("auth_service.cluster_name", m))?;
        Some(AuthSettings {
            storage: storage_kind,
            listen_addr: parse_listen(
                "auth_service.listen_addr",
                a.listen_addr.as_deref(),
                DEFAULT_AUTH_ADDR,
            )?,
            cluster_name,
            storage_path: storage
                .path
                .clone()
                .unwrap_or_else(|| data_dir.join("backend.sqlite")),
            recordings,
            audit_events,
            upload_grace,
            login_policy,
            host_cert_ttl,
            cluster_settings: FileSettings {
                session_control_timeout: timeout,
                session_recording,
                locking_mode: a
                    .locking_mode
                    .as_deref()
                    .map(|m| {
                        m.parse::<LockingMode>()
                            .map_err(|e| field_error("auth_service.locking_mode", e))
                    })
                    .transpose()?,
                client_idle_timeout: a.client_idle_timeout.map(|d| d.0),
                disconnect_expired_cert: a.disconnect_expired_cert,
            },
        })
    } else {
        None
    };

    let proxy_section = file.proxy_service.as_ref();
    let proxy = if enabled(
        proxy_section.is_some(),
        proxy_section.and_then(|p| p.enabled),
        from_file,
    ) {
        let p = file.proxy_service.unwrap_or_default();
        Some(ProxySettings {
            listen_addr: parse_listen(
                "proxy_service.listen_addr",
                p.listen_addr.as_deref(),
                DEFAULT_PROXY_ADDR,
            )?,
            public_addr: check_public_addr("proxy_service.public_addr", p.public_addr.clone())?,
            web: resolve_web(&p, from_file)?,
        })
    } else {
        None
    };

    let ssh_section = file.ssh_service.as_ref();
    let node = if enabled(
        ssh_section.is_some(),
        ssh_section.and_then(|s| s.enabled),
        from_file,
    ) {
        let s = file.ssh_service.unwrap_or_default();
        let node_name = s.node_name.unwrap_or_else(host_name);
        validate_name("node name", &node_name)
            .map_err(|m| field_error("ssh_service.node_name", m))?;
        let labels: BTreeMap<String, String> = s.labels.unwrap_or_default();
        for (k, v) in &labels {
            validate_label("label key", k).map_err(|m| field_error("ssh_service.labels", m))?;
            validate_label("label value", v)
                .map_err(|m| field_error(&format!("ssh_service.labels.{k}"), m))?;
        }
        Some(NodeSettings {
            listen_addr: parse_listen(
                "ssh_service.listen_addr",
                s.listen_addr.as_deref(),
                DEFAULT_NODE_ADDR,
            )?,
            public_addr: check_public_addr("ssh_service.public_addr", s.public_addr)?,
            node_name,
            labels,
            heartbeat_interval: match s.heartbeat_interval.map(|d| d.0) {
                None => DEFAULT_HEARTBEAT_INTERVAL,
                Some(d) if d < Duration::from_secs(1) => {
                    return Err(field_error(
                        "ssh_service.heartbeat_interval",
                        "must be at least 1s (default 20s)",
                    ));
                }
                Some(d) => d,
            },
            connect_timeout: match s.connect_timeout.map(|d| d.0) {
                None => Duration::from_secs(10),
                Some(d) if d.is_zero() || d > Duration::from_secs(300) => {
                    return Err(field_error(
                        "ssh_service.connect_timeout",
                        "must be between 1ms and 5m (default 10s)",
                    ));
                }
                Some(d) => d,
            },
            accept_env: match s.accept_env {
                None => turnstile_ssh::node::DEFAULT_ACCEPT_ENV
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
                Some(patterns) => {
                    for (i, p) in patterns.iter().enumerate() {
                        if p.is_empty() || p.contains(|c: char| c.is_whitespace() || c == '=') {
                            return Err(field_error(
                                &format!("ssh_service.accept_env[{i}]"),
                                format!(
                                    "{p:?} is not a variable name pattern (letters, digits, _, with * and ?)"
                                ),
                            ));
                        }
                    }
                    patterns
                }
            },
            gateway_ports: s.gateway_ports.unwrap_or(false),
        })
    } else {
        None
    };

    if auth.is_none() && proxy.is_none() && node.is_none() {
        return Err(
            "no service is enabled: add auth_service, proxy_service or ssh_service to the config"
                .into(),
        );
    }
    if let Some(pin) = &global.ca_pin {
        turnstile_api::pin::validate(pin).map_err(|m| field_error("turnstile.ca_pin", m))?;
    }
    let auth_servers = global.auth_servers.unwrap_or_default();
    for addr in &auth_servers {
        if !addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
        {
            return Err(field_error(
                "turnstile.auth_servers",
                format!("{addr:?} is not host:port, for example auth.example.com:3025"),
            ));
        }
    }
    if auth.is_none() && auth_servers.is_empty() {
        return Err(field_error(
            "turnstile.auth_servers",
            "this process runs no auth service, so it needs the address of one, for example [\"auth.example.com:3025\"]",
        ));
    }
    let recording = resolve_recording(global.recording.unwrap_or_default())?;
    let metrics_listen_addr = match global.metrics_listen_addr.as_deref() {
        None => None,
        Some(addr) => Some(parse_listen(
            "turnstile.metrics_listen_addr",
            Some(addr),
            "127.0.0.1:9090",
        )?),
    };
    let view_refresh = global
        .view_refresh_interval
        .map_or(DEFAULT_VIEW_REFRESH, |d| d.0);
    if view_refresh.is_zero() || view_refresh > Duration::from_secs(10) {
        return Err(field_error(
            "turnstile.view_refresh_interval",
            "must be between 1ms and 10s (locks and user changes must reach nodes within 10s; default 5s)",
        ));
    }
    let shutdown_grace = global
        .shutdown_grace
        .map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0);
    if shutdown_grace > Duration::from_secs(3600) {
        return Err(field_error(
            "turnstile.shutdown_grace",
            "must be at most 1h (default 30s; 0s ends sessions at once)",
        ));
    }
    let audit_queue_max = global
        .audit_queue_max_size
        .map_or(turnstile_ssh::audit_forwarder::DEFAULT_QUEUE_MAX, |b| b.0);
    if audit_queue_max < 1 << 20 {
        return Err(field_error(
            "turnstile.audit_queue_max_size",
            "must be at least 1MiB (default 256MiB)",
        ));
    }
    let pre_auth = resolve_pre_auth(global.pre_auth.unwrap_or_default())?;
    Ok(ResolvedConfig {
        view_refresh,
        shutdown_grace,
        audit_queue_max,
        pre_auth,
        data_dir,
        auth_servers,
        join_token: global.join_token,
        ca_pin: global.ca_pin,
        auth,
        proxy,
        node,
        recording,
        metrics_listen_addr,
    })
}

/// The password lockout and backoff, checked.
fn resolve_password_login(
    p: super::file::PasswordLoginSection,
) -> Result<turnstile_auth::login_guard::LoginPolicy, String> {
    let mut policy = turnstile_auth::login_guard::LoginPolicy::default();
    if let Some(n) = p.max_failures {
        if n == 0 {
            return Err(field_error(
                "auth_service.password_login.max_failures",
                "must be at least 1 (default 10)",
            ));
        }
        policy.max_failures = n;
    }
    let within = |field: &str,
                  v: Option<turnstile_api::duration::WrittenDuration>,
                  default: Duration,
                  max: Duration| {
        let d = v.map_or(default, |d| d.0);
        if d.is_zero() || d > max {
            return Err(field_error(
                field,
                format!(
                    "must be longer than zero and at most {} (default {})",
                    turnstile_api::duration::format(max),
                    turnstile_api::duration::format(default)
                ),
            ));
        }
        Ok(d)
    };
    policy.lockout = within(
        "auth_service.password_login.lockout",
        p.lockout,
        policy.lockout,
        Duration::from_secs(86_400),
    )?;
    policy.backoff_start = within(
        "auth_service.password_login.backoff_start",
        p.backoff_start,
        policy.backoff_start,
        Duration::from_secs(60),
    )?;
    policy.backoff_max = within(
        "auth_service.password_login.backoff_max",
        p.backoff_max,
        policy.backoff_max,
        Duration::from_secs(60),
    )?;
    if policy.backoff_max < policy.backoff_start {
        return Err(field_error(
            "auth_service.password_login.backoff_max",
            "must not be shorter than backoff_start",
        ));
    }
    Ok(policy)
}

/// The limits before authentication, checked: each cap at least 1, each
/// deadline between 1s and 10m, frames between 1KiB and 1MiB.
fn resolve_pre_auth(p: super::file::PreAuthSection) -> Result<PreAuthLimits, String> {
    let mut limits = PreAuthLimits::default();
    if let Some(m) = p.max_startups {
        limits.max_startups = m
            .parse()
            .map_err(|e| field_error("turnstile.pre_auth.max_startups", e))?;
    }
    let at_least_one = |field: &str, v: Option<u32>, default: u32| match v {
        Some(0) => Err(field_error(
            field,
            format!("must be at least 1 (default {default})"),
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    limits.per_source_max_startups = at_least_one(
        "turnstile.pre_auth.per_source_max_startups",
        p.per_source_max_startups,
        limits.per_source_max_startups,
    )?;
    limits.anonymous_max_channels = at_least_one(
        "turnstile.pre_auth.anonymous_max_channels",
        p.anonymous_max_channels,
        limits.anonymous_max_channels,
    )?;
    let deadline =
        |field: &str, v: Option<turnstile_api::duration::WrittenDuration>, default: Duration| {
            let d = v.map_or(default, |d| d.0);
            if d < Duration::from_secs(1) || d > Duration::from_secs(600) {
                return Err(field_error(
                    field,
                    format!(
                        "must be between 1s and 10m (default {})",
                        turnstile_api::duration::format(default)
                    ),
                ));
            }
            Ok(d)
        };
    limits.login_grace_time = deadline(
        "turnstile.pre_auth.login_grace_time",
        p.login_grace_time,
        limits.login_grace_time,
    )?;
    limits.proxy_header_timeout = deadline(
        "turnstile.pre_auth.proxy_header_timeout",
        p.proxy_header_timeout,
        limits.proxy_header_timeout,
    )?;
    if let Some(ByteSize(n)) = p.anonymous_max_frame {
        if !(1024..=turnstile_api::door::MAX_FRAME as u64).contains(&n) {
            return Err(field_error(
                "turnstile.pre_auth.anonymous_max_frame",
                "must be between 1KiB and 1MiB (default 64KiB)",
            ));
        }
        limits.anonymous_max_frame = n as usize;
    }
    Ok(limits)
}

/// The recorder's bounds, checked: a buffer must hold at least a few
/// `print` events, a timeout must leave auth time to answer.
fn resolve_recording(r: super::file::RecordingSection) -> Result<RecorderConfig, String> {
    let d = RecorderConfig::default();
    let min_buffer = ByteSize(1 << 20);
    let buffer = |field: &str, v: Option<ByteSize>, default: usize| match v {
        None => Ok(default),
        Some(b) if b < min_buffer => Err(field_error(
            field,
            format!(
                "{b} is too small; at least {min_buffer} (default {})",
                ByteSize(default as u64)
            ),
        )),
        Some(b) => Ok(usize::try_from(b.bytes()).unwrap_or(usize::MAX)),
    };
    let session_buffer = buffer(
        "turnstile.recording.buffer_per_session",
        r.buffer_per_session,
        d.session_buffer,
    )?;
    let process_buffer = buffer(
        "turnstile.recording.buffer_per_process",
        r.buffer_per_process,
        d.process_buffer,
    )?;
    if process_buffer < session_buffer {
        return Err(field_error(
            "turnstile.recording.buffer_per_process",
            format!(
                "{} is smaller than buffer_per_session ({}); make it at least as large",
                ByteSize(process_buffer as u64),
                ByteSize(session_buffer as u64)
            ),
        ));
    }
    let sync_ack_timeout = match r.sync_ack_timeout.map(|d| d.0) {
        None => d.sync_ack_timeout,
        Some(t) if t < Duration::from_secs(1) => {
            return Err(field_error(
                "turnstile.recording.sync_ack_timeout",
                "must be at least 1s (default 30s)",
            ));
        }
        Some(t) => t,
    };
    Ok(RecorderConfig {
        spool_max_size: r.spool_max_size.map_or(d.spool_max_size, ByteSize::bytes),
        spool_min_free: r.spool_min_free.map_or(d.spool_min_free, ByteSize::bytes),
        session_buffer,
        process_buffer,
        sync_ack_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::parse;

    #[test]
    fn no_file_runs_everything_on_the_defaults() {
        let c = resolve(FileConfig::default(), None, false).unwrap();
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.auth.unwrap().listen_addr.to_string(), DEFAULT_AUTH_ADDR);
        let proxy = c.proxy.unwrap();
        assert_eq!(proxy.listen_addr.to_string(), DEFAULT_PROXY_ADDR);
        let web = proxy.web.expect("the web console is on without a file");
        assert_eq!(web.listen_addr.to_string(), DEFAULT_WEB_ADDR);
        assert!(web.cert_files.is_none(), "self-signed");
        assert_eq!(c.node.unwrap().node_name, host_name());
    }

    #[test]
    fn the_web_console_is_off_in_a_file_unless_its_address_is_set() {
        let base = "turnstile:\n  data_dir: /tmp/x\nauth_service:\n  enabled: true\nproxy_service:\n  listen_addr: 127.0.0.1:0\n";
        let c = resolve(parse(base).unwrap(), None, true).unwrap();
        assert!(c.proxy.unwrap().web.is_none());
        let on = format!("{base}  web_listen_addr: 127.0.0.1:0\n");
        assert!(
            resolve(parse(&on).unwrap(), None, true)
                .unwrap()
                .proxy
                .unwrap()
                .web
                .is_some()
        );
        for (extra, field) in [
            (
                "  https_cert_file: /c.pem\n",
                "proxy_service.https_cert_file",
            ),
            (
                "  web_listen_addr: 127.0.0.1:0\n  https_cert_file: /c.pem\n",
                "proxy_service.https_key_file",
            ),
            (
                "  web_listen_addr: 127.0.0.1:0\n  web_idle_timeout: 1s\n",
                "proxy_service.web_idle_timeout",
            ),
            (
                "  web_listen_addr: nowhere\n",
                "proxy_service.web_listen_addr",
            ),
        ] {
            let err = resolve(parse(&format!("{base}{extra}")).unwrap(), None, true).unwrap_err();
            assert!(err.contains(field), "{extra}: {err}");
        }
    }

    #[test]
    fn absent_sections_are_off_in_a_file() {
        let f = parse(
            "turnstile:\n  auth_servers: [\"127.0.0.1:3025\"]\nssh_service:\n  node_name: web1\n",
        )
        .unwrap();
        let c = resolve(f, None, true).unwrap();
        assert!(c.auth.is_none() && c.proxy.is_none());
        assert_eq!(c.node.unwrap().node_name, "web1");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                "auth_service:\n  listen_addr: nowhere\n",
                "auth_service.listen_addr",
            ),
            (
                "auth_service:\n  session_control_timeout: 0s\n",
                "auth_service.session_control_timeout",
            ),
            (
                "auth_service:\n  session_control_timeout: 2h\n",
                "auth_service.session_control_timeout",
            ),
            (
                "auth_service:\n  session_recording: always\n",
                "auth_service.session_recording",
            ),
            (
                "ssh_service:\n  node_name: \"bad name\"\nauth_service: {}\n",
                "ssh_service.node_name",
            ),
            (
                "turnstile:\n  recording:\n    buffer_per_session: 1KiB\nauth_service: {}\n",
                "turnstile.recording.buffer_per_session",
            ),
            (
                "turnstile:\n  recording:\n    sync_ack_timeout: 100ms\nauth_service: {}\n",
                "turnstile.recording.sync_ack_timeout",
            ),
            (
                "proxy_service:\n  public_addr: proxy\nauth_service: {}\n",
                "proxy_service.public_addr",
            ),
            ("ssh_service: {}\n", "turnstile.auth_servers"),
            (
                "turnstile:\n  storage:\n    type: mysql\nauth_service: {}\n",
                "turnstile.storage.type",
            ),
            (
                "turnstile:\n  storage:\n    type: etcd\nauth_service: {}\n",
                "turnstile.storage.peers",
            ),
            (
                "turnstile:\n  storage:\n    type: etcd\n    peers: [\"http://127.0.0.1:2379\"]\nauth_service: {}\n",
                "turnstile.storage.audit_events_uri",
            ),
            (
                "turnstile:\n  storage:\n    type: etcd\n    peers: [\"http://127.0.0.1:2379\"]\n    audit_events_uri: postgres://db/audit\nauth_service: {}\n",
                "turnstile.storage.audit_sessions_uri",
            ),
            (
                "turnstile:\n  storage:\n    audit_events_uri: mysql://db/audit\nauth_service: {}\n",
                "turnstile.storage.audit_events_uri",
            ),
            (
                "turnstile:\n  storage:\n    type: etcd\n    peers: [\"http://e:2379\"]\n    tls_ca_file: /nonexistent/ca.pem\nauth_service: {}\n",
                "turnstile.storage.peers",
            ),
            (
                "turnstile:\n  storage:\n    type: etcd\n    peers: [\"https://e:2379\"]\n    tls_ca_file: /nonexistent/ca.pem\nauth_service: {}\n",
                "turnstile.storage.tls_ca_file",
            ),
            (
                "turnstile:\n  storage:\n    type: etcd\n    peers: [\"http://e:2379\"]\n    username: turnstile\nauth_service: {}\n",
                "turnstile.storage.password_file",
            ),
            (
                "turnstile:\n  storage:\n    prefix: /x\nauth_service: {}\n",
                "turnstile.storage.prefix",
            ),
        ];
        for (yaml, field) in cases {
            let err = resolve(parse(yaml).unwrap(), None, true).unwrap_err();
            assert!(err.starts_with(field), "{yaml}: {err}");
        }
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;
    use crate::config::file::parse;

    #[test]
    fn the_annotated_example_parses_and_resolves() {
        let text = include_str!("../../../../examples/turnstile.yaml");
        let c = resolve(parse(text).unwrap(), None, true).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/turnstile"));
        let node = c.node.unwrap();
        assert_eq!(node.node_name, "web1");
        assert_eq!(node.labels.get("env").map(String::as_str), Some("dev"));
        let auth = c.auth.unwrap();
        assert_eq!(
            auth.cluster_settings.session_control_timeout,
            Some(Duration::from_secs(120))
        );
        assert_eq!(auth.cluster_name, "main");
        assert_eq!(
            c.proxy.unwrap().public_addr.as_deref(),
            Some("127.0.0.1:3023")
        );
        assert_eq!(c.recording.spool_max_size, 10 << 30);
        assert_eq!(c.recording.sync_ack_timeout, Duration::from_secs(30));
    }

    #[test]
    fn the_high_availability_examples_resolve() {
        for text in [
            include_str!("../../../../examples/ha-proxy.yaml"),
            include_str!("../../../../examples/ha-node.yaml"),
        ] {
            let c = resolve(parse(text).unwrap(), None, true).unwrap();
            assert_eq!(c.auth_servers.len(), 3);
        }
        // The auth example names etcd's certificates, which an operator
        // provides; with them in place it resolves to the etcd backend.
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../../../../examples/ha-auth.yaml");
        let err = resolve(parse(text).unwrap(), None, true).unwrap_err();
        assert!(
            err.starts_with("turnstile.storage.tls_ca_file: cannot read"),
            "{err}"
        );
        for name in ["ca.pem", "client.pem", "client-key.pem"] {
            std::fs::write(dir.path().join(name), "PEM").unwrap();
        }
        let text = text.replace("/etc/turnstile/etcd", dir.path().to_str().unwrap());
        let c = resolve(parse(&text).unwrap(), None, true).unwrap();
        let Some(StorageKind::Etcd(etcd)) = c.auth.map(|a| a.storage) else {
            panic!("not etcd");
        };
        assert_eq!(etcd.peers.len(), 3);
        assert_eq!(etcd.prefix, "/turnstile");
        assert!(etcd.tls.is_some_and(|t| t.client.is_some()));
    }
}
