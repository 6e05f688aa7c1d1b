//! Several auth servers sharing one etcd, as separate processes of the real
//! binary with a real etcd and s3s-fs for the recordings: every auth server
//! serves the whole cluster, and nodes and proxies attached to all of them
//! go on through the death of one.

use std::path::Path;
use std::time::Duration;

use turnstile_auth::backend::etcd::testing::EtcdServer;

use crate::cluster::{
    Dirs, PROXY_SERVICE, admin, admin_with_stdin, node_names, node_service, token,
};
use crate::object_stores::{S3Server, SECRET_KEY, aws_env};
use crate::recording::{play, wait_complete};
use crate::support::{BIN, Proc, client, free_port, poll_until, run, text};

/// An auth server on the etcd at `etcd`, recording to `uri`.
fn auth_on_etcd(data: &Path, etcd: &str, uri: &str, extra: &str) -> String {
    format!(
        "turnstile:\n  data_dir: {}\n  storage:\n    type: etcd\n    peers: [\"{etcd}\"]\n    prefix: /ha\n    audit_sessions_uri: \"{uri}\"\nauth_service:\n  listen_addr: 127.0.0.1:0\n  cluster_name: prod\n{extra}",
        data.display()
    )
}

/// A process joining with `token`, attached to every auth server in `auths`.
fn attached_to_all(data: &Path, auths: &[String], token: &str, pin: &str, service: &str) -> String {
    let list: Vec<String> = auths.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "turnstile:\n  data_dir: {}\n  auth_servers: [{}]\n  join_token: {token}\n  ca_pin: {pin}\n{service}",
        data.display(),
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_servers_on_one_etcd_are_equal_and_a_dead_one_is_passed_over() {
    let dirs = Dirs::new();
    let mut etcd = EtcdServer::start().await;
    let s3 = S3Server::s3s_fs(&dirs.path("s3"), free_port()).await;
    let uri = s3.uri("recordings");
    let env = aws_env(SECRET_KEY);
    let (a_data, b_data) = (dirs.path("auth-a"), dirs.path("auth-b"));
    // The first start of two auth servers at once: one set of CAs.
    let a_config = dirs.config("auth-a", &auth_on_etcd(&a_data, &etcd.url(), &uri, ""));
    let b_config = dirs.config(
        "auth-b",
        &auth_on_etcd(&b_data, &etcd.url(), &uri, "  locking_mode: strict\n"),
    );
    let (a, b) = tokio::join!(
        Proc::start_env(&a_config, &env),
        Proc::start_env(&b_config, &env)
    );
    let pin = a.field("CA pin");
    assert_eq!(
        b.field("CA pin"),
        pin,
        "both serve the CAs the first start made"
    );
    let b_addr = b.field("auth");

    // A setting given live survives the start of an auth server whose file
    // does not set it; one whose file sets it sets it again.
    admin(&a_data, &["config", "set", "client_idle_timeout", "15m"]).await;
    let a = {
        a.stop().await;
        Proc::start_env(&a_config, &env).await
    };
    let shown = admin(&b_data, &["config", "get"]).await;
    assert!(
        shown.contains("15m") && shown.contains("strict"),
        "restarting auth-a kept what it does not set:\n{shown}"
    );
    let auths = vec![a.field("auth"), b_addr];

    // A proxy and a node, joined with tokens either auth server made, each
    // attached to both.
    let (t, _) = token(&a_data, "proxy", "10m").await;
    let proxy = Proc::start(&dirs.config(
        "proxy",
        &attached_to_all(&dirs.path("proxy"), &auths, &t, &pin, PROXY_SERVICE),
    ))
    .await;
    let proxy_addr = proxy.field("proxy");
    let (t, _) = token(&b_data, "node", "10m").await;
    let _web1 = Proc::start(&dirs.config(
        "web1",
        &attached_to_all(
            &dirs.path("web1"),
            &auths,
            &t,
            &pin,
            &node_service("web1", "dev"),
        ),
    ))
    .await;
    poll_until(Duration::from_secs(20), || async {
        node_names(&a_data).await.contains(&"web1".to_string())
            && node_names(&b_data).await.contains(&"web1".to_string())
    })
    .await
    .expect("both auth servers list the node");

    // A role made through one auth server, a user through the other. The
    // role's limit needs auth for every session's slot.
    let role = dirs.path("limited.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v3\nmetadata:\n  name: limited\nspec:\n  options:\n    max_connections: 2\n  allow:\n    logins: ['{{internal.logins}}']\n",
    )
    .unwrap();
    admin(&b_data, &["roles", "create", "-f", role.to_str().unwrap()]).await;
    admin_with_stdin(
        &a_data,
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "limited",
            "--logins",
            "root",
            "--password-stdin",
        ],
        b"correct horse battery\n",
    )
    .await;
    let home = dirs.path("home");
    let out = client(
        &home,
        &[
            "login",
            "--proxy",
            &proxy_addr,
            "--user",
            "alice",
            "--ca-pin",
            &pin,
            "--password-stdin",
        ],
        Some(b"correct horse battery\n"),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let identity = home.join("keys/prod/alice");
    let sid_of = |out: &std::process::Output| text(&out.stdout).trim().to_string();
    let out = client(
        &home,
        &["ssh", "web1", "--", "echo $TURNSTILE_SESSION_ID"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_complete(&identity, &sid_of(&out)).await;

    // auth-a dies. Limited sessions (whose slots only auth gives) work
    // again once the node and proxy pass over it, and are recorded through
    // auth-b.
    a.kill9().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let out = client(
            &home,
            &[
                "ssh",
                "web1",
                "--",
                "echo $TURNSTILE_SESSION_ID; head -c 300000 /dev/urandom | base64",
            ],
            None,
        )
        .await;
        if out.status.success() {
            break out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a limited session still fails with one auth server dead: {}",
            text(&out.stderr)
        );
    };
    let sid = text(&after.stdout).lines().next().unwrap().to_string();
    wait_complete(&identity, &sid).await;
    let played = play(&identity, &sid, "text").await;
    assert!(
        played == after.stdout,
        "the recording made through auth-b plays back"
    );
    assert!(node_names(&b_data).await.contains(&"web1".to_string()));

    // etcd stops. A user without limits keeps working from the caches of
    // proxy and node; a limited one is refused with the reason; both work
    // again once etcd is back, with nothing restarted.
    let bob = dirs.path("bob");
    admin(
        &b_data,
        &[
            "users", "add", "bob", "--roles", "access", "--logins", "root",
        ],
    )
    .await;
    admin(
        &b_data,
        &[
            "sign",
            "--user",
            "bob",
            "--proxy",
            &proxy_addr,
            "--out",
            bob.to_str().unwrap(),
        ],
    )
    .await;
    let bob_id = bob.to_str().unwrap().to_string();
    let bob_ssh = || async {
        run(
            BIN,
            &["ssh", "-i", &bob_id, "web1", "--", "echo", "bob"],
            None,
        )
        .await
    };
    let alice_ssh = || client(&home, &["ssh", "web1", "--", "echo", "alice"], None);
    poll_until(Duration::from_secs(20), || async {
        text(&bob_ssh().await.stdout) == "bob\n"
    })
    .await
    .expect("bob works once proxy and node know him");
    etcd.stop().await;
    let out = bob_ssh().await;
    assert_eq!(text(&out.stdout), "bob\n", "{}", text(&out.stderr));
    let out = alice_ssh().await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a limited session without etcd");
    assert!(
        stderr.contains("cannot take a connection slot for user \"alice\"")
            && stderr.contains(&format!("etcd ({}) did not answer", etcd.url())),
        "the refusal says why: {stderr}"
    );
    etcd.restart().await;
    poll_until(Duration::from_secs(20), || async {
        text(&alice_ssh().await.stdout) == "alice\n"
    })
    .await
    .expect("limited sessions work again once etcd is back");
    drop(b);
}
