//! Limits on connections that have not authenticated yet, like sshd's
//! `MaxStartups`, `PerSourceMaxStartups` and `LoginGraceTime`: a bastion on
//! the internet is flooded before anyone logs in, and these keep the flood
//! from crowding out users who can authenticate.
//!
//! Every accepted connection holds a [`PreAuth`] until it authenticates (or
//! ends): it counts against the global cap (refused at random, more often as
//! the count nears `full`) and against its source address's cap. A node
//! counts a connection with a verified PROXY header under the address the
//! header names. What has not authenticated within `login_grace_time` is
//! disconnected.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// sshd's `start:rate:full`: from `start` unauthenticated connections on,
/// a new one is refused with probability `rate`%, rising linearly to 100%
/// at `full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxStartups {
    pub start: u32,
    pub rate: u32,
    pub full: u32,
}

impl Default for MaxStartups {
    fn default() -> Self {
        Self {
            start: 64,
            rate: 30,
            full: 512,
        }
    }
}

impl fmt::Display for MaxStartups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.rate, self.full)
    }
}

impl FromStr for MaxStartups {
    type Err = String;

    /// `start:rate:full`, or one number `N` (refuse every connection past N).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{s:?} is not start:rate:full (e.g. 64:30:512: random early drop of rate% from \
                 start unauthenticated connections, all refused at full) or one number"
            )
        };
        let numbers: Vec<u32> = s
            .split(':')
            .map(|p| p.trim().parse::<u32>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let parsed = match numbers[..] {
            [n] => Self {
                start: n,
                rate: 100,
                full: n,
            },
            [start, rate, full] => Self { start, rate, full },
            _ => return Err(bad()),
        };
        if parsed.start == 0 || parsed.start > parsed.full || parsed.rate > 100 {
            return Err(format!(
                "{s:?}: start must be at least 1 and at most full, rate at most 100"
            ));
        }
        Ok(parsed)
    }
}

impl MaxStartups {
    /// The chance, in percent, that a new connection is refused while
    /// `open` unauthenticated connections are open.
    fn drop_percent(&self, open: u32) -> u32 {
        if open < self.start {
            0
        } else if open >= self.full {
            100
        } else {
            self.rate + (100 - self.rate) * (open - self.start) / (self.full - self.start)
        }
    }
}

/// The limits a node or proxy puts on connections before authentication
/// (`turnstile.pre_auth` in the config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreAuthLimits {
    pub max_startups: MaxStartups,
    /// Unauthenticated connections from one address.
    pub per_source_max_startups: u32,
    /// From accept to the end of authentication.
    pub login_grace_time: Duration,
    /// To read a node's PROXY header, once the connection is accepted.
    pub proxy_header_timeout: Duration,
    /// Channels the proxy's anonymous user (cluster information only) may
    /// open on one connection.
    pub anonymous_max_channels: u32,
    /// The largest request frame the anonymous user may send.
    pub anonymous_max_frame: usize,
}

impl Default for PreAuthLimits {
    fn default() -> Self {
        Self {
            max_startups: MaxStartups::default(),
            per_source_max_startups: 10,
            login_grace_time: Duration::from_secs(60),
            proxy_header_timeout: Duration::from_secs(10),
            anonymous_max_channels: 4,
            anonymous_max_frame: 64 * 1024,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    open: u32,
    per_source: HashMap<IpAddr, u32>,
}

impl Counts {
    fn add(&mut self, source: IpAddr) {
        self.open += 1;
        *self.per_source.entry(source).or_default() += 1;
    }

    fn remove(&mut self, source: IpAddr) {
        self.open = self.open.saturating_sub(1);
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    fn of_source(&self, source: IpAddr) -> u32 {
        self.per_source.get(&source).copied().unwrap_or(0)
    }
}

/// Counts one listener's unauthenticated connections.
#[derive(Debug)]
pub struct Gatekeeper {
    limits: PreAuthLimits,
    counts: Mutex<Counts>,
}

impl Gatekeeper {
    pub fn new(limits: PreAuthLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn limits(&self) -> &PreAuthLimits {
        &self.limits
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many connections have not authenticated yet.
    pub fn unauthenticated(&self) -> u32 {
        self.counts().open
    }

    fn per_source_refusal(&self, source: IpAddr) -> String {
        format!(
            "too many unauthenticated connections from {source} (per_source_max_startups={}); try again later",
            self.limits.per_source_max_startups
        )
    }

    /// Counts a new connection from `source`, or says why it is refused.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<PreAuth, String> {
        let mut counts = self.counts();
        if counts.of_source(source) >= self.limits.per_source_max_startups {
            return Err(self.per_source_refusal(source));
        }
        let chance = self.limits.max_startups.drop_percent(counts.open);
        if chance > 0 && rand::random_range(0..100) < chance {
            return Err(format!(
                "too many unauthenticated connections ({} open, max_startups={}); try again later",
                counts.open, self.limits.max_startups
            ));
        }
        counts.add(source);
        Ok(PreAuth(Arc::new(Ticket {
            keeper: self.clone(),
            counted: Mutex::new(Some(source)),
            authenticated: CancellationToken::new(),
        })))
    }
}

#[derive(Debug)]
struct Ticket {
    keeper: Arc<Gatekeeper>,
    /// The address this connection counts under, until it authenticates.
    counted: Mutex<Option<IpAddr>>,
    authenticated: CancellationToken,
}

impl Ticket {
    fn counted(&self) -> MutexGuard<'_, Option<IpAddr>> {
        self.counted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the place back, once.
    fn release(&self) {
        if let Some(source) = self.counted().take() {
            self.keeper.counts().remove(source);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

/// One connection's place among the unauthenticated ones; given back when
/// it authenticates or ends.
#[derive(Debug, Clone)]
pub struct PreAuth(Arc<Ticket>);

impl PreAuth {
    /// The connection has authenticated: it no longer counts, and its
    /// `login_grace_time` no longer runs.
    pub fn authenticated(&self) {
        self.0.release();
        self.0.authenticated.cancel();
    }

    /// Counts the connection under `source` from now on (a node, once a
    /// PROXY header has told it whose connection this is).
    pub(crate) fn count_as(&self, source: IpAddr) -> Result<(), String> {
        let mut counted = self.0.counted();
        let Some(current) = *counted else {
            return Ok(());
        };
        if current == source {
            return Ok(());
        }
        let mut counts = self.0.keeper.counts();
        if counts.of_source(source) >= self.0.keeper.limits.per_source_max_startups {
            return Err(self.0.keeper.per_source_refusal(source));
        }
        counts.remove(current);
        counts.add(source);
        *counted = Some(source);
        Ok(())
    }

    /// Cancelled once the connection has authenticated.
    pub(crate) fn authenticated_signal(&self) -> CancellationToken {
        self.0.authenticated.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn max_startups_parses_like_sshd_and_names_the_form() {
        assert_eq!(
            "64:30:512".parse::<MaxStartups>().unwrap(),
            MaxStartups::default()
        );
        assert_eq!(
            "10".parse::<MaxStartups>().unwrap(),
            MaxStartups {
                start: 10,
                rate: 100,
                full: 10
            }
        );
        for bad in ["", "a:b:c", "1:2", "10:30:5", "0:30:10", "5:101:10"] {
            let e = bad.parse::<MaxStartups>().unwrap_err();
            assert!(e.contains("start"), "{bad}: {e}");
        }
    }

    #[test]
    fn early_drop_rises_from_rate_at_start_to_all_at_full() {
        let m = MaxStartups::default();
        assert_eq!(m.drop_percent(63), 0);
        assert_eq!(m.drop_percent(64), 30);
        assert_eq!(m.drop_percent(288), 65);
        assert_eq!(m.drop_percent(512), 100);
        assert_eq!(m.drop_percent(10_000), 100);
    }

    #[test]
    fn one_source_is_capped_and_others_still_get_in() {
        let keeper = Gatekeeper::new(PreAuthLimits {
            per_source_max_startups: 3,
            ..Default::default()
        });
        let held: Vec<_> = (0..3)
            .map(|_| keeper.admit(ip("127.0.0.2")).unwrap())
            .collect();
        let e = keeper.admit(ip("127.0.0.2")).unwrap_err();
        assert!(
            e.contains("127.0.0.2") && e.contains("per_source_max_startups=3"),
            "{e}"
        );
        let other = keeper.admit(ip("127.0.0.1")).expect("another source");
        assert_eq!(keeper.unauthenticated(), 4);
        // Authenticating or ending gives the place back, once.
        held[0].authenticated();
        held[0].authenticated();
        drop(held);
        assert_eq!(keeper.unauthenticated(), 1);
        keeper.admit(ip("127.0.0.2")).expect("room again");
        drop(other);
    }

    #[test]
    fn the_global_cap_refuses_everything_at_full() {
        let keeper = Gatekeeper::new(PreAuthLimits {
            max_startups: "2:100:2".parse().unwrap(),
            ..Default::default()
        });
        let _a = keeper.admit(ip("10.0.0.1")).unwrap();
        let _b = keeper.admit(ip("10.0.0.2")).unwrap();
        let e = keeper.admit(ip("10.0.0.3")).unwrap_err();
        assert!(e.contains("max_startups=2:100:2"), "{e}");
    }

    #[test]
    fn a_proxied_connection_counts_under_the_address_its_header_names() {
        let keeper = Gatekeeper::new(PreAuthLimits {
            per_source_max_startups: 1,
            ..Default::default()
        });
        let first = keeper.admit(ip("10.0.0.9")).unwrap();
        first.count_as(ip("192.0.2.1")).unwrap();
        let second = keeper
            .admit(ip("10.0.0.9"))
            .expect("the proxy's place was moved");
        let e = second.count_as(ip("192.0.2.1")).unwrap_err();
        assert!(e.contains("192.0.2.1"), "{e}");
        second.count_as(ip("192.0.2.2")).unwrap();
        assert_eq!(keeper.unauthenticated(), 2);
    }
}
