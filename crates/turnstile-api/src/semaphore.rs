//! Semaphores: a named count of leases, such as `connection/<user>` for
//! `max_connections`. A lease names its holder (a node) and expires unless
//! renewed, so a crashed holder's slots free themselves.

use serde::{Deserialize, Serialize};

/// The kind of semaphore that counts a user's connections to nodes.
pub const CONNECTION: &str = "connection";

/// The shortest and longest lifetime a lease may be given; auth clamps
/// what a node asks for into this range, and `session_control_timeout` must
/// lie in it.
pub const LEASE_TTL_MIN: std::time::Duration = std::time::Duration::from_secs(1);
pub const LEASE_TTL_MAX: std::time::Duration = std::time::Duration::from_secs(3600);

/// Checks a `session_control_timeout` (a lease's lifetime) against
/// [`LEASE_TTL_MIN`]..=[`LEASE_TTL_MAX`].
pub fn check_lease_ttl(ttl: std::time::Duration) -> Result<(), String> {
    if (LEASE_TTL_MIN..=LEASE_TTL_MAX).contains(&ttl) {
        Ok(())
    } else {
        Err("must be between 1s and 1h; write it like 30s or 2m (default 2m)".into())
    }
}

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

/// What a `max_connections` refusal adds about the oldest slot: where it is
/// held and since when, so the user (or an admin) can find it.
pub const HELD_ON: &str = "; held on ";

/// `; held on <node> since <time>` for the oldest of `leases`.
pub fn held_on(leases: &[Lease]) -> String {
    match leases.iter().min_by_key(|l| l.since) {
        Some(oldest) => {
            let since = std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(u64::try_from(oldest.since).unwrap_or(0));
            let node = if oldest.holder_name.is_empty() {
                &oldest.holder
            } else {
                &oldest.holder_name
            };
            format!(
                "{HELD_ON}{node} since {}",
                humantime::format_rfc3339_seconds(since)
            )
        }
        None => String::new(),
    }
}

/// The message a user reads when `max_sessions` refuses a channel.
pub fn too_many_sessions(user: &str, max: u32) -> String {
    format!("too many session channels for user \"{user}\" (max={max})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_slot_is_named_with_its_node_and_time() {
        let lease = |name: &str, since: i64| Lease {
            lease_id: "l".into(),
            holder: "host".into(),
            holder_name: name.into(),
            expires: 0,
            login: "root".into(),
            remote_addr: "a".into(),
            since,
        };
        assert_eq!(
            held_on(&[lease("web2", 2_000_000), lease("web1", 1_000_000)]),
            "; held on web1 since 1970-01-01T00:16:40Z"
        );
        assert_eq!(held_on(&[]), "");
    }

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
