//! What a node connection forwards besides sessions: remote port forwards
//! (`tcpip-forward`, `ssh -R`) listening on the node, and the user's agent
//! (`ssh -A`) offered to the login's processes on a Unix socket.
//!
//! Whether a connection may forward is decided by the caller from the roles;
//! what is here only does it, and cleans up when the connection ends.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::server::Handle;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use super::process::LocalUser;

/// The address a `tcpip-forward` request binds. Without `gateway_ports`, as
/// sshd's `GatewayPorts no`: loopback, whatever the client asked for.
pub fn bind_address(requested: &str, gateway_ports: bool) -> Result<IpAddr, String> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if !gateway_ports {
        return Ok(match requested {
            "::1" | "[::1]" => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            _ => loopback,
        });
    }
    match requested {
        "" | "*" | "0.0.0.0" => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        "localhost" => Ok(loopback),
        other => other
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("cannot listen on {other:?}: give an IP address")),
    }
}

/// The remote forwards of one connection, by what the client asked for.
#[derive(Debug, Default)]
pub struct RemoteForwards {
    listening: Mutex<HashMap<(String, u32), CancellationToken>>,
}

impl RemoteForwards {
    /// Listens on `bind` and offers each connection accepted to the client
    /// as a `forwarded-tcpip` channel naming `(address, port)` as it asked.
    /// Returns the port bound. Stops when `closed` is cancelled or the
    /// forward is cancelled.
    pub async fn listen(
        &self,
        handle: Handle,
        address: &str,
        bind: SocketAddr,
        closed: &CancellationToken,
    ) -> std::io::Result<u32> {
        let listener = TcpListener::bind(bind).await?;
        let port = u32::from(listener.local_addr()?.port());
        let stop = closed.child_token();
        self.listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((address.to_string(), port), stop.clone());
        let address = address.to_string();
        tokio::spawn(async move {
            loop {
                let (mut tcp, peer) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "remote forward stopped accepting");
                            return;
                        }
                    },
                };
                let handle = handle.clone();
                let address = address.clone();
                tokio::spawn(async move {
                    let channel = match handle
                        .channel_open_forwarded_tcpip(
                            address,
                            port,
                            peer.ip().to_string(),
                            u32::from(peer.port()),
                        )
                        .await
                    {
                        Ok(ch) => ch,
                        Err(e) => {
                            tracing::debug!(error = %e, "the client refused a forwarded connection");
                            return;
                        }
                    };
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                });
            }
        });
        Ok(port)
    }

    /// Stops a forward; false if there was none.
    pub fn cancel(&self, address: &str, port: u32) -> bool {
        let stop = self
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(address.to_string(), port));
        stop.map(|s| s.cancel()).is_some()
    }
}

/// The user's forwarded agent on this node: a socket in a directory only the
/// login can enter, removed with the connection.
#[derive(Debug)]
pub struct AgentSocket {
    dir: PathBuf,
    path: PathBuf,
    stop: CancellationToken,
}

impl AgentSocket {
    /// Where processes of the session find the agent (`SSH_AUTH_SOCK`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the socket; each connection to it becomes an
    /// `auth-agent@openssh.com` channel to the client.
    pub fn open(handle: Handle, owner: &LocalUser) -> Result<Self, String> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            format!("cannot offer the forwarded agent on this node: {what}: {e}")
        };
        let dir = std::env::temp_dir().join(format!("turnstile-agent-{}", uuid::Uuid::new_v4()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| failed("create its directory", &e))?;
        let cleanup = |e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let path = dir.join(format!("agent.{}", std::process::id()));
        let listener =
            UnixListener::bind(&path).map_err(|e| cleanup(failed("listen on its socket", &e)))?;
        // The login, and only the login (and root), may reach it.
        for p in [&dir, &path] {
            nix::unistd::chown(p.as_path(), Some(owner.uid), Some(owner.gid))
                .map_err(|e| cleanup(failed("give it to the login", &e)))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| cleanup(failed("restrict its directory", &e)))?;
        let stop = CancellationToken::new();
        let stopping = stop.clone();
        tokio::spawn(async move {
            loop {
                let mut unix = tokio::select! {
                    _ = stopping.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "the agent socket stopped accepting");
                            return;
                        }
                    },
                };
                let handle = handle.clone();
                tokio::spawn(async move {
                    match handle.channel_open_agent().await {
                        Ok(channel) => {
                            let mut stream = channel.into_stream();
                            let _ = tokio::io::copy_bidirectional(&mut stream, &mut unix).await;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "the client refused an agent channel")
                        }
                    }
                });
            }
        });
        Ok(Self { dir, path, stop })
    }
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Shared between a connection and its sessions: the agent socket, once
/// the client asked for it and it was allowed.
pub type AgentSlot = Arc<Mutex<Option<AgentSocket>>>;

/// The agent socket's path, if there is one.
pub fn agent_path(slot: &AgentSlot) -> Option<String> {
    slot.lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|a| a.path().display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_forwards_listen_on_loopback_unless_gateway_ports() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(bind_address("", false).unwrap(), lo);
        assert_eq!(bind_address("0.0.0.0", false).unwrap(), lo);
        assert_eq!(bind_address("10.0.0.1", false).unwrap(), lo);
        assert_eq!(
            bind_address("", true).unwrap(),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        );
        assert_eq!(
            bind_address("10.0.0.1", true).unwrap(),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert!(bind_address("example.com", true).is_err());
    }
}
