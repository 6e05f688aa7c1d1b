//! The distributed backend: etcd's v3 API, shared by every auth server of a
//! cluster.
//!
//! Every key lives under the configured prefix. A revision is etcd's
//! `mod_revision`: it rises on every write across the store and is never
//! reused, so compare-and-swap is an etcd transaction comparing it. Expiry is
//! stored in the value and filtered on the injected clock, as in the other
//! backends (so the conformance suite can move a manual clock); etcd leases
//! only collect the garbage some time after an item has expired. Each value is
//! one version byte, the expiry in milliseconds since the epoch (zero for
//! none), then the caller's bytes.
//!
//! Requests go to every peer in turn (tonic balances over them) and give up
//! after [`EtcdSettings::request_timeout`] with a `Storage` error naming the
//! peers, so an unreachable etcd fails a call instead of hanging it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::Mutex;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use turnstile_api::auth_channel::{FailoverChannel, Probe};
use turnstile_api::clock::{Clock, SystemClock};

use super::{Backend, BackendError, Change, Item, Result, Watch, is_live};

#[allow(clippy::all, missing_docs)]
mod proto {
    tonic::include_proto!("etcdserverpb");
}

use proto::auth_client::AuthClient;
use proto::kv_client::KvClient;
use proto::lease_client::LeaseClient;
use proto::watch_client::WatchClient;
use proto::{
    AuthenticateRequest, Compare, DeleteRangeRequest, KeyValue, LeaseGrantRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest, compare,
    range_request, request_op, response_op, watch_request,
};

/// The first byte of every value this backend writes.
const ENCODING_VERSION: u8 = 1;
/// Keys a range reads per request.
const RANGE_PAGE: i64 = 500;
/// Items expiring within one such window share one etcd lease.
const LEASE_BUCKET: Duration = Duration::from_secs(60);
/// How long after an item's expiry etcd may delete it.
const LEASE_SLACK: Duration = Duration::from_secs(60);
/// Each key's last revision seen here and that revision's expiry.
type Known = std::collections::HashMap<String, (u64, Option<SystemTime>)>;

/// Keys whose last revision's expiry is remembered, at most.
const KNOWN_AT_MOST: usize = 16_384;
/// The largest response accepted from etcd (its own request limit is 1.5 MiB).
const MAX_RESPONSE: usize = 64 << 20;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// Client URLs, `http://host:port` or `https://host:port`.
    pub peers: Vec<String>,
    /// Every key of this cluster lives under it; several clusters can share
    /// one etcd under different prefixes.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// etcd's own authentication, when it is enabled.
    pub credentials: Option<EtcdCredentials>,
    /// A call that has no answer in this long fails.
    pub request_timeout: Duration,
}

/// TLS to etcd: the CA that signed etcd's certificates (PEM), and a client
/// certificate and key when etcd asks for one.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

#[derive(Clone)]
pub struct EtcdCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct EtcdBackend {
    /// One channel per peer: calls go to the peers that answer, in turn.
    channel: FailoverChannel,
    /// The configured prefix with one trailing `/`.
    prefix: String,
    peers: String,
    credentials: Option<EtcdCredentials>,
    token: Arc<Mutex<Option<String>>>,
    /// Lease ids by the end of their bucket, in milliseconds.
    leases: Arc<Mutex<BTreeMap<u64, i64>>>,
    /// The expiry of the revision of each key last read or written here. A
    /// revision's value never changes, so a compare-and-swap on a revision
    /// known here needs no read first to see whether it expired.
    known: Arc<std::sync::Mutex<Known>>,
    clock: Arc<dyn Clock>,
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn encode(value: &[u8], expires: Option<SystemTime>) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + value.len());
    out.push(ENCODING_VERSION);
    out.extend_from_slice(&expires.map_or(0, |e| to_ms(e).max(1)).to_be_bytes());
    out.extend_from_slice(value);
    out
}

fn decode(key: &str, raw: &[u8]) -> Result<(Vec<u8>, Option<SystemTime>)> {
    match raw {
        [ENCODING_VERSION, rest @ ..] if rest.len() >= 8 => {
            let (ms, value) = rest.split_at(8);
            let ms = u64::from_be_bytes(ms.try_into().unwrap_or([0; 8]));
            let expires = (ms != 0).then(|| UNIX_EPOCH + Duration::from_millis(ms));
            Ok((value.to_vec(), expires))
        }
        _ => Err(BackendError::Storage(format!(
            "the value at {key:?} in etcd was not written by Turnstile \
             (is another program using the same prefix?)"
        ))),
    }
}

/// etcd's calls whose request is a stream (never buffered or resent).
const WATCH_STREAMS: &[&str] = &["/etcdserverpb.Watch/Watch"];

/// Is a peer up? One read of a key nobody writes; an answer, even "no
/// permission" without a token, says it is.
fn range_probe() -> Probe {
    Arc::new(|channel| {
        Box::pin(async move {
            KvClient::new(channel)
                .range(RangeRequest {
                    key: b"\0turnstile-probe".to_vec(),
                    count_only: true,
                    ..Default::default()
                })
                .await
                .map(drop)
        })
    })
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn is_auth_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unauthenticated || status.message().contains("invalid auth token")
}

impl EtcdBackend {
    /// A backend on etcd at `settings.peers`. Connects lazily: the first call
    /// reports an unreachable etcd; [`EtcdBackend::check`] makes one.
    pub fn connect(settings: &EtcdSettings) -> Result<Self> {
        Self::connect_with_clock(settings, Arc::new(SystemClock))
    }

    pub fn connect_with_clock(settings: &EtcdSettings, clock: Arc<dyn Clock>) -> Result<Self> {
        if settings.peers.is_empty() {
            return Err(BackendError::Storage(
                "no etcd peers are configured (turnstile.storage.peers)".into(),
            ));
        }
        let mut endpoints = Vec::new();
        for peer in &settings.peers {
            let mut endpoint = Endpoint::from_shared(peer.clone())
                .map_err(|e| BackendError::Storage(format!("etcd peer {peer:?}: {e}")))?
                .connect_timeout(settings.request_timeout)
                .timeout(settings.request_timeout)
                // A watch stream to a peer that vanished without a word
                // (a partition) ends within this, and is opened elsewhere.
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(settings.request_timeout)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true);
            if let Some(tls) = &settings.tls {
                let mut config =
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
                if let Some((cert, key)) = &tls.client {
                    config = config.identity(Identity::from_pem(cert, key));
                }
                endpoint = endpoint
                    .tls_config(config)
                    .map_err(|e| BackendError::Storage(format!("etcd peer {peer:?}: TLS: {e}")))?;
            } else if peer.starts_with("https://") {
                return Err(BackendError::Storage(format!(
                    "etcd peer {peer:?} is https, but no CA is configured to check it \
                     (turnstile.storage.tls_ca_file)"
                )));
            }
            endpoints.push((peer.clone(), endpoint.connect_lazy()));
        }
        let mut prefix = settings.prefix.trim_end_matches('/').to_string();
        prefix.push('/');
        Ok(Self {
            channel: FailoverChannel::with_probe(
                endpoints,
                "etcd peer",
                WATCH_STREAMS,
                range_probe(),
            ),
            prefix,
            peers: settings.peers.join(", "),
            credentials: settings.credentials.clone(),
            token: Arc::new(Mutex::new(None)),
            leases: Arc::new(Mutex::new(BTreeMap::new())),
            known: Arc::default(),
            clock,
        })
    }

    /// One read, to learn at start whether etcd answers.
    pub async fn check(&self) -> Result<()> {
        match self.get("\u{0}probe").await {
            Ok(_) | Err(BackendError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn kv(&self) -> KvClient<FailoverChannel> {
        KvClient::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE)
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.prefix).into_bytes()
    }

    fn failed(&self, status: &tonic::Status) -> BackendError {
        BackendError::Storage(format!(
            "etcd ({}) did not answer: {}",
            self.peers,
            match status.message() {
                "" => status.code().description(),
                m => m,
            }
        ))
    }

    /// The token etcd's authentication gave, fetched when first needed.
    async fn token(&self) -> Result<Option<String>> {
        let Some(credentials) = &self.credentials else {
            return Ok(None);
        };
        let mut token = self.token.lock().await;
        if token.is_none() {
            let answer = AuthClient::new(self.channel.clone())
                .authenticate(AuthenticateRequest {
                    name: credentials.username.clone(),
                    password: credentials.password.clone(),
                })
                .await
                .map_err(|status| {
                    BackendError::Storage(format!(
                        "etcd ({}) refused the user {:?}: {}",
                        self.peers,
                        credentials.username,
                        status.message()
                    ))
                })?;
            *token = Some(answer.into_inner().token);
        }
        Ok(token.clone())
    }

    fn request<M>(&self, message: M, token: Option<&str>) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = token.and_then(|t| t.parse().ok()) {
            request.metadata_mut().insert("token", value);
        }
        request
    }

    /// Runs `call` with the current token; once more with a fresh one if
    /// etcd says the token expired.
    async fn call<M: Clone, T, Fut>(
        &self,
        message: M,
        call: impl Fn(tonic::Request<M>) -> Fut,
    ) -> Result<T>
    where
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let token = self.token().await?;
        match call(self.request(message.clone(), token.as_deref())).await {
            Ok(answer) => Ok(answer.into_inner()),
            Err(status) if self.credentials.is_some() && is_auth_failure(&status) => {
                *self.token.lock().await = None;
                let token = self.token().await?;
                call(self.request(message, token.as_deref()))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| self.failed(&status))
            }
            Err(status) => Err(self.failed(&status)),
        }
    }

    async fn range_raw(&self, request: RangeRequest) -> Result<proto::RangeResponse> {
        self.call(request, |r| {
            let mut kv = self.kv();
            async move { kv.range(r).await }
        })
        .await
    }

    async fn txn(&self, request: TxnRequest) -> Result<TxnResponse> {
        self.call(request, |r| {
            let mut kv = self.kv();
            async move { kv.txn(r).await }
        })
        .await
    }

    /// The raw key-value at `key`, expired or not.
    async fn read(&self, key: &str) -> Result<Option<KeyValue>> {
        let answer = self
            .range_raw(RangeRequest {
                key: self.full_key(key),
                ..Default::default()
            })
            .await?;
        Ok(answer.kvs.into_iter().next())
    }

    /// The live item at `key`, with its raw revision.
    async fn live(&self, key: &str) -> Result<Option<Item>> {
        match self.read(key).await? {
            None => Ok(None),
            Some(kv) => {
                let item = self.item(key.to_string(), &kv)?;
                Ok(is_live(item.expires, self.clock.now()).then_some(item))
            }
        }
    }

    /// Notes the expiry of `key` at `revision` (see `known`).
    fn note(&self, key: &str, revision: u64, expires: Option<SystemTime>) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= KNOWN_AT_MOST {
            known.clear();
        }
        known.insert(key.to_string(), (revision, expires));
    }

    /// The expiry of `key` at `revision`, if known here.
    fn known_expiry(&self, key: &str, revision: u64) -> Option<Option<SystemTime>> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known
            .get(key)
            .filter(|(r, _)| *r == revision)
            .map(|(_, e)| *e)
    }

    fn item(&self, key: String, kv: &KeyValue) -> Result<Item> {
        let (value, expires) = decode(&key, &kv.value)?;
        self.note(&key, revision(kv.mod_revision), expires);
        Ok(Item {
            key,
            value,
            revision: revision(kv.mod_revision),
            expires,
        })
    }

    /// A lease that outlives `expires` by at least [`LEASE_SLACK`], shared
    /// by every item expiring in the same minute.
    async fn lease_for(&self, expires: Option<SystemTime>) -> Result<i64> {
        let Some(expires) = expires else {
            return Ok(0);
        };
        let bucket_ms = u64::try_from(LEASE_BUCKET.as_millis()).unwrap_or(60_000);
        let bucket_end = to_ms(expires).div_ceil(bucket_ms) * bucket_ms;
        let now = to_ms(self.clock.now());
        let mut leases = self.leases.lock().await;
        // Leases whose bucket has passed are of no more use to new items.
        *leases = leases.split_off(&now);
        if let Some(id) = leases.get(&bucket_end) {
            return Ok(*id);
        }
        let ttl = Duration::from_millis(bucket_end.saturating_sub(now)) + LEASE_SLACK;
        let request = LeaseGrantRequest {
            ttl: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            id: 0,
        };
        let answer = self
            .call(request, |r| {
                let mut lease = LeaseClient::new(self.channel.clone());
                async move { lease.lease_grant(r).await }
            })
            .await?;
        if !answer.error.is_empty() {
            return Err(BackendError::Storage(format!(
                "etcd ({}) granted no lease: {}",
                self.peers, answer.error
            )));
        }
        leases.insert(bucket_end, answer.id);
        Ok(answer.id)
    }

    /// Forgets cached leases (etcd said one is gone, say after a restore).
    async fn forget_leases(&self) {
        self.leases.lock().await.clear();
    }

    fn put_op(
        &self,
        key: &str,
        value: &[u8],
        expires: Option<SystemTime>,
        lease: i64,
    ) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: self.full_key(key),
                value: encode(value, expires),
                lease,
                prev_kv: false,
            })),
        }
    }

    fn range_op(&self, key: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: self.full_key(key),
                ..Default::default()
            })),
        }
    }

    /// The key is at `revision` (or absent, for `None`).
    fn unchanged(&self, key: &str, revision: Option<u64>) -> Compare {
        match revision {
            None => Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Version as i32,
                key: self.full_key(key),
                target_union: Some(compare::TargetUnion::Version(0)),
                range_end: Vec::new(),
            },
            Some(rev) => Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: self.full_key(key),
                target_union: Some(compare::TargetUnion::ModRevision(
                    i64::try_from(rev).unwrap_or(i64::MAX),
                )),
                range_end: Vec::new(),
            },
        }
    }

    /// Writes `value` if `key` is still at `revision` (absent for `None`).
    /// `Ok(None)` when it was not; a write with a lease etcd no longer has is
    /// retried once with a new lease.
    async fn put_if(
        &self,
        key: &str,
        revision: Option<u64>,
        value: &[u8],
        expires: Option<SystemTime>,
    ) -> Result<Option<u64>> {
        let mut retried = false;
        loop {
            let lease = self.lease_for(expires).await?;
            let request = TxnRequest {
                compare: vec![self.unchanged(key, revision)],
                success: vec![self.put_op(key, value, expires, lease)],
                failure: Vec::new(),
            };
            match self.txn(request).await {
                Ok(answer) if answer.succeeded => {
                    let rev = revision_of(&answer);
                    self.note(key, rev, expires);
                    return Ok(Some(rev));
                }
                Ok(_) => return Ok(None),
                Err(BackendError::Storage(m)) if !retried && m.contains("lease not found") => {
                    retried = true;
                    self.forget_leases().await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// What a failed conditional write at `key` should report: `NotFound`
    /// when no live item is there now, `CompareFailed` when another is.
    async fn why_not(&self, key: &str) -> BackendError {
        match self.live(key).await {
            Ok(None) => BackendError::NotFound(key.into()),
            Ok(Some(_)) => BackendError::CompareFailed(key.into()),
            Err(e) => e,
        }
    }
}

fn revision_of(answer: &TxnResponse) -> u64 {
    revision(answer.header.as_ref().map_or(0, |h| h.revision))
}

#[async_trait]
impl Backend for EtcdBackend {
    async fn get(&self, key: &str) -> Result<Item> {
        self.live(key)
            .await?
            .ok_or_else(|| BackendError::NotFound(key.into()))
    }

    async fn put(&self, key: &str, value: Vec<u8>, expires: Option<SystemTime>) -> Result<u64> {
        let mut retried = false;
        loop {
            let lease = self.lease_for(expires).await?;
            let request = PutRequest {
                key: self.full_key(key),
                value: encode(&value, expires),
                lease,
                prev_kv: false,
            };
            match self
                .call(request, |r| {
                    let mut kv = self.kv();
                    async move { kv.put(r).await }
                })
                .await
            {
                Ok(answer) => {
                    let rev = revision(answer.header.map_or(0, |h| h.revision));
                    self.note(key, rev, expires);
                    return Ok(rev);
                }
                Err(BackendError::Storage(m)) if !retried && m.contains("lease not found") => {
                    retried = true;
                    self.forget_leases().await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn create(&self, key: &str, value: Vec<u8>, expires: Option<SystemTime>) -> Result<u64> {
        loop {
            // An expired item still in etcd is replaced, exactly as if absent.
            let current = match self.read(key).await? {
                None => None,
                Some(kv) => {
                    let item = self.item(key.to_string(), &kv)?;
                    if is_live(item.expires, self.clock.now()) {
                        return Err(BackendError::AlreadyExists(key.into()));
                    }
                    Some(item.revision)
                }
            };
            if let Some(rev) = self.put_if(key, current, &value, expires).await? {
                return Ok(rev);
            }
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        expires: Option<SystemTime>,
    ) -> Result<u64> {
        match self.known_expiry(key, expected) {
            // The revision's expiry is known: decided without a read.
            Some(was) if !is_live(was, self.clock.now()) => {
                return Err(BackendError::NotFound(key.into()));
            }
            Some(_) => {}
            None => match self.live(key).await? {
                None => return Err(BackendError::NotFound(key.into())),
                Some(item) if item.revision != expected => {
                    return Err(BackendError::CompareFailed(key.into()));
                }
                Some(_) => {}
            },
        }
        match self.put_if(key, Some(expected), &value, expires).await? {
            Some(rev) => Ok(rev),
            None => Err(self.why_not(key).await),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        loop {
            let item = self.get(key).await?;
            match self.compare_and_delete(key, item.revision).await {
                Err(BackendError::CompareFailed(_)) => continue,
                other => return other,
            }
        }
    }

    async fn compare_and_delete(&self, key: &str, expected: u64) -> Result<()> {
        match self.live(key).await? {
            None => return Err(BackendError::NotFound(key.into())),
            Some(item) if item.revision != expected => {
                return Err(BackendError::CompareFailed(key.into()));
            }
            Some(_) => {}
        }
        let request = TxnRequest {
            compare: vec![self.unchanged(key, Some(expected))],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: self.full_key(key),
                        ..Default::default()
                    },
                )),
            }],
            failure: vec![self.range_op(key)],
        };
        let answer = self.txn(request).await?;
        if answer.succeeded {
            return Ok(());
        }
        let now = self.clock.now();
        let current = answer.responses.into_iter().find_map(|r| match r.response {
            Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
            _ => None,
        });
        match current {
            Some(kv) if is_live(self.item(key.to_string(), &kv)?.expires, now) => {
                Err(BackendError::CompareFailed(key.into()))
            }
            _ => Err(BackendError::NotFound(key.into())),
        }
    }

    async fn range(&self, prefix: &str) -> Result<Vec<Item>> {
        let start = self.full_key(prefix);
        let end = prefix_end(&start);
        let now = self.clock.now();
        let mut items = Vec::new();
        let mut from = start;
        // Every page reads the store as the first one did.
        let mut at_revision = 0;
        loop {
            let answer = self
                .range_raw(RangeRequest {
                    key: from,
                    range_end: end.clone(),
                    limit: RANGE_PAGE,
                    revision: at_revision,
                    sort_order: range_request::SortOrder::Ascend as i32,
                    sort_target: range_request::SortTarget::Key as i32,
                    ..Default::default()
                })
                .await?;
            if at_revision == 0 {
                at_revision = answer.header.as_ref().map_or(0, |h| h.revision);
            }
            let Some(last) = answer.kvs.last().map(|kv| kv.key.clone()) else {
                break;
            };
            for kv in &answer.kvs {
                let full = String::from_utf8_lossy(&kv.key);
                let key = full.strip_prefix(&self.prefix).unwrap_or(&full).to_string();
                let item = self.item(key, kv)?;
                if is_live(item.expires, now) {
                    items.push(item);
                }
            }
            if !answer.more {
                break;
            }
            from = last;
            from.push(0);
        }
        Ok(items)
    }

    async fn watch(&self, prefix: &str) -> Result<Watch> {
        self.open_watch(prefix).await
    }
}

/// How many changes an etcd watch holds for its reader.
const WATCH_BACKLOG: usize = 1024;

impl EtcdBackend {
    /// etcd's watch of every key under `prefix`, confirmed by etcd before
    /// it returns, so no change made after it returns is missed.
    async fn open_watch(&self, prefix: &str) -> Result<Watch> {
        let start = self.full_key(prefix);
        let range_end = prefix_end(&start);
        // The watch lives while its request side is open: the task keeps it.
        let (requests, request_rx) = tokio::sync::mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: start,
                    range_end,
                    ..Default::default()
                },
            )),
        };
        let _ = requests.send(create).await;
        let token = self.token().await?;
        let request = self.request(
            tokio_stream::wrappers::ReceiverStream::new(request_rx),
            token.as_deref(),
        );
        let mut stream = WatchClient::new(self.channel.clone())
            .watch(request)
            .await
            .map_err(|status| self.failed(&status))?
            .into_inner();
        match stream.message().await {
            Ok(Some(answer)) if answer.created && !answer.canceled => {}
            Ok(answer) => {
                return Err(BackendError::Storage(format!(
                    "etcd ({}) did not start the watch: {}",
                    self.peers,
                    answer.map_or_else(|| "the stream ended".into(), |a| a.cancel_reason)
                )));
            }
            Err(status) => return Err(self.failed(&status)),
        }
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BACKLOG);
        let strip = self.prefix.clone();
        tokio::spawn(async move {
            let _requests = requests;
            // A broken stream or a cancelled watch (say, compaction) ends the
            // Watch: its reader reads again and watches anew.
            while let Ok(Some(answer)) = stream.message().await {
                if answer.canceled {
                    break;
                }
                for event in answer.events {
                    let Some(kv) = event.kv else { continue };
                    let full = String::from_utf8_lossy(&kv.key);
                    let change = Change {
                        key: full.strip_prefix(&strip).unwrap_or(&full).to_string(),
                        deleted: event.r#type == proto::event::EventType::Delete as i32,
                    };
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Watch::remote(rx))
    }
}

/// A private etcd for tests, on free loopback ports, in a temporary
/// directory; stopped on drop.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use super::{EtcdBackend, EtcdSettings, EtcdTls};

    #[derive(Debug)]
    pub struct EtcdServer {
        child: Option<tokio::process::Child>,
        dir: tempfile::TempDir,
        client_port: u16,
        peer_port: u16,
        /// With TLS: what a client needs (the CA, a client certificate).
        tls: Option<EtcdTls>,
    }

    /// A CA of the test's own, etcd's certificate for 127.0.0.1 and a
    /// client certificate, written to `dir`; returns what a client needs.
    fn write_certificates(dir: &std::path::Path) -> EtcdTls {
        use crate::ca::TlsCa;
        use turnstile_api::identity::SystemRole;
        let now = std::time::SystemTime::now();
        let day = Duration::from_secs(86400);
        let ca = TlsCa::generate("etcd-test", now).unwrap();
        // The auth role's certificate names localhost and 127.0.0.1.
        let server = ca
            .issue("etcd-test", SystemRole::Auth, "etcd", None, now, day)
            .unwrap();
        let client = ca
            .issue("etcd-test", SystemRole::Auth, "turnstile", None, now, day)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("server-key.pem"), &server.key_pem).unwrap();
        EtcdTls {
            ca_pem: ca.cert_pem.into_bytes(),
            client: Some((client.cert_pem.into_bytes(), client.key_pem.into_bytes())),
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn etcd_binary() -> PathBuf {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
            .expect("etcd is missing: run scripts/test.sh, which installs etcd-server")
    }

    impl EtcdServer {
        /// Starts etcd and waits until it answers. Ports are picked free and
        /// picked again if another process took one meanwhile.
        pub async fn start() -> Self {
            Self::start_with(false).await
        }

        /// Starts etcd serving clients over TLS only, and only those with a
        /// client certificate from its CA (`--client-cert-auth`).
        pub async fn start_tls() -> Self {
            Self::start_with(true).await
        }

        async fn start_with(tls: bool) -> Self {
            for _ in 0..5 {
                let dir = tempfile::tempdir().unwrap();
                let tls = tls.then(|| write_certificates(dir.path()));
                let mut server = Self {
                    child: None,
                    dir,
                    client_port: free_port(),
                    peer_port: free_port(),
                    tls,
                };
                if server.launch().await {
                    return server;
                }
            }
            panic!("etcd did not start on free ports five times");
        }

        /// Starts the stopped server again, on the same ports and data.
        pub async fn restart(&mut self) {
            assert!(self.launch().await, "etcd did not start again");
        }

        /// Kills the server (as a crash would); its data stays.
        pub async fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill().await;
            }
        }

        async fn launch(&mut self) -> bool {
            let client = self.url();
            let peer = format!("http://127.0.0.1:{}", self.peer_port);
            let mut command = tokio::process::Command::new(etcd_binary());
            if self.tls.is_some() {
                let file = |name: &str| self.dir.path().join(name);
                command
                    .arg("--cert-file")
                    .arg(file("server.pem"))
                    .arg("--key-file")
                    .arg(file("server-key.pem"))
                    .arg("--trusted-ca-file")
                    .arg(file("ca.pem"))
                    .arg("--client-cert-auth");
            }
            let mut child = command
                .arg("--data-dir")
                .arg(self.dir.path().join("data"))
                .args(["--name", "default"])
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("default={peer}")])
                .args(["--logger=zap", "--log-level=error"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("etcd starts");
            let backend = EtcdBackend::connect(&self.settings("/probe")).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    // A port clash: etcd exits at once.
                    return false;
                }
                if backend.check().await.is_ok() {
                    self.child = Some(child);
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill().await;
            false
        }

        pub fn url(&self) -> String {
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://127.0.0.1:{}", self.client_port)
        }

        /// Settings for a backend on this server under `prefix` (with TLS
        /// and a client certificate, for a TLS server).
        pub fn settings(&self, prefix: &str) -> EtcdSettings {
            EtcdSettings {
                peers: vec![self.url()],
                prefix: prefix.into(),
                tls: self.tls.clone(),
                credentials: None,
                request_timeout: Duration::from_secs(2),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::EtcdServer;
    use super::*;
    use turnstile_api::clock::ManualClock;

    #[test]
    fn values_round_trip_and_foreign_values_are_named() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(
            decode("k", &encode(b"v", Some(at))).unwrap(),
            (b"v".to_vec(), Some(at))
        );
        assert_eq!(decode("k", &encode(b"", None)).unwrap(), (Vec::new(), None));
        let e = decode("users/a", b"{\"json\":1}").unwrap_err().to_string();
        assert!(
            e.contains("\"users/a\"") && e.contains("not written by Turnstile"),
            "{e}"
        );
        assert_eq!(prefix_end(b"/t/"), b"/t0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        let server = EtcdServer::start().await;
        let settings = server.settings("/conformance");
        let runs = std::sync::atomic::AtomicU32::new(0);
        super::super::conformance::run(|clock: Arc<ManualClock>| {
            // Each run gets a fresh, empty prefix.
            let n = runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut settings = settings.clone();
            settings.prefix = format!("/conformance/{n}");
            async move {
                Arc::new(EtcdBackend::connect_with_clock(&settings, clock).unwrap())
                    as Arc<dyn Backend>
            }
        })
        .await;
    }

    /// One etcd member of the list is not there: every call still goes
    /// through the one that is.
    #[tokio::test]
    async fn a_dead_peer_is_passed_over() {
        let server = EtcdServer::start().await;
        let mut settings = server.settings("/dead-peer");
        let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        settings.peers.insert(0, format!("http://{nowhere}"));
        let backend = EtcdBackend::connect(&settings).unwrap();
        for i in 0..20 {
            backend
                .put(&format!("k{i}"), b"v".to_vec(), None)
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
        }
        assert_eq!(backend.range("k").await.unwrap().len(), 20);
    }

    #[tokio::test]
    async fn tls_with_a_client_certificate_and_nothing_less() {
        let server = EtcdServer::start_tls().await;
        let settings = server.settings("/tls");
        assert!(settings.peers[0].starts_with("https://"));
        let backend = EtcdBackend::connect(&settings).unwrap();
        backend.put("k", b"v".to_vec(), None).await.unwrap();
        assert_eq!(backend.get("k").await.unwrap().value, b"v");
        // Without a client certificate etcd refuses the connection.
        let mut no_client = settings.clone();
        no_client.tls.as_mut().unwrap().client = None;
        let e = EtcdBackend::connect(&no_client)
            .unwrap()
            .get("k")
            .await
            .unwrap_err();
        assert!(matches!(e, BackendError::Storage(_)), "{e}");
        // A CA that did not sign etcd's certificate: refused as well.
        let mut wrong_ca = settings.clone();
        wrong_ca.tls.as_mut().unwrap().ca_pem =
            crate::ca::TlsCa::generate("other", SystemTime::now())
                .unwrap()
                .cert_pem
                .into_bytes();
        let e = EtcdBackend::connect(&wrong_ca)
            .unwrap()
            .get("k")
            .await
            .unwrap_err();
        assert!(matches!(e, BackendError::Storage(_)), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_etcd_fails_a_call_in_time_and_names_the_peers() {
        let mut server = EtcdServer::start().await;
        let backend = EtcdBackend::connect(&server.settings("/outage")).unwrap();
        backend.put("k", b"v".to_vec(), None).await.unwrap();
        server.stop().await;
        let started = std::time::Instant::now();
        let e = backend.get("k").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(&e, BackendError::Storage(m) if m.contains(&server.url())),
            "{e}"
        );
        server.restart().await;
        // Back without a new backend: the channel reconnects.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match backend.get("k").await {
                Ok(item) => {
                    assert_eq!(item.value, b"v");
                    break;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("etcd is back but the backend is not: {e}"),
            }
        }
    }
}
