//! Locks (Teleport's `tctl lock`): an administrator's word that a user, a
//! node or a login may not be used, until the lock is removed or expires.
//! Auth stores them; nodes and proxies cache them with their view of the
//! cluster and apply them to new connections and to live ones. What a lock
//! covers is decided here, once, for every place that applies it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a lock is about: exactly one of the three.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockTarget {
    /// Every connection of this user.
    User(String),
    /// Every connection to this node (its name or host id, ignoring case).
    Node(String),
    /// Every connection as this login (the OS user on the node).
    Login(String),
}

impl LockTarget {
    pub fn kind(&self) -> &'static str {
        match self {
            LockTarget::User(_) => "user",
            LockTarget::Node(_) => "node",
            LockTarget::Login(_) => "login",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            LockTarget::User(v) | LockTarget::Node(v) | LockTarget::Login(v) => v,
        }
    }
}

impl fmt::Display for LockTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.kind(), self.value())
    }
}

impl FromStr for LockTarget {
    type Err = String;

    /// `user=NAME`, `node=NAME` or `login=NAME` (the wire form).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once('=')
            .ok_or_else(|| format!("lock target {s:?} is not KIND=VALUE"))?;
        if value.is_empty() {
            return Err(format!("lock target {s:?} names nothing"));
        }
        match kind {
            "user" => Ok(LockTarget::User(value.into())),
            "node" => Ok(LockTarget::Node(value.into())),
            "login" => Ok(LockTarget::Login(value.into())),
            other => Err(format!(
                "lock target kind {other:?} is not one of user, node, login"
            )),
        }
    }
}

/// A lock as auth stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub id: String,
    pub target: LockTarget,
    /// Shown to the users it stops; may be empty.
    #[serde(default)]
    pub message: String,
    pub created_unix: i64,
    /// Who placed it (the admin identity).
    #[serde(default)]
    pub created_by: String,
    /// When it stops applying; `None`: until removed.
    #[serde(default)]
    pub expires_unix: Option<i64>,
}

/// Who is connecting, or connected, as far as locks care.
#[derive(Debug, Clone, Copy)]
pub struct LockSubject<'a> {
    pub user: &'a str,
    /// The login, once known.
    pub login: Option<&'a str>,
    /// The node's name and host id, when the connection is to a node.
    pub node: Option<(&'a str, &'a str)>,
}

impl Lock {
    pub fn in_force(&self, now_unix: i64) -> bool {
        self.expires_unix.is_none_or(|t| now_unix < t)
    }

    pub fn covers(&self, who: &LockSubject<'_>, now_unix: i64) -> bool {
        if !self.in_force(now_unix) {
            return false;
        }
        match &self.target {
            LockTarget::User(u) => u == who.user,
            LockTarget::Login(l) => who.login == Some(l.as_str()),
            LockTarget::Node(n) => who
                .node
                .is_some_and(|(name, id)| n.eq_ignore_ascii_case(name) || n == id),
        }
    }

    /// What the stopped user reads.
    pub fn refusal(&self) -> String {
        let mut text = format!("access is locked ({}, lock {})", self.target, self.id);
        if !self.message.is_empty() {
            text.push_str(": ");
            text.push_str(&self.message);
        }
        text
    }
}

/// The first lock in `locks` that covers `who`.
pub fn covering<'a>(locks: &'a [Lock], who: &LockSubject<'_>, now_unix: i64) -> Option<&'a Lock> {
    locks.iter().find(|l| l.covers(who, now_unix))
}

/// How nodes and proxies apply locks while they cannot reach auth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockingMode {
    /// Keep applying the cached locks and let connections in.
    #[default]
    BestEffort,
    /// Refuse new connections once the cached locks are older than
    /// [`STRICT_LOCKS_MAX_AGE`].
    Strict,
}

/// How old cached locks may be before `strict` refuses new connections.
pub const STRICT_LOCKS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

impl LockingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockingMode::BestEffort => "best_effort",
            LockingMode::Strict => "strict",
        }
    }
}

impl fmt::Display for LockingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LockingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "best_effort" | "" => Ok(LockingMode::BestEffort),
            "strict" => Ok(LockingMode::Strict),
            other => Err(format!(
                "locking_mode {other:?} is not one of best_effort, strict"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(target: LockTarget, expires: Option<i64>) -> Lock {
        Lock {
            id: "l1".into(),
            target,
            message: "incident 42".into(),
            created_unix: 0,
            created_by: "admin".into(),
            expires_unix: expires,
        }
    }

    #[test]
    fn each_target_covers_only_its_own() {
        let dave = LockSubject {
            user: "dave",
            login: Some("root"),
            node: Some(("VM", "host-1")),
        };
        let erin = LockSubject {
            user: "erin",
            login: Some("ubuntu"),
            node: Some(("other", "host-2")),
        };
        for (target, covers_dave) in [
            (LockTarget::User("dave".into()), true),
            (LockTarget::User("Dave".into()), false),
            (LockTarget::Login("root".into()), true),
            (LockTarget::Node("vm".into()), true),
            (LockTarget::Node("host-1".into()), true),
            (LockTarget::Node("host-3".into()), false),
        ] {
            let l = lock(target.clone(), None);
            assert_eq!(l.covers(&dave, 10), covers_dave, "{target}");
            assert!(!l.covers(&erin, 10), "{target}");
        }
        // Before the login is known, a login lock does not apply.
        let early = LockSubject {
            login: None,
            ..dave
        };
        assert!(!lock(LockTarget::Login("root".into()), None).covers(&early, 10));
    }

    #[test]
    fn an_expired_lock_covers_nothing() {
        let l = lock(LockTarget::User("dave".into()), Some(100));
        let dave = LockSubject {
            user: "dave",
            login: None,
            node: None,
        };
        assert!(l.covers(&dave, 99));
        assert!(!l.covers(&dave, 100));
    }

    #[test]
    fn the_refusal_names_the_target_and_carries_the_message() {
        let text = lock(LockTarget::User("dave".into()), None).refusal();
        assert_eq!(
            text,
            "access is locked (user \"dave\", lock l1): incident 42"
        );
    }

    #[test]
    fn targets_and_modes_parse_with_errors_that_name_the_choices() {
        assert_eq!(
            "node=VM".parse::<LockTarget>(),
            Ok(LockTarget::Node("VM".into()))
        );
        assert!(
            "host=x"
                .parse::<LockTarget>()
                .unwrap_err()
                .contains("user, node, login")
        );
        assert_eq!("strict".parse::<LockingMode>(), Ok(LockingMode::Strict));
        assert!(
            "strikt"
                .parse::<LockingMode>()
                .unwrap_err()
                .contains("best_effort, strict")
        );
    }
}
