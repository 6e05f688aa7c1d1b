//! Host identity is decided by auth: a node's name is bound to its host id,
//! its certificate's names are auth's choice, a node's certificate never
//! passes for the proxy's, host certificates are short-lived and renewed,
//! and the proxy dials a registered address only once it answers with the
//! node's host key. Attacks are tried with the node's real identity.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::{Certificate, HashAlg};
use turnstile_api::identity::SystemRole;
use turnstile_api::rpc::proto;
use turnstile_ssh::identity::{HostKeys, load_or_create_host_id};

use crate::compromised_node::{as_node, node_takes};
use crate::support::{ClusterSpec, TestCluster, openssh, poll_until, run, text};

fn ssh_args<'a>(config: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = crate::openssh::base_args(config);
    args.extend_from_slice(extra);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_certificates_only_for_the_name_bound_to_it() {
    let c = TestCluster::start().await;
    let data = c.data_dir();
    let node_id = load_or_create_host_id(&data).unwrap();
    let mut node = as_node(&c);
    let key = HostKeys::load_or_create(&data, SystemRole::Node).unwrap();
    let asked = node
        .generate_host_cert(proto::GenerateHostCertRequest {
            public_key: key.key.public_key().to_openssh().unwrap(),
            // What a compromised node would like: the proxy's names,
            // another node's id, a name of its choosing.
            principals: vec![
                "127.0.0.1".into(),
                "localhost".into(),
                "0f3e5a4c-another-node".into(),
            ],
            node_name: "proxy.example.com".into(),
            addr: "10.9.9.9:22".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        asked.node_name, c.node_name,
        "the bound name, not the asked one"
    );
    let cert = Certificate::from_openssh(&asked.certificate).unwrap();
    assert_eq!(
        cert.valid_principals(),
        [node_id.as_str(), c.node_name.as_str()],
        "auth's names only: the address asked for is not the one the node calls from"
    );
    // Host certificates live a day.
    let life = cert.valid_before() - cert.valid_after();
    assert!((86_400..=86_400 + 120).contains(&life), "{life}");

    // The node's own certificate is from the host CA, never the proxy CA:
    // it cannot sign a PROXY header a node accepts...
    let own = key
        .certificate
        .clone()
        .expect("the node's host certificate");
    let node_addr: std::net::SocketAddr = c.node_addr.parse().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = turnstile_ssh::proxy_header::encode(
        "203.0.113.7:5000".parse().unwrap(),
        node_addr,
        &node_id,
        &key.key,
        &own,
        now,
    )
    .unwrap();
    assert!(
        !node_takes(&c.node_addr, &header).await,
        "a header signed with a node's certificate"
    );
    // ...and Turnstile's client refuses it where it expects the proxy.
    c.add_user("alice", "access", crate::support::TEST_LOGIN)
        .await;
    let id = c.sign("alice").await;
    let identity = turnstile::identity_file::read(&id).unwrap();
    let err = turnstile_ssh::client::open_proxy(&c.node_addr, &identity.trust)
        .await
        .err()
        .expect("a node posing as the proxy is refused");
    let err = err.to_string();
    assert!(err.contains("failed host verification"), "{err}");
    assert!(err.contains("proxy host CA"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_trusts_the_proxy_ca_only_for_the_proxy_and_the_host_ca_for_the_rest() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", crate::support::TEST_LOGIN)
        .await;
    let id = c.sign("alice").await;
    let known_hosts = std::fs::read_to_string(format!("{}.known_hosts", id.display())).unwrap();
    let proxy_name = format!("[127.0.0.1]:{}", c.proxy_addr.rsplit_once(':').unwrap().1);
    assert!(
        known_hosts.contains(&format!("@cert-authority {proxy_name} ")),
        "{known_hosts}"
    );
    assert!(
        known_hosts.contains(&format!("@cert-authority *,!{proxy_name},!127.0.0.1 ")),
        "{known_hosts}"
    );
    // Through the proxy to the node, and straight to the node: both work.
    let config = format!("{}.ssh_config", id.display());
    let (host, port) = c.node_addr.rsplit_once(':').unwrap();
    for extra in [
        vec![c.node_name.as_str(), "echo via-proxy"],
        vec!["-p", port, host, "echo direct"],
    ] {
        let out = run(openssh(), &ssh_args(&config, &extra), None).await;
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
    }

    // An identity whose proxy is at the node's address (a node that took
    // over the proxy's address): OpenSSH wants the proxy CA there, and the
    // node's host-CA certificate does not pass.
    let hijacked = c.dir.path().join("id-hijacked");
    c.admin_ok(&[
        "sign",
        "--user",
        "alice",
        "--proxy",
        &c.node_addr,
        "--out",
        hijacked.to_str().unwrap(),
    ])
    .await;
    let config = format!("{}.ssh_config", hijacked.display());
    let out = run(
        openssh(),
        &ssh_args(&config, &["-v", "-p", port, host, "echo should-not-run"]),
        None,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}\n{}",
        std::fs::read_to_string(format!("{}.known_hosts", hijacked.display())).unwrap(),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).is_empty());
    assert!(
        text(&out.stderr).contains("verification failed")
            || text(&out.stderr).contains("No matching host key")
            || text(&out.stderr).contains("not trusted"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_from_before_the_proxy_ca_are_told_to_renew() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", crate::support::TEST_LOGIN)
        .await;
    let id = c.sign("alice").await;
    // The known_hosts an older `admin sign` wrote: the host CA for every host.
    let path = format!("{}.known_hosts", id.display());
    let host_ca = c.authority().host_ca().public_key_openssh();
    std::fs::write(
        &path,
        format!("@cert-authority * {host_ca} turnstile-test-host-ca\n"),
    )
    .unwrap();
    let out = c.ssh(&id, &[&c.node_name, "true"]).await;
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains("renew it with `turnstile login`") && err.contains("admin sign"),
        "{err}"
    );
    assert!(!err.contains("failed host verification"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_certificates_are_renewed_at_half_life_and_a_rename_follows() {
    let c = TestCluster::start_with(ClusterSpec {
        auth_extra: "  host_cert_ttl: 6s\n".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", crate::support::TEST_LOGIN)
        .await;
    let id = c.sign("alice").await;
    let data = c.data_dir();
    let cert_of = |role| {
        HostKeys::load_or_create(&data, role)
            .unwrap()
            .certificate
            .expect("a host certificate")
    };
    let first_node = cert_of(SystemRole::Node);
    let first_proxy = cert_of(SystemRole::Proxy);
    assert!(first_node.valid_before() - first_node.valid_after() <= 6 + 60);
    let first_end = first_node.valid_before();
    let proxy_ca = first_proxy.signature_key().fingerprint(HashAlg::Sha256);
    // Past the first certificates' end, both hosts hold newer ones and
    // sessions still work.
    poll_until(Duration::from_secs(20), || {
        let node = cert_of(SystemRole::Node);
        let proxy = cert_of(SystemRole::Proxy);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        async move {
            now > first_end
                && node.valid_before() > now
                && proxy.valid_before() > now
                && proxy.signature_key().fingerprint(HashAlg::Sha256) == proxy_ca
        }
    })
    .await
    .expect("renewed host certificates");
    let out = c.ssh(&id, &[&c.node_name, "echo renewed"]).await;
    assert_eq!(text(&out.stdout), "renewed\n", "{}", text(&out.stderr));

    // A rename: listed at once, in the node's certificate by its next
    // renewal; the old name is gone.
    let renamed = c
        .admin_ok(&["nodes", "rename", &c.node_name, "web-two"])
        .await;
    assert!(renamed.contains("\"web-two\""), "{renamed}");
    assert!(c.admin_ok(&["nodes", "ls"]).await.contains("web-two"));
    poll_until(Duration::from_secs(20), || {
        let c = &c;
        let id = &id;
        async move {
            let out = c.ssh(id, &["web-two", "echo new-name"]).await;
            text(&out.stdout) == "new-name\n"
        }
    })
    .await
    .expect("the renamed node is reachable under its new name");
    let out = c.ssh(&id, &[&c.node_name, "true"]).await;
    assert_ne!(out.status.code(), Some(0), "the old name is gone");
    let events = crate::support::audit_events(&data, Some("node.rename")).await;
    assert_eq!(events.len(), 1, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_never_tunnels_to_an_address_that_is_not_the_nodes() {
    // No heartbeat during the test puts the real address back.
    let c = TestCluster::start_with(ClusterSpec {
        node_extra: "  heartbeat_interval: 1h\n".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", crate::support::TEST_LOGIN)
        .await;
    let id = c.sign("alice").await;
    let data = c.data_dir();
    let node_id = load_or_create_host_id(&data).unwrap();
    let mut node = as_node(&c);

    // What the node registers: a TCP service elsewhere in the network that
    // keeps whatever it is sent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let received = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::<u8>::new()));
    let sink = received.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                // Like a web server: it answers what it cannot read with 400
                // and hangs up.
                let mut buf = [0u8; 4096];
                if let Ok(n) = stream.read(&mut buf).await {
                    sink.lock().await.extend_from_slice(&buf[..n]);
                }
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            });
        }
    });
    // The proxy's own SSH port: it answers SSH, with the proxy's key.
    for (addr, why) in [
        (target.as_str(), "does not answer"),
        (c.proxy_addr.as_str(), "host certificate"),
    ] {
        node.upsert_node(proto::Node {
            id: node_id.clone(),
            name: c.node_name.clone(),
            addr: addr.to_string(),
            ttl_seconds: 3600,
            ..Default::default()
        })
        .await
        .unwrap();
        // Once the proxy's view has the new address, users are refused.
        let last = std::sync::Mutex::new(String::new());
        let refused = poll_until(Duration::from_secs(10), || {
            let c = &c;
            let id = &id;
            let last = &last;
            async move {
                let out = c.ssh(id, &[&c.node_name, "echo should-not-run"]).await;
                assert!(text(&out.stdout).is_empty() || text(&out.stdout) == "should-not-run\n");
                let err = text(&out.stderr);
                *last.lock().unwrap() = err.clone();
                out.status.code() != Some(0) && err.contains(why) && err.contains(addr)
            }
        })
        .await;
        assert!(refused.is_ok(), "{addr}: {}", last.lock().unwrap());
        let config = format!("{}.ssh_config", id.display());
        let out = run(openssh(), &ssh_args(&config, &[&c.node_name, "true"]), None).await;
        assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    }
    // The service saw the proxy's probe (its SSH key exchange) and never a
    // byte of the users' connections.
    let seen = received.lock().await.clone();
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains("SSH-2.0-Turnstile_address_probe"), "{seen}");
    assert!(
        !seen.contains("OpenSSH"),
        "a user's client reached the target: {seen}"
    );
    assert!(
        !seen.contains("russh"),
        "a user's client reached the target: {seen}"
    );

    // Registered back at its real address, the node is reachable again.
    node.upsert_node(proto::Node {
        id: node_id.clone(),
        name: c.node_name.clone(),
        addr: c.node_addr.clone(),
        ttl_seconds: 3600,
        ..Default::default()
    })
    .await
    .unwrap();
    poll_until(Duration::from_secs(10), || {
        let c = &c;
        let id = &id;
        async move { text(&c.ssh(id, &[&c.node_name, "echo back"]).await.stdout) == "back\n" }
    })
    .await
    .expect("the node at its own address");
}
