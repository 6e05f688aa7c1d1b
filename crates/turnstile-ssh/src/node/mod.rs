//! The node service: an SSH server that runs shells and commands in real PTYs
//! for users holding a certificate of the cluster, registers itself with auth
//! and keeps heartbeating while it runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use turnstile_api::clock::{Clock, SystemClock};
use turnstile_api::identity::UserIdentity;
use turnstile_api::labels::Labels;
use turnstile_api::role::RoleSet;
use turnstile_api::rpc::proto;

use std::collections::HashMap;
use std::sync::Mutex;

use turnstile_recording::recorder::Recorder;

use crate::audit_forwarder::AuditForwarder;
use crate::cluster_view::ClusterView;
use crate::live::{Judge, LiveConnections, Watched, ends_by_itself};
pub use crate::server::HostCredentials;
use crate::server::{HeaderPolicy, Listening, serve};
use crate::session_control::{ChannelLimit, LeaseService};

mod connection;
mod forward;
mod process;
mod session;
mod sftp_audit;

pub(crate) use connection::prohibited;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub host_id: String,
    pub node_name: String,
    pub labels: Labels,
    /// What the node advertises; `None`: the bound address.
    pub public_addr: Option<String>,
    pub heartbeat_interval: Duration,
    /// How long a forwarded (`direct-tcpip`) connect may take.
    pub connect_timeout: Duration,
    /// How long to let sessions finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// Environment variables a client may set, as sshd's `AcceptEnv`
    /// (patterns with `*` and `?`); `TURNSTILE_*` never.
    pub accept_env: Vec<String>,
    /// Remote forwards may listen on the address the client asks for, as
    /// sshd's `GatewayPorts yes`; otherwise on loopback only.
    pub gateway_ports: bool,
    /// Limits on connections before they authenticate.
    pub pre_auth: crate::pre_auth::PreAuthLimits,
}

/// What `ssh_service.accept_env` is when the file does not set it.
pub const DEFAULT_ACCEPT_ENV: &[&str] = &["LANG", "LC_*", "TZ", "COLORTERM"];

pub(crate) struct NodeShared {
    pub config: NodeConfig,
    pub view: Arc<ClusterView>,
    pub tasks: TaskTracker,
    pub clock: Arc<dyn Clock>,
    pub audit: Arc<AuditForwarder>,
    pub recorder: Arc<Recorder>,
    pub lease_service: Arc<dyn LeaseService>,
    /// Users' connections, checked every second against locks, the users'
    /// records and the ways sessions end by themselves.
    pub live: Arc<LiveConnections>,
    /// Open connections of users, reported to auth for `admin sessions ls`.
    trackers: Mutex<HashMap<String, (proto::SessionTracker, Arc<ChannelLimit>)>>,
}

impl NodeShared {
    pub fn clock_unix(&self) -> u64 {
        self.clock.unix_now()
    }

    /// May this certificate's identity log in as `login` here now? The
    /// identity cut down to the user's current record, and its roles; or
    /// why not. Asked at authentication and of every live connection.
    pub async fn admit(
        &self,
        identity: &UserIdentity,
        login: &str,
    ) -> Result<(UserIdentity, RoleSet), String> {
        let node = (self.config.node_name.as_str(), self.config.host_id.as_str());
        let current = self
            .view
            .standing(identity, Some(login), Some(node), self.clock_unix())
            .await?;
        let roles = self
            .view
            .role_set(&current.roles)
            .await
            .map_err(|e| format!("cannot check the roles of user {:?}: {e}", identity.user))?;
        roles
            .check_login(
                &current.user,
                login,
                &current.logins,
                &self.config.node_name,
                &self.config.labels,
            )
            .map_err(|refused| refused.0)?;
        Ok((current, roles))
    }

    fn tracker_ttl_ms(&self) -> u64 {
        u64::try_from((self.config.heartbeat_interval * 3).as_millis()).unwrap_or(60_000)
    }

    /// Starts reporting a connection.
    pub fn track(&self, mut tracker: proto::SessionTracker, channels: Arc<ChannelLimit>) {
        tracker.ttl_ms = self.tracker_ttl_ms();
        self.trackers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tracker.id.clone(), (tracker.clone(), channels));
        let mut client = self.view.client();
        tokio::spawn(async move {
            let _ = client
                .upsert_session_trackers(proto::SessionTrackerList {
                    trackers: vec![tracker],
                })
                .await;
        });
    }

    /// Stops reporting a connection, and tells auth it is gone.
    pub fn untrack(&self, id: &str) {
        let removed = self
            .trackers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if removed.is_some() {
            let mut client = self.view.client();
            let name = id.to_string();
            tokio::spawn(async move {
                let _ = client
                    .delete_session_tracker(proto::DeleteRequest { name })
                    .await;
            });
        }
    }

    fn trackers_now(&self) -> Vec<proto::SessionTracker> {
        self.trackers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(t, channels)| proto::SessionTracker {
                channels: channels.count(),
                ..t.clone()
            })
            .collect()
    }
}

impl Judge for NodeShared {
    async fn why_end(&self, w: &Watched) -> Option<String> {
        let roles = match self.admit(&w.identity, &w.login).await {
            Ok((_, roles)) => roles,
            Err(reason) => return Some(reason),
        };
        let endings = self.view.session_endings(&roles).await;
        ends_by_itself(w, endings, self.clock_unix())
    }
}

pub struct NodeService {
    config: NodeConfig,
    view: Arc<ClusterView>,
    host: HostCredentials,
    audit: Arc<AuditForwarder>,
    recorder: Arc<Recorder>,
}

/// The address a service advertises: `public_addr`, else the bound one.
pub fn advertised_addr(public_addr: Option<&str>, bound: SocketAddr) -> String {
    public_addr.map_or_else(|| bound.to_string(), str::to_string)
}

impl NodeService {
    pub fn new(
        config: NodeConfig,
        view: Arc<ClusterView>,
        host: HostCredentials,
        audit: Arc<AuditForwarder>,
        recorder: Arc<Recorder>,
    ) -> Self {
        Self {
            config,
            view,
            host,
            audit,
            recorder,
        }
    }

    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let bound = listener.local_addr()?;
        let advertised = advertised_addr(self.config.public_addr.as_deref(), bound);
        let shared = Arc::new(NodeShared {
            config: self.config.clone(),
            view: self.view.clone(),
            tasks: TaskTracker::new(),
            clock: Arc::new(SystemClock),
            audit: self.audit.clone(),
            recorder: self.recorder.clone(),
            lease_service: Arc::new(self.view.client()),
            trackers: Mutex::new(HashMap::new()),
            live: LiveConnections::new(),
        });
        // Live connections are watched until the node has stopped, through
        // the shutdown grace.
        let stopped = CancellationToken::new();
        shared.live.spawn_sweeper(
            shared.clone(),
            shared.audit.clone(),
            shared.config.host_id.clone(),
            stopped.clone(),
        );
        let notify = shared.clone();
        let begun = shutdown.clone();
        tokio::spawn(async move {
            begun.cancelled().await;
            let grace = turnstile_api::duration::format(notify.config.shutdown_grace);
            notify
                .live
                .tell_all(&format!(
                    "this node is shutting down; your session ends in {grace}"
                ))
                .await;
        });
        // Slots a previous run of this node held (it crashed, or stopped
        // before auth heard each release) are freed now, not when they expire.
        match self
            .view
            .client()
            .release_semaphores(proto::ReleaseSemaphoresRequest {})
            .await
        {
            Ok(r) if r.get_ref().released > 0 => {
                tracing::info!(
                    released = r.get_ref().released,
                    "freed the connection slots of this node's previous run"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e.message(), "cannot free the connection slots of this node's previous run; they expire with session_control_timeout");
            }
        }
        let heartbeat = tokio::spawn(heartbeat(
            shared.clone(),
            advertised.clone(),
            shutdown.clone(),
        ));
        tracing::info!(node = %self.config.node_name, %advertised, "node service listening");
        let headers = HeaderPolicy {
            view: shared.view.clone(),
            clock: shared.clock.clone(),
            host_id: shared.config.host_id.clone(),
            seen: Default::default(),
        };
        let for_handlers = shared.clone();
        let listening = Listening {
            host: self.host.clone(),
            methods: &[russh::MethodKind::PublicKey],
            headers: Some(headers),
            pre_auth: self.config.pre_auth.clone(),
            grace: self.config.shutdown_grace,
            who: "node",
        };
        serve(
            listener,
            listening,
            &shared.tasks,
            &shutdown,
            move |info, pre_auth| {
                connection::NodeConnection::new(for_handlers.clone(), info, pre_auth)
            },
        )
        .await;
        heartbeat.abort();
        stopped.cancel();
        tracing::info!("node service stopped");
        Ok(())
    }
}

/// Registers the node with auth now and every `heartbeat_interval`.
async fn heartbeat(shared: Arc<NodeShared>, advertised: String, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let mut client = shared.view.client();
        let node = proto::Node {
            id: shared.config.host_id.clone(),
            name: shared.config.node_name.clone(),
            addr: advertised.clone(),
            labels: shared.config.labels.clone().into_iter().collect(),
            expires_unix: 0,
            // Three missed heartbeats and the node is gone from listings.
            ttl_seconds: (shared.config.heartbeat_interval * 3).as_secs().max(1),
            host_key: String::new(),
        };
        let trackers = shared.trackers_now();
        if !trackers.is_empty() {
            let _ = client
                .upsert_session_trackers(proto::SessionTrackerList { trackers })
                .await;
        }
        match client.upsert_node(node).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("node registration with auth restored");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e.message(), "cannot register the node with auth; will retry");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(shared.config.heartbeat_interval) => {}
        }
    }
}
