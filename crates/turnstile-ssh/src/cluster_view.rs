//! What nodes and proxies know of the cluster: the CAs, the roles, the users,
//! the locks and the node list, fetched from auth over the gRPC API and cached, so that users without
//! limits keep working while auth is briefly unreachable. The cache refreshes
//! in the background; a miss (an unknown role or node) refreshes once at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::ssh_key::Fingerprint;
use russh::keys::{HashAlg, PublicKey};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use turnstile_api::auth_channel::AuthChannel;
use turnstile_api::error::{ApiError, ErrorKind};
use turnstile_api::identity::UserIdentity;
use turnstile_api::labels::Labels;
use turnstile_api::lock::{self, Lock, LockSubject, LockingMode, STRICT_LOCKS_MAX_AGE};
use turnstile_api::recording::RecordingMode;
use turnstile_api::role::{Role, RoleSet};
use turnstile_api::rpc::{AUTH_SERVER_NAME, AuthClient, proto};

use crate::identity::TlsIdentity;

/// A gRPC client of the auth service at `addr`, authenticated by `tls`. It
/// connects on first use and reconnects by itself after an outage.
pub fn auth_client(addr: &str, tls: &TlsIdentity) -> Result<AuthClient<AuthChannel>, ApiError> {
    auth_servers_client(&[addr.to_string()], tls)
}

/// A gRPC client of every auth server in `addrs` (the `auth_servers` of the
/// config), spreading calls over those that answer ([`AuthChannel`]).
pub fn auth_servers_client(
    addrs: &[String],
    tls: &TlsIdentity,
) -> Result<AuthClient<AuthChannel>, ApiError> {
    if addrs.is_empty() {
        return Err(ApiError::bad_parameter(
            "no auth server is configured; set turnstile.auth_servers",
        ));
    }
    let mut servers = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_pem))
            .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
            .domain_name(AUTH_SERVER_NAME);
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| ApiError::bad_parameter(format!("auth server address {addr:?}: {e}")))?
            .tls_config(config)
            .map_err(|e| ApiError::bad_parameter(format!("TLS identity: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .tcp_nodelay(true);
        servers.push((addr.clone(), endpoint.connect_lazy()));
    }
    Ok(AuthClient::new(AuthChannel::new(servers)))
}

/// Changes that arrive within this of each other make one refresh.
const WATCH_COALESCE: Duration = Duration::from_millis(50);
/// A broken watch stream is opened again after this.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// A registered node as the proxy routes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    pub addr: String,
    pub labels: Labels,
    /// The host key auth certified for this node (OpenSSH form; empty for
    /// a node that has not had a certificate since auth kept keys).
    pub host_key: String,
}

#[derive(Debug, Default)]
struct Snapshot {
    user_ca: Vec<PublicKey>,
    host_ca: Vec<PublicKey>,
    host_ca_text: Vec<String>,
    proxy_ca: Vec<PublicKey>,
    proxy_ca_text: Vec<String>,
    host_ca_endorsement: Vec<u8>,
    tls_ca_pem: String,
    cluster_name: String,
    config: proto::ClusterConfig,
    roles: HashMap<String, Role>,
    nodes: Vec<NodeInfo>,
    /// Each user's current roles and logins.
    users: HashMap<String, (Vec<String>, Vec<String>)>,
    locks: Vec<Lock>,
    /// When the last refresh auth answered began.
    fetched_at: Option<Instant>,
    loaded: bool,
}

/// How a role set's sessions end by themselves, with the cluster's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEndings {
    /// End after this long without input.
    pub idle_timeout: Option<Duration>,
    /// End when the certificate expires.
    pub at_cert_expiry: bool,
}

/// How long a name that was not found, even after a refresh, is answered
/// "unknown" from memory: a flood of made-up node or user names costs one
/// refresh per name per this long, not one per connection. A refresh
/// (every change auth announces causes one) forgets every miss.
const MISS_TTL: Duration = Duration::from_secs(2);
/// The most misses remembered; beyond, the oldest half is forgotten.
const MAX_MISSES: usize = 4096;

#[derive(Debug)]
pub struct ClusterView {
    client: AuthClient<AuthChannel>,
    snapshot: RwLock<Snapshot>,
    refresh_lock: tokio::sync::Mutex<()>,
    /// Names looked up in vain ("node:NAME", "user:NAME") and when.
    misses: std::sync::Mutex<HashMap<String, Instant>>,
    /// How many times auth was asked for everything (for tests).
    fetches: std::sync::atomic::AtomicU64,
}

fn parse_keys(keys: &[String]) -> Result<Vec<PublicKey>, ApiError> {
    keys.iter()
        .map(|k| {
            PublicKey::from_openssh(k)
                .map_err(|e| ApiError::internal(format!("auth sent a bad CA key: {e}")))
        })
        .collect()
}

impl ClusterView {
    pub fn new(client: AuthClient<AuthChannel>) -> Arc<Self> {
        Arc::new(Self {
            client,
            snapshot: RwLock::new(Snapshot::default()),
            refresh_lock: tokio::sync::Mutex::new(()),
            misses: std::sync::Mutex::new(HashMap::new()),
            fetches: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn misses(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.misses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` was looked up in vain within [`MISS_TTL`].
    fn missed_lately(&self, key: &str) -> bool {
        self.misses()
            .get(key)
            .is_some_and(|at| at.elapsed() < MISS_TTL)
    }

    fn remember_miss(&self, key: String) {
        let mut misses = self.misses();
        if misses.len() >= MAX_MISSES {
            misses.retain(|_, at| at.elapsed() < MISS_TTL / 2);
            if misses.len() >= MAX_MISSES {
                misses.clear();
            }
        }
        misses.insert(key, Instant::now());
    }

    /// Refreshes once for a name the cache does not hold, unless it was
    /// missed lately; misses at the same moment share one refresh. Returns
    /// whether to look again.
    async fn refresh_for_miss(&self, key: String) -> bool {
        if self.missed_lately(&key) {
            return false;
        }
        let _ = self.refresh_since(Instant::now()).await;
        self.remember_miss(key);
        true
    }

    pub fn client(&self) -> AuthClient<AuthChannel> {
        self.client.clone()
    }

    /// Refreshes unless a refresh that began after `asked` has finished
    /// (while this one waited its turn).
    async fn refresh_since(&self, asked: Instant) -> Result<(), ApiError> {
        let _one_at_a_time = self.refresh_lock.lock().await;
        if self
            .snapshot
            .read()
            .await
            .fetched_at
            .is_some_and(|t| t > asked)
        {
            return Ok(());
        }
        self.fetch().await
    }

    /// Fetches everything from auth; on failure the previous snapshot stays.
    pub async fn refresh(&self) -> Result<(), ApiError> {
        let _one_at_a_time = self.refresh_lock.lock().await;
        self.fetch().await
    }

    async fn fetch(&self) -> Result<(), ApiError> {
        // What is fetched is as new as this moment, not as the answer.
        let began = Instant::now();
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut client = self.client.clone();
        let authorities = client
            .get_authorities(proto::GetAuthoritiesRequest {})
            .await?
            .into_inner();
        let roles = client
            .get_roles(proto::GetRolesRequest { names: vec![] })
            .await?
            .into_inner();
        let nodes = client
            .list_nodes(proto::ListNodesRequest {})
            .await?
            .into_inner();
        let config = client
            .get_cluster_config(proto::GetClusterConfigRequest {})
            .await?
            .into_inner();
        let users = client
            .list_users(proto::ListUsersRequest {})
            .await?
            .into_inner();
        let locks = client
            .list_locks(proto::ListLocksRequest {})
            .await?
            .into_inner();
        let locks = locks
            .locks
            .iter()
            .map(|l| {
                serde_json::from_str::<Lock>(&l.lock_json)
                    .map_err(|e| ApiError::internal(format!("auth sent a bad lock: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut parsed_roles = HashMap::new();
        for json in roles.role_json {
            let role: Role = serde_json::from_str(&json)
                .map_err(|e| ApiError::internal(format!("auth sent a bad role: {e}")))?;
            parsed_roles.insert(role.metadata.name.clone(), role);
        }
        let fresh = Snapshot {
            user_ca: parse_keys(&authorities.user_ca)?,
            host_ca: parse_keys(&authorities.host_ca)?,
            host_ca_text: authorities.host_ca,
            proxy_ca: parse_keys(&authorities.proxy_ca)?,
            proxy_ca_text: authorities.proxy_ca,
            host_ca_endorsement: authorities.host_ca_endorsement,
            tls_ca_pem: authorities.tls_ca_pem,
            cluster_name: authorities.cluster_name,
            config,
            roles: parsed_roles,
            nodes: nodes
                .nodes
                .into_iter()
                .map(|n| NodeInfo {
                    id: n.id,
                    name: n.name,
                    addr: n.addr,
                    labels: n.labels.into_iter().collect(),
                    host_key: n.host_key,
                })
                .collect(),
            users: users
                .users
                .into_iter()
                .map(|u| (u.name, (u.roles, u.logins)))
                .collect(),
            locks,
            fetched_at: Some(began),
            loaded: true,
        };
        *self.snapshot.write().await = fresh;
        self.misses().clear();
        Ok(())
    }

    /// Refreshes every `every` until `shutdown`, logging (once per outage) when auth is unreachable.
    /// Follows auth's `WatchChanges` stream: every change (through any auth
    /// server) refreshes the view at once, so a new lock, role or user
    /// record applies within moments instead of at the next poll. Changes
    /// that come in a burst make one refresh. A broken stream is opened
    /// again (the poll of [`ClusterView::spawn_refresher`] covers the gap).
    pub fn spawn_watcher(self: &Arc<Self>, shutdown: CancellationToken) {
        let view = self.clone();
        tokio::spawn(async move {
            loop {
                let mut client = view.client.clone();
                let opened = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    opened = client.watch_changes(proto::WatchChangesRequest {}) => opened,
                };
                if let Ok(stream) = opened {
                    let mut stream = stream.into_inner();
                    loop {
                        let message = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            message = stream.message() => message,
                        };
                        if !matches!(message, Ok(Some(_))) {
                            break;
                        }
                        // What else came with it is covered by the same refresh.
                        while let Ok(Ok(Some(_))) =
                            tokio::time::timeout(WATCH_COALESCE, stream.message()).await
                        {
                        }
                        if let Err(e) = view.refresh().await {
                            tracing::debug!(error = %e, "cannot refresh the cluster view after a change");
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(REWATCH_AFTER) => {}
                }
            }
        });
    }

    pub fn spawn_refresher(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let view = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match view.refresh().await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("auth service reachable again; cluster view refreshed");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot refresh the cluster view from auth; serving cached data");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    async fn ensure_loaded(&self) -> Result<(), ApiError> {
        if self.snapshot.read().await.loaded {
            return Ok(());
        }
        self.refresh().await
    }

    pub async fn cluster_name(&self) -> Result<String, ApiError> {
        self.ensure_loaded().await?;
        Ok(self.snapshot.read().await.cluster_name.clone())
    }

    /// How long a connection slot lives without renewal.
    pub async fn session_control_timeout(&self) -> Result<Duration, ApiError> {
        self.ensure_loaded().await?;
        let ms = self.snapshot.read().await.config.session_control_timeout_ms;
        Ok(Duration::from_millis(if ms == 0 { 120_000 } else { ms }))
    }

    /// The cluster's recording mode.
    pub async fn session_recording(&self) -> Result<RecordingMode, ApiError> {
        self.ensure_loaded().await?;
        let mode = self.snapshot.read().await.config.session_recording.clone();
        mode.parse().map_err(|e| {
            ApiError::internal(format!("auth's session_recording cannot be followed: {e}"))
        })
    }

    pub async fn user_ca_fingerprints(&self) -> Result<Vec<Fingerprint>, ApiError> {
        self.ensure_loaded().await?;
        Ok(self
            .snapshot
            .read()
            .await
            .user_ca
            .iter()
            .map(|k| k.fingerprint(HashAlg::Sha256))
            .collect())
    }

    /// The cluster's public trust material, for first contact.
    pub async fn cluster_info(&self) -> Result<turnstile_api::door::ClusterInfo, ApiError> {
        use base64::Engine;
        self.ensure_loaded().await?;
        let s = self.snapshot.read().await;
        Ok(turnstile_api::door::ClusterInfo {
            cluster_name: s.cluster_name.clone(),
            tls_ca_pem: s.tls_ca_pem.clone(),
            host_ca: s.host_ca_text.clone(),
            host_ca_endorsement: base64::engine::general_purpose::STANDARD
                .encode(&s.host_ca_endorsement),
            proxy_ca: s.proxy_ca_text.clone(),
        })
    }

    /// The CAs a client of this cluster trusts (the web console's terminals
    /// connect through the proxy as `turnstile ssh` does).
    pub async fn trust(&self) -> Result<crate::client::Trust, ApiError> {
        self.ensure_loaded().await?;
        let s = self.snapshot.read().await;
        Ok(crate::client::Trust {
            host_ca: s.host_ca.clone(),
            proxy_ca: s.proxy_ca.clone(),
        })
    }

    /// The proxy host CA, which signs only proxies' own certificates.
    pub async fn proxy_ca_fingerprints(&self) -> Result<Vec<Fingerprint>, ApiError> {
        self.ensure_loaded().await?;
        Ok(self
            .snapshot
            .read()
            .await
            .proxy_ca
            .iter()
            .map(|k| k.fingerprint(HashAlg::Sha256))
            .collect())
    }

    pub async fn host_ca_keys(&self) -> Result<Vec<PublicKey>, ApiError> {
        self.ensure_loaded().await?;
        Ok(self.snapshot.read().await.host_ca.clone())
    }

    /// The named roles; a role unknown to the cache triggers one refresh.
    pub async fn role_set(&self, names: &[String]) -> Result<RoleSet, ApiError> {
        self.ensure_loaded().await?;
        for attempt in 0..2 {
            let snapshot = self.snapshot.read().await;
            let found: Vec<Role> = names
                .iter()
                .filter_map(|n| snapshot.roles.get(n).cloned())
                .collect();
            if found.len() == names.len() {
                return Ok(RoleSet::new(found));
            }
            drop(snapshot);
            if attempt == 0 {
                self.refresh().await?;
            }
        }
        let snapshot = self.snapshot.read().await;
        let missing: Vec<&str> = names
            .iter()
            .filter(|n| !snapshot.roles.contains_key(*n))
            .map(String::as_str)
            .collect();
        Err(ApiError::new(
            ErrorKind::AccessDenied,
            format!("role(s) {} no longer exist", missing.join(", ")),
        ))
    }

    /// The cluster's current word on a certificate's identity, for a
    /// connection as `login` (once known) to `node` (name, host id; none at
    /// the proxy): the identity cut down to the user's current record, or
    /// why it may not go on (a lock, a user no longer there, no role left).
    /// A user unknown to the cache refreshes it once.
    pub async fn standing(
        &self,
        identity: &UserIdentity,
        login: Option<&str>,
        node: Option<(&str, &str)>,
        now_unix: u64,
    ) -> Result<UserIdentity, String> {
        self.ensure_loaded()
            .await
            .map_err(|e| format!("cannot check user {:?} with auth: {e}", identity.user))?;
        // A user just added may be missing from the cache: refresh once.
        if !self
            .snapshot
            .read()
            .await
            .users
            .contains_key(&identity.user)
        {
            self.refresh_for_miss(format!("user:{}", identity.user))
                .await;
        }
        let s = self.snapshot.read().await;
        let who = LockSubject {
            user: &identity.user,
            login,
            node,
        };
        let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
        if let Some(lock) = lock::covering(&s.locks, &who, now) {
            return Err(lock.refusal());
        }
        identity.bounded_by(
            s.users
                .get(&identity.user)
                .map(|(r, l)| (r.as_slice(), l.as_slice())),
        )
    }

    /// Refuses new connections, in `strict` locking mode, while the cached
    /// locks are too old to trust.
    pub async fn locks_fresh_enough(&self) -> Result<(), String> {
        let s = self.snapshot.read().await;
        let mode: LockingMode = s.config.locking_mode.parse().unwrap_or_default();
        if mode == LockingMode::BestEffort {
            return Ok(());
        }
        match s.fetched_at.map(|t| t.elapsed()) {
            Some(age) if age <= STRICT_LOCKS_MAX_AGE => Ok(()),
            age => Err(format!(
                "locks cannot be checked: auth has not been reached {} and locking_mode is strict; try again once auth is back",
                age.map_or("since this process started".into(), |a| format!(
                    "for {}s",
                    a.as_secs()
                ))
            )),
        }
    }

    /// When sessions of `roles` end by themselves: the roles' options, else
    /// the cluster's defaults (the shortest idle timeout wins; any `true`
    /// ends sessions at certificate expiry).
    pub async fn session_endings(&self, roles: &RoleSet) -> SessionEndings {
        let s = self.snapshot.read().await;
        let limits = roles.limits();
        let cluster_idle = Duration::from_millis(s.config.client_idle_timeout_ms);
        let idle_timeout = [limits.client_idle_timeout, Some(cluster_idle)]
            .into_iter()
            .flatten()
            .filter(|d| !d.is_zero())
            .min();
        SessionEndings {
            idle_timeout,
            at_cert_expiry: limits.disconnect_expired_cert || s.config.disconnect_expired_cert,
        }
    }

    /// The nodes a holder of `roles` may see: the one rule `turnstile ls`
    /// (the proxy's subsystem) and the web console both answer with.
    pub async fn visible_nodes(&self, roles: &[String]) -> Result<Vec<NodeInfo>, ApiError> {
        let roles = self.role_set(roles).await?;
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| roles.can_see_node(&n.labels))
            .collect())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ApiError> {
        self.ensure_loaded().await?;
        Ok(self.snapshot.read().await.nodes.clone())
    }

    /// The node registered under `name` (or id); an unknown name triggers
    /// one refresh (none if it was missed lately).
    pub async fn find_node(&self, name: &str) -> Result<Option<NodeInfo>, ApiError> {
        self.ensure_loaded().await?;
        for attempt in 0..2 {
            if let Some(n) = self
                .snapshot
                .read()
                .await
                .nodes
                .iter()
                .find(|n| n.name.eq_ignore_ascii_case(name) || n.id == name)
            {
                return Ok(Some(n.clone()));
            }
            if attempt == 0
                && !self
                    .refresh_for_miss(format!("node:{}", name.to_ascii_lowercase()))
                    .await
            {
                break;
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view_with(mode: &str, fetched_at: Option<Instant>) -> Arc<ClusterView> {
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let view = ClusterView::new(AuthClient::new(AuthChannel::single("127.0.0.1:1", channel)));
        let snapshot = Snapshot {
            config: proto::ClusterConfig {
                locking_mode: mode.into(),
                ..Default::default()
            },
            fetched_at,
            loaded: true,
            ..Default::default()
        };
        *view.snapshot.try_write().unwrap() = snapshot;
        view
    }

    #[tokio::test]
    async fn strict_mode_refuses_new_connections_once_locks_are_too_old() {
        let long_ago = Instant::now()
            .checked_sub(STRICT_LOCKS_MAX_AGE + Duration::from_secs(1))
            .unwrap();
        assert!(
            view_with("strict", Some(Instant::now()))
                .locks_fresh_enough()
                .await
                .is_ok()
        );
        let refused = view_with("strict", Some(long_ago))
            .locks_fresh_enough()
            .await
            .unwrap_err();
        assert!(
            refused.contains("locks cannot be checked") && refused.contains("strict"),
            "{refused}"
        );
        assert!(
            view_with("strict", None)
                .locks_fresh_enough()
                .await
                .is_err()
        );
        // best_effort keeps letting users in on cached locks.
        assert!(
            view_with("best_effort", Some(long_ago))
                .locks_fresh_enough()
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn unknown_names_cost_one_refresh_each_not_one_per_lookup() {
        let view = view_with("best_effort", Some(Instant::now()));
        let fetches = || view.fetches.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..50 {
            assert!(view.find_node("ghost").await.unwrap().is_none());
            assert!(view.find_node("GHOST").await.unwrap().is_none());
        }
        assert_eq!(fetches(), 1, "one refresh for a name missed 100 times");
        let mallory = UserIdentity {
            user: "mallory".into(),
            roles: vec!["access".into()],
            logins: vec!["root".into()],
        };
        for _ in 0..50 {
            assert!(view.standing(&mallory, None, None, 10).await.is_err());
        }
        assert_eq!(fetches(), 2, "and one for a user missed 50 times");
        view.find_node("other").await.unwrap();
        assert_eq!(fetches(), 3, "another name is looked up again");
    }

    #[tokio::test]
    async fn a_cached_lock_applies_while_auth_is_unreachable() {
        let view = view_with("best_effort", None);
        {
            let mut s = view.snapshot.try_write().unwrap();
            s.users
                .insert("dave".into(), (vec!["access".into()], vec!["root".into()]));
            s.locks.push(Lock {
                id: "l1".into(),
                target: turnstile_api::lock::LockTarget::User("dave".into()),
                message: "incident".into(),
                created_unix: 0,
                created_by: "admin".into(),
                expires_unix: None,
            });
        }
        let dave = UserIdentity {
            user: "dave".into(),
            roles: vec!["access".into()],
            logins: vec!["root".into()],
        };
        let refused = view
            .standing(&dave, Some("root"), None, 10)
            .await
            .unwrap_err();
        assert!(refused.contains("incident"), "{refused}");
    }
}
