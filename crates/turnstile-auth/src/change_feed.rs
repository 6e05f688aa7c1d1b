//! What nodes and proxies cache (roles, users, locks, the CAs, the cluster
//! settings, the node list), told to them as it changes: each auth server
//! watches those prefixes of the backend once and fans every change out to
//! its `WatchChanges` streams. On etcd the watch sees every auth server's
//! writes, so a change made through any of them reaches every node and
//! proxy at once, not at their next poll.
//!
//! Node heartbeats rewrite `nodes/<id>` every few seconds; only a node's
//! first write seen here (it appeared), its first after its record expired
//! (it came back) and its delete are told.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Change};

/// The prefixes whose every change is told.
pub const WATCHED: &[&str] = &["roles/", "users/", "locks/", "cluster/", "authorities/"];
/// Told only as nodes appear and go.
const NODES: &str = "nodes/";
/// How long a broken backend watch waits before it is opened again.
const REWATCH_AFTER: Duration = Duration::from_secs(1);
/// Notices a slow stream may fall behind by before it is told to read all.
const BACKLOG: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// This key changed.
    Changed(String),
    /// Changes may have been missed (the backend's watch broke and is open
    /// again): read everything.
    Resync,
}

#[derive(Debug)]
pub struct ChangeFeed {
    notices: broadcast::Sender<Notice>,
}

impl ChangeFeed {
    /// Watches `backend` until `shutdown`.
    pub fn start(backend: Arc<dyn Backend>, shutdown: CancellationToken) -> Arc<Self> {
        let (notices, _) = broadcast::channel(BACKLOG);
        for prefix in WATCHED.iter().chain([&NODES]) {
            tokio::spawn(watch_prefix(
                backend.clone(),
                prefix,
                notices.clone(),
                shutdown.clone(),
            ));
        }
        Arc::new(Self { notices })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }
}

/// When a node's key was last written here, and the gap before that.
#[derive(Debug, Clone, Copy)]
struct Heartbeat {
    last: Instant,
    gap: Option<Duration>,
}

/// Should this change of a node's key be told? When the node is new to
/// this auth server, gone, or back after silence long enough that its
/// record expired (a node's record lives three heartbeats, and the gap
/// between its last two writes is its heartbeat).
fn node_news(change: &Change, known: &mut HashMap<String, Heartbeat>, now: Instant) -> bool {
    if change.deleted {
        return known.remove(&change.key).is_some();
    }
    match known.get_mut(&change.key) {
        None => {
            known.insert(
                change.key.clone(),
                Heartbeat {
                    last: now,
                    gap: None,
                },
            );
            true
        }
        Some(seen) => {
            let silent = now.saturating_duration_since(seen.last);
            let expired = seen.gap.is_some_and(|gap| silent > gap * 3);
            *seen = Heartbeat {
                last: now,
                gap: Some(silent),
            };
            expired
        }
    }
}

async fn watch_prefix(
    backend: Arc<dyn Backend>,
    prefix: &'static str,
    notices: broadcast::Sender<Notice>,
    shutdown: CancellationToken,
) {
    let mut known_nodes = HashMap::new();
    let mut failing = false;
    loop {
        match backend.watch(prefix).await {
            Ok(mut watch) => {
                if failing {
                    tracing::info!(prefix, "watching the backend again");
                    failing = false;
                }
                let _ = notices.send(Notice::Resync);
                loop {
                    let change = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        change = watch.next() => change,
                    };
                    let Some(change) = change else { break };
                    if prefix == NODES && !node_news(&change, &mut known_nodes, Instant::now()) {
                        continue;
                    }
                    // No stream listening is no error.
                    let _ = notices.send(Notice::Changed(change.key));
                }
                tracing::warn!(prefix, "the backend's watch ended; opening it again");
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(prefix, error = %e, "cannot watch the backend; nodes and proxies poll meanwhile");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REWATCH_AFTER) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::backend::MemoryBackend;

    async fn next(rx: &mut broadcast::Receiver<Notice>) -> Notice {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn changes_are_told_and_node_heartbeats_only_when_a_node_appears_or_goes() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let shutdown = CancellationToken::new();
        let feed = ChangeFeed::start(backend.clone(), shutdown.clone());
        let mut rx = feed.subscribe();
        // Every prefix's watch opens with a resync.
        for _ in 0..WATCHED.len() + 1 {
            assert_eq!(next(&mut rx).await, Notice::Resync);
        }
        backend.put("nodes/n1", vec![], None).await.unwrap();
        backend.put("nodes/n1", vec![], None).await.unwrap();
        backend.put("semaphores/x", vec![], None).await.unwrap();
        backend.put("roles/dev", vec![], None).await.unwrap();
        backend.delete("nodes/n1").await.unwrap();
        // Each prefix is watched on its own: order only within one.
        let mut told = Vec::new();
        for _ in 0..3 {
            told.push(next(&mut rx).await);
        }
        told.sort_by_key(|n| format!("{n:?}"));
        let changed = |k: &str| Notice::Changed(k.into());
        assert_eq!(
            told,
            [
                changed("nodes/n1"),
                changed("nodes/n1"),
                changed("roles/dev")
            ],
            "the node appeared and went; its heartbeat and the semaphore are not told"
        );
        backend.put("locks/l1", vec![], None).await.unwrap();
        assert_eq!(
            next(&mut rx).await,
            changed("locks/l1"),
            "and nothing else between"
        );
        shutdown.cancel();
    }

    #[test]
    fn a_node_back_after_its_record_expired_is_told_again() {
        let mut known = HashMap::new();
        let write = Change {
            key: "nodes/n1".into(),
            deleted: false,
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(node_news(&write, &mut known, at(0)), "appeared");
        assert!(!node_news(&write, &mut known, at(2)), "heartbeat");
        assert!(!node_news(&write, &mut known, at(4)), "heartbeat");
        assert!(!node_news(&write, &mut known, at(9)), "late, not expired");
        // Silent for more than three heartbeats: its record had expired.
        assert!(node_news(&write, &mut known, at(40)), "back");
        let gone = Change {
            key: "nodes/n1".into(),
            deleted: true,
        };
        assert!(node_news(&gone, &mut known, at(41)), "deleted");
        assert!(!node_news(&gone, &mut known, at(42)), "deleted twice");
    }
}
