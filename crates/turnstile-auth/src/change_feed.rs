//! What nodes and proxies cache (roles, users, locks, the CAs, the cluster
//! settings, the node list), told to them as it changes: each auth server
//! watches those prefixes of the backend once and fans every change out to
//! its `WatchChanges` streams. On etcd the watch sees every auth server's
//! writes, so a change made through any of them reaches every node and
//! proxy at once, not at their next poll.
//!
//! Node heartbeats rewrite `nodes/<id>` every few seconds; only a node's
//! first write seen here (it appeared) and its delete are told.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

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

/// Should this change of a node's key be told? Only when the node is new
/// to this auth server or gone.
fn node_news(change: &Change, known: &mut HashSet<String>) -> bool {
    if change.deleted {
        known.remove(&change.key)
    } else {
        known.insert(change.key.clone())
    }
}

async fn watch_prefix(
    backend: Arc<dyn Backend>,
    prefix: &'static str,
    notices: broadcast::Sender<Notice>,
    shutdown: CancellationToken,
) {
    let mut known_nodes = HashSet::new();
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
                    if prefix == NODES && !node_news(&change, &mut known_nodes) {
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
}
