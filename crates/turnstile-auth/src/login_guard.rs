//! What stands between a password guesser and the password hashes: a
//! (user, source address) pair that failed too often is locked out for a
//! while (other sources are not, so guessing cannot lock a user out
//! everywhere); each failure from a source makes that source's next answer
//! wait longer; at most a few argon2 verifications run at once; a user that
//! does not exist costs the same verification as one that does.
//!
//! The counts live in each auth server's memory. Login calls carry the user
//! as their affinity, so one user's attempts reach one auth server while it
//! is up.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;

use crate::passwords;

/// How password logins resist guessing (`auth_service.password_guessing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginPolicy {
    /// Failures of one (user, source) pair before it is locked out.
    pub max_failures: u32,
    /// How long a locked-out pair stays locked out.
    pub lockout: Duration,
    /// The wait after a source's first failure; doubled with each further
    /// failure from it, up to `backoff_max`.
    pub backoff_start: Duration,
    pub backoff_max: Duration,
    /// argon2 verifications at once (each takes ~19 MiB and a core).
    pub max_verifications: usize,
}

impl Default for LoginPolicy {
    fn default() -> Self {
        Self {
            max_failures: 10,
            lockout: Duration::from_secs(300),
            backoff_start: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
            max_verifications: 4,
        }
    }
}

/// The most pairs and sources remembered; beyond, the stale are forgotten.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct PairFailures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct SourceFailures {
    streak: u32,
    last: Instant,
}

#[derive(Debug, Default)]
struct Failures {
    pairs: HashMap<(String, String), PairFailures>,
    sources: HashMap<String, SourceFailures>,
}

/// What a failed attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterFailure {
    /// How long to wait before answering.
    pub wait: Duration,
    /// This failure locked the pair out.
    pub locked_out: bool,
}

#[derive(Debug)]
pub struct LoginGuard {
    policy: LoginPolicy,
    failures: Mutex<Failures>,
    verifications: Semaphore,
    /// The hash verified for users without one, so they cost the same.
    dummy_hash: OnceCell<String>,
}

/// The address part of `ip:port` (the port changes with every connection).
pub fn source_of(remote_addr: &str) -> String {
    remote_addr
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| remote_addr.to_string())
}

impl LoginGuard {
    pub fn new(policy: LoginPolicy) -> Self {
        Self {
            verifications: Semaphore::new(policy.max_verifications.max(1)),
            policy,
            failures: Mutex::new(Failures::default()),
            dummy_hash: OnceCell::new(),
        }
    }

    pub fn policy(&self) -> &LoginPolicy {
        &self.policy
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, Failures> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How much longer `user` from `source` is locked out, if it is.
    pub fn locked_out(&self, user: &str, source: &str) -> Option<Duration> {
        let now = Instant::now();
        self.failures()
            .pairs
            .get(&(user.to_string(), source.to_string()))
            .and_then(|p| p.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Counts a failure of `user` from `source`.
    pub fn failed(&self, user: &str, source: &str) -> AfterFailure {
        let now = Instant::now();
        let policy = &self.policy;
        let mut f = self.failures();
        if f.pairs.len() >= MAX_TRACKED || f.sources.len() >= MAX_TRACKED {
            f.pairs.retain(|_, p| {
                now - p.last < policy.lockout || p.locked_until.is_some_and(|u| u > now)
            });
            f.sources.retain(|_, s| now - s.last < policy.lockout);
        }
        let pair = f
            .pairs
            .entry((user.to_string(), source.to_string()))
            .or_insert(PairFailures {
                count: 0,
                last: now,
                locked_until: None,
            });
        // Failures older than a lockout are forgiven.
        if now - pair.last >= policy.lockout || pair.locked_until.is_some_and(|u| u <= now) {
            pair.count = 0;
            pair.locked_until = None;
        }
        pair.count += 1;
        pair.last = now;
        let locked_out = pair.count >= policy.max_failures;
        if locked_out {
            pair.locked_until = Some(now + policy.lockout);
            pair.count = 0;
        }
        let source = f
            .sources
            .entry(source.to_string())
            .or_insert(SourceFailures {
                streak: 0,
                last: now,
            });
        if now - source.last >= policy.lockout {
            source.streak = 0;
        }
        source.streak += 1;
        source.last = now;
        let doublings = source.streak.saturating_sub(1).min(16);
        let wait = policy
            .backoff_start
            .saturating_mul(1 << doublings)
            .min(policy.backoff_max);
        AfterFailure { wait, locked_out }
    }

    /// A success of `user` from `source` forgives that pair's failures.
    pub fn succeeded(&self, user: &str, source: &str) {
        self.failures()
            .pairs
            .remove(&(user.to_string(), source.to_string()));
    }

    /// Verifies `password` against `hash`, or against a hash of nothing
    /// when there is none (an unknown user, a user without a password), so
    /// both take as long; at most `max_verifications` at once.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> bool {
        let Ok(_permit) = self.verifications.acquire().await else {
            return false;
        };
        match hash {
            Some(hash) => passwords::verify(password, hash).await,
            None => {
                let dummy = self
                    .dummy_hash
                    .get_or_init(|| async {
                        let random = uuid::Uuid::new_v4().to_string();
                        passwords::hash(&random).await.unwrap_or_default()
                    })
                    .await;
                let _ = passwords::verify(password, dummy).await;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> LoginGuard {
        LoginGuard::new(LoginPolicy {
            max_failures: 3,
            lockout: Duration::from_secs(60),
            ..Default::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_pair_is_locked_out_after_its_failures_and_other_sources_are_not() {
        let g = guard();
        assert!(!g.failed("alice", "10.0.0.1").locked_out);
        assert!(!g.failed("alice", "10.0.0.1").locked_out);
        assert!(g.failed("alice", "10.0.0.1").locked_out);
        assert!(g.locked_out("alice", "10.0.0.1").is_some());
        assert!(
            g.locked_out("alice", "10.0.0.2").is_none(),
            "another source"
        );
        assert!(g.locked_out("bob", "10.0.0.1").is_none(), "another user");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(g.locked_out("alice", "10.0.0.1").is_none(), "lockout over");
        assert!(!g.failed("alice", "10.0.0.1").locked_out, "counting anew");
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_waits_longer_with_each_failure_up_to_the_maximum() {
        let g = guard();
        let waits: Vec<u64> = (0..6)
            .map(|i| g.failed(&format!("user{i}"), "10.0.0.1").wait.as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 8, 8]);
        assert_eq!(g.failed("x", "10.0.0.2").wait, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn success_forgives_the_pair() {
        let g = guard();
        g.failed("alice", "10.0.0.1");
        g.failed("alice", "10.0.0.1");
        g.succeeded("alice", "10.0.0.1");
        assert!(!g.failed("alice", "10.0.0.1").locked_out);
    }

    #[test]
    fn the_source_is_the_address_without_its_port() {
        assert_eq!(source_of("127.0.0.2:5555"), "127.0.0.2");
        assert_eq!(source_of("[::1]:22"), "::1");
        assert_eq!(source_of("somewhere"), "somewhere");
    }

    #[tokio::test]
    async fn every_verification_known_user_or_not_takes_one_of_four_permits() {
        use std::future::Future;
        use std::task::{Context, Waker};
        let g = LoginGuard::new(LoginPolicy::default());
        assert_eq!(g.verifications.available_permits(), 4);
        let h = passwords::hash("long enough").await.unwrap();
        for hash in [None, Some(h.as_str())] {
            let held = g.verifications.acquire_many(4).await.unwrap();
            let mut attempt = std::pin::pin!(g.verify("long enough", hash));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(
                attempt.as_mut().poll(&mut cx).is_pending(),
                "a fifth verification waits ({hash:?})"
            );
            drop(held);
            assert_eq!(attempt.await, hash.is_some());
        }
    }

    #[tokio::test]
    async fn unknown_users_cost_a_verification_too() {
        let g = guard();
        assert!(!g.verify("anything", None).await);
        let h = passwords::hash("long enough").await.unwrap();
        assert!(g.verify("long enough", Some(&h)).await);
    }
}
