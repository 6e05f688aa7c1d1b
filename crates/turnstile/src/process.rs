//! One Turnstile process: the services its config asks for, wired together.
//! Binds every listener first (so port 0 works and addresses are known),
//! gives local services their identities, starts them, and stops them all on
//! one shutdown token. `turnstile start` and the test cluster both use it.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use std::collections::HashMap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use turnstile_api::clock::SystemClock;
use turnstile_api::identity::SystemRole;
use turnstile_auth::audit_log::{AuditLog, FileAuditLog, PostgresAuditLog, SpooledAuditLog};
use turnstile_auth::backend::{Backend, EtcdBackend, MemoryBackend, SqliteBackend};
use turnstile_auth::cluster_config;
use turnstile_auth::{AuthService, AuthServiceConfig, Authority};
use turnstile_ssh::audit_forwarder::AuditForwarder;
use turnstile_ssh::cluster_view::{ClusterView, auth_servers_client};
use turnstile_ssh::identity::{TlsIdentity, load_or_create_host_id};
use turnstile_ssh::join::{JoinError, join};
use turnstile_ssh::node::{NodeConfig, NodeService, advertised_addr};
use turnstile_ssh::proxy::{ProxyConfig, ProxyService};

use crate::config::ResolvedConfig;
use crate::config::resolve::{AuditEventsUri, FILE_STORE_MIN_PART, StorageKind, host_name};
use crate::host_cert::{self, HostRequest};
use turnstile_recording::recorder::Recorder;
use turnstile_recording::shipper::{self, Shipper};
use turnstile_recording::spool::Spool;
use turnstile_recording::storage::{StoreUri, UploadStore};

/// How long auth keeps a silent node that did not say (nodes ask for three
/// heartbeat intervals).
const NODE_TTL: Duration = Duration::from_secs(60);

/// Files in the data dir where services leave their real addresses, for the
/// admin CLI and scripts.
pub const AUTH_ADDR_FILE: &str = "auth.addr";
pub const PROXY_ADDR_FILE: &str = "proxy.addr";

pub struct Running {
    pub data_dir: PathBuf,
    pub auth_addr: Option<SocketAddr>,
    pub proxy_addr: Option<SocketAddr>,
    /// What identities point at: the proxy's public_addr, else its bound address.
    pub proxy_public_addr: Option<String>,
    pub node_addr: Option<SocketAddr>,
    pub node_name: Option<String>,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the web console is served, if it is, and the SHA-256
    /// fingerprint of its certificate (self-signed unless the config names
    /// one).
    pub web_addr: Option<SocketAddr>,
    pub web_fingerprint: Option<String>,
    pub web_self_signed: bool,
    pub host_id: String,
    pub ca_pin: Option<String>,
    pub cluster_name: Option<String>,
    /// The auth service's state, when this process runs it (tests sign with it).
    pub authority: Option<Arc<Authority>>,
    shutdown: CancellationToken,
    /// Runs the shutdown in order and hands back every service's result.
    supervisor: Option<JoinHandle<Vec<ServiceResult>>>,
}

type ServiceTask = (&'static str, JoinHandle<anyhow::Result<()>>);
type ServiceResult = (
    &'static str,
    Result<anyhow::Result<()>, tokio::task::JoinError>,
);

/// What a process's shutdown waits for, in order: the proxy and node stop
/// accepting and let their users finish (`shutdown_grace`); then their
/// background work (audit forwarders, recorders, cluster views) drains,
/// sending what is queued to auth; then auth stops, last, so that a
/// single-process cluster's own node and proxy can still reach it.
struct Stages {
    front: Vec<ServiceTask>,
    drain: CancellationToken,
    flushers: Vec<JoinHandle<()>>,
    auth_stop: CancellationToken,
    auth: Option<ServiceTask>,
}

impl Stages {
    async fn run(self, shutdown: CancellationToken) -> Vec<ServiceResult> {
        shutdown.cancelled().await;
        let mut results = Vec::new();
        for (name, task) in self.front {
            results.push((name, task.await));
        }
        self.drain.cancel();
        for flusher in self.flushers {
            let _ = tokio::time::timeout(
                turnstile_ssh::audit_forwarder::FLUSH_DEADLINE + Duration::from_secs(1),
                flusher,
            )
            .await;
        }
        tracing::debug!("audit events flushed; stopping auth");
        self.auth_stop.cancel();
        if let Some((name, task)) = self.auth {
            results.push((name, task.await));
        }
        results
    }
}

impl Running {
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops every service and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits for the services to end (after the token fires).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        let results = match self.supervisor.take() {
            Some(s) => s.await.unwrap_or_default(),
            None => Vec::new(),
        };
        for (name, result) in results {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(service = name, error = %format!("{e:#}"), "service failed");
                    first_error.get_or_insert(e.context(format!("the {name} service failed")));
                }
                Err(e) => {
                    first_error.get_or_insert(anyhow::anyhow!("the {name} service panicked: {e}"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn bind(addr: SocketAddr, what: &str, field: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the {what} service; is another process using it? Change {field}")
    })
}

/// The TLS identity of a service running next to auth, issued directly.
fn local_identity(
    authority: &Authority,
    data_dir: &Path,
    role: SystemRole,
    host_id: &str,
) -> anyhow::Result<TlsIdentity> {
    if let Some(existing) = TlsIdentity::load(data_dir, role)?
        && existing.ca_pem == authority.tls_ca().cert_pem
    {
        return Ok(existing);
    }
    let issued = authority.issue_tls(role, host_id, None)?;
    let identity = TlsIdentity {
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_pem: authority.tls_ca().cert_pem.clone(),
    };
    identity.save(data_dir, role)?;
    Ok(identity)
}

/// The TLS identities of a process without the auth service: kept from an
/// earlier join, or obtained now with `join_token`, checking `ca_pin`.
async fn joined_identities(
    config: &ResolvedConfig,
    auth_targets: &[String],
    roles: &[SystemRole],
) -> anyhow::Result<HashMap<SystemRole, TlsIdentity>> {
    let data_dir = &config.data_dir;
    let mut identities = HashMap::new();
    let mut missing = Vec::new();
    for role in roles {
        match TlsIdentity::load(data_dir, *role)? {
            Some(identity) => {
                identities.insert(*role, identity);
            }
            None => missing.push(*role),
        }
    }
    if missing.is_empty() {
        if config.join_token.is_some() {
            tracing::info!(
                "this process joined earlier; turnstile.join_token is not needed any more"
            );
        }
        return Ok(identities);
    }
    let (Some(token), Some(pin)) = (&config.join_token, &config.ca_pin) else {
        bail!(
            "this process has not joined the cluster yet: set turnstile.join_token and turnstile.ca_pin, from `turnstile admin tokens add --type {}` on the auth server",
            missing
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
    };
    // Through the first auth server that answers; any other refusal (a
    // wrong pin, a used token) is final.
    let mut unreachable = None;
    let mut joined = None;
    for auth_target in auth_targets {
        tracing::info!(auth = %auth_target, roles = ?missing, "joining the cluster");
        match join(auth_target, token, pin, &missing, data_dir).await {
            Ok(j) => {
                joined = Some(j);
                break;
            }
            Err(e @ JoinError::Unreachable { .. }) => {
                tracing::warn!(error = %e, "cannot join through this auth server; trying the next");
                unreachable = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let joined = match (joined, unreachable) {
        (Some(joined), _) => joined,
        (None, Some(e)) => return Err(e.into()),
        (None, None) => bail!("turnstile.auth_servers is empty"),
    };
    tracing::info!(host_id = %joined.host_id, "joined the cluster");
    identities.extend(joined.identities);
    Ok(identities)
}

/// Fills the cluster view before serving, so a later auth outage finds it
/// cached; if auth is unreachable now, the refresher keeps trying.
async fn warm(view: &ClusterView) {
    if let Err(e) = view.refresh().await {
        tracing::warn!(error = %e, "cannot load the cluster view from auth yet; will keep trying");
    }
}

fn host_part(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some((host, _)) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        None => addr.to_string(),
    }
}

/// Opens the recording store and proves it is there and writable: a URI with
/// bad credentials or a missing bucket stops the start, with the store's answer.
async fn recording_store(uri: &StoreUri) -> anyhow::Result<Arc<dyn UploadStore>> {
    let store = turnstile_recording::storage::open(uri, FILE_STORE_MIN_PART)
        .map_err(|e| anyhow::anyhow!("turnstile.storage.audit_sessions_uri: {e}"))?;
    store.check().await.map_err(|e| {
        anyhow::anyhow!(
            "turnstile.storage.audit_sessions_uri: the recording store cannot be used: {e}"
        )
    })?;
    Ok(store)
}

pub async fn launch(config: ResolvedConfig) -> anyhow::Result<Running> {
    let shutdown = CancellationToken::new();
    let result = launch_services(config, shutdown.clone()).await;
    if result.is_err() {
        // Whatever already started stops with the failed launch.
        shutdown.cancel();
    }
    result
}

async fn launch_services(
    config: ResolvedConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;
    let _ = std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700));
    let mut stages = Stages {
        front: Vec::new(),
        drain: CancellationToken::new(),
        flushers: Vec::new(),
        auth_stop: CancellationToken::new(),
        auth: None,
    };
    let drain = stages.drain.clone();

    // Bind everything first: a port in use fails before anything starts.
    let auth_listener = match &config.auth {
        Some(a) => Some(bind(a.listen_addr, "auth", "auth_service.listen_addr").await?),
        None => None,
    };
    let proxy_listener = match &config.proxy {
        Some(p) => Some(bind(p.listen_addr, "proxy", "proxy_service.listen_addr").await?),
        None => None,
    };
    let web_listener = match config.proxy.as_ref().and_then(|p| p.web.as_ref()) {
        Some(w) => Some(
            bind(
                w.listen_addr,
                "web console",
                "proxy_service.web_listen_addr",
            )
            .await?,
        ),
        None => None,
    };
    let node_listener = match &config.node {
        Some(n) => Some(bind(n.listen_addr, "node", "ssh_service.listen_addr").await?),
        None => None,
    };
    let metrics_listener = match config.metrics_listen_addr {
        Some(a) => Some(bind(a, "metrics", "turnstile.metrics_listen_addr").await?),
        None => None,
    };
    let mut roles = Vec::new();
    if config.proxy.is_some() {
        roles.push(SystemRole::Proxy);
    }
    if config.node.is_some() {
        roles.push(SystemRole::Node);
    }

    let mut running = Running {
        data_dir: data_dir.clone(),
        auth_addr: None,
        proxy_addr: None,
        proxy_public_addr: None,
        node_addr: None,
        node_name: config.node.as_ref().map(|n| n.node_name.clone()),
        metrics_addr: None,
        web_addr: None,
        web_fingerprint: None,
        web_self_signed: false,
        host_id: String::new(),
        ca_pin: None,
        cluster_name: None,
        authority: None,
        shutdown: shutdown.clone(),
        supervisor: None,
    };

    // Identities: issued directly by a local auth service, or obtained by
    // joining a remote one with a token (once; kept in the data dir).
    let mut identities: HashMap<SystemRole, TlsIdentity> = HashMap::new();
    let auth_targets: Vec<String> = match (&config.auth, auth_listener) {
        (Some(auth_settings), Some(auth_listener)) => {
            let host_id = load_or_create_host_id(&data_dir)?;
            let backend: Arc<dyn Backend> = match &auth_settings.storage {
                StorageKind::Sqlite => Arc::new(
                    SqliteBackend::open(&auth_settings.storage_path).with_context(|| {
                        format!(
                            "cannot open the backend {}",
                            auth_settings.storage_path.display()
                        )
                    })?,
                ),
                StorageKind::Memory => Arc::new(MemoryBackend::new()),
                StorageKind::Etcd(settings) => {
                    let etcd = EtcdBackend::connect(settings)
                        .map_err(|e| anyhow::anyhow!("turnstile.storage: {e}"))?;
                    etcd.check().await.map_err(|e| {
                        anyhow::anyhow!(
                            "cannot reach the etcd backend: {e}; check turnstile.storage.peers \
                             and that etcd runs"
                        )
                    })?;
                    Arc::new(etcd)
                }
            };
            let audit: Arc<dyn AuditLog> = match &auth_settings.audit_events {
                AuditEventsUri::File(dir) => {
                    Arc::new(FileAuditLog::new(dir, Arc::new(SystemClock)))
                }
                // Events PostgreSQL cannot take wait in data_dir/audit-spool.
                AuditEventsUri::Postgres(uri) => Arc::new(SpooledAuditLog::new(
                    PostgresAuditLog::connect(uri, Arc::new(SystemClock))
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "turnstile.storage.audit_events_uri: cannot use the audit log: {e}"
                            )
                        })?,
                    data_dir.join("audit-spool"),
                    Arc::new(SystemClock),
                    stages.auth_stop.clone(),
                )),
            };
            let authority = Arc::new(
                Authority::open(
                    backend,
                    Arc::new(SystemClock),
                    audit,
                    &auth_settings.cluster_name,
                )
                .await?
                .with_login_policy(auth_settings.login_policy.clone())
                .with_host_cert_ttl(auth_settings.host_cert_ttl),
            );
            cluster_config::apply_file(
                authority.backend().as_ref(),
                &auth_settings.cluster_settings,
            )
            .await?;
            let auth_addr = auth_listener.local_addr()?;
            running.auth_addr = Some(auth_addr);
            running.ca_pin = Some(authority.tls_ca().pin()?);
            running.cluster_name = Some(authority.cluster_name().to_string());
            running.authority = Some(authority.clone());
            std::fs::write(data_dir.join(AUTH_ADDR_FILE), auth_addr.to_string())?;
            local_identity(&authority, &data_dir, SystemRole::Admin, "admin")?;
            for role in &roles {
                identities.insert(
                    *role,
                    local_identity(&authority, &data_dir, *role, &host_id)?,
                );
            }
            let service = AuthService::new(
                authority.clone(),
                AuthServiceConfig {
                    host_id: host_id.clone(),
                    node_ttl: NODE_TTL,
                    store: recording_store(&auth_settings.recordings).await?,
                    upload_grace: auth_settings.upload_grace,
                },
            );
            let token = stages.auth_stop.clone();
            stages.auth = Some((
                "auth",
                tokio::spawn(async move { Ok(service.run(auth_listener, token).await?) }),
            ));
            vec![auth_addr.to_string()]
        }
        _ => {
            // Joining is once, through the first auth server that answers;
            // afterwards calls spread over all of them.
            identities = joined_identities(&config, &config.auth_servers, &roles).await?;
            config.auth_servers.clone()
        }
    };
    let host_id = load_or_create_host_id(&data_dir)?;
    running.host_id = host_id.clone();

    if let (Some(proxy), Some(listener)) = (&config.proxy, proxy_listener) {
        let bound = listener.local_addr()?;
        let public = advertised_addr(proxy.public_addr.as_deref(), bound);
        let tls = &identities[&SystemRole::Proxy];
        let view = ClusterView::new(auth_servers_client(&auth_targets, tls)?);
        let mut principals = vec![
            host_part(&public),
            bound.ip().to_string(),
            "localhost".into(),
            host_name(),
        ];
        principals.dedup();
        let host = host_cert::obtain(
            &view,
            &data_dir,
            SystemRole::Proxy,
            HostRequest::Proxy { principals },
            drain.clone(),
        )
        .await?
        .credentials;
        warm(&view).await;
        view.spawn_refresher(config.view_refresh, drain.clone());
        view.spawn_watcher(drain.clone());
        let service = ProxyService::new(
            ProxyConfig {
                host_id: host_id.clone(),
                shutdown_grace: config.shutdown_grace,
                node_connect_timeout: Duration::from_secs(10),
                pre_auth: config.pre_auth.clone(),
            },
            view.clone(),
            host,
            // The proxy records in proxy modes; its spool is its own.
            recorder(
                &data_dir.join("proxy-spool"),
                &auth_targets,
                tls,
                &config.recording,
                &drain,
            )?,
            forwarder(
                &view,
                &data_dir,
                "proxy",
                config.audit_queue_max,
                &mut stages,
            )?,
        );
        if let (Some(web), Some(listener)) = (&proxy.web, web_listener) {
            let cert = match &web.cert_files {
                Some((cert, key)) => turnstile_web::CertSource::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                None => turnstile_web::CertSource::SelfSigned {
                    dir: data_dir.join("web"),
                    name: host_part(&public),
                },
            };
            let console = turnstile_web::WebConsole::new(
                turnstile_web::WebConfig {
                    cert,
                    // Terminals come in through this proxy's own door, by
                    // an address its certificate names.
                    proxy_addr: if bound.ip().is_unspecified() {
                        format!("localhost:{}", bound.port())
                    } else {
                        bound.to_string()
                    },
                    idle_timeout: web.idle_timeout,
                },
                view.clone(),
            )?;
            running.web_addr = Some(listener.local_addr()?);
            running.web_fingerprint = Some(console.fingerprint().to_string());
            running.web_self_signed = console.self_signed();
            let token = shutdown.clone();
            stages.front.push((
                "web console",
                tokio::spawn(async move {
                    console.run(listener, token).await;
                    Ok(())
                }),
            ));
        }
        std::fs::write(data_dir.join(PROXY_ADDR_FILE), &public)?;
        running.proxy_addr = Some(bound);
        running.proxy_public_addr = Some(public);
        let token = shutdown.clone();
        stages.front.push((
            "proxy",
            tokio::spawn(async move { Ok(service.run(listener, token).await?) }),
        ));
    }

    if let (Some(node), Some(listener)) = (&config.node, node_listener) {
        let bound = listener.local_addr()?;
        let advertised = advertised_addr(node.public_addr.as_deref(), bound);
        let tls = &identities[&SystemRole::Node];
        let view = ClusterView::new(auth_servers_client(&auth_targets, tls)?);
        // Auth sets the node's names: the one bound to it at first join.
        let issued = host_cert::obtain(
            &view,
            &data_dir,
            SystemRole::Node,
            HostRequest::Node {
                name: node.node_name.clone(),
                addr: advertised.clone(),
            },
            drain.clone(),
        )
        .await?;
        let node_name = match issued.node_name {
            Some(bound) if bound != node.node_name => {
                tracing::warn!(
                    configured = %node.node_name,
                    %bound,
                    "auth has this node named {bound:?} (renamed with `turnstile admin nodes rename`); ssh_service.node_name is ignored"
                );
                bound
            }
            _ => node.node_name.clone(),
        };
        let host = issued.credentials;
        warm(&view).await;
        view.spawn_refresher(config.view_refresh, drain.clone());
        view.spawn_watcher(drain.clone());
        let service = NodeService::new(
            NodeConfig {
                host_id: host_id.clone(),
                node_name,
                labels: node.labels.clone(),
                public_addr: node.public_addr.clone(),
                heartbeat_interval: node.heartbeat_interval,
                connect_timeout: node.connect_timeout,
                shutdown_grace: config.shutdown_grace,
                accept_env: node.accept_env.clone(),
                gateway_ports: node.gateway_ports,
                pre_auth: config.pre_auth.clone(),
            },
            view.clone(),
            host,
            forwarder(
                &view,
                &data_dir,
                "node",
                config.audit_queue_max,
                &mut stages,
            )?,
            recorder(
                &data_dir.join("spool"),
                &auth_targets,
                tls,
                &config.recording,
                &drain,
            )?,
        );
        running.node_addr = Some(bound);
        let token = shutdown.clone();
        stages.front.push((
            "node",
            tokio::spawn(async move { Ok(service.run(listener, token).await?) }),
        ));
    }
    crate::memory::spawn_trimmer(drain.clone());
    if let Some(listener) = metrics_listener {
        running.metrics_addr = Some(listener.local_addr()?);
        crate::metrics_endpoint::spawn(listener, drain.clone());
    }
    running.supervisor = Some(tokio::spawn(stages.run(shutdown)));
    Ok(running)
}

/// A node's or proxy's audit forwarder, its queue under
/// `data_dir/audit-queue/<who>`, drained at the second stage of shutdown.
fn forwarder(
    view: &ClusterView,
    data_dir: &Path,
    who: &str,
    max_bytes: u64,
    stages: &mut Stages,
) -> anyhow::Result<Arc<AuditForwarder>> {
    let dir = data_dir.join("audit-queue").join(who);
    let (forwarder, task) =
        AuditForwarder::spawn(view.client(), &dir, max_bytes, stages.drain.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    stages.flushers.push(task);
    Ok(forwarder)
}

/// The recorder of a proxy or node, spooling under `spool`. Its streams to
/// auth get a connection of their own: a thousand recording streams share
/// that connection's flow-control window, and a stream auth is slow to
/// read must never hold up the small calls (cluster view, audit events,
/// heartbeats) on the service's connection.
fn recorder(
    spool: &Path,
    auth_targets: &[String],
    tls: &TlsIdentity,
    config: &turnstile_recording::recorder::RecorderConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Recorder>> {
    let spool = Spool::open(spool)
        .map_err(|e| anyhow::anyhow!("session spool {}: {e}", spool.display()))?;
    Ok(Recorder::new(
        Shipper::start(
            spool,
            auth_servers_client(auth_targets, tls)?,
            shipper::DEFAULT_CONCURRENCY,
            shutdown.clone(),
        ),
        config.clone(),
    ))
}
