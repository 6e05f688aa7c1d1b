//! Semaphores: a named count of leases, such as `connection/<user>` for
//! `max_connections`. A lease names its holder (a node) and expires unless
//! renewed, so a crashed holder's slots free themselves.

use serde::{Deserialize, Serialize};

/// The kind of semaphore that counts a user's connections to nodes.
pub const CONNECTION: &str = "connection";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub lease_id: String,
    /// The holder's host id.
    pub holder: String,
    /// The holder's node name, for listings.
    #[serde(default)]
    pub holder_name: String,
    /// Unix milliseconds.
    pub expires: i64,
    pub login: String,
    pub remote_addr: String,
    /// Unix milliseconds.
    pub since: i64,
}

/// The stored value at `semaphores/<kind>/<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Semaphore {
    pub leases: Vec<Lease>,
}

impl Semaphore {
    /// Drops leases that expired at `now_ms`.
    pub fn drop_expired(&mut self, now_ms: i64) {
        self.leases.retain(|l| l.expires > now_ms);
    }

    /// The latest expiry of any lease: when the whole record may go.
    pub fn expires(&self) -> Option<i64> {
        self.leases.iter().map(|l| l.expires).max()
    }
}

/// The message a user reads when `max_connections` refuses them.
pub fn too_many_connections(user: &str, max: u32) -> String {
    format!("too many concurrent ssh connections for user \"{user}\" (max={max})")
}

/// The message a user reads when `max_sessions` refuses a channel.
pub fn too_many_sessions(user: &str, max: u32) -> String {
    format!("too many session channels for user \"{user}\" (max={max})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_match_the_reference_text() {
        assert_eq!(
            too_many_connections("alice", 2),
            r#"too many concurrent ssh connections for user "alice" (max=2)"#
        );
        assert_eq!(
            too_many_sessions("alice", 10),
            r#"too many session channels for user "alice" (max=10)"#
        );
    }
}
