//! Everything the access plane must refuse, each with the message the user
//! reads: foreign and expired certificates, empty principals, logins and nodes
//! the roles do not allow, unknown nodes, tunnels to anything but a node.

use std::time::{Duration, SystemTime};

use russh::keys::PrivateKey;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use turnstile_api::identity::{Permits, UserIdentity};

use crate::support::{TestCluster, openssh, run, text};

fn assert_refused(out: &std::process::Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
    assert!(out.stdout.is_empty(), "nothing ran: {}", text(&out.stdout));
}

fn ssh_args<'a>(config: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["-F", config, "-o", "BatchMode=yes"];
    args.extend_from_slice(rest);
    args
}

/// Replaces the certificate of an identity with `cert`.
fn swap_cert(identity: &std::path::Path, cert: &russh::keys::Certificate) {
    std::fs::write(
        format!("{}-cert.pub", identity.display()),
        format!("{}\n", cert.to_openssh().unwrap()),
    )
    .unwrap();
}

fn identity_key(identity: &std::path::Path) -> PrivateKey {
    PrivateKey::from_openssh(std::fs::read_to_string(identity).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_cluster_is_refused_by_proxy_and_node() {
    let a = TestCluster::start().await;
    let b = TestCluster::start().await;
    a.add_user("alice", "access", "root").await;
    b.add_user("alice", "access", "root").await;
    let ours = a.sign("alice").await;
    let theirs = b.sign("alice").await;
    // Cluster A's identity files, carrying cluster B's key and certificate.
    std::fs::copy(&theirs, &ours).unwrap();
    std::fs::copy(
        format!("{}-cert.pub", theirs.display()),
        format!("{}-cert.pub", ours.display()),
    )
    .unwrap();

    let out = a.ssh(&ours, &["web1", "echo", "should-not-run"]).await;
    assert_refused(&out, "refused the certificate");

    let config = format!("{}.ssh_config", ours.display());
    let out = run(
        openssh(),
        &ssh_args(&config, &["web1", "echo should-not-run"]),
        None,
    )
    .await;
    assert_refused(&out, "Permission denied");
    let (host, port) = a.node_addr.rsplit_once(':').unwrap();
    let out = run(
        openssh(),
        &ssh_args(&config, &["-p", port, host, "echo should-not-run"]),
        None,
    )
    .await;
    assert_refused(&out, "Permission denied");
    // Each refusal is an audit event, at the proxy and at the node.
    let data = a.data_dir();
    let found = crate::support::poll_until(Duration::from_secs(10), || async {
        let refused = crate::support::audit_events(&data, Some("auth")).await;
        refused
            .iter()
            .filter(|e| {
                e["user"] == "alice"
                    && e["error"]
                        .as_str()
                        .unwrap_or("")
                        .contains("not signed by this cluster's user CA")
            })
            .count()
            >= 2
    })
    .await;
    assert!(
        found.is_ok(),
        "{:?}",
        crate::support::audit_events(&data, Some("auth")).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_refused() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let now = SystemTime::now();
    let identity = UserIdentity {
        user: "alice".into(),
        roles: vec!["access".into()],
        logins: vec!["root".into()],
    };
    let expired = c
        .authority()
        .user_ca()
        .sign_user(
            identity_key(&id).public_key(),
            &identity,
            Permits::default(),
            &["root".into()],
            now - Duration::from_secs(7200),
            now - Duration::from_secs(60),
        )
        .unwrap();
    swap_cert(&id, &expired);

    let out = c.ssh(&id, &["web1", "echo", "should-not-run"]).await;
    assert_refused(&out, "your certificate expired at");

    let config = format!("{}.ssh_config", id.display());
    let out = run(
        openssh(),
        &ssh_args(&config, &["web1", "echo should-not-run"]),
        None,
    )
    .await;
    assert_refused(&out, "Permission denied");
    let (host, port) = c.node_addr.rsplit_once(':').unwrap();
    let out = run(
        openssh(),
        &ssh_args(&config, &["-p", port, host, "echo should-not-run"]),
        None,
    )
    .await;
    assert_refused(&out, "Permission denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_without_principals_is_refused_even_when_signed_by_the_ca() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    // What a holder of the CA key could sign: a certificate valid for every login.
    let stored = c
        .authority()
        .backend()
        .get("authorities/user")
        .await
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&stored.value).unwrap();
    let ca = PrivateKey::from_openssh(stored["private_key"].as_str().unwrap()).unwrap();
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = identity_key(&id);
    let mut b = Builder::new(
        vec![1; 16],
        key.public_key().key_data().clone(),
        unix - 60,
        unix + 3600,
    )
    .unwrap();
    b.cert_type(CertType::User).unwrap();
    b.key_id("alice").unwrap();
    b.all_principals_valid().unwrap();
    let ident = UserIdentity {
        user: "alice".into(),
        roles: vec!["access".into()],
        logins: vec!["root".into()],
    };
    for (k, v) in ident.extensions(Permits::default()) {
        b.extension(k, v).unwrap();
    }
    swap_cert(&id, &b.sign(&ca).unwrap());

    let config = format!("{}.ssh_config", id.display());
    let (host, port) = c.node_addr.rsplit_once(':').unwrap();
    let out = run(
        openssh(),
        &ssh_args(
            &config,
            &["-p", port, &format!("root@{host}"), "echo should-not-run"],
        ),
        None,
    )
    .await;
    assert_refused(&out, "Permission denied");
    let out = run(
        openssh(),
        &ssh_args(&config, &["web1", "echo should-not-run"]),
        None,
    )
    .await;
    assert_refused(&out, "Permission denied");

    // And the auth service never signs one.
    c.add_user("nologin", "access", "").await;
    let out = c
        .admin(&[
            "sign",
            "--user",
            "nologin",
            "--out",
            c.dir.path().join("x").to_str().unwrap(),
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no logins allowed"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_not_allowed_by_any_role_is_refused_with_the_reason() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let out = c.ssh(&id, &["bob@web1", "echo", "should-not-run"]).await;
    assert_refused(&out, "user \"alice\" may not log in as \"bob\"");

    let config = format!("{}.ssh_config", id.display());
    let out = run(
        openssh(),
        &ssh_args(&config, &["bob@web1", "echo should-not-run"]),
        None,
    )
    .await;
    assert_refused(&out, "administratively prohibited");
    assert!(text(&out.stderr).contains("may not log in as \"bob\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_deny_and_node_labels_restrict() {
    let c = TestCluster::start().await;
    c.create_role(
        "no-dev",
        "kind: role\nversion: v3\nmetadata:\n  name: no-dev\nspec:\n  deny:\n    node_labels:\n      env: dev\n",
    )
    .await;
    c.create_role(
        "prod-only",
        "kind: role\nversion: v3\nmetadata:\n  name: prod-only\nspec:\n  allow:\n    logins: [root]\n    node_labels:\n      env: [prod, staging]\n",
    )
    .await;
    c.create_role(
        "no-root",
        "kind: role\nversion: v3\nmetadata:\n  name: no-root\nspec:\n  deny:\n    logins: [root]\n",
    )
    .await;
    c.add_user("dave", "access,no-dev", "root").await;
    c.add_user("erin", "prod-only", "").await;
    c.add_user("frank", "access,no-root", "root,frank").await;

    let dave = c.sign("dave").await;
    let out = c.ssh(&dave, &["root@web1", "echo", "should-not-run"]).await;
    assert_refused(
        &out,
        "node \"web1\" is denied to user \"dave\" by role \"no-dev\"",
    );

    let erin = c.sign("erin").await;
    let out = c.ssh(&erin, &["root@web1", "echo", "should-not-run"]).await;
    assert_refused(
        &out,
        "do not allow login \"root\" on node \"web1\" (its labels: env=dev)",
    );

    let frank = c.sign("frank").await;
    let out = c
        .ssh(&frank, &["root@web1", "echo", "should-not-run"])
        .await;
    assert_refused(&out, "may not log in as \"root\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_nodes_and_other_addresses_get_no_tunnel() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let out = c.ssh(&id, &["web9", "echo", "should-not-run"]).await;
    assert_refused(&out, "node \"web9\" not found; try turnstile ls");

    let config = format!("{}.ssh_config", id.display());
    let out = run(
        openssh(),
        &ssh_args(&config, &["web9", "echo should-not-run"]),
        None,
    )
    .await;
    assert_refused(&out, "node \"web9\" not found");

    // A tunnel straight from the proxy to an address that is not a node name:
    // the auth service's own port, and the node's address by IP.
    let (proxy_host, proxy_port) = c.proxy_addr.rsplit_once(':').unwrap();
    let auth_port = std::fs::read_to_string(c.data_dir().join("auth.addr")).unwrap();
    for target in [auth_port.trim().to_string(), c.node_addr.clone()] {
        let user_at = format!("alice@{proxy_host}");
        let out = run(
            openssh(),
            &ssh_args(&config, &["-p", proxy_port, "-W", &target, &user_at]),
            None,
        )
        .await;
        assert_refused(&out, "not found; try turnstile ls");
    }

    // The proxy runs no shells of its own.
    let user_at = format!("alice@{proxy_host}");
    let out = run(
        openssh(),
        &ssh_args(
            &config,
            &["-p", proxy_port, &user_at, "echo should-not-run"],
        ),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("the proxy runs no shells"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_a_certificate_is_refused() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    // Offer only the bare key: the certificate file points at nothing.
    std::fs::remove_file(format!("{}-cert.pub", id.display())).unwrap();
    let config = format!("{}.ssh_config", id.display());
    let (host, port) = c.node_addr.rsplit_once(':').unwrap();
    let out = run(
        openssh(),
        &ssh_args(&config, &["-p", port, host, "echo should-not-run"]),
        None,
    )
    .await;
    assert_refused(&out, "Permission denied");
}

mod door {
    use turnstile_api::door::DoorRequest;
    use turnstile_ssh::client::door::{call, call_with_certificate};
    use turnstile_ssh::client::{ClientError, open_proxy};
    use turnstile_ssh::identity::generate_ed25519;

    use crate::support::TestCluster;

    fn refused(result: Result<turnstile_api::door::DoorResponse, ClientError>) -> String {
        match result {
            Err(ClientError::ChannelRefused(text)) => text,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_kind_of_connection_may_do_only_its_part() {
        let c = TestCluster::start().await;
        c.add_user("alice", "access", "root").await;
        c.add_user("bob", "access", "root").await;
        let out = c
            .admin(&["users", "passwd", "alice", "--password-stdin"])
            .await;
        assert!(
            !out.status.success(),
            "passwd without a password on stdin fails"
        );
        c.set_password("alice", "long enough password").await;
        let id = c.sign("alice").await;
        let identity = turnstile::identity_file::read(&id).unwrap();
        let key = generate_ed25519().public_key().to_openssh().unwrap();
        let login_as = |user: Option<&str>| DoorRequest::Login {
            public_key: key.clone(),
            ttl_seconds: 0,
            user: user.map(String::from),
        };

        // A certificate may not log in as someone else.
        let text = refused(
            call_with_certificate(
                &c.proxy_addr,
                &identity.trust,
                &identity.credentials,
                &login_as(Some("bob")),
            )
            .await,
        );
        assert!(
            text.contains("a certificate of user \"alice\" cannot log in as \"bob\""),
            "{text}"
        );

        // A password connection may only log in: no ls, no tunnels, no shells.
        let mut conn = open_proxy(&c.proxy_addr, &identity.trust).await.unwrap();
        conn.auth_password("alice", "long enough password")
            .await
            .unwrap();
        let text = refused(call(&conn, &DoorRequest::Ls).await);
        assert!(text.contains("this request needs a certificate"), "{text}");
        let text = refused(call(&conn, &login_as(Some("bob"))).await);
        assert!(text.contains("cannot log in as \"bob\""), "{text}");
        let tunnel = conn
            .handle
            .channel_open_direct_tcpip("web1", 22, "127.0.0.1", 0)
            .await;
        let text = conn.open_refusal(tunnel.unwrap_err()).await;
        assert!(text.contains("tunnels need a certificate"), "{text}");
        assert!(matches!(
            call(&conn, &login_as(None)).await,
            Ok(turnstile_api::door::DoorResponse::Login(_))
        ));

        // The anonymous connection only reads the cluster's trust material.
        let mut anon = open_proxy(&c.proxy_addr, &identity.trust).await.unwrap();
        anon.auth_anonymous().await.unwrap();
        let text = refused(call(&anon, &login_as(None)).await);
        assert!(text.contains("log in with a password"), "{text}");
        assert!(matches!(
            call(&anon, &DoorRequest::ClusterInfo).await,
            Ok(turnstile_api::door::DoorResponse::ClusterInfo(_))
        ));

        // A wrong password fails authentication itself.
        let mut bad = open_proxy(&c.proxy_addr, &identity.trust).await.unwrap();
        assert!(
            bad.auth_password("alice", "not the password")
                .await
                .is_err()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_speaks_only_for_itself_and_auth_tells_a_gap_from_a_resend() {
    use turnstile_api::audit::AuditEvent;
    use turnstile_api::identity::SystemRole;
    use turnstile_api::rpc::proto;
    let c = TestCluster::start().await;
    let data = c.data_dir();
    let tls = turnstile_ssh::identity::TlsIdentity::load(&data, SystemRole::Node)
        .unwrap()
        .expect("the node's TLS identity");
    let host_id = turnstile_ssh::identity::load_or_create_host_id(&data).unwrap();
    let auth_addr = std::fs::read_to_string(data.join("auth.addr")).unwrap();
    let mut node = turnstile_ssh::cluster_view::auth_client(auth_addr.trim(), &tls).unwrap();
    let own = |user: &str| AuditEvent::AccessDenied {
        user: user.into(),
        login: "root".into(),
        server_id: host_id.clone(),
        remote_addr: "127.0.0.1:1".into(),
        reason: "test".into(),
    };
    let forged = [
        AuditEvent::UserLogin {
            user: "alice".into(),
            method: "password".into(),
            success: true,
            error: None,
            remote_addr: "10.0.0.1:1".into(),
        },
        AuditEvent::admin("user.delete", "admin", "alice", []),
        AuditEvent::AccessDenied {
            user: "alice".into(),
            login: "root".into(),
            server_id: "another-node".into(),
            remote_addr: "127.0.0.1:1".into(),
            reason: "test".into(),
        },
    ];
    let batch = |events: Vec<(u64, AuditEvent)>| proto::EmitAuditEventsRequest {
        queue_id: "test-queue".into(),
        events: events
            .into_iter()
            .map(|(seq, e)| proto::SequencedEvent {
                seq,
                event_json: serde_json::to_string(&e).unwrap(),
            })
            .collect(),
    };
    let mut events = vec![(1, own("first"))];
    events.extend(
        forged
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, e)| (i as u64 + 2, e)),
    );
    let r = node
        .emit_audit_events(batch(events))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.refused, 3,
        "a node may not speak for the proxy, an admin or another node"
    );
    // A resend is skipped; a jump in the numbers is written as a gap.
    let r = node
        .emit_audit_events(batch(vec![(1, own("first")), (9, own("after-gap"))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.duplicates, r.refused), (1, 0));
    let logged = crate::support::audit_events(&data, None).await;
    let count = |user: &str| logged.iter().filter(|e| e["user"] == user).count();
    assert_eq!(count("first"), 1);
    assert_eq!(count("after-gap"), 1);
    assert!(
        !logged
            .iter()
            .any(|e| e["event"] == "user.login" && e["user"] == "alice")
    );
    let gap = logged
        .iter()
        .find(|e| e["event"] == "audit.gap")
        .expect("an audit.gap event");
    assert_eq!(gap["missing_from"], 5);
    assert_eq!(gap["missing_to"], 8);
    assert_eq!(gap["server_id"], host_id.as_str());

    // Only auth writes `user.login`: not even the proxy may claim one.
    let tls = turnstile_ssh::identity::TlsIdentity::load(&data, SystemRole::Proxy)
        .unwrap()
        .expect("the proxy's TLS identity");
    let mut proxy = turnstile_ssh::cluster_view::auth_client(auth_addr.trim(), &tls).unwrap();
    let mut forged_login = batch(vec![(1, forged[0].clone())]);
    forged_login.queue_id = "proxy-queue".into();
    let r = proxy
        .emit_audit_events(forged_login)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.refused, 1, "a proxy may not write user.login");
}
