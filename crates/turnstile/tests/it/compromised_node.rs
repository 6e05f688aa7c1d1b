//! What a node's own identity cannot do, tried with a real node's
//! credentials against a running auth server: every attempt is refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use turnstile_api::auth_channel::AuthChannel;
use turnstile_api::identity::SystemRole;
use turnstile_api::rpc::{AuthClient, proto};
use turnstile_auth::semaphores::LeaseRequest;

use crate::support::TestCluster;

/// An auth client speaking as the cluster's node.
fn as_node(c: &TestCluster) -> AuthClient<AuthChannel> {
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
