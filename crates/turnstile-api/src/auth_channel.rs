//! The transport of calls to a service that runs as several equal servers:
//! one gRPC channel per server, every call sent to the next server that
//! answers, in turn, so the load spreads over all of them. Calls to auth from
//! nodes, proxies and clients go through it ([`AuthChannel`], one channel
//! per entry of `auth_servers`), and so do the etcd backend's calls to the
//! etcd peers.
//!
//! Every second each server is probed (auth: `Ping`); one that does not
//! answer is passed over until it answers again, so a dead server stops
//! taking calls within about a second (two, for a host that drops packets)
//! and takes them again as soon as it is back; a call that finds nothing
//! listening marks its server down at once. Such a call (its request never
//! left) is sent to the next server: a unary call's message is kept for that.
//! A call already sent to a server that dies fails as it would with one
//! server, since resending it could apply it twice; its caller retries
//! (leases, audit forwarding and recording streams all do) and the retry goes
//! elsewhere. With every server down, calls fail with the last server's
//! error.
//!
//! A call may name an affinity ([`with_affinity`]): calls with the same one
//! go to the same server while it is up (rendezvous hashing over the
//! servers that are up, so a server's death moves only its own keys).
//! Connection slots use the user's name, so each user's semaphore is
//! changed by one auth server, whose cached copy and group commit then stay
//! good; exactness does not depend on it (the backend's compare-and-swap
//! keeps servers that do meet on one semaphore exact).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http;
use tonic::transport::Channel;

use crate::rpc::AuthClient;
use crate::rpc::proto::PingRequest;

/// How often each server is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe unanswered for this long marks its server down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the server behind a channel something cheap; an answer, even a
/// refusal, means it is up.
pub type Probe = Arc<
    dyn Fn(Channel) -> Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>
        + Send
        + Sync,
>;

/// The request header that carries a call's affinity.
pub const AFFINITY: &str = "turnstile-affinity";

/// `message` as a request that goes, while it is up, to the server every
/// call with the same `key` goes to.
pub fn with_affinity<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = tonic::metadata::MetadataValue::try_from(key) {
        request.metadata_mut().insert(AFFINITY, value);
    }
    request
}

/// FNV-1a of the key and a server's address: the rendezvous weight.
fn weight(key: &[u8], addr: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.iter().chain([0u8].iter()).chain(addr.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The calls of auth's API whose request is a stream: sent once, never
/// buffered or resent.
const AUTH_STREAMING: &[&str] = &["/turnstile.v1.Auth/RecordSession"];

#[derive(Debug)]
struct Server {
    addr: String,
    channel: Channel,
    up: AtomicBool,
}

struct Shared {
    servers: Vec<Server>,
    next: AtomicUsize,
    /// What a server is, in logs ("auth server", "etcd peer").
    what: &'static str,
    /// Paths of the calls whose request is a stream.
    streaming: &'static [&'static str],
    probe: Probe,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("servers", &self.servers)
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

/// A `tower` service over several servers' channels; clone it freely.
#[derive(Debug, Clone)]
pub struct FailoverChannel {
    shared: Arc<Shared>,
}

/// The channel of calls to the auth servers of `auth_servers`.
pub type AuthChannel = FailoverChannel;

impl FailoverChannel {
    /// Calls to auth spread over `servers` (address, lazily connecting
    /// channel), probed with `Ping`.
    ///
    /// # Panics
    /// If `servers` is empty.
    pub fn new(servers: Vec<(String, Channel)>) -> Self {
        let ping: Probe = Arc::new(|channel| {
            Box::pin(async move {
                AuthClient::new(channel)
                    .ping(PingRequest {})
                    .await
                    .map(drop)
            })
        });
        Self::with_probe(servers, "auth server", AUTH_STREAMING, ping)
    }

    /// One auth server: every call goes to it.
    pub fn single(addr: &str, channel: Channel) -> Self {
        Self::new(vec![(addr.to_string(), channel)])
    }

    /// Calls spread over `servers` of any service (`what`, in logs), whose
    /// calls at the paths `streaming` have a streaming request; `probe`
    /// asks a server whether it is up. With more than one server, a
    /// background task probes each every [`PROBE_EVERY`] while any clone of
    /// this channel lives; it needs a Tokio runtime.
    ///
    /// # Panics
    /// If `servers` is empty.
    pub fn with_probe(
        servers: Vec<(String, Channel)>,
        what: &'static str,
        streaming: &'static [&'static str],
        probe: Probe,
    ) -> Self {
        assert!(!servers.is_empty(), "a failover channel needs a server");
        let shared = Arc::new(Shared {
            servers: servers
                .into_iter()
                .map(|(addr, channel)| Server {
                    addr,
                    channel,
                    up: AtomicBool::new(true),
                })
                .collect(),
            next: AtomicUsize::new(0),
            what,
            streaming,
            probe,
        });
        if shared.servers.len() > 1
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(probe_all(Arc::downgrade(&shared)));
        }
        Self { shared }
    }

    /// The servers and whether each answered its last ping.
    pub fn servers(&self) -> Vec<(String, bool)> {
        self.shared
            .servers
            .iter()
            .map(|s| (s.addr.clone(), s.up.load(Ordering::Relaxed)))
            .collect()
    }

    /// The server for `key`: of those up (all if none is), the one with
    /// the highest weight for it.
    fn pick_for(&self, key: &[u8]) -> usize {
        let servers = &self.shared.servers;
        let any_up = servers.iter().any(|s| s.up.load(Ordering::Relaxed));
        (0..servers.len())
            .filter(|&i| !any_up || servers[i].up.load(Ordering::Relaxed))
            .max_by_key(|&i| weight(key, &servers[i].addr))
            .unwrap_or(0)
    }

    /// The next in turn of the servers that are up, or of all of them if
    /// none is.
    fn pick(&self) -> usize {
        let servers = &self.shared.servers;
        let turn = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let up: Vec<usize> = (0..servers.len())
            .filter(|&i| servers[i].up.load(Ordering::Relaxed))
            .collect();
        if up.is_empty() {
            turn % servers.len()
        } else {
            up[turn % up.len()]
        }
    }
}

/// Probes every server each [`PROBE_EVERY`] until the channel is dropped.
async fn probe_all(shared: Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        for server in &strong.servers {
            let asked = (strong.probe)(server.channel.clone());
            let up = match tokio::time::timeout(PROBE_TIMEOUT, asked).await {
                Ok(Ok(())) => true,
                // It answered, if only to refuse: it is up.
                Ok(Err(status)) => !matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ),
                Err(_) => false,
            };
            let was = server.up.swap(up, Ordering::Relaxed);
            if was != up {
                if up {
                    tracing::info!(server = %server.addr, "{} answers again", strong.what);
                } else {
                    tracing::warn!(server = %server.addr, "{} does not answer; calls go to the others", strong.what);
                }
            }
        }
        drop(strong);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Did the call fail before the request left (nothing listens there)?
/// Only then is resending it to another server safe for a call that
/// changes something.
fn never_sent(error: &tonic::transport::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        source = e.source();
    }
    false
}

impl Shared {
    /// Sends `request` to server `index`, marking it down if the transport
    /// fails.
    async fn send(
        &self,
        index: usize,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, tonic::transport::Error> {
        let server = &self.servers[index];
        let mut channel = server.channel.clone();
        std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
        let answer = channel.call(request).await;
        if answer.is_err() && server.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(server = %server.addr, "a call to this {} failed; calls go to the others", self.what);
        }
        answer
    }

    /// The servers to try after `first`: those up, then the rest.
    fn others(&self, first: usize) -> Vec<usize> {
        let n = self.servers.len();
        let rest = (1..n).map(|i| (first + i) % n);
        let (up, down): (Vec<usize>, Vec<usize>) =
            rest.partition(|&i| self.servers[i].up.load(Ordering::Relaxed));
        up.into_iter().chain(down).collect()
    }
}

impl Service<http::Request<Body>> for FailoverChannel {
    type Response = http::Response<Body>;
    type Error = tonic::codegen::StdError;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is each server channel's, awaited in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        let first = match request.headers().get(AFFINITY) {
            Some(key) => self.pick_for(key.as_bytes()),
            None => self.pick(),
        };
        Box::pin(async move {
            let streaming = shared.streaming.contains(&request.uri().path());
            if streaming || shared.servers.len() == 1 {
                return Ok(shared.send(first, request).await?);
            }
            // A unary call: its one message is kept, so that a server found
            // dead before it was sent can be skipped for the next.
            let (parts, body) = request.into_parts();
            let message = http_body_util::BodyExt::collect(body).await?.to_bytes();
            let rebuild = || {
                let mut request =
                    http::Request::new(Body::new(http_body_util::Full::new(message.clone())));
                *request.method_mut() = parts.method.clone();
                *request.uri_mut() = parts.uri.clone();
                *request.version_mut() = parts.version;
                *request.headers_mut() = parts.headers.clone();
                request
            };
            let mut last = match shared.send(first, rebuild()).await {
                Ok(answer) => return Ok(answer),
                Err(e) if never_sent(&e) => e,
                Err(e) => return Err(e.into()),
            };
            for index in shared.others(first) {
                last = match shared.send(index, rebuild()).await {
                    Ok(answer) => return Ok(answer),
                    Err(e) if never_sent(&e) => e,
                    Err(e) => return Err(e.into()),
                };
            }
            Err(last.into())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn lazy(port: u16) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy()
    }

    // A current-thread runtime: the prober spawned here never runs, since
    // the test never yields.
    #[tokio::test]
    async fn calls_take_turns_and_pass_over_a_server_that_is_down() {
        let channel = AuthChannel::new(vec![
            ("a".into(), lazy(1)),
            ("b".into(), lazy(2)),
            ("c".into(), lazy(3)),
        ]);
        let names = |n: usize| -> Vec<String> {
            (0..n)
                .map(|_| channel.shared.servers[channel.pick()].addr.clone())
                .collect()
        };
        assert_eq!(names(4), ["a", "b", "c", "a"]);
        channel.shared.servers[1].up.store(false, Ordering::Relaxed);
        assert_eq!(names(3), ["a", "c", "a"]);
        for s in &channel.shared.servers {
            s.up.store(false, Ordering::Relaxed);
        }
        assert_eq!(names(3), ["b", "c", "a"], "with none up, all in turn");
    }

    #[tokio::test]
    async fn calls_with_one_affinity_go_to_one_server_and_move_only_when_it_is_down() {
        let channel = AuthChannel::new(vec![
            ("a".into(), lazy(1)),
            ("b".into(), lazy(2)),
            ("c".into(), lazy(3)),
        ]);
        let keys: Vec<String> = (0..300).map(|i| format!("user{i}")).collect();
        let placed: Vec<usize> = keys
            .iter()
            .map(|k| channel.pick_for(k.as_bytes()))
            .collect();
        for (k, at) in keys.iter().zip(&placed) {
            assert_eq!(channel.pick_for(k.as_bytes()), *at, "stable for {k}");
        }
        for server in 0..3 {
            let share = placed.iter().filter(|&&p| p == server).count();
            assert!(share > 60, "server {server} takes {share} of 300 keys");
        }
        channel.shared.servers[1].up.store(false, Ordering::Relaxed);
        for (k, at) in keys.iter().zip(&placed) {
            let now = channel.pick_for(k.as_bytes());
            if *at == 1 {
                assert_ne!(now, 1, "{k} left the server that is down");
            } else {
                assert_eq!(now, *at, "{k} stayed where it was");
            }
        }
    }

    #[tokio::test]
    async fn the_prober_marks_a_silent_server_down() {
        // Nothing listens on these ports: pings fail at once.
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = a.local_addr().unwrap().port();
        drop(a);
        let channel = AuthChannel::new(vec![
            ("dead".into(), lazy(dead)),
            ("dead2".into(), lazy(dead)),
        ]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while channel.servers().iter().any(|(_, up)| *up) {
            assert!(std::time::Instant::now() < deadline, "never marked down");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
