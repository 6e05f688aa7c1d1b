//! The users' live connections on a node or the proxy, watched so that an
//! ending the cluster decides (a lock, a removed user, a narrowed role,
//! idleness, an expired certificate) reaches them within a second of this
//! process knowing it. Each process says what ends a connection (its
//! `check`); this module keeps the list, asks, and ends connections one way:
//! the reason on every open session channel, an audit event, a disconnect
//! that names it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::ChannelId;
use russh::server::Handle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use turnstile_api::audit::AuditEvent;
use turnstile_api::identity::UserIdentity;

use crate::audit_forwarder::AuditForwarder;
use crate::cluster_view::SessionEndings;
use crate::session_control::ChannelLimit;

/// How often live connections are checked against the cached view.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// When the user last sent input (output alone is not activity).
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    pub fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// One user's connection, as the check sees it.
#[derive(Debug)]
pub struct Watched {
    /// What the certificate says.
    pub identity: UserIdentity,
    pub login: String,
    pub remote_addr: String,
    /// The certificate's `valid_before` (unix seconds), when ending the
    /// connection at expiry is this process's to do.
    pub cert_valid_before: Option<u64>,
    pub activity: Arc<Activity>,
    handle: Handle,
    /// The session channels to tell, when known.
    channels: Option<Arc<ChannelLimit>>,
    ended: AtomicBool,
}

/// The connections of one process.
#[derive(Debug, Default)]
pub struct LiveConnections {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<Watched>>>,
}

/// Keeps a connection on the list until dropped.
#[derive(Debug)]
pub struct WatchGuard {
    live: Arc<LiveConnections>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.live
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// What a process knows of a connection when it starts watching it.
pub struct WatchRequest {
    pub identity: UserIdentity,
    pub login: String,
    pub remote_addr: String,
    pub cert_valid_before: Option<u64>,
    pub activity: Arc<Activity>,
    pub handle: Handle,
    pub channels: Option<Arc<ChannelLimit>>,
}

impl LiveConnections {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn watch(self: &Arc<Self>, r: WatchRequest) -> WatchGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let watched = Arc::new(Watched {
            identity: r.identity,
            login: r.login,
            remote_addr: r.remote_addr,
            cert_valid_before: r.cert_valid_before,
            activity: r.activity,
            handle: r.handle,
            channels: r.channels,
            ended: AtomicBool::new(false),
        });
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, watched);
        WatchGuard {
            live: self.clone(),
            id,
        }
    }

    /// Writes `text` on every open session channel of every connection.
    pub async fn tell_all(&self, text: &str) {
        let notice = format!("\r\nturnstile: {text}\r\n");
        for w in self.all() {
            let Some(channels) = &w.channels else {
                continue;
            };
            for id in channels.open_channels() {
                let _ = w
                    .handle
                    .extended_data(id, 1, notice.clone().into_bytes())
                    .await;
            }
        }
    }

    fn all(&self) -> Vec<Arc<Watched>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every [`SWEEP_EVERY`] until `shutdown`, asks `judge` of each
    /// connection and ends those it gives a reason for, recording a
    /// `client.disconnect` event from `server_id`.
    pub fn spawn_sweeper<J: Judge>(
        self: &Arc<Self>,
        judge: Arc<J>,
        audit: Arc<AuditForwarder>,
        server_id: String,
        shutdown: CancellationToken,
    ) {
        let live = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                for w in live.all() {
                    if w.ended.load(Ordering::Relaxed) {
                        continue;
                    }
                    let Some(reason) = judge.why_end(&w).await else {
                        continue;
                    };
                    w.ended.store(true, Ordering::Relaxed);
                    tracing::warn!(user = %w.identity.user, login = %w.login, %reason, "ending a live connection");
                    audit.emit(AuditEvent::ClientDisconnect {
                        user: w.identity.user.clone(),
                        login: w.login.clone(),
                        server_id: server_id.clone(),
                        remote_addr: w.remote_addr.clone(),
                        reason: reason.clone(),
                    });
                    let channels = w
                        .channels
                        .as_ref()
                        .map(|c| c.open_channels())
                        .unwrap_or_default();
                    let handle = w.handle.clone();
                    tokio::spawn(async move { end(&handle, &channels, &reason).await });
                }
            }
        });
    }
}

/// What a process says of its live connections.
pub trait Judge: Send + Sync + 'static {
    /// Why this connection must end now, if it must.
    fn why_end(&self, w: &Watched) -> impl Future<Output = Option<String>> + Send;
}

/// Why a connection ends by itself now, if it does: its certificate has
/// expired under `disconnect_expired_cert`, or its user has been idle past
/// `client_idle_timeout`.
pub fn ends_by_itself(w: &Watched, endings: SessionEndings, now_unix: u64) -> Option<String> {
    if endings.at_cert_expiry
        && let Some(expiry) = w.cert_valid_before
        && now_unix >= expiry
    {
        return Some(format!(
            "the certificate of user {:?} expired (disconnect_expired_cert); get a new one with `turnstile login`",
            w.identity.user
        ));
    }
    if let Some(limit) = endings.idle_timeout
        && w.activity.idle_for() >= limit
    {
        return Some(format!(
            "no input for {} (client_idle_timeout)",
            turnstile_api::duration::format(limit)
        ));
    }
    None
}

/// Ends a connection: `reason` on each channel's standard error, then a
/// disconnect that names it (what OpenSSH prints when it has no channel).
pub async fn end(handle: &Handle, channels: &[ChannelId], reason: &str) {
    let notice = format!("\r\nturnstile: {reason}; closing the connection\r\n");
    for id in channels {
        let _ = handle
            .extended_data(*id, 1, notice.clone().into_bytes())
            .await;
    }
    let _ = handle
        .disconnect(
            russh::Disconnect::ByApplication,
            reason.to_string(),
            String::new(),
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn input_resets_idleness_and_time_alone_grows_it() {
        let a = Activity::new();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(a.idle_for(), Duration::from_secs(5));
        a.touch();
        assert_eq!(a.idle_for(), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(a.idle_for(), Duration::from_secs(2));
    }
}
