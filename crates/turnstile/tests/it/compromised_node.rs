//! What a node's own identity cannot do, tried with a real node's
//! credentials against a running auth server: every attempt is refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use turnstile_api::auth_channel::AuthChannel;
use turnstile_api::identity::SystemRole;
use turnstile_api::rpc::{AuthClient, proto};
use turnstile_auth::semaphores::LeaseRequest;

use crate::support::TestCluster;

/// An auth client speaking as the cluster's node.
pub(crate) fn as_node(c: &TestCluster) -> AuthClient<AuthChannel> {
    let data = c.data_dir();
    let tls = turnstile_ssh::identity::TlsIdentity::load(&data, SystemRole::Node)
        .unwrap()
        .expect("the node's TLS identity");
    let auth_addr = std::fs::read_to_string(data.join("auth.addr")).unwrap();
    turnstile_ssh::cluster_view::auth_client(auth_addr.trim(), &tls).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_renew_or_release_another_hosts_lease_nor_hold_one_for_ever() {
    let c = TestCluster::start().await;
    let mut node = as_node(&c);
    // A slot another node holds for alice.
    let theirs = c
        .authority()
        .semaphores()
        .acquire(&LeaseRequest {
            kind: "connection".into(),
            name: "alice".into(),
            max: 5,
            ttl: Duration::from_secs(60),
            holder: "another-node".into(),
            holder_name: "web2".into(),
            login: "root".into(),
            remote_addr: "127.0.0.1:1".into(),
        })
        .await
        .unwrap();
    let e = node
        .keep_alive_semaphore(proto::KeepAliveSemaphoreRequest {
            kind: "connection".into(),
            name: "alice".into(),
            lease_id: theirs.lease_id.clone(),
            ttl_ms: 60_000,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("held by another host"), "{e:?}");
    let e = node
        .cancel_semaphore(proto::CancelSemaphoreRequest {
            kind: "connection".into(),
            name: "alice".into(),
            lease_id: theirs.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let held = c.authority().semaphores().list("connection").await.unwrap();
    assert_eq!(held.len(), 1, "the other node's slot is still held");

    // A lease asked for with the longest lifetime lives at most an hour.
    let mine = node
        .acquire_semaphore(proto::AcquireSemaphoreRequest {
            kind: "connection".into(),
            name: "alice".into(),
            max: 5,
            ttl_ms: u64::MAX,
            login: "root".into(),
            remote_addr: "127.0.0.1:2".into(),
            holder_name: "web1".into(),
        })
        .await
        .expect("no overflow")
        .into_inner();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let left = mine.expires_unix_ms - now_ms;
    assert!(
        (3_500_000..=3_600_000).contains(&left),
        "expires in {left} ms"
    );
    node.cancel_semaphore(proto::CancelSemaphoreRequest {
        kind: "connection".into(),
        name: "alice".into(),
        lease_id: mine.lease_id,
    })
    .await
    .expect("a node releases its own lease");
}

/// Sends `header` and an SSH version to the node; true if the node answers
/// with its own version (it took the header), false if it hangs up.
pub(crate) async fn node_takes(node_addr: &str, header: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(node_addr).await.unwrap();
    stream.write_all(header).await.unwrap();
    stream.write_all(b"SSH-2.0-test\r\n").await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the node neither answered nor hung up");
        match read {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if seen.starts_with(b"SSH-2.0-") {
            return true;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_opens_one_connection_to_the_node_it_names_and_no_other() {
    let c = TestCluster::start().await;
    let data = c.data_dir();
    // The proxy's real host key and certificate (this one process is auth,
    // proxy and node; its node's host id is the process's).
    let proxy =
        turnstile_ssh::identity::HostKeys::load_or_create(&data, SystemRole::Proxy).unwrap();
    let cert = proxy.certificate.expect("the proxy's host certificate");
    let node_id = turnstile_ssh::identity::load_or_create_host_id(&data).unwrap();
    let client: std::net::SocketAddr = "203.0.113.9:4000".parse().unwrap();
    let node_addr: std::net::SocketAddr = c.node_addr.parse().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |target: &str| {
        turnstile_ssh::proxy_header::encode(client, node_addr, target, &proxy.key, &cert, now)
            .unwrap()
    };
    let header = sign(&node_id);
    assert!(
        node_takes(&c.node_addr, &header).await,
        "the header as sent"
    );
    assert!(
        !node_takes(&c.node_addr, &header).await,
        "the same header again is a replay"
    );
    assert!(
        !node_takes(&c.node_addr, &sign("another-node")).await,
        "a header signed for another node"
    );
    assert!(
        node_takes(&c.node_addr, &sign(&node_id)).await,
        "a fresh one"
    );
}
